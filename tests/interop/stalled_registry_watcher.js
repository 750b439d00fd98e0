// Helper for test_registry's stalled-watcher test: opens iot.registry.v1.Registry/Watch for a
// service with grpc-js, prints "watching" after the snapshot, then waits (the test SIGSTOPs it).
'use strict';
const path = require('path');
const grpc = require(path.join(__dirname, 'node_modules', '@grpc/grpc-js'));
const protoLoader = require(path.join(__dirname, 'node_modules', '@grpc/proto-loader'));

const [target, service] = process.argv.slice(2);
const root = path.resolve(__dirname, '..', '..', 'proto');
const pkg = grpc.loadPackageDefinition(protoLoader.loadSync('iot/registry/v1/registry.proto', { includeDirs: [root] }));
const client = new pkg.iot.registry.v1.Registry(target, grpc.credentials.createInsecure());
const call = client.Watch({ service });
let first = true;
call.on('data', () => { if (first) { first = false; console.log('watching'); } });
call.on('error', (e) => { console.log(`status ${e.code} ${e.details}`); process.exit(0); });
setTimeout(() => process.exit(1), 120000);
