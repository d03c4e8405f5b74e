/** The book of this client's own reservations (own.ts), without a server: what a record without
 * an id asks the script to close first. */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { OwnReservations } from '../src/own.js'

const later = new Date(Date.now() + 3_600_000)

test('oldest first per (customer, agent, taskRef), remembered until discarded', () => {
  const own = new OwnReservations()
  own.add(['u', 'a', undefined], 'r1', later)
  own.add(['u', 'a', 't'], 'r2', later) // another group: another task
  own.add(['u', 'a', undefined], 'r3', later)
  own.add(['v', 'a', undefined], 'r4', later) // another customer
  own.add(['u', 'a', undefined], 'r1', later) // already known: stays the oldest
  assert.equal(own.oldest(['u', 'a', undefined]), 'r1')
  assert.equal(own.oldest(['u', 'a', undefined]), 'r1') // a record that failed closed nothing
  own.discard('r1')
  assert.equal(own.oldest(['u', 'a', undefined]), 'r3')
  own.discard('r3')
  assert.equal(own.oldest(['u', 'a', undefined]), undefined)
  assert.equal(own.oldest(['u', 'a', 't']), 'r2')
  assert.equal(own.size, 2)
})

test('a reservation settled by id or past its expiry is forgotten', () => {
  const own = new OwnReservations()
  own.add(['u', 'a', undefined], 'expired', new Date(Date.now() - 1))
  own.add(['u', 'a', undefined], 'recorded', later)
  own.add(['u', 'a', undefined], 'open', later)
  own.discard('recorded')
  own.discard('never-seen')
  own.discard(undefined)
  assert.equal(own.oldest(['u', 'a', undefined]), 'open')
  assert.equal(own.size, 1) // the expired one is forgotten on the way
})

test('bounded: beyond the limit the oldest are forgotten, whatever their group', () => {
  const own = new OwnReservations(3)
  for (const [i, agent] of ['a', 'b', 'a', 'b', 'a'].entries()) own.add(['u', agent, undefined], `r${i}`, undefined)
  assert.equal(own.size, 3)
  assert.equal(own.oldest(['u', 'a', undefined]), 'r2') // r0 and r1 were forgotten
  assert.equal(own.oldest(['u', 'b', undefined]), 'r3')
  own.discard('r2')
  assert.equal(own.oldest(['u', 'a', undefined]), 'r4')
})
