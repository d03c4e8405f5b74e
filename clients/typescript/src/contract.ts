/**
 * The wire contract (lua/contract.json, copied into this package at build time): what every
 * script takes and returns, by name and in order. Calls are built and replies read here by
 * field name only; the order lives in that one file, shared with the Python client.
 */
import { createHash } from 'node:crypto'
import { existsSync, readFileSync } from 'node:fs'

export type FieldType =
  | 'int'
  | 'int?'
  | 'str'
  | 'str?'
  | 'bool'
  | 'list'
  | 'packed'
  | 'scope'
  | 'scope?'
  | 'pairs<str,scope>'

export interface FieldSpec {
  readonly name: string
  readonly type: FieldType
  readonly key?: string
  readonly optional?: boolean
  /** For a `list` field: the struct each item is (its fields joined by the struct's separator). */
  readonly items?: string
}

interface StructSpec {
  readonly fields: readonly FieldSpec[]
  readonly separator?: string
}

interface ReplySpec {
  readonly type: string
  readonly fields?: readonly FieldSpec[]
  readonly same_as?: string
}

interface ScriptSpec {
  readonly keys: readonly FieldSpec[]
  readonly args: readonly FieldSpec[]
  readonly packed?: readonly FieldSpec[]
  readonly reply: ReplySpec
  readonly errors?: readonly string[]
}

interface ContractFile {
  readonly format: number
  readonly encoding: {
    readonly separator: string
    readonly list_separator: string
    readonly null: string
    readonly true: string
    readonly false: string
    readonly max_integer: number
  }
  readonly customer_keys: readonly FieldSpec[]
  readonly common_args: readonly FieldSpec[]
  readonly structs: Readonly<Record<string, StructSpec>>
  readonly enums: Readonly<Record<string, readonly string[]>>
  /** `field` null: the error names its field after its code ('AGENTBILL overflow units'). */
  readonly errors: Readonly<Record<string, { readonly field: string | null; readonly message: string }>>
  /** Error replies meaning "not now": retried, then StoreBusyError with the code. */
  readonly busy_codes: readonly string[]
  readonly scripts: Readonly<Record<string, ScriptSpec>>
}

export const SCRIPT_NAMES = [
  'preflight',
  'settle',
  'get_budget',
  'set_budget',
  'set_limits',
  'get_usage',
  'events',
  'open_task',
  'get_task',
  'extend',
  'estimates',
] as const
export type ScriptName = (typeof SCRIPT_NAMES)[number]

// The package's lua/ (copied from the repository's at build time): beside dist/, or two levels
// up from the suite's compiled build/src/.
const LUA_DIR = [new URL('../lua/', import.meta.url), new URL('../../lua/', import.meta.url)].find(
  (dir) => existsSync(new URL('contract.json', dir)),
)
if (LUA_DIR === undefined) {
  throw new Error('agentbill: lua/contract.json is missing from the package (run npm run build)')
}

function loadContract(): ContractFile {
  const parsed = JSON.parse(readFileSync(new URL('contract.json', LUA_DIR), 'utf8')) as ContractFile
  if (parsed.format !== 1) {
    throw new Error(`lua/contract.json has format ${parsed.format}; this client reads format 1`)
  }
  for (const name of SCRIPT_NAMES) {
    if (parsed.scripts[name] === undefined) throw new Error(`lua/contract.json lacks script ${name}`)
  }
  return parsed
}

export const contract: ContractFile = loadContract()
const ENC = contract.encoding

/** A script's full text as both clients send it: the shared prelude, a newline, the script. */
export interface LoadedScript {
  readonly name: ScriptName
  readonly source: string
  readonly sha: string
}

function loadScript(name: ScriptName): LoadedScript {
  const prelude = readFileSync(new URL('_common.lua', LUA_DIR), 'utf8')
  const body = readFileSync(new URL(`${name}.lua`, LUA_DIR), 'utf8')
  const source = `${prelude}\n${body}`
  return { name, source, sha: createHash('sha1').update(source).digest('hex') }
}

export const scripts: Readonly<Record<ScriptName, LoadedScript>> = Object.fromEntries(
  SCRIPT_NAMES.map((name) => [name, loadScript(name)]),
) as Record<ScriptName, LoadedScript>

// -- building calls ------------------------------------------------------------------------------

/** A value of one field before encoding: null for "none", a list for a `list` field. */
export type WireValue = string | number | boolean | null | readonly string[]
export type Named = Readonly<Record<string, WireValue>>

/** One script invocation: its name, KEYS and ARGV (all strings, as sent). */
export interface Call {
  readonly script: ScriptName
  readonly keys: readonly string[]
  readonly args: readonly string[]
}

function encode(field: FieldSpec, value: WireValue | undefined, where: string): string {
  if (value === undefined) throw new Error(`${where}: no value for field ${field.name}`)
  if (value === null) {
    if (!field.type.endsWith('?') && field.type !== 'list') {
      throw new Error(`${where}: field ${field.name} (${field.type}) may not be null`)
    }
    return ENC.null
  }
  switch (field.type) {
    case 'bool':
      if (typeof value !== 'boolean') throw new Error(`${where}: ${field.name} must be a boolean`)
      return value ? ENC.true : ENC.false
    case 'list':
      if (!Array.isArray(value)) throw new Error(`${where}: ${field.name} must be a list`)
      return value.join(ENC.list_separator)
    case 'int':
    case 'int?':
      if (typeof value !== 'number' || !Number.isSafeInteger(value)) {
        throw new Error(`${where}: ${field.name} must be a safe integer`)
      }
      return String(value)
    default:
      if (typeof value !== 'string') throw new Error(`${where}: ${field.name} must be a string`)
      return value
  }
}

// The names of each list of fields, worked out once (a call checks its names against them).
const namesOf = new WeakMap<readonly FieldSpec[], ReadonlySet<string>>()
function names(fields: readonly FieldSpec[]): ReadonlySet<string> {
  let known = namesOf.get(fields)
  if (known === undefined) {
    known = new Set(fields.map((f) => f.name))
    namesOf.set(fields, known)
  }
  return known
}

function encodeAll(fields: readonly FieldSpec[], values: Named, where: string): string[] {
  const known = names(fields)
  for (const name of Object.keys(values)) {
    if (!known.has(name)) throw new Error(`${where}: the contract has no field ${name}`)
  }
  return fields.map((f) => encode(f, values[f.name], where))
}

// Each script's KEYS: the customer's, then its own.
const keySpecsOf = Object.fromEntries(
  SCRIPT_NAMES.map((name) => [name, [...contract.customer_keys, ...contract.scripts[name]!.keys]]),
) as unknown as Record<ScriptName, readonly FieldSpec[]>

/** The fields of a packed argument, in the contract's order, joined by its separator. */
export function pack(script: ScriptName, values: Named): string {
  const spec = contract.scripts[script]!
  if (spec.packed === undefined) throw new Error(`${script} takes no packed argument`)
  return encodeAll(spec.packed, values, `${script} packed`).join(ENC.separator)
}

/**
 * KEYS and ARGV of `script`: the customer's keys and the script's own by name (an optional key
 * left out is not sent), the common arguments and the script's own by name; a `packed`
 * argument's value is its fields by name.
 */
export function buildCall(
  script: ScriptName,
  keys: Readonly<Record<string, string>>,
  common: Named,
  args: Named,
  packed?: Named,
): Call {
  const spec = contract.scripts[script]!
  const keySpecs = keySpecsOf[script]
  const known = names(keySpecs)
  for (const name of Object.keys(keys)) {
    if (!known.has(name)) throw new Error(`${script}: the contract has no key ${name}`)
  }
  const keyValues: string[] = []
  let skipped = false
  for (const k of keySpecs) {
    const value = keys[k.name]
    if (value === undefined) {
      if (!k.optional) throw new Error(`${script}: no value for key ${k.name}`)
      skipped = true
      continue
    }
    if (skipped) throw new Error(`${script}: key ${k.name} follows an optional key left out`)
    keyValues.push(value)
  }
  const argValues: Record<string, WireValue> = { ...args }
  for (const a of spec.args) {
    if (a.type === 'packed') {
      if (packed === undefined) throw new Error(`${script}: no packed fields for ${a.name}`)
      argValues[a.name] = pack(script, packed)
    }
  }
  return {
    script,
    keys: keyValues,
    args: [
      ...encodeAll(contract.common_args, common, `${script} common`),
      ...encodeAll(spec.args, argValues, script),
    ],
  }
}

// -- reading replies -------------------------------------------------------------------------------

type Decoded =
  | string
  | number
  | boolean
  | null
  | readonly string[]
  | Fields
  | readonly Fields[]
  | readonly (readonly [string, Fields])[]

/** A decoded reply: each field read by its contract name, its type checked against the contract. */
export class Fields {
  readonly #specs: ReadonlyMap<string, FieldSpec>
  readonly #values: ReadonlyMap<string, Decoded>

  constructor(specs: readonly FieldSpec[], values: ReadonlyMap<string, Decoded>) {
    this.#specs = new Map(specs.map((s) => [s.name, s]))
    this.#values = values
  }

  #get(name: string, types: readonly FieldType[]): Decoded {
    const spec = this.#specs.get(name)
    if (spec === undefined) throw new Error(`the reply has no field ${name}`)
    if (!types.includes(spec.type)) {
      throw new Error(`reply field ${name} is ${spec.type}, read as ${types.join('|')}`)
    }
    return this.#values.get(name) ?? null
  }

  int(name: string): number {
    return this.#get(name, ['int']) as number
  }

  intOrNull(name: string): number | null {
    return this.#get(name, ['int', 'int?']) as number | null
  }

  str(name: string): string {
    return this.#get(name, ['str']) as string
  }

  strOrNull(name: string): string | null {
    return this.#get(name, ['str', 'str?']) as string | null
  }

  bool(name: string): boolean {
    return this.#get(name, ['bool']) as boolean
  }

  list(name: string): readonly string[] {
    const spec = this.#specs.get(name)
    if (spec?.items !== undefined) throw new Error(`reply field ${name} holds ${spec.items} items: read it with structs()`)
    return this.#get(name, ['list']) as readonly string[]
  }

  /** A list of structs (the field's `items`), each read by name. */
  structs(name: string): readonly Fields[] {
    const spec = this.#specs.get(name)
    if (spec !== undefined && spec.items === undefined) throw new Error(`reply field ${name} is a plain list`)
    return this.#get(name, ['list']) as readonly Fields[]
  }

  struct(name: string): Fields {
    return this.#get(name, ['scope']) as Fields
  }

  structOrNull(name: string): Fields | null {
    return this.#get(name, ['scope', 'scope?']) as Fields | null
  }

  pairs(name: string): readonly (readonly [string, Fields])[] {
    return this.#get(name, ['pairs<str,scope>']) as readonly (readonly [string, Fields])[]
  }
}

class ReplyFormatError extends Error {}

function text(value: unknown): string | null {
  if (value === null || value === undefined) return null
  if (typeof value === 'string') return value
  if (typeof value === 'number') return String(value)
  if (Buffer.isBuffer(value)) return value.toString('utf8')
  throw new ReplyFormatError(`unexpected reply item ${typeof value}`)
}

function decodeOne(field: FieldSpec, raw: unknown): Decoded {
  const base = field.type.replace('?', '')
  const nullable = field.type.endsWith('?')
  if (base === 'scope') {
    if (raw === null || raw === undefined) {
      if (nullable) return null
      throw new ReplyFormatError(`${field.name} is missing`)
    }
    return decodeArrayOf(contract.structs.scope!.fields, raw)
  }
  if (base === 'pairs<str,scope>') {
    if (!Array.isArray(raw)) throw new ReplyFormatError(`${field.name} is not a list`)
    const out: (readonly [string, Fields])[] = []
    for (let i = 0; i + 1 < raw.length; i += 2) {
      out.push([text(raw[i]) ?? '', decodeArrayOf(contract.structs.scope!.fields, raw[i + 1])])
    }
    return out
  }
  if (typeof raw === 'number') {
    if (base === 'bool') return raw === 1
    if (base === 'int') return raw
  }
  const value = text(raw)
  if (base === 'list') {
    const items = value ? value.split(ENC.list_separator) : []
    return field.items === undefined ? items : items.map((item) => decodeStruct(field.items!, item))
  }
  if (value === null || value === ENC.null) {
    if (nullable) return null
    if (base === 'int') return 0 // a packed reply writes every int; '' only where the type says
    if (base === 'str') return ''
    if (base === 'bool') return false
  }
  switch (base) {
    case 'int': {
      const n = Number(value)
      if (!Number.isSafeInteger(n)) throw new ReplyFormatError(`${field.name}: not an integer`)
      return n
    }
    case 'bool':
      return value === ENC.true
    default:
      return value
  }
}

/** One item of a list of structs: the struct's fields joined by its separator. */
function decodeStruct(name: string, item: string): Fields {
  const struct = contract.structs[name]
  if (struct?.separator === undefined) throw new Error(`lua/contract.json: ${name} has no separator`)
  const parts = item.split(struct.separator)
  if (parts.length !== struct.fields.length) {
    throw new ReplyFormatError(`a ${name} has ${parts.length} fields; the contract names ${struct.fields.length}`)
  }
  return new Fields(struct.fields, new Map(struct.fields.map((f, i) => [f.name, decodeOne(f, parts[i])])))
}

function decodeArrayOf(fields: readonly FieldSpec[], raw: unknown): Fields {
  if (!Array.isArray(raw)) throw new ReplyFormatError('the reply is not a list')
  if (raw.length !== fields.length) {
    throw new ReplyFormatError(`the reply has ${raw.length} items; the contract names ${fields.length}`)
  }
  return new Fields(fields, new Map(fields.map((f, i) => [f.name, decodeOne(f, raw[i])])))
}

function replyFields(script: ScriptName): readonly FieldSpec[] {
  let reply = contract.scripts[script]!.reply
  if (reply.same_as !== undefined) reply = contract.scripts[reply.same_as]!.reply
  if (reply.fields === undefined) throw new Error(`${script}'s reply has no named fields`)
  return reply.fields
}

/** A script's reply (packed string or array) as its named fields. */
export function decodeReply(script: ScriptName, raw: unknown): Fields {
  const fields = replyFields(script)
  if (contract.scripts[script]!.reply.type === 'packed') {
    const value = text(raw)
    if (value === null) throw new ReplyFormatError(`${script} replied nothing`)
    const parts = value.split(ENC.separator)
    if (parts.length !== fields.length) {
      throw new ReplyFormatError(
        `${script} replied ${parts.length} fields; the contract names ${fields.length}`,
      )
    }
    return new Fields(fields, new Map(fields.map((f, i) => [f.name, decodeOne(f, parts[i])])))
  }
  return decodeArrayOf(fields, raw)
}

/** One ledger stream entry's fields by their contract names (stream field names in the file). */
export function decodeLedgerEntry(raw: unknown): { id: string; fields: Fields } {
  if (!Array.isArray(raw) || raw.length !== 2 || !Array.isArray(raw[1])) {
    throw new ReplyFormatError('not a stream entry')
  }
  const id = text(raw[0]) ?? ''
  const flat = raw[1] as unknown[]
  const byKey = new Map<string, unknown>()
  for (let i = 0; i + 1 < flat.length; i += 2) byKey.set(text(flat[i]) ?? '', flat[i + 1])
  const specs = contract.structs.ledger_entry!.fields
  return {
    id,
    fields: new Fields(
      specs.map((s) => ({ ...s, type: s.type })),
      new Map(specs.map((s) => [s.name, decodeOne(s, byKey.get(s.key ?? s.name) ?? '')])),
    ),
  }
}

/** The field (as the contract names it) and message of a script error ('AGENTBILL <code>', or
 * 'AGENTBILL <code> <field>' for an error whose field the contract leaves null), or undefined. */
export function scriptError(message: string): { field: string; message: string } | undefined {
  for (const [code, spec] of Object.entries(contract.errors)) {
    const at = message.indexOf(`AGENTBILL ${code}`)
    if (at < 0) continue
    if (spec.field !== null) return { field: spec.field, message: spec.message }
    const named = /^ (\w+)/.exec(message.slice(at + `AGENTBILL ${code}`.length))
    if (named !== null) return { field: named[1]!, message: spec.message }
  }
  return undefined
}

export { ReplyFormatError }
