"""
Ingest: from a received message to committed rows.

Owns processing (topic routing, payload parsing, effects:
L{mqttsvc.ingest.processing}), device liveness (the offline detector and
its service, L{mqttsvc.ingest.liveness}), the batch writer and its lanes
(L{mqttsvc.ingest.writer}), the fences a cluster instance's writes carry
(L{mqttsvc.ingest.fencing}), and the L{mqttsvc.ingest.service.Ingest}
service that owns the writer and liveness and is given every callback it
reports through when it is built.

May import: config, records, runtime, db.

Never the sites: they reach ingest through their own Protocols.
"""
