// Playwright for the console tests: Debian's Chromium (no browser download), headless, one
// worker (the tests share one server and real VMs under TCG, so timeouts are generous).
import { defineConfig } from '@playwright/test';

export default defineConfig({
  testDir: '.',
  testMatch: '*.spec.mjs',
  workers: 1,
  retries: 0,
  timeout: 300_000,
  expect: { timeout: 60_000 },
  outputDir: process.env.VIV_WEB_ARTIFACTS ? `${process.env.VIV_WEB_ARTIFACTS}/results` : 'test-results',
  reporter: [['list'], ['json']],
  use: {
    browserName: 'chromium',
    headless: true,
    baseURL: process.env.VIV_WEB_URL,
    launchOptions: { executablePath: process.env.VIV_CHROMIUM || '/usr/bin/chromium', args: ['--no-sandbox'] },
    viewport: { width: 1280, height: 800 },
    trace: 'off',
    screenshot: 'only-on-failure',
  },
});
