/**
 * AgentBillClient: one script call per operation over ioredis, on the logic in core.ts. The same
 * scripts, keys and budgets as the Python client: Node and Python workers share budgets on one
 * Redis.
 */
import type { ConnectionOptions as TlsOptions } from 'node:tls'
import { Cluster, Redis, type RedisOptions } from 'ioredis'
import type { CheckFields, ThresholdCrossing } from './check.js'
import { type Call, contract, functionName, library, scriptError } from './contract.js'
import * as core from './core.js'
import type {
  PreflightOptions,
  RecordOptions,
  ReleaseOptions,
  SetBudgetOptions,
  SetConcurrencyLimitOptions,
  SetRateLimitOptions,
} from './core.js'
import {
  AgentBillError,
  AuthenticationError,
  InvalidRequestError,
  LibraryNotLoadedError,
  StoreBusyError,
  StoreError,
  StoreUnavailableError,
  refusal,
} from './errors.js'
import { KeySpace } from './keys.js'
import { answersPing, dataDir, HOME_ENV, socketPath } from './local.js'
import { OwnReservations } from './own.js'
import { SettleQueue } from './surely.js'
import { CLUSTER_HINT, parseRedisUrl } from './topology.js'
import {
  Check,
  type BudgetStatus,
  type Event,
  type Settlement,
  type TaskStatus,
  type Usage,
} from './results.js'
import { parseApiKey, type TenantKey } from './tenants.js'
import * as v from './validate.js'

export const ENV_REDIS_URL = 'AGENTBILL_REDIS_URL'

export interface ClientOptions {
  /** An `agb_...` tenant key (authenticates as its ACL user, sets the namespace), or a label. */
  readonly apiKey?: string | undefined
  /** The most any single run may estimate (units); undefined for none. */
  readonly ceiling?: number | null | undefined
  /** `redis://`, `rediss://` (TLS; `?ssl_ca_certs=/path/ca.pem` as in Python), `unix:///path`. */
  readonly redisUrl?: string | undefined
  /** A ready ioredis client: `Redis` (single node, or Sentinel) or `Cluster`. Not closed by close(). */
  readonly redis?: Redis | Cluster | undefined
  /** Prefix of every key: clients in different namespaces never see each other's data. */
  readonly namespace?: string | undefined
  /** Seconds an unsettled reservation holds its units (default 3600). */
  readonly reservationTtl?: number | undefined
  /** Seconds an idempotency key is remembered (default 86400). */
  readonly idempotencyTtl?: number | undefined
  /** Seconds a closed reservation's outcome is remembered (default 86400, >= idempotencyTtl). */
  readonly outcomeRetention?: number | undefined
  /** Seconds an idle task (nothing reserved) is remembered after its last use (default 30 days). */
  readonly taskRetention?: number | undefined
  /** Seconds after a customer's last write when its keys expire (default 90 days, at least
   * outcomeRetention and taskRetention); never, once a budget or limit was set for it. */
  readonly idleRetention?: number | undefined
  /** Expired reservations returned per call (default 100). */
  readonly reapLimit?: number | undefined
  /** About how many ledger entries a customer keeps (default 100000). */
  readonly ledgerMaxLen?: number | undefined
  /** Seconds to connect (default 0.5), for connections this client builds. */
  readonly connectTimeout?: number | undefined
  /** Seconds for a reply (default 1.0), for connections this client builds. */
  readonly socketTimeout?: number | undefined
  /** Attempts of a call after transport failures (default 3), within retryDeadline. */
  readonly retryAttempts?: number | undefined
  /** Seconds after which no retry starts (default 1.0). */
  readonly retryDeadline?: number | undefined
  /** TLS options (CA, client certificate) for a `rediss://` redisUrl. */
  readonly tls?: TlsOptions | undefined
  /** Called for every soft threshold a call crossed; its errors are reported, never thrown. */
  readonly onThreshold?: ((crossing: ThresholdCrossing) => unknown) | undefined
}

/** A gate's preflight: no `idempotencyKey` (every call of the gated function would share it,
 * and each call after the first would replay the first approval and run uncharged). */
export interface GateOptions<R> extends Omit<PreflightOptions, 'idempotencyKey'> {
  /** What to record after `fn` returns: a number, a function of its result, or the estimate. */
  readonly units?: number | ((result: R) => number) | undefined
  /** Aborting releases the reservation at once and rejects with the signal's reason. */
  readonly signal?: AbortSignal | undefined
}

const CLIENT_OPTIONS = [
  'apiKey', 'ceiling', 'redisUrl', 'redis', 'namespace', 'reservationTtl', 'idempotencyTtl',
  'outcomeRetention', 'taskRetention', 'idleRetention', 'reapLimit', 'ledgerMaxLen', 'connectTimeout', 'socketTimeout',
  'retryAttempts', 'retryDeadline', 'tls', 'onThreshold',
]
const GATE_OPTIONS = [
  'agentId', 'estimatedUnits', 'customerId', 'taskRef', 'taskCeiling', 'ttl', 'units', 'signal',
]

export interface Settings {
  /** What the scripts take of these settings (keys, ceiling, TTLs in ms), validated once. */
  readonly scriptSettings: core.ScriptSettings
  readonly key: TenantKey | undefined
  readonly redisUrl: string | undefined
  readonly connectTimeoutMs: number
  readonly socketTimeoutMs: number
  readonly retryAttempts: number
  readonly retryDeadlineMs: number
  readonly tls: TlsOptions | undefined
}

export function settingsFrom(o: Record<string, unknown>): Settings {
  v.known('', o, CLIENT_OPTIONS)
  const apiKey = o['apiKey'] === undefined ? undefined : o['apiKey']
  if (apiKey !== undefined && typeof apiKey !== 'string') {
    throw new InvalidRequestError('apiKey', 'must be a string')
  }
  const key = apiKey === undefined ? undefined : parseApiKey(apiKey)
  let namespace = v.id('namespace', o['namespace'] ?? 'agentbill')
  if (key !== undefined) {
    if (o['namespace'] !== undefined && namespace !== key.namespace) {
      throw new InvalidRequestError('namespace', 'differs from the namespace of apiKey: a key works only in its own')
    }
    namespace = key.namespace
  }
  const num = (name: string, dflt: number, min: number, max: number): number =>
    v.integer(name, o[name] ?? dflt, min, max)
  const idempotencyTtl = v.seconds('idempotencyTtl', o['idempotencyTtl'] ?? 86400)
  const outcomeRetention = v.seconds('outcomeRetention', o['outcomeRetention'] ?? 86400)
  if (outcomeRetention < idempotencyTtl) {
    // A preflight key replays its approval while remembered; whether that approval was
    // released (so the key must reserve afresh) is known only while its outcome is.
    throw new InvalidRequestError('outcomeRetention', 'must be at least idempotencyTtl')
  }
  const taskRetention = v.seconds('taskRetention', o['taskRetention'] ?? 30 * 86400)
  const idleRetention = v.seconds('idleRetention', o['idleRetention'] ?? 90 * 86400)
  // A customer's keys expire after idleRetention; outcomes and tasks must not outlive the keys
  // that hold them.
  if (idleRetention < outcomeRetention) {
    throw new InvalidRequestError('idleRetention', 'must be at least outcomeRetention')
  }
  if (idleRetention < taskRetention) {
    throw new InvalidRequestError('idleRetention', 'must be at least taskRetention')
  }
  const redisUrl = o['redisUrl']
  if (redisUrl !== undefined && (typeof redisUrl !== 'string' || redisUrl === '')) {
    throw new InvalidRequestError('redisUrl', 'must be a non-empty string')
  }
  return {
    scriptSettings: {
      keys: new KeySpace(namespace),
      ceiling: v.optionalUnits('ceiling', o['ceiling']),
      reservationTtlMs: v.seconds('reservationTtl', o['reservationTtl'] ?? 3600) * 1000,
      idempotencyTtlMs: idempotencyTtl * 1000,
      retentionMs: outcomeRetention * 1000,
      taskRetentionMs: taskRetention * 1000,
      idleRetentionMs: idleRetention * 1000,
      reapLimit: num('reapLimit', 100, 1, 10_000),
      ledgerLen: num('ledgerMaxLen', 100_000, 1, 100_000_000),
    },
    key,
    redisUrl: redisUrl as string | undefined,
    connectTimeoutMs: v.timeout('connectTimeout', o['connectTimeout'] ?? 0.5) * 1000,
    socketTimeoutMs: v.timeout('socketTimeout', o['socketTimeout'] ?? 1.0) * 1000,
    retryAttempts: num('retryAttempts', 3, 1, 10),
    retryDeadlineMs: v.timeout('retryDeadline', o['retryDeadline'] ?? 1.0) * 1000,
    tls: o['tls'] as TlsOptions | undefined,
  }
}

function errorText(exc: unknown): string {
  return exc instanceof Error ? exc.message : String(exc)
}

const AUTH_ERROR = /^(WRONGPASS|NOAUTH|NOPERM)|invalid username-password|user is disabled|no permissions|unauthenticated/i

/** Redis's answer to FCALL of a function it does not have (the same on Redis 7.0 and Valkey 9). */
const FUNCTION_NOT_FOUND = 'ERR Function not found'
/** A Redis before 7.0, which has no FCALL ('...' since 6.2, `...` before). */
const NO_FUNCTIONS = /^ERR unknown command ['`]FCALL['`]/i

function isAuthError(exc: unknown): boolean {
  return AUTH_ERROR.test(errorText(exc))
}

/** Error replies meaning "not now": Redis refused the call before it wrote anything (a script
 * is refused at its first write), and the same call may succeed later (lua/contract.json
 * `busy_codes`, which the Python client reads too). */
export const BUSY_CODES: readonly string[] = contract.busy_codes

/** The code of a "not now" error reply (BUSY_CODES), else undefined. ioredis's Cluster
 * follows MOVED, ASK and TRYAGAIN up to maxRedirections times, then gives up with "Too many
 * Cluster redirections": every hop was a redirection or a "try again", so the call ran nowhere
 * (a slot migrating, or the nodes disagreeing on its owner): TRYAGAIN, as Python reads
 * redis-py's "TTL exhausted". */
function busyCode(exc: unknown): string | undefined {
  if (exc instanceof AgentBillError) return undefined
  const text = errorText(exc)
  if (text.startsWith('Too many Cluster redirections')) return 'TRYAGAIN'
  const first = text.split(' ', 1)[0]!
  return BUSY_CODES.includes(first) ? first : undefined
}

/** Redis could not be reached or did not answer in time: the call is in doubt. */
function isUnreachable(exc: unknown): boolean {
  if (isAuthError(exc) || exc instanceof AgentBillError || busyCode(exc) !== undefined) return false
  const e = exc as { code?: string; name?: string }
  if (e?.name === 'MaxRetriesPerRequestError' || e?.name === 'ClusterAllFailedError') return true
  if (typeof e?.code === 'string' && /^E(CONNREFUSED|CONNRESET|PIPE|TIMEDOUT|HOSTUNREACH|NETUNREACH|NOTFOUND|AI_AGAIN|CONNABORTED)$/.test(e.code)) {
    return true
  }
  return /Connection is closed|Command timed out|Stream isn't writeable|max retries per request|Failed to refresh slots cache|None of startup nodes is available/i.test(
    errorText(exc),
  )
}

/** A failure where the same request, sent again, may succeed. */
function isTransient(exc: unknown): boolean {
  return isUnreachable(exc) || busyCode(exc) !== undefined
}

class DeadlineError extends Error {
  constructor() {
    super('Command timed out: no answer within the retry deadline')
  }
}

/** `work`, or a transient DeadlineError after `ms` (the call may still land: it keeps its id). */
function withTimeout<T>(work: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new DeadlineError()), Math.max(ms, 1))
  })
  return Promise.race([work, deadline]).finally(() => clearTimeout(timer))
}

/** At most this many script calls of one client are under way at once; the others wait for a
 * slot. Waiting is the process's own load, never a failure: a call's timeouts start when it
 * has its slot (as Python's `max_connections`). */
export const MAX_CALLS_IN_FLIGHT = 50
/** How long a call keeps retrying timeouts while Redis answers this client's other calls (the
 * process's own load, not an outage: Python's LOAD_DEADLINE). */
export const LOAD_DEADLINE_MS = 30_000

function sleep(ms: number): Promise<void> {
  return new Promise((done) => setTimeout(done, ms))
}

/**
 * Budget enforcement for agent runs, against a Redis shared by every worker.
 *
 * Connects to `redis` (a ready ioredis `Redis` or `Cluster`) if given, else `redisUrl`, else
 * `$AGENTBILL_REDIS_URL`, else this user's local server started by the Python package (see
 * local.ts); else the first call throws a StoreUnavailableError saying how to get one.
 * Bad options throw InvalidRequestError here, before anything connects.
 */
export class AgentBillClient {
  readonly #settings: Settings
  readonly #given: Redis | Cluster | undefined
  #redis: Promise<Redis | Cluster> | undefined
  /** The connection this client built, once built (a Cluster for a redis+cluster:// URL). */
  #built: Redis | Cluster | undefined
  #lastConnectionError: unknown
  /** close() was called: new calls are refused; those under way finish. */
  #closing = false
  #closed: Promise<void> | undefined
  /** close() is done: no connection is made again. */
  #ended = false
  /** Script calls under way, and gated calls under way (preflight to settle). */
  #inFlight = 0
  #gates = 0
  /** Slots for script calls (MAX_CALLS_IN_FLIGHT), and the calls waiting for one. */
  #slotsFree = MAX_CALLS_IN_FLIGHT
  #slotWaiters: { go: () => void; fail: (exc: unknown) => void }[] = []
  /** When Redis last answered one of this client's calls (an error reply is an answer too). */
  #lastAnswer = Number.NEGATIVE_INFINITY
  /** Set when a call failed while Redis had answered nothing for a while: Redis is down, and
   * calls waiting for a slot fail at once instead of queueing behind attempts that would time
   * out too. Cleared by the next answer. */
  #down: unknown
  #idle: (() => void)[] = []
  /** The FUNCTION LOAD under way, if one is (see #loadLibrary). */
  #loading: Promise<void> | undefined
  readonly #owed = new SettleQueue(
    (plan) => this.#run(plan, true),
    (rid) => core.planRelease(this.#settings.scriptSettings, rid),
  )
  readonly #own = new OwnReservations()
  readonly #onThreshold: ((crossing: ThresholdCrossing) => unknown) | undefined

  constructor(options: ClientOptions = {}) {
    const o = v.options('options', options)
    this.#settings = settingsFrom(o)
    const given = o['redis']
    if (given !== undefined && !(given instanceof Redis) && !(given instanceof Cluster)) {
      throw new InvalidRequestError('redis', 'must be an ioredis Redis or Cluster (not a URL: use redisUrl)')
    }
    this.#given = given as Redis | Cluster | undefined
    const onThreshold = o['onThreshold']
    if (onThreshold !== undefined && typeof onThreshold !== 'function') {
      throw new InvalidRequestError('onThreshold', 'must be a function of a ThresholdCrossing')
    }
    this.#onThreshold = onThreshold as ((crossing: ThresholdCrossing) => unknown) | undefined
    if (this.#given === undefined && this.#settings.key !== undefined) {
      const url = this.#settings.redisUrl ?? (process.env[ENV_REDIS_URL] || undefined)
      if (url === undefined) {
        throw new InvalidRequestError(
          'apiKey',
          'is a key for a shared Redis, but none is configured: pass redisUrl or set ' +
            'AGENTBILL_REDIS_URL (the local server has no tenants)',
        )
      }
      parseRedisUrl(url, this.#settings.key, this.#settings.tls) // refuse a bad URL now
    } else if (this.#given === undefined && this.#settings.redisUrl !== undefined) {
      parseRedisUrl(this.#settings.redisUrl, undefined, this.#settings.tls)
    }
  }

  /** The namespace every key of this client starts with (a tenant key's, if given one). */
  get namespace(): string {
    return this.#settings.scriptSettings.keys.namespace
  }

  get ceiling(): number | undefined {
    return this.#settings.scriptSettings.ceiling
  }

  // -- connection ----------------------------------------------------------------------------------

  #connection(): Promise<Redis | Cluster> {
    if (this.#ended) return Promise.reject(new StoreError('the client is closed'))
    if (this.#given !== undefined) return Promise.resolve(this.#given)
    this.#redis ??= this.#connect()
    return this.#redis
  }

  async #connect(): Promise<Redis | Cluster> {
    const s = this.#settings
    let target = s.redisUrl ?? (process.env[ENV_REDIS_URL] || undefined)
    if (target === undefined) {
      const socket = socketPath()
      if (!(await answersPing(socket))) {
        this.#redis = undefined // look again on the next call
        throw new StoreUnavailableError(
          `no Redis configured: pass redisUrl or redis, or set ${ENV_REDIS_URL}; or start this ` +
            `user's local server from Python (any AgentBillClient() with no URL starts it: ` +
            `python -c "import agentbill; agentbill.AgentBillClient().get_budget()"); ` +
            `no server answers on ${socket} (data directory ${dataDir()}, set by ${HOME_ENV})`,
        )
      }
      target = `unix://${encodeURI(socket)}`
    }
    const where = parseRedisUrl(target, s.key, s.tls)
    // Reconnect while a call waits; an idle client stays disconnected (and keeps no timer
    // running) until its next call.
    const retry = (times: number): number | null => (this.#inFlight > 0 ? Math.min(times * 50, 500) : null)
    const options: RedisOptions = {
      ...where.options,
      connectTimeout: s.connectTimeoutMs,
      commandTimeout: s.socketTimeoutMs,
      // agentbill's own retry policy (#retrying) is the only retry layer.
      maxRetriesPerRequest: 0,
      retryStrategy: retry,
      // The ready check sends INFO, which a tenant's ACL user may not run.
      enableReadyCheck: false,
      lazyConnect: true,
    }
    let redis: Redis | Cluster
    if (where.kind === 'cluster') {
      redis = new Cluster(where.nodes.map((n) => ({ ...n })), {
        redisOptions: options,
        clusterRetryStrategy: retry,
        enableReadyCheck: false,
        lazyConnect: true,
      })
    } else if (where.kind === 'sentinel') {
      redis = new Redis({
        ...options,
        sentinels: where.nodes.map((n) => ({ ...n })),
        name: where.service,
        sentinelUsername: where.sentinelUsername,
        sentinelPassword: where.sentinelPassword,
        sentinelRetryStrategy: retry,
        sentinelCommandTimeout: s.socketTimeoutMs,
        ...(where.options.tls !== undefined ? { enableTLSForSentinelMode: true, sentinelTLS: where.options.tls } : {}),
      })
    } else {
      redis = new Redis(options)
    }
    this.#built = redis
    redis.on('error', (exc: unknown) => {
      this.#lastConnectionError = exc
    })
    redis.on('ready', () => {
      this.#lastConnectionError = undefined
    })
    // An idle client does not keep the process alive (a script that never calls close() still
    // exits); its socket is referenced only while a call is in flight.
    redis.on('connect', () => {
      if (this.#inFlight === 0) for (const socket of socketsOf(redis)) socket.unref()
    })
    redis.connect().catch(() => undefined) // failures reach the first command
    return redis
  }

  /** The agentbill error for an ioredis (or socket) error. Callers keep it as `cause`. */
  #translate(exc: unknown): AgentBillError {
    if (exc instanceof AgentBillError) return exc
    const text = errorText(exc)
    const scripted = scriptError(text)
    if (scripted !== undefined) {
      const field = scripted.field.replace(/_([a-z])/g, (_m, c: string) => c.toUpperCase())
      return new InvalidRequestError(field, scripted.message)
    }
    // Only a plain connection sees MOVED: a Cluster follows it. Nothing ran.
    if (text.startsWith('MOVED ')) return new InvalidRequestError('redisUrl', CLUSTER_HINT)
    const connectionError = this.#lastConnectionError
    if (isAuthError(exc) || (isUnreachable(exc) && isAuthError(connectionError))) {
      const source = isAuthError(exc) ? text : errorText(connectionError)
      return new AuthenticationError(`Redis refused the credentials: ${source}`, { cause: exc })
    }
    const code = busyCode(exc)
    if (code !== undefined) {
      return new StoreBusyError(`Redis cannot run the call now (${code}): ${text}`, code, { cause: exc })
    }
    if (isTransient(exc)) {
      return new StoreUnavailableError(`Redis is unavailable: ${text}`, { cause: exc })
    }
    return new StoreError(`Redis refused the command: ${text}`, { cause: exc })
  }

  /** `fn` with at most retryAttempts attempts within retryDeadline, for transport failures only;
   * every call carries its request id, so a retry after a lost reply lands once. A retry gets
   * only what is left of the deadline: a call fails closed within about socketTimeout plus
   * nothing more when Redis is silent, and within the deadline when it refuses connections. */
  async #retrying<T>(fn: () => Promise<T>): Promise<T> {
    const s = this.#settings
    const started = performance.now()
    let doubt: unknown // the last failure after which the call may have run
    let load = false // the last attempt timed out under this process's own load
    for (let attempt = 1; ; attempt++) {
      try {
        // A `redis` passed in keeps its own timeouts and retries, which may wait for Redis for
        // ever (maxRetriesPerRequest: null, as BullMQ asks): each attempt is bounded here too.
        // A call cut off this way is in doubt, and may still be sent later as the same request.
        let result: T
        if (attempt === 1 || load) {
          result = await (this.#given === undefined ? fn() : withTimeout(fn(), s.connectTimeoutMs + s.socketTimeoutMs))
        } else {
          result = await withTimeout(fn(), s.retryDeadlineMs - (performance.now() - started))
        }
        this.#answered()
        return result
      } catch (exc) {
        if (isUnreachable(exc)) doubt = exc
        else if (!(exc instanceof AgentBillError)) this.#answered() // an error reply is an answer
        load = this.#isLoad(exc, started)
        if (load) {
          attempt -= 1 // the process's own load: not one of the attempts
        } else if (isUnreachable(exc) && !this.#answering()) {
          this.#markDown(exc)
        }
        const left = s.retryDeadlineMs - (performance.now() - started)
        if (!load && (!isTransient(exc) || isAuthError(this.#lastConnectionError) || attempt >= s.retryAttempts || left <= 0)) {
          // A busy answer after an attempt in doubt is in doubt too: StoreBusyError promises
          // that nothing was written.
          throw this.#translate(busyCode(exc) !== undefined && doubt !== undefined ? doubt : exc)
        }
        const wait = load ? 50 : Math.min(50 * 2 ** (attempt - 1), 500)
        await sleep(load ? wait : Math.min(wait + Math.random() * 50, left))
      }
    }
  }

  /** Whether Redis answered one of this client's calls within the last half socket timeout. */
  #answering(): boolean {
    return performance.now() - this.#lastAnswer < this.#settings.socketTimeoutMs / 2
  }

  #answered(): void {
    this.#lastAnswer = performance.now()
    this.#down = undefined
  }

  /** A timeout while Redis answers this client's other calls is this process's own load (its
   * calls queue behind each other, or its event loop was busy): sent again, as the same
   * request, for up to LOAD_DEADLINE_MS. Never on a Cluster, where one node can be down while
   * the others answer. */
  #isLoad(exc: unknown, started: number): boolean {
    if (this.#given instanceof Cluster || this.#built instanceof Cluster || !isUnreachable(exc)) return false
    if (!/timed out/i.test(errorText(exc))) return false // refused or reset: Redis is gone
    return performance.now() - started < LOAD_DEADLINE_MS && this.#answering()
  }

  #markDown(exc: unknown): void {
    this.#down = exc
    for (const waiter of this.#slotWaiters.splice(0)) waiter.fail(exc)
  }

  /** A slot for one script call (see MAX_CALLS_IN_FLIGHT); while Redis is down, a call that
   * would have to wait fails at once. */
  #slot(): Promise<void> {
    if (this.#slotsFree > 0) {
      this.#slotsFree -= 1
      return Promise.resolve()
    }
    if (this.#down !== undefined) return Promise.reject(this.#translate(this.#down))
    return new Promise((go, fail) =>
      this.#slotWaiters.push({ go, fail: (exc) => fail(this.#translate(exc)) }),
    )
  }

  #freeSlot(): void {
    const next = this.#slotWaiters.shift()
    if (next === undefined) this.#slotsFree += 1
    else next.go() // the slot passes straight to it
  }

  /**
   * One script call: FCALL of the operation's function in agentbill's Functions library. Redis
   * answers "Function not found" when it lacks the library: a new server, one restarted without
   * persistence, FUNCTION FLUSH, or another agentbill version (whose library has another name,
   * so the two never disturb each other). Nothing ran then: this client loads the library
   * (#loadLibrary) and sends the same call once more, with the same arguments, so the same
   * request id (a retry after its reply is lost still lands once); missing again at once, it is
   * a TRYAGAIN for the retry policy. A Redis without Functions (before 7.0) is a StoreError.
   */
  async #eval(call: Call): Promise<unknown> {
    const redis = await this.#connection()
    if (redis instanceof Redis && redis.status === 'end' && this.#given === undefined) {
      redis.connect().catch(() => undefined) // it stopped reconnecting while idle
    }
    const name = functionName(library, call.script)
    const send = (): Promise<unknown> => redis.fcall(name, call.keys.length, ...call.keys, ...call.args)
    try {
      return await send()
    } catch (exc) {
      const text = errorText(exc)
      if (NO_FUNCTIONS.test(text)) {
        throw new StoreError(`agentbill needs Redis 7.0+ or Valkey (it runs as a Functions library, FCALL): ${text}`, { cause: exc })
      }
      if (!text.startsWith(FUNCTION_NOT_FOUND)) throw exc
    }
    await this.#loadLibrary(redis)
    try {
      return await send()
    } catch (exc) {
      if (!errorText(exc).startsWith(FUNCTION_NOT_FOUND)) throw exc
      // Gone again right after the load (a FUNCTION FLUSH, DELETE or RESTORE racing it): the
      // call ran nothing. "Not now", a TRYAGAIN, as the Python client's LibraryRemoved: the
      // retry policy sends the same call again, a bounded number of times.
      throw new Error(
        `TRYAGAIN Redis answered 'Function not found' for agentbill's library ${library.name} right after it was loaded (removed again meanwhile)`,
        { cause: exc },
      )
    }
  }

  /** FUNCTION LOAD REPLACE of agentbill's library, on every primary of a Cluster (a call may
   * land on any of them; replicas get it from their primary). REPLACE: another call may have
   * loaded it meanwhile, with the same text. The calls that find it missing together share one
   * load. A connection that may not load it (a tenant key: FCALL only) gets a
   * LibraryNotLoadedError. */
  #loadLibrary(redis: Redis | Cluster): Promise<void> {
    this.#loading ??= (async () => {
      const nodes = redis instanceof Cluster ? redis.nodes('master') : [redis]
      try {
        await Promise.all(nodes.map((node) => node.function('LOAD', 'REPLACE', library.text)))
      } catch (exc) {
        if (errorText(exc).startsWith('NOPERM')) {
          throw new LibraryNotLoadedError(library.name, errorText(exc), { cause: exc })
        }
        throw exc
      }
    })().finally(() => {
      this.#loading = undefined
    })
    return this.#loading
  }

  /** `fn` with the connection this client built held open (referenced) while it runs.
   * Refused once close() was called, unless `owed` (what a call under way still has to send). */
  async #holding<T>(fn: () => Promise<T>, owed = false): Promise<T> {
    if (this.#closing && !owed) throw new StoreError('the client is closed')
    this.#inFlight += 1
    const own = this.#given === undefined ? await this.#redis?.catch(() => undefined) : undefined
    for (const socket of socketsOf(own)) socket.ref()
    try {
      return await fn()
    } finally {
      this.#inFlight -= 1
      this.#whenIdle()
      if (this.#inFlight === 0) {
        const redis = this.#given === undefined ? await this.#redis?.catch(() => undefined) : undefined
        if (this.#inFlight === 0) for (const socket of socketsOf(redis)) socket.unref()
      }
    }
  }

  /** Wake close() once no call is under way. */
  #whenIdle(): void {
    if (this.#inFlight > 0 || this.#gates > 0) return
    for (const wake of this.#idle.splice(0)) wake()
  }

  /** One script call, retried; the connection held while it runs. */
  #send(call: Call, owed = false): Promise<unknown> {
    return this.#holding(async () => {
      await this.#slot()
      try {
        return await this.#retrying(() => this.#eval(call))
      } finally {
        this.#freeSlot()
      }
    }, owed)
  }

  async #run<T>(plan: core.Plan<T>, owed = false): Promise<T> {
    const reply = await this.#send(plan.call, owed)
    const result = plan.decode(reply)
    this.#notify(result)
    return result
  }

  #notify(result: unknown): void {
    if (this.#onThreshold === undefined) return
    for (const crossing of (result as { crossed?: readonly ThresholdCrossing[] }).crossed ?? []) {
      try {
        const out = this.#onThreshold(crossing)
        if (out instanceof Promise) out.catch((exc: unknown) => reportCallbackError(exc))
      } catch (exc) {
        reportCallbackError(exc)
      }
    }
  }

  #check(fields: ReturnType<core.Plan<never>['decode']> | Parameters<typeof refusal>[0]): Check {
    return new Check(fields, this)
  }

  /** Remember an approval Redis made, so this client's records without an id close its own
   * reservations first (see own.ts). */
  #track(check: Check): Check {
    if (check.approved && check.reservationId !== undefined) {
      this.#own.add([check.customerId, check.agentId, check.taskRef], check.reservationId, check.expiresAt)
    }
    return check
  }

  // -- runs ------------------------------------------------------------------------------------------

  /**
   * Check every rule and, only if all pass, reserve `estimatedUnits`: one atomic script call.
   * A refusal is returned (`approved` false, `reason` set), not thrown. `customerId` undefined is
   * the customer named "default".
   * Throws InvalidRequestError (nothing sent), StoreUnavailableError (nothing approved).
   */
  async preflight(options: PreflightOptions): Promise<Check> {
    const plan = core.planPreflight(this.#settings.scriptSettings, options)
    return this.#track(this.#check(await this.#run(plan)))
  }

  /** See `Check.extend`. */
  async extend(check: CheckFields, units: number): Promise<Check> {
    const plan = core.planExtend(this.#settings.scriptSettings, check, units)
    return this.#check(await this.#run(plan)).raiseForRefusal()
  }

  /**
   * Many preflights at once, each decided atomically on its own, in order, exactly as
   * `preflight` would (the batch as a whole is not atomic). A bad item throws
   * InvalidRequestError naming `requests[i].<field>` before anything is sent; if Redis refuses
   * an item (an idempotency key reused with other arguments), what the batch approved is
   * released and that item's error thrown.
   */
  async preflightMany(requests: readonly PreflightOptions[]): Promise<Check[]> {
    if (!Array.isArray(requests)) throw new InvalidRequestError('requests', 'must be an array of preflight options')
    const plans = requests.map((r, i) => core.planPreflight(this.#settings.scriptSettings, r, `requests[${i}]`))
    // Sent together on one connection (per node on a Cluster): one round trip in effect.
    const outcomes = await Promise.allSettled(plans.map((plan) => this.#send(plan.call)))
    const failed = outcomes.findIndex((o) => o.status === 'rejected')
    const checks = outcomes.map((o, i) => (o.status === 'fulfilled' ? this.#check(plans[i]!.decode(o.value)) : undefined))
    if (failed >= 0) {
      // Undo what this batch itself approved (not replays of earlier calls), the latest first:
      // a threshold crossing is taken back by the release of the approval that made it once
      // the approvals after it are released too. No caller could make these releases again:
      // those Redis cannot take now are queued (surely.ts), never left held until their TTL.
      const scriptSettings = this.#settings.scriptSettings
      await Promise.allSettled(
        checks
          .filter((c) => c?.approved && !c.replayed)
          .reverse()
          .map((c) => this.#settleSurely(core.planRelease(scriptSettings, c!.reservationId!, undefined, true), false)),
      )
      const error = (outcomes[failed] as PromiseRejectedResult).reason as unknown
      // A plain URL to a cluster node (MOVED) is the connection's fault, not the item's.
      if (error instanceof InvalidRequestError && error.field !== 'redisUrl') throw new InvalidRequestError(`requests[${failed}].${error.field}`, error.detail)
      throw error
    }
    for (const check of checks) {
      this.#notify(check)
      this.#track(check!)
    }
    return checks as Check[]
  }

  /**
   * Record the units a run actually used. With `reservationId`: close that reservation,
   * charging `units` in full and releasing the whole estimate. Without it: close an open
   * reservation of (customer, agent, taskRef), this client's own oldest first (else the
   * group's oldest, whoever made it), or charge `units` directly if none is open.
   * `success: false` releases without charging. Closing twice charges once; a record after a
   * release or an expiry is charged, `late`.
   */
  async record(options: RecordOptions): Promise<Settlement> {
    const request = core.validateRecord(options)
    let prefer: string | undefined
    if (request.reservationId === undefined) {
      prefer = this.#own.oldest([request.customerId ?? core.DEFAULT_CUSTOMER, request.agentId, request.taskRef])
    }
    const plan = core.recordPlan(this.#settings.scriptSettings, request, undefined, prefer)
    const settlement = await this.#run(plan)
    // Forgotten only once the call is made: one that threw closed nothing.
    this.#own.discard(plan.reservationId ?? prefer)
    this.#own.discard(settlement.reservationId)
    return settlement
  }

  /**
   * Close a reservation without charging: by its id (a string, or `{reservationId}`), or by the
   * `idempotencyKey` (and `customerId`) of the preflight that made it, from any process, Python
   * or Node. Status `noop` when that preflight reserved nothing; releasing twice releases once.
   */
  async release(reservation: string | ReleaseOptions): Promise<Settlement> {
    const plan = core.planRelease(this.#settings.scriptSettings, reservation)
    const settlement = await this.#run(plan)
    this.#own.discard(plan.reservationId)
    this.#own.discard(settlement.reservationId) // released by key: now its id is known
    return settlement
  }

  /**
   * `fn` gated: every call preflights first (a refusal throws the typed RunBlockedError and `fn`
   * does not run), records after `fn` resolves (`units`: a number, a function of the result, or
   * the estimate), and releases if `fn` throws or `signal` aborts (then it rejects at once with
   * the signal's reason). Bad options throw InvalidRequestError here, not at the first call.
   */
  gate<A extends unknown[], R>(options: GateOptions<Awaited<R>>, fn: (...args: A) => R): (...args: A) => Promise<Awaited<R>> {
    const o = v.options('options', options)
    v.known('', o, GATE_OPTIONS)
    const { units, signal, ...preflight } = o
    const request = core.validatePreflight(preflight)
    if (units !== undefined && typeof units !== 'function') v.units('units', units)
    if (signal !== undefined && !(signal instanceof AbortSignal)) {
      throw new InvalidRequestError('signal', 'must be an AbortSignal')
    }
    if (typeof fn !== 'function') throw new InvalidRequestError('fn', 'must be a function')
    const abort = signal as AbortSignal | undefined
    const unitsOf = (result: Awaited<R>): number => {
      if (units === undefined) return request.estimatedUnits
      const used = typeof units === 'function' ? (units as (r: Awaited<R>) => number)(result) : units
      return v.units('units', used)
    }
    const scriptSettings = this.#settings.scriptSettings
    const close = (check: Check, units: number | undefined): Promise<unknown> => {
      const rid = check.reservationId!
      const plan = units === undefined
        ? core.planRelease(scriptSettings, rid)
        : core.recordPlan(scriptSettings, {
          agentId: check.agentId, units, customerId: check.customerId, reservationId: rid,
          taskRef: check.taskRef, success: true, idempotencyKey: undefined, metadata: undefined,
        })
      return this.#settleSurely(plan, units !== undefined)
    }
    return async (...args: A): Promise<Awaited<R>> => {
      abort?.throwIfAborted()
      // Under way from the preflight to its settlement: close() waits for it.
      this.#gates += 1
      try {
        // Unadoptable and not in this client's book: only a request naming it (the gate's own
        // record or release) closes it, never a record without an id, from any client.
        const plan = core.planPreflight(scriptSettings, preflight, '', false)
        let decided: Check
        try {
          decided = this.#check(await this.#run(plan))
        } catch (exc) {
          if (exc instanceof StoreUnavailableError && !(exc instanceof StoreBusyError)) {
            // In doubt: Redis may run it yet. Its id is the client's, so its release can be
            // queued now (one that lands first is remembered: the preflight then reserves nothing).
            this.#owed.add({ plan: core.planRelease(scriptSettings, plan.reservationId!), record: false }, exc)
          }
          throw exc
        }
        const check = decided.raiseForRefusal()
        if (abort?.aborted) {
          // It fired while the preflight was under way: the body never starts.
          await releaseQuietly(close(check, undefined), check)
          throw abort.reason
        }
        let result: Awaited<R>
        try {
          // Started now, in this turn, so no abort can come between the check above and the body.
          const work = (async () => await fn(...args))()
          result = await raceAbort(work, abort)
        } catch (exc) {
          await releaseQuietly(close(check, undefined), check)
          throw exc
        }
        let used: number
        try {
          used = unitsOf(result)
        } catch (exc) {
          await close(check, request.estimatedUnits) // the work happened: charge the estimate
          throw exc
        }
        await close(check, used)
        return result
      } finally {
        this.#gates -= 1
        this.#whenIdle()
      }
    }
  }

  /** A record or release no caller could make again (a gated call's): if Redis cannot take it
   * now (busy, unreachable, silent) it is queued and delivered later, exactly once (see
   * surely.ts), instead of being thrown; a bad request still throws. Sent even while closing. */
  async #settleSurely(plan: core.Plan<Settlement>, record: boolean): Promise<Settlement | undefined> {
    try {
      return await this.#run(plan, true)
    } catch (exc) {
      // Queued when it ran nothing and may land later: Redis cannot take it now, or the library
      // is missing and this connection may not load it (it lands once an operator loads it).
      if (!(exc instanceof StoreUnavailableError || exc instanceof LibraryNotLoadedError)) throw exc
      this.#owed.add({ plan, record }, exc)
      return undefined
    }
  }

  // -- admin -------------------------------------------------------------------------------------------

  /** Set the budget of the customer, or with `agentId` of that agent (`limit` null: unlimited). */
  async setBudget(options: SetBudgetOptions): Promise<BudgetStatus> {
    return this.#run(core.planSetBudget(this.#settings.scriptSettings, options))
  }

  /** Limit the customer (or an agent) to `units` per `perSeconds`, bursts up to `burst`. */
  async setRateLimit(options: SetRateLimitOptions): Promise<BudgetStatus> {
    return this.#run(core.planSetRateLimit(this.#settings.scriptSettings, options))
  }

  /** At most `maxInFlight` open reservations for the customer (or an agent); null removes it. */
  async setConcurrencyLimit(options: SetConcurrencyLimitOptions): Promise<BudgetStatus> {
    return this.#run(core.planSetConcurrencyLimit(this.#settings.scriptSettings, options))
  }

  /** The budget of the customer (or of one agent) in its current period. */
  async getBudget(options: { customerId?: string; agentId?: string } = {}): Promise<BudgetStatus> {
    return this.#run(core.planGetBudget(this.#settings.scriptSettings, options))
  }

  /** The customer's budget and its agents', in one round trip: at most `limit` agents (100), the
   * most recently active first. */
  async getUsage(options: { customerId?: string; limit?: number } = {}): Promise<Usage> {
    return this.#run(core.planGetUsage(this.#settings.scriptSettings, options))
  }

  /** The customer's ledger, oldest first: after the event whose id is `since`, at most `limit`
   * (all by default), read in pages of 1,000 entries so that Redis is never held long. */
  async events(options: { customerId?: string; since?: string; limit?: number } = {}): Promise<Event[]> {
    const { customerId, since, limit } = core.validateEvents(options)
    const out: Event[] = []
    let after = since
    for (;;) {
      const want = limit === undefined ? core.EVENTS_PAGE : Math.min(core.EVENTS_PAGE, limit - out.length)
      const page = await this.#run(core.planEventsPage(this.#settings.scriptSettings, customerId, after, want))
      out.push(...page)
      if (page.length < want || (limit !== undefined && out.length >= limit)) return out
      after = page[page.length - 1]!.id
    }
  }

  /** Open a task of the customer with a ceiling (null: none), or change it. */
  async openTask(options: { taskRef: string; ceiling: number | null; customerId?: string }): Promise<TaskStatus> {
    return this.#run(core.planOpenTask(this.#settings.scriptSettings, options))
  }

  /** The task's ceiling, used, reserved and remaining (`exists` false if never seen). */
  async getTask(options: { taskRef: string; customerId?: string }): Promise<TaskStatus> {
    return this.#run(core.planGetTask(this.#settings.scriptSettings, options))
  }

  /**
   * Refuse new calls (StoreError), let those under way finish (gated calls included, to their
   * record or release), deliver what is queued (tried for up to 5 s; what is left is lost and
   * warned about), then close the connection this client opened (not a `redis` client passed
   * in). Calling it again returns the same promise.
   */
  close(): Promise<void> {
    this.#closing = true
    this.#closed ??= this.#close()
    return this.#closed
  }

  async #close(): Promise<void> {
    if (this.#inFlight > 0 || this.#gates > 0) await new Promise<void>((done) => this.#idle.push(done))
    if (this.#owed.size > 0) await this.#owed.drain()
    this.#owed.stop()
    this.#ended = true
    const pending = this.#redis
    this.#redis = undefined
    if (pending === undefined) return
    const redis = await pending.catch(() => undefined)
    if (redis === undefined) return
    await redis.quit().catch(() => redis.disconnect())
  }
}

/** The sockets of a Redis this client built (ioredis keeps each as `stream`; a Cluster's are
 * its nodes'), those connected. */
function socketsOf(redis: Redis | Cluster | undefined): { ref(): unknown; unref(): unknown }[] {
  const all = redis instanceof Cluster ? redis.nodes('all') : [redis]
  return all.flatMap((r) => {
    const stream = (r as { stream?: { ref?: unknown; unref?: unknown } } | undefined)?.stream
    return typeof stream?.ref === 'function' ? [stream as { ref(): unknown; unref(): unknown }] : []
  })
}

function reportCallbackError(exc: unknown): void {
  process.emitWarning(`agentbill: onThreshold threw: ${errorText(exc)}`, 'AgentBillWarning')
}

/** A gated call's release after its body failed (or an abort), never hiding the body's own
 * error: if Redis cannot take it now it is queued (surely.ts); only one Redis refuses outright
 * is warned about, and then the reservation keeps its units until it expires. */
async function releaseQuietly(release: Promise<unknown>, check: Check): Promise<void> {
  try {
    await release
  } catch (exc) {
    process.emitWarning(
      `agentbill: could not release reservation ${check.reservationId} after the run failed ` +
        `(${errorText(exc)}); its units return when it expires at ${check.expiresAt?.toISOString()}`,
      'AgentBillWarning',
    )
  }
}

function raceAbort<T>(work: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (signal === undefined) return work
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason)
    if (signal.aborted) return onAbort()
    signal.addEventListener('abort', onAbort, { once: true })
    work.then(
      (value) => {
        signal.removeEventListener('abort', onAbort)
        resolve(value)
      },
      (exc: unknown) => {
        signal.removeEventListener('abort', onAbort)
        reject(exc)
      },
    )
  })
}
