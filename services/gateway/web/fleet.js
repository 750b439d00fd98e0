// Fleet pages: the overview (devices by status, the online trend), the device list (search and
// filters) and a device's page (metadata, shadow, latest values, the telemetry chart with live
// points, commands).

import { api, listAll, query, openStream, can } from './api.js';
import { lineChart, formatValue } from './chart.js';
import {
  el, clear, guard, fmtTime, fmtAgo, fmtDuration, badge, enumName, labelsText, table, dl, section, pageTitle, statusLine,
  jsonBlock,
} from './ui.js';

export const STATUSES = [
  'DEVICE_STATUS_ONLINE', 'DEVICE_STATUS_OFFLINE', 'DEVICE_STATUS_PROVISIONED',
  'DEVICE_STATUS_MAINTENANCE', 'DEVICE_STATUS_ERROR', 'DEVICE_STATUS_DECOMMISSIONED',
];
const SP = 'DEVICE_STATUS_';

// ---- overview ----------------------------------------------------------------------------------

const TREND_EVERY_MS = 10000;
const TREND_KEEP_MS = 3600 * 1000;
// Samples of the online count survive a visit to another page (within this browser tab), so
// coming back shows the trend so far; they are taken only while the overview is open.
const trend = [];

export async function overviewPage(main, ctx) {
  const cards = el('div', { class: 'cards', dataset: { testid: 'status-counts' } });
  const status = statusLine('overview-status');
  const trendBox = el('div', { class: 'chart-box' });
  const alertsCard = el('div', { class: 'cards' });
  main.append(
    pageTitle('Fleet overview'),
    section('Devices by status', cards, status),
    section('Online devices',
      el('p', { class: 'hint' }, `The count of online devices, sampled every ${TREND_EVERY_MS / 1000} s while this page is open.`),
      trendBox),
    section('Alerts', alertsCard));

  const drawTrend = () => {
    const now = Date.now();
    while (trend.length && trend[0].t < now - TREND_KEEP_MS) trend.shift();
    const from = Math.min(trend.length ? trend[0].t : now, now - 5 * 60000);
    clear(trendBox).append(lineChart(trend, from, now + 1000, {
      title: 'Online devices over time', yLabel: 'online devices', testid: 'online-trend', height: 260, zero: true,
      empty: 'waiting for the first sample',
    }));
  };

  const sample = async () => {
    status.set('loading', 'counting devices…');
    const r = (await api('GET', '/api/v1/devices:count', undefined, { signal: ctx.signal })) || {};
    if (!ctx.alive()) return;
    const total = Number(r.total || 0);
    const by = {};
    for (const b of r.byStatus || []) by[b.status || 'DEVICE_STATUS_UNSPECIFIED'] = Number(b.count || 0);
    clear(cards).append(
      el('a', { class: 'card', href: '#/devices', dataset: { testid: 'count-total' } },
        el('span', { class: 'card-n' }, String(total)), el('span', { class: 'card-label' }, 'devices')),
      ...STATUSES.map((s) => {
        const name = enumName(s, SP);
        return el('a', { class: `card card-${name}`, href: `#/devices?status=${s}`, dataset: { testid: `count-${name}`, status: s } },
          el('span', { class: 'card-n' }, String(by[s] || 0)), el('span', { class: 'card-label' }, name));
      }));
    trend.push({ t: Date.now(), v: by.DEVICE_STATUS_ONLINE || 0 });
    drawTrend();
    status.set('ok', `${total} devices, counted at ${fmtTime(Date.now())}`);
  };

  drawTrend();
  // The next sample is planned when this one is done, so a slow gateway never stacks them up.
  let timer = null;
  const tick = () => guard('Counting devices', sample).then(() => {
    if (ctx.alive()) timer = setTimeout(tick, TREND_EVERY_MS);
  });
  ctx.onLeave(() => clearTimeout(timer));
  tick();

  guard('Listing firing alerts', async () => {
    const r = await api('GET', `/api/v1/alerts${query({ state: 'ALERT_STATE_FIRING', pageSize: 1000 })}`, undefined, { signal: ctx.signal });
    const alerts = (r && r.alerts) || [];
    const crit = alerts.filter((a) => a.severity === 'SEVERITY_CRITICAL').length;
    alertsCard.append(
      el('a', { class: 'card card-firing', href: '#/alerts', dataset: { testid: 'count-firing' } },
        el('span', { class: 'card-n' }, `${alerts.length}${r && r.nextPageToken ? '+' : ''}`), el('span', { class: 'card-label' }, 'firing')),
      el('a', { class: 'card card-critical', href: '#/alerts' },
        el('span', { class: 'card-n' }, String(crit)), el('span', { class: 'card-label' }, 'critical')));
  });
}

// ---- device list -------------------------------------------------------------------------------

export async function devicesPage(main, ctx) {
  const q = ctx.query;
  const search = el('input', { id: 'device-search', type: 'search', value: q.get('q') || '', dataset: { testid: 'device-search' }, placeholder: 'name or id' });
  const type = el('input', { id: 'filter-type', type: 'text', value: q.get('type') || '', dataset: { testid: 'filter-type' }, placeholder: 'e.g. thermostat' });
  const labels = el('input', { id: 'filter-labels', type: 'text', value: q.get('labels') || '', dataset: { testid: 'filter-labels' }, placeholder: 'env=prod,zone in (a,b)' });
  const chosen = new Set((q.get('status') || '').split(',').filter(Boolean));
  const boxes = STATUSES.map((s) => {
    const id = `st-${s}`;
    const box = el('input', { type: 'checkbox', id, value: s, checked: chosen.has(s), dataset: { testid: `filter-status-${enumName(s, SP)}` } });
    return { s, box, label: el('label', { class: 'check', for: id }, box, ` ${enumName(s, SP)}`) };
  });
  const count = statusLine('device-count');
  const holder = el('div', { class: 'table-wrap' });
  const form = el('form', { class: 'filters', dataset: { testid: 'device-filters' }, role: 'search' },
    el('div', { class: 'field' }, el('label', { for: 'device-search' }, 'Search'), search),
    el('div', { class: 'field' }, el('label', { for: 'filter-type' }, 'Type'), type),
    el('div', { class: 'field' }, el('label', { for: 'filter-labels' }, 'Labels'), labels),
    el('fieldset', { class: 'field statuses' }, el('legend', {}, 'Status'), boxes.map((b) => b.label)),
    el('div', { class: 'field actions' },
      el('button', { type: 'submit', dataset: { testid: 'filter-apply' } }, 'Apply filters'),
      el('button', { type: 'button', class: 'secondary', dataset: { testid: 'filter-clear' }, onclick: () => {
        search.value = type.value = labels.value = '';
        boxes.forEach((b) => { b.box.checked = false; });
        load();
      } }, 'Clear')));
  main.append(pageTitle('Devices'), form, count, holder);

  const columns = [
    { title: 'ID', cell: (d) => el('a', { href: `#/devices/${encodeURIComponent(d.id)}`, dataset: { testid: 'device-link' } }, d.id), class: 'nowrap' },
    { title: 'Name', cell: (d) => d.name || '' },
    { title: 'Type', cell: (d) => d.type || '' },
    { title: 'Model', cell: (d) => d.model || '' },
    { title: 'Status', cell: (d) => badge(d.status || 'DEVICE_STATUS_PROVISIONED', SP) },
    { title: 'Labels', cell: (d) => labelsText(d.labels), class: 'labels' },
    { title: 'Firmware', cell: (d) => d.firmwareVersion || '' },
    { title: 'Last seen', cell: (d) => el('span', { title: fmtTime(d.lastSeenTime) }, fmtAgo(d.lastSeenTime)) },
  ];

  const saveQuery = () => {
    const s = new URLSearchParams();
    if (search.value) s.set('q', search.value);
    if (type.value.trim()) s.set('type', type.value.trim());
    if (labels.value.trim()) s.set('labels', labels.value.trim());
    const st = boxes.filter((b) => b.box.checked).map((b) => b.s);
    if (st.length) s.set('status', st.join(','));
    ctx.setQuery(s);
  };

  // Everything is filtered and paged by device-mgmt (filter.search: id or name, any case), so the
  // page stays small whatever the fleet's size; the count comes from /devices:count.
  const PAGE = 50;
  const pager = el('div', { class: 'pager', dataset: { testid: 'device-pager' } });
  main.append(pager);
  let tokens = ['']; // the token of each page seen so far; the last one is the page shown
  const filter = () => ({
    'filter.search': search.value.trim(),
    'filter.type': type.value.trim(),
    'filter.labelSelector': labels.value.trim(),
    'filter.statuses': boxes.filter((b) => b.box.checked).map((b) => b.s),
  });

  const show = (r, total) => {
    const devices = (r && r.devices) || [];
    clear(holder).append(table(columns, devices, {
      tableTestid: 'device-table',
      empty: 'no devices match',
      attrs: (d) => ({ dataset: { testid: 'device-row', deviceId: d.id } }),
    }));
    const first = (tokens.length - 1) * PAGE;
    count.set('ok', devices.length
      ? `${first + 1}–${first + devices.length} of ${total} device${total === 1 ? '' : 's'}`
      : `${total} device${total === 1 ? '' : 's'}`);
    const next = r && r.nextPageToken;
    clear(pager).append(
      el('button', { type: 'button', class: 'secondary', disabled: tokens.length < 2, dataset: { testid: 'page-prev' },
        onclick: () => { tokens.pop(); fetchPage(); } }, 'Previous'),
      el('button', { type: 'button', class: 'secondary', disabled: !next, dataset: { testid: 'page-next' },
        onclick: () => { tokens.push(next); fetchPage(); } }, 'Next'));
  };

  let seq = 0; // only the newest request draws (typing fires several)
  const fetchPage = () => guard('Listing devices', async () => {
    const mine = ++seq;
    count.set('loading', 'loading…');
    const f = filter();
    const [r, c] = await Promise.all([
      api('GET', `/api/v1/devices${query({ ...f, pageSize: PAGE, pageToken: tokens[tokens.length - 1] })}`, undefined, { signal: ctx.signal }),
      api('GET', `/api/v1/devices:count${query(f)}`, undefined, { signal: ctx.signal }),
    ]);
    if (!ctx.alive() || mine !== seq) return;
    show(r, Number((c && c.total) || 0));
  }).then(() => { if (count.dataset.state === 'loading' && ctx.alive()) count.set('error', 'could not load the devices'); });

  const load = () => { saveQuery(); tokens = ['']; return fetchPage(); };
  let typing = null;
  form.addEventListener('submit', (ev) => { ev.preventDefault(); load(); });
  search.addEventListener('input', () => { clearTimeout(typing); typing = setTimeout(load, 250); });
  ctx.onLeave(() => clearTimeout(typing));
  await load();
}

// ---- one device --------------------------------------------------------------------------------

const RANGES = [['15m', 15 * 60000, '15 minutes'], ['1h', 3600000, '1 hour'], ['24h', 86400000, '24 hours']];
const STEPS = [['auto', 0, 'auto'], ['raw', -1, 'raw points'], ['10s', 10000, '10 s'], ['1m', 60000, '1 min'],
  ['5m', 300000, '5 min'], ['15m', 900000, '15 min'], ['1h', 3600000, '1 h']];
const AGGS = ['AGGREGATION_AVG', 'AGGREGATION_MIN', 'AGGREGATION_MAX', 'AGGREGATION_SUM', 'AGGREGATION_COUNT', 'AGGREGATION_LAST'];
const NICE_STEPS = [1, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600].map((s) => s * 1000);

// About 120 buckets over the range.
function autoStep(rangeMs) {
  return NICE_STEPS.find((s) => rangeMs / s <= 120) || 3600000;
}

// A point's value as a number (text values are not charted).
export function pointValue(p) {
  if (p.doubleValue !== undefined) return typeof p.doubleValue === 'number' ? p.doubleValue : Number(p.doubleValue);
  if (p.intValue !== undefined) return Number(p.intValue);
  if (p.boolValue !== undefined) return p.boolValue ? 1 : 0;
  if (p.stringValue !== undefined) return NaN;
  return 0; // every value field at its default: proto3 JSON leaves 0 / false out
}

function pointText(p) {
  if (p.stringValue !== undefined) return p.stringValue;
  if (p.boolValue !== undefined) return String(p.boolValue);
  if (p.intValue !== undefined) return p.intValue;
  if (p.doubleValue !== undefined) return formatValue(pointValue(p));
  return '0';
}

export async function devicePage(main, ctx) {
  const id = ctx.params.id;
  const enc = encodeURIComponent(id);
  const head = pageTitle(`Device ${id}`);
  const metaBox = el('div', {}, el('p', { class: 'status' }, 'loading…'));
  const shadowBox = el('div', { class: 'shadow' });
  const latestBox = el('div', { class: 'table-wrap' });
  const chartPanel = el('div');
  const cmdPanel = el('div');
  main.append(el('p', { class: 'crumbs' }, el('a', { href: '#/devices' }, '← Devices')), head,
    el('div', { class: 'cols' }, section('Metadata', metaBox), section('Shadow', shadowBox)),
    section('Latest values', latestBox), section('Telemetry', chartPanel), section('Commands', cmdPanel));

  const device = await guard('Loading the device', () => api('GET', `/api/v1/devices/${enc}`, undefined, { signal: ctx.signal }));
  if (!ctx.alive()) return;
  if (!device) { clear(metaBox).append(el('p', { class: 'status' }, 'The device could not be loaded.')); return; }
  head.querySelector('h1').textContent = device.name ? `${device.name}` : `Device ${id}`;
  head.append(badge(device.status || 'DEVICE_STATUS_PROVISIONED', SP, 'device-status'));
  const loc = device.location || {};
  clear(metaBox).append(dl([
    ['ID', el('code', {}, device.id)], ['Name', device.name], ['Type', device.type], ['Model', device.model],
    ['Status', enumName(device.status || 'DEVICE_STATUS_PROVISIONED', SP)], ['Firmware', device.firmwareVersion],
    ['Labels', labelsText(device.labels)],
    ['Location', [loc.site, loc.latitude !== undefined || loc.longitude !== undefined ? `${loc.latitude || 0}, ${loc.longitude || 0}` : ''].filter(Boolean).join(' · ')],
    ['Metadata', Object.keys(device.metadata || {}).length ? jsonBlock(device.metadata) : ''],
    ['Created', fmtTime(device.createTime)], ['Updated', fmtTime(device.updateTime)],
    ['Last seen', device.lastSeenTime ? `${fmtTime(device.lastSeenTime)} (${fmtAgo(device.lastSeenTime)})` : 'never'],
  ], 'device-meta'));

  guard('Loading the shadow', async () => {
    const sh = await api('GET', `/api/v1/devices/${enc}/shadow`, undefined, { signal: ctx.signal });
    if (!ctx.alive()) return;
    clear(shadowBox).append(
      el('p', { class: 'hint' }, `version ${sh.version || '0'} · desired ${fmtTime(sh.desiredTime)} · reported ${fmtTime(sh.reportedTime)}`),
      el('div', { class: 'shadow-cols' },
        el('div', {}, el('h3', {}, 'Desired'), jsonBlock(sh.desired || {}, 'shadow-desired')),
        el('div', {}, el('h3', {}, 'Reported'), jsonBlock(sh.reported || {}, 'shadow-reported')),
        el('div', {}, el('h3', {}, 'Delta'), jsonBlock(sh.delta || {}, 'shadow-delta'))));
  });

  // Latest values, kept by metric so live points can update them.
  const latest = new Map();
  const drawLatest = () => {
    const rows = [...latest.values()].sort((a, b) => a.metric.localeCompare(b.metric));
    clear(latestBox).append(table([
      { title: 'Metric', cell: (p) => p.metric },
      { title: 'Value', cell: (p) => el('span', { dataset: { testid: 'latest-value' } }, pointText(p)), class: 'num' },
      { title: 'Time', cell: (p) => fmtTime(Number(p.timeMs)) },
      { title: 'Seq', cell: (p) => p.seq || '', class: 'num' },
    ], rows, { empty: 'no telemetry yet', attrs: (p) => ({ dataset: { testid: 'latest-row', metric: p.metric } }) }));
  };
  const latestLoaded = guard('Loading the latest values', async () => {
    const r = await api('GET', `/api/v1/devices/${enc}/telemetry/latest`, undefined, { signal: ctx.signal });
    for (const p of (r && r.points) || []) latest.set(p.metric, p);
    if (ctx.alive()) drawLatest();
  });

  commands(cmdPanel, enc, ctx);
  await latestLoaded;
  if (!ctx.alive()) return;
  telemetry(chartPanel, enc, ctx, latest, drawLatest);
}

function select(id, testid, options, value) {
  return el('select', { id, dataset: { testid } },
    options.map(([v, , text]) => el('option', { value: v, selected: v === value }, text)));
}

function telemetry(panel, enc, ctx, latest, drawLatest) {
  const q = ctx.query;
  const metrics = [...latest.keys()].sort();
  const metric = el('input', { id: 'chart-metric', type: 'text', list: 'chart-metrics', value: q.get('metric') || metrics[0] || '', dataset: { testid: 'chart-metric' }, required: true });
  const range = select('chart-range', 'chart-range', RANGES, q.get('range') || '15m');
  const step = select('chart-step', 'chart-step', STEPS, q.get('step') || 'auto');
  const agg = el('select', { id: 'chart-agg', dataset: { testid: 'chart-agg' } },
    AGGS.map((a) => el('option', { value: a, selected: a === (q.get('agg') || 'AGGREGATION_AVG') }, enumName(a, 'AGGREGATION_'))));
  const box = el('div', { class: 'chart-box' });
  const status = statusLine('chart-status');
  const live = statusLine('telemetry-live');
  const form = el('form', { class: 'filters chart-controls', dataset: { testid: 'chart-controls' } },
    el('datalist', { id: 'chart-metrics' }, metrics.map((m) => el('option', { value: m }))),
    el('div', { class: 'field' }, el('label', { for: 'chart-metric' }, 'Metric'), metric),
    el('div', { class: 'field' }, el('label', { for: 'chart-range' }, 'Range'), range),
    el('div', { class: 'field' }, el('label', { for: 'chart-step' }, 'Step'), step),
    el('div', { class: 'field' }, el('label', { for: 'chart-agg' }, 'Aggregation'), agg),
    el('div', { class: 'field actions' }, el('button', { type: 'submit', dataset: { testid: 'chart-refresh' } }, 'Show')));
  panel.append(form, box, el('div', { class: 'status-row' }, status, live));

  // What is drawn: raw points, or buckets keyed by start (live points are folded into them).
  let view = null; // {metric, rangeMs, stepMs (0: raw), agg, points: [{t, v}] | buckets: Map}
  let gen = 0;

  const draw = () => {
    if (!view) return;
    const now = Date.now();
    const from = now - view.rangeMs;
    let pts;
    if (view.stepMs) {
      pts = [...view.buckets.values()].filter((b) => b.startMs + view.stepMs > from)
        .sort((a, b) => a.startMs - b.startMs).map((b) => ({ t: b.startMs + view.stepMs / 2, v: b.value }));
    } else {
      pts = view.points.filter((p) => p.t >= from);
    }
    const how = view.stepMs ? `${enumName(view.agg, 'AGGREGATION_')} per ${fmtDuration(view.stepMs)}` : 'raw points';
    clear(box).append(lineChart(pts, from, now, { title: `${view.metric} (${how})`, yLabel: view.metric, testid: 'telemetry-chart', empty: `no ${view.metric} data in this range` }));
    status.set('ok', `${pts.length} ${view.stepMs ? 'buckets' : 'points'} of ${view.metric}, ${how}${view.cut ? ' (cut short: pick a step)' : ''}`);
  };

  const load = () => guard('Loading telemetry', async () => {
    const my = ++gen;
    const m = metric.value.trim();
    const rangeMs = RANGES.find((r) => r[0] === range.value)[1];
    const stepChoice = STEPS.find((s) => s[0] === step.value)[1];
    const stepMs = stepChoice === 0 ? autoStep(rangeMs) : stepChoice < 0 ? 0 : stepChoice;
    const s = new URLSearchParams(q);
    s.set('metric', m);
    s.set('range', range.value);
    s.set('step', step.value);
    s.set('agg', agg.value);
    ctx.setQuery(s);
    if (!m) { clear(box).append(el('p', { class: 'status' }, 'Pick a metric.')); return; }
    status.set('loading', 'loading…');
    const to = Date.now() + 1;
    const from = to - rangeMs;
    const base = { metric: m, fromMs: from, toMs: to };
    const next = { metric: m, rangeMs, stepMs, agg: agg.value, buckets: new Map(), points: [] };
    if (stepMs) {
      // Buckets start at from + k * step: align from so live points land in the same buckets.
      const alignedFrom = Math.floor(from / stepMs) * stepMs;
      const r = await api('GET', `/api/v1/devices/${enc}/telemetry${query({ ...base, fromMs: alignedFrom, stepMs, aggregation: agg.value })}`, undefined, { signal: ctx.signal });
      for (const b of (r && r.buckets) || []) {
        const start = Number(b.startMs);
        next.buckets.set(start, { startMs: start, value: Number(b.value), count: Number(b.count || 0) });
      }
    } else {
      const raw = await listAll(`/api/v1/devices/${enc}/telemetry`, { ...base, pageSize: 10000 }, 'points', { signal: ctx.signal, maxPages: 5 });
      next.points = raw.map((p) => ({ t: Number(p.timeMs), v: pointValue(p), seq: Number(p.seq) })).filter((p) => Number.isFinite(p.v));
      next.cut = !!raw.truncated;
    }
    if (my !== gen || !ctx.alive()) return;
    view = next;
    draw();
  }).then(() => { if (status.dataset.state === 'loading') status.set('error', 'could not load telemetry'); });

  // A live point of the charted metric: appended (raw) or folded into its bucket.
  const addLive = (p) => {
    const v = pointValue(p), t = Number(p.timeMs);
    if (!view || p.metric !== view.metric || !Number.isFinite(v)) return;
    if (!view.stepMs) {
      view.points.push({ t, v, seq: Number(p.seq) });
      view.points.sort((a, b) => a.t - b.t || a.seq - b.seq);
      return;
    }
    const start = Math.floor(t / view.stepMs) * view.stepMs;
    const b = view.buckets.get(start) || { startMs: start, value: NaN, count: 0 };
    const n = b.count;
    switch (view.agg) {
      case 'AGGREGATION_MIN': b.value = n ? Math.min(b.value, v) : v; break;
      case 'AGGREGATION_MAX': b.value = n ? Math.max(b.value, v) : v; break;
      case 'AGGREGATION_SUM': b.value = (n ? b.value : 0) + v; break;
      case 'AGGREGATION_COUNT': b.value = n + 1; break;
      case 'AGGREGATION_LAST': b.value = v; break;
      default: b.value = n ? (b.value * n + v) / (n + 1) : v;
    }
    b.count = n + 1;
    view.buckets.set(start, b);
  };

  // Raw points have no aggregation.
  const syncAgg = () => { agg.disabled = step.value === 'raw'; };
  syncAgg();
  step.addEventListener('change', syncAgg);
  form.addEventListener('submit', (ev) => { ev.preventDefault(); load(); });
  for (const c of [range, step, agg]) c.addEventListener('change', load);
  metric.addEventListener('change', load);
  load();

  // Live points, when the gateway streams them; a 404 means it does not (yet): say so and go on.
  live.set('connecting', 'live updates: connecting…');
  const stream = openStream(`/api/v1/devices/${enc}/telemetry/stream`, {
    onEvent: (ev) => {
      if (ev.event !== 'points' || !ev.data || !Array.isArray(ev.data.points)) return;
      for (const p of ev.data.points) {
        addLive(p);
        const old = latest.get(p.metric);
        if (!old || Number(p.timeMs) >= Number(old.timeMs)) latest.set(p.metric, p);
      }
      drawLatest();
      draw();
    },
    onState: (s, info) => {
      if (s === 'live') live.set('live', 'live updates: on');
      else if (s === 'unavailable') live.set('unavailable', 'live updates: not available from this gateway');
      else if (s === 'retrying') live.set('retrying', `live updates: reconnecting in ${Math.round(info.delayMs / 1000)} s`);
      else if (s === 'failed') live.set('failed', `live updates: ${info.error ? info.error.describe() : 'failed'}`);
    },
  });
  ctx.onLeave(() => stream.close());
  // Live or not, slide the window so "the last 15 minutes" stays true.
  const slide = setInterval(() => { if (view) draw(); }, 15000);
  ctx.onLeave(() => clearInterval(slide));
}

function commands(panel, enc, ctx) {
  const allowed = can('ROLE_OPERATOR');
  const name = el('input', { id: 'command-name', type: 'text', required: true, pattern: '[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}', dataset: { testid: 'command-name' }, placeholder: 'reboot' });
  const payload = el('textarea', { id: 'command-payload', rows: 3, dataset: { testid: 'command-payload' }, spellcheck: 'false' });
  payload.value = '{}';
  const ttl = el('input', { id: 'command-ttl', type: 'number', min: 1, max: 604800, placeholder: '3600', dataset: { testid: 'command-ttl' } });
  const send = el('button', { type: 'submit', disabled: !allowed, dataset: { testid: 'command-send' } }, 'Send command');
  const note = el('p', { class: 'form-error', role: 'alert', hidden: true });
  const form = el('form', { class: 'filters', dataset: { testid: 'command-form' } },
    el('div', { class: 'field' }, el('label', { for: 'command-name' }, 'Command'), name),
    el('div', { class: 'field grow' }, el('label', { for: 'command-payload' }, 'Payload (JSON object)'), payload),
    el('div', { class: 'field' }, el('label', { for: 'command-ttl' }, 'TTL (s)'), ttl),
    el('div', { class: 'field actions' }, send));
  const list = el('div', { class: 'table-wrap' });
  if (!allowed) panel.append(el('p', { class: 'hint' }, 'Sending commands needs the operator role.'));
  panel.append(form, note, list);

  const columns = [
    { title: 'ID', cell: (c) => c.id, class: 'num' },
    { title: 'Name', cell: (c) => c.name },
    { title: 'Status', cell: (c) => badge(c.status, 'COMMAND_STATUS_') },
    { title: 'Payload', cell: (c) => el('code', {}, JSON.stringify(c.payload || {})) },
    { title: 'Created', cell: (c) => fmtTime(c.createTime) },
    { title: 'Expires', cell: (c) => fmtTime(c.expireTime) },
    { title: 'Delivered', cell: (c) => fmtTime(c.deliverTime) },
    { title: 'Result', cell: (c) => c.error ? el('span', { class: 'bad' }, c.error) : c.result ? el('code', {}, JSON.stringify(c.result)) : '' },
  ];
  const load = () => guard('Listing commands', async () => {
    const r = await api('GET', `/api/v1/devices/${enc}/commands${query({ pageSize: 50 })}`, undefined, { signal: ctx.signal });
    if (!ctx.alive()) return;
    clear(list).append(table(columns, (r && r.commands) || [], {
      empty: 'no commands', tableTestid: 'command-table', attrs: (c) => ({ dataset: { testid: 'command-row', commandId: c.id } }),
    }));
  });
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    note.hidden = true;
    let body;
    try {
      body = JSON.parse(payload.value.trim() || '{}');
      if (!body || typeof body !== 'object' || Array.isArray(body)) throw new Error('the payload must be a JSON object');
    } catch (e) {
      note.textContent = `Payload: ${e.message}`;
      note.hidden = false;
      payload.focus();
      return;
    }
    send.disabled = true;
    await guard('Sending the command', async () => {
      const req = { name: name.value.trim(), payload: body };
      if (ttl.value) req.ttlSeconds = Number(ttl.value);
      await api('POST', `/api/v1/devices/${enc}/commands`, req);
      name.value = '';
    });
    send.disabled = false;
    load();
  });
  load();
}
