"""`zmesh passwd`: mosquitto_passwd's semantics and messages, writing files Mosquitto reads.

::

    zmesh passwd [-H sha512|sha512-pbkdf2] [-I iterations] [-c | -D] FILE USER
    zmesh passwd [-H ...] [-I ...] [-c] -b FILE USER PASSWORD
    zmesh passwd -U FILE

Differences from mosquitto_passwd 2.0.11, each on purpose:

* the file is written to a temporary file beside it (mode 0600) and renamed over it, so a
  crash never leaves half a file (mosquitto_passwd rewrites in place from a backup) and
  the hashes are not readable by other users (mosquitto_passwd leaves the mode to the umask);
* comments and blank lines are kept (mosquitto_passwd calls them corrupt, and in 2.0.11
  drops the rest of the file after one);
* ``-U`` leaves lines that already hold a hash alone (mosquitto_passwd hashes the hash);
* ``-H`` and ``-I`` apply to ``-U`` too.

The file logic is pure (``plan_*`` take the current text, return the new text); ``run``
does the reading, prompting and writing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zmesh.security.passwd import (
    BLANKS,
    DEFAULT_ITERATIONS,
    MAX_FIELD,
    SCHEMES,
    Line,
    PasswordFileError,
    hash_password,
    parse_hash,
    split_lines,
)

USAGE = """\
zmesh passwd is a tool for managing password files for zmesh and mosquitto.

Usage: zmesh passwd [-H sha512 | -H sha512-pbkdf2] [-c | -D] passwordfile username
       zmesh passwd [-H sha512 | -H sha512-pbkdf2] [-c] -b passwordfile username password
       zmesh passwd -U passwordfile
 -b : run in batch mode to allow passing passwords on the command line.
 -c : create a new password file. This will overwrite existing files.
 -D : delete the username rather than adding/updating its password.
 -H : specify the hashing algorithm. Defaults to sha512-pbkdf2, which is recommended.
 -I : PBKDF2 iterations (default 101, as mosquitto_passwd).
 -U : update a plain text password file to use hashed passwords.
"""


class PasswdError(Exception):
    """A refusal with mosquitto_passwd's message (printed as is, exit code 1)."""


@dataclass(frozen=True)
class Request:
    file: Path
    username: str | None
    password: str | None  # -b only
    create: bool = False
    batch: bool = False
    delete: bool = False
    update: bool = False
    scheme: str = "sha512-pbkdf2"
    iterations: int = DEFAULT_ITERATIONS


def parse_request(
    args: list[str], *, create: bool, batch: bool, delete: bool, update: bool,
    scheme: str | None, iterations: int | None,
) -> Request:
    """Check flags and positional arguments as mosquitto_passwd does; PasswdError if wrong.

    A PasswdError whose message is USAGE means: print the usage."""
    if scheme is not None and scheme not in SCHEMES:
        raise PasswdError(f"Error: Unknown hash type '{scheme}'")
    if iterations is not None and iterations < 1:
        raise PasswdError("Error: Number of iterations must be > 0.")
    for a, b, names in ((create, delete, "-c and -D"), (create, update, "-c and -U"),
                        (delete, update, "-D and -U"), (delete, batch, "-b and -D")):
        if a and b:
            raise PasswdError(f"Error: {names} cannot be used together.")
    n = len(args)
    if create and batch and n < 3:
        raise PasswdError("Error: -c argument given but password file, username, or password missing.")
    if create and not batch and n < 2:
        raise PasswdError("Error: -c argument given but password file or username missing.")
    if delete and n < 2:
        raise PasswdError("Error: -D argument given but password file or username missing.")
    if update and n != 1:
        raise PasswdError("Error: -U argument given but password file missing.")
    if not (create or delete or update) and n != (3 if batch else 2):
        raise PasswdError(USAGE)
    username = args[1] if n > 1 and not update else None
    password = args[2] if batch and n > 2 else None
    if username is not None:
        check_username(username)
    if password is not None and len(os.fsencode(password)) > MAX_FIELD:
        raise PasswdError("Error: Password must be less than 65536 characters long.")
    return Request(
        Path(args[0]), username, password, create, batch, delete, update,
        scheme or "sha512-pbkdf2", iterations or DEFAULT_ITERATIONS,
    )


def check_username(username: str) -> None:
    if len(os.fsencode(username)) > MAX_FIELD:
        raise PasswdError("Error: Username must be less than 65536 characters long.")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in username):
        raise PasswdError("Error: Username must not contain control characters.")
    if ":" in username:
        raise PasswdError("Error: Username must not contain the ':' character.")
    if not username or username != username.strip(BLANKS):
        # Mosquitto trims blanks around the name it reads, so " bob" could never log in.
        raise PasswdError("Error: Username must not be empty or start or end with white space.")


def _lines(text: str, source: str) -> list[Line]:
    try:
        return split_lines(text, source)
    except PasswordFileError as exc:
        raise PasswdError(f"Error: Corrupt password file at line {exc.line}: {exc.what}.") from None


def _join(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def plan_set(text: str, source: str, username: str, hashed: str) -> str:
    """``text`` with ``username``'s hash replaced (first line kept, later duplicates
    dropped) or appended."""
    out: list[str] = []
    found = False
    for line in _lines(text, source):
        if line.user == username:
            if not found:
                out.append(f"{username}:{hashed}")
                found = True
            continue
        out.append(line.text)
    if not found:
        out.append(f"{username}:{hashed}")
    return _join(out)


def plan_delete(text: str, source: str, username: str) -> str:
    lines = _lines(text, source)
    if not any(line.user == username for line in lines):
        raise PasswdError(f"Warning: User {username} not found in password file.")
    return _join([line.text for line in lines if line.user != username])


def plan_upgrade(text: str, source: str, hasher: Callable[[str], str]) -> str:
    """Every plaintext password hashed with ``hasher``; lines already hashed kept."""
    out: list[str] = []
    for line in _lines(text, source):
        if line.user is None:
            out.append(line.text)
            continue
        try:
            parse_hash(line.secret)
            out.append(line.text)  # already a hash: hashing it again would lock the user out
        except ValueError:
            out.append(f"{line.user}:{hasher(line.secret)}")
    return _join(out)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` (following a symlink to its target) with ``text``, mode 0600."""
    target = Path(os.path.realpath(path))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode is narrowed by the umask, never widened
            data = text.encode("utf-8", "surrogateescape")
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _read(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PasswdError(f"Error: Unable to open password file {path}. {exc.strerror}.") from None
    return data.decode("utf-8", "surrogateescape")


def ask_password(prompt: Callable[[str], str]) -> str:
    """Twice, as mosquitto_passwd: refuses an empty password and a mismatch."""
    first = prompt("Password: ")
    if not first:
        raise PasswdError("Error: Empty password.")
    if prompt("Reenter password: ") != first:
        raise PasswdError("Error: Passwords do not match.")
    return first


def run(request: Request, prompt: Callable[[str], str]) -> None:
    """Carry out one `zmesh passwd` request; PasswdError with the message to print."""

    def hasher(password: str) -> str:
        return hash_password(os.fsencode(password), request.scheme, request.iterations)

    path = request.file
    if request.update:
        new = plan_upgrade(_read(path), str(path), hasher)
    elif request.delete:
        assert request.username is not None
        new = plan_delete(_read(path), str(path), request.username)
    else:
        assert request.username is not None
        current = None if request.create else _read(path)  # before prompting, as mosquitto_passwd
        password = request.password if request.batch else ask_password(prompt)
        assert password is not None
        line_hash = hasher(password)
        new = f"{request.username}:{line_hash}\n" if current is None else plan_set(current, str(path), request.username, line_hash)
    try:
        write_atomically(path, new)
    except OSError as exc:
        raise PasswdError(f"Error: Unable to open file {path} for writing. {exc.strerror}.") from None
