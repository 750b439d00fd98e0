/* Fast decoding of protobuf messages into protobuf-c structs allocated from an arena
 * (cm_pbdec.c explains the scope). Internal to libs/common: servers decode requests with it. */
#ifndef CM_PBDEC_H
#define CM_PBDEC_H

#include <protobuf-c/protobuf-c.h>

#include "cm_alloc.h"

#define CM__PB_BAD (-1)      /* malformed input */
#define CM__PB_FALLBACK (-2) /* valid but outside this decoder's scope: use protobuf-c */
#define CM__PB_BAD_STRING (-3) /* cm__pb_decode_request: a string that is not UTF-8 or holds a NUL */

/* 0 with *out set, CM__PB_BAD or CM__PB_FALLBACK. Memory (also on failure) stays in the arena. */
int cm__pb_decode(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *p, size_t n, ProtobufCMessage **out);
/* The same, but bytes fields point into p (which must outlive the message) instead of copies. */
int cm__pb_decode_alias(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *p, size_t n,
                        ProtobufCMessage **out);
/* A request: as cm__pb_decode, and every string field, at any depth, must be UTF-8 without NUL
 * bytes, or CM__PB_BAD_STRING with why set to the field and the reason ("device.name: is not valid
 * UTF-8"). Also checked when the answer is CM__PB_FALLBACK, so protobuf-c gets only clean strings. */
int cm__pb_decode_request(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *p, size_t n,
                          ProtobufCMessage **out, char *why, size_t cap);

/* What servers do with a request's bytes: cm__pb_decode_request, or protobuf-c for a message outside
 * its scope. The message (in the arena), or NULL when the bytes are not a valid message of type d;
 * why (cap bytes; may be NULL with cap 0) says which string was refused, else is empty. */
ProtobufCMessage *cm__pb_decode_server(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *p, size_t n,
                                       char *why, size_t cap);

#endif
