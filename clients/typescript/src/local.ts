/**
 * The local server the Python package starts when no Redis is configured (agentbill/_local.py):
 * one per user per machine, listening only on `server.sock` in the per-user data directory.
 * This client never starts it; it connects when it answers, so a Node worker shares the budgets
 * of the Python workers on the same machine.
 *
 * The directory is `$AGENTBILL_HOME` when set, else platformdirs' user data directory for
 * "agentbill": `$XDG_DATA_HOME/agentbill` (default `~/.local/share/agentbill`) on Linux and the
 * BSDs, `~/Library/Application Support/agentbill` on macOS.
 */
import { existsSync } from 'node:fs'
import { createConnection } from 'node:net'
import { homedir } from 'node:os'
import { isAbsolute, join, resolve } from 'node:path'

export const HOME_ENV = 'AGENTBILL_HOME'
const PING_TIMEOUT_MS = 1000

function expandUser(path: string): string {
  return path === '~' || path.startsWith('~/') ? join(homedir(), path.slice(1)) : path
}

/** The per-user data directory (not created: only Python starts the server). */
export function dataDir(env: NodeJS.ProcessEnv = process.env): string {
  const configured = env[HOME_ENV]
  if (configured) return resolve(expandUser(configured))
  if (process.platform === 'darwin') {
    return join(homedir(), 'Library', 'Application Support', 'agentbill')
  }
  const xdg = env['XDG_DATA_HOME']?.trim()
  const base = xdg && isAbsolute(xdg) ? xdg : join(homedir(), '.local', 'share')
  return join(base, 'agentbill')
}

export function socketPath(env: NodeJS.ProcessEnv = process.env): string {
  return join(dataDir(env), 'server.sock')
}

/** Whether a server answers PING on `socket` within a second. */
export function answersPing(socket: string): Promise<boolean> {
  if (!existsSync(socket)) return Promise.resolve(false)
  return new Promise((done) => {
    const conn = createConnection({ path: socket })
    let reply = ''
    const finish = (ok: boolean): void => {
      clearTimeout(timer)
      conn.destroy()
      done(ok)
    }
    const timer = setTimeout(() => finish(false), PING_TIMEOUT_MS)
    conn.on('connect', () => conn.write('PING\r\n'))
    conn.on('data', (chunk) => {
      reply += chunk.toString('latin1')
      if (reply.includes('\r\n')) finish(reply.startsWith('+PONG'))
    })
    conn.on('error', () => finish(false))
    conn.on('close', () => finish(false))
  })
}
