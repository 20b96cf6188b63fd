-- Connection lifecycle: the history of every site's connection state, an
-- optional birth/last-will status topic, and notifications of configuration
-- changes so that mqttsvc reconciles within a second without polling.
-- depends: 0001.initial-schema

CREATE TABLE connection_event (
    id          bigserial PRIMARY KEY,
    site_id     text NOT NULL,
    at          timestamptz NOT NULL,
    from_state  text NOT NULL,
    to_state    text NOT NULL,
    reason      text
);
CREATE INDEX connection_event_site_idx ON connection_event (site_id, id);

ALTER TABLE mqtt_connection ADD COLUMN status_topic text;
ALTER TABLE mqtt_connection ALTER COLUMN client_id_prefix SET DEFAULT 'mqttsvc';

-- Only configuration changes notify: the status columns that mqttsvc itself
-- writes all the time must not wake it up.
CREATE FUNCTION mqttsvc_notify_connection() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('mqttsvc_config', OLD.site_id);
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.site_id IS DISTINCT FROM NEW.site_id THEN
        PERFORM pg_notify('mqttsvc_config', OLD.site_id);
    END IF;
    PERFORM pg_notify('mqttsvc_config', NEW.site_id);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER mqtt_connection_insert_delete_notify
    AFTER INSERT OR DELETE ON mqtt_connection
    FOR EACH ROW EXECUTE FUNCTION mqttsvc_notify_connection();

CREATE TRIGGER mqtt_connection_config_notify
    AFTER UPDATE ON mqtt_connection
    FOR EACH ROW
    WHEN (
        OLD.site_id IS DISTINCT FROM NEW.site_id
        OR OLD.host IS DISTINCT FROM NEW.host
        OR OLD.port IS DISTINCT FROM NEW.port
        OR OLD.username IS DISTINCT FROM NEW.username
        OR OLD.password IS DISTINCT FROM NEW.password
        OR OLD.client_id_prefix IS DISTINCT FROM NEW.client_id_prefix
        OR OLD.is_enabled IS DISTINCT FROM NEW.is_enabled
        OR OLD.protocol IS DISTINCT FROM NEW.protocol
        OR OLD.keepalive IS DISTINCT FROM NEW.keepalive
        OR OLD.status_topic IS DISTINCT FROM NEW.status_topic
    )
    EXECUTE FUNCTION mqttsvc_notify_connection();

CREATE FUNCTION mqttsvc_notify_topic() RETURNS trigger AS $$
DECLARE
    changed bigint;
BEGIN
    FOR changed IN
        SELECT DISTINCT connection_id FROM (
            SELECT OLD.connection_id WHERE TG_OP IN ('UPDATE', 'DELETE')
            UNION ALL
            SELECT NEW.connection_id WHERE TG_OP IN ('INSERT', 'UPDATE')
        ) AS ids(connection_id)
    LOOP
        PERFORM pg_notify('mqttsvc_config', c.site_id)
        FROM mqtt_connection c WHERE c.id = changed;
    END LOOP;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER mqtt_topic_notify
    AFTER INSERT OR UPDATE OR DELETE ON mqtt_topic
    FOR EACH ROW EXECUTE FUNCTION mqttsvc_notify_topic();
