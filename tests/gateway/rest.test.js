// The REST gateway against real device-mgmt, registry and Postgres: API keys and roles, the
// proto3 JSON mapping, errors with the HTTP status of their gRPC code, paging, limits, and a
// backend that is down. Other services' routes are covered where their backends run.
'use strict';

const { startSuite, stopSuite, run, assert, eq, api, isError } = require('./suite');

const tests = [
  ['keys_required', async (s) => {
    let r = await api(s, 'GET', '/api/v1/devices');
    isError(r, 401, 16, 'API key is required');
    assert(/Bearer/.test(r.headers.get('www-authenticate')), 'WWW-Authenticate');
    r = await api(s, 'GET', '/api/v1/devices', { key: 'iotk_000000000000_' + '0'.repeat(64) });
    isError(r, 401, 16, 'not valid');
    r = await api(s, 'GET', '/api/v1/devices', { key: 'garbage' });
    isError(r, 401, 16);
    r = await api(s, 'GET', '/api/v1/devices', { headers: { 'X-API-Key': s.adminKey } });
    eq(r.status, 200, 'X-API-Key works');
  }],
  ['create_keys_per_role', async (s) => {
    for (const role of ['ROLE_VIEWER', 'ROLE_OPERATOR']) {
      const r = await api(s, 'POST', '/api/v1/keys', { key: s.adminKey, body: { name: `test ${role}`, role } });
      eq(r.status, 201, `create ${role}: ${JSON.stringify(r.json)}`);
      assert(/^iotk_[0-9a-f]{12}_[0-9a-f]{64}$/.test(r.json.secret), 'secret format');
      eq(r.json.key.role, role, 'role');
      assert(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/.test(r.json.key.createTime), 'RFC 3339 createTime');
      s[role] = r.json.secret;
      s[role + '_id'] = r.json.key.id;
    }
    const who = await api(s, 'GET', '/api/v1/whoami', { key: s.ROLE_VIEWER });
    eq(who.json.role, 'ROLE_VIEWER', 'whoami');
    const list = await api(s, 'GET', '/api/v1/keys', { key: s.adminKey });
    eq(list.status, 200, 'list keys');
    assert(list.json.keys.length >= 3, 'three keys');
    assert(!JSON.stringify(list.json).includes(s.ROLE_VIEWER.slice(18)), 'secrets never listed');
    isError(await api(s, 'POST', '/api/v1/keys', { key: s.adminKey, body: { name: 'x', role: 'ROLE_GOD' } }), 400, 3, 'ROLE_GOD');
    isError(await api(s, 'POST', '/api/v1/keys', { key: s.adminKey, body: { name: '', role: 'ROLE_VIEWER' } }), 400, 3, 'name');
    isError(await api(s, 'GET', '/api/v1/keys', { key: s.ROLE_OPERATOR }), 403, 7, 'needs the admin role');
  }],
  ['roles_on_device_routes', async (s) => {
    eq((await api(s, 'GET', '/api/v1/devices', { key: s.ROLE_VIEWER })).status, 200, 'viewer reads');
    let r = await api(s, 'POST', '/api/v1/devices', { key: s.ROLE_VIEWER, body: { name: 'nope' } });
    isError(r, 403, 7, 'needs the admin role');
    assert(r.json.message.includes('is a viewer'), r.json.message);
    isError(await api(s, 'POST', '/api/v1/devices', { key: s.ROLE_OPERATOR, body: { name: 'nope' } }), 403, 7);
    r = await api(s, 'POST', '/api/v1/devices', { key: s.adminKey, body: { id: 'gw-cmd-1', name: 'commanded', type: 'pump' } });
    eq(r.status, 201, 'admin creates');
    r = await api(s, 'POST', '/api/v1/devices/gw-cmd-1/commands', { key: s.ROLE_OPERATOR, body: { name: 'reboot', payload: { delay: 5 } } });
    eq(r.status, 201, `operator sends a command: ${JSON.stringify(r.json)}`);
    eq(r.json.name, 'reboot', 'command name');
    isError(await api(s, 'POST', '/api/v1/devices/gw-cmd-1/commands', { key: s.ROLE_VIEWER, body: { name: 'reboot' } }), 403, 7);
    r = await api(s, 'GET', '/api/v1/devices/gw-cmd-1/commands', { key: s.ROLE_VIEWER });
    eq(r.json.commands.length, 1, 'viewer lists commands');
  }],
  ['device_crud_and_json_mapping', async (s) => {
    const k = s.adminKey;
    let r = await api(s, 'POST', '/api/v1/devices', {
      key: k, body: { id: 'gw-dev-1', name: 'Boiler 1', type: 'boiler', model: 'B-2', labels: { site: 'north', env: 'prod' },
        location: { site: 'plant-1', latitude: 52.25 }, firmware_version: '1.0.0' } });
    eq(r.status, 201, JSON.stringify(r.json));
    eq(r.json.id, 'gw-dev-1', 'id');
    eq(r.json.labels, { env: 'prod', site: 'north' }, 'labels map');
    eq(r.json.firmwareVersion, '1.0.0', 'lowerCamelCase (input took the proto name)');
    eq(r.json.status, 'DEVICE_STATUS_PROVISIONED', 'enum as name');
    eq(r.json.location.latitude, 52.25, 'double');
    const etag = r.json.etag;
    r = await api(s, 'GET', '/api/v1/devices/gw-dev-1', { key: s.ROLE_VIEWER });
    eq(r.status, 200, 'get');
    eq(r.json.name, 'Boiler 1', 'name');
    isError(await api(s, 'GET', '/api/v1/devices/no-such-device', { key: k }), 404, 5, 'no-such-device');
    isError(await api(s, 'POST', '/api/v1/devices', { key: k, body: { id: 'gw-dev-1' } }), 409, 6);
    isError(await api(s, 'POST', '/api/v1/devices', { key: k, body: { id: 'bad id!' } }), 400, 3);
    r = await api(s, 'PATCH', '/api/v1/devices/gw-dev-1?updateMask=name,labels', { key: k, body: { name: 'Boiler One', labels: { site: 'south' }, etag } });
    eq(r.status, 200, JSON.stringify(r.json));
    eq(r.json.name, 'Boiler One', 'updated name');
    eq(r.json.labels, { site: 'south' }, 'labels replaced');
    eq(r.json.model, 'B-2', 'untouched field');
    r = await api(s, 'PATCH', '/api/v1/devices/gw-dev-1?updateMask=name', { key: k, body: { name: 'x', etag } });
    isError(r, 409, 10); /* stale etag: ABORTED */
    r = await api(s, 'DELETE', '/api/v1/devices/gw-dev-1', { key: k });
    eq(r.status, 200, 'delete');
    isError(await api(s, 'GET', '/api/v1/devices/gw-dev-1', { key: k }), 404, 5);
  }],
  ['paging_and_filters', async (s) => {
    const devices = [];
    for (let i = 0; i < 7; i++) devices.push({ id: `gw-page-${i}`, type: 'meter', labels: { batch: 'p' } });
    let r = await api(s, 'POST', '/api/v1/devices:batchCreate', { key: s.adminKey, body: { devices } });
    eq(r.status, 201, JSON.stringify(r.json));
    eq(r.json.devices.length, 7, 'batch');
    const seen = [];
    let token = '';
    for (let pages = 0; pages < 10; pages++) {
      r = await api(s, 'GET', `/api/v1/devices?pageSize=3&filter.labelSelector=batch%3Dp${token ? '&pageToken=' + encodeURIComponent(token) : ''}`, { key: s.ROLE_VIEWER });
      eq(r.status, 200, JSON.stringify(r.json));
      assert(r.json.devices.length <= 3, 'page size');
      seen.push(...r.json.devices.map((d) => d.id));
      token = r.json.nextPageToken;
      if (!token) break;
    }
    eq(seen.sort(), devices.map((d) => d.id).sort(), 'every device once');
    isError(await api(s, 'GET', '/api/v1/devices?pageToken=bogus', { key: s.ROLE_VIEWER }), 400, 3);
    isError(await api(s, 'GET', '/api/v1/devices?pageSize=abc', { key: s.ROLE_VIEWER }), 400, 3, 'pageSize');
    isError(await api(s, 'GET', '/api/v1/devices?colour=red', { key: s.ROLE_VIEWER }), 400, 3, 'colour');
    r = await api(s, 'GET', '/api/v1/devices?filter.type=meter&filter.statuses=DEVICE_STATUS_PROVISIONED', { key: s.ROLE_VIEWER });
    eq(r.json.devices.length, 7, 'filters as query parameters');
    // Counting with the same filters: the total and each status that has devices.
    r = await api(s, 'PATCH', '/api/v1/devices/gw-page-0?updateMask=status', { key: s.adminKey, body: { status: 'DEVICE_STATUS_MAINTENANCE' } });
    eq(r.status, 200, JSON.stringify(r.json));
    r = await api(s, 'GET', '/api/v1/devices:count?filter.labelSelector=batch%3Dp', { key: s.ROLE_VIEWER });
    eq(r.status, 200, JSON.stringify(r.json));
    eq(r.json.total, '7', 'total');
    eq(r.json.byStatus.map((b) => [b.status, b.count]), [['DEVICE_STATUS_PROVISIONED', '6'], ['DEVICE_STATUS_MAINTENANCE', '1']], 'by status, in enum order');
    r = await api(s, 'GET', '/api/v1/devices:count?filter.type=no-such-type', { key: s.ROLE_VIEWER });
    eq(r.json, {}, 'nothing matches: zero and empty are left out (proto3 JSON)');
    isError(await api(s, 'GET', '/api/v1/devices:count?filter.labelSelector=zone%20in%20(', { key: s.ROLE_VIEWER }), 400, 3, 'label_selector');
    isError(await api(s, 'GET', '/api/v1/devices:count'), 401, 16);
  }],
  ['bad_bodies', async (s) => {
    let r = await api(s, 'POST', '/api/v1/devices', { key: s.adminKey, raw: '{"name": "x",}' });
    isError(r, 400, 3, 'malformed JSON');
    assert(/line 1, column \d+/.test(r.json.message), r.json.message);
    isError(await api(s, 'POST', '/api/v1/devices', { key: s.adminKey, body: { nmae: 'x' } }), 400, 3, 'unknown field "nmae"');
    isError(await api(s, 'POST', '/api/v1/devices', { key: s.adminKey, body: { labels: { a: 1 } } }), 400, 3, 'labels.a: expected a string');
    r = await api(s, 'POST', '/api/v1/devices', { key: s.adminKey, body: { name: 'x'.repeat(70000) } });
    eq(r.status, 413, 'over the body limit');
    eq(r.json.status, 'RESOURCE_EXHAUSTED', 'code name');
  }],
  ['unknown_routes', async (s) => {
    isError(await api(s, 'GET', '/api/v1/nothing', { key: s.adminKey }), 404, 5, 'no such route');
    isError(await api(s, 'PUT', '/api/v1/devices', { key: s.adminKey }), 405, 12);
    // An action path is never taken for a resource id.
    isError(await api(s, 'GET', '/api/v1/rules/r1:setEnabled', { key: s.adminKey }), 405, 12);
    // A device route without a token is refused before its body is read.
    isError(await api(s, 'POST', '/api/v1/telemetry', { body: { points: [] } }), 401, 16, 'device token');
  }],
  ['backend_down_is_503_naming_it', async (s) => {
    const r = await api(s, 'GET', '/api/v1/rules', { key: s.ROLE_VIEWER });
    isError(r, 503, 14, 'processing');
    eq(r.json.details.service, 'processing', 'details.service');
  }],
  ['registry_services', async (s) => {
    const r = await api(s, 'GET', '/api/v1/services', { key: s.ROLE_VIEWER });
    eq(r.status, 200, JSON.stringify(r.json));
  }],
  ['revoked_key_stops_working', async (s) => {
    eq((await api(s, 'GET', '/api/v1/whoami', { key: s.ROLE_OPERATOR })).status, 200, 'works first');
    isError(await api(s, 'DELETE', `/api/v1/keys/${s.ROLE_OPERATOR_id}`, { key: s.ROLE_VIEWER }), 403, 7);
    const r = await api(s, 'DELETE', `/api/v1/keys/${s.ROLE_OPERATOR_id}`, { key: s.adminKey });
    eq(r.status, 200, 'revoked');
    assert(r.json.revokeTime, 'revokeTime set');
    isError(await api(s, 'GET', '/api/v1/whoami', { key: s.ROLE_OPERATOR }), 401, 16);
    isError(await api(s, 'GET', '/api/v1/keys/zzz', { key: s.adminKey }), 404, 5);
  }],
];

run('gateway_rest', tests, () => startSuite('rest', { gatewayEnv: { IOT_GW_MAX_BODY: '65536' } }), stopSuite);
