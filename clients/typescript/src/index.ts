/**
 * agentbill for TypeScript: pre-flight budget enforcement for AI agent runs, on the same atomic
 * Lua scripts, keys and budgets in a shared Redis as the Python package.
 *
 *     import { AgentBillClient } from 'agentbill'
 *     const client = new AgentBillClient({ apiKey: 'agb_your_key', ceiling: 50 })
 *     const check = await client.preflight({ agentId: 'my_agent', estimatedUnits: 10 })
 */
export { AgentBillClient, ENV_REDIS_URL } from './client.js'
export type { ClientOptions, GateOptions } from './client.js'
export type {
  PreflightOptions,
  RecordOptions,
  ReleaseOptions,
  SetBudgetOptions,
  SetConcurrencyLimitOptions,
  SetRateLimitOptions,
} from './core.js'
export {
  AgentBillError,
  AuthenticationError,
  BudgetExhaustedError,
  CeilingExceededError,
  ConcurrencyLimitedError,
  InvalidRequestError,
  LibraryNotLoadedError,
  RateLimitedError,
  RunBlockedError,
  StoreBusyError,
  StoreError,
  StoreUnavailableError,
  TaskCeilingExceededError,
} from './errors.js'
export type { CheckFields, Reason, Scope, ThresholdCrossing } from './check.js'
export { Check } from './results.js'
export type {
  BudgetStatus,
  Event,
  EventType,
  Period,
  RateLimit,
  RecordExtras,
  Settlement,
  SettleStatus,
  TaskStatus,
  Usage,
} from './results.js'
export { HOME_ENV, dataDir, socketPath } from './local.js'
