"""A tiny UDP multicast sender and receiver, run inside a namespace by the tests.

    python -m tests.netns.mcast recv GROUP PORT TIMEOUT   prints "joined", then the first datagram
                                                          as JSON {"data", "from"}; exit 1 on timeout
    python -m tests.netns.mcast send GROUP PORT COUNT INTERVAL

Neither names an interface: the receiver joins on INADDR_ANY and the sender uses the default
multicast interface, so both depend on the host's route for 224.0.0.0/4, as mDNS does.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time


def recv(group: str, port: int, timeout: float) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", port))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                    struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("0.0.0.0")))
    print("joined", flush=True)
    sock.settimeout(timeout)
    try:
        data, sender = sock.recvfrom(2048)
    except TimeoutError:
        print("timeout", flush=True)
        return 1
    print(json.dumps({"data": data.decode(errors="replace"), "from": sender[0]}), flush=True)
    return 0


def send(group: str, port: int, count: int, interval: float) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    for i in range(count):
        sock.sendto(f"hello {i}".encode(), (group, port))
        time.sleep(interval)
    return 0


if __name__ == "__main__":
    mode, group, port, a, *rest = sys.argv[1:]
    if mode == "recv":
        sys.exit(recv(group, int(port), float(a)))
    sys.exit(send(group, int(port), int(a), float(rest[0])))
