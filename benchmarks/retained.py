"""Retained state: sync to a late joiner, durable writes per second, memory per entry.

    python -m benchmarks.retained            # N = 100,000, 3 repetitions of the sync
    python -m benchmarks.retained --quick    # N = 20,000, one repetition, shorter write runs

Everything runs on loopback, as real processes with CURVE on:

(a) **Sync to a late joiner.** Node ``a`` is an embedded ``zmesh.Node`` (Python API, in a child
    process, no data_dir) that publishes N retained messages (64 B payloads, N topics
    ``bench/XXX/YYY``). Then node ``b`` (``zmesh node run``) is started seeded at a only. The
    time is taken from b's ready file (written once b has started: sockets bound, seed
    dialled, MQTT listening; Python's start-up excluded) until b's ``$SYS/zmesh/node`` shows
    ``retained.entries == N``, which a paho client on b asks for every 10 ms (a re-SUBSCRIBE
    returns the current value). What is measured is the mesh's sync (hello, digest exchange,
    the chunked snapshot, merge), not MQTT delivery of N messages. Two variants: b in memory,
    and b with a data_dir (the store writes the fetched entries in the background, which
    competes for the same interpreter). Budget: under 2 s for N = 100,000.
(b) **Durable retained writes per second.** A ``zmesh node run`` with a data_dir, alone, for
    ``[store] sync = "always"`` (a retained QoS 1 write is on disk before its PUBACK) and
    ``"interval"``: one paho client publishes M retained QoS 1 messages (M topics, 64 B) with
    up to 100 in flight (``max_inflight_messages_set(100)``); rate = M / (last PUBACK - first
    publish). The Python API (embedded ``Node``, ``mqtt=None``): ``await node.publish(topic,
    payload, qos=1, retain=True)`` one at a time, and with a window of 100 awaitables in
    flight.
(c) **Memory.** RSS growth of a node per 100,000 retained entries: in the holder a (RSS before
    and after publishing the N entries, same process), and in the joiner b (RSS once it holds
    N entries, minus the RSS of an idle node started the same way).

Results: ``benchmarks/results/retained-<UTC>[-quick].json`` and, for a full run,
``benchmarks/results/retained-latest.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.pubsub import run_zmesh  # noqa: E402 (after the path fix above)

PAYLOAD_BYTES = 64
SYNC_BUDGET_S = 2.0
N_FULL, N_QUICK = 100_000, 20_000
REPS_FULL, REPS_QUICK = 3, 1
MQTT_WRITES_FULL, MQTT_WRITES_QUICK = 20_000, 5_000
API_WRITES_FULL, API_WRITES_QUICK = 20_000, 5_000
API_SEQUENTIAL_FULL, API_SEQUENTIAL_QUICK = 3_000, 1_000
WINDOW = 100
POLL_S = 0.01
START_TIMEOUT = 60.0  # a child up (the holder includes filling N entries)
SYNC_TIMEOUT = 60.0
WRITE_TIMEOUT = 120.0
QUIET_CORES = 0.3
QUIET_SAMPLE_S = 0.25
QUIET_MAX_S = 10.0


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _payload(i: int) -> bytes:
    return f"{i:010d}".encode().ljust(PAYLOAD_BYTES, b".")


def _topic(prefix: str, i: int) -> str:
    return f"{prefix}/{i // 1000:03d}/{i % 1000:03d}"


def _cpu_busy_jiffies() -> int:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values) - values[3] - values[4]


def wait_quiet() -> float:
    """Wait (at most QUIET_MAX_S) until the machine is under QUIET_CORES busy; the cores seen."""
    tick = os.sysconf("SC_CLK_TCK")
    waited = 0.0
    while True:
        before = _cpu_busy_jiffies()
        time.sleep(QUIET_SAMPLE_S)  # a sampling window, not a synchronisation
        cores = (_cpu_busy_jiffies() - before) / tick / QUIET_SAMPLE_S
        if cores <= QUIET_CORES or waited >= QUIET_MAX_S:
            return cores
        waited += QUIET_SAMPLE_S


# ------------------------------------------------------------------------------ children


class Child:
    """A child process with its output in a log file, and a ready file it writes."""

    def __init__(self, args: list[str], workdir: Path, name: str) -> None:
        self.name = name
        self.ready_file = workdir / f"{name}-{uuid.uuid4().hex[:6]}.ready"
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.spawned = time.time()
        self.process = subprocess.Popen([*args, "--ready-file", str(self.ready_file)],
                                        stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.process.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {timeout} s: {self.tail()}")
            time.sleep(0.002)
        info: dict[str, Any] = json.loads(self.ready_file.read_text())
        info["ready_at"] = self.ready_file.stat().st_mtime_ns / 1e9
        return info

    def tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


def node_process(workdir: Path, certs: Path, name: str, *, seeds: list[int] = (),  # type: ignore[assignment]
                 data_dir: Path | None = None, config: str | None = None) -> Child:
    args = [sys.executable, "-m", "zmesh", "node", "run", "--name", name,
            "--cert", str(certs / f"{name}.key_secret"), "--trusted", str(certs),
            "--listen", f"127.0.0.1:{_free_port()}", "--mqtt", "127.0.0.1:0", "--log-level", "info"]
    for seed in seeds:
        args += ["--peer", f"127.0.0.1:{seed}"]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    if config is not None:
        path = workdir / f"{name}-{uuid.uuid4().hex[:6]}.toml"
        path.write_text(config)
        args += ["--config", str(path)]
    return Child(args, workdir, name)


def holder_process(workdir: Path, certs: Path, n: int) -> Child:
    args = [sys.executable, "-m", "benchmarks.retained", "_holder", "--certs", str(certs), "--n", str(n)]
    return Child(args, workdir, "holder")


async def _holder(certs: Path, n: int, ready_file: str) -> None:
    """Child: an embedded node that publishes ``n`` retained entries, then serves until SIGTERM."""
    from zmesh import Node

    node = Node(name="a", cert=certs / "a.key_secret", trusted=certs, listen="127.0.0.1:0",
                mqtt="127.0.0.1:0")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await node.start()
    try:
        rss_before = _rss_kib(os.getpid())
        started = time.perf_counter()
        for i in range(n):
            node.publish_nowait(_topic("bench", i), _payload(i), 0, True)
            if i % 1000 == 999:
                await asyncio.sleep(0)
        fill_s = time.perf_counter() - started
        assert len(node.replica.cache) == n, len(node.replica.cache)
        info = {"control_port": node.control_port, "mqtt_port": node.mqtt_address[1],  # type: ignore[index]
                "fill_s": fill_s, "rss_before_kib": rss_before, "rss_after_kib": _rss_kib(os.getpid())}
        Path(ready_file + ".tmp").write_text(json.dumps(info))
        os.replace(ready_file + ".tmp", ready_file)
        await stop.wait()
    finally:
        await node.stop()


async def _api_writer(config_file: Path, n_window: int, n_sequential: int, ready_file: str) -> None:
    """Child: an embedded node with a store; retained QoS 1 publishes through the Python API."""
    from zmesh import Node

    async with Node(config_file=config_file) as node:
        results: dict[str, Any] = {}
        # One at a time: each await is one write's durability (a group commit of one).
        started = time.perf_counter()
        for i in range(n_sequential):
            await node.publish(_topic("api/seq", i), _payload(i), qos=1, retain=True)
        results["sequential"] = {"n": n_sequential, "s": time.perf_counter() - started}
        # A window of awaitables in flight: the store commits them in batches.
        started = time.perf_counter()
        window: collections.deque[Any] = collections.deque()
        for i in range(n_window):
            window.append(node.publish(_topic("api/win", i), _payload(i), qos=1, retain=True))
            if len(window) >= WINDOW:
                await window.popleft()
        while window:
            await window.popleft()
        results["window"] = {"n": n_window, "window": WINDOW, "s": time.perf_counter() - started}
        results["entries"] = len(node.replica.cache)
        Path(ready_file + ".tmp").write_text(json.dumps(results))
        os.replace(ready_file + ".tmp", ready_file)


# ------------------------------------------------------------------------------ MQTT side


class SysPoller:
    """Asks a node for ``$SYS/zmesh/node`` every POLL_S (re-SUBSCRIBE: the current value comes
    back) and stamps the first value whose retained entries reach ``target``."""

    def __init__(self, port: int, target: int) -> None:
        import paho.mqtt.client as mqtt

        self.target = target
        self.reached_at: float | None = None
        self.last_entries = -1
        self.done = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"poll-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        now = time.time()
        entries = json.loads(message.payload)["retained"]["entries"]
        self.last_entries = entries
        if entries >= self.target and self.reached_at is None:
            self.reached_at = now
            self.done.set()

    def run(self, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while not self.done.is_set() and time.monotonic() < deadline:
            self.client.subscribe("$SYS/zmesh/node", 0)
            self.done.wait(POLL_S)
        return self.reached_at

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mqtt_durable_writes(port: int, n: int) -> dict[str, Any]:
    """Retained QoS 1 publishes from one paho client, WINDOW in flight; rate by PUBACKs."""
    import paho.mqtt.client as mqtt

    acked = 0
    last_ack = 0.0
    done = threading.Event()

    def on_publish(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        nonlocal acked, last_ack
        acked += 1
        if acked == n:
            last_ack = time.perf_counter()
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"w-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(WINDOW)
    client.max_queued_messages_set(0)  # unlimited: paho holds what is beyond the window
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    try:
        started = time.perf_counter()
        for i in range(n):
            client.publish(_topic("mqtt/w", i), _payload(i), qos=1, retain=True)
        if not done.wait(WRITE_TIMEOUT):
            raise RuntimeError(f"only {acked} of {n} PUBACKs within {WRITE_TIMEOUT} s")
        elapsed = last_ack - started
    finally:
        client.disconnect()
        client.loop_stop()
    return {"n": n, "window": WINDOW, "s": elapsed, "per_s": n / elapsed}


def sys_node(port: int) -> dict[str, Any]:
    poller = SysPoller(port, 0)
    try:
        poller.run(10)
        poller.done.clear()
        value: dict[str, Any] = {}

        def grab(client: Any, userdata: Any, message: Any) -> None:
            value.update(json.loads(message.payload))
            poller.done.set()

        poller.client.on_message = grab
        poller.client.subscribe("$SYS/zmesh/node", 0)
        poller.done.wait(10)
        return value
    finally:
        poller.close()


# ------------------------------------------------------------------------------ phases


def sync_run(workdir: Path, certs: Path, holder_port: int, n: int, durable: bool, rep: int) -> dict[str, Any]:
    data_dir = workdir / f"b-data-{rep}-{int(durable)}" if durable else None
    cores = wait_quiet()
    b = node_process(workdir, certs, "b", seeds=[holder_port], data_dir=data_dir)
    try:
        info = b.wait_ready()
        poller = SysPoller(info["mqtt_port"], n)
        try:
            reached = poller.run(SYNC_TIMEOUT)
            if reached is None:
                raise RuntimeError(f"b holds {poller.last_entries} of {n} entries after {SYNC_TIMEOUT} s")
        finally:
            poller.close()
        rss_synced = _rss_kib(b.process.pid)
        stats = sys_node(info["mqtt_port"])
        return {
            "durable": durable,
            "from_ready_s": reached - info["ready_at"],
            "from_spawn_s": reached - b.spawned,
            "rss_kib": rss_synced,
            "sync_entries_in": stats["stats"]["sync_entries_in"],
            "syncs_requested": stats["stats"]["syncs_requested"],
            "background_cores_before": round(cores, 2),
        }
    finally:
        b.stop()


def idle_rss(workdir: Path, certs: Path, data_dir: Path | None) -> int:
    """RSS of a node that holds nothing, started as the joiner is (no seeds), once settled."""
    node = node_process(workdir, certs, "c", data_dir=data_dir)
    try:
        info = node.wait_ready()
        sys_node(info["mqtt_port"])  # it answers: started and idle
        return _rss_kib(node.process.pid)
    finally:
        node.stop()


def durable_runs(workdir: Path, certs: Path, quick: bool) -> list[dict[str, Any]]:
    out = []
    m = MQTT_WRITES_QUICK if quick else MQTT_WRITES_FULL
    for sync in ("always", "interval"):
        cores = wait_quiet()
        node = node_process(workdir, certs, "c", data_dir=workdir / f"w-{sync}",
                            config=f'[store]\nsync = "{sync}"\n')
        try:
            info = node.wait_ready()
            result = mqtt_durable_writes(info["mqtt_port"], m)
            held = sys_node(info["mqtt_port"])["retained"]["entries"]
            assert held == m, f"node holds {held} of {m} written entries"
        finally:
            node.stop()
        result.update(interface="mqtt", sync=sync, background_cores_before=round(cores, 2))
        _progress(f"  mqtt  sync={sync:8} {result['per_s']:>9,.0f} writes/s")
        out.append(result)

        cores = wait_quiet()
        config = workdir / f"api-{sync}.toml"
        config.write_text(
            f'[node]\nname = "c"\ndata_dir = "{workdir / f"api-{sync}"}"\n'
            f'[mesh]\ncert = "{certs / "c.key_secret"}"\ntrusted = "{certs}"\nlisten = "127.0.0.1:0"\n'
            f'[mqtt]\nlisten = ""\n[store]\nsync = "{sync}"\n'
        )
        n_win = API_WRITES_QUICK if quick else API_WRITES_FULL
        n_seq = API_SEQUENTIAL_QUICK if quick else API_SEQUENTIAL_FULL
        child = Child([sys.executable, "-m", "benchmarks.retained", "_api", "--config", str(config),
                       "--n", str(n_win), "--n-sequential", str(n_seq)], workdir, f"api-{sync}")
        try:
            api = child.wait_ready(WRITE_TIMEOUT)
        finally:
            child.stop()
        assert api["entries"] == n_win + n_seq, api
        for mode in ("sequential", "window"):
            r = api[mode]
            row = {"interface": f"python-{mode}", "sync": sync, "n": r["n"], "window": r.get("window", 1),
                   "s": r["s"], "per_s": r["n"] / r["s"], "background_cores_before": round(cores, 2)}
            _progress(f"  api-{mode:10} sync={sync:8} {row['per_s']:>9,.0f} writes/s")
            out.append(row)
    return out


def conditions() -> dict[str, Any]:
    import zmq

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "zmesh"], capture_output=True, text=True,
                           cwd=REPO).stdout.strip()
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = subprocess.run(["df", "-T", tempfile.gettempdir()], capture_output=True, text=True).stdout.splitlines()
    return {
        "cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "python": platform.python_version(), "pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version(),
        "zmesh_commit": commit, "zmesh_dirty": bool(dirty),
        "tmp_filesystem": fs[-1].split()[1] if len(fs) > 1 else "unknown",
        "loadavg_start": os.getloadavg(),
    }


def run(quick: bool) -> dict[str, Any]:
    from tests.helpers import make_certs

    n = N_QUICK if quick else N_FULL
    reps = REPS_QUICK if quick else REPS_FULL
    result: dict[str, Any] = {"quick": quick, "n": n, "payload_bytes": PAYLOAD_BYTES, "conditions": conditions()}
    with tempfile.TemporaryDirectory(prefix="zmesh-bench-retained-") as tmp:
        workdir = Path(tmp)
        certs = make_certs(workdir / "certs", ["a", "b", "c"])

        _progress(f"(a) sync of {n:,} retained entries to a late joiner, {reps} repetition(s)")
        holder = holder_process(workdir, certs, n)
        try:
            info = holder.wait_ready()
            result["holder"] = {"fill_s": info["fill_s"], "rss_before_kib": info["rss_before_kib"],
                                "rss_after_kib": info["rss_after_kib"]}
            _progress(f"  holder filled in {info['fill_s']:.2f} s")
            runs = []
            for rep in range(reps):
                for durable in (False, True):
                    r = sync_run(workdir, certs, info["control_port"], n, durable, rep)
                    _progress(f"  joiner {'with store' if durable else 'in memory '}: "
                              f"{r['from_ready_s']:.3f} s from ready ({r['from_spawn_s']:.3f} s from spawn)")
                    runs.append(r)
            result["sync_runs"] = runs
        finally:
            holder.stop()

        _progress("(c) memory: idle nodes for the baseline")
        result["idle_rss_kib"] = {"memory": idle_rss(workdir, certs, None),
                                  "store": idle_rss(workdir, certs, workdir / "idle-data")}

        _progress("(b) durable retained writes")
        result["writes"] = durable_runs(workdir, certs, quick)
    result["conditions"]["loadavg_end"] = os.getloadavg()
    summarise(result)
    return result


def summarise(result: dict[str, Any]) -> None:
    n = result["n"]
    per = 100_000 / n
    summary: dict[str, Any] = {}
    for durable in (False, True):
        runs = [r for r in result["sync_runs"] if r["durable"] == durable]
        times = [r["from_ready_s"] for r in runs]
        key = "store" if durable else "memory"
        summary[f"sync_{key}"] = {
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "median_from_spawn_s": statistics.median(r["from_spawn_s"] for r in runs), "runs": len(runs),
            "budget_holds": n == N_FULL and max(times) < SYNC_BUDGET_S,
            "median_holds": statistics.median(times) < SYNC_BUDGET_S,
        }
        rss = statistics.median(r["rss_kib"] for r in runs)
        summary[f"rss_joiner_{key}_per_100k_mib"] = (rss - result["idle_rss_kib"][key]) * per / 1024
    holder = result["holder"]
    summary["rss_holder_per_100k_mib"] = (holder["rss_after_kib"] - holder["rss_before_kib"]) * per / 1024
    summary["holder_fill_per_s"] = n / holder["fill_s"]
    result["summary"] = summary


# ------------------------------------------------------------------------------ report


def markdown(result: dict[str, Any], json_name: str) -> str:
    s, c, n = result["summary"], result["conditions"], result["n"]
    lines = [
        f"# Retained state ({json_name.removeprefix('retained-').removesuffix('.json')})",
        "",
        f"`python -m benchmarks.retained{' --quick' if result['quick'] else ''}`; raw data: `{json_name}`.",
        "",
        f"## (a) Sync of {n:,} retained entries ({PAYLOAD_BYTES} B payloads) to a late joiner",
        "",
        "Node a (embedded `zmesh.Node`, in memory) holds them; node b (`zmesh node run`) is started",
        "seeded at a. Time from b's ready file until b's `$SYS/zmesh/node` shows all of them",
        f"(polled every {POLL_S * 1000:.0f} ms).",
        "",
        "| joiner | runs | median (s) | range (s) | median from process spawn (s) | budget < 2 s |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for key, label in (("memory", "in memory"), ("store", "with data_dir (sync = always)")):
        r = s[f"sync_{key}"]
        verdict = ("holds (every run)" if r["budget_holds"] else
                   ("holds (median)" if r["median_holds"] else "**misses**"))
        if n != N_FULL:
            verdict = f"n/a (N = {n:,})"
        lines.append(f"| {label} | {r['runs']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | "
                     f"{r['median_from_spawn_s']:.3f} | {verdict} |")
    lines += [
        "",
        "## (b) Durable retained writes (QoS 1, 64 B, a new topic each)",
        "",
        "| interface | sync | messages | in flight | writes/s |",
        "|---|---|---:|---:|---:|",
    ]
    for w in result["writes"]:
        label = {"mqtt": "MQTT (paho, one client)", "python-sequential": "Python API, `await` each",
                 "python-window": "Python API, window of awaitables"}[w["interface"]]
        lines.append(f"| {label} | {w['sync']} | {w['n']:,} | {w['window']} | {w['per_s']:,.0f} |")
    lines += [
        "",
        "With `always` a retained QoS 1 write is committed and fsynced before its PUBACK (or before",
        "`await node.publish` returns); writes that arrive while a commit runs are committed",
        "together (group commit), so throughput grows with the number in flight. With `interval` the",
        "PUBACK does not wait for the disk (written within `sync_interval`, default 1 s).",
        "",
        "## (c) Memory per 100,000 retained entries",
        "",
        "| where | RSS growth per 100,000 entries (MiB) |",
        "|---|---:|",
        f"| holder a (embedded node; RSS after - before publishing them) | {s['rss_holder_per_100k_mib']:.1f} |",
        f"| joiner b in memory (RSS after sync - idle node) | {s['rss_joiner_memory_per_100k_mib']:.1f} |",
        f"| joiner b with data_dir (same; includes SQLite's cache) | {s['rss_joiner_store_per_100k_mib']:.1f} |",
        "",
        f"Idle node RSS: {result['idle_rss_kib']['memory'] / 1024:.1f} MiB in memory, "
        f"{result['idle_rss_kib']['store'] / 1024:.1f} MiB with a store. The holder filled its cache at "
        f"{s['holder_fill_per_s']:,.0f} retained publishes/s (`publish_nowait`, no peer connected).",
        "",
        "## Conditions",
        "",
        f"* {c['cores']} cores ({c['cpu']}), kernel {c['kernel']}, Python {c['python']}, pyzmq {c['pyzmq']} "
        f"(libzmq {c['libzmq']}); store on {c['tmp_filesystem']} (the temporary directory).",
        f"* zmesh at {c['zmesh_commit']}{' (zmesh/ has uncommitted changes)' if c['zmesh_dirty'] else ''}.",
        "* Loopback only, CURVE on, every node a separate process; log level info.",
        "* Before each measurement the benchmark waits (at most 10 s) for the machine to be under "
        f"{QUIET_CORES} busy cores; background cores seen: "
        f"{', '.join(str(r['background_cores_before']) for r in result['sync_runs'] + result['writes'])}.",
        f"* Load average at start {', '.join(f'{x:.2f}' for x in c['loadavg_start'])}; "
        f"at end {', '.join(f'{x:.2f}' for x in c['loadavg_end'])}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retained", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    holder = sub.add_parser("_holder")
    holder.add_argument("--certs", type=Path, required=True)
    holder.add_argument("--n", type=int, required=True)
    holder.add_argument("--ready-file", required=True)
    api = sub.add_parser("_api")
    api.add_argument("--config", type=Path, required=True)
    api.add_argument("--n", type=int, required=True)
    api.add_argument("--n-sequential", type=int, required=True)
    api.add_argument("--ready-file", required=True)
    parser.add_argument("--quick", action="store_true", help="N = 20,000, one repetition")
    parser.add_argument("--no-save", action="store_true", help="print only, write no result files")
    args = parser.parse_args(argv)
    if args.command == "_holder":
        run_zmesh(_holder(args.certs, args.n, args.ready_file))
        return 0
    if args.command == "_api":
        run_zmesh(_api_writer(args.config, args.n, args.n_sequential, args.ready_file))
        return 0

    result = run(args.quick)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    json_name = f"retained-{stamp}{'-quick' if args.quick else ''}.json"
    report = markdown(result, json_name)
    print(report)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / json_name).write_text(json.dumps(result, indent=2))
        if not args.quick:
            (RESULTS / "retained-latest.md").write_text(report)
        _progress(f"wrote {RESULTS / json_name}{'' if args.quick else ' and retained-latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
