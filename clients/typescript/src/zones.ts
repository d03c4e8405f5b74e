/**
 * Time zones for calendar periods, as a table a Lua script can read: the algorithm of
 * agentbill/_zones.py (pinned by tests/vectors/zones.json), with Node's IANA data (Intl).
 *
 * `"<utc_ms>:<offset_ms>,..."` ascending, each offset holding from its instant until the next,
 * from a year ago to YEARS_AHEAD years ahead; '' for a zone that is always UTC.
 */
import { InvalidRequestError } from './errors.js'

export const YEARS_AHEAD = 20
const BEFORE = -Number.MAX_SAFE_INTEGER // "since always": the first offset of the table
const DAY = 86400

const formatters = new Map<string, Intl.DateTimeFormat>()

function formatter(tz: string): Intl.DateTimeFormat {
  let f = formatters.get(tz)
  if (f === undefined) {
    f = new Intl.DateTimeFormat('en-US', { timeZone: tz, timeZoneName: 'longOffset' })
    formatters.set(tz, f)
  }
  return f
}

/** The IANA name `tz`, or InvalidRequestError naming `field`. */
export function timeZone(field: string, tz: unknown): string {
  if (typeof tz !== 'string' || tz.length === 0 || tz.length > 64) {
    throw new InvalidRequestError(field, 'must be an IANA time zone name (such as "UTC")')
  }
  try {
    formatter(tz)
  } catch {
    throw new InvalidRequestError(
      field,
      "is not an IANA time zone name (such as 'UTC' or 'Europe/Berlin')",
    )
  }
  return tz
}

function offsetMs(tz: string, seconds: number): number {
  const part = formatter(tz)
    .formatToParts(new Date(seconds * 1000))
    .find((p) => p.type === 'timeZoneName')
  const m = /^GMT(?:([+-])(\d{1,2})(?::(\d{2}))?(?::(\d{2}))?)?$/.exec(part?.value ?? '')
  if (m === null) throw new Error(`unexpected offset ${part?.value} for ${tz}`)
  if (m[1] === undefined) return 0
  const sign = m[1] === '-' ? -1 : 1
  return sign * ((Number(m[2]) * 3600 + Number(m[3] ?? 0) * 60 + Number(m[4] ?? 0)) * 1000)
}

/** The UTC offsets of `tz` from a year ago to YEARS_AHEAD years ahead ('' for UTC). */
export function zoneTable(tz: string, today: Date = new Date()): string {
  const midnight = Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate())
  const start = midnight / 1000 - 366 * DAY
  const end = start + (YEARS_AHEAD + 1) * 366 * DAY
  const first = offsetMs(tz, start)
  const entries: [number, number][] = [[BEFORE, first]]
  let t = start
  let current = first
  while (t < end) {
    const step = Math.min(t + DAY, end) // transitions are never a day apart
    const offset = offsetMs(tz, step)
    if (offset !== current) {
      let lo = t // the offset changes in (lo, hi]: find the first second of it
      let hi = step
      while (hi - lo > 1) {
        const mid = Math.floor((lo + hi) / 2)
        if (offsetMs(tz, mid) === current) lo = mid
        else hi = mid
      }
      entries.push([hi * 1000, offset])
      current = offset
    }
    t = step
  }
  if (entries.length === 1 && first === 0) return ''
  return entries.map(([at, offset]) => `${at}:${offset}`).join(',')
}
