// Shared pieces of the code interpreter suite: a sandbox of `@e2b/code-interpreter` per test
// (killed afterwards, whatever happened), and per-test options generous enough for TCG.

import { Sandbox } from '@e2b/code-interpreter'

/** Runs `fn` with a fresh code interpreter sandbox and kills it afterwards. */
export async function withSandbox(fn, opts = {}) {
  const sbx = await Sandbox.create({ timeoutMs: 600_000, ...opts })
  try {
    return await fn(sbx)
  } finally {
    await sbx.kill().catch(() => {})
  }
}

export const slow = { timeout: 300_000 }
