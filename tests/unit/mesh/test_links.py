"""A send on a synchronous view of a socket must not strand a recv awaiting on it.

ZeroMQ's descriptor is edge-triggered: whatever processes the socket's commands (a send,
an EVENTS check, a poll) consumes the signal that a message arrived. Here a raw poll on the
DEALER stands in for the start of a raw send: it takes the signal after the answer
has arrived and before the event loop has seen it. Without ``rearm`` in ``try_send``
the awaiting recv never wakes (the run that found this lost a sync answer for good)."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from zmesh.mesh.links import try_send


def test_a_raw_send_wakes_a_recv_waiting_on_the_same_socket() -> None:
    async def main() -> bytes:
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        dealer = ctx.socket(zmq.DEALER)
        try:
            port = router.bind_to_random_port("tcp://127.0.0.1")
            dealer.connect(f"tcp://127.0.0.1:{port}")
            await dealer.send(b"hello")
            ident, _ = await asyncio.wait_for(router.recv_multipart(), 5)
            reader = asyncio.ensure_future(dealer.recv())
            await asyncio.sleep(0)  # the reader is now waiting on the descriptor
            zmq.Socket.shadow(router.underlying).send_multipart([ident, b"answer"])
            # Without giving the loop a turn: the answer arrives and the raw view takes
            # ZeroMQ's "arrived" signal, as a raw send would.
            # (a blocking poll on the raw view, bounded: no loop turn in between).
            raw = zmq.Socket.shadow(dealer.underlying)
            assert raw.poll(5000, zmq.POLLIN), "the answer never reached the DEALER"
            assert try_send(dealer, b"next")
            return await asyncio.wait_for(reader, 2)
        finally:
            dealer.close(linger=0)
            router.close(linger=0)
            ctx.term()

    assert asyncio.run(main()) == b"answer"
