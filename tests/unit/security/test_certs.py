"""CURVE certificates on disk and the trusted-key ring, including a real ZAP handshake."""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from zmesh.security.certs import (
    CertError,
    KeyRing,
    create_certificate,
    list_certificates,
    load_public_key,
    load_secret_certificate,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def secret_of(path: Path) -> bytes:
    _, secret = zmq.auth.load_certificate(path)
    assert secret is not None
    return secret


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A permissive umask, so the tests see the modes we set, not what the umask allowed."""
    old = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------- creating


def test_create_writes_pyzmq_compatible_files_with_exact_modes(
    tmp_path: Path, open_umask: None
) -> None:
    directory = tmp_path / "new" / "certs"
    public_path, secret_path = create_certificate(directory, "node-a_1.x")

    assert public_path == directory / "node-a_1.x.key"
    assert secret_path == directory / "node-a_1.x.key_secret"
    assert mode_of(directory) == 0o700  # it holds secrets
    assert mode_of(secret_path) == 0o600
    assert mode_of(public_path) == 0o644

    pub_from_public, none = zmq.auth.load_certificate(public_path)
    pub_from_secret, secret = zmq.auth.load_certificate(secret_path)
    assert none is None
    assert pub_from_public == pub_from_secret
    assert secret is not None and zmq.curve_public(secret) == pub_from_public

    assert load_secret_certificate(secret_path) == (pub_from_public, secret)
    assert load_public_key(public_path) == pub_from_public
    assert load_public_key(secret_path) == pub_from_public
    assert len(pub_from_public) == 40


def test_file_text_matches_pyzmq_layout(tmp_path: Path) -> None:
    public_path, secret_path = create_certificate(tmp_path, "a")
    zmq.auth.create_certificates(str(tmp_path), "ref")

    def shape(path: Path) -> list[str]:
        # Everything but the timestamp and the keys themselves.
        lines = path.read_text().splitlines()
        return [
            line.split(" = ")[0] if "-key = " in line else line
            for line in lines
            if not line.startswith("#   ****  Generated on")
        ]

    assert shape(secret_path) == shape(tmp_path / "ref.key_secret")
    assert shape(public_path) == shape(tmp_path / "ref.key")


def test_secret_is_never_wider_than_0600_even_while_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Watch every os.open/mkstemp that creates a file: the mode asked for is at most 0600
    for the secret, so there is no window in which it is world-readable."""
    created: list[tuple[str, int]] = []
    real_open = os.open

    def spy_open(
        path: os.PathLike[str] | str, flags: int, mode: int = 0o777, *args: object, **kw: object
    ) -> int:
        if flags & os.O_CREAT:
            created.append((os.fspath(path), mode))
        return real_open(path, flags, mode, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy_open)
    create_certificate(tmp_path, "a")
    create_certificate(tmp_path, "a", force=True)  # the temp-file path (mkstemp uses os.open too)

    secret_creations = [mode for path, mode in created if "key_secret" in path]
    assert len(secret_creations) == 2
    assert all(mode & ~0o600 == 0 for mode in secret_creations)
    assert created[0][1] == 0o600
    assert mode_of(tmp_path / "a.key_secret") == 0o600


def test_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    public_path, secret_path = create_certificate(tmp_path, "a")
    before = load_secret_certificate(secret_path)

    with pytest.raises(CertError, match="already exists") as info:
        create_certificate(tmp_path, "a")
    assert str(secret_path) in str(info.value)
    assert load_secret_certificate(secret_path) == before  # untouched

    create_certificate(tmp_path, "a", force=True)
    after = load_secret_certificate(secret_path)
    assert after != before
    assert load_public_key(public_path) == after[0]
    assert mode_of(secret_path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.key",
        "a.key_secret",
    ]  # no temp files left


def test_a_lone_public_file_blocks_creation_and_leaves_no_orphan_secret(tmp_path: Path) -> None:
    # A peer's trusted public key in the same directory must not be clobbered by our own.
    create_certificate(tmp_path / "other", "peer")
    (tmp_path / "peer.key").write_bytes((tmp_path / "other" / "peer.key").read_bytes())
    with pytest.raises(CertError, match="peer.key"):
        create_certificate(tmp_path, "peer")
    assert not (tmp_path / "peer.key_secret").exists()


@pytest.mark.parametrize(
    "name", ["", "a/b", "../x", "a b", "é", "a\x00", ".", "..", "x" * 129, "a;rm"]
)
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CertError, match="invalid certificate name"):
        create_certificate(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- loading


def test_missing_file_and_public_only_file(tmp_path: Path) -> None:
    public_path, _ = create_certificate(tmp_path, "a")
    with pytest.raises(CertError, match="not found") as info:
        load_secret_certificate(tmp_path / "nope.key_secret")
    assert "nope.key_secret" in str(info.value)
    with pytest.raises(CertError, match="no secret-key"):
        load_secret_certificate(public_path)
    with pytest.raises(CertError, match="not a regular file"):
        load_public_key(tmp_path)
    fifo = tmp_path / "fifo.key_secret"
    os.mkfifo(fifo)
    with pytest.raises(CertError, match="not a regular file"):
        load_secret_certificate(fifo)  # and does not hang waiting for a writer


def _corruptions(text: str, secret: str, public: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    return [
        text[: len(text) // 2],  # truncated in the middle of the file
        text.replace(secret, secret[:-3]),  # truncated secret
        text.replace(secret, secret[:-1] + "~"),  # not Z85
        text.replace(secret, "%%%%%" + secret[5:]),  # Z85 alphabet, value overflows
        "".join(line for line in lines if "public-key" not in line),  # no public key
        text.replace(public, zmq.curve_keypair()[0].decode()),  # public does not match secret
        text.replace(f'secret-key = "{secret}"', f"secret-key {secret}"),  # no '='
        text + f'    secret-key = "{zmq.curve_keypair()[1].decode()}"\n',  # two different secrets
        "\x00\xff\xfe garbage " + secret + "\n",
        "",
    ]


def test_malformed_files_raise_cert_error_without_key_material(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, secret_path = create_certificate(tmp_path, "a")
    text = secret_path.read_text()
    public, secret = (k.decode() for k in load_secret_certificate(secret_path))
    bad = tmp_path / "bad.key_secret"
    caplog.set_level(logging.DEBUG)
    for i, content in enumerate(_corruptions(text, secret, public)):
        bad.unlink(missing_ok=True)
        fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, content.encode("utf-8", "surrogateescape"))
        os.close(fd)
        for loader in (load_secret_certificate, load_public_key):
            with pytest.raises(CertError) as info:
                loader(bad)
            message = str(info.value)
            assert str(bad) in message, (i, message)
            # Neither the key nor a fragment of it leaks; nor does a chained exception.
            for fragment in {secret, secret[:10], secret[-10:], secret[:-3]}:
                assert fragment not in message, (i, message)
            exc = info.value
            assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    assert secret[:10] not in caplog.text


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.key"
    big.write_bytes(b"# " + b"x" * 100_000 + b"\n")
    with pytest.raises(CertError, match="too large"):
        load_public_key(big)


def test_wide_secret_mode_is_loaded_but_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, secret_path = create_certificate(tmp_path, "a")
    expected = load_secret_certificate(secret_path)
    secret_path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="zmesh.certs"):
        assert load_secret_certificate(secret_path) == expected
    warnings = [
        r for r in caplog.records if r.name == "zmesh.certs" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1 and "0644" in warnings[0].getMessage()
    assert expected[1].decode() not in caplog.text

    caplog.clear()
    secret_path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="zmesh.certs"):
        load_secret_certificate(secret_path)
    assert not [r for r in caplog.records if r.name == "zmesh.certs"]


def test_reads_files_written_by_pyzmq(tmp_path: Path) -> None:
    public_file, secret_file = zmq.auth.create_certificates(str(tmp_path), "ref")
    expected = zmq.auth.load_certificate(secret_file)
    assert load_secret_certificate(Path(secret_file)) == expected
    assert load_public_key(Path(public_file)) == expected[0]


def test_list_certificates(tmp_path: Path) -> None:
    create_certificate(tmp_path, "b")
    public_a, secret_a = create_certificate(tmp_path, "a")
    secret_a.unlink()
    (tmp_path / "notes.txt").write_text("not a cert")
    (tmp_path / "b.key~").write_text("editor backup, ignored")
    listed = list_certificates(tmp_path)
    assert [(name, has) for name, _, has in listed] == [("a", False), ("b", True)]
    assert listed[0][1] == load_public_key(public_a)
    with pytest.raises(CertError, match="not found"):
        list_certificates(tmp_path / "missing")


# ---------------------------------------------------------------------------- key ring


def test_ring_from_directory_reads_only_public_files(tmp_path: Path) -> None:
    for name in ("a", "b"):
        create_certificate(tmp_path, name)
    ring = KeyRing.from_directory(tmp_path)
    key_a = load_public_key(tmp_path / "a.key")
    assert len(ring) == 2
    assert ring.directory == tmp_path
    assert key_a in ring and ring.name_of(key_a) == "a"
    assert sorted(ring.name_of(k) or "" for k in ring.keys()) == ["a", "b"]
    assert ring.name_of(zmq.curve_keypair()[0]) is None


def test_ring_callback_and_rejected_total(tmp_path: Path) -> None:
    trusted, _ = zmq.curve_keypair()
    stranger, _ = zmq.curve_keypair()
    ring = KeyRing({trusted: "t"})
    assert ring.directory is None
    assert ring.callback("*", trusted) is True
    assert ring.rejected_total == 0
    assert ring.callback("*", stranger) is False
    assert ring.callback("zmesh", stranger) is False
    assert ring.callback("*", b"") is False
    assert ring.rejected_total == 3
    ring.add(stranger, "s")
    assert ring.callback("*", stranger) is True
    assert ring.rejected_total == 3


def test_ring_refuses_malformed_keys() -> None:
    with pytest.raises(CertError):
        KeyRing({b"short": "x"})
    with pytest.raises(CertError):
        KeyRing().add(b"~" * 40, "x")


def test_reload_picks_up_added_and_removed_keys(tmp_path: Path) -> None:
    for name in ("a", "b"):
        create_certificate(tmp_path, name)
    ring = KeyRing.from_directory(tmp_path)
    key_a = load_public_key(tmp_path / "a.key")
    old_b = load_public_key(tmp_path / "b.key")

    (tmp_path / "a.key").unlink()
    create_certificate(tmp_path, "c")
    create_certificate(tmp_path, "b", force=True)  # rotated: the old key must stop working
    added, removed = ring.reload()

    assert added == {"b", "c"}
    assert removed == {"a", "b"}
    assert key_a not in ring and old_b not in ring
    assert ring.name_of(load_public_key(tmp_path / "c.key")) == "c"
    assert ring.name_of(load_public_key(tmp_path / "b.key")) == "b"
    assert ring.reload() == (set(), set())


def test_reload_with_a_broken_file_keeps_the_old_ring(tmp_path: Path) -> None:
    create_certificate(tmp_path, "a")
    ring = KeyRing.from_directory(tmp_path)
    before = ring.keys()
    create_certificate(tmp_path, "b")
    (tmp_path / "zz.key").write_text('curve\n    public-key = "short"\n')
    with pytest.raises(CertError, match="zz.key"):
        ring.reload()
    assert ring.keys() == before  # neither b added nor anything dropped

    (tmp_path / "zz.key").unlink()
    assert ring.reload() == ({"b"}, set())


def test_reload_without_directory_is_an_error() -> None:
    with pytest.raises(CertError, match="not loaded from a directory"):
        KeyRing().reload()


def test_callback_is_consistent_while_reloading(tmp_path: Path) -> None:
    """The authenticator thread reads while another thread reloads: never an exception,
    and a key present in both the old and the new ring is always admitted."""
    create_certificate(tmp_path, "stable")
    stable = load_public_key(tmp_path / "stable.key")
    ring = KeyRing.from_directory(tmp_path)
    stop = threading.Event()
    failures: list[object] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                if not ring.callback("*", stable):
                    failures.append("stable key refused")
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
                failures.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(15):
            create_certificate(tmp_path, f"k{i}")
            ring.reload()
            (tmp_path / f"k{i}.key").unlink()
            ring.reload()
    finally:
        stop.set()
        thread.join()
    assert failures == []


# ---------------------------------------------------------------------------- real ZAP


def _curve_push(
    ctx: zmq.Context, keypair: tuple[bytes, bytes], server_key: bytes, endpoint: str
) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    sock.curve_publickey, sock.curve_secretkey = keypair
    sock.curve_serverkey = server_key
    sock.connect(endpoint)
    return sock


def test_ring_as_zap_provider_admits_trusted_refuses_others_and_revokes(tmp_path: Path) -> None:
    trusted_dir = tmp_path / "trusted"
    create_certificate(trusted_dir, "client")
    server_pair = load_secret_certificate(create_certificate(tmp_path / "server", "server")[1])
    client_pair = load_secret_certificate(trusted_dir / "client.key_secret")
    stranger_pair = zmq.curve_keypair()
    ring = KeyRing.from_directory(trusted_dir)

    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    sockets: list[zmq.Socket] = []
    try:
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=ring)
        server = ctx.socket(zmq.PULL)
        sockets.append(server)
        server.linger = 0
        server.curve_publickey, server.curve_secretkey = server_pair
        server.curve_server = True
        server.bind("tcp://127.0.0.1:*")
        endpoint = server.getsockopt_string(zmq.LAST_ENDPOINT)

        good = _curve_push(ctx, client_pair, server_pair[0], endpoint)
        sockets.append(good)
        good.send(b"from trusted")
        assert server.poll(5000), "trusted client's message never arrived"
        assert server.recv() == b"from trusted"

        bad = _curve_push(ctx, stranger_pair, server_pair[0], endpoint)
        sockets.append(bad)
        bad.send(b"from stranger", zmq.NOBLOCK)
        assert not server.poll(500), "an untrusted key got a message through"
        assert ring.rejected_total >= 1

        # Revoke: remove the key file and reload; a NEW connection with that key is refused.
        (trusted_dir / "client.key").unlink()
        assert ring.reload() == (set(), {"client"})
        rejected_before = ring.rejected_total
        again = _curve_push(ctx, client_pair, server_pair[0], endpoint)
        sockets.append(again)
        again.send(b"after revocation", zmq.NOBLOCK)
        assert not server.poll(500), "a revoked key got a message through"
        assert ring.rejected_total > rejected_before
    finally:
        for sock in sockets:
            sock.close(linger=0)
        auth.stop()
        ctx.term()
