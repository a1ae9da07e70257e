"""MQTT end to end: paho publisher -> node A -> mesh -> node B -> paho subscriber, against the
same paho clients through one Mosquitto broker and through amqtt, and Mosquitto's C clients.

    python -m benchmarks.mqtt_e2e [--quick] [--systems zmesh,mosquitto,amqtt,zmesh-c,mosquitto-c,amqtt-c]

Systems (every process on 127.0.0.1; brokers and nodes started here on free ports):

* ``zmesh``        two ``zmesh node run`` processes (CURVE between them), a paho publisher on A's
                   MQTT port, a paho subscriber on B's.
* ``mosquitto``    one Mosquitto (temp config: ``listener PORT 127.0.0.1``, anonymous), the same
                   paho publisher and subscriber on it.
* ``amqtt``        one amqtt broker, the same paho clients.
* ``mosquitto-c``  Mosquitto with its own C clients: ``mosquitto_pub -l`` reading N lines from a
                   file, ``mosquitto_sub -C N``; throughput only (no timestamps).
* ``zmesh-c``      the two zmesh nodes with the same C clients: zmesh's MQTT path without
                   paho's Python cost.
* ``amqtt-c``      amqtt with the same C clients (N/5). paho tops out near 20k msgs/s whatever
                   the server, so "5x amqtt" is also judged here, where the clients are not
                   the limit: zmesh-c against amqtt-c.

For QoS 0 and 1 and payloads of 64 B and 1 KiB: saturated throughput (the publisher sends N as
fast as the client can; QoS 1 with ``max_inflight_messages_set(100)``; msgs/s at the
subscriber, first to last) and paced latency (1,000 msgs/s; one-way, payload carries
``perf_counter_ns``). CPU per message of every process (clients, nodes, broker).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import fmt, progress

SYSTEMS = ("zmesh", "mosquitto", "amqtt", "zmesh-c", "mosquitto-c", "amqtt-c")
LABELS = {"zmesh": "zmesh, 2 nodes, paho", "mosquitto": "Mosquitto, paho", "amqtt": "amqtt, paho",
          "zmesh-c": "zmesh, 2 nodes, mosquitto_pub/sub", "mosquitto-c": "Mosquitto, mosquitto_pub/sub",
          "amqtt-c": "amqtt, mosquitto_pub/sub"}
SIZES = (64, 1024)
QOS = (0, 1)
WINDOW = 100
RATE = 1000


def servers(procs: common.Procs, workdir: Path, certs: Path, system: str) -> tuple[dict[str, int], int, int]:
    """Start what the system needs; (name -> pid, publisher's port, subscriber's port)."""
    if system.startswith("zmesh"):
        a, info_a = common.zmesh_node(procs, workdir, certs, "a")
        b, info_b = common.zmesh_node(procs, workdir, certs, "b", seeds=[info_a["control_port"]])
        return {"node_a": a.pid, "node_b": b.pid}, info_a["mqtt_port"], info_b["mqtt_port"]
    if system.startswith("mosquitto"):
        m, port = common.mosquitto_broker(procs, workdir)
        return {"broker": m.pid}, port, port
    m, port = common.amqtt_broker(procs, workdir)
    return {"broker": m.pid}, port, port


def c_clients_run(workdir: Path, pids: dict[str, int], pub_port: int, sub_port: int, qos: int,
                  size: int, n: int) -> dict[str, Any]:
    """mosquitto_sub -C N counting lines (timed by a reader thread) and mosquitto_pub -l < file."""
    data = workdir / f"lines-{size}-{n}.txt"
    if not data.exists():
        line = b"m" * (size - 1) + b"\n"
        data.write_bytes(line * n)
    warm_seen = threading.Event()
    state = {"count": 0, "first": 0.0, "last": 0.0}
    sub = subprocess.Popen(["mosquitto_sub", "-p", str(sub_port), "-h", "127.0.0.1", "-t", "bench/#",
                            "-q", str(qos), "-C", str(n + 100_000)], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
    measuring = threading.Event()

    def reader() -> None:
        assert sub.stdout is not None
        buf = b""
        while True:
            chunk = sub.stdout.read1(1 << 16)
            if not chunk:
                return
            now = time.perf_counter()
            buf += chunk
            lines = buf.count(b"\n")
            measured = buf.count(b"m\n") if size > 1 else lines
            buf = buf[buf.rfind(b"\n") + 1:]
            if lines - measured:
                warm_seen.set()
            if measured and measuring.is_set():
                if not state["count"]:
                    state["first"] = now
                state["count"] += measured
                state["last"] = now

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not warm_seen.is_set() and time.monotonic() < deadline:  # route up: sub is subscribed
            subprocess.run(["mosquitto_pub", "-p", str(pub_port), "-h", "127.0.0.1", "-t", "bench/t",
                            "-m", "WARM", "-q", "0"], timeout=10, check=False)
            warm_seen.wait(0.1)
        if not warm_seen.is_set():
            raise RuntimeError("mosquitto_sub saw no warm-up message in 20 s")
        time.sleep(0.2)  # stragglers of the warm-up
        common.wait_quiet()
        measuring.set()
        cpu0 = {k: common.proc_cpu_s(pid) for k, pid in pids.items()}
        sub_cpu0 = common.proc_cpu_s(sub.pid)
        machine = common.Machine()
        t0 = time.perf_counter()
        with open(data, "rb") as f:
            pub = subprocess.Popen(["mosquitto_pub", "-p", str(pub_port), "-h", "127.0.0.1", "-t", "bench/t",
                                    "-q", str(qos), "-l"], stdin=f, stderr=subprocess.DEVNULL)
            try:
                pub.wait(120)
            except subprocess.TimeoutExpired:
                pub.kill()
                pub.wait(5)
        pub_s = time.perf_counter() - t0
        pub_cpu = _children_cpu()
        deadline = time.monotonic() + 120
        while state["count"] < n and time.monotonic() < deadline:
            last = state["last"] or t0
            if time.perf_counter() - last > 2.0:
                break
            time.sleep(0.05)
        cpu = {k: common.proc_cpu_s(pid) - cpu0[k] for k, pid in pids.items()}
        sub_cpu = common.proc_cpu_s(sub.pid) - sub_cpu0
    finally:
        sub.kill()
        sub.wait(5)
    count = state["count"]
    rate = (count - 1) / (state["last"] - state["first"]) if count > 1 and state["last"] > state["first"] else 0.0
    own = sum(cpu.values()) + sub_cpu + pub_cpu
    return {
        "system": "", "mode": "throughput", "size": size, "n": n, "qos": qos, "subscribers": 1, "sent": n,
        "received": [count], "loss_pct": round(100 * (n - count) / n, 3), "msgs_per_s": round(rate),
        "msgs_per_s_per_sub": [round(rate)], "pub_send_msgs_per_s": round(n / pub_s),
        "cpu_us_per_msg": {"pub": round(1e6 * pub_cpu / n, 2), "sub0": round(1e6 * sub_cpu / max(1, count), 2),
                           **{k: round(1e6 * v / n, 2) for k, v in cpu.items()}},
        "peak_rss_mib": {k: round(common.proc_mem_kib(pid).get("VmHWM", 0) / 1024, 1) for k, pid in pids.items()},
        "background_cores": machine.background(own),
    }


_children_seen = [0.0]


def _children_cpu() -> float:
    """CPU of reaped children since the last call (mosquitto_pub)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = ru.ru_utime + ru.ru_stime
    delta, _children_seen[0] = total - _children_seen[0], total
    return delta


def run(quick: bool, systems: list[str], sizes: list[int], qoss: list[int]) -> dict[str, Any]:
    n_of = {64: 10_000, 1024: 5_000} if quick else {64: 50_000, 1024: 20_000}
    if quick:
        common.QUIET_MAX_S = 1.5  # quick: wait less for a quiet machine (the suite must stay under 5 min)
    lat_s = 1.0 if quick else 3.0
    workdir = Path(tempfile.mkdtemp(prefix="zmesh-mqtt-e2e-"))
    certs = common.make_certs(workdir / "certs", ["a", "b"])
    report: dict[str, Any] = {
        "scenario": "mqtt_e2e", "timestamp": common.stamp(),
        "conditions": common.conditions(quick=quick, sizes=sizes, qos=qoss, n=n_of, amqtt_n_divisor=5,
                                        latency_rate=RATE, latency_seconds=lat_s, window=WINDOW,
                                        curve="zmesh node to node: on; MQTT client links: plain TCP (all systems)",
                                        processes="pub client, node A/broker, node B, sub client",
                                        systems=systems),
        "rows": [], "skipped": {}, "errors": {}, "log_warnings": {},
    }
    progress(f"mqtt_e2e: {systems}; QoS {qoss}; payloads {sizes}; N {n_of} (amqtt N/5); latency {RATE}/s "
             f"for {lat_s:g} s; workdir {workdir}")
    _children_cpu()
    for system in systems:
        why = None
        if system.endswith("-c") and not shutil.which("mosquitto_pub"):
            why = "mosquitto_pub/mosquitto_sub not installed (apt-get install mosquitto-clients)"
        with common.Procs() as procs:
            try:
                if why is None:
                    pids, pub_port, sub_port = servers(procs, workdir, certs, system)
            except (FileNotFoundError, ModuleNotFoundError) as exc:
                why = str(exc)
            except Exception as exc:  # noqa: BLE001
                report["errors"][system] = f"start: {exc}"[:2000]
                progress(f"  [{system}] FAILED to start: {str(exc)[:500]}")
                continue
            if why:
                report["skipped"][system] = why
                progress(f"  [{system}] SKIPPED: {why}")
                continue
            for qos in qoss:
                for size in sizes:
                    n = n_of[size] // (5 if system.startswith("amqtt") else 1)
                    label = f"{system}-q{qos}-{size}"
                    try:
                        if system.endswith("-c"):
                            row = c_clients_run(workdir, pids, pub_port, sub_port, qos, size, n)
                            row["system"] = label
                            rows = [row]
                            progress(common.progress_line(row))
                        else:
                            phases = [{"mode": "throughput", "n": n, "size": size},
                                      {"mode": "latency", "n": int(RATE * lat_s), "size": size, "rate": RATE}]
                            rows = common.run_group(
                                procs, workdir, label,
                                ("paho-pub", {"host": "127.0.0.1", "port": pub_port, "qos": qos, "window": WINDOW}),
                                [("paho-sub", {"host": "127.0.0.1", "port": sub_port, "qos": qos})],
                                phases, servers=pids)
                        for r in rows:
                            r["qos"], r["base"] = qos, system
                        if system.startswith("zmesh"):  # the nodes' own counters (drops, queues)
                            rows[0]["sys_node_b"] = common.sys_node(sub_port)
                        report["rows"] += rows
                    except Exception as exc:  # noqa: BLE001
                        report["errors"][label] = str(exc)[:2000]
                        progress(f"  [{label}] FAILED: {str(exc)[:500]}")
            for proc in procs.items:
                warnings = common.log_warnings(proc.log_path)
                if warnings:
                    report["log_warnings"][proc.name] = warnings
    report["workdir"] = str(workdir)
    derive(report)
    return report


def _get(report: dict[str, Any], system: str, qos: int, size: int, mode: str) -> dict[str, Any] | None:
    return next((r for r in report["rows"] if r.get("base") == system and r["qos"] == qos
                 and r["size"] == size and r["mode"] == mode), None)


def derive(report: dict[str, Any]) -> None:
    """Budgets: throughput vs Mosquitto (same paho clients), paced p50 vs Mosquitto, vs amqtt."""
    budgets = []
    for size in report["conditions"]["sizes"]:
        for qos in report["conditions"]["qos"]:
            z, m, a = (_get(report, s, qos, size, "throughput") for s in ("zmesh", "mosquitto", "amqtt"))
            need = 0.5 if qos == 0 else 0.6
            if z and m and m["msgs_per_s"]:
                ratio = z["msgs_per_s"] / m["msgs_per_s"]
                budgets.append({"budget": f"MQTT e2e QoS {qos} {size} B throughput >= {need}x Mosquitto (paho)",
                                "figure": f"{z['msgs_per_s']:,} vs {m['msgs_per_s']:,} msgs/s = {ratio:.2f}x",
                                "holds": ratio >= need})
            if z and a and a["msgs_per_s"]:
                ratio = z["msgs_per_s"] / a["msgs_per_s"]
                budgets.append({"budget": f"MQTT e2e QoS {qos} {size} B throughput >= 5x amqtt",
                                "figure": f"{z['msgs_per_s']:,} vs {a['msgs_per_s']:,} msgs/s = {ratio:.2f}x",
                                "holds": ratio >= 5})
            zl, ml = (_get(report, s, qos, size, "latency") for s in ("zmesh", "mosquitto"))
            if zl and ml and zl.get("p50_us") and ml.get("p50_us"):
                ratio = zl["p50_us"] / ml["p50_us"]
                budgets.append({"budget": f"MQTT e2e QoS {qos} {size} B paced p50 within 2x Mosquitto",
                                "figure": f"{zl['p50_us']:.0f} vs {ml['p50_us']:.0f} µs = {ratio:.2f}x",
                                "holds": ratio <= 2})
            zc, mc, ac = (_get(report, s, qos, size, "throughput") for s in ("zmesh-c", "mosquitto-c", "amqtt-c"))
            if zc and ac and ac["msgs_per_s"]:
                ratio = zc["msgs_per_s"] / ac["msgs_per_s"]
                budgets.append({"budget": f"MQTT e2e QoS {qos} {size} B throughput >= 5x amqtt (C clients)",
                                "figure": f"{zc['msgs_per_s']:,} vs {ac['msgs_per_s']:,} msgs/s = {ratio:.2f}x",
                                "holds": ratio >= 5})
            if zc and mc and mc["msgs_per_s"]:
                ratio = zc["msgs_per_s"] / mc["msgs_per_s"]
                budgets.append({"budget": f"(reference) QoS {qos} {size} B with C clients: zmesh / Mosquitto",
                                "figure": f"{zc['msgs_per_s']:,} vs {mc['msgs_per_s']:,} msgs/s = {ratio:.2f}x",
                                "holds": None})
    report["budgets"] = budgets


def table(report: dict[str, Any]) -> str:
    lines = ["| system | QoS | payload | msgs/s | loss % | p50/p90/p99 µs @1,000/s | p50/p99 µs saturated | "
             "CPU µs/msg pub · server(s) · sub | peak RSS MiB server(s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if r["mode"] != "throughput":
            continue
        lat = _get(report, r["base"], r["qos"], r["size"], "latency") or {}
        cpu = r["cpu_us_per_msg"]
        srv = " + ".join(f"{cpu[k]:.1f}" for k in cpu if k not in ("pub", "sub0"))
        rss = " / ".join(f"{v:.0f}" for k, v in r["peak_rss_mib"].items() if k not in ("pub", "sub0"))
        lines.append(
            f"| {LABELS[r['base']]} | {r['qos']} | {r['size']} B | {r['msgs_per_s']:,} | {r['loss_pct']:.2f} | "
            f"{fmt(lat.get('p50_us'))} / {fmt(lat.get('p90_us'))} / {fmt(lat.get('p99_us'))} | "
            f"{fmt(r.get('p50_us'))} / {fmt(r.get('p99_us'))} | {cpu['pub']:.1f} · {srv} · {cpu['sub0']:.1f} | {rss} |")
    return "\n".join(lines)


def budget_table(budgets: list[dict[str, Any]]) -> str:
    lines = ["| budget | figure | holds? |", "|---|---|---|"]
    for b in budgets:
        verdict = "–" if b["holds"] is None else ("yes" if b["holds"] else "**no**")
        lines.append(f"| {b['budget']} | {b['figure']} | {verdict} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    c = report["conditions"]
    out = [f"**mqtt_e2e, {report['timestamp']}{' (quick)' if c['quick'] else ''}**", "",
           common.conditions_line(c) + f". MQTT 3.1.1 clients on plain TCP loopback; zmesh's two nodes "
           f"talk CURVE. Throughput: N = {', '.join(f'{v:,} ({k} B)' for k, v in c['n'].items())} (amqtt N/5), "
           f"QoS 1 window {c['window']}; latency one-way at {c['latency_rate']:,} msgs/s for "
           f"{c['latency_seconds']:g} s. Servers: node A + node B for zmesh, the broker otherwise. "
           "Full figures: `results/{JSON}`.", "", table(report), "", budget_table(report["budgets"])]
    for k, v in {**report["skipped"], **report["errors"]}.items():
        out.append(f"\n* {k}: {v.splitlines()[0] if v else v}")
    return "\n".join(out) + "\n"


def plot_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in report["rows"]:
        if r["mode"] == "throughput":
            lat = _get(report, r["base"], r["qos"], r["size"], "latency") or {}
            out.append({"label": f"{r['base']} q{r['qos']} {r['size']}B", "msgs_per_s": r["msgs_per_s"],
                        "p50_us": lat.get("p50_us"), "p99_us": lat.get("p99_us")})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mqtt_e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--qos", default=",".join(map(str, QOS)))
    parser.add_argument("--no-save", action="store_true")
    opts = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    report = run(opts.quick, [s for s in opts.systems.split(",") if s], [int(x) for x in opts.sizes.split(",")],
                 [int(x) for x in opts.qos.split(",")])
    report["duration_s"] = round(time.perf_counter() - started, 1)
    md = markdown(report)
    print("\n" + md)
    for name, lines in report["log_warnings"].items():
        print(f"  {name}: {len(lines)} warning/error log lines, e.g. {lines[0][:200]}")
    if not opts.no_save:
        common.save("mqtt_e2e", report, md, opts.quick)
        from benchmarks import plots

        plots.plot("mqtt_e2e", plot_rows(report), "MQTT end to end (paho or C clients)")
    if not report["errors"] and not report["log_warnings"]:
        shutil.rmtree(report["workdir"], ignore_errors=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
