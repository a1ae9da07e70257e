"""Operations: what a platform around the node asks of it (probes, metrics).

Rooms: ``status`` (pure: ``NodeStatus``, a plain snapshot of the node's numbers, and the
readiness and liveness rules), ``latency`` (pure: a fixed-bucket histogram cheap enough for
the message path, for publish-to-delivery across the mesh), ``metrics`` (the snapshot in
Prometheus' text format, via prometheus-client, read at scrape time), ``http`` (the
``[http] listen`` server for ``/healthz``, ``/readyz`` and ``/metrics``).

May import: the ground floor (``zmesh.config``) and its own modules; never another room:
the node hands ``http.OpsServer`` a function that returns a ``NodeStatus`` and nothing
else of itself. Imported by: ``zmesh.node`` (the wiring).
"""
