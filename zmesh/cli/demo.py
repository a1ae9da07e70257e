"""`zmesh demo`: three real node processes on loopback, their own temporary certificates,
and ordinary MQTT clients showing messages crossing the mesh."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from zmesh.mqtt.client import Client
from zmesh.security.certs import create_certificate

NAMES = ("alpha", "beta", "gamma")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


async def start_node(workdir: Path, name: str, control: int, seeds: list[int]) -> asyncio.subprocess.Process:
    ready = workdir / f"{name}.ready"
    args = [
        # -P: not the working directory first on sys.path (see zmesh.cli.daemon.exec_node).
        sys.executable, "-P", "-m", "zmesh", "node", "run",
        "--name", name,
        "--cert", str(workdir / "certs" / f"{name}.key_secret"),
        "--trusted", str(workdir / "certs"),
        "--listen", f"127.0.0.1:{control}",
        "--mqtt", "127.0.0.1:0",
        "--ready-file", str(ready),
        "--log-level", "warning",
    ]
    for seed in seeds:
        args += ["--peer", f"127.0.0.1:{seed}"]
    # A session of its own: Ctrl-C in the terminal reaches the demo only, which then stops the
    # nodes in order (clients first), instead of every node dying under its clients at once.
    return await asyncio.create_subprocess_exec(*args, start_new_session=True)


async def wait_ready(workdir: Path, name: str, process: asyncio.subprocess.Process) -> int:
    ready = workdir / f"{name}.ready"
    deadline = time.monotonic() + 20
    while not ready.exists():
        if process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"node {name} did not start")
        await asyncio.sleep(0.05)
    return int(json.loads(ready.read_text())["mqtt_port"])


async def wait_mesh(port: int, expected: int) -> None:
    """Ask a node for its peers over MQTT until ``expected`` are up."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        client = Client()
        await client.connect("127.0.0.1", port)
        try:
            await client.subscribe([("$SYS/zmesh/peers", 0)])
            async for msg in client.messages():
                peers = json.loads(msg.payload)
                if sum(p["state"] == "up" for p in peers) >= expected:
                    return
        finally:
            await client.disconnect()
    raise RuntimeError("the mesh did not form")


PROBE = "demo/route-probe"


async def receive(client: Client, label: str, count: int, topic: str = "") -> None:
    """Print what arrives until ``count`` messages on ``topic`` (any topic if empty) came."""
    got = 0
    async for msg in client.messages():
        if msg.topic == PROBE:
            continue  # a late copy of a route probe (below): not news
        flag = " (retained)" if msg.retain else ""
        say(f"  {label} got {msg.topic} = {msg.payload.decode(errors='replace')}{flag}")
        got += not topic or msg.topic == topic
        if got >= count:
            return


async def await_routes(publisher: Client, subscribers: list[Client], timeout: float = 10) -> None:
    """Probe until every subscriber hears the publisher's node: a new subscription takes a
    moment to reach the publishing node (ZeroMQ sends it upstream), and the demo's first
    message should arrive once, not be repeated until it does."""
    heard = [asyncio.create_task(_first_probe(c)) for c in subscribers]
    try:
        async with asyncio.timeout(timeout):
            while not all(t.done() for t in heard):
                await publisher.publish(PROBE, b"", qos=0)
                await asyncio.wait(heard, timeout=0.1)
    finally:
        for task in heard:
            task.cancel()
        await asyncio.gather(*heard, return_exceptions=True)


async def _first_probe(client: Client) -> None:
    async for msg in client.messages():
        if msg.topic == PROBE:
            return


async def run_demo(duration: float = 0) -> int:
    with tempfile.TemporaryDirectory(prefix="zmesh-demo-") as tmp:
        workdir = Path(tmp)
        say(f"creating CURVE certificates for {', '.join(NAMES)} in {workdir / 'certs'}")
        for name in NAMES:
            create_certificate(workdir / "certs", name)
        controls = [free_port() for _ in NAMES]
        processes = []
        try:
            for i, name in enumerate(NAMES):
                seeds = [controls[0]] if i else []
                say(f"starting node {name}: mesh 127.0.0.1:{controls[i]}" + (f", seed 127.0.0.1:{controls[0]}" if seeds else ""))
                processes.append(await start_node(workdir, name, controls[i], seeds))
            ports = [await wait_ready(workdir, n, p) for n, p in zip(NAMES, processes, strict=True)]
            for name, port in zip(NAMES, ports, strict=True):
                say(f"node {name}: MQTT on 127.0.0.1:{port}")
            await wait_mesh(ports[2], 2)
            say("mesh formed: every node sees the other two (learned from one seed)")

            subscribers = []
            for name, port in zip(NAMES[1:], ports[1:], strict=True):
                client = Client(f"demo-sub-{name}")
                await client.connect("127.0.0.1", port)
                await client.subscribe([("alerts/#", 1), ("config/#", 1), (PROBE, 0)])
                subscribers.append((client, name))
            publisher = Client("demo-pub")
            await publisher.connect("127.0.0.1", ports[0])
            await await_routes(publisher, [c for c, _ in subscribers])

            say(f"publishing alerts/disk on {NAMES[0]}; subscribers on {NAMES[1]} and {NAMES[2]}")
            waits = [asyncio.create_task(receive(c, f"subscriber on {n}", 1)) for c, n in subscribers]
            await publisher.publish("alerts/disk", b"/var at 91%", qos=1)
            await asyncio.wait_for(asyncio.gather(*waits), 10)
            say(f"publishing retained config/threshold=90 on {NAMES[0]}")
            waits = [asyncio.create_task(receive(c, f"subscriber on {n}", 1, "config/threshold")) for c, n in subscribers]
            await publisher.publish("config/threshold", b"90", qos=1, retain=True)
            await asyncio.wait_for(asyncio.gather(*waits), 10)  # so gamma holds it too
            late = Client("demo-late")
            await late.connect("127.0.0.1", ports[2])
            await late.subscribe([("config/#", 0)])
            say(f"a late subscriber on {NAMES[2]} subscribes to config/# ...")
            await asyncio.wait_for(receive(late, f"late subscriber on {NAMES[2]}", 1), 10)
            await late.disconnect()

            say("streaming a tick every second" + (f" for {duration:g} s" if duration else "; Ctrl-C stops"))
            streams = [asyncio.create_task(receive(c, f"subscriber on {n}", 10**9)) for c, n in subscribers]
            started = time.monotonic()
            tick = 0
            try:
                while not duration or time.monotonic() - started < duration:
                    tick += 1
                    await publisher.publish("alerts/tick", f"tick {tick}".encode(), qos=1)
                    await asyncio.sleep(1)
            finally:  # also on Ctrl-C (the main task is cancelled): clients go before nodes
                for task in streams:
                    task.cancel()
                await asyncio.gather(*streams, return_exceptions=True)
                await publisher.disconnect()
                for client, _ in subscribers:
                    await client.disconnect()
            say("done")
            return 0
        finally:
            for process in processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(process.wait(), 10)
                if process.returncode is None:
                    process.kill()
            say("nodes stopped")
