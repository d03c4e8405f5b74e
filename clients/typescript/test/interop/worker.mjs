// A Node worker for tests/test_interop.py: `node worker.mjs '<json>'` runs one step with the
// built package and prints its result as JSON. The step is {client: {...options}, op, args};
// op 'steps' runs each of args ([{op, args}, ...]) in turn on one client, and gives their results.
import { existsSync } from 'node:fs'
import { AgentBillClient } from '../../dist/index.js'

const step = JSON.parse(process.argv[2])

function plain(value) {
  return JSON.parse(
    JSON.stringify(value, (_k, v) => (v === undefined ? null : v)),
  )
}

async function race(client, { agentId, customerId, units, go }) {
  await client.getBudget({ customerId }) // connected, scripts loaded: ready to race
  process.stdout.write('ready\n')
  while (!existsSync(go)) await new Promise((r) => setTimeout(r, 2))
  let approved = 0
  for (;;) {
    const check = await client.preflight({ agentId, estimatedUnits: units, customerId })
    if (!check.approved) return { approved, reason: check.reason }
    approved += units
    await check.record(units)
  }
}

async function run(client, op, args) {
  if (op === 'race') return await race(client, args)
  if (op === 'preflight') return (await client.preflight(args)).fields()
  if (op === 'preflightMany') return (await client.preflightMany(args)).map((c) => c.fields())
  if (op === 'steps') {
    const results = []
    for (const s of args) results.push(await run(client, s.op, s.args))
    return results
  }
  return await client[op](args)
}

let client
try {
  client = new AgentBillClient(step.client)
  const result = await run(client, step.op, step.args)
  process.stdout.write(JSON.stringify({ ok: plain(result) }))
} catch (err) {
  process.stdout.write(JSON.stringify({ error: err.name, field: err.field ?? null, message: err.message }))
} finally {
  await client?.close()
}
