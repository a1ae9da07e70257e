"""`zmesh doctor`: the checks a user would otherwise do by hand, each saying ok or what to do.

It reads the same configuration as `zmesh node run` and, without starting a node, checks:
the certificate and trusted keys load; the control and MQTT ports can be bound (and each
TLS listener's certificate and key load); multicast
works on the mDNS interface; the DNS name resolves; and every seed answers a CURVE hello
with a key we trust (which also proves the seed trusts our key).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from zmesh import wire
from zmesh.certs import CertError, KeyRing, load_secret_certificate
from zmesh.config import ListenerConfig, NodeConfig, parse_hostport
from zmesh.discovery import netif

PROBE_TIMEOUT = 3.0
MULTICAST_TEST_GROUP = "239.255.77.77"  # administratively scoped: stays on the local segment


@dataclass
class Check:
    ok: bool
    what: str
    advice: str = ""


async def run_checks(config: NodeConfig, report: Callable[[Check], None]) -> bool:
    """Run every check that applies, reporting each; True when all passed."""
    results: list[Check] = []

    def note(check: Check) -> None:
        results.append(check)
        report(check)

    identity = _check_certs(config, note)
    _check_bind("mesh control", config.mesh.listen, note)
    for listener in config.mqtt.all_listeners:
        _check_bind(f"MQTT {listener.key} ({listener.scheme})", listener.address, note)
        if listener.tls:
            _check_tls(config, listener, note)
    if "mdns" in config.discovery.mode:
        _check_multicast(config, note)
    if "dns" in config.discovery.mode and config.discovery.dns_name:
        await _check_dns(config.discovery.dns_name, note)
    if identity is not None:
        public, secret, ring = identity
        for seed in config.mesh.peers:
            await _check_seed(seed, public, secret, ring, config.name, note)
    return all(r.ok for r in results)


def _check_certs(config: NodeConfig, note: Callable[[Check], None]) -> tuple[bytes, bytes, KeyRing] | None:
    if config.mesh.cert is None:
        note(Check(False, "no certificate configured", "set mesh.cert or --cert (zmesh certs create NAME)"))
        return None
    try:
        public, secret = load_secret_certificate(config.mesh.cert)
    except CertError as exc:
        note(Check(False, f"certificate: {exc}", "create one with: zmesh certs create NAME --dir DIR"))
        return None
    note(Check(True, f"certificate {config.mesh.cert}: public key {public.decode()}"))
    trusted = config.mesh.trusted or config.mesh.cert.parent
    try:
        ring = KeyRing.from_directory(trusted)
    except CertError as exc:
        note(Check(False, f"trusted keys: {exc}", f"fix or remove the file in {trusted}"))
        return None
    if len(ring) == 0:
        note(Check(False, f"trusted keys: none in {trusted}", "copy peers' NAME.key files there"))
    else:
        note(Check(True, f"trusted keys: {len(ring)} in {trusted}"))
    return public, secret, ring


def _check_bind(what: str, address: str, note: Callable[[Check], None]) -> None:
    host, port = parse_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            advice = "another process holds it (a node already running?)" if exc.errno == 98 else "is the address on this host?"
            note(Check(False, f"{what} {address}: cannot bind: {exc.strerror}", advice))
            return
    note(Check(True, f"{what} {address}: can bind"))


def _check_tls(config: NodeConfig, listener: ListenerConfig, note: Callable[[Check], None]) -> None:
    from zmesh.mqtt.tls import ListenerError, build_server_context

    try:
        build_server_context(listener, config.source)
    except ListenerError as exc:
        note(Check(False, f"TLS: {exc}", "fix the certificate or key file, or the listener's options"))
        return
    note(Check(True, f"TLS {listener.key}: certificate {listener.certfile} and key load"))


def _check_multicast(config: NodeConfig, note: Callable[[Check], None]) -> None:
    host = parse_hostport(config.mesh.listen)[0]
    interface = config.discovery.interface or netif.interface_of(host) or netif.default_route_interface()
    network = netif.interface_network(interface) if interface else None
    if network is None:
        note(Check(False, f"mDNS: interface {interface or '(none found)'} has no IPv4 address",
                   f"pick one with --interface (have: {', '.join(netif.interfaces())})"))
        return
    address = str(network.ip)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP) as rx, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP) as tx:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            rx.bind((MULTICAST_TEST_GROUP, 0))
            port = rx.getsockname()[1]
            membership = struct.pack("4s4s", socket.inet_aton(MULTICAST_TEST_GROUP), socket.inet_aton(address))
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
            rx.settimeout(1.0)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            token = f"zmesh-doctor-{time.monotonic_ns()}".encode()
            tx.sendto(token, (MULTICAST_TEST_GROUP, port))
            while rx.recv(256) != token:
                pass
    except OSError as exc:
        note(Check(False, f"mDNS: multicast on {interface} ({address}) fails: {exc}",
                   "enable multicast on the interface (ip link set IFACE multicast on) and a "
                   "route for 224.0.0.0/4 via it; in Kubernetes use --discovery dns"))
        return
    note(Check(True, f"mDNS: multicast works on {interface} ({network})"))


async def _check_dns(name: str, note: Callable[[Check], None]) -> None:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(name, None, family=socket.AF_INET)
    except OSError as exc:
        note(Check(False, f"DNS: {name} does not resolve: {exc}",
                   "check the headless Service name (NAME.NAMESPACE.svc.cluster.local) and that "
                   "it has publishNotReadyAddresses: true"))
        return
    addresses = sorted({str(i[4][0]) for i in infos})
    note(Check(True, f"DNS: {name} resolves to {', '.join(addresses)}"))


async def _check_seed(
    seed: str, public: bytes, secret: bytes, ring: KeyRing, name: str, note: Callable[[Check], None]
) -> None:
    host, port = parse_hostport(seed)
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT)
        writer.close()
    except (OSError, TimeoutError) as exc:
        note(Check(False, f"seed {seed}: unreachable ({exc or 'timed out'})",
                   "is the node running, and is the port open between the hosts?"))
        return
    context = zmq.asyncio.Context()
    sockets = {}
    try:
        hello = wire.encode_control(wire.PROBE)  # a probe: the seed answers but does not link us
        endpoint = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        poller = zmq.asyncio.Poller()
        for key in ring.keys():
            if key == public:
                continue
            sock = context.socket(zmq.DEALER)
            sock.linger = 0
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, key
            sock.connect(endpoint)
            sock.send(hello)
            sockets[sock] = key
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + PROBE_TIMEOUT
        while time.monotonic() < deadline:
            for ready, _ in await poller.poll(timeout=100):
                message = wire.decode_control(await ready.recv())  # type: ignore[union-attr]
                key = sockets[ready]  # type: ignore[index]
                if message.kind == wire.WELCOME and message.hello is not None:
                    note(Check(True, f"seed {seed}: node {message.hello.name}, trusted key {ring.name_of(key)}"))
                else:
                    note(Check(False, f"seed {seed}: refused us: {message.reason}", "upgrade the older node"))
                return
        note(Check(False, f"seed {seed}: reachable, but no CURVE handshake with any trusted key",
                   "its key is not in our trusted directory, or ours is not in its"))
    finally:
        context.destroy(linger=0)
