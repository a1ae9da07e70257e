"""Who may connect, and who may read or write which topic: the password and ACL files together.

``allow_anonymous`` (a client that sends no username):

* set explicitly in the config: that value;
* not set: allowed when no ``password_file`` is configured, refused when one is. (Mosquitto
  2.0 refuses anonymous clients unless told otherwise; a node without a password file
  would then refuse everyone, which is not what a sidecar on loopback wants.)

As in Mosquitto 2.0: without a password file, a client that sends a username is treated
like an anonymous one (it gets in exactly when anonymous clients do, whatever its
password); with one, a username must be in the file and its password must match. Without
an ACL file every client may read and write everything.

``reload()`` re-reads both files, validates both, and only then swaps the rules in; a broken
file keeps the old rules (never "allow all") and says why. ``generation`` grows on every
successful reload so that callers caching decisions know to drop them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zmesh.security.acl import AclFile, Decision
from zmesh.security.files import AuthFileError
from zmesh.security.passwd import PasswordFile

log = logging.getLogger("zmesh.auth")

_NO_ACL = Decision(True, None, "no acl_file: every client may read and write every topic")


@dataclass(frozen=True)
class _Rules:
    passwords: PasswordFile | None
    acl: AclFile | None


class Authority:
    """Authentication and authorization for one MQTT listener (or a whole node)."""

    def __init__(
        self,
        password_file: Path | None,
        acl_file: Path | None,
        allow_anonymous: bool | None,
    ) -> None:
        self.password_file = Path(password_file) if password_file is not None else None
        self.acl_file = Path(acl_file) if acl_file is not None else None
        self.allow_anonymous = allow_anonymous if allow_anonymous is not None else self.password_file is None
        self.generation = 0
        self._rules = self._load()  # raises AuthFileError: a broken file at startup is fatal

    @classmethod
    def from_config(cls, mqtt_config: Any) -> Authority:
        """From an ``MqttConfig`` (``password_file``, ``acl_file``, ``allow_anonymous``)."""
        return cls(
            getattr(mqtt_config, "password_file", None),
            getattr(mqtt_config, "acl_file", None),
            getattr(mqtt_config, "allow_anonymous", None),
        )

    def _load(self) -> _Rules:
        passwords = PasswordFile.load(self.password_file) if self.password_file is not None else None
        acl = AclFile.load(self.acl_file) if self.acl_file is not None else None
        for warning in acl.warnings if acl is not None else ():
            log.warning("%s (as Mosquitto, it then applies to every client alike)", warning)
        return _Rules(passwords, acl)

    @property
    def enabled(self) -> bool:
        """Whether any check can refuse anything (False: every client may do everything)."""
        return self.password_file is not None or self.acl_file is not None or not self.allow_anonymous

    @property
    def acl_warnings(self) -> tuple[str, ...]:
        acl = self._rules.acl
        return acl.warnings if acl is not None else ()

    def reload(self) -> str | None:
        """Re-read both files; None when the new rules are in, else why the old ones stay."""
        try:
            rules = self._load()  # both parsed and validated before anything changes
        except AuthFileError as exc:
            return str(exc)
        self._rules = rules  # one assignment: a check sees the old rules or the new, never a mix
        self.generation += 1
        return None

    def authenticate(self, username: str | None, password: bytes | None) -> bool:
        """May a client with this username (None: none sent) and password connect?

        May take a while with high PBKDF2 iteration counts: call it from a thread if the
        password file uses them."""
        passwords = self._rules.passwords
        if username is None or passwords is None:
            return self.allow_anonymous
        if password is None:
            return False  # the same answer for every user, so it reveals none
        return passwords.verify(username, password)

    def explain(self, username: str | None, client_id: str, topic: str, access: str) -> Decision:
        """The decision for one access ("read", "write" or "subscribe") and why."""
        acl = self._rules.acl
        if acl is None:
            if access not in ("read", "write", "subscribe"):
                raise ValueError(f"access must be read, write or subscribe, not {access!r}")
            return _NO_ACL
        return acl.check(username, client_id, topic, access)  # type: ignore[arg-type]

    def authorize(self, username: str | None, client_id: str, topic: str, access: str) -> bool:
        return self.explain(username, client_id, topic, access).allowed

    def __repr__(self) -> str:
        return (
            f"Authority(password_file={self.password_file}, acl_file={self.acl_file}, "
            f"allow_anonymous={self.allow_anonymous}, generation={self.generation})"
        )
