"""Node identities signed by a mesh authority: who a CURVE key belongs to. Pure.

A trusted directory of public keys works for a handful of static nodes; in a Deployment
that scales, pods come and go with keys nobody knows in advance. In this trust mode a node
makes its own CURVE key pair at start and presents a **node certificate** for it:

    node certificate   its CURVE public key, name, groups, validity, serial,
                       signed by a signer (or by the authority itself)
    signer certificate a signing key (Ed25519), the groups it may issue, the longest
                       node lifetime it may issue, validity, serial, signed by the authority
    authority          an Ed25519 key pair; its public key is configuration (a ConfigMap),
                       its secret stays offline and signs signers and revocation lists
    revocation list    serials no longer valid, with a sequence number, signed by the
                       authority

A pod holds its group's signer key (a Secret shared by the pods of one group, never the
authority's) and issues itself short-lived node certificates. What a stolen pod can do:
mint identities of its own groups, each living at most the signer's ``max_node_lifetime``,
until the signer is revoked or expires. What it cannot: claim another group, outlive the
signer, forge the authority's signature, or un-revoke anything.

Everything here is values in, values out, with ``now`` injected; ``verify_chain`` is what a
peer runs on the bytes another node presents, so it treats them as hostile: sizes, counts,
types and ranges are checked before any signature, and every refusal is an
``IdentityError`` whose ``reason`` is a short constant (counted by the caller).

May import: the standard library, msgpack and cryptography (Ed25519). Imported by the
mesh's admission step, the CLI and ``zmesh doctor``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

VERSION = 1
_DOMAIN = b"zmesh-identity-v1\x00"  # signatures cover this prefix + the body: no cross-use
MAX_CHAIN_BYTES = 4096  # a presented chain larger than this is refused unread
MAX_CHAIN = 2  # node certificate, and at most one signer above it
MAX_GROUPS = 16
MAX_REVOKED = 10_000
MAX_REVOCATIONS_BYTES = 64 + MAX_REVOKED * 20 + 1024
DEFAULT_SKEW = 60.0  # seconds of clock difference tolerated at either end of a validity
SERIAL_BYTES = 16
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_Z85_KEY = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")

NODE, SIGNER, REVOCATIONS = "node", "signer", "revocations"


class IdentityError(ValueError):
    """A certificate or revocation list that must not be believed. ``reason`` is one of a
    few constants (``malformed``, ``bad_signature``, ``expired``, ``not_yet_valid``,
    ``revoked``, ``unknown_issuer``, ``group_not_allowed``, ``too_long``, ``wrong_key``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class NodeCertificate:
    curve_key: bytes  # z85, 40 bytes
    name: str
    groups: tuple[str, ...]
    not_before: int
    not_after: int
    serial: bytes
    issuer: bytes  # Ed25519 public key (32 bytes) of whoever signed it


@dataclass(frozen=True)
class SignerCertificate:
    key: bytes  # Ed25519 public key (32 bytes)
    groups: tuple[str, ...]
    max_node_lifetime: int  # seconds
    not_before: int
    not_after: int
    serial: bytes
    issuer: bytes  # the authority's public key


@dataclass(frozen=True)
class Identity:
    """What a verified chain says: this CURVE key is node ``name`` in ``groups`` until
    ``not_after``."""

    curve_key: bytes
    name: str
    groups: tuple[str, ...]
    not_after: int
    serials: tuple[bytes, ...]  # of every certificate in the chain (revocation checks)


@dataclass(frozen=True)
class Revocations:
    seq: int
    issued_at: int
    serials: frozenset[bytes]
    issuer: bytes

    def revoked(self, serial: bytes) -> bool:
        return serial in self.serials


# ---------------------------------------------------------------------------- keys


def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def new_serial() -> bytes:
    return os.urandom(SERIAL_BYTES)


# ---------------------------------------------------------------------------- signing


def _sign(key: Ed25519PrivateKey, body: dict[str, object]) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb([raw, key.sign(_DOMAIN + raw)], use_bin_type=True)  # type: ignore[no-any-return]


def _check_groups(groups: Iterable[str]) -> tuple[str, ...]:
    found = tuple(groups)
    if len(found) > MAX_GROUPS or any(not isinstance(g, str) or not NAME_RE.fullmatch(g) for g in found):
        raise ValueError(f"groups: at most {MAX_GROUPS} names of [A-Za-z0-9_.-]{{1,64}}")
    return tuple(sorted(set(found)))


def issue_signer(
    authority: Ed25519PrivateKey,
    signer_public: bytes,
    groups: Iterable[str],
    *,
    now: float,
    lifetime: float,
    max_node_lifetime: float,
) -> bytes:
    """A signer certificate: ``signer_public`` may issue node certificates for ``groups``,
    each living at most ``max_node_lifetime`` seconds, from ``now`` for ``lifetime``."""
    body = {
        "v": VERSION, "k": SIGNER, "key": bytes(signer_public), "g": list(_check_groups(groups)),
        "ml": int(max_node_lifetime), "nb": int(now), "na": int(now + lifetime), "s": new_serial(),
        "i": public_bytes(authority),
    }
    return _sign(authority, body)


def issue_node(
    signer: Ed25519PrivateKey,
    curve_key: bytes,
    name: str,
    groups: Iterable[str],
    *,
    now: float,
    lifetime: float,
) -> bytes:
    """A node certificate for ``curve_key`` (z85), signed by ``signer`` (a signer's key, or
    the authority's for a node issued by hand)."""
    if not _Z85_KEY.fullmatch(curve_key):
        raise ValueError("curve_key: a z85 CURVE public key (40 characters)")
    if not NAME_RE.fullmatch(name):
        raise ValueError("name: [A-Za-z0-9_.-]{1,64}")
    body = {
        "v": VERSION, "k": NODE, "c": bytes(curve_key), "n": name, "g": list(_check_groups(groups)),
        "nb": int(now), "na": int(now + lifetime), "s": new_serial(), "i": public_bytes(signer),
    }
    return _sign(signer, body)


def issue_revocations(authority: Ed25519PrivateKey, serials: Iterable[bytes], *, seq: int, now: float) -> bytes:
    found = sorted(set(serials))
    if len(found) > MAX_REVOKED or any(len(s) != SERIAL_BYTES for s in found):
        raise ValueError(f"serials: at most {MAX_REVOKED} serials of {SERIAL_BYTES} bytes")
    body = {"v": VERSION, "k": REVOCATIONS, "q": int(seq), "t": int(now), "r": found, "i": public_bytes(authority)}
    return _sign(authority, body)


def chain(*certificates: bytes) -> bytes:
    """The bytes a node presents: its node certificate first, then its signer's."""
    return msgpack.packb(list(certificates), use_bin_type=True)  # type: ignore[no-any-return]


def node_of(presented: bytes) -> NodeCertificate:
    """The node certificate at the head of a chain, unverified (our own, to renew it)."""
    parts = msgpack.unpackb(presented, raw=False)
    return parse_node(parts[0])[0]


# ---------------------------------------------------------------------------- verifying


def _open(signed: object, kind: str) -> tuple[dict[str, object], bytes, bytes]:
    """The body of a signed statement, its raw bytes and its signature; shape checked,
    signature not yet."""
    if not isinstance(signed, bytes):
        raise IdentityError("malformed", f"{kind}: not a signed statement")
    try:
        outer = msgpack.unpackb(signed, raw=False, strict_map_key=True, max_bin_len=MAX_REVOCATIONS_BYTES,
                                max_str_len=256, max_array_len=4, max_map_len=0)
    except Exception as exc:  # msgpack raises several types for bad input
        raise IdentityError("malformed", f"{kind}: undecodable ({type(exc).__name__})") from None
    if not (isinstance(outer, list) and len(outer) == 2 and isinstance(outer[0], bytes)
            and isinstance(outer[1], bytes) and len(outer[1]) == 64):
        raise IdentityError("malformed", f"{kind}: not [body, signature]")
    raw, signature = outer
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=MAX_REVOCATIONS_BYTES,
                               max_str_len=256, max_array_len=MAX_REVOKED, max_map_len=16)
    except Exception as exc:
        raise IdentityError("malformed", f"{kind}: undecodable body ({type(exc).__name__})") from None
    if not isinstance(body, dict) or body.get("v") != VERSION or body.get("k") != kind:
        raise IdentityError("malformed", f"{kind}: not a version {VERSION} {kind} statement")
    return body, raw, signature


def _field(body: dict[str, object], key: str, kind: type, what: str) -> object:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise IdentityError("malformed", f"{what}: field {key!r} missing or of the wrong type")
    return value


def _int(body: dict[str, object], key: str, what: str) -> int:
    value = _field(body, key, int, what)
    assert isinstance(value, int)
    if not 0 <= value < 1 << 40:  # seconds: until the year 36812, and never negative
        raise IdentityError("malformed", f"{what}: field {key!r} out of range")
    return value


def _bytes(body: dict[str, object], key: str, size: int, what: str) -> bytes:
    value = _field(body, key, bytes, what)
    assert isinstance(value, bytes)
    if len(value) != size:
        raise IdentityError("malformed", f"{what}: field {key!r} must be {size} bytes")
    return value


def _groups(body: dict[str, object], what: str) -> tuple[str, ...]:
    value = _field(body, "g", list, what)
    assert isinstance(value, list)
    try:
        return _check_groups(value)
    except ValueError:
        raise IdentityError("malformed", f"{what}: bad groups") from None


def _verify(issuer: bytes, raw: bytes, signature: bytes, what: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(issuer).verify(signature, _DOMAIN + raw)
    except (InvalidSignature, ValueError):
        raise IdentityError("bad_signature", f"{what}: signature does not verify") from None


def _check_time(not_before: int, not_after: int, now: float, skew: float, what: str) -> None:
    if not_after <= not_before:
        raise IdentityError("malformed", f"{what}: validity ends before it begins")
    if now + skew < not_before:
        raise IdentityError("not_yet_valid", f"{what}: not valid before {not_before}")
    if now - skew >= not_after:
        raise IdentityError("expired", f"{what}: expired at {not_after}")


def parse_signer(signed: bytes) -> tuple[SignerCertificate, bytes, bytes]:
    body, raw, signature = _open(signed, SIGNER)
    what = "signer certificate"
    cert = SignerCertificate(
        key=_bytes(body, "key", 32, what), groups=_groups(body, what), max_node_lifetime=_int(body, "ml", what),
        not_before=_int(body, "nb", what), not_after=_int(body, "na", what), serial=_bytes(body, "s", SERIAL_BYTES, what),
        issuer=_bytes(body, "i", 32, what),
    )
    return cert, raw, signature


def parse_node(signed: bytes) -> tuple[NodeCertificate, bytes, bytes]:
    body, raw, signature = _open(signed, NODE)
    what = "node certificate"
    curve = _field(body, "c", bytes, what)
    name = _field(body, "n", str, what)
    assert isinstance(curve, bytes) and isinstance(name, str)
    if not _Z85_KEY.fullmatch(curve) or not NAME_RE.fullmatch(name):
        raise IdentityError("malformed", f"{what}: bad key or name")
    cert = NodeCertificate(
        curve_key=curve, name=name, groups=_groups(body, what), not_before=_int(body, "nb", what),
        not_after=_int(body, "na", what), serial=_bytes(body, "s", SERIAL_BYTES, what), issuer=_bytes(body, "i", 32, what),
    )
    return cert, raw, signature


def verify_chain(
    presented: bytes,
    authorities: Collection[bytes],
    *,
    now: float,
    revocations: Revocations | RevocationSet | None = None,
    expected_key: bytes | None = None,
    skew: float = DEFAULT_SKEW,
) -> Identity:
    """Believe ``presented`` (what ``chain`` made) only if every link verifies up to one of
    ``authorities`` (raw Ed25519 public keys), everything is valid at ``now``, nothing is
    revoked, the node's groups are within its signer's, and (``expected_key``) it is the
    certificate of the CURVE key that completed the handshake."""
    if not isinstance(presented, bytes) or len(presented) > MAX_CHAIN_BYTES:
        raise IdentityError("too_long", f"certificate chain larger than {MAX_CHAIN_BYTES} bytes")
    try:
        parts = msgpack.unpackb(presented, raw=False, max_bin_len=MAX_CHAIN_BYTES, max_str_len=0,
                                max_array_len=MAX_CHAIN, max_map_len=0)
    except Exception as exc:
        raise IdentityError("malformed", f"certificate chain undecodable ({type(exc).__name__})") from None
    if not isinstance(parts, list) or not 1 <= len(parts) <= MAX_CHAIN:
        raise IdentityError("malformed", f"a chain is a node certificate and at most {MAX_CHAIN - 1} signer")
    node, node_raw, node_signature = parse_node(parts[0])
    serials = [node.serial]
    if len(parts) == 2:
        signer, signer_raw, signer_signature = parse_signer(parts[1])
        if signer.issuer not in authorities:
            raise IdentityError("unknown_issuer", "signer certificate: not issued by a trusted authority")
        _verify(signer.issuer, signer_raw, signer_signature, "signer certificate")
        _check_time(signer.not_before, signer.not_after, now, skew, "signer certificate")
        if node.issuer != signer.key:
            raise IdentityError("unknown_issuer", "node certificate: not issued by the signer presented")
        if not set(node.groups) <= set(signer.groups):
            raise IdentityError("group_not_allowed", "node certificate: groups beyond its signer's")
        if node.not_after - node.not_before > signer.max_node_lifetime:
            raise IdentityError("too_long", "node certificate: lives longer than its signer allows")
        if node.not_after > signer.not_after:
            raise IdentityError("too_long", "node certificate: outlives its signer")
        serials.append(signer.serial)
    elif node.issuer not in authorities:
        raise IdentityError("unknown_issuer", "node certificate: not issued by a trusted authority")
    _verify(node.issuer, node_raw, node_signature, "node certificate")
    _check_time(node.not_before, node.not_after, now, skew, "node certificate")
    if revocations is not None:
        for serial in serials:
            if revocations.revoked(serial):
                raise IdentityError("revoked", f"certificate {serial.hex()} is revoked")
    if expected_key is not None and node.curve_key != expected_key:
        raise IdentityError("wrong_key", "node certificate: for another CURVE key than the one connected")
    return Identity(node.curve_key, node.name, node.groups, node.not_after, tuple(serials))


def verify_revocations(signed: bytes, authorities: Collection[bytes], *, now: float, skew: float = DEFAULT_SKEW) -> Revocations:
    """A revocation list signed by one of ``authorities``; one from the future is refused."""
    if not isinstance(signed, bytes) or len(signed) > MAX_REVOCATIONS_BYTES:
        raise IdentityError("too_long", "revocation list too large")
    body, raw, signature = _open(signed, REVOCATIONS)
    what = "revocation list"
    issuer = _bytes(body, "i", 32, what)
    if issuer not in authorities:
        raise IdentityError("unknown_issuer", f"{what}: not issued by a trusted authority")
    _verify(issuer, raw, signature, what)
    seq, issued_at = _int(body, "q", what), _int(body, "t", what)
    if issued_at > now + skew:
        raise IdentityError("not_yet_valid", f"{what}: issued in the future")
    listed = _field(body, "r", list, what)
    assert isinstance(listed, list)
    if len(listed) > MAX_REVOKED or any(not isinstance(s, bytes) or len(s) != SERIAL_BYTES for s in listed):
        raise IdentityError("malformed", f"{what}: bad serials")
    return Revocations(seq, issued_at, frozenset(listed), issuer)


class RevocationSet:
    """The newest revocation list of each authority, and whether a serial is revoked by any.
    A list replaces its authority's current one only with a higher sequence number, so a
    replayed older list never un-revokes anything. Bounded: one list per trusted authority."""

    def __init__(self) -> None:
        self.lists: dict[bytes, Revocations] = {}

    def offer(self, candidate: Revocations) -> bool:
        """Keep ``candidate`` if it is newer than what its authority said before."""
        current = self.lists.get(candidate.issuer)
        if current is not None and candidate.seq <= current.seq:
            return False
        self.lists[candidate.issuer] = candidate
        return True

    def revoked(self, serial: bytes) -> bool:
        return any(r.revoked(serial) for r in self.lists.values())
