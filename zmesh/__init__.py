"""zmesh: a brokerless messaging mesh. MQTT topics over CURVE-secured ZeroMQ."""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Message", "Node", "Subscription", "__version__"]

if TYPE_CHECKING:
    from zmesh.node import Node
    from zmesh.subscription import Message, Subscription


def __getattr__(name: str) -> Any:
    # Lazy, so `zmesh --help` and the pure modules do not pay for importing zmq.
    if name == "Node":
        from zmesh import node

        return node.Node
    if name in ("Message", "Subscription"):
        from zmesh import subscription

        return getattr(subscription, name)
    raise AttributeError(name)
