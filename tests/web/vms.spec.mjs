// VMs: a VM booted from the test ISO (tests/fixtures/vm-iso/build), its serial console in an
// xterm.js terminal and its display through noVNC, both in the page.
import { test, expect } from '@playwright/test';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { api, key, shot, signIn, terminalText, url } from './helpers.mjs';
import { root } from './server.mjs';

test('a VM page shows the serial console and the noVNC display', async ({ page }) => {
  const iso = execFileSync('bash', [join(root, 'tests/fixtures/vm-iso/build')], { encoding: 'utf8' }).trim().split('\n').pop();
  const name = `web-vm-${Date.now().toString(36)}`;
  const put = await fetch(`${url}/isos/${name}`, { method: 'PUT', headers: { 'X-API-Key': key }, body: readFileSync(iso) });
  expect(put.status).toBeLessThan(300);
  const vm = await api('POST', '/vms', { name, cdroms: [{ iso: name }], display: 'vnc' });
  try {
    await signIn(page);
    await page.goto(`${url}/#/vms`);
    const row = page.getByTestId('vms').locator(`tr[data-key="${vm.id}"]`);
    await expect(row).toBeVisible();
    await row.getByRole('button', { name: 'Start' }).click();
    await expect(row).toContainText('running');
    await shot(page, 'vms');
    await row.getByRole('link', { name }).click();
    // The serial console replays the boot and shows the guest's banner.
    await expect.poll(() => terminalText(page), { timeout: 240_000 }).toContain('VIVARIUM-ISO-BOOTED');
    await shot(page, 'vm-serial');
    await page.getByRole('tab', { name: 'Display' }).click();
    await expect(page.getByTestId('vnc-status')).toHaveText('display connected');
    // The canvas shows something: more than one colour among its pixels.
    await expect
      .poll(
        () =>
          page.evaluate(() => {
            const canvas = document.querySelector('[data-testid="vnc"] canvas');
            if (!canvas || !canvas.width) return 0;
            const ctx = canvas.getContext('2d');
            const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
            const colours = new Set();
            for (let i = 0; i < data.length && colours.size < 2; i += 4 * 97) colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
            return colours.size;
          }),
        { timeout: 120_000 },
      )
      .toBeGreaterThan(1);
    await shot(page, 'vm-display');
  } finally {
    await api('POST', `/vms/${vm.id}/kill`).catch(() => {});
    await fetch(`${url}/vms/${vm.id}`, { method: 'DELETE', headers: { 'X-API-Key': key } });
    await fetch(`${url}/isos/${name}`, { method: 'DELETE', headers: { 'X-API-Key': key } });
  }
});
