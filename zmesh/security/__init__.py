"""Security: who may join the mesh, who may connect to the MQTT listener, what is secret.

Rooms: ``certs`` (CURVE certificates in zmq.auth format and the trusted-key ring),
``keys`` (keys for encryption at rest and sealing with AES-256-GCM), ``secretfile``
(reading and writing 0600 files in 0700 directories), ``files`` (reading auth files with
clear errors), ``passwd`` (pure: Mosquitto ``password_file``), ``acl`` (pure: Mosquitto
``acl_file``), ``authority`` (users and ACLs together: "who may connect, read, write").

May import only the standard library, cryptography and zmq (certs). Imported by every
room that checks a key, a password or an ACL. The names below are the Mosquitto-compatible
users-and-ACL API (pure modules only: importing them loads no zmq).
"""


from zmesh.security.acl import AclError, AclFile, Decision
from zmesh.security.authority import Authority
from zmesh.security.files import AuthFileError
from zmesh.security.passwd import PasswordFile, PasswordFileError, hash_password

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
