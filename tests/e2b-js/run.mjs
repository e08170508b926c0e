// The E2B compatibility suite for the official `e2b` npm package (pinned in package.json and
// package-lock.json), against a Vivarium server this script starts, as tests/e2b/conftest.py does
// for the Python SDK: a scratch data directory (the image cache is shared), an API key from
// `viv keys create`, and E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY for the SDK. As root the
// server uses the isolated network mode with the pool in VIV_TEST_NET_POOL. VIV_BIN names the
// binary (default: target/debug/viv of this checkout).
//
// E2B_JS_SUITE=code-interpreter runs the suite of the `@e2b/code-interpreter` package instead
// (code-interpreter/*.test.mjs): its server also gets the host layer cache in
// $VIV_CACHE_DIR/layers and builds the built-in template `code-interpreter-v1` with
// `viv template build --builtin code-interpreter` before the tests (its output in build.log of
// the data directory, and in the report when it fails); its last line says `code-interpreter-js:`.
//
// Runs every *.test.mjs beside this file with Node's test runner (one file at a time; the tests
// of a file in order), prints the runner's own report, the number of tests marked `todo`
// (expected failures of a known gap: they run and are reported, but do not fail the suite), and
// last the line `e2b-js: N passed, N failed` (a run that could not report counts as 1 failed;
// cancelled tests count as failed). Exits non-zero when anything failed. Arguments, when given,
// name the test files to run instead of all of them. Whatever happens, the server stops (taking
// its sandboxes along) and its data directory goes.

import { spawn, execFileSync } from 'node:child_process'
import { createWriteStream, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync, existsSync } from 'node:fs'
import { createHash } from 'node:crypto'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { run } from 'node:test'
import { spec } from 'node:test/reporters'

const here = dirname(fileURLToPath(import.meta.url))
const suite = process.env.E2B_JS_SUITE || 'e2b-js'
if (!['e2b-js', 'code-interpreter'].includes(suite)) throw new Error(`unknown E2B_JS_SUITE '${suite}'`)
const codeInterpreter = suite === 'code-interpreter'
const testDir = codeInterpreter ? join(here, 'code-interpreter') : here
const label = codeInterpreter ? 'code-interpreter-js' : 'e2b-js'
const root = resolve(here, '..', '..')
const viv = process.env.VIV_BIN || join(root, 'target', 'debug', 'viv')

function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer()
    srv.once('error', fail)
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address()
      srv.close(() => ok(port))
    })
  })
}

const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms))

async function startServer() {
  const data = mkdtempSync(join(tmpdir(), 'viv-e2b-js-'))
  const port = await freePort()
  const url = `http://127.0.0.1:${port}`
  const args = [
    'serve', '--listen', `127.0.0.1:${port}`, '--data-dir', data,
    '--accel', process.env.VIV_ACCEL || 'auto', '--memory-mib', codeInterpreter ? '1024' : '512',
    // The suite's server takes its sandboxes along when it stops.
    '--on-shutdown', 'kill',
  ]
  if (codeInterpreter) {
    args.push('--layer-cache-dir', join(process.env.VIV_CACHE_DIR || '/var/cache/vivarium', 'layers'))
  }
  // Root gets the production network mode (a namespace per sandbox, egress rules).
  if (process.getuid() === 0) {
    const pool = process.env.VIV_TEST_NET_POOL || (codeInterpreter ? '10.234.0.0/24' : '10.235.0.0/24')
    args.push('--network', 'isolated', '--net-pool', pool)
  }
  // Egress here may intercept TLS with a CA the host added to its trust store; sandboxes get it.
  const extra = '/usr/local/share/ca-certificates'
  const pems = existsSync(extra)
    ? readdirSync(extra).filter((f) => f.endsWith('.crt')).sort().map((f) => readFileSync(join(extra, f)))
    : []
  if (pems.length > 0) {
    writeFileSync(join(data, 'guest-ca.pem'), Buffer.concat(pems))
    args.push('--guest-ca-file', join(data, 'guest-ca.pem'))
  }
  const log = createWriteStream(join(data, 'serve.log'))
  await new Promise((ok) => log.once('open', ok))
  const proc = spawn(viv, args, {
    stdio: ['ignore', log, log],
    env: { ...process.env, VIV_LOG: process.env.VIV_LOG || 'warn' },
  })
  let exited = false
  proc.once('exit', () => { exited = true })
  proc.once('error', (err) => {
    exited = true
    log.write(`cannot run ${viv}: ${err.message}\n`)
  })
  const server = { data, url, proc, get exited() { return exited } }
  const deadline = Date.now() + 600_000
  for (;;) {
    try {
      const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) })
      await res.arrayBuffer()
      break
    } catch {
      if (exited || Date.now() > deadline) {
        const output = readFileSync(join(data, 'serve.log'), 'utf8')
        await stopServer(server, false)
        throw new Error('viv serve did not start: ' + output)
      }
      await sleep(200)
    }
  }
  const key = execFileSync(viv, ['keys', 'create', '--data-dir', data, '--name', 'e2b-js-suite'], {
    encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'],
  }).trim()
  return { ...server, key }
}

/** Builds the built-in code interpreter template through the CLI; throws with the build's end on failure. */
async function buildCodeInterpreter(server) {
  const started = Date.now()
  const log = join(server.data, 'build.log')
  const out = createWriteStream(log)
  await new Promise((ok) => out.once('open', ok))
  const build = spawn(viv, ['template', 'build', '--builtin', 'code-interpreter'], {
    stdio: ['ignore', out, out],
    env: { ...process.env, VIV_API_URL: server.url, VIV_API_KEY: server.key },
  })
  const code = await new Promise((ok) => build.once('exit', ok))
  if (code !== 0) {
    throw new Error('building the code interpreter template failed:\n' + readFileSync(log, 'utf8').slice(-6000))
  }
  console.log(`${label}: code-interpreter template built in ${Math.round((Date.now() - started) / 1000)} s`)
}

/** Stops the server (its sandboxes go with it) and removes its data; `showLog`: print the end of its log first. */
async function stopServer(server, showLog) {
  if (!server.exited) {
    const gone = new Promise((ok) => server.proc.once('exit', ok))
    server.proc.kill('SIGTERM')
    const timer = setTimeout(() => server.proc.kill('SIGKILL'), 60_000)
    await gone
    clearTimeout(timer)
  }
  if (showLog) {
    const lines = readFileSync(join(server.data, 'serve.log'), 'utf8').trimEnd().split('\n')
    if (lines.join('') !== '') console.log(`${label}: the last lines of the server's log:\n${lines.slice(-40).join('\n')}`)
  }
  const shm = '/dev/shm/vivarium-' + createHash('sha256').update(server.data).digest('hex').slice(0, 8)
  rmSync(shm, { recursive: true, force: true })
  rmSync(server.data, { recursive: true, force: true })
}

const files = (process.argv.length > 2 ? process.argv.slice(2) : readdirSync(testDir).filter((f) => f.endsWith('.test.mjs')).sort())
  .map((f) => resolve(testDir, f))
const started = Date.now()
const server = await startServer()
let stopping = false
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, async () => {
    if (stopping) return
    stopping = true
    await stopServer(server, false)
    process.exit(130)
  })
}
if (codeInterpreter) {
  try {
    await buildCodeInterpreter(server)
  } catch (err) {
    console.error(`${label}: ${err.message}`)
    stopping = true
    await stopServer(server, true)
    console.log(`${label}: 0 passed, 1 failed`)
    process.exit(1)
  }
}
process.env.E2B_API_URL = server.url
process.env.E2B_SANDBOX_URL = server.url
process.env.E2B_API_KEY = server.key

// The root test's closing diagnostics carry the counts ("pass 3", "fail 1", "todo 1", ...).
const counts = {}
try {
  const stream = run({ files, concurrency: 1, timeout: 600_000 })
  stream.on('test:diagnostic', (d) => {
    const m = /^(tests|pass|fail|cancelled|skipped|todo) (\d+)$/.exec(d.message)
    if (m && d.nesting === 0) counts[m[1]] = Number(m[2])
  })
  for await (const chunk of stream.compose(spec)) process.stdout.write(chunk)
} catch (err) {
  console.error(`${label}: the test runner failed:`, err)
}
const passed = counts.pass ?? 0
const reported = 'pass' in counts
const failed = reported ? (counts.fail ?? 0) + (counts.cancelled ?? 0) : 1
if (!stopping) {
  stopping = true
  await stopServer(server, failed > 0)
}
console.log(`${label} suite took ${Math.round((Date.now() - started) / 1000)} s`)
console.log(`${label}: ${counts.todo ?? 0} todo (expected failures of known gaps, marked # in the report above)`)
console.log(`${label}: ${passed} passed, ${failed} failed`)
process.exit(failed === 0 ? 0 : 1)
