"""`zmesh bench SCENARIO`: run one of the benchmark suites in ``benchmarks/`` (a source checkout).

The suites live beside the package, not in it; this finds them (the checkout this ``zmesh`` was
imported from, or the current directory) and hands the remaining arguments to the scenario's
``main(argv)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

SCENARIOS = ("pubsub", "mqtt_e2e", "fanout", "idle", "reqrep", "scaling", "jobs", "retained", "discovery", "all")


def run(scenario: str, argv: list[str]) -> int:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r} (one of {', '.join(SCENARIOS)})")
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "benchmarks" / "__init__.py").exists():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            break
    else:
        raise FileNotFoundError("benchmarks/ not found: run from a zmesh source checkout")
    name = "run_all" if scenario == "all" else scenario
    module = __import__(f"benchmarks.{name}", fromlist=["main"])
    return int(module.main(argv) or 0)
