// `make bench`'s TypeScript row (run by benchmarks/_typescript.py): the TypeScript client's
// preflight, and a preflight + record pair, against an ioredis PING on the same server, in the
// same process, measured interleaved as the Python rows are (blocks of 100 calls of each in
// turn, the order rotating, after 200 warm-up calls each). Prints one JSON object.
//
//     node bench/latency.mjs redis://127.0.0.1:PORT/0 10000
import { readFileSync } from 'node:fs'
import { Redis } from 'ioredis'
import { AgentBillClient } from '../dist/index.js'

const WARMUP = 200
const BLOCK = 100
const BIG_LIMIT = 10 ** 15 // a limit no run reaches: every measured preflight is approved

const [url, count] = process.argv.slice(2)
const n = Number(count)
if (!url || !Number.isInteger(n) || n < 1) {
  process.stderr.write('usage: node bench/latency.mjs <redis url> <calls per operation>\n')
  process.exit(2)
}

const ping = new Redis(url) // ioredis as it comes: one connection
const client = new AgentBillClient({ redisUrl: url, namespace: 'bench-ts' })
await client.setBudget({ customerId: 'hot', limit: BIG_LIMIT })
const ask = { agentId: 'agent', estimatedUnits: 1, customerId: 'hot' }

const ops = [
  { name: 'PING (ioredis)', call: () => ping.ping() },
  // Released untimed after each call, so nothing piles up (as the Python row).
  { name: 'preflight (TypeScript)', call: () => client.preflight(ask), after: (check) => check.release() },
  { name: 'preflight + record (TypeScript pair)', call: async () => (await client.preflight(ask)).record(1) },
]

for (const op of ops) {
  for (let i = 0; i < Math.min(WARMUP, n); i++) {
    const result = await op.call()
    if (op.after) await op.after(result)
  }
}
const times = Object.fromEntries(ops.map((op) => [op.name, []]))
const cpu = Object.fromEntries(ops.map((op) => [op.name, 0]))
const turns = Math.ceil(n / BLOCK)
for (let turn = 0; turn < turns; turn++) {
  const k = turn % ops.length
  for (const op of [...ops.slice(k), ...ops.slice(0, k)]) {
    const out = times[op.name]
    const calls = Math.min(BLOCK, n - out.length)
    let spent = 0
    for (let i = 0; i < calls; i++) {
      const c0 = process.cpuUsage()
      const t0 = process.hrtime.bigint()
      const result = await op.call()
      const t1 = process.hrtime.bigint()
      const c1 = process.cpuUsage(c0)
      spent += (c1.user + c1.system) / 1e6
      out.push(Number(t1 - t0) / 1e9)
      if (op.after) await op.after(result)
    }
    cpu[op.name] += spent
  }
}

// The q-th percentile, nearest rank (as benchmarks/_timing.py).
function pct(values, q) {
  const ordered = [...values].sort((a, b) => a - b)
  const rank = Math.round((q / 100) * (ordered.length - 1))
  return ordered[Math.min(Math.max(rank, 0), ordered.length - 1)]
}

const ioredis = JSON.parse(readFileSync(new URL('../node_modules/ioredis/package.json', import.meta.url), 'utf8'))
const rows = Object.fromEntries(
  ops.map((op) => {
    const t = times[op.name]
    return [op.name, { p50: pct(t, 50), p99: pct(t, 99), cpu_per_call: cpu[op.name] / t.length, calls: t.length }]
  }),
)
process.stdout.write(JSON.stringify({ node: process.version, ioredis: ioredis.version, rows }) + '\n')
ping.disconnect()
await client.close()
