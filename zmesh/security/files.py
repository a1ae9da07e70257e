"""Reading the two Mosquitto-format files (password_file, acl_file) and their error type."""

from __future__ import annotations

import logging
from pathlib import Path

from zmesh.security.secretfile import read_secret_file

log = logging.getLogger("zmesh.auth")

MAX_FILE_BYTES = 16 * 1024 * 1024


class AuthFileError(ValueError):
    """A password or ACL file that cannot be used; ``str()`` starts with ``<file>:<line>:``
    (or ``<file>:`` when the whole file is at fault) and never quotes a secret.

    ``line`` and ``what`` (the message without the location) are set when a line is at fault.
    """

    def __init__(self, message: str, line: int | None = None, what: str | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.what = what if what is not None else message

    @classmethod
    def at(cls, source: str, line: int, what: str) -> AuthFileError:
        return cls(f"{source}:{line}: {what}", line, what)


def decode_text(data: bytes, source: str, error: type[AuthFileError]) -> str:
    """UTF-8 text of a file, or ``error`` naming the file and the line of the bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error.at(source, data.count(b"\n", 0, exc.start) + 1, "not UTF-8 text") from None


def read_text(path: Path, noun: str, error: type[AuthFileError], mode_warning: str | None = None) -> str:
    """A small text file's content; ``error("<file>: ...")`` if it cannot be read.

    Opened without blocking (a FIFO fails instead of hanging the node) and read with a
    bound; ``mode_warning`` logs a warning when the file is readable beyond its owner.
    """
    data = read_secret_file(
        path, noun=noun, error=error, max_bytes=MAX_FILE_BYTES, mode_warning=mode_warning, log=log
    )
    return decode_text(data, str(path), error)
