// Models: the registry with sizes, quantization, signing key, provenance, where active.
import { api } from './api.js';
import { bytes, h, table } from './ui.js';

export async function render(root) {
  const body = h('div');
  root.append(h('h1', {}, 'Models'), body);
  const refresh = async () => {
    const [models, devices] = await Promise.all([api('models'), api('devices')]);
    const where = {};
    for (const d of devices) {
      for (const [slot, m] of Object.entries((d.status && d.status.active) || {})) {
        (where[`${slot}/${m.sha256}`] ||= []).push(d.device_id);
      }
    }
    models.sort((a, b) => a.slot.localeCompare(b.slot) || b.release - a.release);
    const rows = models.map((m) => {
      const prov = (m.manifest && m.manifest.provenance) || {};
      const active = where[`${m.slot}/${m.sha256}`] || [];
      return h('tr', {},
        h('td', {}, m.slot), h('td', {}, m.name), h('td', {}, m.version), h('td', {}, m.release),
        h('td', {}, bytes(m.size)), h('td', {}, m.quantization), h('td', {}, h('code', {}, m.key_id)),
        h('td', {}, Object.entries(prov).map(([k, v]) => h('div', {}, `${k}: ${v}`))),
        h('td', {}, active.length ? `${active.length}: ${active.slice(0, 5).join(', ')}${active.length > 5 ? ' …' : ''}` : '—'));
    });
    body.replaceChildren(table(['Slot', 'Name', 'Version', 'Release', 'Size', 'Quantization', 'Key id', 'Provenance', 'Active on'], rows));
  };
  await refresh();
  return { refresh, wants: (c) => c.kind === 'device', every: 2000 };
}
