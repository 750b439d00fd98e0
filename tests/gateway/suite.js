// Starts real service binaries on loopback for the gateway tests (REST and browser): device-mgmt,
// registry, processing, ingest, ota and the gateway, each with its own schema / key prefix in the
// Postgres and Redis that tests/run.sh started. Also a tiny test runner printing like the C tests.
'use strict';

const path = require('path');
const fs = require('fs');
const os = require('os');
const crypto = require('crypto');
const { spawn } = require('child_process');
const readline = require('readline');

const root = path.resolve(__dirname, '..', '..');
const buildDir = process.env.IOT_BUILD_DIR || path.join(root, 'build', 'release');

// Starts bin with env; resolves with the ports it printed ("<name> grpc=N admin=N", "gateway http=N").
function start(name, bin, env, want) {
  return new Promise((resolve, reject) => {
    const errFile = path.join(process.env.IOT_TEST_TMP || os.tmpdir(), `gw-${name}-${process.pid}.err`);
    const child = spawn(path.join(buildDir, 'services', bin, bin), [], {
      cwd: root,
      env: { ...process.env, IOT_GRPC_LISTEN: '127.0.0.1:0', IOT_ADMIN_LISTEN: '127.0.0.1:0', ...env },
      stdio: ['ignore', 'pipe', fs.openSync(errFile, 'w')],
    });
    const proc = { name, child, errFile, lines: [] };
    const timer = setTimeout(() => reject(new Error(`${name} did not start: ${fs.readFileSync(errFile, 'utf8')}`)), 20000);
    readline.createInterface({ input: child.stdout }).on('line', (line) => {
      proc.lines.push(line);
      let m = /grpc=(\d+) admin=(\d+)/.exec(line);
      if (m) { proc.grpc = Number(m[1]); proc.admin = Number(m[2]); }
      m = /http=(\d+)/.exec(line);
      if (m) proc.http = Number(m[1]);
      if (proc.grpc && (!want || proc[want])) { clearTimeout(timer); resolve(proc); }
    });
    child.on('exit', (code) => { proc.exited = code; clearTimeout(timer); reject(new Error(`${name} exited with ${code}: ${fs.readFileSync(errFile, 'utf8')}`)); });
  });
}

function stop(proc) {
  if (!proc || proc.exited !== undefined) return Promise.resolve();
  return new Promise((resolve) => {
    proc.child.removeAllListeners('exit');
    proc.child.on('exit', (code) => { proc.exited = code; resolve(code); });
    proc.child.kill('SIGTERM');
  });
}

const newKey = () => `iotk_${crypto.randomBytes(6).toString('hex')}_${crypto.randomBytes(32).toString('hex')}`;

// The suite: device-mgmt, registry and the gateway always; ingest, processing and ota with
// opts.full (otherwise they point at a closed port, for 503 tests). opts.gatewayEnv, ingestEnv,
// procEnv and otaEnv add to those services' environments.
async function startSuite(tag, opts = {}) {
  const id = `${tag}_${process.pid}`;
  const pg = process.env.IOT_TEST_PG, redis = process.env.IOT_TEST_REDIS;
  const s = { procs: [], adminKey: newKey() };
  const closed = '127.0.0.1:1';
  const base = { IOT_PG_DSN: pg, IOT_REDIS_ADDR: redis };
  const dm = await start('device-mgmt', 'device-mgmt', {
    ...base, IOT_DM_PG_SCHEMA: `gw_dm_${id}`, IOT_DM_REDIS_PREFIX: `{gw-${id}}:`,
    IOT_DM_MIGRATIONS: 'services/device-mgmt/migrations',
  });
  s.procs.push(dm);
  const reg = await start('registry', 'registry', { IOT_REDIS_ADDR: redis, IOT_REGISTRY_PREFIX: `{gwreg-${id}}:` });
  s.procs.push(reg);
  const addr = { ingest: closed, proc: closed, ota: closed };
  if (opts.full) {
    const dmAddr = `127.0.0.1:${dm.grpc}`, regAddr = `127.0.0.1:${reg.grpc}`;
    const streams = `gw-${id}:`;
    const ingest = await start('ingest', 'ingest', {
      ...base, IOT_INGEST_PG_SCHEMA: `gw_ing_${id}`, IOT_INGEST_STREAM_PREFIX: streams, IOT_INGEST_DM_ADDR: dmAddr,
      IOT_INGEST_MIGRATIONS: 'services/ingest/migrations', IOT_REGISTRY_ADDR: regAddr, ...(opts.ingestEnv || {}),
    });
    s.procs.push(ingest);
    const proc = await start('processing', 'processing', {
      ...base, IOT_PROC_PG_SCHEMA: `gw_proc_${id}`, IOT_PROC_REDIS_PREFIX: `gw-${id}:proc:`, IOT_INGEST_STREAM_PREFIX: streams,
      IOT_PROC_DM_ADDR: dmAddr, IOT_PROC_MIGRATIONS: 'services/processing/migrations', IOT_PROC_RULES_POLL: '50ms',
      IOT_REGISTRY_ADDR: regAddr, ...(opts.procEnv || {}),
    });
    s.procs.push(proc);
    const keys = fs.mkdtempSync(path.join(process.env.IOT_TEST_TMP || os.tmpdir(), 'gw-ota-keys-'));
    const ota = await start('ota', 'ota', {
      ...base, IOT_OTA_PG_SCHEMA: `gw_ota_${id}`, IOT_OTA_MIGRATIONS: 'services/ota/migrations', IOT_OTA_KEYS_DIR: keys,
      IOT_OTA_DM_ADDR: dmAddr, IOT_OTA_PROC_ADDR: `127.0.0.1:${proc.grpc}`, IOT_OTA_CONTROLLER_INTERVAL: '100ms',
      IOT_REGISTRY_ADDR: regAddr, ...(opts.otaEnv || {}),
    });
    s.procs.push(ota);
    addr.ingest = `127.0.0.1:${ingest.grpc}`;
    addr.proc = `127.0.0.1:${proc.grpc}`;
    addr.ota = `127.0.0.1:${ota.grpc}`;
    Object.assign(s, { ingest, proc, ota });
  }
  const gwEnv = {
    IOT_PG_DSN: pg, IOT_GW_PG_SCHEMA: `gw_${id}`, IOT_GW_HTTP_LISTEN: '127.0.0.1:0',
    IOT_GW_DM_ADDR: `127.0.0.1:${dm.grpc}`, IOT_GW_REGISTRY_ADDR: `127.0.0.1:${reg.grpc}`,
    IOT_GW_INGEST_ADDR: addr.ingest, IOT_GW_PROC_ADDR: addr.proc, IOT_GW_OTA_ADDR: addr.ota,
    IOT_GW_BOOTSTRAP_KEY: s.adminKey, IOT_GW_BACKEND_TIMEOUT: '3s', ...(opts.gatewayEnv || {}),
  };
  s.gateway = await start('gateway', 'gateway', gwEnv, 'http');
  s.procs.push(s.gateway);
  s.base = `http://127.0.0.1:${s.gateway.http}`;
  s.dm = dm;
  s.registry = reg;
  return s;
}

// Stops every process with SIGTERM; a non-zero exit (a crash, or a leak under the sanitizers) fails.
async function stopSuite(s) {
  const bad = [];
  for (const p of [...s.procs].reverse()) {
    const code = await stop(p);
    if (code !== 0 && code !== undefined) bad.push(`${p.name} exited with ${code}: ${fs.readFileSync(p.errFile, 'utf8').slice(-2000)}`);
  }
  if (bad.length) throw new Error(bad.join('\n'));
}

// Runs tests in order; prints "ok - <prog>/<name>" lines and "<prog>: N passed, N failed".
async function run(prog, tests, setup, teardown) {
  let passed = 0, failed = 0;
  let ctx;
  try { ctx = await setup(); } catch (e) { console.log(`not ok - ${prog}/setup\n    ${e.stack}`); console.log(`${prog}: 0 passed, 1 failed`); process.exit(1); }
  for (const [name, fn] of tests) {
    const t0 = Date.now();
    try { await fn(ctx); passed++; console.log(`ok - ${prog}/${name} (${Date.now() - t0} ms)`); }
    catch (e) { failed++; console.log(`not ok - ${prog}/${name}\n    ${e.stack}`); }
  }
  try { await teardown(ctx); } catch (e) { failed++; console.log(`not ok - ${prog}/teardown\n    ${e.stack}`); }
  console.log(`${prog}: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

function assert(cond, msg) { if (!cond) throw new Error(msg || 'assertion failed'); }
// JSON with object members in name order: objects compare by content, arrays by order.
const canon = (v) => JSON.stringify(v, (k, x) => (x && typeof x === 'object' && !Array.isArray(x)
  ? Object.fromEntries(Object.keys(x).sort().map((n) => [n, x[n]])) : x));
function eq(got, want, what) {
  const g = canon(got), w = canon(want);
  if (g !== w) throw new Error(`${what || 'value'}: got ${g}, want ${w}`);
}

// One REST call: key as "Authorization: Bearer", body as JSON (or raw bytes with their type).
// Every answer of the API is JSON; anything else fails the test.
async function api(s, method, path, { key, body, raw, headers, type } = {}) {
  const h = { ...(headers || {}) };
  if (key) h.Authorization = `Bearer ${key}`;
  let payload;
  if (raw !== undefined) payload = raw;
  else if (body !== undefined) payload = JSON.stringify(body);
  if (payload !== undefined) h['Content-Type'] = type || 'application/json';
  const res = await fetch(s.base + path, { method, headers: h, body: payload, duplex: 'half' });
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (e) { throw new Error(`${method} ${path}: ${res.status}, not JSON: ${text}`); }
  return { status: res.status, json, headers: res.headers };
}

// An error answer: the HTTP status, the gRPC code and its name, and a message containing want.
function isError(r, status, code, want) {
  eq(r.status, status, `status of ${JSON.stringify(r.json)}`);
  eq(r.json.code, code, `grpc code of ${JSON.stringify(r.json)}`);
  assert(typeof r.json.status === 'string' && r.json.status.length > 0, 'status name');
  if (want) assert(r.json.message.includes(want), `message "${r.json.message}" lacks "${want}"`);
}

// A success answer with this status (200 unless given): its JSON.
function ok(r, status, what) {
  eq(r.status, status || 200, `${what || 'answer'}: ${JSON.stringify(r.json)}`);
  return r.json;
}

module.exports = { startSuite, stopSuite, start, stop, run, assert, eq, api, isError, ok, newKey, root, buildDir };
