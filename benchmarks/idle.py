"""Idle node: RSS and CPU% of one idle zmesh node over ~10 s, beside idle Mosquitto and amqtt.

    python -m benchmarks.idle [--quick]      # quick: 5 s

Systems, all started here on 127.0.0.1 and left alone (no clients) while sampled:

* ``zmesh alone``    ``zmesh node run`` with MQTT on, no peers;
* ``zmesh in mesh``  node A of a two-node mesh (heartbeats to its peer, CURVE);
* ``Mosquitto``, ``amqtt``: one broker each.

After a 2 s settle, CPU time (/proc/PID/stat utime+stime, all threads) over the window in % of
one core, and RSS (VmRSS) at the end. Budget: an idle node under 40 MB RSS and 1% of a core.
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
from benchmarks.common import progress

SETTLE_S = 2.0


def run(quick: bool) -> dict[str, Any]:
    window = 5.0 if quick else 10.0
    workdir = Path(tempfile.mkdtemp(prefix="zmesh-idle-"))
    certs = common.make_certs(workdir / "certs", ["a", "b", "solo"])
    report: dict[str, Any] = {"scenario": "idle", "timestamp": common.stamp(),
                              "conditions": common.conditions(quick=quick, window_s=window, settle_s=SETTLE_S),
                              "rows": [], "skipped": {}, "errors": {}}
    progress(f"idle: sampling for {window:g} s after {SETTLE_S:g} s; workdir {workdir}")
    with common.Procs() as procs:
        pids: dict[str, int] = {}
        try:
            solo, _ = common.zmesh_node(procs, workdir, certs, "solo")
            pids["zmesh node alone (MQTT on)"] = solo.pid
            a, info = common.zmesh_node(procs, workdir, certs, "a")
            common.zmesh_node(procs, workdir, certs, "b", seeds=[info["control_port"]])
            pids["zmesh node in a 2-node mesh"] = a.pid
        except Exception as exc:  # noqa: BLE001
            report["errors"]["zmesh"] = str(exc)[:1000]
        for name, start in (("Mosquitto", common.mosquitto_broker), ("amqtt", common.amqtt_broker)):
            try:
                proc, _port = start(procs, workdir)
                pids[name] = proc.pid
            except (FileNotFoundError, ModuleNotFoundError) as exc:
                report["skipped"][name] = str(exc)
                progress(f"  [{name}] SKIPPED: {exc}")
        time.sleep(SETTLE_S)  # start-up work (imports, first heartbeats) is not idling
        cpu0 = {k: common.proc_cpu_s(p) for k, p in pids.items()}
        t0 = time.perf_counter()
        time.sleep(window)  # the measurement window: nothing else is done meanwhile
        wall = time.perf_counter() - t0
        for name, pid in pids.items():
            mem = common.proc_mem_kib(pid)
            row = {"system": name, "cpu_pct": round(100 * (common.proc_cpu_s(pid) - cpu0[name]) / wall, 2),
                   "rss_mib": round(mem.get("VmRSS", 0) / 1024, 1), "peak_rss_mib": round(mem.get("VmHWM", 0) / 1024, 1),
                   "window_s": round(wall, 1)}
            report["rows"].append(row)
            progress(f"  [{name}] {row['cpu_pct']:.2f}% of a core, RSS {row['rss_mib']:.1f} MiB (peak {row['peak_rss_mib']:.1f})")
    z = [r for r in report["rows"] if r["system"].startswith("zmesh")]
    report["budgets"] = [
        {"budget": f"idle node < 40 MB RSS ({r['system']})", "figure": f"{r['rss_mib'] * 1.048576:.1f} MB",
         "holds": r["rss_mib"] * 1.048576 < 40} for r in z] + [
        {"budget": f"idle node < 1% of a core ({r['system']})", "figure": f"{r['cpu_pct']:.2f}%",
         "holds": r["cpu_pct"] < 1} for r in z]
    report["workdir"] = str(workdir)
    return report


def markdown(report: dict[str, Any]) -> str:
    c = report["conditions"]
    out = [f"**idle, {report['timestamp']}{' (quick)' if c['quick'] else ''}**", "",
           common.conditions_line(c) + f". Window {c['window_s']:g} s after {c['settle_s']:g} s settling; "
           "no clients. Full figures: `results/{JSON}`.", "",
           "| process | CPU % of one core | RSS MiB | peak RSS MiB |", "|---|---:|---:|---:|"]
    for r in report["rows"]:
        out.append(f"| {r['system']} | {r['cpu_pct']:.2f} | {r['rss_mib']:.1f} | {r['peak_rss_mib']:.1f} |")
    for k, v in {**report["skipped"], **report["errors"]}.items():
        out.append(f"\n* {k}: {v}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    opts = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run(opts.quick)
    md = markdown(report)
    print("\n" + md)
    if not opts.no_save:
        common.save("idle", report, md, opts.quick)
    shutil.rmtree(report["workdir"], ignore_errors=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
