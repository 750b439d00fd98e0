// The whole suite as real processes on loopback for the end-to-end tests: registry, device-mgmt,
// ingest, processing, ota and the gateway, each on fixed free ports (so a killed service comes back
// on the same address and its dependants find it again), all registered with the registry, each
// with its own schema / key prefix in the Postgres and Redis that tests/run.sh started. Plus gRPC
// clients (grpc-js over proto/) acting as devices, and small helpers for REST through the gateway.
'use strict';

const path = require('path');
const fs = require('fs');
const os = require('os');
const net = require('net');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const suite = require('../gateway/suite');

const root = path.resolve(__dirname, '..', '..');
const tmpDir = process.env.IOT_TEST_TMP || os.tmpdir();

// n distinct ports the kernel just handed out, all held open until all are chosen (then closed
// again: a small race with other programs, fine on a test machine).
async function freePorts(n) {
  const servers = await Promise.all(Array.from({ length: n }, () => new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => resolve(srv));
  })));
  const ports = servers.map((srv) => srv.address().port);
  await Promise.all(servers.map((srv) => new Promise((r) => srv.close(r))));
  return ports;
}
const freePort = async () => (await freePorts(1))[0];

const ORDER = ['registry', 'device-mgmt', 'ingest', 'processing', 'ota', 'gateway'];

// The environment of every service, from the ports and names chosen once per suite.
function environments(id, ports, adminKey, keysDir, extra) {
  const pg = process.env.IOT_TEST_PG, redis = process.env.IOT_TEST_REDIS;
  const a = (n) => `127.0.0.1:${ports[n].grpc}`;
  const common = (n) => ({
    IOT_GRPC_LISTEN: a(n), IOT_ADMIN_LISTEN: `127.0.0.1:${ports[n].admin}`, IOT_REGISTRY_ADDR: a('registry'),
  });
  const streams = `e2e-${id}:`;
  const env = {
    registry: { IOT_REDIS_ADDR: redis, IOT_REGISTRY_PREFIX: `{e2ereg-${id}}:` },
    'device-mgmt': {
      IOT_PG_DSN: pg, IOT_REDIS_ADDR: redis, IOT_DM_PG_SCHEMA: `e2e_dm_${id}`, IOT_DM_REDIS_PREFIX: `{e2e-${id}}:`,
      IOT_DM_MIGRATIONS: 'services/device-mgmt/migrations',
    },
    ingest: {
      IOT_PG_DSN: pg, IOT_REDIS_ADDR: redis, IOT_INGEST_PG_SCHEMA: `e2e_ing_${id}`, IOT_INGEST_STREAM_PREFIX: streams,
      IOT_INGEST_DM_ADDR: a('device-mgmt'), IOT_INGEST_MIGRATIONS: 'services/ingest/migrations',
    },
    processing: {
      IOT_PG_DSN: pg, IOT_REDIS_ADDR: redis, IOT_PROC_PG_SCHEMA: `e2e_proc_${id}`, IOT_PROC_REDIS_PREFIX: `e2e-${id}:proc:`,
      IOT_INGEST_STREAM_PREFIX: streams, IOT_PROC_DM_ADDR: a('device-mgmt'), IOT_PROC_MIGRATIONS: 'services/processing/migrations',
      IOT_PROC_RULES_POLL: '100ms', IOT_PROC_STATS_INTERVAL: '200ms', IOT_PROC_ACTION_POLL: '100ms',
    },
    ota: {
      IOT_PG_DSN: pg, IOT_OTA_PG_SCHEMA: `e2e_ota_${id}`, IOT_OTA_MIGRATIONS: 'services/ota/migrations', IOT_OTA_KEYS_DIR: keysDir,
      IOT_OTA_DM_ADDR: a('device-mgmt'), IOT_OTA_PROC_ADDR: a('processing'), IOT_OTA_CONTROLLER_INTERVAL: '100ms',
    },
    gateway: {
      IOT_PG_DSN: pg, IOT_GW_PG_SCHEMA: `e2e_gw_${id}`, IOT_GW_HTTP_LISTEN: `127.0.0.1:${ports.gateway.http}`,
      IOT_GW_DM_ADDR: a('device-mgmt'), IOT_GW_REGISTRY_ADDR: a('registry'), IOT_GW_INGEST_ADDR: a('ingest'),
      IOT_GW_PROC_ADDR: a('processing'), IOT_GW_OTA_ADDR: a('ota'), IOT_GW_BOOTSTRAP_KEY: adminKey,
    },
  };
  for (const n of ORDER) env[n] = { ...common(n), ...env[n], ...((extra || {})[n] || {}) };
  return env;
}

// Starts the six services in dependency order. opts.env: extra environment per service;
// opts.reserve: how many more free ports to choose (ports.spare); opts.before(ports): runs first.
async function startAll(tag, opts = {}) {
  const id = `${tag}_${process.pid}`;
  const ports = {};
  const free = await freePorts(ORDER.length * 2 + 1 + (opts.reserve || 0));
  for (const n of ORDER) ports[n] = { grpc: free.pop(), admin: free.pop() };
  ports.gateway.http = free.pop();
  ports.spare = free;
  const keysDir = fs.mkdtempSync(path.join(tmpDir, 'e2e-ota-keys-'));
  const s = { id, ports, procs: {}, adminKey: suite.newKey() };
  if (opts.before) await opts.before(ports);   // e.g. a Redis of the test's own on a spare port
  s.env = environments(id, ports, s.adminKey, keysDir, opts.env);
  for (const n of ORDER) await startOne(s, n);
  s.base = `http://127.0.0.1:${ports.gateway.http}`;
  s.addr = (n) => `127.0.0.1:${ports[n].grpc}`;
  return s;
}

async function startOne(s, name) {
  s.procs[name] = await suite.start(name, name, s.env[name], name === 'gateway' ? 'http' : undefined);
}

// kill -9: no drain, no deregistration.
function kill9(s, name) {
  const p = s.procs[name];
  return new Promise((resolve) => {
    p.child.removeAllListeners('exit');
    p.child.on('exit', () => { p.exited = 'SIGKILL'; resolve(); });
    p.child.kill('SIGKILL');
  });
}

// SIGTERM to every service, last started first; a non-zero exit (a crash, or a leak under the
// sanitizers) is an error.
async function stopAll(s) {
  const bad = [];
  for (const n of [...ORDER].reverse()) {
    const p = s.procs[n];
    if (!p) continue;
    const code = await suite.stop(p);
    if (code !== 0 && code !== undefined && p.exited !== 'SIGKILL') {
      bad.push(`${n} exited with ${code}: ${fs.readFileSync(p.errFile, 'utf8').slice(-2000)}`);
    }
  }
  if (bad.length) throw new Error(bad.join('\n'));
}

// gRPC clients of the four device-facing / internal APIs, by service name.
const loadOpts = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [path.join(root, 'proto')] };
const protos = {
  'device-mgmt': ['iot/device/v1/device.proto', 'iot.device.v1', 'DeviceManager'],
  ingest: ['iot/ingest/v1/ingest.proto', 'iot.ingest.v1', 'Ingest'],
  processing: ['iot/processing/v1/processing.proto', 'iot.processing.v1', 'Processing'],
  ota: ['iot/ota/v1/ota.proto', 'iot.ota.v1', 'Ota'],
  registry: ['iot/registry/v1/registry.proto', 'iot.registry.v1', 'Registry'],
};
const ctors = {};
function client(s, name) {
  if (!ctors[name]) {
    const [file, pkg, svc] = protos[name];
    let o = grpc.loadPackageDefinition(protoLoader.loadSync(file, loadOpts));
    for (const part of pkg.split('.')) o = o[part];
    ctors[name] = o[svc];
  }
  return new ctors[name](s.addr(name), grpc.credentials.createInsecure());
}

// Metadata carrying a device token.
function bearer(token) {
  const md = new grpc.Metadata();
  md.set('authorization', `Bearer ${token}`);
  return md;
}

// A unary call as a promise; the error carries .code (grpc status).
function call(c, method, req, md, deadlineMs = 10000) {
  return new Promise((resolve, reject) => {
    c[method](req, md || new grpc.Metadata(), { deadline: Date.now() + deadlineMs }, (err, res) => (err ? reject(err) : resolve(res)));
  });
}

// Runs fn over items with at most n in flight; resolves with the results in order.
async function pool(items, n, fn) {
  const out = new Array(items.length);
  let next = 0;
  async function worker() {
    while (next < items.length) { const i = next++; out[i] = await fn(items[i], i); }
  }
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, worker));
  return out;
}

// Polls fn (async, returns a truthy value when done) every ms until timeoutMs; throws with what.
async function until(what, fn, timeoutMs = 30000, ms = 100) {
  const end = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try { last = await fn(); if (last) return last; } catch (e) { last = e; }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, ms));
  }
}

module.exports = {
  ORDER, startAll, startOne, stopAll, kill9, client, bearer, call, pool, until, grpc, freePort,
  api: suite.api, ok: suite.ok, eq: suite.eq, assert: suite.assert, run: suite.run, root,
};
