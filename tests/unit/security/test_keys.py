"""The store's key file (created 0600, read strictly, never echoed) and AES-256-GCM sealing."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.security.keys import (
    KEY_BYTES,
    KeyFileError,
    Sealer,
    SealError,
    create_key_file,
    key_id_of,
    load_key_file,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A permissive umask, so the tests see the modes we set, not what the umask allowed."""
    old = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(old)


def assert_no_leak(exc: BaseException, *secrets: bytes) -> None:
    """Neither the message nor a chained exception carries any of ``secrets``."""
    text = str(exc)
    for secret in secrets:
        for form in (secret, secret.strip()):
            if form:
                assert form.decode("latin-1") not in text
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


# ---------------------------------------------------------------------------- key files


def test_create_writes_32_random_bytes_as_base64_with_mode_0600(
    tmp_path: Path, open_umask: None
) -> None:
    path = tmp_path / "new" / "store.key"
    assert create_key_file(path) == path
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700  # it holds a secret
    text = path.read_bytes()
    assert text.endswith(b"\n") and text.count(b"\n") == 1
    key = load_key_file(path)
    assert len(key) == KEY_BYTES and base64.b64decode(text) == key
    assert load_key_file(create_key_file(tmp_path / "other.key")) != key


def test_create_refuses_to_overwrite_and_force_replaces_atomically(
    tmp_path: Path, open_umask: None
) -> None:
    path = create_key_file(tmp_path / "store.key")
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists") as info:
        create_key_file(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before

    create_key_file(path, force=True)
    assert path.read_bytes() != before
    assert mode_of(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.key"]  # no temp file left


def test_create_refuses_a_symlink_in_the_way(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "store.key").symlink_to(target)
    with pytest.raises(KeyFileError, match="already exists"):
        create_key_file(tmp_path / "store.key")
    assert not target.exists()


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "not a key file"),
        (b"\n", "not a key file"),
        (base64.b64encode(os.urandom(31)) + b"\n", "holds 31 bytes"),
        (base64.b64encode(os.urandom(33)) + b"\n", "holds 33 bytes"),
        # A real key with one character mistyped: still mostly the key, so never echoed.
        (base64.b64encode(os.urandom(32))[:-3] + b"!A=\n", "not a key file"),
        (os.urandom(32), "not a key file"),  # raw bytes, not base64
        (b"A" * 5000, "too large"),
    ],
    ids=["empty", "blank", "31-bytes", "33-bytes", "mistyped", "raw-bytes", "too-large"],
)
def test_bad_key_files_are_refused_without_echoing_them(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "store.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=reason) as info:
        load_key_file(path)
    assert str(path) in str(info.value)
    assert_no_leak(info.value, content)


def test_missing_directory_and_unreadable_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not found"):
        load_key_file(tmp_path / "absent.key")
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_key_file(tmp_path)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_key_file(fifo)  # must not hang waiting for a writer


def test_whitespace_around_the_key_is_accepted(tmp_path: Path) -> None:
    key = os.urandom(32)
    path = tmp_path / "store.key"
    path.write_bytes(b"  " + base64.b64encode(key) + b"\r\n\n")
    path.chmod(0o600)
    assert load_key_file(path) == key


def test_a_key_file_wider_than_0600_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = create_key_file(tmp_path / "store.key")
    key = load_key_file(path)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="zmesh.keys"):
        assert load_key_file(path) == key
    assert any("0644" in r.getMessage() and r.name == "zmesh.keys" for r in caplog.records)
    for record in caplog.records:
        assert base64.b64encode(key).decode() not in record.getMessage()


def test_creating_a_key_logs_its_id_never_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="zmesh.keys"):
        path = create_key_file(tmp_path / "store.key")
    key = load_key_file(path)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert key_id_of(key).hex() in text
    assert base64.b64encode(key).decode() not in text and key.hex() not in text


# ---------------------------------------------------------------------------- sealing


def test_key_id_is_the_labelled_sha256_prefix() -> None:
    key = os.urandom(32)
    assert Sealer(key).key_id == hashlib.sha256(b"zmesh-store-key-id:" + key).digest()[:8]
    assert Sealer(key).key_id != Sealer(os.urandom(32)).key_id
    assert key.hex() not in repr(Sealer(key))


def test_sealer_refuses_keys_of_the_wrong_size_without_echoing_them() -> None:
    for bad in (b"", os.urandom(16), os.urandom(31), os.urandom(33)):
        with pytest.raises(ValueError) as info:
            Sealer(bad)
        assert bad.hex() not in str(info.value) or not bad


def test_seal_open_round_trip_with_a_fresh_nonce_each_time() -> None:
    sealer = Sealer(os.urandom(32))
    first = sealer.seal(b"91%", b"alerts/disk")
    second = sealer.seal(b"91%", b"alerts/disk")
    assert first != second and first[:12] != second[:12]  # nonce(12) first, random
    assert len(first) == 12 + 3 + 16
    assert sealer.open(first, b"alerts/disk") == b"91%"
    assert sealer.open(second, b"alerts/disk") == b"91%"
    assert sealer.open(sealer.seal(b"", b""), b"") == b""


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=40))
def test_round_trip_any_bytes(plaintext: bytes, aad: bytes) -> None:
    sealer = Sealer(b"k" * 32)
    assert sealer.open(sealer.seal(plaintext, aad), aad) == plaintext


def test_wrong_aad_wrong_key_tampering_and_truncation_fail_to_open() -> None:
    sealer = Sealer(os.urandom(32))
    blob = sealer.seal(b"secret payload", b"a/b")
    with pytest.raises(SealError):
        sealer.open(blob, b"a/c")  # copied onto another topic
    with pytest.raises(SealError):
        Sealer(os.urandom(32)).open(blob, b"a/b")
    for index in range(len(blob)):  # nonce, ciphertext and tag are all covered
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(SealError):
            sealer.open(bytes(tampered), b"a/b")
    for length in (0, 11, 27, len(blob) - 1):
        with pytest.raises(SealError):
            sealer.open(blob[:length], b"a/b")
    with pytest.raises(SealError) as info:
        sealer.open(blob + b"x", b"a/b")
    assert info.value.__cause__ is None
