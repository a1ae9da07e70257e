"""XEdDSA over CURVE keys: the specification's vectors, Ed25519 compatibility, and a verifier
that refuses every malformed or weak input without raising."""

from __future__ import annotations

import hashlib
import random

import pytest
import zmq
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from zmq.utils import z85

from zmesh.mesh import swim
from zmesh.security import xeddsa
from zmesh.security.xeddsa import L, P

# libsignal-protocol-c, src/curve25519/ed25519/tests/tests.c, xeddsa_fast_test: the clamped
# key with byte 8 = 189, a message of 200 zero bytes, Z = 64 zero bytes.
LIBSIGNAL_SIGNATURE = bytes.fromhex(
    "11c7f3e6c4df9e8a5150e1db3b30f92de3a3b3aa438656545fa7390f4bcc7bb2"
    "6c431d9e90643e4f0eaa0e9c557766fa69ada576d63dcaf2ac326c11d0b97702"
)
# The Rust xeddsa crate (src/tests/xed25519.rs, test_calculate_key_pair): an X25519 secret
# and the Ed25519 public key (sign 0) of its public key.
CRATE_SECRET = bytes.fromhex("f8ced42b07e7810a04cc854b03576df1e4c0feb16d685e0ac0425e1c3c5eb247")
CRATE_EDWARDS = bytes.fromhex("d76d40332ed11388caa69b50676d630825cddad03246edd61ed3ca72e6cb2c2e")

# Curve25519's points of small order, as Montgomery u (RFC 7748 and the "taming EdDSAs" list).
SMALL_ORDER_U = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
]


def x25519_public(secret: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(secret).public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def z85_of(raw: bytes) -> str:
    return z85.encode(raw).decode()


def u_key(u: int) -> str:
    return z85_of(u.to_bytes(32, "little"))


@pytest.fixture(scope="module")
def keys() -> list[tuple[str, str]]:
    return [(p.decode(), s.decode()) for p, s in (zmq.curve_keypair() for _ in range(4))]


# ---------------------------------------------------------------------------- known vectors


def test_signing_reproduces_libsignals_xeddsa_vector() -> None:
    secret = bytearray(32)
    secret[8] = 189
    secret[0] &= 248
    secret[31] = (secret[31] & 127) | 64
    pair = xeddsa._KeyPair(bytes(secret))
    assert pair.public_montgomery == x25519_public(bytes(secret))
    assert pair.sign(bytes(200), bytes(64)) == LIBSIGNAL_SIGNATURE
    assert xeddsa.verify(z85_of(pair.public_montgomery), bytes(200), LIBSIGNAL_SIGNATURE)
    assert not xeddsa.verify(z85_of(pair.public_montgomery), bytes(199) + b"\x01", LIBSIGNAL_SIGNATURE)


def test_montgomery_to_edwards_matches_the_xeddsa_crates_vector() -> None:
    assert xeddsa.edwards_from_montgomery(x25519_public(CRATE_SECRET)) == CRATE_EDWARDS
    assert xeddsa.public_of(z85_of(CRATE_SECRET)) == x25519_public(CRATE_SECRET)


# ---------------------------------------------------------------------------- round trip


def test_a_curve_key_signs_and_its_public_key_verifies(keys: list[tuple[str, str]]) -> None:
    for public, secret in keys:
        sign = xeddsa.signer(secret, public)
        for message in (b"", b"zmesh-swim-1\x00A", bytes(range(256)) * 5):
            sig = sign(message)
            assert len(sig) == 64
            assert xeddsa.verify(public, message, sig)
            assert xeddsa.verify(public.encode(), message, sig)  # the key as bytes too
        other = next(p for p, _ in keys if p != public)
        assert not xeddsa.verify(other, b"m", sign(b"m"))


def test_signatures_are_ed25519_signatures_under_the_converted_key(keys: list[tuple[str, str]]) -> None:
    """The strong cross-check: OpenSSL's Ed25519 accepts them under y = (u-1)/(u+1), sign 0,
    and refuses them under the other sign; and the equation sB = R + hA holds in this
    module's own arithmetic (independent of OpenSSL)."""
    for public, secret in keys:
        raw = z85.decode(public.encode())
        edwards = xeddsa.edwards_from_montgomery(raw)
        assert edwards is not None and edwards[31] & 0x80 == 0
        message = b"alive " + public.encode()
        sig = xeddsa.signer(secret)(message)
        Ed25519PublicKey.from_public_bytes(edwards).verify(sig, message)
        flipped = edwards[:31] + bytes([edwards[31] | 0x80])
        with pytest.raises(InvalidSignature):
            Ed25519PublicKey.from_public_bytes(flipped).verify(sig, message)
        y = int.from_bytes(edwards, "little")
        a_point = xeddsa._point(xeddsa._recover_x(y, 0) or 0, y)
        r_y = int.from_bytes(sig[:32], "little")
        r_point = xeddsa._point(xeddsa._recover_x(r_y & ((1 << 255) - 1), r_y >> 255) or 0, r_y & ((1 << 255) - 1))
        h = int.from_bytes(hashlib.sha512(sig[:32] + edwards + message).digest(), "little") % L
        s = int.from_bytes(sig[32:], "little")
        assert xeddsa._encode(xeddsa._ladder(s, xeddsa._B)) == xeddsa._encode(xeddsa._add(r_point, xeddsa._ladder(h, a_point)))


def test_the_ladder_computes_scalar_multiples() -> None:
    # k*B by the ladder equals the X25519 public key of k (computed by OpenSSL).
    rng = random.Random(3)
    for _ in range(3):
        secret = rng.randbytes(32)
        assert xeddsa.public_of(z85_of(secret)) == x25519_public(secret)
    assert xeddsa._is_identity(xeddsa._ladder(L, xeddsa._B))


def test_nonces_are_fresh_each_signature(keys: list[tuple[str, str]]) -> None:
    public, secret = keys[0]
    sign = xeddsa.signer(secret)
    first, second = sign(b"same"), sign(b"same")
    assert first[:32] != second[:32]  # a new R: Z is random
    assert xeddsa.verify(public, b"same", first) and xeddsa.verify(public, b"same", second)


def test_signer_refuses_a_bad_secret_or_a_public_key_that_is_not_its_pair(keys: list[tuple[str, str]]) -> None:
    (public, secret), (other, _) = keys[0], keys[1]
    with pytest.raises(xeddsa.XEdDSAError, match="not the pair") as info:
        xeddsa.signer(secret, other)
    assert secret not in str(info.value)
    for bad in ("", "short", secret[:-1] + "~", 42):
        with pytest.raises(xeddsa.XEdDSAError):
            xeddsa.signer(bad)  # type: ignore[arg-type]
    assert xeddsa.signer(secret, public)(b"x")


# ---------------------------------------------------------------------------- tampering


def test_any_flipped_bit_of_signature_or_message_is_invalid(keys: list[tuple[str, str]]) -> None:
    public, secret = keys[0]
    message = b"suspect key 7 by accuser"
    sig = xeddsa.signer(secret)(message)
    for i in range(64):
        for bit in (0x01, 0x80):
            tampered = bytearray(sig)
            tampered[i] ^= bit
            assert not xeddsa.verify(public, message, bytes(tampered)), (i, bit)
    for i in range(len(message)):
        tampered = bytearray(message)
        tampered[i] ^= 0x01
        assert not xeddsa.verify(public, bytes(tampered), sig), i
    assert not xeddsa.verify(public, message + b"\x00", sig)


def test_s_plus_L_is_refused_though_it_is_the_same_scalar(keys: list[tuple[str, str]]) -> None:
    public, secret = keys[0]
    sig = xeddsa.signer(secret)(b"m")
    s = int.from_bytes(sig[32:], "little")
    malleated = sig[:32] + (s + L).to_bytes(32, "little")
    assert not xeddsa.verify(public, b"m", malleated)


def test_a_non_canonical_R_is_refused(keys: list[tuple[str, str]]) -> None:
    public, secret = keys[0]
    sig = xeddsa.signer(secret)(b"m")
    for y in (P, P + 1, 2**255 - 1):
        assert not xeddsa.verify(public, b"m", y.to_bytes(32, "little") + sig[32:])


def test_a_non_canonical_key_encoding_is_refused(keys: list[tuple[str, str]]) -> None:
    """u + p and u with bit 255 set name the same X25519 key for a lax decoder; a signature
    that is valid under u must not be valid under them."""
    public, secret = keys[0]
    sig = xeddsa.signer(secret)(b"m")
    u = int.from_bytes(z85.decode(public.encode()), "little")
    assert xeddsa.verify(public, b"m", sig)
    assert not xeddsa.verify(u_key(u + P), b"m", sig)
    assert not xeddsa.verify(u_key(u | (1 << 255)), b"m", sig)
    assert not xeddsa.verify(u_key(P - 1), b"m", sig)  # u = -1 has no Edwards form


def test_small_order_keys_are_refused_even_with_a_signature_ed25519_accepts() -> None:
    """For a key of small order, R = identity and s = 0 is an Ed25519 'signature' of every
    message whose h is a multiple of the key's order; XEdDSA must refuse the key."""
    identity = (1).to_bytes(32, "little")
    forged = identity + bytes(32)
    for u in SMALL_ORDER_U:
        y = (u - 1) * pow(u + 1, P - 2, P) % P
        edwards = y.to_bytes(32, "little")
        message = next(
            m for m in (i.to_bytes(4, "little") for i in range(1000))
            if int.from_bytes(hashlib.sha512(identity + edwards + m).digest(), "little") % L % 8 == 0
        )
        assert xeddsa.edwards_from_montgomery(u.to_bytes(32, "little")) is None
        assert not xeddsa.verify(u_key(u), message, forged), u
        assert not xeddsa.verify(u_key(u + P), message, forged), u  # the same point, non-canonical


def test_a_point_on_the_twist_is_refused() -> None:
    # A u whose v**2 = u**3 + A u**2 + u has no root is a point of the twist, not the curve.
    twist = next(
        u for u in range(2, 1000)
        if pow((u**3 + 486662 * u * u + u) % P, (P - 1) // 2, P) != 1
    )
    assert xeddsa.edwards_from_montgomery(twist.to_bytes(32, "little")) is None
    assert not xeddsa.verify(u_key(twist), b"m", bytes(64))


def test_wrong_lengths_and_types_are_simply_invalid(keys: list[tuple[str, str]]) -> None:
    public, secret = keys[0]
    sig = xeddsa.signer(secret)(b"m")
    for bad_sig in (sig[:63], sig + b"\x00", b"", bytearray(sig), sig.hex(), None):
        assert xeddsa.verify(public, b"m", bad_sig) is False  # type: ignore[arg-type]
    for bad_key in (public[:39], public + "0", "~" * 40, "", None, 7, b"\xff" * 40):
        assert xeddsa.verify(bad_key, b"m", sig) is False  # type: ignore[arg-type]
    assert xeddsa.verify(public, "m", sig) is False  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    key=st.one_of(st.text(alphabet=xeddsa._Z85_CHARS, min_size=40, max_size=40), st.text(max_size=45),
                  st.binary(min_size=32, max_size=32).map(z85_of), st.binary(max_size=45)),
    data=st.binary(max_size=200),
    sig=st.one_of(st.binary(min_size=64, max_size=64), st.binary(max_size=80)),
)
def test_verify_never_raises_and_random_input_never_verifies(key: str | bytes, data: bytes, sig: bytes) -> None:
    assert xeddsa.verify(key, data, sig) is False


# ---------------------------------------------------------------------------- plugged into SWIM


def test_swim_accepts_a_relayed_record_only_with_its_members_xeddsa_signature(keys: list[tuple[str, str]]) -> None:
    (a_key, a_secret), (x_key, x_secret), (liar, liar_secret) = keys[:3]
    a = swim.Swim(a_key, "a", "10.0.0.1", 1, incarnation=1, sign=xeddsa.signer(a_secret, a_key),
                  verify=xeddsa.verify, now=0.0, rng=random.Random(1))
    sign_x, sign_liar = xeddsa.signer(x_secret), xeddsa.signer(liar_secret)
    lv = swim.Alive(liar, 1, "l", "10.0.0.3", 3, b"", sign_liar(swim.alive_bytes(liar, 1, "l", "10.0.0.3", 3, b"")))
    a.receive(liar, swim.Gossip((lv,)), 0.0)  # on its own link
    forged = swim.Alive(x_key, 1, "x", "6.6.6.6", 2, b"", sign_liar(swim.alive_bytes(x_key, 1, "x", "6.6.6.6", 2, b"")))
    a.receive(liar, swim.Gossip((forged,)), 0.1)  # relayed by the liar, signed by the liar
    assert a.get(x_key) is None and a.stats["bad_signature"] == 1
    real = swim.Alive(x_key, 1, "x", "10.0.0.2", 2, b"", sign_x(swim.alive_bytes(x_key, 1, "x", "10.0.0.2", 2, b"")))
    a.receive(liar, swim.Gossip((real,)), 0.2)  # relayed by anyone: X's signature is what counts
    entry = a.get(x_key)
    assert entry is not None and entry.alive.host == "10.0.0.2"
    assert xeddsa.verify(a_key, a.me.signed_bytes(), a.me.sig)  # its own record, signed by XEdDSA
