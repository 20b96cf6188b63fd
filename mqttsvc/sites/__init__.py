"""
Sites and their supervisor.

Owns each site's MQTT connection as a service with its state machine
(L{mqttsvc.sites.site.SiteService}), the one list of site states and the
status each shows as (L{mqttsvc.sites.states}), and the supervisor that
adds, removes and reconfigures the site services by name
(L{mqttsvc.sites.supervisor.SiteSupervisor}); a site decides what a new
configuration means for it (resubscribe, or a new connection).

May import: config, records, runtime, mqtt, ingest, db.

The ingest side's services are reached only through the Protocols declared
here (C{MessageSink}, C{DeviceTracker}, C{IngestPort}); what a site imports
from ingest is the pure L{mqttsvc.ingest.processing} functions and
L{mqttsvc.ingest.liveness.DeviceLimit}, which it calls on its message path.
The supervisor reads the site rows through L{mqttsvc.db.store}.
"""
