// One real gRPC call against a running service, with grpc-js (an independent client), for
// docker/test-images.sh:  node docker/smoke.js SERVICE HOST:PORT [DEVICE_ID]
// Prints one line; exit 0 when the call did what it should, 1 otherwise.
'use strict';

const path = require('path');
const { createRequire } = require('module');

const root = path.resolve(__dirname, '..');
// The interop tests' pinned packages (make deps installs them).
const req = createRequire(path.join(root, 'tests', 'interop', 'package.json'));
const grpc = req('@grpc/grpc-js');
const protoLoader = req('@grpc/proto-loader');

const [service, target, deviceId = 'img-smoke'] = process.argv.slice(2);
const loadOpts = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
  includeDirs: [path.join(root, 'proto'), '/usr/include'] };
const load = (file) => grpc.loadPackageDefinition(protoLoader.loadSync(file, loadOpts));
const deadline = () => ({ deadline: Date.now() + 5000 });
const call = (client, method, request) => new Promise((resolve, reject) =>
  client[method](request, deadline(), (err, resp) => (err ? reject(new Error(`${method}: ${err.message}`)) : resolve(resp))));
const creds = grpc.credentials.createInsecure();

const checks = {
  async registry() {
    const pkg = load('iot/registry/v1/registry.proto').iot.registry.v1;
    const c = new pkg.Registry(target, creds);
    const resp = await call(c, 'ListServices', {});
    const names = resp.services.map((s) => s.name);
    // The other containers register themselves (IOT_REGISTRY_ADDR): a cross-container check too.
    if (!names.includes('device-mgmt')) throw new Error(`ListServices: device-mgmt not registered (${names.join(',')})`);
    return `ListServices: ${names.join(', ')}`;
  },
  async 'device-mgmt'() {
    const pkg = load('iot/device/v1/device.proto').iot.device.v1;
    const c = new pkg.DeviceManager(target, creds);
    await call(c, 'CreateDevice', { device: { id: deviceId, name: 'image smoke test', type: 'sensor' } });
    const d = await call(c, 'GetDevice', { id: deviceId });
    if (d.name !== 'image smoke test') throw new Error(`GetDevice: name ${JSON.stringify(d.name)}`);
    return `CreateDevice + GetDevice ${deviceId}: ${d.status}`;
  },
  async ingest() {
    const pkg = load('iot/ingest/v1/ingest.proto').iot.ingest.v1;
    const c = new pkg.Ingest(target, creds);
    const resp = await call(c, 'LatestValues', { device_id: deviceId });
    return `LatestValues ${deviceId}: ${resp.points.length} points`;
  },
  async processing() {
    const pkg = load('iot/processing/v1/processing.proto').iot.processing.v1;
    const c = new pkg.Processing(target, creds);
    const resp = await call(c, 'ListRules', {});
    return `ListRules: ${resp.rules.length} rules`;
  },
  async ota() {
    const pkg = load('iot/ota/v1/ota.proto').iot.ota.v1;
    const c = new pkg.Ota(target, creds);
    const resp = await call(c, 'ListArtifacts', {});
    return `ListArtifacts: ${resp.artifacts.length} artifacts`;
  },
};

(async () => {
  if (!checks[service]) throw new Error(`no gRPC smoke call for ${service}`);
  console.log(await checks[service]());
  process.exit(0);
})().catch((e) => {
  console.log(e.message);
  process.exit(1);
});
