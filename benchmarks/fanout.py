"""1-to-N fan-out across N nodes: one publisher node, one subscriber on each other node.

    python -m benchmarks.fanout [--quick] [--systems zmesh,raw,zenoh] [--nodes 2,4,8]

Each node is its own process (``benchmarks.clients`` workers), on 127.0.0.1:

* ``zmesh``  embedded ``zmesh.Node``s (CURVE on): the publisher's node has no seeds, every
             subscriber's node is seeded with it; ``await node.publish()`` / ``node.subscribe``.
* ``raw``    raw pyzmq, CURVE on: one PUB (ZAP-authenticated), N-1 SUBs; one msgpack frame
             per message (the pubsub suite's ``raw-msgpack``).
* ``zenoh``  Eclipse Zenoh Python bindings, peer mode, multicast scouting off, every
             subscriber connecting to the publisher's TCP endpoint; ``CongestionControl.BLOCK``
             (lossless, as the others are here); no encryption.

N = 2 is node-to-node. Per N: saturated throughput (64 B; msgs/s delivered, summed over
subscribers and per subscriber) and paced latency (1,000 msgs/s, one-way, every subscriber).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import fmt, progress

SYSTEMS = ("zmesh", "raw", "zenoh")
LABELS = {"zmesh": "zmesh (CURVE)", "raw": "raw pyzmq CURVE msgpack", "zenoh": "Zenoh peer (no crypto)"}
NODES = (2, 4, 8)
SIZE = 64


def _available(system: str) -> str | None:
    if system == "zenoh":
        import importlib.util

        if importlib.util.find_spec("zenoh") is None:
            return "eclipse-zenoh is not installed (pip install 'eclipse-zenoh>=1.0')"
    return None


def group(procs: common.Procs, workdir: Path, certs: Path, system: str, nodes: int,
          phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    label = f"{system}-{nodes}"
    subs_n = nodes - 1
    if system == "zmesh":
        pub = ("zmesh-pub", {"certs": str(certs), "name": "n0"})
        subs = [("zmesh-sub", {"certs": str(certs), "name": f"n{i}"}) for i in range(1, nodes)]
        return common.run_group(procs, workdir, label, pub, subs, phases,
                                sub_args_from_pub=lambda r: {"seeds": [r["control_port"]]})
    if system == "raw":
        pub = ("raw-pub", {"certs": str(certs), "name": "n0"})
        subs = [("raw-sub", {"certs": str(certs), "name": f"n{i}", "server": "n0"}) for i in range(1, nodes)]
        return common.run_group(procs, workdir, label, pub, subs, phases,
                                sub_args_from_pub=lambda r: {"port": r["port"]})
    port = common.free_port()
    pub = ("zenoh-pub", {"listen": port})
    subs = [("zenoh-sub", {"listen": common.free_port(), "connect": [port]}) for _ in range(subs_n)]
    return common.run_group(procs, workdir, label, pub, subs, phases)


def run(quick: bool, systems: list[str], node_counts: list[int]) -> dict[str, Any]:
    n = 30_000 if quick else 200_000
    if quick:
        common.QUIET_MAX_S = 1.5
    lat_s = 1.0 if quick else 3.0
    phases = [{"mode": "throughput", "n": n, "size": SIZE},
              {"mode": "latency", "n": int(1000 * lat_s), "size": SIZE, "rate": 1000}]
    workdir = Path(tempfile.mkdtemp(prefix="zmesh-fanout-"))
    certs = common.make_certs(workdir / "certs", [f"n{i}" for i in range(max(node_counts))])
    report: dict[str, Any] = {
        "scenario": "fanout", "timestamp": common.stamp(),
        "conditions": common.conditions(quick=quick, payload=SIZE, qos=0, phases=phases,
                                        curve={"zmesh": True, "raw": True, "zenoh": False},
                                        processes="one per node (N)", systems=systems, nodes=node_counts),
        "rows": [], "skipped": {}, "errors": {},
    }
    progress(f"fanout: {systems} x N={node_counts}; throughput N={n:,} x {SIZE} B, latency 1,000/s for "
             f"{lat_s:g} s; workdir {workdir}")
    with common.Procs() as procs:
        for system in systems:
            why = _available(system)
            if why:
                report["skipped"][system] = why
                progress(f"  [{system}] SKIPPED: {why}")
                continue
            for nodes in node_counts:
                try:
                    report["rows"] += group(procs, workdir, certs, system, nodes, phases)
                except Exception as exc:  # noqa: BLE001 - one system's failure is reported, not fatal
                    report["errors"][f"{system}-{nodes}"] = str(exc)[:2000]
                    progress(f"  [{system}-{nodes}] FAILED: {str(exc)[:500]}")
    report["workdir"] = str(workdir)
    return report


def table(report: dict[str, Any]) -> str:
    lines = ["| system | nodes (subs) | msgs/s delivered, sum | per subscriber (min–max) | loss % | "
             "p50/p90/p99 µs @1,000/s | p50/p99 µs saturated | CPU µs/msg pub / sub (mean) | peak RSS MiB pub / sub (max) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = report["rows"]
    for sys_nodes in dict.fromkeys(r["system"] for r in rows):
        t = next((r for r in rows if r["system"] == sys_nodes and r["mode"] == "throughput"), None)
        lat = next((r for r in rows if r["system"] == sys_nodes and r["mode"] == "latency"), None)
        if t is None:
            continue
        system, nodes = sys_nodes.rsplit("-", 1)
        per = t["msgs_per_s_per_sub"]
        subs_cpu = [v for k, v in t["cpu_us_per_msg"].items() if k.startswith("sub")]
        subs_rss = [v for k, v in t["peak_rss_mib"].items() if k.startswith("sub")]
        lines.append(
            f"| {LABELS[system]} | {nodes} ({t['subscribers']}) | {t['msgs_per_s']:,} | {min(per):,}–{max(per):,} | "
            f"{t['loss_pct']:.2f} | {fmt(lat and lat['p50_us'])} / {fmt(lat and lat['p90_us'])} / {fmt(lat and lat['p99_us'])} | "
            f"{fmt(t.get('p50_us'))} / {fmt(t.get('p99_us'))} | {t['cpu_us_per_msg']['pub']:.2f} / "
            f"{sum(subs_cpu) / len(subs_cpu):.2f} | {t['peak_rss_mib']['pub']:.0f} / {max(subs_rss):.0f} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    c = report["conditions"]
    out = [f"**fanout, {report['timestamp']}{' (quick)' if c['quick'] else ''}**", "",
           common.conditions_line(c) + f". Payload {c['payload']} B, QoS 0; CURVE on for zmesh and raw "
           "pyzmq, off for Zenoh; one process per node. Throughput: N = "
           f"{c['phases'][0]['n']:,} messages, delivered msgs/s summed over subscribers; latency one-way at "
           f"1,000 msgs/s for {c['phases'][1]['n'] / 1000:g} s, all subscribers pooled. Full figures: "
           "`results/{JSON}`.", "", table(report)]
    for k, v in {**report["skipped"], **report["errors"]}.items():
        out.append(f"\n* {k}: {v.splitlines()[0] if v else v}")
    return "\n".join(out) + "\n"


def plot_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in report["rows"]:
        if r["mode"] != "throughput":
            continue
        lat = next((x for x in report["rows"] if x["system"] == r["system"] and x["mode"] == "latency"), {})
        out.append({"label": r["system"], "msgs_per_s": r["msgs_per_s"], "p50_us": lat.get("p50_us"),
                    "p99_us": lat.get("p99_us")})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--nodes", default=",".join(map(str, NODES)))
    parser.add_argument("--no-save", action="store_true")
    opts = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    report = run(opts.quick, [s for s in opts.systems.split(",") if s],
                 [int(x) for x in opts.nodes.split(",") if x])
    report["duration_s"] = round(time.perf_counter() - started, 1)
    md = markdown(report)
    print("\n" + md)
    if not opts.no_save:
        common.save("fanout", report, md, opts.quick)
        from benchmarks import plots

        plots.plot("fanout", plot_rows(report), "fan-out 64 B (label: system-nodes)")
    if not report["errors"]:
        shutil.rmtree(report["workdir"], ignore_errors=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
