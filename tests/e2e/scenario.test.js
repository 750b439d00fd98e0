// The seed scenario end to end, all six services as real processes on loopback: register 1,000
// devices in one batch, group them by a label filter, stream their telemetry over gRPC, see window
// statistics and an anomaly alert for the one device that misbehaves, see the alert's emergency
// command reach that device and its acknowledgement, roll new firmware out to the group in three
// stages with the telemetry gate (devices check, download, verify the digest and signature, and
// report), see the gate pause a second rollout whose updated devices turn anomalous, see every
// service passing in the registry, and see all of it through the REST API.
'use strict';

const crypto = require('crypto');
const {
  startAll, stopAll, client, bearer, call, pool, until, api, ok, eq, assert, run,
} = require('./lib');

const N = 1000;
const BAD = 'e2e-dev-0417';            // the device that misbehaves
const devId = (i) => `e2e-dev-${String(i).padStart(4, '0')}`;
const POINTS = 40;                     // per device: 30 normal, then (for BAD) a spike
const spikeAt = 35;

// A normal temperature: 21 °C with a deterministic ripple of ±0.5 (a z-score under 2, so never an
// anomaly), and humidity.
const temp = (i, k) => 21 + 0.5 * Math.sin(i + k * 0.7);

async function setup() {
  const s = await startAll('scn');
  s.A = s.adminKey;
  s.dm = client(s, 'device-mgmt');
  s.ingest = client(s, 'ingest');
  s.ota = client(s, 'ota');
  s.tokens = new Map();
  return s;
}

async function teardown(s) {
  for (const c of [s.dm, s.ingest, s.ota]) c.close();
  await stopAll(s);
}

const tests = [
  ['1,000 devices in one batch, grouped by a label filter', async (s) => {
    const devices = [];
    for (let i = 0; i < N; i++) {
      devices.push({ id: devId(i), name: `Pump ${i}`, type: 'pump', model: 'S-1', firmwareVersion: '1.0.0',
        labels: { fleet: 'e2e', site: `s${i % 4}` } });
    }
    const t0 = Date.now();
    const r = ok(await api(s, 'POST', '/api/v1/devices:batchCreate', { key: s.A, body: { devices } }), 201, 'batch create');
    eq(r.devices.length, N, 'created');
    console.log(`# batchCreate of ${N} devices: ${Date.now() - t0} ms`);
    ok(await api(s, 'POST', '/api/v1/groups', { key: s.A, body: { id: 'e2e-fleet', kind: 'GROUP_KIND_DYNAMIC', filter: { labelSelector: 'fleet=e2e' } } }), 201, 'group');
    const c = ok(await api(s, 'GET', '/api/v1/devices:count?filter.groupId=e2e-fleet', { key: s.A }));
    eq(Number(c.total), N, 'devices in the group');
    const site = ok(await api(s, 'GET', '/api/v1/devices:count?filter.labelSelector=fleet%3De2e,site%3Ds1', { key: s.A }));
    eq(Number(site.total), N / 4, 'devices of one site');
  }],

  ['rules: a window statistic and an anomaly detector with an emergency command', async (s) => {
    ok(await api(s, 'POST', '/api/v1/rules', { key: s.A, body: {
      id: 'e2e-mean', name: 'mean temperature', enabled: true, metric: 'temp', devices: { groupId: 'e2e-fleet' },
      threshold: { op: 'COMPARISON_GT', threshold: 60, statistic: 'STATISTIC_MEAN', window: { kind: 'WINDOW_KIND_COUNT', count: 16, minSamples: 5 } },
      severity: 'SEVERITY_WARNING' } }), 201, 'window rule');
    ok(await api(s, 'POST', '/api/v1/rules', { key: s.A, body: {
      id: 'e2e-anomaly', name: 'temperature anomaly', enabled: true, metric: 'temp', devices: { groupId: 'e2e-fleet' },
      detector: { kind: 'DETECTOR_KIND_ZSCORE', level: 0.8, windowMs: 300000, minSamples: 20 },
      severity: 'SEVERITY_CRITICAL', command: { name: 'shutdown', payload: { reason: 'temperature anomaly' }, minSeverity: 'SEVERITY_CRITICAL' } } }), 201, 'anomaly rule');
  }],

  ['every device gets a token; the misbehaving one listens for commands', async (s) => {
    const ids = Array.from({ length: N }, (_, i) => devId(i));
    await pool(ids, 16, async (id) => {
      const t = ok(await api(s, 'POST', `/api/v1/devices/${id}/tokens`, { key: s.A, body: {} }), 201, `token of ${id}`);
      s.tokens.set(id, t.token);
    });
    eq(s.tokens.size, N, 'tokens');
    // The device's command stream, open before its telemetry goes wrong.
    s.commands = [];
    s.watch = s.dm.WatchCommands({ device_id: BAD }, bearer(s.tokens.get(BAD)));
    s.watch.on('data', (c) => s.commands.push(c));
    s.watch.on('error', (e) => { if (e.code !== 1) s.watchError = e; });   // 1: cancelled by the test
    await new Promise((r) => setTimeout(r, 300));
  }],

  ['telemetry streams in from every device, all of it acknowledged and stored', async (s) => {
    const t0 = Date.now() - POINTS * 1000;
    const start = Date.now();
    // Two StreamTelemetry messages per device: the first 30 points, then the rest (with the spike).
    const acks = await pool(Array.from({ length: N }, (_, i) => i), 32, (i) => new Promise((resolve, reject) => {
      const id = devId(i);
      const st = s.ingest.StreamTelemetry(bearer(s.tokens.get(id)), { deadline: Date.now() + 30000 });
      const got = [];
      st.on('data', (a) => got.push(a));
      st.on('error', reject);
      st.on('end', () => resolve(got));
      const pts = [];
      for (let k = 0; k < POINTS; k++) {
        const v = id === BAD && k === spikeAt ? 95 : temp(i, k);
        pts.push({ seq: String(k + 1), metric: 'temp', time_ms: String(t0 + k * 1000), double_value: v });
        pts.push({ seq: String(POINTS + k + 1), metric: 'hum', time_ms: String(t0 + k * 1000), double_value: 40 + (k % 5) });
      }
      // seq must increase within a message: send temp then hum per point index, renumbered.
      const ordered = pts.sort((a, b) => Number(a.time_ms) - Number(b.time_ms) || a.metric.localeCompare(b.metric))
        .map((p, n) => ({ ...p, seq: String(n + 1) }));
      st.write({ points: ordered.slice(0, 60) });
      st.write({ points: ordered.slice(60) });
      st.end();
    }));
    const secs = (Date.now() - start) / 1000;
    console.log(`# ${N * POINTS * 2} points from ${N} devices over StreamTelemetry: ${secs.toFixed(1)} s (${Math.round(N * POINTS * 2 / secs)} points/s)`);
    // One acknowledgement on opening (where to resume: nothing stored yet), then one per message.
    for (const [i, a] of acks.entries()) {
      eq(a.map((x) => [x.acked_seq, x.stored]), [['0', 0], ['60', 60], [String(POINTS * 2), POINTS * 2 - 60]], `acks of ${devId(i)}`);
    }
    // What was acknowledged is stored: a device's latest values and its full history.
    const latest = ok(await api(s, 'GET', `/api/v1/devices/${devId(7)}/telemetry/latest`, { key: s.A }));
    const byMetric = Object.fromEntries(latest.points.map((p) => [p.metric, p]));
    eq(Number(byMetric.temp.seq) > 0 && Math.abs(byMetric.temp.doubleValue - temp(7, POINTS - 1)) < 1e-9, true, 'latest temp');
    const hist = ok(await api(s, 'GET', `/api/v1/devices/${BAD}/telemetry?metric=temp&fromMs=${t0}&toMs=${Date.now()}&pageSize=1000`, { key: s.A }));
    eq(hist.points.length, POINTS, 'stored temp points of the bad device');
    eq(hist.points.filter((p) => p.doubleValue === 95).length, 1, 'the spike is stored');
  }],

  ['window statistics of a device', async (s) => {
    const w = await until('window stats', async () => {
      const r = await api(s, 'GET', `/api/v1/rules/e2e-mean/windows/${devId(7)}`, { key: s.A });
      return r.status === 200 && Number(r.json.count) === 16 && r.json;
    }, 30000, 200);
    const want = Array.from({ length: 16 }, (_, j) => temp(7, POINTS - 16 + j));
    const mean = want.reduce((a, b) => a + b) / 16;
    assert(Math.abs(w.mean - mean) < 1e-6, `mean ${w.mean}, want ${mean}`);
    assert(Math.abs(w.max - Math.max(...want)) < 1e-9 && Math.abs(w.min - Math.min(...want)) < 1e-9, `min/max ${w.min}/${w.max}`);
    eq(w.metric, 'temp', 'metric');
  }],

  ['one anomaly alert, for the misbehaving device only, and its command reaches the device', async (s) => {
    const alert = await until('the anomaly alert', async () => {
      const r = ok(await api(s, 'GET', '/api/v1/alerts?ruleId=e2e-anomaly', { key: s.A }));
      return r.alerts.length > 0 && r.alerts.find((a) => a.commandId);
    }, 30000, 200);
    eq([alert.deviceId, alert.severity, alert.metric], [BAD, 'SEVERITY_CRITICAL', 'temp'], 'alert');
    eq(alert.value, 1, 'z-score (capped at 1)');
    const all = ok(await api(s, 'GET', '/api/v1/alerts?pageSize=1000', { key: s.A }));
    eq(all.alerts.map((a) => `${a.ruleId}/${a.deviceId}`), [`e2e-anomaly/${BAD}`], 'every alert of the fleet');
    // The device received the command on its stream and acknowledges it.
    const cmd = await until('the command on the device stream', () => s.commands.find((c) => c.id === alert.commandId), 15000);
    assert(!s.watchError, `command stream failed: ${s.watchError && s.watchError.message}`);
    eq([cmd.name, cmd.device_id, cmd.payload.fields.reason.stringValue], ['shutdown', BAD, 'temperature anomaly'], 'command');
    await call(s.dm, 'AckCommand', { device_id: BAD, command_id: cmd.id, success: true }, bearer(s.tokens.get(BAD)));
    const c = ok(await api(s, 'GET', `/api/v1/commands/${cmd.id}`, { key: s.A }));
    eq(c.status, 'COMMAND_STATUS_SUCCEEDED', 'command status seen through REST');
    s.watch.cancel();
  }],

  ['firmware rolls out to the group in three stages with the telemetry gate', async (s) => {
    const content = crypto.randomBytes(64 * 1024);
    const sha = crypto.createHash('sha256').update(content).digest('hex');
    const art = ok(await api(s, 'POST', `/api/v1/artifacts?name=pump-fw&version=1.1.0&models=S-1&sha256=${sha}`,
      { key: s.A, raw: content, type: 'application/octet-stream' }), 201, 'upload');
    eq([art.sha256, Number(art.size)], [sha, content.length], 'artifact');
    const keys = ok(await api(s, 'GET', '/api/v1/signing-keys', { key: s.A })).keys;
    const pem = new Map(keys.map((k) => [k.keyId, k.publicKeyPem]));
    let ro = ok(await api(s, 'POST', '/api/v1/rollouts', { key: s.A, body: {
      name: 'pump 1.1.0', artifactId: art.id, target: { groupId: 'e2e-fleet' },
      stages: [{ percent: 1, soakMs: 300 }, { percent: 10, soakMs: 300 }, { percent: 100 }],
      gate: { enabled: true, maxRatio: 2, minAlerts: 3 } } }), 201, 'rollout');
    ro = ok(await api(s, 'POST', `/api/v1/rollouts/${ro.id}:start`, { key: s.A, body: {} }));
    eq(ro.state, 'ROLLOUT_STATE_RUNNING', 'started');

    // The fleet: every device checks for an update; an offered one downloads, verifies the digest
    // and the signature, installs and reports; then it runs 1.1.0.
    const version = new Map();
    const offeredPerRound = [];
    const ids = Array.from({ length: N }, (_, i) => devId(i));
    const deadline = Date.now() + 180000;
    for (let round = 0; ; round++) {
      let offered = 0;
      await pool(ids.filter((id) => version.get(id) !== '1.1.0'), 24, async (id) => {
        const md = () => bearer(s.tokens.get(id));
        const r = await call(s.ota, 'CheckForUpdate', { current_version: '1.0.0', model: 'S-1' }, md());
        if (!r.offer) return;
        offered++;
        const a = r.offer.artifact;
        await call(s.ota, 'ReportStatus', { rollout_id: r.offer.rollout_id, phase: 'UPDATE_PHASE_DOWNLOADING' }, md());
        const chunks = await new Promise((resolve, reject) => {
          const got = [];
          const st = s.ota.DownloadArtifact({ artifact_id: a.id }, md(), { deadline: Date.now() + 30000 });
          st.on('data', (m) => { if (m.data && m.data.length) got.push(m.data); });
          st.on('error', reject);
          st.on('end', () => resolve(got));
        });
        await call(s.ota, 'ReportStatus', { rollout_id: r.offer.rollout_id, phase: 'UPDATE_PHASE_VERIFYING' }, md());
        const body = Buffer.concat(chunks);
        eq(crypto.createHash('sha256').update(body).digest('hex'), a.sha256, `digest of the download of ${id}`);
        assert(crypto.verify(null, a.manifest, pem.get(a.key_id), a.signature), `signature of ${a.id} (key ${a.key_id})`);
        assert(JSON.parse(a.manifest.toString()).sha256 === a.sha256, 'the signed manifest names the digest');
        await call(s.ota, 'ReportStatus', { rollout_id: r.offer.rollout_id, phase: 'UPDATE_PHASE_INSTALLING' }, md());
        await call(s.ota, 'ReportStatus', { rollout_id: r.offer.rollout_id, phase: 'UPDATE_PHASE_SUCCEEDED' }, md());
        version.set(id, '1.1.0');
      });
      offeredPerRound.push(offered);
      ro = ok(await api(s, 'GET', `/api/v1/rollouts/${ro.id}`, { key: s.A }));
      if (ro.state === 'ROLLOUT_STATE_COMPLETED') break;
      assert(ro.state === 'ROLLOUT_STATE_RUNNING', `rollout ${ro.state}: ${ro.pauseReason}`);
      assert(Date.now() < deadline, `rollout not done: ${JSON.stringify(ro.stageStatus)}`);
      if (!offered) await new Promise((r) => setTimeout(r, 200));
    }
    console.log(`# devices offered the update per round: ${offeredPerRound.filter((x) => x).join(', ')}`);
    // Stages in order: 1 % first (10 devices), then up to 10 %, then the rest.
    eq(ro.stageStatus.map((x) => [x.state, x.devices, x.succeeded]), [['done', 10, 10], ['done', 90, 90], ['done', 900, 900]], 'stages');
    eq(offeredPerRound.find((x) => x > 0), 10, 'the first stage offers 1 % of the group');
    eq(version.size, N, 'devices updated');
    const d = ok(await api(s, 'GET', `/api/v1/devices/${devId(999)}`, { key: s.A }));
    eq(d.firmwareVersion, '1.1.0', 'the new version in device-mgmt');
    const c = ok(await api(s, 'GET', '/api/v1/devices:count?filter.firmwareVersion=1.1.0', { key: s.A }));
    eq(Number(c.total), N, 'devices on 1.1.0');
  }],

  ['the telemetry gate pauses a rollout whose updated devices turn anomalous', async (s) => {
    const content = crypto.randomBytes(16 * 1024);
    const art = ok(await api(s, 'POST', '/api/v1/artifacts?name=pump-fw&version=1.2.0&models=S-1',
      { key: s.A, raw: content, type: 'application/octet-stream' }), 201, 'upload');
    let ro = ok(await api(s, 'POST', '/api/v1/rollouts', { key: s.A, body: {
      name: 'pump 1.2.0', artifactId: art.id, target: { groupId: 'e2e-fleet' },
      stages: [{ count: 20, soakMs: 60000 }, { percent: 100 }],
      gate: { enabled: true, maxRatio: 2, minAlerts: 3, minSeverity: 3 } } }), 201, 'rollout');
    ok(await api(s, 'POST', `/api/v1/rollouts/${ro.id}:start`, { key: s.A, body: {} }));
    // The first stage's devices install 1.2.0, which runs hot: each reports a spike.
    const updated = [];
    const ids = Array.from({ length: N }, (_, i) => devId(i));
    await until('20 devices updated', async () => {
      await pool(ids.filter((id) => !updated.includes(id)), 24, async (id) => {
        const md = () => bearer(s.tokens.get(id));
        const r = await call(s.ota, 'CheckForUpdate', { current_version: '1.1.0', model: 'S-1' }, md());
        if (!r.offer) return;
        for (const phase of ['DOWNLOADING', 'VERIFYING', 'INSTALLING', 'SUCCEEDED']) {
          await call(s.ota, 'ReportStatus', { rollout_id: r.offer.rollout_id, phase: `UPDATE_PHASE_${phase}` }, md());
        }
        updated.push(id);
        const ack = await call(s.ingest, 'PushTelemetry', { points: [{ seq: String(POINTS * 2 + 1), metric: 'temp', time_ms: String(Date.now()), double_value: 97 }] }, md());
        eq(ack.stored, 1, `spike of ${id} stored`);
      });
      return updated.length >= 20;
    }, 60000, 200);
    eq(updated.length, 20, 'devices of the first stage');
    ro = await until('the gate to pause the rollout', async () => {
      const r = ok(await api(s, 'GET', `/api/v1/rollouts/${ro.id}`, { key: s.A }));
      return r.state === 'ROLLOUT_STATE_PAUSED' && r;
    }, 30000, 200);
    assert(/^telemetry gate: /.test(ro.pauseReason), `pause reason: ${ro.pauseReason}`);
    // (proto3 JSON leaves out zero values: currentStage 0 is absent)
    eq([ro.currentStage || 0, ro.stageStatus[0].succeeded, ro.stageStatus[1].state], [0, 20, 'waiting'], 'stopped in the first stage');
    // Paused: the rest of the fleet is offered nothing.
    const offers = await pool(ids.filter((id) => !updated.includes(id)).slice(0, 200), 24, async (id) =>
      (await call(s.ota, 'CheckForUpdate', { current_version: '1.1.0', model: 'S-1' }, bearer(s.tokens.get(id)))).offer);
    eq(offers.filter((o) => o).length, 0, 'offers while paused');
    const alerts = ok(await api(s, 'GET', '/api/v1/alerts?ruleId=e2e-anomaly&pageSize=1000', { key: s.A })).alerts;
    eq(alerts.filter((a) => updated.includes(a.deviceId)).length, 20, 'alerts of the updated devices');
    ok(await api(s, 'POST', `/api/v1/rollouts/${ro.id}:cancel`, { key: s.A, body: { reason: 'hot firmware' } }));
  }],

  ['every service is registered and passing', async (s) => {
    const want = ['device-mgmt', 'gateway', 'ingest', 'ota', 'processing', 'registry'];
    const list = await until('all services passing', async () => {
      const r = ok(await api(s, 'GET', '/api/v1/services', { key: s.A }));
      const ok6 = want.every((n) => r.services.some((x) => x.name === n && x.instances === 1 && x.passing === 1));
      return ok6 && r.services;
    }, 20000, 250);
    eq(list.map((x) => x.name).sort(), want, 'registered services');
    for (const n of want) {
      const inst = ok(await api(s, 'GET', `/api/v1/services/${n}/instances`, { key: s.A })).instances;
      eq([inst.length, inst[0].status, inst[0].instance.port], [1, 'HEALTH_STATUS_PASSING', s.ports[n].grpc], `${n} instances`);
    }
  }],
];

run('scenario', tests, setup, teardown);
