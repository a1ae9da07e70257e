"""Shared pieces of the suite's scenarios (fanout, mqtt_e2e, reqrep, idle, scaling).

Every system under test runs as real processes on 127.0.0.1: zmesh nodes as ``python -m zmesh
node run`` (or embedded ``zmesh.Node``s inside a client worker), brokers (Mosquitto, amqtt)
started here on free loopback ports with temporary configs, and client workers
(``benchmarks.clients``) speaking a small line protocol on stdin/stdout (JSON per line).
Every wait is bounded and every process is stopped in a ``finally`` (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.pubsub import _cpu_jiffies, _cpu_model, _git, _percentile

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
TICK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
QUIET_CORES = 0.3
QUIET_SAMPLE_S = 0.3
QUIET_MAX_S = 6.0


def progress(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


# ------------------------------------------------------------------ /proc sampling


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; nan once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return float("nan")


def proc_mem_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, KiB."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


def wait_quiet() -> float:
    """Wait (at most QUIET_MAX_S) until the machine is under QUIET_CORES busy; the cores seen."""
    waited = 0.0
    while True:
        before, _ = _cpu_jiffies()
        time.sleep(QUIET_SAMPLE_S)  # a sampling window
        after, _ = _cpu_jiffies()
        cores = (after - before) / TICK / QUIET_SAMPLE_S
        if cores <= QUIET_CORES or waited >= QUIET_MAX_S:
            return round(cores, 2)
        waited += QUIET_SAMPLE_S


class Machine:
    """Busy cores of the whole machine over an interval, minus the processes we account for."""

    def __init__(self) -> None:
        self.busy0, _ = _cpu_jiffies()
        self.t0 = time.perf_counter()

    def background(self, own_cpu_s: float) -> float:
        busy1, _ = _cpu_jiffies()
        wall = max(1e-6, time.perf_counter() - self.t0)
        return round(max(0.0, (busy1 - self.busy0) / TICK - own_cpu_s) / wall, 2)


# ------------------------------------------------------------------ processes


class Proc:
    """A child process with its stderr (and optionally stdout) in a log file."""

    def __init__(self, args: list[str], workdir: Path, name: str, *, pipe: bool = False,
                 stdin_file: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self._stdin_file = open(stdin_file, "rb") if stdin_file else None
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.process = subprocess.Popen(
            args,
            stdin=self._stdin_file or (subprocess.PIPE if pipe else subprocess.DEVNULL),
            stdout=subprocess.PIPE if pipe else self._log,
            stderr=self._log,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **(env or {})},
        )
        self.pid = self.process.pid
        if pipe:
            threading.Thread(target=self._reader, daemon=True, name=f"read-{name}").start()

    def _reader(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                item = json.loads(raw)
            except ValueError:
                self._log.write(b"stdout: " + raw)
                continue
            with self._cond:
                self.lines.append(item)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def expect(self, key: str, timeout: float, start: int = 0) -> dict[str, Any]:
        """The first JSON line (from index ``start``) holding ``key``; raise on timeout/exit."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.lines[start:]:
                    if key in item:
                        return item
                    if "error" in item:
                        raise RuntimeError(f"{self.name}: {item['error']}")
                if self.process.poll() is not None and not any(key in i for i in self.lines[start:]):
                    raise RuntimeError(f"{self.name} exited {self.process.returncode}: {self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{self.name}: no {key!r} within {timeout:.0f} s: {self.tail()}")
                self._cond.wait(min(left, 0.2))

    def tell(self, line: str) -> None:
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"{self.name}: cannot send {line!r}: {exc}") from None

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 8.0) -> None:
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for f in (self.process.stdin, self._stdin_file):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._log.close()


class Procs:
    """Every process of a scenario: stopped (in reverse order) on exit, whatever happens."""

    def __init__(self) -> None:
        self.items: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self.items.append(proc)
        return proc

    def stop_all(self) -> None:
        while self.items:
            self.items.pop().stop()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def log_warnings(path: Path, limit: int = 20) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    bad = [ln for ln in lines if any(f" {lvl}" in ln for lvl in ("WARNING", "ERROR", "CRITICAL", "Traceback"))
           and "said goodbye" not in ln]
    return bad[:limit] + ([f"... {len(bad) - limit} more"] if len(bad) > limit else [])


# ------------------------------------------------------------------ servers


def zmesh_module(path: str, before_layout: str) -> ModuleType:
    """A zmesh module by its path since the layout of subpackages (issue 13), or by its path
    before it: the benchmarks also run an older zmesh side by side (--zmesh-rev)."""
    try:
        return importlib.import_module(path)
    except ImportError:
        return importlib.import_module(before_layout)


def make_certs(directory: Path, names: list[str]) -> Path:
    create_certificate = zmesh_module("zmesh.security.certs", "zmesh.certs").create_certificate

    for name in names:
        if not (directory / f"{name}.key_secret").exists():
            create_certificate(directory, name)
    return directory


def zmesh_node(procs: Procs, workdir: Path, certs: Path, name: str, seeds: list[int] = (),  # type: ignore[assignment]
               mqtt: bool = True, extra: list[str] | None = None) -> tuple[Proc, dict[str, Any]]:
    """``zmesh node run`` on loopback; returns the process and its ready info (ports)."""
    ready = workdir / f"{name}-{uuid.uuid4().hex[:6]}.ready"
    port = free_port()
    args = [sys.executable, "-m", "zmesh", "node", "run", "--name", name,
            "--cert", str(certs / f"{name}.key_secret"), "--trusted", str(certs),
            "--listen", f"127.0.0.1:{port}", "--mqtt", "127.0.0.1:0" if mqtt else "",
            "--log-level", "info", "--ready-file", str(ready), *(extra or [])]
    for seed in seeds:
        args += ["--peer", f"127.0.0.1:{seed}"]
    proc = procs.add(Proc(args, workdir, f"zmesh-{name}"))
    deadline = time.monotonic() + 30
    while not ready.exists():
        if not proc.alive():
            raise RuntimeError(f"zmesh node {name} exited: {proc.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"zmesh node {name} not ready in 30 s: {proc.tail()}")
        time.sleep(0.01)
    return proc, json.loads(ready.read_text())


def mosquitto_broker(procs: Procs, workdir: Path) -> tuple[Proc, int]:
    """Our own Mosquitto on a free loopback port (never 1883), with a temporary config."""
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    conf = workdir / f"mosquitto-{port}.conf"
    # set_tcp_nodelay: Mosquitto leaves Nagle on by default, which holds a lone 1 KiB message
    # for the subscriber's delayed ACK (p50 ~13 ms paced). zmesh's listener sets TCP_NODELAY,
    # so the reference gets it too: the comparison is with Mosquitto at its best.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "set_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\n")
    proc = procs.add(Proc([exe, "-c", str(conf)], workdir, f"mosquitto-{port}"))
    wait_port(port)
    return proc, port


def amqtt_broker(procs: Procs, workdir: Path) -> tuple[Proc, int]:
    """An amqtt broker (Python, asyncio) on a free loopback port, anonymous, no $SYS plugin."""
    import importlib.util

    if importlib.util.find_spec("amqtt") is None:
        raise ModuleNotFoundError("amqtt is not installed (pip install 'amqtt>=0.12')")
    port = free_port()
    conf = workdir / f"amqtt-{port}.yaml"
    conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
                    "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                    "    allow_anonymous: true\n")
    proc = procs.add(Proc([sys.executable, "-c", "from amqtt.scripts.broker_script import main; main()",
                           "-c", str(conf)], workdir, f"amqtt-{port}"))
    wait_port(port, 30)
    return proc, port


# ------------------------------------------------------------------ figures


def lat_summary(values_us: list[float]) -> dict[str, float | None]:
    if not values_us:
        return {"p50_us": None, "p90_us": None, "p99_us": None, "max_us": None, "n": 0}
    v = sorted(values_us)
    return {"p50_us": round(_percentile(v, 50), 1), "p90_us": round(_percentile(v, 90), 1),
            "p99_us": round(_percentile(v, 99), 1), "max_us": round(v[-1], 1),
            "mean_us": round(statistics.fmean(v), 1), "n": len(v)}


def fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _event_loop() -> str:
    """The loop zmesh's nodes and embedded clients run on in this run (zmesh.eventloop)."""
    try:
        from zmesh import eventloop
    except ImportError:  # a zmesh from before zmesh.eventloop
        return "asyncio"
    return eventloop.describe()


def versions() -> dict[str, Any]:
    import msgpack
    import zmq

    out: dict[str, Any] = {
        "python": platform.python_version(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "zmesh_event_loop": _event_loop(),
    }
    for mod, key in (("paho.mqtt", "paho-mqtt"), ("amqtt", "amqtt"), ("matplotlib", "matplotlib")):
        try:
            out[key] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:  # noqa: BLE001
            out[key] = None
    try:
        from importlib.metadata import version

        out["eclipse-zenoh"] = version("eclipse-zenoh")
    except Exception:  # noqa: BLE001
        out["eclipse-zenoh"] = None
    try:
        first = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=5).stdout
        out["mosquitto"] = first.split("version", 1)[1].split()[0] if "version" in first else None
    except (OSError, subprocess.SubprocessError, IndexError):
        out["mosquitto"] = None
    return out


def conditions(**extra: Any) -> dict[str, Any]:
    return {
        **versions(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "zmesh_commit": _git("rev-parse", "--short", "HEAD"),
        "zmesh_dirty_files": _git("status", "--porcelain", "--", "zmesh").splitlines(),
        "transport": "tcp 127.0.0.1, one process per node / broker / client",
        **extra,
    }


def conditions_line(c: dict[str, Any]) -> str:
    return (f"{c['cpu_model']}, {c['cores']} cores, Python {c['python']}, pyzmq {c['pyzmq']} "
            f"(libzmq {c['libzmq']}), paho-mqtt {c.get('paho-mqtt')}, Mosquitto {c.get('mosquitto')}, "
            f"amqtt {c.get('amqtt')}, eclipse-zenoh {c.get('eclipse-zenoh')}; zmesh {c['zmesh_commit']}"
            + f" on {c.get('zmesh_event_loop', 'asyncio')}"
            + (" + uncommitted zmesh/ changes" if c.get("zmesh_dirty_files") else "")
            + f"; load at start {c['loadavg_at_start'][0]}")


def stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def save(scenario: str, report: dict[str, Any], md: str, quick: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{scenario}-{report['timestamp']}{'-quick' if quick else ''}.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    (RESULTS / f"{scenario}-latest.md").write_text(md.replace("{JSON}", name))
    progress(f"  wrote results/{name} and results/{scenario}-latest.md")
    return RESULTS / name


# ------------------------------------------------------------------ a publisher and its subscribers


def worker(procs: Procs, workdir: Path, role: str, args: dict[str, Any], name: str) -> Proc:
    return procs.add(Proc([sys.executable, "-m", "benchmarks.clients", role, json.dumps(args)],
                          workdir, name, pipe=True))


def run_group(procs: Procs, workdir: Path, label: str, pub: tuple[str, dict[str, Any]],
              subs: list[tuple[str, dict[str, Any]]], phases: list[dict[str, Any]],
              servers: dict[str, int] | None = None, sub_args_from_pub: Any = None) -> list[dict[str, Any]]:
    """Start one publisher worker and its subscribers, warm up, run ``phases``; one row per phase.

    ``servers``: name -> pid of the brokers / nodes in the path, whose CPU and peak RSS are
    sampled from /proc around each phase. Workers are stopped before returning."""
    servers = servers or {}
    mine: list[Proc] = []
    try:
        p = worker(procs, workdir, pub[0], {**pub[1], "phases": phases}, f"{label}-pub")
        mine.append(p)
        ready = p.expect("ready", 60)
        ss = []
        for i, (role, args) in enumerate(subs):
            extra = sub_args_from_pub(ready) if sub_args_from_pub else {}
            s = worker(procs, workdir, role, {**args, **extra, "phases": phases}, f"{label}-sub{i}")
            mine.append(s)
            ss.append(s)
        for s in ss:
            s.expect("ready", 60)
        for s in ss:
            s.expect("warm", 60)
        rows = []
        for phase in phases:
            bg_before = wait_quiet()
            marks = [len(x.lines) for x in [p, *ss]]
            cpu0 = {k: proc_cpu_s(pid) for k, pid in servers.items()}
            machine = Machine()
            p.tell("go")
            pr = p.expect("result", 300, marks[0])["result"]
            srs = [s.expect("result", 160, m)["result"] for s, m in zip(ss, marks[1:], strict=True)]
            cpu = {k: proc_cpu_s(pid) - cpu0[k] for k, pid in servers.items()}
            own = pr["cpu_s"] + sum(r["cpu_s"] for r in srs) + sum(v for v in cpu.values() if v == v)
            rows.append(summarise(label, phase, pr, srs, cpu, servers, machine.background(own), bg_before))
            progress(progress_line(rows[-1]))
        p.tell("exit")
        return rows
    finally:
        for x in reversed(mine):
            x.stop()
            if x in procs.items:
                procs.items.remove(x)


def summarise(label: str, phase: dict[str, Any], pr: dict[str, Any], srs: list[dict[str, Any]],
              cpu: dict[str, float], servers: dict[str, int], background: float,
              bg_before: float) -> dict[str, Any]:
    sent = pr["sent"]
    received = [r["received"] for r in srs]
    rates = [(r["received"] - 1) / r["recv_s"] if r["received"] > 1 and r["recv_s"] > 0 else 0.0 for r in srs]
    lat: list[float] = []
    for r in srs:
        lat.extend(r.get("lat_us", []))
    summary = lat_summary(lat)
    if not lat and srs and "lat_pct_us" in srs[0]:
        pct = [r["lat_pct_us"] for r in srs if "lat_pct_us" in r]
        summary = {f"p{k}_us": round(max(x[k] for x in pct), 1) for k in ("50", "90", "99")}
    row: dict[str, Any] = {
        "system": label, "mode": phase["mode"], "size": phase["size"], "n": phase["n"],
        "rate": phase.get("rate"), "subscribers": len(srs), "sent": sent, "received": received,
        "loss_pct": round(100 * (sent * len(srs) - sum(received)) / max(1, sent * len(srs)), 3),
        "msgs_per_s_per_sub": [round(r) for r in rates],
        "msgs_per_s": round(sum(rates)),
        "pub_send_msgs_per_s": round(sent / pr["send_s"]) if pr["send_s"] else None,
        **summary,
        "cpu_us_per_msg": {
            "pub": round(1e6 * pr["cpu_s"] / max(1, sent), 2),
            **{f"sub{i}": round(1e6 * r["cpu_s"] / max(1, r["received"]), 2) for i, r in enumerate(srs)},
            **{k: round(1e6 * v / max(1, sent), 2) for k, v in cpu.items()},
        },
        "peak_rss_mib": {
            "pub": round(pr["maxrss_kib"] / 1024, 1),
            **{f"sub{i}": round(r["maxrss_kib"] / 1024, 1) for i, r in enumerate(srs)},
            **{k: round(proc_mem_kib(pid).get("VmHWM", 0) / 1024, 1) for k, pid in servers.items()},
        },
        "background_cores": background,
        "machine_cores_before": bg_before,
    }
    return row


def progress_line(row: dict[str, Any]) -> str:
    cpu = " ".join(f"{k} {v:.1f}" for k, v in row["cpu_us_per_msg"].items())
    return (f"  [{row['system']}] {row['mode']:<10} {row['size']:>4} B: {row['msgs_per_s']:>9,} msgs/s "
            f"loss {row['loss_pct']:.2f}%  p50 {fmt(row.get('p50_us'))} p99 {fmt(row.get('p99_us'))} us  "
            f"cpu us/msg {cpu}  (background {row['background_cores']:.2f} cores)")


def sys_node(port: int, topic: str = "$SYS/zmesh/node", timeout: float = 5.0) -> Any:
    """A zmesh node's $SYS JSON value, read with paho (None if it does not come)."""
    import paho.mqtt.client as mqtt

    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_connect = lambda c, *_a: c.subscribe(topic, 0)
    client.on_message = lambda _c, _u, msg: (got.append(msg.payload), done.set())
    try:
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        done.wait(timeout)
    except OSError:
        return None
    finally:
        client.disconnect()
        client.loop_stop()
    try:
        return json.loads(got[0]) if got else None
    except ValueError:
        return None
