/**
 * Real redis-server processes for the suite, started on free ports in temporary directories and
 * stopped after (never the Redis on port 6379). The binary is $AGENTBILL_REDIS_SERVER (make test
 * passes the one the Python suite uses), else redis-server or valkey-server on PATH.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { createServer, createConnection } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export function serverBinary(): string {
  const configured = process.env['AGENTBILL_REDIS_SERVER']
  if (configured) return configured
  for (const name of ['redis-server', 'valkey-server']) {
    try {
      return execFileSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' }).trim()
    } catch {
      // not on PATH
    }
  }
  throw new Error('no redis-server: set AGENTBILL_REDIS_SERVER (make test does)')
}

/** A free TCP port on 127.0.0.1 (never 6379), at most `max`. */
export async function freePort(max = 65535): Promise<number> {
  for (;;) {
    const port = await new Promise<number>((done, fail) => {
      const s = createServer()
      s.once('error', fail)
      s.listen(0, '127.0.0.1', () => {
        const address = s.address()
        s.close(() => done(typeof address === 'object' && address ? address.port : 0))
      })
    })
    if (port !== 6379 && port <= max) return port
  }
}

/** One RESP command over a fresh connection; its first reply line (for readiness checks). */
export function rawCommand(port: number, line: string, timeoutMs = 500, tls = false): Promise<string> {
  return new Promise((done) => {
    if (tls) return done('')
    const conn = createConnection({ host: '127.0.0.1', port })
    let reply = ''
    const finish = (value: string): void => {
      clearTimeout(timer)
      conn.destroy()
      done(value)
    }
    const timer = setTimeout(() => finish(''), timeoutMs)
    conn.on('connect', () => conn.write(`${line}\r\n`))
    conn.on('data', (chunk) => {
      reply += chunk.toString()
      if (reply.includes('\r\n')) finish(reply.split('\r\n')[0]!)
    })
    conn.on('error', () => finish(''))
  })
}

export class RedisServer {
  readonly dir = mkdtempSync(join(tmpdir(), 'ab-ts-redis-'))
  proc: ChildProcess | undefined

  constructor(
    readonly port: number,
    readonly extra: readonly string[] = [],
  ) {}

  static async start(extra: readonly string[] = [], port?: number): Promise<RedisServer> {
    const server = new RedisServer(port ?? (await freePort()), extra)
    await server.start()
    return server
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}/0`
  }

  /** Start, and wait until the server answers PING (any answer: NOAUTH is an answer too). */
  async start(ready: () => Promise<boolean> = async () => (await rawCommand(this.port, 'PING')) !== ''): Promise<void> {
    const args = ['--port', String(this.port), '--bind', '127.0.0.1', '--dir', this.dir, '--save', '', '--appendonly', 'no', '--logfile', join(this.dir, 'server.log'), ...this.extra]
    this.proc = spawn(serverBinary(), args, { stdio: 'ignore' })
    const deadline = Date.now() + 10_000
    while (Date.now() < deadline) {
      if (this.proc.exitCode !== null) throw new Error(`redis-server exited (${this.proc.exitCode})`)
      if (await ready()) return
      await new Promise((r) => setTimeout(r, 20))
    }
    await this.stop()
    throw new Error(`redis-server did not answer on ${this.port}`)
  }

  pause(): void {
    this.proc?.kill('SIGSTOP')
  }

  resume(): void {
    this.proc?.kill('SIGCONT')
  }

  async stop(): Promise<void> {
    const proc = this.proc
    this.proc = undefined
    if (proc !== undefined && proc.exitCode === null) {
      proc.kill('SIGCONT')
      const exited = new Promise((r) => proc.once('exit', r))
      proc.kill('SIGTERM')
      await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))])
      if (proc.exitCode === null) proc.kill('SIGKILL')
    }
    rmSync(this.dir, { recursive: true, force: true })
  }
}

/** A namespace no other test uses: tests stay apart by namespace, never by flushing. */
export function namespace(): string {
  return `t-${randomBytes(6).toString('hex')}`
}

export function writeFile(dir: string, name: string, text: string): string {
  const path = join(dir, name)
  writeFileSync(path, text)
  return path
}
