"""Admission by certificate: which CURVE keys are members when the mesh has an authority.

With ``mesh.authority`` set, a key becomes a member when it presents a chain that
``zmesh.security.identity.verify_chain`` believes for that very key (the one ZAP saw at the
handshake). Until then it is only admitted to the control socket, where the one thing it
may send is a hello carrying its chain; the event and job sockets' ZAP admits only keys in
the ring, and this class puts a key there only after its chain verified. It takes keys out
again when their certificate expires or a newer revocation list names a serial of their
chain (the mesh then drops the peer: expiry is enforced on live links, not only at the
handshake).

Verifying costs a signature check or two (~100 us each), so a flood of hellos from
unverified keys is bounded by a token bucket; past it hellos are dropped and counted, and
a key refused once is not verified again for ``REFUSED_FOR`` seconds.

Bounded: at most ``max_members`` identities and ``REFUSED_MAX`` remembered refusals.
``now`` is injected (wall clock: certificates carry Unix times). No zmq, no asyncio.

May import: ``zmesh.security``. Imported by ``zmesh.mesh.mesh`` and ``zmesh.node``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from zmesh.security import identity
from zmesh.security.certs import KeyRing

VERIFY_RATE = 50.0  # verifications per second, sustained
VERIFY_BURST = 200.0
REFUSED_FOR = 10.0  # seconds a refused key is not verified again
REFUSED_MAX = 10_000
MAX_MEMBERS = 100_000


@dataclass
class Verdict:
    identity: identity.Identity | None
    reason: str = ""  # why not, when identity is None ("rate_limited", "no_certificate", ...)
    message: str = ""


@dataclass
class Admission:
    authorities: Collection[bytes]
    ring: KeyRing
    own_chain: bytes
    now: Callable[[], float] = time.time
    revocations: identity.RevocationSet = field(default_factory=identity.RevocationSet)
    max_members: int = MAX_MEMBERS
    members: dict[str, identity.Identity] = field(default_factory=dict)
    # The chain each member last proved itself with: a hello carrying the same bytes costs a
    # comparison, a different one (a renewal) is verified again.
    chains: dict[str, bytes] = field(default_factory=dict)
    _tokens: float = VERIFY_BURST
    _last_refill: float = 0.0
    _refused: dict[str, float] = field(default_factory=dict)

    def _take_token(self, now: float) -> bool:
        if self._last_refill:
            self._tokens = min(VERIFY_BURST, self._tokens + (now - self._last_refill) * VERIFY_RATE)
        self._last_refill = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def admit(self, key: str, chain: bytes | None) -> Verdict:
        """Verify ``chain`` for ``key``; on success the key is a member (in the ring)."""
        now = self.now()
        known = self.members.get(key)
        if known is not None and chain is None:
            return Verdict(known)
        if chain is None:
            return Verdict(None, "no_certificate", "no certificate presented (this mesh admits by certificate)")
        refused_at = self._refused.get(key)
        if refused_at is not None and now - refused_at < REFUSED_FOR and known is None:
            return Verdict(None, "refused_recently", "refused moments ago")
        if not self._take_token(now):
            return Verdict(None, "rate_limited", "too many certificates to verify: try again")
        try:
            found = identity.verify_chain(chain, self.authorities, now=now, revocations=self.revocations,
                                          expected_key=key.encode())
        except identity.IdentityError as exc:
            if len(self._refused) >= REFUSED_MAX:
                self._refused.clear()
            self._refused[key] = now
            return Verdict(None, exc.reason, str(exc))
        if known is None and len(self.members) >= self.max_members:
            return Verdict(None, "too_many_members", f"more than {self.max_members} members")
        self._refused.pop(key, None)
        if known is None or found.not_after >= known.not_after:  # a renewal replaces the old one
            self.members[key] = found
            self.chains[key] = chain
        self.ring.add(key.encode(), found.name)
        return Verdict(self.members[key])

    def renewed(self, key: str, chain: bytes | None) -> Verdict | None:
        """A member's hello or welcome: None when it carries the chain we hold (or none);
        else the verdict on the new chain, which replaces the old one if it verifies. A
        refused renewal leaves the member as it was, until its old certificate lapses."""
        if chain is None or self.chains.get(key) == chain:
            return None
        return self.admit(key, chain)

    def groups_of(self, key: str) -> tuple[str, ...]:
        member = self.members.get(key)
        return member.groups if member is not None else ()

    def lapsed(self) -> list[tuple[str, str]]:
        """Members whose certificate has expired or been revoked since: (key, why). They
        leave the ring; the mesh drops their links."""
        now = self.now()
        gone = []
        for key, member in list(self.members.items()):
            if now - identity.DEFAULT_SKEW >= member.not_after:
                gone.append((key, "certificate expired"))
            elif any(self.revocations.revoked(s) for s in member.serials):
                gone.append((key, "certificate revoked"))
        for key, _why in gone:
            del self.members[key]
            self.chains.pop(key, None)
            self.ring.remove(key.encode())
        return gone

    def offer_revocations(self, signed: bytes) -> bool:
        """A revocation list from the mesh or a file: kept if it verifies and is newer."""
        now = self.now()
        if not self._take_token(now):  # anyone may publish on the topic: bound the checks
            raise identity.IdentityError("rate_limited", "too many revocation lists to verify")
        listed = identity.verify_revocations(signed, self.authorities, now=now)
        return self.revocations.offer(listed)
