-- A dead letter must be storable whatever the message held: its payload is
-- kept up to a bound (mqttsvc.config.DEAD_LETTER_KEEP) with the full size
-- and SHA-256 beside it, and a topic that is not storable text (a NUL,
-- bytes that are not UTF-8) or is too long is kept escaped and truncated in
-- `topic`, with its raw bytes in `topic_raw`.
-- depends: 0008.room-for-hot-updates

ALTER TABLE dead_letter
    ADD COLUMN payload_size bigint,
    ADD COLUMN payload_sha256 bytea,
    ADD COLUMN topic_raw bytea;

UPDATE dead_letter SET payload_size = octet_length(payload), payload_sha256 = sha256(payload);

ALTER TABLE dead_letter ALTER COLUMN payload_size SET NOT NULL;

CREATE OR REPLACE FUNCTION mqttsvc_log_dead_letters() RETURNS trigger AS $$
BEGIN
    INSERT INTO event_log (type, site_id, at, data)
    SELECT 'dead_letter', n.site_id, n.received_at,
           jsonb_build_object('dead_letter_id', n.id, 'topic', n.topic, 'reason', n.reason,
                              'size', n.payload_size)
    FROM new_rows n ORDER BY n.id;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
