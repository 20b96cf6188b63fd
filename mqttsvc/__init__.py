"""
mqttsvc: one Twisted process that carries MQTT messages from IoT sites'
brokers into PostgreSQL, with a JSON-RPC control plane.
"""

__version__ = "0.1.0"
