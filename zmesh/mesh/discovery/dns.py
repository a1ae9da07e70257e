"""DNS discovery for Kubernetes, where pod networks carry no multicast.

A headless Service (``clusterIP: None``) answers its name with one A record per pod. We
resolve it every ``interval`` seconds and hint every address; where the zone also has
``_zmesh._tcp.<name>`` SRV records (a Service with a port named ``zmesh``), their ports
win over the configured one. With ``publishNotReadyAddresses: true`` on the Service a pod
is in DNS before it is Ready, so nodes find each other while starting (see
nodes/kubernetes/base/service.yaml). SRV lookups use dnspython (the well-kept resolver library, since
the standard library has none); A lookups use the system resolver, so /etc/hosts works too.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import dns.asyncresolver
import dns.exception

from zmesh.mesh.discovery import Hint, HintSink

log = logging.getLogger("zmesh.discovery.dns")


class DnsDiscovery:
    def __init__(self, name: str, port: int, interval: float, sink: HintSink) -> None:
        self.name, self.port, self.interval, self.sink = name.rstrip("."), port, interval, sink
        self._task: asyncio.Task[None] | None = None
        self._seen: set[tuple[str, int]] = set()
        self.failures = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dns-discovery")
        log.info("DNS discovery: resolving %s every %g s", self.name, self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.interval)

    async def poll(self) -> list[tuple[str, int]]:
        """Resolve once and hint every address found; returns them."""
        targets = await self._srv() or [(self.name, self.port)]
        found: list[tuple[str, int]] = []
        for host, port in targets:
            for address in await self._addresses(host):
                found.append((address, port))
        for address, port in found:
            if (address, port) not in self._seen:
                log.info("DNS: %s has %s:%d", self.name, address, port)
            self.sink.found(Hint(address, port, None, None, "dns"))
        if found:  # a failed lookup says nothing about who left
            for address, port in self._seen - set(found):
                log.info("DNS: %s no longer has %s:%d", self.name, address, port)
                self.sink.lost(Hint(address, port, None, None, "dns"))
            self._seen = set(found)
        return found

    async def _srv(self) -> list[tuple[str, int]]:
        try:
            # Short: where no server answers (no port-unreachable reaches asyncio UDP) this
            # wait delays every poll; cluster DNS answers in milliseconds.
            answer = await dns.asyncresolver.resolve(f"_zmesh._tcp.{self.name}", "SRV", lifetime=0.5)
        except (dns.exception.DNSException, OSError):
            return []  # no SRV records: the A records and the configured port it is
        return [(str(r.target).rstrip("."), int(r.port)) for r in answer]  # type: ignore[attr-defined]

    async def _addresses(self, host: str) -> list[str]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, family=socket.AF_INET, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 60 == 0:
                log.warning("DNS: %s does not resolve (%s); retrying every %g s", host, exc, self.interval)
            return []
        self.failures = 0
        return sorted({str(info[4][0]) for info in infos})

