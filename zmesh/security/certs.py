"""CURVE certificates on disk, and the ring of trusted public keys.

Files use pyzmq's ``zmq.auth`` format so that operators can mix our tooling with pyzmq's and
czmq's: ``NAME.key`` holds the public key (share it), ``NAME.key_secret`` holds both keys
(mode 0600, never shared). The text is ZPL exactly as ``zmq.auth.create_certificates`` writes
it, so ``zmq.auth.load_certificate`` reads our files and we read theirs.

Two rules run through this module:

* The secret file is created with mode 0600 by ``os.open`` itself, never chmod-ed down after
  the fact: a file that is briefly 0644 can be read by anyone who is watching the directory.
* No exception message and no log line ever carries secret key material. Parse errors name
  the file and the line number only, and are raised ``from None`` so that a chained
  low-level exception cannot smuggle file content into a traceback.

File I/O only: no asyncio and no sockets. ``KeyRing.callback`` is called by pyzmq's ZAP
authenticator on its own thread, so the ring is copy-on-write (see ``KeyRing``).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

import zmq
from zmq.utils import z85

from zmesh.security.secretfile import read_secret_file

log = logging.getLogger("zmesh.certs")

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"

# Names become file names; this keeps them free of path separators and shell surprises. The
# length cap leaves room for the suffix and a temp-file prefix under the usual 255-byte
# file-name limit.
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_NAME_MAX = 128

# A certificate is ~400 bytes; anything much bigger is not one, and reading it whole (say,
# a log file dropped into the trusted directory by mistake) would only waste memory.
_MAX_CERT_BYTES = 64 * 1024

_Z85_ALPHABET = frozenset(
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)
_Z85_KEY_LEN = 40  # 32-byte CURVE key in Z85

# The banners pyzmq writes (zmq/auth/certs.py), copied rather than imported because they are
# private names there; the format is what must stay compatible, not the module's internals.
_SECRET_BANNER = """#   ****  Generated on {0} by pyzmq  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""
_PUBLIC_BANNER = """#   ****  Generated on {0} by pyzmq  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange. Store public certificates in your home
#   directory, in the .curve subdirectory.

"""


class CertError(Exception):
    """A certificate could not be created or read. The message names the file and never
    contains key material."""


# ---------------------------------------------------------------------------- helpers


def validate_name(name: str) -> str:
    """Return ``name`` if it is a usable certificate name, else raise CertError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or len(name) > _NAME_MAX:
        raise CertError(
            f"invalid certificate name {name!r}: use 1-{_NAME_MAX} characters from A-Z a-z 0-9 _ . -"
        )
    if name in (".", ".."):
        # Legal characters, but "..key" next to ".key" invites confusion and mistakes.
        raise CertError(f"invalid certificate name {name!r}")
    return name


def _is_z85_key(value: bytes) -> bool:
    if len(value) != _Z85_KEY_LEN or not _Z85_ALPHABET.issuperset(value):
        return False
    try:
        # Some 5-character groups overflow 32 bits; decoding is the only full check.
        return len(z85.decode(value)) == 32
    except Exception:  # noqa: BLE001 - any decoding failure just means "not a key"
        return False


def _render(banner: str, public: bytes, secret: bytes | None) -> bytes:
    """ZPL text exactly as ``zmq.auth.certs._write_key_file`` produces it."""
    lines = [banner.format(datetime.datetime.now()), "metadata\n", "curve\n"]
    lines.append(f'    public-key = "{public.decode("ascii")}"\n')
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"\n')
    return "".join(lines).encode("utf-8")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)  # a power cut must not leave an empty certificate behind the new name


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (which must not exist) with ``mode`` from the first instant."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        # The umask can only narrow the mode given to open(); set it exactly (0644 for the
        # public file, 0600 for the secret) without ever passing through anything wider.
        os.fchmod(fd, mode)
        _write_all(fd, data)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _write_replace(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace ``path``: readers see the old file or the new one, never half."""
    # mkstemp creates the file O_EXCL with mode 0600, so the secret is never wider than that.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        _write_all(fd, data)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def _read_cert_bytes(path: Path, *, check_mode: bool) -> bytes:
    return read_secret_file(
        path, noun="certificate", error=CertError, max_bytes=_MAX_CERT_BYTES, log=log,
        mode_warning="anyone who can read it can impersonate this node" if check_mode else None,
    )


def _parse(path: Path, data: bytes) -> tuple[bytes, bytes | None]:
    """Keys from ZPL text, read the way ``zmq.auth.load_certificate`` reads them (any line
    starting with ``public-key``/``secret-key``), but every value is checked.

    Messages say which line is wrong, never what is on it: that line may be a secret key.
    """
    found: dict[bytes, bytes] = {}
    for lineno, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        for field in (b"public-key", b"secret-key"):
            if not line.startswith(field):
                continue
            _, eq, value = line.partition(b"=")
            if not eq:
                raise CertError(f"{path}: line {lineno}: {field.decode()} without '='")
            value = value.strip(b" \t'\"")
            if not _is_z85_key(value):
                raise CertError(
                    f"{path}: line {lineno}: {field.decode()} is not a 40-character Z85 CURVE key"
                )
            if found.get(field, value) != value:
                raise CertError(f"{path}: line {lineno}: second, different {field.decode()}")
            found[field] = value
    public = found.get(b"public-key")
    secret = found.get(b"secret-key")
    if public is None:
        raise CertError(f"{path}: no public-key found: not a CURVE certificate")
    if secret is not None:
        try:
            derived = zmq.curve_public(secret)
        except Exception:  # noqa: BLE001 - its message could echo the key; say nothing of it
            raise CertError(f"{path}: secret-key is not a valid CURVE key") from None
        if derived != public:
            raise CertError(
                f"{path}: public-key does not belong to the secret-key in the same file"
            )
    return public, secret


# ---------------------------------------------------------------------------- public API


def create_certificate(directory: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Create ``NAME.key`` (0644) and ``NAME.key_secret`` (0600) in ``directory``.

    Refuses to touch an existing certificate of that name unless ``force``; then both files
    are replaced atomically. ``directory`` is created with mode 0700 if missing (it will hold
    secrets). Returns ``(public_path, secret_path)``.
    """
    validate_name(name)
    directory = Path(directory)
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    secret_path = directory / f"{name}{SECRET_SUFFIX}"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CertError(
            f"{directory}: cannot create certificate directory: {exc.strerror}"
        ) from None

    public, secret = zmq.curve_keypair()
    secret_text = _render(_SECRET_BANNER, public, secret)
    public_text = _render(_PUBLIC_BANNER, public, None)

    if not force:
        # Checked up front so that a stray public file does not leave us with a fresh secret
        # and no matching public file. O_EXCL below still guards against races.
        for existing in (secret_path, public_path):
            if existing.exists() or existing.is_symlink():
                raise CertError(f"{existing}: already exists; refusing to overwrite (zmesh certs create --force replaces it)")
        try:
            _write_new(secret_path, secret_text, 0o600)
        except FileExistsError:
            raise CertError(
                f"{secret_path}: already exists; refusing to overwrite (use force)"
            ) from None
        except OSError as exc:
            raise CertError(f"{secret_path}: cannot write certificate: {exc.strerror}") from None
        try:
            _write_new(public_path, public_text, 0o644)
        except OSError as exc:
            # Do not leave a secret whose public half we failed to write.
            secret_path.unlink(missing_ok=True)
            if isinstance(exc, FileExistsError):
                raise CertError(
                    f"{public_path}: already exists; refusing to overwrite (use force)"
                ) from None
            raise CertError(f"{public_path}: cannot write certificate: {exc.strerror}") from None
    else:
        # Secret first: if we fail in between, the old public file names a key that no longer
        # exists, which fails closed (peers cannot connect) rather than open.
        for path, text, mode in (
            (secret_path, secret_text, 0o600),
            (public_path, public_text, 0o644),
        ):
            try:
                _write_replace(path, text, mode)
            except OSError as exc:
                raise CertError(f"{path}: cannot write certificate: {exc.strerror}") from None
    log.info("created certificate %s (public key %s)", name, public.decode())
    return public_path, secret_path


def load_secret_certificate(path: Path) -> tuple[bytes, bytes]:
    """``(public_z85, secret_z85)`` from a ``.key_secret`` file.

    Raises CertError if the file is missing, unreadable, malformed, holds no secret key, or
    holds a public key that does not match its secret. A mode wider than 0600 is logged as a
    warning (not refused: refusing would turn an operator's chmod slip into an outage).
    """
    path = Path(path)
    public, secret = _parse(path, _read_cert_bytes(path, check_mode=True))
    if secret is None:
        raise CertError(
            f"{path}: no secret-key: this is a public certificate (use NAME{SECRET_SUFFIX})"
        )
    return public, secret


def load_public_key(path: Path) -> bytes:
    """The Z85 public key (40 bytes) from a ``.key`` or ``.key_secret`` file."""
    path = Path(path)
    public, _ = _parse(path, _read_cert_bytes(path, check_mode=False))
    return public


def list_certificates(directory: Path) -> list[tuple[str, bytes, bool]]:
    """``(name, public_z85, has_secret)`` for every ``*.key`` file, sorted by name.

    Raises CertError if the directory does not exist or a ``.key`` file is malformed.
    """
    directory = Path(directory)
    result = []
    for name, path in _public_files(directory):
        has_secret = (directory / f"{name}{SECRET_SUFFIX}").is_file()
        result.append((name, load_public_key(path), has_secret))
    return result


def _public_files(directory: Path) -> list[tuple[str, Path]]:
    if not directory.is_dir():
        raise CertError(f"{directory}: certificate directory not found")
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise CertError(f"{directory}: cannot list certificate directory: {exc.strerror}") from None
    # Only *.key: never the secrets (a node's trusted dir often is its cert dir), and not
    # editor leftovers like "a.key~" or "a.key.swp".
    return [
        (p.name[: -len(PUBLIC_SUFFIX)], p)
        for p in entries
        if p.name.endswith(PUBLIC_SUFFIX) and p.is_file()
    ]


# ---------------------------------------------------------------------------- key ring


class KeyRing:
    """In-memory ring of trusted CURVE public keys (Z85 bytes -> name).

    Loaded from a directory of ``*.key`` public files (never ``*.key_secret``). It serves as
    pyzmq's ZAP credentials provider: ``Authenticator.configure_curve_callback(domain='*',
    credentials_provider=ring)`` calls ``ring.callback(domain, z85_key)`` on the authenticator
    thread. Readers therefore take no lock: every change builds a new dict and publishes it
    with one attribute assignment (atomic under the GIL), so a handshake sees either the old
    ring or the new one, never a half-updated one. A lock serialises writers only.
    """

    # Distinct refused keys we remember so a scanner retrying one key does not flood the log.
    _LOGGED_REJECTS_MAX = 1024

    def __init__(self, keys: Mapping[bytes, str] | None = None) -> None:
        checked: dict[bytes, str] = {}
        for key, name in (keys or {}).items():
            checked[self._check_key(key)] = name
        self._keys: dict[bytes, str] = checked
        self._write_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._logged_rejects: set[bytes] = set()
        self.directory: Path | None = None
        self.rejected_total: int = 0

    @staticmethod
    def _check_key(key: bytes | str) -> bytes:
        if isinstance(key, str):
            key = key.encode("ascii", "replace")
        if not isinstance(key, bytes) or not _is_z85_key(key):
            raise CertError("not a 40-character Z85 CURVE public key")
        return key

    @staticmethod
    def _read_directory(directory: Path) -> dict[bytes, str]:
        """Every key in ``directory``; raises CertError on the first bad file."""
        keys: dict[bytes, str] = {}
        for name, path in _public_files(directory):
            key = load_public_key(path)
            if key in keys:
                # Sorted order makes the surviving name deterministic.
                log.warning(
                    "%s: same public key as %s.key; keeping the name %r", path, keys[key], keys[key]
                )
                continue
            keys[key] = name
        if not keys:
            log.warning(
                "%s: no *.key files: the trusted ring is empty and admits nobody", directory
            )
        return keys

    @classmethod
    def from_directory(cls, directory: Path) -> KeyRing:
        directory = Path(directory)
        ring = cls(cls._read_directory(directory))
        ring.directory = directory
        return ring

    def reload(self) -> tuple[set[str], set[str]]:
        """Re-read the directory; the directory is the whole truth (keys added with ``add``
        and not on disk are dropped).

        Every file is validated before anything changes: on a bad file this raises CertError
        and the old ring stays in force, so a typo in one file cannot lock everyone out.
        Returns ``(added, removed)`` names; a name whose key changed is in both.
        """
        if self.directory is None:
            raise CertError("this key ring was not loaded from a directory; nothing to reload")
        fresh = self._read_directory(self.directory)
        with self._write_lock:
            old_pairs = set(self._keys.items())
            new_pairs = set(fresh.items())
            self._keys = fresh
        added = {name for _, name in new_pairs - old_pairs}
        removed = {name for _, name in old_pairs - new_pairs}
        return added, removed

    def add(self, public_z85: bytes, name: str) -> None:
        key = self._check_key(public_z85)
        with self._write_lock:
            fresh = dict(self._keys)
            fresh[key] = name
            self._keys = fresh

    def remove(self, public_z85: bytes) -> None:
        with self._write_lock:
            if public_z85 in self._keys:
                fresh = dict(self._keys)
                del fresh[public_z85]
                self._keys = fresh

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP decision for a connecting client's Z85 key (authenticator thread)."""
        keys = self._keys  # one read: a concurrent reload swaps the whole dict
        if isinstance(key, str):
            key = key.encode("ascii", "replace")
        if key in keys:
            return True
        with self._count_lock:
            self.rejected_total += 1
            first_time = key not in self._logged_rejects
            if first_time and len(self._logged_rejects) < self._LOGGED_REJECTS_MAX:
                self._logged_rejects.add(key)
            else:
                first_time = False
        if first_time:
            # A public key is not a secret; naming it is what lets an operator trust it.
            log.warning(
                "refused CURVE key %s (domain %r): not in the trusted ring",
                key.decode("ascii", "replace"),
                domain,
            )
        return False

    def name_of(self, key: bytes) -> str | None:
        return self._keys.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[bytes]:
        return list(self._keys)

    def __repr__(self) -> str:
        return f"KeyRing({len(self._keys)} keys, directory={self.directory!s})"
