"""
The broker connection: everything between a broker's socket and a site.

  - L{codec <mqttsvc.mqtt.codec>}: the packets we decode and encode
    ourselves (variable byte integers, PUBLISH, PUBACK); pure.
  - L{errors <mqttsvc.mqtt.errors>}: L{ConnectFailed} and the
    classification of connect failures.
  - L{tls <mqttsvc.mqtt.tls>}: a broker's TLS context.
  - L{pahoclient <mqttsvc.mqtt.pahoclient>}: the paho adapter, the only
    module that touches paho's private names (version-checked at import,
    contract-tested in C{tests/test_paho_contract.py}).
  - L{client <mqttsvc.mqtt.client>}: L{MQTTClient}, one connection on the
    reactor, and L{BrokerClient}, what a site needs of one.
  - L{keepalive <mqttsvc.mqtt.keepalive>}: the one timer that looks after
    every connection.
  - L{connector <mqttsvc.mqtt.connector>}: the service that owns the
    connect threads and makes clients (L{ClientFactory}).
  - L{probe <mqttsvc.mqtt.probe>}: the dry-run connects of C{site.test}.

May import: config, runtime.

Nothing of sites, ingest, db, control or events.  C{mqttsvc.tap} wires it:
one L{KeepaliveSweep}, a L{Connector} for the sites and a
L{ConnectionTests} for C{site.test}.
"""
