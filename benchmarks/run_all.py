"""The whole suite, one scenario after another, then the budgets table and the README.

    python -m benchmarks.run_all            # full (~6 min on a quiet 2-core machine; longer when loaded)
    python -m benchmarks.run_all --quick    # quick (a few minutes)
    python -m benchmarks.run_all --only mqtt_e2e,idle

Each scenario writes ``results/<scenario>-<UTC>[-quick].json`` and ``results/<scenario>-latest.md``
(and a PNG where it plots); this writes ``results/budgets-latest.md`` and the section of
``benchmarks/README.md`` between the ``suite-latest`` markers.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

from benchmarks import common
from benchmarks.common import RESULTS, progress

SCENARIOS = ("pubsub", "mqtt_e2e", "fanout", "idle", "reqrep", "scaling", "jobs", "retained", "discovery")
BEGIN, END = "<!-- suite-latest:begin -->", "<!-- suite-latest:end -->"


def module(name: str) -> Any:
    return __import__(f"benchmarks.{name}", fromlist=["main"])


def latest_json(scenario: str) -> dict[str, Any] | None:
    files = sorted(RESULTS.glob(f"{scenario}-2*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def budgets() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    e2e = latest_json("mqtt_e2e")
    if e2e:
        out += [b for b in e2e.get("budgets", []) if b["holds"] is not None]
    idle = latest_json("idle")
    if idle:
        out += idle.get("budgets", [])
    ps = latest_json("pubsub")
    if ps:
        sysd = ps["systems"]
        for size in ps["conditions"]["payload_sizes"]:
            z = sysd.get("zmesh", {}).get("latency", {}).get(str(size))
            for ref in ("raw-msgpack", "raw-multipart"):
                r = sysd.get(ref, {}).get("latency", {}).get(str(size))
                if z and r:
                    ratio = z["p50_us"] / r["p50_us"]
                    out.append({"budget": f"node-to-node p50 @1,000/s {size} B within 1.2x raw pyzmq ({ref})",
                                "figure": f"{z['p50_us']:.0f} vs {r['p50_us']:.0f} µs = {ratio:.2f}x", "holds": ratio <= 1.2})
            if z:
                out.append({"budget": f"node-to-node p99 @1,000/s {size} B < 1 ms", "figure": f"{z['p99_us']:.0f} µs",
                            "holds": z["p99_us"] < 1000})
            zt = sysd.get("zmesh", {}).get("throughput", {}).get(str(size), {}).get("median")
            rt = sysd.get("raw-msgpack", {}).get("throughput", {}).get(str(size), {}).get("median")
            if zt and rt:
                ratio = zt["msgs_per_s"] / rt["msgs_per_s"]
                out.append({"budget": f"node-to-node {size} B >= 1.0x raw pyzmq CURVE msgpack single-frame",
                            "figure": f"{zt['msgs_per_s']:,} vs {rt['msgs_per_s']:,} msgs/s = {ratio:.2f}x",
                            "holds": ratio >= 1.0})
    fo = latest_json("fanout")
    if fo:
        z = next((r for r in fo["rows"] if r["system"] == "zmesh-2" and r["mode"] == "throughput"), None)
        zn = next((r for r in fo["rows"] if r["system"] == "zenoh-2" and r["mode"] == "throughput"), None)
        if z and zn:
            out.append({"budget": "(goal beyond) node-to-node vs Zenoh (~1.1M msgs/s published; Python bindings here)",
                        "figure": f"{z['msgs_per_s']:,} vs Zenoh-Python {zn['msgs_per_s']:,} msgs/s = "
                                  f"{z['msgs_per_s'] / max(1, zn['msgs_per_s']):.2f}x; vs 1.1M = {z['msgs_per_s'] / 1.1e6:.2f}x",
                        "holds": z["msgs_per_s"] >= 1.1e6})
    jobs = latest_json("jobs")
    if jobs:
        for r in jobs.get("ratios", {}).values():
            if r["system"] == "zmesh":  # the default-throughput setting (prefetch 256)
                out.append({"budget": f"work queue, {r['workers']} worker node(s): jobs/s within 3x raw pyzmq PUSH/PULL + ack",
                            "figure": f"raw/zmesh = {r['raw_over_zmesh']:.2f}x", "holds": r["within_budget"]})
    retained = latest_json("retained")
    if retained:
        for where in ("memory", "store"):
            s = retained.get("summary", {}).get(f"sync_{where}")
            if s:
                out.append({"budget": f"late joiner sync of {retained['n']:,} retained entries < 2 s ({where})",
                            "figure": f"median {s['median_s']:.2f} s (max {s['max_s']:.2f} s, {s['runs']} runs)",
                            "holds": s["budget_holds"]})
    disc = latest_json("discovery")
    if disc and disc.get("budget"):
        budget_s = disc["budget"]["budget_s"]
        worst = max((r["median_from_ready_s"] for r in disc["summary"]), default=None)
        if worst is not None:
            out.append({"budget": f"discovery: every node sees a new one within {budget_s:g} s of it being up",
                        "figure": f"worst median {worst * 1000:.0f} ms", "holds": disc["budget"]["holds_from_ready"]})
    return out


def plot_scenario(name: str) -> None:
    """The PNG of a scenario whose module does not draw its own, from its latest JSON."""
    from benchmarks import plots

    data = latest_json(name)
    if data is None:
        return
    if name == "pubsub":
        rows = []
        for system, d in data["systems"].items():
            for size in data["conditions"]["payload_sizes"]:
                t = d.get("throughput", {}).get(str(size), {}).get("median", {})
                lat = d.get("latency", {}).get(str(size), {})
                rows.append({"label": f"{system} {size}B", "msgs_per_s": t.get("msgs_per_s"),
                             "p50_us": lat.get("p50_us"), "p99_us": lat.get("p99_us")})
        plots.plot("pubsub", rows, "node to node, CURVE (one publisher, one subscriber)")
    elif name == "scaling":
        by_case: dict[str, dict[str, Any]] = {}
        for r in data["rows"]:
            row = by_case.setdefault(r["system"], {"label": r["system"]})
            if r["mode"] == "throughput":
                row["msgs_per_s"] = r["msgs_per_s"]
            else:
                row["p50_us"], row["p99_us"] = r.get("p50_us"), r.get("p99_us")
        plots.plot("scaling", list(by_case.values()), "scaling: one zmesh node pair as filters and retained topics grow")
    elif name == "jobs":
        items = [(f"{r['system']}, {r['workers']} worker node(s)", r["jobs_per_s_median"]) for r in data["rows"]]
        plots.bars("jobs", [("jobs/s, median", "jobs/s", items)], "work queue: submit -> worker -> ack (64 B jobs)")
    elif name == "retained":
        summary = data.get("summary", {})
        sync = [(f"joiner {where}", summary[f"sync_{where}"]["median_s"])
                for where in ("memory", "store") if summary.get(f"sync_{where}")]
        writes = [(f"{w['interface']}, sync {w['sync']}", w["per_s"]) for w in data.get("writes", [])]
        plots.bars("retained", [(f"late joiner sync of {data['n']:,} entries", "seconds (median)", sync),
                                ("durable retained writes", "writes/s", writes)], "retained state")
    elif name == "discovery":
        items = [(f"{r['mode']}, {r['nodes']} nodes", 1000 * r["median_from_ready_s"]) for r in data["summary"]]
        plots.bars("discovery", [("a new node seen by every node", "ms from its ready file (median)", items)],
                   "discovery: join time")
    elif name == "idle":
        rows = data["rows"]
        plots.bars("idle", [("CPU", "% of one core", [(r["system"], r["cpu_pct"]) for r in rows]),
                            ("memory", "RSS MiB", [(r["system"], r["rss_mib"]) for r in rows])], "idle processes")


def budget_table(items: list[dict[str, Any]]) -> str:
    lines = ["| budget | figure | holds? |", "|---|---|---|"]
    for b in items:
        lines.append(f"| {b['budget']} | {b['figure']} | {'yes' if b['holds'] else '**no**'} |")
    return "\n".join(lines)


def update_readme(ran: list[str], quick: bool) -> str:
    parts = [f"Suite run of {common.stamp()}{' (--quick)' if quick else ''}: "
             + ", ".join(ran) + ". Plots: " + ", ".join(f"[{p.name}](results/{p.name})" for p in sorted(RESULTS.glob("*.png"))),
             "", "#### Budgets", "", budget_table(budgets())]
    for scenario in SCENARIOS:
        md = RESULTS / f"{scenario}-latest.md"
        if scenario != "pubsub" and md.exists():
            parts += ["", f"#### {scenario}", "", md.read_text().strip()]
            if (RESULTS / f"{scenario}.png").exists():
                parts += ["", f"![{scenario}](results/{scenario}.png)"]
    text = "\n".join(parts) + "\n"
    (RESULTS / "budgets-latest.md").write_text(budget_table(budgets()) + "\n")
    readme = common.HERE / "README.md"
    body = readme.read_text()
    start, end = body.find(BEGIN), body.find(END)
    if start >= 0 and end > start:
        readme.write_text(body[: start + len(BEGIN)] + "\n" + text + body[end:])
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    opts = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    ran, failed = [], []
    for name in [s for s in opts.only.split(",") if s]:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}")
        progress(f"=== {name} ({time.perf_counter() - started:.0f} s into the suite)")
        try:
            code = module(name).main(["--quick"] if opts.quick else [])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # noqa: BLE001
            progress(f"  {name} crashed: {exc}")
            code = 1
        (failed if code else ran).append(name)
        if not code:
            plot_scenario(name)
    text = update_readme(ran + [f"{f} (with errors)" for f in failed], opts.quick)
    print("\n" + text)
    progress(f"suite: {time.perf_counter() - started:.0f} s; ok: {ran}; with errors: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
