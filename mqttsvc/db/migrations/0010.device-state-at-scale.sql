-- Device state at scale (issue 14).
--
-- `reported_at`: the device's own `ts` of the message whose payload and
-- reported status are kept; a message with an older `ts` (a late or
-- replayed heartbeat) no longer overwrites a newer one.
--
-- `max_devices`: how many devices a site may have (null: the service's
-- --max-devices); a new device id beyond it is a dead letter.
--
-- A site-wide transition (every device of a site unknown when its
-- connection is lost, or when mqttsvc starts) is one `device_event` of
-- kind 'site', with no device id or former status and the number of
-- devices it changed in `devices`, instead of one row per device.  Each
-- device keeps the status it had before in `known_status`: when it
-- returns to it (online again, or offline again after its grace) its row
-- is updated without an event of its own.
-- depends: 0009.dead-letters-that-always-fit

ALTER TABLE gateway ADD COLUMN reported_at timestamptz, ADD COLUMN known_status text;
ALTER TABLE datalogger ADD COLUMN reported_at timestamptz, ADD COLUMN known_status text;
ALTER TABLE sensor ADD COLUMN reported_at timestamptz, ADD COLUMN known_status text;

ALTER TABLE mqtt_connection ADD COLUMN max_devices integer
    CHECK (max_devices IS NULL OR max_devices >= 1);

ALTER TABLE device_event DROP CONSTRAINT device_event_kind_check;
ALTER TABLE device_event ALTER COLUMN device_id DROP NOT NULL;
ALTER TABLE device_event ALTER COLUMN from_status DROP NOT NULL;
ALTER TABLE device_event ADD COLUMN devices integer;
ALTER TABLE device_event ADD CONSTRAINT device_event_kind_check CHECK (
    (kind IN ('gateway', 'datalogger', 'sensor') AND device_id IS NOT NULL
     AND from_status IS NOT NULL AND devices IS NULL)
    OR (kind = 'site' AND device_id IS NULL AND gateway_id IS NULL AND devices IS NOT NULL)
);

CREATE OR REPLACE FUNCTION mqttsvc_log_device_events() RETURNS trigger AS $$
BEGIN
    INSERT INTO event_log (type, site_id, at, data)
    SELECT 'device', n.site_id, n.at,
           jsonb_build_object('kind', n.kind, 'device_id', n.device_id,
                              'gateway_id', n.gateway_id, 'from', n.from_status,
                              'to', n.to_status, 'reason', n.reason)
           || CASE WHEN n.devices IS NULL THEN '{}'::jsonb
                   ELSE jsonb_build_object('devices', n.devices) END
    FROM new_rows n ORDER BY n.id;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
