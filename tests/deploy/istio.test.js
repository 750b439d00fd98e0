// deploy/istio checked without a cluster: every object against the Istio schemas
// (@kubernetes-models/istio .validate(), plus tsc so a misspelled field fails too), yamllint, and
// the cross-references no schema sees, read from the code itself: the AuthorizationPolicies allow
// exactly the calls the binaries make (their *_ADDR variables in --help), every method of every
// service (from the .proto files) falls in exactly one VirtualService class and streams are never
// retried, every subset a route names is defined, every port is one the binary listens on.
'use strict';

const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');
const { run, assert, eq, root, buildDir } = require('../gateway/suite');

const NS = 'iotsuite';
const INGRESS = 'cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account';
const SERVICES = ['registry', 'device-mgmt', 'ingest', 'processing', 'ota', 'gateway'];
const PROTO = {
  registry: 'proto/iot/registry/v1/registry.proto', 'device-mgmt': 'proto/iot/device/v1/device.proto',
  ingest: 'proto/iot/ingest/v1/ingest.proto', processing: 'proto/iot/processing/v1/processing.proto', ota: 'proto/iot/ota/v1/ota.proto',
};
const dir = path.join(root, 'deploy', 'istio');
const host = (s) => `iotsuite-${s}.${NS}.svc.cluster.local`;
const principal = (s) => `cluster.local/ns/${NS}/sa/iotsuite-${s}`;

function yamlFiles(d) {
  return fs.readdirSync(d, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(d, e.name);
    if (e.isDirectory()) return yamlFiles(p);
    return /\.ya?ml$/.test(e.name) ? [p] : [];
  });
}

// What a binary's --help says: its variables with their defaults.
function helpVars(service) {
  const out = execFileSync(path.join(buildDir, 'services', service, service), ['--help'], { encoding: 'utf8' });
  const vars = {};
  for (const m of out.matchAll(/^\s+(IOT_[A-Z0-9_]+)\s.*default "([^"]*)"\)\s*$/gm)) vars[m[1]] = m[2];
  return vars;
}

// The service's RPCs from its .proto: name -> {stream: bool}.
function rpcs(service) {
  const text = fs.readFileSync(path.join(root, PROTO[service]), 'utf8');
  const pkg = /^package\s+([\w.]+);/m.exec(text)[1];
  const svc = /^service\s+(\w+)\s*\{/m.exec(text)[1];
  const out = {};
  for (const m of text.matchAll(/^\s*rpc\s+(\w+)\s*\(\s*(stream\s+)?[\w.]+\s*\)\s*returns\s*\(\s*(stream\s+)?[\w.]+\s*\)/gm)) {
    out[m[1]] = { stream: !!(m[2] || m[3]) };
  }
  return { prefix: `/${pkg}.${svc}/`, methods: out };
}

async function setup() {
  const YAML = require('yaml');
  const objs = [];
  for (const f of yamlFiles(dir)) {
    for (const d of YAML.parseAllDocuments(fs.readFileSync(f, 'utf8'))) {
      if (d.errors.length) throw new Error(`${f}: ${d.errors[0].message}`);
      const o = d.toJS();
      if (o) objs.push({ file: path.relative(root, f), o });
    }
  }
  const ports = {};
  for (const s of SERVICES) {
    const v = helpVars(s);
    ports[s] = { grpc: Number(v.IOT_GRPC_LISTEN.split(':').pop()), admin: Number(v.IOT_ADMIN_LISTEN.split(':').pop()), vars: v };
    if (s === 'gateway') ports[s].http = Number(v.IOT_GW_HTTP_LISTEN.split(':').pop());
  }
  const of = (kind) => objs.filter((x) => x.o.kind === kind).map((x) => x.o);
  return { objs, ports, of };
}

const tests = [
  ['schemas', async (c) => {
    let bad = [];
    for (const { file, o } of c.objs) {
      const [group, version] = o.apiVersion.split('/');
      const mod = await import(`@kubernetes-models/istio/${group}/${version}/${o.kind}`);
      try { new mod[o.kind](o).validate(); } catch (e) { bad.push(`${file}: ${o.kind}/${o.metadata.name}: ${e.message}`); }
    }
    assert(!bad.length, bad.join('\n'));
    assert(c.objs.length >= 20, `objects found: ${c.objs.length}`);
    // The validator is not asleep: a wrong enum and a wrong type are refused.
    const { PeerAuthentication } = await import('@kubernetes-models/istio/security.istio.io/v1/PeerAuthentication');
    let refused = 0;
    for (const spec of [{ mtls: { mode: 'STRICTER' } }, { mtls: 'STRICT' }]) {
      try { new PeerAuthentication({ metadata: { name: 'x' }, spec }).validate(); } catch (e) { refused++; }
    }
    eq(refused, 2, 'bad objects refused');
  }],
  ['no_unknown_fields', async (c) => {
    // Each object as a literal typed with its model's interface: tsc reports excess properties
    // (a "host:" for "hosts:", a "wieght"), which .validate() lets through.
    const tmp = fs.mkdtempSync(path.join(__dirname, '.tsc-')); /* here, so the models resolve from node_modules */
    const check = (objs) => {
      const imports = new Map();
      let body = '';
      objs.forEach(({ file, o }, i) => {
        if (o.kind === 'IstioOperator') return; /* no schema for its spec in the models */
        const [group, version] = o.apiVersion.split('/');
        const alias = `I${o.kind}_${group.replace(/\W/g, '_')}_${version}`;
        imports.set(alias, `import type { I${o.kind} as ${alias} } from "@kubernetes-models/istio/${group}/${version}/${o.kind}";`);
        body += `// ${file}: ${o.kind}/${o.metadata.name}\nexport const o${i}: ${alias} = ${JSON.stringify(o, null, 1)};\n`;
      });
      const f = path.join(tmp, 'objects.mts');
      fs.writeFileSync(f, [...imports.values()].join('\n') + '\n' + body);
      try {
        execFileSync(path.join(__dirname, 'node_modules', '.bin', 'tsc'), ['--noEmit', '--strict', '--module', 'node16',
          '--moduleResolution', 'node16', '--target', 'es2020', '--skipLibCheck', '--typeRoots', '[]', f],
        { cwd: __dirname, encoding: 'utf8', stdio: 'pipe' });
        return '';
      } catch (e) { return (e.stdout || '') + (e.stderr || ''); }
    };
    const out = check(c.objs);
    assert(out === '', `tsc:\n${out}`);
    // And it does catch a misspelling.
    const vs = c.objs.find((x) => x.o.kind === 'VirtualService');
    const wrong = JSON.parse(JSON.stringify(vs));
    wrong.o.spec.host = wrong.o.spec.hosts;
    delete wrong.o.spec.hosts;
    assert(/'"?host"?' does not exist/.test(check([wrong])), 'a misspelled field is reported');
    fs.rmSync(tmp, { recursive: true, force: true });
  }],
  ['yamllint', async () => {
    const files = yamlFiles(dir);
    try {
      execFileSync('yamllint', ['-s', '-c', path.join(root, 'deploy', '.yamllint'), ...files], { encoding: 'utf8', stdio: 'pipe' });
    } catch (e) { throw new Error(`yamllint:\n${e.stdout}${e.stderr}`); }
  }],
  ['mtls_strict_and_deny_by_default', async (c) => {
    const pa = c.of('PeerAuthentication').filter((p) => p.metadata.namespace === NS && !p.spec.selector);
    eq(pa.map((p) => p.spec.mtls.mode), ['STRICT'], 'one namespace-wide PeerAuthentication, STRICT');
    const deny = c.of('AuthorizationPolicy').filter((p) => p.metadata.namespace === NS && !p.spec.selector);
    eq(deny.length, 1, 'one namespace-wide policy');
    eq(Object.keys(deny[0].spec), [], 'it allows nothing');
  }],
  ['authorization_matches_the_call_graph', async (c) => {
    // Who calls whom, from the binaries: an IOT_*_ADDR defaulting to a service's gRPC port.
    const byPort = Object.fromEntries(SERVICES.map((s) => [c.ports[s].grpc, s]));
    const callers = Object.fromEntries(SERVICES.map((s) => [s, new Set()]));
    for (const s of SERVICES) {
      for (const [k, v] of Object.entries(c.ports[s].vars)) {
        if (!/_ADDR$/.test(k) || k === 'IOT_ADVERTISE_ADDR' || k === 'IOT_REDIS_ADDR') continue;
        if (k === 'IOT_REGISTRY_ADDR') { if (s !== 'registry') callers.registry.add(s); continue; }
        const callee = byPort[Number(v.split(':').pop())];
        assert(callee, `${s} ${k}=${v} names no service port`);
        callers[callee].add(s);
      }
    }
    // The registry's active checks reach every other service's health method.
    for (const s of SERVICES) {
      const p = c.of('AuthorizationPolicy').filter((x) => x.spec.selector && x.spec.selector.matchLabels['app.kubernetes.io/component'] === s);
      eq(p.length, 1, `one policy for ${s}`);
      eq(p[0].spec.action, 'ALLOW', `${s} action`);
      eq(p[0].spec.selector.matchLabels['app.kubernetes.io/instance'], 'iotsuite', `${s} selector`);
      const full = new Set(), health = new Set(), ingress = [];
      for (const r of p[0].spec.rules) {
        const from = r.from.flatMap((f) => f.source.principals);
        const to = r.to.map((t) => t.operation);
        for (const op of to) {
          const ports = op.ports.map(Number);
          assert(ports.every((n) => [c.ports[s].grpc, c.ports[s].http].includes(n)), `${s}: policy port ${ports} is not one ${s} serves`);
        }
        for (const who of from) {
          if (who === INGRESS) { ingress.push(...to); continue; }
          const m = /^cluster\.local\/ns\/iotsuite\/sa\/iotsuite-(.+)$/.exec(who);
          assert(m && SERVICES.includes(m[1]), `${s}: principal ${who} is no ServiceAccount of the suite`);
          const onlyHealth = to.every((op) => op.paths && op.paths.length === 1 && op.paths[0] === '/grpc.health.v1.Health/Check');
          (onlyHealth ? health : full).add(m[1]);
        }
      }
      eq([...full].sort(), [...callers[s]].sort(), `callers allowed into ${s}`);
      eq([...health], s === 'registry' ? [] : ['registry'], `${s}: health checks`);
      if (s === 'gateway') eq(ingress.map((op) => op.ports), [[String(c.ports.gateway.http)]], 'the ingress reaches the REST port only');
      else if (PROTO[s]) {
        const { prefix, methods } = rpcs(s);
        for (const op of ingress) for (const p of op.paths) {
          assert(p.startsWith(prefix) && methods[p.slice(prefix.length)], `${s}: the ingress may call ${p}, which ${s} does not serve`);
        }
      }
    }
  }],
  ['virtual_services_cover_every_method', async (c) => {
    const drs = new Map(c.of('DestinationRule').map((d) => [d.spec.host, d]));
    const subsetsOf = (h) => new Set(((drs.get(h) || { spec: {} }).spec.subsets || []).map((x) => x.name));
    for (const s of SERVICES) {
      assert(drs.has(host(s)), `a DestinationRule for ${s}`);
      eq(drs.get(host(s)).spec.trafficPolicy.tls.mode, 'ISTIO_MUTUAL', `${s} tls`);
      assert(drs.get(host(s)).spec.trafficPolicy.outlierDetection, `${s}: outlier detection (circuit breaking)`);
    }
    for (const vs of c.of('VirtualService')) {
      for (const h of vs.spec.http) for (const r of h.route) {
        const d = r.destination;
        assert(drs.has(d.host), `${vs.metadata.name}: no DestinationRule for ${d.host}`);
        if (d.subset) assert(subsetsOf(d.host).has(d.subset), `${vs.metadata.name}: subset ${d.subset} of ${d.host} is not defined`);
        const svc = SERVICES.find((s) => host(s) === d.host);
        if (d.port) assert([c.ports[svc].grpc, c.ports[svc].admin, c.ports[svc].http].includes(d.port.number), `${vs.metadata.name}: port ${d.port.number} of ${svc}`);
        const w = h.route.reduce((a, x) => a + (x.weight || 0), 0);
        if (h.route.length > 1) eq(w, 100, `${vs.metadata.name}/${h.name}: weights`);
      }
    }
    // Mesh routes: each method in exactly one class; streams never retried and never timed out;
    // retries only where the method is marked idempotent.
    for (const s of SERVICES.filter((x) => PROTO[x])) {
      const vs = c.of('VirtualService').find((v) => v.spec.hosts.includes(host(s)) && v.spec.gateways.includes('mesh'));
      assert(vs, `a mesh VirtualService for ${s}`);
      const { prefix, methods } = rpcs(s);
      for (const [m, { stream }] of Object.entries(methods)) {
        const hits = vs.spec.http.filter((h) => h.match && h.match.some((x) => x.uri && new RegExp(x.uri.regex).test(prefix + m)));
        assert(hits.length <= 1, `${s}.${m} matches ${hits.length} classes`);
        const route = hits[0] || vs.spec.http.find((h) => h.name === 'other');
        assert(route, `${s}.${m}: no route`);
        if (stream) {
          eq([route.name, route.timeout, route.retries.attempts], ['streams', '0s', 0], `${s}.${m} is a stream`);
        } else {
          assert(route.name !== 'streams', `${s}.${m} is not a stream but routed as one`);
          if (route.retries.attempts > 0) eq(route.name, 'idempotent', `${s}.${m} is retried`);
          eq(route.timeout, '10s', `${s}.${m} timeout`);
        }
      }
      // No regex names a method the service does not have (a typo would silently fall through).
      for (const h of vs.spec.http) for (const x of h.match || []) {
        if (!x.uri) continue;
        const names = /\(([^)]*)\)/.exec(x.uri.regex)[1].split('|');
        for (const n of names) assert(methods[n], `${s}: route ${h.name} names ${n}, not a method of ${s}`);
      }
      const idem = vs.spec.http.find((h) => h.name === 'idempotent');
      eq([idem.retries.attempts, idem.retries.perTryTimeout, idem.timeout], [3, '2s', '10s'], `${s}: 3 retries, 2 s a try, 10 s`);
      assert(!/resource-exhausted/.test(idem.retries.retryOn), `${s}: a rate limit is not retried at once`);
      eq(vs.spec.http[0].route.map((r) => [r.destination.subset, r.weight]), [['v1', 80], ['v2', 20]], `${s}: canary split`);
    }
  }],
  ['ingress_routes_match_the_policies', async (c) => {
    const gw = c.of('Gateway').find((g) => g.metadata.name === 'iotsuite-ingress');
    assert(gw, 'the ingress Gateway');
    const devices = c.of('VirtualService').find((v) => v.metadata.name === 'iotsuite-devices');
    const api = c.of('VirtualService').find((v) => v.metadata.name === 'iotsuite-api');
    for (const vs of [devices, api]) {
      eq(vs.spec.gateways, ['iotsuite-ingress'], `${vs.metadata.name} gateways`);
      for (const h of vs.spec.hosts) {
        assert(gw.spec.servers.some((sv) => sv.hosts.includes(`${NS}/${h}`)), `${vs.metadata.name}: host ${h} is served by the Gateway`);
      }
    }
    // Each device method routed by the ingress is allowed from the ingress, and the reverse.
    const routed = new Set();
    for (const h of devices.spec.http) for (const x of h.match) {
      const m = /^\^(\/[\w\\.]+\/)\(([^)]*)\)\$$/.exec(x.uri.regex);
      assert(m, `device route ${x.uri.regex}`);
      for (const n of m[2].split('|')) routed.add(m[1].replace(/\\/g, '') + n);
    }
    const allowed = new Set();
    for (const p of c.of('AuthorizationPolicy')) for (const r of p.spec.rules || []) {
      if (r.from.some((f) => f.source.principals.includes(INGRESS))) for (const t of r.to) for (const x of t.operation.paths || []) allowed.add(x);
    }
    eq([...routed].sort(), [...allowed].sort(), 'device methods routed = device methods allowed');
    // East-west: AUTO_PASSTHROUGH on 15443.
    const ew = c.of('Gateway').find((g) => g.metadata.name === 'cross-network-gateway');
    eq(ew.spec.servers.map((sv) => [sv.port.number, sv.tls.mode]), [[15443, 'AUTO_PASSTHROUGH']], 'east-west gateway');
  }],
];

run('deploy_istio', tests, setup, async () => {});
