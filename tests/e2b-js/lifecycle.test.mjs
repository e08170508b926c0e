// Sandbox lifecycle through the JS SDK: create with metadata, getInfo, list, kill; pause and
// connect with files and a running process kept; fork; named snapshots (create, list, start new
// sandboxes from one, delete); timeouts, metrics, signed file URLs.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, NotFoundError, AuthenticationError } from 'e2b'
import { withSandbox, sleep, until, slow } from './helpers.mjs'

test('create with metadata, getInfo, list and kill', slow, async () => {
  const sbx = await Sandbox.create({ metadata: { suite: 'e2b-js', case: 'lifecycle' }, timeoutMs: 600_000 })
  try {
    assert.equal(await sbx.isRunning(), true)
    const info = await sbx.getInfo()
    assert.equal(info.sandboxId, sbx.sandboxId)
    assert.equal(info.templateId, 'base')
    assert.deepEqual(info.metadata, { suite: 'e2b-js', case: 'lifecycle' })
    assert.equal(info.state, 'running')
    assert.ok(info.endAt > info.startedAt)
    const listed = await Sandbox.list({ query: { metadata: { case: 'lifecycle' } } }).nextItems()
    assert.deepEqual(listed.map((s) => s.sandboxId), [sbx.sandboxId])
    assert.deepEqual(await Sandbox.list({ query: { metadata: { case: 'no-such' } } }).nextItems(), [])
  } finally {
    assert.equal(await sbx.kill(), true)
  }
  assert.equal(await sbx.isRunning(), false)
  await assert.rejects(Sandbox.getInfo(sbx.sandboxId), NotFoundError)
  assert.equal(await Sandbox.kill(sbx.sandboxId), false, 'killing a gone sandbox reports false')
})

test('a wrong API key is refused', slow, async () => {
  await assert.rejects(Sandbox.create({ apiKey: 'e2b_' + '0'.repeat(40) }), AuthenticationError)
  await assert.rejects(Sandbox.list({ apiKey: 'e2b_' + '1'.repeat(40) }).nextItems(), AuthenticationError)
})

test('pause and connect keep files and a running process', slow, () =>
  withSandbox(async (sbx) => {
    await sbx.files.write('/home/user/kept.txt', 'still here')
    const counter = await sbx.commands.run(
      'i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done',
      { background: true },
    )
    await sbx.commands.run('while [ ! -s /tmp/count ]; do sleep 0.1; done')
    assert.equal(await sbx.pause(), true)
    assert.equal((await Sandbox.getInfo(sbx.sandboxId)).state, 'paused')
    const resumed = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 600_000 })
    assert.equal(resumed.sandboxId, sbx.sandboxId)
    assert.equal((await Sandbox.getInfo(sbx.sandboxId)).state, 'running')
    assert.equal(await resumed.files.read('/home/user/kept.txt'), 'still here')
    const before = Number((await resumed.commands.run('cat /tmp/count')).stdout)
    await sleep(500)
    const after = Number((await resumed.commands.run('cat /tmp/count')).stdout)
    assert.ok(after > before, `the loop runs again after the resume (${before} then ${after})`)
    assert.ok((await resumed.commands.list()).some((p) => p.pid === counter.pid))
  }))

test('fork copies files and running processes, and the forks diverge', slow, () =>
  withSandbox(async (sbx) => {
    await sbx.files.write('/home/user/state.txt', 'before fork')
    await sbx.commands.run('sleep 600', { background: true })
    const forks = await sbx.fork({ count: 2, timeoutMs: 300_000 })
    try {
      assert.equal(forks.length, 2)
      for (const fork of forks) {
        assert.ok(fork instanceof Sandbox, String(fork))
        assert.notEqual(fork.sandboxId, sbx.sandboxId)
        assert.equal(await fork.files.read('/home/user/state.txt'), 'before fork')
        assert.match((await fork.commands.run('ps -eo args')).stdout, /sleep 600/)
      }
      assert.notEqual(forks[0].sandboxId, forks[1].sandboxId)
      await forks[0].files.write('/home/user/state.txt', 'changed in fork 0')
      assert.equal(await forks[1].files.read('/home/user/state.txt'), 'before fork')
      assert.equal(await sbx.files.read('/home/user/state.txt'), 'before fork')
      assert.equal(await sbx.isRunning(), true)
      const single = await Sandbox.fork(sbx.sandboxId, { timeoutMs: 300_000 })
      assert.equal(single.length, 1)
      assert.ok(single[0] instanceof Sandbox, String(single[0]))
      forks.push(single[0])
      assert.equal(await single[0].files.read('/home/user/state.txt'), 'before fork')
    } finally {
      for (const fork of forks) if (fork instanceof Sandbox) await fork.kill().catch(() => {})
    }
  }))

test('a named snapshot starts new sandboxes and is listed', slow, () =>
  withSandbox(async (sbx) => {
    await sbx.files.write('/home/user/data.txt', 'snapshotted')
    const name = `js-suite-${Date.now()}`
    const snapshot = await sbx.createSnapshot({ name })
    assert.ok(snapshot.names.some((n) => n === name || n.startsWith(`${name}:`)), JSON.stringify(snapshot))
    const listed = await sbx.listSnapshots().nextItems()
    assert.ok(listed.some((s) => s.snapshotId === snapshot.snapshotId), JSON.stringify(listed))
    assert.equal(await sbx.isRunning(), true, 'the sandbox keeps running')
    const child = await Sandbox.create(name, { timeoutMs: 300_000 })
    try {
      assert.equal(await child.files.read('/home/user/data.txt'), 'snapshotted')
    } finally {
      await child.kill()
    }
  }))

test('snapshots are listed by name', {
  ...slow,
}, () =>
  withSandbox(async (sbx) => {
    const name = `js-named-${Date.now()}`
    const snapshot = await sbx.createSnapshot({ name })
    await sbx.createSnapshot({ name: `${name}-other` })
    const byName = await Sandbox.listSnapshots({ name }).nextItems()
    assert.deepEqual(byName.map((s) => s.snapshotId), [snapshot.snapshotId])
  }))

test('a snapshot is deleted through the SDK, and a second delete reports false', {
  ...slow,
}, () =>
  withSandbox(async (sbx) => {
    const snapshot = await sbx.createSnapshot({ name: `js-deleted-${Date.now()}` })
    assert.equal(await Sandbox.deleteSnapshot(snapshot.snapshotId), true)
    const after = await Sandbox.listSnapshots({ sandboxId: sbx.sandboxId }).nextItems()
    assert.ok(!after.some((s) => s.snapshotId === snapshot.snapshotId), JSON.stringify(after))
    assert.equal(await Sandbox.deleteSnapshot(snapshot.snapshotId), false)
  }))

test('a sandbox dies at its timeout, and setTimeout extends one', slow, async () => {
  const short = await Sandbox.create({ timeoutMs: 4_000 })
  const kept = await Sandbox.create({ timeoutMs: 4_000 })
  try {
    await kept.setTimeout(120_000)
    const gone = () => Sandbox.getInfo(short.sandboxId).then(() => false, (err) => {
      if (err instanceof NotFoundError) return true
      throw err
    })
    await until(gone, 'the short sandbox to be gone', 60_000)
    assert.equal(await short.isRunning(), false)
    assert.equal(await kept.isRunning(), true)
    assert.equal((await kept.commands.run('echo alive')).stdout, 'alive\n')
    assert.ok((await kept.getInfo()).endAt.getTime() > Date.now() + 60_000)
  } finally {
    await kept.kill()
  }
})

test('connect to a running sandbox never shortens its lifetime', {
  ...slow,
}, () =>
  withSandbox(async (sbx) => {
    const before = (await sbx.getInfo()).endAt.getTime()
    const again = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 30_000 })
    assert.equal(again.sandboxId, sbx.sandboxId)
    const after = (await sbx.getInfo()).endAt.getTime()
    assert.ok(after >= before - 1_000, `endAt moved from ${new Date(before).toISOString()} to ${new Date(after).toISOString()}`)
  }))

test('metrics report CPU, memory and disk', slow, () =>
  withSandbox(async (sbx) => {
    await sbx.commands.run('head -c 20000000 /dev/urandom > /tmp/blob')
    const samples = await sbx.getMetrics()
    assert.ok(samples.length >= 1)
    const sample = samples.at(-1)
    assert.ok(sample.cpuCount >= 1)
    assert.ok(sample.cpuUsedPct >= 0 && sample.cpuUsedPct <= 100)
    assert.ok(sample.memUsed > 0 && sample.memUsed < sample.memTotal)
    assert.ok(sample.diskUsed > 20_000_000 && sample.diskUsed < sample.diskTotal)
    assert.ok(sample.timestamp instanceof Date)
  }))

test('signed download and upload URLs work without the sandbox header, and a forged one is refused', {
  ...slow,
}, () =>
  withSandbox(async (sbx) => {
    await sbx.files.write('/home/user/signed.txt', 'signed content')
    const down = await sbx.downloadUrl('/home/user/signed.txt', { useSignatureExpiration: 60 })
    const res = await fetch(down)
    assert.equal(res.status, 200)
    assert.equal(await res.text(), 'signed content')
    const forged = new URL(down)
    forged.searchParams.set('signature', 'v1_forged')
    assert.ok([401, 403].includes((await fetch(forged)).status))
    const up = await sbx.uploadUrl('/home/user/uploaded.txt', { useSignatureExpiration: 60 })
    const form = new FormData()
    form.append('file', new Blob(['uploaded through a signed URL']), 'uploaded.txt')
    assert.equal((await fetch(up, { method: 'POST', body: form })).status, 200)
    assert.equal(await sbx.files.read('/home/user/uploaded.txt'), 'uploaded through a signed URL')
  }, { secure: true }))
