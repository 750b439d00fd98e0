// Checks of deploy/helm/iotsuite that need no cluster: helm lint --strict and helm template with the
// default values and every file under the chart's ci/; every rendered object validated against the
// Kubernetes schemas (kubernetes-models .validate()) and type-checked by tsc as a literal of the
// model's interface (so misspelled or misplaced fields fail too); yamllint on values files and the
// rendered output; checks no schema does (env names against each binary's --help, ports and probes,
// a PDB/HPA/ServiceAccount per Deployment); values files that values.schema.json must refuse.
// Prints like the C tests: "ok - ..." / "not ok - ..." and "chart: N passed, N failed".
'use strict';

const path = require('path');
const fs = require('fs');
const os = require('os');
const YAML = require('yaml');
const {
  chart, SERVICES, KUBE_VERSION, check, assert, finish, run, helm, helmTemplate, parseAll,
  validateAll, tsc, tscObjects, yamllint, helpText, helpNames,
} = require('./lib');

const tmp = fs.mkdtempSync(path.join(process.env.IOT_TEST_TMP || os.tmpdir(), 'chart-'));

// Default ports of each binary (IOT_GRPC_LISTEN / IOT_ADMIN_LISTEN / IOT_GW_HTTP_LISTEN defaults).
function helpPorts(svc) {
  const ports = {};
  for (const m of helpText(svc).matchAll(/^\s+(IOT_GRPC_LISTEN|IOT_ADMIN_LISTEN|IOT_GW_HTTP_LISTEN)\s.*default "[^"]*:(\d+)"/gm)) {
    ports[m[1]] = Number(m[2]);
  }
  return ports;
}

// The scenarios: the chart's default values and every file under ci/ (helm's convention).
const scenarios = [{ name: 'default values', files: [] }];
for (const f of fs.readdirSync(path.join(chart, 'ci')).sort()) {
  if (f.endsWith('.yaml')) scenarios.push({ name: `ci/${f}`, files: [path.join(chart, 'ci', f)] });
}

// The env names of each Deployment (env and its ConfigMaps) that its binary does not read, and the
// settings a binary needs that are missing.
function unknownEnvNames(objs, help) {
  const bad = [];
  for (const d of objs.filter((o) => o.kind === 'Deployment')) {
    const svc = d.metadata.labels['app.kubernetes.io/name'];
    const names = new Set();
    const c = d.spec.template.spec.containers[0];
    for (const e of c.env || []) names.add(e.name);
    for (const ef of c.envFrom || []) {
      const cm = objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name === ef.configMapRef.name);
      if (!cm) { bad.push(`${svc}: ConfigMap ${ef.configMapRef.name} not rendered`); continue; }
      Object.keys(cm.data || {}).forEach((k) => names.add(k));
    }
    for (const n of names) {
      if (n.startsWith('IOT_') && !help[svc].has(n)) bad.push(`${svc}: ${n}`);
      if (!n.startsWith('IOT_') && n !== 'PGPASSWORD') bad.push(`${svc}: ${n} (not an IOT_ name or libpq's PGPASSWORD)`);
    }
    for (const must of ['IOT_GRPC_LISTEN', 'IOT_ADMIN_LISTEN', 'IOT_PG_DSN', 'IOT_REDIS_ADDR']) {
      if (help[svc].has(must) && !names.has(must)) bad.push(`${svc}: ${must} not set`);
    }
    // Every address of another service the binary reads is set (the defaults are loopback).
    for (const n of help[svc]) {
      if (/^IOT_[A-Z]+_(DM|INGEST|PROC|OTA|REGISTRY)_ADDR$/.test(n) && !names.has(n)) bad.push(`${svc}: ${n} not set`);
    }
  }
  return bad;
}

async function main() {
  const rendered = {};   // scenario name -> list of objects
  const renderedText = {};

  for (const sc of scenarios) {
    check(`helm lint --strict (${sc.name})`, () => {
      const args = ['lint', '--strict', chart, '--kube-version', KUBE_VERSION];
      for (const f of sc.files) args.push('-f', f);
      const r = run(helm(), args);
      assert(r.status === 0, r.stdout + r.stderr);
    });
    check(`helm template (${sc.name})`, () => {
      renderedText[sc.name] = helmTemplate(sc.files);
      rendered[sc.name] = parseAll(renderedText[sc.name]);
      assert(rendered[sc.name].length > 0, 'nothing rendered');
    });
  }

  // Schema validation of every rendered object.
  for (const sc of scenarios) {
    const objs = rendered[sc.name] || [];
    const errors = await validateAll(objs);
    check(`${objs.length} objects valid against the Kubernetes schemas (${sc.name})`, () => {
      assert(objs.length > 0, 'no objects');
      assert(errors.length === 0, errors.join('\n'));
    });
  }

  // Excess-property check: each object as a literal typed with its model's interface.
  check('tsc --noEmit: no unknown or misspelled fields in any rendered object', () => {
    const labelled = scenarios.flatMap((sc) => (rendered[sc.name] || []).map((o) => [sc.name, o]));
    assert(labelled.length > 0, 'no objects');
    const r = tscObjects(path.join(tmp, 'tsc'), labelled);
    assert(r.status === 0, (r.stdout + r.stderr).split('\n').slice(0, 40).join('\n'));
  });

  // The tsc check must catch misspelled fields (else it checks nothing).
  check('tsc check refuses misspelled fields, also deep inside (replica, imagePullPolcy)', () => {
    const r = tsc(path.join(tmp, 'tsc-neg'),
      'import type { IDeployment } from "kubernetes-models/apps/v1/Deployment";\n' +
      'export const d: IDeployment = { apiVersion: "apps/v1", kind: "Deployment", metadata: { name: "x" },\n' +
      '  spec: { replica: 2, selector: {}, template: {} } };\n' +
      'export const e: IDeployment = { apiVersion: "apps/v1", kind: "Deployment", metadata: { name: "y" },\n' +
      '  spec: { selector: {}, template: { spec: { containers: [{ name: "c", imagePullPolcy: "Always" }] } } } };\n');
    assert(r.status !== 0 && /'replica'/.test(r.stdout) && /'imagePullPolcy'/.test(r.stdout), `tsc accepted it: ${r.stdout}`);
  });

  check('yamllint: values files and rendered output', () => {
    const files = [path.join(chart, 'values.yaml'), ...scenarios.flatMap((s) => s.files)];
    for (const sc of scenarios) {
      const f = path.join(tmp, `rendered-${sc.name.replace(/[^A-Za-z0-9.-]/g, '_')}.yaml`);
      fs.writeFileSync(f, renderedText[sc.name] || '');
      files.push(f);
    }
    const r = yamllint(files);
    assert(r.status === 0, r.stdout + r.stderr);
  });

  // Checks no schema does.
  const help = {}, ports = {};
  check('every service binary answers --help', () => {
    for (const s of SERVICES) { help[s] = helpNames(s); ports[s] = helpPorts(s); }
  });

  for (const sc of scenarios) {
    const objs = rendered[sc.name] || [];
    const byKind = (k) => objs.filter((o) => o.kind === k);
    const deployments = byKind('Deployment');
    const component = (o) => o.metadata.labels['app.kubernetes.io/name'];

    check(`every IOT_* name the chart gives a service is one its binary reads (${sc.name})`, () => {
      assert(deployments.length === SERVICES.length, `${deployments.length} Deployments`);
      const bad = unknownEnvNames(objs, help);
      assert(bad.length === 0, `names the binaries do not read:\n${bad.join('\n')}`);
    });

    check(`Services declare every port the binaries listen on, named grpc-*/http-* (${sc.name})`, () => {
      for (const d of deployments) {
        const svc = component(d);
        const c = d.spec.template.spec.containers[0];
        const cm = objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name === c.envFrom[0].configMapRef.name);
        const service = objs.find((o) => o.kind === 'Service' && o.metadata.name === d.metadata.name);
        assert(service, `${svc}: no Service`);
        const listens = ['IOT_GRPC_LISTEN', 'IOT_ADMIN_LISTEN', 'IOT_GW_HTTP_LISTEN']
          .filter((k) => help[svc].has(k))
          .map((k) => [k, Number(((cm.data || {})[k] || `:${ports[svc][k]}`).split(':').pop())]);
        for (const [k, port] of listens) {
          const cp = c.ports.find((p) => p.containerPort === port);
          assert(cp, `${svc}: ${k} port ${port} not a containerPort`);
          const sp = service.spec.ports.find((p) => p.targetPort === cp.name || p.targetPort === port);
          assert(sp, `${svc}: ${k} port ${port} not in Service ${service.metadata.name}`);
          const want = k === 'IOT_GRPC_LISTEN' ? /^grpc(-|$)/ : /^http(-|$)/;
          assert(want.test(sp.name), `${svc}: Service port ${sp.name} for ${k} should match ${want}`);
        }
        for (const sel of Object.entries(service.spec.selector)) {
          assert(d.spec.template.metadata.labels[sel[0]] === sel[1], `${svc}: Service selector ${sel} misses the pods`);
        }
      }
    });

    check(`probes are gRPC probes on the gRPC port: start-up and liveness on "liveness", readiness on "" (${sc.name})`, () => {
      for (const d of deployments) {
        const svc = component(d);
        const c = d.spec.template.spec.containers[0];
        const grpcPort = c.ports.find((p) => p.name === 'grpc-api').containerPort;
        for (const [p, service] of [['startupProbe', 'liveness'], ['livenessProbe', 'liveness'], ['readinessProbe', undefined]]) {
          assert(c[p] && c[p].grpc, `${svc}: ${p} is not a grpc probe`);
          assert(c[p].grpc.port === grpcPort, `${svc}: ${p} port ${c[p].grpc.port}, gRPC listens on ${grpcPort}`);
          assert(c[p].grpc.service === service, `${svc}: ${p} asks for service ${c[p].grpc.service}, want ${service}`);
        }
      }
    });

    check(`every Deployment has a ServiceAccount, PDB and HPA (unless scaled by hand), version label, hardened pod (${sc.name})`, () => {
      for (const d of deployments) {
        const svc = component(d);
        const t = d.spec.template;
        const sa = t.spec.serviceAccountName;
        assert(byKind('ServiceAccount').some((o) => o.metadata.name === sa), `${svc}: ServiceAccount ${sa} not rendered`);
        const selects = (o) => Object.entries(o.spec.selector.matchLabels).every(([k, v]) => t.metadata.labels[k] === v);
        assert(byKind('PodDisruptionBudget').some(selects), `${svc}: no PodDisruptionBudget`);
        const hpa = byKind('HorizontalPodAutoscaler').find((o) => o.spec.scaleTargetRef.name === d.metadata.name);
        assert(hpa || d.spec.replicas, `${svc}: neither an HPA nor replicas`);
        assert(!(hpa && d.spec.replicas), `${svc}: replicas set although an HPA scales it`);
        assert(t.metadata.labels.version, `${svc}: no version label`);
        for (const l of ['name', 'instance', 'version', 'part-of', 'managed-by']) {
          assert(t.metadata.labels[`app.kubernetes.io/${l}`], `${svc}: no app.kubernetes.io/${l}`);
        }
        const c = t.spec.containers[0];
        assert(t.spec.securityContext.runAsNonRoot === true, `${svc}: pod not runAsNonRoot`);
        assert(c.securityContext.readOnlyRootFilesystem === true, `${svc}: root filesystem writable`);
        assert(c.securityContext.allowPrivilegeEscalation === false, `${svc}: privilege escalation allowed`);
        assert((c.securityContext.capabilities.drop || []).includes('ALL'), `${svc}: capabilities not dropped`);
        assert(c.volumeMounts.some((m) => m.mountPath === '/tmp'), `${svc}: no /tmp volume`);
        assert(c.resources && c.resources.requests, `${svc}: no resource requests`);
        assert((t.spec.topologySpreadConstraints || []).length > 0, `${svc}: no topology spread`);
      }
    });

    check(`every secretKeyRef and configMapRef names an object the chart renders or the values name (${sc.name})`, () => {
      const values = Object.assign({}, ...sc.files.map((f) => YAML.parse(fs.readFileSync(f, 'utf8'))));
      const external = new Set([
        values.database && values.database.existingSecret,
        values.redis && values.redis.existingSecret,
        values.postgresql && values.postgresql.existingSecret,
        values.gateway && values.gateway.bootstrapKeyExistingSecret,
        values.ota && values.ota.signingKeysExistingSecret,
      ].filter(Boolean));
      const secrets = new Map(byKind('Secret').map((s) => [s.metadata.name, s]));
      for (const w of [...deployments, ...byKind('StatefulSet')]) {
        const spec = w.spec.template.spec;
        for (const c of spec.containers) {
          for (const e of c.env || []) {
            const ref = e.valueFrom && e.valueFrom.secretKeyRef;
            if (!ref) continue;
            if (external.has(ref.name)) continue;
            const s = secrets.get(ref.name);
            assert(s, `${w.metadata.name}: ${e.name} from Secret ${ref.name}, which is not rendered`);
            assert(s.data && ref.key in s.data, `${w.metadata.name}: Secret ${ref.name} has no key ${ref.key}`);
          }
        }
        for (const v of spec.volumes || []) {
          if (v.secret && !external.has(v.secret.secretName)) {
            assert(secrets.has(v.secret.secretName), `${w.metadata.name}: volume Secret ${v.secret.secretName} not rendered`);
          }
        }
      }
    });
  }

  // Scenario-specific expectations.
  check('default values: bundled Postgres and Redis StatefulSets with PVCs, services pointed at them', () => {
    const objs = rendered['default values'];
    const sts = objs.filter((o) => o.kind === 'StatefulSet').map((o) => o.metadata.name).sort();
    assert(JSON.stringify(sts) === '["iot-postgresql","iot-redis"]', `StatefulSets ${sts}`);
    for (const s of objs.filter((o) => o.kind === 'StatefulSet')) {
      assert((s.spec.volumeClaimTemplates || []).length === 1, `${s.metadata.name}: no PVC template`);
    }
    const cm = objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name === 'iot-ingest');
    assert(cm.data.IOT_REDIS_ADDR === 'iot-redis:6379', `ingest IOT_REDIS_ADDR ${cm.data.IOT_REDIS_ADDR}`);
    assert(cm.data.IOT_INGEST_DM_ADDR === 'iot-device-mgmt:7002', `ingest IOT_INGEST_DM_ADDR ${cm.data.IOT_INGEST_DM_ADDR}`);
  });
  check('ci/external-values.yaml: no StatefulSet, DSN and keys from the named Secrets', () => {
    const objs = rendered['ci/external-values.yaml'];
    assert(!objs.some((o) => o.kind === 'StatefulSet'), 'a StatefulSet was rendered');
    const gw = objs.find((o) => o.kind === 'Deployment' && o.metadata.name === 'iot-gateway');
    const env = Object.fromEntries(gw.spec.template.spec.containers[0].env.map((e) => [e.name, e]));
    assert(env.IOT_PG_DSN.valueFrom.secretKeyRef.name === 'iotsuite-postgres', 'DSN not from iotsuite-postgres');
    assert(env.IOT_GW_BOOTSTRAP_KEY.valueFrom.secretKeyRef.key === 'admin-key', 'bootstrap key not from admin-key');
    assert(gw.spec.template.metadata.labels.version === 'v2', 'version label not v2');
    assert(gw.spec.template.spec.containers[0].image === 'registry.example.internal/iotsuite/gateway:0.1.0', gw.spec.template.spec.containers[0].image);
    const cm = objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name === 'iot-processing');
    assert(cm.data.IOT_REDIS_ADDR === 'redis-master.data.svc:6379', `IOT_REDIS_ADDR ${cm.data.IOT_REDIS_ADDR}`);
    const ota = objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name === 'iot-ota');
    assert(ota.data.IOT_OTA_GENERATE_KEY === 'false' && ota.data.IOT_OTA_KEYS_DIR === '/etc/iotsuite/ota-keys', 'ota keys not mounted');
  });

  check('the env-name check catches a name no binary reads (services.gateway.config.IOT_GW_NO_SUCH)', () => {
    const f = path.join(tmp, 'unknown-env.yaml');
    fs.writeFileSync(f, 'services:\n  gateway:\n    config:\n      IOT_GW_NO_SUCH: "1"\n');
    const objs = parseAll(helmTemplate([f]));
    const bad = unknownEnvNames(objs, help);
    assert(bad.length === 1 && bad[0] === 'gateway: IOT_GW_NO_SUCH', `found ${JSON.stringify(bad)}`);
  });

  // NOTES.txt: helm template does not render it and install --dry-run needs a cluster, so a copy of
  // the chart renders it into a ConfigMap; what it tells must name objects the chart renders.
  const notesChart = path.join(tmp, 'notes-chart');
  fs.cpSync(chart, notesChart, { recursive: true });
  fs.renameSync(path.join(notesChart, 'templates', 'NOTES.txt'), path.join(notesChart, 'notes.txt'));
  fs.writeFileSync(path.join(notesChart, 'templates', 'zz-notes.yaml'),
    'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes-render}\ndata:\n  notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n');
  function notes(files, extra = []) {
    const args = ['template', 'iot', notesChart, '--namespace', 'iot', '--kube-version', KUBE_VERSION, ...extra];
    for (const f of files) args.push('-f', f);
    const r = run(helm(), args);
    if (r.status !== 0) throw new Error(`helm template failed: ${r.stderr}`);
    const objs = parseAll(r.stdout);
    const cm = objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name === 'notes-render');
    return { text: cm.data.notes, objs: objs.filter((o) => o !== cm) };
  }
  function gatewayRestPort(objs, name) {
    const svc = objs.find((o) => o.kind === 'Service' && o.metadata.name === name);
    assert(svc, `NOTES names Service ${name}, which the chart does not render`);
    const p = svc.spec.ports.find((x) => x.name === 'http-rest');
    assert(p, `Service ${name} has no http-rest port`);
    return p;
  }
  const gwSource = fs.readFileSync(path.join(__dirname, '..', '..', 'services', 'gateway', 'main.c'), 'utf8');

  check('NOTES.txt (default values): a port-forward to the gateway Service, the bootstrap-key log line, ingest address, warnings', () => {
    const { text, objs } = notes([]);
    const m = /kubectl -n iot port-forward service\/(\S+) (\d+):(\d+)\n\s+then open http:\/\/127\.0\.0\.1:(\d+)\//.exec(text);
    assert(m, `no port-forward command in:\n${text}`);
    const p = gatewayRestPort(objs, m[1]);
    assert(Number(m[3]) === p.port && m[2] === m[4], `port-forward ${m[2]}:${m[3]}, Service port ${p.port}`);
    const logs = /kubectl -n iot logs deployment\/(\S+) \| grep '([^']+)'/.exec(text);
    assert(logs, `no logs command in:\n${text}`);
    assert(objs.some((o) => o.kind === 'Deployment' && o.metadata.name === logs[1]), `no Deployment ${logs[1]}`);
    assert(gwSource.includes(logs[2]), `the gateway never prints "${logs[2]}"`);
    const ing = /to (\S+):(\d+)\n/.exec(text);
    const isvc = ing && objs.find((o) => o.kind === 'Service' && o.metadata.name === ing[1]);
    assert(isvc && isvc.spec.ports.some((x) => x.name === 'grpc-api' && x.port === Number(ing[2])), `ingest address ${ing && ing[0]}`);
    assert(text.includes('WARNING: no OTA signing keys'), 'no OTA key warning');
    assert(text.includes('The bundled Postgres and Redis run as single replicas'), 'no bundled-database note');
  });

  check('NOTES.txt (ci/external-values.yaml, LoadBalancer): the load balancer address, the key Secret, no warnings', () => {
    const { text, objs } = notes([path.join(chart, 'ci', 'external-values.yaml')]);
    const m = /get service (\S+) -o jsonpath='\{\.status\.loadBalancer\.ingress\[0\]\}'\n\s+then open http:\/\/<that address>:(\d+)\//.exec(text);
    assert(m, `no load balancer command in:\n${text}`);
    assert(gatewayRestPort(objs, m[1]).port === Number(m[2]), `port ${m[2]}`);
    assert(text.includes('the bootstrap key from Secret iotsuite-gateway.'), `key Secret not named:\n${text}`);
    assert(!text.includes('WARNING') && !text.includes('bundled'), `unexpected warning:\n${text}`);
  });

  check('NOTES.txt (gateway.service.type=NodePort): the node port of http-rest', () => {
    const { text, objs } = notes([], ['--set', 'gateway.service.type=NodePort']);
    const m = /get service (\S+) -o jsonpath='\{\.spec\.ports\[\?\(@\.name=="http-rest"\)\]\.nodePort\}'/.exec(text);
    assert(m, `no node port command in:\n${text}`);
    gatewayRestPort(objs, m[1]);
    const svc = objs.find((o) => o.kind === 'Service' && o.metadata.name === m[1]);
    assert(svc.spec.type === 'NodePort', `Service type ${svc.spec.type}`);
  });

  // values.schema.json (or a template's fail) must refuse these, with the message the file names.
  const badDir = path.join(__dirname, 'bad-values');
  for (const f of fs.readdirSync(badDir).sort()) {
    check(`the chart refuses bad-values/${f}`, () => {
      const m = /^# refused with: (.*)$/m.exec(fs.readFileSync(path.join(badDir, f), 'utf8'));
      assert(m, 'no "# refused with:" line');
      // helm template, not lint: lint mode lets a template's `fail` pass (the schema it applies).
      const r = run(helm(), ['template', 'iot', chart, '-f', path.join(badDir, f)]);
      assert(r.status !== 0, `helm template accepted it`);
      assert((r.stdout + r.stderr).includes(m[1]), `not refused with "${m[1]}":\n${r.stdout}${r.stderr}`);
    });
  }
}

main().catch((e) => { check('no exception', () => { throw e; }); }).finally(() => finish('chart', tmp));
