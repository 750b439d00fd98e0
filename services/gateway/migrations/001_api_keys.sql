-- gateway: API keys for dashboards and programs. Only a SHA-256 of each key's secret is kept; the
-- id is the public half of the key ("iotk_<id>_<secret>"), so a lookup is one primary-key read.
CREATE TABLE api_keys (
    id text PRIMARY KEY,
    name text NOT NULL,
    role smallint NOT NULL CHECK (role BETWEEN 1 AND 3),
    secret_sha256 bytea NOT NULL,
    created_by text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    revoke_time timestamptz
);
