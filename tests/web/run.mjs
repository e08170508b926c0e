// Starts the shared scratch server, runs Playwright against it, stops the server, and prints
// `web: N passed, N failed` (from Playwright's JSON report).
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { root, startServer } from './server.mjs';

const artifacts = join(root, 'target', 'web-artifacts');
mkdirSync(artifacts, { recursive: true });
const report = join(artifacts, 'report.json');
let server;
try {
  server = await startServer();
} catch (e) {
  console.log(e.message);
  console.log('web: 0 passed, 1 failed');
  process.exit(1);
}
let stopping = false;
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, async () => {
    if (stopping) return;
    stopping = true;
    await server.stop();
    process.exit(130);
  });
}
const code = await new Promise((ok) => {
  const child = spawn(process.execPath, [join(root, 'tests/web/node_modules/@playwright/test/cli.js'), 'test', '-c', join(root, 'tests/web/playwright.config.mjs'), ...process.argv.slice(2)], {
    stdio: 'inherit',
    env: { ...process.env, VIV_WEB_URL: server.url, VIV_WEB_KEY: server.key, VIV_WEB_DATA: server.data, VIV_WEB_ARTIFACTS: artifacts, PLAYWRIGHT_JSON_OUTPUT_NAME: report },
  });
  child.once('exit', (c) => ok(c ?? 1));
});
if (code !== 0) console.log(`web: the last lines of the server's log:\n${server.log().trimEnd().split('\n').slice(-30).join('\n')}`);
stopping = true;
await server.stop();
let passed = 0;
let failed = 0;
if (existsSync(report)) {
  const stats = JSON.parse(readFileSync(report, 'utf8')).stats || {};
  passed = stats.expected || 0;
  failed = (stats.unexpected || 0) + (stats.flaky || 0);
}
if (code !== 0 && failed === 0) failed = 1;
console.log(`web: ${passed} passed, ${failed} failed`);
process.exit(code === 0 ? 0 : 1);
