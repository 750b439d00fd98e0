// State snapshots for the bad-input test: every row of every table in the given Postgres schemas
// (as an md5 of the row's text) and every Redis key (type and a digest of its content), so that a
// test can say exactly what a request changed: "gw_dm_x.devices: 1 row added", "no change".
// Uses one psql session (installed with the server) and one Redis connection for all snapshots.
'use strict';

const net = require('net');
const { spawn } = require('child_process');

// A psql session kept open: each query's output ends at an \echo marker, so a snapshot costs a
// round trip rather than a process start.
class Psql {
  constructor(dsn) {
    this.p = spawn('psql', [dsn, '-X', '-q', '-v', 'ON_ERROR_STOP=0', '-A', '-t', '-F', '\t'], { stdio: ['pipe', 'pipe', 'pipe'] });
    this.out = '';
    this.err = '';
    this.waiting = null;
    this.n = 0;
    this.p.stdout.on('data', (d) => { this.out += d; this.check(); });
    this.p.stderr.on('data', (d) => { this.err += d; });
  }
  check() {
    if (!this.waiting) return;
    const i = this.out.indexOf(this.waiting.marker);
    if (i < 0) return;
    const text = this.out.slice(0, i);
    this.out = this.out.slice(i + this.waiting.marker.length + 1);
    const w = this.waiting;
    this.waiting = null;
    if (this.err) { const e = this.err; this.err = ''; w.reject(new Error(`psql: ${e}`)); } else w.resolve(text);
  }
  query(sql) {
    const marker = `__snapshot_done_${++this.n}__`;
    return new Promise((resolve, reject) => {
      this.waiting = { marker, resolve, reject };
      this.p.stdin.write(`${sql}\n\\echo ${marker}\n`);
    });
  }
  close() { this.p.stdin.end(); }
}

// Every row of every table of the schemas (md5 of the row's text), and the list of schemas: a
// query writes one SELECT per table, run by \gexec. Each table prints a marker row, so an empty
// table still shows.
async function pgRows(psql, schemas) {
  const list = schemas.map((s) => `'${s.replace(/'/g, "''")}'`).join(',');
  const out = await psql.query(`
select format('select %L, ''-'' union all select %L, md5(t::text) from %I.%I t', n.nspname || '.' || c.relname,
              n.nspname || '.' || c.relname, n.nspname, c.relname)
  from pg_class c join pg_namespace n on n.oid = c.relnamespace
 where c.relkind = 'r' and n.nspname in (${list}) order by 1 \\gexec
select 'schemas', string_agg(nspname, ',' order by nspname) from pg_namespace where nspname not like 'pg\\_%' and nspname <> 'information_schema';`);
  const tables = new Map();
  for (const line of out.split('\n')) {
    if (!line) continue;
    const [t, h] = line.split('\t');
    if (!tables.has(t)) tables.set(t, new Map());
    if (h !== '-') { const m = tables.get(t); m.set(h, (m.get(h) || 0) + 1); }
  }
  return tables;
}

// A minimal Redis client (RESP over one connection) for EVAL.
class Redis {
  constructor(addr) {
    const [host, port] = addr.split(':');
    this.s = net.connect(Number(port), host);
    this.buf = Buffer.alloc(0);
    this.queue = [];
    this.s.on('data', (d) => { this.buf = Buffer.concat([this.buf, d]); this.drain(); });
    this.s.on('error', (e) => { for (const q of this.queue) q.reject(e); this.queue = []; });
  }
  // One reply from buf at i: [value, next index], or null when incomplete.
  parse(i) {
    const eol = this.buf.indexOf('\r\n', i);
    if (eol < 0) return null;
    const type = String.fromCharCode(this.buf[i]), line = this.buf.toString('utf8', i + 1, eol);
    if (type === '+' || type === ':') return [line, eol + 2];
    if (type === '-') return [new Error(line), eol + 2];
    if (type === '$') {
      const n = Number(line);
      if (n < 0) return [null, eol + 2];
      if (this.buf.length < eol + 2 + n + 2) return null;
      return [this.buf.toString('utf8', eol + 2, eol + 2 + n), eol + 2 + n + 2];
    }
    if (type === '*') {
      const n = Number(line), arr = [];
      let j = eol + 2;
      for (let k = 0; k < n; k++) { const r = this.parse(j); if (!r) return null; arr.push(r[0]); j = r[1]; }
      return [arr, j];
    }
    throw new Error(`redis: cannot parse reply type ${type}`);
  }
  drain() {
    while (this.queue.length) {
      const r = this.parse(0);
      if (!r) return;
      this.buf = this.buf.subarray(r[1]);
      const q = this.queue.shift();
      if (r[0] instanceof Error) q.reject(r[0]); else q.resolve(r[0]);
    }
  }
  command(...args) {
    const parts = [`*${args.length}\r\n`];
    for (const a of args) { const b = Buffer.from(String(a)); parts.push(`$${b.length}\r\n`, b, '\r\n'); }
    return new Promise((resolve, reject) => { this.queue.push({ resolve, reject }); this.s.write(Buffer.concat(parts.map((x) => Buffer.from(x)))); });
  }
  close() { this.s.end(); }
}

// Every key: type and digest. Hash fields named in skipFields and stream lengths of streams named
// in skipStreams are left out (heartbeats and lease renewals rewrite them all the time).
const LUA = `
local out = {}
local skipf = {}
for _, f in ipairs(cjson.decode(ARGV[1])) do skipf[f] = true end
local skips = {}
for _, p in ipairs(cjson.decode(ARGV[2])) do skips[#skips + 1] = p end
local prefixes = cjson.decode(ARGV[3])
local function skipped(k)
  for _, p in ipairs(skips) do if string.find(k, p) then return true end end
  if #prefixes == 0 then return false end
  for _, p in ipairs(prefixes) do if string.sub(k, 1, #p) == p then return false end end
  return true
end
for _, k in ipairs(redis.call('KEYS', '*')) do
  if not skipped(k) then
    local t = redis.call('TYPE', k).ok
    local d = ''
    if t == 'string' then d = redis.sha1hex(redis.call('GET', k))
    elseif t == 'hash' then
      local h = redis.call('HGETALL', k)
      local kv = {}
      for i = 1, #h, 2 do if not skipf[h[i]] then kv[#kv + 1] = h[i] .. '=' .. redis.sha1hex(h[i + 1]) end end
      table.sort(kv)
      d = redis.sha1hex(table.concat(kv, ','))
    elseif t == 'set' then
      local m = redis.call('SMEMBERS', k); table.sort(m); d = table.concat(m, ',')
    elseif t == 'zset' then
      local m = redis.call('ZRANGE', k, 0, -1); table.sort(m); d = table.concat(m, ',')
    elseif t == 'list' then d = redis.sha1hex(table.concat(redis.call('LRANGE', k, 0, -1), ','))
    elseif t == 'stream' then d = 'len=' .. redis.call('XLEN', k)
    end
    out[#out + 1] = k .. '\\t' .. t .. '\\t' .. d
  end
end
return out`;

async function redisKeys(redis, skipFields, skipKeys, prefixes) {
  const out = await redis.command('EVAL', LUA, '0', JSON.stringify(skipFields), JSON.stringify(skipKeys), JSON.stringify(prefixes));
  const keys = new Map();
  for (const line of out) {
    const i = line.indexOf('\t');
    keys.set(line.slice(0, i), line.slice(i + 1));
  }
  return keys;
}

// Snapshots of both stores. cfg: {dsn, schemas, redis (host:port), prefixes (only keys starting with
// one of them; all when empty), skipFields, skipKeys (Lua patterns)}. close() ends the sessions.
function snapshotter(cfg) {
  const psql = new Psql(cfg.dsn), redis = new Redis(cfg.redis);
  return {
    take: async () => {
      const [pg, keys] = await Promise.all([pgRows(psql, cfg.schemas), redisKeys(redis, cfg.skipFields || [], cfg.skipKeys || [], cfg.prefixes || [])]);
      return { pg, redis: keys };
    },
    close: () => { psql.close(); redis.close(); },
  };
}

// What changed from a to b, as sentences; [] when nothing did. Tables and keys matched by
// allow (a function of the name) are left out.
function diff(a, b, allow = () => false) {
  const out = [];
  for (const t of new Set([...a.pg.keys(), ...b.pg.keys()])) {
    if (allow(t)) continue;
    const x = a.pg.get(t), y = b.pg.get(t);
    if (!x) { out.push(`table ${t} appeared`); continue; }
    if (!y) { out.push(`table ${t} disappeared`); continue; }
    let added = 0, removed = 0;
    for (const [h, n] of y) added += Math.max(0, n - (x.get(h) || 0));
    for (const [h, n] of x) removed += Math.max(0, n - (y.get(h) || 0));
    if (added || removed) out.push(`${t}: ${added} row(s) added or changed, ${removed} removed or changed`);
  }
  for (const k of new Set([...a.redis.keys(), ...b.redis.keys()])) {
    if (allow(k)) continue;
    const x = a.redis.get(k), y = b.redis.get(k);
    if (x !== y) out.push(`redis ${k}: ${x === undefined ? 'created' : y === undefined ? 'deleted' : 'changed'}`);
  }
  return out;
}

// Counts of rows per table (for the report).
function rowCount(s, table) { let n = 0; for (const c of (s.pg.get(table) || new Map()).values()) n += c; return n; }

module.exports = { snapshotter, diff, rowCount };
