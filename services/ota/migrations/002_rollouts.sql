-- ota: staged rollouts, their stages, and each device's update within a rollout.

-- States (iot.ota.v1.RolloutState): 1 draft, 2 running, 3 paused, 4 completed, 5 cancelled.
-- An artifact cannot be deleted while an unfinished rollout uses it (checked by DeleteArtifact);
-- a finished rollout outlives its artifact with artifact_id NULL.
CREATE TABLE rollouts (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    artifact_id bigint REFERENCES artifacts (id) ON DELETE SET NULL,
    group_id text NOT NULL DEFAULT '',
    model text NOT NULL DEFAULT '',
    label_selector text NOT NULL DEFAULT '',
    version_range text NOT NULL DEFAULT '',
    allow_downgrade boolean NOT NULL DEFAULT false,
    gate_enabled boolean NOT NULL DEFAULT false,
    gate_max_ratio double precision NOT NULL DEFAULT 2,
    gate_min_alerts integer NOT NULL DEFAULT 1,
    gate_min_severity integer NOT NULL DEFAULT 0,
    state smallint NOT NULL DEFAULT 1,
    current_stage integer NOT NULL DEFAULT 0,
    pause_reason text NOT NULL DEFAULT '',
    version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rollouts_running ON rollouts (state) WHERE state IN (2, 3);

-- Stage states: waiting, active (devices assigned, updating), soaking (succeeded, watching
-- telemetry until soak_until), awaiting_approval, done. failed_base: failures an operator accepted
-- by resuming; gate_since: where the telemetry gate's window starts.
CREATE TABLE rollout_stages (
    rollout_id bigint NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    idx integer NOT NULL,
    percent double precision NOT NULL DEFAULT 0,
    count integer NOT NULL DEFAULT 0,
    success_threshold double precision NOT NULL,
    error_threshold double precision NOT NULL,
    soak_ms bigint NOT NULL DEFAULT 0,
    manual_approval boolean NOT NULL DEFAULT false,
    state text NOT NULL DEFAULT 'waiting',
    start_time timestamptz,
    soak_until timestamptz,
    approved boolean NOT NULL DEFAULT false,
    failed_base integer NOT NULL DEFAULT 0,
    gate_since timestamptz,
    PRIMARY KEY (rollout_id, idx)
);

-- Phases (iot.ota.v1.UpdatePhase): 1 pending, 2 offered, 3 downloading, 4 verifying,
-- 5 installing, 6 succeeded, 7 failed, 8 rolled back.
CREATE TABLE device_updates (
    rollout_id bigint NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    device_id text NOT NULL,
    stage integer NOT NULL,
    phase smallint NOT NULL DEFAULT 1,
    progress integer NOT NULL DEFAULT 0,
    error text NOT NULL DEFAULT '',
    from_version text NOT NULL DEFAULT '',
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX device_updates_device ON device_updates (device_id);
