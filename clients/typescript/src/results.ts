/** Small frozen results: what each operation returns (the Python client's, in camelCase). */
import type { CheckFields, Reason, Scope, ThresholdCrossing } from './check.js'
import { InvalidRequestError, refusal } from './errors.js'

export type Period = 'hour' | 'day' | 'week' | 'month'
export type EventType = 'approved' | 'refused' | 'recorded' | 'released' | 'expired' | 'threshold'
export type SettleStatus = 'recorded' | 'released' | 'late' | 'expired' | 'direct' | 'noop'

/** What a Check calls on its client (AgentBillClient): results.ts sits below the client, so it
 * names the methods it needs instead of importing the class. */
export interface CheckClient {
  record(options: {
    agentId: string
    units: number
    customerId?: string
    reservationId?: string
    taskRef?: string
    success?: boolean
    idempotencyKey?: string
    metadata?: Record<string, unknown>
  }): Promise<Settlement>
  release(reservationId: string): Promise<Settlement>
  extend(check: CheckFields, units: number): Promise<Check>
}

export interface RecordExtras {
  readonly success?: boolean
  readonly idempotencyKey?: string
  readonly metadata?: Record<string, unknown>
}

/**
 * A preflight's decision. A refusal is returned, not thrown: test `approved`, or call
 * `raiseForRefusal()`. When approved, the estimate is held until recorded, released or expired.
 */
export class Check implements CheckFields {
  readonly approved!: boolean
  readonly reason!: Reason | undefined
  readonly reservationId!: string | undefined
  readonly expiresAt!: Date | undefined
  readonly remaining!: number | undefined
  readonly limit!: number | undefined
  readonly agentId!: string
  readonly customerId!: string
  readonly estimatedUnits!: number
  readonly taskRef!: string | undefined
  readonly taskCeiling!: number | undefined
  readonly taskUsed!: number | undefined
  readonly taskRemaining!: number | undefined
  readonly replayed!: boolean
  readonly scope!: Scope | undefined
  readonly used!: number | undefined
  readonly reserved!: number | undefined
  readonly retryAfter!: number | undefined
  readonly periodEnd!: Date | undefined
  readonly crossed!: readonly ThresholdCrossing[]
  readonly #client: CheckClient

  constructor(fields: CheckFields, client: CheckClient) {
    Object.assign(this, fields)
    this.#client = client
    Object.freeze(this)
  }

  /** Close this reservation, charging `units` in full and releasing the estimate. */
  async record(units: number, extras: RecordExtras = {}): Promise<Settlement> {
    const rid = this.#reservation()
    return await this.#client.record({
      ...extras,
      agentId: this.agentId,
      units,
      customerId: this.customerId,
      reservationId: rid,
      ...(this.taskRef === undefined ? {} : { taskRef: this.taskRef }),
    })
  }

  /** Close this reservation without charging anything. */
  async release(): Promise<Settlement> {
    return await this.#client.release(this.#reservation())
  }

  /**
   * Reserve `units` more on this reservation, atomically, under every rule a preflight checks
   * (concurrency aside); the extra is settled with the rest. Returns the reservation's check,
   * `estimatedUnits` its new total; throws the typed RunBlockedError on refusal (nothing
   * changed), InvalidRequestError (`units`; `reservationId` when it is not open any more).
   */
  async extend(units: number): Promise<Check> {
    return await this.#client.extend(this.fields(), units)
  }

  /** This check when approved; else throws the RunBlockedError subclass for `reason`. */
  raiseForRefusal(): this {
    if (this.approved) return this
    throw refusal(this.fields())
  }

  /** The decision as plain data. */
  fields(): CheckFields {
    return { ...this }
  }

  #reservation(): string {
    if (this.reservationId === undefined) {
      // A refused check holds nothing: an InvalidRequestError, as in Python.
      throw refusalToSettle(this.reason)
    }
    return this.reservationId
  }
}

function refusalToSettle(reason: Reason | undefined): InvalidRequestError {
  return new InvalidRequestError(
    'reservationId',
    `this check was refused (${reason ?? 'refused'}); it holds nothing`,
  )
}

/** The outcome of `record` or `release`. */
export interface Settlement {
  readonly status: SettleStatus
  readonly reservationId: string | undefined
  /** Units charged by the close this describes (for a replay: by the first close). */
  readonly charged: number
  /** Reserved units given back by this call. */
  readonly released: number
  readonly late: boolean
  /** True when nothing changed: the reservation was already closed (or the key used). */
  readonly replayed: boolean
  readonly spent: number
  readonly reserved: number
  readonly limit: number | undefined
  readonly remaining: number | undefined
  readonly metadata: Record<string, unknown> | undefined
  readonly crossed: readonly ThresholdCrossing[]
}

export interface RateLimit {
  readonly units: number
  readonly perSeconds: number
  readonly burst: number
}

/** The budget of a customer, or of one of its agents, in its current period. */
export interface BudgetStatus {
  readonly customerId: string
  readonly agentId: string | undefined
  /** undefined: unlimited (then `remaining` is undefined too). */
  readonly limit: number | undefined
  readonly spent: number
  readonly reserved: number
  readonly remaining: number | undefined
  readonly openReservations: number
  /** undefined: a lifetime budget. */
  readonly period: Period | undefined
  readonly periodStart: Date | undefined
  readonly periodEnd: Date | undefined
  /** Seconds until the period ends (Redis clock). */
  readonly resetsIn: number | undefined
  readonly thresholds: readonly number[]
  readonly rateLimit: RateLimit | undefined
  readonly maxInFlight: number | undefined
}

export interface Usage {
  readonly customer: BudgetStatus
  readonly agents: readonly BudgetStatus[]
}

/** One ledger entry. */
export interface Event {
  /** The stream id: pass it as `since` to read on from here. */
  readonly id: string
  readonly type: EventType
  readonly time: Date
  readonly customerId: string
  readonly agentId: string | undefined
  readonly taskRef: string | undefined
  /** Asked (approved, refused), charged (recorded), committed units (threshold). */
  readonly units: number
  /** Reserved units given back (recorded, released, expired). */
  readonly released: number
  readonly reservationId: string | undefined
  readonly reason: string | undefined
  readonly scope: string | undefined
  readonly period: string | undefined
}

export interface TaskStatus {
  readonly taskRef: string
  readonly customerId: string
  /** undefined: attribution only (no ceiling). */
  readonly ceiling: number | undefined
  readonly used: number
  readonly reserved: number
  readonly remaining: number | undefined
  readonly exists: boolean
}
