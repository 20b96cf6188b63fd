"""
The control plane: the web resource (L{web}, L{httpserver}), the JSON-RPC
dispatcher and methods (L{rpc}), the server-sent event streams (L{sse}),
metrics (L{metrics}), health (L{health}), the API tokens (L{tokens}) and the
SSH manhole (L{manhole}).  Its RPC handlers validate, call the database's
repositories and the services, and shape the answer; they write no SQL.

May import: config, records, runtime, db, mqtt, sites, ingest, events, cluster.

That is every room: it is the top of the house, and nothing imports it but
the wiring (C{mqttsvc.tap}, C{mqttsvc.cli}).
"""
