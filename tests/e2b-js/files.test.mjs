// Files through the JS SDK: text and bytes (ArrayBuffer, Blob, stream), listing with depth,
// exists, getInfo, makeDir, rename, remove, permissions, and several files in one write call.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { FileType, NotFoundError } from 'e2b'
import { withSandbox, slow } from './helpers.mjs'

test('text and bytes round-trip', slow, () =>
  withSandbox(async (sbx) => {
    const info = await sbx.files.write('/home/user/hello.txt', 'héllo\n')
    assert.equal(info.path, '/home/user/hello.txt')
    assert.equal(info.name, 'hello.txt')
    assert.equal(await sbx.files.read('/home/user/hello.txt'), 'héllo\n')
    const blob = new Uint8Array(1024).map((_, i) => i % 256)
    await sbx.files.write('/home/user/blob.bin', blob.buffer)
    assert.deepEqual(await sbx.files.read('/home/user/blob.bin', { format: 'bytes' }), blob)
    const asBlob = await sbx.files.read('/home/user/blob.bin', { format: 'blob' })
    assert.deepEqual(new Uint8Array(await asBlob.arrayBuffer()), blob)
    assert.equal((await sbx.commands.run('stat -c %U /home/user/blob.bin')).stdout, 'user\n')
    assert.equal((await sbx.commands.run('sha256sum < /home/user/hello.txt | cut -c1-8')).stdout,
      (await import('node:crypto')).createHash('sha256').update('héllo\n').digest('hex').slice(0, 8) + '\n')
  }))

test('large uploads from a Blob and a stream, and a streamed download', slow, () =>
  withSandbox(async (sbx) => {
    const data = randomBytes(8 << 20)
    await sbx.files.write('/tmp/big.bin', new Blob([data]))
    assert.ok(Buffer.from(await sbx.files.read('/tmp/big.bin', { format: 'bytes' })).equals(data))
    const chunks = [Buffer.alloc(1000, 'a'), Buffer.alloc(1000, 'b')]
    const stream = new ReadableStream({
      start(controller) {
        for (const c of chunks) controller.enqueue(new Uint8Array(c))
        controller.close()
      },
    })
    await sbx.files.write('/tmp/chunks.bin', stream)
    const down = await sbx.files.read('/tmp/chunks.bin', { format: 'stream' })
    const parts = []
    for await (const part of down) parts.push(Buffer.from(part))
    assert.ok(Buffer.concat(parts).equals(Buffer.concat(chunks)))
    await sbx.files.write('/tmp/gzipped.txt', 'compressible '.repeat(10_000), { gzip: true })
    assert.equal(await sbx.files.read('/tmp/gzipped.txt', { gzip: true }), 'compressible '.repeat(10_000))
  }))

test('list with depth, exists and getInfo', slow, () =>
  withSandbox(async (sbx) => {
    await sbx.files.write('/home/user/tree/a.txt', 'a')
    await sbx.files.write('/home/user/tree/sub/b.txt', 'bb')
    const top = (await sbx.files.list('/home/user/tree')).map((e) => e.name).sort()
    assert.deepEqual(top, ['a.txt', 'sub'])
    const deep = (await sbx.files.list('/home/user/tree', { depth: 2 })).map((e) => e.path)
    assert.ok(deep.includes('/home/user/tree/sub/b.txt'), JSON.stringify(deep))
    assert.equal(await sbx.files.exists('/home/user/tree/sub/b.txt'), true)
    assert.equal(await sbx.files.exists('/home/user/tree/nope'), false)
    const info = await sbx.files.getInfo('/home/user/tree/sub/b.txt')
    assert.equal(info.size, 2)
    assert.equal(info.type, FileType.FILE)
    assert.equal(info.owner, 'user')
    assert.equal((await sbx.files.getInfo('/home/user/tree/sub')).type, FileType.DIR)
    await assert.rejects(sbx.files.getInfo('/home/user/tree/nope'), NotFoundError)
  }))

test('makeDir, rename and remove', slow, () =>
  withSandbox(async (sbx) => {
    assert.equal(await sbx.files.makeDir('/home/user/new/nested'), true)
    assert.equal(await sbx.files.makeDir('/home/user/new/nested'), false, 'an existing directory reports false')
    await sbx.files.write('/home/user/new/nested/f.txt', 'x')
    const moved = await sbx.files.rename('/home/user/new/nested/f.txt', '/home/user/new/g.txt')
    assert.equal(moved.path, '/home/user/new/g.txt')
    assert.equal(await sbx.files.read('/home/user/new/g.txt'), 'x')
    assert.equal(await sbx.files.exists('/home/user/new/nested/f.txt'), false)
    await sbx.files.remove('/home/user/new')
    assert.equal(await sbx.files.exists('/home/user/new'), false)
    await assert.rejects(sbx.files.read('/home/user/new/g.txt'), NotFoundError)
  }))

test('files as root, and a permission error for the default user', slow, () =>
  withSandbox(async (sbx) => {
    await sbx.files.write('/root/secret.txt', 's', { user: 'root' })
    assert.equal(await sbx.files.read('/root/secret.txt', { user: 'root' }), 's')
    await assert.rejects(sbx.files.read('/root/secret.txt'))
  }))

// The JS SDK sends these as one multipart body (one part per file, its path as the file name).
test('several files in one write call: absolute, relative, nested, as root', slow, () =>
  withSandbox(async (sbx) => {
    const written = await sbx.files.write([
      { path: '/home/user/multi/a.txt', data: 'first' },
      { path: '/home/user/multi/sub/b.bin', data: new Uint8Array([0, 1, 2, 255]).buffer },
      { path: '/home/user/multi/c.txt', data: new Blob(['third']) },
    ])
    assert.deepEqual(written.map((w) => w.path).sort(),
      ['/home/user/multi/a.txt', '/home/user/multi/c.txt', '/home/user/multi/sub/b.bin'])
    assert.equal(await sbx.files.read('/home/user/multi/a.txt'), 'first')
    assert.deepEqual(await sbx.files.read('/home/user/multi/sub/b.bin', { format: 'bytes' }), new Uint8Array([0, 1, 2, 255]))
    assert.equal(await sbx.files.read('/home/user/multi/c.txt'), 'third')
    const ten = Array.from({ length: 10 }, (_, i) => ({ path: `rel/file${i}.txt`, data: `file ${i}` }))
    const relative = await sbx.files.write(ten)
    assert.deepEqual(relative.map((w) => w.path), ten.map((f) => `/home/user/${f.path}`))
    assert.equal((await sbx.commands.run('cat /home/user/rel/file7.txt; stat -c %U /home/user/rel/file7.txt')).stdout, 'file 7user\n')
    const asRoot = await sbx.files.write(ten.slice(0, 2), { user: 'root' })
    assert.deepEqual(asRoot.map((w) => w.path), ['/root/rel/file0.txt', '/root/rel/file1.txt'])
    assert.equal(await sbx.files.read('/root/rel/file1.txt', { user: 'root' }), 'file 1')
    assert.deepEqual(await sbx.files.write([]), [])
  }))
