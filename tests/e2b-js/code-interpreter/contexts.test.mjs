// Contexts through @e2b/code-interpreter, and failures: timeouts interrupt the kernel, a
// sandbox killed mid-execution ends the call with the SDK's error.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox } from '@e2b/code-interpreter'
import { withSandbox, slow } from './helpers.mjs'

// Each new or restarted context starts a Jupyter kernel: under TCG on a loaded two-core host that
// took longer than the SDK's default 60 s request timeout once, so this sandbox's requests get
// the SDK's `requestTimeoutMs` option, as a user on a slow host would set it.
test('contexts: create, isolate, list, restart, remove', slow, () => withSandbox(async (sbx) => {
  const defaults = (await sbx.listCodeContexts()).map((c) => c.language)
  assert.deepEqual(defaults.slice(0, 2), ['python', 'javascript'])
  const first = await sbx.createCodeContext()
  const second = await sbx.createCodeContext({ cwd: '/tmp', language: 'python' })
  assert.equal(first.cwd, '/home/user')
  assert.equal(second.cwd, '/tmp')
  await sbx.runCode("secret = 'here'", { context: first })
  assert.equal((await sbx.runCode('secret', { context: second })).error.name, 'NameError')
  assert.equal((await sbx.runCode('import os; os.getcwd()', { context: second })).text, '/tmp')
  const ids = (await sbx.listCodeContexts()).map((c) => c.id)
  assert.ok(ids.indexOf(first.id) < ids.indexOf(second.id))
  await sbx.restartCodeContext(first)
  assert.equal((await sbx.runCode('secret', { context: first })).error.name, 'NameError')
  await sbx.removeCodeContext(second)
  assert.ok(!(await sbx.listCodeContexts()).some((c) => c.id === second.id))
  await assert.rejects(sbx.runCode('1', { context: second }), (err) => err.name === 'NotFoundError')
}, { requestTimeoutMs: 180_000 }))

test('a timeout interrupts the kernel, which answers again at once', slow, () => withSandbox(async (sbx) => {
  await sbx.runCode("state = 'kept'")
  await assert.rejects(sbx.runCode('while True:\n    pass', { timeoutMs: 3000 }), (err) => err.name === 'TimeoutError')
  assert.equal((await sbx.runCode('state', { timeoutMs: 30_000 })).text, 'kept')
}))

test('a sandbox killed mid-execution ends the call with the SDK\'s error', slow, async () => {
  const sbx = await Sandbox.create({ timeoutMs: 600_000 })
  const timer = setTimeout(() => sbx.kill().catch(() => {}), 3000)
  try {
    await assert.rejects(sbx.runCode('import time; time.sleep(60)', { timeoutMs: 120_000 }), (err) => {
      assert.match(String(err.message), /killed|not found/i)
      return true
    })
  } finally {
    clearTimeout(timer)
    await sbx.kill().catch(() => {})
  }
})
