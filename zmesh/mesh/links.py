"""A node's links to its peers: the sockets towards one peer and the readers that take
frames straight off a ZeroMQ socket's descriptor.

The readers hand every frame to the ``Mesh`` (``_on_frame``, ``on_job``) in the same loop
turn, in bursts, and give the loop back between bursts; the mesh decides what a frame means.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

if TYPE_CHECKING:
    from zmesh.mesh.membership import Peer
    from zmesh.mesh.mesh import Mesh

log = logging.getLogger("zmesh.mesh")

EVENT_ERROR = "mesh_event_error"  # drop reason: an event frame whose handling failed
JOB_ERROR = "mesh_job_error"  # drop reason: a job frame whose handling failed
MAX_FRAMES_PER_WAKEUP = 64  # frames (of up to 1024 messages) per burst between yields
CONGESTION_DELAY = 0.01
# Plain ints: pyzmq's enum members cost ~2 us per call in `&` and flag handling.
NOBLOCK, EVENTS_, POLLIN_ = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)


class Link:
    """Our sockets towards one peer, and how far we have its retained state."""

    __slots__ = ("peer", "dealer", "reader", "sub", "sub_reader", "push", "tasks", "last_hello",
                 "synced_upto", "max_seen", "sync_pending", "last_sync", "announced_seq", "announced_at",
                 "twins", "twins_at")

    def __init__(self, peer: Peer, dealer: zmq.asyncio.Socket) -> None:
        self.peer = peer
        self.dealer = dealer
        self.reader: asyncio.Task[None] | None = None  # the task reading `dealer`
        self.sub: zmq.asyncio.Socket | None = None
        self.sub_reader: EventReader | None = None  # reads `sub`
        self.push: zmq.asyncio.Socket | None = None  # jobs to the peer's PULL, made on first use
        self.tasks: list[asyncio.Task[None]] = []
        self.last_hello = 0.0
        # Two addresses both saying hello with this peer's key (a copied secret), and when
        # that was last seen: our hellos name both while it lasts (see Mesh._hello).
        self.twins: tuple[tuple[str, int], tuple[str, int]] | None = None
        self.twins_at = 0.0
        self.reset_sync()

    def reset_sync(self) -> None:
        # Every retained frame of the peer up to `synced_upto` is reflected in our state;
        # None until a sync has completed since we (re)connected.
        self.synced_upto: int | None = None
        self.max_seen: int | None = None  # highest retained frame seen live since then
        self.sync_pending = False
        self.last_sync = 0.0
        # The peer's retained sequence from a hello that was ahead of `synced_upto`, and when
        # it came; still behind it RETAINED_GRACE later, its frame was lost, not late.
        self.announced_seq: int | None = None
        self.announced_at = 0.0


class EventReader:
    """Reads a peer's event frames straight off the SUB socket's file descriptor.

    pyzmq's awaitable recv costs ~175 Python calls and two event-loop turns per message and
    never yields while a message is waiting. Here the loop calls ``drain`` when ZeroMQ's
    descriptor signals; it takes what ZeroMQ holds (checking EVENTS, so no exception per
    wakeup) in bursts of MAX_FRAMES_PER_WAKEUP, handing each frame to the node in the same
    turn, and gives the loop back between bursts so subscribers, MQTT clients and
    heartbeats run. While a local subscriber is far behind, the next burst waits
    CONGESTION_DELAY: a stream waits in ZeroMQ's queue instead of being dropped, and one
    stalled consumer only slows the node's intake."""

    def __init__(self, mesh: Mesh, link: Link, sub: zmq.asyncio.Socket) -> None:
        self.mesh, self.link = mesh, link
        self.raw: zmq.Socket[bytes] = zmq.Socket.shadow(sub.underlying)
        self.loop = asyncio.get_running_loop()
        self.fd = int(self.raw.getsockopt(zmq.FD))
        self.next: asyncio.Handle | None = None
        self.closed = False
        self.loop.add_reader(self.fd, self.drain)
        self.next = self.loop.call_soon(self.drain)  # the descriptor is edge-triggered

    def drain(self) -> None:
        # Called by the descriptor or by the handle in `next`; either way no other call
        # may stay pending: one left behind unreferenced would run after close() on a
        # closed socket (a hostile peer's restarts made that happen within seconds).
        if self.next is not None:
            self.next.cancel()
            self.next = None
        if self.closed:
            return
        recv, events, on_frame, link = self.raw.recv, self.raw.getsockopt, self.mesh._on_frame, self.link
        # The first frame is taken before asking EVENTS: after a wake-up for a lone message,
        # EVENTS costs ~10 us (it reads ZeroMQ's mailbox) that the message need not wait for.
        # The loop below still ends on an EVENTS check, which is what re-arms the
        # edge-triggered descriptor.
        try:
            first: bytes | None = recv(NOBLOCK)
        except zmq.Again:
            first = None
        frames = 0
        # Each frame in its own try: an exception escaping drain() would leave the
        # edge-triggered descriptor unarmed (no EVENTS check), and no later frame from this
        # peer would ever be read. One frame that cannot be handled costs only itself.
        if first is not None:
            try:
                on_frame(link, first)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
            frames = 1
        while frames < MAX_FRAMES_PER_WAKEUP and not self.closed and events(EVENTS_) & POLLIN_:  # type: ignore[operator,arg-type]
            frame = recv(NOBLOCK)
            frames += 1
            try:
                on_frame(link, frame)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
        if self.closed:  # a frame's handling closed this link (the socket is gone)
            return
        if frames:
            self.mesh.stats["frames_in"] += frames
        if frames >= MAX_FRAMES_PER_WAKEUP and self.next is None:
            if self.mesh.congested():
                self.next = self.loop.call_later(CONGESTION_DELAY, self.drain)
            else:
                self.next = self.loop.call_soon(self.drain)

    def _failed(self, exc: Exception) -> None:
        self.mesh.drop(EVENT_ERROR, f"{self.link.peer.label}: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        # Unhook the descriptor before the socket (and so the fd number) goes away.
        self.closed = True
        self.loop.remove_reader(self.fd)
        if self.next is not None:
            self.next.cancel()
            self.next = None


class JobReader:
    """Reads job and report frames straight off the PULL socket's descriptor, in bursts, as
    ``EventReader`` does for events: an awaited recv per frame cost more than the jobs in
    it. The sender is the key ZAP authenticated (``User-Id``), never the frame's word."""

    def __init__(self, mesh: Mesh, pull: zmq.asyncio.Socket) -> None:
        self.mesh = mesh
        self.raw: zmq.Socket[bytes] = zmq.Socket.shadow(pull.underlying)
        self.loop = asyncio.get_running_loop()
        self.fd = int(self.raw.getsockopt(zmq.FD))
        self.closed = False
        self.loop.add_reader(self.fd, self.drain)
        self.next: asyncio.Handle | None = self.loop.call_soon(self.drain)  # edge-triggered

    def drain(self) -> None:
        if self.next is not None:  # see EventReader.drain: no call left pending
            self.next.cancel()
            self.next = None
        if self.closed:
            return
        raw, ring, mesh = self.raw, self.mesh.transport.ring, self.mesh
        frames = 0
        while frames < MAX_FRAMES_PER_WAKEUP and raw.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[operator]
            frame = raw.recv(zmq.NOBLOCK, copy=False)
            frames += 1
            key = str(frame.get("User-Id"))  # the sender, as ZAP authenticated it
            if mesh.on_job is not None and key.encode() in ring:
                try:
                    mesh.on_job(key, frame.bytes)
                except Exception as exc:  # noqa: BLE001 - the next frames still come
                    mesh.drop(JOB_ERROR, f"{key[:8]}: {type(exc).__name__}: {exc}")
        if frames >= MAX_FRAMES_PER_WAKEUP:
            self.next = self.loop.call_soon(self.drain)

    def close(self) -> None:
        self.closed = True
        self.loop.remove_reader(self.fd)
        if self.next is not None:
            self.next.cancel()
            self.next = None


def try_send(sock: zmq.asyncio.Socket, data: bytes) -> bool:
    try:
        zmq.Socket.shadow(sock.underlying).send(data, zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False  # handshake not done (IMMEDIATE) or peer gone: the next tick retries
    finally:
        rearm(sock)


def rearm(sock: zmq.asyncio.Socket) -> None:
    """Call after any send on a synchronous view of ``sock`` while a coroutine may be
    awaiting ``sock.recv()``.

    ZeroMQ's descriptor is edge-triggered, and a send processes the socket's pending
    commands: the one saying "a message arrived" is consumed there, and the descriptor
    never signals again while that message waits unread. pyzmq's own send checks for this;
    a send on a synchronous view does not, and the awaiting recv slept for good (a DEALER's
    sync answer was lost this way 1 run in ~10, and its delivery controls could be too).
    Asking the asyncio socket for EVENTS makes pyzmq schedule the waiting recv (a no-op
    when nobody waits): one getsockopt."""
    sock.get(zmq.EVENTS)
