// Copies what the client reads from the repository's lua/ into this package: the Functions
// library (library.lua, generated there by `make library` from the scripts) and the scripts'
// wire contract (contract.json). lua/ here is build output, ignored by git: the scripts have
// exactly one copy in git.
import { copyFileSync, existsSync, mkdirSync, rmSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const FILES = ['library.lua', 'contract.json']
const here = dirname(dirname(fileURLToPath(import.meta.url)))
const source = join(here, '..', '..', 'lua')
const target = join(here, 'lua')
const missing = FILES.filter((f) => !existsSync(join(source, f)))
if (missing.length > 0) {
  throw new Error(`no ${missing.join(', ')} in ${source}: build from a checkout of the repository`)
}
rmSync(target, { recursive: true, force: true })
mkdirSync(target)
for (const file of FILES) copyFileSync(join(source, file), join(target, file))
console.log(`copied ${FILES.join(', ')} from ${source}`)
