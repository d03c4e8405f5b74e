/**
 * A preflight's decision as plain data: the ground floor under the errors and the results, as
 * agentbill/_check.py is in Python. It imports nothing of agentbill.
 *
 * A RunBlockedError carries a check's fields (errors.ts), and a Check throws those errors
 * (results.ts): with the fields here, both import this floor and errors.ts needs nothing of
 * results.ts, so there is no import circle (test/layers.test.ts checks the whole of src/).
 */

export type Reason =
  | 'ceiling_exceeded'
  | 'task_ceiling_exceeded'
  | 'budget_exhausted'
  | 'rate_limited'
  | 'concurrency_limited'
export type Scope = 'request' | 'task' | 'customer' | 'agent'

/** A soft threshold crossed (once per period): committed units reached `percent` of the limit. */
export interface ThresholdCrossing {
  readonly customerId: string
  /** undefined for the customer's own budget; else the agent whose budget it is. */
  readonly agentId: string | undefined
  readonly percent: number
  readonly committed: number
}

/** The decision of one preflight, as data (what a RunBlockedError carries). */
export interface CheckFields {
  readonly approved: boolean
  /** undefined when approved; else which rule refused. */
  readonly reason: Reason | undefined
  readonly reservationId: string | undefined
  /** When an unsettled reservation gives its units back (Redis clock). */
  readonly expiresAt: Date | undefined
  /** The customer's units left after this reservation; undefined when unlimited. */
  readonly remaining: number | undefined
  /** The limit of the rule that refused; when approved, the customer's budget limit. */
  readonly limit: number | undefined
  readonly agentId: string
  readonly customerId: string
  readonly estimatedUnits: number
  readonly taskRef: string | undefined
  readonly taskCeiling: number | undefined
  readonly taskUsed: number | undefined
  readonly taskRemaining: number | undefined
  /** True when this is the remembered answer to an earlier identical request. */
  readonly replayed: boolean
  /** Which scope's rule refused: request (the ceiling), task, customer or agent. */
  readonly scope: Scope | undefined
  /** On a refusal: what the refusing rule counts as used. */
  readonly used: number | undefined
  /** On a refusal: the units the refusing rule's scope holds in open reservations. */
  readonly reserved: number | undefined
  /** On a rate_limited refusal: seconds until the same ask would pass (undefined: never). */
  readonly retryAfter: number | undefined
  /** When the customer's current budget period ends (undefined for a lifetime budget). */
  readonly periodEnd: Date | undefined
  readonly crossed: readonly ThresholdCrossing[]
}
