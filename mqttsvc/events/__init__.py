"""
Events out: the event hub (L{hub}), which hands every new event of the
database's C{event_log} to its subscribers once, in order, and the webhook
alerts (L{alerts}) that subscribe to it.

May import: config, records, runtime, db.
"""
