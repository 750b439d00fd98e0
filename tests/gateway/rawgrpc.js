// Raw gRPC for the bad-input test: the suite's protos loaded with protobufjs (for their shapes and
// for decoding answers), a protobuf wire writer that encodes whatever it is given (a string field
// may be a Buffer of invalid UTF-8, an int32 may be -1 or 2^40, a field may appear with the wrong
// wire type), and calls that send those bytes as they are through grpc-js (identity serializers).
// grpc-js and protobufjs come from tests/interop's node_modules (make deps installs them).
'use strict';

const path = require('path');
const root = path.resolve(__dirname, '..', '..');
const interop = path.join(root, 'tests', 'interop');
const grpc = require(require.resolve('@grpc/grpc-js', { paths: [interop] }));
const protobuf = require(require.resolve('protobufjs', { paths: [interop] }));

const PROTOS = ['iot/device/v1/device.proto', 'iot/ingest/v1/ingest.proto', 'iot/processing/v1/processing.proto',
  'iot/ota/v1/ota.proto', 'iot/registry/v1/registry.proto', 'iot/gateway/v1/gateway.proto', 'grpc/health/v1/health.proto'];

// The suite's protos, the well-known types and grpc.health.v1 from where Debian installs them.
const pb = new protobuf.Root();
pb.resolvePath = (origin, target) => (target.startsWith('google/protobuf/') ? path.join('/usr/include', target)
  : target.startsWith('grpc/') ? path.join('/usr/share/grpc-proto', target) : path.join(root, 'proto', target));
pb.loadSync(PROTOS, { keepCase: true });
pb.resolveAll();

// ---- the wire writer --------------------------------------------------------------------------

// Bytes placed as they are where a field's whole encoding (tag included) would go.
class Raw { constructor(bytes) { this.bytes = Buffer.from(bytes); } }

function varint(v) {
  let x = BigInt.asUintN(64, BigInt(v)); // negatives as 10-byte two's complement, as protobuf does
  const out = [];
  while (x >= 0x80n) { out.push(Number(x & 0x7fn) | 0x80); x >>= 7n; }
  out.push(Number(x));
  return Buffer.from(out);
}
const tag = (id, wt) => varint((BigInt(id) << 3n) | BigInt(wt));
const delimited = (id, bytes) => Buffer.concat([tag(id, 2), varint(bytes.length), bytes]);

const VARINT = new Set(['int32', 'int64', 'uint32', 'uint64', 'bool']);
const ZIGZAG = new Set(['sint32', 'sint64']);
const FIXED64 = new Set(['double', 'fixed64', 'sfixed64']);
const FIXED32 = new Set(['float', 'fixed32', 'sfixed32']);

function scalar(type, id, v) {
  if (VARINT.has(type)) return Buffer.concat([tag(id, 0), varint(typeof v === 'boolean' ? (v ? 1 : 0) : v)]);
  if (ZIGZAG.has(type)) { const b = BigInt(v); return Buffer.concat([tag(id, 0), varint((b << 1n) ^ (b < 0n ? -1n : 0n))]); }
  if (FIXED64.has(type)) {
    const b = Buffer.alloc(8);
    if (type === 'double') b.writeDoubleLE(Number(v)); else b.writeBigUInt64LE(BigInt.asUintN(64, BigInt(v)));
    return Buffer.concat([tag(id, 1), b]);
  }
  if (FIXED32.has(type)) {
    const b = Buffer.alloc(4);
    if (type === 'float') b.writeFloatLE(Number(v)); else b.writeUInt32LE(Number(BigInt.asUintN(32, BigInt(v))));
    return Buffer.concat([tag(id, 5), b]);
  }
  if (type === 'string' || type === 'bytes') return delimited(id, Buffer.isBuffer(v) ? v : Buffer.from(String(v), 'utf8'));
  throw new Error(`no scalar type ${type}`);
}

// One value of field f.
function one(f, v) {
  if (v instanceof Raw) return v.bytes;
  const t = f.resolvedType;
  if (t instanceof protobuf.Type) return delimited(f.id, Buffer.isBuffer(v) ? v : encode(t, v));
  if (t instanceof protobuf.Enum) return scalar('int32', f.id, typeof v === 'string' ? t.values[v] : v);
  return scalar(f.type, f.id, v);
}

// obj in the proto's field names (keepCase) to bytes, fields in number order. Maps are objects;
// repeated fields arrays (never packed, which every parser must accept).
function encode(type, obj) {
  const parts = [];
  for (const f of [...type.fieldsArray].sort((a, b) => a.id - b.id)) {
    const v = obj[f.name];
    if (v === undefined || v === null) continue;
    if (f.map) { // entries {key = 1, value = 2}; a Raw value is a whole entry (mapEntry) under any key
      for (const [k, x] of Object.entries(v)) {
        if (x instanceof Raw) { parts.push(x.bytes); continue; }
        parts.push(delimited(f.id, Buffer.concat([scalar(f.keyType, 1, k), one({ id: 2, type: f.type, resolvedType: f.resolvedType }, x)])));
      }
    } else if (f.repeated) {
      for (const x of v) parts.push(one(f, x));
    } else {
      parts.push(one(f, v));
    }
  }
  if (obj.$extra) parts.push(...obj.$extra.map((b) => Buffer.from(b)));
  return Buffer.concat(parts);
}

// A map entry whose key and value are given as wire values (a Buffer key may be invalid UTF-8).
function mapEntry(f, key, value) {
  return new Raw(delimited(f.id, Buffer.concat([scalar(f.keyType, 1, key), one({ id: 2, type: f.type, resolvedType: f.resolvedType }, value)])));
}

// google.protobuf.Struct from a JS object (strings may be Buffers: raw bytes on the wire).
// protobufjs brings its own definition of struct.proto, with camelCase names whatever keepCase says.
function struct(o) {
  const val = (x) => {
    if (x === null) return { nullValue: 0 };
    if (typeof x === 'number') return { numberValue: x };
    if (typeof x === 'boolean') return { boolValue: x };
    if (typeof x === 'string' || Buffer.isBuffer(x)) return { stringValue: x };
    if (Array.isArray(x)) return { listValue: { values: x.map(val) } };
    return { structValue: struct(x) };
  };
  return { fields: Object.fromEntries(Object.entries(o).map(([k, x]) => [k, val(x)])) };
}

// ---- calls ------------------------------------------------------------------------------------

const identity = (x) => x;
const clients = new Map();
function client(target) {
  if (!clients.has(target)) {
    clients.set(target, new grpc.Client(target, grpc.credentials.createInsecure(), {
      'grpc.max_send_message_length': 64 << 20, 'grpc.max_receive_message_length': 64 << 20,
    }));
  }
  return clients.get(target);
}
function closeClients() { for (const c of clients.values()) c.close(); clients.clear(); }

// Sends bytes (a Buffer, or for client/bidi streams an array of Buffers) to /service/method as
// they are. Resolves {code, details, resp (decoded), msgs (stream), open}: open means a server
// stream was still running after openMs (a watch that took its request) and was cancelled.
function call(target, service, method, bytes, { token, deadlineMs = 10000, openMs = 250 } = {}) {
  const svc = pb.lookupService(service);
  const m = svc.methods[method];
  if (!m) throw new Error(`${service} has no method ${method}`);
  const respType = pb.lookupType(m.responseType);
  const p = `/${service}/${method}`;
  const md = new grpc.Metadata();
  if (token) md.set('authorization', `Bearer ${token}`);
  const c = client(target);
  const opts = { deadline: Date.now() + deadlineMs };
  const decode = (b) => respType.toObject(respType.decode(b), { longs: String, enums: String, bytes: Buffer, defaults: false });
  return new Promise((resolve) => {
    const done = (r) => resolve(r);
    const fail = (e) => done({ code: e.code, details: e.details, msgs: [] });
    if (m.requestStream) {
      const list = Array.isArray(bytes) ? bytes : [bytes];
      if (m.responseStream) {
        const msgs = [];
        const s = c.makeBidiStreamRequest(p, identity, identity, md, opts);
        s.on('data', (b) => msgs.push(decode(b)));
        s.on('error', (e) => done({ code: e.code, details: e.details, msgs }));
        s.on('status', (st) => { if (st.code === 0) done({ code: 0, details: st.details, msgs }); });
        for (const b of list) s.write(b);
        s.end();
      } else {
        const s = c.makeClientStreamRequest(p, identity, identity, md, opts, (e, b) => (e ? fail(e) : done({ code: 0, resp: decode(b), msgs: [] })));
        for (const b of list) s.write(b);
        s.end();
      }
    } else if (m.responseStream) {
      const msgs = [];
      let settled = false;
      const s = c.makeServerStreamRequest(p, identity, identity, bytes, md, opts);
      const timer = setTimeout(() => { if (!settled) { settled = true; s.cancel(); done({ code: 0, open: true, msgs }); } }, openMs);
      s.on('data', (b) => msgs.push(decode(b)));
      s.on('error', (e) => { if (!settled) { settled = true; clearTimeout(timer); done({ code: e.code, details: e.details, msgs }); } });
      s.on('status', (st) => { if (st.code === 0 && !settled) { settled = true; clearTimeout(timer); done({ code: 0, details: st.details, msgs }); } });
    } else {
      c.makeUnaryRequest(p, identity, identity, bytes, md, opts, (e, b) => (e ? fail(e) : done({ code: 0, resp: decode(b), msgs: [] })));
    }
  });
}

// The same with a message object (encoded by the raw writer).
function callMsg(target, service, method, obj, opts) {
  const m = pb.lookupService(service).methods[method];
  const t = pb.lookupType(m.requestType);
  const enc = (o) => encode(t, o);
  return call(target, service, method, Array.isArray(obj) ? obj.map(enc) : enc(obj), opts);
}

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

module.exports = { grpc, protobuf, pb, Raw, varint, tag, delimited, scalar, encode, mapEntry, struct, call, callMsg, closeClients, CODE_NAMES };
