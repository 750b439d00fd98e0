// Bad input against the whole suite, through gRPC (every method of every service) and REST (every
// route of the gateway's OpenAPI document), table-driven: malformed protobuf bytes, wrong wire
// types, unknown fields, lengths past the end, messages over the receive limit, huge strings,
// invalid UTF-8, NUL bytes and SQL metacharacters in every string field, negative and overflowing
// numbers in every number field; malformed JSON, wrong JSON types for every field, huge bodies,
// bad query and path parameters.
//
// Each method or route is one test: its cases run between two snapshots of every table of every
// service's schema and every Redis key, and the refused cases must change nothing at all. Where a
// metacharacter is data (a device's name may well be "O'Brien 100%"), the value must be stored and
// read back verbatim, and only the tables the call owns may change. Every answer is checked against
// what the protos, READMEs and the OpenAPI document promise: gRPC never INTERNAL or UNKNOWN for a
// bad request, INVALID_ARGUMENT naming the field; REST the documented 4xx with the error shape
// {code, status, message, details}. At the end every service is still healthy.
'use strict';

const { startSuite, stopSuite, run, assert, api, ok } = require('./suite');
const W = require('./rawgrpc');
const { snapshotter, diff, rowCount } = require('./snapshot');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const S = W.grpc.status;
const NAME = W.CODE_NAMES;
const REPORT = !!process.env.IOT_BADINPUT_REPORT; // print every case and its answer

// ---- the values -------------------------------------------------------------------------------

const SQL = "'; DROP TABLE devices; --";
const HUGE = 'x'.repeat((128 << 10) + 1); // over every documented string limit (the largest is 64 KiB)
// String mutations: metacharacters are data in free-text fields; the rest never are.
const STR = {
  sql: SQL,
  pct: '%',
  us: '_',
  bs: '\\',
  nul: 'a\u0000b',
  badutf8: Buffer.from([0x61, 0xff, 0xfe, 0x62]),
  overlong: Buffer.from([0x61, 0xc0, 0xaf]), // "/" encoded in two bytes: not UTF-8
  surrogate: Buffer.from([0xed, 0xa0, 0x80]), // U+D800: not UTF-8
  huge: HUGE,
};
const META = ['sql', 'pct', 'us', 'bs'];
const NEVER = ['nul', 'badutf8', 'overlong', 'surrogate'];
const INT = {
  int32: { neg: -1, min: -2147483648, max: 2147483647 },
  int64: { neg: -1, min: -(2n ** 63n), max: 2n ** 63n - 1n },
  uint64: { max: 2n ** 64n - 1n, half: 2n ** 63n },
  double: { nan: NaN, inf: Infinity, ninf: -Infinity, neg: -1e308 },
  enum: { unknown: 99, neg: -1 },
};

// ---- the gRPC table ---------------------------------------------------------------------------
//
// One entry per method: base (a valid request, or one that fails for a documented reason that is
// not the field under test), token (the device token when the method wants one), and how its
// fields behave:
//   prep:   {path prefix: fn(req)} makes the request a valid context for fields under the prefix
//           (a window needs a statistic, a webhook's timeout a URL)
//   text:   fields where metacharacters are data: path -> where the value comes back verbatim, in
//           read(fx, resp, req), or in the answer itself when read is absent; {path, fmt} when it
//           comes back inside a text of its own
//   filter: fields where metacharacters are a search term: OK, nothing changes
//   out:    output-only fields (ignored on input): only what no string may hold is refused
//   codes:  {path: {mutation: expected}} where a field answers otherwise than INVALID_ARGUMENT
//           naming it; '*' for every mutation, 'meta' for the four metacharacters
//   allow:  what the accepted cases may change (a regexp over "schema.table" and Redis keys)
//   fresh:  fn(fx) -> fields for a new target per verbatim case (an alert is acknowledged once)
//   baseCode: what the base request answers (OK unless given)
// Expected outcomes: a code (or a list of codes), 'same' (what the base request answers), 'ok'.

const DM = 'iot.device.v1.DeviceManager', ING = 'iot.ingest.v1.Ingest', PROC = 'iot.processing.v1.Processing';
const OTA = 'iot.ota.v1.Ota', REG = 'iot.registry.v1.Registry';
const ts = (ms) => ({ seconds: String(Math.floor(ms / 1000)), nanos: 0 });
const NOT_FOUND_ID = 'bi-no-such-thing';
const STALE = '999999999';

// For a filter case of ListDevices / CountDevices: the devices it answered are those the filter
// selects from the whole list, taken literally (a LIKE wildcard that slipped through selects more).
function devicesMatch(count) {
  return async (fx, req, resp) => {
    if (!fx.allDevices) { // the whole list, once per method: its cases change no device
      fx.allDevices = [];
      for (let token = ''; ;) {
        const r = await fx.call('dm', DM, 'ListDevices', { page_size: 1000, page_token: token });
        fx.allDevices.push(...(r.devices || []));
        token = r.next_page_token;
        if (!token) break;
      }
    }
    const all = fx.allDevices;
    const f = req.filter || {}, lc = (x) => String(x || '').toLowerCase();
    const want = all.filter((d) => (!f.type || d.type === f.type) && (!f.model || d.model === f.model) &&
      (!f.firmware_version || d.firmware_version === f.firmware_version) && (!f.name_contains || lc(d.name).includes(lc(f.name_contains))) &&
      (!f.search || lc(d.id).includes(lc(f.search)) || lc(d.name).includes(lc(f.search))) &&
      (!f.site_prefix || String((d.location || {}).site || '').startsWith(f.site_prefix))).map((d) => d.id).sort();
    if (count) return Number(resp.total || 0) === want.length ? null : `counted ${resp.total || 0}, want ${want.length}`;
    const got = (resp.devices || []).map((d) => d.id).sort();
    return JSON.stringify(got) === JSON.stringify(want) ? null : `listed ${JSON.stringify(got)}, want ${JSON.stringify(want)}`;
  };
}

function grpcTable(fx) {
  const now = Date.now();
  const dev = { name: 'bi', type: 'sensor', model: 'M-1' };
  const devText = (p) => ({ [`${p}.name`]: 'name', [`${p}.model`]: 'model', [`${p}.firmware_version`]: 'firmware_version',
    [`${p}.location.site`]: 'location.site', [`${p}.metadata{key}`]: 'metadata', [`${p}.metadata{value}`]: 'metadata' });
  const devices = /_dm_.*\.(devices|events)$|:d:|:events$/;
  const ruleCtx = {
    'rule.threshold.window': (r) => { r.rule.threshold = { op: 'COMPARISON_GT', threshold: 1, statistic: 'STATISTIC_MEAN', window: { kind: 'WINDOW_KIND_SLIDING', width_ms: '60000' } }; },
    'rule.threshold.statistic': (r) => { r.rule.threshold.window = { width_ms: '60000' }; },
    'rule.threshold.window.count': (r) => { r.rule.threshold.window = { kind: 'WINDOW_KIND_COUNT', count: 10 }; },
    'rule.detector': (r) => { delete r.rule.threshold; r.rule.detector = { kind: 'DETECTOR_KIND_ZSCORE', level: 0.5, window_ms: '60000', min_samples: 5 }; },
    'rule.detector.duration_ms': (r) => { r.rule.detector = { kind: 'DETECTOR_KIND_STUCK', duration_ms: '1000' }; },
    'rule.detector.epsilon': (r) => { r.rule.detector = { kind: 'DETECTOR_KIND_STUCK', duration_ms: '1000' }; },
    'rule.command': (r) => { r.rule.command = { name: 'cool' }; },
    'rule.webhook': (r) => { r.rule.webhook = { url: 'http://127.0.0.1:1/hook' }; },
  };
  const ruleCodes = {
    'rule.threshold.threshold': { neg: 'ok' },
    'rule.metric': { us: 'ok' }, // '_' is a metric name
    'rule.threshold.window.range_min': { neg: 'ok' }, 'rule.threshold.window.range_max': { neg: S.INVALID_ARGUMENT },
    'rule.detector.epsilon': { neg: S.INVALID_ARGUMENT },
    'rule.devices.label_selector': { meta: S.INVALID_ARGUMENT },
  };
  const rules = /_proc_.*\.(rules|rules_version)$/;
  return [
    // ---- device-mgmt
    { svc: 'dm', service: DM, method: 'CreateDevice', base: () => ({ device: { ...dev } }),
      text: devText('device'), read: (fx, r) => fx.dmGet(r.id),
      out: ['device.etag', 'device.create_time', 'device.update_time', 'device.last_seen_time'],
      codes: { 'device.labels{value}': { us: 'ok' } }, // a label value may be "_"
      allow: devices },
    { svc: 'dm', service: DM, method: 'BatchCreateDevices', base: () => ({ devices: [{ ...dev }] }),
      text: Object.fromEntries(Object.entries(devText('devices')).map(([k, v]) => [k, `devices.${v}`])),
      out: ['devices.etag', 'devices.create_time', 'devices.update_time', 'devices.last_seen_time'],
      codes: { 'devices.labels{value}': { us: 'ok' } },
      allow: devices },
    { svc: 'dm', service: DM, method: 'GetDevice', base: () => ({ id: fx.dev.id }) },
    // Filters with metacharacters find what holds them literally ('%' and '_' are no wildcards).
    { svc: 'dm', service: DM, method: 'ListDevices', base: () => ({ filter: { type: 'sensor' }, page_size: 1000 }),
      filter: ['filter.model', 'filter.firmware_version', 'filter.name_contains', 'filter.site_prefix', 'filter.search'], check: devicesMatch(false) },
    { svc: 'dm', service: DM, method: 'CountDevices', base: () => ({ filter: { type: 'sensor' } }),
      filter: ['filter.model', 'filter.firmware_version', 'filter.name_contains', 'filter.site_prefix', 'filter.search'], check: devicesMatch(true) },
    { svc: 'dm', service: DM, method: 'UpdateDevice', base: () => ({ device: { id: fx.upd.id, ...dev } }),
      text: devText('device'), read: (fx, r) => fx.dmGet(r.id),
      out: ['device.create_time', 'device.update_time', 'device.last_seen_time'],
      codes: { 'device.labels{value}': { us: 'ok' }, 'device.etag': { meta: S.ABORTED } }, // any other etag is stale
      allow: devices },
    { svc: 'dm', service: DM, method: 'DeleteDevice', baseCode: S.ABORTED, base: () => ({ id: fx.victim.id, etag: STALE }), codes: { etag: { meta: S.ABORTED } } },
    { svc: 'dm', service: DM, method: 'CreateGroup', base: () => ({ group: { kind: 'GROUP_KIND_STATIC', description: 'bi' } }),
      prep: { 'group.filter': (r) => { r.group.kind = 'GROUP_KIND_DYNAMIC'; r.group.filter = { type: 'sensor' }; } },
      text: { 'group.description': 'description' }, read: (fx, r) => fx.call('dm', DM, 'GetGroup', { id: r.id }),
      filter: ['group.filter.model', 'group.filter.firmware_version', 'group.filter.name_contains', 'group.filter.site_prefix', 'group.filter.search'],
      out: ['group.etag', 'group.create_time', 'group.update_time'],
      codes: { 'group.filter.group_id': { '*': S.INVALID_ARGUMENT } }, // a group's filter names no group
      allow: /_dm_.*\.groups$/ },
    { svc: 'dm', service: DM, method: 'GetGroup', base: () => ({ id: fx.group }) },
    { svc: 'dm', service: DM, method: 'ListGroups', base: () => ({ page_size: 10 }) },
    { svc: 'dm', service: DM, method: 'UpdateGroup',
      base: () => ({ group: { id: fx.dynGroup, description: 'bi', filter: { type: 'sensor' } }, update_mask: { paths: ['description', 'filter'] } }),
      text: { 'group.description': 'description' }, read: (fx, r) => fx.call('dm', DM, 'GetGroup', { id: r.id }),
      filter: ['group.filter.model', 'group.filter.firmware_version', 'group.filter.name_contains', 'group.filter.site_prefix', 'group.filter.search'],
      out: ['group.kind', 'group.create_time', 'group.update_time'], // kind is not in the mask: ignored
      codes: { 'group.etag': { meta: S.ABORTED } },
      allow: /_dm_.*\.groups$/ },
    { svc: 'dm', service: DM, method: 'DeleteGroup', baseCode: S.NOT_FOUND, base: () => ({ id: NOT_FOUND_ID }) },
    { svc: 'dm', service: DM, method: 'AddGroupMembers', base: () => ({ group_id: fx.group, device_ids: [fx.dev.id] }) },
    { svc: 'dm', service: DM, method: 'RemoveGroupMembers', base: () => ({ group_id: fx.group, device_ids: [fx.upd.id] }) },
    { svc: 'dm', service: DM, method: 'ListGroupMembers', base: () => ({ group_id: fx.group, page_size: 10 }) },
    { svc: 'dm', service: DM, method: 'IssueToken', base: () => ({ device_id: fx.dev.id, ttl_seconds: 3600 }), allow: /_dm_.*\.tokens$|:t:/ },
    { svc: 'dm', service: DM, method: 'RotateToken', baseCode: S.NOT_FOUND, base: () => ({ token_id: 'tk-0000000000000000', ttl_seconds: 3600 }) },
    { svc: 'dm', service: DM, method: 'RevokeToken', baseCode: S.NOT_FOUND, base: () => ({ token_id: 'tk-0000000000000000' }) },
    { svc: 'dm', service: DM, method: 'AuthenticateDevice', base: () => ({ token: fx.dev.token }),
      codes: { token: { huge: S.UNAUTHENTICATED, meta: S.UNAUTHENTICATED } } }, // a token that is not one: UNAUTHENTICATED
    { svc: 'dm', service: DM, method: 'SignCertificate', base: () => ({ device_id: fx.dev.id, csr_pem: fx.csr, validity_days: 30 }),
      allow: /_dm_.*\.certificates$/ },
    { svc: 'dm', service: DM, method: 'RevokeCertificate', baseCode: S.NOT_FOUND, base: () => ({ serial: 'abcdef', reason: 1 }) },
    { svc: 'dm', service: DM, method: 'GetRevocationList', base: () => ({}) },
    { svc: 'dm', service: DM, method: 'ReportSeen', base: () => ({ sightings: [{ device_id: fx.seen.id }] }), allow: devices },
    { svc: 'dm', service: DM, method: 'GetShadow', base: () => ({ device_id: fx.dev.id }) },
    { svc: 'dm', service: DM, method: 'UpdateDesired', base: () => ({ device_id: fx.dev.id, patch: W.struct({ mode: 'eco' }) }),
      codes: { expected_version: { max: S.ABORTED } }, // not the current version
      allow: /_dm_.*\.shadows$/ },
    { svc: 'dm', service: DM, method: 'ReportState', token: () => fx.dev.token, base: () => ({ device_id: fx.dev.id, patch: W.struct({ mode: 'eco' }) }),
      codes: { expected_version: { max: S.ABORTED } },
      allow: /_dm_.*\.shadows$/ },
    { svc: 'dm', service: DM, method: 'SendCommand', base: () => ({ device_id: fx.cmd.id, name: 'reboot', ttl_seconds: 3600 }),
      codes: { request_id: { meta: 'ok' } }, // printable ASCII: any of it
      allow: /_dm_.*\.commands$|:cmdq$/ },
    { svc: 'dm', service: DM, method: 'GetCommand', base: () => ({ id: fx.command }) },
    { svc: 'dm', service: DM, method: 'ListCommands', base: () => ({ device_id: fx.cmd.id, page_size: 10 }) },
    { svc: 'dm', service: DM, method: 'WatchCommands', token: () => fx.dev.token, base: () => ({ device_id: fx.dev.id }) },
    { svc: 'dm', service: DM, method: 'AckCommand', token: () => fx.dev.token, baseCode: S.NOT_FOUND, base: () => ({ device_id: fx.dev.id, command_id: STALE, success: true }),
      codes: { error: { meta: S.NOT_FOUND } } }, // a fine error text, for a command that does not exist
    // ---- ingest
    // A stream answers the device's current acknowledgement as soon as it opens, before any message:
    // a device with a valid token that opened one was seen, so its last-seen time may move even
    // when every message it then sends is refused.
    ...['PushTelemetry', 'StreamTelemetry'].map((method) => ({ svc: 'ingest', service: ING, method, token: () => fx.tel.token,
      refusedAllow: method === 'StreamTelemetry' ? /_dm_.*\.(devices|events)$|:d:bi-tel$|:events$/ : undefined,
      base: () => ({ points: [{ seq: String(fx.seq()), metric: 'temp', time_ms: String(Date.now()), double_value: 1 }] }),
      text: { 'points.string_value': 'points.string_value', 'points.labels{value}': 'points.labels' },
      read: (fx, r, req) => fx.latestPoint(req.points[0].seq),
      prep: { 'points.labels{value}': (r) => { r.points[0].labels = {}; } },
      codes: { 'points.metric': { us: 'ok' }, 'points.labels{key}': { us: 'ok' }, 'points.double_value': { neg: 'ok' },
        'points.int_value': { neg: 'ok', min: 'ok', max: 'ok' }, 'points.seq': { max: S.INVALID_ARGUMENT, half: S.INVALID_ARGUMENT } },
      allow: /_ing_|_proc_|_dm_.*\.(devices|events)$|:d:|:events$|^gw-.*:\{\d\}$|:proc:stats:/ })),
    { svc: 'ingest', service: ING, method: 'QueryTelemetry', base: () => ({ device_id: fx.tel.id, metric: 'temp', from_ms: String(now - 3600000), to_ms: String(now + 3600000), page_size: 10 }),
      codes: { metric: { us: 'ok' }, from_ms: { neg: 'ok', min: 'ok' }, to_ms: { max: 'ok' } } },
    { svc: 'ingest', service: ING, method: 'LatestValues', base: () => ({ device_id: fx.tel.id }) },
    { svc: 'ingest', service: ING, method: 'WatchTelemetry', base: () => ({ device_id: fx.tel.id, metrics: ['temp'] }),
      codes: { metrics: { us: 'ok' } } },
    // ---- processing
    { svc: 'proc', service: PROC, method: 'CreateRule', base: () => ({ rule: { name: 'bi', enabled: false, metric: 'temp', threshold: { op: 'COMPARISON_GT', threshold: 100 } } }),
      prep: ruleCtx, codes: ruleCodes,
      text: { 'rule.name': 'name' }, read: (fx, r) => fx.call('proc', PROC, 'GetRule', { id: r.id }),
      out: ['rule.etag', 'rule.create_time', 'rule.update_time'],
      allow: rules },
    { svc: 'proc', service: PROC, method: 'GetRule', base: () => ({ id: fx.rule }) },
    { svc: 'proc', service: PROC, method: 'ListRules', base: () => ({ page_size: 10 }) },
    { svc: 'proc', service: PROC, method: 'UpdateRule', base: () => ({ rule: { id: fx.updRule, name: 'bi', enabled: false, metric: 'temp', threshold: { op: 'COMPARISON_GT', threshold: 100 } } }),
      prep: ruleCtx, codes: { ...ruleCodes, 'rule.etag': { meta: S.FAILED_PRECONDITION, huge: S.FAILED_PRECONDITION } }, // an etag that is not the current one
      text: { 'rule.name': 'name' }, read: (fx, r) => fx.call('proc', PROC, 'GetRule', { id: r.id }),
      out: ['rule.create_time', 'rule.update_time'],
      allow: rules },
    { svc: 'proc', service: PROC, method: 'DeleteRule', baseCode: S.FAILED_PRECONDITION, base: () => ({ id: fx.rule, etag: STALE }), codes: { etag: { meta: S.FAILED_PRECONDITION, huge: S.FAILED_PRECONDITION } } },
    { svc: 'proc', service: PROC, method: 'SetRuleEnabled', baseCode: S.NOT_FOUND, base: () => ({ id: NOT_FOUND_ID, enabled: false }) },
    { svc: 'proc', service: PROC, method: 'GetRuleStats', base: () => ({ rule_id: fx.rule }) },
    { svc: 'proc', service: PROC, method: 'ListAlerts', base: () => ({ rule_id: fx.rule, page_size: 10 }) },
    { svc: 'proc', service: PROC, method: 'GetAlert', base: () => ({ id: fx.alerts[0] }) },
    { svc: 'proc', service: PROC, method: 'AckAlert', base: () => ({ id: fx.alerts[0], by: 'bi' }),
      text: { by: 'acknowledged_by' }, fresh: (fx) => ({ id: fx.alerts.pop() }), read: (fx, r) => fx.call('proc', PROC, 'GetAlert', { id: r.id }),
      rest: { restFmt: (v, fx) => `${v} (api-key:${fx.adminKeyId})` }, // the gateway records the key with the name
      allow: /_proc_.*\.(alerts|alert_events|event_counter)$/ },
    { svc: 'proc', service: PROC, method: 'WatchAlerts', base: () => ({ after_event_id: '', min_severity: 0 }) },
    { svc: 'proc', service: PROC, method: 'GetWindowStats', baseCode: S.FAILED_PRECONDITION, base: () => ({ rule_id: fx.rule, device_id: fx.tel.id }) },
    { svc: 'proc', service: PROC, method: 'QueryRollups', base: () => ({ device_id: fx.tel.id, metric: 'temp', from: ts(now - 3600000), to: ts(now + 3600000), resolution_ms: '60000', page_size: 10 }),
      codes: { metric: { us: 'ok' } } },
    // ---- ota
    { svc: 'ota', service: OTA, method: 'UploadArtifact', stream: true,
      base: () => [{ header: { name: 'bi-fw', version: `1.0.${fx.seq()}`, models: ['M-1'] } }, { chunk: Buffer.from('firmware') }],
      text: { 'header.models': 'models', 'header.release_notes': 'release_notes', 'header.metadata{key}': 'metadata', 'header.metadata{value}': 'metadata' },
      read: (fx, r) => fx.call('ota', OTA, 'GetArtifact', { id: r.id }),
      codes: { 'header.size': { max: S.RESOURCE_EXHAUSTED } }, // over IOT_OTA_MAX_ARTIFACT_SIZE
      rest: { codes: { 'header.release_notes': { huge: 'ok' } } }, // a query parameter (4,000 bytes) is within 64 KiB
      allow: /_ota_.*\.(artifacts|artifact_chunks)$/ },
    { svc: 'ota', service: OTA, method: 'GetArtifact', base: () => ({ id: fx.artifact }) },
    { svc: 'ota', service: OTA, method: 'ListArtifacts', base: () => ({ page_size: 10 }), filter: ['name', 'model'] },
    { svc: 'ota', service: OTA, method: 'DeleteArtifact', baseCode: S.NOT_FOUND, base: () => ({ id: STALE }) },
    { svc: 'ota', service: OTA, method: 'ListSigningKeys', base: () => ({}) },
    { svc: 'ota', service: OTA, method: 'CreateRollout', base: () => ({ rollout: { name: 'bi', artifact_id: fx.artifact, target: { model: 'M-1' }, stages: [{ percent: 100 }] } }),
      prep: { 'rollout.stages.count': (r) => { r.rollout.stages = [{ count: 1 }, { percent: 100 }]; } },
      text: { 'rollout.name': 'name', 'rollout.target.model': 'target.model', 'rollout.target.version_range': 'target.version_range' },
      read: (fx, r) => fx.call('ota', OTA, 'GetRollout', { id: r.id }),
      out: ['rollout.id', 'rollout.state', 'rollout.current_stage', 'rollout.pause_reason', 'rollout.stage_status', 'rollout.create_time', 'rollout.update_time', 'rollout.etag'],
      codes: { 'rollout.gate.min_alerts': { max: 'ok' }, 'rollout.stages.count': { max: 'ok' }, 'rollout.target.version_range': { meta: S.INVALID_ARGUMENT } },
      allow: /_ota_.*\.(rollouts|rollout_stages)$/ },
    { svc: 'ota', service: OTA, method: 'GetRollout', base: () => ({ id: fx.rollout }) },
    { svc: 'ota', service: OTA, method: 'ListRollouts', base: () => ({ page_size: 10 }) },
    // Start and resume take no reason (ignored); the rollout's state is checked first.
    ...['StartRollout', 'ResumeRollout'].map((method) => ({ svc: 'ota', service: OTA, method, baseCode: S.FAILED_PRECONDITION, base: () => ({ id: fx.cancelled, reason: 'bi' }),
      codes: { reason: { meta: 'same', huge: 'same' } } })),
    { svc: 'ota', service: OTA, method: 'PauseRollout', baseCode: S.FAILED_PRECONDITION, base: () => ({ id: fx.cancelled, reason: 'bi' }), codes: { reason: { meta: 'same' } } },
    { svc: 'ota', service: OTA, method: 'CancelRollout', baseCode: S.FAILED_PRECONDITION, base: () => ({ id: fx.cancelled, reason: 'bi' }),
      text: { reason: { path: 'pause_reason', fmt: (v) => `cancelled: ${v}` } }, fresh: (fx) => ({ id: fx.drafts.pop() }), read: (fx, r) => fx.call('ota', OTA, 'GetRollout', { id: r.id }),
      allow: /_ota_.*\.(rollouts|rollout_stages)$/ },
    { svc: 'ota', service: OTA, method: 'ApproveStage', baseCode: S.FAILED_PRECONDITION, base: () => ({ id: fx.cancelled, stage: 0 }),
      codes: { stage: { '*': [S.INVALID_ARGUMENT, S.FAILED_PRECONDITION] } } }, // no stage awaits approval
    { svc: 'ota', service: OTA, method: 'ListDeviceUpdates', base: () => ({ rollout_id: fx.rollout, page_size: 10 }) },
    { svc: 'ota', service: OTA, method: 'CheckForUpdate', token: () => fx.dev.token, base: () => ({ current_version: '1.0.0', model: 'M-1' }),
      filter: ['model'] }, // no artifact is for that model: no offer
    { svc: 'ota', service: OTA, method: 'DownloadArtifact', token: () => fx.dev.token, base: () => ({ artifact_id: fx.artifact, offset: 0 }),
      codes: { offset: { max: S.OUT_OF_RANGE } } },
    { svc: 'ota', service: OTA, method: 'ReportStatus', token: () => fx.dev.token, baseCode: S.NOT_FOUND, base: () => ({ rollout_id: fx.rollout, phase: 'UPDATE_PHASE_DOWNLOADING', progress: 10 }),
      codes: { error: { meta: S.NOT_FOUND } } }, // a fine error text, from a device not in the rollout
    // ---- registry
    { svc: 'registry', service: REG, method: 'RegisterInstance',
      base: () => ({ instance: { service: 'bi-svc', instance_id: `bi-${fx.seq()}`, address: '127.0.0.1', port: 9, version: '1' }, ttl_seconds: 3600 }),
      prep: { 'instance.check': (r) => { r.instance.check = { kind: 'HTTP', target: '/healthz' }; } },
      text: { 'instance.version': 'instance.version', 'instance.zone': 'instance.zone', 'instance.cluster': 'instance.cluster',
        'instance.metadata{key}': 'instance.metadata', 'instance.metadata{value}': 'instance.metadata' },
      read: async (fx, r, req) => ((await fx.call('registry', REG, 'Discover', { service: 'bi-svc' })).instances || []).find((i) => i.instance.instance_id === req.instance.instance_id),
      allow: /^\{gwreg-/ },
    { svc: 'registry', service: REG, method: 'Heartbeat', baseCode: S.NOT_FOUND, base: () => ({ lease_id: '0'.repeat(32) }) },
    { svc: 'registry', service: REG, method: 'DeregisterInstance', baseCode: S.NOT_FOUND, base: () => ({ service: 'bi-svc', instance_id: NOT_FOUND_ID }) },
    { svc: 'registry', service: REG, method: 'Discover', base: () => ({ service: 'bi-svc', prefer_zone: 'z' }), filter: ['prefer_zone', 'prefer_cluster'],
      codes: { prefer_zone: { huge: 'ok' }, prefer_cluster: { huge: 'ok' } } }, // only compared, never stored
    { svc: 'registry', service: REG, method: 'ListServices', base: () => ({}) },
    { svc: 'registry', service: REG, method: 'Watch', base: () => ({ service: 'bi-svc' }) },
  ];
}

// ---- generating the cases of a method ---------------------------------------------------------

const FIXED64_T = new Set(['double', 'fixed64', 'sfixed64']);
const WKT = new Set(['google.protobuf.Timestamp', 'google.protobuf.Struct', 'google.protobuf.FieldMask', 'google.protobuf.Value']);

// Leaf fields of a request type: {path (dots; "{key}"/"{value}" for map parts), field, kind}.
function leaves(type, prefix = '', depth = 0, out = []) {
  for (const f of type.fieldsArray) {
    const p = prefix + f.name;
    const rt = f.resolvedType;
    if (f.map) {
      out.push({ path: `${p}{key}`, field: f, kind: 'string', map: 'key' });
      if (!(rt instanceof W.protobuf.Type)) out.push({ path: `${p}{value}`, field: f, kind: rt ? 'enum' : f.type, map: 'value' });
      continue;
    }
    if (rt instanceof W.protobuf.Type) {
      const full = rt.fullName.slice(1);
      if (WKT.has(full)) out.push({ path: p, field: f, kind: full.split('.').pop() });
      else if (depth < 4) leaves(rt, `${p}.`, depth + 1, out);
      continue;
    }
    out.push({ path: p, field: f, kind: rt ? 'enum' : f.type });
  }
  return out;
}

// A copy of base with the leaf at path set to v (repeated fields along the way: their first
// element, or a new one; a oneof member clears its siblings).
function setPath(type, base, path, v, leaf) {
  const obj = structuredClone(base);
  const parts = path.replace(/\{(key|value)\}$/, '').split('.');
  let o = obj, t = type;
  for (let i = 0; i < parts.length; i++) {
    const f = t.fields[parts[i]];
    const last = i === parts.length - 1;
    if (f.partOf) for (const sib of f.partOf.fieldsArray) if (sib !== f) delete o[sib.name];
    if (last) {
      if (leaf.map === 'key') o[f.name] = Buffer.isBuffer(v) ? { raw: W.mapEntry(f, v, 'v') } : { [v]: 'v' };
      if (leaf.map === 'value') o[f.name] = { k: v };
      if (!leaf.map) o[f.name] = f.repeated ? [v] : v;
      break;
    }
    if (f.repeated) {
      if (!Array.isArray(o[f.name]) || !o[f.name].length) o[f.name] = [{}];
      o = o[f.name][0];
    } else {
      if (typeof o[f.name] !== 'object' || o[f.name] === null) o[f.name] = {};
      o = o[f.name];
    }
    t = f.resolvedType;
  }
  return obj;
}

// The value at a dotted path of a decoded message (through the first element of arrays).
function getPath(o, path) {
  for (const p of path.split('.')) {
    if (o === undefined || o === null) return undefined;
    o = Array.isArray(o) ? o[0] : o;
    o = o[p];
  }
  return Array.isArray(o) ? o[0] : o;
}

const leafName = (path) => path.replace(/\{(key|value)\}$/, '').split('.').pop();

const under = (p, k) => p === k || p.startsWith(`${k}.`) || p.startsWith(`${k}{`);
const isOut = (spec, p) => (spec.out || []).some((o) => under(p, o));

// The values a leaf is tried with over gRPC: [[mutation, wire value]].
function fieldMutations(leaf, spec) {
  const out = [];
  if (leaf.kind === 'string') {
    for (const mut of NEVER) out.push([mut, STR[mut]]);
    if (!isOut(spec, leaf.path)) for (const mut of ['huge', ...META]) out.push([mut, STR[mut]]);
  } else if (isOut(spec, leaf.path)) {
    // output only: ignored on input
  } else if (INT[leaf.kind]) {
    for (const [mut, v] of Object.entries(INT[leaf.kind])) out.push([mut, v]);
  } else if (leaf.kind === 'Struct') {
    let deep = {};
    for (let i = 0; i < 40; i++) deep = { d: deep };
    out.push(['struct_key_nul', W.struct({ 'a\u0000b': 1 })], ['struct_value_badutf8', W.struct({ k: Buffer.from([0xff]) })],
      ['struct_value_nul', W.struct({ k: 'a\u0000b' })], ['struct_value_nan', W.struct({ k: NaN })], ['struct_huge', W.struct({ k: HUGE })],
      ['struct_deep', W.struct(deep)]);
  } else if (leaf.kind === 'Timestamp') {
    out.push(['ts_year_10000', { seconds: '253402300800', nanos: 0 }], ['ts_negative_nanos', { seconds: '1', nanos: -1 }],
      ['ts_nanos_overflow', { seconds: '1', nanos: 1000000000 }], ['ts_min', { seconds: String(-(2n ** 63n)), nanos: 0 }]);
  } else if (leaf.kind === 'FieldMask') {
    out.push(['mask_unknown', { paths: ['no_such_field'] }], ['mask_sql', { paths: [SQL] }], ['mask_nul', { paths: ['name\u0000x'] }]);
  }
  return out;
}

// What mutation mut of leaf must answer, by the spec's table (shared by gRPC and REST):
// {codes, msg} | {same} | {ok, verbatim}.
function fieldExpect(spec, leaf, mut) {
  const p = leaf.path;
  const named = { codes: [S.INVALID_ARGUMENT], msg: new RegExp(leafName(p).replace(/_/g, '[_ ]?'), 'i') };
  let e = named;
  if (META.includes(mut)) {
    if ((spec.text || {})[p] !== undefined) e = { ok: true, verbatim: spec.text[p] };
    else if ((spec.filter || []).includes(p)) e = { ok: true };
  }
  if (mut === 'struct_deep') e = { codes: [S.INVALID_ARGUMENT] }; // refused by the decoder's depth limit, unnamed
  const c = (spec.codes || {})[p] || {};
  let o = c[mut];
  if (o === undefined && META.includes(mut)) o = c.meta;
  if (o === undefined) o = c['*'];
  if (o === undefined) return e;
  if (typeof o === 'number') return { codes: [o] };
  if (Array.isArray(o)) return { codes: o };
  if (o === 'same') return { same: true };
  return { ok: true };
}

// The cases of one method: [{name, req (object, or array for client streams) | bytes, expect}].
// expect: {codes: [..], msg: RegExp} | {same: true} | {ok: true, verbatim: {path, value}}
function grpcCases(spec, fx) {
  const m = W.pb.lookupService(spec.service).methods[spec.method];
  const type = W.pb.lookupType(m.requestType);
  const cases = [];
  const stream = !!spec.stream; // the request is a list; mutations go to its first message
  const base = () => spec.base(fx);
  const wrap = (obj, tail) => (stream ? [obj, ...tail] : obj);
  const first = (b) => (stream ? b[0] : b);
  const rest = (b) => (stream ? b.slice(1) : []);
  const bytesOf = (obj) => W.encode(type, obj);
  const invalid = (msg) => ({ codes: [S.INVALID_ARGUMENT], msg });

  // Message-level damage.
  const raw = (name, mk, expect) => cases.push({ name, bytes: () => { const b = base(); return wrap(mk(b), rest(b).map(bytesOf)); }, expect });
  raw('garbage', () => Buffer.from([0xff, 0xff, 0xff, 0xff]), invalid(/malformed/));
  raw('truncated', (b) => { const x = bytesOf(first(b)); return x.length > 1 ? x.subarray(0, x.length - 1) : Buffer.from([0x0a]); }, invalid(/malformed/));
  // Every field of the request with a wire type it cannot have, and every length-delimited one
  // longer than what is left of the message.
  const VAR = new Set(['int32', 'int64', 'uint32', 'uint64', 'sint32', 'sint64', 'bool']);
  for (const f of type.fieldsArray) {
    const ld = f.map || f.resolvedType instanceof W.protobuf.Type || f.type === 'string' || f.type === 'bytes';
    const native = ld ? 2 : f.resolvedType instanceof W.protobuf.Enum || VAR.has(f.type) ? 0 : FIXED64_T.has(f.type) ? 1 : 5;
    const ok = new Set([native, ...(f.repeated && !ld ? [2] : [])]); // repeated scalars may come packed
    const wt = [0, 5, 1, 2].find((x) => !ok.has(x));
    const payload = wt === 0 ? W.varint(5) : wt === 1 ? Buffer.alloc(8) : wt === 5 ? Buffer.alloc(4) : W.varint(3);
    raw(`wrong_wire_type:${f.name}`, () => Buffer.concat([W.tag(f.id, wt), payload, ...(wt === 2 ? [Buffer.from('abc')] : [])]), invalid(/malformed/));
    if (ld) raw(`length_past_end:${f.name}`, () => Buffer.concat([W.tag(f.id, 2), W.varint(1000), Buffer.from('abc')]), invalid(/malformed/));
  }
  raw('varint_too_long', () => Buffer.concat([W.tag(1, 0), Buffer.alloc(11, 0xff)]), invalid(/malformed/));
  raw('group_wire_type', (b) => Buffer.concat([bytesOf(first(b)), W.tag(1000, 3), W.tag(1000, 4)]), invalid(/malformed/));
  raw('field_number_zero', (b) => Buffer.concat([bytesOf(first(b)), W.tag(0, 0), W.varint(1)]), invalid(/malformed/));
  raw('unknown_fields', (b) => Buffer.concat([bytesOf(first(b)), W.tag(1000, 0), W.varint(1), W.delimited(1001, Buffer.from([0xff, 0x00])),
    W.tag(1002, 1), Buffer.alloc(8), W.tag(1003, 5), Buffer.alloc(4)]), { same: true });
  raw('over_max_receive_size', (b) => Buffer.concat([bytesOf(first(b)), W.delimited(1001, Buffer.alloc((4 << 20) + 1024))]),
    { codes: [S.RESOURCE_EXHAUSTED] });

  // Field-level values.
  const preps = Object.entries(spec.prep || {}).sort((a, b) => a[0].length - b[0].length);
  for (const leaf of leaves(type)) {
    const p = leaf.path;
    for (const [mut, v] of fieldMutations(leaf, spec)) {
      const req = () => {
        const b = base();
        const x = structuredClone(first(b));
        for (const [k, fn] of preps) if (under(p, k)) fn(x);
        return wrap(setPath(type, x, p, v, leaf), rest(b));
      };
      cases.push({ name: `${p}=${mut}`, path: p, req, expect: fieldExpect(spec, leaf, mut), leaf, mut, value: v });
    }
  }
  return cases;
}

// ---- running them -----------------------------------------------------------------------------

function describe(r) { return r.open ? 'OK (stream open)' : `${NAME[r.code]}${r.details ? ` "${String(r.details).slice(0, 160)}"` : ''}`; }

// Caches a read fills on its way (device-mgmt's device and token entries): written by accepted
// reads, never by refused requests.
const READ_CACHES = /^\{gw-[^}]*\}:[dt]:/;

async function grpcMethod(ctx, spec) {
  const fx = ctx.fx;
  fx.allDevices = null;
  const cases = grpcCases(spec, fx);
  const target = ctx.targets[spec.svc];
  const token = spec.token ? spec.token() : undefined;
  const baseCode = spec.baseCode || S.OK;
  const send = (c) => {
    if (c.bytes) return W.call(target, spec.service, spec.method, c.bytes(), { token });
    const req = c.req();
    return W.callMsg(target, spec.service, spec.method, req, { token }).then((r) => ({ ...r, req }));
  };
  const failures = [];
  // Refused cases first, between snapshots that must be equal; then the base request and the
  // accepted cases, which may change only what spec.allow names (and read caches).
  const refused = cases.filter((c) => c.expect.codes || (c.expect.same && baseCode !== S.OK));
  const accepted = cases.filter((c) => !refused.includes(c));
  let before = await ctx.snap.take();
  for (const c of refused) {
    const r = await send(c);
    ctx.count(spec.service, c);
    if (REPORT) console.log(`    ${spec.method} ${c.name}: ${describe(r)}`);
    const want = c.expect.same ? [baseCode] : c.expect.codes;
    if (!want.includes(r.code)) failures.push(`${c.name}: got ${describe(r)}, want ${want.map((x) => NAME[x]).join(' or ')}`);
    else if (r.code !== S.OK && c.expect.msg && !c.expect.msg.test(r.details)) failures.push(`${c.name}: message "${r.details}" does not name ${c.expect.msg}`);
    else if ([S.INTERNAL, S.UNKNOWN].includes(r.code)) failures.push(`${c.name}: ${describe(r)}`);
  }
  if (spec.refusedAllow) await ctx.settle();
  let after = await ctx.snap.take();
  for (const d of diff(before, after, (n) => spec.refusedAllow && spec.refusedAllow.test(n))) failures.push(`refused cases changed state: ${d}`);
  before = after;
  const baseR = await W.callMsg(target, spec.service, spec.method, spec.base(fx), { token });
  ctx.count(spec.service, { name: 'base' });
  if (baseR.code !== baseCode) failures.push(`the base request: got ${describe(baseR)}, want ${NAME[baseCode]}`);
  for (const c of accepted) {
    if (c.expect.verbatim && spec.fresh) { const f = spec.fresh(fx); const b = c.req; c.req = () => ({ ...b(), ...f }); }
    const r = await send(c);
    ctx.count(spec.service, c);
    if (REPORT) console.log(`    ${spec.method} ${c.name}: ${describe(r)}`);
    const want = c.expect.same ? baseCode : S.OK;
    if (r.code !== want) { failures.push(`${c.name}: got ${describe(r)}, want ${NAME[want]}`); continue; }
    if (c.expect.verbatim && r.code === S.OK) {
      const resp = r.resp || (r.msgs && r.msgs[0]);
      const back = spec.read ? await spec.read(fx, resp, c.bytes ? null : (spec.stream ? r.req[0] : r.req)) : resp;
      const v = typeof c.expect.verbatim === 'string' ? { path: c.expect.verbatim, fmt: (x) => x } : c.expect.verbatim;
      let got = getPath(back, v.path);
      if (c.leaf.map === 'key') got = got && Object.keys(got).find((k) => k === c.value);
      if (c.leaf.map === 'value') got = got && got.k;
      const want2 = c.leaf.map === 'key' ? c.value : v.fmt(c.value);
      if (got !== want2) failures.push(`${c.name}: stored ${JSON.stringify(got)}, sent ${JSON.stringify(c.value)}`);
    }
    if (spec.check && c.expect.ok && r.code === S.OK && c.req) {
      const e = await spec.check(fx, r.req, r.resp);
      if (e) failures.push(`${c.name}: ${e}`);
    }
  }
  if (spec.allow) await ctx.settle(); // what the accepted writes set off (events, presence, rollups)
  after = await ctx.snap.take();
  for (const d of diff(before, after, (n) => (spec.allow && spec.allow.test(n)) || READ_CACHES.test(n))) {
    failures.push(`the base request and accepted cases changed more than their own tables: ${d}`);
  }
  const h = await ctx.healthy(spec.svc);
  if (h) failures.push(h);
  if (failures.length) throw new Error(`${failures.length} of ${cases.length} cases failed:\n      ${failures.join('\n      ')}`);
}

// ---- REST ---------------------------------------------------------------------------------------
//
// Every operation of the OpenAPI document the gateway serves. A proxied route takes its request,
// base and field expectations from the gRPC table entry of its method (the gateway must answer
// the same thing, with the HTTP status of the gRPC code); the gateway's own routes have entries of
// their own below. Cases: malformed bodies, wrong JSON types for every body field, every body and
// query string with huge values and metacharacters, every number negative and overflowing, path
// parameters with metacharacters, invalid UTF-8, %00 and '/'. Each answer is checked for the error
// shape {code, status, message, details}, the HTTP status of its gRPC code, and a status the
// operation's OpenAPI entry lists.

const GW = 'iot.gateway.v1';
const HTTP_OF = { [S.OK]: 200, [S.INVALID_ARGUMENT]: 400, [S.OUT_OF_RANGE]: 400, [S.UNAUTHENTICATED]: 401, [S.PERMISSION_DENIED]: 403,
  [S.NOT_FOUND]: 404, [S.ALREADY_EXISTS]: 409, [S.ABORTED]: 409, [S.FAILED_PRECONDITION]: 412, [S.RESOURCE_EXHAUSTED]: 429,
  [S.UNAVAILABLE]: 503, [S.DEADLINE_EXCEEDED]: 504 };
const BIG = HUGE; // huge for a JSON body too (under IOT_GW_MAX_BODY, 1 MiB)
const LONG = 'x'.repeat(4000); // huge for a path or query parameter (URLs stay under libmicrohttpd's 32 KiB)

const camel = (n) => n.replace(/_([a-z0-9])/g, (m, c) => c.toUpperCase());
const jsonPath = (p) => p.replace(/\{(key|value)\}$/, '').split('.').map(camel).join('.');

// A proto-named request object (as the gRPC table writes them) as proto3 JSON.
function toJson(type, obj) {
  const out = {};
  for (const f of type.fieldsArray) {
    const v = obj[f.name];
    if (v === undefined || v === null) continue;
    const one = (x) => jsonValue(f, x);
    out[camel(f.name)] = f.map ? Object.fromEntries(Object.entries(v).map(([k, x]) => [k, one(x)])) : f.repeated ? v.map(one) : one(v);
  }
  return out;
}
function structJs(st) {
  const val = (x) => ('stringValue' in x ? String(x.stringValue) : 'numberValue' in x ? x.numberValue : 'boolValue' in x ? x.boolValue
    : 'nullValue' in x ? null : 'listValue' in x ? x.listValue.values.map(val) : structJs(x.structValue));
  return Object.fromEntries(Object.entries(st.fields || {}).map(([k, x]) => [k, val(x)]));
}
function jsonValue(f, v) {
  const rt = f.resolvedType;
  if (rt instanceof W.protobuf.Type) {
    const full = rt.fullName.slice(1);
    if (full === 'google.protobuf.Timestamp') return new Date(Number(v.seconds) * 1000 + Math.floor((v.nanos || 0) / 1e6)).toISOString();
    if (full === 'google.protobuf.Struct') return structJs(v);
    if (full === 'google.protobuf.FieldMask') return v.paths.join(',');
    return toJson(rt, v);
  }
  if (Buffer.isBuffer(v)) return f.type === 'bytes' ? v.toString('base64') : v.toString('latin1');
  if (typeof v === 'bigint') return String(v);
  return v;
}
// The same object as query parameters: [[dotted lowerCamel name, text]].
function toQuery(type, obj, prefix = '') {
  const out = [];
  for (const f of type.fieldsArray) {
    const v = obj[f.name];
    if (v === undefined || v === null) continue;
    const name = prefix + camel(f.name), rt = f.resolvedType;
    if (rt instanceof W.protobuf.Type && !WKT.has(rt.fullName.slice(1))) out.push(...toQuery(rt, v, `${name}.`));
    else for (const x of f.repeated ? v : [v]) out.push([name, String(jsonValue(f, x))]);
  }
  return out;
}
// Sets the leaf at proto path p (a leaf of type) in a JSON body to v: repeated fields along the
// way through their first element, a oneof member clearing its siblings, as setPath does.
function setJson(type, obj, p, v) {
  const parts = p.replace(/\{(key|value)\}$/, '').split('.');
  let o = obj, t = type;
  for (let i = 0; i < parts.length; i++) {
    const f = t.fields[parts[i]], k = camel(f.name);
    if (f.partOf) for (const sib of f.partOf.fieldsArray) if (sib !== f) { delete o[camel(sib.name)]; delete o[sib.name]; }
    if (i === parts.length - 1) { o[k] = v; break; }
    if (f.repeated) {
      if (!Array.isArray(o[k]) || !o[k].length) o[k] = [{}];
      o = o[k][0];
    } else {
      if (!o[k] || typeof o[k] !== 'object') o[k] = {};
      o = o[k];
    }
    t = f.resolvedType;
  }
  return obj;
}
// Query text; "%RAW" in front of a name or value sends the rest as it is (already percent-encoded).
const enc1 = (x) => (x.startsWith('%RAW') ? x.slice(4) : encodeURIComponent(x));
const encQ = (q) => q.map(([k, v]) => `${enc1(k)}=${enc1(v)}`).join('&');

// The gateway's own routes (no gRPC method behind them).
function gatewayTable(fx) {
  return {
    'GET /api/v1/whoami': { base: () => ({}) },
    'GET /api/v1/openapi.json': { base: () => ({}) },
    'GET /api/v1/keys': { base: () => ({ page_size: 10 }) },
    'POST /api/v1/keys': { base: () => ({ name: 'bi', role: 'ROLE_VIEWER' }), text: { name: 'name' },
      read: async (fx2, r) => (await api(fx.s, 'GET', `/api/v1/keys/${r.key.id}`, { key: fx.s.adminKey })).json, allow: /^gw_badinput_\d+\.api_keys$/ },
    // An id that is not one is a key that does not exist (ids are 12 hex digits).
    'GET /api/v1/keys/{id}': { base: () => ({ id: fx.adminKeyId }), codes: { id: { '*': S.NOT_FOUND } } },
    'DELETE /api/v1/keys/{id}': { base: () => ({ id: 'ffffffffffff' }), baseCode: S.NOT_FOUND, codes: { id: { '*': S.NOT_FOUND } } },
  };
}

function restRoutes(doc) {
  const out = [];
  for (const [pattern, ops] of Object.entries(doc.paths)) {
    for (const [m, op] of Object.entries(ops)) out.push({ method: m.toUpperCase(), pattern, op });
  }
  return out;
}

// The request type of a route: from the gRPC method its description names, or the gateway's own.
function routeSpec(fx, route) {
  const m = /gRPC: \/([\w.]+)\/(\w+)/.exec(route.op.description || '');
  const key = `${route.method} ${route.pattern}`;
  if (!m) {
    const own = gatewayTable(fx)[key];
    if (!own) return null;
    const types = { 'GET /api/v1/whoami': 'WhoAmIRequest', 'GET /api/v1/openapi.json': 'WhoAmIRequest', 'GET /api/v1/keys': 'ListApiKeysRequest',
      'POST /api/v1/keys': 'CreateApiKeyRequest', 'GET /api/v1/keys/{id}': 'GetApiKeyRequest', 'DELETE /api/v1/keys/{id}': 'RevokeApiKeyRequest' };
    return { ...own, type: W.pb.lookupType(`${GW}.${types[key]}`), own: true };
  }
  const [, service, method] = m;
  const spec = grpcTable(fx).find((x) => x.service === service && x.method === method);
  if (!spec) return null;
  const mm = W.pb.lookupService(service).methods[method];
  let type = W.pb.lookupType(mm.requestType);
  let base = spec.base, prefix = '';
  if (method === 'UploadArtifact') { // the query is the header, the body the content
    type = W.pb.lookupType('iot.ota.v1.ArtifactHeader');
    base = () => spec.base()[0].header;
    prefix = 'header.';
  }
  const r = spec.rest || {};
  const strip = (o) => Object.fromEntries(Object.entries(o || {}).filter(([k]) => k.startsWith(prefix)).map(([k, v]) => [k.slice(prefix.length), v]));
  return { ...spec, ...r, base, type, service, method, text: strip(spec.text), filter: (spec.filter || []).filter((k) => k.startsWith(prefix)).map((k) => k.slice(prefix.length)),
    out: (spec.out || []).filter((k) => k.startsWith(prefix)).map((k) => k.slice(prefix.length)), codes: { ...strip(spec.codes), ...strip(r.codes) },
    prep: Object.fromEntries(Object.entries(spec.prep || {}).filter(([k]) => k.startsWith(prefix)).map(([k, v]) => [k.slice(prefix.length), v])) };
}

async function restRoute(ctx, route) {
  const fx = ctx.fx;
  const spec = routeSpec(fx, route);
  const key = `${route.method} ${route.pattern}`;
  if (!spec) throw new Error(`${key}: no table entry`);
  const type = spec.type;
  const documented = new Set(Object.keys(route.op.responses).map(Number));
  const okStatus = [...documented].find((x) => x >= 200 && x < 300) || 200;
  const params = [...route.pattern.matchAll(/\{([^}]+)\}/g)].map((x) => x[1]);
  const queryNames = new Set((route.op.parameters || []).filter((x) => x.in === 'query').map((x) => x.name));
  const bodySchema = route.op.requestBody && route.op.requestBody.content['application/json'] && route.op.requestBody.content['application/json'].schema;
  const raw = route.op.requestBody && !bodySchema; // the upload: the body is the content
  let bodyField = null; // '*' or a field of the request
  if (bodySchema) {
    const ref = bodySchema.$ref.split('/').pop();
    bodyField = ref === type.fullName.slice(1) ? '*' : type.fieldsArray.find((f) => f.resolvedType && f.resolvedType.fullName.slice(1) === ref).name;
  }
  const deviceRoute = /Role: device/.test(route.op.description || '');
  const auth = deviceRoute ? (route.pattern.includes('telemetry') ? fx.tel.token : fx.dev.token) : ctx.adminKey;
  const sse = /Server-Sent Events/.test(route.op.summary || '');
  const binary = route.pattern.endsWith('/content');
  const preps = Object.entries(spec.prep || {}).sort((a, b) => a[0].length - b[0].length);

  // One request from a proto-named request object: path parameters from its fields, the body
  // field (or the rest) as JSON, the other fields as query parameters; then the case's change.
  const build = (obj, change = {}) => {
    const o = structuredClone(obj);
    let path = route.pattern;
    for (const p of params) { // a parameter names a request field ("id", "device.id")
      let v = p.split('.').reduce((x, k) => (x ? x[k] : undefined), o);
      if (change.param && change.param[0] === p) v = change.param[1];
      else v = encodeURIComponent(String(v === undefined ? '' : v));
      path = path.replace(`{${p}}`, v);
    }
    let body, q = [];
    if (bodyField === '*') {
      for (const p of params) if (!p.includes('.')) delete o[p];
      body = toJson(type, o);
    } else if (bodyField) {
      const f = type.fields[bodyField];
      body = toJson(f.resolvedType, o[bodyField] || {});
      const rest2 = { ...o };
      delete rest2[bodyField];
      for (const p of params) delete rest2[p];
      q = toQuery(type, rest2);
    } else {
      const rest2 = { ...o };
      for (const p of params) delete rest2[p.split('.')[0]];
      q = toQuery(type, rest2);
    }
    q = q.filter(([k]) => queryNames.has(k)); // the base's other fields are not the route's to take
    if (change.body) body = change.body(body);
    if (change.query) q = change.query(q);
    const qs = q.length ? `?${encQ(q)}` : '';
    let payload = body === undefined ? undefined : JSON.stringify(body);
    if (raw) payload = Buffer.from('firmware');
    if (change.raw !== undefined) payload = change.raw;
    return { path: path + qs, payload, req: body };
  };
  const send = async (b, extraHeaders = {}) => {
    const h = { Authorization: `Bearer ${auth}`, ...extraHeaders };
    if (b.payload !== undefined) h['Content-Type'] = raw ? 'application/octet-stream' : 'application/json';
    const ac = new AbortController();
    const res = await fetch(ctx.base + b.path, { method: route.method, headers: h, body: b.payload, signal: ac.signal, duplex: 'half' });
    let text = '';
    if (((sse || binary) && res.status === 200) || res.status === 206) ac.abort(); // a stream: the status is enough
    else text = await res.text();
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch (e) { json = undefined; }
    return { status: res.status, json, text, type: res.headers.get('content-type') };
  };
  const baseObj = () => structuredClone(spec.base(fx));
  const baseCode = spec.baseCode || S.OK;
  const cases = [];
  const add = (name, mk, expect, more = {}) => cases.push({ name, mk, expect, ...more });
  const bad = (re) => ({ codes: [S.INVALID_ARGUMENT], msg: re });

  // Bodies that are not JSON or not an object, and one over the limit.
  if (bodySchema) {
    for (const [n, t] of [['truncated', '{'], ['trailing_garbage', '{} x'], ['array', '[]'], ['string', '"x"'], ['number', '123'],
      ['duplicate_keys', '{"a":1,"a":2}'], ['bom', '\ufeff{}'], ['nul_escape', '{"x":"\\u0000"}'], ['nan', '{"x": NaN}'], ['overflow', '{"x": 1e999}'],
      ['deep', '['.repeat(5000) + ']'.repeat(5000)], ['invalid_utf8', Buffer.from('{"x":"\xff\xfe"}', 'latin1')]]) {
      add(`body_${n}`, () => build(baseObj(), { raw: t }), bad(/JSON|body/));
    }
    add('body_over_limit', () => build(baseObj(), { raw: `{"x":"${'y'.repeat((1 << 20) + 16)}"}` }), { http: 413, codes: [S.RESOURCE_EXHAUSTED] });
  }
  // Query parameters the request has no field for, or that no string may hold.
  add('query_unknown', () => build(baseObj(), { query: (q) => [...q, ['colour', 'red']] }), bad(/colour/));
  add('query_nul', () => build(baseObj(), { query: (q) => [...q, ['x', '%RAW%00']] }), bad(/NUL/));
  add('query_name_not_utf8', () => build(baseObj(), { query: (q) => [...q, ['%RAW%FF', '1']] }), bad(/\ufffd/));
  // Path parameters.
  for (const p of params) {
    const leaf = { path: p, kind: 'string' };
    const pe = (mut) => fieldExpect(spec, leaf, mut);
    add(`path_${p}=nul`, () => build(baseObj(), { param: [p, 'a%00b'] }), bad(/NUL/));
    add(`path_${p}=badutf8`, () => build(baseObj(), { param: [p, '%FF%FE'] }), bad(new RegExp(leafName(p))));
    add(`path_${p}=slash`, () => build(baseObj(), { param: [p, 'a%2Fb'] }), { codes: [S.NOT_FOUND], msg: /no such route/ });
    add(`path_${p}=huge`, () => build(baseObj(), { param: [p, LONG] }), pe('huge'));
    for (const mut of META) add(`path_${p}=${mut}`, () => build(baseObj(), { param: [p, encodeURIComponent(STR[mut])] }), pe(mut));
  }
  // Fields in the body (JSON) or the query.
  const bodyPrefix = bodyField === '*' ? '' : bodyField ? `${bodyField}.` : null;
  for (const leaf of leaves(type)) {
    const p = leaf.path;
    if (params.some((x) => p === x || p === x.split('.').slice(1).join('.'))) continue; // the path wins
    const inBody = bodyPrefix !== null && p.startsWith(bodyPrefix);
    const qname = jsonPath(p);
    if (!inBody && !queryNames.has(qname)) continue;
    const bp = inBody ? p.slice(bodyPrefix.length) : p; // the leaf's path within the body
    const btype = bodyField && bodyField !== '*' ? type.fields[bodyField].resolvedType : type;
    const prep = (extra = {}) => { const o = { ...baseObj(), ...extra }; for (const [k, fn] of preps) if (under(p, k)) fn(o); return o; };
    const set = (v) => (inBody
      ? (b) => setJson(btype, b, bp, leaf.map === 'key' ? { [v]: 'v' } : leaf.map === 'value' ? { k: v } : (leaf.field.repeated && !leaf.map ? [v] : v))
      : null);
    const setQ = (v) => (q) => [...q.filter(([k]) => k !== qname), [qname, v]];
    const change = (v, json) => (inBody ? { body: set(json !== undefined ? json : v) } : { query: setQ(v) });
    const names = new RegExp(`${camel(leafName(p))}|${leafName(p)}`); // the JSON or the proto name
    const wrongType = (name, v) => add(`${qname}=${name}`, () => build(prep(), inBody ? { body: set(v) } : { query: setQ(String(v)) }), bad(names));
    const viaGrpc = (mut, v, jsonV) => {
      if (isOut(spec, p)) return;
      add(`${qname}=${mut}`, (extra) => build(prep(extra), change(v, jsonV)), fieldExpect(spec, leaf, mut), { leaf, value: jsonV !== undefined ? jsonV : v });
    };
    if (leaf.kind === 'string') {
      if (inBody && !leaf.map) wrongType('number', 123);
      if (inBody && leaf.map) add(`${qname}=map_array`, () => build(prep(), { body: (b) => setJson(btype, b, bp, []) }), bad(names));
      if (!inBody) add(`${qname}=badutf8`, () => build(prep(), { query: setQ('%RAW%FF%FE') }), bad(names));
      viaGrpc('huge', inBody ? BIG : LONG);
      for (const mut of META) viaGrpc(mut, STR[mut]);
    } else if (['int32', 'int64', 'uint64'].includes(leaf.kind)) {
      wrongType('not_a_number', 'abc');
      wrongType('fraction', 1.5);
      if (leaf.kind === 'int32') wrongType('overflow', inBody ? 2 ** 31 : '2147483648');
      else wrongType('overflow', '18446744073709551616');
      if (leaf.kind !== 'uint64') viaGrpc('neg', '-1', leaf.kind === 'int32' ? -1 : '-1');
      else wrongType('negative', '-1');
    } else if (leaf.kind === 'double') {
      wrongType('not_a_number', 'abc');
      viaGrpc('nan', 'NaN', 'NaN');
      viaGrpc('ninf', '-Infinity', '-Infinity');
    } else if (leaf.kind === 'bool') {
      wrongType('not_a_bool', inBody ? 'yes' : 'maybe');
    } else if (leaf.kind === 'enum') {
      wrongType('unknown_name', 'NO_SUCH_VALUE');
      viaGrpc('unknown', '99', 99);
      viaGrpc('neg', '-1', -1);
    } else if (leaf.kind === 'Timestamp') {
      wrongType('not_a_time', 'yesterday');
      wrongType('year_10000', '10000-01-01T00:00:00Z');
    } else if (leaf.kind === 'Struct') {
      if (inBody) wrongType('not_an_object', 'x');
    } else if (leaf.kind === 'FieldMask') {
      if (inBody) wrongType('not_a_string', 7);
    }
  }

  const failures = [];
  const check = async (c, r) => {
    const e = c.expect;
    const wantCodes = e.same ? [baseCode] : e.codes || [S.OK];
    const wantHttp = e.http ? [e.http] : wantCodes.map((x) => (x === S.OK ? okStatus : HTTP_OF[x]));
    if (REPORT) console.log(`    ${key} ${c.name}: ${r.status} ${r.text.slice(0, 160)}`);
    if (!wantHttp.includes(r.status) && !(r.status === 206 && wantHttp.includes(200))) {
      failures.push(`${c.name}: got ${r.status} ${r.text.slice(0, 200)}, want ${wantHttp.join(' or ')}`);
      return false;
    }
    if (r.status >= 300) {
      const j = r.json;
      if (!j || typeof j !== 'object' || !Number.isInteger(j.code) || j.status !== NAME[j.code] || typeof j.message !== 'string' || !j.message ||
        !j.details || typeof j.details !== 'object' || Array.isArray(j.details)) {
        failures.push(`${c.name}: not the error shape {code, status, message, details}: ${r.text.slice(0, 200)}`);
      } else if (!wantCodes.includes(j.code)) {
        failures.push(`${c.name}: code ${NAME[j.code]}, want ${wantCodes.map((x) => NAME[x]).join(' or ')}`);
      } else if (e.msg && !e.msg.test(j.message)) {
        failures.push(`${c.name}: message "${j.message}" does not name ${e.msg}`);
      }
      if (!documented.has(r.status)) failures.push(`${c.name}: ${r.status} is not among the statuses ${key} documents (${[...documented].join(', ')})`);
    }
    return true;
  };
  const refused = cases.filter((c) => c.expect.codes || c.expect.http || (c.expect.same && baseCode !== S.OK));
  const accepted = cases.filter((c) => !refused.includes(c));
  let before = await ctx.snap.take();
  for (const c of refused) { ctx.count(`REST ${route.pattern.split('/')[3]}`, c); await check(c, await send(c.mk())); }
  let after = await ctx.snap.take();
  for (const d of diff(before, after)) failures.push(`refused cases changed state: ${d}`);
  before = after;
  const b0 = build(baseObj());
  const br = await send(b0);
  ctx.count(`REST ${route.pattern.split('/')[3]}`, { name: 'base' });
  await check({ name: 'the base request', expect: { codes: [baseCode] } }, br);
  for (const c of accepted) {
    const built = c.mk(c.expect.verbatim && spec.fresh ? spec.fresh(fx) : undefined);
    ctx.count(`REST ${route.pattern.split('/')[3]}`, c);
    const r = await send(built);
    if (!(await check(c, r))) continue;
    if (c.expect.verbatim && r.status < 300) {
      const back = spec.read ? await spec.read(fx, r.json, built.req) : r.json;
      const v = typeof c.expect.verbatim === 'string' ? { path: c.expect.verbatim, fmt: (x) => x } : c.expect.verbatim;
      let got = getPath(back, spec.read ? v.path : jsonPath(v.path)); // the answer itself is JSON: lowerCamel names
      if (c.leaf.map === 'key') got = got && Object.keys(got).find((k) => k === c.value);
      if (c.leaf.map === 'value') got = got && got.k;
      const want = c.leaf.map === 'key' ? c.value : spec.restFmt ? spec.restFmt(v.fmt(c.value), fx) : v.fmt(c.value);
      if (got !== want) failures.push(`${c.name}: stored ${JSON.stringify(got)}, sent ${JSON.stringify(c.value)}`);
    }
  }
  if (spec.allow) await ctx.settle();
  after = await ctx.snap.take();
  for (const d of diff(before, after, (n) => (spec.allow && spec.allow.test(n)) || READ_CACHES.test(n))) {
    failures.push(`the base request and accepted cases changed more than their own tables: ${d}`);
  }
  if (failures.length) throw new Error(`${failures.length} of ${cases.length} cases failed:\n      ${failures.join('\n      ')}`);
}

// What the HTTP layer refuses before any route sees the request: a request line or headers over
// libmicrohttpd's buffer (documented in the gateway README), an unknown route with metacharacters.
async function restLimits(s) {
  const failures = [];
  const before = await s.snap.take();
  const get = async (path, headers = {}) => {
    const res = await fetch(s.base + path, { headers: { Authorization: `Bearer ${s.adminKey}`, ...headers } });
    return { status: res.status, text: await res.text() };
  };
  let r = await get(`/api/v1/devices/${'x'.repeat(40000)}`);
  if (r.status !== 414) failures.push(`a 40 KB path: ${r.status}, want 414`);
  r = await get('/api/v1/devices', { 'X-Filler': 'y'.repeat(40000) });
  if (r.status !== 431) failures.push(`a 40 KB header: ${r.status}, want 431`);
  for (const path of [`/api/v1/${encodeURIComponent(SQL)}`, '/api/v1/%25', '/api/v1/devices/a/b/c/d', '/api/v1/%00', '/api/v1/%FF']) {
    r = await get(path);
    let j = null;
    try { j = JSON.parse(r.text); } catch (e) { /* below */ }
    const want = path === '/api/v1/%00' ? 400 : 404;
    if (r.status !== want || !j || j.code !== (want === 400 ? S.INVALID_ARGUMENT : S.NOT_FOUND)) failures.push(`${path}: ${r.status} ${r.text.slice(0, 120)}, want ${want} with the error shape`);
  }
  const after = await s.snap.take();
  for (const d of diff(before, after)) failures.push(`changed state: ${d}`);
  s.count('REST limits', {}); 
  if (failures.length) throw new Error(failures.join('\n      '));
}

// ---- fixtures ---------------------------------------------------------------------------------

async function setup() {
  const s = await startSuite('badinput', {
    full: true,
    // Background writers that follow requests (presence reports, processing's checkpoints) run
    // often, so that the state settles quickly after the cases that are accepted. Processing
    // rewrites every checkpoint when it reloads its rules, also on its selector refresh (30 s),
    // which no request causes: once an hour here.
    ingestEnv: { IOT_INGEST_PRESENCE_INTERVAL: '100ms' },
    procEnv: { IOT_PROC_FLUSH_INTERVAL: '50ms', IOT_PROC_CHECKPOINT_INTERVAL: '100ms', IOT_PROC_STATS_INTERVAL: '50ms',
      IOT_PROC_SELECTOR_REFRESH: '1h' },
  });
  const id = `badinput_${process.pid}`;
  s.targets = { dm: `127.0.0.1:${s.dm.grpc}`, ingest: `127.0.0.1:${s.ingest.grpc}`, proc: `127.0.0.1:${s.proc.grpc}`, ota: `127.0.0.1:${s.ota.grpc}`, registry: `127.0.0.1:${s.registry.grpc}` };
  s.snap = snapshotter({
    dsn: process.env.IOT_TEST_PG,
    schemas: [`gw_dm_${id}`, `gw_ing_${id}`, `gw_proc_${id}`, `gw_ota_${id}`, `gw_${id}`],
    redis: process.env.IOT_TEST_REDIS,
    prefixes: [`{gw-${id}}:`, `gw-${id}:`, `{gwreg-${id}}:`], // this suite's keys (other tests' may expire meanwhile)
    // Rewritten by heartbeats, lease renewals and health checks all the time.
    skipFields: ['exp', 'last_check', 'chk_ok', 'chk_fail'],
    // Processing's published counters (evaluations, CPU time, window memory per rule), rewritten
    // by its lease thread: statistics, not state a request writes.
    skipKeys: [':proc:stats:'],
  });
  const counts = {};
  s.counts = counts;
  s.count = (what) => { counts[what] = (counts[what] || 0) + 1; };
  // Waits for the background work accepted requests set off (device-mgmt's event relay, every
  // 500 ms; ingest's presence reports; processing's flushes and checkpoints, set to run often):
  // until device-mgmt's event outbox is empty and nothing changed for quiet ms.
  const outbox = `gw_dm_${id}.events`;
  s.settle = async (quiet = 300) => {
    let a = await s.snap.take(), since = Date.now();
    for (const end = Date.now() + 15000; Date.now() < end;) {
      await sleep(100);
      const b = await s.snap.take();
      if (diff(a, b).length) { a = b; since = Date.now(); } else if (Date.now() - since >= quiet && !rowCount(b, outbox)) return;
    }
    throw new Error('the state did not settle within 15 s');
  };
  s.healthy = async (svc) => {
    const r = await W.callMsg(s.targets[svc], 'grpc.health.v1.Health', 'Check', { service: '' }).catch((e) => ({ code: -1, details: e.message }));
    return r.code === S.OK && r.resp.status === 'SERVING' ? null : `${svc} is not healthy afterwards: ${describe(r)} ${JSON.stringify(r.resp)}`;
  };
  const fx = {};
  s.fx = fx;
  let seq = 1000;
  fx.seq = () => ++seq;
  fx.call = async (svc, service, method, obj, opts) => {
    const r = await W.callMsg(s.targets[svc], service, method, obj, opts);
    if (r.code !== S.OK) throw new Error(`${method}: ${describe(r)}`);
    return r.resp || r.msgs[0];
  };
  fx.dmGet = (id2) => fx.call('dm', DM, 'GetDevice', { id: id2 });
  const A = s.adminKey;
  const device = async (name, extra = {}) => {
    ok(await api(s, 'POST', '/api/v1/devices', { key: A, body: { id: name, name, type: 'sensor', model: 'M-1', firmwareVersion: '1.0.0', ...extra } }), 201, `device ${name}`);
    const t = ok(await api(s, 'POST', `/api/v1/devices/${name}/tokens`, { key: A, body: {} }), 201, `token of ${name}`);
    return { id: name, token: t.token, tokenId: t.tokenId };
  };
  fx.dev = await device('bi-dev');
  fx.upd = await device('bi-upd');
  fx.victim = await device('bi-victim');
  fx.seen = await device('bi-seen');
  fx.cmd = await device('bi-cmd');
  fx.tel = await device('bi-tel');
  fx.group = 'bi-group';
  ok(await api(s, 'POST', '/api/v1/groups', { key: A, body: { id: fx.group, kind: 'GROUP_KIND_STATIC' } }), 201, 'group');
  fx.dynGroup = 'bi-dyn-group';
  ok(await api(s, 'POST', '/api/v1/groups', { key: A, body: { id: fx.dynGroup, kind: 'GROUP_KIND_DYNAMIC', filter: { type: 'sensor' } } }), 201, 'group');
  fx.csr = require('child_process').execFileSync('openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
    '-nodes', '-keyout', '/dev/null', '-subj', '/CN=bi'], { stdio: ['ignore', 'pipe', 'ignore'] }).toString();
  fx.latestPoint = async (seq) => {
    const r = await fx.call('ingest', ING, 'QueryTelemetry', { device_id: fx.tel.id, metric: 'temp', from_ms: String(Date.now() - 3600000), to_ms: String(Date.now() + 3600000), page_size: 10000 });
    return { points: (r.points || []).filter((x) => x.seq === String(seq)) };
  };
  ok(await api(s, 'POST', `/api/v1/groups/${fx.group}/members:add`, { key: A, body: { deviceIds: [fx.dev.id] } }), 200, 'member');
  fx.command = ok(await api(s, 'POST', `/api/v1/devices/${fx.cmd.id}/commands`, { key: A, body: { name: 'reboot' } }), 201, 'command').id;
  // A rule that fires above 100 on bi-tel's temp; alternating points make alerts to acknowledge.
  fx.rule = 'bi-rule';
  fx.updRule = 'bi-rule-upd';
  const rule = { name: 'hot', enabled: true, metric: 'temp', devices: { deviceIds: [fx.tel.id] }, threshold: { op: 'COMPARISON_GT', threshold: 100 } };
  const r1 = ok(await api(s, 'POST', '/api/v1/rules', { key: A, body: { id: fx.rule, ...rule } }), 201, 'rule');
  ok(await api(s, 'POST', '/api/v1/rules', { key: A, body: { id: fx.updRule, ...rule, enabled: false } }), 201, 'rule');
  for (;;) { // processing runs the rule
    const text = await (await fetch(`http://127.0.0.1:${s.proc.admin}/metrics`)).text();
    const m = /\nprocessing_rules_version (\d+)/.exec(text);
    if (m && BigInt(m[1]) >= BigInt(r1.etag)) break;
    await sleep(50);
  }
  const t0 = Date.now() - 60000;
  const points = [];
  for (let i = 0; i < 24; i++) points.push({ seq: String(i + 1), metric: 'temp', timeMs: String(t0 + i * 1000), doubleValue: i % 2 ? 50 : 150 });
  ok(await api(s, 'POST', '/api/v1/telemetry', { headers: { Authorization: `Bearer ${fx.tel.token}` }, body: { points } }), 200, 'push');
  for (let i = 0; ; i++) {
    const l = ok(await api(s, 'GET', `/api/v1/alerts?ruleId=${fx.rule}&pageSize=100`, { key: A }), 200);
    if ((l.alerts || []).length >= 12) { fx.alerts = l.alerts.map((a) => a.id); break; }
    assert(i < 200, 'alerts did not fire');
    await sleep(50);
  }
  // An artifact, a draft rollout, a cancelled one and drafts to cancel.
  fx.artifact = ok(await api(s, 'POST', '/api/v1/artifacts?name=bi-fw&version=0.0.1&models=M-1', { key: A, raw: Buffer.from('firmware'), type: 'application/octet-stream' }), 201, 'artifact').id;
  const rollout = async () => ok(await api(s, 'POST', '/api/v1/rollouts', { key: A, body: { name: 'bi', artifactId: fx.artifact, target: { model: 'M-1' }, stages: [{ percent: 100 }] } }), 201, 'rollout').id;
  fx.rollout = await rollout();
  fx.cancelled = await rollout();
  ok(await api(s, 'POST', `/api/v1/rollouts/${fx.cancelled}:cancel`, { key: A, body: { reason: 'bi' } }), 200, 'cancel');
  fx.drafts = [];
  for (let i = 0; i < 8; i++) fx.drafts.push(await rollout()); // gRPC and REST cancel four each
  fx.s = s;
  fx.adminKeyId = ok(await api(s, 'GET', '/api/v1/whoami', { key: A }), 200, 'whoami').id;
  s.openapi = ok(await api(s, 'GET', '/api/v1/openapi.json'), 200, 'openapi');
  tests.push(...restTests(s.openapi), ['rest limits of the HTTP layer', restLimits]);
  await s.settle();
  return s;
}

async function teardown(s) {
  const bad = [];
  for (const svc of Object.keys(s.targets)) { const h = await s.healthy(svc); if (h) bad.push(h); }
  for (const p of s.procs) {
    const r = await fetch(`http://127.0.0.1:${p.admin}/readyz`).catch((e) => ({ status: e.message }));
    if (r.status !== 200) bad.push(`${p.name} /readyz: ${r.status}`);
  }
  console.log(`# cases: ${Object.entries(s.counts).map(([k, v]) => `${k} ${v}`).join(', ')}`);
  s.snap.close();
  W.closeClients();
  await stopSuite(s);
  if (bad.length) throw new Error(bad.join('\n'));
}

const tests = [];
const specs = grpcTable({});
for (const spec of specs) tests.push([`grpc ${spec.service.split('.').pop()}.${spec.method}`, (s) => grpcMethod(s, grpcTable(s.fx).find((x) => x.method === spec.method && x.service === spec.service))]);
// The REST routes come from the OpenAPI document the gateway serves (read in setup).
const restTests = (doc) => restRoutes(doc).map((route) => [`rest ${route.method} ${route.pattern}`, (s) => restRoute(s, route)]);

run('badinput', tests, setup, teardown);
