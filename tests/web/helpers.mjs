// Shared steps of the console tests: the server's address and key, signing in through the page,
// calling the API as a client would, screenshots and figures.
import { test as base, expect } from '@playwright/test';
import { execFileSync } from 'node:child_process';
import { appendFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { viv } from './server.mjs';

export const url = process.env.VIV_WEB_URL;
export const key = process.env.VIV_WEB_KEY;
const artifacts = process.env.VIV_WEB_ARTIFACTS || 'test-results';

/** Signs in through the form of the page at `base` with `apiKey`; waits for the navigation. */
export async function signIn(page, { base = url, apiKey = key } = {}) {
  await page.goto(base + '/');
  await page.getByLabel('API key').fill(apiKey);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await expect(page.getByTestId('sign-out')).toBeVisible();
}

/** Calls the API with the key (as the SDKs and CLI do). */
export async function api(method, path, body, { base = url, apiKey = key } = {}) {
  const res = await fetch(base + path, {
    method,
    headers: { 'X-API-Key': apiKey, ...(body !== undefined ? { 'Content-Type': 'application/json' } : {}) },
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

/** Runs the viv CLI against the server. */
export function cli(...args) {
  return execFileSync(viv, args, { encoding: 'utf8', env: { ...process.env, VIV_API_URL: url, VIV_API_KEY: key } });
}

/** Keeps a screenshot of the page as target/web-artifacts/NAME.png. */
export async function shot(page, name) {
  mkdirSync(artifacts, { recursive: true });
  await page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });
}

/** Prints a figure and keeps it in target/web-artifacts/figures.txt. */
export function figure(name, value) {
  const line = `web figure: ${name}: ${value}`;
  console.log(line);
  mkdirSync(artifacts, { recursive: true });
  appendFileSync(join(artifacts, 'figures.txt'), line + '\n');
}

/**
 * The tests' `test`, with a fixture `newSandbox(body)` that creates a sandbox through the API
 * and kills it when the test ends, whatever happened.
 */
export const test = base.extend({
  newSandbox: async ({}, use) => {
    const made = [];
    await use(async (body = {}) => {
      const created = await api('POST', '/sandboxes', { templateID: 'base', timeout: 600, ...body });
      made.push(created.sandboxID);
      return created;
    });
    for (const id of made) await api('DELETE', `/sandboxes/${id}`).catch(() => {});
  },
});
export { expect };

/** The text the xterm.js terminal on the page shows. */
export async function terminalText(page) {
  return page.getByTestId('terminal').locator('.xterm-rows').innerText();
}
