/**
 * Settlements no caller can make again, delivered surely (as the Python client's
 * `_settle_surely`): a gated call's record after its body returned, or its release after the
 * body failed. When Redis cannot take one now (busy, unreachable or silent) it is queued here,
 * with a warning, instead of being thrown and lost, and sent again with a backoff (0.05 s
 * doubling to 2 s) until it lands, oldest first. Each keeps its plan, so its request id: one
 * that did land before its reply was lost is not charged again.
 *
 * One waiting for agentbill's library (LibraryNotLoadedError: an operator loads it) stays
 * queued too. One that Redis refuses for good (a bad request) is dropped with a warning; a
 * dropped record naming a reservation has that reservation released (queued like any release),
 * so its units come back instead of staying held until its TTL.
 *
 * The queue is in the process's memory. Its timer never keeps a process alive; what is queued
 * when the process runs out of work (Node's `beforeExit`), or when `close()` is called, gets a
 * last delivery, tried for up to LAST_DELIVERY_MS. A process killed, or ended by
 * `process.exit()`, loses what is queued (the reservations then expire uncharged).
 */
import { LibraryNotLoadedError, StoreUnavailableError } from './errors.js'
import type { Plan } from './core.js'
import type { Settlement } from './results.js'

export const FIRST_WAIT_MS = 50
export const MAX_WAIT_MS = 2000
/** How long a last delivery (close(), the end of the process) keeps trying. */
export const LAST_DELIVERY_MS = 5000

export interface Owed {
  readonly plan: Plan<Settlement>
  /** A record (else a release) of `plan.reservationId`. */
  readonly record: boolean
}

function text(exc: unknown): string {
  return exc instanceof Error ? exc.message : String(exc)
}

function warn(message: string): void {
  process.emitWarning(`agentbill: ${message}`, 'AgentBillWarning')
}

function sleep(ms: number): Promise<void> {
  return new Promise((done) => setTimeout(done, ms))
}

/** The queues with something owed: one `beforeExit` listener for them all (a listener per
 * client would pass Node's limit of 10 with more clients). */
const owing = new Set<SettleQueue>()
let listening = false

function lastDeliveries(): void {
  const queues = [...owing]
  owing.clear()
  for (const queue of queues) void queue.drain() // once: the process then ends, whatever is left
}

export class SettleQueue {
  readonly #items: Owed[] = []
  #timer: NodeJS.Timeout | undefined
  #wait = FIRST_WAIT_MS
  #pass: Promise<void> | undefined

  /** `send`: one call of a plan, through the client's retries (throws the client's errors);
   * `release`: the plan of a release of a reservation, by its id. */
  constructor(
    readonly send: (plan: Plan<Settlement>) => Promise<Settlement>,
    readonly release: (reservationId: string) => Plan<Settlement>,
  ) {}

  get size(): number {
    return this.#items.length
  }

  /** Queue `owed`, which Redis could not take (`exc`), and schedule its delivery. */
  add(owed: Owed, exc: unknown): void {
    warn(
      `the ${owed.record ? 'record' : 'release'} of reservation ${owed.plan.reservationId} is queued: ` +
        `Redis cannot take it now (${text(exc)}); it is sent again until it lands, once`,
    )
    this.#items.push(owed)
    owing.add(this)
    if (!listening) {
      listening = true
      process.on('beforeExit', lastDeliveries)
    }
    this.#schedule()
  }

  #schedule(): void {
    if (this.#timer !== undefined || this.#items.length === 0) return
    this.#timer = setTimeout(() => {
      this.#timer = undefined
      void this.deliver().then(() => this.#schedule())
    }, this.#wait)
    this.#timer.unref() // never keeps the process alive: beforeExit delivers what is left
    this.#wait = Math.min(this.#wait * 2, MAX_WAIT_MS)
  }

  /** One pass over the queue, oldest first, until Redis cannot take one (one pass at a time). */
  deliver(): Promise<void> {
    this.#pass ??= this.#deliver().finally(() => (this.#pass = undefined))
    return this.#pass
  }

  async #deliver(): Promise<void> {
    while (this.#items.length > 0) {
      const owed = this.#items[0]!
      try {
        await this.send(owed.plan)
      } catch (exc) {
        // Not now: kept, in order. So too while the library is missing and this connection may
        // not load it (a tenant key): nothing ran, and it lands once an operator loads it.
        if (exc instanceof StoreUnavailableError || exc instanceof LibraryNotLoadedError) return
        this.#items.shift()
        warn(`the queued ${owed.record ? 'record' : 'release'} of reservation ${owed.plan.reservationId} was refused by Redis and dropped: ${text(exc)}`)
        if (owed.record && owed.plan.reservationId !== undefined) {
          this.#items.push({ plan: this.release(owed.plan.reservationId), record: false })
        }
        continue
      }
      this.#items.shift()
      this.#wait = FIRST_WAIT_MS
    }
    this.#unhook()
  }

  /** Deliver everything, trying with the backoff for up to `ms`; how many are left (warned:
   * they are lost with this process). */
  async drain(ms = LAST_DELIVERY_MS): Promise<number> {
    const deadline = performance.now() + ms
    let wait = FIRST_WAIT_MS
    for (;;) {
      await this.deliver()
      if (this.#items.length === 0) return 0
      const left = deadline - performance.now()
      if (left <= 0) break
      await sleep(Math.min(wait, left))
      wait = Math.min(wait * 2, MAX_WAIT_MS)
    }
    warn(
      `${this.#items.length} queued settlement(s) could not be delivered and are lost with this ` +
        `process (reservations ${this.#items.map((o) => o.plan.reservationId).join(', ')}); ` +
        'their units return when they expire, uncharged',
    )
    return this.#items.length
  }

  /** Stop: no timer, no exit hook (after close()'s last delivery). */
  stop(): void {
    clearTimeout(this.#timer)
    this.#timer = undefined
    this.#unhook()
  }

  #unhook(): void {
    owing.delete(this)
  }
}
