-- Several instances, one owner per site (issue 17): the instances that
-- take part and their liveness, one lease per site with its fencing epoch,
-- NOTIFY mqttsvc_cluster when an instance joins, leaves or gives leases up,
-- and mqttsvc_fence, the check that every fenced batch runs first.  Every
-- expiry is judged by the database's clock (now()), never an instance's.
-- See docs/schema.md.
-- depends: 0011.list-pages

CREATE TABLE mqttsvc_instance (
    instance    text PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    renewed_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    stopping    boolean NOT NULL DEFAULT false
);

-- A row is created by a site's first acquisition.  The epoch only ever
-- increases, by one per acquisition; a release sets owner NULL and keeps
-- the epoch, so the next owner's epoch is still greater than every
-- earlier one.
CREATE TABLE site_lease (
    site_id     text PRIMARY KEY
                REFERENCES mqtt_connection (site_id) ON DELETE CASCADE ON UPDATE CASCADE,
    owner       text NULL,
    epoch       bigint NOT NULL DEFAULT 0,
    expires_at  timestamptz NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX site_lease_owner_idx ON site_lease (owner, site_id);

-- Joining (a new row, or one that was stopping or expired made live
-- again) and leaving (marked stopping or expired, or the row deleted)
-- notify with the instance's name; the heartbeat of a live instance does
-- not.  PostgreSQL sends a transaction's identical notifications once.
CREATE FUNCTION mqttsvc_instance_notify() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('mqttsvc_cluster', OLD.instance);
    ELSIF TG_OP = 'INSERT'
          OR OLD.stopping IS DISTINCT FROM NEW.stopping
          OR (OLD.expires_at > now()) IS DISTINCT FROM (NEW.expires_at > now()) THEN
        PERFORM pg_notify('mqttsvc_cluster', NEW.instance);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER mqttsvc_instance_notify
    AFTER INSERT OR UPDATE OR DELETE ON mqttsvc_instance
    FOR EACH ROW EXECUTE FUNCTION mqttsvc_instance_notify();

-- A lease given up (owner set NULL) notifies with the name of the
-- instance that gave it up, so the others acquire it at once rather than
-- at their next renewal.
CREATE FUNCTION mqttsvc_lease_release_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('mqttsvc_cluster', OLD.owner);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER site_lease_release_notify
    AFTER UPDATE OF owner ON site_lease
    FOR EACH ROW
    WHEN (OLD.owner IS NOT NULL AND NEW.owner IS NULL)
    EXECUTE FUNCTION mqttsvc_lease_release_notify();

-- The fence: the first statement of every fenced batch.  It locks the
-- sites' lease rows FOR SHARE, in site order (as every multi-row writer of
-- site_lease locks them, so that none deadlocks with a batch): an
-- acquisition (an UPDATE of the row) then waits for an in-flight batch of
-- the old owner to commit or abort, and a batch waits for an acquisition
-- in progress and then sees its new epoch.  Any site whose row is missing,
-- owned by another instance or at another epoch makes it raise SQLSTATE
-- MQFNC with MESSAGE 'fenced' and DETAIL the comma-separated stale site
-- ids (site ids cannot hold a comma), which aborts the batch whole.
-- Expiry is not checked: a lapsed lease that nobody took is still this
-- owner's and its epoch, so no other instance can have written under it.
CREATE FUNCTION mqttsvc_fence(p_instance text, p_sites text[], p_epochs bigint[])
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
    -- A statement of its own, after the locks: it reads the rows as they
    -- were committed by whatever the locks waited for.
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
END;
$$ LANGUAGE plpgsql;
