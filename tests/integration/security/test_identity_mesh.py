"""Nodes admitted by certificate (a mesh authority), with real node processes: pods with no
hand-made key mesh; the mesh policy names groups; a node of another authority, a revoked
one and an expired one are refused, and an unverified key gets no data."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import zmq

from tests.helpers import (
    NodeProcess,
    Publisher,
    Subscriber,
    assert_quiet,
    await_route,
    control_request,
    load_keys,
    wait_until,
    write_config,
)
from zmesh.mesh import wire
from zmesh.security import identity
from zmesh.security.meshauthority import (
    create_authority,
    create_signer,
    load_authority_secret,
    load_signer,
)

DAY = 86400.0


def port_pair() -> int:
    """A control port whose successor (the identity port) is free too."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket() as t:
                t.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no free pair of ports")


class Authority:
    def __init__(self, directory: Path) -> None:
        self.public, secret = create_authority(directory)
        self.key = load_authority_secret(secret)
        self.directory = directory

    def signer(self, group: str, **kwargs: float) -> Path:
        path = self.directory / f"{group}.signer"
        create_signer(self.key, path, [group], lifetime=kwargs.get("lifetime", 30 * DAY),
                      max_node_lifetime=kwargs.get("max_node_lifetime", DAY))
        return path


def start(tmp_path: Path, name: str, authority: Authority, *, signer: Path | None = None,
          seeds: list[int] | None = None, extra_toml: str = "", certificate: Path | None = None,
          cert: Path | None = None) -> NodeProcess:
    lines = ["[mesh]", f'authority = "{authority.public}"']
    if signer is not None:
        lines.append(f'signer = "{signer}"')
    if certificate is not None:
        lines += [f'certificate = "{certificate}"', f'cert = "{cert}"']
    config = write_config(tmp_path / f"{name}.toml", "\n".join(lines) + "\n" + extra_toml)
    return NodeProcess(tmp_path, name, tmp_path, seeds=seeds, control_port=port_pair(),
                       extra=["--config", str(config)], keys=False)


def test_pods_with_group_signers_mesh_and_the_policy_names_groups(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    authority = Authority(tmp_path / "ca")
    collector, scanner = authority.signer("collector"), authority.signer("scanner")
    policy = '[mesh.policy]\n"group:scanner" = ["scans/#"]\n'
    hub = start(tmp_path, "hub", authority, signer=collector, extra_toml=policy)
    nodes.append(hub)
    # Two scanner pods, seeded at the hub only: they learn each other by peer exchange and
    # admit each other by certificate (neither has ever seen the other's key).
    for name in ("scan-a", "scan-b"):
        nodes.append(start(tmp_path, name, authority, signer=scanner, seeds=[hub.control_port]))
    a, b = nodes[1], nodes[2]
    wait_until(lambda: {"scan-a", "scan-b"} <= hub.peers_up(), 15, "the hub to admit both scanners")
    wait_until(lambda: "scan-b" in a.peers_up(), 15, "scanner a to admit scanner b via peer exchange")
    for node in nodes:
        assert "admitted by certificate" in node.output()

    with Subscriber(hub.mqtt_port, "scans/#", "alerts/#") as at_hub, Subscriber(b.mqtt_port, "alerts/#") as at_b, \
            Publisher(a.mqtt_port) as publisher:
        await_route(publisher, at_hub, "scans/probe")
        await_route(publisher, at_b, "alerts/probe")  # b has no policy: scanners' alerts reach it
        publisher.publish("alerts/forged", b"from a scanner")
        publisher.publish("scans/1", b"result")
        got = at_hub.get()
        assert (got.topic, got.payload) == ("scans/1", b"result")  # alerts/forged was denied by group
        assert_quiet(at_hub, what="a scanner's alert at the hub")
    assert hub.sys_value("$SYS/zmesh/node")["stats"]["policy_denied"] >= 1


def test_a_node_of_another_authority_is_refused_and_an_unverified_key_gets_nothing(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    authority, stranger = Authority(tmp_path / "ca"), Authority(tmp_path / "other-ca")
    hub = start(tmp_path, "hub", authority, signer=authority.signer("collector"))
    nodes.append(hub)
    intruder = start(tmp_path, "intruder", stranger, signer=stranger.signer("collector"), seeds=[hub.control_port])
    nodes.append(intruder)
    wait_until(lambda: "not issued by a trusted authority" in intruder.output(), 10,
               "the intruder to refuse the hub's certificate")
    assert "intruder" not in hub.peers_up()

    # A raw client with a fresh key: the control socket answers only "say hello with a
    # certificate"; the event socket's ZAP refuses the key, so not one frame arrives.
    public, secret = zmq.curve_keypair()
    hub_key = hub.sys_value("$SYS/zmesh/node")["key"].encode()
    from zmesh.retained.lastvalue import BUCKETS

    sync = wire.encode_sync_request([0] * BUCKETS)  # "send me every retained entry"
    reply = control_request(hub.control_port, hub_key, public, secret, sync, timeout=5)
    assert reply is not None and wire.decode_control(reply).kind == wire.REFUSED
    forged = identity.chain(identity.issue_node(stranger.key, public, "intruder-2", ["collector"],
                                                now=time.time(), lifetime=3600))
    hello = wire.Hello(name="intruder-2", version=wire.WIRE_VERSION, incarnation=1, control_port=1,
                       pub_port=1, pull_port=1, cert=forged)
    reply = control_request(hub.control_port, hub_key, public, secret, wire.encode_control(wire.HELLO, hello))
    refused = wire.decode_control(reply or b"")
    assert refused.kind == wire.REFUSED and "unknown_issuer" in refused.reason
    welcome = control_request(hub.control_port, hub_key, public, secret, wire.encode_control(wire.PROBE))
    assert welcome is not None and wire.decode_control(welcome).kind == wire.REFUSED  # no hello for strangers

    context = zmq.Context()
    try:
        sub = context.socket(zmq.SUB)
        sub.linger = 0
        sub.curve_publickey, sub.curve_secretkey, sub.curve_serverkey = public, secret, hub_key
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        pub_port = _pub_port(hub)
        sub.connect(f"tcp://127.0.0.1:{pub_port}")
        with Publisher(hub.mqtt_port) as publisher:
            for i in range(20):
                publisher.publish(f"alerts/{i}", b"secret", retain=(i == 0))
                time.sleep(0.05)
        assert not sub.poll(1000), "an unverified key received an event frame"
    finally:
        context.destroy(linger=0)
    # The event socket's ZAP refused the key (the job socket has the same strict domain).
    assert f"refused CURVE key {public.decode()} (domain 'zmesh')" in hub.output()
    assert hub.sys_value("$SYS/zmesh/node")["stats"]["refused_certificates"] >= 2


def _pub_port(node: NodeProcess) -> int:
    for line in node.output().splitlines():
        if "mesh listening:" in line:
            return int(line.split("events ")[1].split(",")[0])
    raise AssertionError("no 'mesh listening' line in the log")


def test_a_revocation_list_published_on_the_mesh_drops_the_revoked_members(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    authority = Authority(tmp_path / "ca")
    hub = start(tmp_path, "hub", authority, signer=authority.signer("collector"))
    nodes.append(hub)
    scanner = authority.signer("scanner")
    nodes.append(start(tmp_path, "scan-a", authority, signer=scanner, seeds=[hub.control_port]))
    wait_until(lambda: "scan-a" in hub.peers_up(), 15, "the hub to admit the scanner")
    revoked_side = Subscriber(nodes[1].mqtt_port, "alerts/#")
    hub_publisher = Publisher(hub.mqtt_port)
    await_route(hub_publisher, revoked_side, "alerts/probe")  # it hears the hub's events now

    revoked = identity.issue_revocations(authority.key, [load_signer(scanner).info.serial], seq=1, now=time.time())
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", hub.mqtt_port)
    client.loop_start()
    client.publish("$zmesh/revocations", revoked, qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    wait_until(lambda: "scan-a" not in hub.peers_up(), 5, "the revoked scanner to be dropped")
    wait_until(lambda: "certificate revoked" in hub.output(), 5, "the hub to say why")
    # It keeps knocking with the revoked chain, and is refused each time.
    wait_until(lambda: "(revoked)" in nodes[1].output() or "revoked" in hub.output(), 5, "a refusal")
    # Its established SUB connection to the hub's event socket is cut too (ZAP judged it at
    # the handshake only): nothing the hub publishes reaches it any more.
    revoked_side.drain()
    for i in range(10):
        hub_publisher.publish(f"alerts/after-{i}", b"not for a revoked node")
    try:
        assert_quiet(revoked_side, what="events at the revoked node")
    finally:
        revoked_side.close()
        hub_publisher.close()
    assert "scan-a" not in hub.peers_up()


def test_an_expired_certificate_ends_a_live_link(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    from tests.helpers import make_certs

    authority = Authority(tmp_path / "ca")
    hub = start(tmp_path, "hub", authority, signer=authority.signer("collector"))
    nodes.append(hub)
    certs = make_certs(tmp_path / "fixed", ["old"])
    public, _secret = load_keys(certs / "old.key")
    # Valid for a few more seconds, counting the 60 s of tolerated clock skew.
    now = time.time()
    chain = identity.chain(identity.issue_node(authority.key, public, "old", ["collector"],
                                               now=now - 3600, lifetime=3600 - identity.DEFAULT_SKEW + 4))
    chain_file = tmp_path / "old.chain"
    chain_file.write_bytes(chain)
    old = start(tmp_path, "old", authority, certificate=chain_file, cert=certs / "old.key_secret",
                seeds=[hub.control_port])
    nodes.append(old)
    wait_until(lambda: "old" in hub.peers_up(), 10, "the hub to admit the node")
    wait_until(lambda: "old" not in hub.peers_up(), 12, "the hub to drop it when its certificate expires")
    assert "certificate expired" in hub.output()


def test_doctor_checks_our_certificate_and_the_seeds(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    from tests.helpers import free_port, zmesh_cli

    authority = Authority(tmp_path / "ca")
    scanner = authority.signer("scanner")
    hub = start(tmp_path, "hub", authority, signer=authority.signer("collector"))
    nodes.append(hub)
    config = write_config(tmp_path / "new.toml", f'[mesh]\nauthority = "{authority.public}"\nsigner = "{scanner}"\n'
                          f'peers = ["127.0.0.1:{hub.control_port}"]\n')
    ok = zmesh_cli("doctor", "--config", str(config), "--name", "scan-new", "--mqtt", f"127.0.0.1:{free_port()}",
                   "--listen", f"127.0.0.1:{free_port()}")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "node scan-new in scanner, valid for" in ok.stdout and "node hub in collector" in ok.stdout

    stranger = Authority(tmp_path / "other")
    config.write_text(f'[mesh]\nauthority = "{stranger.public}"\nsigner = "{scanner}"\n'
                      f'peers = ["127.0.0.1:{hub.control_port}"]\n')
    bad = zmesh_cli("doctor", "--config", str(config), "--name", "scan-new", "--mqtt", f"127.0.0.1:{free_port()}",
                    "--listen", f"127.0.0.1:{free_port()}")
    assert bad.returncode != 0 and "unknown_issuer" in bad.stdout and "Traceback" not in bad.stderr
