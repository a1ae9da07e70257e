"""What reliable delivery's pure core costs per message (docs/delivery.md, "Costs").

No sockets, no node: the origin's outbox (append, frame cut, mark sent, ack) with 0, 1, 2
and 4 destinations, the receiver's decode + order + acknowledge, the stream frame's
encoding, and the memory a held message takes. About 10 s on 2 cores. Times are this
process's CPU time (``time.process_time``), so that other work on a shared machine inflates
them less than wall-clock time would.

    python -m benchmarks.delivery_core [--n 100000] [--save]

``--save`` writes ``benchmarks/results/delivery-core-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import tracemalloc
from pathlib import Path

from zmesh.mesh import streamwire as sw
from zmesh.mesh import wire
from zmesh.mesh.outbox import Outbox, OutboxConfig
from zmesh.mesh.streams import StreamState

DESTS = [f"{i:040d}" for i in range(4)]
TOPIC = "alerts/pod-17"
PAYLOAD = b"x" * 64
FRAME = 1024


def _messages(n: int) -> list[sw.StreamEntry]:
    return [sw.StreamEntry(TOPIC, PAYLOAD, 1, 1_700_000_000_000 + i, None) for i in range(n)]


def origin_us(messages: list[sw.StreamEntry], k: int) -> float:
    """Per message: append for k destinations, then per frame of FRAME: cut, mark, ack."""
    config = OutboxConfig(window=1 << 30, window_bytes=1 << 40, backfill_window=0.0)
    epochs = itertools.count(1)
    outbox = Outbox(config, lambda: next(epochs))
    dests = DESTS[:k]
    now = 0.0
    start = time.process_time()
    for i, message in enumerate(messages):
        outbox.append(message, dests, now)
        if i % FRAME == FRAME - 1:
            now += 0.001
            for dest in dests:
                epoch = 0
                while True:
                    epoch, first, entries = outbox.sendable(dest)
                    if not entries:
                        break
                    outbox.mark_sent(dest, epoch, first + len(entries) - 1, now)
                outbox.ack(dest, epoch, outbox.streams[dest].sent, now)
    return (time.process_time() - start) / len(messages) * 1e6


def receiver_us(messages: list[sw.StreamEntry]) -> float:
    frames = [sw.encode_frame(DESTS[0], 1, i + 1, messages[i : i + FRAME]) for i in range(0, len(messages), FRAME)]
    state = StreamState("origin")
    start = time.process_time()
    for frame in frames:
        state.on_frame(sw.decode_frame(frame, DESTS[0]), 0.0)
        state.poll(0.0)
    assert state.delivered == len(messages)
    return (time.process_time() - start) / len(messages) * 1e6


def encode_us(messages: list[sw.StreamEntry]) -> float:
    start = time.process_time()
    for i in range(0, len(messages), FRAME):
        sw.encode_frame(DESTS[0], 1, i + 1, messages[i : i + FRAME])
    return (time.process_time() - start) / len(messages) * 1e6


def today_decode_us(n: int) -> tuple[float, float, float]:
    """Today's QoS 1 event frame, for comparison: decode cost and bytes per message."""
    items = [wire.encode_item(PAYLOAD, 1, False, 0, None)] * FRAME
    frame = wire.encode_event_frame(TOPIC.encode(), items)
    start = time.process_time()
    for _ in range(n // FRAME):
        wire.decode_event_frame(frame)
    stream = sw.encode_frame(DESTS[0], 1, 1, _messages(FRAME))
    return (time.process_time() - start) / (n // FRAME * FRAME) * 1e6, len(frame) / FRAME, len(stream) / FRAME


def memory_bytes(k: int, n: int = 20_000) -> float:
    outbox = Outbox(OutboxConfig(max_bytes=1 << 40), lambda: 1)
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for i in range(n):
        outbox.append(sw.StreamEntry(TOPIC, PAYLOAD, 1, 1_700_000_000_000 + i, None), DESTS[:k], 0.0)
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return (used - base) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    messages = _messages(args.n)
    result: dict[str, object] = {"n": args.n, "payload_bytes": len(PAYLOAD), "topic": TOPIC,
                                 "loadavg": os.getloadavg()}
    result["origin_us_per_message"] = {k: round(origin_us(messages, k), 2) for k in (0, 1, 2, 4)}
    result["receiver_us_per_message"] = round(receiver_us(messages), 2)
    result["encode_us_per_message"] = round(encode_us(messages), 2)
    decode, today_bytes, stream_bytes = today_decode_us(args.n)
    result["today_decode_event_frame_us_per_message"] = round(decode, 2)
    result["bytes_per_message"] = {"today_event_frame": round(today_bytes, 1), "stream_frame": round(stream_bytes, 1)}
    result["memory_bytes_per_held_message"] = {k: round(memory_bytes(k)) for k in (0, 1, 2, 4)}
    print(json.dumps(result, indent=2))
    if args.save:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = Path(__file__).parent / "results" / f"delivery-core-{stamp}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
