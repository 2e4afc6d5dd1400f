// Data: the samples robots captured and uploaded, per device and slot over time, the capture
// rules that kept them, the latest ones with a thumbnail of image inputs, and the data sets.
import { api, request } from './api.js';
import { ago, bytes, h, table, time } from './ui.js';

const RULES = ['sampled', 'low_confidence', 'out_of_range', 'disagreement', 'on_demand'];
const BUCKET_S = 3600;
const MAX_BUCKETS = 24;
const LATEST = 48;
const FILTERS = ['device', 'slot', 'rule'];

const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  el.append(...children);
  return el;
}

const hashFor = (filter) => {
  const q = new URLSearchParams(Object.entries(filter).filter(([, v]) => v));
  return q.toString() ? `#/data?${q}` : '#/data';
};

// The summary's counts, one per device, slot, rule and bucket, with the bucket's start in ms.
function counts(summary) {
  return summary.buckets.map((b) => ({ ...b, at: Date.parse(b.start) }));
}

// One row per device and slot: counts per rule and per bucket.
function perSlot(list) {
  const rows = new Map();
  for (const c of list) {
    const key = `${c.device}\u0000${c.slot}`;
    if (!rows.has(key)) rows.set(key, { device: c.device, slot: c.slot, total: 0, rules: {}, buckets: new Map() });
    const row = rows.get(key);
    row.total += c.count;
    row.rules[c.rule] = (row.rules[c.rule] || 0) + c.count;
    const bucket = row.buckets.get(c.at) || {};
    bucket[c.rule] = (bucket[c.rule] || 0) + c.count;
    row.buckets.set(c.at, bucket);
  }
  return [...rows.values()].sort((a, b) => a.device.localeCompare(b.device) || a.slot.localeCompare(b.slot));
}

// Samples per bucket, stacked by rule: the same hours for every row, so rows compare.
function bars(row, starts, peak) {
  const w = 8;
  const hgt = 28;
  const chart = svg('svg', { class: 'buckets', width: starts.length * w, height: hgt, role: 'img' });
  starts.forEach((at, i) => {
    const bucket = row.buckets.get(at) || {};
    let y = hgt;
    for (const rule of RULES) {
      const n = bucket[rule] || 0;
      if (!n) continue;
      const dy = Math.max(1, (n / peak) * hgt);
      y -= dy;
      chart.append(svg('rect', { x: i * w, y, width: w - 1, height: dy, 'data-rule': rule, 'data-count': n },
        svg('title', {}, `${new Date(at).toLocaleString()}: ${n} ${rule}`)));
    }
  });
  return chart;
}

function summaryTable(list, bucketS) {
  const rows = perSlot(list);
  if (!rows.length) {
    return h('p', {}, 'No samples yet: a robot captures only what its agent.toml asks for ([capture.slots.<slot>], see docs/data-loop.md).');
  }
  // The last MAX_BUCKETS buckets up to now (or the newest one, if the clocks differ).
  const width = bucketS * 1000;
  const newest = Math.max(...list.map((c) => c.at), Math.floor(Date.now() / width) * width);
  const starts = Array.from({ length: MAX_BUCKETS }, (_, i) => newest - (MAX_BUCKETS - 1 - i) * width);
  const peak = Math.max(1, ...rows.flatMap((r) => [...r.buckets.values()].map((b) => Object.values(b).reduce((x, y) => x + y, 0))));
  const link = (filter, n) => (n ? h('a', { href: hashFor(filter) }, n) : h('span', { class: 'muted' }, '0'));
  const totals = { total: 0 };
  const body = rows.map((r) => {
    totals.total += r.total;
    for (const rule of RULES) totals[rule] = (totals[rule] || 0) + (r.rules[rule] || 0);
    return h('tr', { 'data-device': r.device, 'data-slot': r.slot },
      h('td', {}, r.device), h('td', {}, r.slot),
      h('td', { title: `${MAX_BUCKETS} buckets of ${bucketS} s, the last from ${time(new Date(newest).toISOString())}` }, bars(r, starts, peak)),
      RULES.map((rule) => h('td', { 'data-rule': rule }, link({ device: r.device, slot: r.slot, rule }, r.rules[rule] || 0))),
      h('td', { class: 'total' }, link({ device: r.device, slot: r.slot }, r.total)));
  });
  body.push(h('tr', { class: 'totals' }, h('td', {}, 'All'), h('td', {}), h('td', {}),
    RULES.map((rule) => h('td', { 'data-rule': rule }, link({ rule }, totals[rule]))),
    h('td', { class: 'total' }, totals.total)));
  const heads = RULES.map((rule) => h('span', { class: 'rule', 'data-rule': rule }, rule));
  const per = bucketS === 3600 ? 'hour' : `${bucketS} s`;
  return table(['Device', 'Slot', `Per ${per} (last ${MAX_BUCKETS})`, ...heads, 'Total'], body);
}

// Thumbnails by sample digest (a sample never changes): an object URL, or null when the
// first input is not image-shaped (the server answers 415). Fetched with the token, which an
// <img src> could not send.
const thumbs = new Map();
function thumbnail(sha256) {
  if (!thumbs.has(sha256)) {
    const made = request(`samples/${sha256}/thumbnail.png`, { headers: { Accept: 'image/png' } })
      .then(async (r) => {
        if (r.status === 415) return null;
        if (!r.ok) throw new Error(`${r.status} ${r.statusText}`);
        return URL.createObjectURL(await r.blob());
      });
    made.catch(() => thumbs.delete(sha256)); // tried again on the next refresh
    thumbs.set(sha256, made);
  }
  return thumbs.get(sha256);
}

// Keeps the object URLs of the samples shown, frees the others.
function forgetThumbs(shown) {
  for (const [sha256, made] of thumbs) {
    if (shown.has(sha256)) continue;
    thumbs.delete(sha256);
    made.then((url) => url && URL.revokeObjectURL(url), () => {});
  }
}

const shapeOf = (t) => `${t.name} ${t.datatype} ${t.shape.join('×')}`;

// Downloads with the token (a plain link could not send it), named as the server names it.
async function download(path, name, status) {
  status.textContent = `downloading ${name}…`;
  try {
    const r = await request(path, { headers: { Accept: 'application/octet-stream' } });
    if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || `${r.status} ${r.statusText}`);
    const url = URL.createObjectURL(await r.blob());
    const a = h('a', { href: url, download: name, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    status.textContent = '';
  } catch (err) {
    status.textContent = `${name}: ${err.message}`;
  }
}

const downloadLink = (path, name, text, status) => h('a', {
  href: `api/v1/${path}`, download: name,
  onclick: (e) => { e.preventDefault(); download(path, name, status); },
}, text);

function card(s, status) {
  const input = (s.inputs || [])[0];
  const thumb = h('div', { class: 'thumb' }, h('span', { class: 'muted' }, '…'));
  thumbnail(s.sha256).then((url) => thumb.replaceChildren(url
    ? h('img', { src: url, alt: input ? shapeOf(input) : 'input', title: input ? shapeOf(input) : '' })
    : h('span', { class: 'shape' }, input ? shapeOf(input) : 'no inputs')))
    .catch((err) => thumb.replaceChildren(h('span', { class: 'error' }, err.message)));
  return h('div', { class: 'sample', 'data-sha256': s.sha256, 'data-device': s.device, 'data-slot': s.slot, 'data-rule': s.rule },
    thumb,
    h('div', {}, h('span', { class: 'rule', 'data-rule': s.rule }, s.rule)),
    s.detail ? h('div', { class: 'detail' }, s.detail) : '',
    h('div', {}, h('a', { href: `#/devices/${encodeURIComponent(s.device)}` }, s.device), ` · ${s.slot}`),
    h('div', { class: 'muted' }, `${s.model.version} (release ${s.model.release})`),
    h('div', { class: 'muted', title: s.captured_at }, `${ago(s.captured_at)} · ${bytes(s.bytes)} · `,
      downloadLink(`samples/${s.sha256}/file`, `${s.sha256}.bfs`, 'file', status)));
}

function filterForm(filter, list) {
  const known = (key) => [...new Set([...list.map((c) => c[key]), ...(filter[key] ? [filter[key]] : [])])].sort();
  const selects = FILTERS.map((key) => h('select', { name: key, id: `filter-${key}` },
    h('option', { value: '' }, `any ${key}`),
    (key === 'rule' ? [...new Set([...RULES, ...known(key)])] : known(key))
      .map((v) => h('option', { value: v, selected: v === filter[key] }, v))));
  return h('form', { class: 'filter', id: 'sample-filter', onsubmit: (e) => {
    e.preventDefault();
    location.hash = hashFor(Object.fromEntries(selects.map((s) => [s.name, s.value])));
  } }, selects, h('button', {}, 'Filter'), h('a', { href: '#/data' }, 'clear'));
}

function datasetTable(sets, status) {
  if (!sets.length) return h('p', {}, 'No data set yet: POST /api/v1/datasets or botfleet-server dataset create.');
  sets.sort((a, b) => b.created_at.localeCompare(a.created_at));
  return table(['Name', 'Id', 'Created', 'Samples', 'Size', 'Digest', ''], sets.map((d) => h('tr', { 'data-dataset': d.id },
    h('td', {}, d.name), h('td', {}, h('code', {}, d.id)), h('td', { title: d.created_at }, ago(d.created_at)),
    h('td', { class: 'count' }, d.samples), h('td', {}, bytes(d.bytes)),
    h('td', { title: d.digest }, h('code', {}, d.digest.slice(0, 12))),
    h('td', {}, downloadLink(`datasets/${encodeURIComponent(d.id)}/export`, `${d.name}.tar`, 'export (tar)', status)))));
}

export async function render(root, ctx) {
  const filter = Object.fromEntries(FILTERS.map((k) => [k, ctx.query.get(k) || '']));
  const status = h('p', { class: 'error', id: 'download-status' });
  const summary = h('div', { id: 'summary' });
  const form = h('div');
  const latest = h('div', { id: 'latest' });
  const sets = h('div', { id: 'datasets' });
  root.append(h('h1', {}, 'Data'),
    h('p', { class: 'muted' }, 'Samples the robots captured and uploaded, by the capture rule that kept them; data sets freeze a selection of them for training.'),
    status, h('h2', {}, 'Samples per device and slot'), summary,
    h('h2', {}, 'Latest samples'), form, latest, h('h2', {}, 'Data sets'), sets);

  const refresh = async () => {
    const query = new URLSearchParams(Object.entries(filter).filter(([, v]) => v));
    query.set('limit', String(LATEST));
    const [sum, samples, datasets] = await Promise.all([
      api(`samples/summary?bucket_s=${BUCKET_S}`), api(`samples?${query}`), api('datasets'),
    ]);
    const all = counts(sum);
    summary.replaceChildren(summaryTable(all, sum.bucket_s),
      all.length ? h('p', { class: 'summary' }, `${sum.samples} samples, ${bytes(sum.bytes)}`) : '');
    if (!form.firstChild) form.replaceChildren(filterForm(filter, all));
    forgetThumbs(new Set(samples.map((s) => s.sha256)));
    const chosen = FILTERS.filter((k) => filter[k]).map((k) => `${k}=${filter[k]}`).join(', ');
    latest.replaceChildren(
      h('p', { class: 'summary' }, samples.length
        ? `the ${samples.length} newest samples${chosen ? ` with ${chosen}` : ''}`
        : `no sample${chosen ? ` with ${chosen}` : ''}`),
      samples.length ? h('div', { class: 'samples' }, samples.map((s) => card(s, status))) : '');
    sets.replaceChildren(datasetTable(datasets, status));
  };
  await refresh();
  return { refresh, wants: (c) => c.kind === 'device', every: 5000 };
}
