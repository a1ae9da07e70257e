"""The pid file of a running node, so that `zmesh node reload` can find it.

A node with a ``node.data_dir`` writes ``<data_dir>/zmesh.pid`` once it is up and removes it
when it stops (only if it still holds its own pid). A node without a data dir writes none:
two nodes sharing a name on one host (tests, demos) must not overwrite each other's file.
"""

from __future__ import annotations

import os
from pathlib import Path

PID_FILE_NAME = "zmesh.pid"


def pid_file_path(data_dir: Path | None) -> Path | None:
    return data_dir / PID_FILE_NAME if data_dir is not None else None


def write_pid_file(path: Path) -> None:
    """Write our pid atomically (a reader never sees a half-written number)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a crashed node with our pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # 0600 from the start
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_pid_file(path: Path) -> None:
    """Remove the file if it is still ours (a newer node may have replaced it)."""
    try:
        if read_pid(path) == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def read_pid(path: Path) -> int:
    """The pid in ``path``; OSError if unreadable, ValueError if it holds no pid."""
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not text.isdigit() or not 0 < int(text) < 2**22:
        raise ValueError(f"{path}: does not hold a process id")
    return int(text)


def is_zmesh_process(pid: int) -> bool | None:
    """Whether ``pid`` runs zmesh (None: cannot tell on this system). Guards against a stale
    pid file whose number now belongs to some other process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False if Path("/proc/self").exists() else None
    except OSError:
        return None
    return b"zmesh" in cmdline
