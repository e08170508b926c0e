// Commands through the JS SDK: foreground runs with streamed output, exit codes as
// CommandExitError, background handles (wait, list, kill), stdin, environment, working directory
// and user, a command timeout, reconnecting by pid, and the sandbox killed under a stream.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { CommandExitError, Sandbox, SandboxNotFoundError, TimeoutError } from 'e2b'
import { withSandbox, until, slow } from './helpers.mjs'

test('a foreground run streams stdout and stderr and reports exit codes', slow, () =>
  withSandbox(async (sbx) => {
    const out = []
    const err = []
    const result = await sbx.commands.run('for i in 1 2 3; do echo out$i; echo err$i >&2; done', {
      onStdout: (d) => out.push(d),
      onStderr: (d) => err.push(d),
    })
    assert.equal(result.exitCode, 0)
    assert.equal(result.stdout, 'out1\nout2\nout3\n')
    assert.equal(result.stderr, 'err1\nerr2\nerr3\n')
    assert.equal(out.join(''), result.stdout)
    assert.equal(err.join(''), result.stderr)
    const failed = await sbx.commands.run('echo partial; echo oops >&2; exit 3').then(
      () => assert.fail('a non-zero exit resolved'),
      (e) => e,
    )
    assert.ok(failed instanceof CommandExitError, String(failed))
    assert.equal(failed.exitCode, 3)
    assert.equal(failed.stdout, 'partial\n')
    assert.equal(failed.stderr, 'oops\n')
  }))

test('background commands can be waited for, listed and killed', slow, () =>
  withSandbox(async (sbx) => {
    const handle = await sbx.commands.run('sleep 0.5; echo done', { background: true })
    const done = await handle.wait()
    assert.equal(done.stdout, 'done\n')
    assert.equal(done.exitCode, 0)
    const sleeper = await sbx.commands.run('sleep 300', { background: true })
    const listed = await sbx.commands.list()
    assert.ok(listed.some((p) => p.pid === sleeper.pid), `pid ${sleeper.pid} in ${JSON.stringify(listed)}`)
    const sleeperProc = listed.find((p) => p.pid === sleeper.pid)
    assert.match([sleeperProc.cmd, ...sleeperProc.args].join(' '), /sleep 300/)
    assert.equal(await sbx.commands.kill(sleeper.pid), true)
    await assert.rejects(sleeper.wait(), CommandExitError)
    assert.ok(!(await sbx.commands.list()).some((p) => p.pid === sleeper.pid))
    assert.equal(await sbx.commands.kill(sleeper.pid), false, 'killing a gone process reports false')
  }))

test('stdin reaches a process and closing it ends the input', slow, () =>
  withSandbox(async (sbx) => {
    const reader = await sbx.commands.run('read line; echo got:$line', { background: true, stdin: true })
    await sbx.commands.sendStdin(reader.pid, 'hello\n')
    assert.equal((await reader.wait()).stdout, 'got:hello\n')
    const cat = await sbx.commands.run('cat', { background: true, stdin: true })
    await sbx.commands.sendStdin(cat.pid, 'one ')
    await sbx.commands.sendStdin(cat.pid, new TextEncoder().encode('two\n'))
    await sbx.commands.closeStdin(cat.pid)
    assert.equal((await cat.wait()).stdout, 'one two\n')
  }))

test('environment, working directory and user', slow, () =>
  withSandbox(async (sbx) => {
    assert.equal((await sbx.commands.run('pwd')).stdout, '/home/user\n')
    assert.equal((await sbx.commands.run('pwd', { cwd: '/tmp' })).stdout, '/tmp\n')
    assert.equal((await sbx.commands.run('whoami')).stdout, 'user\n')
    assert.equal((await sbx.commands.run('whoami; echo $HOME', { user: 'root' })).stdout, 'root\n/root\n')
    assert.equal((await sbx.commands.run('echo $A-$B', { envs: { A: '1', B: 'two words' } })).stdout, '1-two words\n')
  }, { envs: { GREETING: 'hi' } }))

test('sandbox-wide environment variables given at create', slow, () =>
  withSandbox(async (sbx) => {
    assert.equal((await sbx.commands.run('echo $GREETING')).stdout, 'hi\n')
    assert.equal((await sbx.commands.run('echo $GREETING', { envs: { GREETING: 'over' } })).stdout, 'over\n')
  }, { envs: { GREETING: 'hi' } }))

test('a command that outlives its timeout ends with TimeoutError', slow, () =>
  withSandbox(async (sbx) => {
    const started = Date.now()
    await assert.rejects(sbx.commands.run('sleep 30', { timeoutMs: 2_000 }), TimeoutError)
    assert.ok(Date.now() - started < 20_000, `took ${Date.now() - started} ms`)
  }))

test('a background handle reconnects by pid', slow, () =>
  withSandbox(async (sbx) => {
    const handle = await sbx.commands.run('sleep 1; echo late', { background: true })
    await handle.disconnect()
    const again = await sbx.commands.connect(handle.pid)
    const result = await again.wait()
    assert.equal(result.stdout, 'late\n')
  }))

test('killing the sandbox while a command streams ends the stream as E2B does', slow, async () => {
  const sbx = await Sandbox.create({ timeoutMs: 600_000 })
  try {
    const ticks = []
    const handle = await sbx.commands.run('while true; do echo tick; sleep 0.2; done', {
      background: true,
      onStdout: (d) => ticks.push(d),
    })
    await until(() => ticks.length > 0, 'the first tick')
    assert.equal(await Sandbox.kill(sbx.sandboxId), true)
    await assert.rejects(handle.wait(), /sandbox was killed or reached its end of life/i)
    await assert.rejects(sbx.commands.run('true'), SandboxNotFoundError)
  } finally {
    await sbx.kill().catch(() => {})
  }
})
