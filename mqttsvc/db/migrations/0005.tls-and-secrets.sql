-- Broker TLS settings per site, and passwords encrypted at rest (the
-- password column now holds "fernet:<token>"; see docs/security.md).
-- depends: 0004.config-checks

ALTER TABLE mqtt_connection ADD COLUMN tls jsonb;
COMMENT ON COLUMN mqtt_connection.password IS
    'fernet:<token> encrypted with the key in --secret-key-file; never plain text';

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
        OR OLD.tls IS DISTINCT FROM NEW.tls
    )
    EXECUTE FUNCTION mqttsvc_notify_connection();
