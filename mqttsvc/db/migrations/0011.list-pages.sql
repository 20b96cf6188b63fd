-- Indexes for the list methods' pages (issue 14): each page of
-- `reading.list` in receive order, `topic.list` and `event.list` is read
-- along an index in its own order, from the cursor on, so that it costs
-- its own rows whatever the table holds.  `device.list`, `site.list`,
-- `reading.list` by ts and `deadletter.list` use indexes that exist.
--
-- Plain CREATE INDEX: it blocks writes to the table while it builds
-- (about a second per million readings here).  On a large live database
-- create them first with CREATE INDEX CONCURRENTLY under the same names;
-- IF NOT EXISTS then skips them.
-- depends: 0009.dead-letters-that-always-fit

CREATE INDEX IF NOT EXISTS sensor_reading_received_idx
    ON sensor_reading (site_id, sensor_id, received_at, id);

-- Topics are listed in code point order whatever the database's locale,
-- so that the topics that share a prefix are together.
CREATE INDEX IF NOT EXISTS discovered_topic_path_c_idx
    ON discovered_topic (site_id, topic_path COLLATE "C");

CREATE INDEX IF NOT EXISTS connection_event_site_at_idx ON connection_event (site_id, at, id);
CREATE INDEX IF NOT EXISTS connection_event_at_idx ON connection_event (at, id);
CREATE INDEX IF NOT EXISTS device_event_site_at_idx ON device_event (site_id, at, id);
CREATE INDEX IF NOT EXISTS device_event_at_idx ON device_event (at, id);
