-- Notify on a change of any column but the ones mqttsvc itself keeps
-- writing (status and timestamps), instead of listing the configuration
-- columns: 0002, 0003 and 0005 each had to re-create this trigger to add
-- their new columns, and a column added without doing so would go unseen.
-- depends: 0006.events-out

DROP TRIGGER mqtt_connection_config_notify ON mqtt_connection;
CREATE TRIGGER mqtt_connection_config_notify
    AFTER UPDATE ON mqtt_connection
    FOR EACH ROW
    WHEN (
        (to_jsonb(OLD) - ARRAY['status', 'last_connected_at', 'mqtt_retry_count',
                               'mqtt_next_retry', 'last_error', 'updated_at'])
        IS DISTINCT FROM
        (to_jsonb(NEW) - ARRAY['status', 'last_connected_at', 'mqtt_retry_count',
                               'mqtt_next_retry', 'last_error', 'updated_at'])
    )
    EXECUTE FUNCTION mqttsvc_notify_connection();
