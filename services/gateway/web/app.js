// The iotsuite dashboard: login with an API key, hash routing (#/devices, #/devices/<id>, ...),
// and the page shell. Pages live in fleet.js (overview, devices) and ops.js (alerts, rules,
// firmware, rollouts, services). Each page is render(main, ctx) where ctx carries the route's
// parameters and query, a signal aborted when the user leaves, and onLeave() for timers and
// streams; so nothing a page started outlives it.

import { api, session, storedKey, storeKey, KEY_FORMAT, ApiError } from './api.js';
import { el, clear, showError, clearError, enumName } from './ui.js';
import { overviewPage, devicesPage, devicePage } from './fleet.js';
import { alertsPage, rulesPage, firmwarePage, rolloutPage, servicesPage } from './ops.js';

const routes = [
  { re: /^\/$/, nav: 'overview', render: overviewPage, title: 'Overview' },
  { re: /^\/devices$/, nav: 'devices', render: devicesPage, title: 'Devices' },
  { re: /^\/devices\/([^/]+)$/, nav: 'devices', render: devicePage, title: 'Device', params: ['id'] },
  { re: /^\/alerts$/, nav: 'alerts', render: alertsPage, title: 'Alerts' },
  { re: /^\/rules$/, nav: 'rules', render: rulesPage, title: 'Rules' },
  { re: /^\/firmware$/, nav: 'firmware', render: firmwarePage, title: 'Firmware' },
  { re: /^\/rollouts\/([^/]+)$/, nav: 'firmware', render: rolloutPage, title: 'Rollout', params: ['id'] },
  { re: /^\/services$/, nav: 'services', render: servicesPage, title: 'Services' },
];

let current = null; // {ctl, leave: [fn]}
let loginNotice = '';

function leavePage() {
  if (!current) return;
  current.ctl.abort();
  for (const fn of current.leave) {
    try { fn(); } catch (e) { /* a page's cleanup must not stop the next page */ }
  }
  current = null;
}

// "#/devices?type=pump" → {path: "/devices", query: URLSearchParams}
function parseHash() {
  const h = location.hash.replace(/^#/, '') || '/';
  const q = h.indexOf('?');
  return { path: q < 0 ? h : h.slice(0, q), query: new URLSearchParams(q < 0 ? '' : h.slice(q + 1)) };
}

async function route() {
  leavePage();
  const main = document.getElementById('main');
  clear(main);
  clearError();
  const { path, query } = parseHash();
  if (!session.key) { renderLogin(main); return; }
  if (path === '/login') { location.replace('#/'); return; }
  const r = routes.find((x) => x.re.test(path));
  for (const a of document.querySelectorAll('#nav a')) {
    if (r && a.dataset.nav === r.nav) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (!r) {
    main.append(el('h1', {}, 'Not found'), el('p', {}, 'No page here. ', el('a', { href: '#/' }, 'Go to the overview.')));
    return;
  }
  const m = r.re.exec(path);
  const params = {};
  (r.params || []).forEach((name, i) => { params[name] = decodeURIComponent(m[i + 1]); });
  const ctl = new AbortController();
  current = { ctl, leave: [] };
  const page = current;
  const ctx = {
    params, query, signal: ctl.signal,
    alive: () => current === page,
    onLeave: (fn) => page.leave.push(fn),
    // Replaces the query part of the hash without re-rendering the page (filters, chart choices).
    setQuery: (q) => {
      const s = q.toString();
      history.replaceState(null, '', `#${path}${s ? `?${s}` : ''}`);
    },
  };
  document.title = `${r.title} · iotsuite`;
  try {
    await r.render(main, ctx);
  } catch (e) {
    if (e && e.name === 'AbortError') return;
    if (e instanceof ApiError && e.httpStatus === 401) return;
    showError(e);
  }
}

// ---- login ---------------------------------------------------------------------------------------

function renderLogin(main) {
  document.title = 'Log in · iotsuite';
  document.getElementById('nav').hidden = true;
  document.getElementById('session').hidden = true;
  const input = el('input', {
    id: 'login-key', name: 'key', type: 'password', autocomplete: 'off', spellcheck: 'false', required: true,
    placeholder: 'iotk_…', dataset: { testid: 'login-key' }, 'aria-describedby': 'login-help',
  });
  const msg = el('p', { class: 'form-error', role: 'alert', dataset: { testid: 'login-error' } }, loginNotice);
  msg.hidden = !loginNotice;
  loginNotice = '';
  const button = el('button', { type: 'submit', dataset: { testid: 'login-submit' } }, 'Log in');
  const form = el('form', { class: 'login', dataset: { testid: 'login-form' } },
    el('h1', {}, 'Log in'),
    el('label', { for: 'login-key' }, 'API key'),
    input,
    el('p', { id: 'login-help', class: 'hint' }, 'Paste an API key (iotk_<12 hex>_<64 hex>). It is kept in this browser until you log out.'),
    msg,
    button);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    msg.hidden = true;
    if (!KEY_FORMAT.test(key)) {
      msg.textContent = 'That is not an API key: it looks like iotk_ followed by 12 and then 64 hexadecimal digits.';
      msg.hidden = false;
      input.focus();
      return;
    }
    button.disabled = true;
    try {
      const who = await api('GET', '/api/v1/whoami', undefined, { key });
      storeKey(key);
      session.who = who;
      showSession();
      if (!location.hash || location.hash === '#/login') location.hash = '#/';
      else route();
    } catch (e) {
      msg.textContent = e instanceof ApiError && e.httpStatus === 401 ? `The key was refused: ${e.message}` : `Cannot log in: ${e instanceof ApiError ? e.describe() : e.message}`;
      msg.hidden = false;
    } finally {
      button.disabled = false;
    }
  });
  main.append(form);
  input.focus();
}

function showSession() {
  const who = session.who || {};
  document.getElementById('whoami').textContent = `${who.name || who.id || 'key'} · ${enumName(who.role, 'ROLE_')}`;
  document.getElementById('whoami').title = `key id ${who.id || '?'}`;
  document.getElementById('session').hidden = false;
  document.getElementById('nav').hidden = false;
}

function logout(notice) {
  leavePage();
  storeKey(null);
  loginNotice = notice || '';
  document.getElementById('session').hidden = true;
  document.getElementById('nav').hidden = true;
  route();
}

// A 401 from any call: the key was revoked or is unknown; back to the login form, saying why.
session.onUnauthorized = (err) => {
  if (!session.key) return;
  logout(`You were logged out: the gateway refused the key (${err.message}).`);
};

async function boot() {
  document.getElementById('logout').addEventListener('click', () => logout('You logged out.'));
  document.getElementById('error-close').addEventListener('click', clearError);
  window.addEventListener('hashchange', route);
  const key = storedKey();
  if (key) {
    session.key = key;
    try {
      session.who = await api('GET', '/api/v1/whoami');
      showSession();
    } catch (e) {
      if (!session.key) return; // a 401: the handler has shown the login form
      showError(e, 'Checking the stored key');
      showSession(); // the gateway or a backend is down; the key may still be good
    }
  }
  route();
}

boot();
