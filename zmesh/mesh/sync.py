"""Retained replication over the mesh's links: live retained frames and their sequence
numbers, digest requests, sync answers (rate-limited per peer) and their merge.

``RetainedSync`` is a part of ``Mesh`` (a mixin: it works on the mesh's links, sockets and
counters), kept apart because it is one concern with its own rules: every entry a peer
sends is checked as a client's PUBLISH would be (``inbound``), then the mesh policy, then
stored; a gap in a peer's sequence asks again; an answer is cut in chunks by size.

May import what ``mesh.py`` may. Imported by ``zmesh.mesh.mesh``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import zmq
import zmq.asyncio

from zmesh.mesh import inbound, wire
from zmesh.mesh.links import Link, try_send
from zmesh.mesh.membership import Peer
from zmesh.retained.lastvalue import RetainedEntry

if TYPE_CHECKING:
    from zmesh.mesh.ratelimit import PeerLimits

log = logging.getLogger("zmesh.mesh")

RETAINED_GRACE = 0.25  # seconds a hello's retained sequence may run ahead of the frames seen
SYNC_LIMITED = "mesh_sync_rate_limited"  # a sync request over the peer's allowance
TOO_LARGE = "mesh_too_large"  # a payload larger than a client may publish here


class Replica(Protocol):
    """The node's retained state, as the mesh needs it to replicate (see ``Node``)."""

    def digests(self) -> list[int]: ...

    def in_buckets(self, buckets: set[int]) -> list[RetainedEntry]: ...

    def differing_buckets(self, remote: list[int]) -> set[int]: ...

    def apply_live(self, peer: Peer, topic: str, items: list[wire.RetainedItem]) -> None: ...

    def apply_sync(self, peer: Peer, entries: list[RetainedEntry]) -> None: ...


class RetainedSync:
    """The retained half of ``Mesh``; the attributes below are the mesh's."""

    replica: Replica
    stats: dict[str, int]
    retained_seq: int
    max_payload: int
    may_publish: Callable[[Peer, str, int], bool] | None
    sync_limits: PeerLimits
    drop: Callable[[str, str], None]
    _syncs_in_flight: dict[str, Link]

    if TYPE_CHECKING:  # the mesh's own methods

        def flush(self) -> None: ...

        def _label(self, key: str) -> str: ...

    def request_sync(self, link: Link) -> None:
        """Ask a peer for the retained entries we lack (digest exchange, then a snapshot of
        only the buckets that differ). Merge is last-writer-wins, so a snapshot and live
        frames may arrive in any order; a gap in the live sequence just asks again."""
        if link.sync_pending:
            return
        if try_send(link.dealer, wire.encode_sync_request(self.replica.digests())):
            link.sync_pending = True
            link.last_sync = time.monotonic()
            self.stats["syncs_requested"] += 1
            self._syncs_in_flight[link.peer.key] = link

    def _check_retained_seq(self, link: Link, announced: int) -> None:
        """A hello said the peer has sent retained frames up to ``announced``. Frames lost
        while our SUB was still connecting (PUB drops them) leave no gap until the peer's
        next retained write, which may never come: a value written just as we joined would
        stay missing until anti-entropy. A later hello, RETAINED_GRACE on, is the proof: a
        frame still in flight has arrived by then (a needless resync would cost only a
        digest exchange)."""
        synced = link.synced_upto
        if synced is None or link.sync_pending or announced <= synced:
            link.announced_seq = None
            return
        now = time.monotonic()
        earlier = link.announced_seq
        if earlier is not None and earlier > synced:  # still waiting for an earlier one
            if now - link.announced_at >= RETAINED_GRACE:
                self.stats["retained_gaps"] += 1
                log.info("retained frames up to %d from %s never arrived: resyncing", earlier, link.peer.label)
                link.announced_seq = None
                self.request_sync(link)
            return
        link.announced_seq, link.announced_at = announced, now

    def _on_retained_frame(self, link: Link, frame: bytes) -> None:
        topic, items, seq = wire.decode_retained_frame(frame)
        limit = self.max_payload
        if limit and len(frame) > limit and any(len(item.payload) > limit for item in items):
            self.drop(TOO_LARGE, f"{link.peer.label}: retained {topic[:80]!r}")
            items = []
        # Checked as a client's PUBLISH would be, then the mesh policy, then stored: in that
        # order, so nothing refused reaches the cache, the disk or another node.
        try:
            inbound.check_topic(topic)
            items = [item._replace(properties=inbound.check_properties(item.properties))
                     if item.properties else item for item in items]
        except inbound.Refused as exc:
            self.drop(exc.reason, f"{link.peer.label}: retained {topic[:80]!r}: {exc}")
            items = []
        if items and (self.may_publish is None or self.may_publish(link.peer, topic, len(items))):
            self.replica.apply_live(link.peer, topic, items)
        if link.synced_upto is None:
            link.max_seen = seq if link.max_seen is None else max(link.max_seen, seq)
        elif seq > link.synced_upto + 1:
            self.stats["retained_gaps"] += 1
            log.info("retained frames %d..%d from %s missed: resyncing", link.synced_upto + 1, seq - 1, link.peer.label)
            link.synced_upto = seq  # the resync's snapshot is taken after this frame was sent
            self.request_sync(link)
        else:
            link.synced_upto = max(link.synced_upto, seq)

    def _apply_sync_entries(self, link: Link, entries: list[RetainedEntry]) -> None:
        self.stats["sync_entries_in"] += len(entries)
        entries = self._valid_entries(link, entries)
        if entries and self.may_publish is not None:
            allowed = self.may_publish
            entries = [entry for entry in entries if allowed(link.peer, entry.topic, 1)]
        if entries:
            self.replica.apply_sync(link.peer, entries)

    def _end_sync_chunk(self, link: Link, message: wire.ControlMessage) -> None:
        if not message.last:
            return
        link.sync_pending = False
        snapshot = message.seq
        if link.synced_upto is None and link.max_seen is not None and link.max_seen > snapshot:
            # Live frames arrived before the snapshot's point: if the first of them is not
            # right after it, some frames in between may have been missed.
            first_gap = snapshot + 1 < link.max_seen
            link.synced_upto = link.max_seen
            if first_gap:
                self.request_sync(link)
            return
        link.synced_upto = max(snapshot, link.synced_upto or 0)

    def _valid_entries(self, link: Link, entries: list[RetainedEntry]) -> list[RetainedEntry]:
        """The entries of a sync answer that pass a client's rules (topic, properties) and
        name a valid origin; the others are dropped one by one, counted."""
        check_topic, check_origin, check_properties = inbound.check_topic, inbound.check_origin, inbound.check_properties
        valid = []
        for entry in entries:
            try:
                check_topic(entry.topic)
                check_origin(entry.origin)
                if entry.properties:
                    entry.properties = check_properties(entry.properties)
            except inbound.Refused as exc:
                self.drop(exc.reason, f"{link.peer.label}: synced {entry.topic[:80]!r}: {exc}")
                continue
            if self.max_payload and len(entry.payload) > self.max_payload:
                self.drop(TOO_LARGE, f"{link.peer.label}: synced {entry.topic[:80]!r}")
                continue
            valid.append(entry)
        return valid

    async def _answer_sync(
        self, ident: bytes, message: wire.ControlMessage, router: zmq.asyncio.Socket, key: str
    ) -> None:
        assert message.digests is not None
        limits = self.sync_limits
        if not limits.admit(key, time.monotonic()):
            # Over its allowance (zmesh.mesh.ratelimit): not answered. A peer in good faith
            # asks again after SYNC_TIMEOUT, by then within it.
            self.drop(SYNC_LIMITED, self._label(key))
            return
        self.flush()  # so the sequence number we report covers every write we have made
        entries = self.replica.in_buckets(self.replica.differing_buckets(message.digests))
        self.stats["sync_entries_out"] += len(entries)
        seq = self.retained_seq
        chunks = wire.sync_chunks(entries)
        for index, chunk in enumerate(chunks):
            data = wire.encode_sync_data(chunk, index == len(chunks) - 1, seq)
            limits.spent(key, len(data), time.monotonic())
            await router.send_multipart([ident, data])  # waits at the high-water mark
            await asyncio.sleep(0)  # heartbeats and MQTT clients run between chunks
