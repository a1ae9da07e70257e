"""Epidemic broadcast trees (Plumtree). Pure: messages and ``now`` in, messages out.

Leitão, Pereira, Rodrigues, "Epidemic Broadcast Trees" (SRDS 2007); design and figures in
docs/cluster-scale.md §4. A node has a few neighbours (the overlay, drawn from the SWIM
table by the caller). A new message goes in full to the *eager* neighbours and as an id to
the *lazy* ones, batched every ``lazy_interval``:

* a first copy is delivered and forwarded (eager: in full, lazy: the id);
* a duplicate makes its sender lazy, and we tell it so (``Prune``): the eager links shrink
  to a spanning tree, so each node receives each message about once;
* an id announced (``IHave``) but not received within ``graft_timeout`` means the tree is
  broken above us: we ask the announcer for it (``Graft``), which makes that link eager
  again, and try the next announcer ``graft_retry`` later.

A message's id is the BLAKE2b-128 hash of its payload, computed by each receiver, never taken
from the wire: a neighbour cannot pre-empt a real message by sending junk under its id, and
a replay is only a duplicate. Every cache is bounded (ids seen, payloads kept for grafts,
ids announced but missing, ids waiting to be announced).
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack

VERSION = 1
ID_LEN = 16
MAX_ROUND = 65_535
MAX_IDS = 256  # ids in one IHave or Graft
_packb = msgpack.Packer(use_bin_type=True).pack


class PlumtreeError(ValueError):
    """A message from a peer that is not a valid broadcast message of a version we speak."""


def message_id(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=ID_LEN).digest()


@dataclass(frozen=True, slots=True)
class Push:
    """A message in full (the paper's GOSSIP); ``round`` is its hop count from the origin."""

    round: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class IHave:
    entries: tuple[tuple[bytes, int], ...]  # (id, round)


@dataclass(frozen=True, slots=True)
class Graft:
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Prune:
    pass


Message = Push | IHave | Graft | Prune
Send = tuple[str, Message]
_PUSH, _IHAVE, _GRAFT, _PRUNE = 1, 2, 3, 4


def encode(message: Message) -> bytes:
    t = type(message)
    if t is Push:
        return _packb([VERSION, _PUSH, message.round, message.payload])  # type: ignore[union-attr]
    if t is IHave:
        return _packb([VERSION, _IHAVE, [[i, r] for i, r in message.entries]])  # type: ignore[union-attr]
    if t is Graft:
        return _packb([VERSION, _GRAFT, list(message.ids)])  # type: ignore[union-attr]
    if t is Prune:
        return _packb([VERSION, _PRUNE])
    raise TypeError(f"not a broadcast message: {message!r}")


def decode(data: bytes, max_payload: int) -> Message:
    """A message from a peer, fully validated; PlumtreeError (and nothing else) otherwise."""
    if len(data) > max_payload + 64:
        raise PlumtreeError(f"message of {len(data)} bytes exceeds the payload bound {max_payload}")
    try:
        body = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise PlumtreeError(f"undecodable message: {exc}") from None
    if type(body) is not list or len(body) < 2 or type(body[1]) is not int:
        raise PlumtreeError("message is not [version, type, ...]")
    if body[0] != VERSION:
        raise PlumtreeError(f"version {body[0]!r}; this node speaks {VERSION}")
    kind, n = body[1], len(body)
    if kind == _PUSH and n == 4:
        rnd, payload = body[2], body[3]
        if type(rnd) is not int or not 0 <= rnd <= MAX_ROUND:
            raise PlumtreeError("round out of range")
        if type(payload) is not bytes or len(payload) > max_payload:
            raise PlumtreeError("payload is not bytes within the bound")
        return Push(rnd, payload)
    if kind == _IHAVE and n == 3:
        raw = body[2]
        if type(raw) is not list or not 0 < len(raw) <= MAX_IDS:
            raise PlumtreeError("ihave is not a list of 1..256 entries")
        entries = []
        for entry in raw:
            if not (type(entry) is list and len(entry) == 2 and _is_id(entry[0])
                    and type(entry[1]) is int and 0 <= entry[1] <= MAX_ROUND):
                raise PlumtreeError("ihave entry malformed")
            entries.append((entry[0], entry[1]))
        return IHave(tuple(entries))
    if kind == _GRAFT and n == 3:
        ids = body[2]
        if type(ids) is not list or not 0 < len(ids) <= MAX_IDS or not all(_is_id(i) for i in ids):
            raise PlumtreeError("graft is not a list of 1..256 ids")
        return Graft(tuple(ids))
    if kind == _PRUNE and n == 2:
        return Prune()
    raise PlumtreeError(f"unknown message type {kind!r} or wrong arity {n}")


def _is_id(value: Any) -> bool:
    return type(value) is bytes and len(value) == ID_LEN


@dataclass(frozen=True)
class PlumtreeConfig:
    graft_timeout: float = 0.5  # an announced id not received by then: graft
    graft_retry: float = 0.25  # then the next announcer, this much later
    lazy_interval: float = 0.1  # ids are announced in batches
    max_neighbours: int = 10
    max_payload: int = 1024 * 1024
    max_seen: int = 65_536  # ids remembered (oldest forgotten first)
    max_cached_bytes: int = 8 * 1024 * 1024  # payloads kept to answer grafts
    cache_ttl: float = 30.0
    max_missing: int = 4096
    max_announcers: int = 4
    max_lazy_queue: int = 4 * MAX_IDS  # ids waiting for one lazy neighbour


@dataclass(slots=True)
class _Missing:
    deadline: float
    announcers: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Delivery:
    id: bytes
    payload: bytes
    round: int
    sender: str  # the neighbour it came from ("" for our own broadcast)


class Plumtree:
    def __init__(self, key: str, *, now: float, config: PlumtreeConfig | None = None,
                 rng: random.Random | None = None) -> None:
        self.key = key
        self.config = config or PlumtreeConfig()
        self.rng = rng or random.Random()
        self.eager: set[str] = set()
        self.lazy: set[str] = set()
        self.delivered: list[Delivery] = []
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._cache: OrderedDict[bytes, tuple[bytes, int, float]] = OrderedDict()  # id -> payload, round, at
        self._cached_bytes = 0
        self._missing: dict[bytes, _Missing] = {}
        self._lazy_queue: dict[str, list[tuple[bytes, int]]] = {}
        self._next_lazy = now + self.config.lazy_interval
        self.stats: dict[str, int] = {
            "delivered": 0, "duplicates": 0, "pushes_sent": 0, "ihave_ids_sent": 0,
            "grafts_sent": 0, "prunes_sent": 0, "missing_dropped": 0, "lost": 0,
            "neighbours_refused": 0, "lazy_dropped": 0,
        }

    # ------------------------------------------------------------------ overlay

    def neighbours(self) -> set[str]:
        return self.eager | self.lazy

    def add_neighbour(self, key: str) -> bool:
        """A new neighbour starts eager (the tree prunes itself on the first duplicates)."""
        if key == self.key or key in self.eager or key in self.lazy:
            return True
        if len(self.eager) + len(self.lazy) >= self.config.max_neighbours:
            self.stats["neighbours_refused"] += 1
            return False
        self.eager.add(key)
        return True

    def remove_neighbour(self, key: str) -> None:
        """Gone (SWIM says dead or left, or the caller replaced it)."""
        self.eager.discard(key)
        self.lazy.discard(key)
        self._lazy_queue.pop(key, None)
        for missing in self._missing.values():
            if key in missing.announcers:
                missing.announcers.remove(key)

    # ------------------------------------------------------------------ sending

    def broadcast(self, payload: bytes, now: float) -> tuple[bytes, list[Send]]:
        """Start a broadcast of ``payload`` (not delivered to ourselves: the caller has it)."""
        if len(payload) > self.config.max_payload:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {self.config.max_payload}")
        mid = message_id(payload)
        out: list[Send] = []
        if mid in self._seen:
            return mid, out
        self._remember(mid, payload, 0, now)
        self._forward(mid, payload, 0, "", out)
        return mid, out

    def _forward(self, mid: bytes, payload: bytes, rnd: int, sender: str, out: list[Send]) -> None:
        push = Push(min(rnd + 1, MAX_ROUND), payload)
        for peer in self.eager:
            if peer != sender:
                out.append((peer, push))
                self.stats["pushes_sent"] += 1
        for peer in self.lazy:
            if peer != sender:
                queue = self._lazy_queue.setdefault(peer, [])
                if len(queue) >= self.config.max_lazy_queue:
                    queue.pop(0)  # anti-entropy repairs what the tree and the ids both miss
                    self.stats["lazy_dropped"] += 1
                queue.append((mid, push.round))

    def _remember(self, mid: bytes, payload: bytes, rnd: int, now: float) -> None:
        self._seen[mid] = None
        if len(self._seen) > self.config.max_seen:
            self._seen.popitem(last=False)
        self._cache[mid] = (payload, rnd, now)
        self._cached_bytes += len(payload)
        while self._cached_bytes > self.config.max_cached_bytes and self._cache:
            _, (old, _, _) = self._cache.popitem(last=False)
            self._cached_bytes -= len(old)

    # ------------------------------------------------------------------ receiving

    def receive(self, sender: str, message: Message, now: float) -> list[Send]:
        """``sender`` is the key the transport authenticated. Deliveries go to ``delivered``."""
        out: list[Send] = []
        t = type(message)
        if t is Push:
            self._on_push(sender, message, now, out)  # type: ignore[arg-type]
        elif t is IHave:
            self._on_ihave(sender, message, now)  # type: ignore[arg-type]
        elif t is Graft:
            if self.add_neighbour(sender):
                self.lazy.discard(sender)
                self.eager.add(sender)
            for mid in message.ids:  # type: ignore[union-attr]
                cached = self._cache.get(mid)
                if cached is not None:
                    out.append((sender, Push(min(cached[1] + 1, MAX_ROUND), cached[0])))
                    self.stats["pushes_sent"] += 1
        elif t is Prune:
            if sender in self.eager:
                self.eager.discard(sender)
                self.lazy.add(sender)
        return out

    def _on_push(self, sender: str, push: Push, now: float, out: list[Send]) -> None:
        mid = message_id(push.payload)
        known = self.add_neighbour(sender)
        if mid in self._seen:
            self.stats["duplicates"] += 1
            if sender in self.eager:
                self.eager.discard(sender)
                self.lazy.add(sender)
            out.append((sender, Prune()))
            self.stats["prunes_sent"] += 1
            return
        self._missing.pop(mid, None)
        self._remember(mid, push.payload, push.round, now)
        self.delivered.append(Delivery(mid, push.payload, push.round, sender))
        self.stats["delivered"] += 1
        if known and sender in self.lazy:  # it delivered first: the tree goes through it
            self.lazy.discard(sender)
            self.eager.add(sender)
        self._forward(mid, push.payload, push.round, sender, out)

    def _on_ihave(self, sender: str, ihave: IHave, now: float) -> None:
        if sender not in self.eager and sender not in self.lazy:
            if self.add_neighbour(sender):  # a new link starts eager; it announced, so lazy
                self.eager.discard(sender)
                self.lazy.add(sender)
        for mid, _rnd in ihave.entries:
            if mid in self._seen:
                continue
            missing = self._missing.get(mid)
            if missing is None:
                if len(self._missing) >= self.config.max_missing:
                    self.stats["missing_dropped"] += 1
                    continue
                self._missing[mid] = _Missing(now + self.config.graft_timeout, [sender])
            elif sender not in missing.announcers and len(missing.announcers) < self.config.max_announcers:
                missing.announcers.append(sender)

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> list[Send]:
        out: list[Send] = []
        if self._missing:
            grafts: dict[str, list[bytes]] = {}
            for mid, missing in list(self._missing.items()):
                if now < missing.deadline:
                    continue
                if not missing.announcers:
                    del self._missing[mid]
                    self.stats["lost"] += 1  # left to anti-entropy
                    continue
                peer = missing.announcers.pop(0)
                missing.deadline = now + self.config.graft_retry
                grafts.setdefault(peer, []).append(mid)
            for peer, ids in grafts.items():
                if peer in self.lazy:
                    self.lazy.discard(peer)
                    self.eager.add(peer)
                for i in range(0, len(ids), MAX_IDS):
                    out.append((peer, Graft(tuple(ids[i:i + MAX_IDS]))))
                    self.stats["grafts_sent"] += 1
        if now >= self._next_lazy:
            self._next_lazy = now + self.config.lazy_interval
            if self._lazy_queue:
                for peer, queue in self._lazy_queue.items():
                    for i in range(0, len(queue), MAX_IDS):
                        out.append((peer, IHave(tuple(queue[i:i + MAX_IDS]))))
                    self.stats["ihave_ids_sent"] += len(queue)
                self._lazy_queue = {}
            self._expire(now)
        return out

    def _expire(self, now: float) -> None:
        ttl = self.config.cache_ttl
        while self._cache:
            mid, (payload, _, at) = next(iter(self._cache.items()))
            if now - at < ttl:
                break
            del self._cache[mid]
            self._cached_bytes -= len(payload)

    def drain(self) -> list[Delivery]:
        delivered, self.delivered = self.delivered, []
        return delivered
