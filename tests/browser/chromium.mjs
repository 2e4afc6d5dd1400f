// What every browser script shares: Debian's Chromium, headless, in a throwaway profile,
// and the dashboard's login box.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export const STEP = 60_000;

// A page in a fresh profile; `close()` ends the browser and removes the profile.
export async function launch(log) {
  const profile = mkdtempSync(join(tmpdir(), 'botfleet-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
      '--disable-component-update', '--no-first-run', '--disable-sync'],
    viewport: { width: 1280, height: 900 },
  });
  context.setDefaultTimeout(STEP);
  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (m) => { if (m.type() === 'error') log('browser console:', m.text()); });
  page.on('pageerror', (e) => log('page error:', e.message));
  const close = async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  };
  return { page, close };
}

// The page has no token and must ask for one; logged in, its live stream comes up.
export async function logIn(page, base, token) {
  await page.goto(base);
  await page.waitForSelector('#login:not([hidden])');
  await page.fill('#token', token);
  await page.click('#login button[type=submit]');
  await page.waitForFunction(() => document.getElementById('live').textContent === 'live');
}
