"""The MQTT front door: the local 3.1.1/5.0 listener apps in any language use.

Rooms: ``packets``, ``properties``, ``decoder``, ``encoder`` (pure: the sans-I/O codec,
re-exported whole by ``codec``), ``session`` (pure: one client's QoS 1/2 flows and packet
ids), ``sessions`` (sessions that outlive connections: subscriptions, queues, wills,
expiry), ``server`` (the asyncio protocol per connection and the server), ``listeners``
with its layers ``tls`` and ``websocket`` over ``wrapped``, and ``client`` (the small
client the CLI and tests use).

May import: ``zmesh.topics``, ``zmesh.config``, ``zmesh.ports`` (the ``Broker`` it is given
instead of the Node), ``zmesh.security`` (ACLs, secret files). Imported by ``zmesh.node``
(which starts the server) and the CLI (the client and the codec).
"""
