"""What a node holds for 10,000 persistent sessions at the default limits (issue 14, hole 7).

Starts one node with the default config, makes 10,000 clean-session-0 sessions that
subscribe to ``mem/#`` at QoS 1 and go away, then publishes QoS 1 messages to ``mem/t``
until the node-wide budget (``mqtt.max_queued_bytes_total``) refuses more. Prints the
node's resident memory at each step and what ``$SYS/zmesh/node`` says it holds.
Run: ``python -m benchmarks.queued_memory [payload_bytes]`` (about a minute).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import NodeProcess, RawMQTT, connect_packet, make_certs, publish_packet
from tests.mqttkit import subscribe_311

SESSIONS = 10_000
BATCH = 500


def rss_mib(node: NodeProcess) -> float:
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    payload = b"p" * int(sys.argv[1] if len(sys.argv) > 1 else 1000)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        node = NodeProcess(workdir, "a", make_certs(workdir / "certs", ["a"]), extra=["--log-level", "warning"])
        try:
            print(f"node started: {rss_mib(node):.0f} MiB")
            start = time.monotonic()
            for first in range(0, SESSIONS, BATCH):
                raws = [RawMQTT(node.mqtt_port) for _ in range(BATCH)]
                for i, raw in enumerate(raws):
                    raw.send(connect_packet(f"mem-{first + i}", clean=False) + subscribe_311(1, "mem/#", 1) + b"\xe0\x00")
                for raw in raws:
                    raw.closed_within(30)
                    raw.close()
            mqtt = node.sys_value("$SYS/zmesh/node")["mqtt"]
            print(f"{mqtt['sessions_offline']} offline sessions ({time.monotonic() - start:.0f} s): {rss_mib(node):.0f} MiB")
            with RawMQTT(node.mqtt_port) as writer:
                writer.connect("writer")
                n = 0
                while True:
                    n += 1
                    writer.send(publish_packet("mem/t", payload, qos=1, packet_id=n % 65535 + 1))
                    writer.read_packet(120)
                    if n % 10 == 0:
                        stats = node.sys_value("$SYS/zmesh/node")
                        if stats["drops"].get("mqtt_queue_budget"):
                            break
            stats = node.sys_value("$SYS/zmesh/node")
            held = stats["mqtt"]["queued_bytes"] / 2**20
            print(f"{n} messages of {len(payload)} B to each session; held {held:.0f} MiB by the node's count; "
                  f"drops {stats['drops']}: {rss_mib(node):.0f} MiB resident")
        finally:
            node.stop()


if __name__ == "__main__":
    main()
