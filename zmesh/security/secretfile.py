"""Reading small files that hold secrets (certificates, store keys) safely, and keeping
the node's data dir private (0700).

The file is opened once with O_NONBLOCK (a FIFO under the name must fail, not hang the
node), checked on the descriptor we hold (a regular file, not too large), warned about if
its mode is wider than 0600 (a warning, not a refusal: a chmod slip should not be an
outage), and read with a bound. Every error names the file, never its content.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path


def read_secret_file(
    path: Path,
    *,
    noun: str,
    error: type[Exception],
    max_bytes: int,
    mode_warning: str | None,
    log: logging.Logger,
) -> bytes:
    """The bytes of ``path``; ``error(message)`` for anything wrong. ``noun`` names the kind
    of file in messages; ``mode_warning`` (None: no mode check) says what a wide mode risks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{path}: {noun} not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot open {noun}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # of the file we opened, not of whatever the name points to now
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise error(f"{path}: too large to be a {noun} ({st.st_size} bytes)")
        mode = stat.S_IMODE(st.st_mode)
        if mode_warning is not None and mode & ~0o600:
            if mode & 0o007 == 0 and os.fstatvfs(fd).f_flag & os.ST_RDONLY:
                # Group-readable on a read-only mount: a Kubernetes Secret volume with an
                # fsGroup, whose mode the kubelet sets and nobody can chmod. Others: none.
                log.debug("%s: %s has mode %04o on a read-only mount (no access for others)",
                          path, noun, mode)
            else:
                log.warning("%s: %s has mode %04o, wider than 0600; %s (fix: chmod 600 %s)",
                            path, noun, mode, mode_warning, path)
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, max_bytes + 1)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:  # it grew after the fstat
                raise error(f"{path}: too large to be a {noun}")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{path}: cannot read {noun}: {exc.strerror}") from None
    finally:
        os.close(fd)


def ensure_private_dir(path: Path, *, log: logging.Logger) -> None:
    """Make ``path`` a directory only its owner can enter (0700), creating it if missing.

    A directory that already exists with a wider mode (made by hand with the usual umask)
    is narrowed when we own it, with a warning; one we do not own keeps its mode, also
    with a warning (the files in it are 0600 all the same). ``OSError`` if it cannot be
    created or is not a directory."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path}: not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return
    if st.st_uid == os.geteuid():
        os.chmod(path, mode & 0o700)
        log.warning("%s: data dir had mode %04o; narrowed to %04o (only this user may enter it)",
                    path, mode, mode & 0o700)
    else:
        log.warning("%s: data dir has mode %04o and another owner; its files are 0600, but other "
                    "users can list them (fix: chmod 700 %s)", path, mode, path)
