"""Mosquitto ``password_file``: parse, verify and hash, as Mosquitto 2.0 does.

One entry per line, ``username:hash``. The hash is one of the two formats that
``mosquitto_passwd`` (2.0) writes::

    $7$<iterations>$<salt base64>$<hash base64>   PBKDF2-HMAC-SHA512 (the default, 101 iterations)
    $6$<salt base64>$<hash base64>                SHA-512 of password followed by salt (-H sha512)

with a 12-byte salt and a 64-byte hash, base64 with padding. Mosquitto also accepts a
64-byte salt, and so do we. A line starting with ``#`` is a comment and a blank line is
skipped. The last line for a username wins (Mosquitto's hash table finds the newest).

Where Mosquitto logs a broken entry and drops it, or silently skips a line without a
``:``, we refuse the whole file with ``PasswordFileError("<file>:<line>: <what>")``: a
half-read password file is a security decision made by accident. No message ever holds a
password or a hash.

Pure: no I/O apart from ``PasswordFile.load`` reading the one file it is given.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from zmesh.security.files import AuthFileError, read_text

Scheme = Literal["sha512", "sha512-pbkdf2"]
SCHEMES: tuple[str, ...] = ("sha512-pbkdf2", "sha512")
DEFAULT_ITERATIONS = 101  # mosquitto_passwd 2.0's PW_DEFAULT_ITERATIONS
SALT_LEN = 12
HASH_LEN = 64
MAX_ITERATIONS = 2**31 - 1  # Mosquitto reads the count with atoi() into an int
MAX_FIELD = 65535  # Mosquitto's limit for a username and for a password
# Mosquitto trims fields with C isspace(); Python's str.strip() would also eat Unicode spaces.
BLANKS = " \t\n\v\f\r"
_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


class PasswordFileError(AuthFileError):
    """A password file that cannot be used; ``str()`` is ``"<file>:<line>: <what>"``."""


@dataclass(frozen=True)
class PasswordHash:
    """One stored hash. ``repr`` leaves the salt and digest out: they never reach a log."""

    scheme: Scheme
    iterations: int  # 0 for sha512
    salt: bytes
    digest: bytes

    def __repr__(self) -> str:
        return f"PasswordHash({self.scheme}, iterations={self.iterations})"

    def compute(self, password: bytes) -> bytes:
        """The digest ``password`` would have under this hash's scheme, salt and iterations."""
        if self.scheme == "sha512":
            return hashlib.sha512(password + self.salt).digest()
        return hashlib.pbkdf2_hmac("sha512", password, self.salt, self.iterations, HASH_LEN)

    def verify(self, password: bytes) -> bool:
        return hmac.compare_digest(self.compute(password), self.digest)

    def encode(self) -> str:
        """The ``$7$...`` / ``$6$...`` text mosquitto_passwd writes for this hash."""
        salt = binascii.b2a_base64(self.salt, newline=False).decode()
        digest = binascii.b2a_base64(self.digest, newline=False).decode()
        if self.scheme == "sha512":
            return f"$6${salt}${digest}"
        return f"$7${self.iterations}${salt}${digest}"


def make_hash(
    password: bytes, scheme: str = "sha512-pbkdf2", iterations: int = DEFAULT_ITERATIONS
) -> PasswordHash:
    """A new hash of ``password`` with a random 12-byte salt (ValueError on a bad scheme)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown hash type {scheme!r} (expected sha512-pbkdf2 or sha512)")
    if scheme == "sha512-pbkdf2" and not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError("number of iterations must be > 0")
    kind: Scheme = "sha512" if scheme == "sha512" else "sha512-pbkdf2"
    count = iterations if kind == "sha512-pbkdf2" else 0
    salt = secrets.token_bytes(SALT_LEN)
    return PasswordHash(kind, count, salt, PasswordHash(kind, count, salt, b"").compute(password))


def hash_password(
    password: bytes, scheme: str = "sha512-pbkdf2", iterations: int = DEFAULT_ITERATIONS
) -> str:
    """``$7$101$<salt>$<hash>`` (or ``$6$...`` for ``scheme="sha512"``), as mosquitto_passwd."""
    return make_hash(password, scheme, iterations).encode()


def _b64(text: str, what: str, lengths: tuple[int, ...]) -> bytes:
    """Decode one base64 field; ValueError names the field, never its content."""
    if not text or not set(text) <= _B64_CHARS or "=" in text.rstrip("="):
        raise ValueError(f"{what} is not base64")
    try:
        # Mosquitto writes padding; accept a field written without it too.
        value = binascii.a2b_base64(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
    except binascii.Error:
        raise ValueError(f"{what} is not base64") from None
    if len(value) not in lengths:
        expected = " or ".join(str(n) for n in lengths)
        raise ValueError(f"{what} is {len(value)} bytes, expected {expected}")
    return value


def parse_hash(text: str) -> PasswordHash:
    """Parse ``$7$...`` or ``$6$...``; ValueError says what is wrong without quoting it."""
    parts = text.split("$")
    if len(parts) < 2 or parts[0] != "":
        raise ValueError("the password is not hashed (hash it with: zmesh passwd -U FILE)")
    if parts[1] == "7":
        if len(parts) != 5:
            raise ValueError("a $7$ hash has 4 fields: $7$iterations$salt$hash")
        count = parts[2]
        if not (count.isascii() and count.isdigit()) or len(count) > 10:
            raise ValueError("the iteration count is not a number")
        iterations = int(count)
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise ValueError("the iteration count must be from 1 to 2147483647")
        salt = _b64(parts[3], "the salt", (SALT_LEN, HASH_LEN))
        return PasswordHash("sha512-pbkdf2", iterations, salt, _b64(parts[4], "the hash", (HASH_LEN,)))
    if parts[1] == "6":
        if len(parts) != 4:
            raise ValueError("a $6$ hash has 3 fields: $6$salt$hash")
        salt = _b64(parts[2], "the salt", (SALT_LEN, HASH_LEN))
        return PasswordHash("sha512", 0, salt, _b64(parts[3], "the hash", (HASH_LEN,)))
    raise ValueError("unknown hash type (expected $7$ or $6$, as mosquitto_passwd writes)")


@dataclass(frozen=True)
class Line:
    """One line of a password file as the editor sees it (``user`` None: blank or comment)."""

    number: int
    text: str  # without the line ending
    user: str | None
    secret: str  # the field after the ':' (a hash, or a plaintext password before -U)


def split_lines(text: str, source: str) -> list[Line]:
    """Split a password file into lines, checking only the ``user:field`` shape.

    Blank lines and lines starting with ``#`` come back with ``user`` None. Raises
    PasswordFileError for a line that is not ``user:field``.
    """
    out: list[Line] = []
    pieces = text.split("\n")
    if pieces[-1] == "":
        pieces.pop()  # the empty "line" after the final newline
    for number, raw in enumerate(pieces, 1):
        line = raw.rstrip(BLANKS)
        if not line.strip(BLANKS) or line.startswith("#"):
            out.append(Line(number, line, None, ""))
            continue
        if "\x00" in line:
            raise PasswordFileError.at(source, number, "the line contains a NUL character")
        user, colon, secret = line.partition(":")
        user, secret = user.strip(BLANKS), secret.strip(BLANKS)
        if not colon:
            raise PasswordFileError.at(source, number, "expected username:hash (no ':' found)")
        if not user:
            raise PasswordFileError.at(source, number, "the username is empty")
        if len(user) > MAX_FIELD:
            raise PasswordFileError.at(source, number, f"the username is longer than {MAX_FIELD} characters")
        if not secret:
            raise PasswordFileError.at(source, number, f"user {user!r} has no password hash")
        if ":" in secret:
            raise PasswordFileError.at(source, number, f"user {user!r}: unexpected ':' after the hash")
        out.append(Line(number, line, user, secret))
    return out


class PasswordFile:
    """The users of one password file and their hashes."""

    def __init__(self, entries: dict[str, PasswordHash], source: str) -> None:
        self.source = source
        self._entries = entries
        # Unknown users are checked against this, so they cost what a known user costs and
        # the time of a refusal does not tell whether the user exists.
        self._decoy = self._make_decoy(entries)

    @staticmethod
    def _make_decoy(entries: dict[str, PasswordHash]) -> PasswordHash:
        common = Counter((h.scheme, h.iterations, len(h.salt)) for h in entries.values()).most_common(1)
        scheme, iterations, salt_len = common[0][0] if common else ("sha512-pbkdf2", DEFAULT_ITERATIONS, SALT_LEN)
        return PasswordHash(scheme, iterations, os.urandom(salt_len), os.urandom(HASH_LEN))

    @classmethod
    def parse(cls, text: str, source: str) -> PasswordFile:
        entries: dict[str, PasswordHash] = {}
        for line in split_lines(text, source):
            if line.user is None:
                continue
            try:
                entries[line.user] = parse_hash(line.secret)  # a later line wins, as in Mosquitto
            except ValueError as exc:
                raise PasswordFileError.at(source, line.number, f"user {line.user!r}: {exc}") from None
        return cls(entries, source)

    @classmethod
    def load(cls, path: Path) -> PasswordFile:
        text = read_text(path, "password file", PasswordFileError, "other local users can read the hashes")
        return cls.parse(text, str(path))

    def __contains__(self, username: object) -> bool:
        return username in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def verify(self, username: str, password: bytes) -> bool:
        """Whether ``password`` is ``username``'s; an unknown user costs as much as a known one."""
        entry = self._entries.get(username)
        if entry is None:
            self._decoy.verify(password)
            return False
        return entry.verify(password)

    def __repr__(self) -> str:
        return f"PasswordFile({self.source!r}, {len(self._entries)} users)"
