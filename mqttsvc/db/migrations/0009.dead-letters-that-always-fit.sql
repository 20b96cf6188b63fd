-- A dead letter must be storable whatever the message held: its payload is
-- kept up to a bound (mqttsvc.config.DEAD_LETTER_KEEP) with the full size
-- and SHA-256 beside it, and a topic that is not storable text (a NUL,
-- bytes that are not UTF-8) or is too long is kept escaped and truncated in
-- `topic`, with its raw bytes in `topic_raw`.
-- A `service` event says what the service itself ran into (a write lane
-- that cannot commit, and when it recovered).
-- depends: 0008.room-for-hot-updates

ALTER TABLE dead_letter
    ADD COLUMN payload_size bigint,
    ADD COLUMN payload_sha256 bytea,
    ADD COLUMN topic_raw bytea;

UPDATE dead_letter SET payload_size = octet_length(payload), payload_sha256 = sha256(payload);

ALTER TABLE dead_letter ALTER COLUMN payload_size SET NOT NULL;

-- A row written by anyone else (SQL, the backend) gets its size and hash.
CREATE FUNCTION mqttsvc_dead_letter_size() RETURNS trigger AS $$
BEGIN
    NEW.payload_size := COALESCE(NEW.payload_size, octet_length(NEW.payload));
    NEW.payload_sha256 := COALESCE(NEW.payload_sha256, sha256(NEW.payload));
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER dead_letter_size BEFORE INSERT ON dead_letter
    FOR EACH ROW EXECUTE FUNCTION mqttsvc_dead_letter_size();

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

ALTER TABLE event_log DROP CONSTRAINT event_log_type_check;
ALTER TABLE event_log ADD CONSTRAINT event_log_type_check
    CHECK (type IN ('connection', 'device', 'dead_letter', 'operator', 'service'));
