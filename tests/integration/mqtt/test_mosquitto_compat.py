"""Cross-checks against the real thing: Mosquitto 2.0's password and ACL files.

* files written by ``mosquitto_passwd`` verify in ``PasswordFile``;
* files written by ``zmesh passwd`` are accepted by a real ``mosquitto``, which answers a
  right and a wrong password as ``Authority`` does, for every allow_anonymous setting;
* for one ACL file, a matrix of users x topics x read/write/subscribe observed on a real
  Mosquitto (a full-rights writer and one subscriber per user; each user publishing with
  a full-rights observer) agrees with ``AclFile.check`` cell by cell;
* files Mosquitto refuses to start with, ``AclFile`` refuses too, and the reverse.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import zmesh_cli
from tests.mosquitto_broker import (
    HAVE_MOSQUITTO,
    HAVE_MOSQUITTO_CLIENTS,
    NO_MOSQUITTO,
    Client,
    MosquittoBroker,
    connack_ok,
)
from zmesh.security import AclError, AclFile, Authority, PasswordFile

pytestmark = pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NO_MOSQUITTO)
needs_clients = pytest.mark.skipif(
    not HAVE_MOSQUITTO_CLIENTS, reason="needs mosquitto_passwd/mosquitto_pub (Debian package mosquitto-clients)"
)


# ---------------------------------------------------------------------------- passwords


@needs_clients
@pytest.mark.parametrize("flags", [[], ["-H", "sha512"], ["-H", "sha512-pbkdf2", "-I", "1000"]])
def test_files_from_mosquitto_passwd_verify(tmp_path: Path, flags: list[str]) -> None:
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", *flags, "-c", "-b", str(path), "alice", "s3cret"], check=True)
    subprocess.run(["mosquitto_passwd", *flags, "-b", str(path), "bob", "pässwörd"], check=True)
    assert path.read_text().startswith("alice:$6$" if flags[:2] == ["-H", "sha512"] else "alice:$7$")
    pw = PasswordFile.load(path)
    assert pw.verify("alice", b"s3cret") and pw.verify("bob", "pässwörd".encode())
    assert not pw.verify("alice", b"s3cret ") and not pw.verify("bob", b"s3cret")


@needs_clients
def test_a_file_upgraded_by_mosquitto_passwd_verifies(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_text("carol:plain\ndave:other\n")
    subprocess.run(["mosquitto_passwd", "-U", str(path)], check=True)
    pw = PasswordFile.load(path)
    assert pw.verify("carol", b"plain") and pw.verify("dave", b"other") and not pw.verify("carol", b"Plain")


@needs_clients
def test_files_from_zmesh_passwd_are_accepted_by_mosquitto(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    users = {"alice": ("s3cret", []), "bob": ("pässwörd", ["-H", "sha512"]), "carol": ("pw 3", ["-I", "2000"])}
    first = True
    for user, (password, flags) in users.items():
        result = zmesh_cli("passwd", *flags, *(["-c"] if first else []), "-b", str(path), user, password)
        assert result.returncode == 0, result.stderr
        first = False
    plain = tmp_path / "plain"
    plain.write_text("# migrated\ndave:plain-text\n")
    assert zmesh_cli("passwd", "-U", str(plain)).returncode == 0
    path.write_text(path.read_text() + plain.read_text())
    users["dave"] = ("plain-text", [])
    assert path.stat().st_mode & 0o777 == 0o600
    auth = Authority(path, None, False)
    with MosquittoBroker(tmp_path, password_file=path, allow_anonymous=False) as broker:
        for user, (password, _) in users.items():
            assert connack_ok(broker.port, user, password), f"mosquitto refused {user}:\n{broker.log()}"
            assert not connack_ok(broker.port, user, password + "x")
            assert auth.authenticate(user, password.encode()) and not auth.authenticate(user, (password + "x").encode())
            ok = subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-u", user, "-P", password, "-t", "t", "-m", "m"],
                                capture_output=True, timeout=10)
            bad = subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-u", user, "-P", "wrong", "-t", "t", "-m", "m"],
                                 capture_output=True, timeout=10)
            assert ok.returncode == 0 and bad.returncode != 0, (ok.stderr, bad.stderr)
        assert "removing entry" not in broker.log()


@needs_clients
@pytest.mark.parametrize("with_passwords", [False, True])
@pytest.mark.parametrize("anonymous", [True, False])
def test_who_may_connect_as_mosquitto(tmp_path: Path, with_passwords: bool, anonymous: bool) -> None:
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "alice", "a1"], check=True)
    auth = Authority(path if with_passwords else None, None, anonymous)
    with MosquittoBroker(tmp_path, password_file=path if with_passwords else None, allow_anonymous=anonymous) as broker:
        for user, password in [(None, None), ("alice", "a1"), ("alice", "x"), ("zed", "a1"), ("alice", None)]:
            expected = connack_ok(broker.port, user, password)
            got = auth.authenticate(user, password.encode() if password is not None else None)
            assert got == expected, (user, password, with_passwords, anonymous)


# ---------------------------------------------------------------------------- ACLs

ACL = """\
# anonymous clients
topic read public/#
topic deny public/secret

user alice
topic readwrite alice/#
topic read shared/+/status
topic deny shared/hidden/#
topic read shared/#
topic write $app/alice

user bob
topic write bob/in
topic read
topic read $app/#
topic deny devices/bob/#

user p+q
topic read fence/#
topic readwrite pq/#

user carol
topic read fence/#
topic read carol/#

user eve
topic read #
topic write +/x

user admin
topic #
topic $app/#

pattern read devices/%u/#
pattern write clients/%c/out
pattern deny devices/+/locked
pattern readwrite %u/private/#
pattern read fence/%c
pattern write $app/%u
pattern read $app/%c/#
"""

# (username, client id): anonymous, users with rules, a pattern-only user, a username with
# '/', one with '+', a client id with '#', and a user whose rules start with wildcards.
CLIENTS = [
    (None, "cid-anon"),
    ("alice", "cid-alice"),
    ("bob", "cid-bob"),
    ("dev1", "cid-dev1"),
    ("a/b", "cid-ab"),
    ("p+q", "cid-pq"),
    ("carol", "c#1"),
    ("eve", "cid-eve"),
]

TOPICS = [
    "public/news", "public/secret", "alice/x", "shared/a/status", "shared/hidden/x", "shared/other",
    "bob/in", "read", "devices/dev1/temp", "devices/alice/t", "devices/bob/t", "devices/a/b/t",
    "devices/locked/locked", "clients/cid-dev1/out", "clients/cid-anon/out", "dev1/private/x",
    "alice/private/x", "a/b/private/x", "pq/x", "carol/x", "$app/alice", "$app/dev1", "$app/x",
    "$app/cid-dev1/y", "$app/cid-anon/z", "other/topic", "devices/carol/t", "carol/private/x",
    "$app/carol", "$app/eve", "eve/x",
]
SUB_FILTERS = ["#", "$app/#", "public/secret", "secret/#", "+/+", "$SYS/#"]


@pytest.fixture
def mosquitto_acl(tmp_path: Path):  # type: ignore[no-untyped-def]
    acl_path = tmp_path / "acl"
    acl_path.write_text(ACL)
    with MosquittoBroker(tmp_path, acl_file=acl_path, allow_anonymous=True) as broker:
        yield broker, AclFile.load(acl_path)


def observed_reads(broker: MosquittoBroker) -> dict[tuple[str | None, str], set[str]]:
    """Which TOPICS each client receives from a full-rights writer."""
    subscribers = {}
    for user, cid in CLIENTS:
        client = Client(broker.port, user, None, cid)
        assert not client.connect().is_failure
        codes = client.subscribe(*SUB_FILTERS)
        # Mosquitto 2.0 grants every subscription; refusals would show here.
        assert [c.value for c in codes] == [0] * len(SUB_FILTERS), (user, codes)
        subscribers[(user, cid)] = client
    writer = Client(broker.port, "admin", None, "cid-admin")
    assert not writer.connect().is_failure
    try:
        for topic in TOPICS:
            writer.publish(topic, b"matrix")
        # One fence per client, after everything else: once it arrives, nothing is in flight.
        # (Readable through `pattern read fence/%c`, or for the clients patterns refuse, a
        # `topic read fence/#` of their own.)
        for _, cid in CLIENTS:
            writer.publish("fence/" + cid.replace("#", "_"), b"fence")
        seen: dict[tuple[str | None, str], set[str]] = {}
        for key, client in subscribers.items():
            got: set[str] = set()
            while True:
                message = client.messages.get(timeout=10)
                if message.payload == b"fence":
                    break
                got.add(message.topic)
            seen[key] = got
        return seen
    finally:
        writer.close()
        for client in subscribers.values():
            client.close()


def observed_writes(broker: MosquittoBroker) -> dict[tuple[str | None, str], tuple[set[str], set[str]]]:
    """Which TOPICS each client's publications reach a full-rights observer with, and which
    get an MQTT 5 PUBACK of success (Mosquitto answers 0x87 to a denied publish)."""
    observer = Client(broker.port, "admin", None, "cid-observer")
    assert not observer.connect().is_failure
    observer.subscribe("#", "$app/#")
    result = {}
    try:
        for user, cid in CLIENTS:
            marker = f"from {cid} {uuid.uuid4().hex[:6]}".encode()
            client = Client(broker.port, user, None, cid, protocol=mqtt.MQTTv5)
            assert not client.connect().is_failure
            acked = {topic for topic in TOPICS if not client.publish(topic, marker).is_failure}
            client.close()
            fence = f"fence-{uuid.uuid4().hex}".encode()
            Client.publish(observer, "fence/cid-observer", fence)
            arrived: set[str] = set()
            while True:
                message = observer.messages.get(timeout=10)
                if message.payload == fence:
                    break
                if message.payload == marker:
                    arrived.add(message.topic)
            result[(user, cid)] = (arrived, acked)
    finally:
        observer.close()
    return result


def test_acl_reads_and_subscriptions_match_mosquitto(mosquitto_acl) -> None:  # type: ignore[no-untyped-def]
    broker, acl = mosquitto_acl
    seen = observed_reads(broker)
    for user, cid in CLIENTS:
        expected = {t for t in TOPICS if acl.check(user, cid, t, "read").allowed}
        assert seen[(user, cid)] == expected, (
            f"{user}/{cid}: mosquitto only {sorted(seen[(user, cid)] - expected)}, "
            f"zmesh only {sorted(expected - seen[(user, cid)])}"
        )
        assert all(acl.check(user, cid, f, "subscribe").allowed for f in SUB_FILTERS)
    # the matrix is not trivial: every client reads something and is refused something
    assert all(0 < len(s) < len(TOPICS) for key, s in seen.items() if key[0] not in ("p+q", "carol"))


def test_acl_writes_match_mosquitto(mosquitto_acl) -> None:  # type: ignore[no-untyped-def]
    broker, acl = mosquitto_acl
    observed = observed_writes(broker)
    for user, cid in CLIENTS:
        arrived, acked = observed[(user, cid)]
        expected = {t for t in TOPICS if acl.check(user, cid, t, "write").allowed}
        assert arrived == expected, (
            f"{user}/{cid}: mosquitto only {sorted(arrived - expected)}, zmesh only {sorted(expected - arrived)}"
        )
        assert acked == expected
    assert any(observed[key][0] for key in observed) and not all(observed[key][0] == set(TOPICS) for key in observed)


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, valid",
    [
        ("topic read\n", True),  # a rule for the topic "read"
        ("topic   read   a b/c   \n", True),  # a topic with a space
        ("user   bob  \ntopic x\n", True),
        ("\n\n# c\n   \n", True),
        ("topic wrte a\n", False),
        ("  # indented comment\n", False),
        ("topic\tread\ta\n", False),
        ("topic read a/#/b\n", False),
        ("user\n", False),
        ("topic\n", False),
        ("users bob\n", False),
    ],
)
def test_same_files_refused_as_mosquitto(tmp_path: Path, text: str, valid: bool) -> None:
    acl_path = tmp_path / "acl"
    acl_path.write_text(text)
    broker = MosquittoBroker(tmp_path, acl_file=acl_path)
    started = broker.try_start()
    broker.stop()
    assert started == valid, broker.log()
    try:
        AclFile.load(acl_path)
        ours = True
    except AclError:
        ours = False
    assert ours == valid

