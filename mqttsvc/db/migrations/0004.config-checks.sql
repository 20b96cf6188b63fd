-- Refuse in the database what the API refuses, so that a row the backend
-- writes by SQL cannot hold a site mqttsvc cannot run.
-- depends: 0003.device-state

ALTER TABLE mqtt_connection ADD CONSTRAINT mqtt_connection_site_id_format
    CHECK (site_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$');
ALTER TABLE mqtt_connection ADD CONSTRAINT mqtt_connection_host_present
    CHECK (host <> '' AND length(host) <= 253);
ALTER TABLE mqtt_connection ADD CONSTRAINT mqtt_connection_client_id_prefix_length
    CHECK (length(client_id_prefix) <= 64);
ALTER TABLE mqtt_connection ADD CONSTRAINT mqtt_connection_status_topic_name
    CHECK (status_topic IS NULL OR (status_topic <> '' AND status_topic !~ '[+#]'));
