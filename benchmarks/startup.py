"""Start-up of the command-line client: `zmesh pub -t x -m y` to a local node, wall time and
peak RSS per command, beside `mosquitto_pub` to the same node. Budget: under 150 ms wall.

    python -m benchmarks.startup [--runs 20]

One `zmesh node run` is started on free loopback ports; each command is then run ``--runs``
times (each a fresh process: the cost a shell script pays per alert), in interleaved rounds
after a quiet moment, timed from start to exit, with its peak RSS from GNU time (``%M``). Variants:

* ``python -m zmesh pub``: this interpreter, no .pyc cache for zmesh (PYTHONDONTWRITEBYTECODE=1,
  as on this machine's sessions: zmesh's modules are compiled on every run; the standard
  library's .pyc files are used as installed);
* the same with the bytecode cache on (what an installed zmesh does: pip writes .pyc files);
* the same through the typer CLI (``python -m zmesh.cli.app pub``: the path every command
  took before ``zmesh.cli.main`` sent pub/sub/wait past typer);
* ``mosquitto_pub`` (if installed), the reference.

The import profile (``python -X importtime -m zmesh pub ...``, cumulative microseconds of the
ten largest) goes in the result too. Results: benchmarks/results/startup-<UTC>.json and
startup-latest.md. Launching through a pyenv shim adds its own ~80 ms of bash; run the
interpreter or the installed entry script directly to leave it out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import wait_quiet

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
BUDGET_MS = 150.0


TIME = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS KiB, exit status) of one run of ``argv``.

    The RSS comes from GNU time (``%M``) where installed: a child forked from this Python
    process would count this process's pages in its own peak. Without it, 0."""
    wrapped = [TIME, "-f", "%M", *argv] if TIME else argv
    started = time.perf_counter()
    result = subprocess.run(wrapped, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, timeout=30)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{argv} exited {result.returncode}: {result.stderr}")
    rss = int(result.stderr.strip().splitlines()[-1]) if TIME else 0
    return wall, rss, result.returncode


def _summary(samples: list[tuple[float, int, int]]) -> dict[str, Any]:
    walls = sorted(s[0] * 1000 for s in samples)
    return {
        "runs": len(samples),
        "wall_ms_median": round(statistics.median(walls), 1),
        "wall_ms_p90": round(walls[int(0.9 * (len(walls) - 1))], 1),
        "wall_ms_min": round(walls[0], 1),
        "max_rss_mib": round(max(s[1] for s in samples) / 1024, 1),
    }


def _import_profile(argv: list[str], env: dict[str, str]) -> list[tuple[str, int]]:
    result = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    rows = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line.split("|")
            rows.append((name.rstrip(), int(cumulative)))
    top = sorted(rows, key=lambda r: -r[1])[:10]
    return [(name.strip(), us) for name, us in top]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    from zmesh.security.certs import create_certificate

    with tempfile.TemporaryDirectory(prefix="zmesh-startup-") as tmp:
        workdir = Path(tmp)
        # No cache: zmesh's modules compiled on every run (none of its __pycache__ left, none
        # written), the standard library's .pyc as installed; cached: a cache prefix of its
        # own, filled by a first run.
        for stale in (REPO / "zmesh").rglob("__pycache__"):
            shutil.rmtree(stale, ignore_errors=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("PYTHONPYCACHEPREFIX", None)
        cached = {**env, "PYTHONPYCACHEPREFIX": str(workdir / "pycache")}
        del cached["PYTHONDONTWRITEBYTECODE"]
        create_certificate(workdir, "bench")
        ready = workdir / "ready"
        node = subprocess.Popen(
            [sys.executable, "-m", "zmesh", "node", "run", "--name", "bench", "--cert", str(workdir / "bench.key_secret"),
             "--listen", "127.0.0.1:0", "--mqtt", "127.0.0.1:0", "--ready-file", str(ready), "--log-level", "warning"],
            env=env, cwd=REPO)
        try:
            deadline = time.monotonic() + 20
            while not ready.exists():
                if node.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the node did not start")
                time.sleep(0.05)
            port = str(json.loads(ready.read_text())["mqtt_port"])
            pub = ["pub", "-p", port, "-t", "x", "-m", "y"]
            variants: dict[str, tuple[list[str], dict[str, str]]] = {
                "python -m zmesh pub (no .pyc cache)": ([sys.executable, "-m", "zmesh", *pub], env),
                "python -m zmesh pub (.pyc cache)": ([sys.executable, "-m", "zmesh", *pub], cached),
                "python -m zmesh.cli.app pub (typer path, no .pyc cache)": ([sys.executable, "-m", "zmesh.cli.app", *pub], env),
                "python -c pass (the interpreter alone, no .pyc cache)": ([sys.executable, "-c", "pass"], env),
            }
            if shutil.which("mosquitto_pub"):
                variants["mosquitto_pub"] = (["mosquitto_pub", "-p", port, "-t", "x", "-m", "y"], env)
            _timed(variants["python -m zmesh pub (.pyc cache)"][0], cached)  # writes the cache
            for argv, variant_env in variants.values():
                _timed(argv, variant_env)  # warm the page cache
            # Rounds of one run of each variant, interleaved, each round after a quiet
            # moment (benchmarks.common.wait_quiet): a burst of load from elsewhere then
            # costs every variant alike rather than whichever ran during it.
            samples: dict[str, list[tuple[float, int, int]]] = {label: [] for label in variants}
            busy: list[float] = []
            for _ in range(args.runs):
                busy.append(wait_quiet())
                for label, (argv, variant_env) in variants.items():
                    samples[label].append(_timed(argv, variant_env))
            results = {label: _summary(runs) for label, runs in samples.items()}
            for label, summary in results.items():
                print(f"{label:58} {summary}", flush=True)
            profile = _import_profile([sys.executable, "-m", "zmesh", *pub], env)
        finally:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait(5)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    headline = results["python -m zmesh pub (no .pyc cache)"]["wall_ms_median"]
    record = {
        "scenario": "startup", "utc": stamp, "python": sys.version.split()[0], "runs": args.runs,
        "budget_ms": BUDGET_MS, "within_budget": headline < BUDGET_MS, "results": results,
        "busy_cores_before_rounds": {"median": statistics.median(busy), "max": max(busy)},
        "import_profile_us": profile,
        "method": "start to exit of each command (GNU time %M for peak RSS), one at a time, against one local node",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"startup-{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# startup ({stamp}, Python {record['python']}, {args.runs} runs each)", "",
             f"`zmesh pub -t x -m y` to a local node; budget {BUDGET_MS:g} ms wall: "
             f"{'holds' if record['within_budget'] else 'MISSED'} ({headline} ms median without a .pyc cache). "
             f"Other load on the machine before each round: median {statistics.median(busy):g}, max "
             f"{max(busy):g} busy cores (of {os.cpu_count()}).", "",
             "| command | median ms | p90 ms | min ms | peak RSS MiB |", "|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['wall_ms_median']} | {r['wall_ms_p90']} | {r['wall_ms_min']} | {r['max_rss_mib']} |")
    lines += ["", "Largest imports (`python -X importtime`, cumulative, no .pyc cache):", ""]
    lines += [f"* `{name}` {us / 1000:.1f} ms" for name, us in profile]
    (RESULTS / "startup-latest.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
