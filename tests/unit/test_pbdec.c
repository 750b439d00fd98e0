/* The fast decoder (cm_pbdec.c) against protobuf-c itself: random valid messages of every shape
 * the suite uses must decode to the same content (compared by re-packing both results), malformed
 * input must be refused, and mutated input must never crash (this also runs under ASan/UBSan). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_json.h"
#include "cm_pbdec.h"
#include "google/protobuf/struct.pb-c.h"
#include "google/protobuf/descriptor.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "grpc/reflection/v1alpha/reflection.pb-c.h"
#include "iot/testing/v1/echo.pb-c.h"
#include "test.h"

extern const unsigned char cm__descriptor_set[];
extern const size_t cm__descriptor_set_len;

static uint64_t rng = 88172645463325252ULL;
static uint64_t rnd(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static char *rstr(cm_arena_t *a) {
    size_t n = rnd() % 4 == 0 ? 0 : rnd() % 40;
    char *s = cm_arena_alloc(a, n + 1);
    for (size_t i = 0; i < n; i++) s[i] = (char)(32 + rnd() % 95);
    s[n] = 0;
    return s;
}

static ProtobufCBinaryData rbytes(cm_arena_t *a) {
    ProtobufCBinaryData b = {rnd() % 3 == 0 ? 0 : rnd() % 64, NULL};
    b.data = cm_arena_alloc(a, b.len + 1);
    for (size_t i = 0; i < b.len; i++) b.data[i] = (uint8_t)rnd();
    return b;
}

static int64_t rint64(void) {
    switch (rnd() % 4) {
    case 0: return 0;
    case 1: return (int64_t)(rnd() % 300);
    case 2: return -(int64_t)(rnd() % 100000);
    default: return (int64_t)rnd();
    }
}

/* Decodes buf with cm__pb_decode (alias: cm__pb_decode_alias), falling back as callers do. */
static ProtobufCMessage *fast_decode(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *buf, size_t n, int alias) {
    ProtobufCMessage *fast = NULL;
    int rc = alias ? cm__pb_decode_alias(d, a, buf, n, &fast) : cm__pb_decode(d, a, buf, n, &fast);
    if (rc == CM__PB_FALLBACK) fast = protobuf_c_message_unpack(d, &a->pb, n, buf);
    else ASSERT_INT_EQ(rc, 0);
    ASSERT(fast);
    return fast;
}

/* Packs m, decodes the bytes with both decoders (ours copying and aliasing), re-packs and compares. */
static void roundtrip(const ProtobufCMessage *m) {
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(n + 1);
    protobuf_c_message_pack(m, buf);
    ProtobufCMessage *ref = protobuf_c_message_unpack(m->descriptor, NULL, n, buf);
    ASSERT(ref);
    size_t n2 = protobuf_c_message_get_packed_size(ref);
    uint8_t *b2 = malloc(n2 + 1);
    protobuf_c_message_pack(ref, b2);
    int same = 1;
    for (int alias = 0; alias < 2; alias++) {
        cm_arena_t a;
        cm_arena_init(&a, NULL, 0);
        ProtobufCMessage *fast = fast_decode(m->descriptor, &a, buf, n, alias);
        size_t n1 = protobuf_c_message_get_packed_size(fast);
        ASSERT_INT_EQ(n1, n2);
        uint8_t *b1 = malloc(n1 + 1);
        protobuf_c_message_pack(fast, b1);
        same &= memcmp(b1, b2, n1) == 0 && n1 == n;
        free(b1);
        cm_arena_free(&a);
    }
    free(b2);
    protobuf_c_message_free_unpacked(ref, NULL);
    free(buf);
    if (!same) TEST__FAIL("%s decoded differently from protobuf-c", m->descriptor->name);
}

/* cm__pb_decode_alias: bytes fields point into the input, strings are still copies (they need
 * their terminator), and cm__pb_decode copies both. */
static void test_alias_points_into_input(void) {
    uint8_t payload[300];
    for (size_t i = 0; i < sizeof payload; i++) payload[i] = (uint8_t)i;
    Iot__Testing__V1__EchoResponse resp = IOT__TESTING__V1__ECHO_RESPONSE__INIT;
    resp.message = (char *)"m";
    resp.payload.data = payload;
    resp.payload.len = sizeof payload;
    size_t n = protobuf_c_message_get_packed_size(&resp.base);
    uint8_t *buf = malloc(n);
    protobuf_c_message_pack(&resp.base, buf);
    cm_arena_t a;
    cm_arena_init(&a, NULL, 0);
    Iot__Testing__V1__EchoResponse *v = (void *)fast_decode(resp.base.descriptor, &a, buf, n, 1);
    ASSERT(v->payload.data > buf && v->payload.data + v->payload.len <= buf + n);
    ASSERT(memcmp(v->payload.data, payload, sizeof payload) == 0);
    ASSERT(!((uint8_t *)v->message >= buf && (uint8_t *)v->message < buf + n));
    ASSERT_STR_EQ(v->message, "m");
    Iot__Testing__V1__EchoResponse *c = (void *)fast_decode(resp.base.descriptor, &a, buf, n, 0);
    ASSERT(!(c->payload.data >= buf && c->payload.data < buf + n));
    ASSERT(memcmp(c->payload.data, payload, sizeof payload) == 0);
    cm_arena_free(&a);
    free(buf);
}

static void test_echo_messages_match_protobuf_c(void) {
    for (int it = 0; it < 2000; it++) {
        cm_arena_t a;
        cm_arena_init(&a, NULL, 0);
        Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
        req.message = rstr(&a);
        req.delay_ms = (int32_t)rint64();
        req.status_code = (int32_t)(rnd() % 17);
        req.status_message = rstr(&a);
        req.payload = rbytes(&a);
        req.repeat = (int32_t)(rnd() % 1000);
        req.echo_metadata = (protobuf_c_boolean)(rnd() % 2);
        roundtrip(&req.base);

        Iot__Testing__V1__EchoResponse resp = IOT__TESTING__V1__ECHO_RESPONSE__INIT;
        resp.message = rstr(&a);
        resp.payload = rbytes(&a);
        resp.index = (int32_t)rint64();
        resp.deadline_ms = rint64();
        resp.n_metadata = rnd() % 5;
        resp.metadata = cm_arena_alloc(&a, (resp.n_metadata + 1) * sizeof *resp.metadata);
        for (size_t i = 0; i < resp.n_metadata; i++) {
            resp.metadata[i] = cm_arena_alloc(&a, sizeof **resp.metadata);
            iot__testing__v1__echo_response__metadata_entry__init(resp.metadata[i]);
            resp.metadata[i]->key = rstr(&a);
            resp.metadata[i]->value = rstr(&a);
        }
        resp.peer = rstr(&a);
        roundtrip(&resp.base);

        Iot__Testing__V1__PointBatch b = IOT__TESTING__V1__POINT_BATCH__INIT;
        b.device_id = rstr(&a);
        b.n_points = rnd() % 120;
        b.points = cm_arena_alloc(&a, (b.n_points + 1) * sizeof *b.points);
        for (size_t i = 0; i < b.n_points; i++) {
            b.points[i] = cm_arena_alloc(&a, sizeof **b.points);
            iot__testing__v1__point__init(b.points[i]);
            b.points[i]->metric = rstr(&a);
            b.points[i]->ts_ms = rint64();
            b.points[i]->value = (double)rint64() / 7.0;
        }
        roundtrip(&b.base);

        Iot__Testing__V1__StreamSummary sum = IOT__TESTING__V1__STREAM_SUMMARY__INIT;
        sum.messages = rint64();
        sum.points = rint64();
        sum.value_sum = (double)rint64() * 0.5;
        roundtrip(&sum.base);
        cm_arena_free(&a);
    }
}

static void test_oneof_and_enum_match_protobuf_c(void) {
    for (int it = 0; it < 1000; it++) {
        cm_arena_t a;
        cm_arena_init(&a, NULL, 0);
        Grpc__Reflection__V1alpha__ServerReflectionRequest r = GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__INIT;
        r.host = rstr(&a);
        Grpc__Reflection__V1alpha__ExtensionRequest ext = GRPC__REFLECTION__V1ALPHA__EXTENSION_REQUEST__INIT;
        switch (rnd() % 6) {
        case 0: break;
        case 1:
            r.message_request_case = GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME;
            r.file_by_filename = rstr(&a);
            break;
        case 2:
            r.message_request_case = GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES;
            r.list_services = rstr(&a);
            break;
        default:
            ext.containing_type = rstr(&a);
            ext.extension_number = (int32_t)rint64();
            r.message_request_case = GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_EXTENSION;
            r.file_containing_extension = &ext;
        }
        roundtrip(&r.base);
        Grpc__Health__V1__HealthCheckResponse h = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
        h.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)(rnd() % 4);
        roundtrip(&h.base);
        cm_arena_free(&a);
    }
}

static void test_proto2_optional_and_packed_match_protobuf_c(void) {
    /* descriptor.proto is proto2: has_ flags, packed and unpacked repeated int32, deep nesting. */
    for (int it = 0; it < 500; it++) {
        cm_arena_t a;
        cm_arena_init(&a, NULL, 0);
        Google__Protobuf__FileDescriptorProto fd = GOOGLE__PROTOBUF__FILE_DESCRIPTOR_PROTO__INIT;
        fd.name = rstr(&a);
        if (rnd() % 2) fd.package = rstr(&a);
        fd.n_public_dependency = rnd() % 6;
        fd.public_dependency = cm_arena_alloc(&a, (fd.n_public_dependency + 1) * sizeof(int32_t));
        for (size_t i = 0; i < fd.n_public_dependency; i++) fd.public_dependency[i] = (int32_t)rint64();
        Google__Protobuf__SourceCodeInfo sci = GOOGLE__PROTOBUF__SOURCE_CODE_INFO__INIT;
        Google__Protobuf__SourceCodeInfo__Location loc = GOOGLE__PROTOBUF__SOURCE_CODE_INFO__LOCATION__INIT;
        Google__Protobuf__SourceCodeInfo__Location *locs[1] = {&loc};
        loc.n_path = rnd() % 8;
        loc.path = cm_arena_alloc(&a, (loc.n_path + 1) * sizeof(int32_t));
        for (size_t i = 0; i < loc.n_path; i++) loc.path[i] = (int32_t)rint64();
        loc.n_span = 3;
        int32_t span[3] = {(int32_t)(rnd() % 1000), 5, 9};
        loc.span = span;
        if (rnd() % 2) loc.leading_comments = rstr(&a);
        sci.n_location = 1;
        sci.location = locs;
        if (rnd() % 2) fd.source_code_info = &sci;
        Google__Protobuf__FileOptions opts = GOOGLE__PROTOBUF__FILE_OPTIONS__INIT;
        opts.has_java_multiple_files = rnd() % 2;
        opts.java_multiple_files = (protobuf_c_boolean)(rnd() % 2);
        opts.has_optimize_for = rnd() % 2;
        opts.optimize_for = GOOGLE__PROTOBUF__FILE_OPTIONS__OPTIMIZE_MODE__CODE_SIZE;
        if (rnd() % 2) fd.options = &opts;
        roundtrip(&fd.base);
        cm_arena_free(&a);
    }
}

static void test_real_descriptor_set_matches_protobuf_c(void) {
    /* The embedded set: every .proto the suite serves, as protoc wrote it. */
    const uint8_t *p = cm__descriptor_set;
    cm_arena_t a;
    cm_arena_init(&a, NULL, 0);
    ProtobufCMessage *fast = NULL;
    int rc = cm__pb_decode(&google__protobuf__file_descriptor_set__descriptor, &a, p, cm__descriptor_set_len, &fast);
    ASSERT(rc == 0 || rc == CM__PB_FALLBACK);
    if (rc == 0) {
        ProtobufCMessage *ref = protobuf_c_message_unpack(&google__protobuf__file_descriptor_set__descriptor, NULL,
                                                          cm__descriptor_set_len, p);
        size_t n = protobuf_c_message_get_packed_size(fast);
        ASSERT_INT_EQ(n, protobuf_c_message_get_packed_size(ref));
        uint8_t *b1 = malloc(n), *b2 = malloc(n);
        protobuf_c_message_pack(fast, b1);
        protobuf_c_message_pack(ref, b2);
        int same = memcmp(b1, b2, n) == 0;
        free(b1);
        free(b2);
        protobuf_c_message_free_unpacked(ref, NULL);
        ASSERT(same);
    }
    cm_arena_free(&a);
}

static int decode(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t n) {
    cm_arena_t a;
    cm_arena_init(&a, NULL, 0);
    ProtobufCMessage *m;
    int rc = cm__pb_decode(d, &a, p, n, &m);
    cm_arena_free(&a);
    return rc;
}

static void test_malformed_input_is_refused(void) {
    const ProtobufCMessageDescriptor *d = &iot__testing__v1__echo_request__descriptor;
    const uint8_t truncated_varint[] = {0x10, 0xff};
    const uint8_t long_length[] = {0x0a, 0x05, 'a', 'b'};
    const uint8_t wrong_wire_type[] = {0x08, 0x01}; /* field 1 (string) as a varint */
    const uint8_t eleven_byte_varint[] = {0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    const uint8_t bad_wire_type[] = {0x0f};
    ASSERT_INT_EQ(decode(d, truncated_varint, sizeof truncated_varint), CM__PB_BAD);
    ASSERT_INT_EQ(decode(d, long_length, sizeof long_length), CM__PB_BAD);
    ASSERT_INT_EQ(decode(d, wrong_wire_type, sizeof wrong_wire_type), CM__PB_BAD);
    ASSERT_INT_EQ(decode(d, eleven_byte_varint, sizeof eleven_byte_varint), CM__PB_BAD);
    ASSERT(decode(d, bad_wire_type, sizeof bad_wire_type) != 0);
    /* Groups are legal protobuf but outside the fast decoder: protobuf-c decides. */
    const uint8_t group[] = {0x4b, 0x4c}; /* start and end group, field 9 */
    ASSERT_INT_EQ(decode(d, group, sizeof group), CM__PB_FALLBACK);
    /* Unknown fields are skipped; empty input is an empty message. */
    const uint8_t unknown[] = {0xf8, 0x01, 0x05, 0x0a, 0x01, 'x'};
    ASSERT_INT_EQ(decode(d, unknown, sizeof unknown), 0);
    ASSERT_INT_EQ(decode(d, NULL, 0), 0);
    /* What servers call on a request's bytes: the same answers, protobuf-c deciding the rest. */
    cm_arena_t a;
    cm_arena_init(&a, NULL, 0);
    ASSERT(cm__pb_decode_server(d, &a, truncated_varint, sizeof truncated_varint, NULL, 0) == NULL);
    Iot__Testing__V1__EchoRequest *r = (void *)cm__pb_decode_server(d, &a, unknown, sizeof unknown, NULL, 0);
    ASSERT(r && strcmp(r->message, "x") == 0);
    ASSERT((cm__pb_decode_server(d, &a, group, sizeof group, NULL, 0) == NULL) ==
           (protobuf_c_message_unpack(d, &a.pb, sizeof group, group) == NULL));
    cm_arena_free(&a);
    /* Nesting beyond the depth limit is refused instead of exhausting the stack. */
    size_t depth = 200;
    /* Built from the inside out: DescriptorProto { nested_type: DescriptorProto { ... } } */
    uint8_t *cur = malloc(1), *next;
    size_t cur_len = 0;
    for (size_t i = 0; i < depth; i++) {
        next = malloc(cur_len + 12);
        size_t k = 0;
        next[k++] = 0x1a; /* field 3, wire type 2 */
        size_t l = cur_len;
        do {
            next[k++] = (uint8_t)((l & 0x7f) | (l > 0x7f ? 0x80 : 0));
            l >>= 7;
        } while (l);
        memcpy(next + k, cur, cur_len);
        free(cur);
        cur = next;
        cur_len += k;
    }
    ASSERT_INT_EQ(decode(&google__protobuf__descriptor_proto__descriptor, cur, cur_len), CM__PB_BAD);
    free(cur);
}

/* A key naming field 0, or wider than 32 bits, is malformed: the fast decoder skipped it as an
 * unknown field while protobuf-c refused the message (found by tests/fuzz/fuzz_proto.c). */
static void test_field_number_zero_is_refused(void) {
    const ProtobufCMessageDescriptor *d = &iot__testing__v1__echo_request__descriptor;
    const uint8_t zero_varint[] = {0x0a, 0x01, 'x', 0x00, 0x01};
    const uint8_t zero_delimited[] = {0x02, 0x02, 0x01, 0x04, 0x0a, 0x01, 'x'};
    const uint8_t zero_two_bytes[] = {0x80, 0x00, 0x01};
    const uint8_t key_over_32_bits[] = {0xf8, 0xff, 0xff, 0xff, 0x7f, 0x00};
    ASSERT_INT_EQ(decode(d, zero_varint, sizeof zero_varint), CM__PB_BAD);
    ASSERT_INT_EQ(decode(d, zero_delimited, sizeof zero_delimited), CM__PB_BAD);
    ASSERT_INT_EQ(decode(d, zero_two_bytes, sizeof zero_two_bytes), CM__PB_BAD);
    ASSERT_INT_EQ(decode(d, key_over_32_bits, sizeof key_over_32_bits), CM__PB_BAD);
    ASSERT(protobuf_c_message_unpack(d, NULL, sizeof zero_varint, zero_varint) == NULL);
    ASSERT(protobuf_c_message_unpack(d, NULL, sizeof zero_delimited, zero_delimited) == NULL);
}

/* Keys and lengths longer than 5 bytes (zero padded) are refused, as protobuf-c refuses them: a
 * 10-byte length was accepted by the fast decoder only (found by tests/fuzz/fuzz_proto.c). */
static void test_long_keys_and_lengths_are_refused(void) {
    const ProtobufCMessageDescriptor *d = &iot__testing__v1__echo_request__descriptor;
    const uint8_t six_byte_key[] = {0x8a, 0x80, 0x80, 0x80, 0x80, 0x00, 0x01, 'x'};
    const uint8_t ten_byte_length[] = {0x0a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00};
    const uint8_t six_byte_unknown_length[] = {0xfa, 0x01, 0x81, 0x80, 0x80, 0x80, 0x80, 0x00, 'x'};
    const uint8_t five_byte_length[] = {0x0a, 0x81, 0x80, 0x80, 0x80, 0x00, 'x'};
    ASSERT_INT_EQ(decode(d, six_byte_key, sizeof six_byte_key), CM__PB_BAD);
    ASSERT_INT_EQ(decode(d, ten_byte_length, sizeof ten_byte_length), CM__PB_BAD);
    ASSERT_INT_EQ(decode(d, six_byte_unknown_length, sizeof six_byte_unknown_length), CM__PB_BAD);
    ASSERT(protobuf_c_message_unpack(d, NULL, sizeof six_byte_key, six_byte_key) == NULL);
    ASSERT(protobuf_c_message_unpack(d, NULL, sizeof ten_byte_length, ten_byte_length) == NULL);
    ASSERT(protobuf_c_message_unpack(d, NULL, sizeof six_byte_unknown_length, six_byte_unknown_length) == NULL);
    /* Five bytes are still a length, in both. */
    ASSERT_INT_EQ(decode(d, five_byte_length, sizeof five_byte_length), 0);
    ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, sizeof five_byte_length, five_byte_length);
    ASSERT(m && strcmp(((Iot__Testing__V1__EchoRequest *)m)->message, "x") == 0);
    protobuf_c_message_free_unpacked(m, NULL);
}

static int decode_request(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t n, char *why, size_t cap) {
    cm_arena_t a;
    cm_arena_init(&a, NULL, 0);
    ProtobufCMessage *m;
    int rc = cm__pb_decode_request(d, &a, p, n, &m, why, cap);
    cm_arena_free(&a);
    return rc;
}

/* Requests: strings are UTF-8 without NUL (a C string would silently end at the NUL, so "a\0b"
 * would name "a"), checked at any depth, the field named in the refusal; other decoding is as
 * before. Regression for the bad-input test (tests/gateway/badinput.test.js). */
static void test_request_strings_are_utf8_without_nul(void) {
    const ProtobufCMessageDescriptor *batch = &iot__testing__v1__point_batch__descriptor;
    char why[160];
    const uint8_t nul[] = {0x0a, 0x03, 'a', 0x00, 'b'}; /* device_id "a\0b" */
    ASSERT_INT_EQ(decode_request(batch, nul, sizeof nul, why, sizeof why), CM__PB_BAD_STRING);
    ASSERT_STR_EQ(why, "device_id: holds a NUL byte");
    ASSERT_INT_EQ(decode(batch, nul, sizeof nul), 0); /* not a request: as protobuf-c */
    /* points[1].metric: "/" in two bytes (overlong) */
    const uint8_t nested[] = {0x12, 0x03, 0x0a, 0x01, 'x', 0x12, 0x04, 0x0a, 0x02, 0xc0, 0xaf};
    ASSERT_INT_EQ(decode_request(batch, nested, sizeof nested, why, sizeof why), CM__PB_BAD_STRING);
    ASSERT_STR_EQ(why, "points[1].metric: is not valid UTF-8");
    static const struct {
        uint8_t b[6];
        size_t n;
        int ok;
    } strings[] = {
        {{'a', 'b'}, 2, 1},
        {{0xc3, 0xa9}, 2, 1},             /* é */
        {{0xf0, 0x9f, 0x98, 0x80}, 4, 1}, /* U+1F600 */
        {{0xf4, 0x8f, 0xbf, 0xbf}, 4, 1}, /* U+10FFFF */
        {{0xed, 0xa0, 0x80}, 3, 0},       /* a surrogate */
        {{0xf4, 0x90, 0x80, 0x80}, 4, 0}, /* above U+10FFFF */
        {{0xe0, 0x80, 0xaf}, 3, 0},       /* overlong */
        {{0xe2, 0x82}, 2, 0},             /* cut short */
        {{0x80}, 1, 0},                   /* a lone continuation byte */
        {{0xf8, 0x88, 0x80, 0x80, 0x80}, 5, 0},
        {{0xff}, 1, 0},
    };
    for (size_t i = 0; i < sizeof strings / sizeof strings[0]; i++) {
        uint8_t buf[8] = {0x0a, (uint8_t)strings[i].n};
        memcpy(buf + 2, strings[i].b, strings[i].n);
        int rc = decode_request(batch, buf, strings[i].n + 2, why, sizeof why);
        if (strings[i].ok) ASSERT_INT_EQ(rc, 0);
        else ASSERT_INT_EQ(rc, CM__PB_BAD_STRING);
    }
    /* The word-at-a-time path: ASCII of every length up to 40, clean, or with a NUL, a byte over
     * 0x7f or a whole UTF-8 character at each position. */
    for (size_t len = 1; len <= 40; len++) {
        for (size_t at = 0; at <= len; at++) {
            for (int kind = 0; kind < 4; kind++) {
                if ((kind && at == len) || (kind == 3 && at + 2 > len)) continue; /* nowhere to put it */
                uint8_t buf[48];
                buf[0] = 0x0a;
                buf[1] = (uint8_t)len;
                memset(buf + 2, 'a', len);
                if (kind == 1) buf[2 + at] = 0;
                if (kind == 2) buf[2 + at] = 0xff;
                if (kind == 3) memcpy(buf + 2 + at, "\xc3\xa9", 2); /* é: valid */
                int rc = decode_request(batch, buf, len + 2, why, sizeof why);
                if (kind == 0 || kind == 3) ASSERT_INT_EQ(rc, 0);
                else ASSERT_INT_EQ(rc, CM__PB_BAD_STRING);
            }
        }
    }
    /* A map value: EchoResponse.metadata {"k": "\xff"} */
    const uint8_t map[] = {0x22, 0x06, 0x0a, 0x01, 'k', 0x12, 0x01, 0xff};
    ASSERT_INT_EQ(decode_request(&iot__testing__v1__echo_response__descriptor, map, sizeof map, why, sizeof why), CM__PB_BAD_STRING);
    ASSERT_STR_EQ(why, "metadata[0].value: is not valid UTF-8");
    /* A message protobuf-c decodes (a oneof message given twice is merged): checked all the same. */
    const uint8_t twice[] = {0x2a, 0x03, 0x0a, 0x01, 'x', 0x2a, 0x04, 0x0a, 0x02, 0xff, 0xfe};
    const ProtobufCMessageDescriptor *refl = &grpc__reflection__v1alpha__server_reflection_request__descriptor;
    ASSERT_INT_EQ(decode(refl, twice, sizeof twice), CM__PB_FALLBACK);
    ASSERT_INT_EQ(decode_request(refl, twice, sizeof twice, why, sizeof why), CM__PB_BAD_STRING);
    ASSERT_STR_EQ(why, "file_containing_extension.containing_type: is not valid UTF-8");
    const uint8_t twice_ok[] = {0x2a, 0x03, 0x0a, 0x01, 'x', 0x2a, 0x03, 0x0a, 0x01, 'y'};
    ASSERT_INT_EQ(decode_request(refl, twice_ok, sizeof twice_ok, why, sizeof why), CM__PB_FALLBACK);
    /* Field number 0 does not exist. */
    const uint8_t zero[] = {0x0a, 0x01, 'a', 0x00, 0x01};
    ASSERT_INT_EQ(decode(batch, zero, sizeof zero), CM__PB_BAD);
    ASSERT_INT_EQ(decode_request(batch, zero, sizeof zero, why, sizeof why), CM__PB_BAD);
}

/* The deepest Struct the JSON side accepts (CM_JSON_MAX_DEPTH nested objects, three messages
 * each) decodes: at a depth limit of 64 a shadow patch the gateway had accepted was refused by
 * device-mgmt as malformed (found by tests/fuzz/fuzz_rest.c). */
static void test_deepest_json_struct_decodes(void) {
    enum { N = CM_JSON_MAX_DEPTH };
    Google__Protobuf__Struct s[N];
    Google__Protobuf__Struct__FieldsEntry e[N], *ep[N];
    Google__Protobuf__Value v[N];
    for (int i = 0; i < N; i++) {
        google__protobuf__struct__init(&s[i]);
        google__protobuf__struct__fields_entry__init(&e[i]);
        google__protobuf__value__init(&v[i]);
        if (i == N - 1) break; /* the innermost object is empty */
        e[i].key = (char *)"a";
        e[i].value = &v[i];
        v[i].kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE;
        v[i].struct_value = &s[i + 1];
        ep[i] = &e[i];
        s[i].fields = &ep[i];
        s[i].n_fields = 1;
    }
    size_t n = protobuf_c_message_get_packed_size(&s[0].base);
    uint8_t *buf = malloc(n);
    protobuf_c_message_pack(&s[0].base, buf);
    ASSERT_INT_EQ(decode(&google__protobuf__struct__descriptor, buf, n), 0);
    free(buf);
}

static void test_mutated_input_never_crashes(void) {
    cm_arena_t a;
    cm_arena_init(&a, NULL, 0);
    Iot__Testing__V1__PointBatch b = IOT__TESTING__V1__POINT_BATCH__INIT;
    b.device_id = (char *)"device-1";
    Iot__Testing__V1__Point pts[20], *pp[20];
    for (int i = 0; i < 20; i++) {
        iot__testing__v1__point__init(&pts[i]);
        pts[i].metric = (char *)"temperature";
        pts[i].ts_ms = 1700000000000 + i;
        pts[i].value = i * 0.25;
        pp[i] = &pts[i];
    }
    b.points = pp;
    b.n_points = 20;
    size_t n = protobuf_c_message_get_packed_size(&b.base);
    uint8_t *orig = malloc(n), *buf = malloc(n);
    protobuf_c_message_pack(&b.base, orig);
    const ProtobufCMessageDescriptor *targets[] = {
        &iot__testing__v1__point_batch__descriptor, &iot__testing__v1__echo_request__descriptor,
        &grpc__reflection__v1alpha__server_reflection_request__descriptor, &google__protobuf__file_descriptor_proto__descriptor};
    for (int it = 0; it < 20000; it++) {
        memcpy(buf, orig, n);
        int flips = 1 + (int)(rnd() % 4);
        for (int k = 0; k < flips; k++) buf[rnd() % n] = (uint8_t)rnd();
        size_t len = rnd() % 8 == 0 ? rnd() % n : n;
        ProtobufCMessage *m;
        char why[64];
        cm__pb_decode(targets[rnd() % 4], &a, buf, len, &m);
        cm_arena_reset(&a);
        cm__pb_decode_request(targets[rnd() % 4], &a, buf, len, &m, why, sizeof why);
        cm_arena_reset(&a);
    }
    cm_arena_free(&a);
    free(orig);
    free(buf);
}

TEST_MAIN(TEST_ENTRY(test_echo_messages_match_protobuf_c), TEST_ENTRY(test_alias_points_into_input), TEST_ENTRY(test_oneof_and_enum_match_protobuf_c),
          TEST_ENTRY(test_proto2_optional_and_packed_match_protobuf_c),
          TEST_ENTRY(test_real_descriptor_set_matches_protobuf_c), TEST_ENTRY(test_malformed_input_is_refused),
          TEST_ENTRY(test_field_number_zero_is_refused), TEST_ENTRY(test_long_keys_and_lengths_are_refused),
          TEST_ENTRY(test_request_strings_are_utf8_without_nul), TEST_ENTRY(test_deepest_json_struct_decodes),
          TEST_ENTRY(test_mutated_input_never_crashes))
