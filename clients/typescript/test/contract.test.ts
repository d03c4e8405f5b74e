/** Calls are built and replies read by field name from lua/contract.json; the names are checked. */
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { test } from 'node:test'
import { buildCall, contract, decodeReply, functionName, library, pack, parseLibrary, scriptError, SCRIPT_NAMES } from '../src/contract.js'

const SEP = contract.encoding.separator

test('the package reads the contract the repository has', () => {
  const repo = readFileSync(new URL('../../../../lua/contract.json', import.meta.url), 'utf8')
  assert.deepEqual(contract, JSON.parse(repo))
  assert.deepEqual(Object.keys(contract.scripts).sort(), [...SCRIPT_NAMES].sort())
})

test("the library is the repository's lua/library.lua, and every operation's function is in it by the one naming rule", () => {
  const repo = readFileSync(new URL('../../../../lua/library.lua', import.meta.url), 'utf8')
  assert.equal(library.text, repo)
  assert.equal(`#!lua name=${library.name}`, repo.split('\n', 1)[0])
  assert.match(library.name, /^agentbill_[0-9a-f]+$/)
  for (const op of SCRIPT_NAMES) {
    assert.equal(functionName(library, op), `${library.name}_${op}`)
    // As agentbill/_scripts.py build() registers it: once per operation.
    assert.equal(repo.split(`function_name = '${functionName(library, op)}'`).length, 2, op)
  }
})

test('a library text without its name line is refused, saying what its first line is', () => {
  assert.deepEqual(parseLibrary('#!lua name=agentbill_0a1b\nreturn 1\n'), { name: 'agentbill_0a1b', text: '#!lua name=agentbill_0a1b\nreturn 1\n' })
  assert.throws(() => parseLibrary('-- no header\n'), /lua\/library\.lua is not an agentbill Functions library: its first line is "-- no header"/)
  assert.throws(() => parseLibrary('#!lua name=other_0a1b\n'), /not an agentbill Functions library/)
  assert.throws(() => parseLibrary(''), /not an agentbill Functions library/)
})

test('a packed argument is every field by name, in the contract order', () => {
  const names = contract.scripts['get_task']!
  assert.equal(names.args[0]!.name, 'task_digest')
  const fields = Object.fromEntries(contract.scripts['settle']!.packed!.map((f) => [f.name, f.type === 'bool' ? false : f.type.startsWith('int') ? 0 : f.type.endsWith('?') ? null : 'x']))
  const packed = pack('settle', { ...fields, reservation_id: 'R', request_id: 'Q', units: 7, charge: true })
  const parts = packed.split(SEP)
  const order = contract.scripts['settle']!.packed!.map((f) => f.name)
  assert.equal(parts[order.indexOf('reservation_id')], 'R')
  assert.equal(parts[order.indexOf('request_id')], 'Q')
  assert.equal(parts[order.indexOf('units')], '7')
  assert.equal(parts[order.indexOf('charge')], '1')
  assert.equal(parts[order.indexOf('agent_id')], '')
})

test('a missing, unknown or mistyped name is an error, never a shifted field', () => {
  assert.throws(() => pack('settle', { units: 1 }), /no value for field/)
  assert.throws(() => buildCall('get_task', {}, {}, { task_digest: 'd' }), /no value for key budget/)
  const keys = Object.fromEntries(contract.customer_keys.map((k) => [k.name, k.name]))
  const common = { reap_limit: 1, retention_ms: 2, ledger_len: 3, task_retention_ms: 4, idle_retention_ms: 5 }
  assert.throws(() => buildCall('get_task', keys, common, { task_digest: 'd', nope: 1 }), /no field nope/)
  assert.throws(() => buildCall('get_task', keys, common, { task_digest: 12 }), /must be a string/)
  assert.throws(() => buildCall('open_task', keys, common, { task_digest: 'd', task_ref: 't', ceiling: 1.5 }), /safe integer/)
  assert.deepEqual(buildCall('get_task', keys, common, { task_digest: 'd' }).args, ['1', '2', '3', '4', '5', 'd'])
})

test('a packed reply is read by name and typed by the contract', () => {
  const fields = contract.scripts['settle']!.reply.fields!
  const values: Record<string, string> = { status: 'late', reservation_id: '', charged: '5', released: '0', late: '1', replayed: '0', limit: '', spent: '9', reserved: '2', now_ms: '1700000000000', crossed: 'customer:80:9,agent:50:4', agent_id: 'bob' }
  const reply = decodeReply('settle', fields.map((f) => values[f.name]).join(SEP))
  assert.equal(reply.str('status'), 'late')
  assert.equal(reply.strOrNull('reservation_id'), null)
  assert.equal(reply.intOrNull('limit'), null)
  assert.equal(reply.int('spent'), 9)
  assert.equal(reply.bool('late'), true)
  assert.deepEqual(
    reply.structs('crossed').map((c) => [c.str('scope'), c.int('percent'), c.int('committed')]),
    [['customer', 80, 9], ['agent', 50, 4]],
  )
  assert.equal(reply.strOrNull('agent_id'), 'bob')
  assert.throws(() => reply.list('crossed'), /structs\(\)/)
  assert.throws(() => reply.int('nope'), /no field nope/)
  assert.throws(() => reply.str('spent'), /is int/)
  assert.throws(() => decodeReply('settle', 'a\u001fb'), /replied 2 fields/)
})

test("a script error names its field as the contract says, the overflow's after its code", () => {
  assert.deepEqual(scriptError('ERR AGENTBILL idempotency_conflict script: ...'), {
    field: 'idempotency_key',
    message: contract.errors['idempotency_conflict']!.message,
  })
  assert.deepEqual(scriptError('AGENTBILL overflow estimated_units'), {
    field: 'estimated_units',
    message: contract.errors['overflow']!.message,
  })
  assert.equal(scriptError('ERR something else'), undefined)
})
