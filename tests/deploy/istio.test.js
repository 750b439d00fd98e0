// Checks of deploy/istio (no mesh can run here): every manifest validated with
// @kubernetes-models/istio and type-checked by tsc (misspelled fields fail), yamllint, and the
// cross-references no schema checks, against the chart rendered as release "iot" in namespace "iot":
// hosts are chart Services, subsets exist, principals are chart ServiceAccounts, the allow-list is
// exactly the call graph the chart configures (*_ADDR), retries only on idempotent methods.
'use strict';

const path = require('path');
const fs = require('fs');
const os = require('os');
const {
  root, chart, SERVICES, check, assert, finish, helmTemplate, parseAll, validateAll, tscObjects, yamllint,
} = require('./lib');

const dir = path.join(root, 'deploy', 'istio');
const tmp = fs.mkdtempSync(path.join(process.env.IOT_TEST_TMP || os.tmpdir(), 'istio-'));
const NS = 'iot';
const INGRESS_SA = 'cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account';
// gRPC methods the mesh may retry: reads, and CheckForUpdate (a read for the device).
const sortKeys = (v) => (Array.isArray(v) ? v.map(sortKeys)
  : v && typeof v === 'object' ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, sortKeys(v[k])])) : v);
const IDEMPOTENT = /^(Get|List|Count|Query|Discover|LatestValues|CheckForUpdate)/;

async function main() {
  const files = fs.readdirSync(dir).filter((f) => f.endsWith('.yaml')).sort();
  const objs = [];
  check(`deploy/istio parses (${files.length} files)`, () => {
    for (const f of files) {
      for (const o of parseAll(fs.readFileSync(path.join(dir, f), 'utf8'))) objs.push(Object.assign(o, { __file: f }));
    }
    assert(objs.length > 0, 'no objects');
  });
  const plain = objs.map((o) => { const c = { ...o }; delete c.__file; return c; });

  const errors = await validateAll(plain);
  check(`${plain.length} objects valid against the Istio schemas`, () => assert(errors.length === 0, errors.join('\n')));
  check('tsc --noEmit: no unknown or misspelled fields', () => {
    const r = tscObjects(path.join(tmp, 'tsc'), objs.map((o, i) => [o.__file, plain[i]]));
    assert(r.status === 0, (r.stdout + r.stderr).split('\n').slice(0, 40).join('\n'));
  });
  check('yamllint deploy/istio', () => {
    const r = yamllint(files.map((f) => path.join(dir, f)));
    assert(r.status === 0, r.stdout + r.stderr);
  });

  // The chart as deploy/istio expects it: release iot, namespace iot, default values.
  const chartObjs = parseAll(helmTemplate([]));
  const services = new Map(chartObjs.filter((o) => o.kind === 'Service').map((o) => [`${o.metadata.name}.${NS}.svc.cluster.local`, o]));
  const accounts = new Set(chartObjs.filter((o) => o.kind === 'ServiceAccount').map((o) => `cluster.local/ns/${NS}/sa/${o.metadata.name}`));
  const byKind = (k) => objs.filter((o) => o.kind === k);
  const svcOfHost = (h) => services.get(h) && services.get(h).metadata.labels['app.kubernetes.io/name'];

  check('a STRICT PeerAuthentication covers the namespace', () => {
    const pa = byKind('PeerAuthentication').find((o) => o.metadata.namespace === NS && !o.spec.selector);
    assert(pa && pa.spec.mtls.mode === 'STRICT', 'no namespace-wide STRICT PeerAuthentication');
    for (const o of byKind('PeerAuthentication')) {
      for (const [port, m] of Object.entries(o.spec.portLevelMtls || {})) {
        const admin = chartObjs.some((s) => s.kind === 'Service' && s.spec.ports.some((p) => p.port === Number(port) && p.name.startsWith('http-admin')));
        assert(m.mode === 'STRICT' || admin, `${o.metadata.name}: port ${port} relaxed to ${m.mode} but is no admin port`);
      }
    }
  });

  check('every service has a DestinationRule with ISTIO_MUTUAL, pools, outlier detection, v1/v2 subsets', () => {
    for (const s of SERVICES) {
      const host = `iot-${s}.${NS}.svc.cluster.local`;
      assert(services.has(host), `${host} is no chart Service`);
      const dr = byKind('DestinationRule').find((o) => o.spec.host === host);
      assert(dr, `${s}: no DestinationRule`);
      const tp = dr.spec.trafficPolicy;
      assert(tp.tls && tp.tls.mode === 'ISTIO_MUTUAL', `${s}: tls not ISTIO_MUTUAL`);
      assert(tp.connectionPool && tp.outlierDetection, `${s}: no connection pool or outlier detection`);
      assert(tp.loadBalancer && tp.loadBalancer.localityLbSetting && tp.loadBalancer.localityLbSetting.enabled, `${s}: no locality failover`);
      const names = (dr.spec.subsets || []).map((x) => x.name).sort().join(',');
      assert(names === 'v1,v2', `${s}: subsets ${names}`);
    }
  });

  check('every VirtualService host is a chart Service, every subset exists, every gateway resolves', () => {
    const gateways = new Set(byKind('Gateway').map((g) => `${g.metadata.namespace}/${g.metadata.name}`));
    for (const vs of byKind('VirtualService')) {
      for (const g of vs.spec.gateways || []) assert(gateways.has(g), `${vs.metadata.name}: gateway ${g} not defined`);
      if (!vs.spec.gateways) for (const h of vs.spec.hosts) assert(services.has(h), `${vs.metadata.name}: host ${h} is no chart Service`);
      for (const r of vs.spec.http || []) {
        let total = 0;
        for (const d of r.route) {
          const host = d.destination.host;
          assert(services.has(host), `${vs.metadata.name}/${r.name}: destination ${host} is no chart Service`);
          const dr = byKind('DestinationRule').find((o) => o.spec.host === host);
          if (d.destination.subset) {
            assert(dr && dr.spec.subsets.some((x) => x.name === d.destination.subset), `${vs.metadata.name}/${r.name}: subset ${d.destination.subset} of ${host} not defined`);
          }
          if (d.destination.port) {
            assert(services.get(host).spec.ports.some((p) => p.port === d.destination.port.number), `${vs.metadata.name}/${r.name}: ${host} has no port ${d.destination.port.number}`);
          }
          total += d.weight === undefined ? 100 : d.weight;
        }
        assert(total === 100, `${vs.metadata.name}/${r.name}: weights add up to ${total}`);
      }
    }
  });

  check('every mesh service has a VirtualService; every route (ingress too) splits 80/20 between v1 and v2', () => {
    for (const s of SERVICES) {
      const vs = byKind('VirtualService').find((o) => !o.spec.gateways && o.spec.hosts.includes(`iot-${s}.${NS}.svc.cluster.local`));
      assert(vs, `${s}: no VirtualService`);
    }
    for (const vs of byKind('VirtualService')) {
      for (const r of vs.spec.http) {
        const split = r.route.map((d) => `${d.destination.subset}=${d.weight}`).sort().join(',');
        assert(split === 'v1=80,v2=20', `${vs.metadata.name}/${r.name}: routes ${split}`);
      }
    }
  });

  const apiOf = {
    registry: 'iot.registry.v1.Registry', 'device-mgmt': 'iot.device.v1.DeviceManager', ingest: 'iot.ingest.v1.Ingest',
    processing: 'iot.processing.v1.Processing', ota: 'iot.ota.v1.Ota',
  };
  // The gRPC methods of each service, from proto/: the routes must treat each one as what it is.
  const protoMethods = new Map();   // "/pkg.Service/Method" -> { streaming }
  for (const f of fs.readdirSync(path.join(root, 'proto'), { recursive: true }).filter((x) => x.endsWith('.proto'))) {
    {
      const text = fs.readFileSync(path.join(root, 'proto', f), 'utf8');
      const pkg = /^package\s+([\w.]+);/m.exec(text);
      for (const svc of text.matchAll(/^service\s+(\w+)\s*\{([\s\S]*?)^\}/gm)) {
        for (const m of svc[2].matchAll(/rpc\s+(\w+)\s*\(\s*(stream\s+)?[\w.]+\s*\)\s*returns\s*\(\s*(stream\s+)?/g)) {
          protoMethods.set(`/${pkg[1]}.${svc[1]}/${m[1]}`, { streaming: Boolean(m[2] || m[3]) });
        }
      }
    }
  }
  // Istio's matching: the first route with a matching condition; regexes are RE2, fully anchored.
  const uriMatches = (u, p) => (u.exact !== undefined ? u.exact === p : u.prefix !== undefined ? p.startsWith(u.prefix)
    : new RegExp(`^(?:${u.regex})$`).test(p));
  const routeFor = (vs, p) => vs.spec.http.find((r) => !r.match || r.match.some((m) =>
    (!m.uri || uriMatches(m.uri, p)) && (!m.method || m.method.exact === 'POST')));
  const isZero = (t) => /^0+(s|ms)?$/.test(t || '');

  check(`every gRPC method of proto/ (${protoMethods.size}) is routed as what it is: streams without timeout or retries, unary with a timeout, retries only for idempotent methods`, () => {
    assert(protoMethods.size > 50, `only ${protoMethods.size} methods parsed from proto/`);
    let routed = 0;
    for (const vs of byKind('VirtualService')) {
      // The REST gateway serves no gRPC API of its own (its routes are checked above).
      if (svcOfHost(vs.spec.http[0].route[0].destination.host) === 'gateway') continue;
      const host = vs.spec.gateways ? null : vs.spec.hosts[0];
      for (const [p, info] of protoMethods) {
        // In the mesh, a method goes to its own service's host; the ingress sees every path.
        if (host && apiOf[svcOfHost(host)] !== p.split('/')[1]) continue;
        const r = routeFor(vs, p);
        if (!r) continue;    // no route: the ingress refuses it (checked below for device methods)
        routed++;
        const name = `${vs.metadata.name}/${r.name}: ${p}`;
        const retried = r.retries && r.retries.attempts > 0;
        if (info.streaming) {
          assert(isZero(r.timeout), `${name} is a stream but the route times out after ${r.timeout}`);
          assert(!retried, `${name} is a stream but the route retries it`);
        } else {
          assert(r.timeout && !isZero(r.timeout), `${name} is unary but the route has no timeout`);
        }
        assert(r.retries && r.retries.attempts !== undefined, `${name}: retries not set (Istio's default retries writes)`);
        if (retried) assert(IDEMPOTENT.test(p.split('/')[2]), `${name} is retried but is not idempotent`);
      }
    }
    assert(routed >= protoMethods.size - 10, `only ${routed} routings checked`);
  });

  check('every method a route or policy names exists in proto/ (no dead regex or path)', () => {
    const methods = [...protoMethods.keys()];
    for (const vs of byKind('VirtualService')) {
      for (const r of vs.spec.http) {
        for (const m of r.match || []) {
          if (!m.uri || m.uri.prefix === '/grpc.health.v1.Health/Check') continue;
          if (svcOfHost(r.route[0].destination.host) === 'gateway') continue;   // REST paths
          assert(methods.some((p) => uriMatches(m.uri, p)), `${vs.metadata.name}/${r.name}: ${JSON.stringify(m.uri)} matches no method`);
          const alts = /\/\((.*)\)\$$/.exec(m.uri.regex || '');
          // A list of names (not a pattern like (Get|List)[A-Za-z]*): each must be a method.
          for (const a of alts && !/[()]/.test(alts[1]) ? alts[1].split('|') : []) {
            assert(methods.some((p) => p.endsWith(`/${a}`)), `${vs.metadata.name}/${r.name}: ${a} is no method`);
          }
        }
      }
    }
    for (const ap of byKind('AuthorizationPolicy')) {
      for (const rule of ap.spec.rules || []) {
        for (const t of rule.to || []) {
          for (const p of t.operation.paths || []) {
            if (p.endsWith('/*') || /^\/(metrics|healthz|readyz)$/.test(p) || p.startsWith('/grpc.health.v1.')) continue;
            assert(protoMethods.has(p), `${ap.metadata.name}: path ${p} is no method`);
          }
        }
      }
    }
  });

  check('the ingress routes exactly the device methods the AuthorizationPolicies let the ingress gateway call', () => {
    const vs = byKind('VirtualService').find((o) => o.metadata.name === 'iot-ingress-devices');
    assert(vs, 'no iot-ingress-devices VirtualService');
    const routed = new Set(vs.spec.http.flatMap((r) => r.match.map((m) => m.uri.exact)));
    const allowed = new Set();
    for (const ap of byKind('AuthorizationPolicy')) {
      if (ap.metadata.name === 'iot-gateway') continue;
      for (const rule of ap.spec.rules || []) {
        if (!(rule.from || []).some((f) => (f.source.principals || []).includes(INGRESS_SA))) continue;
        for (const t of rule.to) for (const p of t.operation.paths) allowed.add(p);
      }
    }
    const a = [...routed].sort().join(' '), b = [...allowed].sort().join(' ');
    assert(a === b, `routed: ${a}\nallowed: ${b}`);
    for (const r of vs.spec.http) {
      for (const d of r.route) {
        const host = d.destination.host;
        for (const m of r.match) assert(apiOf[svcOfHost(host)] === m.uri.exact.split('/')[1], `${r.name}: ${m.uri.exact} routed to ${host}`);
        assert(services.get(host).spec.ports.some((p) => p.name === 'grpc-api' && p.port === d.destination.port.number), `${r.name}: port ${d.destination.port.number} is not the gRPC port of ${host}`);
      }
    }
  });

  check('retries only on idempotent gRPC methods (by path), never on writes or streams', () => {
    for (const vs of byKind('VirtualService')) {
      for (const r of vs.spec.http || []) {
        if (!r.retries || !r.retries.attempts) continue;
        assert(r.match && r.match.length, `${vs.metadata.name}/${r.name}: retries on a catch-all route`);
        for (const m of r.match) {
          if (m.method) { assert(m.method.exact === 'GET', `${vs.metadata.name}/${r.name}: retried ${m.method.exact}`); continue; }
          assert(m.uri, `${vs.metadata.name}/${r.name}: retried match without a path`);
          if (m.uri.prefix === '/grpc.health.v1.Health/Check') continue;
          if (m.uri.exact) { assert(IDEMPOTENT.test(m.uri.exact.split('/')[2]), `${vs.metadata.name}/${r.name}: retries ${m.uri.exact}, not idempotent`); continue; }
          const re = m.uri.regex || '';
          const alts = /\/\((.*)\)\$$/.exec(re);
          assert(alts, `${vs.metadata.name}/${r.name}: retried path ${JSON.stringify(m.uri)} is not a method list`);
          for (const a of alts[1].split('|')) {
            assert(IDEMPOTENT.test(a.replace(/^\(/, '')), `${vs.metadata.name}/${r.name}: retries ${a}, not idempotent`);
          }
        }
        assert(r.timeout && r.retries.perTryTimeout, `${vs.metadata.name}/${r.name}: retries without timeouts`);
      }
    }
  });

  check('every AuthorizationPolicy principal is a chart ServiceAccount or the ingress gateway', () => {
    for (const ap of byKind('AuthorizationPolicy')) {
      for (const rule of ap.spec.rules || []) {
        for (const f of rule.from || []) {
          for (const p of f.source.principals || []) {
            assert(accounts.has(p) || p === INGRESS_SA, `${ap.metadata.name}: principal ${p} is no ServiceAccount of the chart`);
          }
        }
      }
      if (ap.spec.selector) {
        const sel = ap.spec.selector.matchLabels;
        const hits = chartObjs.filter((o) => o.kind === 'Deployment' &&
          Object.entries(sel).every(([k, v]) => o.spec.template.metadata.labels[k] === v));
        assert(hits.length === 1, `${ap.metadata.name}: selector matches ${hits.length} Deployments`);
      }
    }
  });

  check('the allow-list is exactly the call graph the chart configures (*_ADDR), plus registry health checks', () => {
    // Expected: caller -> callee from every *_ADDR value in the chart's ConfigMaps.
    const want = new Set();
    for (const cm of chartObjs.filter((o) => o.kind === 'ConfigMap')) {
      const caller = cm.metadata.labels['app.kubernetes.io/name'];
      for (const [k, v] of Object.entries(cm.data || {})) {
        if (!/_ADDR$/.test(k) || k === 'IOT_ADVERTISE_ADDR' || k === 'IOT_REDIS_ADDR') continue;
        const callee = svcOfHost(`${v.split(':')[0]}.${NS}.svc.cluster.local`);
        assert(callee, `${caller}: ${k}=${v} is no chart Service`);
        want.add(`${caller}->${callee}`);
      }
    }
    const got = new Set();
    for (const ap of byKind('AuthorizationPolicy')) {
      if (!ap.spec.selector) continue;
      const callee = ap.spec.selector.matchLabels['app.kubernetes.io/name'];
      for (const rule of ap.spec.rules || []) {
        const paths = rule.to.flatMap((t) => t.operation.paths || []);
        const healthOnly = paths.length > 0 && paths.every((p) => p.startsWith('/grpc.health.v1.Health/'));
        for (const f of rule.from || []) {
          for (const p of f.source.principals || []) {
            if (p === INGRESS_SA) continue;
            const caller = p.replace(`cluster.local/ns/${NS}/sa/iot-`, '');
            if (caller === 'registry' && healthOnly) continue;   // the registry's active checks
            got.add(`${caller}->${callee}`);
          }
        }
      }
    }
    const missing = [...want].filter((e) => !got.has(e));
    const extra = [...got].filter((e) => !want.has(e));
    assert(!missing.length && !extra.length, `missing: ${missing.join(' ')}; not in the call graph: ${extra.join(' ')}`);
  });

  check('devices come in only through the ingress gateway, to device methods only', () => {
    for (const ap of byKind('AuthorizationPolicy')) {
      for (const rule of ap.spec.rules || []) {
        const fromIngress = (rule.from || []).some((f) => (f.source.principals || []).includes(INGRESS_SA));
        if (!rule.from) {
          // Unauthenticated: only GETs of the admin endpoints.
          for (const t of rule.to) {
            assert(JSON.stringify(t.operation.methods) === '["GET"]', `${ap.metadata.name}: open rule allows ${t.operation.methods}`);
            assert(t.operation.paths.every((p) => ['/metrics', '/healthz', '/readyz'].includes(p)), `${ap.metadata.name}: open rule allows ${t.operation.paths}`);
          }
        }
        if (fromIngress && ap.metadata.name !== 'iot-gateway') {
          for (const t of rule.to) for (const p of t.operation.paths) assert(!p.endsWith('*'), `${ap.metadata.name}: ingress may call ${p}`);
        }
      }
    }
  });

  check('the chart\'s istio.enabled templates render the same objects as deploy/istio (release iot, ci/istio-values.yaml)', () => {
    const rendered = parseAll(helmTemplate([path.join(chart, 'ci', 'istio-values.yaml')]))
      .filter((o) => /\.istio\.io\//.test(o.apiVersion));
    assert(rendered.length > 0, 'istio.enabled rendered nothing');
    const key = (o) => `${o.kind}/${o.metadata.namespace}/${o.metadata.name}`;
    const plainByKey = new Map(plain.map((o) => [key(o), o]));
    const diffs = [];
    for (const o of rendered) {
      const p = plainByKey.get(key(o));
      // The bundled databases' policies exist only in the chart (deploy/istio assumes external ones).
      if (!p && o.kind === 'AuthorizationPolicy' && /^iot-(postgresql|redis)$/.test(o.metadata.name)) continue;
      if (!p) { diffs.push(`${key(o)}: rendered by the chart, not in deploy/istio`); continue; }
      plainByKey.delete(key(o));
      if (JSON.stringify(sortKeys(o.spec)) !== JSON.stringify(sortKeys(p.spec))) {
        diffs.push(`${key(o)}: spec differs\n    chart: ${JSON.stringify(sortKeys(o.spec))}\n    file:  ${JSON.stringify(sortKeys(p.spec))}`);
      }
    }
    // The east-west gateway belongs to each cluster's istio-system, not to a release: file only.
    for (const k of plainByKey.keys()) {
      if (!/^Gateway\/istio-system\//.test(k)) diffs.push(`${k}: in deploy/istio, not rendered by the chart`);
    }
    assert(diffs.length === 0, diffs.join('\n'));
  });

  check('istio.enabled with bundled databases lets exactly the services that use them in', () => {
    const objs2 = parseAll(helmTemplate([path.join(chart, 'ci', 'istio-values.yaml')]));
    const want = { 'iot-postgresql': ['device-mgmt', 'gateway', 'ingest', 'ota', 'processing'], 'iot-redis': ['device-mgmt', 'ingest', 'processing', 'registry'] };
    for (const [name, users] of Object.entries(want)) {
      const ap = objs2.find((o) => o.kind === 'AuthorizationPolicy' && o.metadata.name === name);
      assert(ap, `no AuthorizationPolicy ${name}`);
      const got = ap.spec.rules[0].from[0].source.principals.map((p) => p.replace(`cluster.local/ns/${NS}/sa/iot-`, '')).join(',');
      assert(got === users.join(','), `${name}: ${got}`);
      const sel = ap.spec.selector.matchLabels;
      assert(objs2.some((o) => o.kind === 'StatefulSet' && Object.entries(sel).every(([k, v]) => o.spec.template.metadata.labels[k] === v)), `${name}: selector matches no StatefulSet`);
    }
  });

  check('east-west gateway: 15443, TLS, AUTO_PASSTHROUGH', () => {
    const ew = byKind('Gateway').find((g) => g.spec.servers.some((s) => s.port.number === 15443));
    assert(ew, 'no Gateway on 15443');
    const s = ew.spec.servers.find((x) => x.port.number === 15443);
    assert(s.port.protocol === 'TLS' && s.tls.mode === 'AUTO_PASSTHROUGH', `15443: ${s.port.protocol} ${s.tls.mode}`);
  });
}

main().catch((e) => { check('no exception', () => { throw e; }); }).finally(() => finish('istio', tmp));
