"""This node's copy of the retained state: the LWW cache, its clock, and its durable store.

Writes reach the cache three ways: published here (``write_local``), received live on the
retained channel (``apply_live``), or fetched from a peer by anti-entropy (``apply_sync``).
All three merge by last-writer-wins, so their order does not matter. Accepted writes are
queued for the SQLite store and written in batches on a worker thread (group commit);
with ``sync = "always"`` a local write returns a future that completes when its batch is on
disk, and the MQTT listener holds the PUBACK until then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zmesh.config import RetainedConfig, StoreConfig
from zmesh.mesh import inbound, wire
from zmesh.mesh.membership import Peer
from zmesh.retained.hlc import HybridClock
from zmesh.retained.lastvalue import Merge, RetainedCache, RetainedEntry

log = logging.getLogger("zmesh.retained")

PURGE_EVERY = 5.0  # seconds between expiry / tombstone collection passes
PURGE_SLICE = 10_000  # topics examined per loop turn in one pass
REENCRYPT_BATCH = 1000

# (topic, payload, qos, properties, origin): hand a message to local subscribers
Deliver = Callable[[str, bytes, int, dict[str, Any] | None, str], None]
# (reason, detail): count and log one refused input (zmesh.drops.Drops.drop)
Drop = Callable[[str, str], None]
BAD_STORED = "retained_bad_entry"  # an entry on disk that no peer or client could make now
STORED_MAX_OFFSET_MS = 86_400_000  # how far ahead of our clock an entry on disk may be


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _expiry_ok(expires_at: int | None) -> bool:
    # Wall-clock ms; SQLite's integers end at 2^63 - 1.
    return expires_at is None or 0 <= expires_at < 2**63


class RetainedReplica:
    def __init__(
        self,
        name: str,
        config: RetainedConfig,
        store_config: StoreConfig,
        data_dir: Path | None,
        deliver: Deliver,
        drop: Drop | None = None,
    ) -> None:
        self.name, self.config, self.store_config, self.data_dir = name, config, store_config, data_dir
        self.deliver = deliver
        self.drop: Drop = drop or (lambda reason, detail: None)
        self.cache = RetainedCache(config.max_entries, config.max_bytes)
        self.clock = HybridClock(max_offset_ms=int(config.max_clock_offset * 1000))
        self.store: Any = None
        self.refused_total = 0
        self.store_errors_total = 0
        self._queue: list[tuple[RetainedEntry, asyncio.Future[None] | None]] = []
        self._deletes: list[str] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self.data_dir is not None:
            from zmesh.retained.store import RetainedStore
            from zmesh.security.keys import load_key_file

            key = load_key_file(self.store_config.key_file) if self.store_config.key_file else None
            previous = [load_key_file(p) for p in self.store_config.previous_key_files]
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = self.data_dir / "retained.db"
            self.store = await asyncio.to_thread(
                RetainedStore, path, key=key, previous_keys=previous, sync=self.store_config.sync
            )
            entries = await asyncio.to_thread(self.store.load)
            now = _now_ms()
            bad: list[str] = []
            for stored in entries:
                # What a peer could not make us accept now must not come back from disk
                # either (written before these checks existed): refused, counted, deleted.
                problem = self._stored_problem(stored)
                if problem:
                    self.drop(BAD_STORED, f"{stored.topic[:80]!r}: {problem}")
                    bad.append(stored.topic)
                    continue
                self.clock.observe(stored.timestamp)
                self.cache.merge(
                    RetainedEntry(stored.topic, stored.payload, stored.qos, stored.origin,
                                  stored.timestamp, stored.properties, stored.expires_at),
                    now,
                )
            if bad:
                await asyncio.to_thread(self.store.delete_many, bad)
            log.info(
                "retained store %s: %d entries loaded (%d live)%s",
                path, len(entries), len(self.cache), ", encrypted" if self.store.encrypted else "",
            )
            self._tasks.append(asyncio.create_task(self._writer(), name="retained-writer"))
            if getattr(self.store, "needs_reencrypt", False):
                self._tasks.append(asyncio.create_task(self._reencrypt(), name="retained-reencrypt"))
        else:
            log.info("no data_dir: retained messages are kept in memory only")
        self._tasks.append(asyncio.create_task(self._purge(), name="retained-purge"))

    def _stored_problem(self, stored: Any) -> str:
        # Our own writes are on disk too, stamped by our wall clock as it was: one that NTP
        # has since set back by minutes must not cost them. So the bound on disk is a day
        # (or the peer bound, if larger): a clock a day off is broken, a year-2500 stamp
        # from before these checks is poison.
        if not self.clock.acceptable(stored.timestamp, max(self.clock.max_offset_ms, STORED_MAX_OFFSET_MS)):
            return f"timestamp {stored.timestamp} beyond the clock bound"
        if stored.expires_at is not None and not 0 <= stored.expires_at < 2**63:
            return "expiry out of range"
        try:
            inbound.check_topic(stored.topic)
            inbound.check_origin(stored.origin)
            inbound.check_properties(stored.properties)
        except inbound.Refused as exc:
            return str(exc)
        return ""

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.store is not None:
            await self._write_pending()  # what was accepted goes to disk before we stop
            await asyncio.to_thread(self.store.close)
            self.store = None

    # ------------------------------------------------------------------ writes

    def write_local(
        self, topic: str, payload: bytes, qos: int, properties: dict[str, Any] | None
    ) -> tuple[list[Any] | None, asyncio.Future[None] | None]:
        """A retained publish made on this node: (its wire item or None if refused, and a
        future completing when it is on disk, when the store syncs always)."""
        timestamp = self.clock.now()
        expires_at = None
        if properties and properties.get("message_expiry_interval"):
            expires_at = _now_ms() + int(properties["message_expiry_interval"]) * 1000
        entry = RetainedEntry(topic, payload, qos, self.name, timestamp, properties, expires_at)
        if not self._merge(entry):
            return None, None
        durable = self.store is not None and self.store_config.sync == "always" and qos > 0
        future = asyncio.get_running_loop().create_future() if durable else None
        self._enqueue(entry, future)
        return wire.encode_retained_item(payload, qos, timestamp, properties, expires_at), future

    def _merge(self, entry: RetainedEntry, now_ms: int = 0) -> bool:
        result = self.cache.merge(entry, now_ms or _now_ms())
        if result is Merge.FULL:
            self.refused_total += 1
            if self.refused_total == 1 or self.refused_total % 1000 == 0:
                log.warning(
                    "retained cache full (%d entries, %d bytes; limits %d, %d): %s not retained "
                    "(%d refused so far)",
                    len(self.cache), self.cache.live_bytes, self.config.max_entries,
                    self.config.max_bytes, entry.topic, self.refused_total,
                )
        return result is Merge.ACCEPTED

    def _enqueue(self, entry: RetainedEntry, future: asyncio.Future[None] | None = None) -> None:
        if self.store is None:
            return
        self._queue.append((entry, future))
        self._wake.set()

    async def _writer(self) -> None:
        interval = self.store_config.sync == "interval"
        while True:
            await self._wake.wait()
            if interval:
                await asyncio.sleep(self.store_config.sync_interval)
            self._wake.clear()
            await self._write_pending()

    async def _write_pending(self) -> None:
        batch, self._queue = self._queue, []
        deletes, self._deletes = self._deletes, []
        if not batch and not deletes:
            return
        try:
            recovered = self.store.recovered_from
            if batch:
                # Later writes to one topic supersede earlier ones in the same batch.
                latest = {entry.topic: entry for entry, _ in batch}
                await asyncio.to_thread(self.store.put_many, list(latest.values()))
            if deletes:
                await asyncio.to_thread(self.store.delete_many, deletes)
            if self.store.recovered_from != recovered:
                # The file went bad under us and was replaced by an empty one: save all we hold.
                await asyncio.to_thread(self.store.put_many, list(self.cache.all()))
            if self.store_config.sync == "interval":
                await asyncio.to_thread(self.store.flush)  # one fsync per interval
        except Exception as exc:  # the disk failed us: say so, keep serving from memory
            self.store_errors_total += 1
            log.error("retained store write failed (%d entries): %s", len(batch), exc)
            for _, future in batch:
                if future is not None and not future.done():
                    future.set_exception(exc)
            return
        for _, future in batch:
            if future is not None and not future.done():
                future.set_result(None)

    async def _purge(self) -> None:
        ttl_ms = int(self.config.tombstone_ttl * 1000)
        while True:
            await asyncio.sleep(PURGE_EVERY)
            # A slice of topics per loop turn: one pass over 200,000 entries held the loop
            # ~70 ms every PURGE_EVERY.
            topics = list(self.cache.topics())
            gone = []
            for start in range(0, len(topics), PURGE_SLICE):
                if start:
                    await asyncio.sleep(0)
                gone += self.cache.purge(_now_ms(), ttl_ms, topics[start : start + PURGE_SLICE])
            if gone and self.store is not None:
                self._deletes.extend(gone)
                self._wake.set()

    async def _reencrypt(self) -> None:
        done = 0
        while True:
            count = await asyncio.to_thread(self.store.reencrypt_batch, REENCRYPT_BATCH)
            if count == 0:
                break
            done += count
            await asyncio.sleep(0.01)  # leave the disk to live writes between batches
        log.info("retained store: %d entries re-encrypted under the current key", done)

    # ------------------------------------------------------------------ the mesh's side (mesh.Replica)

    def digests(self) -> list[int]:
        return self.cache.digests()

    def differing_buckets(self, remote: list[int]) -> set[int]:
        return self.cache.differing_buckets(remote)

    def in_buckets(self, buckets: set[int]) -> list[RetainedEntry]:
        return self.cache.in_buckets(buckets)

    def apply_live(self, peer: Peer, topic: str, items: list[wire.RetainedItem]) -> None:
        """Retained publishes from a peer: merged, and delivered live like any publish.
        The topic and properties were checked by the mesh (``mesh.inbound``); a timestamp
        beyond the clock's bound is refused here, item by item."""
        for payload, qos, timestamp, properties, expires_at in items:
            if not self.clock.observe(timestamp) or not _expiry_ok(expires_at):
                self.drop(inbound.BAD_TIMESTAMP, f"{peer.label}: {topic[:80]!r} at {timestamp}")
                continue
            entry = RetainedEntry(topic, payload, qos, peer.name, timestamp, properties, expires_at)
            if self._merge(entry):
                self._enqueue(entry)
            self.deliver(topic, payload, qos, properties, peer.name)

    def apply_sync(self, peer: Peer, entries: list[RetainedEntry]) -> None:
        """Entries fetched by anti-entropy: what is news is stored and told to subscribers."""
        now = _now_ms()
        observe, merge, enqueue = self.clock.observe, self._merge, self._enqueue
        for entry in entries:
            if not observe(entry.timestamp) or not _expiry_ok(entry.expires_at):
                self.drop(inbound.BAD_TIMESTAMP, f"{peer.label}: {entry.topic[:80]!r} at {entry.timestamp}")
                continue
            if merge(entry, now):
                enqueue(entry)
                if not entry.deleted:
                    self.deliver(entry.topic, entry.payload, entry.qos, entry.properties, entry.origin)

    # ------------------------------------------------------------------ reads

    def match(self, filt: str) -> list[RetainedEntry]:
        return list(self.cache.match(filt, _now_ms()))
