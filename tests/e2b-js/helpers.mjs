// Shared pieces of the JS suite: a sandbox per test (killed afterwards, whatever happened) and a
// bounded wait for a condition inside a sandbox. run.mjs sets E2B_API_URL, E2B_SANDBOX_URL and
// E2B_API_KEY before any test file loads, so the SDK needs no options here.

import { Sandbox } from 'e2b'

/** `withSandbox` for an SDK's `Sandbox` class: runs `fn` with a fresh sandbox of it and kills it
 * afterwards. */
export function withSandboxOf(SandboxClass) {
  return async (fn, opts = {}) => {
    const sbx = await SandboxClass.create({ timeoutMs: 600_000, ...opts })
    try {
      return await fn(sbx)
    } finally {
      await sbx.kill().catch(() => {})
    }
  }
}

/** Runs `fn` with a fresh sandbox and kills it afterwards. */
export const withSandbox = withSandboxOf(Sandbox)

export const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms))

/** Polls `probe` until it returns a truthy value, at most `ms` milliseconds; fails with `what`. */
export async function until(probe, what, ms = 30_000) {
  const deadline = Date.now() + ms
  for (;;) {
    const value = await probe()
    if (value) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(100)
  }
}

/** Per-test options: a generous limit for TCG under load. */
export const slow = { timeout: 300_000 }
