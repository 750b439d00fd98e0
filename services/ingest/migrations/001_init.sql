-- ingest's schema: telemetry partitioned by time, and one sequence high-water mark per device.
-- Partitions (telemetry_pYYYYMMDDHH) are created and dropped by the service (ing_store.c), not
-- here: which ones exist depends on the clock and on IOT_INGEST_PARTITION / IOT_INGEST_RETENTION.

CREATE TABLE telemetry (
    device_id text NOT NULL,
    metric text NOT NULL,
    ts timestamptz NOT NULL,
    seq bigint NOT NULL,
    kind smallint NOT NULL,          -- 1 double, 2 int, 3 bool, 4 string
    v_double double precision,
    v_int bigint,
    v_bool boolean,
    v_text text,
    labels jsonb
) PARTITION BY RANGE (ts);

-- Queries are per device and metric over a time range; LatestValues walks the distinct metrics.
CREATE INDEX telemetry_device_metric_ts ON telemetry (device_id, metric, ts);

-- The de-duplication state: a point is stored only when its seq is above the device's mark, and
-- the mark moves in the same transaction as the rows, so a crash can neither lose nor repeat.
CREATE TABLE device_seq (
    device_id text PRIMARY KEY,
    seq bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Locks the marks of a commit group (creating missing ones) and returns them. Rows are taken in
-- device_id order so that two replicas committing overlapping groups cannot deadlock.
CREATE FUNCTION claim_seq(ids text[]) RETURNS TABLE (o_device_id text, o_seq bigint)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO device_seq (device_id, seq)
        SELECT u, 0 FROM unnest(ids) AS u ORDER BY u ON CONFLICT (device_id) DO NOTHING;
    RETURN QUERY
        SELECT d.device_id, d.seq FROM device_seq AS d
        WHERE d.device_id = ANY (ids) ORDER BY d.device_id FOR UPDATE;
END
$$;
