/** The client's operations against a real redis-server the suite starts. */
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import { Redis } from 'ioredis'
import {
  AgentBillClient,
  BudgetExhaustedError,
  CeilingExceededError,
  ConcurrencyLimitedError,
  InvalidRequestError,
  RateLimitedError,
  RunBlockedError,
  TaskCeilingExceededError,
  type ThresholdCrossing,
} from '../src/index.js'
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

function client(options: Record<string, unknown> = {}): AgentBillClient {
  return new AgentBillClient({ redisUrl: server.url, namespace: namespace(), ...options })
}

async function keysOf(ns: string): Promise<string[]> {
  return (await raw.keys(`${ns}:*`)).sort()
}

test('the sheet flow: preflight, record without an id closes the reservation', async () => {
  const c = client({ apiKey: 'agb_your_key', ceiling: 50 })
  const check = await c.preflight({ agentId: 'my_agent', estimatedUnits: 10 })
  assert.equal(check.approved, true)
  assert.equal(check.reason, undefined)
  assert.match(check.reservationId!, /^rsv\.[0-9a-f]{24}\.[0-9a-f]{24}$/)
  assert.ok(check.expiresAt instanceof Date && check.expiresAt.getTime() > Date.now())
  const settled = await c.record({ agentId: 'my_agent', units: 10 })
  assert.equal(settled.status, 'recorded')
  assert.equal(settled.reservationId, check.reservationId)
  const budget = await c.getBudget()
  assert.equal(budget.customerId, 'default')
  assert.equal(budget.spent, 10)
  assert.equal(budget.reserved, 0)
  assert.equal(budget.openReservations, 0)
  await c.close()
})

test('getBudget reports limit, spent, reserved, remaining, open reservations and the period', async () => {
  const c = client()
  const set = await c.setBudget({ customerId: 'acme', limit: 1000, period: 'month', tz: 'Europe/Berlin', thresholds: [80, 100] })
  assert.equal(set.limit, 1000)
  const check = await c.preflight({ agentId: 'a', estimatedUnits: 30, customerId: 'acme' })
  const b = await c.getBudget({ customerId: 'acme' })
  assert.equal(b.customerId, 'acme')
  assert.equal(b.limit, 1000)
  assert.equal(b.spent, 0)
  assert.equal(b.reserved, 30)
  assert.equal(b.remaining, 970)
  assert.equal(b.openReservations, 1)
  assert.equal(b.period, 'month')
  assert.ok(b.periodStart! < new Date() && new Date() < b.periodEnd!)
  assert.ok(b.resetsIn! > 0)
  assert.deepEqual(b.thresholds, [80, 100])
  assert.equal(check.periodEnd?.getTime(), b.periodEnd?.getTime())
  await check.record(25)
  const after = await c.getBudget({ customerId: 'acme' })
  assert.deepEqual([after.spent, after.reserved, after.remaining], [25, 0, 975])
  await c.close()
})

test('each rule refuses with its reason, scope and numbers; raiseForRefusal throws the typed error', async () => {
  const c = client({ ceiling: 50 })
  const ceiling = await c.preflight({ agentId: 'a', estimatedUnits: 51, customerId: 'u' })
  assert.deepEqual([ceiling.approved, ceiling.reason, ceiling.scope, ceiling.limit], [false, 'ceiling_exceeded', 'request', 50])
  assert.throws(() => ceiling.raiseForRefusal(), CeilingExceededError)

  await c.setBudget({ customerId: 'u', limit: 20 })
  const budget = await c.preflight({ agentId: 'a', estimatedUnits: 21, customerId: 'u' })
  assert.deepEqual([budget.reason, budget.scope, budget.limit, budget.remaining], ['budget_exhausted', 'customer', 20, 20])
  assert.throws(() => budget.raiseForRefusal(), (exc: unknown) => {
    assert.ok(exc instanceof BudgetExhaustedError && exc instanceof RunBlockedError)
    assert.equal(exc.customerId, 'u')
    assert.equal(exc.limit, 20)
    assert.equal(exc.name, 'BudgetExhaustedError')
    return true
  })

  await c.setBudget({ customerId: 'u', limit: 10, agentId: 'small' })
  const agent = await c.preflight({ agentId: 'small', estimatedUnits: 11, customerId: 'u' })
  assert.deepEqual([agent.reason, agent.scope, agent.limit], ['budget_exhausted', 'agent', 10])

  const first = await c.preflight({ agentId: 'a', estimatedUnits: 6, customerId: 'u', taskRef: 'r-1', taskCeiling: 10 })
  assert.equal(first.taskRemaining, 4)
  const task = await c.preflight({ agentId: 'a', estimatedUnits: 6, customerId: 'u', taskRef: 'r-1', taskCeiling: 1000 })
  assert.equal(task.reason, 'task_ceiling_exceeded')
  assert.throws(() => task.raiseForRefusal(), (exc: unknown) => {
    assert.ok(exc instanceof TaskCeilingExceededError)
    assert.deepEqual([exc.taskRef, exc.ceiling, exc.remaining], ['r-1', 10, 4])
    return true
  })
  await first.release()

  await c.setConcurrencyLimit({ customerId: 'u', maxInFlight: 1 })
  const one = await c.preflight({ agentId: 'a', estimatedUnits: 1, customerId: 'u' })
  const two = await c.preflight({ agentId: 'a', estimatedUnits: 1, customerId: 'u' })
  assert.deepEqual([two.reason, two.scope, two.limit, two.used], ['concurrency_limited', 'customer', 1, 1])
  assert.throws(() => two.raiseForRefusal(), ConcurrencyLimitedError)
  await one.release()
  await c.setConcurrencyLimit({ customerId: 'u', maxInFlight: null })

  const rate = await c.setRateLimit({ customerId: 'u', units: 2, perSeconds: 3600 })
  assert.deepEqual(rate.rateLimit, { units: 2, perSeconds: 3600, burst: 2 })
  await (await c.preflight({ agentId: 'a', estimatedUnits: 2, customerId: 'u' })).release()
  const limited = await c.preflight({ agentId: 'a', estimatedUnits: 1, customerId: 'u' })
  assert.equal(limited.reason, 'rate_limited')
  assert.ok(limited.retryAfter! > 0)
  assert.throws(() => limited.raiseForRefusal(), (exc: unknown) => exc instanceof RateLimitedError && exc.retryAfter! > 0)
  await assert.rejects(limited.release(), InvalidRequestError) // a refusal holds nothing
  await c.close()
})

test('bad input throws InvalidRequestError naming the field, and nothing is written', async () => {
  const ns = namespace()
  const c = new AgentBillClient({ redisUrl: server.url, namespace: ns })
  const bad: [Record<string, unknown>, string][] = [
    [{ agentId: 'a', estimatedUnits: -1 }, 'estimatedUnits'],
    [{ agentId: 'a', estimatedUnits: 1.5 }, 'estimatedUnits'],
    [{ agentId: 'a', estimatedUnits: 2 ** 53 }, 'estimatedUnits'],
    [{ agentId: 'a', estimatedUnits: Number.NaN }, 'estimatedUnits'],
    [{ agentId: 'a', estimatedUnits: '10' }, 'estimatedUnits'],
    [{ agentId: 'a', estimatedUnits: true }, 'estimatedUnits'],
    [{ agentId: 'a', estimatedUnits: 10n }, 'estimatedUnits'],
    [{ agentId: '', estimatedUnits: 1 }, 'agentId'],
    [{ agentId: 'a\nb', estimatedUnits: 1 }, 'agentId'],
    [{ agentId: ' \u200b', estimatedUnits: 1 }, 'agentId'], // nothing visible
    [{ agentId: 'a\u2028b', estimatedUnits: 1 }, 'agentId'], // a line separator
    [{ agentId: 'a', estimatedUnits: 1, customerId: 'x'.repeat(257) }, 'customerId'],
    [{ agentId: 'a', estimatedUnits: 1, ttl: 0 }, 'ttl'],
    [{ agentId: 'a', estimatedUnits: 1, estimatedUnit: 1 }, 'estimatedUnit'],
  ]
  for (const [options, field] of bad) {
    await assert.rejects(c.preflight(options as never), (exc: unknown) => exc instanceof InvalidRequestError && exc.field === field)
  }
  await assert.rejects(c.record({ agentId: 'a', units: -3 }), (e: unknown) => e instanceof InvalidRequestError && e.field === 'units')
  await assert.rejects(c.record({ agentId: 'a', units: 1, reservationId: 'not-ours' }), (e: unknown) => e instanceof InvalidRequestError && e.field === 'reservationId')
  await assert.rejects(c.release({}), (e: unknown) => e instanceof InvalidRequestError && e.field === 'reservationId')
  await assert.rejects(c.setBudget({ customerId: 'u', limit: 1, tz: 'Mars/Olympus' } as never), (e: unknown) => e instanceof InvalidRequestError && e.field === 'tz')
  await assert.rejects(
    c.preflightMany([{ agentId: 'a', estimatedUnits: 1 }, { agentId: 'a', estimatedUnits: -1 }]),
    (e: unknown) => e instanceof InvalidRequestError && e.field === 'requests[1].estimatedUnits',
  )
  assert.throws(() => new AgentBillClient({ redisUrl: server.url, ceiling: -1 }), (e: unknown) => e instanceof InvalidRequestError && e.field === 'ceiling')
  assert.throws(() => new AgentBillClient({ redisUrl: server.url, namespace: '' }), (e: unknown) => e instanceof InvalidRequestError && e.field === 'namespace')
  const settings: [Record<string, unknown>, string][] = [
    [{ taskRetention: 0 }, 'taskRetention'],
    [{ idleRetention: 1.5 }, 'idleRetention'],
    [{ idleRetention: 3600 }, 'idleRetention'], // below the default outcomeRetention (a day)
    [{ taskRetention: 7200, idleRetention: 3600, outcomeRetention: 60, idempotencyTtl: 60 }, 'idleRetention'],
  ]
  for (const [options, field] of settings) {
    assert.throws(() => new AgentBillClient({ redisUrl: server.url, ...options }), (e: unknown) => e instanceof InvalidRequestError && e.field === field)
  }
  assert.deepEqual(await keysOf(ns), [])
  await c.close()
})

test('a record charges in full, a release gives back, a second close is a replay', async () => {
  const c = client()
  await c.setBudget({ customerId: 'u', limit: 100 })
  const check = await c.preflight({ agentId: 'a', estimatedUnits: 10, customerId: 'u' })
  const recorded = await check.record(15, { metadata: { run: 7 } })
  assert.deepEqual([recorded.status, recorded.charged, recorded.released, recorded.replayed], ['recorded', 15, 10, false])
  assert.deepEqual(recorded.metadata, { run: 7 })
  const again = await check.record(15)
  assert.deepEqual([again.status, again.charged, again.replayed], ['recorded', 15, true])
  const released = await (await c.preflight({ agentId: 'a', estimatedUnits: 5, customerId: 'u' })).release()
  assert.deepEqual([released.status, released.charged, released.released], ['released', 0, 5])
  const direct = await c.record({ agentId: 'b', units: 3, customerId: 'u' })
  assert.equal(direct.status, 'direct')
  const failed = await (await c.preflight({ agentId: 'a', estimatedUnits: 5, customerId: 'u' })).record(5, { success: false })
  assert.equal(failed.status, 'released')
  const b = await c.getBudget({ customerId: 'u' })
  assert.deepEqual([b.spent, b.reserved], [18, 0])
  await c.close()
})

test('check.extend reserves more under the rules, refuses changing nothing, settles with the rest', async () => {
  const c = client()
  await c.setBudget({ customerId: 'u', limit: 100 })
  const check = await c.preflight({ agentId: 'a', estimatedUnits: 40, customerId: 'u' })
  const more = await check.extend(30)
  assert.deepEqual([more.reservationId, more.estimatedUnits, more.remaining], [check.reservationId, 70, 30])
  await assert.rejects(check.extend(31), (exc: unknown) => {
    assert.ok(exc instanceof BudgetExhaustedError)
    assert.equal((exc as BudgetExhaustedError).scope, 'customer')
    return true
  })
  assert.equal((await c.getBudget({ customerId: 'u' })).reserved, 70)
  await assert.rejects(check.extend(0), InvalidRequestError)
  const recorded = await check.record(65)
  assert.deepEqual([recorded.charged, recorded.released], [65, 70])
  await assert.rejects(check.extend(1), (exc: unknown) => {
    assert.ok(exc instanceof InvalidRequestError)
    assert.equal((exc as InvalidRequestError).field, 'reservationId')
    return true
  })
  const b = await c.getBudget({ customerId: 'u' })
  assert.deepEqual([b.spent, b.reserved], [65, 0])
  await c.close()
})

test('idempotency keys: a repeated preflight replays, a release by key works, a key reused otherwise is refused', async () => {
  const c = client()
  const first = await c.preflight({ agentId: 'a', estimatedUnits: 4, customerId: 'u', idempotencyKey: 'job-1' })
  const again = await c.preflight({ agentId: 'a', estimatedUnits: 4, customerId: 'u', idempotencyKey: 'job-1' })
  assert.equal(again.replayed, true)
  assert.equal(again.reservationId, first.reservationId)
  await assert.rejects(
    c.preflight({ agentId: 'a', estimatedUnits: 5, customerId: 'u', idempotencyKey: 'job-1' }),
    (e: unknown) => e instanceof InvalidRequestError && e.field === 'idempotencyKey',
  )
  const released = await c.release({ idempotencyKey: 'job-1', customerId: 'u' })
  assert.deepEqual([released.status, released.reservationId, released.released], ['released', first.reservationId, 4])
  const none = await c.release({ idempotencyKey: 'never-used', customerId: 'u' })
  assert.equal(none.status, 'noop')
  assert.equal((await c.getBudget({ customerId: 'u' })).reserved, 0)
  await c.close()
})

test('preflightMany decides each item in order; usage, events and tasks read back', async () => {
  const crossings: ThresholdCrossing[] = []
  const c = client({ onThreshold: (x: ThresholdCrossing) => crossings.push(x) })
  await c.setBudget({ customerId: 'acme', limit: 10, thresholds: [50] })
  const checks = await c.preflightMany([
    { agentId: 'r', estimatedUnits: 6, customerId: 'acme' },
    { agentId: 'w', estimatedUnits: 6, customerId: 'acme' },
    { agentId: 'w', estimatedUnits: 4, customerId: 'acme' },
  ])
  assert.deepEqual(checks.map((k) => k.approved), [true, false, true])
  assert.deepEqual(crossings.map((x) => [x.customerId, x.agentId, x.percent]), [['acme', undefined, 50]])
  await checks[0]!.record(5)
  const usage = await c.getUsage({ customerId: 'acme' })
  assert.deepEqual(usage.agents.map((a) => [a.agentId, a.spent, a.reserved]), [['r', 5, 0], ['w', 0, 4]])
  assert.deepEqual([usage.customer.spent, usage.customer.reserved], [5, 4])
  const events = await c.events({ customerId: 'acme' })
  assert.deepEqual(events.map((e) => e.type), ['approved', 'threshold', 'refused', 'approved', 'recorded'])
  const later = await c.events({ customerId: 'acme', since: events[2]!.id, limit: 1 })
  assert.deepEqual(later.map((e) => e.id), [events[3]!.id])
  assert.deepEqual((await c.getUsage({ customerId: 'acme', limit: 1 })).agents.map((a) => a.agentId), ['w'])
  await assert.rejects(
    c.getUsage({ customerId: 'acme', limit: 0 }),
    (e: unknown) => e instanceof InvalidRequestError && e.field === 'limit',
  )
  const task = await c.openTask({ taskRef: 'report', ceiling: 10, customerId: 'acme' })
  assert.deepEqual([task.ceiling, task.used, task.exists], [10, 0, true])
  assert.equal((await c.getTask({ taskRef: 'never', customerId: 'acme' })).exists, false)
  await c.close()
})

test('events reads a long ledger in pages of EVENTS_PAGE, the same answer as one read', async () => {
  const c = client()
  for (let i = 0; i < 1100; i++) await c.record({ agentId: 'a', units: 1, customerId: 'pages' })
  const every = await c.events({ customerId: 'pages' })
  assert.equal(every.length, 1100)
  assert.equal(new Set(every.map((e) => e.id)).size, 1100)
  assert.deepEqual((await c.events({ customerId: 'pages', since: every[999]!.id, limit: 50 })).map((e) => e.id), every.slice(1000, 1050).map((e) => e.id))
  await c.close()
})

test('gate: preflight before, record after (estimate, number or function of the result)', async () => {
  const c = client()
  const gated = c.gate({ agentId: 'g', estimatedUnits: 10, customerId: 'u', units: (r: string) => r.length }, async (task: string) => `done ${task}`)
  assert.equal(await gated('x'), 'done x')
  const byDefault = c.gate({ agentId: 'g', estimatedUnits: 10, customerId: 'u' }, (n: number) => n * 2)
  assert.equal(await byDefault(21), 42)
  const b = await c.getBudget({ customerId: 'u' })
  assert.deepEqual([b.spent, b.reserved], [6 + 10, 0])
  await c.close()
})

test('gate: a refusal throws the typed error and fn does not run; a throw releases', async () => {
  const c = client({ ceiling: 5 })
  let ran = 0
  const tooBig = c.gate({ agentId: 'g', estimatedUnits: 6, customerId: 'u' }, () => {
    ran += 1
  })
  await assert.rejects(tooBig(), CeilingExceededError)
  assert.equal(ran, 0)
  const failing = c.gate({ agentId: 'g', estimatedUnits: 5, customerId: 'u' }, async () => {
    throw new Error('boom')
  })
  await assert.rejects(failing(), /boom/)
  const b = await c.getBudget({ customerId: 'u' })
  assert.deepEqual([b.spent, b.reserved, b.openReservations], [0, 0, 0])
  assert.throws(() => c.gate({ agentId: 'g', estimatedUnits: -1 }, () => 1), InvalidRequestError)
  assert.throws(() => c.gate({ agentId: 'g', estimatedUnits: 1, units: 'all' as never }, () => 1), InvalidRequestError)
  await c.close()
})

test('gate: an AbortSignal firing releases at once and rejects with its reason', async () => {
  const c = client()
  const controller = new AbortController()
  let seen: Promise<void> | undefined
  const slow = c.gate({ agentId: 'g', estimatedUnits: 7, customerId: 'u', signal: controller.signal }, () => {
    seen = (async () => {
      const b = await c.getBudget({ customerId: 'u' })
      assert.equal(b.reserved, 7) // the body runs under the reservation
      controller.abort(new Error('cancelled by the caller'))
    })()
    return new Promise<never>(() => undefined) // never settles by itself
  })
  await assert.rejects(slow(), /cancelled by the caller/)
  await seen
  const b = await c.getBudget({ customerId: 'u' })
  assert.deepEqual([b.spent, b.reserved, b.openReservations], [0, 0, 0])
  await assert.rejects(slow(), /cancelled by the caller/) // already aborted: no preflight at all
  assert.equal((await c.events({ customerId: 'u' })).filter((e) => e.type === 'approved').length, 1)
  await c.close()
})

test('preflightMany: an item Redis refuses releases what the batch approved, and names the item', async () => {
  const c = client()
  await c.preflight({ agentId: 'a', estimatedUnits: 1, customerId: 'u', idempotencyKey: 'k' })
  await assert.rejects(
    c.preflightMany([
      { agentId: 'a', estimatedUnits: 3, customerId: 'u' },
      { agentId: 'a', estimatedUnits: 2, customerId: 'u', idempotencyKey: 'k' }, // other arguments
    ]),
    (e: unknown) => e instanceof InvalidRequestError && e.field === 'requests[1].idempotencyKey',
  )
  const b = await c.getBudget({ customerId: 'u' })
  assert.deepEqual([b.reserved, b.openReservations], [1, 1]) // only the earlier preflight holds
  await c.close()
})

test('taskRetention and idleRetention reach the scripts: an idle customer\'s keys expire after idleRetention', async () => {
  const ns = namespace()
  const c = new AgentBillClient({ redisUrl: server.url, namespace: ns, idempotencyTtl: 60, outcomeRetention: 60, taskRetention: 120, idleRetention: 300 })
  await (await c.preflight({ agentId: 'a', estimatedUnits: 1, customerId: 'u', taskRef: 't' })).record(1)
  const keys = await keysOf(ns)
  const ttl = async (suffix: string): Promise<number> => raw.pttl(keys.find((k) => k.endsWith(suffix))!)
  for (const suffix of [':budget', ':ledger', ':tasks', ':tasksx']) {
    const ms = await ttl(suffix)
    assert.ok(ms > 290_000 && ms <= 300_000, `${suffix}: ${ms}`) // no budget was set: it expires
  }
  const closed = await ttl(':closed')
  assert.ok(closed > 50_000 && closed <= 60_000, `closed: ${closed}`)
  const when = Number(await raw.zscore(keys.find((k) => k.endsWith(':tasksx'))!, (await raw.hkeys(keys.find((k) => k.endsWith(':tasks'))!))[0]!.split(':')[0]!))
  const [seconds, micros] = await raw.time()
  const redisNow = Number(seconds) * 1000 + Math.floor(Number(micros) / 1000)
  assert.ok(when - redisNow > 110_000 && when - redisNow <= 120_000, `task forgotten in ${when - redisNow} ms`)
  await c.close()
})

test('a counter past 2**53 - 1 is an InvalidRequestError naming the field, and nothing is written', async () => {
  const ns = namespace()
  const c = new AgentBillClient({ redisUrl: server.url, namespace: ns })
  const max = Number.MAX_SAFE_INTEGER
  await c.preflight({ agentId: 'a', estimatedUnits: max - 1, customerId: 'u' }) // no limit: it fits
  const snapshot = async (): Promise<string> => {
    const out: Record<string, unknown> = {}
    for (const key of await keysOf(ns)) out[key] = [await raw.type(key), await raw.dump(key)]
    return JSON.stringify(out)
  }
  const before = await snapshot()
  await assert.rejects(
    c.preflight({ agentId: 'a', estimatedUnits: 5, customerId: 'u' }),
    (e: unknown) => e instanceof InvalidRequestError && e.field === 'estimatedUnits' && /2\*\*53/.test(e.message),
  )
  assert.equal(await snapshot(), before)
  const other = new AgentBillClient({ redisUrl: server.url, namespace: namespace() })
  await other.record({ agentId: 'a', units: max, customerId: 'v' }) // spent at the top
  const check = await other.preflight({ agentId: 'a', estimatedUnits: 1, customerId: 'v' })
  await assert.rejects(check.record(1), (e: unknown) => e instanceof InvalidRequestError && e.field === 'units')
  assert.equal((await check.release()).status, 'released') // the failed record changed nothing
  const b = await other.getBudget({ customerId: 'v' })
  assert.deepEqual([b.spent, b.reserved], [max, 0])
  await c.close()
  await other.close()
})

test("a record without an id closes this client's own reservation first, not another's older one", async () => {
  const ns = namespace()
  const mine = new AgentBillClient({ redisUrl: server.url, namespace: ns })
  const other = new AgentBillClient({ redisUrl: server.url, namespace: ns })
  const theirs = await other.preflight({ agentId: 'agent', estimatedUnits: 7, customerId: 'u' })
  const first = await mine.preflight({ agentId: 'agent', estimatedUnits: 5, customerId: 'u' })
  const second = await mine.preflight({ agentId: 'agent', estimatedUnits: 3, customerId: 'u' })
  const closed = await mine.record({ agentId: 'agent', units: 4, customerId: 'u' })
  assert.deepEqual([closed.status, closed.reservationId, closed.charged], ['recorded', first.reservationId, 4])
  await second.release() // settled by id: forgotten by the book
  // None of its own left open: the group's oldest (the other client's), as the script decides.
  const next = await mine.record({ agentId: 'agent', units: 6, customerId: 'u' })
  assert.deepEqual([next.status, next.reservationId], ['recorded', theirs.reservationId])
  // Its owner's own record is still charged, late: every reported unit counts once.
  const late = await theirs.record(7)
  assert.deepEqual([late.status, late.charged, late.late], ['late', 7, true])
  const b = await mine.getBudget({ customerId: 'u' })
  assert.deepEqual([b.spent, b.reserved, b.openReservations], [4 + 6 + 7, 0, 0])
  await mine.close()
  await other.close()
})

test('a record after a release is charged, late; a release never erases a record', async () => {
  const c = client()
  const check = await c.preflight({ agentId: 'a', estimatedUnits: 10, customerId: 'u' })
  assert.equal((await check.release()).status, 'released')
  const late = await check.record(8)
  assert.deepEqual([late.status, late.charged, late.late, late.replayed], ['late', 8, true, false])
  const again = await check.release()
  assert.deepEqual([again.status, again.replayed], ['late', true])
  assert.equal((await c.getBudget({ customerId: 'u' })).spent, 8)
  await c.close()
})

test("a settle's crossed agent threshold names the agent whose budget it is", async () => {
  const crossings: ThresholdCrossing[] = []
  const c = client({ onThreshold: (x: ThresholdCrossing) => crossings.push(x) })
  await c.setBudget({ customerId: 'acme', agentId: 'writer', limit: 10, thresholds: [50] })
  await c.record({ agentId: 'writer', units: 6, customerId: 'acme' }) // direct: a charge crosses 50%
  assert.deepEqual(crossings.map((x) => [x.customerId, x.agentId, x.percent, x.committed]), [['acme', 'writer', 50, 6]])
  await c.close()
})

test('a record without an id that Redis refused forgets nothing: the next one closes the oldest', async () => {
  const c = client()
  await c.record({ agentId: 'someone-else', units: 0, customerId: 'u', idempotencyKey: 'k' })
  const oldest = await c.preflight({ agentId: 'agent', estimatedUnits: 5, customerId: 'u' })
  await c.preflight({ agentId: 'agent', estimatedUnits: 5, customerId: 'u' })
  await assert.rejects(
    c.record({ agentId: 'agent', units: 1, customerId: 'u', idempotencyKey: 'k' }), // other arguments
    (e: unknown) => e instanceof InvalidRequestError && e.field === 'idempotencyKey',
  )
  assert.equal((await c.record({ agentId: 'agent', units: 1, customerId: 'u' })).reservationId, oldest.reservationId)
  await c.close()
})

test('gate: an abort that fires while the preflight is under way never starts the body', async () => {
  const given = new Redis(server.port, '127.0.0.1')
  const c = new AgentBillClient({ redis: given, namespace: namespace() })
  const controller = new AbortController()
  const fcall = given.fcall.bind(given) as (...args: unknown[]) => Promise<unknown>
  // The abort fires as the preflight is sent: its reply arrives after it.
  ;(given as unknown as { fcall: unknown }).fcall = (...args: unknown[]) => {
    controller.abort(new Error('cancelled during the preflight'))
    return fcall(...args)
  }
  let ran = 0
  const gated = c.gate({ agentId: 'g', estimatedUnits: 9, customerId: 'u', signal: controller.signal }, () => {
    ran += 1
  })
  await assert.rejects(gated(), /cancelled during the preflight/)
  await new Promise((done) => setTimeout(done, 20)) // a body scheduled anyway would have run
  assert.equal(ran, 0)
  ;(given as unknown as { fcall: unknown }).fcall = fcall
  const b = await c.getBudget({ customerId: 'u' })
  assert.deepEqual([b.spent, b.reserved, b.openReservations], [0, 0, 0])
  await c.close()
  given.disconnect()
})

test("gate: a record without an id never closes a gated call's reservation, from any client", async () => {
  const ns = namespace()
  const c = client({ namespace: ns })
  const other = client({ namespace: ns })
  let finish: (() => void) | undefined
  let started: (() => void) | undefined
  const running = new Promise<void>((done) => (started = done))
  const gated = c.gate({ agentId: 'g', estimatedUnits: 50, customerId: 'u' }, async () => {
    started!()
    await new Promise<void>((done) => (finish = done))
  })
  const call = gated()
  await running
  for (const who of [other, c]) {
    const direct = await who.record({ agentId: 'g', units: 3, customerId: 'u' })
    assert.equal(direct.status, 'direct') // not the gate's reservation
  }
  finish!()
  await call
  const ledger = await c.events({ customerId: 'u' })
  assert.deepEqual(
    ledger.filter((e) => e.type === 'recorded').map((e) => [e.units, e.released]),
    [[3, 0], [3, 0], [50, 50]],
  )
  const b = await c.getBudget({ customerId: 'u' })
  assert.deepEqual([b.spent, b.reserved], [56, 0])
  await c.close()
  await other.close()
})

test('gate takes no idempotencyKey: every call of a gated function would share it, and all but the first run uncharged', () => {
  const c = client()
  assert.throws(
    () => c.gate({ agentId: 'g', estimatedUnits: 10, customerId: 'u', idempotencyKey: 'job-1' } as never, () => 1),
    (e: unknown) => e instanceof InvalidRequestError && e.field === 'idempotencyKey',
  )
  void c.close()
})

test("getUsage lists agents in Python's order (by code point, not by UTF-16 unit)", async () => {
  const c = client()
  for (const agentId of ['😀', 'ｚ', 'a']) await c.record({ agentId, units: 1, customerId: 'u' })
  // Python: sorted(["😀", "ｚ", "a"]) == ["a", "ｚ", "😀"] (U+FF5A < U+1F600)
  assert.deepEqual((await c.getUsage({ customerId: 'u' })).agents.map((a) => a.agentId), ['a', 'ｚ', '😀'])
  await c.close()
})
