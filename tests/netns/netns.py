"""Several "hosts" on one machine: Linux network namespaces joined by a Linux bridge.

A :class:`Net` owns one bridge in the root namespace (``zmtb<run>``, address
``10.231.<k>.254/24`` so that the test process can reach every host) and, per
:meth:`Net.add_host`, a namespace ``zmt<run>-<i>`` joined to it by a veth pair (``zmtv<run>-<i>``
on the bridge, ``eth0`` inside, address ``10.231.<k>.<i>/24``, multicast on, a route for
``224.0.0.0/4`` so that mDNS finds an interface). Every name carries the run id ``<run>``
(six hex digits) and the prefix ``zmt``, so that :func:`sweep` removes only what this module
created, and only for runs whose owning process is gone: two test sessions can share the
machine.

Nothing here leaves the bridge: the addresses are private and the bridge has no uplink.

Needs root and ``ip`` (iproute2); :func:`unsupported_reason` says why not, for a skip.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PREFIX = "zmt"
SUBNET = "10.231"
# Ownership records: one file per live Net, naming the process that created it. A sweep
# removes a run's leftovers only when its record is missing or its process is dead.
STATE_DIR = Path("/run/zmesh-netns") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir()) / "zmesh-netns"

_NS_RE = re.compile(rf"^{PREFIX}([0-9a-f]{{6}})-(\d+)$")
_LINK_RE = re.compile(rf"^{PREFIX}[bv]([0-9a-f]{{6}})(-\d+)?$")

_lock = threading.Lock()
_live: list[Net] = []  # closed at interpreter exit if a finalizer never ran


class NetnsError(RuntimeError):
    pass


def ip(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raise :class:`NetnsError` with its stderr if it fails and ``check``."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


# ------------------------------------------------------------------------------ support


def unsupported_reason() -> str | None:
    """Why network namespaces cannot be used here, or None if they can.

    Tries the real thing in a throwaway namespace (a bridge and a veth pair inside it), so a
    container that lets ``ip netns add`` through but not links is detected too. Nothing is
    created in the root namespace."""
    if os.geteuid() != 0:
        return "netns tests need root (they create network namespaces and a bridge)"
    if shutil.which("ip") is None:
        return "netns tests need the `ip` command (iproute2)"
    probe = f"{PREFIX}{secrets.token_hex(3)}-0"
    try:
        result = ip("netns", "add", probe, check=False)
        if result.returncode != 0:
            return f"`ip netns add` failed: {result.stderr.strip() or result.returncode}"
        for args, what in (
            (("link", "add", "br0", "type", "bridge"), "a bridge"),
            (("link", "add", "v0", "type", "veth", "peer", "name", "v1"), "a veth pair"),
            (("link", "set", "v0", "master", "br0"), "a bridge port"),
        ):
            result = ip("-n", probe, *args, check=False)
            if result.returncode != 0:
                return f"cannot create {what} in a namespace: {result.stderr.strip()}"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip` failed: {exc}"
    finally:
        ip("netns", "del", probe, check=False)


# ------------------------------------------------------------------------------- sweep


def _pid_start(pid: int) -> str | None:
    """The start time of ``pid`` (guards against a recycled pid), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(run: str) -> bool:
    try:
        record = json.loads((STATE_DIR / f"{run}.json").read_text())
    except (OSError, ValueError):
        return False
    return _pid_start(int(record["pid"])) == record["start"]


def _kill_namespace_processes(ns: str, grace: float = 0.0) -> None:
    """SIGTERM (when ``grace``) then SIGKILL every process inside namespace ``ns``."""
    def pids() -> list[int]:
        result = ip("netns", "pids", ns, check=False)
        return [int(p) for p in result.stdout.split()] if result.returncode == 0 else []

    if grace > 0:
        for pid in pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pids() and time.monotonic() < deadline:
            time.sleep(0.05)
    for _ in range(50):
        remaining = pids()
        if not remaining:
            return
        for pid in remaining:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def leftovers() -> tuple[list[str], list[str]]:
    """(namespaces, links) in the root namespace that carry our prefix, any run."""
    namespaces = [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = [line.split(":")[1].strip().split("@")[0]
             for line in ip("-o", "link", "show", check=False).stdout.splitlines()]
    return ([n for n in namespaces if _NS_RE.match(n)], [link for link in links if _LINK_RE.match(link)])


def sweep() -> list[str]:
    """Delete what earlier, crashed runs of this module left behind; returns what went.

    Only names made by this module (``zmt<6 hex>-<n>`` namespaces, ``zmtb<6 hex>`` bridges,
    ``zmtv<6 hex>-<n>`` veths), and only for runs whose owning process is dead, so a
    concurrent session on the same machine is left alone."""
    removed: list[str] = []
    namespaces, links = leftovers()
    for ns in namespaces:
        run = _NS_RE.match(ns).group(1)  # type: ignore[union-attr]
        if _owner_alive(run):
            continue
        _kill_namespace_processes(ns)
        ip("netns", "del", ns, check=False)
        removed.append(f"netns {ns}")
    # veths before bridges: deleting a namespace removes its veth pair, asynchronously.
    for link in sorted(links, key=lambda n: n[len(PREFIX)] != "v"):
        run = _LINK_RE.match(link).group(1)  # type: ignore[union-attr]
        if _owner_alive(run):
            continue
        if ip("link", "del", link, check=False).returncode == 0:
            removed.append(f"link {link}")
    if STATE_DIR.is_dir():
        for record in STATE_DIR.glob("*.json"):
            if not _owner_alive(record.stem):
                record.unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------------- Net


class Host:
    """One network namespace on the bridge: a machine with its own ``eth0``, ``lo`` and ports."""

    def __init__(self, net: Net, name: str, index: int) -> None:
        self.net = net
        self.name = name
        self.index = index
        self.ns = f"{PREFIX}{net.run}-{index}"
        self.veth = f"{PREFIX}v{net.run}-{index}"  # the root-side end, on the bridge
        self.ip = f"{net.prefix}.{index}"
        self.processes: list[subprocess.Popen[Any]] = []
        self.nodes: list[Any] = []  # NodeOnHost instances, for logs on failure
        self.is_cut = False

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns}, ip={self.ip})"

    def _create(self) -> None:
        ip("netns", "add", self.ns)
        # The peer end is born inside the namespace, already named eth0.
        ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        ip("link", "set", self.veth, "master", self.net.bridge)
        ip("link", "set", self.veth, "up")
        self.ip_cmd("link", "set", "lo", "up")
        self.ip_cmd("addr", "add", f"{self.ip}/24", "dev", "eth0")
        self.ip_cmd("link", "set", "eth0", "multicast", "on", "up")
        self.ip_cmd("route", "add", "224.0.0.0/4", "dev", "eth0")

    def ip_cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip ARGS`` inside this host."""
        return ip("-n", self.ns, *args, check=check)

    def run(self, args: list[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``args`` inside this host (``ip netns exec``); killed at teardown."""
        process = subprocess.Popen(["ip", "netns", "exec", self.ns, *args], **popen_kwargs)
        self.processes.append(process)
        return process

    def check_output(self, args: list[str], timeout: float = 10) -> str:
        """Run ``args`` inside this host to completion; its stdout (raises on failure)."""
        return subprocess.run(["ip", "netns", "exec", self.ns, *args], capture_output=True,
                              text=True, timeout=timeout, check=True).stdout

    def cut(self) -> None:
        """Partition this host: its link to the bridge goes down (the root-side veth end)."""
        ip("link", "set", self.veth, "down")
        self.is_cut = True

    def heal(self) -> None:
        """Undo :meth:`cut`."""
        ip("link", "set", self.veth, "up")
        self.is_cut = False

    def block(self, other: Host) -> None:
        """Drop everything this host sends to ``other`` (a blackhole route: silent, like a
        broken link, not a refusal). With :meth:`unblock`, and the same on ``other``, it
        cuts the two hosts apart while both still reach the bridge and the test."""
        ip("-n", self.ns, "route", "add", "blackhole", f"{other.ip}/32")

    def unblock(self, other: Host) -> None:
        ip("-n", self.ns, "route", "del", "blackhole", f"{other.ip}/32", check=False)

    def kill_all(self, grace: float = 2.0) -> None:
        """Stop every process started in this host: SIGTERM, then SIGKILL after ``grace`` s;
        then anything else still inside the namespace (children of what we started)."""
        self._terminate()
        self._reap(time.monotonic() + grace)

    def _terminate(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()

    def _reap(self, deadline: float) -> None:
        for process in self.processes:
            try:
                process.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
        _kill_namespace_processes(self.ns)
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close_log()

    def _destroy(self) -> None:
        self.kill_all()
        ip("link", "del", self.veth, check=False)
        ip("netns", "del", self.ns, check=False)


class Net:
    """A bridge in the root namespace and the hosts on it; :meth:`close` removes it all."""

    def __init__(self) -> None:
        self.run = secrets.token_hex(3)
        self.bridge = f"{PREFIX}b{self.run}"
        self.hosts: list[Host] = []
        self.closed = False
        self.prefix = f"{SUBNET}.{self._free_subnet()}"
        self.gateway = f"{self.prefix}.254"  # the root namespace's address on the bridge
        self._claim()
        with _lock:
            _live.append(self)
        try:
            ip("link", "add", "name", self.bridge, "type", "bridge", "stp_state", "0",
               "forward_delay", "0", "mcast_snooping", "0")
            # If br_netfilter is loaded, keep bridged frames out of the host's iptables
            # (a FORWARD policy of DROP, as Docker sets, would silently eat them).
            ip("link", "set", self.bridge, "type", "bridge", "nf_call_iptables", "0",
               "nf_call_ip6tables", "0", "nf_call_arptables", "0", check=False)
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _free_subnet() -> int:
        """A random k in 1..250 whose 10.231.k.0/24 is not already routed here."""
        routes = ip("-4", "route", "show", check=False).stdout + ip("-4", "addr", "show", check=False).stdout
        used = {int(m) for m in re.findall(rf"{re.escape(SUBNET)}\.(\d+)\.", routes)}
        free = [k for k in range(1, 251) if k not in used]
        if not free:
            raise NetnsError(f"no free {SUBNET}.k.0/24 subnet")
        return free[secrets.randbelow(len(free))]

    def _claim(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "start": _pid_start(os.getpid()), "bridge": self.bridge}
        (STATE_DIR / f"{self.run}.json").write_text(json.dumps(record))

    def add_host(self, name: str) -> Host:
        if len(self.hosts) >= 250:
            raise NetnsError("at most 250 hosts on one Net")
        host = Host(self, name, len(self.hosts) + 1)
        self.hosts.append(host)
        host._create()
        return host

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def close(self) -> None:
        """Kill every process, delete every namespace, veth and the bridge. Idempotent."""
        if self.closed:
            return
        self.closed = True
        errors: list[str] = []
        # SIGTERM everywhere first, so the hosts stop together rather than one by one.
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host._terminate()
        deadline = time.monotonic() + 2.0
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host._reap(deadline)
        for host in self.hosts:
            try:
                host._destroy()
            except Exception as exc:  # keep going: the rest must still be removed
                errors.append(f"{host}: {exc}")
        ip("link", "del", self.bridge, check=False)
        (STATE_DIR / f"{self.run}.json").unlink(missing_ok=True)
        with _lock:
            if self in _live:
                _live.remove(self)
        if errors:
            raise NetnsError("cleanup: " + "; ".join(errors))

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _close_live() -> None:
    for net in list(_live):
        with contextlib.suppress(Exception):
            net.close()
