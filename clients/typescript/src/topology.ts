/**
 * Redis URLs for every topology, and the ioredis options each one gets: the one place the
 * TypeScript client reads a URL (agentbill/_topology.py is the Python client's, and the shared
 * vectors in tests/vectors/urls.json, made from it, keep the two alike).
 *
 *     redis://[user:password@]host[:port][/db]          one server (also rediss://, unix://)
 *     redis+cluster://[user:password@]host:port[,host:port...][/0]
 *     redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]
 *         [?sentinel_username=...&sentinel_password=...]
 *
 * `rediss+cluster://` and `rediss+sentinel://` are the same over TLS (`?ssl_ca_certs=` and the
 * client's `tls` option apply to every node, sentinels included). A cluster's hosts are startup
 * nodes (ioredis `Cluster` learns the rest); a Sentinel URL's hosts are the sentinels, its user
 * and password the master's (a tenant key's replace them), the `sentinel_*` query arguments the
 * sentinels' own. A bad URL is InvalidRequestError naming `redisUrl`, never quoting the URL (it
 * may hold a password).
 */
import { readFileSync } from 'node:fs'
import type { ConnectionOptions as TlsOptions } from 'node:tls'
import type { RedisOptions } from 'ioredis'
import { InvalidRequestError } from './errors.js'
import type { TenantKey } from './tenants.js'

export interface Node {
  readonly host: string
  readonly port: number
}

/** Where a URL points, and the ioredis options for its data nodes (credentials, db, TLS). */
export type Target =
  | { readonly kind: 'single'; readonly options: RedisOptions }
  | { readonly kind: 'cluster'; readonly nodes: readonly Node[]; readonly options: RedisOptions }
  | {
      readonly kind: 'sentinel'
      readonly nodes: readonly Node[]
      readonly service: string
      readonly options: RedisOptions
      readonly sentinelUsername?: string | undefined
      readonly sentinelPassword?: string | undefined
    }

const SCHEMES: Record<string, readonly ['cluster' | 'sentinel', 'redis' | 'rediss']> = {
  'redis+cluster': ['cluster', 'redis'],
  'rediss+cluster': ['cluster', 'rediss'],
  'redis+sentinel': ['sentinel', 'redis'],
  'rediss+sentinel': ['sentinel', 'rediss'],
}
const DEFAULT_PORTS = { cluster: 6379, sentinel: 26379 } as const

export const URL_FORMS =
  'redis://, rediss://, unix://, redis+cluster://host:port[,host:port...], ' +
  'redis+sentinel://host:port[,host:port...]/service_name (or rediss+...)'

/** What a plain URL that reaches a cluster node is told (Python's CLUSTER_HINT, in TypeScript
 * terms: tests/vectors/urls.json holds Python's and vectors.test.ts compares). */
export const CLUSTER_HINT =
  'reaches a node of a Redis Cluster (it answered MOVED): use ' +
  'redis+cluster://host:port[,host:port...] (or pass redis: new Cluster(...)) so that every ' +
  'call goes to the node that owns its keys'

function bad(detail: string): InvalidRequestError {
  return new InvalidRequestError('redisUrl', detail)
}

/** The target of any agentbill Redis URL, with a tenant `key`'s credentials and `tls` options
 * applied. Throws InvalidRequestError('redisUrl') for a malformed one. */
export function parseRedisUrl(url: string, key?: TenantKey, tls?: TlsOptions): Target {
  try {
    return parse(url, key, tls)
  } catch (exc) {
    if (exc instanceof URIError) throw bad('has a malformed %-escape')
    throw exc
  }
}

function parse(url: string, key: TenantKey | undefined, tls: TlsOptions | undefined): Target {
  const sep = url.indexOf('://')
  const scheme = sep < 0 ? '' : url.slice(0, sep).toLowerCase()
  const topology = SCHEMES[scheme]
  if (topology === undefined) return { kind: 'single', options: urlOptions(url, key, tls) }
  const [kind, base] = topology
  const rest = url.slice(sep + 3)
  // The host list ends at the first '/' or '?' (a query right after it is the URL's too).
  const cut = rest.search(/[/?]/)
  const netloc = cut < 0 ? rest : rest.slice(0, cut)
  const tail = cut < 0 ? '' : rest.slice(rest[cut] === '/' ? cut + 1 : cut)
  const question = tail.indexOf('?')
  let path = question < 0 ? tail : tail.slice(0, question)
  const query = new URLSearchParams(question < 0 ? '' : tail.slice(question + 1))
  const at = netloc.lastIndexOf('@')
  const userinfo = at < 0 ? '' : netloc.slice(0, at + 1)
  const nodes = netloc.slice(at + 1).split(',').map((part) => node(part, DEFAULT_PORTS[kind]))
  const sentinelUsername = query.get('sentinel_username') ?? undefined
  const sentinelPassword = query.get('sentinel_password') ?? undefined
  query.delete('sentinel_username')
  query.delete('sentinel_password')
  let service = ''
  if (kind === 'sentinel') {
    const end = path.indexOf('/')
    service = end < 0 ? path : path.slice(0, end) // as redis-py: not %-decoded
    path = end < 0 ? '' : path.slice(end + 1)
    if (service === '') throw bad("is a Sentinel URL without the master's service name as its path")
    if (!/^\d*$/.test(path)) throw bad('has a database after the service name that is not a number')
  } else if (path !== '' && path !== '0') {
    throw bad('is a Redis Cluster URL with a path other than /0 (a cluster has database 0)')
  }
  // The data nodes' options are a plain URL's (as Python builds them with parse_url); the host
  // here is a placeholder, the nodes are above.
  const options = urlOptions(`${base}://${userinfo}localhost/${path}?${query.toString()}`, key, tls)
  delete options.host
  delete options.port
  if (kind === 'cluster') {
    if ((options.db ?? 0) !== 0) throw bad('is a Redis Cluster URL with a database other than 0 (a cluster has 0 only)')
    return { kind, nodes, options }
  }
  return { kind, nodes, service, options, sentinelUsername, sentinelPassword }
}

function node(text: string, defaultPort: number): Node {
  let parsed: URL
  try {
    parsed = new URL(`redis://${text.trim()}`)
  } catch {
    throw bad('has a host that is not host[:port] in its host list')
  }
  const host = parsed.hostname.replace(/^\[|\]$/g, '').toLowerCase()
  if (host === '' || parsed.username !== '' || parsed.pathname !== '') {
    throw bad('needs a name for every host in its host list')
  }
  if (parsed.port === '0') throw bad(PORT_0)
  return { host, port: parsed.port === '' ? defaultPort : Number(parsed.port) }
}

const PORT_0 = "has port 0: give the server's port, or none for the default"

/** ioredis options for one server's URL: what Python's redis-py takes from the same URL. */
function urlOptions(url: string, key: TenantKey | undefined, tls: TlsOptions | undefined): RedisOptions {
  let parsed: URL
  try {
    parsed = new URL(url)
  } catch {
    throw bad(`is not a Redis URL (${URL_FORMS})`)
  }
  const hasCredentials = parsed.username !== '' || parsed.password !== ''
  if (key !== undefined && hasCredentials) {
    throw bad('carries a username or password, and so does apiKey: leave them out of the URL')
  }
  const queryDb = parsed.searchParams.get('db')
  if (queryDb !== null && !/^\d+$/.test(queryDb)) throw bad('has a db query argument that is not a number')
  // As redis-py: a path that is not a number is no database (0).
  const db = Number(queryDb ?? (decodeURIComponent(parsed.pathname).replace(/\//g, '') || '0'))
  const out: RedisOptions = {}
  if (parsed.protocol === 'unix:') {
    out.path = decodeURIComponent(parsed.pathname)
  } else if (parsed.protocol === 'redis:' || parsed.protocol === 'rediss:') {
    out.host = parsed.hostname.replace(/^\[|\]$/g, '') || '127.0.0.1'
    if (parsed.port === '0') throw bad(PORT_0)
    out.port = parsed.port === '' ? 6379 : Number(parsed.port)
    if (Number.isInteger(db) && db > 0) out.db = db
    if (parsed.protocol === 'rediss:') {
      const ca = parsed.searchParams.get('ssl_ca_certs')
      out.tls = { ...(ca ? { ca: readFileSync(ca) } : {}), ...tls }
    }
  } else {
    throw bad(`is not a Redis URL (${URL_FORMS})`)
  }
  if (hasCredentials) {
    if (parsed.username !== '') out.username = decodeURIComponent(parsed.username)
    if (parsed.password !== '') out.password = decodeURIComponent(parsed.password)
  }
  if (key !== undefined) {
    out.username = key.username
    out.password = key.secret
  }
  return out
}
