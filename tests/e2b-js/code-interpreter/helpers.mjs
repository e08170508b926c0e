// Shared pieces of the code interpreter suite: a sandbox of `@e2b/code-interpreter` per test
// (killed afterwards, whatever happened), and per-test options generous enough for TCG.

import { Sandbox } from '@e2b/code-interpreter'
import { withSandboxOf } from '../helpers.mjs'

/** Runs `fn` with a fresh code interpreter sandbox and kills it afterwards. */
export const withSandbox = withSandboxOf(Sandbox)

export const slow = { timeout: 300_000 }
