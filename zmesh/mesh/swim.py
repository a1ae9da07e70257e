"""Who is in the mesh, by SWIM gossip with Lifeguard. Pure: messages and ``now`` in, messages out.

The design, with the reasons and the arithmetic, is docs/cluster-scale.md §1. In short:

* every ``probe_interval`` a node pings ONE member (a new random order each pass); no ack
  within ``probe_timeout``: ``ping_req`` through ``indirect_checks`` others; still nothing at
  the end of the interval: the member is suspected;
* a suspicion becomes ``dead`` when its timer runs out: Lifeguard's timer starts at ``max``
  and shrinks towards ``min = suspicion_mult * log10(N) * probe_interval`` as other members
  confirm it; only the member itself can refute, with a higher incarnation;
* changes (alive / suspect / dead assertions) ride on pings and acks and on a small gossip,
  each sent ``retransmit_mult * ceil(log10(N + 1))`` times, then dropped;
* the whole table travels only once, to a joiner; afterwards nodes compare 256 bucket
  digests with one random member per ``sync_interval``.

Every assertion is signed by the node that makes it: ``alive`` by its subject, ``suspect``
and ``dead`` by the accuser (CURVE keys cannot sign; the node signs with XEdDSA over the
same X25519 key, see the design). ``sign`` and ``verify`` are injected, so this module never
touches crypto, sockets or clocks; the node passes ``zmesh.security.xeddsa.signer(secret)``
and ``zmesh.security.xeddsa.verify``, which have exactly these shapes. A ``dead`` from someone else is a strong accusation, never
a verdict: each node declares a member dead only when its own suspicion timer runs out, so a
lying member cannot evict anyone who can still refute.

Everything decoded from a peer is validated (``decode`` raises ``SwimError`` and nothing
else) and bounded: message size, piggyback count, name/host/meta sizes, table size.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import math
import random
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

VERSION = 1
MAX_MESSAGE = 64 * 1024  # bytes of one encoded message
MAX_UPDATES = 16  # assertions piggybacked on one message
MAX_RECORDS = 256  # member records in one state chunk
BUCKETS = 256  # digest buckets for anti-entropy
MAX_NAME = 64
MAX_HOST = 253
MAX_META = 512
SIG_LEN = 64
MAX_INCARNATION = 2**63
MAX_SEQ = 2**32
_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_HOST = re.compile(r"[^\s\x00]{1,253}")
_SIGNED = b"zmesh-swim-1\x00"
_packb = msgpack.Packer(use_bin_type=True).pack


class SwimError(ValueError):
    """A message from a peer that is not a valid SWIM message of a version we speak."""


class State(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


LIVE_STATES = (State.ALIVE, State.SUSPECT)  # members that are probed and gossiped to


# --------------------------------------------------------------------------- assertions


@dataclass(frozen=True, slots=True)
class Alive:
    """A member says where it is, at an incarnation; signed by the member itself."""

    key: str
    incarnation: int
    name: str
    host: str
    port: int
    meta: bytes
    sig: bytes

    def signed_bytes(self) -> bytes:
        return alive_bytes(self.key, self.incarnation, self.name, self.host, self.port, self.meta)


@dataclass(frozen=True, slots=True)
class Suspect:
    """``accuser`` could not reach ``key`` at ``incarnation``; signed by the accuser."""

    key: str
    incarnation: int
    accuser: str
    sig: bytes

    def signed_bytes(self) -> bytes:
        return accusation_bytes(b"S", self.key, self.incarnation, self.accuser)


@dataclass(frozen=True, slots=True)
class Dead:
    """``accuser``'s suspicion of ``key`` ran out; ``accuser == key``: the member left."""

    key: str
    incarnation: int
    accuser: str
    sig: bytes

    def signed_bytes(self) -> bytes:
        return accusation_bytes(b"D", self.key, self.incarnation, self.accuser)


Assertion = Alive | Suspect | Dead
Proof = Suspect | Dead | None


def alive_bytes(key: str, incarnation: int, name: str, host: str, port: int, meta: bytes) -> bytes:
    # Domain-separated and typed, so a signature over one kind is never valid as another.
    return _SIGNED + b"A" + _packb([key, incarnation, name, host, port, meta])


def accusation_bytes(kind: bytes, key: str, incarnation: int, accuser: str) -> bytes:
    return _SIGNED + kind + _packb([key, incarnation, accuser])


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target: str  # the key the sender thinks it is talking to (an address may be reused)
    updates: tuple[Assertion, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    updates: tuple[Assertion, ...] = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    seq: int
    target: str
    updates: tuple[Assertion, ...] = ()


@dataclass(frozen=True, slots=True)
class Nack:
    """A relay asked to ping ``target`` got no answer (Lifeguard): we, at least, are heard."""

    seq: int


@dataclass(frozen=True, slots=True)
class Gossip:
    updates: tuple[Assertion, ...]


@dataclass(frozen=True, slots=True)
class Join:
    alive: Alive


@dataclass(frozen=True, slots=True)
class Record:
    """One member as a table holds it: its signed record and the accusation it is under."""

    alive: Alive
    proof: Proof = None


@dataclass(frozen=True, slots=True)
class StateChunk:
    records: tuple[Record, ...]
    last: bool


@dataclass(frozen=True, slots=True)
class Sync:
    """The sender's bucket digests; ``reply``: send yours back if they differ."""

    digests: tuple[int, ...]
    reply: bool


Message = Ping | Ack | PingReq | Nack | Gossip | Join | StateChunk | Sync
Send = tuple[str, Message]  # (recipient key, message)

_PING, _ACK, _PING_REQ, _NACK, _GOSSIP, _JOIN, _STATE, _SYNC = range(1, 9)
_A, _S, _D = 0, 1, 2


def _raw_assertion(a: Assertion) -> list[Any]:
    if type(a) is Alive:
        return [_A, a.key, a.incarnation, a.name, a.host, a.port, a.meta, a.sig]
    return [_S if type(a) is Suspect else _D, a.key, a.incarnation, a.accuser, a.sig]  # type: ignore[union-attr]


def _raw_updates(updates: tuple[Assertion, ...]) -> list[list[Any]]:
    return [_raw_assertion(a) for a in updates]


def encode(message: Message) -> bytes:
    t = type(message)
    if t is Ping or t is PingReq:
        body: list[Any] = [VERSION, _PING if t is Ping else _PING_REQ, message.seq, message.target,  # type: ignore[union-attr]
                           _raw_updates(message.updates)]  # type: ignore[union-attr]
    elif t is Ack:
        body = [VERSION, _ACK, message.seq, _raw_updates(message.updates)]  # type: ignore[union-attr]
    elif t is Nack:
        body = [VERSION, _NACK, message.seq]  # type: ignore[union-attr]
    elif t is Gossip:
        body = [VERSION, _GOSSIP, _raw_updates(message.updates)]  # type: ignore[union-attr]
    elif t is Join:
        body = [VERSION, _JOIN, _raw_assertion(message.alive)]  # type: ignore[union-attr]
    elif t is StateChunk:
        rows = [[_raw_assertion(r.alive), None if r.proof is None else _raw_assertion(r.proof)]
                for r in message.records]  # type: ignore[union-attr]
        body = [VERSION, _STATE, rows, message.last]  # type: ignore[union-attr]
    elif t is Sync:
        body = [VERSION, _SYNC, list(message.digests), message.reply]  # type: ignore[union-attr]
    else:
        raise TypeError(f"not a SWIM message: {message!r}")
    return _packb(body)


def assertion_size(a: Assertion) -> int:
    return len(_packb(_raw_assertion(a)))


def decode(data: bytes) -> Message:
    """A message from a peer, fully validated; SwimError (and nothing else) otherwise."""
    if len(data) > MAX_MESSAGE:
        raise SwimError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        body = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SwimError(f"undecodable message: {exc}") from None
    if type(body) is not list or len(body) < 2 or type(body[1]) is not int:
        raise SwimError("message is not [version, type, ...]")
    if body[0] != VERSION:
        raise SwimError(f"version {body[0]!r}; this node speaks {VERSION}")
    kind, n = body[1], len(body)
    if kind in (_PING, _PING_REQ) and n == 5:
        seq, target = _seq(body[2]), _key(body[3])
        updates = _updates(body[4])
        return Ping(seq, target, updates) if kind == _PING else PingReq(seq, target, updates)
    if kind == _ACK and n == 4:
        return Ack(_seq(body[2]), _updates(body[3]))
    if kind == _NACK and n == 3:
        return Nack(_seq(body[2]))
    if kind == _GOSSIP and n == 3:
        return Gossip(_updates(body[2]))
    if kind == _JOIN and n == 3:
        alive = _assertion(body[2])
        if type(alive) is not Alive:
            raise SwimError("join does not carry an alive record")
        return Join(alive)
    if kind == _STATE and n == 4:
        rows, last = body[2], body[3]
        if type(rows) is not list or len(rows) > MAX_RECORDS or type(last) is not bool:
            raise SwimError("state chunk malformed or too long")
        return StateChunk(tuple(_record(r) for r in rows), last)
    if kind == _SYNC and n == 4:
        digests, reply = body[2], body[3]
        if not (
            type(digests) is list and len(digests) == BUCKETS
            and all(type(d) is int and 0 <= d < 2**64 for d in digests)
            and type(reply) is bool
        ):
            raise SwimError("sync digests malformed")
        return Sync(tuple(digests), reply)
    raise SwimError(f"unknown message type {kind!r} or wrong arity {n}")


def _seq(value: Any) -> int:
    if type(value) is not int or not 0 <= value < MAX_SEQ:
        raise SwimError("sequence number out of range")
    return value


def _key(value: Any) -> str:
    if type(value) is not str or not _Z85_KEY.fullmatch(value):
        raise SwimError("not a z85 public key")
    return value


def _incarnation(value: Any) -> int:
    if type(value) is not int or not 0 <= value < MAX_INCARNATION:
        raise SwimError("incarnation out of range")
    return value


def _sig(value: Any) -> bytes:
    if type(value) is not bytes or len(value) != SIG_LEN:
        raise SwimError("signature is not 64 bytes")
    return value


def _updates(value: Any) -> tuple[Assertion, ...]:
    if type(value) is not list or len(value) > MAX_UPDATES:
        raise SwimError("piggyback is not a list of at most 16 assertions")
    return tuple(_assertion(a) for a in value)


def _assertion(raw: Any) -> Assertion:
    if type(raw) is not list or not raw or type(raw[0]) is not int:
        raise SwimError("assertion is not a tagged list")
    tag = raw[0]
    if tag == _A and len(raw) == 8:
        _, key, inc, name, host, port, meta, sig = raw
        if type(name) is not str or len(name) > MAX_NAME or not name.isprintable():
            raise SwimError("member name malformed")
        if type(host) is not str or not _HOST.fullmatch(host) or not host.isprintable():
            raise SwimError("member host malformed")
        if type(port) is not int or not 0 < port < 65536:
            raise SwimError("member port out of range")
        if type(meta) is not bytes or len(meta) > MAX_META:
            raise SwimError("member meta malformed")
        return Alive(_key(key), _incarnation(inc), name, host, port, meta, _sig(sig))
    if tag in (_S, _D) and len(raw) == 5:
        _, key, inc, accuser, sig = raw
        cls = Suspect if tag == _S else Dead
        return cls(_key(key), _incarnation(inc), _key(accuser), _sig(sig))
    raise SwimError("unknown assertion or wrong arity")


def _record(raw: Any) -> Record:
    if type(raw) is not list or len(raw) != 2:
        raise SwimError("state record is not [alive, proof]")
    alive = _assertion(raw[0])
    proof = None if raw[1] is None else _assertion(raw[1])
    if type(alive) is not Alive or type(proof) is Alive:
        raise SwimError("state record kinds wrong")
    if proof is not None and (proof.key != alive.key or proof.incarnation != alive.incarnation):
        raise SwimError("state record proof is about another member or incarnation")
    return Record(alive, proof)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SwimConfig:
    probe_interval: float = 0.5
    probe_timeout: float = 0.2
    indirect_checks: int = 3
    suspicion_mult: int = 3  # Lifeguard's alpha; min timeout = mult * log10(N) * interval
    suspicion_max_mult: float = 6.0  # beta: max timeout = beta * min
    retransmit_mult: int = 4  # lambda: each assertion sent mult * ceil(log10(N + 1)) times
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    awareness_max: int = 8  # probe interval and timeout scale up to 8x on a sick node
    max_members: int = 16_384
    max_piggyback_bytes: int = 1024
    max_relays: int = 8  # ping_reqs served at once
    max_queue: int = 4096  # assertions waiting to be gossiped
    sync_interval: float = 30.0
    dead_retention: float = 300.0  # a dead or left record is forgotten after this
    join_rate: float = 20.0  # full state answers to joins per second (mass start)
    join_sample: int = 32  # records in the short answer past that rate
    join_retry: float = 1.0  # a join unanswered this long is sent again

    def suspicion_timeouts(self, n: int) -> tuple[float, float]:
        low = self.suspicion_mult * max(1.0, math.log10(max(1, n))) * self.probe_interval
        return low, self.suspicion_max_mult * low

    def retransmit_limit(self, n: int) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True, slots=True)
class Entry:
    """What this node believes about one member (immutable: replaced on every change, so
    many tables can share one, see ``MemberTable``)."""

    alive: Alive
    state: State
    proof: Proof
    since: float
    digest: int  # 64-bit hash of (key, incarnation, state) for anti-entropy

    @property
    def incarnation(self) -> int:
        return self.alive.incarnation


def make_entry(alive: Alive, state: State, proof: Proof, since: float) -> Entry:
    h = hashlib.blake2b(f"{alive.key}\0{alive.incarnation}\0{int(state)}".encode(), digest_size=8)
    return Entry(alive, state, proof, since, int.from_bytes(h.digest(), "big"))


def bucket_of(key: str) -> int:
    return zlib.crc32(key.encode()) % BUCKETS


_MISSING = object()


class MemberTable:
    """key -> Entry. Reads fall through to an optional read-only ``base`` (with its key list
    and bucket digests) shared by many tables: the simulation starts 10,000 nodes from one
    table without 10,000 copies of it. A running node starts empty (no base)."""

    __slots__ = ("_base", "_base_keys", "_base_buckets", "_local", "_new_keys", "_new_buckets",
                 "digests", "count", "live")

    def __init__(self, base: SharedTable | None = None) -> None:
        self._base: dict[str, Entry] = base.entries if base else {}
        self._base_keys: list[str] = base.keys if base else []
        self._base_buckets: list[list[str]] = base.buckets if base else []
        self._local: dict[str, Entry | None] = {}
        self._new_keys: list[str] = []
        # Keys by digest bucket, so that answering a sync costs the buckets that differ,
        # not a walk of the whole table.
        self._new_buckets: dict[int, list[str]] = {}
        self.digests: list[int] = list(base.digests) if base else [0] * BUCKETS
        self.count = len(self._base)  # records held (any state)
        self.live = base.live if base else 0  # alive or suspect

    def get(self, key: str) -> Entry | None:
        entry = self._local.get(key, _MISSING)
        if entry is _MISSING:
            return self._base.get(key)
        return entry  # type: ignore[return-value]

    def put(self, entry: Entry) -> None:
        key = entry.alive.key
        old = self.get(key)
        if old is None:
            self.count += 1
            if key not in self._local and key not in self._base:
                self._new_keys.append(key)
                self._new_buckets.setdefault(bucket_of(key), []).append(key)
        else:
            self._unaccount(old)
        self._local[key] = entry
        if entry.state in LIVE_STATES:
            self.live += 1
            self.digests[bucket_of(key)] ^= entry.digest

    def remove(self, key: str) -> None:
        old = self.get(key)
        if old is not None:
            self._unaccount(old)
            self.count -= 1
            self._local[key] = None

    def _unaccount(self, old: Entry) -> None:
        if old.state in LIVE_STATES:
            self.live -= 1
            self.digests[bucket_of(old.alive.key)] ^= old.digest

    def slots(self) -> int:
        """Key slots (some may be empty); ``key_at`` indexes them."""
        return len(self._base_keys) + len(self._new_keys)

    def key_at(self, index: int) -> str:
        base = len(self._base_keys)
        return self._base_keys[index] if index < base else self._new_keys[index - base]

    def __iter__(self) -> Iterator[Entry]:
        for index in range(self.slots()):
            entry = self.get(self.key_at(index))
            if entry is not None:
                yield entry

    def in_buckets(self, buckets: set[int]) -> list[Entry]:
        found = []
        for b in sorted(buckets):
            keys = (self._base_buckets[b] if self._base_buckets else []) + self._new_buckets.get(b, [])
            for key in keys:
                entry = self.get(key)
                if entry is not None:
                    found.append(entry)
        return found


@dataclass
class SharedTable:
    """A read-only starting table for many ``MemberTable``s (simulation set-up)."""

    entries: dict[str, Entry]
    keys: list[str]
    digests: list[int]
    live: int
    buckets: list[list[str]]

    @classmethod
    def of(cls, entries: list[Entry]) -> SharedTable:
        digests = [0] * BUCKETS
        buckets: list[list[str]] = [[] for _ in range(BUCKETS)]
        live = 0
        for e in entries:
            buckets[bucket_of(e.alive.key)].append(e.alive.key)
            if e.state in LIVE_STATES:
                digests[bucket_of(e.alive.key)] ^= e.digest
                live += 1
        return cls({e.alive.key: e for e in entries}, [e.alive.key for e in entries], digests, live, buckets)


# --------------------------------------------------------------------------- pieces of state


@dataclass(slots=True)
class _Suspicion:
    """Lifeguard's suspicion timer: from ``high`` down to ``low`` with ``k`` confirmations."""

    start: float
    k: int
    low: float
    high: float
    deadline: float
    confirmations: set[str]  # accusers counted (the first accuser is not a confirmation)
    n: int = 0

    def confirm(self, accuser: str) -> bool:
        if self.n >= self.k or accuser in self.confirmations:
            return False
        self.confirmations.add(accuser)
        self.n += 1
        fraction = math.log(self.n + 1) / math.log(self.k + 1)
        timeout = max(self.low, self.high - fraction * (self.high - self.low))
        self.deadline = min(self.deadline, self.start + timeout)
        return True


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    started: float
    timeout_at: float  # direct ack expected by then
    end_at: float  # end of the probe interval: no ack by then -> suspect
    acked: bool = False
    relays: tuple[str, ...] = ()
    nacks: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Relay:
    origin: str
    origin_seq: int
    target: str
    deadline: float


@dataclass(slots=True)
class _Queued:
    assertion: Assertion
    size: int
    transmits: int = 0


def _transmits(queued: _Queued) -> int:
    return queued.transmits


class _Broadcasts:
    """Assertions waiting to be gossiped: one per member (a newer one replaces an older),
    fewest-transmitted first, each dropped after ``limit`` transmissions (memberlist's
    TransmitLimitedQueue)."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self.items: dict[str, _Queued] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.items)

    def push(self, assertion: Assertion) -> None:
        key = assertion.key
        self.items.pop(key, None)
        if len(self.items) >= self.max_items:  # the most-transmitted goes first
            victim = max(self.items.values(), key=_transmits)
            del self.items[victim.assertion.key]
            self.dropped += 1
        self.items[key] = _Queued(assertion, assertion_size(assertion))

    def take(self, max_bytes: int, limit: int, first: Assertion | None = None) -> tuple[Assertion, ...]:
        chosen: list[Assertion] = []
        used = 0
        if first is not None:
            chosen.append(first)
            used = assertion_size(first)
        if self.items:
            # Fewest transmissions first; a few times the count that fits is enough to look at.
            for queued in heapq.nsmallest(4 * MAX_UPDATES, self.items.values(), key=_transmits):
                if len(chosen) >= MAX_UPDATES:
                    break
                if used + queued.size > max_bytes or queued.assertion is first:
                    continue
                chosen.append(queued.assertion)
                used += queued.size
                queued.transmits += 1
                if queued.transmits >= limit:
                    del self.items[queued.assertion.key]
        return tuple(chosen)


class EventKind(enum.Enum):
    ALIVE = "alive"  # new, or back (refuted, restarted)
    UPDATED = "updated"  # a new incarnation of a member that was alive: address/meta may differ
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class MemberEvent:
    kind: EventKind
    entry: Entry


Signer = Callable[[bytes], bytes]
Verifier = Callable[[str, bytes, bytes], bool]  # (key, signed bytes, signature) -> valid


# --------------------------------------------------------------------------- the machine


class Swim:
    """One node's membership. Drive it with ``tick(now)`` (at least every ~50 ms) and
    ``receive(sender, message, now)`` where ``sender`` is the key the transport
    authenticated; both return ``[(recipient key, message), ...]`` to send. Membership
    changes are collected in ``events`` for the caller to drain."""

    def __init__(
        self,
        key: str,
        name: str,
        host: str,
        port: int,
        *,
        incarnation: int,
        sign: Signer,
        verify: Verifier,
        now: float,
        config: SwimConfig | None = None,
        rng: random.Random | None = None,
        meta: bytes = b"",
        base: SharedTable | None = None,
    ) -> None:
        self.key = key
        self.config = config or SwimConfig()
        self._sign = sign
        self._verify = verify
        self.rng = rng or random.Random()
        self.table = MemberTable(base)
        self.events: list[MemberEvent] = []
        self.queue = _Broadcasts(self.config.max_queue)
        self.awareness = 0
        self.stats: dict[str, int] = {
            "bad_signature": 0, "stale": 0, "unknown_member": 0, "table_full": 0,
            "misrouted": 0, "unexpected_ack": 0, "relays_refused": 0, "refutations": 0,
            "suspected": 0, "declared_dead": 0, "joins_short": 0,
        }
        self._seq = self.rng.randrange(MAX_SEQ)
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, _Suspicion] = {}
        self._order_n = 0  # slots in this probe pass
        self._order_i = 0
        self._order_stride = 1
        self._order_offset = 0
        self._fresh: list[str] = []  # members added since the pass began
        self._next_probe = now + self.rng.random() * self.config.probe_interval
        self._next_gossip = now + self.rng.random() * self.config.gossip_interval
        self._next_sync = now + self.rng.random() * self.config.sync_interval
        self._next_reap = now + self.config.dead_retention / 10
        self._join_tokens = self.config.join_rate
        self._join_at = now
        self.left = False
        self._joining: str | None = None
        self._join_retry_at = 0.0
        self._merging = False
        self._boot_gap = 0.0  # after a join: the next early sync's gap (doubling), 0 when done
        self.me = self._signed_alive(incarnation, name, host, port, meta)
        self.table.put(make_entry(self.me, State.ALIVE, None, now))

    # ------------------------------------------------------------------ own record

    def _signed_alive(self, incarnation: int, name: str, host: str, port: int, meta: bytes) -> Alive:
        sig = self._sign(alive_bytes(self.key, incarnation, name, host, port, meta))
        return Alive(self.key, incarnation, name, host, port, meta, sig)

    def _reincarnate(self, above: int, now: float, meta: bytes | None = None) -> None:
        me = self.me
        self.me = self._signed_alive(max(me.incarnation, above) + 1, me.name, me.host, me.port,
                                     me.meta if meta is None else meta)
        self.table.put(make_entry(self.me, State.ALIVE, None, now))
        self.queue.push(self.me)

    def update_meta(self, meta: bytes, now: float) -> None:
        """What we serve changed (queues, interest sequence): a new incarnation says so."""
        if len(meta) > MAX_META:
            raise ValueError(f"meta of {len(meta)} bytes exceeds {MAX_META}")
        self._reincarnate(self.me.incarnation, now, meta)

    def leave(self, now: float) -> list[Send]:
        """A clean goodbye: ``left`` everywhere at once rather than ``dead`` after a timeout."""
        inc = self.me.incarnation
        bye = Dead(self.key, inc, self.key, self._sign(accusation_bytes(b"D", self.key, inc, self.key)))
        self.left = True
        self.queue.push(bye)
        return [(k, Gossip((bye,))) for k in self._random_members(self.config.gossip_nodes)]

    def join(self, seed: str, now: float) -> list[Send]:
        """Ask ``seed`` (whose key the caller knows: ``KEY@HOST:PORT`` or a hint) for the
        table; asked again every ``join_retry`` until its answer arrives (a lost join or a
        seed not up yet must not leave us alone)."""
        self._joining = seed
        self._join_retry_at = now + self.config.join_retry
        return [(seed, Join(self.me))]

    # ------------------------------------------------------------------ queries

    def n(self) -> int:
        """Members alive or suspect, ourselves included: the N of every log N."""
        return max(1, self.table.live)

    def get(self, key: str) -> Entry | None:
        return self.table.get(key)

    def members(self) -> Iterator[Entry]:
        return iter(self.table)

    def drain_events(self) -> list[MemberEvent]:
        events, self.events = self.events, []
        return events

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> list[Send]:
        out: list[Send] = []
        probe = self._probe
        if probe is not None and not probe.acked:
            if not probe.relays and now >= probe.timeout_at:
                self._ask_relays(probe, out)
            if now >= probe.end_at:
                self._probe_failed(probe, now)
        if self._joining is not None and now >= self._join_retry_at:
            out.extend(self.join(self._joining, now))
        if now >= self._next_probe and not self.left:
            self._start_probe(now, out)
        if self._relays:
            for seq, relay in list(self._relays.items()):
                if now >= relay.deadline:
                    del self._relays[seq]
                    out.append((relay.origin, Nack(relay.origin_seq)))
        if self._suspicions:
            for key, suspicion in list(self._suspicions.items()):
                if now >= suspicion.deadline:
                    self._declare_dead(key, now)
        if now >= self._next_gossip:
            # Rounds only while something is queued: the first change after a quiet spell
            # goes out at once, and an idle node does not wake for empty rounds.
            if self.queue:
                self._next_gossip = now + self.config.gossip_interval
                limit = self.config.retransmit_limit(self.n())
                for target in self._random_members(self.config.gossip_nodes):
                    updates = self.queue.take(self.config.max_piggyback_bytes, limit)
                    if not updates:
                        break
                    out.append((target, Gossip(updates)))
        if now >= self._next_sync:
            self._next_sync = now + self.config.sync_interval
            if self._boot_gap:
                self._boot_gap *= 2
                if self._boot_gap < self.config.sync_interval / 2:
                    self._next_sync = now + self._boot_gap
                else:
                    self._boot_gap = 0.0
            for target in self._random_members(1):
                out.append((target, Sync(tuple(self.table.digests), True)))
        if now >= self._next_reap:
            self._next_reap = now + self.config.dead_retention / 10
            self._reap(now)
        return out

    def next_deadline(self) -> float:
        """When ``tick`` next has something to do. Ticking earlier is harmless; the caller
        may sleep until then instead of polling (an idle node then wakes ~7 times a second:
        probes, their timeouts, the gossip rounds while something is queued)."""
        due = min(self._next_sync, self._next_reap)
        if not self.left:
            due = min(due, self._next_probe)
        probe = self._probe
        if probe is not None and not probe.acked:
            due = min(due, probe.end_at if probe.relays else probe.timeout_at)
        if self._joining is not None:
            due = min(due, self._join_retry_at)
        if self.queue:
            due = min(due, self._next_gossip)
        for relay in self._relays.values():
            due = min(due, relay.deadline)
        for suspicion in self._suspicions.values():
            due = min(due, suspicion.deadline)
        return due

    def _scaled(self, seconds: float) -> float:
        return seconds * (self.awareness + 1)  # Lifeguard: a sick node slows itself down

    def _health(self, delta: int) -> None:
        self.awareness = min(self.config.awareness_max - 1, max(0, self.awareness + delta))

    def _start_probe(self, now: float, out: list[Send]) -> None:
        interval = self._scaled(self.config.probe_interval)
        self._next_probe = now + interval
        target = self._next_target()
        if target is None:
            return
        self._seq = (self._seq + 1) % MAX_SEQ
        self._probe = _Probe(self._seq, target, now, now + self._scaled(self.config.probe_timeout), now + interval)
        entry = self.table.get(target)
        # Lifeguard's buddy system: a member we suspect hears it from us first, and refutes.
        first = entry.proof if entry is not None and entry.state is State.SUSPECT else None
        out.append((target, Ping(self._seq, target, self._piggyback(first))))

    def _next_target(self) -> str | None:
        """The next member in this pass: a random affine permutation of the table's slots
        (O(1) memory, a new one each pass), members added meanwhile mixed in at random."""
        for _ in range(64):
            if self._fresh and self.rng.random() < 0.5:
                key = self._fresh.pop()
            else:
                if self._order_i >= self._order_n:
                    self._new_pass()
                    if self._order_n == 0:
                        return None
                index = (self._order_offset + self._order_i * self._order_stride) % self._order_n
                self._order_i += 1
                key = self.table.key_at(index)
            entry = self.table.get(key)
            if key != self.key and entry is not None and entry.state in LIVE_STATES:
                return key
        return None

    def _new_pass(self) -> None:
        n = self.table.slots()
        self._order_n, self._order_i = n, 0
        self._fresh.clear()
        if n == 0:
            return
        stride = self.rng.randrange(1, n) if n > 1 else 1
        while math.gcd(stride, n) != 1:
            stride = stride + 1 if stride + 1 < n else 1
        self._order_stride, self._order_offset = stride, self.rng.randrange(n)

    def _ask_relays(self, probe: _Probe, out: list[Send]) -> None:
        relays = tuple(self._random_members(self.config.indirect_checks, exclude=probe.target))
        probe.relays = relays or ("",)  # mark asked even with nobody to ask
        for relay in relays:
            out.append((relay, PingReq(probe.seq, probe.target, self._piggyback())))

    def _probe_failed(self, probe: _Probe, now: float) -> None:
        self._probe = None
        asked = tuple(r for r in probe.relays if r)
        # Lifeguard: relays that did not even nack point at us, not at the target.
        self._health((len(asked) - len(probe.nacks)) if asked else 1)
        entry = self.table.get(probe.target)
        if entry is not None and entry.state in LIVE_STATES:
            self._accuse(entry, now)  # of a suspect: our failure confirms the suspicion

    def _accuse(self, entry: Entry, now: float) -> None:
        inc = entry.incarnation
        key = entry.alive.key
        accusation = Suspect(key, inc, self.key, self._sign(accusation_bytes(b"S", key, inc, self.key)))
        self._on_suspect(accusation, now, verified=True)

    def _declare_dead(self, key: str, now: float) -> None:
        self._suspicions.pop(key, None)
        entry = self.table.get(key)
        if entry is None or entry.state is not State.SUSPECT:
            return
        inc = entry.incarnation
        verdict = Dead(key, inc, self.key, self._sign(accusation_bytes(b"D", key, inc, self.key)))
        dead = make_entry(entry.alive, State.DEAD, verdict, now)
        self.table.put(dead)
        self.stats["declared_dead"] += 1
        self.events.append(MemberEvent(EventKind.DEAD, dead))
        self.queue.push(verdict)

    def _reap(self, now: float) -> None:
        old = [e.alive.key for e in self.table
               if e.state not in LIVE_STATES and now - e.since > self.config.dead_retention]
        for key in old:
            self.table.remove(key)

    def _piggyback(self, first: Assertion | None = None) -> tuple[Assertion, ...]:
        return self.queue.take(self.config.max_piggyback_bytes, self.config.retransmit_limit(self.n()), first)

    def _random_members(self, k: int, exclude: str = "") -> list[str]:
        """Up to ``k`` distinct random live members other than us (and ``exclude``)."""
        table = self.table
        slots = table.slots()
        if k <= 0 or slots == 0:
            return []
        chosen: list[str] = []
        if table.live <= 4 * k + 2:  # small: look at them all
            candidates = [e.alive.key for e in table if e.state in LIVE_STATES
                          and e.alive.key != self.key and e.alive.key != exclude]
            return self.rng.sample(candidates, min(k, len(candidates)))
        for _ in range(8 * k):
            key = table.key_at(self.rng.randrange(slots))
            if key == self.key or key == exclude or key in chosen:
                continue
            entry = table.get(key)
            if entry is not None and entry.state in LIVE_STATES:
                chosen.append(key)
                if len(chosen) == k:
                    break
        return chosen

    # ------------------------------------------------------------------ messages in

    def receive(self, sender: str, message: Message, now: float) -> list[Send]:
        """``sender`` is the key the transport authenticated (CURVE + ZAP), never a field."""
        out: list[Send] = []
        t = type(message)
        if t is Ping:
            self._absorb(message.updates, sender, now)  # type: ignore[union-attr]
            if message.target != self.key:  # type: ignore[union-attr]
                self.stats["misrouted"] += 1
                return out
            # A member we hold dead that still probes us has not heard: tell it, so it refutes.
            entry = self.table.get(sender)
            first = entry.proof if entry is not None and entry.state is State.DEAD else None
            out.append((sender, Ack(message.seq, self._piggyback(first))))  # type: ignore[union-attr]
        elif t is Ack:
            self._absorb(message.updates, sender, now)  # type: ignore[union-attr]
            self._on_ack(sender, message.seq, now, out)  # type: ignore[union-attr]
        elif t is PingReq:
            self._absorb(message.updates, sender, now)  # type: ignore[union-attr]
            self._on_ping_req(sender, message, now, out)  # type: ignore[arg-type]
        elif t is Nack:
            probe = self._probe
            if probe is not None and message.seq == probe.seq and sender in probe.relays:  # type: ignore[union-attr]
                probe.nacks.add(sender)
        elif t is Gossip:
            self._absorb(message.updates, sender, now)  # type: ignore[union-attr]
        elif t is Join:
            self._on_join(sender, message.alive, now, out)  # type: ignore[union-attr]
        elif t is StateChunk:
            for record in message.records:  # type: ignore[union-attr]
                self._merge_record(record, sender, now)
            if sender == self._joining and message.last:  # type: ignore[union-attr]
                self._joining = None
                # The seed may have been too busy to send its whole table (a mass start),
                # and members that joined just before us were gossiped before we existed:
                # digest syncs a few probe intervals after joining bring what we lack then,
                # not at the next sync round. In a calm mesh they find nothing (2 KB each).
                # Then again at 2, 4, 8 and 16 times that (a mass start settles meanwhile).
                self._boot_gap = self.config.probe_interval * (2 + 2 * self.rng.random())
                self._next_sync = min(self._next_sync, now + self._boot_gap)
        elif t is Sync:
            self._on_sync(sender, message, out)  # type: ignore[arg-type]
        return out

    def _on_ack(self, sender: str, seq: int, now: float, out: list[Send]) -> None:
        probe = self._probe
        if probe is not None and seq == probe.seq and (sender == probe.target or sender in probe.relays):
            if not probe.acked:
                probe.acked = True
                self._probe = None
                self._health(-1)
            return
        relay = self._relays.get(seq)
        if relay is not None and sender == relay.target:
            del self._relays[seq]
            out.append((relay.origin, Ack(relay.origin_seq, self._piggyback())))
            return
        self.stats["unexpected_ack"] += 1

    def _on_ping_req(self, sender: str, message: PingReq, now: float, out: list[Send]) -> None:
        entry = self.table.get(message.target)
        if (
            len(self._relays) >= self.config.max_relays
            or entry is None or entry.state not in LIVE_STATES or message.target == self.key
        ):
            self.stats["relays_refused"] += 1
            return
        self._seq = (self._seq + 1) % MAX_SEQ
        self._relays[self._seq] = _Relay(sender, message.seq, message.target,
                                         now + self._scaled(self.config.probe_timeout))
        out.append((message.target, Ping(self._seq, message.target, self._piggyback())))

    def _on_join(self, sender: str, alive: Alive, now: float, out: list[Send]) -> None:
        if alive.key != sender:  # a join speaks for its sender only
            self.stats["misrouted"] += 1
            return
        self._on_alive(alive, sender, now)
        # A token bucket of full answers: a mass start must not cost the seed O(N^2).
        rate = self.config.join_rate
        self._join_tokens = min(rate, self._join_tokens + (now - self._join_at) * rate)
        self._join_at = now
        entries = list(self.table)
        if self._join_tokens >= 1:
            self._join_tokens -= 1
        else:
            self.stats["joins_short"] += 1
            others = [e for e in entries if e.alive.key != self.key and e.state in LIVE_STATES]
            sample = self.rng.sample(others, min(self.config.join_sample, len(others)))
            entries = [self.table.get(self.key)] + sample  # type: ignore[list-item]
        self._send_records(sender, entries, out)

    def _send_records(self, to: str, entries: list[Entry], out: list[Send]) -> None:
        records = [Record(e.alive, e.proof) for e in entries]
        chunks = [records[i:i + MAX_RECORDS] for i in range(0, len(records), MAX_RECORDS)] or [[]]
        for index, chunk in enumerate(chunks):
            out.append((to, StateChunk(tuple(chunk), index == len(chunks) - 1)))

    def _on_sync(self, sender: str, message: Sync, out: list[Send]) -> None:
        ours = self.table.digests
        differ = {b for b in range(BUCKETS) if ours[b] != message.digests[b]}
        if not differ:
            return
        self._send_records(sender, self.table.in_buckets(differ), out)
        if message.reply:
            out.append((sender, Sync(tuple(ours), False)))

    def _merge_record(self, record: Record, sender: str, now: float) -> None:
        proof = record.proof
        if type(proof) is Dead and self.table.get(record.alive.key) is None:
            return  # a dead member we never knew: nothing to learn (and no resurrection)
        # What a table brings is old news to the mesh (the sender has it): not re-gossiped,
        # or a joiner would queue the whole membership. Our own refutations still go out.
        self._merging = True
        try:
            self._on_alive(record.alive, sender, now)
            if type(proof) is Suspect:
                self._on_suspect(proof, now)
            elif type(proof) is Dead:
                self._on_dead(proof, now)
        finally:
            self._merging = False

    def _gossip(self, assertion: Assertion) -> None:
        if not self._merging:
            self.queue.push(assertion)

    def _absorb(self, updates: tuple[Assertion, ...], sender: str, now: float) -> None:
        for a in updates:
            t = type(a)
            if t is Alive:
                self._on_alive(a, sender, now)  # type: ignore[arg-type]
            elif t is Suspect:
                self._on_suspect(a, now)  # type: ignore[arg-type]
            else:
                self._on_dead(a, now)  # type: ignore[arg-type]

    def _authentic(self, signer: str, a: Assertion) -> bool:
        # Checked only once the assertion would change something: duplicates cost nothing.
        if self._verify(signer, a.signed_bytes(), a.sig):
            return True
        self.stats["bad_signature"] += 1
        return False

    def _on_alive(self, a: Alive, sender: str, now: float) -> None:
        if a.key == self.key:
            if a.incarnation > self.me.incarnation and self._authentic(a.key, a):
                self._reincarnate(a.incarnation, now)  # a record of an earlier life of ours
            return
        entry = self.table.get(a.key)
        if entry is not None and a.incarnation <= entry.incarnation:
            return  # nothing new (most gossip is this)
        if entry is None and self.table.count >= self.config.max_members:
            self.stats["table_full"] += 1
            return
        if not self._authentic(a.key, a):  # only the member itself speaks for it
            return
        self._suspicions.pop(a.key, None)
        fresh = make_entry(a, State.ALIVE, None, now)
        self.table.put(fresh)
        if entry is None:
            self._fresh.append(a.key)
        kind = EventKind.UPDATED if entry is not None and entry.state is State.ALIVE else EventKind.ALIVE
        self.events.append(MemberEvent(kind, fresh))
        self._gossip(a)

    def _on_suspect(self, s: Suspect, now: float, verified: bool = False) -> None:
        if s.key == self.key:
            self._refute(s, now)
            return
        entry = self.table.get(s.key)
        if entry is None:
            self.stats["unknown_member"] += 1
            return
        if s.incarnation != entry.incarnation:
            # Lower: stale. Higher: an incarnation the member never announced to us; only
            # the member raises its incarnation, so we wait for its own alive.
            self.stats["stale"] += 1
            return
        if entry.state not in LIVE_STATES:
            return
        suspicion = self._suspicions.get(s.key)
        if suspicion is not None:
            if s.accuser in suspicion.confirmations or suspicion.n >= suspicion.k:
                return
            if verified or self._authentic(s.accuser, s):
                if suspicion.confirm(s.accuser):
                    self._gossip(s)  # new confirmation: others count it too
            return
        if not (verified or self._authentic(s.accuser, s)):
            return
        self._suspect(entry, s, now)
        self._gossip(s)

    def _suspect(self, entry: Entry, proof: Suspect | Dead, now: float) -> _Suspicion:
        n = self.n()
        k = self.config.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        low, high = self.config.suspicion_timeouts(n)
        suspicion = _Suspicion(now, k, low, high if k > 0 else low, now + (high if k > 0 else low),
                               {proof.accuser})
        self._suspicions[entry.alive.key] = suspicion
        suspected = make_entry(entry.alive, State.SUSPECT, proof, now)
        self.table.put(suspected)
        self.stats["suspected"] += 1
        self.events.append(MemberEvent(EventKind.SUSPECT, suspected))
        return suspicion

    def _on_dead(self, d: Dead, now: float) -> None:
        if d.key == self.key:
            if d.accuser != self.key:
                self._refute(d, now)
            return
        entry = self.table.get(d.key)
        if entry is None:
            self.stats["unknown_member"] += 1
            return
        if d.incarnation != entry.incarnation:
            self.stats["stale"] += 1
            return
        if entry.state not in LIVE_STATES:
            return
        if d.accuser == d.key:  # the member's own goodbye
            if self._authentic(d.key, d):
                self._suspicions.pop(d.key, None)
                gone = make_entry(entry.alive, State.LEFT, d, now)
                self.table.put(gone)
                self.events.append(MemberEvent(EventKind.LEFT, gone))
                self._gossip(d)
            return
        # Someone's timer ran out. Not a verdict for us: a suspicion that ends at most
        # ``min`` from now, which a live member refutes well within. News only if it brings
        # our own deadline closer (copies of the same verdict do not).
        suspicion = self._suspicions.get(d.key)
        if suspicion is not None and suspicion.deadline <= now + suspicion.low:
            return
        if not self._authentic(d.accuser, d):
            return
        if suspicion is None:
            suspicion = self._suspect(entry, d, now)
        else:
            suspicion.confirm(d.accuser)
        suspicion.deadline = min(suspicion.deadline, now + suspicion.low)
        self._gossip(d)

    def _refute(self, accusation: Suspect | Dead, now: float) -> None:
        if accusation.incarnation < self.me.incarnation or self.left:
            return  # about an earlier incarnation: already refuted
        if not self._authentic(accusation.accuser, accusation):
            return  # a forged accusation costs us nothing, not even an incarnation
        self.stats["refutations"] += 1
        self._health(1)  # Lifeguard: being suspected hints that we are the slow one
        self._reincarnate(accusation.incarnation, now)
