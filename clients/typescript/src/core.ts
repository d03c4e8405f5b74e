/**
 * The logic of every operation, without I/O: validate the options, build the script call from
 * the wire contract (by field name), and decode the reply (by field name). The client adds only
 * the round trip. The same rules as agentbill/_core.py, pinned by tests/vectors/calls.json.
 */
import { randomBytes } from 'node:crypto'
import { blake2b } from '@noble/hashes/blake2'
import type { CheckFields, Reason, Scope, ThresholdCrossing } from './check.js'
import { type Call, type Fields, type Named, buildCall, contract, decodeLedgerEntry, decodeReply } from './contract.js'
import { InvalidRequestError } from './errors.js'
import { type CustomerKeys, KeySpace, digest, digestOf, reservationId, tagOfReservation } from './keys.js'
import type {
  BudgetStatus,
  Event,
  EventType,
  Period,
  Settlement,
  SettleStatus,
  TaskStatus,
  Usage,
} from './results.js'
import * as v from './validate.js'
import { timeZone, zoneTable } from './zones.js'

export const DEFAULT_CUSTOMER = 'default'
/** A retry of a record() without a reservation id is recognised by an internal request id. */
export const REQUEST_ID_TTL_MS = 10 * 60 * 1000
const PERIODS: readonly Period[] = contract.enums['period'] as readonly Period[]

/** The client's settings in the units the scripts take (ms, plain integers). */
export interface ScriptSettings {
  readonly keys: KeySpace
  readonly ceiling: number | undefined
  readonly reservationTtlMs: number
  readonly idempotencyTtlMs: number
  readonly retentionMs: number
  readonly taskRetentionMs: number
  readonly idleRetentionMs: number
  readonly reapLimit: number
  readonly ledgerLen: number
}

function common(p: ScriptSettings): Named {
  return {
    reap_limit: p.reapLimit,
    retention_ms: p.retentionMs,
    ledger_len: p.ledgerLen,
    task_retention_ms: p.taskRetentionMs,
    idle_retention_ms: p.idleRetentionMs,
  }
}

/** One operation ready to run: the script call, how to read its reply, and for a preflight
 * (or a settle naming one) the reservation id, made by the client. */
export interface Plan<T> {
  readonly call: Call
  readonly decode: (reply: unknown) => T
  readonly reservationId?: string | undefined
}

// Random bytes are drawn 256 tokens at a time: one call to the system's generator costs more
// than the rest of a plan.
const TOKEN_BYTES = 12
let pool = Buffer.alloc(0)
let used = 0

/** A random token for reservation and request ids (96 bits). */
export function newToken(): string {
  if (used + TOKEN_BYTES > pool.length) {
    pool = randomBytes(TOKEN_BYTES * 256)
    used = 0
  }
  used += TOKEN_BYTES
  return pool.toString('hex', used - TOKEN_BYTES, used)
}

/** What Python's str() gives for a fingerprint part: None '', True 'True', 12 '12'. */
function pyStr(part: string | number | boolean | undefined | null): string {
  if (part === undefined || part === null) return ''
  if (typeof part === 'boolean') return part ? 'True' : 'False'
  return String(part)
}

/** What makes two requests under one idempotency key "the same request" (as in Python). */
export function fingerprint(...parts: (string | number | boolean | undefined | null)[]): string {
  const text = parts.map(pyStr).join('\x1f')
  return Buffer.from(blake2b(new TextEncoder().encode(text), { dkLen: 16 })).toString('hex')
}

function remainingOf(limit: number | null, used: number): number | undefined {
  return limit === null ? undefined : Math.max(0, limit - used)
}

function u<T>(value: T | null): T | undefined {
  return value === null ? undefined : value
}

function date(ms: number | null): Date | undefined {
  return ms === null ? undefined : new Date(ms)
}

/** A reply's crossed thresholds (`threshold_crossing` items); `agentId` is the agent whose
 * budget an agent's crossing is. */
export function decodeCrossed(
  items: readonly Fields[],
  customerId: string,
  agentId: string | undefined,
): ThresholdCrossing[] {
  return items.map((item) => ({
    customerId,
    agentId: item.str('scope') === 'agent' ? agentId : undefined,
    percent: item.int('percent'),
    committed: item.int('committed'),
  }))
}

// -- preflight -----------------------------------------------------------------------------------

export interface PreflightOptions {
  readonly agentId: string
  readonly estimatedUnits: number
  readonly customerId?: string | undefined
  readonly taskRef?: string | undefined
  readonly taskCeiling?: number | undefined
  readonly idempotencyKey?: string | undefined
  /** Seconds an unsettled reservation holds its units (default: the client's reservationTtl). */
  readonly ttl?: number | undefined
}

export interface PreflightRequest {
  readonly agentId: string
  readonly estimatedUnits: number
  readonly customerId: string
  readonly taskRef: string | undefined
  readonly taskCeiling: number | undefined
  readonly idempotencyKey: string | undefined
  readonly ttl: number | undefined
}

const PREFLIGHT_OPTIONS = ['agentId', 'estimatedUnits', 'customerId', 'taskRef', 'taskCeiling', 'idempotencyKey', 'ttl']

export function validatePreflight(input: unknown, field = ''): PreflightRequest {
  const o = v.options(field || 'options', input)
  v.known(field, o, PREFLIGHT_OPTIONS)
  const at = (name: string): string => (field ? `${field}.${name}` : name)
  return {
    agentId: v.id(at('agentId'), o['agentId']),
    estimatedUnits: v.units(at('estimatedUnits'), o['estimatedUnits']),
    customerId: v.optionalId(at('customerId'), o['customerId']) ?? DEFAULT_CUSTOMER,
    taskRef: v.optionalId(at('taskRef'), o['taskRef']),
    taskCeiling: v.optionalUnits(at('taskCeiling'), o['taskCeiling']),
    idempotencyKey: v.optionalId(at('idempotencyKey'), o['idempotencyKey']),
    ttl: v.optionalSeconds(at('ttl'), o['ttl']),
  }
}

/** KEYS/ARGV for preflight.lua, and the id of the reservation it would create. `adoptable`
 * false: only a request naming the reservation may close it, never a record without an id. */
export function preflightCall(
  p: ScriptSettings,
  req: PreflightRequest,
  token: string,
  adoptable = true,
): { call: Call; reservationId: string } {
  const ck = p.keys.customer(req.customerId)
  const rid = reservationId(ck.tag, token)
  let idem: string
  let fp: string | null
  if (req.idempotencyKey !== undefined) {
    idem = ck.idempotency('preflight', req.idempotencyKey)
    fp = fingerprint('preflight', req.agentId, req.estimatedUnits, req.taskRef, req.taskCeiling, req.ttl)
  } else {
    // Unused by the script, but every key a script may touch is declared (Redis Cluster).
    idem = ck.idempotency('preflight', rid)
    fp = null
  }
  const call = buildCall('preflight', { ...ck.fixed, idem }, common(p), {}, {
    reservation_id: rid,
    estimated_units: req.estimatedUnits,
    ceiling: p.ceiling ?? null,
    ttl_ms: req.ttl !== undefined ? req.ttl * 1000 : p.reservationTtlMs,
    agent_id: req.agentId,
    task_ref: req.taskRef ?? null,
    task_digest: req.taskRef !== undefined ? digestOf(req.taskRef) : null,
    task_ceiling: req.taskCeiling ?? null,
    group_digest: digest(req.agentId, req.taskRef ?? ''),
    fingerprint: fp,
    idempotency_ttl_ms: p.idempotencyTtlMs,
    customer_id: req.customerId,
    agent_digest: digestOf(req.agentId),
    adoptable,
  })
  return { call, reservationId: rid }
}

export function decodePreflight(raw: unknown, req: PreflightRequest): CheckFields {
  const f = decodeReply('preflight', raw)
  const approved = f.bool('approved')
  const limit = f.intOrNull('limit')
  const taskCeiling = f.intOrNull('task_ceiling')
  const taskUsed = f.int('task_used')
  const hasTask = req.taskRef !== undefined
  const retry = f.intOrNull('retry_after_ms')
  return {
    approved,
    reason: u(f.strOrNull('reason')) as Reason | undefined,
    reservationId: u(f.strOrNull('reservation_id')),
    expiresAt: date(f.intOrNull('expires_ms')),
    remaining: remainingOf(limit, f.int('spent') + f.int('reserved')),
    limit: u(approved ? limit : f.intOrNull('rule_limit')),
    agentId: req.agentId,
    customerId: req.customerId,
    estimatedUnits: req.estimatedUnits,
    taskRef: req.taskRef,
    taskCeiling: u(taskCeiling),
    taskUsed: hasTask ? taskUsed : undefined,
    taskRemaining: hasTask ? remainingOf(taskCeiling, taskUsed + f.int('task_reserved')) : undefined,
    replayed: f.bool('replayed'),
    scope: u(f.strOrNull('scope')) as Scope | undefined,
    used: u(f.intOrNull('rule_used')),
    reserved: u(f.intOrNull('rule_reserved')),
    retryAfter: retry === null ? undefined : retry / 1000,
    periodEnd: date(f.intOrNull('period_end_ms')),
    crossed: decodeCrossed(f.structs('crossed'), req.customerId, req.agentId),
  }
}

export function planPreflight(
  p: ScriptSettings,
  input: unknown,
  field = '',
  adoptable = true,
): Plan<CheckFields> & { request: PreflightRequest } {
  const request = validatePreflight(input, field)
  const { call, reservationId: rid } = preflightCall(p, request, newToken(), adoptable)
  return { call, decode: (raw) => decodePreflight(raw, request), reservationId: rid, request }
}

/**
 * KEYS/ARGV for extend.lua: `units` more on `check`'s reservation, under every rule a preflight
 * checks (concurrency aside). The decision is the reservation's check, `estimatedUnits` its new
 * total.
 */
export function planExtend(p: ScriptSettings, check: CheckFields, units: unknown, token = newToken()): Plan<CheckFields> {
  const extra = v.units('units', units)
  if (extra < 1) throw new InvalidRequestError('units', 'must be at least 1')
  const rid = check.reservationId
  if (rid === undefined) {
    throw new InvalidRequestError('reservationId', `this check was refused (${check.reason}); it holds nothing`)
  }
  const ck = reservationKeys(p, rid, 'reservationId')
  const call = buildCall('extend', { ...ck.fixed, request: ck.request(token) }, common(p), {}, {
    reservation_id: rid,
    units: extra,
    ceiling: p.ceiling ?? null,
    agent_id: check.agentId,
    request_ttl_ms: REQUEST_ID_TTL_MS,
  })
  const request: PreflightRequest = {
    agentId: check.agentId,
    estimatedUnits: Math.min(check.estimatedUnits + extra, Number.MAX_SAFE_INTEGER),
    customerId: check.customerId,
    taskRef: check.taskRef,
    taskCeiling: undefined,
    idempotencyKey: undefined,
    ttl: undefined,
  }
  return { call, decode: (raw) => decodePreflight(raw, request), reservationId: rid }
}

// -- record / release ------------------------------------------------------------------------------

export interface RecordOptions {
  readonly agentId: string
  readonly units: number
  readonly customerId?: string | undefined
  readonly reservationId?: string | undefined
  readonly taskRef?: string | undefined
  readonly success?: boolean | undefined
  readonly idempotencyKey?: string | undefined
  readonly metadata?: Record<string, unknown> | undefined
}

export interface ReleaseOptions {
  readonly reservationId?: string | undefined
  readonly idempotencyKey?: string | undefined
  readonly customerId?: string | undefined
}

function reservationKeys(p: ScriptSettings, rid: string, field: string): CustomerKeys {
  const tag = tagOfReservation(rid)
  if (tag === undefined) {
    throw new InvalidRequestError(field, 'is not a reservation id issued by agentbill')
  }
  return p.keys.byTag(tag)
}

function checkCustomer(p: ScriptSettings, ck: CustomerKeys, customerId: string | undefined): void {
  if (customerId !== undefined && p.keys.customer(customerId).tag !== ck.tag) {
    throw new InvalidRequestError('customerId', 'contradicts reservationId (it belongs to another customer)')
  }
}

function decodeSettle(raw: unknown, customerId: string | undefined, metadata?: Record<string, unknown>): Settlement {
  const f = decodeReply('settle', raw)
  const limit = f.intOrNull('limit')
  const spent = f.int('spent')
  const reserved = f.int('reserved')
  return {
    status: f.str('status') as SettleStatus,
    reservationId: u(f.strOrNull('reservation_id')),
    charged: f.int('charged'),
    released: f.int('released'),
    late: f.bool('late'),
    replayed: f.bool('replayed'),
    spent,
    reserved,
    limit: u(limit),
    remaining: remainingOf(limit, spent + reserved),
    metadata,
    // agent_id: whose budget an agent's crossed threshold is
    crossed: decodeCrossed(f.structs('crossed'), customerId ?? '', u(f.strOrNull('agent_id'))),
  }
}

export interface RecordRequest {
  readonly agentId: string
  readonly units: number
  readonly customerId: string | undefined
  readonly reservationId: string | undefined
  readonly taskRef: string | undefined
  readonly success: boolean
  readonly idempotencyKey: string | undefined
  readonly metadata: Record<string, unknown> | undefined
}

export function validateRecord(input: unknown): RecordRequest {
  const o = v.options('options', input)
  v.known('', o, ['agentId', 'units', 'customerId', 'reservationId', 'taskRef', 'success', 'idempotencyKey', 'metadata'])
  return {
    agentId: v.id('agentId', o['agentId']),
    units: v.units('units', o['units']),
    customerId: v.optionalId('customerId', o['customerId']),
    reservationId: v.optionalId('reservationId', o['reservationId']),
    taskRef: v.optionalId('taskRef', o['taskRef']),
    success: o['success'] === undefined ? true : v.boolean('success', o['success']),
    idempotencyKey: v.optionalId('idempotencyKey', o['idempotencyKey']),
    metadata: v.metadata('metadata', o['metadata']),
  }
}

/**
 * KEYS/ARGV for settle.lua, as record() calls it. `prefer`: without a reservation id, the
 * reservation to close first if it is still open (one this client made, see own.ts).
 */
export function planRecord(p: ScriptSettings, input: unknown, token = newToken(), prefer?: string): Plan<Settlement> {
  return recordPlan(p, validateRecord(input), token, prefer)
}

export function recordPlan(p: ScriptSettings, req: RecordRequest, token = newToken(), prefer?: string): Plan<Settlement> {
  const { agentId, units, reservationId: rid, taskRef, success, idempotencyKey, metadata } = req
  let customerId = req.customerId
  let ck: CustomerKeys
  let storedCustomer: string | null
  if (rid === undefined) {
    customerId = customerId ?? DEFAULT_CUSTOMER
    ck = p.keys.customer(customerId)
    storedCustomer = customerId
  } else {
    // With a reservation id, its embedded tag decides the customer.
    ck = reservationKeys(p, rid, 'reservationId')
    checkCustomer(p, ck, customerId)
    storedCustomer = customerId ?? null
  }
  let idem: string
  let fp: string | null
  let ttl: number
  if (idempotencyKey !== undefined) {
    idem = ck.idempotency('record', idempotencyKey)
    fp = fingerprint('record', rid, agentId, units, taskRef, success)
    ttl = p.idempotencyTtlMs
  } else if (rid === undefined) {
    // Without an id a retried call could close a second reservation or charge twice: the
    // request id makes the client's own retries land once.
    idem = ck.request(token)
    fp = 'request'
    ttl = REQUEST_ID_TTL_MS
  } else {
    idem = ck.request(token)
    fp = null
    ttl = REQUEST_ID_TTL_MS
  }
  // A record that closes a reservation adds its sample to the agent's estimate statistics
  // (preflight_idem, unused by a record, is sent because a later key is).
  const keys = { ...ck.fixed, idem, preflight_idem: idem, stats: ck.stats(agentId) }
  const call = buildCall('settle', keys, common(p), {}, {
    reservation_id: rid ?? null,
    units,
    charge: success,
    agent_id: agentId,
    task_ref: taskRef ?? null,
    task_digest: taskRef !== undefined ? digestOf(taskRef) : null,
    group_digest: digest(agentId, taskRef ?? ''),
    fingerprint: fp,
    idempotency_ttl_ms: ttl,
    customer_id: storedCustomer,
    request_id: token,
    by_idempotency_key: false,
    agent_digest: digestOf(agentId),
    prefer: rid === undefined ? (prefer ?? null) : null,
    rollback: false,
    preflight_fingerprint: null,
    preflight_ttl_ms: null,
  })
  return { call, decode: (raw) => decodeSettle(raw, customerId, metadata), reservationId: rid }
}

/** KEYS/ARGV for settle.lua, as release() calls it: by reservation id, or by the idempotency
 * key of the preflight that reserved. `rollback`: the release undoes an approval of a batch
 * that failed (the threshold crossings it made are taken back). */
export function planRelease(p: ScriptSettings, input: unknown, token = newToken(), rollback = false): Plan<Settlement> {
  const o: Record<string, unknown> = typeof input === 'string' ? { reservationId: input } : v.options('options', input)
  v.known('', o, ['reservationId', 'idempotencyKey', 'customerId'])
  const rid = v.optionalId('reservationId', o['reservationId'])
  const idempotencyKey = v.optionalId('idempotencyKey', o['idempotencyKey'])
  const customerId = v.optionalId('customerId', o['customerId'])
  let keys: Record<string, string>
  let byKey: boolean
  if (rid !== undefined && idempotencyKey !== undefined) {
    throw new InvalidRequestError('idempotencyKey', 'give a reservationId or this, not both')
  }
  if (rid !== undefined) {
    const ck = reservationKeys(p, rid, 'reservationId')
    checkCustomer(p, ck, customerId)
    keys = { ...ck.fixed, idem: ck.request(token) }
    byKey = false
  } else if (idempotencyKey !== undefined) {
    const ck = p.keys.customer(customerId ?? DEFAULT_CUSTOMER)
    keys = { ...ck.fixed, idem: ck.request(token), preflight_idem: ck.idempotency('preflight', idempotencyKey) }
    byKey = true
  } else {
    throw new InvalidRequestError('reservationId', "give a reservationId or the preflight's idempotencyKey")
  }
  const call = buildCall('settle', keys, common(p), {}, {
    reservation_id: rid ?? null,
    units: 0,
    charge: false,
    agent_id: null,
    task_ref: null,
    task_digest: null,
    group_digest: null,
    fingerprint: null,
    idempotency_ttl_ms: REQUEST_ID_TTL_MS,
    customer_id: null,
    request_id: token,
    by_idempotency_key: byKey,
    agent_digest: null,
    prefer: null,
    rollback,
    preflight_fingerprint: null,
    preflight_ttl_ms: null,
  })
  return { call, decode: (raw) => decodeSettle(raw, customerId), reservationId: rid }
}

// -- budgets, limits, usage, ledger, tasks -------------------------------------------------------

function decodeScope(s: Fields, customerId: string, agentId: string | undefined, nowMs: number): BudgetStatus {
  const limit = s.intOrNull('limit')
  const spent = s.int('spent')
  const reserved = s.int('reserved')
  const end = s.intOrNull('period_end_ms')
  const rateUnits = s.intOrNull('rate_units')
  return {
    customerId,
    agentId,
    limit: u(limit),
    spent,
    reserved,
    remaining: remainingOf(limit, spent + reserved),
    openReservations: s.int('open'),
    period: u(s.strOrNull('period')) as Period | undefined,
    periodStart: date(s.intOrNull('period_start_ms')),
    periodEnd: date(end),
    resetsIn: end === null ? undefined : (end - nowMs) / 1000,
    thresholds: s.list('thresholds').filter((t) => t !== '').map(Number),
    rateLimit:
      rateUnits === null
        ? undefined
        : { units: rateUnits, perSeconds: Math.floor(s.int('rate_per_ms') / 1000), burst: s.int('rate_burst') },
    maxInFlight: u(s.intOrNull('max_in_flight')),
  }
}

function decodeBudget(script: 'get_budget' | 'set_budget' | 'set_limits', raw: unknown, customerId: string, agentId: string | undefined): BudgetStatus {
  const f = decodeReply(script, raw)
  const now = f.int('now_ms')
  if (agentId !== undefined) {
    const agent = f.structOrNull('agent')
    if (agent === null) throw new Error(`${script} replied no agent scope`)
    return decodeScope(agent, customerId, agentId, now)
  }
  return decodeScope(f.struct('customer'), customerId, undefined, now)
}

function scopeRef(input: unknown, extra: readonly string[]): { o: Record<string, unknown>; customerId: string; agentId: string | undefined } {
  const o = v.options('options', input)
  v.known('', o, ['customerId', 'agentId', ...extra])
  return {
    o,
    customerId: v.optionalId('customerId', o['customerId']) ?? DEFAULT_CUSTOMER,
    agentId: v.optionalId('agentId', o['agentId']),
  }
}

const zoneCache = new Map<string, string>()

function cachedZoneTable(tz: string): string {
  const day = new Date().toISOString().slice(0, 10)
  const key = `${tz}@${day}`
  let table = zoneCache.get(key)
  if (table === undefined) {
    table = zoneTable(tz)
    if (zoneCache.size > 256) zoneCache.clear()
    zoneCache.set(key, table)
  }
  return table
}

export interface SetBudgetOptions {
  readonly customerId?: string | undefined
  /** Units; null for unlimited. */
  readonly limit: number | null
  readonly period?: Period | null | undefined
  readonly tz?: string | undefined
  readonly agentId?: string | undefined
  readonly thresholds?: readonly number[] | undefined
}

export function planSetBudget(p: ScriptSettings, input: unknown): Plan<BudgetStatus> {
  const { o, customerId, agentId } = scopeRef(input, ['limit', 'period', 'tz', 'thresholds'])
  if (!('limit' in o)) throw new InvalidRequestError('limit', 'is required (null for unlimited)')
  const limit = v.optionalUnits('limit', o['limit'])
  const period = o['period'] === undefined || o['period'] === null ? undefined : v.oneOf('period', o['period'], PERIODS)
  const tz = o['tz'] === undefined ? 'UTC' : timeZone('tz', o['tz'])
  const raw = o['thresholds'] ?? []
  if (!Array.isArray(raw) || raw.length > 20) {
    throw new InvalidRequestError('thresholds', 'must be a list of at most 20 percents')
  }
  const thresholds = [...new Set(raw.map((t, i) => v.integer(`thresholds[${i}]`, t, 1, 1000)))].sort((a, b) => a - b)
  const ck = p.keys.customer(customerId)
  const call = buildCall('set_budget', ck.fixed, common(p), {
    agent_digest: agentId !== undefined ? digestOf(agentId) : null,
    limit: limit ?? null,
    period: period ?? null,
    zone_table: period !== undefined ? cachedZoneTable(tz) : null,
    thresholds: thresholds.map(String),
    customer_id: customerId,
    agent_id: agentId ?? null,
  })
  return { call, decode: (r) => decodeBudget('set_budget', r, customerId, agentId) }
}

export interface SetRateLimitOptions {
  readonly customerId?: string | undefined
  /** Units per window; null removes the limit. */
  readonly units: number | null
  readonly perSeconds: number | null
  readonly burst?: number | undefined
  readonly agentId?: string | undefined
}

export function planSetRateLimit(p: ScriptSettings, input: unknown): Plan<BudgetStatus> {
  const { o, customerId, agentId } = scopeRef(input, ['units', 'perSeconds', 'burst'])
  const units = o['units'] === undefined || o['units'] === null ? undefined : v.integer('units', o['units'], 1, v.MAX_UNITS)
  const per = v.optionalSeconds('perSeconds', o['perSeconds'])
  const burst = o['burst'] === undefined || o['burst'] === null ? undefined : v.integer('burst', o['burst'], 1, v.MAX_UNITS)
  if (units !== undefined && per === undefined) throw new InvalidRequestError('perSeconds', 'is required with units')
  const rate = units === undefined || per === undefined
    ? { n: null, per_ms: null, burst: null }
    : { n: units, per_ms: per * 1000, burst: burst ?? units }
  const ck = p.keys.customer(customerId)
  const call = buildCall('set_limits', ck.fixed, common(p), {
    agent_digest: agentId !== undefined ? digestOf(agentId) : null,
    kind: 'rate',
    ...rate,
    customer_id: customerId,
    agent_id: agentId ?? null,
  })
  return { call, decode: (r) => decodeBudget('set_limits', r, customerId, agentId) }
}

export interface SetConcurrencyLimitOptions {
  readonly customerId?: string | undefined
  /** At most this many runs in flight; null removes the limit. */
  readonly maxInFlight: number | null
  readonly agentId?: string | undefined
}

export function planSetConcurrencyLimit(p: ScriptSettings, input: unknown): Plan<BudgetStatus> {
  const { o, customerId, agentId } = scopeRef(input, ['maxInFlight'])
  const max = o['maxInFlight'] === undefined || o['maxInFlight'] === null ? undefined : v.integer('maxInFlight', o['maxInFlight'], 0, v.MAX_UNITS)
  const ck = p.keys.customer(customerId)
  const call = buildCall('set_limits', ck.fixed, common(p), {
    agent_digest: agentId !== undefined ? digestOf(agentId) : null,
    kind: 'concurrency',
    n: max ?? null,
    per_ms: null,
    burst: null,
    customer_id: customerId,
    agent_id: agentId ?? null,
  })
  return { call, decode: (r) => decodeBudget('set_limits', r, customerId, agentId) }
}

export function planGetBudget(p: ScriptSettings, input: unknown): Plan<BudgetStatus> {
  const { customerId, agentId } = scopeRef(input, [])
  const ck = p.keys.customer(customerId)
  const call = buildCall('get_budget', ck.fixed, common(p), {
    agent_digest: agentId !== undefined ? digestOf(agentId) : null,
  })
  return { call, decode: (r) => decodeBudget('get_budget', r, customerId, agentId) }
}

export function planGetUsage(p: ScriptSettings, input: unknown): Plan<Usage> {
  const o = v.options('options', input)
  v.known('', o, ['customerId', 'limit'])
  const customerId = v.optionalId('customerId', o['customerId']) ?? DEFAULT_CUSTOMER
  const limit = o['limit'] === undefined || o['limit'] === null ? 100 : v.integer('limit', o['limit'], 1, 10_000)
  const call = buildCall('get_usage', p.keys.customer(customerId).fixed, common(p), { agent_limit: limit })
  return {
    call,
    decode: (raw) => {
      const f = decodeReply('get_usage', raw)
      const now = f.int('now_ms')
      const agents = f.pairs('agents').map(([agent, scope]) => decodeScope(scope, customerId, agent, now))
      // By code point, as Python's sorted(): UTF-8 bytes sort that way, UTF-16 units do not.
      agents.sort((a, b) => Buffer.compare(Buffer.from(a.agentId ?? ''), Buffer.from(b.agentId ?? '')))
      return { customer: decodeScope(f.struct('customer'), customerId, undefined, now), agents }
    },
  }
}

/** Ledger entries read per script call: a page is a few milliseconds of Redis, however long the
 * ledger (as Python's EVENTS_PAGE). */
export const EVENTS_PAGE = 1000

/** An `events` request, validated: the client reads it in pages (`planEventsPage`). */
export function validateEvents(input: unknown): { customerId: string; since: string | undefined; limit: number | undefined } {
  const o = v.options('options', input)
  v.known('', o, ['customerId', 'since', 'limit'])
  const customerId = v.optionalId('customerId', o['customerId']) ?? DEFAULT_CUSTOMER
  const since = o['since'] === undefined || o['since'] === null ? undefined : o['since']
  if (since !== undefined && (typeof since !== 'string' || !/^\d{1,20}-\d{1,20}$/.test(since))) {
    throw new InvalidRequestError('since', "must be an event's id (\"<ms>-<seq>\")")
  }
  if (since !== undefined) {
    // 20 digits can exceed Redis's uint64: refused here, by name, as Python's StreamId does.
    const parts = since.split('-').map((part) => BigInt(part))
    if (parts.some((part) => part >= 2n ** 64n)) {
      throw new InvalidRequestError('since', 'is not a stream id: each part must be below 2**64')
    }
    if (parts.every((part) => part === 2n ** 64n - 1n)) {
      throw new InvalidRequestError('since', 'is the largest stream id: no event can follow it')
    }
  }
  const limit = o['limit'] === undefined || o['limit'] === null ? undefined : v.integer('limit', o['limit'], 1, 1_000_000)
  return { customerId, since, limit }
}

/** One page of the ledger: at most `count` entries after `since`. */
export function planEventsPage(p: ScriptSettings, customerId: string, since: string | undefined, count: number): Plan<Event[]> {
  const call = buildCall('events', p.keys.customer(customerId).fixed, common(p), {
    after: since ?? '-',
    count,
  })
  return {
    call,
    decode: (raw) => {
      if (!Array.isArray(raw)) throw new Error('events replied no list')
      return raw.map((entry): Event => {
        const { id, fields: f } = decodeLedgerEntry(entry)
        return {
          id,
          type: f.str('type') as EventType,
          time: new Date(Number(id.split('-')[0])),
          customerId,
          agentId: u(f.strOrNull('agent_id')),
          taskRef: u(f.strOrNull('task_ref')),
          units: f.int('units'),
          released: f.int('released'),
          reservationId: u(f.strOrNull('reservation_id')),
          reason: u(f.strOrNull('reason')),
          scope: u(f.strOrNull('scope')),
          period: u(f.strOrNull('period')),
        }
      })
    },
  }
}

function decodeTask(script: 'open_task' | 'get_task', raw: unknown, customerId: string, taskRef: string): TaskStatus {
  const f = decodeReply(script, raw)
  const ceiling = f.intOrNull('ceiling')
  const used = f.int('used')
  const reserved = f.int('reserved')
  return {
    taskRef,
    customerId,
    ceiling: u(ceiling),
    used,
    reserved,
    remaining: remainingOf(ceiling, used + reserved),
    exists: f.bool('exists'),
  }
}

export function planOpenTask(p: ScriptSettings, input: unknown): Plan<TaskStatus> {
  const o = v.options('options', input)
  v.known('', o, ['taskRef', 'ceiling', 'customerId'])
  const taskRef = v.id('taskRef', o['taskRef'])
  if (!('ceiling' in o)) throw new InvalidRequestError('ceiling', 'is required (null for none)')
  const ceiling = v.optionalUnits('ceiling', o['ceiling'])
  const customerId = v.optionalId('customerId', o['customerId']) ?? DEFAULT_CUSTOMER
  const call = buildCall('open_task', p.keys.customer(customerId).fixed, common(p), {
    task_digest: digestOf(taskRef),
    task_ref: taskRef,
    ceiling: ceiling ?? null,
  })
  return { call, decode: (r) => decodeTask('open_task', r, customerId, taskRef) }
}

export function planGetTask(p: ScriptSettings, input: unknown): Plan<TaskStatus> {
  const o = v.options('options', input)
  v.known('', o, ['taskRef', 'customerId'])
  const taskRef = v.id('taskRef', o['taskRef'])
  const customerId = v.optionalId('customerId', o['customerId']) ?? DEFAULT_CUSTOMER
  const call = buildCall('get_task', p.keys.customer(customerId).fixed, common(p), {
    task_digest: digestOf(taskRef),
  })
  return { call, decode: (r) => decodeTask('get_task', r, customerId, taskRef) }
}
