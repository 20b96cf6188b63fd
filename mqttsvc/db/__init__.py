"""
The database: the one room that talks to PostgreSQL.

It owns the connection pool (L{pool}), the schema and its migrations
(L{schema}, C{migrations/}), LISTEN/NOTIFY (L{notifications}), the stored
passwords' encryption (L{secrets}) and all SQL, behind methods named for
what they mean:

  - L{store}: the L{Store<store.Store>} service, which opens the pools and
    holds one repository per kind of row;
  - L{sites}: sites, their subscriptions and recorded status;
  - L{devices}: gateways, dataloggers and sensors;
  - L{readings}: sensor readings;
  - L{topics}: the discovered topics;
  - L{events}: C{event_log} and the connection and device histories;
  - L{dead_letters}: dead letters, and their purge and replay;
  - L{batch}: the statements of one batch of the ingest writer;
  - L{leases}: a cluster's instances, the site leases and the fence of a
    site owner's batches;
  - L{pages}: keyset pages and the one way a stored time is shown.

No module of mqttsvc outside this package writes SQL or imports a
PostgreSQL driver (C{tests/test_architecture_sql.py}).

May import: config, records, runtime.
"""
