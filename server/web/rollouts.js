// Rollouts: the list, newest first.
import { api } from './api.js';
import { h, pill, stackedBar, table, time } from './ui.js';

export async function render(root) {
  const body = h('div');
  root.append(h('h1', {}, 'Rollouts'), body);
  const refresh = async () => {
    const list = await api('rollouts');
    list.sort((a, b) => b.created_at.localeCompare(a.created_at));
    const rows = list.map((r) => {
      const s = r.summary;
      const total = Object.values(s).reduce((a, b) => a + b, 0);
      const bad = s.rejected + s.failed + (s.timed_out || 0);
      return h('tr', { 'data-rollout': r.rollout_id },
        h('td', {}, h('a', { href: `#/rollouts/${encodeURIComponent(r.rollout_id)}` }, r.rollout_id)),
        h('td', {}, `${r.slot} ${r.version}`), h('td', {}, pill(r.state)),
        h('td', {}, `${Math.min(r.wave + 1, r.waves)} / ${r.waves}`),
        h('td', {}, stackedBar([['active', s.active], ['in_progress', s.in_progress], ['deferred', s.deferred || 0], ['bad', bad], ['pending', s.pending]], total),
          `${s.active} of ${total} active`, s.deferred ? ` · ${s.deferred} deferred` : ''),
        h('td', {}, time(r.created_at)));
    });
    body.replaceChildren(table(['Rollout', 'Model', 'State', 'Wave', 'Progress', 'Created'], rows));
  };
  await refresh();
  return { refresh, wants: (c) => c.kind === 'rollout' };
}
