"""mDNS discovery with python-zeroconf's asyncio API, pinned to one interface.

We register ``NAME._zmesh._tcp.local.`` with the control port and, in TXT, the protocol
version, our name and our public key; and we browse for the others. Two choices make a
join fast and safe:

* Registration probes the network for ~1.6 s before it announces; browsing finds existing
  services in 40-200 ms. So registration runs in the background and we dial what we find
  at once: the found peer learns of us from our hello, not from our announcement.
* One interface only (default: the one holding the mesh listen address), IPv4 only, and
  only the address on that interface advertised and only peer addresses inside its subnet
  dialled: never every docker or veth bridge on the host, never an unreachable address that
  would leave a peer retrying it for minutes.

On shutdown the service is unregistered, which sends goodbye packets, so peers mark this
node down at once instead of waiting for heartbeats to expire.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from zmesh.mesh.discovery import SERVICE_TYPE, Hint, HintSink

log = logging.getLogger("zmesh.discovery.mdns")

RESOLVE_TIMEOUT_MS = 3000


class MdnsDiscovery:
    def __init__(
        self,
        name: str,
        key: str,
        control_port: int,
        network: ipaddress.IPv4Interface,
        version: int,
        sink: HintSink,
    ) -> None:
        self.name, self.key, self.control_port = name, key, control_port
        self.network, self.version, self.sink = network, version, sink
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._known: dict[str, Hint] = {}  # service name -> last hint, for goodbyes
        self._info: AsyncServiceInfo | None = None
        self.registered = asyncio.Event()

    async def start(self) -> None:
        address = str(self.network.ip)
        self._zc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(address)],
            port=self.control_port,
            properties={"v": str(self.version), "name": self.name, "key": self.key},
            server=f"{self.name}-zmesh.local.",
        )
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )
        self._spawn(self._register())
        log.info("mDNS: browsing and registering %s on %s", SERVICE_TYPE, self.network)

    async def _register(self) -> None:
        assert self._zc is not None and self._info is not None
        try:
            announced = await self._zc.async_register_service(self._info, allow_name_change=False)
            await announced
            self.registered.set()
            log.debug("mDNS: registered %s", self._info.name)
        except Exception as exc:  # a name conflict or socket trouble: say so, keep browsing
            log.error("mDNS: could not register %s: %s", self.name, exc)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()  # unregisters: goodbye packets go out here

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if name == f"{self.name}.{SERVICE_TYPE}":
            return  # ourselves
        if state_change is ServiceStateChange.Removed:
            hint = self._known.pop(name, None)
            if hint is not None:
                log.info("mDNS: %s said goodbye", hint.name or name)
                self.sink.lost(hint)
        else:
            self._spawn(self._resolve(name))

    async def _resolve(self, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("mDNS: %s did not resolve", name)
            return
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
        key, peer_name = props.get("key") or None, props.get("name") or None
        for address in info.parsed_addresses(IPVersion.V4Only):
            if ipaddress.IPv4Address(address) not in self.network.network:
                log.debug("mDNS: %s advertises %s, outside %s: ignored", name, address, self.network)
                continue
            if info.port is None:
                continue
            hint = Hint(address, info.port, key, peer_name, "mdns")
            self._known[name] = hint
            self.sink.found(hint)
            return
