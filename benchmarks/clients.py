"""Client workers of the suite: one process each, driven over stdin/stdout (one JSON per line).

    python -m benchmarks.clients ROLE 'JSON-ARGS'

Publishers (``*-pub``): set up, print ``{"ready": ...}``, then send a warm-up message (run 0)
every 5 ms until the parent writes ``go``; then run each phase of ``args["phases"]`` (run id =
phase index + 1), printing ``{"result": ...}`` after each and waiting for the next ``go``;
exit on ``exit``/EOF. Subscribers (``*-sub``): set up, print ``{"ready": ...}``, print
``{"warm": true}`` on the first warm-up message, then count each phase's messages until it has
``n``, or IDLE_S without one, or FIRST_S without the first, printing ``{"result": ...}``.
Every payload starts with ``<IIQ`` (run id, sequence, ``perf_counter_ns`` at send), so the
subscriber measures one-way latency (both processes read CLOCK_MONOTONIC).

Phases: ``{"mode": "throughput", "n": N, "size": S}`` (as fast as the client can) or
``{"mode": "latency", "n": N, "size": S, "rate": R}`` (deadline-paced at R msgs/s).
Request/reply roles (``*-responder``, ``*-requester``) answer / time round trips.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import select
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.pubsub import run_zmesh

HEADER = struct.Struct("<IIQ")
TS = struct.Struct("<Q")
WARM_EVERY_S = 0.005
IDLE_S = float(os.environ.get("BENCH_IDLE_S", "2.0"))  # a phase ends after this long without a message
FIRST_S = 30.0
PHASE_MAX_S = 120.0
GO_TIMEOUT_S = 90.0
TOPIC = "bench/t"
FILTER = "bench/#"


def emit(item: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(item) + "\n")
    sys.stdout.flush()


def usage() -> dict[str, float]:
    # VmHWM, not ru_maxrss: the latter survives exec, so a child would report its parent's peak.
    return {"cpu_s": time.process_time(), "maxrss_kib": _status("VmHWM:")}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def rss_kib() -> int:
    return _status("VmRSS:")


class Commands:
    """Lines from the parent on stdin, read by a thread."""

    def __init__(self) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            self.q.put(line.strip())
        self.q.put("exit")

    def poll(self) -> str | None:
        try:
            return self.q.get_nowait()
        except queue.Empty:
            return None

    def wait(self, timeout: float = GO_TIMEOUT_S) -> str:
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return "exit"


def payload(run: int, size: int, seq: int = 0) -> bytes:
    return HEADER.pack(run, seq, time.perf_counter_ns()) + b"x" * max(0, size - HEADER.size)


# ============================================================================ publishing


def pub_driver(send: Any, phases: list[dict[str, Any]], *, drain: Any = None, pump: Any = None,
               ready: dict[str, Any] | None = None) -> None:
    """Warm-up until ``go``, then each phase. ``send(bytes)``; ``drain()`` after a phase (wait
    for acknowledgements); ``pump()`` now and then (client housekeeping)."""
    cmds = Commands()
    emit({"ready": True, "pid": os.getpid(), **(ready or {})})
    warm = payload(0, 64)
    deadline = time.monotonic() + GO_TIMEOUT_S
    sent_warm = 0
    while True:
        cmd = cmds.poll()
        if cmd == "go":
            break
        if cmd == "exit" or time.monotonic() > deadline:
            return
        send(warm)
        sent_warm += 1
        if pump:
            pump()
        time.sleep(WARM_EVERY_S)
    for index, phase in enumerate(phases):
        run, size, n = index + 1, phase["size"], phase["n"]
        pad = b"x" * max(0, size - HEADER.size)
        pack, now_ns = HEADER.pack, time.perf_counter_ns
        before = usage()
        t0 = time.perf_counter()
        if phase["mode"] == "throughput":
            if pump:
                for seq in range(n):
                    send(pack(run, seq, now_ns()) + pad)
                    if not seq & 31:
                        pump()
            else:
                for seq in range(n):
                    send(pack(run, seq, now_ns()) + pad)
        else:
            interval = 1_000_000_000 // phase["rate"]
            start = now_ns() + 1_000_000
            for seq in range(n):
                deadline = start + seq * interval
                if pump:
                    # Client housekeeping (acks in, keepalive) half an interval after the
                    # previous send, not right after it: there it took a core from the
                    # message still in flight, and the longer the server's path (more
                    # processes and threads to wake), the more that skewed its latency.
                    delay = deadline - interval // 2 - now_ns()
                    if delay > 0:
                        time.sleep(delay / 1e9)
                    pump()
                delay = deadline - now_ns()
                if delay > 0:
                    time.sleep(delay / 1e9)
                send(pack(run, seq, now_ns()) + pad)
        send_s = time.perf_counter() - t0
        if drain:
            drain()
        after = usage()
        emit({"result": {"phase": index, "sent": n, "send_s": send_s, "acked_s": time.perf_counter() - t0,
                         "cpu_s": after["cpu_s"] - before["cpu_s"], "maxrss_kib": after["maxrss_kib"],
                         "warm_sent": sent_warm}})
        cmd = cmds.wait()
        if cmd != "go":
            return
    cmds.wait()


class Counter:
    """A subscriber's tally, fed from whatever thread receives."""

    def __init__(self, phases: list[dict[str, Any]]) -> None:
        self.phases = phases
        self.run = 1
        self.warm = False
        self.count = 0
        self.first = self.last = 0.0
        self.lat: list[int] = []
        self.done = threading.Event()

    def feed(self, data: bytes) -> None:
        run = int.from_bytes(data[:4], "little")
        if run != self.run:
            if run == 0:
                self.warm = True
            return
        now = time.perf_counter_ns()
        self.lat.append(now - TS.unpack_from(data, 8)[0])
        if not self.count:
            self.first = now
        self.last = now
        self.count += 1
        if self.count >= self.n:
            self.done.set()

    @property
    def n(self) -> int:
        return self.phases[self.run - 1]["n"]


def sub_driver(counter: Counter, extra: dict[str, Any] | None = None, step: Any = None) -> None:
    """Report readiness, warmth and each phase's result. ``step(timeout)`` blocks up to timeout
    (a receive loop in this thread), or None when another thread feeds the counter."""
    emit({"ready": True, "pid": os.getpid(), **(extra or {})})

    def wait(timeout: float) -> None:
        if step:
            step(timeout)
        else:
            counter.done.wait(timeout)

    deadline = time.monotonic() + GO_TIMEOUT_S
    while not counter.warm:
        if time.monotonic() > deadline:
            emit({"error": "no warm-up message"})
            return
        wait(0.01)
    emit({"warm": True})
    for index, phase in enumerate(counter.phases):
        before = usage()
        started = time.monotonic()
        while not counter.done.is_set():
            wait(0.1)
            now = time.monotonic()
            if now - started > PHASE_MAX_S:
                break
            if counter.count == 0 and now - started > FIRST_S:
                break
            if counter.count and time.perf_counter_ns() - counter.last > IDLE_S * 1e9:
                break
        after = usage()
        lat = sorted(v / 1000 for v in counter.lat)
        result = {"phase": index, "received": counter.count, "recv_s": (counter.last - counter.first) / 1e9,
                  "cpu_s": after["cpu_s"] - before["cpu_s"], "maxrss_kib": after["maxrss_kib"],
                  "rss_kib": rss_kib()}
        if phase["mode"] == "latency" or len(lat) <= 5000:
            result["lat_us"] = [round(v, 1) for v in lat]
        else:  # keep the pipe small: percentiles only
            result["lat_pct_us"] = {str(p): lat[min(len(lat) - 1, int(p / 100 * len(lat)))]
                                    for p in (50, 90, 99)}
        emit({"result": result})
        counter.lat, counter.count, counter.first, counter.last = [], 0, 0.0, 0.0
        counter.done.clear()
        counter.run += 1


# ============================================================================ paho


def _paho(args: dict[str, Any], name: str) -> Any:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}",
                         protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(args.get("window", 100))
    client.max_queued_messages_set(0)
    return client


def paho_pub(args: dict[str, Any]) -> None:
    client = _paho(args, "pub")
    acked = [0]
    client.on_publish = lambda *_a: acked.__setitem__(0, acked[0] + 1)
    client.connect(args["host"], args["port"], keepalive=60)
    while not client.is_connected():
        client.loop(0.05)
    qos, window, sock = args["qos"], args.get("window", 100), client.socket()
    published = [0]
    publish = client.publish

    def pump(block: bool = False) -> None:
        r, _, _ = select.select([sock], [], [], 0.05 if block else 0)
        if r:
            client.loop_read()
        if client.want_write():
            client.loop_write()
        client.loop_misc()

    def send(data: bytes) -> None:
        publish(TOPIC, data, qos)
        published[0] += 1
        if qos:
            while published[0] - acked[0] >= window:
                pump(True)

    def drain() -> None:
        deadline = time.monotonic() + 60
        while (client.want_write() or (qos and acked[0] < published[0])) and time.monotonic() < deadline:
            pump(True)

    pub_driver(send, args["phases"], drain=drain, pump=pump)
    client.disconnect()


def paho_sub(args: dict[str, Any]) -> None:
    counter = Counter(args["phases"])
    client = _paho(args, "sub")
    subscribed = threading.Event()
    client.on_message = lambda _c, _u, msg: counter.feed(msg.payload)
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_connect = lambda c, *_a: c.subscribe(FILTER, args["qos"])
    client.connect(args["host"], args["port"], keepalive=60)
    client.loop_start()
    try:
        if not subscribed.wait(15):
            emit({"error": "no SUBACK within 15 s"})
            return
        sub_driver(counter)
    finally:
        client.disconnect()
        client.loop_stop()


# ============================================================================ zmesh (embedded)


def zmesh_node(args: dict[str, Any]) -> Any:
    from zmesh import Node

    certs = Path(args["certs"])
    return Node(name=args["name"], cert=certs / f"{args['name']}.key_secret", trusted=certs,
                listen="127.0.0.1:0", peers=[f"127.0.0.1:{p}" for p in args.get("seeds", [])], mqtt=None)


async def _zmesh_pub(args: dict[str, Any]) -> None:
    """pub_driver's protocol, natively async: ``await node.publish()`` as pubsub.py does."""
    node = zmesh_node(args)
    async with node:
        for i in range(args.get("retained", 0)):  # scaling: retained entries held by this node
            node.publish_nowait(f"ret/{i // 1000}/{i % 1000}", b"r" * 64, 0, True)
            if i % 1000 == 999:
                await asyncio.sleep(0)
        cmds = Commands()
        emit({"ready": True, "pid": os.getpid(), "control_port": node.control_port, "rss_setup_kib": rss_kib()})
        publish = node.publish

        async def wait_cmd(timeout: float) -> str:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                cmd = cmds.poll()
                if cmd:
                    return cmd
                await asyncio.sleep(0.01)
            return "exit"

        warm, sent_warm = payload(0, 64), 0
        deadline = time.monotonic() + GO_TIMEOUT_S
        while True:
            cmd = cmds.poll()
            if cmd == "go":
                break
            if cmd == "exit" or time.monotonic() > deadline:
                return
            await publish(TOPIC, warm)
            sent_warm += 1
            await asyncio.sleep(WARM_EVERY_S)
        for index, phase in enumerate(args["phases"]):
            run, size, n = index + 1, phase["size"], phase["n"]
            pad = b"x" * max(0, size - HEADER.size)
            pack, now_ns = HEADER.pack, time.perf_counter_ns
            before = usage()
            t0 = time.perf_counter()
            if phase["mode"] == "throughput":
                for seq in range(n):
                    await publish(TOPIC, pack(run, seq, now_ns()) + pad)
            else:
                interval = 1_000_000_000 // phase["rate"]
                start = now_ns() + 1_000_000
                for seq in range(n):
                    delay = start + seq * interval - now_ns()
                    if delay > 0:
                        await asyncio.sleep(delay / 1e9)
                    await publish(TOPIC, pack(run, seq, now_ns()) + pad)
            send_s = time.perf_counter() - t0
            for _ in range(3):
                await asyncio.sleep(0)  # let the batch flush go out
            after = usage()
            emit({"result": {"phase": index, "sent": n, "send_s": send_s, "acked_s": send_s,
                             "cpu_s": after["cpu_s"] - before["cpu_s"], "maxrss_kib": after["maxrss_kib"],
                             "warm_sent": sent_warm, "rss_kib": rss_kib()}})
            if await wait_cmd(GO_TIMEOUT_S) != "go":
                return
        await wait_cmd(GO_TIMEOUT_S)


async def _zmesh_sub(args: dict[str, Any]) -> None:
    node = zmesh_node(args)
    counter = Counter(args["phases"])
    async with node:
        extra_subs = [node.subscribe(f"scale/{i}/+/x") for i in range(args.get("filters", 0))]
        want_retained = args.get("retained", 0)
        if want_retained:
            deadline = time.monotonic() + 60
            while len(node.replica.cache) < want_retained and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        sub = node.subscribe(FILTER)
        loop = asyncio.get_running_loop()

        async def consume() -> None:
            feed = counter.feed
            async for msg in sub:
                feed(msg.payload)

        task = asyncio.create_task(consume())
        extra = {"control_port": node.control_port, "rss_setup_kib": rss_kib(),
                 "filters": len(extra_subs), "retained_held": len(node.replica.cache)}
        await loop.run_in_executor(None, sub_driver, counter, extra)
        task.cancel()
        for s in extra_subs:
            s.close()


# ============================================================================ raw pyzmq (CURVE, 1-frame msgpack)


def _raw_socket(args: dict[str, Any], kind: int) -> tuple[Any, Any, Any]:
    import zmq
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    certs = Path(args["certs"])
    ctx = zmq.Context()
    public, secret = zmq.auth.load_certificate(str(certs / f"{args['name']}.key_secret"))
    auth = None
    sock = ctx.socket(kind)
    if kind == zmq.PUB:
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(certs))
        sock.curve_server = True
        sock.sndhwm = 1_000_000
    else:
        server_public, _ = zmq.auth.load_certificate(str(certs / f"{args['server']}.key"))
        sock.curve_serverkey = server_public
        sock.rcvhwm = 1_000_000
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.curve_secretkey, sock.curve_publickey, sock.linger = secret, public, 0
    return ctx, sock, auth


def raw_pub(args: dict[str, Any]) -> None:
    import msgpack
    import zmq

    ctx, sock, auth = _raw_socket(args, zmq.PUB)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    pack, send, header = msgpack.Packer(use_bin_type=True).pack, sock.send, [1, 0, 0, None]
    try:
        pub_driver(lambda data: send(pack([TOPIC, header, data])), args["phases"], ready={"port": port})
    finally:
        auth.stop()
        ctx.destroy(linger=0)


def raw_sub(args: dict[str, Any]) -> None:
    import msgpack
    import zmq

    ctx, sock, _ = _raw_socket(args, zmq.SUB)
    sock.connect(f"tcp://127.0.0.1:{args['port']}")
    counter = Counter(args["phases"])
    unpackb, recv, poll = msgpack.unpackb, sock.recv, sock.poll
    feed = counter.feed

    def step(timeout: float) -> None:
        end = time.monotonic() + timeout
        while not counter.done.is_set():
            if not poll(max(1, int((end - time.monotonic()) * 1000))):
                return
            for _ in range(1000):
                try:
                    feed(unpackb(recv(zmq.NOBLOCK))[2])
                except zmq.Again:
                    break
                if counter.done.is_set():
                    return
            if time.monotonic() > end:
                return

    try:
        sub_driver(counter, step=step)
    finally:
        ctx.destroy(linger=0)


# ============================================================================ Zenoh (peer mode)


def _zenoh(args: dict[str, Any]) -> Any:
    import zenoh

    conf = zenoh.Config()
    conf.insert_json5("mode", '"peer"')
    conf.insert_json5("scouting/multicast/enabled", "false")
    conf.insert_json5("listen/endpoints", json.dumps([f"tcp/127.0.0.1:{args['listen']}"]))
    conf.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{p}" for p in args.get("connect", [])]))
    return zenoh.open(conf)


def zenoh_pub(args: dict[str, Any]) -> None:
    import zenoh

    session = _zenoh(args)
    pub = session.declare_publisher(TOPIC, congestion_control=zenoh.CongestionControl.BLOCK)
    try:
        pub_driver(pub.put, args["phases"], ready={"port": args["listen"]})
    finally:
        pub.undeclare()
        session.close()


def zenoh_sub(args: dict[str, Any]) -> None:
    session = _zenoh(args)
    counter = Counter(args["phases"])
    feed = counter.feed
    sub = session.declare_subscriber("bench/**", lambda sample: feed(sample.payload.to_bytes()))
    try:
        sub_driver(counter)
    finally:
        sub.undeclare()
        session.close()


# ============================================================================ request / reply


def rr_requester(args: dict[str, Any], request: Any, close: Any) -> None:
    """Closed loop: one request in flight; ``request(bytes) -> bytes | None`` (None: timeout)."""
    emit({"ready": True, "pid": os.getpid()})
    deadline = time.monotonic() + 30
    while request(payload(0, 64)) is None:  # warm-up: until the responder answers
        if time.monotonic() > deadline:
            emit({"error": "no reply to warm-up requests in 30 s"})
            close()
            return
    for _ in range(20):
        request(payload(0, 64))
    before = usage()
    rtts: list[float] = []
    lost = 0
    n, limit = args["n"], time.monotonic() + args.get("seconds", 30)
    t0 = time.perf_counter()
    for seq in range(n):
        sent = time.perf_counter_ns()
        reply = request(HEADER.pack(1, seq, sent) + b"x" * (args["size"] - HEADER.size))
        if reply is None:
            lost += 1
        else:
            rtts.append((time.perf_counter_ns() - sent) / 1000)
        if time.monotonic() > limit:
            break
    wall = time.perf_counter() - t0
    after = usage()
    emit({"result": {"sent": seq + 1, "replies": len(rtts), "lost": lost, "wall_s": wall,
                     "cpu_s": after["cpu_s"] - before["cpu_s"], "rtt_us": [round(v, 1) for v in rtts]}})
    close()


def paho_requester(args: dict[str, Any]) -> None:
    client = _paho(args, "req")
    got: queue.Queue[bytes] = queue.Queue()
    subscribed = threading.Event()
    client.on_message = lambda _c, _u, msg: got.put(msg.payload)
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_connect = lambda c, *_a: c.subscribe("rr/rep/#", 0)
    client.connect(args["host"], args["port"], keepalive=60)
    client.loop_start()
    subscribed.wait(15)
    me = f"rr/req/{os.getpid()}"

    def request(data: bytes) -> bytes | None:
        client.publish(me, data, 0)
        deadline = time.monotonic() + 1.0
        while True:
            try:
                reply = got.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if reply[:8] == data[:8]:
                return reply

    def close() -> None:
        client.disconnect()
        client.loop_stop()

    rr_requester(args, request, close)


def paho_responder(args: dict[str, Any]) -> None:
    client = _paho(args, "rsp")
    subscribed = threading.Event()

    def answer(c: Any, _u: Any, msg: Any) -> None:
        c.publish("rr/rep/" + msg.topic.rsplit("/", 1)[1], msg.payload, 0)

    client.on_message = answer
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_connect = lambda c, *_a: c.subscribe("rr/req/#", 0)
    client.connect(args["host"], args["port"], keepalive=60)
    client.loop_start()
    subscribed.wait(15)
    emit({"ready": True, "pid": os.getpid()})
    Commands().wait(PHASE_MAX_S * 2)
    client.disconnect()
    client.loop_stop()


def zenoh_queryable(args: dict[str, Any]) -> None:
    session = _zenoh(args)
    q = session.declare_queryable("rr/q", lambda query: query.reply("rr/q", query.payload.to_bytes()))
    emit({"ready": True, "pid": os.getpid()})
    Commands().wait(PHASE_MAX_S * 2)
    q.undeclare()
    session.close()


def zenoh_requester(args: dict[str, Any]) -> None:
    session = _zenoh(args)

    def request(data: bytes) -> bytes | None:
        for reply in session.get("rr/q", payload=data, timeout=1.0):
            if reply.ok is not None:
                return reply.ok.payload.to_bytes()
        return None

    rr_requester(args, request, session.close)


ROLES = {
    "paho-pub": paho_pub, "paho-sub": paho_sub,
    "zmesh-pub": lambda a: run_zmesh(_zmesh_pub(a)), "zmesh-sub": lambda a: run_zmesh(_zmesh_sub(a)),
    "raw-pub": raw_pub, "raw-sub": raw_sub, "zenoh-pub": zenoh_pub, "zenoh-sub": zenoh_sub,
    "paho-requester": paho_requester, "paho-responder": paho_responder,
    "zenoh-queryable": zenoh_queryable, "zenoh-requester": zenoh_requester,
}


def main() -> None:
    role, args = sys.argv[1], json.loads(sys.argv[2])
    if os.environ.get("ZMESH_BENCH_PROFILE"):
        import cProfile

        cProfile.runctx("ROLES[role](args)", globals(), {"role": role, "args": args, "ROLES": ROLES},
                        os.path.join(os.environ["ZMESH_BENCH_PROFILE"], f"{role}-{os.getpid()}.prof"))
        return
    try:
        ROLES[role](args)
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        emit({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)


if __name__ == "__main__":
    main()
