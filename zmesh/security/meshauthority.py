"""The mesh authority's files: its key pair, group signers, revocation lists on disk.

``zmesh authority create DIR`` writes ``DIR/authority.pub`` (the public key, base64: what
goes into every node's configuration, e.g. a ConfigMap) and ``DIR/authority.key_secret``
(0600 in a 0700 directory: keep it offline). ``zmesh authority signer`` writes a signer file
(a Secret for the pods of one group): the signer's own secret key and the certificate the
authority gave it. The statements themselves are ``zmesh.security.identity``'s.

A public-key file may hold several keys, one per line (``#`` comments allowed), so that an
authority can be rotated: nodes trust both until the old one is retired.

May import: the standard library, cryptography, ``zmesh.security``. Imported by the CLI and
the node's admission step.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from zmesh.security import identity
from zmesh.security.secretfile import read_secret_file

log = logging.getLogger("zmesh.authority")

PUBLIC_NAME = "authority.pub"
SECRET_NAME = "authority.key_secret"
MAX_FILE_BYTES = 64 * 1024


class AuthorityFileError(Exception):
    """A missing, unreadable or malformed authority, signer or revocation file (the message
    names the file, never a key)."""


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey
    certificate: bytes  # the authority-signed signer certificate
    info: identity.SignerCertificate


def _write_secret(path: Path, data: bytes, *, force: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte, atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() and not force:
        raise AuthorityFileError(f"{path}: already exists; refusing to overwrite (use --force)")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_public(path: Path, data: bytes, *, force: bool) -> None:
    if path.exists() and not force:
        raise AuthorityFileError(f"{path}: already exists; refusing to overwrite (use --force)")
    _write_secret(path, data, force=True)
    os.chmod(path, 0o644)  # public by nature: it goes into configuration


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, path: Path, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise AuthorityFileError(f"{path}: {what} is not base64") from None


def create_authority(directory: Path, *, force: bool = False) -> tuple[Path, Path]:
    """A new authority key pair in ``directory``: (public file, secret file)."""
    key = identity.new_signing_key()
    secret_path, public_path = directory / SECRET_NAME, directory / PUBLIC_NAME
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    _write_secret(secret_path, (_b64(raw) + "\n").encode(), force=force)
    _write_public(public_path, (f"# zmesh mesh authority (Ed25519), created {time.strftime('%Y-%m-%d')}\n"
                                f"{_b64(identity.public_bytes(key))}\n").encode(), force=force)
    return public_path, secret_path


def load_authority_secret(path: Path) -> Ed25519PrivateKey:
    data = read_secret_file(path, noun="authority secret key", error=AuthorityFileError, max_bytes=MAX_FILE_BYTES,
                            mode_warning="anyone who reads it can admit nodes to the mesh", log=log)
    raw = _unb64(data.decode(errors="replace"), path, "the authority secret key")
    if len(raw) != 32:
        raise AuthorityFileError(f"{path}: not an authority secret key (32 bytes expected)")
    return Ed25519PrivateKey.from_private_bytes(raw)


def load_authority_keys(path: Path) -> list[bytes]:
    """The trusted authorities' public keys in ``path``, one base64 key per line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise AuthorityFileError(f"{path}: cannot read authority public keys: {exc.strerror}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        raw = _unb64(line, path, f"line {number}")
        if len(raw) != 32:
            raise AuthorityFileError(f"{path}: line {number}: not an Ed25519 public key (32 bytes)")
        keys.append(raw)
    if not keys:
        raise AuthorityFileError(f"{path}: holds no authority public key")
    return keys


def create_signer(
    authority: Ed25519PrivateKey,
    path: Path,
    groups: list[str],
    *,
    lifetime: float,
    max_node_lifetime: float,
    force: bool = False,
    now: float | None = None,
) -> Signer:
    """A new signing key for ``groups``, certified by ``authority``, written to ``path``."""
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = identity.new_signing_key()
    certificate = identity.issue_signer(authority, identity.public_bytes(key), groups,
                                        now=time.time() if now is None else now, lifetime=lifetime,
                                        max_node_lifetime=max_node_lifetime)
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    body = {"zmesh_signer": 1, "key": _b64(raw), "certificate": _b64(certificate)}
    _write_secret(Path(path), (json.dumps(body, indent=1) + "\n").encode(), force=force)
    info, _raw, _sig = identity.parse_signer(certificate)
    return Signer(key, certificate, info)


def load_signer(path: Path) -> Signer:
    data = read_secret_file(Path(path), noun="signer file", error=AuthorityFileError, max_bytes=MAX_FILE_BYTES,
                            mode_warning="anyone who reads it can mint identities of its groups", log=log)
    try:
        body = json.loads(data)
        key_text, cert_text = body["key"], body["certificate"]
        if body.get("zmesh_signer") != 1 or not isinstance(key_text, str) or not isinstance(cert_text, str):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise AuthorityFileError(f"{path}: not a zmesh signer file") from None
    raw = _unb64(key_text, path, "the signer key")
    if len(raw) != 32:
        raise AuthorityFileError(f"{path}: not a signer key (32 bytes expected)")
    key = Ed25519PrivateKey.from_private_bytes(raw)
    certificate = _unb64(cert_text, path, "the signer certificate")
    try:
        info, _raw, _sig = identity.parse_signer(certificate)
    except identity.IdentityError as exc:
        raise AuthorityFileError(f"{path}: bad signer certificate: {exc}") from None
    if info.key != identity.public_bytes(key):
        raise AuthorityFileError(f"{path}: the certificate is for another key than the one in the file")
    return Signer(key, certificate, info)


def write_revocations(authority: Ed25519PrivateKey, path: Path, serials: list[bytes], *, seq: int,
                      now: float | None = None) -> bytes:
    signed = identity.issue_revocations(authority, serials, seq=seq, now=time.time() if now is None else now)
    _write_public(Path(path), signed, force=True)
    return signed
