// Fleet: every device with presence, labels, active model and engine per slot, last seen.
import { api } from './api.js';
import { ago, h, pill, table } from './ui.js';

export async function render(root, ctx) {
  const selector = ctx.query.get('selector') || '';
  const input = h('input', { id: 'selector', value: selector, placeholder: 'site in (lab,depot),arch=aarch64,!quarantine', size: 48 });
  const form = h('form', { class: 'filter', onsubmit: (e) => {
    e.preventDefault();
    const s = input.value.trim();
    location.hash = s ? `#/devices?selector=${encodeURIComponent(s)}` : '#/devices';
  } }, h('label', {}, 'Label selector ', input), h('button', {}, 'Filter'));
  const body = h('div');
  root.append(h('h1', {}, 'Fleet'), form, body);

  const refresh = async () => {
    const query = selector ? `?selector=${encodeURIComponent(selector)}` : '';
    const devices = await api(`devices${query}`);
    const online = devices.filter((d) => d.online).length;
    const rows = devices.map((d) => {
      const labels = d.labels || (d.info && d.info.labels) || {};
      const active = (d.status && d.status.active) || {};
      return h('tr', { 'data-device': d.device_id },
        h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(d.device_id)}` }, d.device_id)),
        h('td', {}, d.online ? pill('online') : pill('offline')),
        h('td', {}, Object.entries(labels).map(([k, v]) => h('code', { class: 'label' }, `${k}=${v}`))),
        h('td', {}, Object.entries(active).map(([slot, m]) => h('div', {}, `${slot}: ${m.name} ${m.version} `,
          h('small', { class: 'engine' }, m.engine || 'tract')))),
        h('td', { title: d.last_seen || '' }, ago(d.last_seen)));
    });
    body.replaceChildren(
      h('p', { class: 'summary' }, `${devices.length} devices, ${online} online`),
      table(['Device', 'Presence', 'Labels', 'Active model per slot', 'Last seen'], rows));
  };
  await refresh();
  return { refresh, wants: (c) => c.kind === 'device', every: 2000 };
}
