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

  check('every mesh service has a VirtualService with canary weights', () => {
    for (const s of SERVICES) {
      const vs = byKind('VirtualService').find((o) => !o.spec.gateways && o.spec.hosts.includes(`iot-${s}.${NS}.svc.cluster.local`));
      assert(vs, `${s}: no VirtualService`);
      for (const r of vs.spec.http) {
        const subsets = r.route.map((d) => d.destination.subset).sort().join(',');
        assert(subsets === 'v1,v2', `${s}/${r.name}: routes to ${subsets}`);
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
    // The ingress and east-west gateways are installation-specific (hosts, certificates): files only.
    for (const k of plainByKey.keys()) {
      if (!/^(Gateway\/|VirtualService\/iot\/iot-ingress-)/.test(k)) diffs.push(`${k}: in deploy/istio, not rendered by the chart`);
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
