"""MQTT sessions that outlive connections: the subscriber the node's router knows, and the
store that keeps, expires and bounds them. No sockets here: a session talks to whatever
connection is attached to it (``Link``) and gets time and timers from its store.

A ``Session`` is registered with the router for its subscriptions, and stays registered
while its client is away (MQTT 3.1.1 clean session 0, or an MQTT 5 session expiry
interval): QoS 1 and 2 messages then wait in its ``OutboundWindow`` (bounded by
``mqtt.max_queued``, oldest dropped first) and go out when the client returns, after the
unacknowledged ones are sent again with DUP. QoS 0 messages for an absent client are not
kept (Mosquitto's default, ``queue_qos0_messages false``).

Without ``node.data_dir`` sessions live in memory only: a node restart ends them all
(clients see session_present 0 and subscribe again, as after a Mosquitto restart without
persistence). With it, every persistent session is mirrored to disk
(``zmesh.mqtt.sessionstore``: what is durable when is said there) and restored at start,
offline until its client returns, its expiry counted on the wall clock from when its
client went away (from the restart, for a client connected when the node died).

The delivery path is the hot path. For a client without ACLs and without MQTT 5
subscription options it is: one attribute test, then the connection encodes and writes.
Read access is checked here, at delivery, for every message (retained replay included),
with the decision cached per topic until the authority's ``generation`` moves (an ACL
reload then applies to live subscriptions on their next message).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from zmesh import topics
from zmesh.mqtt.codec import Will
from zmesh.mqtt.session import (
    NEVER,
    InboundQoS2,
    OutboundWindow,
    Outgoing,
    QueueBudget,
    SubscriptionOptions,
    plan_delivery,
)

if TYPE_CHECKING:
    from zmesh.config import MqttConfig
    from zmesh.mqtt.sessionstore import SessionPersistence, StoredSession
    from zmesh.ports import Broker

log = logging.getLogger("zmesh.mqtt")

ACL_CACHE_LIMIT = 4096  # cached read decisions per session; cleared whole when full
MATCH_CACHE_LIMIT = 4096  # cached topic -> matching subscription options per session


class Link(Protocol):
    """What a session needs from the connection attached to it (``mqtt.server.Connection``)."""

    level: int

    def publish0(self, topic: str, payload: bytes, retain: bool, properties: dict[str, Any] | None) -> None: ...

    def publish_plain(self, topic: str, payloads: list[bytes]) -> None: ...

    def send(self, message: Outgoing) -> None: ...


class Authority(Protocol):
    generation: int

    def authorize(self, username: str | None, client_id: str, topic: str, access: str) -> bool: ...


class Hub(Protocol):
    """The MQTT server as sessions see it."""

    config: MqttConfig
    broker: Broker  # the node: router, retained replay, publishing
    dropped_total: int
    publishing: Session | None  # the session whose PUBLISH is being routed right now
    queue_budget: QueueBudget  # bytes held for all sessions (mqtt.max_queued_bytes_total)

    def drop(self, reason: str, detail: str = "", count: int = 1) -> None:
        """Count (and log, rate-limited) refused input or a dropped message (zmesh.drops)."""


class Session:
    """One client's session: subscriptions, messages on their way, QoS 2 state, its will."""

    def __init__(self, hub: Hub, client_id: str) -> None:
        config = hub.config
        self.hub = hub
        self.broker = hub.broker
        self.client_id = client_id
        self.username: str | None = None
        self.conn: Link | None = None
        self.level = 4
        self.expiry = 0  # seconds kept after the connection goes; NEVER: no limit
        self.subscriptions: dict[str, SubscriptionOptions] = {}
        # Some subscription uses no local, retain as published or an identifier: delivery
        # then consults the options of the matching subscriptions (else the router's
        # granted QoS is all there is to know).
        self.special = False
        self._special_count = 0  # how many subscriptions are not plain: O(1) per change
        # Every subscription's options in a trie, for _matching; built when the first
        # special subscription arrives (a plain-only session never needs it), then kept.
        self._options: topics.SubscriptionTrie[int] | None = None
        self.window = OutboundWindow(config.max_inflight, config.max_queued, config.max_queued_bytes, hub.queue_budget)
        self.inbound_qos2 = InboundQoS2()
        self.auth: Authority | None = None
        self.pending_will: Will | None = None  # waiting out its will delay interval
        self.ended = False
        self.expiry_timer: Any = None
        self.will_timer: Any = None
        self._dropped = 0
        self._reported: dict[str, int] = {}  # window.drops already handed to hub.drop
        self._read: dict[str, bool] = {}
        self._read_generation = -1
        self._matches: dict[str, list[SubscriptionOptions]] = {}
        self._replay: SubscriptionOptions | None = None  # the subscription retained replay is for
        # The disk copy (zmesh.mqtt.sessionstore) while the session is persistent and the
        # node has a data_dir; None otherwise.
        self.persist: SessionPersistence | None = None
        self.offline_since: float | None = None  # wall clock: when its client went away

    def __repr__(self) -> str:
        return f"Session({self.client_id!r}, {'online' if self.conn else 'offline'})"

    # ------------------------------------------------------------------ access control

    def set_owner(self, username: str | None, auth: Authority | None) -> bool:
        """The user a (new or resumed) connection logged in as; True when it differs from
        the session's previous owner. Read decisions are cached per topic for one owner
        only: a new owner (another user connecting with this client id) starts afresh."""
        changed = username != self.username or auth is not self.auth
        self.username, self.auth = username, auth
        if changed:
            self._read.clear()
            self._read_generation = -1
        return changed

    def restrict_to_owner(self) -> int:
        """After a takeover by another user: what the session holds is kept only as far as
        the new owner's rights allow. Subscriptions it may not make are removed; queued and
        in-flight messages it may not read are dropped (counted), as Mosquitto 2.0 does for
        the queue and the resent in-flight message. Returns how many messages went."""
        auth = self.auth
        if auth is None:
            return 0
        for filt in [f for f in self.subscriptions if not auth.authorize(self.username, self.client_id, f, "subscribe")]:
            log.info("client %s: subscription %s removed: its new owner may not subscribe to it", self.client_id, filt)
            self.unsubscribe(filt)
        window = self.window
        gone = window.retain_only(lambda m: self.may_read(m.topic))
        gone += window.drop_inflight(lambda m: self.may_read(m.topic))
        self.count_drops()
        return gone

    def may_read(self, topic: str) -> bool:
        auth = self.auth
        if auth is None:
            return True
        if auth.generation != self._read_generation:
            self._read.clear()  # the rules were reloaded: decide again
            self._read_generation = auth.generation
        allowed = self._read.get(topic)
        if allowed is None:
            allowed = bool(auth.authorize(self.username, self.client_id, topic, "read"))
            if len(self._read) >= ACL_CACHE_LIMIT:
                self._read.clear()
            self._read[topic] = allowed
        return allowed

    # ------------------------------------------------------------------ subscriptions

    def subscribe(self, filt: str, options: SubscriptionOptions, replay: bool) -> None:
        """Add or replace one subscription; ``replay``: send the matching retained messages."""
        self._options_changed(self.subscriptions.get(filt), options)
        self.subscriptions[filt] = options
        if self._options is not None:
            self._options.add(filt, 0, options)
        self._replay = options
        if self.persist is not None:
            self.persist.subscription(self, filt, options)
        try:
            self.broker.add_subscription(self, filt, options.qos, retained=replay)
        finally:
            self._replay = None

    def unsubscribe(self, filt: str) -> bool:
        old = self.subscriptions.pop(filt, None)
        if old is None:
            return False
        self._options_changed(old, None)
        if self._options is not None:
            self._options.remove(filt, 0)
        if self.persist is not None:
            self.persist.subscription(self, filt, None)
        self.broker.remove_subscription(self, filt)
        return True

    def _options_changed(self, old: SubscriptionOptions | None, new: SubscriptionOptions | None) -> None:
        # O(1) per subscription: a pass over all of them here made one SUBSCRIBE with
        # 20,000 filters quadratic (issue 14, hole 2).
        self._matches.clear()
        self._special_count += (new is not None and not new.plain) - (old is not None and not old.plain)
        self.special = self._special_count > 0
        if self.special and self._options is None:
            trie: topics.SubscriptionTrie[int] = topics.SubscriptionTrie()
            for f, o in self.subscriptions.items():
                trie.add(f, 0, o)
            self._options = trie

    def _matching(self, topic: str) -> list[SubscriptionOptions]:
        found = self._matches.get(topic)
        if found is None:
            trie = self._options
            found = [o for _, _, o in trie.match(topic)] if trie is not None else []
            if len(self._matches) >= MATCH_CACHE_LIMIT:
                self._matches.clear()
            self._matches[topic] = found
        return found

    # ------------------------------------------------------------------ delivery (hot path)

    def deliver(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        origin: str,
        properties: dict[str, Any] | None,
    ) -> None:
        """A message for this client. ``retain`` is True only for retained replay after a
        subscribe; ``qos`` is already capped by the router at the highest granted QoS."""
        if self.auth is not None and not self.may_read(topic):
            return
        if self.special:
            matching = [self._replay] if retain and self._replay is not None else self._matching(topic)
            if matching:
                plan = plan_delivery(
                    matching, self.hub.publishing is self, retain, self.broker.delivering_retained, qos
                )
                if plan is None:
                    return  # no local: the client's own message
                qos, retain, identifiers = plan
                if identifiers:
                    properties = {**properties, "subscription_identifier": identifiers} if properties else {
                        "subscription_identifier": identifiers
                    }
        conn = self.conn
        if qos == 0:
            if conn is not None:
                conn.publish0(topic, payload, retain, properties)
            return
        message = Outgoing(topic, payload, qos, retain, properties)
        if properties is not None:
            interval = properties.get("message_expiry_interval")
            if interval is not None:
                message.expires_at = time.monotonic() + interval
        window = self.window
        sent = window.offer(message, conn is not None)
        if sent is not None:
            conn.send(sent)  # type: ignore[union-attr]  # offer() sends only when online
        elif window.dropped != self._dropped:
            self.count_drops()

    def deliver_plain(self, topic: str, payloads: list[bytes], origin: str) -> None:
        """Many QoS 0 messages without properties (a batch from the mesh)."""
        conn = self.conn
        if conn is None:
            return
        if self.auth is not None and not self.may_read(topic):
            return
        if self.special:
            for payload in payloads:
                self.deliver(topic, payload, 0, False, origin, None)
            return
        conn.publish_plain(topic, payloads)

    def deliver_shared(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        properties: dict[str, Any] | None,
        origin: str,
        settle: Callable[[bool], None],
    ) -> bool:
        """A message of one of our shared subscriptions (zmesh.jobs.shared), for us alone among
        the group's members. ``settle(True)`` once it is the client's (PUBACK, PUBCOMP; at
        once at QoS 0), ``settle(False)`` if it is dropped undelivered; kept in the window
        while the client is away. False: not taken (no read access, or QoS 0 while away)."""
        if self.auth is not None and not self.may_read(topic):
            return False
        conn = self.conn
        if qos == 0:
            if conn is None:
                return False
            conn.publish0(topic, payload, False, properties)
            settle(True)
            return True
        message = Outgoing(topic, payload, qos, False, properties, settle=settle)
        if properties is not None:
            interval = properties.get("message_expiry_interval")
            if interval is not None:
                message.expires_at = time.monotonic() + interval
        sent = self.window.offer(message, conn is not None)
        if sent is not None:
            conn.send(sent)  # type: ignore[union-attr]  # offer() sends only when online
        else:
            self.count_drops()
        return True

    def count_drops(self) -> None:
        window = self.window
        if window.dropped != self._dropped:
            self.hub.dropped_total += window.dropped - self._dropped
            self._dropped = window.dropped
            reported = self._reported
            for reason, count in window.drops.items():
                delta = count - reported.get(reason, 0)
                if delta:
                    reported[reason] = count
                    self.hub.drop(reason, f"client {self.client_id}", delta)


class SessionStore:
    """Every session of one MQTT server, by client id, with expiry and a bound on how many
    persistent sessions wait for absent clients.

    ``call_later(delay, callback)`` schedules a timer and returns a handle with
    ``cancel()`` (``loop.call_later``); ``publish_will(session, will)`` publishes a will."""

    def __init__(
        self,
        hub: Hub,
        call_later: Callable[[float, Callable[[], None]], Any],
        publish_will: Callable[[Session, Will], None],
        persistence: SessionPersistence | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.hub = hub
        self._wall = wall  # when a client went away, on the clock that survives a restart
        self.persistence = persistence  # the disk copy of persistent sessions (node.data_dir)
        self.max_sessions = hub.config.max_sessions
        self.persistent_expiration = hub.config.persistent_client_expiration
        self.sessions: dict[str, Session] = {}
        self.offline: dict[str, Session] = {}  # persistent sessions without a client, longest away first
        self.expired_total = 0
        self.evicted_total = 0
        self.closed = False
        self._call_later = call_later
        self._publish_will = publish_will

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, client_id: str) -> Session | None:
        return self.sessions.get(client_id)

    def open(self, client_id: str, clean_start: bool) -> tuple[Session, bool]:
        """The session for a client that connects (any previous connection already taken
        over); True when an existing session is resumed (CONNACK session present)."""
        session = self.sessions.get(client_id)
        if session is not None and clean_start:
            self.end(session, "clean start")
            session = None
        if session is None:
            session = Session(self.hub, client_id)
            self.sessions[client_id] = session
            return session, False
        self.offline.pop(client_id, None)
        _cancel(session.expiry_timer)
        session.expiry_timer = None
        session.offline_since = None
        if session.persist is not None:
            session.persist.session(session)
        if session.pending_will is not None:
            # Section 3.1.3.2.2: a new connection to the session before the will delay
            # interval has passed means the will is not sent.
            _cancel(session.will_timer)
            session.will_timer = None
            session.pending_will = None
        return session, True

    def set_expiry(self, session: Session, expiry: int) -> None:
        """The session expiry interval a CONNECT (or an MQTT 5 DISCONNECT) gave the session:
        with a data_dir a session is on disk exactly while its expiry is not 0."""
        session.expiry = expiry
        persistence = self.persistence
        if persistence is None or session.ended:
            return
        if expiry and session.persist is None:
            persistence.attach(session)
        elif not expiry and session.persist is not None:
            persistence.detach(session)
        elif session.persist is not None:
            session.persist.session(session)

    def disconnected(self, session: Session, will: Will | None) -> None:
        """The session's connection went; ``will`` is its will unless a DISCONNECT (without
        reason 0x04) discarded it."""
        session.conn = None
        if session.ended:
            return
        session.offline_since = self._wall()
        if session.persist is not None:
            session.persist.session(session)
        if will is not None:
            delay = will.properties.get("will_delay_interval", 0) if will.properties else 0
            if delay and session.expiry:
                session.pending_will = will
                # The will goes at the end of its delay or of the session, whichever is first.
                wait = min(delay, session.expiry) if session.expiry != NEVER else delay
                session.will_timer = self._call_later(wait, lambda: self._will_due(session))
            else:
                self._publish_will(session, will)
        if not session.expiry:
            self.end(session, "session expiry interval 0")
            return
        self.offline[session.client_id] = session
        limit = session.expiry if session.expiry != NEVER else self.persistent_expiration
        if limit:
            session.expiry_timer = self._call_later(limit, lambda: self._expired(session))
        while len(self.offline) > self.max_sessions:
            oldest = next(iter(self.offline.values()))
            self.evicted_total += 1
            log.warning(
                "client %s: persistent session dropped: more than mqtt.max_sessions (%d) sessions "
                "wait for their clients", oldest.client_id, self.max_sessions,
            )
            self.end(oldest, "evicted")

    def _will_due(self, session: Session) -> None:
        session.will_timer = None
        will, session.pending_will = session.pending_will, None
        if will is not None and not self.closed:
            self._publish_will(session, will)

    def _expired(self, session: Session) -> None:
        session.expiry_timer = None
        if self.closed or session.conn is not None or session.ended:
            return
        self.expired_total += 1
        log.info("client %s: session expired", session.client_id)
        self.end(session, "expired")

    def end(self, session: Session, why: str) -> None:
        """The session is over: its pending will goes out, its subscriptions are removed."""
        if session.ended:
            return
        session.ended = True
        _cancel(session.expiry_timer)
        _cancel(session.will_timer)
        session.expiry_timer = session.will_timer = None
        will, session.pending_will = session.pending_will, None
        if will is not None and not self.closed:
            self._publish_will(session, will)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if self.offline.get(session.client_id) is session:
            del self.offline[session.client_id]
        if session.persist is not None:
            session.persist.detach(session)  # before the window lets go: its rows go whole
        session.subscriptions.clear()
        session._options, session._special_count, session.special = None, 0, False
        session.count_drops()
        session.window.close()
        self.hub.broker.remove_subscriber(session)
        log.debug("client %s: session ended (%s)", session.client_id, why)

    def restore(self, stored: list[StoredSession], wall: float, mono: float) -> int:
        """Sessions read from disk at start (longest away first): each is registered with
        the router for its subscriptions and waits offline for its client; one whose expiry
        passed while the node was down is ended (and removed from disk). Returns how many
        were restored."""
        from zmesh.mqtt.sessionstore import restore_messages

        persistence = self.persistence
        assert persistence is not None, "restore needs the disk copy"
        restored = 0
        for st in stored:
            # One pass over what the disk held, once at start.
            if st.client_id in self.sessions:
                continue
            away = st.offline_since if st.offline_since is not None else wall
            limit = st.expiry if st.expiry != NEVER else self.persistent_expiration
            left = away + limit - wall if limit else None
            session = Session(self.hub, st.client_id)
            session.level, session.expiry, session.username = st.level, st.expiry, st.username
            session.offline_since = away
            if left is not None and left <= 0:
                self.expired_total += 1
                log.info("client %s: session expired while the node was down", st.client_id)
                persistence.detach(session)
                continue
            for filt, options in st.subscriptions:
                session.subscribe(filt, options, replay=False)
            session.window.restore(restore_messages(st, wall, mono), st.last_seq, mono)
            session.inbound_qos2.pending = set(st.inbound)
            self.sessions[st.client_id] = session
            self.offline[st.client_id] = session
            # Followed from here on; the meta row is written again (offline_since was
            # unknown for a client connected when the node died).
            persistence.attach(session)
            held = {m.seq for m in (*session.window.inflight.values(), *session.window.queue)}
            for message in st.messages:
                if message.seq not in held:  # expired while down, or past max_queued now
                    persistence.message(st.client_id, message, False)
            if left is not None:
                session.expiry_timer = self._call_later(left, lambda s=session: self._expired(s))
            restored += 1
        while len(self.offline) > self.max_sessions:
            self.evicted_total += 1
            self.end(next(iter(self.offline.values())), "evicted")
        return restored

    def close(self) -> None:
        """The server stops: no timer fires any more (in-memory sessions end with the node)."""
        self.closed = True
        for session in self.sessions.values():
            _cancel(session.expiry_timer)
            _cancel(session.will_timer)

    def stats(self) -> dict[str, int]:
        queued = sum(len(s.window.queue) for s in self.offline.values())
        return {
            "sessions": len(self.sessions),
            "sessions_offline": len(self.offline),
            "queued_offline": queued,
            "queued_bytes": self.hub.queue_budget.used,  # held for clients, in flight and queued
            "sessions_expired_total": self.expired_total,
            "sessions_evicted_total": self.evicted_total,
        }


def _cancel(handle: Any) -> None:
    if handle is not None:
        handle.cancel()
