-- Device state: what devices report about themselves, how often they are
-- expected to talk, and the history of their online/offline/unknown status.
-- depends: 0002.connection-lifecycle

ALTER TABLE gateway ADD COLUMN reported_status text;
ALTER TABLE gateway ADD COLUMN heartbeat_interval double precision;
ALTER TABLE datalogger ADD COLUMN reported_status text;
ALTER TABLE datalogger ADD COLUMN heartbeat_interval double precision;
ALTER TABLE sensor ADD COLUMN reported_status text;
ALTER TABLE sensor ADD COLUMN heartbeat_interval double precision;

-- Per-site overrides of the expected interval per device kind, in seconds,
-- e.g. {"gateway": 30}, and of the grace factor; null means the defaults.
ALTER TABLE mqtt_connection ADD COLUMN device_intervals jsonb;
ALTER TABLE mqtt_connection ADD COLUMN offline_grace double precision
    CHECK (offline_grace IS NULL OR offline_grace >= 1);

CREATE TABLE device_event (
    id          bigserial PRIMARY KEY,
    site_id     text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('gateway', 'datalogger', 'sensor')),
    device_id   text NOT NULL,
    gateway_id  text,
    at          timestamptz NOT NULL,
    from_status text NOT NULL,
    to_status   text NOT NULL,
    reason      text
);
CREATE INDEX device_event_site_idx ON device_event (site_id, id);

-- The new configuration columns notify like the others.
DROP TRIGGER mqtt_connection_config_notify ON mqtt_connection;
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
        OR OLD.device_intervals IS DISTINCT FROM NEW.device_intervals
        OR OLD.offline_grace IS DISTINCT FROM NEW.offline_grace
    )
    EXECUTE FUNCTION mqttsvc_notify_connection();
