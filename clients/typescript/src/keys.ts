/**
 * The only place that builds Redis key names, by the same rules as agentbill/_keys.py (pinned by
 * tests/vectors/keys.json, which both suites check).
 *
 * Every key of one customer carries the hash tag `{<tag>}`, a 96-bit BLAKE2b digest of the
 * customer id, so a script touching all of them runs on one Redis Cluster slot; ids may hold any
 * printable character (`{`, `}`, `:`), and a reservation id must carry the tag in 256 characters.
 */
import { blake2b } from '@noble/hashes/blake2'
import { contract } from './contract.js'

export const RESERVATION_PREFIX = 'rsv'
const encoder = new TextEncoder()
const ZERO = new Uint8Array([0])

function hex(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString('hex')
}

// On the hot path of every call, for the same few ids over and over: cached (bounded).
const CACHE_SIZE = 65536
function cached<A extends string, R>(fn: (key: A) => R): (key: A) => R {
  const cache = new Map<A, R>()
  return (key: A): R => {
    let value = cache.get(key)
    if (value === undefined) {
      value = fn(key)
      if (cache.size >= CACHE_SIZE) cache.clear()
      cache.set(key, value)
    }
    return value
  }
}

/** The hash tag shared by every key of `customerId` (96-bit BLAKE2b, hex). */
export const customerTag = cached((customerId: string): string =>
  hex(blake2b(encoder.encode(customerId), { dkLen: 12 })),
)

/** A short fixed-length name for a tuple of ids (task refs, agent groups): each part + NUL. */
export function digest(...parts: string[]): string {
  // (agent, taskRef) groups repeat as agent ids do: cached. An id holds no NUL, so the joined
  // key names one pair.
  if (parts.length === 2) return cachedPair(`${parts[0]}\u0000${parts[1]}`)
  return computeDigest(parts)
}

function computeDigest(parts: readonly string[]): string {
  const h = blake2b.create({ dkLen: 12 })
  for (const part of parts) {
    h.update(encoder.encode(part))
    h.update(ZERO)
  }
  return hex(h.digest())
}

const cachedPair = cached((pair: string) => computeDigest(pair.split('\u0000')))
const cachedDigest1 = cached((part: string) => computeDigest([part]))
/** digest(part), cached: agent ids and task refs repeat. */
export function digestOf(part: string): string {
  return cachedDigest1(part)
}

const SAFE = /^[A-Za-z0-9_.~-]*$/

/** Python's `urllib.parse.quote(value, safe='')`: UTF-8, every byte but A-Za-z0-9_.-~ as %XX. */
export function quote(value: string): string {
  if (SAFE.test(value)) return value // ids and tokens mostly are: nothing to escape
  let out = ''
  for (const byte of encoder.encode(value)) {
    const ch = String.fromCharCode(byte)
    out += /[A-Za-z0-9_.~-]/.test(ch) ? ch : `%${byte.toString(16).toUpperCase().padStart(2, '0')}`
  }
  return out
}

/** `namespace` made safe for key names and ACL key patterns (no `{}*?[]:`). */
export function namespacePrefix(namespace: string): string {
  return quote(namespace)
}

/** The fixed keys of one customer by their contract names, and its per-request keys. */
export class CustomerKeys {
  readonly fixed: Readonly<Record<string, string>>

  constructor(
    readonly prefix: string,
    readonly tag: string,
  ) {
    this.fixed = Object.fromEntries(
      contract.customer_keys.map((k) => [k.name, `${prefix}:${k.name}`]),
    )
  }

  /** The key remembering a user's idempotency key for one operation. */
  idempotency(operation: string, key: string): string {
    return `${this.prefix}:idem:${operation}:${quote(key)}`
  }

  /** The estimate statistics of one agent of this customer (settle.lua keeps them), or of its
   * calls to one model (the Python LLM wrapper's). */
  stats(agentId: string, model?: string): string {
    const d = model === undefined ? digestOf(agentId) : digest(agentId, 'model', model)
    return `${this.prefix}:stats:${d}`
  }

  /** The key remembering one internal request id (the client's own retries). */
  request(token: string): string {
    return `${this.prefix}:req:${token}`
  }
}

/** Key names for one namespace. */
export class KeySpace {
  readonly prefix: string
  readonly #byTag = new Map<string, CustomerKeys>()

  constructor(readonly namespace: string) {
    this.prefix = namespacePrefix(namespace)
  }

  customer(customerId: string): CustomerKeys {
    return this.byTag(customerTag(customerId))
  }

  byTag(tag: string): CustomerKeys {
    let keys = this.#byTag.get(tag)
    if (keys === undefined) {
      keys = new CustomerKeys(`${this.prefix}:{${tag}}`, tag)
      if (this.#byTag.size >= CACHE_SIZE) this.#byTag.clear()
      this.#byTag.set(tag, keys)
    }
    return keys
  }
}

/** An opaque reservation id that carries its customer's tag: `rsv.<tag>.<token>`. */
export function reservationId(tag: string, token: string): string {
  return `${RESERVATION_PREFIX}.${tag}.${token}`
}

/** The customer tag inside a reservation id, or undefined if the id is not one of ours. */
export function tagOfReservation(id: string): string | undefined {
  const parts = id.split('.')
  if (parts.length !== 3 || parts[0] !== RESERVATION_PREFIX) return undefined
  const tag = parts[1]!
  return /^[0-9a-f]{24}$/.test(tag) ? tag : undefined
}
