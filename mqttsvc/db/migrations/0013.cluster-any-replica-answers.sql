-- Any replica answers (issue 17), and who wrote what.
--
-- `instance` on connection_event and device_event: the instance that
-- produced the event; the events out (event_log, NOTIFY mqttsvc_events)
-- carry it in their data when it is known.
--
-- site_live: the live status of every running site, published by its
-- owner at least once a second, so that any replica answers site.status,
-- site.list and service.status for sites it does not own.  UNLOGGED: it
-- is rewritten every second and nothing is lost with it after a crash
-- (the owners publish it again within a second).  A reader keeps only the
-- rows of the lease's current owner and epoch.
--
-- site_writer: the ledger of which instance committed a fenced batch for
-- a site under which epoch, the epoch read from site_lease inside the
-- batch's transaction (not the epoch the writer believed it had).  The
-- fence keeps it to one instance per (site, epoch); the ledger lets anyone
-- check that from the database.  A row per site per change of owner.
-- depends: 0012.cluster-leases

ALTER TABLE connection_event ADD COLUMN instance text;
ALTER TABLE device_event ADD COLUMN instance text;

CREATE OR REPLACE FUNCTION mqttsvc_log_connection_events() RETURNS trigger AS $$
BEGIN
    INSERT INTO event_log (type, site_id, at, data)
    SELECT 'connection', n.site_id, n.at,
           jsonb_build_object('from', n.from_state, 'to', n.to_state, 'reason', n.reason)
           || CASE WHEN n.instance IS NULL THEN '{}'::jsonb
                   ELSE jsonb_build_object('instance', n.instance) END
    FROM new_rows n ORDER BY n.id;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION mqttsvc_log_device_events() RETURNS trigger AS $$
BEGIN
    INSERT INTO event_log (type, site_id, at, data)
    SELECT 'device', n.site_id, n.at,
           jsonb_build_object('kind', n.kind, 'device_id', n.device_id,
                              'gateway_id', n.gateway_id, 'from', n.from_status,
                              'to', n.to_status, 'reason', n.reason)
           || CASE WHEN n.devices IS NULL THEN '{}'::jsonb
                   ELSE jsonb_build_object('devices', n.devices) END
           || CASE WHEN n.instance IS NULL THEN '{}'::jsonb
                   ELSE jsonb_build_object('instance', n.instance) END
    FROM new_rows n ORDER BY n.id;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE UNLOGGED TABLE site_live (
    site_id       text PRIMARY KEY
                  REFERENCES mqtt_connection (site_id) ON DELETE CASCADE ON UPDATE CASCADE,
    instance      text NOT NULL,
    epoch         bigint NOT NULL,
    status        text NOT NULL,
    live          jsonb NOT NULL,
    published_at  timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);

CREATE TABLE site_writer (
    site_id       text NOT NULL
                  REFERENCES mqtt_connection (site_id) ON DELETE CASCADE ON UPDATE CASCADE,
    epoch         bigint NOT NULL,
    instance      text NOT NULL,
    first_commit  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, epoch, instance)
);

-- As in 0012, and then the ledger: the epoch each site's lease has now,
-- under the FOR SHARE lock the batch holds until it commits.
CREATE OR REPLACE FUNCTION mqttsvc_fence(p_instance text, p_sites text[], p_epochs bigint[])
RETURNS void AS $$
DECLARE
    stale text;
BEGIN
    IF cardinality(p_sites) IS DISTINCT FROM cardinality(p_epochs) THEN
        RAISE EXCEPTION 'mqttsvc_fence: % sites but % epochs',
            cardinality(p_sites), cardinality(p_epochs)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM 1 FROM site_lease
        WHERE site_id = ANY (p_sites)
        ORDER BY site_id
        FOR SHARE;
    SELECT string_agg(DISTINCT f.site_id, ',' ORDER BY f.site_id)
        INTO stale
        FROM unnest(p_sites, p_epochs) AS f(site_id, epoch)
        WHERE NOT EXISTS (
            SELECT 1 FROM site_lease l
            WHERE l.site_id = f.site_id AND l.owner = p_instance AND l.epoch = f.epoch
        );
    IF stale IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'MQFNC', MESSAGE = 'fenced', DETAIL = stale;
    END IF;
    INSERT INTO site_writer (site_id, epoch, instance)
        SELECT l.site_id, l.epoch, p_instance FROM site_lease l
        WHERE l.site_id = ANY (p_sites)
        ORDER BY l.site_id
        ON CONFLICT DO NOTHING;
END;
$$ LANGUAGE plpgsql;
