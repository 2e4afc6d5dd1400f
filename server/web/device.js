// Device: facts, active models, and plots of the last hour of telemetry.
import uPlot from './vendor/uPlot.esm.js';
import { api } from './api.js';
import { ago, bytes, h, pill, table } from './ui.js';

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
      table(['Slot', 'Model', 'Version', 'Release', 'Since'], Object.entries(active).map(([slot, m]) =>
        h('tr', {}, h('td', {}, slot), h('td', {}, m.name), h('td', {}, m.version), h('td', {}, m.release), h('td', {}, ago(m.since))))),
      d.telemetry ? h('p', { class: 'summary' }, `memory ${bytes(d.telemetry.memory_used_bytes)} of ${bytes(d.telemetry.memory_total_bytes)}`) : '');
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
