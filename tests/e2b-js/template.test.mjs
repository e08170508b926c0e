// Template builds through the JS SDK's `Template`: a build from E2B's base image with a command,
// a copied file, environment and workdir, a sandbox started from the built template, and Template.exists.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Template } from 'e2b'
import { withSandbox } from './helpers.mjs'

test('Template.build from the base image, then a sandbox from the built template', {
  timeout: 240_000,
}, async (t) => {
  const name = `js-suite-tpl-${Date.now()}`
  const context = mkdtempSync(join(tmpdir(), 'viv-e2b-js-context-'))
  t.after(() => rmSync(context, { recursive: true, force: true }))
  writeFileSync(join(context, 'copied.txt'), 'copied into the template\n')
  const template = Template({ fileContextPath: context })
    .fromBaseImage()
    .copy('copied.txt', '/home/user/copied.txt')
    .setEnvs({ BUILT_BY: 'e2b-js' })
    .runCmd('echo "built $BUILT_BY" > /home/user/built.txt')
    .setWorkdir('/home/user')
  const logs = []
  const build = await Template.build(template, name, { cpuCount: 1, memoryMB: 512, onBuildLogs: (l) => logs.push(l) })
  assert.ok(build.templateId, JSON.stringify(build))
  assert.equal(await Template.exists(name), true)
  assert.equal(await Template.exists(`${name}-missing`), false)
  await withSandbox(async (sbx) => {
    assert.equal(await sbx.files.read('/home/user/built.txt'), 'built e2b-js\n')
    assert.equal(await sbx.files.read('/home/user/copied.txt'), 'copied into the template\n')
    assert.equal((await sbx.commands.run('echo $BUILT_BY')).stdout, 'e2b-js\n')
  }, { template: name })
  assert.ok(logs.length > 0, 'the build reports its logs')
})
