// The dashboard's only way to the REST API: every request carries the key the user logged in with
// (Authorization: Bearer), errors come back as ApiError with the gateway's {code, status, message,
// details}, and a 401 anywhere ends the session (the app goes back to the login form). Also the
// Server-Sent Events reader: EventSource cannot send the key header, so streams are read with
// fetch() and parsed here.

const KEY_STORE = 'iotsuite.apiKey';
export const KEY_FORMAT = /^iotk_[0-9a-f]{12}_[0-9a-f]{64}$/;

export class ApiError extends Error {
  constructor(httpStatus, body, method, path) {
    const b = body && typeof body === 'object' ? body : {};
    super(b.message || `HTTP ${httpStatus}`);
    this.httpStatus = httpStatus;
    this.code = b.code;
    this.status = b.status || `HTTP_${httpStatus}`;
    this.details = b.details;
    this.method = method;
    this.path = path;
  }

  // "503 UNAVAILABLE: ingest is down (service: ingest) — GET /api/v1/..."
  describe() {
    let s = `${this.httpStatus} ${this.status}: ${this.message}`;
    if (this.details && typeof this.details === 'object') {
      const d = Object.entries(this.details).map(([k, v]) => `${k}: ${typeof v === 'string' ? v : JSON.stringify(v)}`);
      if (d.length) s += ` (${d.join(', ')})`;
    }
    if (this.method) s += ` — ${this.method} ${this.path}`;
    return s;
  }
}

// The session: the key in localStorage, and who it is (from /api/v1/whoami).
export const session = {
  key: null,
  who: null,
  onUnauthorized: null, // set by the app: called with the ApiError of a 401
};

export function storedKey() {
  try { return localStorage.getItem(KEY_STORE); } catch (e) { return null; }
}

export function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
  } catch (e) { /* private mode: the session lasts as long as the page */ }
  session.key = key;
  if (!key) session.who = null;
}

const ROLES = ['ROLE_UNSPECIFIED', 'ROLE_VIEWER', 'ROLE_OPERATOR', 'ROLE_ADMIN'];

// Whether the logged-in key has at least role ("ROLE_OPERATOR").
export function can(role) {
  const have = session.who ? ROLES.indexOf(session.who.role) : 0;
  return have >= ROLES.indexOf(role);
}

// Builds "?a=1&b=x&b=y" from an object; arrays repeat the parameter, empty values are left out.
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v === undefined || v === null || v === '') continue;
    if (Array.isArray(v)) v.forEach((x) => q.append(k, String(x)));
    else q.append(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

// One request. Resolves with the parsed JSON (or null for an empty body); rejects with ApiError.
// opts.key overrides the session's key (the login form checks a key before keeping it).
export async function api(method, path, body, opts = {}) {
  const key = opts.key || session.key;
  const headers = { Accept: 'application/json' };
  if (key) headers.Authorization = `Bearer ${key}`;
  let payload;
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, { method, headers, body: payload, signal: opts.signal, cache: 'no-store' });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, { status: 'NETWORK', message: `the gateway cannot be reached (${e.message})` }, method, path);
  }
  const text = await res.text();
  let json = null;
  if (text) {
    try { json = JSON.parse(text); } catch (e) { json = { message: text.slice(0, 300) }; }
  }
  if (!res.ok) {
    const err = new ApiError(res.status, json, method, path);
    // A 401 on the login form's own check is that form's business, not the end of a session.
    if (res.status === 401 && !opts.key && session.onUnauthorized) session.onUnauthorized(err);
    throw err;
  }
  return json;
}

// Every page of a list: follows nextPageToken; `field` names the repeated field ("devices").
// Stops after maxPages (a guard against an endless list), setting .truncated on the result.
export async function listAll(path, params, field, opts = {}) {
  const out = [];
  let token = '';
  const maxPages = opts.maxPages || 50;
  for (let page = 0; page < maxPages; page++) {
    const r = await api('GET', path + query({ ...params, pageToken: token }), undefined, opts);
    out.push(...((r && r[field]) || []));
    token = (r && r.nextPageToken) || '';
    if (!token) return out;
  }
  out.truncated = true;
  return out;
}

// A Server-Sent Events stream read with fetch(). Events go to onEvent({id, event, data}) with data
// parsed as JSON; the connection's state goes to onState(state, info) where state is "connecting",
// "live", "retrying" (info.delayMs, info.error), "unavailable" (the route answered 404: not
// retried) or "closed". A stream that ends or fails is reopened with backoff (1 s doubling to
// 30 s, or the server's retry: as the floor), sending Last-Event-ID so nothing is missed where
// the server can resume. close() stops it for good.
export function openStream(path, { onEvent, onState }) {
  const st = { lastId: null, closed: false, ctl: null, timer: null, attempt: 0, retryMs: 1000 };
  const state = (s, info) => { if (onState) onState(s, info || {}); };

  const dispatch = (ev) => {
    if (ev.id !== undefined) st.lastId = ev.id;
    if (!ev.data.length) return;
    let data = ev.data.join('\n');
    try { data = JSON.parse(data); } catch (e) { /* left as text */ }
    if (onEvent) onEvent({ id: ev.id === undefined ? st.lastId : ev.id, event: ev.event || 'message', data });
  };

  const connect = async () => {
    if (st.closed) return;
    st.ctl = new AbortController();
    state('connecting');
    const headers = { Accept: 'text/event-stream' };
    if (session.key) headers.Authorization = `Bearer ${session.key}`;
    if (st.lastId) headers['Last-Event-ID'] = st.lastId;
    let error;
    try {
      const res = await fetch(path, { headers, signal: st.ctl.signal, cache: 'no-store' });
      if (res.status === 404) {
        await res.text().catch(() => '');
        state('unavailable', { httpStatus: 404 });
        st.closed = true;
        return;
      }
      if (!res.ok) {
        let body = null;
        try { body = await res.json(); } catch (e) { /* not JSON */ }
        const err = new ApiError(res.status, body, 'GET', path);
        if (res.status === 401) {
          st.closed = true;
          state('closed', { error: err });
          if (session.onUnauthorized) session.onUnauthorized(err);
          return;
        }
        // Anything else 4xx will not get better by asking again.
        if (res.status < 500 && res.status !== 429) {
          st.closed = true;
          state('failed', { error: err });
          return;
        }
        throw err;
      }
      st.attempt = 0;
      state('live');
      await read(res.body.getReader());
      error = new Error('the stream ended');
    } catch (e) {
      if (st.closed) return;
      error = e;
    }
    if (st.closed) return;
    const delayMs = Math.min(30000, Math.max(st.retryMs, 1000 * 2 ** st.attempt)) * (0.8 + Math.random() * 0.4);
    st.attempt = Math.min(st.attempt + 1, 5);
    state('retrying', { delayMs: Math.round(delayMs), error });
    st.timer = setTimeout(connect, delayMs);
  };

  // Lines end in \n, \r\n or \r; a read may end anywhere, even between \r and \n, so whatever
  // follows the last complete line waits for the next read.
  const read = async (reader) => {
    const dec = new TextDecoder();
    let buf = '';
    let ev = { data: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += dec.decode(value, { stream: true });
      let start = 0;
      for (;;) {
        const m = /\r\n|\r|\n/g;
        m.lastIndex = start;
        const hit = m.exec(buf);
        if (!hit) break;
        // A lone \r at the very end may be the first half of \r\n: wait for more.
        if (hit[0] === '\r' && hit.index === buf.length - 1) break;
        const line = buf.slice(start, hit.index);
        start = hit.index + hit[0].length;
        if (line === '') { dispatch(ev); ev = { data: [] }; continue; }
        if (line[0] === ':') continue; // a comment: keepalive
        const c = line.indexOf(':');
        const field = c < 0 ? line : line.slice(0, c);
        let v = c < 0 ? '' : line.slice(c + 1);
        if (v[0] === ' ') v = v.slice(1);
        if (field === 'data') ev.data.push(v);
        else if (field === 'event') ev.event = v;
        else if (field === 'id') { if (!v.includes('\0')) ev.id = v; }
        else if (field === 'retry') { if (/^\d+$/.test(v)) st.retryMs = Number(v); }
      }
      buf = buf.slice(start);
    }
  };

  connect();
  return {
    close() {
      st.closed = true;
      clearTimeout(st.timer);
      if (st.ctl) st.ctl.abort();
      state('closed');
    },
    get lastEventId() { return st.lastId; },
  };
}
