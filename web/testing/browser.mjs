// Test support: launch Debian's Chromium through playwright-core.
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { REPO } from './server.mjs';

export const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
export const SCREENSHOTS = path.join(REPO, 'artifacts', 'screenshots');

export async function launch() {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: apt-get update && apt-get install -y chromium`);
  }
  fs.mkdirSync(SCREENSHOTS, { recursive: true });
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic',
      '--no-first-run', '--disable-component-update', '--disable-sync'],
    timeout: 30_000,
  });
}

export async function screenshot(page, name) {
  const file = path.join(SCREENSHOTS, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

/**
 * A page in a context of its own (closed when test `t` ends) at `url`, once it
 * has loaded, the dashboard says it is ready and its admin API is open;
 * `errors` collects the page's uncaught errors and console errors.
 */
export async function openDashboard(browser, t, url, viewport = { width: 1400, height: 1000 }) {
  const context = await browser.newContext({ viewport });
  t.after(() => context.close());
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  page.on('console', (msg) => { if (msg.type() === 'error') errors.push(msg.text()); });
  await page.goto(url, { waitUntil: 'load', timeout: 15_000 });
  await page.waitForSelector('html[data-ready="true"]', { timeout: 15_000 });
  // Loopback without an admin token: the admin API is open to the page.
  await page.waitForSelector('#admin-state[data-state="open"]', { timeout: 15_000 });
  return { context, page, errors };
}
