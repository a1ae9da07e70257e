"""Gossip simulation: the pure SWIM and Plumtree cores at N = 10 ... 10,000, time injected.

    python -m benchmarks.gossip_sim [--quick] [--sizes 10,100,200,1000,10000] [--loss 0.01]

No sockets: every node is a ``zmesh.mesh.swim.Swim`` (and a ``plumtree.Plumtree``) driven by
a discrete-event network with per-message delay (0.5 ms + up to 1.5 ms jitter) and
independent loss; a node is ticked when its ``next_deadline`` comes, rounded up to the
mesh's 50 ms liveness tick. Every message is encoded and
decoded with the real codec, so its byte count is the real payload size (CURVE adds ~33 B
and TCP/IP ~52 B per message on the wire; not counted). Signatures are a keyed BLAKE2b
stand-in of the same 64 bytes as XEdDSA (its CPU cost is not simulated: ~70 µs per verify,
only when an assertion would change state, see docs/cluster-scale.md).

Per N the run measures:
* **join**: nodes start from one converged table (shared in memory, so that 10,000 tables
  fit); a few new nodes join through one seed; rounds (0.2 s gossip rounds) and seconds until
  every node knows each as alive. For N <= 100 also a **mass start**: every node joins
  through node 0 in the same second; seconds until all know all.
* **detection**: a few nodes crash (stop answering); for every (victim, observer) pair the
  seconds from the crash until the observer holds the victim dead: median and p99; plus the
  time until the last observer does.
* **false positives**: live members declared dead (and suspected) by anyone over the run;
  repeated at 5 % loss.
* **cost**: messages and bytes sent per node per second in the steady state.
* **broadcast**: Plumtree over 5 random neighbours per node (from the SWIM table): hops
  (the message's round at delivery), latency, redundancy (full copies received per delivery)
  and completeness, with the same loss.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import math
import random
import statistics
import sys
import time
from typing import Any

from zmesh.mesh import plumtree, swim
from zmesh.mesh.swim import State

Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
TICK = 0.05
DELAY, JITTER = 0.0005, 0.0015


def _key(rng: random.Random) -> str:
    return "".join(rng.choice(Z85) for _ in range(40))


def _secret(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=32).digest()


def _signer(key: str) -> swim.Signer:
    secret = _secret(key)
    return lambda data: hashlib.blake2b(data, key=secret, digest_size=64).digest()


def _verify(key: str, data: bytes, sig: bytes) -> bool:
    return hashlib.blake2b(data, key=_secret(key), digest_size=64).digest() == sig


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Sim:
    """N Swim nodes on a lossy, delayed network; ``run(until)`` advances simulated time."""

    def __init__(self, n: int, loss: float, seed: int, config: swim.SwimConfig, converged: bool = True) -> None:
        self.rng = random.Random(seed)
        self.loss, self.config, self.now = loss, config, 0.0
        self.flight: list[tuple[float, int, str, str, Any]] = []
        self.due: list[tuple[float, int, str]] = []  # (when, seq, node key): ticks to make
        self.scheduled: dict[str, float] = {}  # node key -> its earliest scheduled tick
        self.seq = 0
        self.down: set[str] = set()
        self.nodes: dict[str, swim.Swim] = {}
        self.sent = self.bytes = 0
        self.sent_by: dict[str, int] = {}
        self.by_kind: dict[str, list[int]] = {}  # message type -> [count, bytes]
        self.dead_at: dict[tuple[str, str], float] = {}  # (observer, member) -> first dead
        self.alive_at: dict[tuple[str, str], float] = {}  # (observer, member) -> first alive
        self.suspected: list[tuple[float, str, str, int]] = []  # (t, observer, member, inc), live members
        self.false_dead: list[tuple[float, str, str]] = []
        self.crashed_at: dict[str, float] = {}
        self.watch: set[str] = set()  # members whose alive events we time (joiners)
        keys = [_key(self.rng) for _ in range(n)]
        base = None
        if converged:
            entries = []
            for i, k in enumerate(keys):
                alive = swim.Alive(k, 1, f"n{i}", "10.0.0.1", 7000, b"",
                                   _signer(k)(swim.alive_bytes(k, 1, f"n{i}", "10.0.0.1", 7000, b"")))
                entries.append(swim.make_entry(alive, State.ALIVE, None, 0.0))
            base = swim.SharedTable.of(entries)
        for k in keys:
            self.add(k, base)

    def add(self, key: str, base: swim.SharedTable | None = None) -> swim.Swim:
        node = swim.Swim(key, f"n{len(self.nodes)}", "10.0.0.1", 7000, incarnation=1, sign=_signer(key),
                         verify=_verify, now=self.now, config=self.config,
                         rng=random.Random(self.rng.random()), base=base)
        self.nodes[key] = node
        self.schedule(key, node)
        return node

    def send(self, sender: str, out: list[swim.Send]) -> None:
        if not out:
            return
        self.sent += len(out)
        self.sent_by[sender] = self.sent_by.get(sender, 0) + len(out)
        by_kind = self.by_kind
        for to, message in out:
            data = swim.encode(message)
            self.bytes += len(data)
            kind = by_kind.get(type(message).__name__)
            if kind is None:
                kind = by_kind[type(message).__name__] = [0, 0]
            kind[0] += 1
            kind[1] += len(data)
            if self.loss and self.rng.random() < self.loss:
                continue
            self.seq += 1
            heapq.heappush(self.flight, (self.now + DELAY + self.rng.random() * JITTER, self.seq, to, sender, data))

    def _events(self, observer: str, node: swim.Swim) -> None:
        for event in node.drain_events():
            member = event.entry.alive.key
            if event.kind is swim.EventKind.DEAD:
                self.dead_at.setdefault((observer, member), self.now)
                if member not in self.crashed_at:
                    self.false_dead.append((self.now, observer, member))
            elif event.kind is swim.EventKind.SUSPECT and member not in self.crashed_at:
                self.suspected.append((self.now, observer, member, event.entry.incarnation))
            elif event.kind is swim.EventKind.ALIVE and member in self.watch:
                self.alive_at.setdefault((observer, member), self.now)

    def schedule(self, key: str, node: swim.Swim) -> None:
        # Ticked when something is due (``next_deadline``), on the mesh's 50 ms tick grid,
        # rather than every tick: the same behaviour, a tenth of the calls.
        deadline = node.next_deadline()
        # Never before the deadline (float rounding), never in the past (a deadline that
        # passed while nothing was due, such as a gossip round after a quiet spell).
        due = max(deadline, self.now, math.ceil(deadline / TICK - 1e-9) * TICK)
        if due < self.scheduled.get(key, math.inf) - 1e-9:
            self.scheduled[key] = due
            self.seq += 1
            heapq.heappush(self.due, (due, self.seq, key))

    def run(self, until: float) -> None:
        nodes, down, flight, due, scheduled = self.nodes, self.down, self.flight, self.due, self.scheduled
        while True:
            t_msg = flight[0][0] if flight else math.inf
            t_due = due[0][0] if due else math.inf
            if min(t_msg, t_due) > until:
                break
            if t_msg <= t_due:
                at, _, to, sender, data = heapq.heappop(flight)
                self.now = at
                node = nodes.get(to)
                if node is None or to in down:
                    continue
                self.send(to, node.receive(sender, swim.decode(data), at))
                if node.events:
                    self._events(to, node)
                self.schedule(to, node)
            else:
                at, _, key = heapq.heappop(due)
                if scheduled.get(key) != at or key in down:
                    continue  # superseded by an earlier deadline, or crashed
                del scheduled[key]
                self.now = at
                node = nodes[key]
                out = node.tick(at)
                if out:
                    self.send(key, out)
                if node.events:
                    self._events(key, node)
                self.schedule(key, node)
        self.now = until

    def crash(self, key: str) -> None:
        self.down.add(key)
        self.crashed_at[key] = self.now

    def live(self) -> list[str]:
        return [k for k in self.nodes if k not in self.down]


def membership_run(n: int, loss: float, seconds: float, seed: int, config: swim.SwimConfig) -> dict[str, Any]:
    wall = time.perf_counter()
    sim = Sim(n, loss, seed, config)
    keys = list(sim.nodes)
    warm = 3.0
    sim.run(warm)
    # Steady-state cost window: nothing joins or fails.
    sent0, bytes0 = sim.sent, sim.bytes
    kinds0 = {k: list(v) for k, v in sim.by_kind.items()}
    window = min(5.0, seconds / 4)
    sim.run(warm + window)
    msgs_per_node = (sim.sent - sent0) / window / n
    bytes_per_node = (sim.bytes - bytes0) / window / n
    # Probes cost the same whatever happens; gossip is what changes (and loss-made suspicions) cost.
    per_kind = {k: [round((v[0] - kinds0.get(k, [0, 0])[0]) / window / n, 3),
                    round((v[1] - kinds0.get(k, [0, 0])[1]) / window / n, 1)] for k, v in sim.by_kind.items()}
    probe_kinds = ("Ping", "Ack", "PingReq", "Nack")
    probe_msgs = sum(per_kind.get(k, [0, 0])[0] for k in probe_kinds)
    probe_bytes = sum(per_kind.get(k, [0, 0])[1] for k in probe_kinds)
    suspicions_in_window = len({(m, inc) for (t, _, m, inc) in sim.suspected if warm <= t < warm + window})
    # Joins: new nodes through one seed each.
    joiners, join_t = [], {}
    for _ in range(5):
        k = _key(sim.rng)
        sim.watch.add(k)
        node = sim.add(k)
        seed_key = keys[sim.rng.randrange(n)]
        join_t[k] = sim.now
        joiners.append(k)
        sim.send(k, node.join(seed_key, sim.now))
        sim.schedule(k, node)
        sim.run(sim.now + 0.5)
    # Crashes.
    victims = sim.rng.sample([k for k in keys if k not in joiners], 2 if n <= 10 else 4)
    crash_start = sim.now + 0.5
    for i, victim in enumerate(victims):
        sim.run(crash_start + i * 0.8)
        sim.crash(victim)
    sim.run(seconds)
    live = sim.live()
    # Join dissemination: per joiner, when the last live node had it alive.
    join_all, join_missing = [], 0
    originals = set(keys)
    for index, k in enumerate(joiners):
        # Observers that were members when k joined (later joiners learn it by their own join).
        before = originals | set(joiners[:index])
        times = [sim.alive_at.get((o, k)) for o in live if o in before]
        if any(t is None for t in times):
            join_missing += sum(t is None for t in times)
            continue
        join_all.append(max(times) - join_t[k])  # type: ignore[type-var,operator]
    # Detection.
    detect, detect_all, undetected = [], [], 0
    for v in victims:
        times = []
        for o in live:
            t = sim.dead_at.get((o, v))
            if t is None:
                undetected += 1
            else:
                times.append(t - sim.crashed_at[v])
        detect.extend(times)
        if times and len(times) == len(live):
            detect_all.append(max(times))
    low, high = config.suspicion_timeouts(n)
    per_node = sorted(sim.sent_by.get(k, 0) for k in keys)
    return {
        "n": n, "loss": loss, "simulated_s": seconds, "wall_s": round(time.perf_counter() - wall, 1),
        "steady_msgs_per_node_s": round(msgs_per_node, 2), "steady_bytes_per_node_s": round(bytes_per_node, 1),
        "steady_probe_msgs_per_node_s": round(probe_msgs, 2), "steady_probe_bytes_per_node_s": round(probe_bytes, 1),
        "steady_per_kind_msgs_bytes_per_node_s": per_kind, "false_suspicions_in_steady_window": suspicions_in_window,
        "msgs_per_node_s_whole_run_max": round(per_node[-1] / seconds, 2) if per_node else None,
        "join_all_s": [round(x, 3) for x in join_all],
        "join_all_rounds_median": round(statistics.median(join_all) / config.gossip_interval, 1) if join_all else None,
        "join_missing_pairs": join_missing,
        "detect_median_s": round(statistics.median(detect), 2) if detect else None,
        "detect_p99_s": round(_pct(detect, 0.99), 2) if detect else None,  # type: ignore[arg-type]
        "detect_all_nodes_s": [round(x, 2) for x in detect_all],
        "undetected_pairs": undetected,
        "suspicion_min_s": round(low, 2), "suspicion_max_s": round(high, 2),
        "false_dead": len(sim.false_dead),
        # A suspicion spreads to everyone: count each (member, incarnation) once, and the
        # observer events separately.
        "false_suspicions": len({(m, inc) for (_, _, m, inc) in sim.suspected}),
        "false_suspicion_events": len(sim.suspected),
        "refutations": sum(node.stats["refutations"] for node in sim.nodes.values()),
        "bad_signatures": sum(node.stats["bad_signature"] for node in sim.nodes.values()),
    }


def mass_start(n: int, loss: float, seed: int, config: swim.SwimConfig, limit: float) -> dict[str, Any]:
    """Every node joins through node 0 within one second; when does everyone know everyone?"""
    wall = time.perf_counter()
    sim = Sim(n, loss, seed, config, converged=False)
    keys = list(sim.nodes)
    starts = sorted((sim.rng.random(), k) for k in keys[1:])
    for at, k in starts:
        sim.run(at)
        sim.send(k, sim.nodes[k].join(keys[0], sim.now))
        sim.schedule(k, sim.nodes[k])
    done = None
    while sim.now < limit:
        sim.run(sim.now + 0.5)
        if all(sim.nodes[a].table.live == n for a in keys):
            done = sim.now
            break
    return {"n": n, "loss": loss, "converged_s": None if done is None else round(done - 1.0, 1),
            "limit_s": limit, "wall_s": round(time.perf_counter() - wall, 1),
            "short_join_answers": sim.nodes[keys[0]].stats["joins_short"]}


def broadcast_run(n: int, loss: float, seed: int, broadcasts: int, degree: int = 5) -> dict[str, Any]:
    wall = time.perf_counter()
    rng = random.Random(seed)
    keys = [f"n{i}" for i in range(n)]
    nodes = {k: plumtree.Plumtree(k, now=0.0, rng=random.Random(i)) for i, k in enumerate(keys)}
    for k in keys:  # each node asks for `degree` random neighbours; links are symmetric
        tries = 0
        while len(nodes[k].neighbours()) < degree and tries < 50:
            tries += 1
            other = keys[rng.randrange(n)]
            if other != k and other not in nodes[k].neighbours() and nodes[other].add_neighbour(k):
                nodes[k].add_neighbour(other)
    flight: list[tuple[float, int, str, str, bytes]] = []
    counter = [0]
    received = {"push": 0, "ihave": 0, "graft": 0, "prune": 0, "bytes": 0}
    started: dict[bytes, float] = {}
    got: dict[bytes, dict[str, tuple[float, int]]] = {}
    now = 0.0

    def send(sender: str, out: list[plumtree.Send], at: float) -> None:
        for to, message in out:
            data = plumtree.encode(message)
            received["bytes"] += len(data)
            if loss and rng.random() < loss:
                continue
            counter[0] += 1
            heapq.heappush(flight, (at + DELAY + rng.random() * JITTER, counter[0], to, sender, data))

    def run(until: float) -> None:
        nonlocal now
        while now < until - 1e-9:
            step_end = now + 0.01
            while flight and flight[0][0] <= step_end:
                at, _, to, sender, data = heapq.heappop(flight)
                message = plumtree.decode(data, 1 << 20)
                kind = type(message).__name__.lower()
                received["push" if kind == "push" else kind] += 1
                node = nodes[to]
                send(to, node.receive(sender, message, at), at)
                for d in node.drain():
                    got.setdefault(d.id, {})[to] = (at - started.get(d.id, at), d.round)
            now = step_end
            for k, node in nodes.items():
                out = node.tick(now)
                if out:
                    send(k, out, now)

    # The first broadcast builds the tree (every link eager until the first duplicates).
    warm_id, out = nodes[keys[0]].broadcast(b"warm-up", now)
    started[warm_id] = now
    send(keys[0], out, now)
    run(1.0)
    for key in received:
        received[key] = 0
    ids = []
    for i in range(broadcasts):
        origin = keys[rng.randrange(n)]
        mid, out = nodes[origin].broadcast(f"retained write {i}".encode() * 4, now)
        started[mid] = now
        got.setdefault(mid, {})[origin] = (0.0, 0)
        ids.append(mid)
        send(origin, out, now)
        run(now + 0.05)
    run(now + 2.0)
    hops = [r for mid in ids for (_, r) in got[mid].values()]
    lat = [t for mid in ids for (t, _) in got[mid].values() if t > 0]
    delivered = sum(len(got[mid]) for mid in ids)
    first_copies = delivered - len(ids)  # the origins did not receive their own
    return {
        "n": n, "loss": loss, "degree": degree, "broadcasts": broadcasts,
        "completeness": round(delivered / (n * len(ids)), 5),
        "hops_mean": round(statistics.mean(hops), 2), "hops_max": max(hops),
        "latency_ms_median": round(1000 * statistics.median(lat), 2), "latency_ms_p99": round(1000 * _pct(lat, 0.99), 2),  # type: ignore[operator]
        "redundancy": round(received["push"] / max(1, first_copies), 3),
        "ihave_msgs_per_broadcast_per_node": round(received["ihave"] / len(ids) / n, 3),
        "grafts": received["graft"], "prunes_after_warmup": received["prune"],
        "bytes_per_broadcast_per_node": round(received["bytes"] / len(ids) / n, 1),
        "wall_s": round(time.perf_counter() - wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,200,1000,10000")
    parser.add_argument("--loss", type=float, default=0.01)
    parser.add_argument("--quick", action="store_true", help="shorter runs (about a fifth)")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    from benchmarks import common

    sizes = [int(s) for s in args.sizes.split(",")]
    config = swim.SwimConfig()
    seconds = {10: 40.0, 100: 40.0, 200: 40.0, 1000: 30.0, 10000: 25.0}
    scale = 0.5 if args.quick else 1.0
    report: dict[str, Any] = {
        "scenario": "gossip-sim", "timestamp": common.stamp(),
        "conditions": {
            **common.conditions(quick=args.quick),
            "swim_config": {k: getattr(config, k) for k in config.__dataclass_fields__},
            "plumtree_config": {k: getattr(plumtree.PlumtreeConfig(), k) for k in plumtree.PlumtreeConfig.__dataclass_fields__},
            "network": f"delay {DELAY * 1000} ms + uniform jitter up to {JITTER * 1000} ms, independent loss per message",
            "tick_s": TICK, "signatures": "keyed BLAKE2b stand-in (64 B), verify CPU not simulated",
            "seed": args.seed,
        },
        "membership": [], "membership_lossy": [], "mass_start": [], "broadcast": [],
    }
    for n in sizes:
        # The crashes happen ~11 s in and the last detection at 10,000 takes ~10 s more.
        secs = max(25.0, seconds.get(n, 25.0) * scale)
        common.progress(f"membership N={n} loss={args.loss} for {secs} simulated s ...")
        row = membership_run(n, args.loss, secs, args.seed, config)
        common.progress(f"  {row}")
        report["membership"].append(row)
    for n in [s for s in sizes if s in (10, 100, 1000)]:
        secs = 60.0 * scale if n <= 100 else 25.0 * scale
        common.progress(f"false positives N={n} loss=0.05 for {secs} simulated s ...")
        row = membership_run(n, 0.05, secs, args.seed + 1, config)
        common.progress(f"  {row}")
        report["membership_lossy"].append(row)
    for n in [s for s in sizes if s in (10, 100)]:
        common.progress(f"mass start N={n} ...")
        row = mass_start(n, args.loss, args.seed, config, limit=30.0)
        common.progress(f"  {row}")
        report["mass_start"].append(row)
    for n in sizes:
        common.progress(f"broadcast N={n} ...")
        row = broadcast_run(n, args.loss, args.seed, broadcasts=20 if n < 10000 else 10)
        common.progress(f"  {row}")
        report["broadcast"].append(row)
    if not args.no_save:
        common.save("gossip-sim", report, _markdown(report), args.quick)
        _plot(report)
    print(_markdown(report))
    return 0


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# Gossip simulation (pure SWIM + Plumtree cores, time injected)", "",
             f"Run {report['timestamp']} ({{JSON}}); {report['conditions']['network']}; "
             f"tick {report['conditions']['tick_s']} s.", "",
             "msgs/s and bytes/s: sent per node in a 5 s window with nothing joining or failing, all "
             "messages (probes only); loss-made suspicions in that window add gossip.", "",
             "| N | loss | msgs/s per node (probes) | bytes/s per node (probes) | suspicions in window | join: rounds (s) to all | detection median / p99 s | last node s | suspicion min / max s | false dead | false suspicions (refuted) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["membership"] + report["membership_lossy"]:
        joins = row["join_all_s"]
        lines.append(
            f"| {row['n']:,} | {row['loss']:.0%} | {row['steady_msgs_per_node_s']} ({row['steady_probe_msgs_per_node_s']}) | "
            f"{row['steady_bytes_per_node_s']:,.0f} ({row['steady_probe_bytes_per_node_s']:,.0f}) | {row['false_suspicions_in_steady_window']} | "
            f"{row['join_all_rounds_median']} ({statistics.median(joins):.2f}) | "
            f"{row['detect_median_s']} / {row['detect_p99_s']} | "
            f"{max(row['detect_all_nodes_s']) if row['detect_all_nodes_s'] else '–'} | "
            f"{row['suspicion_min_s']} / {row['suspicion_max_s']} | {row['false_dead']} | {row['false_suspicions']} |"
            if joins else f"| {row['n']:,} | {row['loss']:.0%} | {row['steady_msgs_per_node_s']} | – | – | – | – | – | – | {row['false_dead']} | {row['false_suspicions']} |")
    if report["mass_start"]:
        lines += ["", "| mass start N | everyone knows everyone after (s) | short join answers |", "|---:|---:|---:|"]
        for row in report["mass_start"]:
            lines.append(f"| {row['n']:,} | {row['converged_s']} | {row['short_join_answers']} |")
    lines += ["", "| broadcast N | completeness | hops mean / max | latency median / p99 ms | redundancy | bytes per broadcast per node |",
              "|---:|---:|---:|---:|---:|---:|"]
    for row in report["broadcast"]:
        lines.append(f"| {row['n']:,} | {row['completeness']:.2%} | {row['hops_mean']} / {row['hops_max']} | "
                     f"{row['latency_ms_median']} / {row['latency_ms_p99']} | {row['redundancy']} | {row['bytes_per_broadcast_per_node']} |")
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any]) -> None:
    from benchmarks.plots import _pyplot, _save

    plt = _pyplot()
    if plt is None:
        return
    rows = report["membership"]
    ns = [r["n"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    ax = axes[0]
    joins = [statistics.median(r["join_all_s"]) / 0.2 if r["join_all_s"] else math.nan for r in rows]
    ax.plot(ns, joins, "o-", label="join reaches all (simulated)")
    ax.plot(ns, [math.log(n, 4) + math.log(n) / 3 for n in ns], "--", label="log4 N + ln N / 3")
    ax.set_xscale("log")
    ax.set_title("membership convergence (gossip rounds of 0.2 s)")
    ax.set_xlabel("N")
    ax.legend()
    ax = axes[1]
    ax.plot(ns, [r["detect_median_s"] for r in rows], "o-", label="median")
    ax.plot(ns, [r["detect_p99_s"] for r in rows], "s-", label="p99")
    ax.plot(ns, [r["suspicion_min_s"] for r in rows], ":", label="suspicion min")
    ax.set_xscale("log")
    ax.set_title(f"crash detection, s (loss {rows[0]['loss']:.0%})")
    ax.set_xlabel("N")
    ax.legend()
    ax = axes[2]
    ax.plot(ns, [r["steady_probe_msgs_per_node_s"] for r in rows], "o-", label="probe msgs/s")
    ax.plot(ns, [r["steady_msgs_per_node_s"] for r in rows], "o:", label="all msgs/s")
    ax2 = ax.twinx()
    ax2.plot(ns, [r["steady_probe_bytes_per_node_s"] for r in rows], "s--", color="tab:red", label="probe bytes/s")
    ax2.plot(ns, [r["steady_bytes_per_node_s"] for r in rows], "s:", color="tab:purple", label="all bytes/s")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    ax.set_title("sent per node, steady (all: with loss-made suspicions)")
    ax.set_xlabel("N")
    ax.legend(loc="lower left")
    ax2.legend(loc="lower right")
    ax = axes[3]
    b = report["broadcast"]
    bn = [r["n"] for r in b]
    ax.plot(bn, [r["hops_mean"] for r in b], "o-", label="hops mean")
    ax.plot(bn, [r["hops_max"] for r in b], "s-", label="hops max")
    ax.plot(bn, [r["redundancy"] for r in b], "^-", label="copies per delivery")
    ax.set_xscale("log")
    ax.set_title("Plumtree broadcast")
    ax.set_xlabel("N")
    ax.legend()
    fig.suptitle(f"gossip simulation {report['timestamp']}")
    fig.tight_layout()
    _save(fig, "gossip-sim")


if __name__ == "__main__":
    sys.exit(main())
