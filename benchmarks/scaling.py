"""Scaling: CPU per message and memory per node as subscriptions and retained topics grow.

    python -m benchmarks.scaling [--quick]

Two embedded zmesh nodes (``benchmarks.clients`` zmesh-pub / zmesh-sub, CURVE on). The
subscriber's node holds F extra filters that match nothing (``scale/<i>/+/x``: 100, 1,000,
10,000) besides ``bench/#``; or the publisher's node holds R retained topics (10k, 100k) that
the subscriber's node syncs before measuring. Per case: saturated 64 B throughput, paced
latency (1,000 msgs/s), CPU µs per message of each node, RSS of each node after set-up.
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

CASES = [("baseline", 0, 0), ("100 filters", 100, 0), ("1,000 filters", 1000, 0), ("10,000 filters", 10_000, 0),
         ("10k retained", 0, 10_000), ("100k retained", 0, 100_000)]


def run(quick: bool) -> dict[str, Any]:
    n = 30_000 if quick else 200_000
    lat_s = 1.0 if quick else 3.0
    phases = [{"mode": "throughput", "n": n, "size": 64},
              {"mode": "latency", "n": int(1000 * lat_s), "size": 64, "rate": 1000}]
    workdir = Path(tempfile.mkdtemp(prefix="zmesh-scaling-"))
    certs = common.make_certs(workdir / "certs", ["n0", "n1"])
    report: dict[str, Any] = {"scenario": "scaling", "timestamp": common.stamp(),
                              "conditions": common.conditions(quick=quick, phases=phases, payload=64, curve=True,
                                                              processes="2 nodes (embedded, one process each)"),
                              "rows": [], "errors": {}}
    progress(f"scaling: {[c[0] for c in CASES]}; N={n:,}; workdir {workdir}")
    with common.Procs() as procs:
        for label, filters, retained in CASES:
            try:
                rows = common.run_group(
                    procs, workdir, label, ("zmesh-pub", {"certs": str(certs), "name": "n0", "retained": retained}),
                    [("zmesh-sub", {"certs": str(certs), "name": "n1", "filters": filters, "retained": retained})],
                    phases, sub_args_from_pub=lambda r: {"seeds": [r["control_port"]]})
                for r in rows:
                    r["filters"], r["retained"] = filters, retained
                report["rows"] += rows
            except Exception as exc:  # noqa: BLE001
                report["errors"][label] = str(exc)[:2000]
                progress(f"  [{label}] FAILED: {str(exc)[:500]}")
    report["workdir"] = str(workdir)
    return report


def markdown(report: dict[str, Any]) -> str:
    c = report["conditions"]
    out = [f"**scaling, {report['timestamp']}{' (quick)' if c['quick'] else ''}**", "",
           common.conditions_line(c) + f". 64 B, N = {c['phases'][0]['n']:,}; latency at 1,000 msgs/s. "
           "Peak RSS per node process (includes the interpreter, ~30 MiB). Full figures: `results/{JSON}`.", "",
           "| case | msgs/s | loss % | CPU µs/msg pub node / sub node | p50 / p99 µs @1,000/s | peak RSS MiB pub / sub node |",
           "|---|---:|---:|---:|---:|---:|"]
    rows = report["rows"]
    for r in rows:
        if r["mode"] != "throughput":
            continue
        lat = next((x for x in rows if x["system"] == r["system"] and x["mode"] == "latency"), {})
        rss = {k: max(v, (lat.get("peak_rss_mib") or {}).get(k, 0)) for k, v in r["peak_rss_mib"].items()}
        out.append(f"| {r['system']} | {r['msgs_per_s']:,} | {r['loss_pct']:.2f} | {r['cpu_us_per_msg']['pub']:.2f} / "
                   f"{r['cpu_us_per_msg']['sub0']:.2f} | {fmt(lat.get('p50_us'))} / {fmt(lat.get('p99_us'))} | "
                   f"{rss['pub']:.0f} / {rss['sub0']:.0f} |")
    for k, v in report["errors"].items():
        out.append(f"\n* {k}: {v.splitlines()[0]}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    opts = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    report = run(opts.quick)
    report["duration_s"] = round(time.perf_counter() - started, 1)
    md = markdown(report)
    print("\n" + md)
    if not opts.no_save:
        common.save("scaling", report, md, opts.quick)
    if not report["errors"]:
        shutil.rmtree(report["workdir"], ignore_errors=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
