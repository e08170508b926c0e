// `runCode` of @e2b/code-interpreter: results and state, streaming callbacks, errors, execution
// counts, env vars, every language, rich results and charts.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox } from '@e2b/code-interpreter'
import { withSandbox, slow } from './helpers.mjs'

test('python results, state, streams and errors', slow, () => withSandbox(async (sbx) => {
  const first = await sbx.runCode('x = 40\nx + 2')
  assert.equal(first.error, undefined)
  assert.equal(first.text, '42')
  assert.equal(first.results[0].isMainResult, true)
  assert.equal((await sbx.runCode('x * 10')).text, '400')

  const lines = []
  const streamed = await sbx.runCode(
    "import sys, time\nprint('one', flush=True)\ntime.sleep(1)\nprint('two', file=sys.stderr, flush=True)",
    { onStdout: (m) => lines.push(['out', m.line]), onStderr: (m) => lines.push(['err', m.line]) },
  )
  assert.deepEqual(lines, [['out', 'one\n'], ['err', 'two\n']])
  assert.deepEqual(streamed.logs.stdout, ['one\n'])
  assert.deepEqual(streamed.logs.stderr, ['two\n'])

  const errors = []
  const failed = await sbx.runCode('def f():\n    return 1 / 0\nf()', { onError: (e) => errors.push(e) })
  assert.equal(failed.error.name, 'ZeroDivisionError')
  assert.equal(failed.error.value, 'division by zero')
  assert.match(failed.error.traceback, /ZeroDivisionError/)
  assert.equal(errors.length, 1)

  const a = await sbx.runCode('1')
  const b = await sbx.runCode('1', { envs: { HELPER: 'runs' } })
  assert.equal(b.executionCount, a.executionCount + 1)
}))

test('env vars: per run and the sandbox\'s', slow, async () => {
  const sbx = await Sandbox.create({ timeoutMs: 600_000, envs: { FROM_SANDBOX: 'sandbox-value' } })
  try {
    const read = "import os; os.environ.get('FROM_SANDBOX'), os.environ.get('PER_RUN')"
    assert.equal((await sbx.runCode(read)).text, "('sandbox-value', None)")
    assert.equal((await sbx.runCode(read, { envs: { PER_RUN: 'yes' } })).text, "('sandbox-value', 'yes')")
    assert.equal((await sbx.runCode(read)).text, "('sandbox-value', None)")
    assert.equal((await sbx.runCode('process.env.FROM_SANDBOX', { language: 'js' })).text, 'sandbox-value')
  } finally {
    await sbx.kill().catch(() => {})
  }
})

test('every language keeps state and prints', slow, () => withSandbox(async (sbx) => {
  const cases = [
    ['javascript', 'let base = 40', 'base + 2', '42'],
    ['typescript', 'const t: number = 40', 't + 2', '42'],
    ['r', 'base <- 40', 'base + 2', '[1] 42'],
    ['java', 'int base = 40;', 'base + 2', '42'],
  ]
  for (const [language, define, use, expected] of cases) {
    const defined = await sbx.runCode(define, { language })
    assert.equal(defined.error, undefined, `${language}: ${JSON.stringify(defined.error)}`)
    const used = await sbx.runCode(use, { language })
    assert.equal(used.text.trim(), expected, `${language}: ${JSON.stringify(used)}`)
  }
  const bash = await sbx.runCode('B=41; echo $((B + 1))', { language: 'bash' })
  assert.deepEqual(bash.logs.stdout, ['42\n'])
}))

test('rich results: html, dataframe data, png and charts', slow, () => withSandbox(async (sbx) => {
  const shown = await sbx.runCode("from IPython.display import display, HTML\ndisplay(HTML('<i>hi</i>'))\n'main'")
  assert.equal(shown.results.length, 2)
  assert.match(shown.results[0].html, /<i>hi<\/i>/)
  assert.equal(shown.results[0].isMainResult, false)
  assert.equal(shown.results[1].isMainResult, true)

  const frame = await sbx.runCode("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
  assert.ok(frame.results[0].data, JSON.stringify(frame.results[0]))
  assert.match(frame.results[0].html, /<table/)

  const chart = await sbx.runCode(
    "import matplotlib.pyplot as plt\nplt.bar(['x', 'y'], [3, 4])\nplt.title('Bars')\nplt.show()",
  )
  const figure = chart.results.find((r) => r.png)
  assert.ok(figure, JSON.stringify(chart.results))
  assert.ok(Buffer.from(figure.png, 'base64').subarray(0, 4).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47])))
  assert.equal(figure.chart.type, 'bar')
  assert.equal(figure.chart.title, 'Bars')
  assert.deepEqual(figure.chart.elements.map((e) => [e.label, e.value]), [['x', 3], ['y', 4]])
}))
