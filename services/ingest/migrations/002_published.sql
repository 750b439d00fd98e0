-- Publication marks: points are published to Redis after their commit, so a crash (or a Redis
-- failure) between the two can leave committed points off the stream. `published` is the highest
-- seq known to be on the stream; the device's next commit republishes (published, seq] first,
-- reading from `pending_from` (the earliest time among those points; NULL: unknown) on.
ALTER TABLE device_seq
    ADD COLUMN published bigint NOT NULL DEFAULT 0,
    ADD COLUMN pending_from timestamptz;

-- Before this migration points were published inside the commit.
UPDATE device_seq SET published = seq;

DROP FUNCTION claim_seq(text[]);

CREATE FUNCTION claim_seq(ids text[])
RETURNS TABLE (o_device_id text, o_seq bigint, o_published bigint, o_pending_from_us bigint)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO device_seq (device_id, seq)
        SELECT u, 0 FROM unnest(ids) AS u ORDER BY u ON CONFLICT (device_id) DO NOTHING;
    RETURN QUERY
        SELECT d.device_id, d.seq, d.published, (extract(epoch FROM d.pending_from) * 1000000)::bigint
        FROM device_seq AS d
        WHERE d.device_id = ANY (ids) ORDER BY d.device_id FOR UPDATE;
END
$$;
