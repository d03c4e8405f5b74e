/** What the client owes after a call returned: calls under way when close() is called, and a
 * gated call's record or release, which no caller could make again (settled surely). */
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { after, before, test } from 'node:test'
import { Redis } from 'ioredis'
import { AgentBillClient, InvalidRequestError, StoreError, StoreUnavailableError } from '../src/index.js'
import { RedisServer, namespace } from './servers.js'
import { library } from '../src/contract.js'

let server: RedisServer
let admin: Redis

before(async () => {
  server = await RedisServer.start(['--busy-reply-threshold', '20'])
  admin = new Redis(server.port, '127.0.0.1')
})

after(async () => {
  admin.disconnect()
  await server.stop()
})

/** Another client's script that loops until SCRIPT KILL: Redis answers BUSY meanwhile. */
async function busy(): Promise<() => Promise<void>> {
  const looping = new Redis(server.port, '127.0.0.1')
  const loop = looping.eval('while true do end', 0).catch(() => undefined)
  for (;;) {
    const reply = await admin.ping().catch((e: Error) => e.message)
    if (String(reply).startsWith('BUSY')) break
  }
  return async () => {
    await admin.script('KILL')
    await loop
    looping.disconnect()
  }
}

async function until<T>(read: () => Promise<T>, done: (value: T) => boolean): Promise<T> {
  for (let i = 0; ; i++) {
    const value = await read()
    if (done(value) || i >= 200) return value
    await new Promise((r) => setTimeout(r, 50))
  }
}

test('close() lets the calls under way finish (none is lost or failed), then refuses new ones', async () => {
  const ns = namespace()
  const c = new AgentBillClient({ redisUrl: server.url, namespace: ns })
  await c.getBudget({ customerId: 'u' })
  let finish: (() => void) | undefined
  const gated = c.gate({ agentId: 'g', estimatedUnits: 5, customerId: 'u', units: 4 }, async () => {
    await new Promise<void>((done) => (finish = done))
    return 'done'
  })
  const gatedCall = gated()
  const calls = Array.from({ length: 30 }, () => c.preflight({ agentId: 'a', estimatedUnits: 1, customerId: 'u' }))
  const closing = c.close()
  await assert.rejects(c.preflight({ agentId: 'a', estimatedUnits: 1, customerId: 'u' }), StoreError)
  const checks = await Promise.all(calls)
  assert.ok(checks.every((check) => check.approved))
  while (finish === undefined) await new Promise((r) => setTimeout(r, 5))
  finish()
  assert.equal(await gatedCall, 'done')
  await closing
  const direct = new AgentBillClient({ redisUrl: server.url, namespace: ns })
  const b = await direct.getBudget({ customerId: 'u' })
  assert.deepEqual([b.spent, b.reserved, b.openReservations], [4, 30, 30])
  await direct.close()
})

test("a gated call's record or release that Redis cannot take now is queued and delivered once", async () => {
  const ns = namespace()
  const c = new AgentBillClient({ redisUrl: server.url, namespace: ns })
  const warnings: string[] = []
  const onWarning = (w: Error): void => void warnings.push(w.message)
  process.on('warning', onWarning)
  try {
    await c.setBudget({ customerId: 'u', limit: 100 })
    let stop: (() => Promise<void>) | undefined
    const gated = c.gate({ agentId: 'g', estimatedUnits: 10, customerId: 'u', units: 7 }, async () => {
      stop = await busy() // the work ends while Redis is busy: its record cannot land now
      return 'worked'
    })
    assert.equal(await gated(), 'worked') // the call returns: the record is owed, not lost
    await stop!()
    const b = await until(() => c.getBudget({ customerId: 'u' }), (x) => x.spent === 7)
    assert.deepEqual([b.spent, b.reserved, b.openReservations], [7, 0, 0])
    // A release after a failed body, the same way.
    const failing = c.gate({ agentId: 'g', estimatedUnits: 20, customerId: 'u' }, async () => {
      stop = await busy()
      throw new Error('boom')
    })
    await assert.rejects(failing(), /boom/)
    await stop!()
    const after = await until(() => c.getBudget({ customerId: 'u' }), (x) => x.reserved === 0)
    assert.deepEqual([after.spent, after.reserved, after.openReservations], [7, 0, 0])
    const ledger = await c.events({ customerId: 'u' })
    assert.deepEqual(ledger.filter((e) => e.type === 'recorded').map((e) => e.units), [7]) // once
    assert.deepEqual(ledger.filter((e) => e.type === 'released').map((e) => e.released), [20])
    assert.ok(warnings.filter((w) => /queued/.test(w)).length === 2, warnings.join('\n'))
  } finally {
    process.off('warning', onWarning)
    await c.close()
  }
})

test('a queued record waits while the library is missing and this user may not load it, then lands once', async () => {
  // A tenant key's client (FCALL only) with a gated record queued during a stall, delivered
  // after a FUNCTION FLUSH: LibraryNotLoadedError is "not until an operator loads it", nothing
  // ran, so the record stays queued (as in Python) instead of being dropped with its release.
  const ns = namespace()
  await admin.acl('SETUSER', 'caller', 'on', '>secret', '~*', '+@all', '-function')
  const c = new AgentBillClient({ redisUrl: `redis://caller:secret@127.0.0.1:${server.port}/0`, namespace: ns })
  const warnings: string[] = []
  const onWarning = (w: Error): void => void warnings.push(w.message)
  process.on('warning', onWarning)
  try {
    await c.setBudget({ customerId: 'u', limit: 100 })
    let stop: (() => Promise<void>) | undefined
    const gated = c.gate({ agentId: 'g', estimatedUnits: 10, customerId: 'u', units: 7 }, async () => {
      await admin.function('FLUSH')
      stop = await busy() // its record cannot land now: queued
      return 'worked'
    })
    assert.equal(await gated(), 'worked')
    await stop!() // delivered now: the library is missing, and this user may not load it
    await until(async () => warnings.filter((w) => /may not load it/.test(w)).length, (n) => n > 0)
    await admin.function('LOAD', 'REPLACE', library.text) // the operator: `agentbill keys load-library`
    const b = await until(() => c.getBudget({ customerId: 'u' }), (x) => x.spent === 7)
    assert.deepEqual([b.spent, b.reserved, b.openReservations], [7, 0, 0])
    assert.ok(!warnings.some((w) => /dropped/.test(w)), warnings.join('\n'))
  } finally {
    process.off('warning', onWarning)
    await c.close()
    await admin.acl('DELUSER', 'caller')
  }
})

test('a gated record that finds the library missing (and may not load it) is queued, not thrown after the body', async () => {
  const ns = namespace()
  await admin.acl('SETUSER', 'caller', 'on', '>secret', '~*', '+@all', '-function')
  const c = new AgentBillClient({ redisUrl: `redis://caller:secret@127.0.0.1:${server.port}/0`, namespace: ns })
  try {
    await c.setBudget({ customerId: 'u', limit: 100 })
    const gated = c.gate({ agentId: 'g', estimatedUnits: 10, customerId: 'u', units: 7 }, async () => {
      await admin.function('FLUSH')
      return 'worked'
    })
    assert.equal(await gated(), 'worked') // the record ran nothing: owed, not thrown and lost
    await admin.function('LOAD', 'REPLACE', library.text) // the operator: `agentbill keys load-library`
    const b = await until(() => c.getBudget({ customerId: 'u' }), (x) => x.spent === 7)
    assert.deepEqual([b.spent, b.reserved, b.openReservations], [7, 0, 0])
  } finally {
    await c.close()
    await admin.acl('DELUSER', 'caller')
  }
})

test('what is still queued when the process ends gets a last delivery', async () => {
  const ns = namespace()
  const script = `
    import { AgentBillClient } from ${JSON.stringify(new URL('../src/index.js', import.meta.url).href)}
    import { Redis } from 'ioredis'
    const c = new AgentBillClient({ redisUrl: ${JSON.stringify(server.url)}, namespace: ${JSON.stringify(ns)} })
    const admin = new Redis(${server.port}, '127.0.0.1')
    const looping = new Redis(${server.port}, '127.0.0.1')
    admin.on('error', () => {}); looping.on('error', () => {})
    const gated = c.gate({ agentId: 'g', estimatedUnits: 10, customerId: 'u', units: 6 }, async () => {
      looping.eval('while true do end', 0).catch(() => undefined)
      for (;;) {
        const reply = await admin.ping().catch((e) => e.message)
        if (String(reply).startsWith('BUSY')) break
      }
      return 1
    })
    await gated()
    admin.disconnect()
    looping.disconnect()
    process.stdout.write('queued\\n')
    // no close(): the script just ends
  `
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
    cwd: fileURLToPath(new URL('../..', import.meta.url)),
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let out = ''
  let err = ''
  child.stderr.on('data', (d: Buffer) => (err += d.toString()))
  const exited = new Promise((done) => child.on('exit', done))
  await new Promise<void>((done) => {
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString()
      if (out.includes('queued')) done()
    })
    void exited.then(() => done())
  })
  await admin.script('KILL').catch(() => undefined) // Redis can take it again
  const code = await exited
  assert.equal(code, 0, err)
  const c = new AgentBillClient({ redisUrl: server.url, namespace: ns })
  const b = await c.getBudget({ customerId: 'u' })
  assert.deepEqual([b.spent, b.reserved], [6, 0], err)
  await c.close()
})

test("preflightMany: a failed batch's rollback that Redis cannot take now is queued, never left held", async () => {
  const given = new Redis(server.port, '127.0.0.1')
  const ns = namespace()
  const c = new AgentBillClient({ redis: given, namespace: ns })
  await c.preflight({ agentId: 'a', estimatedUnits: 1, customerId: 'u', idempotencyKey: 'k' })
  const fcall = given.fcall.bind(given) as (...args: unknown[]) => Promise<unknown>
  let sent = 0
  let busyReplies = true
  // The batch's three items reach Redis; what follows (the rollback) is answered BUSY.
  ;(given as unknown as { fcall: unknown }).fcall = (...args: unknown[]) => {
    sent += 1
    if (sent > 3 && busyReplies) return Promise.reject(new Error('BUSY Redis is busy running a script.'))
    return fcall(...args)
  }
  const warnings: string[] = []
  const onWarning = (w: Error): void => void warnings.push(w.message)
  process.on('warning', onWarning)
  try {
    await assert.rejects(
      c.preflightMany([
        { agentId: 'a', estimatedUnits: 3, customerId: 'u' },
        { agentId: 'a', estimatedUnits: 4, customerId: 'u' },
        { agentId: 'a', estimatedUnits: 2, customerId: 'u', idempotencyKey: 'k' }, // other arguments
      ]),
      (e: unknown) => e instanceof InvalidRequestError && e.field === 'requests[2].idempotencyKey',
    )
    busyReplies = false
    const b = await until(() => c.getBudget({ customerId: 'u' }), (x) => x.reserved === 1)
    assert.deepEqual([b.reserved, b.openReservations], [1, 1]) // only the earlier preflight holds
    assert.ok(warnings.some((w) => /queued/.test(w)), warnings.join('\n'))
  } finally {
    process.off('warning', onWarning)
    await c.close()
    given.disconnect()
  }
})

test("a gated call whose preflight is in doubt (Redis silent) queues that reservation's release", async () => {
  const silent = await RedisServer.start()
  const ns = namespace()
  const c = new AgentBillClient({ redisUrl: silent.url, namespace: ns })
  const onWarning = (): void => undefined
  process.on('warning', onWarning)
  try {
    await c.setBudget({ customerId: 'u', limit: 100 })
    await (await c.preflight({ agentId: 'g', estimatedUnits: 1, customerId: 'u' })).release() // scripts loaded
    let ran = 0
    const gated = c.gate({ agentId: 'g', estimatedUnits: 10, customerId: 'u' }, () => {
      ran += 1
    })
    silent.pause() // the preflight reaches Redis, but no reply comes back in time
    await assert.rejects(gated(), StoreUnavailableError)
    silent.resume() // Redis runs the preflight now: it must not stay held
    assert.equal(ran, 0)
    const b = await until(() => c.getBudget({ customerId: 'u' }), (x) => x.reserved === 0)
    assert.deepEqual([b.spent, b.reserved, b.openReservations], [0, 0, 0])
  } finally {
    process.off('warning', onWarning)
    await c.close()
    await silent.stop()
  }
})
