// Drives the dashboard's Data page in headless Chromium:
//   node data.mjs <url> <token> <outdir> <expected.json>
// The test uploaded the samples and made the data set; the JSON says what the page must show:
//   { rows: [{device, slot, rules: {rule: count}, total}], total, images,
//     not_image: {sha256, shape}, dataset: {id, name, samples}, filter: {rule, samples} }
// Exits non-zero with a message on the first check that fails.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { launch, logIn } from './chromium.mjs';

const [base, token, outdir, expectedJson] = process.argv.slice(2);
if (!expectedJson) {
  console.error('usage: node data.mjs <url> <token> <outdir> <expected.json>');
  process.exit(2);
}
const expected = JSON.parse(expectedJson);
const RULES = ['sampled', 'low_confidence', 'out_of_range', 'disagreement', 'on_demand'];
const log = (...a) => console.log('data:', ...a);
// JSON with the keys of every object sorted: equal values print the same.
const canonical = (v) => JSON.stringify(v, (_, x) => (x && typeof x === 'object' && !Array.isArray(x)
  ? Object.fromEntries(Object.entries(x).sort(([a], [b]) => a.localeCompare(b))) : x));
const same = (what, actual, wanted) => {
  if (canonical(actual) !== canonical(wanted)) {
    throw new Error(`${what}: the page shows ${JSON.stringify(actual)}, expected ${JSON.stringify(wanted)}`);
  }
};

const { page, close } = await launch(log);
try {
  await logIn(page, base, token);
  await page.click('header nav a:text("Data")');
  await page.waitForSelector('h1:text("Data")');
  await page.waitForSelector('#summary tr[data-device]');

  // Samples per device and slot: the count per rule, the total, and the bars add up.
  const table = await page.evaluate((rules) => [...document.querySelectorAll('#summary tr[data-device]')].map((tr) => ({
    device: tr.dataset.device,
    slot: tr.dataset.slot,
    rules: Object.fromEntries(rules.map((r) => [r, Number(tr.querySelector(`td[data-rule="${r}"]`).textContent)])
      .filter(([, n]) => n > 0)),
    total: Number(tr.querySelector('td.total').textContent),
    bars: [...tr.querySelectorAll('svg.buckets rect')].reduce((n, rect) => n + Number(rect.dataset.count), 0),
  })), RULES);
  log('per device and slot:', JSON.stringify(table));
  same('the rows per device and slot', table.map(({ bars, ...row }) => row), expected.rows);
  for (const row of table) same(`the bars of ${row.device}/${row.slot}`, row.bars, row.total);
  same('the total', Number(await page.textContent('#summary tr.totals td.total')), expected.total);

  // The latest samples: every one shown, image inputs drawn, others named by their shape.
  await page.waitForFunction((n) => document.querySelectorAll('#latest .sample img').length === n
    && [...document.querySelectorAll('#latest .sample img')].every((img) => img.complete && img.naturalWidth > 0), expected.images);
  same('the samples shown', await page.locator('#latest .sample').count(), expected.total);
  const size = await page.evaluate(() => {
    const img = document.querySelector('#latest .sample img');
    return [img.naturalWidth, img.naturalHeight];
  });
  log(`${expected.images} thumbnails loaded, ${size.join('x')} pixels each`);
  const other = `#latest .sample[data-sha256="${expected.not_image.sha256}"]`;
  await page.waitForSelector(`${other} .thumb .shape`);
  same('the shape of the input that is no image', await page.textContent(`${other} .thumb .shape`), expected.not_image.shape);

  // The data set, and its export downloaded with the token.
  const set = `#datasets tr[data-dataset="${expected.dataset.id}"]`;
  await page.waitForSelector(set);
  same('the data set name', await page.textContent(`${set} td:first-child`), expected.dataset.name);
  same('the data set samples', Number(await page.textContent(`${set} td.count`)), expected.dataset.samples);
  await page.screenshot({ path: join(outdir, 'data.png'), fullPage: true });
  const [download] = await Promise.all([page.waitForEvent('download'), page.click(`${set} a:text("export")`)]);
  const tar = readFileSync(await download.path());
  same('the export file name', download.suggestedFilename(), `${expected.dataset.name}.tar`);
  same('the first entry of the export', tar.subarray(0, 13).toString(), 'manifest.json');
  log(`exported ${download.suggestedFilename()}: ${tar.length} bytes`);

  // Filtered by rule through the form: the address says so, only that rule is shown.
  await page.selectOption('#filter-rule', expected.filter.rule);
  await page.click('#sample-filter button');
  await page.waitForFunction((rule) => location.hash === `#/data?rule=${rule}`, expected.filter.rule);
  await page.waitForFunction(({ rule, samples }) => {
    const cards = [...document.querySelectorAll('#latest .sample')];
    return cards.length === samples && cards.every((c) => c.dataset.rule === rule);
  }, expected.filter);
  log(`filtered by rule=${expected.filter.rule}: ${expected.filter.samples} samples`);
  await page.screenshot({ path: join(outdir, 'data-filtered.png'), fullPage: true });
  log('all checks passed');
} catch (err) {
  await page.screenshot({ path: join(outdir, 'data-failure.png'), fullPage: true }).catch(() => {});
  console.error('data: FAILED:', err.message);
  process.exitCode = 1;
} finally {
  await close();
}
