"""`zmesh doctor`: the checks a user would otherwise do by hand, each saying ok or what to do.

It reads the same configuration as `zmesh node run` and, without starting a node, checks:
the certificate and trusted keys load; the control, fixed event and job, HTTP and MQTT
ports can be bound (and each TLS listener's certificate and key load); multicast
works on the mDNS interface; the DNS name resolves; and every seed answers a CURVE hello
with a key we trust (which also proves the seed trusts our key).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from zmesh.config import ListenerConfig, NodeConfig, parse_hostport, parse_seed
from zmesh.mesh import wire
from zmesh.mesh.discovery import netif
from zmesh.security.certs import CertError, KeyRing, load_secret_certificate

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

    if config.mesh.authority is not None:
        authorities = _check_authority(config, note)
        identity = None
    else:
        identity, authorities = _check_certs(config, note), None
    own = identity[:2] if identity is not None else None
    await _check_bind("mesh control", config.mesh.listen, note, own, mesh=True)
    mesh_host = parse_hostport(config.mesh.listen)[0]
    for what, port in (("mesh events", config.mesh.events_port), ("mesh jobs", config.mesh.jobs_port)):
        if port:  # 0: ephemeral, nothing to check
            await _check_bind(what, f"[{mesh_host}]:{port}" if ":" in mesh_host else f"{mesh_host}:{port}", note)
    if config.http.listen:
        await _check_bind("HTTP probes and metrics", config.http.listen, note)
    for listener in config.mqtt.all_listeners:
        await _check_bind(f"MQTT {listener.key} ({listener.scheme})", listener.address, note,
                          own if listener.scheme == "mqtt" else None)
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
    if authorities:
        for seed in config.mesh.peers:
            await _check_seed_identity(seed, authorities, note)
    return all(r.ok for r in results)


def _check_authority(config: NodeConfig, note: Callable[[Check], None]) -> list[bytes] | None:
    """Certificate mode: the authority's keys load, and our own chain (from the signer or
    the hand-issued certificate) verifies now, for our key, name and groups."""
    from zmesh.security import identity
    from zmesh.security.meshauthority import AuthorityFileError, load_authority_keys, load_signer

    mesh = config.mesh
    assert mesh.authority is not None
    try:
        authorities = load_authority_keys(mesh.authority)
    except AuthorityFileError as exc:
        note(Check(False, f"mesh.authority: {exc}", "zmesh authority create DIR makes DIR/authority.pub"))
        return None
    note(Check(True, f"mesh authority {mesh.authority}: {len(authorities)} key(s)"))
    now = time.time()
    where = f"mesh.signer {mesh.signer}" if mesh.signer is not None else f"mesh.certificate {mesh.certificate}"
    try:
        if mesh.signer is not None:
            signer = load_signer(mesh.signer)
            groups = mesh.groups or signer.info.groups
            public = zmq.curve_keypair()[0]  # what the node makes at start
            chain = identity.chain(identity.issue_node(signer.key, public, config.name, groups, now=now,
                                                       lifetime=min(signer.info.max_node_lifetime,
                                                                    max(1, signer.info.not_after - now))),
                                   signer.certificate)
            days: float | None = (signer.info.not_after - now) / 86400
        else:
            assert mesh.certificate is not None and mesh.cert is not None
            public = load_secret_certificate(mesh.cert)[0]
            chain, days = mesh.certificate.read_bytes(), None
        found = identity.verify_chain(chain, authorities, now=now, expected_key=public)
    except (AuthorityFileError, CertError, OSError, ValueError) as exc:
        reason = f" ({exc.reason})" if isinstance(exc, identity.IdentityError) else ""
        note(Check(False, f"{where}: does not verify{reason}: {exc}",
                   "issue a new one: zmesh authority signer / zmesh authority issue"))
        return authorities
    left = (found.not_after - now) / 86400 if days is None else days
    note(Check(left > 7, f"{where}: node {found.name} in {', '.join(found.groups) or 'no group'}, "
                         f"valid for {left:.1f} more days",
               "renew it soon: nodes with it are refused once it expires" if left <= 7 else ""))
    if found.name != config.name:
        note(Check(False, f"{where}: the certificate names {found.name!r}, the node is {config.name!r}",
                   "peers will know it by the certificate's name"))
    return authorities


async def _check_seed_identity(seed: str, authorities: list[bytes], note: Callable[[Check], None]) -> None:
    """Ask the seed who it is (its identity socket, control port + 1) and verify the answer."""
    import msgpack

    from zmesh.security import identity

    _key, host, port = parse_seed(seed)
    context = zmq.asyncio.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(f"tcp://[{host}]:{port + 1}" if ":" in host else f"tcp://{host}:{port + 1}")
        await sock.send(b"who")
        if not await sock.poll(int(PROBE_TIMEOUT * 1000)):
            note(Check(False, f"seed {seed}: no answer on its identity port {port + 1}",
                       "is it running with mesh.authority, and is that port open between the hosts?"))
            return
        try:
            body = msgpack.unpackb(await sock.recv(), raw=False)
            found = identity.verify_chain(body["c"], authorities, now=time.time(), expected_key=body["k"].encode())
        except identity.IdentityError as exc:
            note(Check(False, f"seed {seed}: its certificate does not verify ({exc.reason}): {exc}",
                       "is it in the same mesh (the same authority)?"))
            return
        except Exception:
            note(Check(False, f"seed {seed}: not an identity answer", "is it a zmesh node?"))
            return
        note(Check(True, f"seed {seed}: node {found.name} in {', '.join(found.groups) or 'no group'}"))
    finally:
        context.destroy(linger=0)


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


async def _check_bind(what: str, address: str, note: Callable[[Check], None],
                      own: tuple[bytes, bytes] | None = None, mesh: bool = False) -> None:
    host, port = parse_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            failure = exc
        else:
            note(Check(True, f"{what} {address}: can bind"))
            return
    if failure.errno == errno.EADDRINUSE and own is not None:
        # Doctor run beside the node it checks: is the port held by that very node?
        holder = await (_mesh_port_holder(host, port, own) if mesh else _mqtt_port_holder(host, port, own[0]))
        if holder:
            note(Check(True, f"{what} {address}: in use by {holder}, running with this certificate"))
            return
    advice = ("another process holds it (a node already running?)" if failure.errno == errno.EADDRINUSE
              else "is the address on this host?")
    note(Check(False, f"{what} {address}: cannot bind: {failure.strerror}", advice))


async def _mesh_port_holder(host: str, port: int, own: tuple[bytes, bytes]) -> str:
    from zmesh.mesh.seedcheck import answers_with_key

    return "this node" if await answers_with_key(host, port, own[0], own[1], own[0]) else ""


async def _mqtt_port_holder(host: str, port: int, public: bytes) -> str:
    """The name of the node whose MQTT listener this is, if its key is ``public``."""
    import json

    from zmesh.mqtt.client import Client, ClientError

    client = Client()
    try:
        await client.connect(host, port, timeout=PROBE_TIMEOUT)
        await client.subscribe([("$SYS/zmesh/node", 0)], timeout=PROBE_TIMEOUT)
        msg = await asyncio.wait_for(anext(client.messages()), PROBE_TIMEOUT)
        info = json.loads(msg.payload)
    except (ClientError, OSError, TimeoutError, ValueError, StopAsyncIteration):
        return ""
    finally:
        await client.disconnect()
    return f"node {info.get('name')}" if info.get("key") == public.decode() else ""


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
    seed_key, host, port = parse_seed(seed)
    if seed_key is not None and seed_key.encode() not in ring:
        note(Check(False, f"seed {seed}: the key is not among the trusted keys",
                   "copy the seed's NAME.key into the trusted directory, or correct the key"))
        return
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
        # KEY@HOST:PORT: that key only, as the node dials it (an untrusted one fails at start).
        for key in [seed_key.encode()] if seed_key is not None else ring.keys():
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
                    # A bare address costs the node one dial per trusted key; say the cheap form.
                    form = "" if seed_key is not None else f" (as {key.decode()}@{host}:{port} it is dialled once)"
                    note(Check(True, f"seed {seed}: node {message.hello.name}, trusted key {ring.name_of(key)}{form}"))
                else:
                    note(Check(False, f"seed {seed}: refused us: {message.reason}", "upgrade the older node"))
                return
        if seed_key is not None:
            note(Check(False, f"seed {seed}: reachable, but no CURVE handshake with the key given",
                       "is that the seed's key (its NAME.key file)? and is ours in its trusted directory?"))
            return
        note(Check(False, f"seed {seed}: reachable, but no CURVE handshake with any trusted key",
                   "its key is not in our trusted directory, or ours is not in its"))
    finally:
        context.destroy(linger=0)
