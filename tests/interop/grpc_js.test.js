// Interop: grpc-js (an independent, non-C gRPC implementation) against the Echo server built on
// libs/common, plus the stock grpc-health-check client and server reflection.
// Prints "ok - ..." / "not ok - ..." per test and "grpc_js: N passed, N failed" like the C tests.
'use strict';

const path = require('path');
const { spawn } = require('child_process');
const readline = require('readline');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const health = require('grpc-health-check');

const root = path.resolve(__dirname, '..', '..');
const buildDir = process.env.IOT_BUILD_DIR || path.join(root, 'build', 'release');
const loadOpts = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };

const echoPkg = grpc.loadPackageDefinition(
  protoLoader.loadSync('iot/testing/v1/echo.proto', { ...loadOpts, includeDirs: [path.join(root, 'proto')] }));
const reflPkg = grpc.loadPackageDefinition(
  protoLoader.loadSync('grpc/reflection/v1alpha/reflection.proto', { ...loadOpts, includeDirs: ['/usr/share/grpc-proto'] }));
const HealthClient = grpc.makeClientConstructor(health.service, 'grpc.health.v1.Health');

function startServer() {
  return new Promise((resolve, reject) => {
    const child = spawn(path.join(buildDir, 'tests', 'echo_server'), [], {
      env: { ...process.env, IOT_GRPC_LISTEN: '127.0.0.1:0', IOT_ADMIN_LISTEN: '127.0.0.1:0' },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const timer = setTimeout(() => reject(new Error('echo_server did not print its ports')), 10000);
    readline.createInterface({ input: child.stdout }).on('line', (line) => {
      const m = /grpc=(\d+) admin=(\d+)/.exec(line);
      if (m) { clearTimeout(timer); resolve({ child, port: Number(m[1]) }); }
    });
    child.on('exit', (code) => reject(new Error(`echo_server exited with ${code}`)));
  });
}

const call = (fn) => new Promise((resolve) => fn((err, resp) => resolve({ err, resp })));

function assert(cond, msg) { if (!cond) throw new Error(msg || 'assertion failed'); }
function eq(a, b, what) { if (a !== b) throw new Error(`${what}: got ${JSON.stringify(a)}, want ${JSON.stringify(b)}`); }

async function main() {
  const { child, port } = await startServer();
  const target = `127.0.0.1:${port}`;
  const echo = new echoPkg.iot.testing.v1.Echo(target, grpc.credentials.createInsecure());
  const deadline = () => Date.now() + 5000;
  const tests = [];
  const test = (name, fn) => tests.push({ name, fn });

  test('unary', async () => {
    const { err, resp } = await call((cb) => echo.Unary({ message: 'héllo', payload: Buffer.from([0, 1, 255]), echo_metadata: true }, { deadline: deadline() }, cb));
    assert(!err, err && err.message);
    eq(resp.message, 'héllo', 'message');
    eq(Buffer.compare(resp.payload, Buffer.from([0, 1, 255])), 0, 'payload');
    assert(/^ipv[46]:/.test(resp.peer), 'peer ' + resp.peer);
  });

  test('status code and message', async () => {
    const { err } = await call((cb) => echo.Unary({ status_code: 5, status_message: 'device d-1 not found' }, { deadline: deadline() }, cb));
    eq(err.code, grpc.status.NOT_FOUND, 'code');
    eq(err.details, 'device d-1 not found', 'details');
  });

  test('metadata round trip and traceparent', async () => {
    const md = new grpc.Metadata();
    md.set('x-echo', 'v1');
    md.set('traceparent', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01');
    let initial, trailing;
    const resp = await new Promise((resolve, reject) => {
      const c = echo.Unary({ echo_metadata: true }, md, { deadline: deadline() }, (err, r) => (err ? reject(err) : resolve(r)));
      c.on('metadata', (m) => { initial = m; });
      c.on('status', (s) => { trailing = s.metadata; });
    });
    eq(resp.metadata['x-echo'], 'v1', 'echoed request metadata');
    eq(resp.trace_id, '4bf92f3577b34da6a3ce929d0e0e4736', 'trace id from traceparent');
    await new Promise((r) => setImmediate(r));
    eq(initial.get('x-echo-initial')[0], 'v1', 'initial metadata');
    eq(trailing.get('x-echo-trailing')[0], 'v1', 'trailing metadata');
  });

  test('deadline exceeded', async () => {
    const t0 = Date.now();
    const { err } = await call((cb) => echo.Unary({ delay_ms: 3000 }, { deadline: Date.now() + 150 }, cb));
    eq(err.code, grpc.status.DEADLINE_EXCEEDED, 'code');
    assert(Date.now() - t0 < 2000, 'client waited for the handler');
  });

  test('client streaming', async () => {
    const resp = await new Promise((resolve, reject) => {
      const s = echo.ClientStream({ deadline: deadline() }, (err, r) => (err ? reject(err) : resolve(r)));
      for (const m of ['a', 'bc', 'def']) s.write({ message: m });
      s.end();
    });
    eq(resp.message, 'abcdef', 'concatenation');
  });

  test('server streaming', async () => {
    const got = await new Promise((resolve, reject) => {
      const out = [];
      const s = echo.ServerStream({ message: 't', repeat: 25 }, { deadline: deadline() });
      s.on('data', (r) => out.push(r.index));
      s.on('error', reject);
      s.on('end', () => resolve(out));
    });
    eq(got.length, 25, 'count');
    eq(got.join(','), [...Array(25).keys()].join(','), 'order');
  });

  test('bidi streaming', async () => {
    const got = await new Promise((resolve, reject) => {
      const out = [];
      const s = echo.Bidi({ deadline: deadline() });
      s.on('data', (r) => {
        out.push(r.message);
        if (out.length < 10) s.write({ message: 'm' + out.length }); else s.end();
      });
      s.on('error', reject);
      s.on('end', () => resolve(out));
      s.write({ message: 'm0' });
    });
    eq(got.join(','), 'm0,m1,m2,m3,m4,m5,m6,m7,m8,m9', 'ping-pong');
  });

  test('client cancel is seen by the handler', async () => {
    const before = (await call((cb) => echo.Stats({}, { deadline: deadline() }, cb))).resp.message;
    const c = echo.WaitForCancel({}, { deadline: deadline() }, () => {});
    await new Promise((r) => setTimeout(r, 100));
    c.cancel();
    const n0 = Number(/cancels=(\d+)/.exec(before)[1]);
    let n = n0;
    for (let i = 0; i < 100 && n === n0; i++) {
      await new Promise((r) => setTimeout(r, 20));
      n = Number(/cancels=(\d+)/.exec((await call((cb) => echo.Stats({}, { deadline: deadline() }, cb))).resp.message)[1]);
    }
    eq(n, n0 + 1, 'cancellations seen by the server');
  });

  test('unknown method is UNIMPLEMENTED', async () => {
    const client = new grpc.Client(target, grpc.credentials.createInsecure());
    const { err } = await call((cb) => client.makeUnaryRequest('/iot.testing.v1.Echo/Nope', (x) => x, (x) => x,
      Buffer.alloc(0), { deadline: deadline() }, cb));
    eq(err.code, grpc.status.UNIMPLEMENTED, 'code');
    client.close();
  });

  test('malformed message is INVALID_ARGUMENT', async () => {
    const client = new grpc.Client(target, grpc.credentials.createInsecure());
    // Field 1 with wire type 0 (varint) where EchoRequest has a string.
    const { err } = await call((cb) => client.makeUnaryRequest('/iot.testing.v1.Echo/Unary', (x) => x, (x) => x,
      Buffer.from([0x08, 0x07]), { deadline: deadline() }, cb));
    eq(err.code, grpc.status.INVALID_ARGUMENT, 'code');
    client.close();
  });

  test('grpc-health-check client: Check and Watch', async () => {
    const h = new HealthClient(target, grpc.credentials.createInsecure());
    let r = await call((cb) => h.check({ service: '' }, { deadline: deadline() }, cb));
    assert(!r.err, r.err && r.err.message);
    eq(r.resp.status, 'SERVING', 'overall');
    r = await call((cb) => h.check({ service: 'iot.testing.v1.Echo' }, { deadline: deadline() }, cb));
    eq(r.resp.status, 'SERVING', 'echo service');
    r = await call((cb) => h.check({ service: 'nope' }, { deadline: deadline() }, cb));
    eq(r.err.code, grpc.status.NOT_FOUND, 'unknown service');
    const first = await new Promise((resolve, reject) => {
      const w = h.watch({ service: 'grpc.health.v1.Health' });
      w.on('data', (m) => { resolve(m.status); w.cancel(); });
      w.on('error', (e) => { if (e.code !== grpc.status.CANCELLED) reject(e); });
    });
    eq(first, 'SERVING', 'first watch message');
    h.close();
  });

  test('server reflection lists services', async () => {
    const r = new reflPkg.grpc.reflection.v1alpha.ServerReflection(target, grpc.credentials.createInsecure());
    const names = await new Promise((resolve, reject) => {
      const s = r.ServerReflectionInfo({ deadline: deadline() });
      s.on('data', (m) => { resolve(m.list_services_response.service.map((x) => x.name)); s.end(); });
      s.on('error', reject);
      s.write({ list_services: '' });
    });
    assert(names.includes('iot.testing.v1.Echo'), names.join(','));
    assert(names.includes('grpc.health.v1.Health'), names.join(','));
    assert(names.includes('grpc.reflection.v1alpha.ServerReflection'), names.join(','));
    r.close();
  });

  let passed = 0;
  let failed = 0;
  for (const t of tests) {
    const t0 = Date.now();
    try {
      await t.fn();
      passed++;
      console.log(`ok - grpc_js/${t.name} (${Date.now() - t0} ms)`);
    } catch (e) {
      failed++;
      console.log(`    ${e && e.stack ? e.stack.split('\n').slice(0, 2).join(' | ') : e}`);
      console.log(`not ok - grpc_js/${t.name} (${Date.now() - t0} ms)`);
    }
  }
  echo.close();
  child.kill('SIGTERM');
  await new Promise((r) => child.once('exit', r));
  console.log(`grpc_js: ${passed} passed, ${failed} failed`);
  process.exitCode = failed ? 1 : 0;
}

main().catch((e) => {
  console.log(`not ok - grpc_js/setup: ${e.message}`);
  console.log('grpc_js: 0 passed, 1 failed');
  process.exit(1);
});
