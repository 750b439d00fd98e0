// Helper for test_rpc's stalled-watcher test: opens grpc.health.v1.Health/Watch for a service,
// reads the first message, then pauses the stream (real HTTP/2 backpressure: the window is not
// replenished), prints "paused" and waits. When resumed by SIGUSR2 it drains the stream and
// prints the final status code and details.
'use strict';
const path = require('path');
const grpc = require(path.join(__dirname, 'node_modules', '@grpc/grpc-js'));
const health = require(path.join(__dirname, 'node_modules', 'grpc-health-check'));

const [target, service] = process.argv.slice(2);
const Client = grpc.makeClientConstructor(health.service, 'grpc.health.v1.Health');
const client = new Client(target, grpc.credentials.createInsecure());
const call = client.watch({ service });
let first = true;
call.on('data', () => {
  if (first) {
    first = false;
    call.pause();
    console.log('paused');
  }
});
call.on('error', (e) => { console.log(`status ${e.code} ${e.details}`); process.exit(0); });
call.on('end', () => {});
call.on('status', (s) => { if (s.code === 0) { console.log('status 0'); process.exit(0); } });
process.on('SIGUSR2', () => call.resume());
setTimeout(() => { console.log('timeout'); process.exit(1); }, 60000);
