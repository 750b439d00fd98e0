// Shared by the deploy checks (chart.test.js, istio.test.js): a runner printing like the C tests,
// helm (tools/helm.sh), rendering, schema validation with kubernetes-models and
// @kubernetes-models/istio, and the tsc excess-property check.
'use strict';

const path = require('path');
const fs = require('fs');
const { execFileSync, spawnSync } = require('child_process');
const YAML = require('yaml');

const root = path.resolve(__dirname, '..', '..');
const chart = path.join(root, 'deploy', 'helm', 'iotsuite');
const buildDir = process.env.IOT_BUILD_DIR || path.join(root, 'build', 'release');
const KUBE_VERSION = '1.30.0';
const SERVICES = ['registry', 'device-mgmt', 'ingest', 'processing', 'ota', 'gateway'];

const counts = { passed: 0, failed: 0 };
function check(name, fn) {
  const t0 = Date.now();
  try {
    fn();
    counts.passed++;
    console.log(`ok - ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    counts.failed++;
    console.log(`not ok - ${name}\n  ${String((e && e.message) || e).split('\n').join('\n  ')}`);
  }
}
function assert(cond, msg) { if (!cond) throw new Error(msg); }
function finish(prog, tmp) {
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  console.log(`${prog}: ${counts.passed} passed, ${counts.failed} failed`);
  process.exitCode = counts.failed ? 1 : 0;
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20, ...opts });
  if (r.error) throw r.error;
  return r;
}

let helmPath;
function helm() {
  if (!helmPath) helmPath = execFileSync('sh', [path.join(root, 'tools', 'helm.sh')], { encoding: 'utf8' }).trim();
  return helmPath;
}

// helm template of the chart as release "iot" in namespace "iot" (the names deploy/istio uses).
function helmTemplate(files, extraArgs = []) {
  const args = ['template', 'iot', chart, '--namespace', 'iot', '--kube-version', KUBE_VERSION, ...extraArgs];
  for (const f of files) args.push('-f', f);
  const r = run(helm(), args);
  if (r.status !== 0) throw new Error(`helm template failed: ${r.stderr}`);
  return r.stdout;
}

function parseAll(text) {
  return YAML.parseAllDocuments(text)
    .map((d) => { if (d.errors.length) throw new Error(d.errors.join('; ')); return d.toJS(); })
    .filter((o) => o);
}

// Module of a kind: Istio groups from @kubernetes-models/istio, the rest from kubernetes-models
// (core group as "v1/<Kind>", others "<group>/<version>/<Kind>").
function modelPath(apiVersion, kind) {
  if (/\.istio\.io\//.test(apiVersion)) return `@kubernetes-models/istio/${apiVersion}/${kind}`;
  return `kubernetes-models/${apiVersion}/${kind}`;
}

// .validate() of every object; resolves to a list of errors.
const models = {};
async function validateAll(objs) {
  const errors = [];
  for (const o of objs) {
    const key = `${o.apiVersion}/${o.kind}`;
    try {
      if (!models[key]) models[key] = (await import(modelPath(o.apiVersion, o.kind)))[o.kind];
      new models[key](o).validate();
    } catch (e) {
      errors.push(`${o.kind} ${o.metadata && o.metadata.name}: ${e.message}`);
    }
  }
  return errors;
}

// tsc --noEmit over `source` (an .mts module) in dir; returns tsc's result.
function tsc(dir, source) {
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'check.mts'), source);
  fs.writeFileSync(path.join(dir, 'tsconfig.json'), JSON.stringify({
    compilerOptions: {
      strict: true, noEmit: true, target: 'es2020', module: 'node16', moduleResolution: 'node16',
      typeRoots: [], types: [], skipLibCheck: true,
    },
    files: ['check.mts'],
  }));
  // The packages must resolve from the temporary directory too.
  const link = path.join(dir, 'node_modules');
  if (!fs.existsSync(link)) fs.symlinkSync(path.join(__dirname, 'node_modules'), link);
  return run(process.execPath, [path.join(__dirname, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', dir]);
}

// Each object as a literal typed with its model's interface: excess (misspelled, misplaced)
// properties fail, which .validate() lets through. labelled: [[label, object], ...].
function tscObjects(dir, labelled) {
  const imports = new Map();
  const lines = [];
  labelled.forEach(([label, o], n) => {
    const iface = `I${o.kind}`;
    const alias = `${iface}_${o.apiVersion.replace(/[^A-Za-z0-9]/g, '_')}`;
    imports.set(alias, `import type { ${iface} as ${alias} } from ${JSON.stringify(modelPath(o.apiVersion, o.kind))};`);
    lines.push(`// ${label}: ${o.kind} ${o.metadata && o.metadata.name}`);
    lines.push(`export const o${n}: ${alias} = ${JSON.stringify(o, null, 1)};`);
  });
  return tsc(dir, [...imports.values(), ...lines].join('\n') + '\n');
}

function yamllint(files) {
  return run('yamllint', ['-f', 'parsable', '-c', path.join(__dirname, 'yamllint.yaml'), ...files]);
}

// The IOT_* names `<service> --help` lists, and its text.
function helpText(svc) {
  const r = run(path.join(buildDir, 'services', svc, svc), ['--help']);
  return r.stdout + r.stderr;
}
function helpNames(svc) {
  const names = new Set();
  for (const m of helpText(svc).matchAll(/^\s+(IOT_[A-Z0-9_]+)\s/gm)) names.add(m[1]);
  if (names.size === 0) throw new Error(`${svc} --help listed no IOT_* variable`);
  return names;
}

module.exports = {
  root, chart, buildDir, KUBE_VERSION, SERVICES, check, assert, finish, run, helm, helmTemplate,
  parseAll, modelPath, validateAll, tsc, tscObjects, yamllint, helpText, helpNames,
};
