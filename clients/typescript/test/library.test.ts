/**
 * The client calls agentbill's Functions library (FCALL) and heals a Redis that lacks it: FUNCTION
 * LOAD, then the same call once more, with the same request id. A connection that may not load
 * it gets LibraryNotLoadedError; a Redis without Functions says which version agentbill needs.
 */
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import { Redis } from 'ioredis'
import { functionName, library } from '../src/contract.js'
import { AgentBillClient, LibraryNotLoadedError, StoreError } from '../src/index.js'
import { RedisServer, namespace } from './servers.js'

let server: RedisServer
let raw: Redis

before(async () => {
  server = await RedisServer.start()
  raw = new Redis(server.port, '127.0.0.1')
})

after(async () => {
  raw.disconnect()
  await server.stop()
})

/** The names of the libraries loaded in Redis. */
async function libraries(redis: Redis): Promise<string[]> {
  const listed = (await redis.function('LIST')) as unknown as unknown[][]
  return listed.map((info) => String(info[info.indexOf('library_name') + 1])).sort()
}

/** How many FUNCTION LOADs Redis has run (INFO commandstats). */
async function loads(redis: Redis): Promise<number> {
  const stats = await redis.info('commandstats')
  return Number(/^cmdstat_function\|load:calls=(\d+)/m.exec(stats)?.[1] ?? 0)
}

/** `given` with every FCALL it sends noted: the arguments and how Redis answered. */
function noting(given: Redis): { args: string[]; answer: string }[] {
  const sent: { args: string[]; answer: string }[] = []
  const fcall = given.fcall.bind(given) as (...args: unknown[]) => Promise<unknown>
  ;(given as unknown as { fcall: unknown }).fcall = async (...args: unknown[]) => {
    const noted = { args: args.map(String), answer: 'ok' }
    sent.push(noted)
    try {
      return await fcall(...args)
    } catch (exc) {
      noted.answer = (exc as Error).message
      throw exc
    }
  }
  return sent
}

test('after FUNCTION FLUSH a call loads the library and is sent again with the same request id: charged once', async () => {
  const given = new Redis(server.port, '127.0.0.1')
  const c = new AgentBillClient({ redis: given, namespace: namespace() })
  try {
    await c.setBudget({ customerId: 'u', limit: 100 })
    const check = await c.preflight({ agentId: 'a', estimatedUnits: 10, customerId: 'u' })
    await raw.function('FLUSH')
    assert.deepEqual(await libraries(raw), [])
    const sent = noting(given)
    const settled = await check.record(7)
    assert.equal(settled.status, 'recorded')
    assert.deepEqual(sent.map((s) => s.answer), ['ERR Function not found', 'ok'])
    assert.equal(sent[0]!.args[0], functionName(library, 'settle'))
    assert.deepEqual(sent[1]!.args, sent[0]!.args) // the same call: the same request id
    assert.ok(sent[0]!.args.some((arg) => arg.includes(check.reservationId!)))
    assert.deepEqual(await libraries(raw), [library.name])
    const b = await c.getBudget({ customerId: 'u' })
    assert.deepEqual([b.spent, b.reserved, b.openReservations], [7, 0, 0])
    const recorded = (await c.events({ customerId: 'u' })).filter((e) => e.type === 'recorded')
    assert.equal(recorded.length, 1)
    // A preflight after a flush reserves once too.
    await raw.function('FLUSH')
    const again = await c.preflight({ agentId: 'a', estimatedUnits: 5, customerId: 'u' })
    assert.equal(again.approved, true)
    const approvals = (await c.events({ customerId: 'u' })).filter((e) => e.type === 'approved')
    assert.equal(approvals.length, 2)
    assert.equal((await c.getBudget({ customerId: 'u' })).reserved, 5)
  } finally {
    await c.close()
    given.disconnect()
  }
})

test('the library flushed again right after this client loaded it: the call is retried (TRYAGAIN), charged once', async () => {
  // A FUNCTION FLUSH (or DELETE, or RESTORE of an older dump) racing the reload: the call sent
  // again misses once more. It ran nothing, so it is "not now", as in the Python client: the
  // retry policy sends it again. Thrown instead, a record was lost and its estimate held.
  const given = new Redis(server.port, '127.0.0.1')
  const c = new AgentBillClient({ redis: given, namespace: namespace() })
  try {
    await c.setBudget({ customerId: 'u', limit: 100 })
    const check = await c.preflight({ agentId: 'a', estimatedUnits: 10, customerId: 'u' })
    await raw.function('FLUSH')
    const load = given.function.bind(given) as (...args: unknown[]) => Promise<unknown>
    let raced = false
    ;(given as unknown as { function: unknown }).function = async (...args: unknown[]) => {
      const answer = await load(...args)
      if (!raced && String(args[0]).toUpperCase() === 'LOAD') {
        raced = true
        await raw.function('FLUSH') // removed again before the call is sent again
      }
      return answer
    }
    const sent = noting(given)
    const settled = await check.record(7)
    assert.equal(settled.status, 'recorded')
    assert.ok(raced)
    assert.deepEqual(sent.map((s) => s.answer), ['ERR Function not found', 'ERR Function not found', 'ERR Function not found', 'ok'])
    for (const s of sent) assert.deepEqual(s.args, sent[0]!.args) // one request id throughout
    const b = await c.getBudget({ customerId: 'u' })
    assert.deepEqual([b.spent, b.reserved, b.openReservations], [7, 0, 0])
  } finally {
    await c.close()
    given.disconnect()
  }
})

test('calls that find the library missing together share one FUNCTION LOAD', async () => {
  const c = new AgentBillClient({ redisUrl: server.url, namespace: namespace() })
  try {
    await c.setBudget({ customerId: 'u', limit: 1000 })
    await raw.function('FLUSH')
    const before = await loads(raw)
    const checks = await Promise.all(
      Array.from({ length: 20 }, () => c.preflight({ agentId: 'a', estimatedUnits: 1, customerId: 'u' })),
    )
    assert.deepEqual(checks.map((k) => k.approved), checks.map(() => true))
    assert.equal((await loads(raw)) - before, 1)
    assert.equal((await c.getBudget({ customerId: 'u' })).reserved, 20)
  } finally {
    await c.close()
  }
})

test("another library in the same Redis (another agentbill version's) is neither called nor disturbed", async () => {
  const other = 'agentbill_000000000000'
  const text = `#!lua name=${other}\nredis.register_function('${other}_get_budget', function() return 'the other version' end)\n`
  await raw.function('FLUSH')
  await raw.function('LOAD', 'REPLACE', text)
  const c = new AgentBillClient({ redisUrl: server.url, namespace: namespace() })
  try {
    await c.setBudget({ customerId: 'u', limit: 30 })
    assert.equal((await c.getBudget({ customerId: 'u' })).limit, 30)
    assert.deepEqual(await libraries(raw), [other, library.name].sort())
    assert.equal(await raw.fcall(`${other}_get_budget`, 0), 'the other version')
  } finally {
    await c.close()
    await raw.function('DELETE', other)
  }
})

test('a user that may FCALL but not FUNCTION LOAD gets LibraryNotLoadedError, and works once an operator loads it', async () => {
  const user = `tenant-${namespace()}`
  await raw.acl('SETUSER', user, 'reset', 'on', '>tenant-pw', '~*', '+@all', '-function')
  await raw.function('FLUSH')
  const ns = namespace()
  const c = new AgentBillClient({ redisUrl: `redis://${user}:tenant-pw@127.0.0.1:${server.port}/0`, namespace: ns })
  try {
    const refused = await c.getBudget({ customerId: 'u' }).then(
      () => assert.fail('the call ran without the library'),
      (exc: unknown) => exc,
    )
    assert.ok(refused instanceof LibraryNotLoadedError, String(refused))
    assert.ok(refused instanceof StoreError)
    assert.equal(refused.name, 'LibraryNotLoadedError')
    assert.equal(refused.library, library.name)
    assert.match(refused.message, new RegExp(`library ${library.name} is not loaded`))
    assert.match(refused.message, /agentbill keys load-library/)
    assert.match(refused.message, /KeyAdmin\.load_library\(\)/)
    assert.match(refused.message, /NOPERM/)
    assert.deepEqual(await libraries(raw), [])
    // An operator (here: a client of the default user) loads it; the tenant's calls then run.
    const admin = new AgentBillClient({ redisUrl: server.url, namespace: ns })
    await admin.setBudget({ customerId: 'u', limit: 40 })
    await admin.close()
    assert.equal((await c.getBudget({ customerId: 'u' })).limit, 40)
  } finally {
    await c.close()
    await raw.acl('DELUSER', user)
  }
})

test('a Redis without FCALL (before 7.0) is a StoreError saying agentbill needs Redis 7.0+ or Valkey', async () => {
  const old = await RedisServer.start(['--rename-command', 'FCALL', ''])
  const c = new AgentBillClient({ redisUrl: old.url, namespace: namespace() })
  try {
    await assert.rejects(
      c.getBudget({ customerId: 'u' }),
      (exc: unknown) =>
        exc instanceof StoreError &&
        !(exc instanceof LibraryNotLoadedError) &&
        /agentbill needs Redis 7\.0\+ or Valkey/.test(exc.message) &&
        /unknown command 'FCALL'/i.test(exc.message),
    )
  } finally {
    await c.close()
    await old.stop()
  }
})
