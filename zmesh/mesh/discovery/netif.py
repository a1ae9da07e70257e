"""Network interfaces: the IPv4 address and netmask of an interface, and which interface
holds a given address. Linux ioctls through the standard library, so no extra dependency."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

SIOCGIFADDR = 0x8915
SIOCGIFNETMASK = 0x891B


def _ioctl_ipv4(name: str, request: int) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), request, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None  # no such interface, or no IPv4 address on it
    return socket.inet_ntoa(packed[20:24])


def interface_network(name: str) -> ipaddress.IPv4Interface | None:
    """``10.0.0.5/24`` for an interface with that IPv4 address, or None."""
    address = _ioctl_ipv4(name, SIOCGIFADDR)
    netmask = _ioctl_ipv4(name, SIOCGIFNETMASK)
    if address is None or netmask is None:
        return None
    return ipaddress.IPv4Interface(f"{address}/{netmask}")


def interfaces() -> list[str]:
    return [name for _index, name in socket.if_nameindex()]


def interface_of(address: str) -> str | None:
    """The interface that holds ``address``, or None."""
    for name in interfaces():
        network = interface_network(name)
        if network is not None and str(network.ip) == address:
            return name
    return None


def default_route_interface() -> str | None:
    """The interface of the IPv4 default route (from /proc/net/route), or None."""
    try:
        with open("/proc/net/route") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000":
                    return fields[0]
    except OSError:
        pass
    return None
