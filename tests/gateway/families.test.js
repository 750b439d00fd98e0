// The REST gateway's route families that rest.test.js and routes.test.js do not cover, against the
// whole suite: groups and members, device tokens, telemetry in and out, rules, alerts, rollups,
// rollouts, commands, shadows and the registry. For each family: a success path checked by its
// data (what was written reads back), 401 without a key, 403 for a role too low (the message names
// the role needed), 400 naming the field, 404 for unknown ids, and a pageSize/nextPageToken walk
// (no duplicates, nothing missing) where the list pages.
'use strict';

const crypto = require('crypto');
const { startSuite, stopSuite, run, assert, eq, api, isError, ok } = require('./suite');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Polls fn until it returns something truthy (that value); fails naming what after ms.
async function until(fn, what, ms = 10000) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms`);
    await sleep(100);
  }
}

// Waits until processing runs a rule set at least as new as etag (its /metrics says which), so
// points pushed next are evaluated by that rule.
async function ruleLoaded(s, etag) {
  await until(async () => {
    const text = await (await fetch(`http://127.0.0.1:${s.proc.admin}/metrics`)).text();
    const m = /\nprocessing_rules_version (\d+)/.exec(text);
    return m && BigInt(m[1]) >= BigInt(etag);
  }, `processing runs rules version ${etag}`);
}

// Walks a paged list with pageSize: every page within the size, the same item never twice, and
// more than one page. The items in the order served.
async function walk(s, path, field, pageSize, { key, id = (x) => x.id } = {}) {
  const items = [], seen = new Set();
  let token = '', pages = 0;
  for (;;) {
    const sep = path.includes('?') ? '&' : '?';
    const r = ok(await api(s, 'GET', `${path}${sep}pageSize=${pageSize}${token ? '&pageToken=' + encodeURIComponent(token) : ''}`,
      { key: key || s.viewer }), 200, `${path} page ${pages}`);
    const got = r[field] || [];
    pages++;
    assert(got.length <= pageSize, `${path}: page ${pages} has ${got.length} items, over ${pageSize}`);
    for (const x of got) {
      assert(!seen.has(id(x)), `${path}: ${id(x)} served twice`);
      seen.add(id(x));
      items.push(x);
    }
    token = r.nextPageToken;
    if (!token) break;
    assert(got.length > 0, `${path}: an empty page with a next page token`);
    assert(pages < 100, `${path}: no end of pages`);
  }
  assert(pages > 1, `${path}: one page only (${items.length} items with pageSize ${pageSize})`);
  return items;
}

// The role checks of one route: 401 without a key (and with a device token where a key belongs),
// 403 for each role below need, naming it.
async function guarded(s, method, path, need, body) {
  let r = await api(s, method, path, { body });
  isError(r, 401, 16, 'API key is required');
  assert(/Bearer/.test(r.headers.get('www-authenticate') || ''), `${method} ${path}: WWW-Authenticate`);
  isError(await api(s, method, path, { key: s.tokenOfSomeDevice, body }), 401, 16, 'not valid');
  const below = need === 'admin' ? [s.viewer, s.operator] : need === 'operator' ? [s.viewer] : [];
  for (const k of below) {
    r = await api(s, method, path, { key: k, body });
    isError(r, 403, 7, `needs the ${need} role`);
  }
}

// A device (admin) with a token.
async function device(s, id, extra = {}) {
  ok(await api(s, 'POST', '/api/v1/devices', { key: s.adminKey, body: { id, name: id, type: 'sensor', model: 'S-1', ...extra } }), 201, `create ${id}`);
  const t = ok(await api(s, 'POST', `/api/v1/devices/${id}/tokens`, { key: s.adminKey, body: {} }), 201, `token for ${id}`);
  return { id, token: t.token, tokenId: t.tokenId, seq: 0 };
}

// Pushes points as the device (its token): values at t0, t0 + step, ...
async function push(s, dev, metric, values, t0, step = 1) {
  const points = values.map((v, i) => {
    const p = { seq: String(++dev.seq), metric, timeMs: String(t0 + i * step) };
    if (typeof v === 'number') p.doubleValue = v; else if (typeof v === 'boolean') p.boolValue = v; else p.stringValue = v;
    return p;
  });
  return ok(await api(s, 'POST', '/api/v1/telemetry', { headers: { Authorization: `Bearer ${dev.token}` }, body: { points } }), 200, 'push');
}

const pushAs = (s, token, body) => api(s, 'POST', '/api/v1/telemetry', { headers: token ? { Authorization: `Bearer ${token}` } : {}, body });

const tests = [
  ['groups_crud_members_and_paging', async (s) => {
    const A = s.adminKey;
    await guarded(s, 'POST', '/api/v1/groups', 'admin', { id: 'fam-g-x', kind: 'GROUP_KIND_STATIC' });
    await guarded(s, 'GET', '/api/v1/groups', 'viewer');
    let g = ok(await api(s, 'POST', '/api/v1/groups', { key: A, body: { id: 'fam-g-static', description: 'Pumpen — Halle 1 ü 日本 😀', kind: 'GROUP_KIND_STATIC' } }), 201, 'create');
    eq([g.id, g.description, g.kind], ['fam-g-static', 'Pumpen — Halle 1 ü 日本 😀', 'GROUP_KIND_STATIC'], 'created group (UTF-8 intact)');
    assert(g.etag && g.createTime, 'etag and createTime');
    eq(ok(await api(s, 'GET', '/api/v1/groups/fam-g-static', { key: s.viewer })), g, 'get reads back what create answered');
    eq(ok(await api(s, 'GET', '/api/v1/groups/fam%2Dg%2Dstatic', { key: s.viewer })), g, 'a percent-encoded path parameter');
    eq(ok(await api(s, 'POST', '/api/v1/groups', { key: A, body: { id: 'fam-g-num', kind: 1 } }), 201).kind, 'GROUP_KIND_STATIC', 'an enum by number');
    ok(await api(s, 'DELETE', '/api/v1/groups/fam-g-num', { key: A }));
    // Validation names the field; a taken id is 409.
    isError(await api(s, 'POST', '/api/v1/groups', { key: A, body: { id: 'fam-g-static', kind: 'GROUP_KIND_STATIC' } }), 409, 6);
    isError(await api(s, 'POST', '/api/v1/groups', { key: A, body: { id: 'bad id!', kind: 'GROUP_KIND_STATIC' } }), 400, 3, 'group.id');
    isError(await api(s, 'POST', '/api/v1/groups', { key: A, body: { id: 'fam-g-y' } }), 400, 3, 'group.kind');
    isError(await api(s, 'POST', '/api/v1/groups', { key: A, body: { id: 'fam-g-y', kind: 'GROUP_KIND_DYNAMIC' } }), 400, 3, 'group.filter');
    isError(await api(s, 'POST', '/api/v1/groups', { key: A, body: { id: 'fam-g-y', kind: 'GROUP_KIND_FLUFFY' } }), 400, 3, 'kind');
    // Update: the mask's field changes, the etag must match and moves on.
    await guarded(s, 'PATCH', '/api/v1/groups/fam-g-static?updateMask=description', 'admin', { description: 'x' });
    let u = ok(await api(s, 'PATCH', '/api/v1/groups/fam-g-static?updateMask=description', { key: A, body: { description: 'pumps in hall 2', etag: g.etag } }), 200, 'update');
    eq([u.id, u.description, u.kind], ['fam-g-static', 'pumps in hall 2', 'GROUP_KIND_STATIC'], 'updated');
    assert(u.etag !== g.etag, 'etag changed');
    // The path names the group, whatever the body says.
    u = ok(await api(s, 'PATCH', '/api/v1/groups/fam-g-static?updateMask=description', { key: A, body: { id: 'fam-g-other', description: 'pumps in hall 2' } }), 200, 'update');
    eq(u.id, 'fam-g-static', 'the path wins over the body');
    isError(await api(s, 'GET', '/api/v1/groups/fam-g-other', { key: s.viewer }), 404, 5);
    eq(ok(await api(s, 'GET', '/api/v1/groups/fam-g-static', { key: s.viewer })).description, 'pumps in hall 2', 'update reads back');
    isError(await api(s, 'PATCH', '/api/v1/groups/fam-g-static?updateMask=description', { key: A, body: { description: 'x', etag: g.etag } }), 409, 10);
    isError(await api(s, 'PATCH', '/api/v1/groups/fam-g-none?updateMask=description', { key: A, body: { description: 'x' } }), 404, 5, 'fam-g-none');
    isError(await api(s, 'GET', '/api/v1/groups/fam-g-none', { key: s.viewer }), 404, 5, 'fam-g-none');
    // Static membership: add (idempotent), list paged, remove.
    const devices = [];
    for (let i = 0; i < 7; i++) devices.push({ id: `fam-gm-${i}`, type: 'meter', model: 'M-1', labels: { fam: i < 4 ? 'dyn' : 'other' } });
    ok(await api(s, 'POST', '/api/v1/devices:batchCreate', { key: A, body: { devices } }), 201, 'devices');
    const ids = devices.map((d) => d.id);
    await guarded(s, 'POST', '/api/v1/groups/fam-g-static/members:add', 'admin', { deviceIds: ids });
    eq(ok(await api(s, 'POST', '/api/v1/groups/fam-g-static/members:add', { key: A, body: { deviceIds: ids } })).changed, 7, 'added');
    eq(ok(await api(s, 'POST', '/api/v1/groups/fam-g-static/members:add', { key: A, body: { deviceIds: ids.slice(0, 2) } })).changed, undefined, 'adding twice changes nothing (0 is left out)');
    isError(await api(s, 'POST', '/api/v1/groups/fam-g-static/members:add', { key: A, body: { deviceIds: ['fam-gm-none'] } }), 404, 5, 'fam-gm-none');
    isError(await api(s, 'POST', '/api/v1/groups/fam-g-static/members:add', { key: A, body: { deviceIds: [] } }), 400, 3, 'device_ids');
    isError(await api(s, 'POST', '/api/v1/groups/fam-g-static/members:add', { key: A, body: { deviceIds: ['bad id!'] } }), 400, 3, 'device_ids[0]');
    isError(await api(s, 'POST', '/api/v1/groups/fam-g-none/members:add', { key: A, body: { deviceIds: ids } }), 404, 5, 'fam-g-none');
    let members = await walk(s, '/api/v1/groups/fam-g-static/members', 'devices', 3);
    eq(members.map((d) => d.id), ids, 'every member once, by id');
    eq(members[0].model, 'M-1', 'members are whole devices');
    eq(ok(await api(s, 'POST', '/api/v1/groups/fam-g-static/members:remove', { key: A, body: { deviceIds: ['fam-gm-1', 'fam-gm-3'] } })).changed, 2, 'removed');
    members = ok(await api(s, 'GET', '/api/v1/groups/fam-g-static/members', { key: s.viewer })).devices;
    eq(members.map((d) => d.id), ['fam-gm-0', 'fam-gm-2', 'fam-gm-4', 'fam-gm-5', 'fam-gm-6'], 'members after remove');
    isError(await api(s, 'GET', '/api/v1/groups/fam-g-none/members', { key: s.viewer }), 404, 5, 'fam-g-none');
    isError(await api(s, 'GET', '/api/v1/groups/fam-g-static/members?pageSize=5000', { key: s.viewer }), 400, 3, 'page_size');
    // Dynamic: members are whoever matches the filter; no explicit membership.
    g = ok(await api(s, 'POST', '/api/v1/groups', { key: A, body: { id: 'fam-g-dyn', kind: 'GROUP_KIND_DYNAMIC', filter: { labelSelector: 'fam=dyn' } } }), 201, 'dynamic');
    eq(g.filter, { labelSelector: 'fam=dyn' }, 'filter');
    members = ok(await api(s, 'GET', '/api/v1/groups/fam-g-dyn/members', { key: s.viewer })).devices;
    eq(members.map((d) => d.id), ['fam-gm-0', 'fam-gm-1', 'fam-gm-2', 'fam-gm-3'], 'dynamic members');
    eq((await walk(s, '/api/v1/groups/fam-g-dyn/members', 'devices', 3)).map((d) => d.id), members.map((d) => d.id), 'dynamic members paged');
    isError(await api(s, 'POST', '/api/v1/groups/fam-g-dyn/members:add', { key: A, body: { deviceIds: ['fam-gm-5'] } }), 412, 9);
    u = ok(await api(s, 'PATCH', '/api/v1/groups/fam-g-dyn?updateMask=filter', { key: A, body: { filter: { labelSelector: 'fam=other' } } }), 200, 'refilter');
    members = ok(await api(s, 'GET', '/api/v1/groups/fam-g-dyn/members', { key: s.viewer })).devices;
    eq(members.map((d) => d.id), ['fam-gm-4', 'fam-gm-5', 'fam-gm-6'], 'members follow the new filter');
    // A device filter by group reaches the same members.
    eq(ok(await api(s, 'GET', '/api/v1/devices?filter.groupId=fam-g-static', { key: s.viewer })).devices.length, 5, 'filter.groupId');
    // The list pages.
    for (let i = 0; i < 5; i++) ok(await api(s, 'POST', '/api/v1/groups', { key: A, body: { id: `fam-g-page-${i}`, kind: 'GROUP_KIND_STATIC' } }), 201);
    const all = ok(await api(s, 'GET', '/api/v1/groups?pageSize=1000', { key: s.viewer })).groups.map((x) => x.id);
    eq((await walk(s, '/api/v1/groups', 'groups', 2)).map((x) => x.id), all, 'paged list = the whole list');
    for (const id of ['fam-g-static', 'fam-g-dyn', 'fam-g-page-0', 'fam-g-page-4']) assert(all.includes(id), `${id} listed`);
    isError(await api(s, 'GET', '/api/v1/groups?pageToken=bogus', { key: s.viewer }), 400, 3, 'page_token');
    // Delete.
    await guarded(s, 'DELETE', '/api/v1/groups/fam-g-page-0', 'admin');
    eq(ok(await api(s, 'DELETE', '/api/v1/groups/fam-g-page-0', { key: A })), {}, 'delete');
    isError(await api(s, 'GET', '/api/v1/groups/fam-g-page-0', { key: s.viewer }), 404, 5);
    isError(await api(s, 'DELETE', '/api/v1/groups/fam-g-page-0', { key: A }), 404, 5);
    assert(!ok(await api(s, 'GET', '/api/v1/groups?pageSize=1000', { key: s.viewer })).groups.some((x) => x.id === 'fam-g-page-0'), 'gone from the list');
  }],

  ['device_tokens_issue_rotate_revoke', async (s) => {
    const A = s.adminKey;
    const dev = await device(s, 'fam-tok');
    await guarded(s, 'POST', '/api/v1/devices/fam-tok/tokens', 'admin', {});
    const t0 = Date.now();
    const t1 = ok(await api(s, 'POST', '/api/v1/devices/fam-tok/tokens', { key: A, body: { ttlSeconds: 3600 } }), 201, 'issue');
    assert(/^dt1\.tk-[0-9a-f]{16}\./.test(t1.token), `token format: ${t1.token}`);
    assert(t1.token.includes(t1.tokenId), 'the token carries its id');
    const exp = Date.parse(t1.expireTime);
    assert(exp >= t0 + 3599000 && exp <= Date.now() + 3601000, `expireTime an hour out: ${t1.expireTime}`);
    assert(!ok(await api(s, 'POST', '/api/v1/devices/fam-tok/tokens', { key: A, body: {} }), 201).expireTime, 'ttl 0: no expiry');
    const works = async (token) => (await pushAs(s, token, { points: [] })).status;
    // The other device-token route (ota asks device-mgmt on every download).
    const fw = ok(await api(s, 'POST', '/api/v1/artifacts?name=fam-tok-fw&version=1.0.0&models=S-1', { key: A, raw: Buffer.from('firmware'), type: 'application/octet-stream' }), 201, 'artifact');
    const fetches = async (token) => (await fetch(`${s.base}/api/v1/artifacts/${fw.id}/content`, { headers: { Authorization: `Bearer ${token}` } })).status;
    eq(await fetches(t1.token), 200, 'the new token downloads');
    eq(await works(t1.token), 200, 'the new token pushes');
    eq(await works(dev.token), 200, 'tokens side by side');
    // Rotate: a new token, the old one stops at once.
    await guarded(s, 'POST', `/api/v1/tokens/${t1.tokenId}:rotate`, 'admin', {});
    const t2 = ok(await api(s, 'POST', `/api/v1/tokens/${t1.tokenId}:rotate`, { key: A, body: { ttlSeconds: 120 } }), 200, 'rotate');
    assert(t2.tokenId !== t1.tokenId && t2.token !== t1.token, 'a new token');
    assert(Date.parse(t2.expireTime) <= Date.now() + 121000, 'rotate takes its own ttl');
    eq(await works(t2.token), 200, 'the rotated token pushes');
    isError(await pushAs(s, t1.token, { points: [] }), 401, 16);
    eq(await fetches(t1.token), 401, 'the rotated-away token downloads nothing');
    eq(await fetches(t2.token), 200, 'the rotated token downloads');
    isError(await api(s, 'POST', `/api/v1/tokens/${t1.tokenId}:rotate`, { key: A, body: {} }), 412, 9, 'revoked');
    // Revoke.
    await guarded(s, 'DELETE', `/api/v1/tokens/${t2.tokenId}`, 'admin');
    eq(ok(await api(s, 'DELETE', `/api/v1/tokens/${t2.tokenId}`, { key: A })), {}, 'revoke');
    isError(await pushAs(s, t2.token, { points: [] }), 401, 16);
    eq(await fetches(t2.token), 401, 'the revoked token downloads nothing');
    eq(await works(dev.token), 200, 'the device\'s other token still works');
    // Errors.
    isError(await api(s, 'POST', '/api/v1/devices/fam-none/tokens', { key: A, body: {} }), 404, 5, 'fam-none');
    isError(await api(s, 'POST', '/api/v1/devices/fam-tok/tokens', { key: A, body: { ttlSeconds: 5 } }), 400, 3, 'ttl_seconds');
    isError(await api(s, 'POST', '/api/v1/devices/fam-tok/tokens', { key: A, body: { ttlSeconds: 'soon' } }), 400, 3, 'ttlSeconds');
    isError(await api(s, 'POST', '/api/v1/tokens/tk-0000000000000000:rotate', { key: A, body: {} }), 404, 5);
    isError(await api(s, 'DELETE', '/api/v1/tokens/tk-0000000000000000', { key: A }), 404, 5);
    isError(await api(s, 'POST', `/api/v1/tokens/${t2.tokenId}:rotate`, { key: A, body: { ttlSeconds: -1 } }), 400, 3, 'ttl_seconds');
  }],

  ['telemetry_push_as_a_device', async (s) => {
    const dev = await device(s, 'fam-push');
    const t0 = Date.now() - 60000;
    let ack = await push(s, dev, 'temp', [20.5, 21, 21.5], t0);
    eq(ack, { ackedSeq: '3', stored: 3 }, 'ack (uint64 as a string; zero duplicates left out)');
    // The same points again: duplicates, nothing stored twice.
    const again = { points: [1, 2, 3].map((q) => ({ seq: String(q), metric: 'temp', timeMs: String(t0 + q), doubleValue: 99 })) };
    eq(ok(await pushAs(s, dev.token, again)), { ackedSeq: '3', duplicates: 3 }, 'resend');
    // Every value kind and labels.
    const kinds = { points: [
      { seq: '4', metric: 'count', timeMs: String(t0 + 10), intValue: '9007199254740993', labels: { unit: 'pcs' } },
      { seq: '5', metric: 'open', timeMs: String(t0 + 11), boolValue: true },
      { seq: '6', metric: 'state', timeMs: String(t0 + 12), stringValue: 'ok' },
    ] };
    dev.seq = 6;
    eq(ok(await pushAs(s, dev.token, kinds)), { ackedSeq: '6', stored: 3 }, 'kinds');
    const latest = ok(await api(s, 'GET', '/api/v1/devices/fam-push/telemetry/latest', { key: s.viewer })).points;
    const by = Object.fromEntries(latest.map((p) => [p.metric, p]));
    eq(by.count.intValue, '9007199254740993', 'int64 beyond 2^53 survives as a string');
    eq(by.count.labels, { unit: 'pcs' }, 'labels');
    eq(by.open.boolValue, true, 'bool');
    eq(by.state.stringValue, 'ok', 'string');
    eq(by.temp.doubleValue, 21.5, 'not the resent 99');
    // Who may push: a device token, not an API key, not nothing.
    isError(await pushAs(s, null, { points: [] }), 401, 16, 'device token');
    isError(await pushAs(s, s.adminKey, { points: [] }), 401, 16);
    isError(await pushAs(s, 'dt1.tk-0000000000000000.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', { points: [] }), 401, 16);
    isError(await api(s, 'POST', '/api/v1/telemetry', { headers: { Authorization: 'Basic Zm9vOmJhcg==' }, body: { points: [] } }), 401, 16);
    // A token pushes to its own device only: there is no device to name in the request, so another
    // device's token stores under that device.
    const other = await device(s, 'fam-push-other');
    ok(await pushAs(s, other.token, { points: [{ seq: '1', metric: 'temp', timeMs: String(t0 + 20), doubleValue: -1 }] }), 200);
    const mine = ok(await api(s, 'GET', `/api/v1/devices/fam-push/telemetry?metric=temp&fromMs=${t0}&toMs=${t0 + 1000}`, { key: s.viewer })).points;
    eq(mine.map((p) => p.doubleValue), [20.5, 21, 21.5], 'fam-push has only its own points');
    const theirs = ok(await api(s, 'GET', `/api/v1/devices/fam-push-other/telemetry?metric=temp&fromMs=${t0}&toMs=${t0 + 1000}`, { key: s.viewer })).points;
    eq(theirs.map((p) => p.doubleValue), [-1], 'the other device\'s point is the other device\'s');
    // A deleted device's token stops.
    ok(await api(s, 'DELETE', '/api/v1/devices/fam-push-other', { key: s.adminKey }));
    isError(await pushAs(s, other.token, { points: [] }), 401, 16);
    // Bad batches: the message names the point and field; nothing of the batch is stored.
    const bad = (p) => pushAs(s, dev.token, { points: [{ seq: '100', metric: 'temp', timeMs: String(Date.now()), doubleValue: 1 }, { seq: '101', metric: 'temp', timeMs: String(Date.now()), doubleValue: 1, ...p }] });
    isError(await bad({ metric: 'bad metric!' }), 400, 3, 'points[1].metric');
    isError(await bad({ timeMs: String(t0 - 30 * 86400000) }), 400, 3, 'points[1].time_ms');
    isError(await bad({ seq: '100' }), 400, 3, 'points[1].seq');
    isError(await bad({ doubleValue: 'NaN' }), 400, 3, 'points[1]');
    isError(await bad({ seq: 'x' }), 400, 3, 'points[1].seq');
    isError(await bad({ stringValue: 'a' }), 400, 3, 'value'); /* two values of one oneof */
    isError(await pushAs(s, dev.token, { point: [] }), 400, 3, 'unknown field "point"');
    isError(await api(s, 'POST', '/api/v1/telemetry', { headers: { Authorization: `Bearer ${dev.token}` }, raw: '{"points": [' }), 400, 3, 'malformed JSON');
    eq(ok(await pushAs(s, dev.token, { points: [] })), { ackedSeq: '6' }, 'nothing of the bad batches was stored');
  }],

  ['telemetry_rate_limit_429_says_when_to_retry', async (s) => {
    // IOT_INGEST_RATE_LIMIT is 100 points a second here. A batch may overdraw the budget; the next
    // one is refused until the debt is paid, and ingest says how long that is ("retry-after-ms",
    // a gRPC trailer). A REST client has no trailers: it needs Retry-After and the details.
    const dev = await device(s, 'fam-rate');
    const t0 = Date.now() - 10000;
    // 300 points: two seconds of debt, so a slow commit cannot pay it before the next push.
    eq((await push(s, dev, 'x', Array.from({ length: 300 }, (_, i) => i), t0)).stored, 300, 'admitted, overdrawn');
    const one = () => pushAs(s, dev.token, { points: [{ seq: String(dev.seq + 1), metric: 'x', timeMs: String(Date.now()), doubleValue: 1 }] });
    const r = await one();
    isError(r, 429, 8, 'rate limit');
    const ms = r.json.details.retryAfterMs;
    assert(Number.isInteger(ms) && ms > 0 && ms <= 2001, `details.retryAfterMs: ${JSON.stringify(r.json)}`);
    eq(r.headers.get('retry-after'), String(Math.ceil(ms / 1000)), 'Retry-After: the same wait in whole seconds, rounded up');
    await sleep(ms);
    eq(ok(await one(), 200, 'after the wait').stored, 1, 'admitted after the wait it was told');
  }],
  ['telemetry_query_raw_steps_and_latest', async (s) => {
    const dev = await device(s, 'fam-q');
    const t0 = Math.floor((Date.now() - 120000) / 1000) * 1000;
    await push(s, dev, 'temp', [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], t0, 1000);
    await push(s, dev, 'hum', [40, 41], t0, 30000);
    const q = (query, key = s.viewer) => api(s, 'GET', `/api/v1/devices/fam-q/telemetry?${query}`, { key });
    await guarded(s, 'GET', `/api/v1/devices/fam-q/telemetry?metric=temp&fromMs=${t0}&toMs=${t0 + 10000}`, 'viewer');
    // Raw points, paged, in time order.
    const pts = await walk(s, `/api/v1/devices/fam-q/telemetry?metric=temp&fromMs=${t0}&toMs=${t0 + 10000}`, 'points', 3, { id: (p) => p.seq });
    eq(pts.map((p) => p.doubleValue), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 'values in time order');
    eq(pts.map((p) => p.timeMs), pts.map((_, i) => String(t0 + i * 1000)), 'times (int64 as strings)');
    eq(pts.every((p) => p.metric === 'temp'), true, 'metric');
    // The range is [from, to).
    eq(ok(await q(`metric=temp&fromMs=${t0 + 2000}&toMs=${t0 + 4000}`)).points.map((p) => p.doubleValue), [2, 3], 'from inclusive, to exclusive');
    // Buckets of stepMs with an aggregation.
    const agg = async (a) => ok(await q(`metric=temp&fromMs=${t0}&toMs=${t0 + 10000}&stepMs=5000&aggregation=${a}`)).buckets;
    eq(await agg('AGGREGATION_AVG'), [{ startMs: String(t0), value: 2, count: '5' }, { startMs: String(t0 + 5000), value: 7, count: '5' }], 'avg');
    eq((await agg('AGGREGATION_MAX')).map((b) => b.value), [4, 9], 'max');
    eq((await agg('AGGREGATION_MIN')).map((b) => b.value), [undefined, 5], 'min (0, a default, is left out)');
    eq((await agg('AGGREGATION_SUM')).map((b) => b.value), [10, 35], 'sum');
    eq((await agg('AGGREGATION_COUNT')).map((b) => b.value), [5, 5], 'count');
    eq((await agg('AGGREGATION_LAST')).map((b) => b.value), [4, 9], 'last');
    eq(ok(await q(`metric=temp&fromMs=${t0}&toMs=${t0 + 10000}&step_ms=3000&aggregation=AGGREGATION_COUNT`)).buckets.map((b) => [b.startMs, b.count]),
      [[String(t0), '3'], [String(t0 + 3000), '3'], [String(t0 + 6000), '3'], [String(t0 + 9000), '1']], 'proto names as query parameters too; buckets from fromMs');
    // Validation names the field.
    isError(await q(`metric=temp&fromMs=${t0}&toMs=${t0 + 10000}&aggregation=AGGREGATION_AVG`), 400, 3, 'step_ms');
    isError(await q(`metric=temp&fromMs=${t0}&toMs=${t0 + 10000}&stepMs=1000&aggregation=AGGREGATION_MEDIAN`), 400, 3, 'aggregation');
    isError(await q(`metric=temp&fromMs=${t0 + 10000}&toMs=${t0}`), 400, 3, 'to_ms');
    isError(await q(`metric=temp&fromMs=yesterday&toMs=${t0}`), 400, 3, 'fromMs');
    isError(await q(`fromMs=${t0}&toMs=${t0 + 10000}`), 400, 3, 'metric');
    isError(await q(`metric=temp&fromMs=${t0}&toMs=${t0 + 10000}&pageSize=20000`), 400, 3, 'page_size');
    isError(await q(`metric=temp&fromMs=${t0}&toMs=${t0 + 10000}&pageToken=bogus`), 400, 3, 'page_token');
    isError(await q(`metric=temp&fromMs=${t0}&toMs=${t0 + 10000}&colour=red`), 400, 3, 'colour');
    // Latest: one point per metric, the newest.
    await guarded(s, 'GET', '/api/v1/devices/fam-q/telemetry/latest', 'viewer');
    const latest = ok(await api(s, 'GET', '/api/v1/devices/fam-q/telemetry/latest', { key: s.viewer })).points;
    eq(latest.map((p) => [p.metric, p.doubleValue, p.timeMs]), [['hum', 41, String(t0 + 30000)], ['temp', 9, String(t0 + 9000)]], 'latest by metric');
    // A device with no telemetry (or none at all) has none: ingest does not own devices.
    eq(ok(await api(s, 'GET', '/api/v1/devices/fam-none/telemetry/latest', { key: s.viewer })).points || [], [], 'no points');
    eq(ok(await api(s, 'GET', `/api/v1/devices/fam-none/telemetry?metric=temp&fromMs=${t0}&toMs=${t0 + 10000}`, { key: s.viewer })).points || [], [], 'no points');
  }],

  ['rules_crud_enable_stats_and_paging', async (s) => {
    const O = s.operator;
    const dev = await device(s, 'fam-rule-dev');
    const body = { id: 'fam-r-1', name: 'too hot', enabled: true, metric: 'temp', devices: { deviceIds: [dev.id] },
      threshold: { op: 'COMPARISON_GT', threshold: 30 }, severity: 'SEVERITY_HIGH' };
    await guarded(s, 'POST', '/api/v1/rules', 'operator', body);
    await guarded(s, 'GET', '/api/v1/rules', 'viewer');
    const r = ok(await api(s, 'POST', '/api/v1/rules', { key: O, body }), 201, 'create');
    eq([r.id, r.name, r.enabled, r.metric, r.devices, r.threshold, r.severity],
      ['fam-r-1', 'too hot', true, 'temp', { deviceIds: [dev.id] }, { op: 'COMPARISON_GT', threshold: 30 }, 'SEVERITY_HIGH'], 'created rule');
    assert(r.etag && r.createTime, 'etag, createTime');
    eq(ok(await api(s, 'GET', '/api/v1/rules/fam-r-1', { key: s.viewer })), r, 'get reads back');
    isError(await api(s, 'POST', '/api/v1/rules', { key: O, body }), 409, 6);
    // Validation names the field.
    isError(await api(s, 'POST', '/api/v1/rules', { key: O, body: { ...body, id: 'fam-r-bad', metric: '' } }), 400, 3, 'metric');
    isError(await api(s, 'POST', '/api/v1/rules', { key: O, body: { ...body, id: 'fam-r-bad', threshold: { op: 'COMPARISON_GT', threshold: 1, statistic: 'STATISTIC_MEAN', window: { widthMs: 1001 } } } }), 400, 3, 'width_ms');
    isError(await api(s, 'POST', '/api/v1/rules', { key: O, body: { ...body, id: 'fam-r-bad', detector: { kind: 'DETECTOR_KIND_STUCK' } } }), 400, 3, 'detector');
    isError(await api(s, 'POST', '/api/v1/rules', { key: O, body: { ...body, id: 'fam-r-bad', severity: 'SEVERITY_APOCALYPSE' } }), 400, 3, 'severity');
    isError(await api(s, 'POST', '/api/v1/rules', { key: O, body: { ...body, id: 'bad id!' } }), 400, 3, 'id');
    // Update with a mask; a stale etag is refused.
    await guarded(s, 'PATCH', '/api/v1/rules/fam-r-1?updateMask=name', 'operator', { name: 'x' });
    const u = ok(await api(s, 'PATCH', '/api/v1/rules/fam-r-1?updateMask=name,threshold', {
      key: O, body: { name: 'really hot', threshold: { op: 'COMPARISON_GE', threshold: 40 }, severity: 'SEVERITY_INFO', etag: r.etag } }), 200, 'update');
    eq([u.name, u.threshold, u.severity, u.metric], ['really hot', { op: 'COMPARISON_GE', threshold: 40 }, 'SEVERITY_HIGH', 'temp'], 'masked fields only');
    assert(u.etag !== r.etag, 'etag moved');
    eq(ok(await api(s, 'GET', '/api/v1/rules/fam-r-1', { key: s.viewer })), u, 'update reads back');
    isError(await api(s, 'PATCH', '/api/v1/rules/fam-r-1?updateMask=name', { key: O, body: { name: 'x', etag: r.etag } }), 412, 9); /* processing's README: FAILED_PRECONDITION */
    isError(await api(s, 'PATCH', '/api/v1/rules/fam-r-1?updateMask=colour', { key: O, body: { name: 'x' } }), 400, 3, 'colour');
    isError(await api(s, 'PATCH', '/api/v1/rules/fam-r-none?updateMask=name', { key: O, body: { name: 'x' } }), 404, 5);
    // Enable and disable.
    await guarded(s, 'POST', '/api/v1/rules/fam-r-1:setEnabled', 'operator', { enabled: false });
    let e = ok(await api(s, 'POST', '/api/v1/rules/fam-r-1:setEnabled', { key: O, body: { enabled: false } }), 200, 'disable');
    eq([e.id, e.enabled, e.name], ['fam-r-1', undefined, 'really hot'], 'disabled (false is left out)');
    let enabled = ok(await api(s, 'GET', '/api/v1/rules?enabledOnly=true&pageSize=1000', { key: s.viewer })).rules || [];
    assert(!enabled.some((x) => x.id === 'fam-r-1'), 'enabledOnly leaves it out');
    e = ok(await api(s, 'POST', '/api/v1/rules/fam-r-1:setEnabled', { key: O, body: { enabled: true } }), 200, 'enable');
    eq(e.enabled, true, 'enabled');
    enabled = ok(await api(s, 'GET', '/api/v1/rules?enabledOnly=true&pageSize=1000', { key: s.viewer })).rules;
    assert(enabled.some((x) => x.id === 'fam-r-1'), 'listed again');
    isError(await api(s, 'POST', '/api/v1/rules/fam-r-none:setEnabled', { key: O, body: { enabled: true } }), 404, 5);
    eq(ok(await api(s, 'POST', '/api/v1/rules/fam-r-1:setEnabled', { key: O }), 200, 'no body').enabled, undefined, 'no body: enabled false');
    ok(await api(s, 'POST', '/api/v1/rules/fam-r-1:setEnabled', { key: O, body: { enabled: true } }), 200, 'enable again');
    // Ids may hold ':' (and so may look like actions): the action is after the last one.
    ok(await api(s, 'POST', '/api/v1/rules', { key: O, body: { ...body, id: 'fam:r:colon', enabled: false } }), 201, 'a rule id with colons');
    eq(ok(await api(s, 'POST', '/api/v1/rules/fam:r:colon:setEnabled', { key: O, body: { enabled: true } })).id, 'fam:r:colon', 'its action');
    eq(ok(await api(s, 'GET', '/api/v1/rules/fam:r:colon', { key: s.viewer })).enabled, true, 'read back by its id');
    ok(await api(s, 'DELETE', '/api/v1/rules/fam:r:colon', { key: O }));
    isError(await api(s, 'POST', '/api/v1/rules/fam-r-1:setEnabled', { key: O, body: { enabled: 'yes' } }), 400, 3, 'enabled');
    // Stats count the rule's evaluations once points flow.
    await guarded(s, 'GET', '/api/v1/rules/fam-r-1/stats', 'viewer');
    await ruleLoaded(s, ok(await api(s, 'GET', '/api/v1/rules/fam-r-1', { key: s.viewer })).etag);
    await push(s, dev, 'temp', [10, 11, 12], Date.now() - 1000);
    const st = await until(async () => {
      const x = ok(await api(s, 'GET', '/api/v1/rules/fam-r-1/stats', { key: s.viewer }));
      return Number(x.evaluations || 0) >= 3 && x;
    }, 'stats count 3 evaluations');
    eq(st.ruleId, 'fam-r-1', 'stats name the rule');
    eq(st.matches, undefined, 'no matches below the threshold');
    isError(await api(s, 'GET', '/api/v1/rules/fam-r-none/stats', { key: s.viewer }), 404, 5);
    // Window statistics: a rule without a window has none; unknown rules 404.
    isError(await api(s, 'GET', `/api/v1/rules/fam-r-1/windows/${dev.id}`, { key: s.viewer }), 412, 9);
    isError(await api(s, 'GET', `/api/v1/rules/fam-r-none/windows/${dev.id}`, { key: s.viewer }), 404, 5);
    // A windowed rule publishes its window.
    const win = ok(await api(s, 'POST', '/api/v1/rules', { key: O, body: { id: 'fam-r-win', name: 'mean', enabled: true, metric: 'load', devices: { deviceIds: [dev.id] },
      threshold: { op: 'COMPARISON_GT', threshold: 1000, statistic: 'STATISTIC_MEAN', window: { kind: 'WINDOW_KIND_COUNT', count: 4, minSamples: 2 } } } }), 201, 'windowed rule');
    await ruleLoaded(s, win.etag);
    await push(s, dev, 'load', [2, 4, 6, 8], Date.now() - 1000);
    const w = await until(async () => {
      const x = await api(s, 'GET', `/api/v1/rules/fam-r-win/windows/${dev.id}`, { key: s.viewer });
      return x.status === 200 && x.json.count === '4' && x.json;
    }, 'window stats');
    eq([w.ruleId, w.deviceId, w.metric, w.mean, w.min, w.max, w.last], ['fam-r-win', dev.id, 'load', 5, 2, 8, 8], 'window stats');
    // Paging.
    for (let i = 0; i < 5; i++) ok(await api(s, 'POST', '/api/v1/rules', { key: O, body: { ...body, id: `fam-r-page-${i}`, enabled: false } }), 201);
    const all = ok(await api(s, 'GET', '/api/v1/rules?pageSize=1000', { key: s.viewer })).rules.map((x) => x.id);
    eq((await walk(s, '/api/v1/rules', 'rules', 2)).map((x) => x.id), all, 'paged list = the whole list');
    for (const id of ['fam-r-1', 'fam-r-win', 'fam-r-page-0', 'fam-r-page-4']) assert(all.includes(id), `${id} listed`);
    isError(await api(s, 'GET', '/api/v1/rules?pageSize=-1', { key: s.viewer }), 400, 3, 'page_size');
    isError(await api(s, 'GET', '/api/v1/rules?pageToken=bogus', { key: s.viewer }), 400, 3, 'page_token');
    // Delete (an etag, when given, must match).
    await guarded(s, 'DELETE', '/api/v1/rules/fam-r-page-0', 'operator');
    isError(await api(s, 'DELETE', '/api/v1/rules/fam-r-page-0?etag=123456', { key: O }), 412, 9);
    eq(ok(await api(s, 'DELETE', '/api/v1/rules/fam-r-page-0', { key: O })), {}, 'delete');
    isError(await api(s, 'GET', '/api/v1/rules/fam-r-page-0', { key: s.viewer }), 404, 5);
    isError(await api(s, 'DELETE', '/api/v1/rules/fam-r-page-0', { key: O }), 404, 5);
  }],

  ['alerts_list_get_ack_and_paging', async (s) => {
    const O = s.operator;
    const dev = await device(s, 'fam-alert-dev');
    const rule = ok(await api(s, 'POST', '/api/v1/rules', { key: O, body: { id: 'fam-alert-rule', name: 'hot', enabled: true, metric: 'temp',
      devices: { deviceIds: [dev.id] }, threshold: { op: 'COMPARISON_GT', threshold: 30 }, severity: 'SEVERITY_HIGH' } }), 201, 'rule');
    await ruleLoaded(s, rule.etag);
    // Fire, resolve, fire, resolve, fire: three alerts, the last one firing.
    await push(s, dev, 'temp', [35, 10, 36, 10, 37], Date.now() - 5000, 1000);
    const list = (q, key = s.viewer) => api(s, 'GET', `/api/v1/alerts?ruleId=fam-alert-rule${q}`, { key });
    await until(async () => (ok(await list('')).alerts || []).length === 3, 'three alerts');
    await guarded(s, 'GET', '/api/v1/alerts', 'viewer');
    const alerts = await walk(s, '/api/v1/alerts?ruleId=fam-alert-rule', 'alerts', 2);
    eq(alerts.map((a) => a.value), [37, 36, 35], 'newest first');
    const ids = alerts.map((a) => BigInt(a.id));
    assert(ids[0] > ids[1] && ids[1] > ids[2], `ids decrease: ${ids}`);
    eq(alerts.map((a) => a.state), ['ALERT_STATE_FIRING', 'ALERT_STATE_RESOLVED', 'ALERT_STATE_RESOLVED'], 'states');
    eq(alerts.every((a) => a.deviceId === dev.id && a.metric === 'temp' && a.severity === 'SEVERITY_HIGH'), true, 'device, metric, severity');
    // Filters as query parameters.
    eq(ok(await list('&state=ALERT_STATE_FIRING')).alerts.map((a) => a.value), [37], 'state filter');
    eq(ok(await list(`&deviceId=${dev.id}&minSeverity=SEVERITY_HIGH`)).alerts.length, 3, 'device and severity filter');
    eq(ok(await list('&minSeverity=SEVERITY_CRITICAL')).alerts || [], [], 'above the severity');
    eq(ok(await list(`&firedAfter=${encodeURIComponent(new Date(Date.now() + 3600000).toISOString())}`)).alerts || [], [], 'fired after (a timestamp)');
    isError(await list('&minSeverity=SEVERITY_NUCLEAR'), 400, 3, 'minSeverity');
    isError(await list('&firedAfter=yesterday'), 400, 3, 'firedAfter');
    isError(await list('&pageToken=bogus'), 400, 3, 'page_token');
    // Get.
    const [firing] = alerts;
    eq(ok(await api(s, 'GET', `/api/v1/alerts/${firing.id}`, { key: s.viewer })), firing, 'get reads back');
    isError(await api(s, 'GET', '/api/v1/alerts/999999999', { key: s.viewer }), 404, 5);
    isError(await api(s, 'GET', '/api/v1/alerts/abc', { key: s.viewer }), 400, 3, 'id');
    // Ack: operators may, viewers may not; the key is recorded with the name; the first ack stays.
    await guarded(s, 'POST', `/api/v1/alerts/${firing.id}:ack`, 'operator', { by: 'mallory' });
    const a = ok(await api(s, 'POST', `/api/v1/alerts/${firing.id}:ack`, { key: O, body: { by: 'bob' } }), 200, 'ack');
    eq([a.id, a.acknowledged, a.acknowledgedBy], [firing.id, true, `bob (api-key:${s.operatorId})`], 'acknowledged');
    assert(Date.parse(a.acknowledgedTime) > Date.now() - 60000, 'acknowledgedTime');
    const a2 = ok(await api(s, 'POST', `/api/v1/alerts/${firing.id}:ack`, { key: s.adminKey, body: {} }), 200, 'ack again');
    eq(a2.acknowledgedBy, a.acknowledgedBy, 'the first ack stays');
    eq(ok(await api(s, 'GET', `/api/v1/alerts/${firing.id}`, { key: s.viewer })).acknowledgedBy, a.acknowledgedBy, 'ack reads back');
    const other = ok(await api(s, 'POST', `/api/v1/alerts/${alerts[2].id}:ack`, { key: O, body: {} }), 200, 'ack without a name');
    eq(other.acknowledgedBy, `api-key:${s.operatorId}`, 'the key alone');
    isError(await api(s, 'POST', '/api/v1/alerts/999999999:ack', { key: O, body: { by: 'bob' } }), 404, 5);
    isError(await api(s, 'POST', '/api/v1/alerts/abc:ack', { key: O, body: { by: 'bob' } }), 400, 3, 'id');
    isError(await api(s, 'POST', `/api/v1/alerts/${firing.id}:ack`, { key: O, body: { by: 7 } }), 400, 3, 'by');
    // The rule's stats count the alerts it fired.
    const st = await until(async () => {
      const x = ok(await api(s, 'GET', '/api/v1/rules/fam-alert-rule/stats', { key: s.viewer }));
      return x.alertsFired === '3' && x.evaluations === '5' && x;
    }, 'alertsFired 3 (from Postgres) and 5 evaluations (published every second)');
    eq(st.matches, '3', `three points matched: ${JSON.stringify(st)}`);
  }],

  ['rollups_per_minute_and_paging', async (s) => {
    const dev = await device(s, 'fam-roll');
    const m0 = Math.floor((Date.now() - 10 * 60000) / 60000) * 60000;
    await push(s, dev, 'temp', [1, 3], m0 + 1000, 1000);
    await push(s, dev, 'temp', [5], m0 + 61000);
    await push(s, dev, 'temp', [7, 9, 8], m0 + 121000, 1000);
    await push(s, dev, 'temp', [4], m0 + 241000);
    const iso = (ms) => new Date(ms).toISOString();
    const path = `/api/v1/devices/fam-roll/rollups?metric=temp&from=${iso(m0)}&to=${iso(m0 + 300000)}`;
    await guarded(s, 'GET', path, 'viewer');
    const rows = await until(async () => {
      const r = ok(await api(s, 'GET', path, { key: s.viewer })).rollups || [];
      return r.length === 4 && r;
    }, 'four rollups (flushed every second)');
    const want = [[m0, '2', 1, 3, 4, 3], [m0 + 60000, '1', 5, 5, 5, 5], [m0 + 120000, '3', 7, 9, 24, 8], [m0 + 240000, '1', 4, 4, 4, 4]];
    eq(rows.map((x) => [Date.parse(x.startTime), x.count, x.min, x.max, x.sum, x.last]), want, 'minute rollups: count, min, max, sum, last');
    eq(rows.every((x) => x.deviceId === 'fam-roll' && x.metric === 'temp'), true, 'device and metric');
    eq((await walk(s, path, 'rollups', 3, { id: (x) => x.startTime })).map((x) => x.startTime), rows.map((x) => x.startTime), 'paged');
    // Validation names the field.
    isError(await api(s, 'GET', `${path}&resolutionMs=1234`, { key: s.viewer }), 400, 3, 'resolution_ms');
    isError(await api(s, 'GET', `/api/v1/devices/fam-roll/rollups?metric=temp&from=${iso(m0 + 300000)}&to=${iso(m0)}`, { key: s.viewer }), 400, 3, 'from');
    isError(await api(s, 'GET', `/api/v1/devices/fam-roll/rollups?metric=temp&from=last-week&to=${iso(m0)}`, { key: s.viewer }), 400, 3, 'from');
    isError(await api(s, 'GET', `/api/v1/devices/fam-roll/rollups?from=${iso(m0)}&to=${iso(m0 + 300000)}`, { key: s.viewer }), 400, 3, 'metric');
    isError(await api(s, 'GET', `${path}&pageToken=bogus`, { key: s.viewer }), 400, 3, 'page_token');
    // The hour resolution sums the same points.
    const h0 = Math.floor(m0 / 3600000) * 3600000;
    const hours = ok(await api(s, 'GET', `/api/v1/devices/fam-roll/rollups?metric=temp&from=${iso(h0)}&to=${iso(h0 + 2 * 3600000)}&resolutionMs=3600000`, { key: s.viewer })).rollups;
    eq(hours.reduce((n, x) => n + Number(x.count), 0), 7, 'hour rollups hold the seven points');
    eq(hours.reduce((n, x) => n + x.sum, 0), 37, 'and their sum');
    eq(ok(await api(s, 'GET', `/api/v1/devices/fam-none/rollups?metric=temp&from=${iso(m0)}&to=${iso(m0 + 300000)}`, { key: s.viewer })).rollups || [], [], 'none for an unknown device');
  }],

  ['rollouts_lifecycle_devices_and_paging', async (s) => {
    const O = s.operator, A = s.adminKey;
    const up = (name, version, models) => api(s, 'POST', `/api/v1/artifacts?name=${name}&version=${version}&${models.map((m) => 'models=' + m).join('&')}`,
      { key: A, raw: crypto.randomBytes(4096), type: 'application/octet-stream' });
    const art = ok(await up('fam-fw', '2.0.0', ['FM-1']), 201, 'artifact');
    const devices = [];
    for (let i = 0; i < 5; i++) devices.push({ id: `fam-ro-${i}`, type: 'pump', model: 'FM-1', firmwareVersion: '1.0.0', labels: { fam: 'ro' } });
    devices.push({ id: 'fam-ro-other', type: 'pump', model: 'FM-2', firmwareVersion: '1.0.0', labels: { fam: 'ro' } });
    devices.push({ id: 'fam-ro-newer', type: 'pump', model: 'FM-1', firmwareVersion: '3.0.0', labels: { fam: 'ro' } });
    ok(await api(s, 'POST', '/api/v1/devices:batchCreate', { key: A, body: { devices } }), 201, 'devices');
    const body = { name: 'fam rollout', artifactId: art.id, target: { labelSelector: 'fam=ro' }, stages: [{ percent: 100 }] };
    await guarded(s, 'POST', '/api/v1/rollouts', 'operator', body);
    await guarded(s, 'GET', '/api/v1/rollouts', 'viewer');
    const ro = ok(await api(s, 'POST', '/api/v1/rollouts', { key: O, body }), 201, 'create');
    eq([ro.name, ro.artifactId, ro.target, ro.state], ['fam rollout', art.id, { labelSelector: 'fam=ro' }, 'ROLLOUT_STATE_DRAFT'], 'created rollout');
    eq(ro.stages.map((x) => x.percent), [100], 'stages');
    assert(ro.id && ro.etag && ro.createTime, 'id, etag, createTime');
    const get = async (id) => ok(await api(s, 'GET', `/api/v1/rollouts/${id}`, { key: s.viewer }), 200, 'get');
    eq((await get(ro.id)).name, 'fam rollout', 'get reads back');
    // Validation names the field; unknown references are 404.
    isError(await api(s, 'POST', '/api/v1/rollouts', { key: O, body: { ...body, stages: [] } }), 400, 3, 'stages');
    isError(await api(s, 'POST', '/api/v1/rollouts', { key: O, body: { ...body, stages: [{ percent: 50 }] } }), 400, 3, 'stages');
    isError(await api(s, 'POST', '/api/v1/rollouts', { key: O, body: { ...body, stages: [{ percent: 'half' }] } }), 400, 3, 'percent');
    isError(await api(s, 'POST', '/api/v1/rollouts', { key: O, body: { ...body, target: { versionRange: 'newest please' } } }), 400, 3, 'version_range');
    isError(await api(s, 'POST', '/api/v1/rollouts', { key: O, body: { ...body, artifactId: '999999999' } }), 404, 5);
    isError(await api(s, 'POST', '/api/v1/rollouts', { key: O, body: { ...body, target: { groupId: 'fam-g-none' } } }), 404, 5, 'fam-g-none');
    // Start: devices of the artifact's model on an older version are assigned.
    const act = (id, action, b = {}, key = O) => api(s, 'POST', `/api/v1/rollouts/${id}:${action}`, { key, body: b });
    await guarded(s, 'POST', `/api/v1/rollouts/${ro.id}:start`, 'operator', {});
    eq(ok(await act(ro.id, 'start'), 200, 'start').state, 'ROLLOUT_STATE_RUNNING', 'running');
    const running = await until(async () => { const x = await get(ro.id); return x.stageStatus && x.stageStatus[0].devices === 5 && x; }, 'five devices assigned');
    eq(running.stageStatus[0].state, 'active', 'stage active');
    eq(running.stageStatus[0].pending, 5, 'all pending');
    await guarded(s, 'GET', `/api/v1/rollouts/${ro.id}/devices`, 'viewer');
    const ups = await walk(s, `/api/v1/rollouts/${ro.id}/devices`, 'updates', 2, { id: (x) => x.deviceId });
    eq(ups.map((x) => x.deviceId).sort(), ['fam-ro-0', 'fam-ro-1', 'fam-ro-2', 'fam-ro-3', 'fam-ro-4'], 'the right model, older versions only');
    eq(ups.every((x) => x.rolloutId === ro.id && x.phase === 'UPDATE_PHASE_PENDING' && x.fromVersion === '1.0.0'), true, 'pending, from 1.0.0');
    eq(ok(await api(s, 'GET', `/api/v1/rollouts/${ro.id}/devices?phase=UPDATE_PHASE_SUCCEEDED`, { key: s.viewer })).updates || [], [], 'phase filter');
    isError(await api(s, 'GET', `/api/v1/rollouts/${ro.id}/devices?phase=UPDATE_PHASE_DONE`, { key: s.viewer }), 400, 3, 'phase');
    // Pause, resume, cancel; actions in the wrong state are 412 naming the state.
    await guarded(s, 'POST', `/api/v1/rollouts/${ro.id}:pause`, 'operator', {});
    let x = ok(await act(ro.id, 'pause', { reason: 'looks odd' }), 200, 'pause');
    eq(x.state, 'ROLLOUT_STATE_PAUSED', 'paused');
    assert(x.pauseReason.includes('looks odd'), `pause reason: ${x.pauseReason}`);
    eq((await get(ro.id)).state, 'ROLLOUT_STATE_PAUSED', 'pause reads back');
    isError(await act(ro.id, 'pause'), 412, 9, 'PAUSED');
    isError(await act(ro.id, 'start'), 412, 9, 'PAUSED');
    await guarded(s, 'POST', `/api/v1/rollouts/${ro.id}:resume`, 'operator', {});
    eq(ok(await act(ro.id, 'resume'), 200, 'resume').state, 'ROLLOUT_STATE_RUNNING', 'resumed');
    isError(await act(ro.id, 'resume'), 412, 9, 'RUNNING');
    await guarded(s, 'POST', `/api/v1/rollouts/${ro.id}:cancel`, 'operator', {});
    x = ok(await act(ro.id, 'cancel', { reason: 'enough' }), 200, 'cancel');
    eq(x.state, 'ROLLOUT_STATE_CANCELLED', 'cancelled');
    assert(x.pauseReason.includes('enough'), `cancel reason: ${x.pauseReason}`);
    isError(await act(ro.id, 'start'), 412, 9, 'CANCELLED');
    isError(await act(ro.id, 'cancel'), 412, 9, 'CANCELLED');
    // Approval: a stage with manual approval waits for it (no devices: the stage succeeds at once).
    const ap = ok(await api(s, 'POST', '/api/v1/rollouts', { key: O, body: { ...body, name: 'fam approve', target: { labelSelector: 'fam=nobody' },
      stages: [{ percent: 50, manualApproval: true }, { percent: 100 }] } }), 201, 'approval rollout');
    isError(await act(ap.id, 'approveStage', { stage: 0 }), 412, 9);
    ok(await act(ap.id, 'start'), 200, 'start');
    await until(async () => (await get(ap.id)).stageStatus[0].state === 'awaiting_approval', 'awaiting approval');
    await guarded(s, 'POST', `/api/v1/rollouts/${ap.id}:approveStage`, 'operator', { stage: 0 });
    isError(await act(ap.id, 'approveStage', { stage: 1 }), 412, 9);
    isError(await act(ap.id, 'approveStage', { stage: 'first' }), 400, 3, 'stage');
    ok(await act(ap.id, 'approveStage', { stage: 0 }), 200, 'approve');
    const done = await until(async () => { const y = await get(ap.id); return y.state === 'ROLLOUT_STATE_COMPLETED' && y; }, 'completed');
    eq(done.stageStatus.map((y) => y.state), ['done', 'done'], 'both stages done');
    // Unknown and malformed ids.
    isError(await api(s, 'GET', '/api/v1/rollouts/999999999', { key: s.viewer }), 404, 5);
    isError(await act('999999999', 'start'), 404, 5);
    isError(await act('999999999', 'pause'), 404, 5);
    isError(await api(s, 'GET', '/api/v1/rollouts/999999999/devices', { key: s.viewer }), 404, 5);
    isError(await api(s, 'GET', '/api/v1/rollouts/abc', { key: s.viewer }), 400, 3, 'id');
    // The list: newest first, filters, paged.
    const drafts = [];
    for (let i = 0; i < 3; i++) drafts.push(ok(await api(s, 'POST', '/api/v1/rollouts', { key: O, body: { ...body, name: `fam draft ${i}` } }), 201).id);
    const listed = await walk(s, `/api/v1/rollouts?artifactId=${art.id}`, 'rollouts', 2);
    eq(listed.map((y) => y.id), [...drafts.reverse(), ap.id, ro.id], 'every rollout of the artifact once, newest first');
    eq(ok(await api(s, 'GET', `/api/v1/rollouts?artifactId=${art.id}&state=ROLLOUT_STATE_CANCELLED`, { key: s.viewer })).rollouts.map((y) => y.id), [ro.id], 'state filter');
    isError(await api(s, 'GET', '/api/v1/rollouts?state=ROLLOUT_STATE_EXPLODED', { key: s.viewer }), 400, 3, 'state');
    // An artifact a draft rollout uses cannot be deleted; artifacts list paged.
    isError(await api(s, 'DELETE', `/api/v1/artifacts/${art.id}`, { key: A }), 412, 9);
    for (const v of ['1.0.0', '1.0.1', '1.0.2']) ok(await up('fam-list', v, ['FM-1']), 201, `artifact ${v}`);
    eq((await walk(s, '/api/v1/artifacts?name=fam-list', 'artifacts', 2)).map((y) => y.version), ['1.0.2', '1.0.1', '1.0.0'], 'artifacts newest first, paged');
    const victim = ok(await api(s, 'GET', '/api/v1/artifacts?name=fam-list&pageSize=1', { key: s.viewer })).artifacts[0];
    await guarded(s, 'DELETE', `/api/v1/artifacts/${victim.id}`, 'admin');
    eq(ok(await api(s, 'DELETE', `/api/v1/artifacts/${victim.id}`, { key: A })), {}, 'delete artifact');
    isError(await api(s, 'GET', `/api/v1/artifacts/${victim.id}`, { key: s.viewer }), 404, 5);
    isError(await api(s, 'DELETE', `/api/v1/artifacts/${victim.id}`, { key: A }), 404, 5);
  }],

  ['commands_send_get_list_and_paging', async (s) => {
    const O = s.operator;
    await device(s, 'fam-cmd');
    const send = (b, key = O, id = 'fam-cmd') => api(s, 'POST', `/api/v1/devices/${id}/commands`, { key, body: b });
    await guarded(s, 'POST', '/api/v1/devices/fam-cmd/commands', 'operator', { name: 'reboot' });
    await guarded(s, 'GET', '/api/v1/devices/fam-cmd/commands', 'viewer');
    const sent = [];
    for (let i = 0; i < 5; i++) {
      const c = ok(await send({ name: `set-${i}`, payload: { level: i, tags: ['a', 'b'], nested: { on: true } }, ttlSeconds: 600 }), 201, `send ${i}`);
      eq([c.deviceId, c.name, c.payload, c.status], ['fam-cmd', `set-${i}`, { level: i, tags: ['a', 'b'], nested: { on: true } }, 'COMMAND_STATUS_PENDING'], 'sent');
      const ttl = Date.parse(c.expireTime) - Date.parse(c.createTime);
      assert(Math.abs(ttl - 600000) < 2000, `expireTime is createTime + ttl: ${ttl}`);
      sent.push(c);
    }
    await guarded(s, 'GET', `/api/v1/commands/${sent[0].id}`, 'viewer');
    eq(ok(await api(s, 'GET', `/api/v1/commands/${sent[2].id}`, { key: s.viewer })), sent[2], 'get reads back');
    const listed = await walk(s, '/api/v1/devices/fam-cmd/commands', 'commands', 2);
    eq(listed.map((c) => c.id), sent.map((c) => c.id).reverse(), 'newest first, each once');
    eq(ok(await api(s, 'GET', '/api/v1/devices/fam-cmd/commands?statuses=COMMAND_STATUS_PENDING&statuses=COMMAND_STATUS_DELIVERED', { key: s.viewer })).commands.length, 5, 'statuses filter (repeated)');
    eq(ok(await api(s, 'GET', '/api/v1/devices/fam-cmd/commands?statuses=COMMAND_STATUS_SUCCEEDED', { key: s.viewer })).commands || [], [], 'none succeeded');
    // A repeated request id queues nothing twice.
    const r1 = ok(await send({ name: 'once', requestId: 'fam-req-1' }), 201, 'first');
    const r2 = ok(await send({ name: 'twice', requestId: 'fam-req-1' }), 201, 'repeat');
    eq([r2.id, r2.name], [r1.id, 'once'], 'the first command again');
    // Validation names the field; unknown devices and commands 404.
    isError(await send({ name: 'bad name!' }), 400, 3, 'name');
    isError(await send({ name: 'x', ttlSeconds: 999999999 }), 400, 3, 'ttl_seconds');
    isError(await send({ name: 'x', payload: [1, 2] }), 400, 3, 'payload');
    isError(await send({ name: 'x' }, O, 'fam-none'), 404, 5, 'fam-none');
    isError(await api(s, 'GET', '/api/v1/commands/999999999', { key: s.viewer }), 404, 5);
    isError(await api(s, 'GET', '/api/v1/commands/abc', { key: s.viewer }), 400, 3, 'id');
    isError(await api(s, 'GET', '/api/v1/devices/fam-none/commands', { key: s.viewer }), 404, 5, 'fam-none');
    isError(await api(s, 'GET', '/api/v1/devices/fam-cmd/commands?statuses=COMMAND_STATUS_LOST', { key: s.viewer }), 400, 3, 'statuses');
    isError(await api(s, 'GET', '/api/v1/devices/fam-cmd/commands?pageToken=bogus', { key: s.viewer }), 400, 3, 'page_token');
  }],

  ['shadow_get_and_update_desired', async (s) => {
    const O = s.operator;
    await device(s, 'fam-sh');
    const path = '/api/v1/devices/fam-sh/shadow';
    await guarded(s, 'GET', path, 'viewer');
    await guarded(s, 'PATCH', `${path}/desired`, 'operator', { patch: { a: 1 } });
    const empty = ok(await api(s, 'GET', path, { key: s.viewer }), 200, 'get');
    eq(empty.deviceId, 'fam-sh', 'device id');
    assert(!empty.version, `a new shadow is at version 0: ${JSON.stringify(empty)}`);
    let sh = ok(await api(s, 'PATCH', `${path}/desired`, { key: O, body: { patch: { temp: 21.5, mode: 'eco', nested: { a: 1 }, list: [1, 'x', null, false] } } }), 200, 'update');
    eq(sh.desired, { list: [1, 'x', null, false], mode: 'eco', nested: { a: 1 }, temp: 21.5 }, 'desired');
    eq(sh.delta, sh.desired, 'nothing reported: all of desired is delta');
    eq(sh.version, '1', 'version 1 (int64 as a string)');
    assert(Date.parse(sh.desiredTime) > Date.now() - 60000, 'desiredTime');
    // RFC 7396: null removes, objects merge.
    sh = ok(await api(s, 'PATCH', `${path}/desired`, { key: O, body: { patch: { mode: null, nested: { b: 2 } }, expectedVersion: '1' } }), 200, 'merge');
    eq(sh.desired, { list: [1, 'x', null, false], nested: { a: 1, b: 2 }, temp: 21.5 }, 'merged');
    eq(sh.version, '2', 'version 2');
    eq(ok(await api(s, 'GET', path, { key: s.viewer })), sh, 'get reads back');
    isError(await api(s, 'PATCH', `${path}/desired`, { key: O, body: { patch: { temp: 1 }, expectedVersion: '1' } }), 409, 10);
    // Validation names the field; unknown devices 404.
    isError(await api(s, 'PATCH', `${path}/desired`, { key: O, body: {} }), 400, 3, 'patch');
    isError(await api(s, 'PATCH', `${path}/desired`, { key: O, body: { patch: 5 } }), 400, 3, 'patch');
    isError(await api(s, 'PATCH', `${path}/desired`, { key: O, body: { patch: { a: 1 }, expectedVersion: 'latest' } }), 400, 3, 'expectedVersion');
    isError(await api(s, 'PATCH', `${path}/desired`, { key: O, body: { patch: { a: 1 }, expectedVersion: '-1' } }), 400, 3, 'expected_version');
    isError(await api(s, 'GET', '/api/v1/devices/fam-none/shadow', { key: s.viewer }), 404, 5, 'fam-none');
    isError(await api(s, 'PATCH', '/api/v1/devices/fam-none/shadow/desired', { key: O, body: { patch: { a: 1 } } }), 404, 5, 'fam-none');
    eq(ok(await api(s, 'GET', path, { key: s.viewer })).version, '2', 'refused patches changed nothing');
  }],

  ['registry_services_and_instances', async (s) => {
    await guarded(s, 'GET', '/api/v1/services', 'viewer');
    const want = { ingest: s.ingest.grpc, processing: s.proc.grpc, ota: s.ota.grpc };
    const svcs = await until(async () => {
      const l = ok(await api(s, 'GET', '/api/v1/services', { key: s.viewer })).services || [];
      return Object.keys(want).every((n) => l.some((x) => x.name === n && x.passing >= 1)) && l;
    }, 'ingest, processing and ota registered and passing');
    for (const n of Object.keys(want)) eq(svcs.find((x) => x.name === n).instances, 1, `${n}: one instance`);
    await guarded(s, 'GET', '/api/v1/services/ingest/instances', 'viewer');
    for (const [n, port] of Object.entries(want)) {
      const inst = ok(await api(s, 'GET', `/api/v1/services/${n}/instances?onlyPassing=true`, { key: s.viewer })).instances;
      eq(inst.length, 1, `${n}: one instance`);
      eq([inst[0].instance.service, inst[0].instance.port, inst[0].status], [n, port, 'HEALTH_STATUS_PASSING'], `${n}: its port and health`);
      assert(inst[0].leaseId && /^\d+$/.test(inst[0].leaseExpiresUnixMs), `${n}: lease (int64 as a string)`);
    }
    eq(ok(await api(s, 'GET', '/api/v1/services/nothing-here/instances', { key: s.viewer })).instances || [], [], 'a service nobody registered has no instances');
    isError(await api(s, 'GET', '/api/v1/services/Not%20A%20Name/instances', { key: s.viewer }), 400, 3, 'service');
    isError(await api(s, 'GET', '/api/v1/services/ingest/instances?onlyPassing=maybe', { key: s.viewer }), 400, 3, 'onlyPassing');
  }],
];

async function setup() {
  // Ingest trusts a checked token for IOT_INGEST_AUTH_CACHE_TTL (30 s by default, documented): off
  // here, so a push sees device-mgmt's answer at once (revoked, rotated, device deleted). Its rate
  // limit is low enough to reach (no other test sends a device more than 20 points a second).
  const s = await startSuite('families', { full: true, ingestEnv: { IOT_INGEST_AUTH_CACHE_TTL: '0', IOT_INGEST_RATE_LIMIT: '100' } });
  for (const role of ['viewer', 'operator']) {
    const r = ok(await api(s, 'POST', '/api/v1/keys', { key: s.adminKey, body: { name: `families ${role}`, role: `ROLE_${role.toUpperCase()}` } }), 201, role);
    s[role] = r.secret;
    s[`${role}Id`] = r.key.id;
  }
  // A device token where an API key belongs is refused like any unknown key.
  s.tokenOfSomeDevice = (await device(s, 'fam-keyless')).token;
  return s;
}

run('gateway_families', tests, setup, stopSuite);
