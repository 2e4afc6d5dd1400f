// Talks to the API with relative URLs (the page may live under a proxy's path prefix).
// The token stays in this tab's sessionStorage and goes only into Authorization headers.

const KEY = 'botfleet-token';

export class AuthNeeded extends Error {}

export const token = {
  get: () => sessionStorage.getItem(KEY) || '',
  set: (t) => sessionStorage.setItem(KEY, t),
  clear: () => sessionStorage.removeItem(KEY),
};

// A request with the token; the caller reads the body (images and downloads are not JSON).
export async function request(path, options = {}) {
  const headers = { Accept: 'application/json', ...(options.headers || {}) };
  const t = token.get();
  if (t) headers.Authorization = `Bearer ${t}`;
  const response = await fetch(`api/v1/${path}`, { ...options, headers });
  if (response.status === 401) throw new AuthNeeded('token needed');
  return response;
}

export async function api(path, options = {}) {
  const response = await request(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

export const post = (path) => api(path, { method: 'POST' });

// Server-sent change notices. EventSource cannot send headers, so it opens the stream with
// a short-lived ticket; on any error it gets a new ticket and reconnects (a restarted
// server forgets tickets), and each new stream starts with a "resync" event.
export function openStream({ onChange, onResync, onState }) {
  let source = null;
  let delay = 500;
  const connect = async () => {
    try {
      const { ticket } = await post('events/ticket');
      source = new EventSource(`api/v1/events/stream?ticket=${encodeURIComponent(ticket)}`);
      source.addEventListener('resync', () => { delay = 500; onState(true); onResync(); });
      source.addEventListener('change', (e) => onChange(JSON.parse(e.data)));
      source.onerror = () => { source.close(); onState(false); retry(); };
    } catch (err) {
      onState(false);
      if (!(err instanceof AuthNeeded)) retry();
    }
  };
  const retry = () => { setTimeout(connect, delay); delay = Math.min(delay * 2, 10000); };
  connect();
  return { close: () => source && source.close() };
}
