"""The ops listener and the drain, with real node processes: /readyz turns ready when the
node joins, /metrics moves with traffic across the mesh, SIGTERM drains (MQTT 5 clients
told 0x8B, a held job handed back long before its lease ends, exit 0 within the grace)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    MqttSubmitter,
    MqttWorker,
    NodeProcess,
    Publisher,
    RawMQTT,
    Subscriber,
    await_route,
    make_certs,
    packet,
    stop_all,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.timeout(90)


def http_node(workdir: Path, name: str, certs: Path, grace: float = 20.0, **kwargs: Any) -> NodeProcess:
    config = write_config(workdir / f"{name}.toml", f"""
[node]
name = "{name}"
shutdown_grace = {grace}
[http]
listen = "127.0.0.1:0"
""")
    extra = kwargs.pop("extra", []) + ["--config", str(config)]
    return NodeProcess(workdir, name, certs, extra=extra, **kwargs)


def http_port(node: NodeProcess) -> int:
    return int(json.loads(node.ready_file.read_text())["http_port"])


def get(node: NodeProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port(node)}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(node: NodeProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(node, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def raw_http(node: NodeProcess, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", http_port(node)), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_probes_turn_ready_on_join_and_metrics_move(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["a", "b"])
    # b's port, held (bound, not listening) while a starts, so that none of a's own
    # ephemeral ports can take it; released just before b binds it.
    reserve = socket.socket()
    reserve.bind(("127.0.0.1", 0))
    b_port = reserve.getsockname()[1]
    started: list[NodeProcess] = []
    try:
        a = http_node(tmp_path, "a", certs, seeds=[b_port])
        started.append(a)
        assert get(a, "/healthz") == (200, "ok\n")
        status, body = get(a, "/readyz")
        assert status == 503 and "no peer up yet" in body, body  # its seed is not there yet
        reserve.close()
        b = http_node(tmp_path, "b", certs, control_port=b_port)
        started.append(b)
        wait_until(lambda: get(a, "/readyz")[0] == 200 and get(b, "/readyz")[0] == 200, 15, "both ready")

        before_a, before_b = samples(a), samples(b)
        with Subscriber(b.mqtt_port, "m/#", qos=1) as on_b, Publisher(a.mqtt_port) as pub:
            for i in range(20):
                pub.publish("m/x", f"p{i}", qos=1)
            got = [on_b.get().payload for _ in range(20)]
        assert got == [f"p{i}".encode() for i in range(20)]
        after_a, after_b = samples(a), samples(b)

        def moved(before: dict, after: dict, name: str, labels: tuple = ()) -> float:
            return after.get((name, labels), 0) - before.get((name, labels), 0)

        assert moved(before_a, after_a, "zmesh_mesh_messages_total", (("direction", "out"),)) >= 20
        assert moved(before_a, after_a, "zmesh_mesh_bytes_total", (("direction", "out"),)) > 20 * 2
        assert moved(before_b, after_b, "zmesh_mesh_messages_total", (("direction", "in"),)) >= 20
        assert moved(before_b, after_b, "zmesh_delivery_latency_seconds_count") == 20
        assert after_b[("zmesh_delivery_latency_seconds_bucket", (("le", "+Inf"),))] == after_b[("zmesh_delivery_latency_seconds_count", ())]
        assert after_b[("zmesh_peers", (("state", "up"),))] == 1
        assert after_b[("zmesh_ready", ())] == 1
        assert ("zmesh_event_loop_lag_seconds", ()) in after_a
        assert after_a[("zmesh_event_loop_stalls_total", ())] >= 0

        # A client that never acknowledges: past its 20 in flight, messages wait for it.
        with RawMQTT(b.mqtt_port) as stalled, Publisher(a.mqtt_port) as pub, \
                Subscriber(b.mqtt_port, "q/#", qos=1) as witness:
            # The route a -> b for q/# first: a message published on a before b's interest
            # reaches a is not sent (cross-node delivery right after SUBACK is issue 17's).
            await_route(pub, witness, "q/probe")
            stalled.connect("stalled")
            stalled.send(packet(0x82, b"\x00\x01" + b"\x00\x03q/#" + b"\x01"))  # SUBSCRIBE q/# QoS 1
            assert stalled.read_packet()[0] >> 4 == 9  # SUBACK
            for _ in range(50):
                pub.publish("q/x", b"y" * 100, qos=1)
            wait_until(lambda: samples(b).get(("zmesh_queued_messages", ()), 0) >= 30, 10, "30 messages queued at b")
            assert samples(b)[("zmesh_queued_bytes", ())] >= 50 * 100  # held: in flight and queued
            assert samples(b)[("zmesh_mqtt_connections", ())] >= 1

        # Hostile or stray requests: refused, bounded, and the server still answers.
        assert raw_http(a, b"GET /" + b"x" * 10_000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 431")
        assert raw_http(a, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
        assert raw_http(a, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert get(a, "/nope")[0] == 404
        assert get(a, "/healthz")[0] == 200
        assert samples(a)[("zmesh_dropped_total", (("reason", "http_refused"),))] >= 2
    finally:
        reserve.close()
        stop_all(started)


def test_sigterm_drains_within_the_grace(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["a", "b"])
    started: list[NodeProcess] = []
    clients: list[Any] = []
    try:
        a = http_node(tmp_path, "a", certs)
        started.append(a)
        b = http_node(tmp_path, "b", certs, grace=5.0, seeds=[a.control_port])
        started.append(b)
        wait_until(lambda: get(b, "/readyz")[0] == 200, 15, "b ready")
        queue_name = f"q{uuid.uuid4().hex[:6]}"
        # A worker on b that holds its job (never answers), and an MQTT 5 client on b.
        holder = MqttWorker(b.mqtt_port, queue_name, lambda job_id, payload: None, name="holder")
        clients.append(holder)
        reasons: list[int] = []
        v5 = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="v5", protocol=mqtt.MQTTv5)
        v5.on_disconnect = lambda c, u, flags, rc, props: reasons.append(rc.value)
        v5.connect("127.0.0.1", b.mqtt_port)
        v5.loop_start()
        clients.append(v5)
        wait_until(v5.is_connected, 10, "the MQTT 5 client connected")
        wait_until(lambda: a.sys_value("$SYS/zmesh/jobs") is not None and
                   any(p["name"] == "b" for p in a.sys_value("$SYS/zmesh/peers")), 10, "a to know b")
        submitter = MqttSubmitter(a.mqtt_port)
        clients.append(submitter)
        submitter.submit(queue_name, {"j1": b"scan"})
        wait_until(lambda: holder.received == ["j1"], 15, "the job held on b")
        # Now a worker on a that answers: the handed-back job must reach it.
        answerer = MqttWorker(a.mqtt_port, queue_name, lambda job_id, payload: b"done", name="answerer")
        clients.append(answerer)

        t0 = time.monotonic()
        code = b.stop(timeout=10)  # SIGTERM
        drained = time.monotonic() - t0
        log = b.log_path.read_text()  # stop() closed the node's log
        assert code == 0, log[-2000:]
        assert drained < 5.0, f"drain took {drained:.2f} s, grace 5 s"
        assert "draining" in log and "drained in" in log
        wait_until(lambda: reasons, 5, "the MQTT 5 client's disconnect")
        assert reasons[0] == 0x8B, reasons  # server shutting down
        # Handed back by the goodbye: sooner than b's expiry at a (peer_expiry, 5 s), let
        # alone the job's lease (30 s).
        wait_until(lambda: "j1" in answerer.answered, 4, "the handed-back job done on a")
    finally:
        for client in reversed(clients):
            try:
                if isinstance(client, mqtt.Client):
                    client.disconnect()
                    client.loop_stop()
                else:
                    client.close()
            except Exception:
                pass
        stop_all(started)


def test_readiness_turns_false_at_once_and_mqtt_refuses_while_draining(tmp_path: Path) -> None:
    """In process, with the drain held half way (the job service's stop waits for the
    test): /readyz already says draining, /healthz still says alive, and a new MQTT
    connection is refused; released, the drain completes."""
    import asyncio

    from zmesh.config import load_config
    from zmesh.node import Node

    certs = make_certs(tmp_path / "certs", ["solo"])

    async def http_get(port: int, path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data

    async def scenario() -> None:
        config = load_config(None, {"node.name": "solo", "mesh.cert": str(certs / "solo.key_secret"),
                                    "mesh.listen": "127.0.0.1:0", "mqtt.listen": "127.0.0.1:0",
                                    "http.listen": "127.0.0.1:0"})
        node = Node(config)
        await node.start()
        port, mqtt_port = node.ops.address[1], node.mqtt_address[1]
        assert (await http_get(port, "/readyz")).startswith(b"HTTP/1.1 200")  # alone by design
        held, release = asyncio.Event(), asyncio.Event()
        real_stop = node.jobs.stop

        async def slow_stop() -> None:
            held.set()
            await release.wait()
            await real_stop()

        node.jobs.stop = slow_stop  # type: ignore[method-assign]
        drain = asyncio.create_task(node.drain())
        await asyncio.wait_for(held.wait(), 5)
        ready = await http_get(port, "/readyz")
        assert ready.startswith(b"HTTP/1.1 503") and b"draining" in ready, ready
        assert (await http_get(port, "/healthz")).startswith(b"HTTP/1.1 200")
        with pytest.raises(OSError):  # no new MQTT clients from the first moment
            await asyncio.open_connection("127.0.0.1", mqtt_port)
        release.set()
        await asyncio.wait_for(drain, 10)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(scenario())
