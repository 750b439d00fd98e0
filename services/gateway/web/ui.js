// DOM and formatting helpers shared by the pages. Everything is built with createElement and
// textContent (never innerHTML with data), and styled through classes: the Content-Security-Policy
// allows no inline styles.

import { ApiError } from './api.js';

// el('a', {href: '#/x', class: 'c', dataset: {testid: 't'}}, 'text', child, ...)
// Attributes: class, dataset (object), on<event> (functions), boolean true/false, anything else
// with setAttribute. Children: strings, nodes, arrays of them; null and undefined are skipped.
export function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
    else if (k === 'value') e.value = v;
    else if (v === true) e.setAttribute(k, '');
    else e.setAttribute(k, String(v));
  }
  append(e, children);
  return e;
}

function append(e, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(e, c);
    else e.append(c instanceof Node ? c : String(c));
  }
}

export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

// ---- the error area ----------------------------------------------------------------------------

export function showError(err, what) {
  const box = document.getElementById('error');
  const text = document.getElementById('error-text');
  let msg;
  if (err instanceof ApiError) msg = err.describe();
  else msg = err && err.message ? err.message : String(err);
  text.textContent = what ? `${what}: ${msg}` : msg;
  box.hidden = false;
}

export function clearError() {
  document.getElementById('error').hidden = true;
}

// Runs fn; an exception (other than an abort on leaving the page) goes to the error area.
export async function guard(what, fn) {
  try {
    return await fn();
  } catch (e) {
    if (e && e.name === 'AbortError') return undefined;
    if (e instanceof ApiError && e.httpStatus === 401) return undefined; // back to the login form
    showError(e, what);
    return undefined;
  }
}

// ---- formatting --------------------------------------------------------------------------------

const pad2 = (n) => String(n).padStart(2, '0');

// "2024-05-01 14:03:07" in local time, from an RFC 3339 string or ms; "—" when unset.
export function fmtTime(v) {
  if (v === undefined || v === null || v === '' || v === '0') return '—';
  const d = typeof v === 'number' ? new Date(v) : new Date(/^\d+$/.test(v) ? Number(v) : v);
  if (Number.isNaN(d.getTime())) return String(v);
  return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
}

export function fmtAgo(v) {
  if (!v) return 'never';
  const t = typeof v === 'number' ? v : Date.parse(v);
  if (Number.isNaN(t)) return String(v);
  const s = Math.round((Date.now() - t) / 1000);
  if (s < 0) return 'in the future';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

// 900000 → "15 min"; 10000 → "10 s".
export function fmtDuration(ms) {
  const v = Number(ms || 0);
  if (v % 3600000 === 0 && v) return `${v / 3600000} h`;
  if (v % 60000 === 0 && v) return `${v / 60000} min`;
  if (v >= 1000) return `${v / 1000} s`;
  return `${v} ms`;
}

export function fmtBytes(n) {
  const v = Number(n || 0);
  if (v < 1024) return `${v} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let x = v / 1024, i = 0;
  while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
  return `${x.toFixed(x < 10 ? 1 : 0)} ${units[i]}`;
}

// "DEVICE_STATUS_ONLINE" → "online"; "ALERT_STATE_FIRING" → "firing".
export function enumName(v, prefix) {
  if (!v) return 'unspecified';
  const s = prefix && v.startsWith(prefix) ? v.slice(prefix.length) : v;
  return s.toLowerCase().replace(/_/g, ' ');
}

// A coloured label; the class is derived from the enum's short name ("badge badge-online").
export function badge(v, prefix, testid) {
  const name = enumName(v, prefix);
  return el('span', { class: `badge badge-${name.replace(/ /g, '-')}`, dataset: testid ? { testid } : undefined }, name);
}

export function labelsText(labels) {
  return Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(', ');
}

// A table: columns [{title, cell(row) → node|string, class}], rows, options {testid(row),
// attrs(row), empty, caption}.
export function table(columns, rows, opts = {}) {
  const head = el('thead', {}, el('tr', {}, columns.map((c) => el('th', { scope: 'col', class: c.class }, c.title))));
  const body = el('tbody');
  for (const r of rows) body.append(tableRow(columns, r, opts));
  if (!rows.length) body.append(el('tr', { class: 'empty-row' }, el('td', { colspan: columns.length }, opts.empty || 'nothing here')));
  return el('table', { class: 'data', dataset: opts.tableTestid ? { testid: opts.tableTestid } : undefined },
    opts.caption ? el('caption', {}, opts.caption) : null, head, body);
}

export function tableRow(columns, r, opts = {}) {
  const attrs = opts.attrs ? opts.attrs(r) : {};
  return el('tr', attrs, columns.map((c) => el('td', { class: c.class }, c.cell(r))));
}

// A definition list from [[term, value], ...]; values may be nodes.
export function dl(pairs, testid) {
  return el('dl', { class: 'meta', dataset: testid ? { testid } : undefined },
    pairs.map(([k, v]) => [el('dt', {}, k), el('dd', {}, v === undefined || v === null || v === '' ? '—' : v)]));
}

export function section(title, ...children) {
  const id = `h-${title.toLowerCase().replace(/[^a-z0-9]+/g, '-')}`;
  return el('section', { class: 'panel', 'aria-labelledby': id }, el('h2', { id }, title), ...children);
}

export function pageTitle(text, ...extra) {
  return el('div', { class: 'page-head' }, el('h1', {}, text), ...extra);
}

// A small status line ("loading…", "live", "updates not available") with a testid and data-state.
export function statusLine(testid) {
  const e = el('p', { class: 'status', dataset: { testid, state: 'idle' }, 'aria-live': 'polite' });
  e.set = (state, text) => { e.dataset.state = state; e.textContent = text; };
  return e;
}

export function jsonBlock(v, testid) {
  return el('pre', { class: 'json', dataset: testid ? { testid } : undefined }, v === undefined ? '{}' : JSON.stringify(v, null, 2));
}
