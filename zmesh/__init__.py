"""zmesh: a brokerless messaging mesh. MQTT topics over CURVE-secured ZeroMQ."""

__version__ = "0.1.0"
