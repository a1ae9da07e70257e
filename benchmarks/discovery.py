"""Join time: how long until every node of a mesh sees a newly started node as a member.

    python -m benchmarks.discovery            # N = 3 and 10, mDNS and a static seed, 3 repetitions
    python -m benchmarks.discovery --quick    # N = 3 only, one repetition

Needs root (network namespaces, as tests/netns does): every node runs in its own namespace
on one Linux bridge (tests.netns.netns.Net), so mDNS stays on that bridge and never touches
the machine's real interfaces. For each discovery mode and size N, and each repetition, on a
fresh bridge:

1. start N-1 nodes (in parallel) and wait until each sees the other N-2 up (and, for mDNS,
   until each has registered its service, so that the mesh is settled);
2. subscribe (paho, from the root namespace, over the bridge) to ``$SYS/zmesh/peers`` on every
   existing node: the node pushes a new value on every peer change, and the subscriber stamps
   each value as it arrives;
3. start the Nth node and record, until every existing node's peers show it ``up``:
   (a) the time from spawning its process (``ip netns exec ... python -m zmesh node run``), and
   (b) the time from its ready file appearing (the file's mtime: the node is started, Python
       import and start-up excluded).

Modes: ``mdns`` (no seeds at all: ``--discovery mdns``) and ``static`` (every node seeded with
node 1's address only; node 1 has no seeds). Liveness uses the defaults (heartbeat 1 s, expiry
5 s). The median over the repetitions is reported. Results: ``benchmarks/results/
discovery-<UTC>.json`` and ``benchmarks/results/discovery-latest.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402

from tests.helpers import make_certs, wait_until  # noqa: E402
from tests.netns.netns import Net, sweep, unsupported_reason  # noqa: E402
from tests.netns.node import NodeOnHost  # noqa: E402

MODES = ("mdns", "static")
SIZES_FULL = (3, 10)
SIZES_QUICK = (3,)
REPS_FULL = 3
HEARTBEAT = 1.0  # the defaults: what a real deployment runs with
EXPIRY = 5.0
BUDGET_MDNS_S = 1.0
MESH_TIMEOUT = 60.0  # N-1 nodes forming their mesh
REGISTER_TIMEOUT = 20.0  # each mDNS node's own registration (probing, then announcing)
JOIN_TIMEOUT = 30.0  # the Nth node seen up everywhere
QUIET_CORES = 0.3  # before starting the Nth node, wait (boundedly) for the machine to calm down
QUIET_SAMPLE_S = 0.25
QUIET_MAX_S = 10.0


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _cpu_busy_jiffies() -> int:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    return sum(values) - values[3] - values[4]  # all but idle and iowait


def wait_quiet() -> tuple[float, float]:
    """Wait until the machine uses under QUIET_CORES (at most QUIET_MAX_S); (waited, cores)."""
    tick = os.sysconf("SC_CLK_TCK")
    waited = 0.0
    while True:
        before = _cpu_busy_jiffies()
        time.sleep(QUIET_SAMPLE_S)  # a sampling window, not a synchronisation
        cores = (_cpu_busy_jiffies() - before) / tick / QUIET_SAMPLE_S
        if cores <= QUIET_CORES or waited >= QUIET_MAX_S:
            return waited, cores
        waited += QUIET_SAMPLE_S


class UpWatch:
    """A paho subscription to one node's ``$SYS/zmesh/peers`` that stamps (monotonic and wall
    clock, in the network thread, as the value arrives) the first value showing ``name`` up."""

    def __init__(self, node: NodeOnHost, name: str, timeout: float = 10) -> None:
        self.node = node
        self.name = name
        self.up_mono: float | None = None
        self.up_wall_ns: int | None = None
        self.up = threading.Event()
        self.first = threading.Event()  # the current value, sent on subscribe
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_message = self._on_message
        self.client.connect(node.ip, node.mqtt_port, keepalive=30)
        self.client.loop_start()
        self.client.subscribe("$SYS/zmesh/peers", 0)
        if not self.first.wait(timeout):
            self.close()
            raise RuntimeError(f"{node.name}: no $SYS/zmesh/peers within {timeout} s")

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        mono, wall = time.monotonic(), time.time_ns()
        self.first.set()
        if self.up_mono is not None:
            return
        for peer in json.loads(message.payload):
            if peer["name"] == self.name and peer["state"] == "up":
                self.up_mono, self.up_wall_ns = mono, wall
                self.up.set()
                return

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


def _start_all(nodes: list[NodeOnHost]) -> None:
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        for future in [pool.submit(node.start) for node in nodes]:
            future.result()


def _wait_mesh(nodes: list[NodeOnHost]) -> None:
    names = {n.name for n in nodes}
    for node in nodes:
        others = names - {node.name}
        wait_until(
            lambda n=node, o=others: n.peers_up() >= o,
            MESH_TIMEOUT,
            f"{node.name} to see {len(others)} peers up (log: {node.log_path})",
        )


def sample(mode: str, n: int, workdir: Path) -> dict[str, Any]:
    """One measurement on a fresh bridge: N-1 nodes, then the Nth; times in seconds."""
    names = [f"n{i:02d}" for i in range(1, n + 1)]
    certs = workdir / "certs"
    certs.mkdir(mode=0o700)
    make_certs(certs, names)
    with Net() as net:
        hosts = [net.add_host(name) for name in names]
        nodes = [
            NodeOnHost(
                host,
                name,
                certs,
                workdir,
                seeds=[hosts[0].ip] if mode == "static" and i > 0 else None,
                heartbeat_interval=HEARTBEAT,
                peer_expiry=EXPIRY,
                extra=["--discovery", "mdns"] if mode == "mdns" else [],
                start=False,
                ready_timeout=60,
            )
            for i, (host, name) in enumerate(zip(hosts, names, strict=True))
        ]
        existing, new = nodes[:-1], nodes[-1]
        t0 = time.monotonic()
        _start_all(existing)
        _wait_mesh(existing)
        if mode == "mdns":
            for node in existing:
                wait_until(
                    lambda nd=node: "mDNS: registered" in nd.output(),
                    REGISTER_TIMEOUT,
                    f"{node.name} to register its mDNS service",
                )
        mesh_s = time.monotonic() - t0
        watches: list[UpWatch] = []
        try:
            for node in existing:
                watches.append(UpWatch(node, new.name))
            waited, cores = wait_quiet()
            spawned, spawned_wall_ns = time.monotonic(), time.time_ns()
            new.start()
            assert new.ready_file is not None
            ready_ns = new.ready_file.stat().st_mtime_ns
            deadline = spawned + JOIN_TIMEOUT
            for watch in watches:
                if not watch.up.wait(max(deadline - time.monotonic(), 0.01)):
                    raise RuntimeError(
                        f"{watch.node.name} did not see {new.name} up within "
                        f"{JOIN_TIMEOUT} s (logs: {workdir})"
                    )
        finally:
            for watch in watches:
                watch.close()
        from_spawn = {w.node.name: w.up_mono - spawned for w in watches}  # type: ignore[operator]
        from_ready = {w.node.name: (w.up_wall_ns - ready_ns) / 1e9 for w in watches}  # type: ignore[operator]
        return {
            "mode": mode,
            "nodes": n,
            "from_spawn_s": round(max(from_spawn.values()), 4),
            "from_ready_s": round(max(from_ready.values()), 4),
            "first_seen_from_ready_s": round(min(from_ready.values()), 4),
            "ready_after_spawn_s": round((ready_ns - spawned_wall_ns) / 1e9, 4),
            "per_node_from_ready_s": {k: round(v, 4) for k, v in sorted(from_ready.items())},
            "existing_mesh_formed_s": round(mesh_s, 2),
            "waited_for_quiet_s": round(waited, 2),
            "background_cores_before": round(cores, 2),
        }


# ---------------------------------------------------------------------------- report


def _git(*args: str) -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=REPO, timeout=10
        ).stdout.strip()
    return ""


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def conditions(quick: bool, reps: int, sizes: tuple[int, ...]) -> dict[str, Any]:
    import zeroconf
    import zmq

    return {
        "quick": quick,
        "repetitions": reps,
        "sizes": list(sizes),
        "modes": list(MODES),
        "heartbeat_interval_s": HEARTBEAT,
        "peer_expiry_s": EXPIRY,
        "topology": "one network namespace per node on one Linux bridge (veth pairs); "
        "MQTT observers in the root namespace over the bridge",
        "static_seeding": "every node seeded with node 1 only (node 1: none)",
        "mdns": "--discovery mdns, no seeds; interface: the namespace's eth0",
        "from_ready_clock": "ready file mtime (CLOCK_REALTIME, kernel coarse: may read up to one "
        "tick early) against the wall clock stamped at arrival",
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "zeroconf": zeroconf.__version__,
        "git": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "zmesh")),
        "loadavg_at_start": list(os.getloadavg()),
    }


def summarise(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for mode in MODES:
        for n in sorted({s["nodes"] for s in samples}):
            group = [
                s for s in samples if s["mode"] == mode and s["nodes"] == n and "error" not in s
            ]
            failed = [s for s in samples if s["mode"] == mode and s["nodes"] == n and "error" in s]
            if not group and not failed:
                continue
            spawn = sorted(s["from_spawn_s"] for s in group)
            ready = sorted(s["from_ready_s"] for s in group)
            startup = sorted(s["ready_after_spawn_s"] for s in group)
            first = sorted(s["first_seen_from_ready_s"] for s in group)
            rows.append(
                {
                    "mode": mode,
                    "nodes": n,
                    "runs": len(group),
                    "failed": len(failed),
                    "median_from_spawn_s": round(statistics.median(spawn), 3) if spawn else None,
                    "median_from_ready_s": round(statistics.median(ready), 3) if ready else None,
                    "median_ready_after_spawn_s": _median(startup),
                    "median_first_seen_from_ready_s": _median(first),
                    "from_spawn_s": spawn,
                    "from_ready_s": ready,
                }
            )
    return rows


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _range(values: list[float]) -> str:
    return "-" if not values else f"{values[0] * 1000:.0f}-{values[-1] * 1000:.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| discovery | N | runs | from spawn, median (ms) | range (ms) "
        "| from ready file, median (ms) | range (ms) | first node, from ready (ms) "
        "| spawn to ready file (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        runs = f"{r['runs']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        lines.append(
            f"| {r['mode']} | {r['nodes']} | {runs} | {_ms(r['median_from_spawn_s'])} | "
            f"{_range(r['from_spawn_s'])} | **{_ms(r['median_from_ready_s'])}** | "
            f"{_range(r['from_ready_s'])} | {_ms(r.get('median_first_seen_from_ready_s'))} | "
            f"{_ms(r.get('median_ready_after_spawn_s'))} |"
        )
    return "\n".join(lines)


def budget(rows: list[dict[str, Any]]) -> dict[str, Any]:
    mdns = [r for r in rows if r["mode"] == "mdns" and r["median_from_ready_s"] is not None]
    holds_ready = bool(mdns) and all(
        r["median_from_ready_s"] < BUDGET_MDNS_S and not r["failed"] for r in mdns
    )
    holds_spawn = bool(mdns) and all(
        r["median_from_spawn_s"] < BUDGET_MDNS_S and not r["failed"] for r in mdns
    )
    return {
        "budget_s": BUDGET_MDNS_S,
        "holds_from_ready": holds_ready,
        "holds_from_spawn": holds_spawn,
    }


def markdown(report: dict[str, Any], json_name: str) -> str:
    c, b, rows = report["conditions"], report["budget"], report["summary"]
    verdict_ready = "holds" if b["holds_from_ready"] else "does NOT hold"
    verdict_spawn = "holds" if b["holds_from_spawn"] else "does not hold"
    startup = [r["median_ready_after_spawn_s"] for r in rows if r.get("median_ready_after_spawn_s")]
    static_first = [
        r["median_first_seen_from_ready_s"]
        for r in rows
        if r["mode"] == "static" and r.get("median_first_seen_from_ready_s") is not None
    ]
    load = max(c["loadavg_at_start"][0], c["loadavg_at_end"][0])
    shared = (
        f" The machine was shared while this ran (1-minute load average up to {load:.1f} on "
        f"{c['cores']} cores): the start-up part of *from spawn* varies with it."
        if load > 0.5 * (c["cores"] or 1)
        else ""
    )
    static_note = (
        f" With a static seed the first node (the seed) sees the newcomer about "
        f"{_ms(min(static_first))}-{_ms(max(static_first))} ms after its ready file: the seed "
        "probe's first hello goes out before the CURVE handshake has completed and is dropped "
        "(ZMQ_IMMEDIATE), and the probe only retries after `RETRY_HELLO` (200 ms, "
        "zmesh/mesh/mesh.py); the others follow through peer exchange."
        if static_first
        else ""
    )
    return f"""# Discovery: join time ({report["utc"]})

Time from starting a node until **every** other node of the mesh sees it as a member
(`up` in its `$SYS/zmesh/peers`), median of {c["repetitions"]} run(s) per row
(`python -m benchmarks.discovery{" --quick" if c["quick"] else ""}`; raw data: `{json_name}`).

{table(rows)}

* **from spawn**: from spawning `ip netns exec NS python -m zmesh node run ...`, so it includes
  the interpreter's start, imports and the node's start-up (**spawn to ready file**, median
  {_ms(min(startup)) if startup else "-"}-{_ms(max(startup)) if startup else "-"} ms here).{shared}
* **from ready file**: from the node's ready file (written once the node has started: sockets
  bound, seeds dialled, discovery started, MQTT listening): Python's import time excluded.
* **first node**: when the first of the existing nodes saw it up.{static_note}

**Budget "under {b["budget_s"]:g} s for mDNS"**: {verdict_ready} from the ready file (the join
itself); {verdict_spawn} from process spawn (start-up included).

For reference (not measured here): Zyre's UDP beacons find peers in about 1 s (its default
beacon interval); Zenoh documents multicast scouting that can take up to 8 s.

## Conditions

* {c["topology"]}; {c["cores"]} cores ({c["cpu"]}), kernel {c["kernel"]},
  Python {c["python"]}, pyzmq {c["pyzmq"]} (libzmq {c["libzmq"]}), python-zeroconf
  {c["zeroconf"]}; zmesh at {c["git"]}{" (zmesh/ had uncommitted changes)" if c["git_dirty"] else ""}.
* Liveness defaults: heartbeat {c["heartbeat_interval_s"]:g} s, expiry {c["peer_expiry_s"]:g} s.
  static: {c["static_seeding"]}. mDNS: {c["mdns"]}.
* Each run on a fresh bridge: N-1 nodes started together and settled (each sees all others up,
  and with mDNS has registered its own service), the machine allowed to go quiet (at most
  {QUIET_MAX_S:g} s), then the Nth node started; observers stamp each `$SYS/zmesh/peers` value as
  it arrives (MQTT over the bridge, sub-millisecond).
* Clock for "from ready file": {c["from_ready_clock"]}.
* Load average at start: {", ".join(f"{x:.2f}" for x in c["loadavg_at_start"])}; at end:
  {", ".join(f"{x:.2f}" for x in c["loadavg_at_end"])}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.discovery", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="N = 3 only, one repetition")
    parser.add_argument("--no-write", action="store_true", help="print the table, write no files")
    parser.add_argument(
        "--render",
        metavar="JSON",
        help="re-summarise a results JSON and rewrite discovery-latest.md",
    )
    args = parser.parse_args(argv)
    if args.render:
        path = Path(args.render)
        report = json.loads(path.read_text())
        report["summary"] = summarise(report["samples"])
        report["budget"] = budget(report["summary"])
        path.write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "discovery-latest.md").write_text(markdown(report, path.name))
        print(table(report["summary"]))
        return 0
    reason = unsupported_reason()
    if reason:
        _progress(f"discovery benchmark: cannot run here: {reason}")
        return 2
    for leftover in sweep():
        _progress(f"removed leftover of a crashed run: {leftover}")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through every Net's close()

    signal.signal(signal.SIGTERM, on_term)
    sizes = SIZES_QUICK if args.quick else SIZES_FULL
    reps = 1 if args.quick else REPS_FULL
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    report: dict[str, Any] = {
        "benchmark": "discovery",
        "utc": stamp,
        "conditions": conditions(args.quick, reps, sizes),
        "samples": [],
    }
    keep: list[Path] = []
    for n in sizes:
        for mode in MODES:
            for rep in range(1, reps + 1):
                workdir = Path(tempfile.mkdtemp(prefix=f"zmesh-bench-disc-{mode}-{n}-"))
                try:
                    result = sample(mode, n, workdir)
                except KeyboardInterrupt:
                    _progress(f"interrupted; logs in {workdir}")
                    return 130
                except Exception as exc:  # record it, keep the logs, go on with the rest
                    result = {"mode": mode, "nodes": n, "error": f"{type(exc).__name__}: {exc}"}
                    keep.append(workdir)
                    _progress(f"[{mode} N={n} #{rep}] FAILED: {exc}\n{traceback.format_exc()}")
                else:
                    shutil.rmtree(workdir, ignore_errors=True)
                    _progress(
                        f"[{mode} N={n} #{rep}] every node saw it up {result['from_spawn_s'] * 1000:.0f} ms "
                        f"after spawn, {result['from_ready_s'] * 1000:.0f} ms after its ready file "
                        f"(first: {result['first_seen_from_ready_s'] * 1000:.0f} ms; "
                        f"mesh of {n - 1} formed in {result['existing_mesh_formed_s']:.1f} s)"
                    )
                result["rep"] = rep
                report["samples"].append(result)
    report["conditions"]["loadavg_at_end"] = list(os.getloadavg())
    report["summary"] = summarise(report["samples"])
    report["budget"] = budget(report["summary"])
    print(table(report["summary"]))
    b = report["budget"]
    print(
        f"mDNS budget {b['budget_s']:g} s: from ready file {'holds' if b['holds_from_ready'] else 'does NOT hold'}, "
        f"from spawn {'holds' if b['holds_from_spawn'] else 'does not hold'}"
    )
    if keep:
        print("logs of failed runs kept in: " + ", ".join(str(p) for p in keep))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = f"discovery-{stamp}.json"
        (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "discovery-latest.md").write_text(markdown(report, name))
        print(f"wrote {RESULTS / name} and {RESULTS / 'discovery-latest.md'}")
    return 1 if keep else 0


if __name__ == "__main__":
    sys.exit(main())
