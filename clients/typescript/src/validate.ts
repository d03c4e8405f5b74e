/**
 * Input validation, once, before anything is sent: the rules of agentbill/_models.py (pinned by
 * tests/vectors/validation.json). A bad value throws InvalidRequestError naming its option.
 */
import { InvalidRequestError } from './errors.js'

/** Lua numbers are doubles: integers are exact up to 2**53 - 1. */
export const MAX_UNITS = Number.MAX_SAFE_INTEGER
export const MAX_ID_LENGTH = 256
export const MAX_TTL_SECONDS = 2 ** 31 - 1
export const MAX_METADATA_BYTES = 4096

// Characters an id may not hold: control characters (Cc: the scripts' field separator among
// them), line and paragraph separators (Zl, Zp). Unpaired surrogates (Cs) are refused apart.
const FORBIDDEN = /[\p{Cc}\p{Zl}\p{Zp}]/u
// A character that shows something: not a space (Zs), a format character (Cf) or a combining
// mark (Mn, Me). An id made only of those (" ", "\u200b") names nothing a person could read back.
const VISIBLE = /[^\p{Zs}\p{Cf}\p{Mn}\p{Me}]/u

function typeName(value: unknown): string {
  if (value === null) return 'null'
  if (Array.isArray(value)) return 'array'
  return typeof value
}

/** Any id: a string of 1 to 256 characters (code points), at least one of them visible, with no
 * control or line-separator character. */
export function id(field: string, value: unknown): string {
  if (typeof value !== 'string') {
    throw new InvalidRequestError(field, `must be a string, not ${typeName(value)}`)
  }
  if (value.length === 0) throw new InvalidRequestError(field, 'must not be empty')
  // Unpaired surrogates have no UTF-8 form: the Python client could not hash such an id.
  if (!value.isWellFormed()) {
    throw new InvalidRequestError(field, 'must be well-formed Unicode (no unpaired surrogate)')
  }
  let length = 0
  for (const _ of value) length += 1
  if (length > MAX_ID_LENGTH) {
    throw new InvalidRequestError(field, `must be at most ${MAX_ID_LENGTH} characters`)
  }
  const forbidden = FORBIDDEN.exec(value)
  if (forbidden !== null) {
    const code = forbidden[0].codePointAt(0)!.toString(16).padStart(4, '0')
    throw new InvalidRequestError(field, `must not contain control or line-separator characters (found U+${code})`)
  }
  if (!VISIBLE.test(value)) throw new InvalidRequestError(field, 'must contain a visible character')
  return value
}

export function optionalId(field: string, value: unknown): string | undefined {
  return value === undefined || value === null ? undefined : id(field, value)
}

/** An integer number from `min` to `max`: not a bool, a string, a bigint, NaN or a fraction. */
export function integer(field: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number') {
    throw new InvalidRequestError(field, `must be an integer, not ${typeName(value)}`)
  }
  if (!Number.isInteger(value)) throw new InvalidRequestError(field, 'must be an integer')
  if (value < min) throw new InvalidRequestError(field, `must be at least ${min}`)
  if (value > max) throw new InvalidRequestError(field, `must be at most ${max}`)
  return value === 0 ? 0 : value // -0, which Python has no int for, is 0
}

/** Units: an integer from 0 to 2**53 - 1. */
export function units(field: string, value: unknown): number {
  return integer(field, value, 0, MAX_UNITS)
}

export function optionalUnits(field: string, value: unknown): number | undefined {
  return value === undefined || value === null ? undefined : units(field, value)
}

/** A TTL in whole seconds, at least 1. */
export function seconds(field: string, value: unknown): number {
  return integer(field, value, 1, MAX_TTL_SECONDS)
}

export function optionalSeconds(field: string, value: unknown): number | undefined {
  return value === undefined || value === null ? undefined : seconds(field, value)
}

/** A timeout in seconds: a finite number above 0, at most 300. */
export function timeout(field: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw new InvalidRequestError(field, 'must be a finite number of seconds')
  }
  if (value <= 0 || value > 300) throw new InvalidRequestError(field, 'must be in (0, 300] seconds')
  return value
}

export function boolean(field: string, value: unknown): boolean {
  if (typeof value !== 'boolean') {
    throw new InvalidRequestError(field, `must be a boolean, not ${typeName(value)}`)
  }
  return value
}

export function oneOf<T extends string>(field: string, value: unknown, choices: readonly T[]): T {
  if (typeof value !== 'string' || !(choices as readonly string[]).includes(value)) {
    throw new InvalidRequestError(field, `must be one of ${choices.join(', ')}`)
  }
  return value as T
}

/** A JSON object of at most 4 KiB (not stored: returned on the Settlement). */
export function metadata(field: string, value: unknown): Record<string, unknown> | undefined {
  if (value === undefined || value === null) return undefined
  if (typeof value !== 'object' || Array.isArray(value)) {
    throw new InvalidRequestError(field, 'must be a plain object')
  }
  let encoded: string
  try {
    encoded = JSON.stringify(value, (_key, v: unknown) => {
      if (typeof v === 'number' && !Number.isFinite(v)) throw new Error('NaN or infinity')
      if (typeof v === 'bigint' || typeof v === 'function' || typeof v === 'symbol') {
        throw new Error(`a ${typeof v}`)
      }
      return v
    })
  } catch (exc) {
    throw new InvalidRequestError(field, `must be JSON-serialisable (${(exc as Error).message})`)
  }
  if (Buffer.byteLength(encoded) > MAX_METADATA_BYTES) {
    throw new InvalidRequestError(field, `must encode to at most ${MAX_METADATA_BYTES} bytes of JSON`)
  }
  return value as Record<string, unknown>
}

/** An options argument: an object (or undefined, for all defaults). */
export function options(field: string, value: unknown): Record<string, unknown> {
  if (value === undefined) return {}
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new InvalidRequestError(field, 'must be an object of options')
  }
  return value as Record<string, unknown>
}

/** Refuse option names the call does not take (a typo would otherwise be ignored silently). */
export function known(field: string, value: Record<string, unknown>, names: readonly string[]): void {
  for (const name of Object.keys(value)) {
    if (!names.includes(name) && value[name] !== undefined) {
      throw new InvalidRequestError(field === '' ? name : `${field}.${name}`, 'is not an option of this call')
    }
  }
}
