"""Work queues with real node processes: `zmesh node run` on loopback, MQTT workers (paho
clients and `zmesh jobs work` processes) on different nodes, submits over MQTT.

Every wait is on observable state: results on ``$jobs/result/ID``, dead letters on
``$jobs/dead/QUEUE``, the submitter's ``$SYS/zmesh/jobs`` figures, what workers received,
files a worker command writes. The only fixed wait is the absence check of the untrusted
node, after a positive control has passed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    MqttSubmitter,
    MqttWorker,
    NodeProcess,
    Publisher,
    Subscriber,
    WorkProcess,
    assert_quiet,
    await_route,
    collect,
    jobs_stats,
    make_certs,
    start_nodes,
    stop_all,
    wait_until,
    write_config,
    zmesh_cli,
)

QUEUE = "scan"


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return make_certs(tmp_path / "certs", ["s", "w1", "w2", "w3"])


@pytest.fixture
def running(tmp_path: Path) -> Iterator[dict[str, list]]:
    """What a test starts: nodes (stopped and checked for tracebacks afterwards), MQTT
    workers and clients, and `zmesh jobs work` processes (killed with what they run)."""
    started: dict[str, list] = {"nodes": [], "clients": [], "processes": []}
    yield started
    for process in started["processes"]:
        process.stop()
    for client in started["clients"]:
        client.close()
    stop_all(started["nodes"])


def mesh(tmp_path: Path, certs: Path, running: dict[str, list], workers: list[str],
         submitter_config: str = "", trusted: Path | None = None) -> tuple[NodeProcess, list[NodeProcess]]:
    """A submitter ``s`` (with ``submitter_config`` as its TOML), then worker nodes seeded at
    it, started together; returns when ``s`` sees every worker node up. Every node binds
    ephemeral ports and reports them in its ready file."""
    extra = ["--config", str(write_config(tmp_path / "s.toml", submitter_config))] if submitter_config else []
    (submitter,) = start_nodes(tmp_path, [dict(name="s", cert_dir=certs, trusted=trusted, control_port=0, extra=extra)])
    running["nodes"].append(submitter)
    worker_nodes = start_nodes(tmp_path, [dict(name=w, cert_dir=certs, trusted=trusted, control_port=0,
                                               seeds=[submitter.control_port]) for w in workers])
    running["nodes"].extend(worker_nodes)
    wait_until(lambda: submitter.peers_up() >= set(workers), 15, f"s to see {workers}")
    return submitter, worker_nodes


def results_by_id(messages: list) -> dict[str, bytes]:
    ids = Counter(m.topic.rsplit("/", 1)[1] for m in messages)
    duplicated = {i: n for i, n in ids.items() if n > 1}
    assert not duplicated, f"results published more than once: {list(duplicated.items())[:5]}"
    return {m.topic.rsplit("/", 1)[1]: m.payload for m in messages}


# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_ten_thousand_jobs_over_three_worker_nodes_are_each_done_once(
        tmp_path: Path, certs: Path, running: dict[str, list]) -> None:
    n_jobs, slots = 10_000, 3
    s, workers = mesh(tmp_path, certs, running, ["w1", "w2", "w3"], "[mqtt]\nmax_queued = 100000\n")
    delays = {"w1": 0.0, "w2": 0.0, "w3": 0.01}  # w3 scans slowly

    def scanner(node: str):
        def handle(job_id: str, payload: bytes) -> bytes:
            if delays[node]:
                time.sleep(delays[node])  # the scan itself
            return f"{node}:".encode() + payload
        return handle

    by_node: dict[str, list[MqttWorker]] = {}
    for node in workers:
        by_node[node.name] = [MqttWorker(node.mqtt_port, QUEUE, scanner(node.name), f"{node.name}-{i}")
                              for i in range(slots)]
        running["clients"].extend(by_node[node.name])
    results = Subscriber(s.mqtt_port, "$jobs/result/#", qos=1)
    submitter = MqttSubmitter(s.mqtt_port)
    running["clients"] += [results, submitter]

    jobs = {f"job-{i:05d}": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}".encode() for i in range(n_jobs)}
    started = time.monotonic()
    submitter.submit(QUEUE, jobs, timeout=60)
    got = results_by_id(collect(results, n_jobs, timeout=90))
    elapsed = time.monotonic() - started

    assert set(got) == set(jobs)  # none lost
    for job_id, result in got.items():  # each result is its own job's, from a worker node
        node, _, payload = result.partition(b":")
        assert payload == jobs[job_id] and node in (b"w1", b"w2", b"w3"), (job_id, result)
    stats = wait_until(lambda: (st := jobs_stats(s, QUEUE))["done_total"] == n_jobs and st, 10, "done_total")
    assert (stats["depth"], stats["in_flight"], stats["dead_total"]) == (0, 0, 0), stats
    received = {name: sum(len(w.received) for w in ws) for name, ws in by_node.items()}
    # Each job reached a worker at least once; more only as redeliveries the node counted
    # (a worker node answers a redelivery of a job it finished from memory, hence <=).
    delivered = Counter(job_id for ws in by_node.values() for w in ws for job_id in w.received)
    assert set(delivered) == set(jobs)
    assert n_jobs <= sum(received.values()) <= n_jobs + stats["redeliveries_total"], (received, stats)
    assert not [e for ws in by_node.values() for w in ws for e in w.errors]
    # Credit, not round robin: the slow node took fewer.
    assert received["w3"] < min(received["w1"], received["w2"]), received
    assert_no_extra(results)
    print(f"\n{n_jobs} jobs in {elapsed:.1f} s ({n_jobs / elapsed:.0f}/s): per node {received}, {stats}")


def assert_no_extra(subscriber: Subscriber) -> None:
    extra = subscriber.drain()
    assert not extra, f"unexpected extra results: {[m.topic for m in extra[:5]]}"


def test_jobs_held_by_a_killed_worker_node_complete_elsewhere(
        tmp_path: Path, certs: Path, running: dict[str, list]) -> None:
    lease = 2.0
    s, (w1, w2) = mesh(tmp_path, certs, running, ["w1", "w2"], f"[jobs]\nlease = {lease}\n")
    held = tmp_path / "held-at-w1"
    # w1's two scanners take a job each and hang on it (the node is killed mid-job).
    for _ in range(2):
        running["processes"].append(WorkProcess(
            w1.mqtt_port, QUEUE, ["sh", "-c", f'echo "$ZMESH_JOB_ID" >> {held}; exec sleep 60']))
    results = Subscriber(s.mqtt_port, "$jobs/result/#", qos=1)
    submitter = MqttSubmitter(s.mqtt_port)
    running["clients"] += [results, submitter]

    first = {f"early-{i}": f"target-{i}".encode() for i in range(2)}
    submitter.submit(QUEUE, first)
    wait_until(lambda: held.exists() and len(held.read_text().split()) == 2, 20, "w1's scanners to hold both jobs")
    assert set(held.read_text().split()) == set(first)
    assert (jobs_stats(s, QUEUE)["in_flight"], jobs_stats(s, QUEUE)["depth"]) == (2, 0)

    w1.kill()
    killed_at = time.monotonic()
    running["processes"].append(WorkProcess(w2.mqtt_port, QUEUE, ["sh", "-c", 'echo "w2 scanned $(cat)"']))
    later = {f"late-{i}": f"target-{i}".encode() for i in range(2, 10)}
    submitter.submit(QUEUE, later)
    got = results_by_id(collect(results, 10, timeout=30))
    assert set(got) == set(first) | set(later)
    for job_id, payload in {**first, **later}.items():
        assert got[job_id] == b"w2 scanned " + payload + b"\n"
    # The held jobs came back when their lease ran out, and were done by w2.
    stats = jobs_stats(s, QUEUE)
    assert stats["redeliveries_total"] >= 2 and stats["done_total"] == 10 and stats["dead_total"] == 0, stats
    assert time.monotonic() - killed_at < lease + 15


def test_jobs_accepted_before_a_submitter_restart_are_delivered_after_it(
        tmp_path: Path, certs: Path, running: dict[str, list]) -> None:
    n_jobs = 300
    data_dir = tmp_path / "s-data"
    spec = dict(name="s", cert_dir=certs, control_port=0, extra=["--data-dir", str(data_dir)])
    (s,) = start_nodes(tmp_path, [spec])
    running["nodes"].append(s)
    submitter = MqttSubmitter(s.mqtt_port)
    jobs = {f"spooled-{i:04d}": f"host-{i}".encode() for i in range(n_jobs)}
    submitter.submit(QUEUE, jobs)  # every one PUBACKed: accepted and on disk
    submitter.close()
    assert jobs_stats(s, QUEUE)["depth"] == n_jobs  # no worker anywhere yet

    s.kill()  # SIGKILL: no chance to flush anything more
    s = start_nodes(tmp_path, [spec])[0]
    running["nodes"].append(s)
    assert jobs_stats(s, QUEUE)["depth"] == n_jobs
    results = Subscriber(s.mqtt_port, "$jobs/result/#", qos=1)
    running["clients"].append(results)

    (w1,) = start_nodes(tmp_path, [dict(name="w1", cert_dir=certs, control_port=0, seeds=[s.control_port])])
    running["nodes"].append(w1)
    worker = MqttWorker(w1.mqtt_port, QUEUE, lambda job_id, payload: b"scanned " + payload)
    running["clients"].append(worker)
    got = results_by_id(collect(results, n_jobs, timeout=30))
    assert got == {job_id: b"scanned " + payload for job_id, payload in jobs.items()}
    assert set(worker.received) == set(jobs)
    stats = wait_until(lambda: (st := jobs_stats(s, QUEUE))["done_total"] == n_jobs and st, 10, "done_total")
    assert (stats["depth"], stats["in_flight"]) == (0, 0)


def test_worker_clients_coming_and_going_strand_no_job(
        tmp_path: Path, certs: Path, running: dict[str, list]) -> None:
    """A job sent to a worker node waits there for a free client; another client joining
    (or one leaving) must not drop it until its lease runs out (a bug fixed with this test:
    the node rebuilt its queue on every subscribe and lost what it held)."""
    s, (w1,) = mesh(tmp_path, certs, running, ["w1"], "[jobs]\nlease = 30.0\n")
    a = MqttWorker(w1.mqtt_port, QUEUE, lambda job_id, payload: None, "a")  # both hang
    b = MqttWorker(w1.mqtt_port, QUEUE, lambda job_id, payload: None, "b")
    submitter = MqttSubmitter(s.mqtt_port)
    running["clients"] += [b, submitter]
    submitter.submit(QUEUE, {f"job-{i}": b"x" for i in range(3)})
    wait_until(lambda: len(a.received) + len(b.received) == 2, 15, "a and b to hold a job each")
    a.close()  # its job is given back: pending at s, or sent to w1 again where b is busy
    wait_until(lambda: jobs_stats(s, QUEUE)["redeliveries_total"] == 1, 15, "a's job to be given back")
    c = MqttWorker(w1.mqtt_port, QUEUE, lambda job_id, payload: b"done", "c")
    running["clients"].append(c)
    wait_until(lambda: len(c.received) == 2, 10, "c to get a's job and the waiting one (not after the lease)")
    assert set(c.received) | set(b.received) == {"job-0", "job-1", "job-2"}
    wait_until(lambda: jobs_stats(s, QUEUE)["done_total"] == 2, 10, "c's two jobs done")


def test_a_job_delivered_again_while_still_worked_on_ties_up_no_second_client(
        tmp_path: Path, certs: Path, running: dict[str, list]) -> None:
    """MQTT workers cannot extend a lease, so a long job is delivered again when its lease
    runs out, often to the same node. The node must keep it with the client already on it
    (a bug fixed with this test: it gave it to a second client, and the first answer then
    freed the wrong client and the other's slot stayed taken for good)."""
    s, (w1,) = mesh(tmp_path, certs, running, ["w1"], "[jobs]\nlease = 1.0\nmax_attempts = 10\n")

    def slow(job_id: str, payload: bytes) -> bytes | None:
        if job_id == "long":
            time.sleep(2.5)  # the scan: longer than the lease
            return b"from a"
        return None  # then hangs on whatever comes next

    def hang(job_id: str, payload: bytes) -> bytes | None:
        return b"from b" if job_id == "long" else None

    a = MqttWorker(w1.mqtt_port, QUEUE, slow, "a")  # subscribed first: the first job is a's
    b = MqttWorker(w1.mqtt_port, QUEUE, hang, "b")
    results = Subscriber(s.mqtt_port, "$jobs/result/#", qos=1)
    submitter = MqttSubmitter(s.mqtt_port)
    running["clients"] += [a, b, results, submitter]
    submitter.submit(QUEUE, {"long": b"x"})
    assert collect(results, 1, timeout=15)[0].payload == b"from a"
    wait_until(lambda: a.answered == ["long"], 10, "a's answer to be acknowledged")
    assert a.received == ["long"] and b.received == [], (a.received, b.received)
    assert jobs_stats(s, QUEUE)["redeliveries_total"] >= 1  # it was delivered again meanwhile

    # Both clients are free again: two jobs, one each.
    submitter.submit(QUEUE, {"next-1": b"x", "next-2": b"x"})
    wait_until(lambda: len(a.received) == 2 and len(b.received) == 1, 10, "a and b to take one each")
    assert {a.received[1], b.received[0]} == {"next-1", "next-2"}


def test_a_job_longer_than_its_leases_still_completes_at_an_mqtt_worker(
        tmp_path: Path, certs: Path, running: dict[str, list]) -> None:
    s, (w1,) = mesh(tmp_path, certs, running, ["w1"], "[jobs]\nlease = 1.0\nmax_attempts = 3\n")

    def long_scan(job_id: str, payload: bytes) -> bytes:
        # A real scan takes minutes; this one 3.5 leases, extending by 2 s (from now) every
        # 0.7 s as it goes, acknowledged by the node each time.
        for _ in range(5):
            time.sleep(0.7)
            worker.client.publish(f"$jobs/extend/{job_id}", b"2", qos=1).wait_for_publish(5)
        return b"report"

    worker = MqttWorker(w1.mqtt_port, QUEUE, long_scan)
    outcome = Subscriber(s.mqtt_port, "$jobs/result/long", "$jobs/failed/long", qos=1)
    submitter = MqttSubmitter(s.mqtt_port)
    running["clients"] += [worker, outcome, submitter]
    submitter.submit(QUEUE, {"long": b"10.0.0.1"})
    message = outcome.get(timeout=15)
    assert (message.topic, message.payload) == ("$jobs/result/long", b"report"), message.payload
    assert worker.received == ["long"]  # never delivered again while it was being worked on
    stats = jobs_stats(s, QUEUE)
    assert (stats["redeliveries_total"], stats["dead_total"]) == (0, 0), stats


def test_zmesh_jobs_work_extends_the_lease_while_its_command_runs(
        tmp_path: Path, certs: Path, running: dict[str, list]) -> None:
    # Leases of 1 s, at most 2 of them: without extensions the job would be dead after 2 s.
    s, (w1,) = mesh(tmp_path, certs, running, ["w1"], "[jobs]\nlease = 1.0\nmax_attempts = 2\n")
    runs = tmp_path / "runs"
    running["processes"].append(WorkProcess(
        w1.mqtt_port, QUEUE, ["sh", "-c", f'echo "$ZMESH_JOB_ID" >> {runs}; sleep 3.5; echo "report on $(cat)"']))
    outcome = Subscriber(s.mqtt_port, "$jobs/result/slow", "$jobs/failed/slow", qos=1)
    submitter = MqttSubmitter(s.mqtt_port)
    running["clients"] += [outcome, submitter]
    submitter.submit(QUEUE, {"slow": b"10.0.0.2"})  # waits in the queue until the worker is up
    message = outcome.get(timeout=20)
    assert (message.topic, message.payload) == ("$jobs/result/slow", b"report on 10.0.0.2\n"), message.payload
    assert runs.read_text().split() == ["slow"]  # run once, never redelivered
    assert jobs_stats(s, QUEUE)["redeliveries_total"] == 0


POISON_SCANNER = r"""
read -r target
case "$target" in
  poison*) echo "scanner crashed on $target" >&2; exit 3 ;;
  *) echo "clean: $target" ;;
esac
"""


def test_a_poison_job_is_dead_lettered_with_its_reason_and_submit_wait_fails(
        tmp_path: Path, certs: Path, running: dict[str, list]) -> None:
    s, (w1,) = mesh(tmp_path, certs, running, ["w1"], "[jobs]\nmax_attempts = 3\n")
    running["processes"].append(WorkProcess(w1.mqtt_port, QUEUE, ["sh", "-c", POISON_SCANNER]))
    # The dead letters are mesh-wide: watched on the worker node as well as on s.
    remote_dead = Subscriber(w1.mqtt_port, f"$jobs/dead/{QUEUE}", qos=1)
    local_dead = Subscriber(s.mqtt_port, f"$jobs/dead/{QUEUE}", qos=1)
    probe = Publisher(s.mqtt_port)
    running["clients"] += [remote_dead, local_dead, probe]
    await_route(probe, remote_dead, f"$jobs/dead/{QUEUE}")
    local_dead.drain()

    ok = zmesh_cli("jobs", "submit", QUEUE, "-p", str(s.mqtt_port), "-m", "fine-1", "--wait", "-W", "30")
    assert (ok.returncode, ok.stdout) == (0, "clean: fine-1\n"), ok.stderr

    failed = zmesh_cli("jobs", "submit", QUEUE, "-p", str(s.mqtt_port), "-m", "poison-1", "--id", "poison-job-1",
                       "--wait", "-W", "30")
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert "poison-job-1" in failed.stderr and "scanner crashed on poison-1" in failed.stderr, failed.stderr
    assert "after 3 attempts" in failed.stderr and failed.stdout == ""

    for watcher in (local_dead, remote_dead):
        letter = json.loads(collect(watcher, 1)[0].payload)
        assert letter["id"] == "poison-job-1" and letter["queue"] == QUEUE and letter["attempts"] == 3
        assert letter["reason"] == "exit 3: scanner crashed on poison-1"
        assert base64.b64decode(letter["payload"]) == b"poison-1"
    stats = jobs_stats(s, QUEUE)
    assert (stats["dead_total"], stats["redeliveries_total"], stats["done_total"]) == (1, 2, 1), stats


def test_an_untrusted_node_can_neither_take_nor_submit_jobs(
        tmp_path: Path, certs: Path, running: dict[str, list]) -> None:
    make_certs(certs, ["u"])
    trusted = tmp_path / "trusted"  # what s and w1 trust: each other, not u
    trusted.mkdir()
    for name in ("s", "w1"):
        shutil.copy(certs / f"{name}.key", trusted)
    s, (w1,) = mesh(tmp_path, certs, running, ["w1"], trusted=trusted)
    # u trusts everyone (its trusted dir is the one with every key) and is seeded at s and w1.
    (u,) = start_nodes(tmp_path, [dict(name="u", cert_dir=certs, control_port=0,
                                       seeds=[s.control_port, w1.control_port])])
    running["nodes"].append(u)

    rogue = MqttWorker(u.mqtt_port, QUEUE, lambda job_id, payload: b"rogue " + payload, "rogue")
    honest = MqttWorker(w1.mqtt_port, QUEUE, lambda job_id, payload: b"scanned " + payload, "honest")
    results = Subscriber(s.mqtt_port, "$jobs/result/#", qos=1)
    submitter = MqttSubmitter(s.mqtt_port)
    running["clients"] += [rogue, honest, results, submitter]

    # s's jobs: all to the trusted worker, none to u's.
    jobs = {f"s-{i}": f"target-{i}".encode() for i in range(50)}
    submitter.submit(QUEUE, jobs)
    got = results_by_id(collect(results, len(jobs), timeout=20))
    assert got == {job_id: b"scanned " + payload for job_id, payload in jobs.items()}
    assert rogue.received == []

    # u's jobs (its own worker gone, so it must look for one in the mesh): never reach w1.
    rogue.close()
    running["clients"].remove(rogue)
    u_submitter = MqttSubmitter(u.mqtt_port)
    running["clients"].append(u_submitter)
    u_submitter.submit(QUEUE, {f"u-{i}": b"from u" for i in range(20)})
    # Positive control after u's submits: s's jobs still flow to w1.
    control = {f"control-{i}": b"after u" for i in range(5)}
    submitter.submit(QUEUE, control)
    assert set(results_by_id(collect(results, len(control), timeout=20))) == set(control)
    assert_quiet(results, what="at s after u's submits")
    assert not [j for j in honest.received if j.startswith("u-")], honest.received
    stats = jobs_stats(u, QUEUE)
    assert (stats["depth"], stats["in_flight"], stats["done_total"]) == (20, 0, 0), stats
    assert "u" not in s.peers_up() and "u" not in w1.peers_up()
    assert s.peers_up() >= {"w1"}


def test_jobs_stats_shows_depth_in_flight_and_dead(
        tmp_path: Path, certs: Path, running: dict[str, list]) -> None:
    s, (w1,) = mesh(tmp_path, certs, running, ["w1"], "[jobs]\nmax_attempts = 1\n")

    def handle(job_id: str, payload: bytes) -> bytes | str | None:
        if payload == b"poison":
            return "scanner crashed"  # with max_attempts = 1: straight to the dead letters
        return None  # hangs on anything else

    running["clients"].append(MqttWorker(w1.mqtt_port, QUEUE, handle))
    submitter = MqttSubmitter(s.mqtt_port)
    running["clients"].append(submitter)
    submitter.submit(QUEUE, {"poison": b"poison"})
    wait_until(lambda: jobs_stats(s, QUEUE)["dead_total"] == 1, 15, "the poison job to be dead")
    submitter.submit(QUEUE, {"hang": b"hang", **{f"waiting-{i}": b"later" for i in range(3)}})
    wait_until(lambda: jobs_stats(s, QUEUE)["in_flight"] == 1, 15, "the worker to hold a job")

    table = zmesh_cli("jobs", "stats", "-p", str(s.mqtt_port))
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["QUEUE", "WORKERS", "DEPTH", "IN", "FLIGHT", "OLDEST", "DONE", "REDELIVERED", "DEAD"]
    (row,) = [r.split() for r in rows if r.split()[0] == QUEUE]
    name, workers, depth, in_flight, oldest, done, redelivered, dead = row
    assert (workers, depth, in_flight, done, redelivered, dead) == ("1", "3", "1", "0", "0", "1"), table.stdout
    assert oldest.endswith("s") and float(oldest[:-1]) >= 0

    as_json = zmesh_cli("jobs", "stats", "-p", str(s.mqtt_port), "--json")
    figures = json.loads(as_json.stdout)[QUEUE]
    assert {k: figures[k] for k in ("depth", "in_flight", "dead_total", "done_total")} == {
        "depth": 3, "in_flight": 1, "dead_total": 1, "done_total": 0}


@pytest.mark.timeout(120)
def test_the_scanner_fleet_example_runs_with_one_command(tmp_path: Path) -> None:
    script = REPO / "nodes" / "scanner-fleet" / "run.sh"
    env = {**os.environ, "ZMESH": f"{sys.executable} -m zmesh", "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    # Its own session: whatever it leaves running is found (and then stopped) by session id.
    process = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=tmp_path, env=env, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=90)
        leftovers = session_members(process.pid)
    finally:
        if process.returncode is None or session_members(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=5)
    assert process.returncode == 0, out
    findings = [line for line in out.splitlines() if line.startswith("10.0.0.")]
    assert [line.split(":")[0] for line in findings] == [f"10.0.0.{i}" for i in range(1, 21)], out
    assert all("(scanned on scanner" in line for line in findings), out
    stats = out[out.index("QUEUE"):].splitlines()
    assert stats[1].split()[:4] == ["scan", "3", "0", "0"] and stats[1].split()[5] == "20", out  # 3 worker nodes
    assert not leftovers, f"the example left processes running: {leftovers}"
    assert not list(tmp_path.glob("scanner-fleet.*")), "the example left its temporary directory"


def session_members(session: int) -> list[str]:
    """Processes (pid and command) in the given session."""
    ps = subprocess.run(["ps", "-eo", "sid=,pid=,args="], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in ps.splitlines() if line.split(None, 1)[0] == str(session)]


def test_a_deep_backlog_is_not_scanned_on_every_tick() -> None:
    """The lease check runs every 50 ms; it must look at the jobs in flight, not at every
    pending one (it did: 200,000 queued scans cost ~9 ms a tick, a fifth of a core while
    idle). Pure bookkeeping, no processes: the best of five ticks, against a 10x margin."""
    from zmesh.jobs.dispatcher import Dispatcher, Job

    dispatcher = Dispatcher()
    for i in range(200_000):
        dispatcher.submit(Job(f"j{i}", QUEUE, b"x", 0.0))
    dispatcher.worker_up("w", QUEUE, 32)
    assert len(dispatcher.dispatch(now=0.0)) == 32
    ticks = []
    for _ in range(5):
        started = time.perf_counter()
        assert dispatcher.expire(now=1.0) == []
        ticks.append(time.perf_counter() - started)
    assert min(ticks) < 0.001, ticks
    assert {job.id for job, _ in dispatcher.expire(now=31.0)} == {f"j{i}" for i in range(32)}

