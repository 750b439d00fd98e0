// Fault tests: the whole suite under load while, in turn, each service is killed with SIGKILL and
// started again (ingest, processing, device-mgmt, ota, registry, gateway), then Postgres and then
// Redis restart. Devices push telemetry the whole time (resending what was not acknowledged, as a
// device SDK does) and a dashboard polls the REST API. After recovery:
// - every acknowledged point is stored exactly once (and, after a final flush, every point sent);
// - processing has exactly one alert per episode the stored data contains, none twice, none missed;
// - a rollout in progress is in the state it was in, and carries on from there;
// - clients only ever saw retryable codes (UNAVAILABLE, RESOURCE_EXHAUSTED, or DEADLINE_EXCEEDED at
//   their deadline) and no call outlived its deadline;
// - every service is passing in the registry again.
'use strict';

const path = require('path');
const fs = require('fs');
const os = require('os');
const net = require('net');
const crypto = require('crypto');
const { spawn, spawnSync } = require('child_process');
const {
  startAll, startOne, stopAll, kill9, client, bearer, call, pool, until, api, ok, eq, assert, run, root,
} = require('./lib');

const NDEV = 30;
const devId = (i) => `flt-dev-${String(i).padStart(2, '0')}`;
const DEADLINE = 2000;       // per telemetry call
const REST_TIMEOUT = 3000;   // per REST call
const hot = (seq) => seq % 10 === 5;                   // one hot point in ten: one alert episode each
const valueOf = (seq) => (hot(seq) ? 150 : 20 + (seq % 7) * 0.1);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const tmp = fs.mkdtempSync(path.join(process.env.IOT_TEST_TMP || os.tmpdir(), 'faults-'));

// Redis of its own, with an append-only file: a restart keeps the streams and consumer groups, as
// the bundled StatefulSet of the chart does.
async function startRedis(r) {
  r.proc = spawn('redis-server', ['--port', String(r.port), '--bind', '127.0.0.1', '--dir', r.dir, '--save', '',
    '--appendonly', 'yes', '--appendfsync', 'always', '--logfile', path.join(r.dir, 'redis.log')], { stdio: 'ignore' });
  await until('redis to answer', () => new Promise((resolve) => {
    const c = net.connect(r.port, '127.0.0.1', () => c.write('PING\r\n'));
    c.on('data', (d) => { c.destroy(); resolve(d.toString().startsWith('+PONG')); });
    c.on('error', () => resolve(false));
  }), 10000, 50);
}
function stopRedis(r) {
  return new Promise((resolve) => { r.proc.on('exit', resolve); r.proc.kill('SIGTERM'); });
}

function psql(sql) {
  const r = spawnSync('psql', [process.env.IOT_TEST_PG, '-X', '-tA', '-F', ' ', '-c', sql], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`psql: ${r.stderr}`);
  return r.stdout.trim().split('\n').filter((l) => l).map((l) => l.split(' '));
}
function pgCtl(what) {
  const r = spawnSync('sh', [path.join(root, 'tests', 'support', 'pg_stop_start.sh'), what], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`pg ${what}: ${r.stderr}`);
}

// One device: pushes a point every 50 ms, resending everything not yet acknowledged.
function startDevice(s, i) {
  const d = { id: devId(i), token: s.tokens[i], next: 1, pending: [], acked: 0, calls: 0, lastOk: 0 };
  const c = s.ingest;
  d.loop = (async () => {
    while (!s.stopLoad || d.pending.length) {
      if (!s.stopLoad) {
        d.pending.push({ seq: String(d.next), metric: 'temp', time_ms: String(Date.now()), double_value: valueOf(d.next) });
        d.next++;
      }
      const batch = d.pending.slice(0, 500);
      const t0 = Date.now();
      try {
        const ack = await call(c, 'PushTelemetry', { points: batch }, bearer(d.token), DEADLINE);
        d.acked = Math.max(d.acked, Number(ack.acked_seq));
        d.pending = d.pending.filter((p) => Number(p.seq) > d.acked);
        d.lastOk = Date.now();
      } catch (e) {
        s.codes[e.code] = (s.codes[e.code] || 0) + 1;
        if (![14, 8, 4].includes(e.code)) s.bad.push(`${d.id}: ${e.code} ${e.details}`);
      }
      const took = Date.now() - t0;
      if (took > DEADLINE + 1000) s.hangs.push(`${d.id}: PushTelemetry took ${took} ms`);
      d.calls++;
      await sleep(s.stopLoad ? 100 : 50);
    }
  })();
  return d;
}

// A dashboard: polls a device and its latest values through the gateway.
function startDashboard(s) {
  return (async () => {
    while (!s.stopLoad) {
      for (const p of [`/api/v1/devices/${devId(0)}`, `/api/v1/devices/${devId(1)}/telemetry/latest`]) {
        const t0 = Date.now();
        try {
          const r = await fetch(s.base + p, { headers: { Authorization: `Bearer ${s.adminKey}` }, signal: AbortSignal.timeout(REST_TIMEOUT) });
          await r.text();
          s.rest[r.status] = (s.rest[r.status] || 0) + 1;
          if (![200, 503, 429].includes(r.status)) s.bad.push(`GET ${p}: ${r.status}`);
        } catch (e) {
          const what = e.name === 'TimeoutError' ? 'timeout' : 'refused';   // the gateway is down
          s.rest[what] = (s.rest[what] || 0) + 1;
          if (what === 'timeout') s.hangs.push(`GET ${p}: no answer in ${REST_TIMEOUT} ms`);
        }
        if (Date.now() - t0 > REST_TIMEOUT + 1000) s.hangs.push(`GET ${p}: ${Date.now() - t0} ms`);
      }
      await sleep(100);
    }
  })();
}

// Every device has been acknowledged something after `since`: the suite takes load again.
function progressed(s, since, what) {
  return until(`load to recover after ${what}`, () => s.devices.every((d) => d.lastOk > since), 30000, 100);
}

async function rolloutState(s) {
  const r = ok(await api(s, 'GET', `/api/v1/rollouts/${s.rollout}`, { key: s.adminKey }));
  return { state: r.state, stage: r.currentStage || 0, stages: r.stageStatus.map((x) => [x.state, x.devices || 0, x.succeeded || 0, x.downloading || 0]) };
}

async function setup() {
  // Redis's port is chosen with the services' ones (all distinct); the services start after it.
  const redis = { dir: fs.mkdtempSync(path.join(tmp, 'redis-')) };
  const env = {};
  const s = await startAll('flt', { env, reserve: 1, before: async (ports) => {
    redis.port = ports.spare[0];
    await startRedis(redis);
    for (const n of ['registry', 'device-mgmt', 'ingest', 'processing']) env[n] = { IOT_REDIS_ADDR: `127.0.0.1:${redis.port}` };
  } });
  Object.assign(s, { redis, codes: {}, rest: {}, bad: [], hangs: [], tokens: [] });
  s.ingest = client(s, 'ingest');
  s.ota = client(s, 'ota');
  const A = s.adminKey;
  const devices = Array.from({ length: NDEV }, (_, i) => ({ id: devId(i), model: 'F-1', firmwareVersion: '1.0.0', labels: { fleet: 'flt' } }));
  ok(await api(s, 'POST', '/api/v1/devices:batchCreate', { key: A, body: { devices } }), 201);
  for (let i = 0; i < NDEV; i++) s.tokens.push(ok(await api(s, 'POST', `/api/v1/devices/${devId(i)}/tokens`, { key: A, body: {} }), 201).token);
  ok(await api(s, 'POST', '/api/v1/rules', { key: A, body: { id: 'flt-hot', name: 'hot', enabled: true, metric: 'temp',
    devices: { labelSelector: 'fleet=flt' }, threshold: { op: 'COMPARISON_GT', threshold: 100 }, severity: 'SEVERITY_HIGH' } }), 201);
  // A rollout under way: stage 1 (5 devices, then a manual approval), 4 done, 1 downloading.
  const art = ok(await api(s, 'POST', '/api/v1/artifacts?name=flt-fw&version=1.1.0&models=F-1',
    { key: A, raw: crypto.randomBytes(4096), type: 'application/octet-stream' }), 201);
  const ro = ok(await api(s, 'POST', '/api/v1/rollouts', { key: A, body: { name: 'flt', artifactId: art.id,
    target: { labelSelector: 'fleet=flt' }, stages: [{ count: 5, manualApproval: true }, { percent: 100 }] } }), 201);
  s.rollout = ro.id;
  ok(await api(s, 'POST', `/api/v1/rollouts/${ro.id}:start`, { key: A, body: {} }));
  s.offered = [];
  await until('5 offers', async () => {
    await pool(Array.from({ length: NDEV }, (_, i) => i).filter((i) => !s.offered.includes(i)), 8, async (i) => {
      const r = await call(s.ota, 'CheckForUpdate', { current_version: '1.0.0', model: 'F-1' }, bearer(s.tokens[i]));
      if (r.offer) s.offered.push(i);
    });
    return s.offered.length === 5;
  }, 20000, 100);
  for (const [n, i] of s.offered.entries()) {
    const phases = n < 4 ? ['DOWNLOADING', 'VERIFYING', 'INSTALLING', 'SUCCEEDED'] : ['DOWNLOADING'];
    for (const ph of phases) await call(s.ota, 'ReportStatus', { rollout_id: ro.id, phase: `UPDATE_PHASE_${ph}` }, bearer(s.tokens[i]));
  }
  s.before = await until('the rollout to settle', async () => {
    const st = await rolloutState(s);
    return st.stages[0][2] === 4 && st.stages[0][3] === 1 && st;
  }, 10000, 100);
  return s;
}

async function teardown(s) {
  s.stopLoad = true;
  s.ingest.close();
  s.ota.close();
  await stopAll(s);
  await stopRedis(s.redis);
}

const tests = [
  ['kill -9 of each service, a Postgres restart and a Redis restart, under load', async (s) => {
    s.devices = Array.from({ length: NDEV }, (_, i) => startDevice(s, i));
    s.dashboard = startDashboard(s);
    await progressed(s, Date.now(), 'the start');
    const log = [];
    for (const name of ['ingest', 'processing', 'device-mgmt', 'ota', 'registry', 'gateway']) {
      await sleep(500);
      await kill9(s, name);
      const t0 = Date.now();
      await sleep(1000);
      await startOne(s, name);
      await progressed(s, Date.now(), `kill -9 of ${name}`);
      log.push(`${name} ${Date.now() - t0} ms`);
    }
    await sleep(500);
    let t0 = Date.now();
    pgCtl('stop');
    await sleep(2000);
    pgCtl('start');
    await progressed(s, Date.now(), 'the Postgres restart');
    log.push(`postgres ${Date.now() - t0} ms`);
    await sleep(500);
    t0 = Date.now();
    await stopRedis(s.redis);
    await sleep(1000);
    await startRedis(s.redis);
    await progressed(s, Date.now(), 'the Redis restart');
    log.push(`redis ${Date.now() - t0} ms`);
    await sleep(1000);
    console.log(`# down until load recovered: ${log.join(', ')}`);
  }],

  ['every point a device sent is stored exactly once', async (s) => {
    s.stopLoad = true;
    await Promise.all(s.devices.map((d) => d.loop));
    await s.dashboard;
    const sent = s.devices.reduce((a, d) => a + d.next - 1, 0);
    console.log(`# ${sent} points sent by ${NDEV} devices; gRPC errors by code: ${JSON.stringify(s.codes)}; REST answers: ${JSON.stringify(s.rest)}`);
    const rows = psql(`SELECT device_id, count(*), count(DISTINCT seq), min(seq), max(seq) FROM e2e_ing_${s.id}.telemetry GROUP BY device_id ORDER BY device_id`);
    eq(rows.length, NDEV, 'devices with telemetry');
    for (const [id, n, distinct, min, max] of rows) {
      const d = s.devices.find((x) => x.id === id);
      eq([Number(n), Number(distinct), Number(min), Number(max)], [d.next - 1, d.next - 1, 1, d.next - 1], `${id}: stored, distinct, first, last seq`);
      eq(d.acked, d.next - 1, `${id}: acknowledged`);
    }
  }],

  ['one alert per episode: none duplicated, none missed', async (s) => {
    const want = new Map(s.devices.map((d) => [d.id, Array.from({ length: d.next - 1 }, (_, k) => k + 1).filter(hot).length]));
    const total = [...want.values()].reduce((a, b) => a + b, 0);
    const all = await until(`${total} alerts`, async () => {
      const got = [];
      let token = '';
      do {
        const r = ok(await api(s, 'GET', `/api/v1/alerts?ruleId=flt-hot&pageSize=1000${token ? `&pageToken=${encodeURIComponent(token)}` : ''}`, { key: s.adminKey }));
        got.push(...r.alerts);
        token = r.nextPageToken;
      } while (token);
      return got.length >= total && got;
    }, 60000, 500);
    await sleep(1000);   // anything late would be a duplicate
    const per = new Map();
    for (const a of all) per.set(a.deviceId, (per.get(a.deviceId) || 0) + 1);
    for (const [id, n] of want) eq(per.get(id) || 0, n, `alerts of ${id}`);
    const keys = new Set(all.map((a) => `${a.deviceId}@${a.firedTime}`));
    eq(keys.size, all.length, 'distinct episodes');
    // Firing: only the episode of a device whose last point was hot.
    const lastHot = s.devices.filter((d) => hot(d.next - 1)).map((d) => d.id).sort();
    const firing = all.filter((a) => a.state === 'ALERT_STATE_FIRING');
    eq(firing.map((a) => a.deviceId).sort(), lastHot, `devices with a firing alert ${JSON.stringify(firing.map((a) => [a.deviceId, a.firedTime]))}`);
  }],

  ['the rollout is in the state it was in, and carries on', async (s) => {
    eq(await rolloutState(s), s.before, 'rollout after the faults');
    const last = s.offered[4];
    for (const ph of ['VERIFYING', 'INSTALLING', 'SUCCEEDED']) await call(s.ota, 'ReportStatus', { rollout_id: s.rollout, phase: `UPDATE_PHASE_${ph}` }, bearer(s.tokens[last]));
    const st = await until('stage 1 to await approval', async () => {
      const x = await rolloutState(s);
      if (x.stages[0][0] !== 'awaiting_approval') throw new Error(JSON.stringify(x));
      return x;
    }, 15000);
    eq([st.stages[0], st.stages[1][0]], [['awaiting_approval', 5, 5, 0], 'waiting'], 'first stage succeeded, second waiting');
    ok(await api(s, 'POST', `/api/v1/rollouts/${s.rollout}:approveStage`, { key: s.adminKey, body: { stage: 0 } }));
    const other = Array.from({ length: NDEV }, (_, i) => i).find((i) => !s.offered.includes(i));
    const r = await until('an offer in stage 2', async () => (await call(s.ota, 'CheckForUpdate', { current_version: '1.0.0', model: 'F-1' }, bearer(s.tokens[other]))).offer, 15000);
    eq(r.rollout_id, s.rollout, 'offer of the same rollout');
  }],

  ['clients saw only retryable codes, and nothing outlived its deadline', async (s) => {
    eq(s.bad, [], 'non-retryable answers');
    eq(s.hangs, [], 'calls past their deadline');
    assert((s.codes[14] || 0) > 0, 'no UNAVAILABLE at all: the faults did not reach the clients');
  }],

  ['every service passes in the registry again', async (s) => {
    const want = ['device-mgmt', 'gateway', 'ingest', 'ota', 'processing', 'registry'];
    await until('all services passing', async () => {
      const r = ok(await api(s, 'GET', '/api/v1/services', { key: s.adminKey }));
      return want.every((n) => r.services.some((x) => x.name === n && x.passing >= 1));
    }, 40000, 250);
    for (const n of want) {
      const inst = ok(await api(s, 'GET', `/api/v1/services/${n}/instances`, { key: s.adminKey })).instances;
      assert(inst.some((x) => x.status === 'HEALTH_STATUS_PASSING' && x.instance.port === s.ports[n].grpc), `${n}: ${JSON.stringify(inst)}`);
    }
  }],
];

run('faults', tests, setup, teardown);
