"""Work queues: jobs per second end to end (submit -> worker -> ack back at the submitter),
zmesh against raw pyzmq, with 1 and 3 worker processes.

```sh
python -m benchmarks.jobs            # N = 20,000 jobs per run, 3 runs per row (~30 s on 2 cores)
python -m benchmarks.jobs --quick    # N = 3,000, 1 run per row (~10 s)
```

Every role is its own process (multiprocessing spawn), all on tcp://127.0.0.1 with CURVE
encryption and ZAP authentication against a directory of trusted keys:

* **zmesh**: a submitter ``zmesh.Node`` (``mqtt=None``) that submits N jobs through the Python
  API (``batch = await node.submit_many(queue, payloads)``, then ``await batch.results()``),
  and worker ``Node``s seeded at it, each ``async for job in node.work(queue, prefetch=256):
  await job.ack(b"")``. The submitter dispatches by credit over CURVE PUSH/PULL (one frame per
  worker node per dispatch) and the acks come back over each worker's PUSH to the
  submitter's PULL (one frame per event-loop turn). **zmesh-p32** is the same with
  ``prefetch=32``: a credit window that small makes the round trip, not the CPU, the limit.
* **raw** (the reference): a pyzmq submitter with a bound CURVE PUSH (jobs) and a bound CURVE
  PULL (acks), ZAP by ``zmq.auth.ThreadAuthenticator`` over the same kind of key directory;
  workers connect a PULL and a PUSH. A job is ``msgpack([id, payload])``, an ack is the id;
  the submitter sends as fast as the high-water marks let it (no credit window, no
  redelivery, no bookkeeping beyond a dict of outstanding ids) and counts acks.

``ZMESH_BENCH_PROFILE=DIR`` writes a cProfile file per child into DIR.

A run is timed from the first submit to the last ack at the submitter; jobs/s = N / that
time, median of the runs. Before timing, each deployment waits until every worker is
connected (zmesh: known to the submitter's dispatcher; raw: has acked a warm-up job) and
runs a warm-up. Rows run interleaved (round 1 of every row, then round 2, ...), so a burst
of background load does not land on one row only. CPU per job is the CPU time of all the
deployment's processes (submitter + workers, all threads) over the run / N; background
cores is the machine's busy time minus those processes' over the run.

The budget: zmesh within 3x of raw (raw jobs/s / zmesh jobs/s <= 3) for each worker count;
the zmesh-p32 ratio is shown beside it.
Writes ``results/jobs-<UTC>[-quick].json``; a full run also writes ``results/jobs-latest.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks.pubsub import _cpu_jiffies, _cpu_model, _git, guarded_child, run_zmesh

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

QUEUE = "bench"
PAYLOAD = b"j" * 64
PREFETCH = {"zmesh": 256, "zmesh-p32": 32}  # each worker's credit window
N_FULL, REPS_FULL = 20_000, 3
N_QUICK, REPS_QUICK = 3_000, 1
WORKER_COUNTS = (1, 3)
SYSTEMS = ("zmesh", "zmesh-p32", "raw")
BUDGET = 3.0
REPLY_TIMEOUT_S = 120.0
TICK = os.sysconf("SC_CLK_TCK")


def progress(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------- children


def child_main(system: str, role: str, index: int, conn: Connection, certs: str, log_path: str,
               args: dict[str, Any]) -> None:
    logging.basicConfig(filename=log_path, level=logging.WARNING,
                        format=f"%(asctime)s {system}/{role}{index} %(levelname)s %(name)s: %(message)s")
    def body() -> None:
        if system.startswith("zmesh"):
            run_zmesh(_zmesh_child(role, index, conn, Path(certs), args))
        else:
            _raw_child(role, index, conn, Path(certs), args)

    guarded_child(conn, f"jobs-{system}-{role}{index}-{os.getpid()}", body)


async def _zmesh_child(role: str, index: int, conn: Connection, certs: Path, args: dict[str, Any]) -> None:
    from zmesh import Node

    loop = asyncio.get_running_loop()
    name = "sub" if role == "submitter" else f"w{index}"
    peers = [f"127.0.0.1:{args['seed_port']}"] if role == "worker" else []
    node = Node(name=name, cert=certs / f"{name}.key_secret", trusted=certs,
                listen=f"127.0.0.1:{args['port']}", peers=peers, mqtt=None)
    async with node:
        worker = None
        if role == "worker":
            async def work() -> None:
                async for job in node.work(QUEUE, prefetch=args["prefetch"]):
                    await job.ack(b"")

            worker = asyncio.create_task(work())
        conn.send({"ready": True, "pid": os.getpid()})
        while True:
            cmd, cmd_args = await loop.run_in_executor(None, conn.recv)
            if cmd == "stop":
                if worker is not None:
                    worker.cancel()
                conn.send({"cpu_s": time.process_time()})
                return
            if cmd == "cpu":
                conn.send({"cpu_s": time.process_time()})
            elif cmd == "wait_workers":
                deadline = time.monotonic() + 30
                while len({k for k, q in node.jobs.dispatcher.workers if q == QUEUE}) < cmd_args["workers"]:
                    if time.monotonic() > deadline:
                        raise TimeoutError("workers not known to the submitter within 30 s")
                    await asyncio.sleep(0.02)
                await _zmesh_run(node, 100 * cmd_args["workers"])  # warm-up
                conn.send({"ok": True})
            elif cmd == "run":
                conn.send({"seconds": await _zmesh_run(node, cmd_args["n"])})


async def _zmesh_run(node: Any, n: int) -> float:
    started = time.perf_counter()
    batch = await node.submit_many(QUEUE, [PAYLOAD] * n)
    await batch.results()
    return time.perf_counter() - started


def _raw_child(role: str, index: int, conn: Connection, certs: Path, args: dict[str, Any]) -> None:
    import msgpack
    import zmq
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    ctx = zmq.Context()
    auth = None
    try:
        name = "sub" if role == "submitter" else f"w{index}"
        public, secret = zmq.auth.load_certificate(str(certs / f"{name}.key_secret"))

        def socket(kind: int, server: bool) -> Any:
            sock = ctx.socket(kind)
            sock.curve_publickey, sock.curve_secretkey = public, secret
            if server:
                sock.curve_server = True
            else:
                sock.curve_serverkey = zmq.auth.load_certificate(str(certs / "sub.key"))[0]
            sock.linger = 0
            return sock

        if role == "submitter":
            auth = ThreadAuthenticator(ctx)
            auth.start()
            auth.configure_curve(domain="*", location=str(certs))  # every *.key there
            jobs, acks = socket(zmq.PUSH, True), socket(zmq.PULL, True)
            ports = {"jobs_port": jobs.bind_to_random_port("tcp://127.0.0.1"),
                     "acks_port": acks.bind_to_random_port("tcp://127.0.0.1")}
            conn.send({"ready": True, "pid": os.getpid(), **ports})
            while True:
                cmd, cmd_args = conn.recv()
                if cmd == "stop":
                    conn.send({"cpu_s": time.process_time()})
                    return
                if cmd == "cpu":
                    conn.send({"cpu_s": time.process_time()})
                elif cmd == "wait_workers":
                    _raw_warm_up(jobs, acks, cmd_args["workers"], zmq, msgpack)
                    _raw_run(jobs, acks, 100 * cmd_args["workers"], zmq, msgpack)
                    conn.send({"ok": True})
                elif cmd == "run":
                    conn.send({"seconds": _raw_run(jobs, acks, cmd_args["n"], zmq, msgpack)})
        else:
            pull, push = socket(zmq.PULL, False), socket(zmq.PUSH, False)
            pull.connect(f"tcp://127.0.0.1:{args['jobs_port']}")
            push.connect(f"tcp://127.0.0.1:{args['acks_port']}")
            conn.send({"ready": True, "pid": os.getpid()})
            poller = zmq.Poller()
            poller.register(pull, zmq.POLLIN)
            poller.register(conn.fileno(), zmq.POLLIN)
            me = b"@%d" % index
            unpack = msgpack.unpackb
            while True:
                events = dict(poller.poll())
                if pull in events:
                    while True:
                        try:
                            frame = pull.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        job_id, _payload = unpack(frame)
                        push.send(job_id + me if job_id[:1] == b"w" else job_id)  # warm-ups say who
                if conn.fileno() in events:
                    cmd, _ = conn.recv()
                    conn.send({"cpu_s": time.process_time()})
                    if cmd == "stop":
                        return
    finally:
        if auth is not None:
            auth.stop()
        ctx.destroy(linger=0)


def _raw_warm_up(jobs: Any, acks: Any, workers: int, zmq: Any, msgpack: Any) -> None:
    """Until every worker has acked a job: PUSH only round-robins over connected peers."""
    seen: set[bytes] = set()
    deadline = time.monotonic() + 30
    i = 0
    while len(seen) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)} of {workers} raw workers answered within 30 s")
        jobs.send(msgpack.packb([b"w%d" % i, PAYLOAD]))
        i += 1
        if acks.poll(20):
            while True:
                try:
                    seen.add(acks.recv(zmq.NOBLOCK).rpartition(b"@")[2])
                except zmq.Again:
                    break
    while acks.poll(200):  # the rest of the warm-up acks
        acks.recv()


def _raw_run(jobs: Any, acks: Any, n: int, zmq: Any, msgpack: Any) -> float:
    pack = msgpack.packb
    outstanding: dict[bytes, int] = {}
    poller = zmq.Poller()
    poller.register(acks, zmq.POLLIN)
    poller.register(jobs, zmq.POLLOUT)
    sent = done = 0
    started = time.perf_counter()
    while done < n:
        while sent < n:
            job_id = b"%d" % sent
            try:
                jobs.send(pack([job_id, PAYLOAD]), zmq.NOBLOCK)
            except zmq.Again:
                break
            outstanding[job_id] = sent
            sent += 1
        while True:
            try:
                ack = acks.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if outstanding.pop(ack, None) is not None:
                done += 1
        if done < n:
            if sent == n:
                poller.modify(jobs, 0)
            poller.poll(1000)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------- parent


class ChildError(RuntimeError):
    pass


class Child:
    def __init__(self, ctx: Any, system: str, role: str, index: int, certs: Path, log: Path,
                 args: dict[str, Any]) -> None:
        self.label = f"{system}/{role}{index if role == 'worker' else ''}"
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=child_main, args=(system, role, index, child_conn, str(certs), str(log), args),
                                name=f"bench-jobs-{self.label}", daemon=True)
        self.proc.start()
        child_conn.close()

    def ask(self, cmd: str, timeout: float = REPLY_TIMEOUT_S, **args: Any) -> dict[str, Any]:
        try:
            self.conn.send((cmd, args))
        except OSError as exc:
            raise ChildError(f"{self.label}: cannot send {cmd!r} ({exc})") from None
        return self.reply(timeout)

    def reply(self, timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.05):
            if not self.proc.is_alive():
                raise ChildError(f"{self.label} exited (code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise ChildError(f"{self.label}: no reply within {timeout:.0f} s")
        answer = self.conn.recv()
        if "error" in answer:
            raise ChildError(f"{self.label} failed:\n{answer['error']}")
        return answer

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.ask("stop", timeout=10)
        except (ChildError, OSError, EOFError):
            pass
        finally:
            self.proc.join(timeout=5)
            for end in (self.proc.terminate, self.proc.kill):
                if self.proc.is_alive():
                    end()
                    self.proc.join(timeout=3)
            self.conn.close()


class Deployment:
    """One row: a submitter and ``workers`` worker processes of one system."""

    def __init__(self, ctx: Any, system: str, workers: int, work: Path) -> None:
        from zmesh.security.certs import create_certificate

        self.system, self.workers = system, workers
        self.key = f"{system}-{workers}w"
        certs = work / self.key / "certs"
        for name in ["sub", *(f"w{i}" for i in range(workers))]:
            create_certificate(certs, name)
        self.log = work / f"{self.key}.log"
        self.children: list[Child] = []
        port = _free_port()
        self.submitter = self._start(ctx, "submitter", 0, certs, {"port": port})
        ready = self.submitter.reply()
        args = ({"seed_port": port, "prefetch": PREFETCH[system]} if system in PREFETCH
                else {"jobs_port": ready.get("jobs_port"), "acks_port": ready.get("acks_port")})
        for i in range(workers):
            self._start(ctx, "worker", i, certs, {**args, "port": _free_port()})
        for child in self.children[1:]:
            child.reply()
        self.submitter.ask("wait_workers", workers=workers)

    def _start(self, ctx: Any, role: str, index: int, certs: Path, args: dict[str, Any]) -> Child:
        child = Child(ctx, self.system, role, index, certs, self.log, args)
        self.children.append(child)
        return child

    def cpu(self) -> float:
        return sum(child.ask("cpu")["cpu_s"] for child in self.children)

    def run(self, n: int) -> dict[str, Any]:
        cpu_before, (busy_before, _) = self.cpu(), _cpu_jiffies()
        seconds = self.submitter.ask("run", n=n)["seconds"]
        cpu = self.cpu() - cpu_before
        busy = (_cpu_jiffies()[0] - busy_before) / TICK
        return {"system": self.system, "workers": self.workers, "n": n, "seconds": round(seconds, 4),
                "jobs_per_s": round(n / seconds, 1), "cpu_s": round(cpu, 3),
                "cpu_us_per_job": round(cpu / n * 1e6, 1),
                "background_cores": round(max(0.0, busy - cpu) / seconds, 2)}

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def conditions(n: int, reps: int, quick: bool) -> dict[str, Any]:
    import msgpack
    import zmq

    return {
        "python": platform.python_version(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)), "platform": platform.platform(),
        "cpu_model": _cpu_model(), "cores": os.cpu_count(), "loadavg_at_start": list(os.getloadavg()),
        "zmesh_commit": _git("rev-parse", "--short", "HEAD"),
        "zmesh_dirty_files": _git("status", "--porcelain", "--", "zmesh").splitlines(),
        "transport": "tcp://127.0.0.1, CURVE + ZAP, one process per role (spawn)",
        "n": n, "reps": reps, "quick": quick, "payload_bytes": len(PAYLOAD), "prefetch": PREFETCH,
        "worker_counts": list(WORKER_COUNTS), "budget_ratio": BUDGET,
    }


def summarize(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows = []
    worker_counts = sorted({r["workers"] for r in runs})
    for workers in worker_counts:
        for system in SYSTEMS:
            mine = [r for r in runs if r["system"] == system and r["workers"] == workers]
            if not mine:
                continue
            rates = sorted(r["jobs_per_s"] for r in mine)
            rows.append({
                "system": system, "workers": workers, "runs": len(mine),
                "jobs_per_s_median": round(statistics.median(rates), 1),
                "jobs_per_s_min": rates[0], "jobs_per_s_max": rates[-1],
                "cpu_us_per_job_median": round(statistics.median(r["cpu_us_per_job"] for r in mine), 1),
                "background_cores_max": max(r["background_cores"] for r in mine),
            })
    ratios = {}
    for workers in worker_counts:
        by = {r["system"]: r for r in rows if r["workers"] == workers}
        for system in PREFETCH:
            if system in by and "raw" in by:
                ratio = by["raw"]["jobs_per_s_median"] / by[system]["jobs_per_s_median"]
                ratios[f"{system} {workers}"] = {"system": system, "workers": workers, "raw_over_zmesh": round(ratio, 2),
                                                 "within_budget": ratio <= BUDGET}
    return rows, ratios


def markdown(report: dict[str, Any], json_name: str) -> str:
    c = report["conditions"]
    lines = [
        f"# Work queues: jobs per second end to end ({report['timestamp']})", "",
        f"Submit -> worker -> ack back at the submitter, {c['n']:,} jobs of {c['payload_bytes']} B per run, "
        f"median of {c['reps']} run(s) per row (`python -m benchmarks.jobs`; raw data: `{json_name}`).", "",
        "| system | worker processes | jobs/s (median) | range | CPU µs/job (all processes) | background cores (max) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    labels = {system: f"zmesh (`node.submit_many` / `node.work(prefetch={prefetch})`)"
              for system, prefetch in c["prefetch"].items()}
    labels["raw"] = "raw pyzmq CURVE PUSH/PULL + PUSH ack"
    for row in report["rows"]:
        lines.append(f"| {labels[row['system']]} | {row['workers']} | **{row['jobs_per_s_median']:,.0f}** | "
                     f"{row['jobs_per_s_min']:,.0f}-{row['jobs_per_s_max']:,.0f} | {row['cpu_us_per_job_median']:.0f} | "
                     f"{row['background_cores_max']:.2f} |")
    lines += ["", f"**Budget: zmesh within {BUDGET:g}x of raw** (prefetch {c['prefetch']['zmesh']}; "
                  f"prefetch {c['prefetch']['zmesh-p32']} shown beside it)."]
    for r in report["ratios"].values():
        verdict = "within the budget" if r["within_budget"] else "NOT within the budget"
        lines.append(f"* {r['workers']} worker(s), prefetch {c['prefetch'][r['system']]}: raw is "
                     f"{r['raw_over_zmesh']:.2f}x zmesh: {verdict}.")
    lines += [
        "",
        "What each side does per job: zmesh keeps every job in the submitter's dispatcher until it is",
        "acked (credit per worker, lease, redelivery, the dedup window at the worker, a handle per",
        "job), sends the jobs dispatched to one worker node as one msgpack frame over CURVE PUSH, and",
        "the worker's acks go back batched over its CURVE PUSH; raw sends `msgpack([id, payload])` as",
        "fast as the high-water marks allow and the worker PUSHes the id back: no credit window, no",
        "lease, no redelivery. With a credit window of 32 jobs the submitter waits a round trip",
        "(four thread wake-ups, two per process, on 2 cores) for every 32.",
        "",
        "## Conditions", "",
        f"* {c['cores']} cores ({c['cpu_model']}), {c['platform']}; Python {c['python']}, pyzmq {c['pyzmq']} "
        f"(libzmq {c['libzmq']}), msgpack {c['msgpack']}.",
        f"* load average at start {', '.join(f'{x:.2f}' for x in c['loadavg_at_start'])}; rows interleaved by round;"
        " **background cores** is the machine's CPU use beyond the measured processes during a run.",
        f"* zmesh commit {c['zmesh_commit']}" + (f" with uncommitted changes in {len(c['zmesh_dirty_files'])} zmesh file(s)"
                                                 if c["zmesh_dirty_files"] else "") + ".",
        "* one process per role; with 3 workers there are 4 busy processes on these cores, for both systems.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"N = {N_QUICK:,}, {REPS_QUICK} run per row")
    parser.add_argument("--n", type=int, help="jobs per run")
    parser.add_argument("--reps", type=int, help="runs per row")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: zmesh,raw")
    parser.add_argument("--workers", default=",".join(map(str, WORKER_COUNTS)), help="worker counts, e.g. 1,3")
    parser.add_argument("--no-save", action="store_true")
    options = parser.parse_args(argv)
    n = options.n or (N_QUICK if options.quick else N_FULL)
    reps = options.reps or (REPS_QUICK if options.quick else REPS_FULL)
    systems = [x for x in options.systems.split(",") if x]
    worker_counts = [int(x) for x in options.workers.split(",") if x]
    unknown = set(systems) - set(SYSTEMS)
    if unknown or not systems or not worker_counts or min(worker_counts) < 1:
        parser.error(f"--systems: choose from {', '.join(SYSTEMS)}; --workers: positive counts")
    custom = (options.n is not None or options.reps is not None or systems != list(SYSTEMS)
              or worker_counts != list(WORKER_COUNTS))

    ctx = mp.get_context("spawn")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    report: dict[str, Any] = {"timestamp": stamp, "conditions": conditions(n, reps, options.quick), "runs": []}
    report["conditions"].update(systems=systems, worker_counts=worker_counts)
    deployments: list[Deployment] = []
    with tempfile.TemporaryDirectory(prefix="zmesh-bench-jobs-") as tmp:
        try:
            for workers in worker_counts:
                for system in systems:
                    progress(f"starting {system} with {workers} worker process(es)")
                    deployments.append(Deployment(ctx, system, workers, Path(tmp)))
                    progress("  pids: " + ", ".join(f"{c.label} {c.proc.pid}" for c in deployments[-1].children))
            for rep in range(reps):
                for deployment in deployments:
                    run = deployment.run(n)
                    run["rep"] = rep + 1
                    report["runs"].append(run)
                    progress(f"  round {rep + 1}: {deployment.key}: {run['jobs_per_s']:,.0f} jobs/s, "
                             f"{run['cpu_us_per_job']:.0f} µs CPU/job, background {run['background_cores']:.2f} cores")
        except ChildError as exc:
            logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in Path(tmp).glob("*.log"))
            progress(f"FAILED: {exc}\n{logs}")
            return 1
        finally:
            for deployment in deployments:
                deployment.stop()
    report["rows"], report["ratios"] = summarize(report["runs"])
    suffix = "-quick" if options.quick and not custom else ("-custom" if custom else "")
    json_name = f"jobs-{stamp}{suffix}.json"
    md = markdown(report, json_name)
    print()
    print(md)
    if not options.no_save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / json_name).write_text(json.dumps(report, indent=2) + "\n")
        if not options.quick and not custom:
            (RESULTS / "jobs-latest.md").write_text(md)
        progress(f"wrote {RESULTS / json_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
