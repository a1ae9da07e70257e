"""Sans-I/O MQTT 3.1.1 and 5.0 codec: bytes in, packet dataclasses out, and back.

The codec is four modules, re-exported here: ``packets`` (the packet model, reason codes,
``MQTTError``), ``properties`` (field types and MQTT 5 properties), ``decoder`` (the stream
decoder) and ``encoder``. Pure: no sockets, no asyncio.

Design
------
* Pure: no sockets, no asyncio. ``Decoder.feed(bytes) -> list[Packet]`` buffers partial
  packets per connection; ``encode(packet, level) -> bytes`` is stateless.
* One error type. Every violation of the spec raises :class:`MQTTError` carrying the MQTT 5
  reason code the server should answer with (0x81 malformed, 0x82 protocol error, 0x95
  packet too large, ...), so the server never has to interpret codec internals. The decoder
  is poisoned after an error: the connection must be closed, so further feeds re-raise.
* Fail early. The fixed header is validated from its first byte (type, reserved flags,
  CONNECT-first) and the declared size is checked against ``max_packet_size`` as soon as the
  remaining-length varint is complete, before any of the body is buffered. A peer cannot
  make us hold 256 MB by announcing it.
* The hot path is PUBLISH. Decoding works on one ``bytes`` object with integer offsets (no
  memoryview/BytesIO objects, no intermediate tuples for the fixed header), packets are
  ``__slots__`` dataclasses built positionally, and a v5 PUBLISH without properties costs
  one byte test. Partial packets are kept as a list of chunks and joined once the announced
  size has arrived, so a large packet trickling in is copied once, not once per chunk.
  ``encode_publish`` takes the topic already UTF-8 encoded and the properties already
  encoded so the server can fan one message out to many clients cheaply.
* Validation belongs here only where it is about the wire format (UTF-8, reserved bits,
  lengths, property placement and duplicates, packet identifiers, reason-code sets). Topic
  filter syntax, topic aliases, authentication flows and client-id policy need state or
  configuration and are the server's job.
* Properties are plain ``dict[str, Any]`` with the spec's names in snake_case. Repeatable
  properties are lists: ``user_property`` (list of (name, value) tuples) always, and
  ``subscription_identifier`` on PUBLISH (it is a single int on SUBSCRIBE).
"""

from __future__ import annotations

from zmesh.mqtt.decoder import (  # noqa: F401
    Decoder,
)
from zmesh.mqtt.encoder import (  # noqa: F401
    encode,
    encode_publish,
)
from zmesh.mqtt.packets import (  # noqa: F401
    ADMINISTRATIVE_ACTION,
    AUTH,
    BAD_AUTHENTICATION_METHOD,
    BAD_USERNAME_OR_PASSWORD,
    BANNED,
    CLIENT_ID_NOT_VALID,
    CONNACK,
    CONNACK_ACCEPTED,
    CONNACK_BAD_USERNAME_OR_PASSWORD,
    CONNACK_IDENTIFIER_REJECTED,
    CONNACK_NOT_AUTHORIZED,
    CONNACK_SERVER_UNAVAILABLE,
    CONNACK_UNACCEPTABLE_PROTOCOL_VERSION,
    CONNECT,
    CONNECTION_RATE_EXCEEDED,
    CONTINUE_AUTHENTICATION,
    DISCONNECT,
    DISCONNECT_WITH_WILL,
    GRANTED_QOS_0,
    GRANTED_QOS_1,
    GRANTED_QOS_2,
    IMPLEMENTATION_SPECIFIC_ERROR,
    KEEP_ALIVE_TIMEOUT,
    MALFORMED,
    MAX_REMAINING_LENGTH,
    MAXIMUM_CONNECT_TIME,
    MESSAGE_RATE_TOO_HIGH,
    MQTT_5,
    MQTT_31,
    MQTT_311,
    NO_MATCHING_SUBSCRIBERS,
    NO_SUBSCRIPTION_EXISTED,
    NORMAL_DISCONNECTION,
    NOT_AUTHORIZED,
    PACKET_ID_IN_USE,
    PACKET_ID_NOT_FOUND,
    PACKET_TOO_LARGE,
    PAYLOAD_FORMAT_INVALID,
    PINGREQ,
    PINGRESP,
    PROTOCOL_ERROR,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    QOS_NOT_SUPPORTED,
    QUOTA_EXCEEDED,
    RE_AUTHENTICATE,
    RECEIVE_MAXIMUM_EXCEEDED,
    RETAIN_NOT_SUPPORTED,
    SERVER_BUSY,
    SERVER_MOVED,
    SERVER_SHUTTING_DOWN,
    SERVER_UNAVAILABLE,
    SESSION_TAKEN_OVER,
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
    SUBACK,
    SUBSCRIBE,
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
    SUCCESS,
    TOPIC_ALIAS_INVALID,
    TOPIC_FILTER_INVALID,
    TOPIC_NAME_INVALID,
    UNSPECIFIED_ERROR,
    UNSUBACK,
    UNSUBSCRIBE,
    UNSUPPORTED_PROTOCOL_VERSION,
    USE_ANOTHER_SERVER,
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    MQTTError,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    SubscriptionRequest,
    UnsubAck,
    Unsubscribe,
    Will,
)
from zmesh.mqtt.properties import (  # noqa: F401
    encode_properties,
    remaining_length_bytes,
)

__all__ = [
    "MQTTError",
    "Will",
    "Connect",
    "ConnAck",
    "Publish",
    "PubAck",
    "PubRec",
    "PubRel",
    "PubComp",
    "SubscriptionRequest",
    "Subscribe",
    "SubAck",
    "Unsubscribe",
    "UnsubAck",
    "PingReq",
    "PingResp",
    "Disconnect",
    "Auth",
    "Packet",
    "Decoder",
    "encode",
    "encode_publish",
    "encode_properties",
    "remaining_length_bytes",
]
