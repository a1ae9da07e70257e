"""Discovery across hosts: mDNS, DNS (/etc/hosts and SRV), one static seed, and `zmesh doctor`,
each node in its own network namespace on one bridge (see ``netns.py``).

mDNS runs only inside the namespaces (their ``eth0`` on the test bridge): never on the
machine's real interfaces. DNS tests give each namespace its own ``/etc/hosts`` and
``/etc/resolv.conf`` through ``/etc/netns/<ns>/`` (``ip netns exec`` bind-mounts them), and the
SRV test runs a tiny DNS server (this module, run as ``python -m tests.netns.test_discovery
dns-server ADDRESS ZONE_JSON``) inside a namespace of its own.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, await_route, get_until, load_keys, make_certs, wait_until
from tests.netns.conftest import Mesh
from tests.netns.netns import Host, Net, _owner_alive
from tests.netns.node import NodeOnHost
from tests.netns.test_multihost import PeersWatch, assert_delivers, wait_full_mesh

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

MDNS = ["--discovery", "mdns"]
ETC_NETNS = Path("/etc/netns")
# No DNS server: lookups fail inside the namespace (glibc at once; dnspython's SRV lookup only
# after its 2 s lifetime, as asyncio UDP never sees the port-unreachable).
NO_RESOLVER = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


# ------------------------------------------------------------------------------ helpers


def node_info(node: NodeOnHost, timeout: float = 5) -> dict[str, Any]:
    """The node's ``$SYS/zmesh/node`` value (name, key, stats)."""
    with node.subscriber("$SYS/zmesh/node") as sub:
        try:
            return json.loads(sub.get(timeout=timeout).payload)
        except queue.Empty:
            raise AssertionError(f"{node.name}: no $SYS/zmesh/node within {timeout} s") from None


def public_key(cert_dir: Path, name: str) -> str:
    """The z85 public key in ``NAME.key``."""
    return load_keys(cert_dir / f"{name}.key")[0].decode()


def configure(node: NodeOnHost, toml: str) -> NodeOnHost:
    """Append sections to a not-yet-started node's TOML file."""
    with node.config_path.open("a") as f:
        f.write("\n" + toml)
    return node


def full_mesh_addresses(nodes: list[NodeOnHost]) -> None:
    """Every node sees every other up, at the other's bridge address and control port."""
    for node in nodes:
        peers = node.peers()
        assert set(peers) == {n.name for n in nodes} - {node.name}, peers
        for other in nodes:
            if other is not node:
                entry = peers[other.name]
                assert entry["state"] == "up", entry
                assert entry["address"] == f"{other.ip}:{other.control_port}", entry


@pytest.fixture
def etc_netns(net: Net) -> Iterator[Callable[[Host, dict[str, str]], Path]]:
    """``write(host, {"hosts": ..., "resolv.conf": ...})``: files that ``ip netns exec`` mounts
    over ``/etc`` inside ``host``; write them before starting anything there. Removed at the
    end (and leftovers of crashed runs, whose owner is gone, removed at the start)."""
    created_root = not ETC_NETNS.exists()
    if ETC_NETNS.is_dir():
        for stale in ETC_NETNS.glob("zmt*-*"):
            run = stale.name[3:9]
            if stale.is_dir() and not _owner_alive(run):
                shutil.rmtree(stale, ignore_errors=True)
    made: list[Path] = []

    def write(host: Host, files: dict[str, str]) -> Path:
        directory = ETC_NETNS / host.ns
        directory.mkdir(parents=True, exist_ok=True)
        made.append(directory)
        for name, text in files.items():
            (directory / name).write_text(text)
        return directory

    try:
        yield write
    finally:
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)
        if created_root:
            with contextlib.suppress(OSError):
                ETC_NETNS.rmdir()  # only if empty: another session may be using it


def hosts_file(entries: list[tuple[str, str]]) -> str:
    return "127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for ip, name in entries)


def lines_of(process: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    return lines


# ------------------------------------------------------------------ a tiny DNS server


def serve_dns(address: str, zone: dict[str, dict[str, list[str]]]) -> None:
    """Answer UDP DNS queries on ``address:53`` from ``zone`` (name -> type -> rdata texts);
    NXDOMAIN for names not in it, an empty answer for other types. Prints "ready", then one
    line per query: ``NAME TYPE answered|empty|nxdomain``."""
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    zone = {name.lower().rstrip(".") + ".": records for name, records in zone.items()}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 53))
    print("ready", flush=True)
    while True:
        data, client = sock.recvfrom(4096)
        try:
            query = dns.message.from_wire(data)
            question = query.question[0]
        except Exception:
            continue
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        records = zone.get(name)
        if records is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            outcome = "nxdomain"
        elif rdtype in records:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 5, "IN", rdtype, records[rdtype])
            )
            if rdtype == "SRV":  # glue: the targets' addresses, as a real server would add
                for rdata in records["SRV"]:
                    target = rdata.split()[-1].lower()
                    if "A" in zone.get(target, {}):
                        response.additional.append(
                            dns.rrset.from_text_list(target, 5, "IN", "A", zone[target]["A"])
                        )
            outcome = "answered"
        else:
            outcome = "empty"
        print(f"{name} {rdtype} {outcome}", flush=True)
        sock.sendto(response.to_wire(), client)


def start_dns_server(host: Host, zone: dict[str, dict[str, list[str]]]) -> queue.Queue[str]:
    """Run :func:`serve_dns` inside ``host`` on its bridge address; its output lines."""
    process = host.run(
        [
            sys.executable,
            "-m",
            "tests.netns.test_discovery",
            "dns-server",
            host.ip,
            json.dumps(zone),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    lines = lines_of(process)
    try:
        first = lines.get(timeout=15)
    except queue.Empty:
        raise AssertionError("the test DNS server did not start") from None
    assert first == "ready", f"test DNS server: {first}"
    return lines


# ------------------------------------------------------------------------- mDNS tests


def test_mdns_three_hosts_find_each_other(net: Net, mesh: Mesh) -> None:
    """No seeds at all: a, b and c find each other by mDNS on the bridge and carry MQTT."""
    mesh.certs("a", "b", "c")
    a, b, c = (mesh.node(net.add_host(n), n, extra=MDNS) for n in "abc")
    wait_full_mesh([a, b, c], timeout=20)
    full_mesh_addresses([a, b, c])
    assert "mDNS: browsing" in a.output()
    assert_delivers(a, b, c)


def test_mdns_untrusted_key_is_seen_but_never_joins(net: Net, mesh: Mesh, tmp_path: Path) -> None:
    """d runs mDNS with a key nobody trusts (it trusts the others): its hints are counted and
    ignored, it is in no peers list, and it receives nothing published in the mesh."""
    mesh.certs("a", "b", "c")
    nodes = [mesh.node(net.add_host(n), n, extra=MDNS) for n in "abc"]
    a, b, c = nodes
    wait_full_mesh(nodes, timeout=20)
    for node in nodes:
        assert node_info(node)["stats"]["untrusted_hints"] == 0

    d_certs = tmp_path / "d-certs"
    d_certs.mkdir(mode=0o700)
    make_certs(d_certs, ["d"])
    for name in "abc":
        shutil.copy(mesh.cert_dir / f"{name}.key", d_certs / f"{name}.key")
    d_key = public_key(d_certs, "d")
    hd = net.add_host("d")
    d = NodeOnHost(hd, "d", d_certs, mesh.workdir, extra=MDNS)

    # Seen: every trusted node got d's hint (its TXT key) and counted it.
    for node in nodes:
        wait_until(
            lambda n=node: node_info(n)["stats"]["untrusted_hints"] > 0,
            20,
            f"{node.name} to count d's untrusted mDNS hint",
        )
        assert "names a key that is not trusted: ignored" in node.output()
    # Never a member: not in any peers list, by name, key or address; d sees nobody up.
    for node in nodes:
        peers = node.peers()
        assert set(peers) == {"a", "b", "c"} - {node.name}, peers
        for entry in peers.values():
            assert entry["key"] != d_key and not entry["address"].startswith(f"{hd.ip}:"), entry
            assert entry["state"] == "up", entry
    assert not d.peers_up(), d.peers()

    # Nothing published on a reaches d; b, the positive control, gets it.
    topic = f"secret/{uuid.uuid4().hex[:8]}"
    payload = f"for members only {uuid.uuid4().hex}".encode()
    with (
        d.subscriber("secret/#", qos=1) as on_d,
        b.subscriber("secret/#", qos=1) as on_b,
        a.publisher() as publisher,
    ):
        await_route(publisher, on_b, topic, timeout=15)
        publisher.publish(topic, payload, qos=1)
        get_until(on_b, lambda m: m.payload == payload, 10, "the message at b")
        time.sleep(1.0)  # an absence check, after the positive control: a bounded wait
        leaked = on_d.drain()
        assert not leaked, f"d received {[(m.topic, m.payload[:40]) for m in leaked]}"
    # Still counted, still out.
    for node in nodes:
        assert d_key not in {e["key"] for e in node.peers().values()}


HB_SLOW = 1.0
EXPIRY_LONG = 10.0


def test_mdns_kill_expires_restart_rejoins_sigterm_says_goodbye(net: Net, mesh: Mesh) -> None:
    """heartbeat 1 s, expiry 10 s. SIGKILL: down within the expiry, back up on restart.
    SIGTERM: down at once (well before the expiry) through the goodbye; on a, whose TCP
    path from c is blackholed first, through the mDNS goodbye alone."""
    mesh.certs("a", "b", "c")
    a, b, c = (
        mesh.node(
            net.add_host(n), n, extra=MDNS, heartbeat_interval=HB_SLOW, peer_expiry=EXPIRY_LONG
        )
        for n in "abc"
    )
    wait_full_mesh([a, b, c], timeout=20)

    with PeersWatch(a) as watch_a, PeersWatch(c) as watch_c:
        for watch in (watch_a, watch_c):
            watch.wait_for(lambda s: s.get("b") == "up", 10, "b up")
        b.kill()
        killed = time.monotonic()
        for watch in (watch_a, watch_c):
            _, seen = watch.wait_for(
                lambda s: s.get("b") == "down", EXPIRY_LONG + 10, "b down after SIGKILL"
            )
            elapsed = seen - killed
            print(
                f"{watch.node.name} marked b down {elapsed:.2f} s after SIGKILL (expiry {EXPIRY_LONG:g} s)"
            )
            # Down at (last hello heard) + expiry, checked every 50 ms; the last hello came at
            # most a heartbeat before the kill. Allow a loaded machine and the MQTT hop; and
            # no sooner than that (SIGKILL sends no goodbye: nothing else may mark it down).
            assert EXPIRY_LONG - HB_SLOW - 0.5 <= elapsed <= EXPIRY_LONG + 1.0, (
                f"{watch.node.name} took {elapsed:.2f} s"
            )

        b.start()  # same host, same ports, no seeds: mDNS alone brings it back
        restarted = time.monotonic()
        for watch in (watch_a, watch_c):
            _, seen = watch.wait_for(lambda s: s.get("b") == "up", 20, "b up again after restart")
            print(f"{watch.node.name} saw b up {seen - restarted:.2f} s after its restart")
    wait_until(lambda: b.peers_up() >= {"a", "c"}, 20, "restarted b to see a and c up")
    assert_delivers(b, a, c)

    # SIGTERM c. First cut c's TCP path to a (a blackhole route inside c: multicast still
    # goes out by the 224.0.0.0/4 route), so that a can only learn of it by mDNS; b gets
    # both goodbyes (the mesh's BYE and mDNS's).
    with PeersWatch(a) as watch_a, PeersWatch(b) as watch_b:
        for watch in (watch_a, watch_b):
            watch.wait_for(lambda s: s.get("c") == "up", 10, "c up")
        c.host.ip_cmd("route", "add", "blackhole", f"{a.ip}/32")
        stopping = time.monotonic()
        c.process.terminate()  # type: ignore[union-attr]
        for watch in (watch_a, watch_b):
            _, seen = watch.wait_for(
                lambda s: s.get("c") == "down", EXPIRY_LONG, "c down after SIGTERM"
            )
            elapsed = seen - stopping
            print(
                f"{watch.node.name} marked c down {elapsed:.2f} s after SIGTERM (expiry {EXPIRY_LONG:g} s)"
            )
            assert elapsed <= 3.0, f"{watch.node.name} took {elapsed:.2f} s: no goodbye?"
        assert c.process.wait(10) == 0  # type: ignore[union-attr]
    assert "peer c down: said goodbye (mdns)" in a.output(), a.tail()
    assert "peer c down: said goodbye" in b.output(), b.tail()


# -------------------------------------------------------------------------- DNS tests


def test_dns_hosts_file_name_gives_full_mesh(net: Net, mesh: Mesh, etc_netns: Any) -> None:
    """One name, three lines in each host's /etc/hosts: every node resolves it every 0.5 s,
    dials every address (its own included) and the three form a full mesh."""
    mesh.certs("a", "b", "c")
    hosts = [net.add_host(n) for n in "abc"]
    names = hosts_file([(h.ip, "peers.test") for h in hosts])
    for host in hosts:
        etc_netns(host, {"hosts": names, "resolv.conf": NO_RESOLVER})
    assert hosts[0].check_output(
        [
            sys.executable,
            "-c",
            "import socket; print(sorted({i[4][0] for i in "
            "socket.getaddrinfo('peers.test', None, socket.AF_INET)}))",
        ]
    ).strip() == str(sorted(h.ip for h in hosts))
    nodes = []
    for host in hosts:
        node = mesh.node(
            host, host.name, extra=["--discovery", "dns", "--dns-name", "peers.test"], start=False
        )
        configure(node, "[discovery]\ndns_interval = 0.5\n")
        node.start()
        nodes.append(node)
    wait_full_mesh(nodes, timeout=20)
    full_mesh_addresses(nodes)
    assert "DNS: peers.test has" in nodes[0].output()
    assert_delivers(nodes[0], *nodes[1:])


def test_dns_srv_records_give_the_port(net: Net, mesh: Mesh, etc_netns: Any) -> None:
    """Nodes listen on 7200; ``dns_port`` says 7100, where nothing listens; only the SRV
    records ``_zmesh._tcp.svc.test`` (served by a test DNS server in its own namespace) name
    7200, so the nodes can join only through them."""
    mesh.certs("a", "b", "c")
    hosts = [net.add_host(n) for n in "abc"]
    server = net.add_host("dns")
    zone: dict[str, dict[str, list[str]]] = {
        "_zmesh._tcp.svc.test": {"SRV": [f"0 0 7200 {h.name}.svc.test." for h in hosts]},
        "svc.test": {"A": [h.ip for h in hosts]},  # the A fallback would give port 7100: wrong
    }
    for host in hosts:
        zone[f"{host.name}.svc.test"] = {"A": [host.ip]}
    queries = start_dns_server(server, zone)
    for host in hosts:
        etc_netns(
            host,
            {
                "hosts": hosts_file([]),
                "resolv.conf": f"nameserver {server.ip}\noptions timeout:1 attempts:2\n",
            },
        )
    nodes = []
    for host in hosts:
        node = mesh.node(
            host, host.name, extra=["--discovery", "dns", "--dns-name", "svc.test"], start=False
        )
        node.control_port = 7200
        configure(node, "[discovery]\ndns_interval = 0.5\ndns_port = 7100\n")
        node.start()
        nodes.append(node)
    wait_full_mesh(nodes, timeout=20)
    full_mesh_addresses(nodes)  # ip:7200 everywhere
    seen: list[str] = []
    with contextlib.suppress(queue.Empty):
        while True:
            seen.append(queries.get_nowait())
    assert "_zmesh._tcp.svc.test. SRV answered" in seen, seen
    assert any(line.startswith("a.svc.test. A answered") for line in seen), seen
    for node in nodes:
        hinted = [line for line in node.output().splitlines() if "DNS: svc.test has" in line]
        assert hinted and all(line.endswith(":7200") for line in hinted), hinted
    assert_delivers(nodes[0], *nodes[1:])


# ----------------------------------------------------------------------- static seeds


def test_one_static_seed_is_enough_for_five(net: Net, mesh: Mesh) -> None:
    """Five nodes, each seeded only with node 1: peer exchange makes a full mesh."""
    names = [f"n{i}" for i in range(1, 6)]
    mesh.certs(*names)
    hosts = [net.add_host(n) for n in names]
    first = mesh.node(hosts[0], names[0])
    nodes = [first] + [
        mesh.node(h, n, seeds=[hosts[0].ip]) for h, n in zip(hosts[1:], names[1:], strict=True)
    ]
    wait_full_mesh(nodes, timeout=30)
    for node in nodes:
        up = node.peers_up()
        assert len(up) == 4 and up == set(names) - {node.name}, (node.name, node.peers())
    full_mesh_addresses(nodes)
    assert_delivers(nodes[4], *nodes[1:4])


# ---------------------------------------------------------------------------- doctor


def doctor(host: Host, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", host.ns, sys.executable, "-m", "zmesh", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_doctor_inside_a_namespace(net: Net, mesh: Mesh, tmp_path: Path, etc_netns: Any) -> None:
    mesh.certs("s", "x")
    hs, hu, hx = net.add_host("s"), net.add_host("u"), net.add_host("x")
    # u's key is not in x's trusted directory (u trusts x: the failure is ours to report).
    u_certs = tmp_path / "u-certs"
    u_certs.mkdir(mode=0o700)
    make_certs(u_certs, ["u"])
    for name in ("s", "x"):
        shutil.copy(mesh.cert_dir / f"{name}.key", u_certs / f"{name}.key")
    etc_netns(hx, {"hosts": hosts_file([(hs.ip, "seeds.test")]), "resolv.conf": NO_RESOLVER})
    mesh.node(hs, "s")
    NodeOnHost(hu, "u", u_certs, mesh.workdir)
    base = [
        "--name",
        "x",
        "--cert",
        str(mesh.cert_dir / "x.key_secret"),
        "--trusted",
        str(mesh.cert_dir),
        "--listen",
        f"{hx.ip}:7100",
        "--mqtt",
        f"{hx.ip}:1883",
    ]

    good = doctor(
        hx,
        *base,
        "--discovery",
        "mdns",
        "--discovery",
        "dns",
        "--dns-name",
        "seeds.test",
        "--peer",
        f"{hs.ip}:7100",
    )
    out = good.stdout
    assert good.returncode == 0, out + good.stderr
    assert f"ok    mesh control {hx.ip}:7100: can bind" in out, out
    assert f"ok    MQTT mqtt.listen (mqtt) {hx.ip}:1883: can bind" in out, out
    assert f"ok    mDNS: multicast works on eth0 ({hx.ip}/24)" in out, out
    assert f"ok    DNS: seeds.test resolves to {hs.ip}" in out, out
    assert f"ok    seed {hs.ip}:7100: node s, trusted key s" in out, out
    assert "FAIL" not in out, out

    untrusted = doctor(hx, *base, "--peer", f"{hu.ip}:7100")
    out = untrusted.stdout
    assert untrusted.returncode == 1, out + untrusted.stderr
    assert (
        f"FAIL  seed {hu.ip}:7100: reachable, but no CURVE handshake with any trusted key" in out
    ), out
    assert "its key is not in our trusted directory" in out, out

    unresolved = doctor(hx, *base, "--discovery", "dns", "--dns-name", "nosuch.test")
    out = unresolved.stdout
    assert unresolved.returncode == 1, out + unresolved.stderr
    assert "FAIL  DNS: nosuch.test does not resolve" in out, out
    assert f"ok    mesh control {hx.ip}:7100: can bind" in out, out  # only the DNS check failed
    assert out.count("FAIL") == 1, out


def test_doctor_seed_check_leaves_no_phantom_peer(net: Net, mesh: Mesh) -> None:
    mesh.certs("s", "t", "x")
    hs, ht, hx = net.add_host("s"), net.add_host("t"), net.add_host("x")
    s = mesh.node(hs, "s")
    t = mesh.node(ht, "t", seeds=[hs.ip])
    wait_full_mesh([s, t])
    result = doctor(
        hx,
        "--name",
        "x",
        "--cert",
        str(mesh.cert_dir / "x.key_secret"),
        "--listen",
        f"{hx.ip}:7100",
        "--mqtt",
        f"{hx.ip}:1883",
        "--peer",
        f"{hs.ip}:7100",
    )
    assert result.returncode == 0 and "ok    seed" in result.stdout, result.stdout + result.stderr
    # The doctor has exited: it is no node, and nobody should list it.
    assert not [e for e in s.peers().values() if e["address"].startswith(f"{hx.ip}:")], s.peers()
    # An absence check: s's next hellos would have carried the phantom to t.
    time.sleep(3 * s.heartbeat_interval)
    assert not [e for e in t.peers().values() if e["address"].startswith(f"{hx.ip}:")], t.peers()


if __name__ == "__main__":
    if sys.argv[1:2] == ["dns-server"]:
        serve_dns(sys.argv[2], json.loads(sys.argv[3]))
    else:
        sys.exit(
            f"usage: python -m {__spec__.name if __spec__ else __file__} dns-server ADDRESS ZONE_JSON"
        )
