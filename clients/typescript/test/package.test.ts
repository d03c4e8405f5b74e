/**
 * `npm pack` makes an installable tarball whose Functions library and wire contract are
 * byte-identical to the repository's lua/library.lua and lua/contract.json, and the product sheet's snippet runs exactly as written against it, installed into a
 * fresh folder under the name `agentbill` (as `npm install agentbill@npm:agentbill-redis` does).
 */
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { after, before, test } from 'node:test'
import { Redis } from 'ioredis'
import { RedisServer } from './servers.js'

const PACKAGE = fileURLToPath(new URL('../../', import.meta.url))
const REPO_LUA = fileURLToPath(new URL('../../../../lua/', import.meta.url))
const README = fileURLToPath(new URL('../../../../README.md', import.meta.url))

/** The product sheet's TypeScript snippet, exactly as the sheet (and the README) shows it. */
export const SHEET_SNIPPET = `import { AgentBillClient } from 'agentbill'
const client = new AgentBillClient({ apiKey: 'agb_your_key', ceiling: 50 })
const check = await client.preflight({ agentId: 'my_agent', estimatedUnits: 10 })
if (!check.approved) throw new Error(check.reason)
const result = await runAgent()
await client.record({ agentId: 'my_agent', units: 10 })
`

let work: string
let tarball: string
let server: RedisServer

before(async () => {
  server = await RedisServer.start()
  work = mkdtempSync(join(tmpdir(), 'ab-ts-pack-'))
  const out = execFileSync('npm', ['pack', '--json', '--pack-destination', work], {
    cwd: PACKAGE,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  const [info] = JSON.parse(out.slice(out.indexOf('['))) as [{ filename: string }]
  tarball = join(work, info.filename)
})

after(async () => {
  rmSync(work, { recursive: true, force: true })
  await server.stop()
})

test('the packed library and contract are byte-identical to the repository lua/', () => {
  const unpacked = join(work, 'unpacked')
  execFileSync('mkdir', ['-p', unpacked])
  execFileSync('tar', ['-xzf', tarball, '-C', unpacked])
  const packedLua = join(unpacked, 'package', 'lua')
  // What the client reads, and only that: the library holds every script.
  assert.deepEqual(readdirSync(packedLua).sort(), ['contract.json', 'library.lua'])
  for (const file of ['contract.json', 'library.lua']) {
    assert.ok(readFileSync(join(packedLua, file)).equals(readFileSync(join(REPO_LUA, file))), file)
  }
  const files = execFileSync('tar', ['-tzf', tarball], { encoding: 'utf8' }).split('\n')
  assert.ok(files.includes('package/dist/index.js') && files.includes('package/dist/index.d.ts'))
  assert.ok(!files.some((f) => f.startsWith('package/src/') || f.startsWith('package/test/')))
})

test("the sheet's snippet runs as written against the installed tarball, and type-checks", async () => {
  assert.ok(readFileSync(README, 'utf8').includes(SHEET_SNIPPET), 'the README shows the snippet')
  const app = join(work, 'app')
  execFileSync('mkdir', ['-p', app])
  writeFileSync(
    join(app, 'package.json'),
    JSON.stringify({ name: 'app', private: true, type: 'module', dependencies: { agentbill: `file:${tarball}` } }),
  )
  execFileSync('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline'], { cwd: app, stdio: 'ignore' })
  writeFileSync(join(app, 'snippet.mjs'), SHEET_SNIPPET)
  // The one thing the snippet leaves to its reader: what runAgent() is.
  writeFileSync(join(app, 'agent.mjs'), 'globalThis.runAgent = async () => "the agent ran"\n')
  execFileSync('node', ['--import', './agent.mjs', 'snippet.mjs'], {
    cwd: app,
    env: { ...process.env, AGENTBILL_REDIS_URL: server.url },
    stdio: 'pipe',
  })
  const raw = new Redis(server.port, '127.0.0.1')
  try {
    const budgets = await raw.keys('agentbill:*:budget')
    assert.equal(budgets.length, 1)
    assert.deepEqual(await raw.hmget(budgets[0]!, 'spent', 'reserved', 'customer'), ['10', '0', 'default'])
  } finally {
    raw.disconnect()
  }
  // The same text as TypeScript, strict, against the installed declarations.
  writeFileSync(join(app, 'snippet.mts'), SHEET_SNIPPET)
  writeFileSync(join(app, 'agent.d.ts'), 'declare function runAgent(): Promise<unknown>\n')
  const tsc = join(PACKAGE, 'node_modules', 'typescript', 'bin', 'tsc')
  execFileSync(
    'node',
    [tsc, '--noEmit', '--strict', '--target', 'es2022', '--module', 'nodenext', '--moduleResolution', 'nodenext',
      '--typeRoots', join(PACKAGE, 'node_modules', '@types'), '--types', 'node', 'snippet.mts', 'agent.d.ts'],
    { cwd: app, stdio: 'pipe' },
  )
})
