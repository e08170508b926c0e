// Signing in and out, sessions, and the console's security headers and origin checks.
import { test, expect } from '@playwright/test';
import { request as httpRequest } from 'node:http';
import { api, figure, key, shot, signIn, url } from './helpers.mjs';
import { startServer } from './server.mjs';

/** A raw WebSocket upgrade (Node's http, so Origin and Cookie can be anything): its status. */
function upgrade(path, headers) {
  return new Promise((ok, fail) => {
    const u = new URL(url);
    const req = httpRequest({
      host: '127.0.0.1',
      port: u.port,
      path,
      headers: { Host: u.host, Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Version': '13', 'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==', ...headers },
    });
    req.on('upgrade', (res, socket) => {
      socket.destroy();
      ok(res.statusCode);
    });
    req.on('response', (res) => {
      res.resume();
      ok(res.statusCode);
    });
    req.on('error', fail);
    req.end();
  });
}

test('sign in with the API key; the key is never shown again; first paint measured', async ({ page, context }) => {
  const started = Date.now();
  await page.goto(url + '/');
  await expect(page.getByLabel('API key')).toBeVisible();
  const paint = await page.evaluate(() => performance.getEntriesByName('first-contentful-paint')[0]?.startTime);
  figure('console first contentful paint (ms)', Math.round(paint ?? Date.now() - started));
  await shot(page, 'sign-in');
  await signIn(page);
  await shot(page, 'sandboxes');
  const [cookie] = await context.cookies();
  expect(cookie.name).toBe('viv_session');
  expect(cookie.httpOnly).toBe(true);
  expect(cookie.secure).toBe(true);
  expect(cookie.sameSite).toBe('Strict');
  expect(cookie.value).not.toContain(key);
  expect(await page.content()).not.toContain(key);
  expect(await page.evaluate(() => document.cookie)).toBe('');
  // The session works for the API, as the page uses it.
  const health = await page.evaluate(async () => (await fetch('/sandboxes')).status);
  expect(health).toBe(200);
});

test('a wrong key is refused with the API words', async ({ page, context }) => {
  await page.goto(url + '/');
  await page.getByLabel('API key').fill('e2b_' + '0'.repeat(40));
  await page.getByRole('button', { name: 'Sign in' }).click();
  await expect(page.getByRole('alert')).toHaveText('invalid or revoked API key');
  expect(await context.cookies()).toEqual([]);
  await shot(page, 'sign-in-refused');
});

test('the console is served with a strict CSP and no framing', async ({ page }) => {
  const response = await page.goto(url + '/');
  const headers = response.headers();
  const csp = headers['content-security-policy'];
  expect(csp).toContain("script-src 'self'");
  expect(csp).toContain("connect-src 'self'");
  expect(csp).toContain("frame-ancestors 'none'");
  expect(csp).not.toMatch(/script-src[^;]*unsafe-inline/);
  expect(headers['x-frame-options']).toBe('DENY');
  expect(headers['x-content-type-options']).toBe('nosniff');
  // No inline script in the page: every script has a src.
  const inline = await page.evaluate(() => [...document.scripts].filter((s) => !s.src).length);
  expect(inline).toBe(0);
});

test('a WebSocket or state change with the session but another Origin is refused', async ({ page, context }) => {
  await signIn(page);
  const [cookie] = await context.cookies();
  const jar = `viv_session=${cookie.value}`;
  const own = new URL(url).origin;
  // A VM that does not exist: past the auth check the route answers 404.
  expect(await upgrade('/vms/no-such-vm/console', { Cookie: jar, Origin: 'http://evil.example' })).toBe(403);
  expect(await upgrade('/vms/no-such-vm/console', { Cookie: jar })).toBe(403);
  expect(await upgrade('/vms/no-such-vm/console', { Cookie: jar, Origin: own })).toBe(404);
  // A state-changing REST call: same rule (CSRF defense); a read needs no Origin.
  const del = (origin) => fetch(`${url}/sandboxes/nosuchsandbox`, { method: 'DELETE', headers: { Cookie: jar, ...(origin ? { Origin: origin } : {}) } });
  const refused = await del('http://evil.example');
  expect(refused.status).toBe(403);
  expect((await refused.json()).message).toContain('Origin');
  expect((await del(own)).status).toBe(404);
  expect((await fetch(`${url}/sandboxes`, { headers: { Cookie: jar } })).status).toBe(200);
  // No cookie, no key: 401.
  expect(await upgrade('/vms/no-such-vm/console', { Origin: own })).toBe(401);
});

test('the sandbox terminal WebSocket refuses the session from another Origin', async ({ page, context }) => {
  await signIn(page);
  const [cookie] = await context.cookies();
  const jar = `viv_session=${cookie.value}`;
  const path = '/sandboxes/nosuchsandbox/terminal?cols=80&rows=24';
  expect(await upgrade(path, { Cookie: jar, Origin: 'http://evil.example' })).toBe(403);
  // Past the checks, the sandbox does not exist.
  expect(await upgrade(path, { Cookie: jar, Origin: new URL(url).origin })).toBe(404);
});

test('sign out ends the session on the server', async ({ page, context }) => {
  await signIn(page);
  const [cookie] = await context.cookies();
  await page.getByTestId('sign-out').click();
  await expect(page.getByLabel('API key')).toBeVisible();
  // The old token no longer works, even if a client kept it.
  const res = await fetch(`${url}/sandboxes`, { headers: { Cookie: `viv_session=${cookie.value}` } });
  expect(res.status).toBe(401);
  await page.reload();
  await expect(page.getByLabel('API key')).toBeVisible();
});

test('a session expires after --session-ttl', async ({ browser }) => {
  // A server of its own with a two-second session.
  const server = await startServer({ extra: ['--session-ttl', '2s', '--pool-size', '0'], pool: process.env.VIV_WEB_NET_POOL_2 || '10.237.1.0/24' });
  try {
    const context = await browser.newContext();
    const page = await context.newPage();
    await signIn(page, { base: server.url, apiKey: server.key });
    const [cookie] = await context.cookies();
    const status = () => fetch(`${server.url}/auth/session`, { headers: { Cookie: `viv_session=${cookie.value}` } }).then((r) => r.status);
    expect(await status()).toBe(200);
    // The session ends by the clock; poll until then (with a deadline well past it).
    await expect.poll(status, { timeout: 15_000, intervals: [250] }).toBe(401);
    // The page notices at its next API request and asks to sign in again.
    await page.goto(server.url + '/#/vms');
    await expect(page.getByLabel('API key')).toBeVisible();
    await shot(page, 'session-expired');
    // And so does a fresh load.
    await page.reload();
    await expect(page.getByLabel('API key')).toBeVisible();
    await context.close();
  } finally {
    await server.stop();
  }
});
