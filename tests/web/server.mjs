// A scratch `viv serve` for the browser tests: its own data directory, port and address pool;
// stopped (its sandboxes with it) and removed at the end.
import { spawn, execFileSync } from 'node:child_process';
import { createWriteStream, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
export const root = resolve(here, '..', '..');
export const viv = process.env.VIV_BIN || join(root, 'target', 'debug', 'viv');

function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.once('error', fail);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

/**
 * Starts a server; `extra` are more `viv serve` arguments, `pool` its network pool (isolated
 * mode as root). Answers { url, key, data, stop() }.
 */
export async function startServer({ extra = [], pool = process.env.VIV_WEB_NET_POOL || '10.237.0.0/24' } = {}) {
  const data = mkdtempSync(join(tmpdir(), 'viv-web-'));
  const port = await freePort();
  // The console's origin: a host name browsers treat as secure (so `Secure` cookies work on
  // plain HTTP).
  const url = `http://localhost:${port}`;
  const args = ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', data, '--accel', process.env.VIV_ACCEL || 'auto', '--on-shutdown', 'kill', ...extra];
  if (process.getuid() === 0) args.push('--network', 'isolated', '--net-pool', pool);
  const log = createWriteStream(join(data, 'serve.log'));
  await new Promise((ok) => log.once('open', ok));
  const proc = spawn(viv, args, { stdio: ['ignore', log, log], env: { ...process.env, VIV_LOG: process.env.VIV_LOG || 'warn' } });
  let exited = false;
  proc.once('exit', () => (exited = true));
  proc.once('error', () => (exited = true));
  const stop = async () => {
    if (!exited) {
      const gone = new Promise((ok) => proc.once('exit', ok));
      proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), 60_000);
      await gone;
      clearTimeout(timer);
    }
    rmSync('/dev/shm/vivarium-' + createHash('sha256').update(data).digest('hex').slice(0, 8), { recursive: true, force: true });
    rmSync(data, { recursive: true, force: true });
  };
  const deadline = Date.now() + 600_000;
  for (;;) {
    try {
      const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) });
      await res.arrayBuffer();
      break;
    } catch {
      if (exited || Date.now() > deadline) {
        const output = readFileSync(join(data, 'serve.log'), 'utf8');
        await stop();
        throw new Error('viv serve did not start: ' + output);
      }
      await sleep(200);
    }
  }
  const key = execFileSync(viv, ['keys', 'create', '--data-dir', data, '--name', 'web-tests'], { encoding: 'utf8' }).trim();
  return { url, key, data, stop, log: () => readFileSync(join(data, 'serve.log'), 'utf8') };
}
