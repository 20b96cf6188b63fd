-- The first schema of mqttsvc: sites, their subscriptions, devices, readings,
-- discovered topics and dead letters.  The Django backend reads these tables.

CREATE TABLE mqtt_connection (
    id                  bigserial PRIMARY KEY,
    site_id             text NOT NULL UNIQUE,
    host                text NOT NULL,
    port                integer NOT NULL DEFAULT 1883 CHECK (port BETWEEN 1 AND 65535),
    username            text,
    password            text,
    client_id_prefix    text NOT NULL DEFAULT 'mqttsvc-',
    is_enabled          boolean NOT NULL DEFAULT true,
    protocol            text NOT NULL DEFAULT '3.1.1' CHECK (protocol IN ('3.1.1', '5')),
    keepalive           integer NOT NULL DEFAULT 60 CHECK (keepalive BETWEEN 5 AND 3600),
    status              text NOT NULL DEFAULT 'disconnected'
                        CHECK (status IN ('connecting', 'connected', 'disconnected', 'error')),
    last_connected_at   timestamptz,
    mqtt_retry_count    integer NOT NULL DEFAULT 0,
    mqtt_next_retry     timestamptz,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE mqtt_topic (
    id              bigserial PRIMARY KEY,
    connection_id   bigint NOT NULL REFERENCES mqtt_connection (id) ON DELETE CASCADE,
    topic           text NOT NULL,
    qos             smallint NOT NULL DEFAULT 1 CHECK (qos IN (0, 1)),
    kind            text NOT NULL DEFAULT 'other'
                    CHECK (kind IN ('gateway_heartbeat', 'datalogger_heartbeat', 'sensor_data', 'other')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (connection_id, topic)
);

CREATE TABLE gateway (
    id              bigserial PRIMARY KEY,
    site_id         text NOT NULL,
    gateway_id      text NOT NULL,
    status          text NOT NULL DEFAULT 'unknown' CHECK (status IN ('online', 'offline', 'unknown')),
    first_seen_at   timestamptz NOT NULL,
    last_seen_at    timestamptz NOT NULL,
    last_payload    jsonb,
    UNIQUE (site_id, gateway_id)
);

CREATE TABLE datalogger (
    id              bigserial PRIMARY KEY,
    site_id         text NOT NULL,
    gateway_id      text NOT NULL,
    datalogger_id   text NOT NULL,
    status          text NOT NULL DEFAULT 'unknown' CHECK (status IN ('online', 'offline', 'unknown')),
    first_seen_at   timestamptz NOT NULL,
    last_seen_at    timestamptz NOT NULL,
    last_payload    jsonb,
    UNIQUE (site_id, gateway_id, datalogger_id)
);

CREATE TABLE sensor (
    id              bigserial PRIMARY KEY,
    site_id         text NOT NULL,
    sensor_id       text NOT NULL,
    status          text NOT NULL DEFAULT 'unknown' CHECK (status IN ('online', 'offline', 'unknown')),
    first_seen_at   timestamptz NOT NULL,
    last_seen_at    timestamptz NOT NULL,
    last_payload    jsonb,
    UNIQUE (site_id, sensor_id)
);

CREATE TABLE sensor_reading (
    id              bigserial PRIMARY KEY,
    site_id         text NOT NULL,
    sensor_id       text NOT NULL,
    ts              timestamptz NOT NULL,
    name            text NOT NULL,
    value           double precision NOT NULL,
    unit            text,
    received_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (site_id, sensor_id, ts, name)
);

CREATE TABLE discovered_topic (
    id              bigserial PRIMARY KEY,
    site_id         text NOT NULL,
    topic_path      text NOT NULL,
    first_seen_at   timestamptz NOT NULL,
    last_seen_at    timestamptz NOT NULL,
    message_count   bigint NOT NULL DEFAULT 0,
    UNIQUE (site_id, topic_path)
);

CREATE TABLE dead_letter (
    id              bigserial PRIMARY KEY,
    site_id         text NOT NULL,
    topic           text NOT NULL,
    payload         bytea NOT NULL,
    reason          text NOT NULL,
    received_at     timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letter_site_id_idx ON dead_letter (site_id, id);

CREATE FUNCTION mqttsvc_touch_updated_at() RETURNS trigger AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER mqtt_connection_touch BEFORE UPDATE ON mqtt_connection
    FOR EACH ROW EXECUTE FUNCTION mqttsvc_touch_updated_at();
