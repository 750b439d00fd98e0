-- processing's schema: rules, alerts and their change events, the action outbox (commands and
-- webhooks), rollups, and the consumer's recovery state (progress marks and window checkpoints).
-- Semantics are in services/processing/README.md.

-- A rule is kept as its serialized iot.processing.v1.Rule (spec) plus the columns queries need.
CREATE TABLE rules (
    id text PRIMARY KEY,
    enabled boolean NOT NULL,
    spec bytea NOT NULL,
    revision bigint NOT NULL,           -- from rules_version when last written; the etag
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);

-- One row, bumped by every rule change in the same transaction: replicas poll it to reload.
CREATE TABLE rules_version (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    v bigint NOT NULL
);
INSERT INTO rules_version (v) VALUES (0);

CREATE TABLE alerts (
    id bigserial PRIMARY KEY,
    rule_id text NOT NULL,
    device_id text NOT NULL,
    metric text NOT NULL,
    episode_ms bigint NOT NULL,         -- event time the episode's condition began: the replay key
    severity smallint NOT NULL,
    state smallint NOT NULL,            -- 1 firing, 2 resolved
    value double precision NOT NULL,
    message text NOT NULL,
    fired_time timestamptz NOT NULL,
    resolved_time timestamptz,
    acknowledged boolean NOT NULL DEFAULT false,
    acknowledged_by text,
    acknowledged_time timestamptz,
    command_id text,
    UNIQUE (rule_id, device_id, episode_ms)
);
CREATE INDEX alerts_device ON alerts (device_id, id);
CREATE INDEX alerts_rule ON alerts (rule_id, id);
CREATE INDEX alerts_firing ON alerts (id) WHERE state = 1;

-- Every change of an alert, with the alert's mutable fields as they were after it. Event ids are
-- taken from event_counter under its row lock, so they commit in id order: a watcher that has
-- seen event n has seen every event below n.
CREATE TABLE event_counter (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    v bigint NOT NULL
);
INSERT INTO event_counter (v) VALUES (0);

CREATE TABLE alert_events (
    event_id bigint PRIMARY KEY,
    alert_id bigint NOT NULL,
    kind smallint NOT NULL,             -- 1 fired, 2 escalated, 3 resolved, 4 acknowledged, 5 command queued
    time timestamptz NOT NULL DEFAULT now(),
    severity smallint NOT NULL,
    state smallint NOT NULL,
    value double precision NOT NULL,
    resolved_time timestamptz,
    acknowledged boolean NOT NULL,
    acknowledged_by text,
    acknowledged_time timestamptz,
    command_id text
);
CREATE INDEX alert_events_time ON alert_events (time);

-- Records a change of alert a_id: returns the new event id.
CREATE FUNCTION alert_event(a_id bigint, a_kind smallint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE event_counter SET v = v + 1 RETURNING v INTO n;
    INSERT INTO alert_events (event_id, alert_id, kind, severity, state, value, resolved_time,
                              acknowledged, acknowledged_by, acknowledged_time, command_id)
        SELECT n, a.id, a_kind, a.severity, a.state, a.value, a.resolved_time,
               a.acknowledged, a.acknowledged_by, a.acknowledged_time, a.command_id
        FROM alerts AS a WHERE a.id = a_id;
    RETURN n;
END
$$;

-- The consumer's alert writes: each is a no-op when replayed (the episode key is deterministic),
-- and returns a row (the alert id, its new event id) only when it changed something.
CREATE FUNCTION fire_alert(p_rule text, p_device text, p_metric text, p_episode bigint, p_severity smallint,
                           p_value double precision, p_message text, p_fired_ms bigint)
RETURNS TABLE (o_id bigint, o_event bigint)
LANGUAGE plpgsql AS $$
DECLARE
    i bigint;
BEGIN
    INSERT INTO alerts (rule_id, device_id, metric, episode_ms, severity, state, value, message, fired_time)
        VALUES (p_rule, p_device, p_metric, p_episode, p_severity, 1, p_value, p_message,
                to_timestamp(p_fired_ms / 1000.0))
        ON CONFLICT (rule_id, device_id, episode_ms) DO NOTHING
        RETURNING id INTO i;
    IF i IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT i, alert_event(i, 1::smallint);
END
$$;

-- Raises a firing alert's severity (never lowers it); returns the severity it had.
CREATE FUNCTION escalate_alert(p_rule text, p_device text, p_episode bigint, p_severity smallint,
                               p_value double precision, p_message text)
RETURNS TABLE (o_id bigint, o_event bigint, o_old smallint)
LANGUAGE plpgsql AS $$
DECLARE
    i bigint;
    old smallint;
BEGIN
    SELECT id, severity INTO i, old FROM alerts
        WHERE rule_id = p_rule AND device_id = p_device AND episode_ms = p_episode AND state = 1
        FOR UPDATE;
    IF i IS NULL OR old >= p_severity THEN
        RETURN;
    END IF;
    UPDATE alerts SET severity = p_severity, value = p_value, message = p_message WHERE id = i;
    RETURN QUERY SELECT i, alert_event(i, 2::smallint), old;
END
$$;

CREATE FUNCTION resolve_alert(p_rule text, p_device text, p_episode bigint, p_resolved_ms bigint)
RETURNS TABLE (o_id bigint, o_event bigint)
LANGUAGE plpgsql AS $$
DECLARE
    i bigint;
BEGIN
    UPDATE alerts SET state = 2, resolved_time = to_timestamp(p_resolved_ms / 1000.0)
        WHERE rule_id = p_rule AND device_id = p_device AND episode_ms = p_episode AND state = 1
        RETURNING id INTO i;
    IF i IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT i, alert_event(i, 3::smallint);
END
$$;

-- The action outbox: written in the transaction that fires or resolves an alert, delivered after
-- it by the action workers, at least once (commands carry request_id "alert-<id>" so device-mgmt
-- queues one; webhooks carry Idempotency-Key: the action id).
CREATE TABLE actions (
    id bigserial PRIMARY KEY,
    alert_id bigint NOT NULL,
    event_id bigint NOT NULL,
    kind smallint NOT NULL,             -- 1 command, 2 webhook
    target text NOT NULL,               -- command name or webhook URL
    payload bytea,                      -- command: serialized google.protobuf.Struct
    max_attempts int NOT NULL,
    timeout_ms int NOT NULL,
    attempts int NOT NULL DEFAULT 0,
    next_time timestamptz NOT NULL DEFAULT now(),
    state smallint NOT NULL DEFAULT 0,  -- 0 pending, 1 done, 2 failed for good
    result text,                        -- command id, or the last HTTP status / error
    update_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX actions_due ON actions (kind, next_time) WHERE state = 0;

-- 1-minute and 1-hour aggregates of numeric telemetry.
CREATE TABLE rollups (
    device_id text NOT NULL,
    metric text NOT NULL,
    res_ms int NOT NULL,                -- 60000 or 3600000
    bucket_ms bigint NOT NULL,          -- start of the bucket, epoch ms
    count bigint NOT NULL,
    min double precision NOT NULL,
    max double precision NOT NULL,
    sum double precision NOT NULL,
    last double precision NOT NULL,
    last_ms bigint NOT NULL,            -- event time of `last`
    PRIMARY KEY (device_id, metric, res_ms, bucket_ms)
);

-- Per device: the highest seq whose effects (alerts, rollups) are committed.
CREATE TABLE progress (
    device_id text PRIMARY KEY,
    shard int NOT NULL,                 -- the telemetry stream shard the device belongs to
    seq bigint NOT NULL
);
CREATE INDEX progress_shard ON progress (shard);

-- Per device: its window and detector states as of seq (written every IOT_PROC_CHECKPOINT_INTERVAL).
CREATE TABLE checkpoints (
    device_id text PRIMARY KEY,
    shard int NOT NULL,
    seq bigint NOT NULL,
    state bytea NOT NULL,
    save_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX checkpoints_shard ON checkpoints (shard);
