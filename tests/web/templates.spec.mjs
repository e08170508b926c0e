// The templates page: a build's log streams into the page while it runs.
import { test, expect } from '@playwright/test';
import { api, shot, signIn, url } from './helpers.mjs';

test('a template build streams its log into the page', async ({ page }) => {
  const name = `web-${Date.now().toString(36)}`;
  await signIn(page);
  await page.goto(`${url}/#/templates`);
  const form = page.getByTestId('build-template');
  await form.getByLabel('Name').fill(name);
  await form.getByLabel('Spec').fill('FROM base\nRUN echo first-line-of-the-build && sleep 3 && echo second-line-of-the-build\n');
  await form.getByRole('button', { name: 'Build' }).click();
  const log = page.getByTestId('build-log');
  // The first line shows while the step still runs (streamed, not at the end).
  await expect(log).toContainText('first-line-of-the-build');
  await expect(form.getByRole('button', { name: 'Building…' })).toBeVisible();
  await expect(log).toContainText('second-line-of-the-build');
  await expect(log).toContainText(`Built ${name}`);
  await expect(page.getByTestId('templates').locator(`tr[data-key="${name}"]`)).toBeVisible();
  await shot(page, 'templates');
  page.once('dialog', (d) => d.accept());
  await page.getByTestId('templates').locator(`tr[data-key="${name}"]`).getByRole('button', { name: 'Delete' }).click();
  await expect(page.getByTestId('templates').locator(`tr[data-key="${name}"]`)).toHaveCount(0);
  await api('GET', '/templates').then((list) => expect(list.map((t) => t.templateID)).not.toContain(name));
});

test('the host page shows capacity and the server metrics', async ({ page }) => {
  await signIn(page);
  await page.goto(`${url}/#/host`);
  await expect(page.getByTestId('host-facts')).toContainText('Accelerator');
  await expect(page.getByText('vivarium_', { exact: false }).first()).toBeVisible();
  // The nodes of its cluster: a server alone is one node of role all, up, marked as this server.
  const [node] = await api('GET', '/nodes');
  const row = page.getByTestId('nodes').locator(`tr[data-key="${node.id}"]`);
  await expect(row).toContainText('(this server)');
  await expect(row.locator('td[data-label="Role"]')).toHaveText('all');
  await expect(row.locator('td[data-label="State"]')).toHaveText('up');
  await expect(row.locator('td[data-label="Memory"] progress')).toBeVisible();
  await shot(page, 'host');
});

test('the console fits a phone screen', async ({ browser }) => {
  const context = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  const page = await context.newPage();
  await signIn(page);
  // Nothing wider than the screen.
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  expect(overflow).toBeLessThanOrEqual(0);
  await shot(page, 'phone-sandboxes');
  await context.close();
});
