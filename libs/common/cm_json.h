/* JSON for every service, over jansson: parsing with a position in the error, compact dumps,
 * conversion to and from google.protobuf.Struct / Value, RFC 7396 merge patches, and the
 * desired-minus-reported delta that device shadows report.
 *
 * Ownership: every json_t * returned here is a new reference the caller json_decref()s.
 * Protobuf messages built by cm_json_to_struct()/cm_json_to_value() are allocated with the given
 * ProtobufCAllocator (NULL: protobuf-c's default malloc allocator) and freed with
 * protobuf_c_message_free_unpacked(msg, same allocator). Strings from cm_json_dump() are
 * cm_alloc memory: free() them. */
#ifndef CM_JSON_H
#define CM_JSON_H

#include <jansson.h>
#include <stddef.h>

#include "google/protobuf/struct.pb-c.h"

/* Limits applied to every document that comes from outside (requests, stored rows). */
#define CM_JSON_MAX_DEPTH 32

/* Parses text (len bytes, need not be NUL-terminated). Rejects duplicate keys, NUL bytes,
 * nesting deeper than CM_JSON_MAX_DEPTH. On failure returns NULL and writes a message naming the
 * line, column and byte position into err ("line 1, column 7 (byte 6): ..."). */
json_t *cm_json_parse(const char *text, size_t len, char *err, size_t err_cap);
/* Compact, keys sorted (so equal documents dump equal). NUL-terminated; free() it. */
char *cm_json_dump(const json_t *j);
/* A JSON string of s, every byte that is not part of valid UTF-8 replaced by U+FFFD (jansson
 * refuses such text whole): for text that did not come from JSON, such as protobuf-c strings or a
 * message that echoes a request's bytes. */
json_t *cm_json_text(const char *s);

/* google.protobuf.Struct <-> JSON object, Value <-> any JSON value. A NULL Struct converts to an
 * empty object. Numbers: Value.number_value is a double; JSON integers become doubles, and
 * doubles that hold an integer exactly (|x| < 2^53) come back as JSON integers.
 * Non-finite doubles (NaN, Inf) cannot be JSON: the conversion fails (NULL / CM_EINVAL).
 * Depth beyond CM_JSON_MAX_DEPTH fails too. */
json_t *cm_json_from_struct(const Google__Protobuf__Struct *s);
json_t *cm_json_from_value(const Google__Protobuf__Value *v);
/* obj must be a JSON object. Returns 0 and *out, or CM_EINVAL. */
int cm_json_to_struct(const json_t *obj, ProtobufCAllocator *a, Google__Protobuf__Struct **out);
int cm_json_to_value(const json_t *j, ProtobufCAllocator *a, Google__Protobuf__Value **out);

/* RFC 7396 JSON Merge Patch: returns the patched document (target is not modified; target may
 * be NULL meaning an absent document). null members in patch delete keys. */
json_t *cm_json_merge_patch(const json_t *target, const json_t *patch);

/* The shadow delta: the members of desired whose value differs from reported, recursing into
 * objects present in both (so only differing leaves are listed); arrays and scalars compare
 * whole (numbers compare by value: 1 equals 1.0). Keys only in reported are ignored. Returns an
 * object, empty when nothing differs; NULL desired gives an empty object. */
json_t *cm_json_delta(const json_t *desired, const json_t *reported);

/* Nesting depth of j (a scalar is 1, {} is 1, {"a":{}} is 2). */
int cm_json_depth(const json_t *j);

#endif
