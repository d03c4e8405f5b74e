/**
 * Every error agentbill throws, in one tree, with the Python client's names:
 *
 *     AgentBillError
 *     ├── RunBlockedError               a budget rule said no (a refusal, not a failure)
 *     │   ├── CeilingExceededError      estimate above the client's per-request ceiling
 *     │   ├── BudgetExhaustedError      the customer's (or agent's) budget cannot cover it
 *     │   ├── TaskCeilingExceededError  the task's ceiling cannot cover the estimate
 *     │   ├── RateLimitedError          a rate limit cannot take it now (retryAfter)
 *     │   └── ConcurrencyLimitedError   too many runs in flight
 *     ├── InvalidRequestError           bad input (`field` names it); nothing was sent
 *     └── StoreError                    Redis answered with an error we did not expect
 *         ├── AuthenticationError       Redis refused the credentials (a wrong or revoked key)
 *         ├── LibraryNotLoadedError     agentbill's Functions library is not in Redis, and this
 *         │                             connection may not load it (a tenant key): `library`
 *         └── StoreUnavailableError     Redis could not run the call now; nothing was approved
 *             └── StoreBusyError        Redis answered "not now" (BUSY, OOM, LOADING, ...): `code`;
 *                                       nothing was written, so the same call may simply be
 *                                       made again
 *
 * Failures carry the underlying ioredis error as `cause`.
 */
import type { CheckFields } from './check.js'

export class AgentBillError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = new.target.name
  }
}

/** A preflight was refused: the run must not start. `check` is the refused decision. */
export class RunBlockedError extends AgentBillError {
  readonly check: CheckFields
  readonly reason: string

  constructor(check: CheckFields) {
    super(
      `run blocked (${check.reason ?? 'refused'}): agent ${JSON.stringify(check.agentId)} asked ` +
        `${check.estimatedUnits} units for customer ${JSON.stringify(check.customerId)}; ` +
        `limit ${check.limit ?? 'none'}, remaining ${check.remaining ?? 'unlimited'}`,
    )
    this.check = check
    this.reason = check.reason ?? 'refused'
  }

  /** The limit of the rule that refused (ceiling, budget, task ceiling, rate or concurrency). */
  get limit(): number | undefined {
    return this.check.limit
  }

  /** The customer's units left (undefined when the customer has no budget). */
  get remaining(): number | undefined {
    return this.check.remaining
  }

  /** Seconds after which asking again may succeed; undefined when waiting will not help. */
  get retryAfter(): number | undefined {
    return this.check.retryAfter
  }

  /** Which scope's rule refused: request, task, customer or agent. */
  get scope(): string | undefined {
    return this.check.scope
  }
}

export class CeilingExceededError extends RunBlockedError {}

export class BudgetExhaustedError extends RunBlockedError {
  get customerId(): string {
    return this.check.customerId
  }
}

export class TaskCeilingExceededError extends RunBlockedError {
  get taskRef(): string | undefined {
    return this.check.taskRef
  }

  get ceiling(): number | undefined {
    return this.check.taskCeiling
  }

  get used(): number | undefined {
    return this.check.taskUsed
  }

  /** The task's units left under its ceiling. */
  override get remaining(): number | undefined {
    return this.check.taskRemaining
  }
}

export class RateLimitedError extends RunBlockedError {}

export class ConcurrencyLimitedError extends RunBlockedError {}

/** The request was malformed; nothing was sent. `field` names the offending option. */
export class InvalidRequestError extends AgentBillError {
  constructor(
    readonly field: string,
    readonly detail: string,
  ) {
    super(`${field}: ${detail}`)
  }
}

/** Redis answered with an error agentbill did not expect (permissions, memory, scripts). */
export class StoreError extends AgentBillError {}

/** Redis refused the credentials. Never retried; the message never holds the key. */
export class AuthenticationError extends StoreError {}

/** agentbill's Functions library (`library`, its name) is not loaded in this Redis, and this
 * connection may not load it: a tenant key's ACL user may call the functions (FCALL), never load
 * them. An operator loads it once per Redis (per primary on a Cluster), and after each agentbill
 * upgrade. Never retried. */
export class LibraryNotLoadedError extends StoreError {
  /** `refused`: Redis's answer to this client's FUNCTION LOAD (a NOPERM). */
  constructor(
    readonly library: string,
    refused: string,
    options?: ErrorOptions,
  ) {
    super(
      `agentbill's Functions library ${library} is not loaded in this Redis, and this connection ` +
        `may not load it (${refused}): an operator loads it with \`agentbill keys load-library\` ` +
        `(the Python CLI) or KeyAdmin.load_library()`,
      options,
    )
  }
}

/** Redis could not be reached, or did not answer within the timeouts, or (the subclass
 * StoreBusyError) answered "not now": nothing was approved. */
export class StoreUnavailableError extends StoreError {}

/** Redis answered that it cannot run the call now; `code` is its error code (`BUSY`: a script is
 * running; `OOM`: maxmemory reached; `LOADING`, `MASTERDOWN`, `READONLY`, `TRYAGAIN`,
 * `CLUSTERDOWN`, `NOREPLICAS`, `MISCONF`). Nothing was written: the same call may be made again. */
export class StoreBusyError extends StoreUnavailableError {
  constructor(
    message: string,
    readonly code: string,
    options?: ErrorOptions,
  ) {
    super(message, options)
  }
}

const REFUSALS: Readonly<Record<string, new (check: CheckFields) => RunBlockedError>> = {
  ceiling_exceeded: CeilingExceededError,
  budget_exhausted: BudgetExhaustedError,
  task_ceiling_exceeded: TaskCeilingExceededError,
  rate_limited: RateLimitedError,
  concurrency_limited: ConcurrencyLimitedError,
}

/** The RunBlockedError subclass for a refused check. */
export function refusal(check: CheckFields): RunBlockedError {
  const cls = REFUSALS[check.reason ?? ''] ?? RunBlockedError
  return new cls(check)
}
