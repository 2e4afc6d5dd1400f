// Small DOM helpers shared by the pages.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function ago(ts) {
  if (!ts) return 'never';
  const s = Math.max(0, Math.round((Date.now() - Date.parse(ts)) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.round(s / 60)}m ago`;
  return `${Math.round(s / 3600)}h ago`;
}

export const time = (ts) => (ts ? new Date(ts).toLocaleTimeString() : '');

export function bytes(n) {
  if (n === undefined || n === null) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export const ms = (v) => (v === undefined || v === null ? '' : `${v.toFixed(2)} ms`);

export const pill = (text, cls = text) => h('span', { class: `pill ${cls}` }, text);

export function table(headers, rows) {
  return h('table', {},
    h('thead', {}, h('tr', {}, headers.map((x) => h('th', {}, x)))),
    h('tbody', {}, rows));
}

// A stacked bar: one segment per [name, count].
export function stackedBar(parts, total) {
  const bar = h('div', { class: 'bar', role: 'img' });
  for (const [name, count] of parts) {
    if (!count) continue;
    bar.append(h('span', {
      class: `seg ${name}`, style: `width:${(100 * count) / Math.max(total, 1)}%`,
      title: `${name}: ${count}`,
    }));
  }
  return bar;
}

// Resolves true when the operator confirms.
export function confirm(text) {
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-text').textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.showModal();
  });
}

export const error = (err) => h('p', { class: 'error' }, String(err.message || err));
