"""Plumtree (zmesh.mesh.plumtree): the codec against hostile bytes; the tree prunes itself to
about one copy per node, repairs itself by GRAFT when links die, and ids cannot be hijacked."""

from __future__ import annotations

import heapq
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.mesh import plumtree
from zmesh.mesh.plumtree import Graft, IHave, Plumtree, Prune, Push

MAX = 4096
id_st = st.binary(min_size=16, max_size=16)
message_st = st.one_of(
    st.builds(Push, st.integers(0, plumtree.MAX_ROUND), st.binary(max_size=MAX)),
    st.builds(IHave, st.lists(st.tuples(id_st, st.integers(0, plumtree.MAX_ROUND)), min_size=1, max_size=256).map(tuple)),
    st.builds(Graft, st.lists(id_st, min_size=1, max_size=256).map(tuple)),
    st.just(Prune()),
)
msgpack_st = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.binary(max_size=20), st.text(max_size=5)),
    lambda children: st.lists(children, max_size=6),
    max_leaves=30,
)


@given(message_st)
@settings(max_examples=200)
def test_every_message_round_trips(message: plumtree.Message) -> None:
    assert plumtree.decode(plumtree.encode(message), MAX) == message


@given(st.one_of(st.binary(max_size=200), st.lists(msgpack_st, max_size=5).map(
    lambda tail: msgpack.packb([plumtree.VERSION, *tail], use_bin_type=True))))
@settings(max_examples=300)
def test_hostile_bytes_raise_only_plumtree_error(data: bytes) -> None:
    try:
        decoded = plumtree.decode(data, MAX)
    except plumtree.PlumtreeError:
        return
    assert plumtree.decode(plumtree.encode(decoded), MAX) == decoded


def test_bounds() -> None:
    with pytest.raises(plumtree.PlumtreeError):
        plumtree.decode(plumtree.encode(Push(1, b"x" * (MAX + 1))), MAX)
    with pytest.raises(plumtree.PlumtreeError):
        plumtree.decode(msgpack.packb([1, 2, [[b"x" * 16, 1]] * 257]), MAX)
    with pytest.raises(plumtree.PlumtreeError):
        plumtree.decode(msgpack.packb([1, 3, [b"short"]]), MAX)
    with pytest.raises(plumtree.PlumtreeError):
        plumtree.decode(msgpack.packb([1, 1, plumtree.MAX_ROUND + 1, b""]), MAX)


class Overlay:
    """Plumtree nodes on a random regular-ish overlay, lossy and delayed, encoded on the wire."""

    def __init__(self, n: int, degree: int = 5, loss: float = 0.0, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.loss, self.now = loss, 0.0
        self.keys = [f"n{i}" for i in range(n)]
        self.nodes = {k: Plumtree(k, now=0.0, rng=random.Random(i)) for i, k in enumerate(self.keys)}
        for k in self.keys:
            while len(self.nodes[k].neighbours()) < degree:
                other = self.rng.choice(self.keys)
                if other != k and self.nodes[other].add_neighbour(k):
                    self.nodes[k].add_neighbour(other)
        self.down: set[str] = set()
        self.flight: list[tuple[float, int, str, str, bytes]] = []
        self.seq = self.pushes = 0
        self.delivered: dict[bytes, dict[str, int]] = {}

    def send(self, sender: str, out: list[plumtree.Send]) -> None:
        for to, message in out:
            if type(message) is Push:
                self.pushes += 1
            if self.loss and self.rng.random() < self.loss:
                continue
            self.seq += 1
            delay = 0.001 + self.rng.random() * 0.004
            heapq.heappush(self.flight, (self.now + delay, self.seq, to, sender, plumtree.encode(message)))

    def broadcast(self, origin: str, payload: bytes) -> bytes:
        mid, out = self.nodes[origin].broadcast(payload, self.now)
        self.delivered.setdefault(mid, {})[origin] = 0
        self.send(origin, out)
        return mid

    def run(self, seconds: float, step: float = 0.005) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            while self.flight and self.flight[0][0] <= self.now:
                _, _, to, sender, data = heapq.heappop(self.flight)
                if to in self.down:
                    continue
                node = self.nodes[to]
                self.send(to, node.receive(sender, plumtree.decode(data, 1 << 20), self.now))
                for d in node.drain():
                    seen = self.delivered.setdefault(d.id, {})
                    assert to not in seen, "delivered twice"
                    seen[to] = d.round
            for k, node in self.nodes.items():
                if k not in self.down:
                    self.send(k, node.tick(self.now))

    def live(self) -> list[str]:
        return [k for k in self.keys if k not in self.down]


def test_every_node_gets_every_broadcast_once_and_the_tree_prunes_itself() -> None:
    net = Overlay(200)
    first = net.broadcast("n0", b"warm-up")
    net.run(1.0)
    assert len(net.delivered[first]) == 200
    warm = net.pushes
    mids = [net.broadcast(net.rng.choice(net.keys), f"m{i}".encode()) for i in range(20)]
    net.run(2.0)
    assert all(len(net.delivered[m]) == 200 for m in mids)
    # After the first broadcast pruned the redundant eager links, a broadcast costs about one
    # push per node (a spanning tree: N - 1), not one per overlay link (N * degree / 2 = 500).
    per_broadcast = (net.pushes - warm) / 20
    assert per_broadcast < 1.5 * 200, per_broadcast
    assert warm > per_broadcast  # the first one, before pruning, used more links


def test_the_tree_repairs_itself_by_graft_when_nodes_die() -> None:
    net = Overlay(150, seed=3)
    net.broadcast("n0", b"build the tree")
    net.run(1.0)
    net.down |= set(net.rng.sample(net.keys[1:], 15))  # 10 % of the nodes crash, links and all
    # SWIM would tell the neighbours soon; until then the tree has holes that only IHAVE shows.
    mid = net.broadcast("n0", b"after the crash")
    net.run(3.0)
    got = net.delivered[mid]
    assert set(net.live()) <= set(got), f"{len(set(net.live()) - set(got))} live nodes missed it"
    assert sum(n.stats["grafts_sent"] for n in net.nodes.values()) > 0


def test_delivery_under_loss() -> None:
    net = Overlay(120, loss=0.05, seed=5)
    mids = [net.broadcast(net.rng.choice(net.keys), f"m{i}".encode()) for i in range(10)]
    net.run(4.0)
    for m in mids:
        assert len(net.delivered[m]) == 120


def test_an_id_cannot_be_hijacked_by_junk_and_a_replay_is_a_duplicate() -> None:
    a = Plumtree("a", now=0.0)
    real = b"the real retained write"
    real_id = plumtree.message_id(real)
    a.receive("liar", IHave(((real_id, 1),)), 0.0)
    # the liar then sends junk; its id is computed from the payload, so it is another message
    a.receive("liar", Push(1, b"junk"), 0.1)
    a.receive("b", Push(1, real), 0.2)
    ids = [d.id for d in a.drain()]
    assert ids == [plumtree.message_id(b"junk"), real_id]
    out = a.receive("liar", Push(1, real), 0.3)  # a replay
    assert a.drain() == [] and out == [("liar", Prune())]


def test_caches_are_bounded() -> None:
    cfg = plumtree.PlumtreeConfig(max_seen=100, max_cached_bytes=1000, max_missing=10, max_lazy_queue=5)
    a = Plumtree("a", now=0.0, config=cfg)
    a.add_neighbour("b")
    a.add_neighbour("c")
    a.receive("c", Prune(), 0.0)  # c is lazy: ids for it queue up
    for i in range(500):
        a.receive("b", Push(0, f"{i:04d}".encode() * 10), 0.0)
    assert len(a._seen) <= 100 and a._cached_bytes <= 1000 and len(a._lazy_queue["c"]) <= 5
    a.receive("b", IHave(tuple((bytes([i]) * 16, 1) for i in range(200))), 0.0)
    assert len(a._missing) == 10 and a.stats["missing_dropped"] == 190
    # every announced id nobody delivers is grafted once per announcer, then forgotten
    for t in (0.6, 0.9, 1.2):
        a.tick(t)
    assert not a._missing and a.stats["lost"] == 10


def test_neighbours_are_bounded() -> None:
    a = Plumtree("a", now=0.0, config=plumtree.PlumtreeConfig(max_neighbours=3))
    for i in range(10):
        a.receive(f"p{i}", Push(0, f"x{i}".encode()), 0.0)
    assert len(a.neighbours()) == 3 and a.stats["neighbours_refused"] == 7
    assert len(a.drain()) == 10  # messages from non-neighbours are still delivered
