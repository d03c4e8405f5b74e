/** The shared vectors (tests/vectors/*.json, made from the Python client and checked by its
 * suite too): the TypeScript client gives the same keys, digests, calls and validation. */
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { test } from 'node:test'
import { settingsFrom } from '../src/client.js'
import * as core from '../src/core.js'
import { InvalidRequestError } from '../src/errors.js'
import { KeySpace, customerTag, digest, namespacePrefix, reservationId, tagOfReservation } from '../src/keys.js'
import { contract } from '../src/contract.js'
import { CLUSTER_HINT, parseRedisUrl } from '../src/topology.js'
import * as v from '../src/validate.js'
import { zoneTable } from '../src/zones.js'

const VECTORS = new URL('../../../../tests/vectors/', import.meta.url)
// The vector files' shapes are checked by the Python suite; here they are read as they come.
type Json = any
function load(name: string): Json {
  return JSON.parse(readFileSync(new URL(name, VECTORS), 'utf8'))
}

function camel(values: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(
    Object.entries(values).map(([k, val]) => [k.replace(/_([a-z])/g, (_m, c: string) => c.toUpperCase()), val]),
  )
}

test('customer tags, digests, namespace prefixes and reservation ids', () => {
  const keys = load('keys.json')
  for (const t of keys.tags) assert.equal(customerTag(t.customer_id), t.tag, t.customer_id)
  for (const d of keys.digests) assert.equal(digest(...d.parts), d.digest)
  for (const n of keys.namespace_prefixes) assert.equal(namespacePrefix(n.namespace), n.prefix)
  for (const r of keys.reservation_ids) assert.equal(reservationId(r.tag, r.token), r.id)
  for (const r of keys.tag_of_reservation) assert.equal(tagOfReservation(r.id), r.tag ?? undefined, r.id)
  for (const f of keys.fingerprints) assert.equal(core.fingerprint(...f.parts), f.fingerprint)
})

test('every key of every (namespace, customer) pair', () => {
  const spaces = load('keys.json').spaces
  assert.ok(spaces.length > 50)
  for (const s of spaces) {
    const ck = new KeySpace(s.namespace).customer(s.customer_id)
    assert.equal(ck.prefix, s.prefix)
    assert.deepEqual(ck.fixed, s.fixed)
    assert.deepEqual(Object.keys(ck.fixed), contract.customer_keys.map((k) => k.name))
    for (const i of s.idempotency) assert.equal(ck.idempotency(i.operation, i.key), i.name)
    for (const r of s.request) assert.equal(ck.request(r.token), r.name)
  }
})

/** The plan the client makes for a vector case; `extra` is what the client adds on its own (a
 * preflight not adoptable, its own reservation to close first, a batch's rollback). */
function planOf(c: Json): core.Plan<unknown> {
  const scriptSettings = settingsFrom(camel(c.client)).scriptSettings
  const request = camel(c.request)
  const extra = c.extra ?? {}
  switch (c.op) {
    case 'preflight':
      return core.preflightCall(scriptSettings, core.validatePreflight(request), c.token, extra.adoptable ?? true) as unknown as core.Plan<unknown>
    case 'record':
      return core.planRecord(scriptSettings, request, c.token, extra.prefer)
    case 'release':
      return core.planRelease(scriptSettings, request, c.token, extra.rollback ?? false)
    case 'set_budget':
      return core.planSetBudget(scriptSettings, request)
    case 'set_rate_limit':
      return core.planSetRateLimit(scriptSettings, request)
    case 'set_concurrency_limit':
      return core.planSetConcurrencyLimit(scriptSettings, request)
    case 'get_budget':
      return core.planGetBudget(scriptSettings, request)
    case 'get_usage':
      return core.planGetUsage(scriptSettings, request)
    case 'events': {
      const e = core.validateEvents(request)
      return core.planEventsPage(scriptSettings, e.customerId, e.since, Math.min(core.EVENTS_PAGE, e.limit ?? core.EVENTS_PAGE))
    }
    case 'open_task':
      return core.planOpenTask(scriptSettings, request)
    case 'get_task':
      return core.planGetTask(scriptSettings, request)
    default:
      throw new Error(`no op ${c.op}`)
  }
}

test('every call vector: the same script, KEYS and ARGV as Python, byte for byte', () => {
  const cases = load('calls.json')
  assert.ok(cases.length >= 15)
  assert.ok(cases.some((c: Json) => c.extra?.prefer) && cases.some((c: Json) => c.extra?.rollback))
  for (const c of cases) {
    const { call } = planOf(c)
    assert.equal(call.script, c.script, c.name)
    assert.deepEqual(call.keys, c.keys, c.name)
    assert.deepEqual(call.args, c.args, c.name)
  }
})

test('validation: the same ids and units are refused, naming the field', () => {
  const cases = load('validation.json')
  for (const c of cases.ids) {
    let valid = true
    try {
      v.id('agentId', c.value)
    } catch (exc) {
      assert.ok(exc instanceof InvalidRequestError)
      assert.equal(exc.field, 'agentId')
      valid = false
    }
    assert.equal(valid, c.valid, JSON.stringify(c.value)?.slice(0, 40))
  }
  for (const c of cases.units) {
    let valid = true
    try {
      v.units('units', c.value)
    } catch (exc) {
      assert.ok(exc instanceof InvalidRequestError)
      valid = false
    }
    assert.equal(valid, c.valid, JSON.stringify(c.value))
  }
})

test('validation: the same event ids are refused as since, naming the field', () => {
  const cases = load('validation.json')
  for (const c of cases.since) {
    let valid = true
    try {
      core.validateEvents({ customerId: 'c', since: c.value })
    } catch (exc) {
      assert.ok(exc instanceof InvalidRequestError)
      assert.equal(exc.field, 'since')
      valid = false
    }
    assert.equal(valid, c.valid, JSON.stringify(c.value))
  }
})

test('an unpaired surrogate is refused (it has no UTF-8 form to hash)', () => {
  assert.throws(() => v.id('customerId', 'a\ud800b'), InvalidRequestError)
})

test('zone tables: the same UTC offsets as Python', () => {
  const zones = load('zones.json')
  const today = new Date(`${zones.today}T12:00:00Z`)
  for (const z of zones.tables) assert.equal(zoneTable(z.tz, today), z.table, z.tz)
})

test('-0 is the integer 0 (JavaScript has it; Python has no such int): it comes back as 0', () => {
  assert.ok(Object.is(v.units('units', -0), 0))
  const plan = core.planPreflight(settingsFrom({}).scriptSettings, { agentId: 'a', estimatedUnits: -0 })
  assert.ok(Object.is(plan.request.estimatedUnits, 0))
})

test('Redis URLs of every topology read as the Python client reads them', () => {
  const urls = load('urls.json')
  assert.equal(CLUSTER_HINT, urls.cluster_hint.replace('redis=RedisCluster(...)', 'redis: new Cluster(...)'))
  assert.ok(urls.cases.some((c: Json) => c.error) && urls.cases.some((c: Json) => c.kind === 'sentinel'))
  for (const c of urls.cases) {
    if (c.error) {
      assert.throws(() => parseRedisUrl(c.url), (exc: unknown) => {
        assert.ok(exc instanceof InvalidRequestError, c.url)
        assert.equal(exc.field, 'redisUrl')
        assert.ok(!exc.message.includes('hunter2'), exc.message)
        return true
      })
      continue
    }
    const target = parseRedisUrl(c.url)
    const o = target.options
    const nodes = target.kind === 'single' ? [[o.host, o.port]] : target.nodes.map((n) => [n.host, n.port])
    const got = {
      url: c.url,
      kind: target.kind,
      nodes,
      service: target.kind === 'sentinel' ? target.service : null,
      db: o.db ?? 0,
      username: o.username ?? null,
      password: o.password ?? null,
      tls: o.tls !== undefined,
      sentinel_username: (target.kind === 'sentinel' && target.sentinelUsername) || null,
      sentinel_password: (target.kind === 'sentinel' && target.sentinelPassword) || null,
    }
    assert.deepEqual(got, c)
  }
})
