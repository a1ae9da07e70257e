"""XEdDSA: a node signs with its CURVE (X25519) key, and anyone verifies with its public key.

CURVE keys are Diffie-Hellman keys and cannot sign, but SWIM gossip needs assertions signed
by the node that makes them (docs/cluster-scale.md, "Incarnations and refutation"). XEdDSA
(Signal's specification, Perrin 2016, https://signal.org/docs/specifications/xeddsa/) signs
with the X25519 secret ``k`` and makes a signature that is an ordinary Ed25519 signature
under the Edwards form of the X25519 public key ``u``: ``y = (u - 1) / (u + 1)``, sign bit
0. So the CURVE key is the signing identity and nothing new is distributed.

``signer(secret)`` returns the ``Signer`` that ``zmesh.mesh.swim`` takes (bytes -> 64-byte
signature) and ``verify(public, data, signature)`` is its ``Verifier``; both keys are the
40-character z85 text of zmq's CURVE keys (``zmesh.security.certs``).

Signing follows the specification exactly (``calculate_key_pair``: ``E = kB``, ``A`` is
``E`` with its sign bit cleared, ``a = -k`` when ``E``'s sign was 1; the nonce is
``hash1(a || M || Z)`` with 64 fresh random bytes ``Z``), and reproduces libsignal's
``xed25519_sign`` test vector (tests/unit/security/test_xeddsa.py).

Verification does the checks the specification asks for and stricter ones, then lets
``cryptography``'s Ed25519 (OpenSSL) check the equation ``R == sB - hA``. Refused, with
``False`` and never an exception: a key or signature of the wrong length or type, a key
``u >= p`` (a non-canonical encoding: bit 255 set, or ``u + p``), ``u = -1`` (no Edwards
form), a ``u`` on the quadratic twist (no point on the curve), a key of small order (the
eight points ``8A = 0``: a signature "by" such a key proves nothing), ``R`` with
``y >= p``, and ``s >= L`` (the specification only asks ``s < 2**253``; every ``s`` in
``[L, 2**253)`` would be a second valid encoding of a signature, and ``cryptography``
refuses them too). The key's conversion is cached per key (bounded), so a verification
costs one Ed25519 verification.

Cost, measured on the 2-core development machine (CPython 3.11) while other jobs ran:
signing ~7 ms (one constant-shape scalar multiplication in Python integers), verification
~0.2 ms with the key's conversion cached and ~1.4 ms for a key seen the first time (a
square root and the small-order check in Python). SWIM signs once per own incarnation and
once per accusation the node makes, a few per second at the very most, and verifies what
it relays.

Side channels. Python integers are not constant-time: a multiplication or a reduction takes
time that depends (slightly) on the values, and the interpreter adds its own noise. What
that means here: the signing key is the node's CURVE secret, so a leak would let someone
impersonate the node on the mesh links, not only in gossip. What limits it:

* the scalar multiplication ``rB`` is a Montgomery ladder with a fixed sequence of 256
  double-and-add steps and arithmetic (branch-free) conditional swaps: no branch and no
  table index depends on a secret bit, so the coarse leaks (which operation runs) are gone;
  what remains is the fine-grained timing of big-integer arithmetic;
* every nonce is fresh (64 random bytes in ``Z``), so repeated signing of one message does
  not give an attacker repeated measurements of one nonce;
* the rate is low and not chosen by an outsider: only a trusted member can make the node
  sign (by accusing it, which it refutes at most once per incarnation), and such a member
  measures through TCP, CURVE and an asyncio loop, microseconds of noise over a leak of
  nanoseconds;
* ``a`` itself is computed once, when the signer is made.

A local process that can time this one finely (same host, another user) is the case this
does not cover as well as a constant-time C implementation would; a node that must resist
it should keep its key on a host it does not share. Why not ``cryptography``'s Ed25519
signer: it takes a 32-byte seed and derives the scalar as ``SHA-512(seed)``, so it cannot be
given the scalar ``a``; no library this project depends on exposes raw-scalar Ed25519.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SIGNATURE_BYTES = 64

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493  # the prime order of the base point
D = (-121665 * pow(121666, P - 2, P)) % P
_SQRT_M1 = pow(2, (P - 1) // 4, P)
_HASH1_PREFIX = b"\xfe" + b"\xff" * 31  # hash1(X) = SHA-512(2**256 - 1 - 1 || X)
_MONT_A = 486662

Point = tuple[int, int, int, int]  # extended twisted Edwards coordinates (X, Y, Z, T)
_IDENTITY: Point = (0, 1, 1, 0)

_Z85_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_VALUE = {c: i for i, c in enumerate(_Z85_CHARS)}


class XEdDSAError(ValueError):
    """A key that cannot sign (not a z85 CURVE secret, or not the pair of the given public)."""


# --------------------------------------------------------------------------- field and curve


def _inv(x: int) -> int:
    return pow(x, P - 2, P)


def _add(p1: Point, p2: Point) -> Point:
    # add-2008-hwcd-3 for a = -1: complete on this curve (d is not a square), so it doubles
    # too, and the ladder below runs the same formula whatever the bits are.
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * D * t1 * t2 % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _cswap(bit: int, p1: Point, p2: Point) -> tuple[Point, Point]:
    """Swap when ``bit`` is 1, by masking rather than branching on it."""
    mask = -bit  # 0 or ...1111 (Python's infinite two's complement)
    out1, out2 = [], []
    for c1, c2 in zip(p1, p2, strict=True):
        t = (c1 ^ c2) & mask
        out1.append(c1 ^ t)
        out2.append(c2 ^ t)
    return (out1[0], out1[1], out1[2], out1[3]), (out2[0], out2[1], out2[2], out2[3])


def _ladder(scalar: int, point: Point) -> Point:
    """``scalar * point`` for a secret ``scalar < 2**256``: 256 identical steps."""
    r0, r1 = _IDENTITY, point
    for i in range(255, -1, -1):
        bit = (scalar >> i) & 1
        r0, r1 = _cswap(bit, r0, r1)
        r1 = _add(r0, r1)
        r0 = _add(r0, r0)
        r0, r1 = _cswap(bit, r0, r1)
    return r0


def _affine(point: Point) -> tuple[int, int]:
    x, y, z, _ = point
    zi = _inv(z)
    return x * zi % P, y * zi % P


def _encode(point: Point) -> bytes:
    """RFC 8032 encoding: y little-endian, the sign (low bit) of x in bit 255."""
    x, y = _affine(point)
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _recover_x(y: int, sign: int) -> int | None:
    """The x with this sign on the curve at ``y``, or None (no such point)."""
    if y >= P:
        return None
    x2 = (y * y - 1) * _inv(D * y * y + 1) % P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P != 0:
        x = x * _SQRT_M1 % P
    if (x * x - x2) % P != 0:
        return None
    if x & 1 != sign:
        x = P - x
    return x


def _point(x: int, y: int) -> Point:
    return (x, y, 1, x * y % P)


_B: Point = _point(_recover_x(4 * _inv(5) % P, 0) or 0, 4 * _inv(5) % P)


def _is_identity(point: Point) -> bool:
    x, y, z, _ = point
    return x % P == 0 and (y - z) % P == 0


def edwards_from_montgomery(u_bytes: bytes) -> bytes | None:
    """The Ed25519 public key (sign bit 0) of an X25519 public key, or None when XEdDSA
    refuses the key: wrong length, ``u >= p``, ``u = -1``, on the twist, or of small order."""
    if type(u_bytes) is not bytes or len(u_bytes) != 32:
        return None
    u = int.from_bytes(u_bytes, "little")
    if u >= P or u == P - 1:
        return None
    # On the curve, not its twist: v**2 = u**3 + A u**2 + u must have a root. (The Edwards
    # x recovered below exists exactly when it does; checking both costs nothing here.)
    rhs = (u * u * u + _MONT_A * u * u + u) % P
    if rhs != 0 and pow(rhs, (P - 1) // 2, P) != 1:
        return None
    y = (u - 1) * _inv(u + 1) % P
    x = _recover_x(y, 0)
    if x is None:
        return None
    a = _point(x, y)
    eight = _add(a, a)
    eight = _add(eight, eight)
    eight = _add(eight, eight)
    if _is_identity(eight):
        return None  # small order: 0, 1, and the points of order 4 and 8
    return y.to_bytes(32, "little")


# --------------------------------------------------------------------------- keys


def z85_decode(text: str | bytes) -> bytes | None:
    """The 32 bytes of a 40-character z85 key, or None."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    if type(text) is not str or len(text) != 40:
        return None
    out = bytearray()
    for i in range(0, 40, 5):
        value = 0
        for c in text[i:i + 5]:
            digit = _Z85_VALUE.get(c)
            if digit is None:
                return None
            value = value * 85 + digit
        if value >= 2**32:
            return None
        out += value.to_bytes(4, "big")
    return bytes(out)


def _clamp(k: bytes) -> int:
    value = int.from_bytes(k, "little")
    value &= ~7
    value &= ~(1 << 255)
    value |= 1 << 254
    return value


class _KeyPair:
    """``calculate_key_pair(k)``: the Edwards public key ``A`` (sign 0) and the scalar ``a``."""

    __slots__ = ("a", "a_bytes", "public_edwards", "public_montgomery")

    def __init__(self, secret: bytes) -> None:
        k = _clamp(secret)
        e = _ladder(k, _B)
        x, y = _affine(e)
        self.a = (L - k % L) % L if x & 1 else k % L
        self.a_bytes = self.a.to_bytes(32, "little")
        self.public_edwards = y.to_bytes(32, "little")
        # u = (1 + y) / (1 - y): the X25519 public key this secret belongs to.
        self.public_montgomery = ((1 + y) * _inv(1 - y) % P).to_bytes(32, "little")

    def sign(self, message: bytes, z: bytes) -> bytes:
        r = int.from_bytes(hashlib.sha512(_HASH1_PREFIX + self.a_bytes + message + z).digest(), "little") % L
        big_r = _encode(_ladder(r, _B))
        h = int.from_bytes(hashlib.sha512(big_r + self.public_edwards + message).digest(), "little") % L
        s = (r + h * self.a) % L
        return big_r + s.to_bytes(32, "little")


def signer(secret: str | bytes, public: str | bytes | None = None) -> Callable[[bytes], bytes]:
    """The signing function of a CURVE secret key (z85); ``public``, when given, must be its
    pair (a mismatch would sign under a key nobody verifies). Raises XEdDSAError, whose
    message never carries the secret."""
    raw = z85_decode(secret)
    if raw is None:
        raise XEdDSAError("not a 40-character z85 CURVE secret key")
    pair = _KeyPair(raw)
    if public is not None and z85_decode(public) != pair.public_montgomery:
        raise XEdDSAError("the secret key is not the pair of the public key given with it")

    def sign(message: bytes) -> bytes:
        return pair.sign(bytes(message), os.urandom(64))

    return sign


def public_of(secret: str | bytes) -> bytes:
    """The X25519 public key (32 bytes) of a z85 CURVE secret."""
    raw = z85_decode(secret)
    if raw is None:
        raise XEdDSAError("not a 40-character z85 CURVE secret key")
    return _KeyPair(raw).public_montgomery


# --------------------------------------------------------------------------- verification


@functools.lru_cache(maxsize=4096)  # ~16,384 members at most; a miss costs ~0.2 ms
def _verifier_of(key: str | bytes) -> Ed25519PublicKey | None:
    raw = z85_decode(key)
    if raw is None:
        return None
    edwards = edwards_from_montgomery(raw)
    if edwards is None:
        return None
    try:
        return Ed25519PublicKey.from_public_bytes(edwards)
    except ValueError:
        return None


def verify(key: str | bytes, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is an XEdDSA signature of ``data`` by the holder of the CURVE
    public key ``key`` (z85). Never raises: anything malformed is simply not valid."""
    if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
        return False
    if not isinstance(data, bytes | bytearray | memoryview):
        return False
    if not isinstance(key, str | bytes) or len(key) != 40:
        return False
    public = _verifier_of(key)
    if public is None:
        return False
    r_y = int.from_bytes(signature[:32], "little") & ((1 << 255) - 1)
    if r_y >= P or int.from_bytes(signature[32:], "little") >= L:
        return False
    try:
        public.verify(signature, bytes(data))
    except InvalidSignature:
        return False
    return True
