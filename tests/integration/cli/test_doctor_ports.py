"""`zmesh doctor` checks the fixed ports a node will bind: events, jobs and HTTP."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from tests.helpers import free_port, make_certs
from zmesh.cli.doctor import Check, run_checks
from zmesh.config import load_config


def test_doctor_names_a_fixed_port_that_is_taken(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["a"])
    events, jobs, http = free_port(), free_port(), free_port()
    config = load_config(None, {
        "node.name": "a", "mesh.cert": str(certs / "a.key_secret"), "mesh.listen": f"127.0.0.1:{free_port()}",
        "mesh.events_port": str(events), "mesh.jobs_port": str(jobs), "http.listen": f"127.0.0.1:{http}",
        "mqtt.listen": f"127.0.0.1:{free_port()}",
    })
    checks: list[Check] = []
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", jobs))
        holder.listen()
        ok = asyncio.run(run_checks(config, checks.append))
    assert not ok
    by_text = {c.what.split(" 127.0.0.1")[0]: c.ok for c in checks}
    assert by_text["mesh events"] is True
    assert by_text["mesh jobs"] is False
    assert by_text["HTTP probes and metrics"] is True
