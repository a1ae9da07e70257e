"""`zmesh node run` imports zmesh from where it was installed, never from the working
directory (issue 14, hole 15).

The CLI re-execs a typer-free interpreter for the node (zmesh.cli.daemon). Run as
``python -m``, that interpreter put the working directory first on sys.path, so a node
started from a directory holding a ``zmesh/`` folder (the parent of a fresh clone, or any
directory an attacker can write to) imported that folder instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Subscriber, make_certs, wait_until

pytestmark = pytest.mark.timeout(60)


def _zmesh_command() -> list[str]:
    # The console script as a user runs it (its own directory, not the working one, is first
    # on its sys.path); without one, -P gives `python -m zmesh` the same start.
    script = Path(sys.executable).with_name("zmesh")
    if script.exists() and script.read_bytes()[:2] == b"#!":
        return [sys.executable, str(script)]
    return [sys.executable, "-P", "-m", "zmesh"]


def test_node_run_from_a_directory_holding_a_decoy_zmesh_package(tmp_path: Path) -> None:
    # The decoy would make the daemon exit at its first `import zmesh`; a node that starts
    # proves it never looked there.
    workdir = tmp_path / "clone-parent"
    (workdir / "zmesh" / "cli").mkdir(parents=True)
    (workdir / "zmesh" / "__init__.py").write_text('raise SystemExit("DECOY zmesh imported from cwd")\n')
    (workdir / "zmesh" / "cli" / "__init__.py").write_text("")
    certs = make_certs(tmp_path / "certs", ["a"])
    ready = tmp_path / "a.ready"
    log_path = tmp_path / "a.log"
    args = [
        *_zmesh_command(), "node", "run", "--name", "a",
        "--cert", str(certs / "a.key_secret"), "--listen", "127.0.0.1:0",
        "--mqtt", "127.0.0.1:0", "--ready-file", str(ready),
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"node exited {process.returncode}: {log_path.read_text()}")
            return ready.exists()

        wait_until(up, 20, "the node to start")
        port = json.loads(ready.read_text())["mqtt_port"]
        with Subscriber(port, "$SYS/zmesh/node") as sub:
            assert json.loads(sub.get().payload)["name"] == "a"
        # Same pid as the CLI (signals and supervisors unaffected), and ps still shows which
        # node this is.
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"zmesh.cli.daemon" in cmdline
        assert [b"node", b"run", b"--name", b"a"] == cmdline[cmdline.index(b"node"):][:4]
    finally:
        process.terminate()
        assert process.wait(10) == 0, log_path.read_text()
    assert "DECOY" not in log_path.read_text()
