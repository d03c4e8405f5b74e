/**
 * Tenant keys, as agentbill/_tenants.py reads them: `agb_<namespace prefix>.<key id>.<secret>`
 * is a Redis ACL user `agentbill:<prefix>:<key id>` whose password is the secret, confined to
 * the namespace's keys. Keys are made by `python -m agentbill keys create <namespace>`.
 *
 * An apiKey starting with `agb_` and holding a `.` claims to be a key and must be well formed;
 * any other string (`'agb_your_key'`, say) is a label: accepted, never sent anywhere. No message
 * here ever holds the key.
 */
import { InvalidRequestError } from './errors.js'
import { namespacePrefix } from './keys.js'
import { id } from './validate.js'

export const KEY_PREFIX = 'agb_'
export const USER_PREFIX = 'agentbill:'

const API_KEY = /^agb_([A-Za-z0-9_.~%-]+)\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$/
const MALFORMED =
  'is not a well-formed agentbill key: expected agb_<namespace>.<key id>.<secret>, as printed ' +
  'by `python -m agentbill keys create` (check for missing or extra characters)'

export interface TenantKey {
  readonly namespace: string
  readonly keyId: string
  readonly username: string
  readonly secret: string
}

/** Whether `apiKey` claims to be an agentbill key (then it must parse). */
export function isKey(apiKey: string): boolean {
  return apiKey.trimStart().startsWith(KEY_PREFIX) && apiKey.includes('.')
}

/** The key in `apiKey`; undefined for a label. InvalidRequestError(apiKey) when malformed. */
export function parseApiKey(apiKey: string): TenantKey | undefined {
  if (!isKey(apiKey)) return undefined
  const m = API_KEY.exec(apiKey)
  if (m === null) throw new InvalidRequestError('apiKey', MALFORMED)
  const prefix = m[1]!
  let namespace: string
  try {
    namespace = decodeURIComponent(prefix)
  } catch {
    throw new InvalidRequestError('apiKey', MALFORMED)
  }
  if (namespacePrefix(namespace) !== prefix) throw new InvalidRequestError('apiKey', MALFORMED)
  try {
    id('namespace', namespace)
  } catch {
    throw new InvalidRequestError('apiKey', MALFORMED)
  }
  return {
    namespace,
    keyId: m[2]!,
    username: `${USER_PREFIX}${prefix}:${m[2]!}`,
    secret: m[3]!,
  }
}
