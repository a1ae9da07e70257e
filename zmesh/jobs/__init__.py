"""Work queues: a job goes to exactly one worker somewhere in the mesh.

Rooms: ``dispatcher`` (pure: leases, attempts, redelivery and dead letters, with ``now``
injected), ``service`` (the mesh service: PUSH/PULL frames, reports, tickers), ``bridge``
(the MQTT ``$jobs/`` topics), ``shared`` (mesh-wide MQTT shared subscriptions, carried as
jobs), ``spool`` (submitted jobs on disk).

May import: ``zmesh.topics``, ``zmesh.routing``, ``zmesh.ports`` (the narrow interfaces it is
given instead of the Node), ``zmesh.mesh.wire``, ``zmesh.retained.store``. Imported by:
``zmesh.node`` and the CLI.
"""
