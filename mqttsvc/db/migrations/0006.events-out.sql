-- Events out: one log of every event (connection transitions, device status
-- changes, dead letters, operator actions), each published with
-- NOTIFY mqttsvc_events once its transaction commits.  See docs/schema.md.
-- depends: 0005.tls-and-secrets

CREATE TABLE event_log (
    id          bigserial PRIMARY KEY,
    type        text NOT NULL CHECK (type IN ('connection', 'device', 'dead_letter', 'operator')),
    site_id     text,
    at          timestamptz NOT NULL,
    data        jsonb NOT NULL
);
CREATE INDEX event_log_site_idx ON event_log (site_id, id);

-- Readers resume with "everything after id N", which is only safe if ids
-- become visible in increasing order.  A sequence alone does not promise
-- that (a transaction that took id 10 may commit after one that took 11), so
-- every insert into event_log first takes this transaction-level lock: ids
-- are drawn only after the previous event-writing transaction has committed.
-- An advisory lock rather than LOCK TABLE, which autovacuum would block.
-- The key is 'mqttsvc' in ASCII.
CREATE FUNCTION mqttsvc_event_log_serialize() RETURNS trigger AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(x'6d717474737663'::bigint);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER event_log_serialize
    BEFORE INSERT ON event_log
    FOR EACH STATEMENT EXECUTE FUNCTION mqttsvc_event_log_serialize();

-- The NOTIFY payload: the whole event as JSON while it fits comfortably under
-- PostgreSQL's 8000-byte limit; otherwise its id, type, site and time with
-- "truncated": true (read the rest from event_log by id).
CREATE FUNCTION mqttsvc_event_notice(e event_log) RETURNS text AS $$
DECLARE
    at_text text := to_char(e.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
    notice text;
BEGIN
    notice := json_build_object(
        'id', e.id, 'type', e.type, 'site_id', e.site_id, 'at', at_text, 'data', e.data
    )::text;
    IF octet_length(notice) <= 7000 THEN
        RETURN notice;
    END IF;
    RETURN json_build_object(
        'id', e.id, 'type', e.type, 'site_id', left(e.site_id, 200), 'at', at_text,
        'truncated', true
    )::text;
END;
$$ LANGUAGE plpgsql STABLE;

CREATE FUNCTION mqttsvc_event_log_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('mqttsvc_events', mqttsvc_event_notice(e))
    FROM (SELECT * FROM new_events ORDER BY id) AS e;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER event_log_notify
    AFTER INSERT ON event_log
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION mqttsvc_event_log_notify();

-- Every writer of the history tables (the batch writer, a replay, the
-- backend's SQL) is covered, and an event exists exactly when its row is
-- committed.  One statement per batch, like the inserts themselves.
CREATE FUNCTION mqttsvc_log_connection_events() RETURNS trigger AS $$
BEGIN
    INSERT INTO event_log (type, site_id, at, data)
    SELECT 'connection', n.site_id, n.at,
           jsonb_build_object('from', n.from_state, 'to', n.to_state, 'reason', n.reason)
    FROM new_rows n ORDER BY n.id;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER connection_event_log
    AFTER INSERT ON connection_event
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mqttsvc_log_connection_events();

CREATE FUNCTION mqttsvc_log_device_events() RETURNS trigger AS $$
BEGIN
    INSERT INTO event_log (type, site_id, at, data)
    SELECT 'device', n.site_id, n.at,
           jsonb_build_object('kind', n.kind, 'device_id', n.device_id,
                              'gateway_id', n.gateway_id, 'from', n.from_status,
                              'to', n.to_status, 'reason', n.reason)
    FROM new_rows n ORDER BY n.id;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER device_event_log
    AFTER INSERT ON device_event
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mqttsvc_log_device_events();

CREATE FUNCTION mqttsvc_log_dead_letters() RETURNS trigger AS $$
BEGIN
    INSERT INTO event_log (type, site_id, at, data)
    SELECT 'dead_letter', n.site_id, n.received_at,
           jsonb_build_object('dead_letter_id', n.id, 'topic', n.topic, 'reason', n.reason,
                              'size', octet_length(n.payload))
    FROM new_rows n ORDER BY n.id;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER dead_letter_log
    AFTER INSERT ON dead_letter
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mqttsvc_log_dead_letters();
