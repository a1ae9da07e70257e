"""Cluster scale (issue 16): what one node costs, and how fast the mesh reacts, as N grows.

    python -m benchmarks.scale --sizes 10,50,100,200 --zmesh-rev REV   # the full sweep
    python -m benchmarks.scale --quick                                 # N = 5, 10, short phases

N real node processes on this machine (loopback, 127.0.0.1; no network namespaces: 200
namespaces with veth pairs cost more set-up than the nodes themselves and change nothing a
loopback mesh measures), for each system and each N, one after the other:

1. **start**: node 0, then nodes 1..N-1 all at once, each seeded with node 0 only (a static
   seed), real CURVE keys (``zmesh.security.certs``), every port free. **converge**: time
   from the last node being ready (its ready file, seen by a 20 ms poll) until every node
   knows every other as up. zmesh: each node's ``$SYS/zmesh/peers``, pushed by the node on
   every change to one MQTT connection per node held by an agent process (``_agent``), which
   stamps (CLOCK_MONOTONIC, shared by every process here) the first value showing all N-1
   up. Zenoh: each node declares a liveliness token ``scale/live/<i>`` and subscribes to
   ``scale/live/*``; it stamps the moment it has seen all N-1.
2. **idle** (no clients but the agent's one MQTT connection per zmesh node, no
   subscriptions but its ``$SYS`` one): CPU % of one core over the window (utime + stime,
   ``/proc/PID/stat``, every thread), RSS (``VmRSS``), open descriptors (``/proc/PID/fd``)
   and established TCP connections per node (socket inodes matched in ``/proc/net/tcp``).
3. **alerts**: every node publishes ``alerts/<name>`` at 10 msgs/s (a deadline schedule,
   phases staggered) for the window; the last two nodes are collectors subscribed to
   ``alerts/#``. zmesh: a pod's app publishes over MQTT to its own node (one agent process
   holds the N publishing connections), the collectors' MQTT subscribers are a second agent
   process. Zenoh: the app is the session itself (one hop less: no MQTT). Figures: messages
   delivered to each collector exactly once (missing and duplicates counted), one-way
   latency (stamp in the payload) p50/p99, and the connections each non-collector node
   holds to other nodes' data (zmesh: its events PUB/SUB sockets; Zenoh: every session).
4. **retained**: after the alerts, a subscriber to ``scale/ret/#`` on every node, then W
   retained writes, each from another node; the time until each node's subscriber has it,
   p50/p99 over every (write, node). Zenoh has no retained store on every node: its row is
   the same put delivered to N subscribers (what a write costs the writer).
5. **kill**: K nodes SIGKILLed one at a time (never the seed or a collector); for each, the
   time until each surviving node has it no longer up. Median over (victim, node) pairs,
   and the median over victims of the slowest node. On loopback a SIGKILL closes the
   victim's TCP connections at once (the kernel sends FIN/RST), which a real crash of a
   machine does not: transports that watch their connections see it immediately.

Systems: ``zmesh`` (the working tree), ``zmesh-rev`` (``--zmesh-rev REV``: that revision's
``zmesh/`` exported with ``git archive``, the full-mesh baseline once the new membership
lands), ``zenoh`` (``eclipse-zenoh``'s Python API, peer mode, multicast scouting off,
gossip scouting on, connecting to node 0 only: one process per session).

Every process (nodes and agents) is in one process group of its own, killed on exit, on
Ctrl-C and on SIGTERM; every wait is bounded; every load loop stops by itself. Results:
``results/scale-<UTC>[-quick].json`` (every figure and the conditions), ``scale-latest.md``
and ``scale.png`` (cost per node against N, one line per system).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZES_FULL = (10, 50, 100, 200)
SIZES_QUICK = (5, 10)
ALERT_RATE = 10.0  # msgs/s per node (the scenario)
STAMP = struct.Struct("<IIQ")  # node index, sequence, CLOCK_MONOTONIC ns at publish
TICK = os.sysconf("SC_CLK_TCK")


class Timing:
    """How long each phase lasts (seconds) and the bounds of every wait."""

    def __init__(self, quick: bool) -> None:
        self.settle = 2.0 if quick else 5.0  # after converging, before the idle window
        self.idle = 4.0 if quick else 20.0
        self.alerts = 4.0 if quick else 20.0
        self.retained_writes = 3 if quick else 10
        self.kills = 1 if quick else 3

    def converge_timeout(self, n: int) -> float:
        return 60.0 + 1.5 * n  # the goal is 10 s at N = 200: five minutes says "does not form"

    def start_timeout(self, n: int) -> float:
        return 30.0 + 1.0 * n  # 2 cores: ~0.6 s of CPU per Python interpreter start

    def estimate(self, n: int, system: str) -> tuple[float, float]:
        """(expected, bound) seconds for one system at one N, for the up-front total."""
        start = 3.0 + 0.35 * n
        converge = (0.6 if system.startswith("zmesh") else 0.05) * n + 3
        fixed = self.settle + self.idle + self.alerts + 4 + self.retained_writes * 1.5 + self.kills * 8 + 10
        bound = self.start_timeout(n) + self.converge_timeout(n) + fixed + self.kills * 30 + 30
        return start + converge + fixed, bound


def progress(text: str) -> None:
    print(text, flush=True)


# ============================================================================ /proc


def proc_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return float("nan")


def proc_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def proc_socket_inodes(pid: int) -> tuple[int, set[int]]:
    """(open descriptors, inodes of its sockets)."""
    fds, inodes = 0, set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            fds += 1
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    except OSError:
        return 0, set()
    return fds, inodes


def tcp_table() -> dict[int, tuple[int, int]]:
    """inode -> (local port, remote port) of every ESTABLISHED TCP socket on this machine."""
    out: dict[int, tuple[int, int]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != "01":  # 01: ESTABLISHED
                continue
            out[int(f[9])] = (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16))
    return out


def machine_busy_s() -> float:
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None or x != x else round(x, nd)


# ============================================================================ processes


class Group:
    """Every child in one process group (a ``sleep`` holds it), so one killpg ends them all,
    also on Ctrl-C, SIGTERM or an exception."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        # Not holding our stdout: whoever reads it (a test) must not wait for the keeper.
        self.keeper = subprocess.Popen(["sleep", "86400"], process_group=0, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pgid = self.keeper.pid
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, args: list[str], log_name: str, env: dict[str, str], pipe: bool = False,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{log_name}.log", "ab")
        p = subprocess.Popen(args, stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
                             stdout=subprocess.PIPE if pipe else log, stderr=log,
                             cwd=cwd or self.workdir, env=env, process_group=self.pgid)
        log.close()
        self.procs.append(p)
        return p

    def stop(self, procs: list[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
        """SIGTERM (zmesh nodes drain), then SIGKILL whatever is left after ``grace``."""
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            if p in self.procs:
                self.procs.remove(p)

    def close(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            if sig == signal.SIGTERM:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                    time.sleep(0.05)
        for p in [*self.procs, self.keeper]:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


class Lines:
    """JSON lines from a child's stdout, read by a thread; waited on with a bound."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str) -> None:
        self.proc, self.name = proc, name
        self.items: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True, name=f"lines-{name}").start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                item = json.loads(raw)
            except ValueError:
                continue
            with self.cond:
                self.items.append(item)
                self.cond.notify_all()
        with self.cond:
            self.items.append({"ev": "eof"})
            self.cond.notify_all()

    def tell(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass  # it is gone: the wait that follows says so

    def wait(self, pred: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for item in self.items[seen:]:
                    if pred(item):
                        return item
                    if item.get("ev") in ("eof", "error"):
                        raise RuntimeError(f"{self.name}: {item} while waiting for {what}")
                seen = len(self.items)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{self.name}: no {what} within {timeout:.0f} s")
                self.cond.wait(min(left, 0.5))

    def snapshot(self) -> list[dict[str, Any]]:
        with self.cond:
            return list(self.items)


def emit(**item: Any) -> None:
    sys.stdout.write(json.dumps(item) + "\n")
    sys.stdout.flush()


# ============================================================================ the MQTT agent (zmesh)


def agent_main(spec: dict[str, Any]) -> None:
    """One process holding one MQTT connection per zmesh node it is told about.

    Commands (stdin, JSON per line): watch (connect, subscribe $SYS/zmesh/peers, stamp the
    first value with all ``expect`` peers up and every peer leaving the up set), alerts
    (publish at ``rate`` for ``seconds`` on each node), collect / report (alerts/# on the
    collector nodes), sub_retained / put_retained, exit."""
    from zmesh import eventloop
    from zmesh.mqtt.client import Client

    names: list[str] = spec["names"]
    expect = len(names) - 1
    clients: dict[int, Client] = {}
    up: dict[int, set[str]] = {}
    full: set[int] = set()
    collected: dict[int, dict[str, Any]] = {}
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def reader(i: int, client: Client) -> None:
        try:
            async for msg in client.messages():
                t = time.monotonic()
                if msg.topic == "$SYS/zmesh/peers":
                    now_up = {p["name"] for p in json.loads(msg.payload) if p.get("state") == "up"}
                    for gone in up.get(i, set()) - now_up:
                        emit(ev="down", node=i, peer=names.index(gone) if gone in names else -1, t=t)
                    up[i] = now_up
                    if i not in full and len(now_up) >= expect:
                        full.add(i)
                        emit(ev="full", node=i, t=t)
                elif msg.topic.startswith("alerts/"):
                    c = collected[i]
                    src, seq, sent_ns = STAMP.unpack_from(msg.payload)
                    key = (src, seq)
                    if key in c["seen"]:
                        c["dups"] += 1
                    else:
                        c["seen"].add(key)
                        c["lat_us"].append((time.monotonic_ns() - sent_ns) / 1000)
                elif msg.topic.startswith("scale/ret/") and not msg.retain:
                    emit(ev="ret", node=i, k=int(msg.topic.rsplit("/", 1)[1]), t=t)
        except Exception as exc:  # noqa: BLE001 - a killed node ends its connection
            emit(ev="lost", node=i, why=str(exc)[:200])

    async def connect(i: int, port: int) -> Client:
        client = Client(client_id=f"scale-{spec['role']}-{i}", keepalive=120)
        await client.connect("127.0.0.1", port, timeout=30)
        clients[i] = client
        spawn(reader(i, client))
        return client

    async def alerts(seconds: float, rate: float) -> None:
        period = 1.0 / rate
        n = len(clients)
        sent: dict[int, int] = {}

        async def one(slot: int, i: int, client: Client) -> None:
            topic = f"alerts/{names[i]}"
            start = time.monotonic() + period * slot / max(1, n)  # phases staggered
            seq = 0
            while True:
                due = start + seq * period
                if due - start >= seconds:
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    await client.publish(topic, STAMP.pack(i, seq, time.monotonic_ns()) + b"x" * 48)
                except Exception:  # noqa: BLE001 - its node was killed
                    break
                seq += 1
            sent[i] = seq

        await asyncio.gather(*(one(s, i, c) for s, (i, c) in enumerate(sorted(clients.items()))))
        emit(ev="alerts_done", sent={str(k): v for k, v in sent.items()})

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        while True:
            line = await stdin.readline()
            if not line:
                return
            cmd = json.loads(line)
            what = cmd["cmd"]
            try:
                if what == "watch":
                    client = await connect(cmd["node"], cmd["port"])
                    await client.subscribe([("$SYS/zmesh/peers", 0)], timeout=30)
                    emit(ev="watching", node=cmd["node"])
                elif what == "connect":
                    await connect(cmd["node"], cmd["port"])
                    emit(ev="connected", node=cmd["node"])
                elif what == "alerts":
                    spawn(alerts(cmd["seconds"], cmd["rate"]))
                elif what == "collect":
                    for i in cmd["nodes"]:
                        collected[i] = {"seen": set(), "dups": 0, "lat_us": []}
                        await clients[i].subscribe([("alerts/#", 0)], timeout=30)
                    emit(ev="collecting")
                elif what == "report":
                    out = {}
                    for i, c in collected.items():
                        out[str(i)] = {"unique": len(c["seen"]), "dups": c["dups"],
                                       "per_source": _per_source(c["seen"]),
                                       "p50_us": r(pct(c["lat_us"], 50), 1), "p99_us": r(pct(c["lat_us"], 99), 1),
                                       "max_us": r(max(c["lat_us"], default=None), 1)}
                    emit(ev="report", collectors=out)
                elif what == "sub_retained":
                    await asyncio.gather(*(c.subscribe([("scale/ret/#", 0)], timeout=30) for c in clients.values()))
                    emit(ev="subscribed")
                elif what == "put_retained":
                    t = time.monotonic()
                    await clients[cmd["node"]].publish(f"scale/ret/{cmd['k']}", b"v" * 64, retain=True)
                    emit(ev="put", k=cmd["k"], t=t)
                elif what == "upcounts":
                    emit(ev="upcounts", counts={str(i): len(u) for i, u in up.items()})
                elif what == "exit":
                    return
            except Exception as exc:  # noqa: BLE001
                emit(ev="error", cmd=what, why=repr(exc)[:300])

    eventloop.run(main())
    os._exit(0)  # the connections to killed nodes need no goodbye


def _per_source(seen: set[tuple[int, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for src, _seq in seen:
        out[str(src)] = out.get(str(src), 0) + 1
    return out


# ============================================================================ a Zenoh node


def zenoh_main(spec: dict[str, Any]) -> None:
    """One Zenoh peer session, its liveliness token and subscriber, and the same commands
    as the agent (for itself only)."""
    import zenoh

    me: int = spec["index"]
    n: int = spec["n"]
    conf = zenoh.Config()
    conf.insert_json5("mode", '"peer"')
    conf.insert_json5("scouting/multicast/enabled", "false")
    conf.insert_json5("listen/endpoints", json.dumps([f"tcp/127.0.0.1:{spec['port']}"]))
    conf.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{p}" for p in spec["connect"]]))
    session = zenoh.open(conf)
    lock = threading.Lock()
    alive: set[int] = set()
    state = {"full": False}
    collected: dict[str, Any] = {"seen": set(), "dups": 0, "lat_us": []}
    keep: list[Any] = []

    def on_live(sample: Any) -> None:
        t = time.monotonic()
        who = int(str(sample.key_expr).rsplit("/", 1)[1])
        if who == me:
            return
        with lock:
            if sample.kind == zenoh.SampleKind.PUT:
                alive.add(who)
                if not state["full"] and len(alive) >= n - 1:
                    state["full"] = True
                    emit(ev="full", node=me, t=t)
            else:
                alive.discard(who)
                emit(ev="down", node=me, peer=who, t=t)

    keep.append(session.liveliness().declare_token(f"scale/live/{me}"))
    keep.append(session.liveliness().declare_subscriber("scale/live/*", on_live, history=True))
    emit(ev="ready", node=me, t=time.monotonic())

    def on_alert(sample: Any) -> None:
        now = time.monotonic_ns()
        src, seq, sent_ns = STAMP.unpack_from(sample.payload.to_bytes())
        with lock:
            if (src, seq) in collected["seen"]:
                collected["dups"] += 1
            else:
                collected["seen"].add((src, seq))
                collected["lat_us"].append((now - sent_ns) / 1000)

    def on_ret(sample: Any) -> None:
        emit(ev="ret", node=me, k=int(str(sample.key_expr).rsplit("/", 1)[1]), t=time.monotonic())

    def alerts(seconds: float, rate: float, phase: float) -> None:
        pub = session.declare_publisher(f"alerts/n{me:03d}")
        period = 1.0 / rate
        start = time.monotonic() + period * phase
        seq = 0
        while seq * period < seconds:
            delay = start + seq * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pub.put(STAMP.pack(me, seq, time.monotonic_ns()) + b"x" * 48)
            seq += 1
        pub.undeclare()
        emit(ev="alerts_done", sent={str(me): seq})

    for raw in sys.stdin:
        cmd = json.loads(raw)
        what = cmd["cmd"]
        if what == "alerts":
            threading.Thread(target=alerts, args=(cmd["seconds"], cmd["rate"], cmd.get("phase", 0.0)),
                             daemon=True).start()
        elif what == "collect":
            keep.append(session.declare_subscriber("alerts/**", on_alert))
            emit(ev="collecting")
        elif what == "report":
            with lock:
                lat = list(collected["lat_us"])
                out = {str(me): {"unique": len(collected["seen"]), "dups": collected["dups"],
                                 "per_source": _per_source(collected["seen"]),
                                 "p50_us": r(pct(lat, 50), 1), "p99_us": r(pct(lat, 99), 1),
                                 "max_us": r(max(lat, default=None), 1)}}
            emit(ev="report", collectors=out)
        elif what == "sub_retained":
            keep.append(session.declare_subscriber("scale/ret/*", on_ret))
            emit(ev="subscribed")
        elif what == "put_retained":
            t = time.monotonic()
            session.put(f"scale/ret/{cmd['k']}", b"v" * 64)
            emit(ev="put", k=cmd["k"], t=t)
        elif what == "upcounts":
            with lock:
                emit(ev="upcounts", counts={str(me): len(alive)})
        elif what == "exit":
            break
    os._exit(0)


# ============================================================================ one system at one N


class Run:
    def __init__(self, system: str, n: int, timing: Timing, workdir: Path, group: Group,
                 zmesh_src: Path | None, log_level: str) -> None:
        self.system, self.n, self.timing, self.group = system, n, timing, group
        self.dir = workdir / f"{system}-{n}"
        self.dir.mkdir()
        self.zmesh_src = zmesh_src
        self.log_level = log_level
        self.names = [f"n{i:03d}" for i in range(n)]
        self.nodes: list[subprocess.Popen[bytes]] = []
        self.ready_t: list[float] = [float("nan")] * n
        self.ports: list[dict[str, Any]] = [{} for _ in range(n)]
        self.lines: list[Lines] = []  # zmesh: [watch/publish agent, collector agent]; zenoh: one per node
        self.killed: set[int] = set()
        self.collectors = [n - 2, n - 1]

    # -------------------------------------------------------------- start

    def env(self) -> dict[str, str]:
        path = str(self.zmesh_src) if self.zmesh_src else str(REPO)
        return {**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}

    def start(self) -> None:
        if self.system == "zenoh":
            self._start_zenoh()
        else:
            self._start_zmesh()

    def _start_zmesh(self) -> None:
        from benchmarks.common import free_port, make_certs

        certs = make_certs(self.dir / "certs", self.names)
        os.chmod(certs, 0o700)
        agent_env = {**os.environ, "PYTHONPATH": str(REPO)}
        for role in ("watch", "collect"):
            p = self.group.spawn([sys.executable, "-m", "benchmarks.scale", "_agent",
                                  json.dumps({"role": role, "names": self.names})],
                                 f"{self.dir.name}/agent-{role}", agent_env, pipe=True, cwd=REPO)
            self.lines.append(Lines(p, f"agent-{role}"))
        seed_port = free_port()
        ready_files = [self.dir / f"{name}.ready" for name in self.names]
        order = list(range(self.n))
        deadline = time.monotonic() + self.timing.start_timeout(self.n)
        for i in order:
            # The others bind port 0 (the ready file says which): a port picked free here
            # could be taken by another node's ephemeral MQTT or events port before it binds.
            port = seed_port if i == 0 else 0
            args = [sys.executable, "-m", "zmesh", "node", "run", "--name", self.names[i],
                    "--cert", str(certs / f"{self.names[i]}.key_secret"), "--trusted", str(certs),
                    "--listen", f"127.0.0.1:{port}", "--mqtt", "127.0.0.1:0",
                    "--log-level", self.log_level, "--ready-file", str(ready_files[i])]
            if i:
                args += ["--peer", f"127.0.0.1:{seed_port}"]
            self.nodes.append(self.group.spawn(args, f"{self.dir.name}/{self.names[i]}", self.env()))
            if i == 0:  # the seed first, so that nobody dials a port not yet bound
                self._wait_ready([0], ready_files, deadline)
        self._wait_ready(order[1:], ready_files, deadline)

    def _wait_ready(self, which: list[int], files: list[Path], deadline: float) -> None:
        pending = set(which)
        last_report = time.monotonic()
        while pending:
            for i in sorted(pending):
                if files[i].exists():
                    try:
                        info = json.loads(files[i].read_text())
                    except ValueError:
                        continue  # being written
                    self.ready_t[i] = time.monotonic()
                    self.ports[i] = info
                    pending.discard(i)
                    # Watched from the moment it is ready: its first $SYS value comes at once.
                    self.lines[0].tell(cmd="watch", node=i, port=info["mqtt_port"])
                elif self.nodes[i].poll() is not None:
                    raise RuntimeError(f"{self.names[i]} exited {self.nodes[i].returncode}; log in {self.dir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} nodes not ready in time (e.g. {self.names[min(pending)]})")
            if time.monotonic() - last_report > 5:
                progress(f"    {self.n - len(pending)}/{self.n} ready")
                last_report = time.monotonic()
            time.sleep(0.02)

    def _start_zenoh(self) -> None:
        from benchmarks.common import free_port

        ports = [free_port()] + [0] * (self.n - 1)  # only the seed's port must be known (as zmesh)
        deadline = time.monotonic() + self.timing.start_timeout(self.n)
        for i in range(self.n):
            spec = {"index": i, "n": self.n, "port": ports[i], "connect": [ports[0]] if i else []}
            p = self.group.spawn([sys.executable, "-m", "benchmarks.scale", "_zenoh", json.dumps(spec)],
                                 f"{self.dir.name}/{self.names[i]}", {**os.environ, "PYTHONPATH": str(REPO)},
                                 pipe=True, cwd=REPO)
            self.nodes.append(p)
            self.lines.append(Lines(p, self.names[i]))
            self.ports[i] = {"port": ports[i]}
            if i == 0:
                self.ready_t[0] = self.lines[0].wait(lambda x: x.get("ev") == "ready", deadline - time.monotonic(), "ready")["t"]
        for i in range(1, self.n):
            self.ready_t[i] = self.lines[i].wait(lambda x: x.get("ev") == "ready",
                                                 max(1.0, deadline - time.monotonic()), "ready")["t"]

    # -------------------------------------------------------------- events

    def events(self, kind: str) -> list[dict[str, Any]]:
        out = []
        for lines in self.lines:
            out.extend(x for x in lines.snapshot() if x.get("ev") == kind)
        return out

    def converge(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timing.converge_timeout(self.n)
        last_ready = max(self.ready_t)
        while True:
            full = {e["node"]: e["t"] for e in self.events("full")}
            if len(full) >= self.n:
                break
            if time.monotonic() > deadline:
                return {"converged": False, "nodes_full": len(full), "after_last_ready_s": None,
                        "timeout_s": self.timing.converge_timeout(self.n), "up_seen_at_timeout": self.up_counts()}
            time.sleep(0.1)
        return {"converged": True, "nodes_full": self.n,
                "after_last_ready_s": r(max(full.values()) - last_ready, 3),
                "start_spread_s": r(last_ready - min(self.ready_t), 2)}

    def up_counts(self) -> dict[str, Any]:
        """How many peers each node sees up now: min / median / max over the nodes."""
        counts: dict[str, int] = {}
        for lines in self.lines if self.system == "zenoh" else self.lines[:1]:
            lines.tell(cmd="upcounts")
        for lines in self.lines if self.system == "zenoh" else self.lines[:1]:
            try:
                counts.update(lines.wait(lambda x: x.get("ev") == "upcounts", 10, "upcounts")["counts"])
            except RuntimeError:
                pass
        v = list(counts.values())
        return {"nodes": len(v), "min": min(v, default=None), "median": statistics.median(v) if v else None,
                "max": max(v, default=None), "of": self.n - 1}

    # -------------------------------------------------------------- idle

    def idle(self) -> dict[str, Any]:
        time.sleep(self.timing.settle)  # a phase length, not a synchronisation
        pids = [p.pid for p in self.nodes]
        cpu0 = [proc_cpu_s(pid) for pid in pids]
        busy0, t0 = machine_busy_s(), time.monotonic()
        time.sleep(self.timing.idle)  # the measurement window
        wall = time.monotonic() - t0
        cpu = [(proc_cpu_s(pid) - c) / wall * 100 for pid, c in zip(pids, cpu0, strict=True)]
        own = sum(cpu) / 100 * wall
        background = max(0.0, (machine_busy_s() - busy0) - own) / wall
        rss = [proc_rss_mib(pid) for pid in pids]
        conns = self.connections()
        return {
            "window_s": r(wall, 1),
            "cpu_pct_per_node": {"mean": r(statistics.fmean(cpu)), "median": r(statistics.median(cpu)),
                                 "max": r(max(cpu))},
            "cpu_pct_all_nodes": r(sum(cpu), 1),
            "rss_mib_per_node": {"mean": r(statistics.fmean(rss), 1), "max": r(max(rss), 1)},
            "fds_per_node": {"mean": r(statistics.fmean(c["fds"] for c in conns), 1),
                             "max": max(c["fds"] for c in conns)},
            "tcp_per_node": {"mean": r(statistics.fmean(c["tcp"] for c in conns), 1),
                             "max": max(c["tcp"] for c in conns)},
            "data_conns_per_node": {"mean": r(statistics.fmean(c["data"] for c in conns), 1),
                                    "max": max(c["data"] for c in conns)},
            "background_cores": r(background),
        }

    def connections(self, which: list[int] | None = None) -> list[dict[str, int]]:
        """Per node: open descriptors, established TCP sockets, and those that carry data
        between nodes (zmesh: either end is a node's events port; Zenoh: every session, as a
        Zenoh session carries everything)."""
        table = tcp_table()
        events_ports = {p.get("events_port") for p in self.ports} - {None}
        out = []
        for i in which if which is not None else range(self.n):
            if i in self.killed:
                continue
            fds, inodes = proc_socket_inodes(self.nodes[i].pid)
            tcp = [table[x] for x in inodes if x in table]
            if self.system == "zenoh":
                data = len(tcp)
            else:
                data = sum(1 for lp, rp in tcp if lp in events_ports or rp in events_ports)
            out.append({"node": i, "fds": fds, "tcp": len(tcp), "data": data})
        return out

    # -------------------------------------------------------------- alerts

    def alerts(self) -> dict[str, Any]:
        seconds = self.timing.alerts
        if self.system == "zenoh":
            for i in self.collectors:
                self.lines[i].tell(cmd="collect")
            for i in self.collectors:
                self.lines[i].wait(lambda x: x.get("ev") == "collecting", 30, "collecting")
        else:
            col = self.lines[1]
            for i in self.collectors:
                col.tell(cmd="connect", node=i, port=self.ports[i]["mqtt_port"])
                col.wait(lambda x, i=i: x.get("ev") == "connected" and x["node"] == i, 30, "connected")
            col.tell(cmd="collect", nodes=self.collectors)
            col.wait(lambda x: x.get("ev") == "collecting", 30, "collecting")
        # Subscriptions travel the mesh: give them a bounded moment (the figures say if one
        # collector missed the first messages: 'missing').
        time.sleep(2.0)  # a phase length
        if self.system == "zenoh":
            for i, lines in enumerate(self.lines):
                lines.tell(cmd="alerts", seconds=seconds, rate=ALERT_RATE, phase=i / self.n)
        else:
            self.lines[0].tell(cmd="alerts", seconds=seconds, rate=ALERT_RATE)
        time.sleep(seconds / 2)  # mid-run: the data connections while messages flow
        conns = self.connections([i for i in range(self.n) if i not in self.collectors])
        sent: dict[str, int] = {}
        senders = self.lines if self.system == "zenoh" else self.lines[:1]
        for lines in senders:
            sent.update(lines.wait(lambda x: x.get("ev") == "alerts_done", seconds + 30, "alerts_done")["sent"])
        time.sleep(1.0)  # the last messages in flight
        reports: dict[str, Any] = {}
        # One report per process: a zmesh collector agent reports both of its collectors.
        for lines in ([self.lines[i] for i in self.collectors] if self.system == "zenoh" else [self.lines[1]]):
            lines.tell(cmd="report")
            reports.update(lines.wait(lambda x: x.get("ev") == "report", 30, "report")["collectors"])
        total = sum(sent.values())
        rows = {}
        for i in self.collectors:
            rep = reports.get(str(i), {})
            rows[self.names[i]] = {"delivered_unique": rep.get("unique"), "duplicates": rep.get("dups"),
                                   "missing": total - (rep.get("unique") or 0),
                                   "p50_us": rep.get("p50_us"), "p99_us": rep.get("p99_us"), "max_us": rep.get("max_us")}
        p99 = [v["p99_us"] for v in rows.values() if v["p99_us"] is not None]
        return {
            "seconds": seconds, "rate_per_node": ALERT_RATE, "sent": total,
            "collectors": rows,
            "delivered_once_each": all(v["missing"] == 0 and v["duplicates"] == 0 for v in rows.values()),
            "p99_us": max(p99) if p99 else None,
            "data_conns_non_collector": {"mean": r(statistics.fmean(c["data"] for c in conns), 1),
                                         "max": max(c["data"] for c in conns)},
            "tcp_non_collector": {"mean": r(statistics.fmean(c["tcp"] for c in conns), 1),
                                  "max": max(c["tcp"] for c in conns)},
        }

    # -------------------------------------------------------------- retained

    def retained(self) -> dict[str, Any]:
        targets = self.lines if self.system == "zenoh" else self.lines[:1]
        for lines in targets:
            lines.tell(cmd="sub_retained")
        for lines in targets:
            lines.wait(lambda x: x.get("ev") == "subscribed", 60, "subscribed")
        time.sleep(2.0)  # the subscriptions travel the mesh (a phase length)
        lat: list[float] = []
        worst: list[float] = []
        incomplete = 0
        for k in range(self.timing.retained_writes):
            writer = (k * 7) % self.n
            lines = self.lines[writer] if self.system == "zenoh" else self.lines[0]
            if self.system == "zenoh":
                lines.tell(cmd="put_retained", k=k)
            else:
                lines.tell(cmd="put_retained", node=writer, k=k)
            put = lines.wait(lambda x, k=k: x.get("ev") == "put" and x["k"] == k, 30, f"put {k}")
            deadline = time.monotonic() + 10
            while True:
                got = {e["node"]: e["t"] for e in self.events("ret") if e["k"] == k}
                if len(got) >= self.n or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if len(got) < self.n:
                incomplete += 1
            these = [t - put["t"] for t in got.values()]
            lat.extend(these)
            if these:
                worst.append(max(these))
            time.sleep(0.5)  # writes apart (a phase length)
        return {"writes": self.timing.retained_writes, "incomplete_writes": incomplete,
                "p50_ms": r(1000 * (pct(lat, 50) or float("nan")), 1),
                "p99_ms": r(1000 * (pct(lat, 99) or float("nan")), 1),
                "last_node_median_ms": r(1000 * statistics.median(worst), 1) if worst else None}

    # -------------------------------------------------------------- kill

    def kill(self) -> dict[str, Any]:
        protected = {0, *self.collectors}
        victims = [i for i in range(self.n // 3, self.n) if i not in protected][: self.timing.kills]
        pair: list[float] = []
        everywhere: list[float] = []
        not_seen = 0
        for v in victims:
            t0 = time.monotonic()
            os.kill(self.nodes[v].pid, signal.SIGKILL)
            self.killed.add(v)
            observers = [i for i in range(self.n) if i not in self.killed]
            deadline = time.monotonic() + 30
            while True:
                seen = {}
                for e in self.events("down"):
                    if e["peer"] == v and e["t"] >= t0 and e["node"] not in seen:
                        seen[e["node"]] = e["t"] - t0
                if all(o in seen for o in observers) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            not_seen += sum(1 for o in observers if o not in seen)
            ts = [seen[o] for o in observers if o in seen]
            pair.extend(ts)
            if len(ts) == len(observers):
                everywhere.append(max(ts))
            self.nodes[v].wait(5)
            progress(f"    killed {self.names[v]}: down at {len(ts)}/{len(observers)} nodes, "
                     f"slowest {max(ts, default=float('nan')):.2f} s")
        return {"victims": len(victims), "pair_median_s": r(statistics.median(pair), 2) if pair else None,
                "everywhere_median_s": r(statistics.median(everywhere), 2) if everywhere else None,
                "observers_never_saw": not_seen}

    def stop(self) -> None:
        for lines in self.lines:
            lines.tell(cmd="exit")
        self.group.stop(self.nodes + [x.proc for x in self.lines])


def measure(rows: list[dict[str, Any]], system: str, n: int, timing: Timing, workdir: Path, group: Group,
            zmesh_src: Path | None, log_level: str) -> None:
    """One system at one N; its row goes into ``rows`` at once (an interrupted run keeps
    what it measured)."""
    run = Run(system, n, timing, workdir, group, zmesh_src, log_level)
    row: dict[str, Any] = {"system": system, "n": n}
    rows.append(row)
    t0 = time.monotonic()
    try:
        progress(f"  [{system} N={n}] starting {n} nodes")
        run.start()
        row["start_s"] = r(max(run.ready_t) - t0, 1)
        progress(f"  [{system} N={n}] all ready after {row['start_s']} s; converging")
        row["converge"] = run.converge()
        progress(f"  [{system} N={n}] converge: {row['converge']}")
        if not row["converge"]["converged"]:
            # The other figures are still measured (and marked by converged: false): what a
            # mesh that does not form costs is the point of measuring today's code.
            row["error"] = "did not converge"
        row["idle"] = run.idle()
        i = row["idle"]
        progress(f"  [{system} N={n}] idle: cpu {i['cpu_pct_per_node']['mean']} %/node, rss "
                 f"{i['rss_mib_per_node']['mean']} MiB, fds {i['fds_per_node']['mean']}, "
                 f"data conns {i['data_conns_per_node']['mean']} (background {i['background_cores']} cores)")
        row["alerts"] = run.alerts()
        a = row["alerts"]
        progress(f"  [{system} N={n}] alerts: sent {a['sent']}, once each: {a['delivered_once_each']}, "
                 f"p99 {a['p99_us']} us, data conns/non-collector {a['data_conns_non_collector']}")
        row["retained"] = run.retained()
        progress(f"  [{system} N={n}] retained: {row['retained']}")
        row["kill"] = run.kill()
        progress(f"  [{system} N={n}] kill: {row['kill']}")
    except Exception as exc:  # noqa: BLE001 - one system failing must not lose the others
        row["error"] = repr(exc)[:500]
        progress(f"  [{system} N={n}] FAILED: {row['error']} (logs in {run.dir})")
    except KeyboardInterrupt:
        row["error"] = "interrupted"
        raise
    finally:
        row["wall_s"] = r(time.monotonic() - t0, 1)
        run.stop()


# ============================================================================ report


def get(row: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(row, dict) or key not in row:
            return None
        row = row[key]
    return row


def fmtv(v: Any, spec: str = "") -> str:
    if v is None:
        return "–"
    return format(v, spec) if spec else str(v)


COLUMNS = [
    ("idle CPU %/node", ("idle", "cpu_pct_per_node", "mean"), ".2f"),
    ("RSS MiB/node", ("idle", "rss_mib_per_node", "mean"), ".1f"),
    ("fds/node", ("idle", "fds_per_node", "mean"), ".0f"),
    ("all up after last ready, s", ("converge", "after_last_ready_s"), ".2f"),
    ("SIGKILL → down, median s", ("kill", "pair_median_s"), ".2f"),
    ("… everywhere, median s", ("kill", "everywhere_median_s"), ".2f"),
    ("alerts once each", ("alerts", "delivered_once_each"), ""),
    ("alerts p99 µs", ("alerts", "p99_us"), ",.0f"),
    ("data conns/non-collector", ("alerts", "data_conns_non_collector", "mean"), ".1f"),
    ("retained p99 ms", ("retained", "p99_ms"), ".1f"),
]


def markdown(report: dict[str, Any], json_name: str) -> str:
    c = report["conditions"]
    out = [f"# scale, {report['timestamp']}{' (quick)' if report['quick'] else ''}", "",
           f"{c['cpu_model']}, {c['cores']} cores, {c['platform']}; Python {c['python']}, pyzmq {c['pyzmq']} "
           f"(libzmq {c['libzmq']}), eclipse-zenoh {c.get('eclipse-zenoh')}; zmesh working tree at "
           f"{c['zmesh_commit']}{' + uncommitted zmesh/ changes' if c['zmesh_dirty_files'] else ''}"
           f"{'; zmesh-rev = ' + report['zmesh_rev'] if report.get('zmesh_rev') else ''}. "
           f"Loopback, one process per node, static seed to node 0, CURVE on (zmesh), node log level "
           f"{report['log_level']}; load average at start {c['loadavg_at_start']}. Phases: idle "
           f"{report['timing']['idle']} s after {report['timing']['settle']} s; alerts {report['timing']['alerts']} s "
           f"at 10 msgs/s per node, 2 collectors; {report['timing']['retained_writes']} retained writes; "
           f"{report['timing']['kills']} SIGKILL(s). Full figures: `results/{json_name}`.", "",
           "| system | N | " + " | ".join(h for h, _, _ in COLUMNS) + " | background cores (idle) |",
           "|---|---:|" + "---:|" * len(COLUMNS) + "---:|"]
    for row in report["rows"]:
        if "error" in row and "idle" not in row:
            out.append(f"| {row['system']} | {row['n']} | failed: {row['error'][:120]} |" + " |" * len(COLUMNS))
            continue
        cells = [fmtv(get(row, *path), spec) for _, path, spec in COLUMNS]
        if get(row, "converge", "converged") is False:
            seen = get(row, "converge", "up_seen_at_timeout") or {}
            cells[3] = (f"**not within {get(row, 'converge', 'timeout_s'):.0f}** (up seen: "
                        f"{seen.get('min')}–{seen.get('max')} of {seen.get('of')})")
        out.append(f"| {row['system']} | {row['n']} | " + " | ".join(cells)
                   + f" | {fmtv(get(row, 'idle', 'background_cores'))} |")
    ratios = report.get("ratios") or []
    if ratios:
        out += ["", "| ratio | value |", "|---|---:|"]
        out += [f"| {name} | {value} |" for name, value in ratios]
    out += ["", "How to read: *all up after last ready* is from the last node's ready file (zmesh) or "
            "session open (Zenoh) until every node has seen all others up; *SIGKILL → down* is per "
            "(victim, surviving node) pair, *everywhere* the slowest node per victim; on loopback "
            "a SIGKILL closes the victim's TCP connections at once. *data conns*: zmesh, TCP "
            "connections of the node with a node's events port at either end (its SUBs to every "
            "publisher and their SUBs to it); Zenoh, every TCP session (one carries everything). "
            "zmesh's idle figures include one MQTT connection (the benchmark's `$SYS/zmesh/peers` "
            "watch). Zenoh has no retained store: its retained row is a put to N subscribers."]
    return "\n".join(out) + "\n"


def ratios(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Per system, the largest N against the smallest (the issue's 'flat line' goals), and
    zmesh against each other system at the same N."""
    out: list[tuple[str, str]] = []
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        if "idle" in row:
            by.setdefault(row["system"], {})[row["n"]] = row
    for system, per_n in by.items():
        lo, hi = min(per_n), max(per_n)
        if lo == hi:
            continue
        for label, path in (("idle CPU/node", ("idle", "cpu_pct_per_node", "mean")),
                            ("RSS/node", ("idle", "rss_mib_per_node", "mean")),
                            ("fds/node", ("idle", "fds_per_node", "mean")),
                            ("alerts p99", ("alerts", "p99_us"))):
            a, b = get(per_n[lo], *path), get(per_n[hi], *path)
            if a and b:
                out.append((f"{system}: {label} at N={hi} / N={lo}", f"{b / a:.2f}x"))
    if "zmesh" in by:
        for other in by:
            if other == "zmesh":
                continue
            for n in sorted(set(by["zmesh"]) & set(by[other])):
                for label, path in (("idle CPU/node", ("idle", "cpu_pct_per_node", "mean")),
                                    ("RSS/node", ("idle", "rss_mib_per_node", "mean"))):
                    a, b = get(by["zmesh"][n], *path), get(by[other][n], *path)
                    if a and b:
                        out.append((f"zmesh / {other}: {label} at N={n}", f"{a / b:.2f}x"))
    return out


def plot(report: dict[str, Any]) -> None:
    from benchmarks.plots import _pyplot, _save

    plt = _pyplot()
    if plt is None:
        return
    panels = [("idle CPU % per node", ("idle", "cpu_pct_per_node", "mean")),
              ("RSS MiB per node", ("idle", "rss_mib_per_node", "mean")),
              ("open fds per node", ("idle", "fds_per_node", "mean")),
              ("all up after last ready (s)", ("converge", "after_last_ready_s")),
              ("SIGKILL → down, median (s)", ("kill", "pair_median_s")),
              ("alerts p99 (ms)", ("alerts", "p99_us")),
              ("data conns / non-collector", ("alerts", "data_conns_non_collector", "mean")),
              ("retained write p99 (ms)", ("retained", "p99_ms"))]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    systems = sorted({row["system"] for row in report["rows"]})
    for ax, (title, path) in zip(axes.flat, panels, strict=True):
        for system in systems:
            pts = [(row["n"], get(row, *path)) for row in report["rows"] if row["system"] == system]
            pts = [(n, v / 1000 if path[-1] == "p99_us" else v) for n, v in pts if isinstance(v, (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
        ax.set_title(title)
        ax.set_xlabel("nodes (N)")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    axes.flat[0].legend()
    fig.suptitle(f"scale {report['timestamp']}: cost per node against N (loopback, one process per node)")
    fig.tight_layout()
    _save(fig, "scale")
    plt.close(fig)


# ============================================================================ main


def render_saved(paths: list[Path]) -> int:
    reports = [json.loads(p.read_text()) for p in paths]
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for rep in reports:
        for row in rep["rows"]:
            key = (row["system"], row["n"])
            if key not in merged or "idle" in row or "idle" not in merged[key]:
                merged[key] = {**row, "run": rep["timestamp"]}
    report = {**reports[-1], "rows": sorted(merged.values(), key=lambda x: (x["n"], x["system"])),
              "merged_from": [p.name for p in paths]}
    report["ratios"] = ratios(report["rows"])
    md = markdown(report, " + ".join(p.name for p in paths))
    md += ("\nRows merged from runs " + ", ".join(rep["timestamp"] for rep in reports)
           + " (conditions above: the last run's; each JSON has its own). Row -> run: "
           + ", ".join(f"{row['system']} N={row['n']}: {row['run']}" for row in report["rows"]) + ".\n")
    (HERE / "results" / "scale-latest.md").write_text(md)
    plot(report)
    print(md)
    return 0


def export_rev(rev: str, workdir: Path) -> tuple[Path, str]:
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True,
                            text=True, timeout=30).stdout.strip()
    if not commit:
        raise SystemExit(f"--zmesh-rev {rev}: not a revision of {REPO}")
    src = workdir / f"src-{commit}"
    src.mkdir()
    archive = subprocess.run(["git", "archive", commit, "zmesh"], cwd=REPO, capture_output=True,
                             timeout=60, check=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True, timeout=60)
    return src, commit


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_agent":
        agent_main(json.loads(argv[1]))
        return 0
    if argv and argv[0] == "_zenoh":
        zenoh_main(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 5, 10 and short phases (a smoke test)")
    ap.add_argument("--sizes", help="comma-separated N (default 10,50,100,200; quick 5,10)")
    ap.add_argument("--systems", default="zmesh,zmesh-rev,zenoh",
                    help="any of zmesh, zmesh-rev (needs --zmesh-rev), zenoh (skipped if not installed)")
    ap.add_argument("--zmesh-rev", help="a git revision whose zmesh/ runs as the system 'zmesh-rev'")
    ap.add_argument("--log-level", default="warning", help="the zmesh nodes' log level")
    ap.add_argument("--idle-seconds", type=float)
    ap.add_argument("--alert-seconds", type=float)
    ap.add_argument("--no-save", action="store_true", help="write nothing into results/")
    ap.add_argument("--out", type=Path, help="also write the JSON report here (tests)")
    ap.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                    help="measure nothing: render saved runs (rows merged, the later run's row "
                         "kept for a system and N measured twice) as scale-latest.md and scale.png")
    opts = ap.parse_args(argv)
    if opts.report:
        return render_saved(opts.report)

    from benchmarks.common import conditions, stamp

    timing = Timing(opts.quick)
    if opts.idle_seconds:
        timing.idle = opts.idle_seconds
    if opts.alert_seconds:
        timing.alerts = opts.alert_seconds
    sizes = [int(x) for x in opts.sizes.split(",")] if opts.sizes else list(SIZES_QUICK if opts.quick else SIZES_FULL)
    systems = [s.strip() for s in opts.systems.split(",") if s.strip()]
    skipped: dict[str, str] = {}
    if "zmesh-rev" in systems and not opts.zmesh_rev:
        systems.remove("zmesh-rev")
        skipped["zmesh-rev"] = "no --zmesh-rev given"
    if "zenoh" in systems:
        import importlib.util

        if importlib.util.find_spec("zenoh") is None:
            systems.remove("zenoh")
            skipped["zenoh"] = "eclipse-zenoh is not installed (pip install eclipse-zenoh)"
    for s, why in skipped.items():
        progress(f"skipping {s}: {why}")
    expected = bound = 0.0
    for n in sizes:
        for s in systems:
            e, b = timing.estimate(n, s)
            expected, bound = expected + e, bound + b
    progress(f"scale: systems {', '.join(systems)}; N = {', '.join(map(str, sizes))}; "
             f"expected about {expected / 60:.1f} min, at most {bound / 60:.1f} min (every wait bounded)")

    workdir = Path(tempfile.mkdtemp(prefix="zmesh-scale-"))
    group = Group(workdir)
    zmesh_src, rev_commit = (export_rev(opts.zmesh_rev, workdir) if opts.zmesh_rev and "zmesh-rev" in systems
                             else (None, None))

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    report: dict[str, Any] = {"scenario": "scale", "timestamp": stamp(), "quick": opts.quick,
                              "conditions": conditions(transport="tcp 127.0.0.1 (loopback, no network namespaces)"),
                              "zmesh_rev": f"{opts.zmesh_rev} ({rev_commit})" if rev_commit else None,
                              "log_level": opts.log_level, "skipped": skipped, "process_group": group.pgid,
                              "timing": {k: v for k, v in vars(timing).items()}, "rows": []}
    t0 = time.monotonic()
    try:
        for n in sizes:  # each N for every system in turn: background load hits them alike
            for s in systems:
                measure(report["rows"], s, n, timing, workdir, group,
                        zmesh_src if s == "zmesh-rev" else None, opts.log_level)
    except KeyboardInterrupt:
        progress("interrupted: stopping every process")
        report["interrupted"] = True
    finally:
        group.close()
    report["wall_s"] = round(time.monotonic() - t0, 1)
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["ratios"] = ratios(report["rows"])
    name = f"scale-{report['timestamp']}{'-quick' if opts.quick else ''}.json"
    md = markdown(report, name)
    print(md)
    failed = any("error" in row for row in report["rows"])
    if opts.out:
        opts.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if not opts.no_save:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        (results / name).write_text(json.dumps(report, indent=2, default=str) + "\n")
        (results / "scale-latest.md").write_text(md)
        plot(report)
        progress(f"wrote results/{name}, results/scale-latest.md ({report['wall_s']} s)")
    if not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        progress(f"logs kept in {workdir}")
    return 1 if failed or report.get("interrupted") else 0


if __name__ == "__main__":
    raise SystemExit(main())
