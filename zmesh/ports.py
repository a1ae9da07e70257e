"""The narrow interfaces a service is given instead of the Node. Pure: typing only.

Each service names here what it needs of the rest of the node, and ``zmesh.node`` (the one
wiring room) hands it an object that has it: the Node itself for ``Publisher`` and
``Broker``, the ``Mesh`` for ``JobMesh``. A service can therefore be read, tested and replaced
alone, with a fake that has these few methods, and no module but ``node.py`` and the CLI
imports ``zmesh.node`` (tests/unit/test_layout.py keeps it so).

May import: the standard library, and ``zmesh.mesh.wire`` for types only. Imported by the
services (``zmesh.jobs``, ``zmesh.mqtt.server``) and by ``zmesh.node``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio

    from zmesh.mesh.wire import Hello
    from zmesh.routing import Subscriber


class Publisher(Protocol):
    """Publish from this node: to its own subscribers now, to the mesh on the next flush."""

    def publish_nowait(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> asyncio.Future[None] | None: ...


class Broker(Publisher, Protocol):
    """What the MQTT front door needs of the node: publish, and (un)register subscribers
    with the node's router, which also replays retained messages and tells the mesh."""

    # True while a live message published with the retain flag is handed to local
    # subscribers (MQTT 5 "retain as published" needs to know).
    delivering_retained: bool

    def add_subscription(self, subscriber: Subscriber, filt: str, qos: int, retained: bool = True) -> None: ...

    def remove_subscription(self, subscriber: Subscriber, filt: str) -> bool: ...

    def remove_subscriber(self, subscriber: Subscriber) -> None: ...

    def may_publish(self, topic: str, publisher: Subscriber) -> bool:
        """Whether a client's session may publish to ``topic``, a ``$`` topic (the node's
        own namespace), beyond what its ACL allows; a refusal is counted by the node."""
        ...


class JobMesh(Protocol):
    """What the job service needs of the mesh: send job frames to a peer, say which queues
    this node serves, and hear peers' hellos and job frames."""

    on_hello: Callable[[str, Hello], None] | None
    on_job: Callable[[str, bytes], None] | None
    local_queues: dict[str, int]  # queue -> prefetch this node serves, told in hellos
    links: Mapping[str, Any]  # peer key -> link: the peers this node is connected to

    def job_socket(self, key: str) -> Any: ...

    def send_job(self, key: str, frame: bytes) -> bool: ...

    def announce(self) -> None: ...
