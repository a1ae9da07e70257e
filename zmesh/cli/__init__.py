"""The command line: the `zmesh` program and the node daemon's process entry.

Rooms: ``app`` (the typer root and the client commands: peers, topics, jobs), ``clients``
(pub, sub, wait: argparse, mosquitto's flags), ``auth`` (passwd/acl/reload commands),
``passwd`` (the mosquitto_passwd-compatible tool), ``doctor``, ``demo``, ``bench``,
``daemon`` (what ``zmesh node run`` execs: a typer-free interpreter that runs one Node) and
``pidfile``.

May import anything in zmesh; nothing in zmesh imports it (the CLI is the outer edge).
This ``__init__`` stays empty of imports: ``python -m zmesh.cli.daemon`` runs a node without
loading typer, so ``main`` is found lazily. ``main`` answers ``pub``, ``sub``, ``wait`` and
``--version`` without importing typer at all (with pydantic and rich, ~120 ms): a shell
script that sends an alert per command pays start-up as its latency (benchmarks/startup.py).
"""

from __future__ import annotations

import sys
from typing import Any

# Commands parsed by zmesh.cli.clients (argparse), never through typer.
FAST_COMMANDS = frozenset({"pub", "sub", "wait"})


def main() -> Any:
    argv = sys.argv[1:]
    if argv and argv[0] in FAST_COMMANDS:
        from zmesh.cli.clients import main as run

        sys.exit(run(argv[0], argv[1:]))
    if argv == ["--version"]:
        from zmesh import __version__

        print(f"zmesh {__version__}")
        sys.exit(0)
    from zmesh.cli.app import main as app_main

    return app_main()
