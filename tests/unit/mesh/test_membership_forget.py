"""Peers that left are forgotten after a while; seeds never are (they are dialled until
they answer)."""

from __future__ import annotations

from zmesh.mesh.membership import Membership, PeerState


def test_down_peers_are_gone_after_the_delay_but_seeds_stay() -> None:
    m = Membership(expiry=5.0)
    learned = m.ensure("k1", "10.0.0.1", 7100, now=0.0)
    seed = m.ensure("k2", "10.0.0.2", 7100, now=0.0, seed=True)
    up = m.ensure("k3", "10.0.0.3", 7100, now=0.0)
    for peer in (learned, seed):
        peer.state, peer.since = PeerState.DOWN, 10.0
    up.state = PeerState.UP
    assert m.gone(now=70.0, after=60.0) == []
    assert m.gone(now=70.5, after=60.0) == ["k1"]
