"""Pub/sub, one publisher and one subscriber on loopback: zmesh against raw pyzmq, side by side.

    python -m benchmarks.pubsub            # full run (about 2-3 minutes on 2 cores)
    python -m benchmarks.pubsub --quick    # N / 10, one repetition, 1 s latency runs

Three systems, each as two processes (publisher, subscriber) started with multiprocessing
"spawn", all with CURVE on:

* ``zmesh``          two embedded ``zmesh.Node``s (``mqtt=None``); ``await node.publish()`` in a
                     loop on one, ``async for msg in node.subscribe("bench/#")`` on the other.
* ``raw-multipart``  pyzmq PUB/SUB, one 3-frame message per send:
                     ``[topic, msgpack(header), payload]`` (header packed / unpacked per message).
* ``raw-frames``     the same three frames, hand-rolled: ``send(frame, SNDMORE)`` x3 and
                     ``recv()`` x3 (a fixed 3-frame protocol). pyzmq 27's ``send_multipart``
                     computes ``SNDMORE | flags`` on Python enums per frame and
                     ``recv_multipart`` asks RCVMORE per frame: ~12 + ~7 us per message, which
                     dominates ``raw-multipart``; this variant shows multipart without that tax.
* ``raw-msgpack``    pyzmq PUB/SUB, one frame per message: ``msgpack([topic, header, payload])``.

For each system and payload size (64 B, 1024 B):

* saturated throughput: the publisher sends N messages as fast as it can; the subscriber
  counts what arrives and times first to last; it stops when it has N, or after IDLE_S
  seconds without a message. Median of REPS runs (by delivered msgs/s).
* paced latency: RATE msgs/s on a deadline schedule for LAT_SECONDS; each payload carries
  ``time.perf_counter_ns()`` (CLOCK_MONOTONIC, shared by both processes), so the subscriber
  measures one-way latency directly.

Every payload starts with ``<IIQ`` (run id, sequence, send time in ns); the subscriber ignores
messages of other runs (warm-up leftovers). Children are driven over a Pipe: every wait has a
timeout and every child is terminated in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


def _zmesh_module(path: str, before_layout: str) -> Any:
    """A zmesh module by its path since the layout of subpackages (issue 13), or by its path
    before it: --zmesh-rev runs an older zmesh side by side."""
    import importlib

    try:
        return importlib.import_module(path)
    except ImportError:
        return importlib.import_module(before_layout)


HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

SYSTEMS = ("zmesh", "raw-multipart", "raw-frames", "raw-msgpack")
SIZES = (64, 1024)
N_FULL = {64: 500_000, 1024: 200_000}
REPS_FULL = 3
RATE = 1_000  # msgs/s for the latency runs
LAT_SECONDS_FULL = 3.0
IDLE_S = 2.0  # a throughput run ends after this long without a message
FIRST_S = 15.0  # ... or if the first message has not come after this long
RAW_HWM = 1_000_000  # raw pyzmq SNDHWM/RCVHWM (libzmq's default of 1000 drops most of a burst)
TOPIC = "bench/t"
FILTER = "bench/#"
HEADER = struct.Struct("<IIQ")  # run id, sequence number, perf_counter_ns at send
WARMUP_RUN = 0
WARMUP_EVERY_S = 0.005
REPLY_TIMEOUT_S = 60.0
# Quiet gate before each measurement (see Bench.wait_quiet).
QUIET_CORES = 0.25
QUIET_SAMPLE_S = 0.3
QUIET_MAX_S = 10.0
QUIET_BUDGET_S = 30.0
NOISY_CORES = 0.5  # a run with more background than this is flagged in the table

# The header every raw message carries, mirroring a zmesh item: version, qos|retain flags,
# timestamp, properties.
RAW_HEADER = [1, 0, 0, None]


# ============================================================================ children
#
# A child answers commands (tuples: name, dict) with one dict each; "run" commands answer
# twice for the subscriber ({"armed": True} at once, then the result).


def _payload(run: int, size: int, seq: int = 0, ts: int = 0) -> bytes:
    head = HEADER.pack(run, seq, ts)
    return head + b"x" * (size - len(head))


def _usage() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": time.process_time(), "maxrss_kib": ru.ru_maxrss}


def guarded_child(conn: Connection, profile_name: str, body: Callable[[], None]) -> None:
    """Run a benchmark child: a crash is logged and sent to the parent (which reports it
    instead of waiting), the parent going away ends it quietly, and with
    ZMESH_BENCH_PROFILE=DIR it is cProfiled into DIR/<profile_name>.prof."""
    profile_dir = os.environ.get("ZMESH_BENCH_PROFILE")
    profiler = None
    if profile_dir:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        body()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the parent went away: just exit
    except BaseException:
        logging.getLogger("bench").exception("child failed")
        try:
            conn.send({"error": traceback.format_exc()})
        except OSError:
            pass
        raise
    finally:
        if profiler is not None and profile_dir:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"{profile_name}.prof"))


def run_zmesh(main: Coroutine[Any, Any, Any]) -> Any:
    """Run an embedded zmesh client on the loop a node uses (zmesh.eventloop)."""
    try:
        from zmesh.eventloop import run
    except ImportError:  # --zmesh-rev older than zmesh.eventloop
        return asyncio.run(main)
    return run(main)


def child_main(
    system: str,
    role: str,
    conn: Connection,
    certs: str,
    log_path: str,
    hwm: int,
    zmesh_src: str | None = None,
) -> None:
    if zmesh_src and zmesh_src not in sys.path:
        sys.path.insert(0, zmesh_src)
    logging.basicConfig(
        filename=log_path,
        level=logging.INFO,
        format=f"%(asctime)s {system}/{role} %(levelname)s %(name)s: %(message)s",
    )
    def body() -> None:
        if system == "zmesh":
            run_zmesh(_zmesh_child(role, conn, Path(certs)))
        else:
            _raw_child(system, role, conn, Path(certs), hwm)

    guarded_child(conn, f"{system}-{role}", body)


# ---------------------------------------------------------------------------- zmesh


async def _zmesh_child(role: str, conn: Connection, certs: Path) -> None:
    from zmesh import Node

    loop = asyncio.get_running_loop()

    async def command() -> tuple[str, dict[str, Any]]:
        return await loop.run_in_executor(None, conn.recv)

    _cmd, args = await command()  # "start"
    node = Node(
        name=role,
        cert=certs / f"{role}.key_secret",
        trusted=certs,
        listen="127.0.0.1:0",
        peers=[f"127.0.0.1:{args['seed_port']}"] if args.get("seed_port") else [],
        mqtt=None,
    )
    async with node:
        subscription = node.subscribe(FILTER) if role == "sub" else None
        conn.send({"control_port": node.control_port, "pid": os.getpid()})
        while True:
            cmd, args = await command()
            if cmd == "stop":
                conn.send({"usage": _usage()})
                return
            if cmd == "enough":
                continue  # a warm-up stop that came after the warm-up had timed out
            if cmd == "wait_peers":
                await node.wait_for_peers(1, timeout=args["timeout"])
                conn.send({"ok": True})
            elif role == "pub":
                conn.send(await _zmesh_pub(node, conn, cmd, args))
            else:
                assert subscription is not None
                conn.send({"armed": True})
                conn.send(await _zmesh_sub(node, subscription, cmd, args))


def _zmesh_counters(node: Any) -> dict[str, int]:
    counters = dict(node.stats)
    if node.mesh is not None:
        counters.update(node.mesh.stats)
    return counters


async def _zmesh_pub(node: Any, conn: Connection, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    publish = node.publish
    before, counters = _usage(), _zmesh_counters(node)
    sent = 0
    if cmd == "warmup":
        warm = _payload(WARMUP_RUN, 64)
        deadline = time.monotonic() + args["timeout"]
        while not conn.poll() and time.monotonic() < deadline:
            await publish(TOPIC, warm)
            sent += 1
            await asyncio.sleep(WARMUP_EVERY_S)
        if conn.poll():
            conn.recv()  # "enough"
        return {"sent": sent}
    run, size, n = args["run"], args["size"], args["n"]
    t0 = time.perf_counter()
    if cmd == "throughput":
        payload = _payload(run, size)
        for _ in range(n):
            await publish(TOPIC, payload)
        sent = n
    else:  # "latency": deadline schedule, RATE msgs/s
        pad = b"x" * (size - HEADER.size)
        pack, now_ns = HEADER.pack, time.perf_counter_ns
        interval = 1_000_000_000 // args["rate"]
        start = now_ns() + 1_000_000
        for seq in range(n):
            delay = start + seq * interval - now_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            await publish(TOPIC, pack(run, seq, now_ns()) + pad)
        sent = n
    send_s = time.perf_counter() - t0
    for _ in range(3):
        await asyncio.sleep(0)  # let the batch flush go out
    after = _usage()
    end = _zmesh_counters(node)
    return {
        "sent": sent,
        "send_s": send_s,
        "cpu_s": after["cpu_s"] - before["cpu_s"],
        "maxrss_kib": after["maxrss_kib"],
        "counters": {k: end[k] - counters.get(k, 0) for k in end},
    }


async def _zmesh_sub(
    node: Any, subscription: Any, cmd: str, args: dict[str, Any]
) -> dict[str, Any]:
    before, counters, dropped0 = _usage(), _zmesh_counters(node), subscription.dropped
    run = WARMUP_RUN if cmd == "warmup" else args["run"]
    n = 1 if cmd == "warmup" else args["n"]
    tag = struct.pack("<I", run)
    want_latency = cmd == "latency"
    latencies: list[int] = []
    count, first, last = 0, 0.0, 0.0
    unpack_ts = struct.Struct("<Q").unpack_from

    async def consume() -> None:
        nonlocal count, first, last
        clock, clock_ns, record = time.perf_counter, time.perf_counter_ns, latencies.append
        async for msg in subscription:
            payload = msg.payload
            if payload[:4] != tag:
                continue
            if want_latency:
                record(clock_ns() - unpack_ts(payload, 8)[0])
            now = clock()
            if not count:
                first = now
            last = now
            count += 1
            if count >= n:
                return
            if yield_every and not count % yield_every:
                await asyncio.sleep(0)  # a consumer that awaits something now and then

    yield_every = args.get("yield_every", 0)
    task = asyncio.create_task(consume())
    started = time.perf_counter()
    first_timeout = args.get("timeout", FIRST_S)
    buffer = getattr(subscription, "_buffer", ())  # diagnostic: how far the consumer lags
    max_buffered = 0
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.1)
            max_buffered = max(max_buffered, len(buffer))
            now = time.perf_counter()
            if (count == 0 and now - started > first_timeout) or (count and now - last > IDLE_S):
                break
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    after = _usage()
    end = _zmesh_counters(node)
    return {
        "received": count,
        "recv_s": last - first,
        "cpu_s": after["cpu_s"] - before["cpu_s"],
        "maxrss_kib": after["maxrss_kib"],
        "latencies_ns": latencies,
        "counters": {k: end[k] - counters.get(k, 0) for k in end},
        "subscription_dropped": subscription.dropped - dropped0,
        "subscription_max_buffered": max_buffered,  # sampled every 0.1 s
    }


# ---------------------------------------------------------------------------- raw pyzmq


def _raw_child(system: str, role: str, conn: Connection, certs: Path, hwm: int) -> None:
    import msgpack
    import zmq
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    ctx = zmq.Context()
    auth = None
    try:
        _cmd, args = conn.recv()  # "start"
        public, secret = zmq.auth.load_certificate(str(certs / f"{role}.key_secret"))
        if role == "pub":
            auth = ThreadAuthenticator(ctx)
            auth.start()
            auth.configure_curve(domain="*", location=str(certs))  # every *.key there
            sock = ctx.socket(zmq.PUB)
            sock.curve_server = True
            sock.sndhwm = hwm
        else:
            server_public, _ = zmq.auth.load_certificate(str(certs / "pub.key"))
            sock = ctx.socket(zmq.SUB)
            sock.curve_serverkey = server_public
            sock.rcvhwm = hwm
            # The multipart topic frame allows prefix filtering; a msgpack envelope starts
            # with the array header, so it subscribes to everything.
            sock.setsockopt(zmq.SUBSCRIBE, b"" if system == "raw-msgpack" else b"bench/")
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.linger = 0
        if role == "pub":
            port = sock.bind_to_random_port("tcp://127.0.0.1")
        else:
            port = args["pub_port"]
            sock.connect(f"tcp://127.0.0.1:{port}")
        conn.send({"port": port, "pid": os.getpid()})
        kind = system[4:]  # multipart, frames, msgpack
        while True:
            cmd, args = conn.recv()
            if cmd == "stop":
                conn.send({"usage": _usage()})
                return
            if cmd == "enough":
                continue  # a warm-up stop that came after the warm-up had timed out
            if cmd == "wait_peers":
                conn.send({"ok": True})  # nothing to wait for: the warm-up covers the join
            elif role == "pub":
                conn.send(_raw_pub(sock, conn, kind, msgpack, cmd, args))
            else:
                conn.send({"armed": True})
                conn.send(_raw_sub(sock, zmq, kind, msgpack, cmd, args))
    finally:
        if auth is not None:
            auth.stop()
        ctx.destroy(linger=0)


def _raw_pub(
    sock: Any, conn: Connection, kind: str, msgpack: Any, cmd: str, args: dict[str, Any]
) -> dict[str, Any]:
    pack = msgpack.Packer(use_bin_type=True).pack
    topic_b, topic_s, header = TOPIC.encode(), TOPIC, RAW_HEADER
    send, send_multipart = sock.send, sock.send_multipart
    more = 2  # zmq.SNDMORE as a plain int

    if kind == "multipart":

        def publish(payload: bytes) -> None:
            send_multipart([topic_b, pack(header), payload])
    elif kind == "frames":

        def publish(payload: bytes) -> None:
            send(topic_b, more)
            send(pack(header), more)
            send(payload)
    else:

        def publish(payload: bytes) -> None:
            send(pack([topic_s, header, payload]))

    before = _usage()
    sent = 0
    if cmd == "warmup":
        warm = _payload(WARMUP_RUN, 64)
        deadline = time.monotonic() + args["timeout"]
        while time.monotonic() < deadline:
            publish(warm)
            sent += 1
            if conn.poll(WARMUP_EVERY_S):
                conn.recv()  # "enough"
                break
        return {"sent": sent}
    run, size, n = args["run"], args["size"], args["n"]
    t0 = time.perf_counter()
    if cmd == "throughput":
        payload = _payload(run, size)
        # The loop inlined (not via publish()) so raw pays no extra call per message.
        if kind == "multipart":
            for _ in range(n):
                send_multipart([topic_b, pack(header), payload])
        elif kind == "frames":
            for _ in range(n):
                send(topic_b, more)
                send(pack(header), more)
                send(payload)
        else:
            for _ in range(n):
                send(pack([topic_s, header, payload]))
        sent = n
    else:
        pad = b"x" * (size - HEADER.size)
        hpack, now_ns, sleep = HEADER.pack, time.perf_counter_ns, time.sleep
        interval = 1_000_000_000 // args["rate"]
        start = now_ns() + 1_000_000
        for seq in range(n):
            delay = start + seq * interval - now_ns()
            if delay > 0:
                sleep(delay / 1e9)
            publish(hpack(run, seq, now_ns()) + pad)
        sent = n
    send_s = time.perf_counter() - t0
    after = _usage()
    return {
        "sent": sent,
        "send_s": send_s,
        "cpu_s": after["cpu_s"] - before["cpu_s"],
        "maxrss_kib": after["maxrss_kib"],
    }


def _raw_sub(
    sock: Any, zmq: Any, kind: str, msgpack: Any, cmd: str, args: dict[str, Any]
) -> dict[str, Any]:
    unpackb = msgpack.unpackb
    before = _usage()
    run = WARMUP_RUN if cmd == "warmup" else args["run"]
    n = 1 if cmd == "warmup" else args["n"]
    tag = struct.pack("<I", run)
    want_latency = cmd == "latency"
    latencies: list[int] = []
    record = latencies.append
    unpack_ts = struct.Struct("<Q").unpack_from
    clock, clock_ns = time.perf_counter, time.perf_counter_ns
    recv, recv_multipart = sock.recv, sock.recv_multipart
    count, first, last = 0, 0.0, 0.0
    sock.rcvtimeo = int(args.get("timeout", FIRST_S) * 1000)
    try:
        while count < n:
            try:
                if kind == "multipart":
                    _topic, header, payload = recv_multipart()
                    unpackb(header)
                elif kind == "frames":
                    _topic = recv()
                    unpackb(recv())
                    payload = recv()
                else:
                    _topic, header, payload = unpackb(recv())
            except zmq.Again:
                break
            if payload[:4] != tag:
                continue
            if want_latency:
                record(clock_ns() - unpack_ts(payload, 8)[0])
            now = clock()
            if not count:
                first = now
                sock.rcvtimeo = int(IDLE_S * 1000)
            last = now
            count += 1
    finally:
        sock.rcvtimeo = -1
    after = _usage()
    return {
        "received": count,
        "recv_s": last - first,
        "cpu_s": after["cpu_s"] - before["cpu_s"],
        "maxrss_kib": after["maxrss_kib"],
        "latencies_ns": latencies,
    }


# ============================================================================ parent


class ChildError(RuntimeError):
    pass


class Child:
    """One spawned child and its end of the command pipe."""

    def __init__(
        self,
        ctx: Any,
        system: str,
        role: str,
        certs: Path,
        log_path: Path,
        hwm: int,
        zmesh_src: str | None,
    ) -> None:
        self.label = f"{system}/{role}"
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=child_main,
            args=(system, role, child_conn, str(certs), str(log_path), hwm, zmesh_src),
            name=f"bench-{system}-{role}",
            daemon=True,
        )
        self.proc.start()
        child_conn.close()

    def send(self, cmd: str, **args: Any) -> None:
        try:
            self.conn.send((cmd, args))
        except OSError as exc:  # BrokenPipeError: the child is gone
            raise ChildError(
                f"{self.label}: cannot send {cmd!r} ({exc}); exit code {self.proc.exitcode}"
            ) from None

    def recv(self, timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.05):
            if not self.proc.is_alive():
                raise ChildError(f"{self.label} exited (code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise ChildError(f"{self.label}: no reply within {timeout:.0f} s")
        reply = self.conn.recv()
        if "error" in reply:
            raise ChildError(f"{self.label} failed:\n{reply['error']}")
        return reply

    def stop(self) -> dict[str, Any] | None:
        usage = None
        try:
            if self.proc.is_alive():
                self.send("stop")
                usage = self.recv(timeout=10).get("usage")
        except (ChildError, OSError, EOFError):
            pass
        finally:
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(timeout=3)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=3)
            self.conn.close()
        return usage


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _progress(text: str) -> None:
    print(text, flush=True)


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies of the whole machine, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


class Pair:
    """The publisher and subscriber processes of one system."""

    def __init__(self, system: str, log_path: Path) -> None:
        self.system = system
        self.log_path = log_path
        self.pub: Child | None = None
        self.sub: Child | None = None
        self.result: dict[str, Any] = {"throughput": {}, "latency": {}, "log": str(log_path)}
        self.runs: dict[int, list[dict[str, Any]]] = {}

    @property
    def failed(self) -> bool:
        return "error" in self.result

    def fail(self, exc: BaseException) -> None:
        self.result["error"] = str(exc)
        _progress(f"[{self.system}] FAILED: {exc}")
        self.stop()

    def stop(self) -> None:
        usage = {}
        for role, child in (("sub", self.sub), ("pub", self.pub)):
            if child is not None:
                u = child.stop()
                if u:
                    usage[role] = u
        self.pub = self.sub = None
        if usage:
            self.result["peak_rss_mib"] = {
                r: round(u["maxrss_kib"] / 1024, 1) for r, u in usage.items()
            }
        self.result["log_warnings"] = _log_warnings(self.log_path)


class Bench:
    def __init__(
        self,
        quick: bool,
        systems: list[str],
        sizes: list[int],
        reps: int | None,
        hwm: int,
        n_scale: float = 1.0,
        lat_seconds: float | None = None,
        phases: tuple[str, ...] = ("throughput", "latency"),
    ) -> None:
        self.quick = quick
        self.systems = systems
        self.sizes = sizes
        self.reps = reps or (1 if quick else REPS_FULL)
        self.n = {size: int(N_FULL[size] * n_scale) // (10 if quick else 1) for size in sizes}
        self.lat_seconds = lat_seconds or (1.0 if quick else LAT_SECONDS_FULL)
        self.phases = phases
        self.consumer_yield = 0  # zmesh consumer: await asyncio.sleep(0) every this many messages
        self.hwm = hwm
        self.run_id = WARMUP_RUN
        self.workdir = Path(tempfile.mkdtemp(prefix="zmesh-bench-"))
        self.certs = self.workdir / "certs"
        self.ctx = mp.get_context("spawn")
        self.zmesh_src: str | None = None  # a directory holding an exported zmesh/, or the repo's
        self.zmesh_source = "working tree"
        self.quiet_budget = QUIET_BUDGET_S / (4 if quick else 1)

    def use_zmesh_rev(self, rev: str) -> None:
        """Benchmark zmesh as committed at ``rev`` (exported with git archive), not the working
        tree, which others may be editing."""
        commit = _git("rev-parse", "--short", rev)
        if not commit:
            raise SystemExit(f"--zmesh-rev {rev}: not a revision of {REPO}")
        src = self.workdir / "src"
        src.mkdir()
        archive = subprocess.run(
            ["git", "archive", commit, "zmesh"],
            cwd=REPO,
            capture_output=True,
            timeout=30,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True, timeout=30)
        self.zmesh_src = str(src)
        self.zmesh_source = f"git {rev} ({commit})"
        sys.path.insert(0, self.zmesh_src)

    def make_certs(self) -> None:
        create_certificate = _zmesh_module("zmesh.security.certs", "zmesh.certs").create_certificate

        for name in ("pub", "sub"):
            create_certificate(self.certs, name)

    def next_run(self) -> int:
        self.run_id += 1
        return self.run_id

    def run(self) -> dict[str, dict[str, Any]]:
        """Start every pair, then measure in rounds that interleave the systems (so a burst
        of background load hits all of them alike), then stop every pair."""
        pairs = [Pair(system, self.workdir / f"{system}.log") for system in self.systems]
        try:
            for pair in pairs:
                try:
                    self.start(pair)
                except ChildError as exc:
                    pair.fail(exc)
            for rep in range(self.reps if "throughput" in self.phases else 0):
                order = pairs[rep % len(pairs) :] + pairs[: rep % len(pairs)]
                for size in self.sizes:
                    for pair in order:
                        if pair.failed:
                            continue
                        try:
                            self.throughput(pair, size, rep)
                        except ChildError as exc:
                            pair.fail(exc)
            for pair in pairs:
                for size, runs in pair.runs.items():
                    ordered = sorted(runs, key=lambda r: r["msgs_per_s"])
                    pair.result["throughput"][str(size)] = {
                        "runs": runs,
                        "median": ordered[len(ordered) // 2],
                    }
            for size in self.sizes if "latency" in self.phases else ():
                for pair in pairs:
                    if pair.failed:
                        continue
                    try:
                        self.latency(pair, size)
                    except ChildError as exc:
                        pair.fail(exc)
        finally:
            for pair in pairs:
                pair.stop()
        return {pair.system: pair.result for pair in pairs}

    def start(self, pair: Pair) -> None:
        system = pair.system
        pub = pair.pub = Child(
            self.ctx, system, "pub", self.certs, pair.log_path, self.hwm, self.zmesh_src
        )
        pub.send("start")
        pub_info = pub.recv(timeout=30)
        sub = pair.sub = Child(
            self.ctx, system, "sub", self.certs, pair.log_path, self.hwm, self.zmesh_src
        )
        if system == "zmesh":
            sub.send("start", seed_port=pub_info["control_port"])
        else:
            sub.send("start", pub_port=pub_info["port"])
        sub_info = sub.recv(timeout=30)
        pair.result["pids"] = {"pub": pub_info["pid"], "sub": sub_info["pid"]}
        t0 = time.perf_counter()
        for child in (pub, sub):
            child.send("wait_peers", timeout=15)
        for child in (pub, sub):
            child.recv(timeout=20)
        mesh_s = time.perf_counter() - t0
        # Warm-up: the publisher repeats a message until the subscriber has one, so the
        # subscription has reached the publisher before anything is measured.
        sub.send("warmup", timeout=20)
        sub.recv()  # armed
        pub.send("warmup", timeout=25)
        got = sub.recv(timeout=30)
        pub.send("enough")
        warm = pub.recv(timeout=30)
        route_s = time.perf_counter() - t0
        if not got["received"]:
            raise ChildError(f"{system}: no warm-up message arrived in 20 s")
        pair.result["join"] = {
            "mesh_s": round(mesh_s, 3),
            "route_s": round(route_s, 3),
            "warmup_sent": warm["sent"],
        }
        _progress(
            f"[{system}] started: publisher pid {pub_info['pid']}, subscriber pid {sub_info['pid']}; "
            f"peers up after {mesh_s * 1000:.0f} ms, route after {route_s * 1000:.0f} ms "
            f"({warm['sent']} warm-up messages)"
        )

    def wait_quiet(self) -> float:
        """Wait (boundedly) until the machine is nearly idle; return the seconds waited.

        The machine is shared (2 cores): another job's burst during a run halves its figure.
        Before each measurement we sample the machine's busy time over QUIET_SAMPLE_S and go on
        once it is under QUIET_CORES, waiting at most QUIET_MAX_S per measurement and
        self.quiet_budget in all; the background actually seen is recorded with every run."""
        waited = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        while True:
            busy0, _ = _cpu_jiffies()
            time.sleep(QUIET_SAMPLE_S)
            busy1, _ = _cpu_jiffies()
            cores = (busy1 - busy0) / tick / QUIET_SAMPLE_S
            if cores <= QUIET_CORES or waited >= QUIET_MAX_S or self.quiet_budget <= 0:
                return waited
            waited += QUIET_SAMPLE_S
            self.quiet_budget -= QUIET_SAMPLE_S

    def _run(
        self, pair: Pair, cmd: str, size: int, n: int, **extra: Any
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
        assert pair.pub is not None and pair.sub is not None
        waited = self.wait_quiet()
        run = self.next_run()
        busy0, steal0 = _cpu_jiffies()
        t0 = time.perf_counter()
        pair.sub.send(cmd, run=run, n=n, timeout=FIRST_S, yield_every=self.consumer_yield)
        pair.sub.recv()  # armed
        pair.pub.send(cmd, run=run, size=size, n=n, **extra)
        p = pair.pub.recv(timeout=REPLY_TIMEOUT_S + n / 10_000)
        s = pair.sub.recv(timeout=FIRST_S + IDLE_S + 30)
        wall = time.perf_counter() - t0
        busy1, steal1 = _cpu_jiffies()
        tick = os.sysconf("SC_CLK_TCK")
        # CPU the machine spent on anything but this pair (other systems' idle processes,
        # other users), in cores: a run with much of it is a noisy one.
        background = max(0.0, (busy1 - busy0) / tick - p["cpu_s"] - s["cpu_s"]) / wall
        machine = {
            "background_cores": round(background, 2),
            "steal_cores": round((steal1 - steal0) / tick / wall, 2),
            "waited_for_quiet_s": round(waited, 1),
        }
        return p, s, machine

    def throughput(self, pair: Pair, size: int, rep: int) -> None:
        n = self.n[size]
        p, s, machine = self._run(pair, "throughput", size, n)
        received = s["received"]
        rate = (received - 1) / s["recv_s"] if received > 1 and s["recv_s"] > 0 else 0.0
        row = {
            "payload": size,
            "n": n,
            "sent": p["sent"],
            "received": received,
            "loss_pct": round(100 * (p["sent"] - received) / p["sent"], 3),
            "msgs_per_s": round(rate),
            "mb_per_s": round(rate * size / 1e6, 2),
            "recv_s": round(s["recv_s"], 4),
            "pub_send_s": round(p["send_s"], 4),
            "pub_send_msgs_per_s": round(p["sent"] / p["send_s"]) if p["send_s"] else 0,
            "pub_cpu_us_per_msg": round(1e6 * p["cpu_s"] / max(1, p["sent"]), 3),
            "sub_cpu_us_per_msg": round(1e6 * s["cpu_s"] / max(1, received), 3),
            "pub_cpu_s": round(p["cpu_s"], 3),
            "sub_cpu_s": round(s["cpu_s"], 3),
            **machine,
        }
        for key in ("subscription_dropped", "subscription_max_buffered"):
            if key in s:
                row[key] = s[key]
        if "counters" in s:
            row["sub_counters"] = s["counters"]
        if "counters" in p:
            row["pub_counters"] = p["counters"]
        pair.runs.setdefault(size, []).append(row)
        _progress(
            f"[{pair.system}] throughput {size:>4} B run {rep + 1}/{self.reps}: "
            f"{row['msgs_per_s']:>9,.0f} msgs/s {row['mb_per_s']:6.1f} MB/s  "
            f"loss {row['loss_pct']:5.2f}%  cpu/msg pub {row['pub_cpu_us_per_msg']:.2f} "
            f"sub {row['sub_cpu_us_per_msg']:.2f} us  (sent at {row['pub_send_msgs_per_s']:,.0f}/s; "
            f"background {machine['background_cores']:.2f} cores)"
            + (
                f"  dropped by subscription: {row['subscription_dropped']}"
                if row.get("subscription_dropped")
                else ""
            )
            + (
                f"  subscription backlog up to {row['subscription_max_buffered']:,}"
                if row.get("subscription_max_buffered")
                else ""
            )
        )

    def latency(self, pair: Pair, size: int) -> None:
        n = int(RATE * self.lat_seconds)
        p, s, machine = self._run(pair, "latency", size, n, rate=RATE)
        values = sorted(v / 1000 for v in s["latencies_ns"])
        row = {
            "payload": size,
            "rate": RATE,
            "seconds": self.lat_seconds,
            "sent": p["sent"],
            "received": s["received"],
            "p50_us": round(_percentile(values, 50), 1),
            "p90_us": round(_percentile(values, 90), 1),
            "p99_us": round(_percentile(values, 99), 1),
            "max_us": round(values[-1], 1) if values else float("nan"),
            "mean_us": round(statistics.fmean(values), 1) if values else float("nan"),
            "pub_cpu_us_per_msg": round(1e6 * p["cpu_s"] / max(1, p["sent"]), 2),
            "sub_cpu_us_per_msg": round(1e6 * s["cpu_s"] / max(1, s["received"]), 2),
            **machine,
        }
        if "subscription_dropped" in s:
            row["subscription_dropped"] = s["subscription_dropped"]
        pair.result["latency"][str(size)] = row
        _progress(
            f"[{pair.system}] latency    {size:>4} B @ {RATE}/s: p50 {row['p50_us']:.0f} us  "
            f"p90 {row['p90_us']:.0f}  p99 {row['p99_us']:.0f}  max {row['max_us']:.0f}  "
            f"({row['received']}/{row['sent']} received; background {machine['background_cores']:.2f} cores)"
        )


def _log_warnings(log_path: Path, limit: int = 50) -> list[str]:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    bad = [
        line
        for line in lines
        if any(f" {lvl} " in line for lvl in ("WARNING", "ERROR", "CRITICAL"))
        and "said goodbye" not in line  # the other node of the pair stopping at the end
    ]
    return bad[:limit] + ([f"... {len(bad) - limit} more"] if len(bad) > limit else [])


# ---------------------------------------------------------------------------- conditions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def conditions(bench: Bench) -> dict[str, Any]:
    import msgpack
    import zmq

    transport = _zmesh_module("zmesh.mesh.transport", "zmesh.transport")

    dirty = _git("status", "--porcelain", "--", "zmesh") if bench.zmesh_src is None else ""
    return {
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
        "zmesh_commit": _git("rev-parse", "--short", "HEAD"),
        "zmesh_source": bench.zmesh_source,
        "zmesh_dirty_files": dirty.splitlines(),
        "curve": True,
        "transport": "tcp://127.0.0.1 (one machine, two processes per system, spawn)",
        "payload_sizes": bench.sizes,
        "n": {str(k): v for k, v in bench.n.items()},
        "reps": bench.reps,
        "quick": bench.quick,
        "latency_rate": RATE,
        "latency_seconds": bench.lat_seconds,
        "idle_timeout_s": IDLE_S,
        "raw_hwm": bench.hwm,
        "zmesh_consumer_yield_every": bench.consumer_yield,
        "quiet_gate": {
            "below_cores": QUIET_CORES,
            "max_wait_s": QUIET_MAX_S,
            "budget_s": bench.quiet_budget,
        },
        "noisy_above_cores": NOISY_CORES,
        "zmesh_event_hwm_frames": transport.EVENT_HWM,
        "raw_header": RAW_HEADER,
        "topic": TOPIC,
        "filter": FILTER,
    }


# ---------------------------------------------------------------------------- report

LABELS = {
    "zmesh": "zmesh node→node",
    "raw-multipart": "raw pyzmq CURVE multipart",
    "raw-frames": "raw pyzmq CURVE 3 frames, hand-rolled",
    "raw-msgpack": "raw pyzmq CURVE 1-frame msgpack",
}


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _bg(row: dict[str, Any]) -> str:
    value = row.get("background_cores")
    if value is None:
        return "–"
    return f"**{value:.2f}**" if value > NOISY_CORES else f"{value:.2f}"


def derive(report: dict[str, Any]) -> None:
    """Ratios and budget verdicts, added to the report."""
    systems = report["systems"]
    ratios: dict[str, Any] = {}
    budgets: dict[str, Any] = {}

    def tput(system: str, size: int) -> float | None:
        row = systems.get(system, {}).get("throughput", {}).get(str(size))
        return row["median"]["msgs_per_s"] if row else None

    for size in report["conditions"]["payload_sizes"]:
        z = tput("zmesh", size)
        for other in ("raw-multipart", "raw-frames", "raw-msgpack"):
            o = tput(other, size)
            if z is not None and o:
                ratios[f"zmesh/{other}@{size}"] = round(z / o, 3)
        o = tput("raw-multipart", size)
        if z is not None and o:
            budgets[f"throughput>=1.0x raw multipart @{size}B"] = z >= o
        o = tput("raw-frames", size)
        if z is not None and o:
            budgets[f"(stricter) throughput>=1.0x hand-rolled 3 frames @{size}B"] = z >= o
        lat = systems.get("zmesh", {}).get("latency", {}).get(str(size))
        if lat:
            budgets[f"p99<1ms @{RATE}/s {size}B"] = lat["p99_us"] < 1000
    report["ratios"] = ratios
    report["budgets"] = budgets


def table(report: dict[str, Any]) -> str:
    lines = [
        "| system | payload | msgs/s (median) | MB/s | loss % | pub CPU µs/msg | sub CPU µs/msg "
        "| p50 µs | p90 µs | p99 µs | max µs | peak RSS pub/sub MiB | background cores tput/lat |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for system, data in report["systems"].items():
        if data.get("error") and not data.get("throughput"):
            lines.append(
                f"| {LABELS[system]} | – | failed: {data['error'].splitlines()[0]} ||||||||||"
            )
            continue
        rss = data.get("peak_rss_mib", {})
        for size in report["conditions"]["payload_sizes"]:
            t = data.get("throughput", {}).get(str(size), {}).get("median", {})
            lat = data.get("latency", {}).get(str(size), {})
            lines.append(
                f"| {LABELS[system]} | {size} B | {_fmt(t.get('msgs_per_s'), ',')} | "
                f"{_fmt(t.get('mb_per_s'), '.1f')} | {_fmt(t.get('loss_pct'), '.2f')} | "
                f"{_fmt(t.get('pub_cpu_us_per_msg'), '.2f')} | {_fmt(t.get('sub_cpu_us_per_msg'), '.2f')} | "
                f"{_fmt(lat.get('p50_us'), '.0f')} | {_fmt(lat.get('p90_us'), '.0f')} | "
                f"{_fmt(lat.get('p99_us'), '.0f')} | {_fmt(lat.get('max_us'), '.0f')} | "
                f"{_fmt(rss.get('pub'), '.0f')} / {_fmt(rss.get('sub'), '.0f')} | "
                f"{_bg(t)} / {_bg(lat)} |"
            )
    return "\n".join(lines)


def markdown(report: dict[str, Any], json_name: str) -> str:
    c = report["conditions"]
    out = [
        f"**pubsub, {report['timestamp']}{' (quick)' if c['quick'] else ''}**",
        "",
        f"{c['cpu_model']}, {c['cores']} cores, Python {c['python']}, pyzmq {c['pyzmq']}, "
        f"libzmq {c['libzmq']}, msgpack {c['msgpack']}; CURVE on, loopback, one publisher and one "
        f"subscriber process per system. Throughput: N = "
        + ", ".join(f"{v:,} ({k} B)" for k, v in c["n"].items())
        + f", median of {c['reps']}; raw HWM {c['raw_hwm']:,}. Latency: {c['latency_rate']:,} msgs/s "
        f"for {c['latency_seconds']:g} s, one-way. zmesh: "
        + (
            c["zmesh_source"]
            if c["zmesh_source"] != "working tree"
            else f"working tree at {c['zmesh_commit']}"
            + (" + uncommitted changes in zmesh/" if c["zmesh_dirty_files"] else "")
        )
        + f". Full figures: `results/{json_name}`.",
        "",
        table(report),
        "",
        "| ratio (throughput, msgs/s) | value |",
        "|---|---:|",
    ]
    for key, value in report["ratios"].items():
        out.append(f"| {key.replace('@', ' @ ')} B | {value:.2f}x |")
    out += ["", "| budget | holds? |", "|---|---|"]
    for key, value in report["budgets"].items():
        out.append(f"| {key} | {'yes' if value else '**no**'} |")
    errors = [
        f"* {s}: {d['error'].splitlines()[0]}"
        for s, d in report["systems"].items()
        if d.get("error")
    ]
    if errors:
        out += ["", "Errors:", *errors]
    return "\n".join(out) + "\n"


README_BEGIN = "<!-- pubsub-latest:begin -->"
README_END = "<!-- pubsub-latest:end -->"


def update_readme(md: str) -> None:
    readme = HERE / "README.md"
    try:
        text = readme.read_text()
    except OSError:
        return
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        return
    readme.write_text(text[: start + len(README_BEGIN)] + "\n" + md + text[end:])


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pubsub", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="N / 10, one repetition, 1 s latency runs"
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)}",
    )
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="comma-separated payload sizes (64,1024)"
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="throughput repetitions (default 3, --quick 1)"
    )
    parser.add_argument(
        "--raw-hwm",
        type=int,
        default=RAW_HWM,
        help=f"raw pyzmq SNDHWM/RCVHWM (default {RAW_HWM:,})",
    )
    parser.add_argument("--no-save", action="store_true", help="print only; write no result files")
    parser.add_argument(
        "--n-scale",
        type=float,
        default=1.0,
        help="multiply N (e.g. 4 for a run long enough to profile)",
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=None, help="length of each latency run"
    )
    parser.add_argument(
        "--phases", default="throughput,latency", help="throughput,latency or one of them"
    )
    parser.add_argument(
        "--zmesh-rev",
        default=None,
        help="benchmark zmesh/ as committed at this git revision (e.g. HEAD), not the working tree",
    )
    parser.add_argument(
        "--zmesh-consumer-yield",
        type=int,
        default=0,
        metavar="K",
        help="the zmesh subscriber awaits asyncio.sleep(0) every K messages, as a consumer doing I/O would",
    )
    parser.add_argument(
        "--report",
        metavar="JSON",
        default=None,
        help="measure nothing: render results/JSON as pubsub-latest.md and the README table",
    )
    opts = parser.parse_args(argv)
    if opts.report:
        path = Path(opts.report)
        saved = json.loads(path.read_text())
        derive(saved)
        md = markdown(saved, path.name)
        print(md)
        if not opts.no_save:
            (RESULTS / "pubsub-latest.md").write_text(md)
            update_readme(md)
        return 0
    systems = [s for s in opts.systems.split(",") if s]
    sizes = [int(s) for s in opts.sizes.split(",") if s]
    for s in systems:
        if s not in SYSTEMS:
            parser.error(f"unknown system {s!r}")
    for s in sizes:
        if s not in N_FULL:
            parser.error(f"payload size {s} not in {sorted(N_FULL)}")

    phases = tuple(p for p in opts.phases.split(",") if p)
    bench = Bench(
        opts.quick,
        systems,
        sizes,
        opts.reps,
        opts.raw_hwm,
        opts.n_scale,
        opts.latency_seconds,
        phases,
    )
    custom = (
        opts.n_scale != 1.0
        or opts.latency_seconds is not None
        or phases != ("throughput", "latency")
        or opts.zmesh_consumer_yield
    )
    bench.consumer_yield = opts.zmesh_consumer_yield
    if opts.zmesh_rev:
        bench.use_zmesh_rev(opts.zmesh_rev)
    # Finish cleanly (children stopped, in the finally blocks) on SIGTERM as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    bench.make_certs()
    report: dict[str, Any] = {
        "scenario": "pubsub",
        "timestamp": stamp,
        "conditions": conditions(bench),
        "systems": {},
    }
    _progress(
        f"pubsub: {', '.join(systems)}; payloads {sizes}; N {bench.n}; reps {bench.reps}; "
        f"latency {RATE}/s for {bench.lat_seconds:g} s; workdir {bench.workdir}"
    )
    report["systems"] = bench.run()
    report["conditions"]["loadavg_at_end"] = list(os.getloadavg())
    report["duration_s"] = round(time.perf_counter() - started, 1)
    derive(report)

    print()
    print(table(report))
    print()
    for key, value in report["ratios"].items():
        print(f"  {key}: {value:.2f}x")
    for key, value in report["budgets"].items():
        print(f"  budget {key}: {'holds' if value else 'FAILS'}")
    for system, data in report["systems"].items():
        if data.get("log_warnings"):
            print(
                f"  {system}: {len(data['log_warnings'])} warning/error log lines (see JSON, log {data['log']})"
            )
    print(f"  total {report['duration_s']} s")

    if not opts.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = f"pubsub-{stamp}{'-quick' if opts.quick else ''}{'-custom' if custom else ''}.json"
        (RESULTS / name).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"  wrote {RESULTS / name}")
        if (
            not opts.quick
            and not custom
            and set(systems) == set(SYSTEMS)
            and sizes == list(SIZES)
            and not opts.reps
        ):
            md = markdown(report, name)
            (RESULTS / "pubsub-latest.md").write_text(md)
            update_readme(md)
            print(f"  wrote {RESULTS / 'pubsub-latest.md'} and the table in {HERE / 'README.md'}")
    failed = any(d.get("error") for d in report["systems"].values())
    if failed or any(d.get("log_warnings") for d in report["systems"].values()):
        print(f"  kept {bench.workdir} (child logs)")
    else:
        shutil.rmtree(bench.workdir, ignore_errors=True)  # temporary certificates and logs
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
