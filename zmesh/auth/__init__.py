"""Mosquitto-compatible users and ACLs: the ``password_file`` and ``acl_file`` formats and the
``Authority`` that answers "who may connect" and "who may read or write which topic"."""

from zmesh.auth.acl import AclError, AclFile, Decision
from zmesh.auth.authority import Authority
from zmesh.auth.files import AuthFileError
from zmesh.auth.passwd import PasswordFile, PasswordFileError, hash_password

__all__ = [
    "AclError",
    "AclFile",
    "AuthFileError",
    "Authority",
    "Decision",
    "PasswordFile",
    "PasswordFileError",
    "hash_password",
]
