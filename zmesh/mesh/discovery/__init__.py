"""Discovery: where peers might be. Every provider yields hints; none of them grants trust.

A hint is an address, and perhaps the key and name a peer claims there. The mesh dials it,
and a peer becomes a member only when the CURVE handshake with a trusted key succeeds:
a hint naming an untrusted key is ignored and counted, and a hint whose key does not match
the real server never completes a handshake. Providers:

* ``static``: the configured seeds (``mesh.peers``), retried with backoff while down;
* ``mdns``: ``_zmesh._tcp.local.`` on one pinned interface (python-zeroconf);
* ``dns``: a name (a Kubernetes headless Service) resolved periodically; A records, plus
  the port from SRV ``_zmesh._tcp.<name>`` where the zone has one.

Peers of peers arrive through the hello exchange (peer exchange), so one hint is enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

SERVICE_TYPE = "_zmesh._tcp.local."
MODES = ("static", "mdns", "dns")


@dataclass(frozen=True)
class Hint:
    host: str
    port: int
    key: str | None  # the z85 public key claimed, if the provider carries one
    name: str | None
    source: str  # "static", "mdns" or "dns"


class HintSink(Protocol):
    def found(self, hint: Hint) -> None: ...

    def lost(self, hint: Hint) -> None: ...
