/** Fail-closed within 2 s when Redis is down or silent; retries keep the request id. */
import assert from 'node:assert/strict'
import { createServer, connect, type Server, type Socket } from 'node:net'
import { after, before, test } from 'node:test'
import { Redis } from 'ioredis'
import { AgentBillClient, AuthenticationError, StoreBusyError, StoreUnavailableError } from '../src/index.js'
import { RedisServer, freePort, namespace } from './servers.js'

// The bound the README promises: a 0.5 s connect timeout, a 1 s reply timeout, retries within
// a 1 s deadline. What is asserted is that bound, not a speed.
const FAIL_CLOSED_BOUND_MS = 2000

let server: RedisServer

before(async () => {
  server = await RedisServer.start()
})

after(async () => {
  await server.stop()
})

async function timed<T>(work: Promise<T>): Promise<[number, unknown]> {
  const started = performance.now()
  try {
    await work
    return [performance.now() - started, undefined]
  } catch (exc) {
    return [performance.now() - started, exc]
  }
}

test('nothing listening: StoreUnavailableError within 2 s, nothing approved', async () => {
  const port = await freePort()
  const c = new AgentBillClient({ redisUrl: `redis://127.0.0.1:${port}/0` })
  const [ms, exc] = await timed(c.preflight({ agentId: 'a', estimatedUnits: 1 }))
  assert.ok(exc instanceof StoreUnavailableError, String(exc))
  assert.ok(ms < FAIL_CLOSED_BOUND_MS, `connected client: ${ms} ms`)
  await c.close()
})

test('a server that accepts but never answers: StoreUnavailableError within 2 s', async () => {
  const silent = await RedisServer.start()
  const c = new AgentBillClient({ redisUrl: silent.url, namespace: namespace() })
  await c.getBudget() // connected and working
  silent.pause()
  try {
    const [ms, exc] = await timed(c.preflight({ agentId: 'a', estimatedUnits: 1 }))
    assert.ok(exc instanceof StoreUnavailableError, String(exc))
    assert.ok(ms < FAIL_CLOSED_BOUND_MS, `connected client: ${ms} ms`)
    const fresh = new AgentBillClient({ redisUrl: silent.url })
    const [ms2, exc2] = await timed(fresh.preflight({ agentId: 'a', estimatedUnits: 1 }))
    assert.ok(exc2 instanceof StoreUnavailableError, String(exc2))
    assert.ok(ms2 < FAIL_CLOSED_BOUND_MS, `new client: ${ms2} ms`)
    await fresh.close()
  } finally {
    silent.resume()
    await c.close()
    await silent.stop()
  }
})

test('a server back up is used again by the same client', async () => {
  const flaky = await RedisServer.start()
  const c = new AgentBillClient({ redisUrl: flaky.url, namespace: namespace() })
  await c.getBudget()
  await flaky.stop()
  await assert.rejects(c.getBudget(), StoreUnavailableError)
  const again = new RedisServer(flaky.port)
  await again.start()
  try {
    let budget
    for (let i = 0; i < 50 && budget === undefined; i++) {
      budget = await c.getBudget().catch(() => undefined)
      if (budget === undefined) await new Promise((r) => setTimeout(r, 100))
    }
    assert.equal(budget?.spent, 0)
  } finally {
    await c.close()
    await again.stop()
  }
})

/** A TCP proxy to Redis. While `dropping` > 0, the next connection that sends a script call
 * naming a reservation has that call forwarded to Redis but its reply held back, and is cut
 * 100 ms later: Redis ran the call, the client never heard. */
class ReplyDroppingProxy {
  dropping = 0
  readonly #server: Server
  readonly #sockets = new Set<Socket>()

  constructor(
    readonly port: number,
    target: number,
  ) {
    this.#server = createServer((client) => {
      const upstream = connect(target, '127.0.0.1')
      this.#sockets.add(client).add(upstream)
      let cut = false
      client.on('data', (chunk) => {
        upstream.write(chunk)
        const text = chunk.toString('latin1')
        if (!cut && this.dropping > 0 && /fcall/i.test(text) && text.includes('rsv.')) {
          this.dropping -= 1
          cut = true
          setTimeout(() => {
            client.destroy()
            upstream.destroy()
          }, 100) // long enough for Redis to run the script
        }
      })
      upstream.on('data', (chunk) => {
        if (!cut && !client.destroyed) client.write(chunk)
      })
      for (const s of [client, upstream]) s.on('error', () => undefined)
      client.on('close', () => upstream.destroy())
      upstream.on('close', () => client.destroy())
    })
  }

  listen(): Promise<void> {
    return new Promise((done) => this.#server.listen(this.port, '127.0.0.1', done))
  }

  close(): void {
    for (const s of this.#sockets) s.destroy()
    this.#server.close()
  }
}

test('a preflight whose reply was lost is retried with the same reservation id: reserved once', async () => {
  const proxy = new ReplyDroppingProxy(await freePort(), server.port)
  await proxy.listen()
  const ns = namespace()
  const c = new AgentBillClient({ redisUrl: `redis://127.0.0.1:${proxy.port}/0`, namespace: ns, socketTimeout: 1 })
  const direct = new AgentBillClient({ redisUrl: server.url, namespace: ns })
  try {
    await c.getBudget({ customerId: 'u' }) // connected, scripts loaded
    proxy.dropping = 1
    const check = await c.preflight({ agentId: 'a', estimatedUnits: 9, customerId: 'u' })
    assert.equal(check.approved, true)
    assert.equal(check.replayed, false) // our own first attempt, not someone else's
    assert.equal(proxy.dropping, 0) // a reply was lost: the approval above is the retry's
    const b = await direct.getBudget({ customerId: 'u' })
    assert.deepEqual([b.reserved, b.openReservations], [9, 1])
    const approvals = (await direct.events({ customerId: 'u' })).filter((e) => e.type === 'approved')
    assert.equal(approvals.length, 1)
    proxy.dropping = 1
    const settled = await check.record(9)
    assert.equal(settled.status, 'recorded')
    assert.equal(proxy.dropping, 0)
    const after = await direct.getBudget({ customerId: 'u' })
    assert.deepEqual([after.spent, after.reserved], [9, 0])
  } finally {
    await c.close()
    await direct.close()
    proxy.close()
  }
})

test('wrong credentials: AuthenticationError, never retried as an outage', async () => {
  const locked = await RedisServer.start(['--requirepass', 'admin-secret'])
  try {
    const c = new AgentBillClient({ redisUrl: `redis://:wrong@127.0.0.1:${locked.port}/0` })
    await assert.rejects(c.getBudget(), AuthenticationError)
    await c.close()
    const none = new AgentBillClient({ redisUrl: locked.url })
    await assert.rejects(none.getBudget(), AuthenticationError)
    await none.close()
  } finally {
    await locked.stop()
  }
})

test('Redis answering "not now" (BUSY, OOM) is retried, then StoreBusyError with its code; nothing is written', async () => {
  const busy = await RedisServer.start(['--busy-reply-threshold', '20'])
  const ns = namespace()
  const c = new AgentBillClient({ redisUrl: busy.url, namespace: ns })
  const looping = new Redis(busy.port, '127.0.0.1')
  const admin = new Redis(busy.port, '127.0.0.1')
  try {
    await c.setBudget({ customerId: 'u', limit: 100 })
    const check = await c.preflight({ agentId: 'a', estimatedUnits: 10, customerId: 'u' })
    // Another client's script that runs until it is killed: Redis answers BUSY meanwhile.
    const loop = looping.eval('while true do end', 0).catch(() => undefined)
    for (;;) {
      const reply = await admin.ping().catch((e: Error) => e.message)
      if (String(reply).startsWith('BUSY')) break
    }
    const exc = await check.record(10).then(() => undefined, (e: unknown) => e)
    assert.ok(exc instanceof StoreBusyError, String(exc))
    assert.ok(exc instanceof StoreUnavailableError)
    assert.equal(exc.code, 'BUSY')
    await admin.script('KILL')
    await loop
    const b = await c.getBudget({ customerId: 'u' })
    assert.deepEqual([b.spent, b.reserved], [0, 10]) // the record wrote nothing: made again, it lands once
    assert.equal((await check.record(10)).status, 'recorded')
    await admin.config('SET', 'maxmemory', '1')
    const oom = await c.preflight({ agentId: 'a', estimatedUnits: 1, customerId: 'u' }).then(() => undefined, (e: unknown) => e)
    await admin.config('SET', 'maxmemory', '0')
    assert.ok(oom instanceof StoreBusyError, String(oom))
    assert.equal(oom.code, 'OOM')
    const after = await c.getBudget({ customerId: 'u' })
    assert.deepEqual([after.spent, after.reserved, after.openReservations], [10, 0, 0])
  } finally {
    looping.disconnect()
    admin.disconnect()
    await c.close()
    await busy.stop()
  }
})

test('a redis client passed in that would wait forever (maxRetriesPerRequest: null) still fails closed within the bound', async () => {
  const port = await freePort()
  // What BullMQ asks its connections to be: ioredis then queues a command until Redis is back.
  const given = new Redis(port, '127.0.0.1', { maxRetriesPerRequest: null, lazyConnect: true })
  given.on('error', () => undefined)
  const c = new AgentBillClient({ redis: given })
  try {
    const [ms, exc] = await timed(c.preflight({ agentId: 'a', estimatedUnits: 1 }))
    assert.ok(exc instanceof StoreUnavailableError, String(exc))
    assert.ok(ms < FAIL_CLOSED_BOUND_MS, `${ms} ms`)
  } finally {
    await c.close()
    given.disconnect()
  }
})

test("a thousand concurrent calls on one client are its own load, not an outage; on a silent Redis they all fail closed", async () => {
  const c = new AgentBillClient({ redisUrl: server.url, namespace: namespace() })
  try {
    await c.setBudget({ customerId: 'u', limit: 37 })
    const outcomes = await Promise.all(
      Array.from({ length: 3000 }, () =>
        c.preflight({ agentId: 'a', estimatedUnits: 1, customerId: 'u' }).then(
          (check) => (check.approved ? 'approved' : check.reason),
          (e: unknown) => (e as Error).name,
        ),
      ),
    )
    const count = (what: string): number => outcomes.filter((o) => o === what).length
    assert.deepEqual([count('approved'), count('budget_exhausted')], [37, 3000 - 37])
  } finally {
    await c.close()
  }
  const silent = await RedisServer.start()
  const s = new AgentBillClient({ redisUrl: silent.url, namespace: namespace() })
  try {
    await s.getBudget({ customerId: 'u' })
    silent.pause()
    const started = performance.now()
    const ends = await Promise.all(
      Array.from({ length: 1000 }, () =>
        s.preflight({ agentId: 'a', estimatedUnits: 1, customerId: 'u' }).then(
          () => ['approved', performance.now() - started] as const,
          (e: unknown) => [(e as Error).name, performance.now() - started] as const,
        ),
      ),
    )
    assert.ok(ends.every(([name]) => name === 'StoreUnavailableError'), JSON.stringify(ends[0]))
    // The README's 2 s, with 1 s of slack for a loaded machine running a thousand callers.
    const slowest = Math.max(...ends.map(([, ms]) => ms))
    assert.ok(slowest < FAIL_CLOSED_BOUND_MS + 1000, `${slowest} ms`)
  } finally {
    silent.resume()
    await s.close()
    await silent.stop()
  }
})
