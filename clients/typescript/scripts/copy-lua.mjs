// Copies the scripts and their wire contract from the repository's lua/ into this package
// (lua/ here is build output, ignored by git: the scripts have exactly one copy in git).
import { copyFileSync, mkdirSync, readdirSync, rmSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(dirname(fileURLToPath(import.meta.url)))
const source = join(here, '..', '..', 'lua')
const target = join(here, 'lua')
rmSync(target, { recursive: true, force: true })
mkdirSync(target)
const files = readdirSync(source).filter((f) => f.endsWith('.lua') || f === 'contract.json')
if (!files.includes('contract.json') || !files.includes('_common.lua')) {
  throw new Error(`no agentbill scripts in ${source}: build from a checkout of the repository`)
}
for (const file of files) copyFileSync(join(source, file), join(target, file))
console.log(`copied ${files.length} files from ${source}`)
