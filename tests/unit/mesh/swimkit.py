"""Test kit for the pure SWIM core: keys, a stand-in signer, and a lossy in-memory network.

The signer is a keyed BLAKE2b per member (64 bytes, like an XEdDSA signature): only the
holder of a member's secret can make a signature that ``verify`` accepts for that member,
which is all the state machine relies on. Messages cross the network encoded and decoded,
so every test also runs the codec.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field

from zmesh.mesh import swim

Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"


def make_key(rng: random.Random) -> str:
    return "".join(rng.choice(Z85) for _ in range(40))


class Crypto:
    """Per-key secrets; ``signer(key)`` signs as that key, ``verify`` checks any key."""

    def __init__(self) -> None:
        self.secrets: dict[str, bytes] = {}

    def add(self, key: str) -> None:
        self.secrets[key] = hashlib.blake2b(key.encode(), digest_size=32).digest()

    def signer(self, key: str) -> swim.Signer:
        secret = self.secrets[key]
        return lambda data: hashlib.blake2b(data, key=secret, digest_size=64).digest()

    def verify(self, key: str, data: bytes, sig: bytes) -> bool:
        secret = self.secrets.get(key)
        return secret is not None and hashlib.blake2b(data, key=secret, digest_size=64).digest() == sig


@dataclass
class Network:
    """Nodes, and messages in flight with loss and delay; time advances by ``run``."""

    seed: int = 1
    loss: float = 0.0
    delay: float = 0.001
    now: float = 0.0
    nodes: dict[str, swim.Swim] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)  # crashed: receive and send nothing
    crypto: Crypto = field(default_factory=Crypto)
    sent: int = 0
    bytes_sent: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._flight: list[tuple[float, int, str, str, bytes]] = []
        self._n = 0

    def add(self, config: swim.SwimConfig | None = None, key: str | None = None,
            base: swim.SharedTable | None = None) -> swim.Swim:
        key = key or make_key(self.rng)
        self.crypto.add(key)
        node = swim.Swim(
            key, f"n{len(self.nodes)}", "10.0.0.1", 7000 + len(self.nodes),
            incarnation=1, sign=self.crypto.signer(key), verify=self.crypto.verify, now=self.now,
            config=config, rng=random.Random(self.rng.random()), base=base,
        )
        self.nodes[key] = node
        return node

    def send(self, sender: str, out: list[swim.Send]) -> None:
        for to, message in out:
            data = swim.encode(message)
            self.sent += 1
            self.bytes_sent += len(data)
            if self.loss and self.rng.random() < self.loss:
                continue
            self._n += 1
            heapq.heappush(self._flight, (self.now + self.delay, self._n, to, sender, data))

    def run(self, seconds: float, step: float = 0.01) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + step, 9)
            while self._flight and self._flight[0][0] <= self.now:
                _, _, to, sender, data = heapq.heappop(self._flight)
                node = self.nodes.get(to)
                if node is None or to in self.down:
                    continue
                self.send(to, node.receive(sender, swim.decode(data), self.now))
            for key, node in self.nodes.items():
                if key not in self.down:
                    self.send(key, node.tick(self.now))

    def state(self, observer: str, member: str) -> swim.State | None:
        entry = self.nodes[observer].get(member)
        return None if entry is None else entry.state
