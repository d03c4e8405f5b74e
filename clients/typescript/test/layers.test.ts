/**
 * No import circle inside src/: every module sits on a floor and imports only from below (as
 * tests/test_layers.py checks agentbill/). Every import of another src/ module counts, wherever
 * it stands and whatever it takes: `import type` and `import { type X }` too (a type import is
 * erased from the JavaScript, but it still ties the two modules' meaning together), `export ...
 * from`, a side-effect `import './x.js'`, `import('./x.js')`, and a type written
 * `import('./x.js').T`. An object on a lower floor that calls back up (a Check settling itself)
 * names what it calls in a small interface instead (STYLE.md, "Types and boundaries").
 */
import assert from 'node:assert/strict'
import { readdirSync, readFileSync } from 'node:fs'
import { test } from 'node:test'
import ts from 'typescript'

const SRC = new URL('../../src/', import.meta.url)

/** importer -> {imported: line of the first such import}; modules named by file stem. */
type Graph = Map<string, Map<string, number>>

/** The src/ modules a source imports, with the line of each import (third-party ones left out). */
function importsOf(fileName: string, text: string): Map<string, number> {
  const source = ts.createSourceFile(fileName, text, ts.ScriptTarget.Latest, true)
  const found = new Map<string, number>()
  const note = (specifier: ts.Node | undefined, at: ts.Node): void => {
    if (specifier === undefined || !ts.isStringLiteralLike(specifier)) return
    const local = /^\.\/([\w.-]+)\.js$/.exec(specifier.text)
    if (local === null) return // a package (ioredis, node:fs) or a path outside src/
    const line = source.getLineAndCharacterOfPosition(at.getStart(source)).line + 1
    if (!found.has(local[1]!)) found.set(local[1]!, line)
  }
  const visit = (node: ts.Node): void => {
    if (ts.isImportDeclaration(node) || ts.isExportDeclaration(node)) {
      note(node.moduleSpecifier, node)
    } else if (ts.isImportEqualsDeclaration(node) && ts.isExternalModuleReference(node.moduleReference)) {
      note(node.moduleReference.expression, node)
    } else if (ts.isCallExpression(node) && node.expression.kind === ts.SyntaxKind.ImportKeyword) {
      note(node.arguments[0], node)
    } else if (ts.isImportTypeNode(node) && ts.isLiteralTypeNode(node.argument)) {
      note(node.argument.literal, node)
    }
    ts.forEachChild(node, visit)
  }
  visit(source)
  return found
}

function importGraph(): Graph {
  const files = readdirSync(SRC).filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts')).sort()
  const graph: Graph = new Map(files.map((f) => [f.slice(0, -'.ts'.length), new Map()]))
  for (const file of files) {
    const imports = importsOf(file, readFileSync(new URL(file, SRC), 'utf8'))
    const importer = file.slice(0, -'.ts'.length)
    for (const [target, line] of imports) {
      assert.ok(graph.has(target), `${file} line ${line} imports ./${target}.js, which is not in src/`)
      graph.get(importer)!.set(target, line)
    }
  }
  return graph
}

/** A shortest path of imports from `from` to `to` (both included), or undefined. */
function shortestPath(graph: Graph, from: string, to: string): string[] | undefined {
  const cameFrom = new Map<string, string>()
  const queue = [from]
  while (queue.length > 0) {
    const node = queue.shift()!
    for (const next of [...graph.get(node)!.keys()].sort()) {
      if (next === to) {
        const path = [node]
        while (path[0] !== from) path.unshift(cameFrom.get(path[0]!)!)
        return [...path, to]
      }
      if (next !== from && !cameFrom.has(next)) {
        cameFrom.set(next, node)
        queue.push(next)
      }
    }
  }
  return undefined
}

/** Each circle as the modules in it (a module importing itself counts), every module once, and a
 * shortest circle through the first of them, which ends where it starts. */
function circles(graph: Graph): { modules: string[]; example: string[] }[] {
  const found: { modules: string[]; example: string[] }[] = []
  const placed = new Set<string>()
  for (const start of [...graph.keys()].sort()) {
    if (placed.has(start)) continue
    const example = shortestPath(graph, start, start)
    if (example === undefined) continue
    const modules = [...graph.keys()]
      .filter((m) => m === start || (shortestPath(graph, start, m) && shortestPath(graph, m, start)))
      .sort()
    modules.forEach((m) => placed.add(m))
    found.push({ modules, example })
  }
  return found
}

function describe(graph: Graph, circle: { modules: string[]; example: string[] }): string {
  const steps = circle.example
    .slice(0, -1)
    .map((m, i) => `    ${m}.ts imports ${circle.example[i + 1]}.ts (line ${graph.get(m)!.get(circle.example[i + 1]!)})`)
  return `${circle.modules.length} modules in one circle: ${circle.modules.join(', ')}\n  for example:\n${steps.join('\n')}`
}

test('the checker sees every kind of import', () => {
  const source = [
    "import { a } from './a.js'",
    "import type { B } from './b.js'",
    "import { type C, c } from './c.js'",
    "export { d } from './d.js'",
    "export type * from './e.js'",
    "import './f.js'",
    "type G = import('./g.js').G",
    "export async function h() { return await import('./h.js') }",
    "import { Redis } from 'ioredis'",
    "import { readFileSync } from 'node:fs'",
    "import { x } from '../outside/x.js'",
  ].join('\n')
  const found = importsOf('sample.ts', source)
  assert.deepEqual([...found.keys()].sort(), ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'])
  assert.equal(found.get('g'), 7)

  const graph = importGraph()
  assert.ok(graph.get('client')!.has('core')) // a value import
  assert.ok(graph.get('errors')!.has('check')) // a type-only import
  assert.ok(graph.get('index')!.has('results')) // a re-export
})

test('the checker finds a circle, and names it', () => {
  const graph: Graph = new Map([
    ['a', new Map([['b', 1]])],
    ['b', new Map([['c', 2]])],
    ['c', new Map([['a', 3], ['d', 4]])],
    ['d', new Map()],
    ['e', new Map([['a', 5], ['e', 6]])],
  ])
  const found = circles(graph)
  assert.deepEqual(found, [
    { modules: ['a', 'b', 'c'], example: ['a', 'b', 'c', 'a'] },
    { modules: ['e'], example: ['e', 'e'] },
  ])
  assert.equal(
    describe(graph, found[0]!),
    '3 modules in one circle: a, b, c\n  for example:\n' +
      '    a.ts imports b.ts (line 1)\n    b.ts imports c.ts (line 2)\n    c.ts imports a.ts (line 3)',
  )
})

test('no import circle in src/', () => {
  const graph = importGraph()
  const found = circles(graph)
  assert.equal(found.length, 0, `import circle in src/:\n${found.map((c) => describe(graph, c)).join('\n')}`)
})
