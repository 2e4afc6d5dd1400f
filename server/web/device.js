// Device: facts, active models and their engines, the engines it has, its latest benchmark
// per slot with every engine measured, and plots of the last hour of telemetry.
import uPlot from './vendor/uPlot.esm.js';
import { api } from './api.js';
import { ago, bytes, h, ms, pill, table } from './ui.js';

const COLORS = ['#2563eb', '#dc2626', '#16a34a', '#d97706', '#7c3aed', '#0891b2', '#db2777', '#4b5563'];

// One chart: x = seconds, one series per [label, pick(point)].
function chart(title, unit, series, points, width) {
  const data = [points.map((p) => Date.parse(p.at) / 1000)];
  for (const [, pick] of series) data.push(points.map((p) => { const v = pick(p); return v === undefined ? null : v; }));
  const opts = {
    title, width, height: 180,
    scales: { x: { time: true } },
    axes: [{}, { label: unit, size: 60 }],
    series: [{}, ...series.map(([label], i) => ({ label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true }))],
  };
  const holder = h('div', { class: 'plot', 'data-plot': title });
  const plot = new uPlot(opts, data, holder);
  return { holder, plot, series };
}

function chartsFor(points) {
  const temps = [...new Set(points.flatMap((p) => Object.keys(p.temperatures_c || {})))];
  const slots = [...new Set(points.flatMap((p) => Object.keys(p.inference || {})))];
  const charts = [
    ['CPU', '%', [['cpu', (p) => p.cpu_percent]]],
    ['Memory', '%', [['memory', (p) => (100 * p.memory_used_bytes) / Math.max(p.memory_total_bytes, 1)]]],
  ];
  if (temps.length) charts.push(['Temperatures', '°C', temps.map((t) => [t, (p) => (p.temperatures_c || {})[t]])]);
  if (points.some((p) => p.gpu_load_percent !== undefined)) charts.push(['GPU load', '%', [['gpu', (p) => p.gpu_load_percent]]]);
  for (const slot of slots) {
    const stat = (k) => (p) => ((p.inference || {})[slot] || {})[k];
    charts.push([`Inference ${slot}`, 'ms', [['p50', stat('p50_ms')], ['p99', stat('p99_ms')]]]);
  }
  return charts;
}

// The engines a robot has (from its info), and why others are not there.
function enginesOf(info) {
  const e = info.engines;
  if (!e) return h('p', { class: 'summary', id: 'engines' }, 'engines: tract (the agent reports no others)');
  const versions = [
    e.onnxruntime ? `onnxruntime ${e.onnxruntime.version}` : '',
    e.cuda ? `CUDA ${e.cuda}` : '', e.tensorrt ? `TensorRT ${e.tensorrt}` : '',
    e.gpu_compute_capability ? `sm ${e.gpu_compute_capability}` : '',
  ].filter(Boolean).join(' · ');
  return h('div', { id: 'engines' },
    h('p', {}, 'engines: ', (e.available || []).map((k) => h('code', { class: 'engine' }, k)), versions ? ` · ${versions}` : ''),
    Object.entries(e.unavailable || {}).map(([k, why]) => h('p', { class: 'summary' }, `${k} unavailable: ${why}`)));
}

// The latest benchmark per slot, one row per engine measured.
function benchmarks(d) {
  const rows = Object.entries(d.benchmarks || {}).flatMap(([slot, b]) => {
    const r = b.report;
    const chosen = r.engine || 'tract';
    const each = (r.engines && r.engines.length) ? r.engines
      : [{ engine: chosen, p50_ms: r.p50_ms, p99_ms: r.p99_ms, reference_max_abs_err: r.reference_max_abs_err, passed: r.passed }];
    return each.map((e) => h('tr', { class: e.engine === chosen ? 'current' : '' },
      h('td', {}, slot), h('td', {}, b.release === undefined ? '' : b.release), h('td', {}, e.engine),
      h('td', {}, e.load_ms === undefined ? '' : `${e.load_ms} ms${e.cached ? ' (cached)' : ''}`),
      h('td', {}, ms(e.p50_ms)), h('td', {}, ms(e.p99_ms)),
      h('td', {}, e.reference_max_abs_err === undefined ? '' : e.reference_max_abs_err.toExponential(1)),
      h('td', { class: e.passed ? 'good' : 'bad' }, e.passed ? (e.engine === chosen ? 'chosen' : 'passed') : (e.reason || 'failed'))));
  });
  return rows.length
    ? [h('h2', {}, 'Latest benchmarks'), table(['Slot', 'Release', 'Engine', 'Load', 'p50', 'p99', 'Max error', 'Verdict'], rows)]
    : [];
}

export async function render(root, ctx) {
  const id = ctx.id;
  const facts = h('div');
  const plots = h('div', { class: 'plots' });
  root.append(h('p', {}, h('a', { href: '#/devices' }, '← Fleet')), h('h1', {}, id), facts, h('h2', {}, 'Last hour'), plots);
  let charts = [];
  let shape = '';
  window.botfleetPlots = {};

  const refresh = async () => {
    const d = await api(`devices/${encodeURIComponent(id)}`);
    const info = d.info || {};
    const active = (d.status && d.status.active) || {};
    facts.replaceChildren(
      h('p', {}, d.online ? pill('online') : pill('offline'), ` last seen ${ago(d.last_seen)}`,
        info.hostname ? ` · ${info.hostname}` : '', d.status ? ` · agent ${d.status.agent_version}` : ''),
      h('p', {}, Object.entries(d.labels || info.labels || {}).map(([k, v]) => h('code', { class: 'label' }, `${k}=${v}`))),
      table(['Slot', 'Model', 'Version', 'Release', 'Engine', 'Since'], Object.entries(active).map(([slot, m]) =>
        h('tr', {}, h('td', {}, slot), h('td', {}, m.name), h('td', {}, m.version), h('td', {}, m.release),
          h('td', {}, m.engine || 'tract'), h('td', {}, ago(m.since))))),
      d.info ? enginesOf(info) : '',
      d.telemetry ? h('p', { class: 'summary' }, `memory ${bytes(d.telemetry.memory_used_bytes)} of ${bytes(d.telemetry.memory_total_bytes)}`) : '',
      ...benchmarks(d));
    let points = [];
    try {
      points = (await api(`devices/${encodeURIComponent(id)}/telemetry`)).points;
    } catch (err) {
      plots.replaceChildren(h('p', { class: 'summary' }, String(err.message)));
      return;
    }
    const specs = chartsFor(points);
    const newShape = JSON.stringify(specs.map(([t, , s]) => [t, s.map(([l]) => l)]));
    // Two charts side by side on a wide window, one on a narrow one.
    const width = Math.max(320, Math.min(560, (plots.clientWidth || 1160) / 2 - 24));
    if (newShape !== shape) {
      charts.forEach((c) => c.plot.destroy());
      charts = specs.map(([title, unit, series]) => chart(title, unit, series, points, width));
      plots.replaceChildren(...charts.map((c) => c.holder));
      shape = newShape;
    } else {
      for (const c of charts) {
        const data = [points.map((p) => Date.parse(p.at) / 1000)];
        for (const [, pick] of c.series) data.push(points.map((p) => { const v = pick(p); return v === undefined ? null : v; }));
        c.plot.setData(data);
      }
    }
    // For scripts and tests: the charts and their data.
    window.botfleetPlots = Object.fromEntries(charts.map((c) => [c.holder.dataset.plot, c.plot]));
  };
  await refresh();
  return { refresh, wants: (c) => c.kind === 'device' && c.id === id };
}
