-- ota: signing keys, artifacts and their content, rollouts, stages, per-device update state.

-- Every public key that ever signed an artifact stays here, so old signatures keep verifying after
-- a rotation. Private keys never touch the database (IOT_OTA_KEYS_DIR).
CREATE TABLE signing_keys (
    key_id text PRIMARY KEY,
    public_key bytea NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);

-- An upload inserts the row and its chunks in one transaction, so a failed or cancelled upload
-- leaves nothing. The digest, manifest and signature are filled in before the commit.
CREATE TABLE artifacts (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    version text NOT NULL,
    models text[] NOT NULL,
    release_notes text NOT NULL DEFAULT '',
    metadata jsonb NOT NULL DEFAULT '{}',
    size bigint NOT NULL DEFAULT 0,
    sha256 text NOT NULL DEFAULT '',
    chunk_size integer NOT NULL,
    manifest bytea,
    signature bytea,
    key_id text REFERENCES signing_keys (key_id),
    create_time timestamptz NOT NULL DEFAULT now(),
    UNIQUE (name, version)
);
CREATE INDEX artifacts_models ON artifacts USING gin (models);

-- Content in fixed-size chunks (the last one shorter): no size limit from a single value, and a
-- download from any offset reads only the chunks it needs. Stored uncompressed out of line
-- (firmware is usually compressed already) so substring() reads just the slice asked for.
CREATE TABLE artifact_chunks (
    artifact_id bigint NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE,
    idx integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (artifact_id, idx)
);
ALTER TABLE artifact_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
