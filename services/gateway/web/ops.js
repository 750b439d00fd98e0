// Operations pages: alerts (listed, then kept current by the Server-Sent Events stream; ack),
// rules (enable/disable), firmware (artifacts, rollouts), a rollout (stages with progress bars;
// start, pause, resume, cancel, approve) and services (instances and their health).

import { api, listAll, query, openStream, can } from './api.js';
import { formatValue, stackedBar } from './chart.js';
import {
  el, clear, guard, fmtTime, fmtAgo, fmtBytes, fmtDuration as duration, badge, enumName, labelsText, table, tableRow, dl, section,
  pageTitle, statusLine,
} from './ui.js';

const byIdDesc = (a, b) => {
  // Ids are increasing decimal strings (int64): compare by length, then text.
  if (a.id.length !== b.id.length) return b.id.length - a.id.length;
  return a.id < b.id ? 1 : a.id > b.id ? -1 : 0;
};

const needOperator = 'needs the operator role';

// ---- alerts ------------------------------------------------------------------------------------

const SEVERITIES = ['SEVERITY_INFO', 'SEVERITY_WARNING', 'SEVERITY_HIGH', 'SEVERITY_CRITICAL'];

export async function alertsPage(main, ctx) {
  const q = ctx.query;
  const stateSel = el('select', { id: 'alert-state', dataset: { testid: 'alert-state' } },
    [['', 'any'], ['ALERT_STATE_FIRING', 'firing'], ['ALERT_STATE_RESOLVED', 'resolved']]
      .map(([v, t]) => el('option', { value: v, selected: v === (q.get('state') || '') }, t)));
  const sevSel = el('select', { id: 'alert-severity', dataset: { testid: 'alert-severity' } },
    [['', 'any'], ...SEVERITIES.map((s) => [s, `${enumName(s, 'SEVERITY_')} or worse`])]
      .map(([v, t]) => el('option', { value: v, selected: v === (q.get('minSeverity') || '') }, t)));
  const live = statusLine('alerts-live');
  const count = statusLine('alert-count');
  const announce = el('p', { class: 'sr-only', 'aria-live': 'polite' });
  const holder = el('div', { class: 'table-wrap' });
  const more = el('button', { type: 'button', class: 'secondary', hidden: true, dataset: { testid: 'alerts-more' } }, 'Load more');
  const form = el('form', { class: 'filters' },
    el('div', { class: 'field' }, el('label', { for: 'alert-state' }, 'State'), stateSel),
    el('div', { class: 'field' }, el('label', { for: 'alert-severity' }, 'Severity'), sevSel),
    el('div', { class: 'field actions' }, el('button', { type: 'submit' }, 'Apply')));
  main.append(pageTitle('Alerts', live), form, count, announce, holder, more);

  const alerts = new Map(); // id → Alert
  const rules = new Map(); // rule id → name
  let nextToken = '';
  let listed = false;
  let early = []; // stream events that came before the list

  const sevRank = (s) => SEVERITIES.indexOf(s);
  const wanted = (a) => (!stateSel.value || a.state === stateSel.value)
    && (!sevSel.value || sevRank(a.severity) >= sevRank(sevSel.value));

  const ackButton = (a) => {
    if (a.acknowledged) {
      return el('span', { title: a.acknowledgedBy || '', dataset: { testid: 'alert-acked' } }, `by ${a.acknowledgedBy || '?'} ${fmtAgo(a.acknowledgedTime)}`);
    }
    return el('button', {
      type: 'button', class: 'small', disabled: !can('ROLE_OPERATOR'), title: can('ROLE_OPERATOR') ? 'Acknowledge' : needOperator,
      dataset: { testid: 'alert-ack', alertId: a.id },
      onclick: (ev) => {
        const b = ev.currentTarget;
        b.disabled = true;
        guard('Acknowledging the alert', async () => {
          const got = await api('POST', `/api/v1/alerts/${encodeURIComponent(a.id)}:ack`, {});
          upsert(got, false);
        }).finally(() => { b.disabled = false; });
      },
    }, 'Ack');
  };
  const columns = [
    { title: 'ID', cell: (a) => a.id, class: 'num' },
    { title: 'Severity', cell: (a) => badge(a.severity, 'SEVERITY_') },
    { title: 'State', cell: (a) => badge(a.state, 'ALERT_STATE_', 'alert-state-badge') },
    { title: 'Rule', cell: (a) => rules.get(a.ruleId) || a.ruleId },
    { title: 'Device', cell: (a) => (a.deviceId ? el('a', { href: `#/devices/${encodeURIComponent(a.deviceId)}` }, a.deviceId) : '') },
    { title: 'Metric', cell: (a) => a.metric || '' },
    { title: 'Value', cell: (a) => formatValue(Number(a.value || 0)), class: 'num' },
    { title: 'Message', cell: (a) => a.message || '', class: 'message' },
    { title: 'Fired', cell: (a) => fmtTime(a.firedTime) },
    { title: 'Resolved', cell: (a) => fmtTime(a.resolvedTime) },
    { title: 'Acknowledged', cell: ackButton },
  ];
  const attrs = (a) => ({ dataset: { testid: 'alert-row', alertId: a.id, ruleId: a.ruleId || '', state: a.state || '' } });
  let tbody = null;

  const draw = () => {
    const rows = [...alerts.values()].filter(wanted).sort(byIdDesc);
    const t = table(columns, rows, { tableTestid: 'alert-table', empty: 'no alerts', attrs });
    tbody = t.tBodies[0];
    clear(holder).append(t);
    count.set('ok', `${rows.length} alert${rows.length === 1 ? '' : 's'}`);
    more.hidden = !nextToken;
  };

  // One alert changed (a stream event or an ack): replace its row in place, or put a new one in
  // order; a new row is marked so the eye finds it.
  function upsert(a, fromStream) {
    if (!a || !a.id) return;
    const isNew = !alerts.has(a.id);
    alerts.set(a.id, a);
    if (!tbody) return;
    const old = tbody.querySelector(`tr[data-alert-id="${CSS.escape(a.id)}"]`);
    if (!wanted(a)) { if (old) old.remove(); return; }
    const row = tableRow(columns, a, { attrs });
    if (fromStream) row.classList.add('flash');
    if (old) old.replaceWith(row);
    else {
      const empty = tbody.querySelector('.empty-row');
      if (empty) empty.remove();
      const after = [...tbody.rows].find((r) => byIdDesc(a, { id: r.dataset.alertId }) < 0);
      tbody.insertBefore(row, after || null);
    }
    if (fromStream && isNew) announce.textContent = `New alert ${a.id}: ${enumName(a.severity, 'SEVERITY_')} on ${a.deviceId || 'a device'}: ${a.message || ''}`;
    const n = tbody.querySelectorAll('tr[data-alert-id]').length;
    count.set('ok', `${n} alert${n === 1 ? '' : 's'}`);
  }

  const page = async () => {
    const r = await api('GET', `/api/v1/alerts${query({ state: stateSel.value, minSeverity: sevSel.value, pageSize: 100, pageToken: nextToken })}`, undefined, { signal: ctx.signal });
    for (const a of (r && r.alerts) || []) alerts.set(a.id, a);
    nextToken = (r && r.nextPageToken) || '';
  };

  // The stream first, so nothing that fires while the list loads is missed; its events wait
  // until the list is in and then apply over it (they are at least as new).
  let stream = null;
  const connect = () => {
    if (stream) stream.close();
    live.set('connecting', 'live: connecting…');
    stream = openStream(`/api/v1/alerts/stream${query({ minSeverity: sevSel.value })}`, {
      onEvent: (ev) => {
        if (ev.event === 'error') {
          live.set('retrying', `live: the stream ended (${(ev.data && ev.data.message) || 'error'}), reconnecting`);
          return;
        }
        if (ev.event !== 'alert') return;
        if (!listed) early.push(ev.data);
        else upsert(ev.data, true);
      },
      onState: (s, info) => {
        if (s === 'live') live.set('live', 'live');
        else if (s === 'unavailable') live.set('unavailable', 'live updates are not available: the gateway has no alert stream (404)');
        else if (s === 'retrying') live.set('retrying', `live: reconnecting in ${Math.round(info.delayMs / 1000)} s`);
        else if (s === 'failed') live.set('failed', `live updates failed: ${info.error ? info.error.describe() : ''}`);
      },
    });
  };
  ctx.onLeave(() => { if (stream) stream.close(); });

  const load = () => guard('Listing alerts', async () => {
    const s = new URLSearchParams();
    if (stateSel.value) s.set('state', stateSel.value);
    if (sevSel.value) s.set('minSeverity', sevSel.value);
    ctx.setQuery(s);
    listed = false;
    early = [];
    alerts.clear();
    nextToken = '';
    connect();
    count.set('loading', 'loading…');
    await page();
    if (!ctx.alive()) return;
    listed = true;
    draw();
    for (const a of early) upsert(a, true);
    early = [];
  });

  guard('Listing rules', async () => {
    const all = await listAll('/api/v1/rules', { pageSize: 1000 }, 'rules', { signal: ctx.signal });
    for (const r of all) rules.set(r.id, r.name || r.id);
    if (ctx.alive() && listed) draw();
  });
  const loadOrSay = () => load().then(() => { if (count.dataset.state === 'loading') count.set('error', 'could not load the alerts'); });
  form.addEventListener('submit', (ev) => { ev.preventDefault(); loadOrSay(); });
  more.addEventListener('click', () => guard('Listing more alerts', async () => { await page(); if (ctx.alive()) draw(); }));
  await loadOrSay();
}

// ---- rules -------------------------------------------------------------------------------------

const OPS = {
  COMPARISON_GT: '>', COMPARISON_GE: '≥', COMPARISON_LT: '<', COMPARISON_LE: '≤', COMPARISON_EQ: '=', COMPARISON_NE: '≠',
};

export function ruleCondition(r) {
  if (r.threshold) {
    const t = r.threshold;
    const stat = t.statistic && t.statistic !== 'STATISTIC_VALUE' ? enumName(t.statistic, 'STATISTIC_') : 'value';
    let s = `${stat} ${OPS[t.op] || t.op || '?'} ${formatValue(Number(t.threshold || 0))}`;
    if (t.window && stat !== 'value') {
      const w = t.window;
      s += w.kind === 'WINDOW_KIND_COUNT' ? ` over the last ${w.count || 64} points` : ` over ${duration(w.widthMs || 300000)}${w.kind === 'WINDOW_KIND_TUMBLING' ? ' (tumbling)' : ''}`;
    }
    if (Number(t.forMs || 0)) s += ` for ${duration(t.forMs)}`;
    return s;
  }
  if (r.detector) {
    const d = r.detector;
    const kind = enumName(d.kind, 'DETECTOR_KIND_');
    if (d.kind === 'DETECTOR_KIND_ZSCORE') return `z-score above ${d.level || 0.8}`;
    if (d.kind === 'DETECTOR_KIND_RATE') return `rate above ${d.level || 0}/s`;
    return `${kind} for ${duration(d.durationMs)}`;
  }
  return '—';
}

function selectorText(d) {
  if (!d) return 'all devices';
  const parts = [];
  if (d.deviceIds && d.deviceIds.length) parts.push(d.deviceIds.join(', '));
  if (d.groupId) parts.push(`group ${d.groupId}`);
  if (d.type) parts.push(`type ${d.type}`);
  if (d.labelSelector) parts.push(d.labelSelector);
  return parts.join('; ') || 'all devices';
}

export async function rulesPage(main, ctx) {
  const holder = el('div', { class: 'table-wrap' });
  const count = statusLine('rule-count');
  main.append(pageTitle('Rules'), count, holder);
  if (!can('ROLE_OPERATOR')) holder.before(el('p', { class: 'hint' }, 'Enabling and disabling rules needs the operator role.'));

  const toggle = (r) => el('button', {
    type: 'button', class: 'small secondary', disabled: !can('ROLE_OPERATOR'), dataset: { testid: 'rule-toggle', ruleId: r.id },
    onclick: (ev) => {
      const b = ev.currentTarget;
      b.disabled = true;
      guard(`${r.enabled ? 'Disabling' : 'Enabling'} the rule`, async () => {
        const got = await api('POST', `/api/v1/rules/${encodeURIComponent(r.id)}:setEnabled`, { enabled: !r.enabled });
        const row = holder.querySelector(`tr[data-rule-id="${CSS.escape(r.id)}"]`);
        if (row) row.replaceWith(tableRow(columns, got, { attrs }));
      }).finally(() => { b.disabled = false; });
    },
  }, r.enabled ? 'Disable' : 'Enable');
  const columns = [
    { title: 'Name', cell: (r) => r.name || '' },
    { title: 'ID', cell: (r) => el('code', {}, r.id) },
    { title: 'Metric', cell: (r) => r.metric || '' },
    { title: 'Condition', cell: ruleCondition },
    { title: 'Devices', cell: (r) => selectorText(r.devices) },
    { title: 'Severity', cell: (r) => badge(r.severity, 'SEVERITY_') },
    { title: 'Actions', cell: (r) => [r.command ? `command ${r.command.name}` : '', r.webhook ? `webhook ${r.webhook.url}` : ''].filter(Boolean).join('; ') || '—' },
    { title: 'Enabled', cell: (r) => el('span', { class: r.enabled ? 'badge badge-enabled' : 'badge badge-disabled', dataset: { testid: 'rule-enabled' } }, r.enabled ? 'enabled' : 'disabled') },
    { title: '', cell: toggle },
  ];
  const attrs = (r) => ({ dataset: { testid: 'rule-row', ruleId: r.id, enabled: String(!!r.enabled) } });
  await guard('Listing rules', async () => {
    count.set('loading', 'loading…');
    const rules = await listAll('/api/v1/rules', { pageSize: 1000 }, 'rules', { signal: ctx.signal });
    if (!ctx.alive()) return;
    clear(holder).append(table(columns, rules, { tableTestid: 'rule-table', empty: 'no rules', attrs }));
    count.set('ok', `${rules.length} rule${rules.length === 1 ? '' : 's'}`);
  });
  if (count.dataset.state === 'loading') count.set('error', 'could not load the rules');
}

// ---- firmware: artifacts and rollouts ----------------------------------------------------------

const RP = 'ROLLOUT_STATE_';

function rolloutTotals(r) {
  let devices = 0, succeeded = 0, failed = 0;
  for (const s of r.stageStatus || []) {
    devices += s.devices || 0;
    succeeded += s.succeeded || 0;
    failed += (s.failed || 0) + (s.rolledBack || 0);
  }
  return { devices, succeeded, failed };
}

export async function firmwarePage(main, ctx) {
  const artBox = el('div', { class: 'table-wrap' });
  const roBox = el('div', { class: 'table-wrap' });
  main.append(pageTitle('Firmware'), section('Rollouts', roBox), section('Artifacts', artBox));
  const artifacts = new Map();
  await guard('Listing artifacts', async () => {
    const list = await listAll('/api/v1/artifacts', { pageSize: 1000 }, 'artifacts', { signal: ctx.signal });
    if (!ctx.alive()) return;
    for (const a of list) artifacts.set(a.id, a);
    clear(artBox).append(table([
      { title: 'Name', cell: (a) => a.name },
      { title: 'Version', cell: (a) => a.version },
      { title: 'Models', cell: (a) => (a.models || []).join(', ') },
      { title: 'Size', cell: (a) => fmtBytes(a.size), class: 'num' },
      { title: 'SHA-256', cell: (a) => el('code', { title: a.sha256 || '' }, (a.sha256 || '').slice(0, 16)) },
      { title: 'Signed by', cell: (a) => el('code', {}, a.keyId || '') },
      { title: 'Release notes', cell: (a) => a.releaseNotes || '', class: 'message' },
      { title: 'Created', cell: (a) => fmtTime(a.createTime) },
    ], list, { tableTestid: 'artifact-table', empty: 'no artifacts', attrs: (a) => ({ dataset: { testid: 'artifact-row', artifactId: a.id } }) }));
  });
  await guard('Listing rollouts', async () => {
    const list = await listAll('/api/v1/rollouts', { pageSize: 100 }, 'rollouts', { signal: ctx.signal, maxPages: 10 });
    if (!ctx.alive()) return;
    clear(roBox).append(table([
      { title: 'Name', cell: (r) => el('a', { href: `#/rollouts/${encodeURIComponent(r.id)}`, dataset: { testid: 'rollout-link' } }, r.name || r.id) },
      { title: 'Artifact', cell: (r) => { const a = artifacts.get(r.artifactId); return a ? `${a.name} ${a.version}` : r.artifactId || '(deleted)'; } },
      { title: 'State', cell: (r) => badge(r.state, RP) },
      { title: 'Stage', cell: (r) => `${(r.currentStage || 0) + 1} of ${(r.stages || []).length}`, class: 'num' },
      { title: 'Devices', cell: (r) => { const t = rolloutTotals(r); return `${t.succeeded} done, ${t.failed} failed of ${t.devices}`; } },
      { title: 'Created', cell: (r) => fmtTime(r.createTime) },
      { title: 'Updated', cell: (r) => fmtTime(r.updateTime) },
    ], list, { tableTestid: 'rollout-table', empty: 'no rollouts', attrs: (r) => ({ dataset: { testid: 'rollout-row', rolloutId: r.id, state: r.state } }) }));
  });
}

// The parts of a stage's bar, in the order a device goes through them.
const STAGE_PARTS = [
  ['succeeded', 'succeeded', 'seg-ok'], ['failed', 'failed', 'seg-bad'], ['rolledBack', 'rolled back', 'seg-bad2'],
  ['installing', 'installing', 'seg-work'], ['verifying', 'verifying', 'seg-work2'], ['downloading', 'downloading', 'seg-work3'],
  ['offered', 'offered', 'seg-offered'], ['pending', 'pending', 'seg-pending'],
];

export async function rolloutPage(main, ctx) {
  const id = ctx.params.id;
  const enc = encodeURIComponent(id);
  const operator = can('ROLE_OPERATOR');
  const head = pageTitle(`Rollout ${id}`);
  const stateBadge = el('span', { class: 'badge', dataset: { testid: 'rollout-state', state: '' } }, '…');
  head.append(stateBadge);
  const reasonText = el('p', { class: 'reason', dataset: { testid: 'rollout-reason' }, hidden: true });
  const reason = el('input', { id: 'pause-reason', type: 'text', dataset: { testid: 'rollout-pause-reason' }, placeholder: 'why (recorded with the pause)' });
  const btn = (testid, text, cls) => el('button', { type: 'button', class: cls || '', disabled: true, dataset: { testid } }, text);
  const startB = btn('rollout-start', 'Start');
  const pauseB = btn('rollout-pause', 'Pause');
  const resumeB = btn('rollout-resume', 'Resume');
  const cancelB = btn('rollout-cancel', 'Cancel rollout', 'danger');
  const approveB = btn('rollout-approve', 'Approve stage');
  const controls = el('div', { class: 'controls', dataset: { testid: 'rollout-controls' } },
    el('div', { class: 'field' }, el('label', { for: 'pause-reason' }, 'Reason'), reason),
    startB, pauseB, resumeB, approveB, cancelB);
  const metaBox = el('div');
  const stagesBox = el('div', { class: 'stages', dataset: { testid: 'rollout-stages' } });
  const devBox = el('div', { class: 'table-wrap' });
  const updated = statusLine('rollout-updated');
  main.append(el('p', { class: 'crumbs' }, el('a', { href: '#/firmware' }, '← Firmware')), head, reasonText,
    operator ? controls : el('p', { class: 'hint' }, `Controlling rollouts ${needOperator}.`),
    updated, el('div', { class: 'cols' }, section('Stages', stagesBox), section('Rollout', metaBox)),
    section('Devices', devBox));

  let ro = null;
  let artifact = null;
  let busy = false;

  const render = (r) => {
    ro = r;
    stateBadge.textContent = enumName(r.state, RP);
    stateBadge.className = `badge badge-${enumName(r.state, RP).replace(/ /g, '-')}`;
    stateBadge.dataset.state = r.state || '';
    head.querySelector('h1').textContent = r.name || `Rollout ${r.id}`;
    reasonText.hidden = !r.pauseReason;
    reasonText.textContent = r.pauseReason ? `Reason: ${r.pauseReason}` : '';
    const st = r.state;
    const stages = r.stageStatus || [];
    const awaiting = stages.find((s) => s.state === 'awaiting_approval');
    startB.disabled = busy || st !== 'ROLLOUT_STATE_DRAFT';
    pauseB.disabled = busy || st !== 'ROLLOUT_STATE_RUNNING';
    resumeB.disabled = busy || st !== 'ROLLOUT_STATE_PAUSED';
    cancelB.disabled = busy || !['ROLLOUT_STATE_DRAFT', 'ROLLOUT_STATE_RUNNING', 'ROLLOUT_STATE_PAUSED'].includes(st);
    approveB.disabled = busy || !awaiting || st !== 'ROLLOUT_STATE_RUNNING';
    approveB.dataset.stage = awaiting ? String(awaiting.index || 0) : '';

    const t = r.target || {};
    const g = r.gate || {};
    clear(metaBox).append(dl([
      ['ID', el('code', {}, r.id)],
      ['Artifact', artifact ? `${artifact.name} ${artifact.version} (${fmtBytes(artifact.size)})` : r.artifactId || '(deleted)'],
      ['Target', [t.groupId ? `group ${t.groupId}` : '', t.model ? `model ${t.model}` : '', t.labelSelector || '', t.versionRange ? `version ${t.versionRange}` : ''].filter(Boolean).join('; ') || 'every device'],
      ['Telemetry gate', g.enabled ? `on: pause above ${g.maxRatio || 2}× the baseline, at least ${g.minAlerts || 1} alert(s)` : 'off'],
      ['Downgrades', r.allowDowngrade ? 'allowed' : 'not allowed'],
      ['Created', fmtTime(r.createTime)], ['Updated', fmtTime(r.updateTime)],
    ], 'rollout-meta'));

    clear(stagesBox);
    const defs = r.stages || [];
    defs.forEach((def, i) => {
      const s = stages.find((x) => (x.index || 0) === i) || { stage: def, index: i, state: 'waiting' };
      const n = s.devices || 0;
      const size = def.count ? `${def.count} devices` : `${def.percent || 0}%`;
      const parts = STAGE_PARTS.map(([k, label, cls]) => ({ n: s[k] || 0, label, className: cls }));
      const counts = parts.filter((p) => p.n).map((p) => `${p.n} ${p.label}`).join(', ') || 'no devices yet';
      const current = i === (r.currentStage || 0) && ['ROLLOUT_STATE_RUNNING', 'ROLLOUT_STATE_PAUSED'].includes(st);
      stagesBox.append(el('div', { class: `stage${current ? ' current' : ''}`, dataset: { testid: 'stage-row', index: String(i), state: s.state || '' } },
        el('div', { class: 'stage-head' },
          el('strong', {}, `Stage ${i + 1}`), ` · up to ${size} · `, badge(s.state || 'waiting'),
          el('span', { class: 'hint' }, ` success ≥ ${Math.round((def.successThreshold || 0.95) * 100)}%, errors ≤ ${Math.round((def.errorThreshold || 0.1) * 100)}%${Number(def.soakMs || 0) ? `, soak ${duration(def.soakMs)}` : ''}${def.manualApproval ? ', manual approval' : ''}`)),
        stackedBar(parts, n, { testid: `stage-progress-${i}`, label: `Stage ${i + 1}: ${counts} of ${n} devices` }),
        el('p', { class: 'stage-counts' }, `${n} device${n === 1 ? '' : 's'}: ${counts}${s.soakUntil ? ` · soaking until ${fmtTime(s.soakUntil)}` : ''}`)));
    });
    updated.set('ok', `updated ${fmtTime(Date.now())}`);
  };

  const refresh = () => guard('Loading the rollout', async () => {
    const r = await api('GET', `/api/v1/rollouts/${enc}`, undefined, { signal: ctx.signal });
    if (!ctx.alive() || busy) return;
    if (!artifact && r.artifactId) {
      artifact = await api('GET', `/api/v1/artifacts/${encodeURIComponent(r.artifactId)}`, undefined, { signal: ctx.signal }).catch(() => null);
    }
    render(r);
  });
  const loadDevices = () => guard('Listing the rollout\'s devices', async () => {
    const r = await api('GET', `/api/v1/rollouts/${enc}/devices${query({ pageSize: 100 })}`, undefined, { signal: ctx.signal });
    if (!ctx.alive()) return;
    const rows = (r && r.updates) || [];
    clear(devBox).append(table([
      { title: 'Device', cell: (u) => el('a', { href: `#/devices/${encodeURIComponent(u.deviceId)}` }, u.deviceId) },
      { title: 'Stage', cell: (u) => String((u.stage || 0) + 1), class: 'num' },
      { title: 'Phase', cell: (u) => badge(u.phase, 'UPDATE_PHASE_') },
      { title: 'Progress', cell: (u) => `${u.progress || 0}%`, class: 'num' },
      { title: 'From version', cell: (u) => u.fromVersion || '' },
      { title: 'Error', cell: (u) => u.error || '', class: 'message' },
      { title: 'Updated', cell: (u) => fmtTime(u.updateTime) },
    ], rows, { empty: 'no devices assigned yet', caption: r && r.nextPageToken ? 'the first 100 devices' : undefined, attrs: (u) => ({ dataset: { testid: 'rollout-device-row', deviceId: u.deviceId } }) }));
  });

  // An action answers with the rollout as it is now: draw that at once.
  const act = (verb, body, what) => guard(what, async () => {
    busy = true;
    render(ro); // every button off while the action is under way
    let r = ro;
    try {
      r = await api('POST', `/api/v1/rollouts/${enc}:${verb}`, body);
    } finally {
      busy = false;
      if (ctx.alive()) render(r);
    }
  });
  startB.addEventListener('click', () => act('start', {}, 'Starting the rollout'));
  pauseB.addEventListener('click', () => act('pause', { reason: reason.value.trim() || 'paused from the dashboard' }, 'Pausing the rollout'));
  resumeB.addEventListener('click', () => act('resume', {}, 'Resuming the rollout'));
  approveB.addEventListener('click', () => act('approveStage', { stage: Number(approveB.dataset.stage || 0) }, 'Approving the stage'));
  cancelB.addEventListener('click', () => {
    // eslint-disable-next-line no-alert
    if (window.confirm('Cancel this rollout? Devices that have not started will not be offered the update.')) {
      act('cancel', { reason: reason.value.trim() || 'cancelled from the dashboard' }, 'Cancelling the rollout');
    }
  });

  await refresh();
  loadDevices();
  // Stage counts move as devices report: poll while the page is open (there is no rollout stream).
  const timer = setInterval(() => { if (!busy) { refresh(); loadDevices(); } }, 3000);
  ctx.onLeave(() => clearInterval(timer));
}

// ---- services ----------------------------------------------------------------------------------

export async function servicesPage(main, ctx) {
  const summary = el('div', { class: 'table-wrap' });
  const detail = el('div');
  const updated = statusLine('services-updated');
  main.append(pageTitle('Services', updated), section('Registered services', summary), detail);

  const load = () => guard('Listing services', async () => {
    const r = await api('GET', '/api/v1/services', undefined, { signal: ctx.signal });
    const services = ((r && r.services) || []).sort((a, b) => a.name.localeCompare(b.name));
    const instances = await Promise.all(services.map((s) =>
      api('GET', `/api/v1/services/${encodeURIComponent(s.name)}/instances`, undefined, { signal: ctx.signal })
        .then((x) => (x && x.instances) || []).catch((e) => { if (e.name === 'AbortError') throw e; return e; })));
    if (!ctx.alive()) return;
    clear(summary).append(table([
      { title: 'Service', cell: (s) => el('a', { href: `#svc-${s.name}`, onclick: (ev) => { ev.preventDefault(); const t = document.getElementById(`svc-${s.name}`); if (t) t.scrollIntoView(); } }, s.name) },
      { title: 'Instances', cell: (s) => String(s.instances || 0), class: 'num' },
      { title: 'Passing', cell: (s) => String(s.passing || 0), class: 'num' },
      { title: 'Health', cell: (s) => badge((s.passing || 0) === (s.instances || 0) && s.instances ? 'healthy' : s.passing ? 'degraded' : 'down') },
    ], services, { tableTestid: 'service-table', empty: 'no services registered', attrs: (s) => ({ dataset: { testid: 'service-row', service: s.name } }) }));
    clear(detail);
    services.forEach((s, i) => {
      const list = instances[i];
      const body = list instanceof Error
        ? el('p', { class: 'bad' }, `Cannot list the instances: ${list.describe ? list.describe() : list.message}`)
        : el('div', { class: 'table-wrap' }, table([
          { title: 'Instance', cell: (x) => el('code', {}, x.instance.instanceId) },
          { title: 'Address', cell: (x) => `${x.instance.address}:${x.instance.port}` },
          { title: 'Version', cell: (x) => x.instance.version || '' },
          { title: 'Zone / cluster', cell: (x) => [x.instance.zone, x.instance.cluster].filter(Boolean).join(' / ') || '—' },
          { title: 'Health', cell: (x) => badge(x.status, 'HEALTH_STATUS_', 'instance-health') },
          { title: 'Check', cell: (x) => (x.instance.check ? enumName(x.instance.check.kind) : 'lease only') },
          { title: 'Last check', cell: (x) => (Number(x.lastCheckUnixMs || 0) ? fmtAgo(Number(x.lastCheckUnixMs)) : '—') },
          { title: 'Error', cell: (x) => x.lastCheckError || '', class: 'message' },
          { title: 'Lease expires', cell: (x) => fmtTime(Number(x.leaseExpiresUnixMs || 0)) },
          { title: 'Metadata', cell: (x) => labelsText(x.instance.metadata) },
        ], list, { empty: 'no instances', attrs: (x) => ({ dataset: { testid: 'instance-row', service: s.name, instanceId: x.instance.instanceId, status: x.status || '' } }) }));
      const h = el('h2', { id: `svc-${s.name}` }, s.name);
      detail.append(el('section', { class: 'panel', 'aria-labelledby': `svc-${s.name}`, dataset: { testid: 'service-instances', service: s.name } }, h, body));
    });
    updated.set('ok', `updated ${fmtTime(Date.now())}`);
  });
  await load();
  const timer = setInterval(load, 10000);
  ctx.onLeave(() => clearInterval(timer));
}
