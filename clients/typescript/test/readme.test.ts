/** Every TypeScript example in the README runs, in order, and prints what its closing comment
 * lines say; all of them type-check strictly against the package's declarations. */
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { after, before, test } from 'node:test'
import ts from 'typescript'
import { RedisServer } from './servers.js'

const PACKAGE = fileURLToPath(new URL('../../', import.meta.url))
const README = readFileSync(fileURLToPath(new URL('../../../../README.md', import.meta.url)), 'utf8')
const BLOCKS = [...README.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]!)

let server: RedisServer
let app: string

before(async () => {
  server = await RedisServer.start()
  app = mkdtempSync(join(tmpdir(), 'ab-ts-readme-'))
  mkdirSync(join(app, 'node_modules'))
  symlinkSync(PACKAGE, join(app, 'node_modules', 'agentbill'), 'dir')
  writeFileSync(join(app, 'package.json'), JSON.stringify({ type: 'module', private: true }))
  writeFileSync(join(app, 'agent.mjs'), 'globalThis.runAgent = async () => "the agent ran"\n')
  writeFileSync(join(app, 'agent.d.ts'), 'declare function runAgent(): Promise<unknown>\n')
})

after(async () => {
  rmSync(app, { recursive: true, force: true })
  await server.stop()
})

test('the README has TypeScript examples', () => {
  assert.ok(BLOCKS.length >= 3)
})

test('every TypeScript block runs in order and prints what it says', () => {
  BLOCKS.forEach((block, i) => {
    const js = ts.transpileModule(block, {
      compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
    }).outputText
    writeFileSync(join(app, `block${i}.mjs`), js)
    const out = execFileSync('node', ['--import', './agent.mjs', `block${i}.mjs`], {
      cwd: app,
      env: { ...process.env, AGENTBILL_REDIS_URL: server.url },
      encoding: 'utf8',
    })
    const lines = block.trimEnd().split('\n')
    const shown: string[] = []
    while (block.includes('console.log(') && lines.length > 0 && lines.at(-1)!.startsWith('// ')) {
      shown.unshift(lines.pop()!.slice(3))
    }
    const printed = out.trimEnd().split('\n')
    assert.deepEqual(shown.length === 0 ? [] : printed.slice(-shown.length), shown, `block ${i}`)
  })
})

test('every TypeScript block type-checks (strict) against the declarations', () => {
  const files = BLOCKS.map((block, i) => {
    writeFileSync(join(app, `block${i}.mts`), block)
    return `block${i}.mts`
  })
  const tsc = join(PACKAGE, 'node_modules', 'typescript', 'bin', 'tsc')
  execFileSync(
    'node',
    [tsc, '--noEmit', '--strict', '--target', 'es2022', '--module', 'nodenext', '--moduleResolution', 'nodenext',
      '--typeRoots', join(PACKAGE, 'node_modules', '@types'), '--types', 'node', ...files, 'agent.d.ts'],
    { cwd: app, stdio: 'pipe' },
  )
})
