"""Request/reply latency: a requester on one node, a responder on another, one request in flight.

    python -m benchmarks.reqrep [--quick]

* ``zmesh``      two ``zmesh node run`` processes; a paho responder on node B subscribed to
                 ``rr/req/#`` answers each request on ``rr/rep/<id>``; a paho requester on
                 node A (subscribed to ``rr/rep/#``) sends the next request when the reply is in.
* ``mosquitto``  the same paho requester and responder on one Mosquitto broker.
* ``zenoh``      Zenoh Python bindings, peer mode: ``session.get("rr/q")`` against a queryable.

Round-trip time per request (perf_counter_ns), 64 B payloads; requests/s is 1 / mean RTT.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import fmt, progress

SYSTEMS = ("zmesh", "mosquitto", "zenoh")
LABELS = {"zmesh": "zmesh, 2 nodes, paho req/resp", "mosquitto": "Mosquitto, paho req/resp",
          "zenoh": "Zenoh peer get/queryable"}


def one(procs: common.Procs, workdir: Path, certs: Path, system: str, n: int) -> dict[str, Any]:
    pids: dict[str, int] = {}
    if system == "zenoh":
        port = common.free_port()
        resp = common.worker(procs, workdir, "zenoh-queryable", {"listen": port}, "zenoh-queryable")
        resp.expect("ready", 60)
        req = common.worker(procs, workdir, "zenoh-requester",
                            {"listen": common.free_port(), "connect": [port], "n": n, "size": 64}, "zenoh-req")
    else:
        if system == "zmesh":
            a, info_a = common.zmesh_node(procs, workdir, certs, "a")
            b, info_b = common.zmesh_node(procs, workdir, certs, "b", seeds=[info_a["control_port"]])
            pids, req_port, resp_port = {"node_a": a.pid, "node_b": b.pid}, info_a["mqtt_port"], info_b["mqtt_port"]
        else:
            m, port = common.mosquitto_broker(procs, workdir)
            pids, req_port, resp_port = {"broker": m.pid}, port, port
        resp = common.worker(procs, workdir, "paho-responder", {"host": "127.0.0.1", "port": resp_port}, f"{system}-resp")
        resp.expect("ready", 60)
        req = common.worker(procs, workdir, "paho-requester",
                            {"host": "127.0.0.1", "port": req_port, "n": n, "size": 64}, f"{system}-req")
    req.expect("ready", 60)
    cpu0 = {k: common.proc_cpu_s(p) for k, p in pids.items()}
    result = req.expect("result", 120)["result"]
    cpu = {k: common.proc_cpu_s(p) - cpu0[k] for k, p in pids.items()}
    rtt = common.lat_summary(result.pop("rtt_us"))
    row = {"system": system, **{k: v for k, v in result.items()}, **rtt,
           "req_per_s": round(result["replies"] / result["wall_s"]) if result["wall_s"] else None,
           "cpu_us_per_request": {"requester": round(1e6 * result["cpu_s"] / max(1, result["sent"]), 1),
                                  **{k: round(1e6 * v / max(1, result["sent"]), 1) for k, v in cpu.items()}}}
    progress(f"  [{system}] rtt p50 {fmt(row['p50_us'])} p90 {fmt(row['p90_us'])} p99 {fmt(row['p99_us'])} us, "
             f"{row['req_per_s']} req/s, {row['lost']} lost")
    return row


def run(quick: bool, systems: list[str]) -> dict[str, Any]:
    n = 500 if quick else 3000
    workdir = Path(tempfile.mkdtemp(prefix="zmesh-reqrep-"))
    certs = common.make_certs(workdir / "certs", ["a", "b"])
    report: dict[str, Any] = {"scenario": "reqrep", "timestamp": common.stamp(),
                              "conditions": common.conditions(quick=quick, n=n, payload=64, qos=0,
                                                              curve="zmesh mesh: on; MQTT clients plain TCP; Zenoh: none"),
                              "rows": [], "skipped": {}, "errors": {}}
    progress(f"reqrep: {systems}; {n} requests each; workdir {workdir}")
    for system in systems:
        if system == "zenoh" and importlib.util.find_spec("zenoh") is None:
            report["skipped"][system] = "eclipse-zenoh is not installed"
            continue
        with common.Procs() as procs:
            try:
                common.wait_quiet()
                report["rows"].append(one(procs, workdir, certs, system, n))
            except FileNotFoundError as exc:
                report["skipped"][system] = str(exc)
            except Exception as exc:  # noqa: BLE001
                report["errors"][system] = str(exc)[:2000]
                progress(f"  [{system}] FAILED: {str(exc)[:500]}")
    report["workdir"] = str(workdir)
    return report


def markdown(report: dict[str, Any]) -> str:
    c = report["conditions"]
    out = [f"**reqrep, {report['timestamp']}{' (quick)' if c['quick'] else ''}**", "",
           common.conditions_line(c) + f". {c['n']:,} requests, one in flight, 64 B, QoS 0. "
           "Full figures: `results/{JSON}`.", "",
           "| system | RTT p50 µs | p90 µs | p99 µs | max µs | req/s | lost | CPU µs/request (requester, servers) |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_us_per_request"].items())
        out.append(f"| {LABELS[r['system']]} | {fmt(r['p50_us'])} | {fmt(r['p90_us'])} | {fmt(r['p99_us'])} | "
                   f"{fmt(r['max_us'])} | {fmt(r['req_per_s'])} | {r['lost']} | {cpu} |")
    for k, v in {**report["skipped"], **report["errors"]}.items():
        out.append(f"\n* {k}: {v.splitlines()[0] if v else v}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reqrep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--no-save", action="store_true")
    opts = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run(opts.quick, [s for s in opts.systems.split(",") if s])
    md = markdown(report)
    print("\n" + md)
    if not opts.no_save:
        common.save("reqrep", report, md, opts.quick)
        from benchmarks import plots

        plots.plot("reqrep", [{"label": LABELS[r["system"]], "msgs_per_s": r["req_per_s"], "p50_us": r["p50_us"],
                               "p99_us": r["p99_us"]} for r in report["rows"]], "request/reply (closed loop)",
                   "round trip µs")
    if not report["errors"]:
        shutil.rmtree(report["workdir"], ignore_errors=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
