"""Node identities: a chain verifies only up to a trusted authority, within its validity, its
signer's groups and lifetime, unrevoked, and for the CURVE key that connected."""

from __future__ import annotations

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.security import identity as ident
from zmesh.security.identity import IdentityError, RevocationSet

NOW = 1_800_000_000.0
HOUR, DAY = 3600.0, 86400.0


def curve_key() -> bytes:
    public, _secret = zmq.curve_keypair()
    return public


class World:
    def __init__(self) -> None:
        self.authority = ident.new_signing_key()
        self.authority_public = ident.public_bytes(self.authority)
        self.signer = ident.new_signing_key()
        self.signer_cert = ident.issue_signer(
            self.authority, ident.public_bytes(self.signer), ["scanner"], now=NOW, lifetime=90 * DAY,
            max_node_lifetime=DAY,
        )

    def node_chain(self, key: bytes, groups: list[str] | None = None, lifetime: float = HOUR,
                   now: float = NOW, name: str = "scanner-7f9c") -> bytes:
        node = ident.issue_node(self.signer, key, name, groups or ["scanner"], now=now, lifetime=lifetime)
        return ident.chain(node, self.signer_cert)


@pytest.fixture
def world() -> World:
    return World()


def test_a_chain_from_a_group_signer_verifies_to_its_identity(world: World) -> None:
    key = curve_key()
    found = ident.verify_chain(world.node_chain(key), [world.authority_public], now=NOW + 10, expected_key=key)
    assert (found.curve_key, found.name, found.groups) == (key, "scanner-7f9c", ("scanner",))
    assert found.not_after == int(NOW + HOUR)


def test_a_node_certificate_signed_by_the_authority_itself_verifies(world: World) -> None:
    key = curve_key()
    node = ident.issue_node(world.authority, key, "collector-0", ["collector"], now=NOW, lifetime=DAY)
    found = ident.verify_chain(ident.chain(node), [world.authority_public], now=NOW)
    assert found.groups == ("collector",)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown authority", "unknown_issuer"),
        ("expired", "expired"),
        ("not yet valid", "not_yet_valid"),
        ("other group", "group_not_allowed"),
        ("too long for the signer", "too_long"),
        ("another key connected", "wrong_key"),
        ("signer swapped", "unknown_issuer"),
        ("signature flipped", "bad_signature"),
    ],
)
def test_a_chain_that_must_not_be_believed_is_refused_with_its_reason(world: World, case: str, reason: str) -> None:
    key = curve_key()
    authorities = [world.authority_public]
    now, expected = NOW + 10, key
    presented = world.node_chain(key)
    if case == "unknown authority":
        authorities = [ident.public_bytes(ident.new_signing_key())]
    elif case == "expired":
        now = NOW + HOUR + ident.DEFAULT_SKEW + 1
    elif case == "not yet valid":
        now = NOW - ident.DEFAULT_SKEW - 1
    elif case == "other group":
        presented = world.node_chain(key, groups=["collector"])
    elif case == "too long for the signer":
        presented = world.node_chain(key, lifetime=2 * DAY)
    elif case == "another key connected":
        expected = curve_key()
    elif case == "signer swapped":
        other = World()  # a signer of another authority, presented with our node certificate
        node = msgpack.unpackb(presented)[0]
        presented = ident.chain(node, other.signer_cert)
        authorities = [world.authority_public, other.authority_public]
    elif case == "signature flipped":
        node_raw, signature = msgpack.unpackb(msgpack.unpackb(presented)[0])
        forged = msgpack.packb([node_raw, bytes([signature[0] ^ 1]) + signature[1:]])
        presented = ident.chain(forged, world.signer_cert)
    with pytest.raises(IdentityError) as caught:
        ident.verify_chain(presented, authorities, now=now, expected_key=expected)
    assert caught.value.reason == reason, str(caught.value)


def test_a_node_cannot_widen_its_groups_by_editing_its_certificate(world: World) -> None:
    key = curve_key()
    node_raw, signature = msgpack.unpackb(msgpack.unpackb(world.node_chain(key))[0])
    body = msgpack.unpackb(node_raw)
    body["g"] = ["scanner", "collector"]
    edited = msgpack.packb([msgpack.packb(body), signature])
    with pytest.raises(IdentityError) as caught:
        ident.verify_chain(ident.chain(edited, world.signer_cert), [world.authority_public], now=NOW)
    assert caught.value.reason in ("group_not_allowed", "bad_signature")


def test_revoking_the_signer_or_the_node_ends_the_identity(world: World) -> None:
    key = curve_key()
    presented = world.node_chain(key)
    found = ident.verify_chain(presented, [world.authority_public], now=NOW)
    for serial in found.serials:
        signed = ident.issue_revocations(world.authority, [serial], seq=1, now=NOW)
        revocations = ident.verify_revocations(signed, [world.authority_public], now=NOW)
        with pytest.raises(IdentityError) as caught:
            ident.verify_chain(presented, [world.authority_public], now=NOW, revocations=revocations)
        assert caught.value.reason == "revoked"


def test_an_older_revocation_list_never_replaces_a_newer_one(world: World) -> None:
    key = curve_key()
    serial = ident.verify_chain(world.node_chain(key), [world.authority_public], now=NOW).serials[0]
    held = RevocationSet()
    newer = ident.verify_revocations(ident.issue_revocations(world.authority, [serial], seq=5, now=NOW),
                                     [world.authority_public], now=NOW)
    older = ident.verify_revocations(ident.issue_revocations(world.authority, [], seq=4, now=NOW),
                                     [world.authority_public], now=NOW)
    assert held.offer(newer) and not held.offer(older)
    assert held.revoked(serial)


def test_a_revocation_list_from_an_unknown_authority_or_the_future_is_refused(world: World) -> None:
    signed = ident.issue_revocations(world.authority, [], seq=1, now=NOW + DAY)
    with pytest.raises(IdentityError) as caught:
        ident.verify_revocations(signed, [world.authority_public], now=NOW)
    assert caught.value.reason == "not_yet_valid"
    with pytest.raises(IdentityError) as caught:
        ident.verify_revocations(signed, [ident.public_bytes(ident.new_signing_key())], now=NOW + DAY)
    assert caught.value.reason == "unknown_issuer"


def test_oversized_chains_are_refused_unread() -> None:
    with pytest.raises(IdentityError) as caught:
        ident.verify_chain(b"\x92" + b"\x00" * (ident.MAX_CHAIN_BYTES + 1), [b"x" * 32], now=NOW)
    assert caught.value.reason == "too_long"


_AUTHORITY_WORLD = World()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_are_refused_with_identity_error(data: bytes) -> None:
    with pytest.raises(IdentityError):
        ident.verify_chain(data, [_AUTHORITY_WORLD.authority_public], now=NOW)
    with pytest.raises(IdentityError):
        ident.verify_revocations(data, [_AUTHORITY_WORLD.authority_public], now=NOW)


_VALID = _AUTHORITY_WORLD.node_chain(curve_key())


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=0, max_value=len(_VALID) - 1), st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_of_a_valid_chain_is_refused(position: int, flip: int) -> None:
    mutated = bytearray(_VALID)
    mutated[position] ^= flip
    with pytest.raises(IdentityError):
        ident.verify_chain(bytes(mutated), [_AUTHORITY_WORLD.authority_public], now=NOW)


def test_structurally_valid_but_wrongly_typed_fields_are_malformed(world: World) -> None:
    bad_bodies = [
        {"v": 1, "k": "node", "c": "not bytes", "n": "x", "g": [], "nb": 0, "na": 1, "s": b"s" * 16, "i": b"i" * 32},
        {"v": 1, "k": "node", "c": curve_key(), "n": "x", "g": ["a b"], "nb": 0, "na": 1, "s": b"s" * 16, "i": b"i" * 32},
        {"v": 1, "k": "node", "c": curve_key(), "n": "x", "g": [], "nb": -1, "na": 1, "s": b"s" * 16, "i": b"i" * 32},
        {"v": 1, "k": "node", "c": curve_key(), "n": "x", "g": [], "nb": True, "na": 1, "s": b"s" * 16, "i": b"i" * 32},
        {"v": 2, "k": "node"},
    ]
    for body in bad_bodies:
        signed = msgpack.packb([msgpack.packb(body), b"\x00" * 64])
        with pytest.raises(IdentityError) as caught:
            ident.verify_chain(ident.chain(signed), [world.authority_public], now=NOW)
        assert caught.value.reason == "malformed", body
