// One rollout: waves with progress by stage, thresholds, per-device timeline and engine,
// benchmark numbers new vs incumbent with every engine measured, and the operator's buttons.
import { api, post } from './api.js';
import { confirm, h, ms, pill, stackedBar, table, time } from './ui.js';

// Where a device stands, in the words of the progress bars.
const STAGES = ['pending', 'downloading', 'benchmarking', 'deferred', 'active', 'rejected', 'failed', 'timed_out', 'other'];
function stageOf(p) {
  if (p.outcome === 'in_progress') {
    return ['loaded', 'benchmarked'].includes(p.stage) ? 'benchmarking' : 'downloading';
  }
  return STAGES.includes(p.outcome) ? p.outcome : 'other';
}

const pct = (x) => `${Math.round(100 * x)}%`;
const median = (xs) => {
  const s = xs.filter((x) => typeof x === 'number').sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)] : undefined;
};

// What serves the model on a device, else what its gate chose.
const engineOf = (p) => p.serving_engine || p.engine || '';

// Every engine a benchmark measured: "onnxruntime-cuda 1.50 ms · tract 9.00 ms (failed: …)".
function engineFigures(b) {
  return (b.engines || []).map((e) => h('div', { class: e.passed ? '' : 'bad', title: e.reason || '' },
    `${e.engine} ${ms(e.p99_ms) || '-'}${e.cached ? ' (cached)' : ''}${e.passed ? '' : ' ✗'}`));
}

const ACTIONS = {
  in_progress: ['pause', 'abort', 'rollback'],
  paused: ['resume', 'abort', 'rollback'],
  completed: ['rollback'],
};

export async function render(root, ctx) {
  const id = ctx.id;
  const head = h('div');
  const waves = h('div');
  const bench = h('div');
  const devices = h('div');
  const message = h('p', { class: 'error', id: 'action-error' });
  root.append(h('p', {}, h('a', { href: '#/rollouts' }, '← Rollouts')), head, message,
    h('h2', {}, 'Waves'), waves, h('h2', {}, 'Benchmarks (new vs incumbent)'), bench,
    h('h2', {}, 'Devices'), devices);

  const act = async (verb) => {
    if (!(await confirm(`${verb} rollout ${id}?`))) return;
    message.textContent = '';
    try { await post(`rollouts/${encodeURIComponent(id)}/${verb}`); await refresh(); } catch (err) { message.textContent = err.message; }
  };

  const refresh = async () => {
    const r = await api(`rollouts/${encodeURIComponent(id)}`);
    const all = Object.entries(r.devices || {});
    const total = all.length;
    const active = all.filter(([, p]) => p.outcome === 'active').length;
    const verbs = [...(ACTIONS[r.state] || [])];
    // Download now, install on command: the operator's go-ahead for every device.
    if (r.strategy.install_on_command && !r.install_ordered && ['in_progress', 'paused'].includes(r.state)) verbs.unshift('install');
    const buttons = ctx.role === 'operator'
      ? verbs.map((verb) => h('button', { 'data-action': verb, onclick: () => act(verb) }, verb))
      : [];
    head.replaceChildren(
      h('h1', {}, `Rollout ${id}`),
      h('p', {}, `${r.slot} ${r.version} (release ${r.release}) · `, h('span', { id: 'state' }, pill(r.state)),
        r.channel ? ` · to channel ${r.channel}` : '',
        r.reason ? ` · ${r.reason}` : '', ` · created ${time(r.created_at)}`),
      h('p', { id: 'progress', class: 'summary' }, `${active} of ${total} devices active · wave ${Math.min(r.wave + 1, r.waves)} of ${r.waves}`,
        r.shadow ? ` · shadow agreement ${pct(r.shadow.agreement)} on ${r.shadow.samples} live requests (${r.shadow.devices} devices, needs ${pct(r.strategy.shadow.min_agreement)})` : ''),
      h('div', { class: 'actions' }, buttons));

    // Thresholds are judged on the devices of the waves so far (waves are cumulative).
    const s = r.strategy;
    const rows = [];
    for (let w = 0; w < r.waves; w += 1) {
      const inWave = all.filter(([, p]) => p.wave === w);
      const upTo = all.filter(([, p]) => p.wave <= w);
      const counts = Object.fromEntries(STAGES.map((k) => [k, 0]));
      inWave.forEach(([, p]) => { counts[stageOf(p)] += 1; });
      const ok = upTo.filter(([, p]) => p.outcome === 'active').length / Math.max(upTo.length, 1);
      const bad = upTo.filter(([, p]) => ['rejected', 'failed', 'timed_out'].includes(p.outcome)).length / Math.max(upTo.length, 1);
      rows.push(h('tr', { class: w === r.wave ? 'current' : '' },
        h('td', {}, `${w + 1}`), h('td', {}, `${inWave.length}`),
        h('td', {}, stackedBar(STAGES.map((k) => [k, counts[k]]), inWave.length),
          h('small', {}, STAGES.filter((k) => counts[k]).map((k) => `${k} ${counts[k]}`).join(' · '))),
        h('td', { class: ok >= s.success_threshold ? 'good' : '' }, `${pct(ok)} (needs ${pct(s.success_threshold)})`),
        h('td', { class: bad > s.error_threshold ? 'bad' : '' }, `${pct(bad)} (limit ${pct(s.error_threshold)})`)));
    }
    waves.replaceChildren(table(['Wave', 'Devices', 'Progress by stage', 'Active so far', 'Errors so far'], rows),
      h('p', { class: 'summary' }, `bake ${s.bake_s}s · deadline ${s.deadline_s}s · on error: ${s.on_error}`,
        s.install_window ? ` · swaps between ${s.install_window} robot time` : '',
        s.install_on_command ? (r.install_ordered ? ' · install ordered' : ' · installs on command') : ''));

    const reports = all.filter(([, p]) => p.bench).map(([d, p]) => [d, p.bench]);
    bench.replaceChildren(reports.length
      ? table(['Device', 'engine', 'new p50', 'new p99', 'incumbent p99', 'passed', 'every engine (p99)'], [
        h('tr', { class: 'median' }, h('td', {}, 'median'), h('td', {}), h('td', {}, ms(median(reports.map(([, b]) => b.p50_ms)))),
          h('td', {}, ms(median(reports.map(([, b]) => b.p99_ms)))), h('td', {}, ms(median(reports.map(([, b]) => b.incumbent_p99_ms)))), h('td', {}), h('td', {})),
        ...reports.map(([d, b]) => h('tr', {}, h('td', {}, d), h('td', {}, b.engine || 'tract'), h('td', {}, ms(b.p50_ms)), h('td', {}, ms(b.p99_ms)),
          h('td', {}, ms(b.incumbent_p99_ms), b.incumbent_p99_ms !== undefined ? h('small', {}, ` on ${b.incumbent_engine || 'tract'}`) : ''),
          h('td', {}, b.passed ? 'yes' : 'no'), h('td', { class: 'engines' }, engineFigures(b))))])
      : h('p', { class: 'summary' }, 'no benchmark reported yet'));

    const shadowOf = (x) => (x ? `${x.agreed}/${x.samples} agree${x.passed ? '' : ' ✗'}` : '');
    devices.replaceChildren(table(['Device', 'Wave', 'Outcome', 'Engine', 'Shadow', 'Timeline'], all.map(([d, p]) => h('tr', { 'data-device': d },
      h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(d)}` }, d)), h('td', {}, p.wave + 1),
      h('td', {}, pill(p.outcome), p.reason ? ` ${p.reason}` : '', p.message ? ` ${p.message}` : ''),
      h('td', { class: 'engine', title: p.serving_engine ? 'serving' : 'chosen by the gate' }, engineOf(p)),
      h('td', { class: 'shadow', title: p.shadow && p.shadow.reason ? p.shadow.reason : '' }, shadowOf(p.shadow)),
      h('td', { class: 'timeline' }, (p.history || []).map((e) => h('span', { class: 'step', title: e.at }, `${e.stage} ${time(e.at)}`)))))));
  };
  await refresh();
  return { refresh, wants: (c) => c.kind === 'rollout' && c.id === id };
}
