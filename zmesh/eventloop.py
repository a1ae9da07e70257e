"""Which event loop a node runs on.

uvloop (libuv) where it is installed, which is the default on Linux and macOS: its loop
turns and transports cost a fraction of asyncio's selector loop, and on a lone message
that is most of the Python time between the socket and the subscriber (node to node at
1,000 msgs/s it took ~20 us off a p50 of ~200 us). ``ZMESH_EVENT_LOOP=asyncio`` forces the
standard loop, to compare or to debug; ``=uvloop`` makes a missing uvloop an error.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

ENV = "ZMESH_EVENT_LOOP"
T = TypeVar("T")


def _uvloop() -> Any | None:
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"{ENV}={choice!r}: expected auto, uvloop or asyncio")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop described above."""
    try:
        uvloop = _uvloop()
    except BaseException:
        main.close()  # never started: no "coroutine was never awaited" warning on top
        raise
    if uvloop is not None:
        return uvloop.run(main)  # type: ignore[no-any-return]
    return asyncio.run(main)


class RunQueueWait:
    """Seconds the calling thread has spent runnable but waiting for a CPU (Linux'
    ``/proc/thread-self/schedstat``): how much of a late wake-up the machine, not the node,
    is to blame for. ``read()`` is None where the kernel does not say."""

    def __init__(self) -> None:
        try:
            self._file: Any = open("/proc/thread-self/schedstat", "rb", buffering=0)  # noqa: SIM115
        except OSError:
            self._file = None

    def read(self) -> float | None:
        if self._file is None:
            return None
        try:
            self._file.seek(0)
            return int(self._file.read(128).split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def describe() -> str:
    """The loop ``run`` would use, with its version: for logs and benchmark conditions."""
    uvloop = _uvloop()
    return f"uvloop {uvloop.__version__}" if uvloop is not None else "asyncio"
