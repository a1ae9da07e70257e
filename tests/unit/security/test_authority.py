"""Authority: allow_anonymous defaults, Mosquitto 2.0's authentication answers, ACL checks,
and reload (validate both files, then swap; a broken file keeps the old rules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from zmesh.config import MqttConfig
from zmesh.security import AclError, AuthFileError, Authority, PasswordFileError, hash_password


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{hash_password(b'a1')}\n")
    passwd.chmod(0o600)
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic read a/#\n")
    return passwd, acl


@pytest.mark.parametrize(
    "with_passwords, setting, expected",
    [(False, None, True), (True, None, False), (False, False, False), (True, True, True)],
)
def test_allow_anonymous_default_and_explicit(
    files: tuple[Path, Path], with_passwords: bool, setting: bool | None, expected: bool
) -> None:
    auth = Authority(files[0] if with_passwords else None, None, setting)
    assert auth.allow_anonymous is expected
    assert auth.authenticate(None, None) is expected


# What a real Mosquitto 2.0.11 answers (tests/integration/mqtt/test_mosquitto_compat.py checks
# the same table against it): (password_file?, allow_anonymous) -> anonymous, alice right,
# alice wrong, unknown user, alice without a password.
MOSQUITTO_CONNECT = [
    (False, True, (True, True, True, True, True)),
    (False, False, (False, False, False, False, False)),
    (True, True, (True, True, False, False, False)),
    (True, False, (False, True, False, False, False)),
]


@pytest.mark.parametrize("with_passwords, anonymous, expected", MOSQUITTO_CONNECT)
def test_authenticate_answers_as_mosquitto(
    files: tuple[Path, Path], with_passwords: bool, anonymous: bool, expected: tuple[bool, ...]
) -> None:
    auth = Authority(files[0] if with_passwords else None, None, anonymous)
    got = (
        auth.authenticate(None, None),
        auth.authenticate("alice", b"a1"),
        auth.authenticate("alice", b"wrong"),
        auth.authenticate("zed", b"a1"),
        auth.authenticate("alice", None),
    )
    assert got == expected


def test_no_acl_file_allows_everything() -> None:
    auth = Authority(None, None, None)
    assert not auth.enabled
    for access in ("read", "write", "subscribe"):
        assert auth.authorize(None, "c", "$SYS/x", access)
    assert "no acl_file" in auth.explain("u", "c", "t", "read").reason
    with pytest.raises(ValueError):
        auth.explain("u", "c", "t", "publish")


def test_acl_file_decides(files: tuple[Path, Path]) -> None:
    auth = Authority(None, files[1], None)
    assert auth.enabled
    assert auth.authorize("alice", "c", "a/b", "read")
    assert not auth.authorize("alice", "c", "a/b", "write")
    assert not auth.authorize(None, "c", "a/b", "read")
    assert auth.explain("alice", "c", "a/b", "read").line == 2


def test_from_config(files: tuple[Path, Path]) -> None:
    auth = Authority.from_config(MqttConfig(password_file=files[0], acl_file=files[1], allow_anonymous=True))
    assert (auth.password_file, auth.acl_file, auth.allow_anonymous) == (files[0], files[1], True)
    assert Authority.from_config(MqttConfig()).enabled is False


def test_broken_files_at_startup_name_file_and_line(files: tuple[Path, Path]) -> None:
    passwd, acl = files
    acl.write_text("user alice\ntopic read a/#\ntopic wrte b\n")
    with pytest.raises(AclError, match=rf"^{acl}:3: invalid access 'wrte'"):
        Authority(passwd, acl, None)
    passwd.write_text("alice:cleartext\n")
    with pytest.raises(PasswordFileError, match=rf"^{passwd}:1: user 'alice': the password is not hashed") as info:
        Authority(passwd, None, None)
    assert "cleartext" not in str(info.value)
    with pytest.raises(AuthFileError, match="not found"):
        Authority(passwd.with_name("missing"), None, None)


def test_reload_swaps_in_new_rules_and_bumps_generation(files: tuple[Path, Path]) -> None:
    passwd, acl = files
    auth = Authority(passwd, acl, None)
    assert auth.generation == 0 and not auth.authorize("alice", "c", "b", "read")
    acl.write_text("user alice\ntopic read b\n")
    passwd.write_text(f"alice:{hash_password(b'a2')}\n")
    assert auth.reload() is None
    assert auth.generation == 1
    assert auth.authorize("alice", "c", "b", "read") and not auth.authorize("alice", "c", "a/x", "read")
    assert auth.authenticate("alice", b"a2") and not auth.authenticate("alice", b"a1")


def test_a_broken_file_keeps_the_old_rules_of_both(files: tuple[Path, Path]) -> None:
    passwd, acl = files
    auth = Authority(passwd, acl, None)
    acl.write_text("user alice\ntopic read b\n")  # valid on its own...
    passwd.write_text("alice:$7$101$broken\n")  # ...but the password file is not
    problem = auth.reload()
    assert problem is not None and problem.startswith(f"{passwd}:1: ")
    assert auth.generation == 0
    # nothing swapped: not the new ACL either, and never "allow all"
    assert auth.authorize("alice", "c", "a/x", "read") and not auth.authorize("alice", "c", "b", "read")
    assert auth.authenticate("alice", b"a1")
    acl.write_text("user alice\ntopic rread b\n")
    passwd.write_text(f"alice:{hash_password(b'a1')}\n")
    assert (auth.reload() or "").startswith(f"{acl}:2: ")
    acl.unlink()
    assert "not found" in (auth.reload() or "")
    assert auth.generation == 0 and not auth.authorize("bob", "c", "a/x", "read")
