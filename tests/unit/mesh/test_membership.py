from zmesh.mesh.membership import EventKind, Membership, PeerState
from zmesh.mesh.wire import Hello


def hello(incarnation: int = 1, pub: int = 5000) -> Hello:
    return Hello("b", 1, incarnation, 7100, pub, 5001)


def test_first_hello_brings_a_peer_up_and_silence_takes_it_down() -> None:
    m = Membership(expiry=3.0, evasive=1.5)
    m.ensure("K", "10.0.0.2", 7100, now=0.0)
    assert m.peers["K"].state is PeerState.CONNECTING
    [event] = m.observe("K", hello(), now=1.0)
    assert event.kind is EventKind.UP and event.peer.name == "b"
    assert m.observe("K", hello(), now=2.0) == []  # a heartbeat changes nothing
    assert m.expire(now=3.4) == []
    [late] = m.expire(now=3.6)
    assert late.kind is EventKind.EVASIVE and [p.key for p in m.up()] == ["K"]  # still a member
    [down] = m.expire(now=5.1)
    assert down.kind is EventKind.DOWN and m.peers["K"].state is PeerState.DOWN
    assert m.expire(now=9.0) == []  # down is reported once
    [up] = m.observe("K", hello(), now=10.0)
    assert up.kind is EventKind.UP


def test_new_incarnation_or_ports_mean_restarted() -> None:
    m = Membership(expiry=3.0)
    m.ensure("K", "h", 7100, now=0.0)
    m.observe("K", hello(), now=0.0)
    [event] = m.observe("K", hello(incarnation=2, pub=6000), now=0.5)
    assert event.kind is EventKind.RESTARTED


def test_endpoint_uses_advertised_host_and_brackets_ipv6() -> None:
    m = Membership(expiry=3.0)
    peer = m.ensure("K", "::1", 7100, now=0.0)
    assert peer.endpoint(9) == "tcp://[::1]:9"
    m.observe("K", Hello("b", 1, 1, 7100, 1, 2, host="10.1.1.1"), now=0.0)
    assert peer.endpoint(9) == "tcp://10.1.1.1:9"


def test_evasive_peer_that_speaks_again_is_simply_up() -> None:
    m = Membership(expiry=3.0)  # evasive defaults to half the expiry
    m.ensure("K", "h", 7100, now=0.0)
    m.observe("K", hello(), now=0.0)
    [late] = m.expire(now=1.6)
    assert late.kind is EventKind.EVASIVE
    assert m.observe("K", hello(), now=1.7) == []
    assert m.peers["K"].state is PeerState.UP


def test_goodbye_takes_a_member_down_at_once_and_only_once() -> None:
    m = Membership(expiry=30.0)
    m.ensure("K", "h", 7100, now=0.0)
    assert m.force_down("K", now=0.1) == []  # not a member yet: nothing to report
    m.observe("K", hello(), now=0.2)
    [down] = m.force_down("K", now=0.3)
    assert down.kind is EventKind.DOWN and m.up() == []
    assert m.force_down("K", now=0.4) == []
    assert m.force_down("unknown", now=0.4) == []
