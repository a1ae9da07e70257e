"""TLS for the MQTT listeners: the server context built from a listener's Mosquitto-style
options, the client certificate's common name, and the TLS layer of an accepted socket.

A failed handshake (unknown CA, no client certificate, plain MQTT sent to the TLS port)
closes only that socket and is told in one info line, without a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from zmesh.config import ListenerConfig
from zmesh.mqtt.wrapped import LayerProtocol, WrappedTransport
from zmesh.security.secretfile import read_secret_file

log = logging.getLogger("zmesh.mqtt")

_MAX_PEM_BYTES = 1024 * 1024
_READ_SIZE = 256 * 1024
_MIN_VERSION = {"tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}


class ListenerError(ValueError):
    """A listener that cannot start; the message names the config file, the key and the
    file at fault, never a key's content."""

    # Set when binding failed: the listener's key and address, and the errno.
    key: str = ""
    address: str = ""
    errno: int | None = None


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and hang a daemon.
    raise _EncryptedKey


def _read_pem(path: Path, noun: str, fail: Callable[[str], ListenerError], secret: bool = False) -> bytes:
    if secret:
        return read_secret_file(
            path, noun=noun, error=lambda message: fail(message), max_bytes=_MAX_PEM_BYTES,
            mode_warning="other users on this host can read the listener's TLS private key", log=log,
        )
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        raise fail(f"{path}: {noun} not found") from None
    except OSError as exc:
        raise fail(f"{path}: cannot read {noun}: {exc.strerror or exc}") from None
    if len(data) > _MAX_PEM_BYTES:
        raise fail(f"{path}: too large to be a {noun}")
    return data


def build_server_context(listener: ListenerConfig, source: str) -> ssl.SSLContext:
    """The TLS context of a listener with ``certfile``; ``ListenerError`` naming
    ``<source>: <listener key>.<option>`` for a missing, unreadable or unusable file."""
    assert listener.certfile is not None and listener.keyfile is not None

    def fail_at(option: str) -> Callable[[str], ListenerError]:
        return lambda message: ListenerError(f"{source}: {listener.key}.{option}: {message}")

    certfile, keyfile = listener.certfile, listener.keyfile
    # Read them first: OpenSSL says only "PEM lib" and not which of the two files is wrong.
    if b"-----BEGIN CERTIFICATE-----" not in _read_pem(certfile, "certificate file", fail_at("certfile")):
        raise fail_at("certfile")(f"{certfile}: no PEM certificate in it")
    key_pem = _read_pem(keyfile, "private key file", fail_at("keyfile"), secret=True)
    if b"PRIVATE KEY-----" not in key_pem:
        raise fail_at("keyfile")(f"{keyfile}: no PEM private key in it")
    del key_pem

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MIN_VERSION[listener.tls_version]
    context.options |= ssl.OP_NO_RENEGOTIATION  # a TLS 1.2 client may not restart the handshake
    try:
        context.load_cert_chain(certfile, keyfile, password=_refuse_password)
    except _EncryptedKey:
        raise fail_at("keyfile")(
            f"{keyfile}: the private key is encrypted; give the listener an unencrypted key "
            "(readable by the node only, mode 0600)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise fail_at("keyfile")(f"{keyfile}: this private key does not belong to {certfile}") from None
        raise fail_at("certfile")(
            f"{certfile} with {keyfile}: not a usable certificate chain and key ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise fail_at("certfile")(f"{certfile}: cannot load: {exc.strerror or exc}") from None

    if listener.cafile is not None or listener.capath is not None:
        option = "cafile" if listener.cafile is not None else "capath"
        if listener.cafile is not None:
            _read_pem(listener.cafile, "CA file", fail_at("cafile"))
        elif not listener.capath.is_dir():  # type: ignore[union-attr]
            raise fail_at("capath")(f"{listener.capath}: not a directory")
        try:
            context.load_verify_locations(cafile=listener.cafile, capath=listener.capath)
        except (ssl.SSLError, OSError) as exc:
            where = listener.cafile or listener.capath
            raise fail_at(option)(f"{where}: no usable CA certificate ({getattr(exc, 'reason', None) or exc})") from None
    # As Mosquitto: verify client certificates only when they are required (the CA files
    # alone verify nothing), and then refuse a client that sends none.
    context.verify_mode = ssl.CERT_REQUIRED if listener.require_certificate else ssl.CERT_NONE
    if listener.ciphers is not None:
        try:
            context.set_ciphers(listener.ciphers)
        except ssl.SSLError:
            raise fail_at("ciphers")(f"{listener.ciphers!r}: OpenSSL knows no cipher in this list") from None
    return context


def common_name(peercert: dict[str, Any] | None) -> str | None:
    """The first commonName of a verified peer certificate's subject (what Mosquitto's
    ``use_identity_as_username`` takes), or None."""
    for rdn in (peercert or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def describe_failure(exc: BaseException) -> str:
    """A short reason for a failed handshake: the OpenSSL reason, not a traceback."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate refused: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        hints = {
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate (require_certificate is on)",
            "HTTP_REQUEST": "an HTTP request, not TLS",
            "WRONG_VERSION_NUMBER": "not TLS (plain MQTT to the TLS port?)",
            "UNSUPPORTED_PROTOCOL": "the client's TLS version is below the listener's tls_version",
            "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust the listener's certificate (its CA)",
        }
        return hints.get(reason, reason)
    return str(exc) or type(exc).__name__


class TlsTransport(WrappedTransport):
    """What the inner protocol writes to: bytes are encrypted into TLS records."""

    def __init__(self, adapter: TlsAdapter, raw: asyncio.Transport, extra: dict[str, Any]) -> None:
        super().__init__(raw, extra)
        self._adapter = adapter

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing and data:
            self._adapter.send(data)

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._adapter.close_tls()


class TlsAdapter(LayerProtocol):
    """The server side of TLS on one accepted socket, over ``ssl.MemoryBIO`` (sans-I/O).

    Not ``loop.start_tls``: asyncio's own path drops a failed handshake without a word
    (an operator whose client is refused wants one line saying why), and under uvloop a
    ClientHello can reach the protocol before ``start_tls`` takes the socket over, which
    loses the handshake. Here this protocol owns the socket from its first byte, on any
    event loop. After the handshake, ``on_ready(cert_username)`` makes the inner protocol
    (an MQTT ``Connection`` or a ``WebSocketAdapter``), which sees decrypted bytes through
    a ``TlsTransport``. Bytes that came with the end of the handshake are passed on at once.
    """

    def __init__(
        self,
        listener: ListenerConfig,
        context: ssl.SSLContext,
        handshake_timeout: float,
        on_ready: Callable[[str | None], asyncio.Protocol],
        live: set[Any],
    ) -> None:
        self.listener = listener
        self._context = context
        self._timeout = handshake_timeout
        self._on_ready = on_ready
        self._live = live
        self._raw: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls: ssl.SSLObject | None = None
        self._inner: asyncio.Protocol | None = None
        self._transport: TlsTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = False  # handshake failed or connection closing: ignore further bytes
        self._peer = "?"

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance(asyncio.Transport): uvloop's transports are not subclasses.
        self._raw = cast(asyncio.Transport, transport)
        peer = self._raw.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._tls = self._context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._live.add(self)
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._incoming.write(data)
        if self._inner is None and not self._handshake():
            return
        self._read_records()

    def eof_received(self) -> None:
        return None  # close; connection_lost tells the inner protocol

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._live.discard(self)
        if self._cancel_timer():
            log.debug("%s: client %s closed the connection during the TLS handshake",
                      self.listener.describe(), self._peer)
        self._end_inner(exc)

    # ------------------------------------------------------------------ TLS

    def _handshake(self) -> bool:
        """Advance the handshake; True once it is complete and the inner protocol is up."""
        assert self._tls is not None and self._raw is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError as exc:
            self._flush()  # the alert tells the client why
            self._fail(describe_failure(exc))
            return False
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._live.discard(self)
        peercert = self._tls.getpeercert()
        cert_username = None
        if self.listener.use_identity_as_username:
            # require_certificate is on (the config insists), so a certificate was verified.
            cert_username = common_name(peercert)
            if not cert_username or "\x00" in cert_username:
                log.info("%s: client %s refused: its certificate has no usable CN to take as the "
                         "username (use_identity_as_username)", self.listener.describe(), self._peer)
                self.close_tls()
                return False
            log.debug("%s: client %s: certificate CN %r is its username",
                      self.listener.describe(), self._peer, cert_username)
        extra = {
            "ssl_object": self._tls,
            "peercert": peercert,
            "cipher": self._tls.cipher(),
            "compression": self._tls.compression(),
            "sslcontext": self._context,
        }
        self._transport = TlsTransport(self, self._raw, extra)
        self._inner = self._on_ready(cert_username)
        self._transport.set_protocol(self._inner)
        self._inner.connection_made(self._transport)
        return True

    def _read_records(self) -> None:
        """Decrypt what has arrived and pass it on in one piece."""
        assert self._tls is not None
        chunks: list[bytes] = []
        eof = False
        while True:
            try:
                chunk = self._tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the client's close_notify
                eof = True
                break
            except ssl.SSLError as exc:
                self._fail(describe_failure(exc), after_handshake=True)
                return
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
        self._flush()  # reading may answer (TLS 1.3 key updates)
        if chunks and self._inner is not None and self._transport is not None and not self._transport.is_closing():
            self._inner.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if eof and self._inner is not None and not self._inner.eof_received():
            self.close_tls()

    def send(self, data: bytes | bytearray | memoryview) -> None:
        assert self._tls is not None
        view = memoryview(data)
        try:
            while view:
                # A memory BIO never blocks, so a write takes everything unless the peer is
                # renegotiating, which the context forbids (OP_NO_RENEGOTIATION).
                view = view[self._tls.write(view):]
        except ssl.SSLError as exc:
            self._fail(describe_failure(exc), after_handshake=True)
            return
        self._flush()

    def close_tls(self) -> None:
        """Send close_notify and close the socket (after what is written is flushed)."""
        self._done = True
        if self._transport is not None:
            self._transport.mark_closing()
        if self._tls is not None:
            try:
                self._tls.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: the client's close_notify is not awaited
        self._flush()
        if self._raw is not None:
            self._raw.close()

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and self._raw is not None and not self._raw.is_closing():
            self._raw.write(data)

    def _fail(self, why: str, after_handshake: bool = False) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        what = "TLS error" if after_handshake else "TLS handshake failed"
        log.info("%s: client %s: %s: %s", self.listener.describe(), self._peer, what, why)
        assert self._raw is not None
        self._raw.close()  # flushes the alert, if any

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self._done = True
        log.info("%s: client %s: TLS handshake not completed in %g s: closing",
                 self.listener.describe(), self._peer, self._timeout)
        if self._raw is not None:
            self._raw.abort()

    def shutdown(self) -> None:
        """The node is stopping: give up on this handshake."""
        self._done = True
        if self._raw is not None:
            self._raw.abort()
