/* The command queue to devices: commands in Postgres, delivery over WatchCommands streams.
 *
 * One hub per replica keeps the local watchers by device. SendCommand (on any replica) commits
 * the command, then appends the device id to the Redis stream P cmdq; each hub's tailer thread
 * follows that stream and delivers to its local watchers of that device. Watchers also look for
 * new commands every IOT_DM_COMMAND_POLL, so a notification lost to a Redis outage delays a
 * command but never loses it. Delivery to one watcher is serialised, oldest first, each command
 * once per stream (one committed after a newer one was sent comes after it); a backlog larger than
 * the stream's send queue goes out as the client reads (see dm__deliver). */
#ifndef DM_COMMANDS_H
#define DM_COMMANDS_H

#include "cm_rpc.h"
#include "dm_store.h"

typedef Iot__Device__V1__Command dm_command_t;

int dm_store_send_command(dm_store_t *s, const char *device_id, const char *name, const Google__Protobuf__Struct *payload,
                          int ttl_s, const char *request_id, ProtobufCAllocator *a, dm_command_t **out, dm_err_t *e);
int dm_store_get_command(dm_store_t *s, const char *id, ProtobufCAllocator *a, dm_command_t **out, dm_err_t *e);
int dm_store_list_commands(dm_store_t *s, const char *device_id, const int *statuses, size_t n_statuses, int page_size,
                           const char *page_token, ProtobufCAllocator *a, dm_command_t ***out, size_t *n, char **next,
                           dm_err_t *e);
int dm_store_ack_command(dm_store_t *s, const char *device_id, const char *command_id, int success,
                         const Google__Protobuf__Struct *result, const char *error, ProtobufCAllocator *a,
                         dm_command_t **out, dm_err_t *e);
/* Marks commands whose ttl passed as expired (run by the presence loop). */
void dm_commands_expire(dm_store_t *s);

typedef struct dm_cmd_hub_s dm_cmd_hub_t;
dm_cmd_hub_t *dm_cmd_hub_start(dm_store_t *s);
/* Adds the call as a watcher of device_id and delivers what is pending. Returns CM_PENDING, or an
 * error status already set on the call. */
int dm_cmd_hub_watch(dm_cmd_hub_t *h, cm_call_t *call, const char *device_id);
/* From the method's done callback: forgets the watcher. */
void dm_cmd_hub_done(cm_call_t *call);
/* Shutdown hook: ends every watch with UNAVAILABLE so devices reconnect elsewhere; refuses new ones. */
void dm_cmd_hub_end_all(void *hub);
void dm_cmd_hub_stop(dm_cmd_hub_t *h);

#endif
