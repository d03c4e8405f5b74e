/** The same client on Redis Cluster (3 masters), Sentinel and TLS, all started by the suite. */
import assert from 'node:assert/strict'
import { execFileSync, spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { connect as tlsConnect } from 'node:tls'
import { test } from 'node:test'
import { Cluster, Redis } from 'ioredis'
import { library } from '../src/contract.js'
import { AgentBillClient, AgentBillError, InvalidRequestError } from '../src/index.js'
import { RedisServer, freePort, namespace, rawCommand, serverBinary, writeFile } from './servers.js'

/** A free port whose cluster bus port (port + 10000) is free too. */
async function clusterPort(): Promise<number> {
  for (;;) {
    const port = await freePort(55535)
    const busFree = await new Promise<boolean>((done) => {
      const s = createServer()
      s.once('error', () => done(false))
      s.listen(port + 10000, '127.0.0.1', () => s.close(() => done(true)))
    })
    if (busFree) return port
  }
}

test('Redis Cluster: customers on every node, the library loaded on every primary after FUNCTION FLUSH', async () => {
  const nodes: RedisServer[] = []
  try {
    for (let i = 0; i < 3; i++) {
      const port = await clusterPort()
      const node = new RedisServer(port, ['--cluster-enabled', 'yes', '--cluster-node-timeout', '2000', '--cluster-config-file', `nodes-${port}.conf`])
      nodes.push(node)
      await node.start()
    }
    const per = Math.floor(16384 / nodes.length)
    for (const [i, node] of nodes.entries()) {
      const last = i === nodes.length - 1 ? 16383 : (i + 1) * per - 1
      const r = new Redis(node.port, '127.0.0.1')
      await r.call('CLUSTER', 'ADDSLOTSRANGE', String(i * per), String(last))
      if (i > 0) await r.call('CLUSTER', 'MEET', '127.0.0.1', String(nodes[0]!.port))
      r.disconnect()
    }
    const deadline = Date.now() + 20_000
    for (;;) {
      const ok = await Promise.all(nodes.map(async (n) => {
        const r = new Redis(n.port, '127.0.0.1')
        const info = String(await r.call('CLUSTER', 'INFO'))
        r.disconnect()
        return info.includes('cluster_state:ok') && info.includes('cluster_known_nodes:3')
      }))
      if (ok.every(Boolean)) break
      if (Date.now() > deadline) throw new Error('the cluster did not converge')
      await new Promise((r) => setTimeout(r, 100))
    }
    const cluster = new Cluster(nodes.map((n) => ({ host: '127.0.0.1', port: n.port })), {
      redisOptions: { commandTimeout: 2000 },
    })
    const c = new AgentBillClient({ redis: cluster, namespace: namespace() })
    const customers = Array.from({ length: 12 }, (_, i) => `customer-${i}`)
    for (const customerId of customers) {
      await c.setBudget({ customerId, limit: 5 })
      const check = await c.preflight({ agentId: 'a', estimatedUnits: 5, customerId })
      assert.equal(check.approved, true)
      await check.record(4)
    }
    const batch = await c.preflightMany(customers.map((customerId) => ({ agentId: 'a', estimatedUnits: 2, customerId })))
    assert.deepEqual(batch.map((k) => k.approved), customers.map(() => false))
    await Promise.all(cluster.nodes('master').map((node) => node.function('FLUSH')))
    const after = await Promise.all(customers.map((customerId) => c.getBudget({ customerId })))
    assert.deepEqual(after.map((b) => [b.spent, b.reserved]), customers.map(() => [4, 0]))
    // The first call that found it missing loaded it on every primary, the others too.
    const loaded = await Promise.all(cluster.nodes('master').map(async (n) => JSON.stringify(await n.function('LIST'))))
    assert.deepEqual(loaded.map((l) => l.includes(`"${library.name}"`)), [true, true, true])
    // A write after the flush, charged once: each customer's record lands once.
    await Promise.all(cluster.nodes('master').map((node) => node.function('FLUSH')))
    const settled = await Promise.all(customers.map((customerId) => c.record({ agentId: 'a', units: 1, customerId })))
    assert.deepEqual(settled.map((s) => s.charged), customers.map(() => 1))
    const charged = await Promise.all(customers.map((customerId) => c.getBudget({ customerId })))
    assert.deepEqual(charged.map((b) => b.spent), customers.map(() => 5))
    // the customers really are spread over the nodes
    const owners = new Set(await Promise.all(cluster.nodes('master').map(async (n) => (await n.dbsize()) > 0)))
    assert.deepEqual([...owners], [true])
    await c.close()
    cluster.disconnect()

    // The same cluster by URL: two startup nodes, customers on every node.
    const ns = namespace()
    const url = `redis+cluster://127.0.0.1:${nodes[0]!.port},127.0.0.1:${nodes[1]!.port}/0`
    const byUrl = new AgentBillClient({ redisUrl: url, namespace: ns })
    for (const customerId of customers) {
      await byUrl.setBudget({ customerId, limit: 5 })
      assert.equal((await (await byUrl.preflight({ agentId: 'a', estimatedUnits: 3, customerId })).record(3)).status, 'recorded')
    }
    const many = await byUrl.preflightMany(customers.map((customerId) => ({ agentId: 'a', estimatedUnits: 3, customerId })))
    assert.deepEqual(many.map((k) => k.approved), customers.map(() => false))
    const spread = await Promise.all(nodes.map(async (n) => {
      const r = new Redis(n.port, '127.0.0.1')
      const found = (await r.keys(`*${ns}*`)).length
      r.disconnect()
      return found > 0
    }))
    assert.deepEqual(spread, [true, true, true])
    await byUrl.close()

    // A script that never calls close() still ends: an idle Cluster's sockets are unreferenced.
    const script = `
      import { AgentBillClient } from ${JSON.stringify(new URL('../src/index.js', import.meta.url).href)}
      const c = new AgentBillClient({ redisUrl: ${JSON.stringify(url)}, namespace: ${JSON.stringify(ns)} })
      await Promise.all(${JSON.stringify(customers)}.map((customerId) => c.getBudget({ customerId })))
    `
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
      cwd: fileURLToPath(new URL('../..', import.meta.url)),
      stdio: 'ignore',
    })
    const exited = new Promise<number | null>((done) => child.on('exit', done))
    const stuck = setTimeout(() => child.kill('SIGKILL'), 20_000)
    assert.equal(await exited, 0) // killed: it did not end by itself
    clearTimeout(stuck)

    // A plain URL to one node: the customers it does not own answer MOVED, and the error says
    // which URL to use (nothing ran). preflightMany names the URL, not the item.
    const plain = new AgentBillClient({ redisUrl: `redis://127.0.0.1:${nodes[0]!.port}/0`, namespace: ns })
    const moved = (exc: unknown): boolean => {
      assert.ok(exc instanceof InvalidRequestError)
      assert.equal(exc.field, 'redisUrl')
      assert.match(exc.detail, /redis\+cluster:\/\/host:port/)
      return true
    }
    const answers = await Promise.allSettled(customers.map((customerId) => plain.getBudget({ customerId })))
    const refused = answers.filter((o) => o.status === 'rejected') as PromiseRejectedResult[]
    assert.ok(refused.length > 0 && refused.length < customers.length)
    for (const r of refused) moved(r.reason)
    await assert.rejects(plain.preflightMany(customers.map((customerId) => ({ agentId: 'a', estimatedUnits: 1, customerId }))), moved)
    await plain.close()
  } finally {
    for (const node of nodes) await node.stop()
  }
})

test('Sentinel: a client built for a monitored master, and the same by URL with credentials', async () => {
  const master = await RedisServer.start(['--requirepass', 'master pw'])
  const sentinelPort = await freePort()
  const conf = writeFile(
    master.dir,
    'sentinel.conf',
    `port ${sentinelPort}\nbind 127.0.0.1\nrequirepass sentinel-pw\n` +
      `sentinel monitor agentbill 127.0.0.1 ${master.port} 1\nsentinel auth-pass agentbill "master pw"\n`,
  )
  const proc = spawn(serverBinary(), [conf, '--sentinel'], { stdio: 'ignore' })
  try {
    const deadline = Date.now() + 10_000
    while ((await rawCommand(sentinelPort, 'PING')) === '') {
      if (Date.now() > deadline) throw new Error('sentinel did not start')
      await new Promise((r) => setTimeout(r, 20))
    }
    const redis = new Redis({
      sentinels: [{ host: '127.0.0.1', port: sentinelPort }],
      name: 'agentbill',
      sentinelPassword: 'sentinel-pw',
      password: 'master pw',
      commandTimeout: 2000,
    })
    const ns = namespace()
    const c = new AgentBillClient({ redis, namespace: ns })
    const check = await c.preflight({ agentId: 'a', estimatedUnits: 3, customerId: 'u' })
    assert.equal((await check.record(2)).status, 'recorded')
    assert.equal((await c.getBudget({ customerId: 'u' })).spent, 2)
    await c.close()
    redis.disconnect()

    // By URL: a dead sentinel first (the next is asked), the master's password in the URL, the
    // sentinels' in the query; db 3 of the master.
    const dead = await freePort()
    const hosts = `127.0.0.1:${dead},127.0.0.1:${sentinelPort}`
    const url = `redis+sentinel://:master%20pw@${hosts}/agentbill/3?sentinel_password=sentinel-pw`
    const byUrl = new AgentBillClient({ redisUrl: url, namespace: ns })
    const again = await byUrl.preflight({ agentId: 'a', estimatedUnits: 3, customerId: 'u' })
    assert.equal((await again.record(1)).status, 'recorded')
    assert.equal((await byUrl.getBudget({ customerId: 'u' })).spent, 1) // db 3, not db 0
    await byUrl.close()
    const direct = new Redis({ port: master.port, host: '127.0.0.1', password: 'master pw', db: 3 })
    assert.ok((await direct.keys(`*${ns}*`)).length > 0)
    direct.disconnect()
    // Without the sentinels' password the sentinels refuse: a typed error, not a hang.
    const refused = new AgentBillClient({
      redisUrl: `redis+sentinel://:master%20pw@127.0.0.1:${sentinelPort}/agentbill`,
      namespace: ns,
      retryDeadline: 1,
    })
    await assert.rejects(refused.getBudget({ customerId: 'u' }), (exc: unknown) => exc instanceof AgentBillError)
    await refused.close()
  } finally {
    proc.kill('SIGKILL')
    await master.stop()
  }
})

test('TLS: rediss:// with ?ssl_ca_certs=, as the Python client takes it', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ab-ts-tls-'))
  const ca = join(dir, 'ca.pem')
  const caKey = join(dir, 'ca.key')
  const cert = join(dir, 'server.pem')
  const key = join(dir, 'server.key')
  const ext = writeFile(dir, 'san.ext', 'subjectAltName=IP:127.0.0.1,DNS:localhost\n')
  const openssl = (...args: string[]): void => {
    execFileSync('openssl', args, { stdio: 'ignore' })
  }
  openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', caKey, '-out', ca, '-days', '1', '-subj', '/CN=agentbill test CA')
  openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', join(dir, 'server.csr'), '-subj', '/CN=127.0.0.1')
  openssl('x509', '-req', '-in', join(dir, 'server.csr'), '-CA', ca, '-CAkey', caKey, '-CAcreateserial', '-out', cert, '-days', '1', '-extfile', ext)
  const port = await freePort()
  const server = new RedisServer(port, ['--port', '0', '--tls-port', String(port), '--tls-cert-file', cert, '--tls-key-file', key, '--tls-ca-cert-file', ca, '--tls-auth-clients', 'no'])
  await server.start(
    () =>
      new Promise((done) => {
        const s = tlsConnect({ host: '127.0.0.1', port, ca: readFileSync(ca) }, () => {
          s.destroy()
          done(true)
        })
        s.on('error', () => done(false))
      }),
  )
  try {
    const c = new AgentBillClient({ redisUrl: `rediss://127.0.0.1:${port}/0?ssl_ca_certs=${ca}`, namespace: namespace() })
    const check = await c.preflight({ agentId: 'a', estimatedUnits: 3 })
    assert.equal(check.approved, true)
    assert.equal((await check.release()).status, 'released')
    await c.close()
    const plain = new AgentBillClient({ redisUrl: `redis://127.0.0.1:${port}/0`, socketTimeout: 0.5 })
    await assert.rejects(plain.getBudget())
    await plain.close()
  } finally {
    await server.stop()
    rmSync(dir, { recursive: true, force: true })
  }
})

test('a malformed topology URL is refused at construction, naming redisUrl, never quoting it', () => {
  for (const redisUrl of [
    'redis+cluster://u:hunter2@127.0.0.1:7000/1',
    'redis+sentinel://u:hunter2@127.0.0.1:26379',
    'redis+cluster://u:hunter2@a:7000,,b:7001',
    'redis+sentinel://u:hunter2@s:1/svc?db=x&sentinel_password=hunter2',
    'memcached://u:hunter2@h:11211',
  ]) {
    assert.throws(() => new AgentBillClient({ redisUrl }), (exc: unknown) => {
      assert.ok(exc instanceof InvalidRequestError, redisUrl)
      assert.equal(exc.field, 'redisUrl')
      assert.ok(!exc.message.includes('hunter2'), exc.message)
      return true
    })
  }
})
