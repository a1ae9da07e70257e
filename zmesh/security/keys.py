"""The key that encrypts the node's store at rest, on disk and in use.

A key file holds 32 random bytes as one line of base64 text, so it survives copy and paste
into a Kubernetes Secret or a config-management vault. The same two rules as ``certs``:

* The file is created with mode 0600 by ``os.open`` itself, never chmod-ed down after the
  fact: a file that is briefly 0644 can be read by anyone watching the directory.
* No exception message and no log line ever carries key material, nor any part of the file
  (a mistyped key is still mostly the key). Errors name the file and say what is wrong, and
  are raised ``from None`` so that a chained exception cannot smuggle the content along.

``Sealer`` is AES-256-GCM with a random 96-bit nonce per message. NIST bounds random nonces
at 2**32 messages per key (the chance of any nonce repeating stays below 2**-32; a repeat
would leak the XOR of two plaintexts under that key). Every seal counts, re-encryption
included. At a sustained 1,000 retained writes/s that bound is reached in about 50 days, so
a store under such load should have its key rotated (which starts the count again).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from zmesh.security.secretfile import read_secret_file

log = logging.getLogger("zmesh.keys")

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

# 32 bytes are 44 characters of base64; anything much bigger is not a key file, and reading
# it whole (a log file named by mistake) would only waste memory.
_MAX_KEY_FILE_BYTES = 4096
_KEY_ID_LABEL = b"zmesh-store-key-id:"


class KeyFileError(Exception):
    """A key file could not be created or read. The message names the file and never
    contains key material."""


class SealError(Exception):
    """A sealed blob did not open: wrong key, wrong associated data, or tampered bytes.

    AES-GCM cannot tell these apart, by design; the message says only that it failed."""


def key_id_of(key: bytes) -> bytes:
    """8 bytes that identify ``key`` without revealing it (a truncated, labelled SHA-256).

    Safe to store next to data and to print in errors: finding the key from it is as hard as
    guessing the key."""
    return hashlib.sha256(_KEY_ID_LABEL + key).digest()[:8]


# ---------------------------------------------------------------------------- key files


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)  # a power cut must not leave an empty key behind the name


def create_key_file(path: Path, *, force: bool = False) -> Path:
    """Write a new random key to ``path`` (mode 0600) and return ``path``.

    Refuses to replace an existing file unless ``force``; then the file is replaced
    atomically (a reader sees the old key or the new one, never half of either). The parent
    directory is created with mode 0700 if missing.

    Replacing the key of a store that holds data makes that data unreadable unless the old
    key is kept as a previous key until the store has been re-encrypted.
    """
    path = Path(path)
    text = base64.b64encode(os.urandom(KEY_BYTES)) + b"\n"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"{path.parent}: cannot create key directory: {exc.strerror}") from None
    if not force:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyFileError(
                f"{path}: already exists; refusing to overwrite (use force)"
            ) from None
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot create key file: {exc.strerror}") from None
        try:
            # The umask can only narrow the mode given to open(); make it exactly 0600.
            os.fchmod(fd, 0o600)
            _write_all(fd, text)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise KeyFileError(f"{path}: cannot write key file: {exc.strerror}") from None
        os.close(fd)
    else:
        # mkstemp creates the file O_EXCL with mode 0600, so the key is never wider than that.
        fd, tmp_name = -1, ""
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.fchmod(fd, 0o600)
            _write_all(fd, text)
            os.close(fd)
            fd = -1
            os.replace(tmp_name, path)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            if tmp_name:
                Path(tmp_name).unlink(missing_ok=True)
            raise KeyFileError(f"{path}: cannot write key file: {exc.strerror}") from None
    log.info("created store key file %s (key id %s)", path, key_id_of(base64.b64decode(text)).hex())
    return path


def load_key_file(path: Path) -> bytes:
    """The 32-byte key in ``path``.

    Raises KeyFileError if the file is missing, unreadable, not a regular file, or does not
    hold exactly 32 bytes of base64 (surrounding whitespace is ignored). A mode wider than
    0600 is logged as a warning, not refused: refusing would turn an operator's chmod slip
    into an outage.
    """
    path = Path(path)
    data = read_secret_file(
        path, noun="key file", error=KeyFileError, max_bytes=_MAX_KEY_FILE_BYTES, log=log,
        mode_warning="anyone who can read it can decrypt the store",
    )
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(
            f"{path}: not a key file: expected {KEY_BYTES} bytes as one line of base64 "
            "(create one with create_key_file)"
        ) from None
    if len(key) != KEY_BYTES:
        # The length is not secret; the content is.
        raise KeyFileError(
            f"{path}: not a key file: holds {len(key)} bytes of base64, expected {KEY_BYTES}"
        )
    return key


# ---------------------------------------------------------------------------- sealing


class Sealer:
    """AES-256-GCM with a random 96-bit nonce per message."""

    __slots__ = ("_aead", "_invalid_tag", "key_id")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            # Say nothing about the value: it may be a key with a byte missing.
            raise ValueError(f"a store key is {KEY_BYTES} bytes")
        # Imported here, not at the top: cryptography costs an idle node ~6 MB of RSS, and
        # only a node with an encrypted store needs it.
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._invalid_tag = InvalidTag
        self._aead = AESGCM(key)  # holds the key; we keep no other reference to it
        self.key_id: bytes = key_id_of(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """``nonce(12) + ciphertext + tag(16)``; ``aad`` is authenticated, not stored."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext of ``blob`` sealed with this key and ``aad``; SealError otherwise."""
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise SealError("sealed blob too short")
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except self._invalid_tag:
            raise SealError(
                "sealed blob did not open (wrong key, wrong topic or tampered)"
            ) from None

    def __repr__(self) -> str:
        return f"Sealer(key_id={self.key_id.hex()})"


def sealers_for(key: bytes | None, previous_keys: Sequence[bytes] = ()) -> tuple[Sealer | None, dict[bytes, Sealer]]:
    """The sealer of the current key (None: no encryption) and, by key id, every key that
    may have sealed what is on disk (previous ones first, so the current one wins a clash).
    The retained store and the job spool both open their rows with these."""
    if previous_keys and key is None:
        raise ValueError("store previous_keys need a current key")
    current = Sealer(key) if key is not None else None
    by_id: dict[bytes, Sealer] = {}
    for k in previous_keys:
        sealer = Sealer(k)
        by_id.setdefault(sealer.key_id, sealer)
    if current is not None:
        by_id[current.key_id] = current
    return current, by_id
