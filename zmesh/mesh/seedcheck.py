"""Why a seed gives us no handshake, in words: behind the mesh's warning about a seed that
stays silent and the message of ``Node.wait_for_peers`` when it times out.

A node dials a seed once per trusted key (its key is unknown); when none completes, the
seed is down, or it uses our own key (two nodes with one certificate), or its key and ours
are not trusted both ways. The first two can be told apart from here, as ``zmesh doctor``
does: a TCP connect, then one CURVE probe with our own key as the server key. The last is
what remains: which side lacks the other's key cannot be seen from this side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import zmq
import zmq.asyncio

from zmesh.mesh import wire

PROBE_TIMEOUT = 1.0


def seed_message(seed: str, reachable: bool, own_key: bool, why_down: str, trusted: int,
                 directory: Path | None) -> str:
    """The sentence for one seed (pure, for the tests and both callers)."""
    if not reachable:
        return (f"seed {seed} is down or unreachable ({why_down}): is a node running there, "
                "and is the port open between the hosts? (still trying)")
    if own_key:
        return (f"seed {seed} answers with our own key: two nodes share one certificate, and a "
                "node never links to its own key; give this node its own (zmesh certs create NAME)")
    where = f" ({directory})" if directory is not None else ""
    return (f"seed {seed} is reachable, but no CURVE handshake with any of our {trusted} trusted "
            f"keys completed: its key is not in our trusted directory{where}, or ours is not in "
            "its (copy the NAME.key files both ways; zmesh doctor checks a seed)")


async def diagnose_seed(host: str, port: int, public: bytes, secret: bytes, trusted: int,
                        directory: Path | None) -> str:
    """Ask the seed at ``host:port`` the two questions above; bounded by ~2 * PROBE_TIMEOUT."""
    seed = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        # By errno: asyncio's own text is "Connect call failed (...)", uvloop's the C one.
        why = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else "no answer"
        return seed_message(seed, False, False, why.lower(), trusted, directory)
    return seed_message(seed, True, await answers_with_key(host, port, public, secret, public),
                        "", trusted, directory)


async def answers_with_key(host: str, port: int, public: bytes, secret: bytes, server_key: bytes) -> bool:
    """Whether a zmesh node at ``host:port`` completes a CURVE handshake as ``server_key``."""
    context = zmq.asyncio.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_key
        sock.connect(f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}")
        await sock.send(wire.encode_control(wire.PROBE))  # answered, but never made a member
        return bool(await sock.poll(int(PROBE_TIMEOUT * 1000)))
    finally:
        context.destroy(linger=0)
