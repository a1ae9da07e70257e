"""The mesh: how nodes find, trust and talk to each other over ZeroMQ.

Rooms: ``wire`` (pure: the envelope and control messages, versioned msgpack), ``membership``
(pure: peer states and events), ``policy`` (pure: which peer may publish which topics),
``transport`` (zmq sockets with CURVE and ZAP over the key ring), ``mesh`` (the links to
peers: hellos, event and job readers, sync requests), ``discovery/`` (static, mDNS and DNS
hints; none of them grants trust).

May import: ``zmesh.topics``, ``zmesh.security`` (keys and certificates), ``zmesh.retained``'s
pure modules (entries on the wire) and ``zmesh.config``. Imported by: ``zmesh.node`` (the
wiring), ``zmesh.jobs`` and ``zmesh.retained.replica`` (wire formats only), the CLI.
This ``__init__`` imports nothing, so that the pure rooms load without zmq.
"""
