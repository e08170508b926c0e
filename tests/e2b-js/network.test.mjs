// Networking through the JS SDK: internet access on and off, egress rules (allowOut / denyOut at
// create, updateNetwork later; these need the isolated network mode, so root), and host routing:
// getHost(port) names a server listening inside the sandbox, reached through the Vivarium server.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import { Sandbox, ALL_TRAFFIC } from 'e2b'
import { withSandbox, until, slow } from './helpers.mjs'

const MIRROR = 'curl -sS -m 10 -o /dev/null -w %{http_code} http://deb.debian.org/debian/dists/bookworm/Release'
const PYPI = 'curl -sS -m 10 -o /dev/null -w %{http_code} https://pypi.org/simple/six/'
const isolated = process.getuid() === 0 ? slow : { ...slow, skip: 'egress rules need the isolated network mode (root)' }

test('internet access on by default and off on request', slow, async () => {
  const online = await Sandbox.create({ timeoutMs: 300_000 })
  const offline = await Sandbox.create({ timeoutMs: 300_000, allowInternetAccess: false })
  try {
    assert.equal((await online.commands.run(`${MIRROR} || true`)).stdout, '200')
    assert.equal((await offline.commands.run(`${MIRROR.replace('-m 10', '-m 5')} || echo unreachable`)).stdout.includes('unreachable'), true)
    assert.equal((await offline.commands.run('echo works')).stdout, 'works\n')
    assert.equal((await offline.getInfo()).allowInternetAccess, false)
  } finally {
    await online.kill()
    await offline.kill()
  }
})

test('allowOut and denyOut at create, and updateNetwork later', isolated, () =>
  withSandbox(async (sbx) => {
    const info = await sbx.getInfo()
    assert.deepEqual(info.network?.allowOut, ['deb.debian.org'])
    assert.equal((await sbx.commands.run(MIRROR)).stdout, '200')
    const mirrorIp = (await sbx.commands.run('getent hosts deb.debian.org')).stdout.split(/\s+/)[0]
    // Everything else is refused: pypi.org by name (TLS closed before it starts).
    assert.equal((await sbx.commands.run(`${PYPI} || true`)).stdout, '000')
    await sbx.updateNetwork({ denyOut: ['deb.debian.org'] })
    assert.equal((await sbx.commands.run(`${PYPI} || true`)).stdout, '200')
    assert.equal((await sbx.commands.run(`${MIRROR} || true`)).stdout, '000')
    const pinned = MIRROR.replace('curl', `curl --resolve deb.debian.org:80:${mirrorIp}`)
    assert.equal((await sbx.commands.run(`${pinned} || true`)).stdout, '403')
    assert.deepEqual((await sbx.getInfo()).network?.denyOut, ['deb.debian.org'])
  }, { network: { allowOut: ['deb.debian.org'], denyOut: [ALL_TRAFFIC] } }))

/** GET `url` with its host name resolved to the Vivarium server's address. */
function get(url) {
  const server = new URL(process.env.E2B_API_URL)
  return new Promise((ok, fail) => {
    const req = http.get(url, {
      lookup: (_host, opts, cb) => (opts?.all ? cb(null, [{ address: server.hostname, family: 4 }]) : cb(null, server.hostname, 4)),
      timeout: 30_000,
    }, (res) => {
      const body = []
      res.on('data', (c) => body.push(c))
      res.on('end', () => ok({ status: res.statusCode, body: Buffer.concat(body).toString() }))
      res.on('error', fail)
    })
    req.on('timeout', () => req.destroy(new Error(`GET ${url} timed out`)))
    req.on('error', fail)
  })
}

test('getHost routes HTTP to a server listening on a port in the sandbox', slow, () =>
  withSandbox(async (sbx) => {
    await sbx.files.write('/home/user/site/index.html', 'served from the sandbox')
    await sbx.commands.run('python3 -m http.server 8000 --directory /home/user/site', { background: true })
    await until(async () => !['', '000'].includes(
      (await sbx.commands.run('curl -s -o /dev/null -w %{http_code} localhost:8000/ || true')).stdout), 'port 8000')
    const host = sbx.getHost(8000)
    assert.equal(host, `8000-${sbx.sandboxId}.localhost`)
    const port = new URL(process.env.E2B_API_URL).port
    const page = await get(`http://${host}:${port}/index.html`)
    assert.equal(page.status, 200)
    assert.equal(page.body, 'served from the sandbox')
    const closed = await get(`http://${sbx.getHost(9999)}:${port}/`)
    assert.equal(closed.status, 502)
    assert.match(closed.body, /9999/)
  }))
