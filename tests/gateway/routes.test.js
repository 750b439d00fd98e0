// The REST gateway in front of the whole suite (device-mgmt, registry, ingest, processing, ota):
// the Server-Sent Event streams, artifacts up and down, and the OpenAPI document against the
// routes. The other route families are in families.test.js.
'use strict';

const crypto = require('crypto');
const { startSuite, stopSuite, run, assert, eq, api, isError, ok } = require('./suite');

// An SSE reader over fetch: events as {id, event, data} pushed to .events; next(pred, ms) waits.
async function sse(s, path, key, headers = {}) {
  const ctl = new AbortController();
  const res = await fetch(s.base + path, { headers: { Authorization: `Bearer ${key}`, ...headers }, signal: ctl.signal });
  const st = { status: res.status, headers: res.headers, events: [], waiters: [], closed: false, ctl };
  if (res.status !== 200) { st.body = await res.text(); return st; }
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  (async () => {
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const ev = { event: 'message', data: '', at: Date.now() };
          let data = [];
          for (const line of block.split('\n')) {
            if (line.startsWith(':')) continue;
            const c = line.indexOf(':');
            const f = c < 0 ? line : line.slice(0, c), v = c < 0 ? '' : line.slice(c + 1).replace(/^ /, '');
            if (f === 'id') ev.id = v; else if (f === 'event') ev.event = v; else if (f === 'data') data.push(v); else if (f === 'retry') ev.retry = v;
          }
          if (!data.length) continue;
          ev.data = JSON.parse(data.join('\n'));
          st.events.push(ev);
          st.waiters = st.waiters.filter((w) => !w());
        }
      }
    } catch (e) { /* aborted */ }
    st.closed = true;
    st.waiters = st.waiters.filter((w) => !w());
  })();
  st.next = (pred, ms = 5000) => new Promise((resolve, reject) => {
    const check = () => {
      const e = st.events.find(pred);
      if (e) { clearTimeout(t); resolve(e); return true; }
      if (st.closed) { clearTimeout(t); reject(new Error(`stream closed; events: ${JSON.stringify(st.events)}`)); return true; }
      return false;
    };
    const t = setTimeout(() => reject(new Error(`no matching event within ${ms} ms; events: ${JSON.stringify(st.events)}`)), ms);
    if (!check()) st.waiters.push(check);
  });
  st.close = () => ctl.abort();
  return st;
}

// A device with a token, for pushing telemetry as the device.
async function device(s, id, extra = {}) {
  ok(await api(s, 'POST', '/api/v1/devices', { key: s.adminKey, body: { id, name: id, type: 'sensor', model: 'S-1', ...extra } }), 201, 'create device');
  const t = ok(await api(s, 'POST', `/api/v1/devices/${id}/tokens`, { key: s.adminKey, body: {} }), 201, 'token');
  return { id, token: t.token, seq: 0 };
}

async function push(s, dev, metric, values, t0 = Date.now()) {
  const points = values.map((v, i) => ({ seq: String(++dev.seq), metric, timeMs: String(t0 + i), doubleValue: v }));
  return ok(await api(s, 'POST', '/api/v1/telemetry', { headers: { Authorization: `Bearer ${dev.token}` }, body: { points } }), 200, 'push');
}

const tests = [
  ['keys_per_role', async (s) => {
    for (const role of ['ROLE_VIEWER', 'ROLE_OPERATOR']) {
      const r = ok(await api(s, 'POST', '/api/v1/keys', { key: s.adminKey, body: { name: role, role } }), 201, role);
      s[role] = r.secret;
    }
    s.viewer = s.ROLE_VIEWER;
    s.operator = s.ROLE_OPERATOR;
  }],
  ['alerts_stream_live_and_resumed', async (s) => {
    const dev = await device(s, 'sse-dev-1');
    const rule = ok(await api(s, 'POST', '/api/v1/rules', {
      key: s.operator,
      body: { name: 'sse hot', enabled: true, metric: 'temp', devices: { deviceIds: [dev.id] },
        threshold: { op: 'COMPARISON_GT', threshold: 30 }, severity: 'SEVERITY_HIGH' } }), 201, 'rule');
    // Only a key may watch; a viewer may.
    eq((await sse(s, '/api/v1/alerts/stream', 'iotk_000000000000_' + '0'.repeat(64))).status, 401, 'bad key');
    const st = await sse(s, '/api/v1/alerts/stream', s.viewer);
    eq(st.status, 200, `stream: ${st.body}`);
    assert(/text\/event-stream/.test(st.headers.get('content-type')), 'content type');
    await new Promise((r) => setTimeout(r, 300)); /* the watch is set up */
    await push(s, dev, 'temp', [20, 35]);
    const fired = await st.next((e) => e.event === 'alert' && e.data.ruleId === rule.id && e.data.state === 'ALERT_STATE_FIRING');
    const lag = fired.at - Date.parse(fired.data.firedTime);
    console.log(`# alert on the stream ${lag} ms after it fired`);
    assert(lag < 1000, `alert arrived ${lag} ms after firing (want < 1 s)`);
    eq(fired.id, fired.data.eventId, 'SSE id is the event id');
    eq(fired.data.deviceId, dev.id, 'device');
    // Leave, let things change, come back with Last-Event-ID: every change in order, none twice.
    st.close();
    const last = fired.id;
    ok(await api(s, 'POST', `/api/v1/alerts/${fired.data.id}:ack`, { key: s.operator, body: { by: 'alice' } }), 200, 'ack');
    await push(s, dev, 'temp', [10]); /* resolves */
    const resolvedSeen = async () => {
      for (let i = 0; i < 50; i++) {
        const a = ok(await api(s, 'GET', `/api/v1/alerts/${fired.data.id}`, { key: s.viewer }), 200);
        if (a.state === 'ALERT_STATE_RESOLVED') return a;
        await new Promise((r) => setTimeout(r, 100));
      }
      throw new Error('alert never resolved');
    };
    const resolved = await resolvedSeen();
    assert(resolved.acknowledged && resolved.acknowledgedBy.startsWith('alice (api-key:'), `ack recorded with the key: ${resolved.acknowledgedBy}`);
    const again = await sse(s, '/api/v1/alerts/stream', s.viewer, { 'Last-Event-ID': last });
    eq(again.status, 200, 'reconnect');
    const res = await again.next((e) => e.event === 'alert' && e.data.state === 'ALERT_STATE_RESOLVED');
    const mine = again.events.filter((e) => e.event === 'alert' && e.data.id === fired.data.id);
    const replay = `replayed after ${last}: ${JSON.stringify(mine.map((e) => [e.id, e.data.state, e.data.acknowledged]))}`;
    assert(mine.every((e) => BigInt(e.id) > BigInt(last)), `nothing at or before Last-Event-ID; ${replay}`);
    const ids = mine.map((e) => BigInt(e.id));
    assert(ids.every((v, i) => i === 0 || v > ids[i - 1]), `in order, no repeats; ${replay}`);
    assert(mine.every((e) => e.data.acknowledged), `the ack is in every change after it; ${replay}`);
    // Every change processing recorded after the resume point came back: the event ids are dense.
    eq(ids.map(String), Array.from({ length: Number(ids[ids.length - 1] - BigInt(last)) }, (_, i) => String(BigInt(last) + BigInt(i + 1))),
      `no change missed; ${replay}`);
    eq(res.data.id, fired.data.id, 'resolved');
    again.close();
    // Backend rules for the query: an unknown severity is a 400 before any stream.
    const bad = await sse(s, '/api/v1/alerts/stream?minSeverity=SEVERITY_NUCLEAR', s.viewer);
    eq(bad.status, 400, bad.body);
    s.alertDev = dev;
  }],
  ['telemetry_stream_live', async (s) => {
    const dev = await device(s, 'sse-tel-1');
    const other = await device(s, 'sse-tel-2');
    await push(s, dev, 'temp', [1]); /* before the stream: never sent on it */
    eq((await sse(s, `/api/v1/devices/${dev.id}/telemetry/stream`, 'iotk_000000000000_' + '0'.repeat(64))).status, 401, 'bad key');
    let bad = await sse(s, '/api/v1/devices/no-such-device/telemetry/stream', s.viewer);
    eq(bad.status, 404, `unknown device: ${bad.body}`);
    assert(JSON.parse(bad.body).message.includes('no-such-device'), `404 names the device: ${bad.body}`);
    bad = await sse(s, `/api/v1/devices/${dev.id}/telemetry/stream?metrics=no%20spaces`, s.viewer);
    eq(bad.status, 400, `bad metric: ${bad.body}`);
    assert(JSON.parse(bad.body).message.includes('metrics[0]'), `400 names the field: ${bad.body}`);
    const all = await sse(s, `/api/v1/devices/${dev.id}/telemetry/stream`, s.viewer);
    const humOnly = await sse(s, `/api/v1/devices/${dev.id}/telemetry/stream?metrics=hum`, s.viewer);
    eq(all.status, 200, `stream: ${all.body}`);
    eq(humOnly.status, 200, `stream: ${humOnly.body}`);
    assert(/text\/event-stream/.test(all.headers.get('content-type')), 'content type');
    await new Promise((r) => setTimeout(r, 200)); /* both watches are set up */
    const t0 = Date.now();
    await push(s, other, 'temp', [99]); /* another device: on neither stream */
    await push(s, dev, 'temp', [21.5, 22]);
    await push(s, dev, 'hum', [40]);
    const seen = [];
    await all.next((e) => { if (e.event === 'points') e.data.points.forEach((p) => seen.includes(p.seq) || seen.push(p.seq)); return seen.length >= 3; });
    const lag = all.events.find((e) => e.event === 'points').at - t0;
    console.log(`# first live batch ${lag} ms after the push`);
    assert(lag < 1000, `live within a second (${lag} ms)`);
    for (const e of all.events) {
      eq(e.event, 'points', 'event name');
      eq(e.data.deviceId, dev.id, 'only this device');
      assert(/^\d+$/.test(e.data.ingestedMs), `int64 as a string: ${JSON.stringify(e.data)}`);
    }
    const pts = all.events.flatMap((e) => e.data.points);
    eq(pts.map((p) => [p.seq, p.metric, p.doubleValue]), [['2', 'temp', 21.5], ['3', 'temp', 22], ['4', 'hum', 40]], 'the points, after the stream opened, in order');
    await humOnly.next((e) => e.event === 'points');
    await new Promise((r) => setTimeout(r, 100));
    eq(humOnly.events.flatMap((e) => e.data.points).map((p) => [p.seq, p.metric]), [['4', 'hum']], 'metrics filter');
    all.close();
    humOnly.close();
  }],
  ['artifacts_upload_and_download', async (s) => {
    const content = crypto.randomBytes(5 * 1024 * 1024 + 123);
    const sha = crypto.createHash('sha256').update(content).digest('hex');
    const q = `name=fw-gw&version=1.2.0&models=S-1&models=S-2&releaseNotes=${encodeURIComponent('fixes & more')}&sha256=${sha}`;
    const up = (key, query, body) => api(s, 'POST', `/api/v1/artifacts?${query}`, { key, raw: body, type: 'application/octet-stream' });
    isError(await up(s.operator, q, content), 403, 7, 'admin');
    const a = ok(await up(s.adminKey, q, content), 201, 'upload');
    eq(a.sha256, sha, 'sha256 computed by ota');
    eq(a.size, String(content.length), 'size (int64 as a string)');
    eq(a.models, ['S-1', 'S-2'], 'repeated query parameter');
    eq(a.releaseNotes, 'fixes & more', 'release notes');
    // A declared digest that does not match: 422, nothing stored.
    const bad = await up(s.adminKey, `name=fw-bad&version=1.0.0&models=S-1&sha256=${'0'.repeat(64)}`, content.subarray(0, 300000));
    isError(bad, 422, 15);
    const list = ok(await api(s, 'GET', '/api/v1/artifacts?name=fw-bad', { key: s.viewer }), 200);
    eq(list.artifacts || [], [], 'nothing stored after DATA_LOSS');
    isError(await up(s.adminKey, 'name=fw-x&version=banana&models=S-1', Buffer.from('abc')), 400, 3, 'version');
    isError(await up(s.adminKey, 'colour=red', Buffer.from('abc')), 400, 3, 'colour');
    // Over the gateway's limit (IOT_GW_MAX_UPLOAD = 8 MiB here): 413, declared or streamed.
    isError(await up(s.adminKey, 'name=fw-big&version=1.0.0&models=S-1', crypto.randomBytes(9 * 1024 * 1024)), 413, 8, 'IOT_GW_MAX_UPLOAD');
    const streamed = new ReadableStream({
      start(c) { for (let i = 0; i < 10; i++) c.enqueue(new Uint8Array(1024 * 1024)); c.close(); },
    });
    const r = await fetch(s.base + '/api/v1/artifacts?name=fw-big&version=1.0.1&models=S-1', {
      method: 'POST', headers: { Authorization: `Bearer ${s.adminKey}` }, body: streamed, duplex: 'half' }).catch((e) => ({ status: 'reset', e }));
    assert(r.status === 413 || r.status === 'reset', `chunked over the limit: ${r.status}`);
    // Download as a device: whole, then resumed from an offset.
    const dev = await device(s, 'fw-dev-1');
    const dl = (headers, id = a.id) => fetch(`${s.base}/api/v1/artifacts/${id}/content`, { headers: { Authorization: `Bearer ${dev.token}`, ...headers } });
    let res = await dl({});
    eq(res.status, 200, 'download');
    let body = Buffer.from(await res.arrayBuffer());
    eq(crypto.createHash('sha256').update(body).digest('hex'), sha, 'downloaded bytes');
    eq(res.headers.get('x-artifact-sha256'), sha, 'sha header');
    const keys = ok(await api(s, 'GET', '/api/v1/signing-keys', { key: s.viewer }), 200).keys;
    const pem = keys.find((k) => k.keyId === res.headers.get('x-artifact-key-id')).publicKeyPem;
    const manifest = Buffer.from(res.headers.get('x-artifact-manifest'), 'base64');
    assert(crypto.verify(null, manifest, pem, Buffer.from(res.headers.get('x-artifact-signature'), 'base64')), 'Ed25519 signature verifies');
    res = await dl({ Range: 'bytes=3000000-' });
    eq(res.status, 206, 'resume');
    eq(res.headers.get('content-range'), `bytes 3000000-${content.length - 1}/${content.length}`, 'content range');
    body = Buffer.from(await res.arrayBuffer());
    assert(body.equals(content.subarray(3000000)), 'the tail from the offset');
    eq((await dl({ Range: 'bytes=0-10' })).status, 400, 'only open ranges');
    eq((await dl({}, '999999')).status, 404, 'unknown artifact');
    const nokey = await fetch(`${s.base}/api/v1/artifacts/${a.id}/content`);
    eq(nokey.status, 401, 'no token');
    const badtok = await fetch(`${s.base}/api/v1/artifacts/${a.id}/content`, { headers: { Authorization: 'Bearer nope' } });
    eq(badtok.status, 401, 'bad token');
    s.artifact = a;
  }],
  ['openapi_matches_the_routes_served', async (s) => {
    const r = await fetch(s.base + '/api/v1/openapi.json'); /* no key: it describes, it holds nothing */
    eq(r.status, 200, 'openapi.json');
    const doc = await r.json();
    eq(doc.openapi, '3.0.3', 'version');
    // Every $ref resolves.
    const refs = JSON.stringify(doc).match(/"\$ref":"[^"]+"/g) || [];
    for (const ref of new Set(refs)) {
      const name = ref.slice(8, -1).replace('#/components/schemas/', '');
      assert(doc.components.schemas[name], `dangling ${ref}`);
    }
    // Every documented operation is served: no "no such route" 404 and no 405.
    let n = 0;
    for (const [p, item] of Object.entries(doc.paths)) {
      for (const [method, op] of Object.entries(item)) {
        const url = p.replace(/\{[^}]+\}/g, 'zz-nothing');
        const ctl = new AbortController();
        const headers = { Authorization: `Bearer ${op.security.length && op.security[0].deviceToken ? 'not-a-token' : s.adminKey}` };
        const body = ['post', 'patch'].includes(method) ? '{}' : undefined;
        const res = await fetch(s.base + url, { method: method.toUpperCase(), headers, body, signal: ctl.signal });
        const type = res.headers.get('content-type') || '';
        let text = '';
        if (!type.includes('event-stream') && !type.includes('octet-stream')) text = await res.text();
        ctl.abort();
        assert(res.status !== 405 && !(res.status === 404 && text.includes('no such route')), `${method} ${p}: ${res.status} ${text}`);
        n++;
      }
    }
    console.log(`# ${n} documented operations, each served`);
    assert(n >= 60, `only ${n} operations`);
    const none = await api(s, 'GET', '/api/v1/not-documented', { key: s.adminKey });
    isError(none, 404, 5, 'no such route');
    // Answers of the real backends fit the documented schemas (no undocumented fields, right types).
    const check = (v, schema, where) => {
      if (schema.$ref) return check(v, doc.components.schemas[schema.$ref.split('/').pop()], where);
      if (schema.enum) { assert(schema.enum.includes(v), `${where}: ${v} not in enum`); return; }
      switch (schema.type) {
        case 'object':
          assert(v && typeof v === 'object' && !Array.isArray(v), `${where}: not an object`);
          for (const [k, x] of Object.entries(v)) {
            const ps = schema.properties && schema.properties[k];
            if (ps) check(x, ps, `${where}.${k}`);
            else assert(schema.additionalProperties, `${where}.${k}: not documented`);
            if (!ps && typeof schema.additionalProperties === 'object') check(x, schema.additionalProperties, `${where}.${k}`);
          }
          return;
        case 'array': assert(Array.isArray(v), `${where}: not an array`); v.forEach((x, i) => check(x, schema.items, `${where}[${i}]`)); return;
        case 'string': assert(typeof v === 'string', `${where}: not a string`); if (schema.format === 'int64') assert(/^-?\d+$/.test(v), `${where}: int64`); return;
        case 'integer': assert(Number.isInteger(v), `${where}: not an integer`); return;
        case 'number': assert(typeof v === 'number' || ['NaN', 'Infinity', '-Infinity'].includes(v), `${where}: not a number`); return;
        case 'boolean': assert(typeof v === 'boolean', `${where}: not a boolean`); return;
        default: return;
      }
    };
    const fits = async (path, method = 'get') => {
      const got = ok(await api(s, method.toUpperCase(), path, { key: s.adminKey }), 200, path);
      const route = Object.keys(doc.paths).find((p) => doc.paths[p][method] && new RegExp('^' + p.replace(/\{[^}]+\}/g, '[^/:]+') + '$').test(path.split('?')[0]));
      check(got, doc.paths[route][method].responses['200'].content['application/json'].schema, path);
    };
    await fits('/api/v1/devices');
    await fits(`/api/v1/devices/${s.alertDev.id}`);
    await fits('/api/v1/rules');
    await fits('/api/v1/alerts');
    await fits('/api/v1/artifacts');
    await fits(`/api/v1/artifacts/${s.artifact.id}`);
    await fits('/api/v1/signing-keys');
    await fits('/api/v1/services');
    await fits('/api/v1/keys');
  }],
];

run('gateway_routes', tests, () => startSuite('routes', { full: true, gatewayEnv: { IOT_GW_MAX_UPLOAD: String(8 * 1024 * 1024) } }), stopSuite);
