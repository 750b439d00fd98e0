/* The action workers: deliver what the consumer queued in the `actions` outbox table (see
 * migrations/001_init.sql) after the transaction that fired, escalated or resolved an alert.
 *
 *  - kind 1, command: device-mgmt SendCommand(device_id, name = target, payload = the serialized
 *    google.protobuf.Struct in payload, request_id = "alert-<alert_id>") so that a redelivery queues
 *    nothing twice. On success: state 1, result = the command id, alerts.command_id set and an
 *    alert event of kind 5 (command queued) recorded in the same transaction (alert_event()).
 *    INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION from device-mgmt fail the action for good
 *    (state 2, result = the status and message); anything else is retried.
 *  - kind 2, webhook: POST target with Content-Type application/json, header Idempotency-Key:
 *    <action id>, body: the alert as of the action's event (proto3 JSON names: id, ruleId, deviceId,
 *    metric, severity and state as enum names, value, message, firedTime/resolvedTime RFC 3339,
 *    eventId, and "event": "fired" | "escalated" | "resolved"). A 2xx answer is success; anything else,
 *    a connection failure or no answer within timeout_ms is retried.
 *
 * Retries: attempt n (1-based) failing schedules the next after IOT_PROC_ACTION_BACKOFF * 2^(n-1),
 * capped at 5 minutes; after max_attempts the action fails for good (state 2). Claiming is safe
 * across replicas: a worker takes due rows with FOR UPDATE SKIP LOCKED and pushes their next_time
 * past the attempt's timeout before delivering, so a worker that dies mid-delivery hands the row
 * to another after that (delivery is at least once). Commands and webhooks have separate threads,
 * so a slow webhook never delays an emergency command. */
#ifndef PROC_ACTIONS_H
#define PROC_ACTIONS_H

#include "cm_pg.h"
#include "proc_config.h"

typedef struct proc_actions_s proc_actions_t;

/* NULL when dm_addr is not a usable gRPC target. */
proc_actions_t *proc_actions_start(const proc_config_t *cfg, cm_pg_t *pg);
/* Wake the workers now (after a commit that queued actions). */
void proc_actions_kick(proc_actions_t *a);
/* Stops the workers (a delivery in progress finishes or times out first). Accepts NULL. */
void proc_actions_stop(proc_actions_t *a);

#endif
