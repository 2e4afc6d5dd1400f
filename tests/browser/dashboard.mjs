// Drives the dashboard in headless Chromium: node dashboard.mjs <url> <token> <outdir> <device>
// Exits non-zero with a message on the first check that fails.
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { launch, logIn } from './chromium.mjs';

const [base, token, outdir, device] = process.argv.slice(2);
if (!device) {
  console.error('usage: node dashboard.mjs <url> <token> <outdir> <device>');
  process.exit(2);
}
const log = (...a) => console.log('dashboard:', ...a);
// The test answers on stdin when it has done what a line of ours asked for.
const stdin = createInterface({ input: process.stdin });
const answers = stdin[Symbol.asyncIterator]();
const ask = async (what) => {
  log(what);
  const { value, done } = await answers.next();
  if (done) throw new Error(`no answer to "${what}"`);
  log('answer:', value);
};
const streams = () => page.evaluate(() => Number(document.getElementById('live').dataset.streams || 0));

const { page, close } = await launch(log);

try {
  // Log in: the page has no token and must ask for one.
  await logIn(page, base, token);
  log('logged in, live stream up');
  // Marks this document: a reload would lose it.
  await page.evaluate(() => { window.sameDocument = true; });

  // The rollouts list shows a new rollout without reload.
  await page.goto(`${base}#/rollouts`);
  await page.waitForSelector('h1:text("Rollouts")');
  const response = await fetch(`${base}api/v1/rollouts`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({
      slot: 'faces', version: '1.0.0', selector: 'site=lab',
      strategy: { waves: [{ count: 1 }, { percent: 100 }], bake_s: 8, deadline_s: 120 },
    }),
  });
  if (response.status !== 202) throw new Error(`rollout refused: ${response.status} ${await response.text()}`);
  const { rollout_id: id } = await response.json();
  log('rollout', id, 'started');
  await page.click(`tr[data-rollout="${id}"] a`);

  // Progress changes live on the rollout page.
  await page.waitForSelector('#progress');
  const first = await page.textContent('#progress');
  log('progress at first:', first);
  await page.waitForFunction((before) => document.getElementById('progress').textContent !== before, first);
  await page.waitForFunction(() => document.getElementById('progress').textContent.startsWith('1 of 4 devices active'));
  log('progress then:', await page.textContent('#progress'));
  await page.screenshot({ path: join(outdir, 'rollout-live.png'), fullPage: true });

  // Pause (the wave is baking), through the confirm dialog.
  await page.click('button[data-action=pause]');
  await page.waitForSelector('dialog#confirm[open]');
  await page.click('#confirm-ok');
  await page.waitForFunction(() => document.getElementById('state').textContent === 'paused');
  log('paused');
  await page.screenshot({ path: join(outdir, 'rollout-paused.png'), fullPage: true });

  await page.click('button[data-action=resume]');
  await page.waitForSelector('dialog#confirm[open]');
  await page.click('#confirm-ok');
  await page.waitForFunction(() => document.getElementById('state').textContent !== 'paused');
  log('resumed:', await page.textContent('#state'));

  await page.waitForFunction(() => document.getElementById('state').textContent === 'completed'
    && document.getElementById('progress').textContent.startsWith('4 of 4 devices active'));
  log('completed:', await page.textContent('#progress'));
  await page.screenshot({ path: join(outdir, 'rollout-completed.png'), fullPage: true });
  if (!(await page.evaluate(() => window.sameDocument === true))) throw new Error('the page reloaded');

  // The server restarts: the page reconnects on its own, refetches, and shows the same
  // rollout, then keeps updating live from the new server.
  const before = await streams();
  await ask('restart the server');
  await page.waitForFunction((n) => Number(document.getElementById('live').dataset.streams || 0) > n
    && document.getElementById('live').textContent === 'live', before);
  const after = [await page.textContent('#state'), await page.textContent('#progress')];
  log('after the restart:', after.join(' / '));
  if (after[0] !== 'completed' || !after[1].startsWith('4 of 4 devices active')) {
    throw new Error(`the rollout page is wrong after the restart: ${after.join(' / ')}`);
  }
  await page.goto(`${base}#/devices`);
  await page.waitForSelector(`tr[data-device="${device}"]`);
  const labelled = await fetch(`${base}api/v1/devices/${encodeURIComponent(device)}/labels`, {
    method: 'PATCH',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ set: { ring: 'after-restart' }, remove: [] }),
  });
  if (labelled.status !== 200) throw new Error(`label refused: ${labelled.status} ${await labelled.text()}`);
  await page.waitForSelector(`tr[data-device="${device}"] code.label:text("ring=after-restart")`);
  log('a label set after the restart appeared live');
  if (!(await page.evaluate(() => window.sameDocument === true))) throw new Error('the page reloaded');
  await page.screenshot({ path: join(outdir, 'fleet-after-restart.png'), fullPage: true });

  // A channel that pins the model the robots serve: the channels page shows it followed.
  const put = await fetch(`${base}api/v1/channels/lab`, {
    method: 'PUT',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ selector: 'site=lab', priority: 10, pins: { faces: '1.0.0' } }),
  });
  if (put.status !== 201) throw new Error(`channel refused: ${put.status} ${await put.text()}`);
  await page.goto(`${base}#/channels`);
  await page.waitForSelector('tr[data-channel="lab"] .followers:text("faces: 4 of 4 serving, 4 told")');
  log('the channel shows its four followers serving its pin');
  await page.screenshot({ path: join(outdir, 'channels.png'), fullPage: true });
  await page.goto(`${base}#/devices`);
  await page.waitForSelector(`tr[data-device="${device}"]`);

  // A device page plots its telemetry.
  await page.click(`tr[data-device="${device}"] a`);
  await page.waitForFunction(() => {
    const plots = window.botfleetPlots || {};
    return plots.CPU && plots.CPU.data[0].length > 1 && plots['Inference faces']
      && plots['Inference faces'].data[2].filter((v) => v !== null).length > 1;
  });
  const points = await page.evaluate(() => window.botfleetPlots.CPU.data[0].length);
  log('device plot points:', points);
  await page.screenshot({ path: join(outdir, 'device.png'), fullPage: true });
  log('all checks passed');
} catch (err) {
  await page.screenshot({ path: join(outdir, 'failure.png'), fullPage: true }).catch(() => {});
  console.error('dashboard: FAILED:', err.message);
  process.exitCode = 1;
} finally {
  stdin.close(); // an open stdin would keep node running
  await close();
}
