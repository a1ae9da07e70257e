"""Retained messages: a last-value cache that every node holds whole.

Rooms: ``lastvalue`` (pure: the map, its last-writer-wins merge and tombstones), ``hlc``
(pure: the hybrid logical clock that orders writes), ``topictree`` (pure: the
``$SYS/zmesh/topics`` dump), ``store`` (SQLite, WAL, payloads sealed at rest), ``replica``
(replication: live frames, digests and anti-entropy, the store behind it).

May import: ``zmesh.topics``, ``zmesh.config``, ``zmesh.security.keys``, ``zmesh.mesh.wire``
and ``zmesh.mesh.membership`` (what peers say). Imported by: ``zmesh.node``, the CLI, and
``zmesh.mesh`` (entries on the wire, pure modules only).
This ``__init__`` imports nothing, so that the pure rooms load without sqlite.
"""
