// Terminals through the JS SDK: a shell on a PTY with input, resize, exit code, kill, the
// environment and working directory given at creation, and a reconnect by pid.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { CommandExitError } from 'e2b'
import { withSandbox, until, slow } from './helpers.mjs'

const enc = (s) => new TextEncoder().encode(s)

test('a PTY runs a shell with input and resize', slow, () =>
  withSandbox(async (sbx) => {
    const chunks = []
    const text = () => Buffer.concat(chunks).toString('utf8')
    const terminal = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => chunks.push(Buffer.from(d)) })
    await sbx.pty.sendInput(terminal.pid, enc('stty size; tty; echo marker-$((6*7))\n'))
    await until(() => text().includes('marker-42'), 'the first marker')
    await sbx.pty.resize(terminal.pid, { cols: 100, rows: 40 })
    await sbx.pty.sendInput(terminal.pid, enc('stty size; whoami; exit 0\n'))
    const result = await terminal.wait()
    assert.equal(result.exitCode, 0)
    assert.match(text(), /24 80/)
    assert.match(text(), /40 100/)
    assert.match(text(), /\/dev\/pts\//)
    assert.match(text(), /\r\nuser\r\n/)
  }))

test('a PTY can be killed', slow, () =>
  withSandbox(async (sbx) => {
    const terminal = await sbx.pty.create({ cols: 80, rows: 24, onData: () => {} })
    assert.equal(await sbx.pty.kill(terminal.pid), true)
    await assert.rejects(terminal.wait(), CommandExitError)
  }))

test('a PTY starts in the working directory it was given', slow, () =>
  withSandbox(async (sbx) => {
    const chunks = []
    const terminal = await sbx.pty.create({ cols: 80, rows: 24, cwd: '/tmp', onData: (d) => chunks.push(Buffer.from(d)) })
    await sbx.pty.sendInput(terminal.pid, enc('echo "cwd=$(pwd)"; exit\n'))
    await terminal.wait()
    assert.match(Buffer.concat(chunks).toString(), /cwd=\/tmp\r\n/)
  }))

test('environment variables given at PTY creation are set in its shell', slow, () =>
  withSandbox(async (sbx) => {
    const chunks = []
    const terminal = await sbx.pty.create({
      cols: 80, rows: 24, envs: { PTY_GREETING: 'from-create' }, onData: (d) => chunks.push(Buffer.from(d)),
    })
    await sbx.pty.sendInput(terminal.pid, enc('echo "got=$PTY_GREETING"; exit\n'))
    await terminal.wait()
    assert.match(Buffer.concat(chunks).toString(), /got=from-create\r\n/)
  }))

test('reconnecting to a running PTY by pid delivers its output', slow, () =>
  withSandbox(async (sbx) => {
    const terminal = await sbx.pty.create({ cols: 80, rows: 24, onData: () => {} })
    await terminal.disconnect()
    const chunks = []
    const again = await sbx.pty.connect(terminal.pid, { onData: (d) => chunks.push(Buffer.from(d)) })
    await sbx.pty.sendInput(terminal.pid, enc('echo after-$((40+2)); exit\n'))
    const result = await again.wait()
    assert.equal(result.exitCode, 0)
    assert.match(Buffer.concat(chunks).toString(), /after-42/)
  }))
