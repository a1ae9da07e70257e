"""This node's credentials when the mesh has an authority (docs/identity.md): its key pair,
its own certificate chain (self-issued from its group's signer and renewed, or issued by
hand), the ``Admission`` that judges peers, and the identity socket's question and answer.

May import: ``zmesh.security``, ``zmesh.mesh.admission``, ``zmesh.config``. Imported by
``zmesh.node`` (which builds the credentials) and ``zmesh.mesh.mesh`` (the identity socket).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from zmesh.config import NodeConfig
from zmesh.mesh.admission import Admission
from zmesh.security import identity
from zmesh.security.certs import KeyRing, load_secret_certificate
from zmesh.security.meshauthority import (
    AuthorityFileError,
    Signer,
    load_authority_keys,
    load_signer,
)

log = logging.getLogger("zmesh.node")

WHO = b"who"  # the identity question
MAX_ANSWER_BYTES = 8192


class Credentials:
    """Built once at start; ``renew_forever`` keeps a self-issued chain fresh."""

    def __init__(self, config: NodeConfig) -> None:
        mesh, source = config.mesh, config.source
        assert mesh.authority is not None
        self.name = config.name
        self.groups = mesh.groups
        try:
            authorities = load_authority_keys(mesh.authority)
        except AuthorityFileError as exc:
            raise ValueError(f"{source}: mesh.authority: {exc}") from None
        if mesh.cert is not None:
            self.public, self.secret = load_secret_certificate(mesh.cert)
        else:
            self.public, self.secret = zmq.curve_keypair()  # a new identity at every start, in memory
        self.ring = KeyRing.from_directory(mesh.trusted) if mesh.trusted else KeyRing()
        now = time.time()
        self.signer: Signer | None = None
        if mesh.signer is not None:
            try:
                self.signer = load_signer(mesh.signer)
            except AuthorityFileError as exc:
                raise ValueError(f"{source}: mesh.signer: {exc}") from None
            chain, key_name = self._issue(now), "mesh.signer"
        else:
            assert mesh.certificate is not None
            try:
                chain = mesh.certificate.read_bytes()
            except OSError as exc:
                raise ValueError(f"{source}: mesh.certificate: {mesh.certificate}: {exc.strerror}") from None
            key_name = "mesh.certificate"
        try:
            own = identity.verify_chain(chain, authorities, now=now, expected_key=self.public)
        except identity.IdentityError as exc:
            raise ValueError(f"{source}: {key_name}: our own certificate does not verify ({exc.reason}): {exc}") from None
        if own.name != self.name:
            log.warning("node name %r, but our certificate names us %r: peers will know us as %r",
                        self.name, own.name, own.name)
        self.admission = Admission(authorities, self.ring, chain)
        if mesh.revocations is not None:
            try:
                self.admission.offer_revocations(mesh.revocations.read_bytes())
            except (OSError, identity.IdentityError) as exc:
                raise ValueError(f"{source}: mesh.revocations: {exc}") from None
        log.info("admitted by certificate: %s in %s until %s", own.name, ",".join(own.groups) or "no group",
                 time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(own.not_after)))

    def _issue(self, now: float) -> bytes:
        """A node certificate for our key from our group's signer: as long as the signer
        allows and no longer than it lives."""
        signer = self.signer
        assert signer is not None
        lifetime = min(signer.info.max_node_lifetime, signer.info.not_after - now)
        node = identity.issue_node(signer.key, self.public, self.name, self.groups or signer.info.groups,
                                   now=now, lifetime=lifetime)
        return identity.chain(node, signer.certificate)

    async def renew_forever(self) -> None:
        """Issue ourselves a fresh certificate at two thirds of the current one's life; our
        hellos carry it, and peers take the later expiry."""
        if self.signer is None:
            return  # a hand-issued certificate is renewed by hand
        while True:
            left = identity.node_of(self.admission.own_chain).not_after - time.time()
            await asyncio.sleep(max(1.0, left * 2 / 3))
            try:
                self.admission.own_chain = self._issue(time.time())
            except ValueError as exc:  # the signer itself has expired: nothing to renew with
                log.error("cannot renew our certificate: %s", exc)
                return


def identity_answer(own_key: str, admission: Admission) -> bytes:
    return msgpack.packb({"k": own_key, "c": admission.own_chain}, use_bin_type=True)  # type: ignore[no-any-return]


def parse_identity_answer(answer: bytes) -> tuple[str, bytes]:
    """(key, chain) from a seed's answer; ValueError for anything else (hostile input)."""
    try:
        body: Any = msgpack.unpackb(answer[:MAX_ANSWER_BYTES + 1], raw=False, max_bin_len=identity.MAX_CHAIN_BYTES,
                                    max_str_len=64, max_array_len=0, max_map_len=4)
        key, chain = body["k"], body["c"]
    except Exception as exc:  # msgpack raises several types; a non-map raises TypeError
        raise ValueError(f"not an identity answer ({type(exc).__name__})") from None
    if len(answer) > MAX_ANSWER_BYTES or not isinstance(key, str) or not isinstance(chain, bytes):
        raise ValueError("not an identity answer")
    return key, chain


async def serve_identity(sock: zmq.asyncio.Socket, own_key: str, admission: Admission) -> None:
    """Answer "who are you" with our key and chain: public by nature."""
    while True:
        frames = await sock.recv_multipart()
        if len(frames) != 2 or frames[1] != WHO:
            continue  # anything else on an unauthenticated socket: ignored
        try:
            await sock.send_multipart([frames[0], identity_answer(own_key, admission)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the asker went away, or its queue is full: it asks again
