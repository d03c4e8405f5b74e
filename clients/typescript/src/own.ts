/**
 * The reservations this client made, so that a record without an id closes one of its own
 * (as the Python client's `agentbill/_own.py`).
 *
 * `record({ agentId, units, customerId })` without a reservation id closes an open reservation
 * of the same (customer, agent, taskRef). It closes one this client made, if one is still open,
 * before anything else: otherwise it would take the group's oldest, which may be another
 * worker's (Node or Python), whose own record would then find its reservation closed (the
 * scripts still charge that record, flagged `late`, so nothing is lost, but the holds move
 * between workers). The script falls back to the group's oldest, then to a direct charge, when
 * the one named here is no longer open.
 *
 * The book is per client and in memory, bounded (`LIMIT` reservations; the oldest are forgotten
 * first), and forgets a reservation once it is settled by id or past its expiry.
 */

/** Reservations remembered per client; beyond it, the oldest are forgotten (they are then
 * closed like anyone's: the group's oldest first). */
export const LIMIT = 100_000

/** (customer id, agent id, taskRef): the reservations a record without an id may close. */
export type Group = readonly [customerId: string, agentId: string, taskRef: string | undefined]

function keyOf(group: Group): string {
  return JSON.stringify([group[0], group[1], group[2] ?? null])
}

/** Open reservations this client made, oldest first per group. */
export class OwnReservations {
  /** group key -> reservation id -> when it expires (ms since the epoch), oldest first */
  readonly #groups = new Map<string, Map<string, number>>()
  /** reservation id -> its group key, oldest first (for the bound) */
  readonly #groupOf = new Map<string, string>()

  /** `limit`: reservations remembered (LIMIT; smaller in tests). */
  constructor(readonly limit = LIMIT) {}

  /** Remember reservation `rid` of `group`, open until `expiresAt`. */
  add(group: Group, rid: string, expiresAt: Date | undefined): void {
    if (this.#groupOf.has(rid)) return
    const key = keyOf(group)
    let rids = this.#groups.get(key)
    if (rids === undefined) {
      rids = new Map()
      this.#groups.set(key, rids)
    }
    rids.set(rid, expiresAt === undefined ? Number.POSITIVE_INFINITY : expiresAt.getTime())
    this.#groupOf.set(rid, key)
    while (this.#groupOf.size > this.limit) {
      const [oldest, oldestGroup] = this.#groupOf.entries().next().value as [string, string]
      this.#groupOf.delete(oldest)
      this.#forget(oldestGroup, oldest)
    }
  }

  /** The oldest reservation of `group` not past its expiry (those past it are forgotten);
   * undefined if there is none. It stays remembered until `discard`: a record that failed
   * closed nothing. */
  oldest(group: Group): string | undefined {
    const key = keyOf(group)
    const rids = this.#groups.get(key)
    if (rids === undefined) return undefined
    const now = Date.now()
    for (const [rid, deadline] of rids) {
      if (deadline > now) return rid
      rids.delete(rid)
      this.#groupOf.delete(rid)
    }
    this.#groups.delete(key)
    return undefined
  }

  /** Forget `rid`: it was settled by a request naming it. */
  discard(rid: string | undefined): void {
    if (rid === undefined) return
    const key = this.#groupOf.get(rid)
    if (key === undefined) return
    this.#groupOf.delete(rid)
    this.#forget(key, rid)
  }

  #forget(key: string, rid: string): void {
    const rids = this.#groups.get(key)
    if (rids === undefined) return
    rids.delete(rid)
    if (rids.size === 0) this.#groups.delete(key)
  }

  get size(): number {
    return this.#groupOf.size
  }
}
