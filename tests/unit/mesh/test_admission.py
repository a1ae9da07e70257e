"""Admission by certificate: members enter the ring only with a verified chain for their own
key, leave it on expiry or revocation, and verification is rate-limited."""

from __future__ import annotations

import pytest
import zmq

from zmesh.mesh import admission as adm
from zmesh.mesh import wire
from zmesh.mesh.admission import Admission
from zmesh.security import identity
from zmesh.security.certs import KeyRing

NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def world() -> tuple[identity.Ed25519PrivateKey, bytes, Admission, Clock]:
    authority = identity.new_signing_key()
    clock = Clock()
    own = zmq.curve_keypair()[0]
    chain = identity.chain(identity.issue_node(authority, own, "self", [], now=NOW, lifetime=3600))
    return authority, own, Admission([identity.public_bytes(authority)], KeyRing(), chain, now=clock), clock


def member(authority: identity.Ed25519PrivateKey, lifetime: float = 600, name: str = "m") -> tuple[str, bytes]:
    key = zmq.curve_keypair()[0]
    return key.decode(), identity.chain(identity.issue_node(authority, key, name, ["g"], now=NOW, lifetime=lifetime))


def test_a_verified_chain_puts_its_key_in_the_ring_with_its_groups(world) -> None:  # type: ignore[no-untyped-def]
    authority, _own, admission, _clock = world
    key, chain = member(authority)
    verdict = admission.admit(key, chain)
    assert verdict.identity is not None and key.encode() in admission.ring
    assert admission.groups_of(key) == ("g",) and admission.ring.name_of(key.encode()) == "m"


def test_a_chain_for_another_key_is_refused_and_not_retried_at_once(world) -> None:  # type: ignore[no-untyped-def]
    authority, _own, admission, clock = world
    key, _ = member(authority)
    _other, chain = member(authority)
    assert admission.admit(key, chain).reason == "wrong_key"
    assert admission.admit(key, chain).reason == "refused_recently"
    clock.t += adm.REFUSED_FOR + 1
    assert admission.admit(key, chain).reason == "wrong_key"
    assert key.encode() not in admission.ring


def test_expiry_and_revocation_take_members_out_of_the_ring(world) -> None:  # type: ignore[no-untyped-def]
    authority, _own, admission, clock = world
    short, short_chain = member(authority, lifetime=10)
    long_key, long_chain = member(authority, lifetime=3600)
    assert admission.admit(short, short_chain).identity and admission.admit(long_key, long_chain).identity
    clock.t += 10 + identity.DEFAULT_SKEW
    assert admission.lapsed() == [(short, "certificate expired")]
    serial = admission.members[long_key].serials[0]
    assert admission.offer_revocations(identity.issue_revocations(authority, [serial], seq=2, now=clock.t))
    assert not admission.offer_revocations(identity.issue_revocations(authority, [], seq=1, now=clock.t))
    assert admission.lapsed() == [(long_key, "certificate revoked")]
    assert len(admission.ring) == 0 and not admission.members


def test_verification_is_rate_limited(world) -> None:  # type: ignore[no-untyped-def]
    authority, _own, admission, clock = world
    reasons = [admission.admit(*member(authority)).reason for _ in range(int(adm.VERIFY_BURST) + 5)]
    assert reasons.count("rate_limited") == 5
    clock.t += 1.0  # VERIFY_RATE tokens come back per second
    assert admission.admit(*member(authority)).identity is not None


def test_no_certificate_is_a_refusal_with_its_reason(world) -> None:  # type: ignore[no-untyped-def]
    _authority, _own, admission, _clock = world
    assert admission.admit(zmq.curve_keypair()[0].decode(), None).reason == "no_certificate"


def test_hello_carries_a_bounded_certificate() -> None:
    hello = wire.Hello("n", wire.WIRE_VERSION, 1, 1, 2, 3, cert=b"c" * 100)
    assert wire.decode_control(wire.encode_control(wire.HELLO, hello)).hello.cert == b"c" * 100  # type: ignore[union-attr]
    assert wire.decode_control(wire.encode_control(wire.HELLO, wire.Hello("n", wire.WIRE_VERSION, 1, 1, 2, 3))).hello.cert is None  # type: ignore[union-attr]
    with pytest.raises(wire.WireError):
        wire.decode_control(wire.encode_control(wire.HELLO, wire.Hello("n", wire.WIRE_VERSION, 1, 1, 2, 3,
                                                                       cert=b"c" * (wire.MAX_CERT_BYTES + 1))))


def test_a_renewed_chain_extends_membership_and_the_same_chain_costs_nothing(world) -> None:  # type: ignore[no-untyped-def]
    authority, _own, admission, clock = world
    key = zmq.curve_keypair()[0]
    first = identity.chain(identity.issue_node(authority, key, "m", [], now=NOW, lifetime=600))
    assert admission.admit(key.decode(), first).identity is not None
    assert admission.renewed(key.decode(), first) is None  # the chain we hold: no verification
    clock.t += 400
    second = identity.chain(identity.issue_node(authority, key, "m", [], now=clock.t, lifetime=600))
    verdict = admission.renewed(key.decode(), second)
    assert verdict is not None and verdict.identity is not None
    clock.t = NOW + 600 + identity.DEFAULT_SKEW + 1  # the first chain has lapsed, the second not
    assert admission.lapsed() == [] and key in admission.ring


def test_revocation_lists_are_verified_at_a_bounded_rate(world) -> None:  # type: ignore[no-untyped-def]
    authority, _own, admission, _clock = world
    signed = identity.issue_revocations(authority, [], seq=1, now=NOW)
    reasons = []
    for _ in range(int(adm.VERIFY_BURST) + 3):
        try:
            admission.offer_revocations(signed)
            reasons.append("ok")
        except identity.IdentityError as exc:
            reasons.append(exc.reason)
    assert reasons.count("rate_limited") == 3
