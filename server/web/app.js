// The dashboard: hash routes, the login box, live updates.
import { api, AuthNeeded, openStream, token } from './api.js';
import { error } from './ui.js';
import * as fleet from './fleet.js';
import * as device from './device.js';
import * as rollouts from './rollouts.js';
import * as rollout from './rollout.js';
import * as models from './models.js';
import * as channels from './channels.js';
import * as data from './data.js';

const main = document.getElementById('main');
const state = { role: 'read', page: null, stream: null, pending: null };

function route() {
  const parts = (location.hash.slice(1) || 'devices').split('?')[0].split('/').filter(Boolean);
  const id = parts[1] ? decodeURIComponent(parts[1]) : null;
  switch (parts[0]) {
    case 'devices': return id ? [device, id] : [fleet, null];
    case 'rollouts': return id ? [rollout, id] : [rollouts, null];
    case 'models': return [models, null];
    case 'channels': return [channels, null];
    case 'data': return [data, null];
    default: return [fleet, null];
  }
}

async function show() {
  const [page, id] = route();
  main.replaceChildren();
  state.page = { module: page, id, view: null };
  const ctx = { id, role: state.role, query: new URLSearchParams(location.hash.split('?')[1] || '') };
  try {
    state.page.view = await page.render(main, ctx);
  } catch (err) {
    if (err instanceof AuthNeeded) return needLogin();
    main.append(error(err));
  }
}

// Changes come in bursts (a wave of devices, every robot's telemetry): refetch at most
// every 300 ms, or every `view.every` ms for pages that list the whole fleet.
function changed(change) {
  const view = state.page && state.page.view;
  if (!view || !view.wants(change)) return;
  if (state.pending) return;
  state.pending = setTimeout(async () => {
    state.pending = null;
    try { await view.refresh(); } catch (err) { if (err instanceof AuthNeeded) needLogin(); }
  }, view.every || 300);
}

function resync() {
  // Counts the streams opened (each starts with a resync): shows a reconnect happened.
  const el = document.getElementById('live');
  el.dataset.streams = String(Number(el.dataset.streams || 0) + 1);
  const view = state.page && state.page.view;
  if (view) view.refresh().catch(() => {});
}

function live(on) {
  const el = document.getElementById('live');
  el.textContent = on ? 'live' : 'offline';
  el.className = `live ${on ? 'on' : 'off'}`;
}

function needLogin(message = '') {
  if (state.stream) { state.stream.close(); state.stream = null; }
  live(false);
  document.getElementById('login').hidden = false;
  document.getElementById('login-error').textContent = message;
  main.replaceChildren();
}

async function start() {
  try {
    const session = await api('session');
    state.role = session.role;
    document.getElementById('login').hidden = true;
    document.getElementById('who').textContent = session.auth ? `${session.name} (${session.role})` : 'open access';
    document.getElementById('logout').hidden = !session.auth;
    document.body.dataset.role = session.role;
  } catch (err) {
    if (err instanceof AuthNeeded) return needLogin(token.get() ? 'that token is not valid' : '');
    main.replaceChildren(error(err));
    return;
  }
  state.stream = openStream({ onChange: changed, onResync: resync, onState: live });
  await show();
}

document.getElementById('login').addEventListener('submit', (e) => {
  e.preventDefault();
  token.set(document.getElementById('token').value.trim());
  document.getElementById('token').value = '';
  start();
});
document.getElementById('logout').addEventListener('click', () => { token.clear(); location.reload(); });
window.addEventListener('hashchange', show);
start();
