"""A secret group-readable on a read-only mount (a Kubernetes Secret volume with fsGroup,
whose mode nobody can chmod) is not warned about; the same mode on a writable disk is."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from zmesh.security.secretfile import read_secret_file


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "secret"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts to make a read-only volume")
    try:
        (mount / "s.signer").write_bytes(b"x")
        os.chmod(mount / "s.signer", 0o440)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _read(path: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    log = logging.getLogger("zmesh.test.secret")
    with caplog.at_level(logging.WARNING, logger="zmesh.test.secret"):
        read_secret_file(path, noun="signer file", error=ValueError, max_bytes=100, mode_warning="risky", log=log)
    return [r.getMessage() for r in caplog.records if r.name == "zmesh.test.secret"]


def test_group_readable_on_a_read_only_mount_is_not_warned_about(
    read_only_mount: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert _read(read_only_mount / "s.signer", caplog) == []
    writable = tmp_path / "w.signer"
    writable.write_bytes(b"x")
    os.chmod(writable, 0o440)
    assert any("wider than 0600" in m for m in _read(writable, caplog))
