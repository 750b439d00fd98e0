/* Fast decoding of protobuf messages into protobuf-c structs allocated from an arena
 * (cm_pbdec.c explains the scope). Internal to libs/common: servers decode requests with it. */
#ifndef CM_PBDEC_H
#define CM_PBDEC_H

#include <protobuf-c/protobuf-c.h>

#include "cm_alloc.h"

#define CM__PB_BAD (-1)      /* malformed input */
#define CM__PB_FALLBACK (-2) /* valid but outside this decoder's scope: use protobuf-c */

/* 0 with *out set, CM__PB_BAD or CM__PB_FALLBACK. Memory (also on failure) stays in the arena. */
int cm__pb_decode(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *p, size_t n, ProtobufCMessage **out);
/* The same, but bytes fields point into p (which must outlive the message) instead of copies. */
int cm__pb_decode_alias(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *p, size_t n,
                        ProtobufCMessage **out);

/* What servers do with a request's bytes: cm__pb_decode, or protobuf-c for a message outside its
 * scope. The message (in the arena), or NULL when the bytes are not a valid message of type d. */
ProtobufCMessage *cm__pb_decode_request(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *p, size_t n);

#endif
