// Channels: a selector with a pinned model per slot, and how far their followers are.
import { api } from './api.js';
import { h, table, time } from './ui.js';

function pins(c) {
  const slots = Object.entries(c.pins || {});
  if (!slots.length) return '— (nothing pinned yet: the first rollout to it pins)';
  return slots.map(([slot, p]) => h('div', { 'data-slot': slot },
    `${slot} = ${p.version} (release ${p.release}) `,
    h('span', { class: 'muted' }, p.rollout_id ? `by ${p.rollout_id}` : 'pinned by an operator'),
    ` · ${time(p.set_at)}`));
}

function followers(c) {
  const slots = Object.entries(c.followers || {});
  if (!slots.length) return '—';
  return slots.map(([slot, f]) => h('div', { class: 'followers', 'data-slot': slot },
    `${slot}: ${f.active} of ${f.devices} serving, ${f.desired} told`));
}

export async function render(root) {
  const body = h('div');
  root.append(h('h1', {}, 'Channels'),
    h('p', { class: 'muted' }, 'Devices a channel selects follow its pins, robots that join later too; where channels overlap, the higher priority wins.'),
    body);
  const refresh = async () => {
    const list = await api('channels');
    list.sort((a, b) => b.priority - a.priority || a.name.localeCompare(b.name));
    const rows = list.map((c) => h('tr', { 'data-channel': c.name },
      h('td', {}, c.name), h('td', {}, h('code', {}, c.selector)), h('td', {}, c.priority),
      h('td', {}, pins(c)), h('td', {}, followers(c)),
      h('td', {}, c.rollouts.length
        ? c.rollouts.map((id) => h('div', {}, h('a', { href: `#/rollouts/${encodeURIComponent(id)}` }, id)))
        : '—')));
    body.replaceChildren(list.length
      ? table(['Channel', 'Selector', 'Priority', 'Pinned', 'Followers', 'Live rollouts'], rows)
      : h('p', {}, 'No channel yet: PUT /api/v1/channels/{name} or botfleet-server channel set.'));
  };
  await refresh();
  return { refresh, wants: (c) => c.kind === 'device' || c.kind === 'rollout', every: 2000 };
}
