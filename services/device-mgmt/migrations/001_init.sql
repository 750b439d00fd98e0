-- device-mgmt's schema (search_path is the service's schema, IOT_DM_PG_SCHEMA).

-- One sequence for every row version in this schema: etags, and the order in which cache writes
-- may overwrite each other (a newer version never loses to an older one, even across delete and
-- re-create of the same id).
CREATE SEQUENCE version_seq;

CREATE TABLE devices (
    id               text PRIMARY KEY,
    name             text NOT NULL DEFAULT '',
    type             text NOT NULL DEFAULT '',
    model            text NOT NULL DEFAULT '',
    site             text NOT NULL DEFAULT '',
    latitude         double precision NOT NULL DEFAULT 0,
    longitude        double precision NOT NULL DEFAULT 0,
    labels           jsonb NOT NULL DEFAULT '{}',
    metadata         jsonb NOT NULL DEFAULT '{}',
    firmware_version text NOT NULL DEFAULT '',
    status           smallint NOT NULL DEFAULT 1,   -- iot.device.v1.DeviceStatus
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    last_seen        timestamptz,
    version          bigint NOT NULL DEFAULT nextval('version_seq')
);
-- Every list is keyset-paged by id, so the filter indexes end in id.
CREATE INDEX devices_type ON devices (type, id);
CREATE INDEX devices_model ON devices (model, id);
CREATE INDEX devices_status ON devices (status, id);
CREATE INDEX devices_firmware ON devices (firmware_version, id);
CREATE INDEX devices_site ON devices (site text_pattern_ops);
CREATE INDEX devices_labels ON devices USING gin (labels jsonb_path_ops);
-- The presence sweep looks only at online devices by last_seen.
CREATE INDEX devices_online_seen ON devices (last_seen) WHERE status = 2;

CREATE TABLE groups (
    id          text PRIMARY KEY,
    description text NOT NULL DEFAULT '',
    kind        smallint NOT NULL,                  -- iot.device.v1.GroupKind
    filter      bytea,                              -- packed iot.device.v1.DeviceFilter (DYNAMIC)
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint NOT NULL DEFAULT nextval('version_seq')
);

CREATE TABLE group_members (
    group_id  text NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    device_id text NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, device_id)
);
CREATE INDEX group_members_device ON group_members (device_id);

-- Device tokens: only the SHA-256 of the token text is kept.
CREATE TABLE tokens (
    id         text PRIMARY KEY,
    device_id  text NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    hash       bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    revoked_at timestamptz
);
CREATE INDEX tokens_device ON tokens (device_id);

-- The suite CA when it is not loaded from files: made once by whichever replica starts first.
CREATE TABLE ca (
    id         int PRIMARY KEY CHECK (id = 1),
    cert_pem   text NOT NULL,
    key_pem    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Issued certificates outlive their devices: revocation history must stay.
CREATE TABLE certificates (
    serial     text PRIMARY KEY,
    device_id  text NOT NULL,
    pem        text NOT NULL,
    not_before timestamptz NOT NULL,
    not_after  timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    reason     smallint
);
CREATE INDEX certificates_device ON certificates (device_id);
CREATE INDEX certificates_revoked ON certificates (revoked_at) WHERE revoked_at IS NOT NULL;
CREATE SEQUENCE crl_number_seq;

CREATE TABLE shadows (
    device_id   text PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    desired     jsonb NOT NULL DEFAULT '{}',
    reported    jsonb NOT NULL DEFAULT '{}',
    version     bigint NOT NULL DEFAULT 0,
    desired_at  timestamptz,
    reported_at timestamptz
);

CREATE TABLE commands (
    id           bigserial PRIMARY KEY,
    device_id    text NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    name         text NOT NULL,
    payload      jsonb NOT NULL DEFAULT '{}',
    status       smallint NOT NULL DEFAULT 1,       -- iot.device.v1.CommandStatus
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    delivered_at timestamptz,
    acked_at     timestamptz,
    result       jsonb,
    error        text
);
CREATE INDEX commands_device ON commands (device_id, id);
CREATE INDEX commands_open ON commands (expires_at) WHERE status IN (1, 2);

-- Transactional outbox for the device event stream: written in the same transaction as the
-- change, published to Redis by the relay and then deleted, so no committed change loses its
-- event when a process dies between commit and publish.
CREATE TABLE events (
    id        bigserial PRIMARY KEY,
    type      text NOT NULL,                        -- created, updated, deleted, online, offline
    device_id text NOT NULL,
    status    smallint NOT NULL,
    version   bigint NOT NULL,
    at        timestamptz NOT NULL DEFAULT now()
);
