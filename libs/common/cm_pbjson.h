/* The proto3 JSON mapping for protobuf-c messages, driven by their descriptors: one converter for
 * every message the REST gateway carries, never one per message.
 *
 * Conventions (https://protobuf.dev/programming-guides/json/): field names in lowerCamelCase on
 * output (input takes lowerCamelCase or the proto name); fields at their default value are left
 * out; enums as their names (input also takes the number); 64-bit integers as strings (input takes
 * strings or numbers); bytes as standard base64 (input also takes the URL-safe alphabet);
 * float/double NaN and infinities as "NaN", "Infinity", "-Infinity"; maps as objects;
 * google.protobuf.Timestamp as RFC 3339 in UTC ("2026-11-22T10:00:00.250Z"; input takes any
 * offset), FieldMask as "path,other.path" in lowerCamelCase, Struct and Value as plain JSON.
 * Input rejects unknown fields, wrong types, fractions and out-of-range values for integers,
 * naming the field's path ("devices[2].labels.site: expected a string").
 *
 * Ownership: cm_pbjson_from_msg() returns a new json_t reference (json_decref it). Messages built by
 * cm_pbjson_to_msg() and strings set by cm_pbjson_set() live in the arena a: never free them. */
#ifndef CM_PBJSON_H
#define CM_PBJSON_H

#include <jansson.h>
#include <protobuf-c/protobuf-c.h>

#include "cm_alloc.h"

/* The message as JSON; NULL only when it holds what JSON cannot (a Struct with a NaN). */
json_t *cm_pbjson_from_msg(const ProtobufCMessage *m);
/* Builds a message of type d from j (a JSON object) in arena a. 0 with *out set, or CM_EINVAL with
 * a message for a person in err. */
int cm_pbjson_to_msg(const json_t *j, const ProtobufCMessageDescriptor *d, cm_arena_t *a, ProtobufCMessage **out,
                     char *err, size_t cap);
/* Merges the members of object j into m (built in a), as cm_pbjson_to_msg would set them. */
int cm_pbjson_merge(const json_t *j, ProtobufCMessage *m, cm_arena_t *a, char *err, size_t cap);
/* Sets one field of m from text, as URL path and query parameters carry them: path is a dotted
 * field path (lowerCamelCase or proto names; sub-messages are created on the way), text is parsed
 * by the field's type (numbers, true/false, enum names or numbers, base64, RFC 3339 timestamps,
 * comma-separated field masks). A repeated field gets text appended (?label=a&label=b).
 * 0, or CM_EINVAL with err set. */
int cm_pbjson_set(ProtobufCMessage *m, const char *path, const char *text, cm_arena_t *a, char *err, size_t cap);
/* The field of d named name (lowerCamelCase or proto name), or NULL. */
const ProtobufCFieldDescriptor *cm_pbjson_field(const ProtobufCMessageDescriptor *d, const char *name);
/* 1 when f is a map field (a repeated <Name>Entry message of key and value). */
int cm_pbjson_is_map(const ProtobufCFieldDescriptor *f);
/* Standard base64 of p[0..n) into out (CM_PBJSON_BASE64_LEN(n) + 1 bytes, NUL-terminated). */
#define CM_PBJSON_BASE64_LEN(n) (((n) + 2) / 3 * 4)
void cm_pbjson_base64(char *out, const uint8_t *p, size_t n);
/* The JSON name of a proto field name ("last_seen_time" -> "lastSeenTime") into buf. */
const char *cm_pbjson_camel(const char *name, char *buf, size_t cap);

#endif
