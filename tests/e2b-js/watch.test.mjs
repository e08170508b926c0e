// Directory watchers through the JS SDK: the event stream of watchDir, recursive and not, and
// stopping it.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { FilesystemEventType } from 'e2b'
import { withSandbox, until, slow } from './helpers.mjs'

const has = (events, name, type) => events.some((e) => e.name === name && e.type === type)

test('watchDir streams creates, writes, renames, removes and chmods, recursively', slow, () =>
  withSandbox(async (sbx) => {
    await sbx.files.makeDir('/home/user/w')
    const events = []
    const handle = await sbx.files.watchDir('/home/user/w', (e) => events.push(e), { recursive: true })
    await sbx.files.write('/home/user/w/a.txt', '1')
    await sbx.commands.run(
      'mkdir /home/user/w/sub && sleep 0.2 && echo x > /home/user/w/sub/b.txt'
        + ' && mv /home/user/w/a.txt /home/user/w/c.txt && rm /home/user/w/c.txt'
        + ' && chmod 600 /home/user/w/sub/b.txt',
    )
    const expected = [
      ['a.txt', FilesystemEventType.CREATE],
      ['a.txt', FilesystemEventType.WRITE],
      ['sub', FilesystemEventType.CREATE],
      ['sub/b.txt', FilesystemEventType.CREATE],
      ['sub/b.txt', FilesystemEventType.WRITE],
      ['a.txt', FilesystemEventType.RENAME],
      ['c.txt', FilesystemEventType.CREATE],
      ['c.txt', FilesystemEventType.REMOVE],
      ['sub/b.txt', FilesystemEventType.CHMOD],
    ]
    await until(() => expected.every(([n, t]) => has(events, n, t)), 'every event', 20_000).catch(() => {})
    for (const [name, type] of expected) {
      assert.ok(has(events, name, type), `${name} ${type} missing from ${JSON.stringify(events)}`)
    }
    await handle.stop()
    const seen = events.length
    await sbx.files.write('/home/user/w/after-stop.txt', 'x')
    await sbx.commands.run('sleep 1')
    assert.equal(events.length, seen, 'no events after stop')
  }))

test('watchDir without recursion ignores subdirectories', slow, () =>
  withSandbox(async (sbx) => {
    await sbx.commands.run('mkdir -p /home/user/flat/deep')
    const names = []
    const handle = await sbx.files.watchDir('/home/user/flat', (e) => names.push(e.name))
    await sbx.commands.run('touch /home/user/flat/deep/x && touch /home/user/flat/top')
    await until(() => names.includes('top'), 'the event for top')
    assert.ok(!names.includes('deep/x'), JSON.stringify(names))
    await handle.stop()
  }))

test('watchDir of a missing directory is refused', slow, () =>
  withSandbox(async (sbx) => {
    await assert.rejects(sbx.files.watchDir('/home/user/no-such-dir', () => {}))
  }))

test('watch events carry entry info when asked', {
  ...slow,
}, () =>
  withSandbox(async (sbx) => {
    await sbx.files.makeDir('/home/user/we')
    const events = []
    const handle = await sbx.files.watchDir('/home/user/we', (e) => events.push(e), { includeEntry: true })
    await sbx.files.write('/home/user/we/e.txt', 'four')
    await until(() => events.some((e) => e.name === 'e.txt' && e.entry), 'an event with its entry')
    const event = events.find((e) => e.name === 'e.txt' && e.entry)
    assert.equal(event.entry.path, '/home/user/we/e.txt')
    await handle.stop()
  }))
