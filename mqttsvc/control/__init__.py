"""
The control plane: the web resource (L{web}, L{httpserver}), the JSON-RPC
dispatcher and methods (L{rpc}), the server-sent event streams (L{sse}),
metrics (L{metrics}), health (L{health}), the API tokens (L{tokens}) and the
SSH manhole (L{manhole}).  Its RPC handlers validate, call the database's
repositories and the services, and shape the answer; they write no SQL.

It may import every room below it: L{mqttsvc.config}, L{mqttsvc.records},
L{mqttsvc.runtime}, L{mqttsvc.db}, L{mqttsvc.mqtt}, L{mqttsvc.sites},
L{mqttsvc.ingest} and L{mqttsvc.events}.
"""
