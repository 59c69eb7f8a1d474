"""The events of ``ws://host:port/v1/realtime``: client events parsed and checked, server events built.

Every text message is a JSON object ``{"type": ..., "event_id": ...}`` in the style of the OpenAI
Realtime API, with Gemini Live's session resumption and ``go_away`` notice, plus video frames and
watches. Client side: :func:`parse_client_message` turns one text message into one typed event
(:data:`ClientEvent`) or raises :class:`ProtocolError` naming the code, the offending field and the
client's ``event_id``; each event's ``to_dict()`` builds the JSON a client sends. Server side: one
builder per server event returns the JSON-ready dict, stamped with a fresh ``event_id``.

Pure data: no clock, no event loop, no network. docs/protocol.md is the reference for clients.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Literal, Union

import cv2
import numpy as np

from ..dialogue.triggers import TriggerSpec
from ..errors import ConfigError, InputError
from .frames import Limits, ProtocolError, _utf8_ok, check_source_id, decode_image

__all__ = [
    "PROTOCOL_VERSION",
    "ERROR_CODES",
    "APPLICATION_ERROR_CODES",
    "CLIENT_EVENT_TYPES",
    "SERVER_EVENT_TYPES",
    "MEMORY_POLICIES",
    "RESPONSE_STATUSES",
    "RESPONSE_TRIGGERS",
    "MAX_OUTPUT_TOKENS",
    "Limits",
    "ProtocolError",
    "SessionUpdate",
    "ItemCreate",
    "ResponseCreate",
    "ResponseCancel",
    "FrameAppend",
    "WatchCreate",
    "WatchDelete",
    "WebRTCOffer",
    "webrtc_answer",
    "ClientEvent",
    "parse_client_message",
    "parse_client_object",
    "next_event_id",
    "session_created",
    "session_updated",
    "conversation_item_created",
    "response_created",
    "response_output_text_delta",
    "response_done",
    "response_acknowledged",
    "watch_created",
    "watch_deleted",
    "memory_update",
    "input_frame.stats",
    "input_frame.rate",
    "session_resumption_update",
    "session_go_away",
    "error_event",
]

#: Announced in ``session.created``; a breaking change to any event gets a new version string.
PROTOCOL_VERSION = "streamvlm.realtime.v1"

#: Error codes the protocol layer itself produces, with when.
ERROR_CODES: Mapping[str, str] = {
    "invalid_json": "a text message is not valid JSON",
    "invalid_event": "the JSON is not an object, or has no string 'type'",
    "unknown_event": "'type' names no client event",
    "invalid_value": "a field is missing, of the wrong type or out of range ('param' names it)",
    "message_too_large": "a message is larger than limits.max_message_bytes",
    "frame_too_large": "an image is larger than limits.max_frame_bytes or a side exceeds limits.max_frame_side",
    "invalid_frame": "a frame is not a readable JPEG/PNG, has a side below limits.min_frame_side, "
                     "or a binary frame header is malformed",
    "rate_limited": "more frames than limits.max_frames_per_s; the frame was dropped",
}

#: Error codes a server answers with when a well-formed event cannot be carried out.
APPLICATION_ERROR_CODES: Mapping[str, str] = {
    "no_user_message": "response.create before any conversation.item.create",
    "response_not_found": "response.cancel names a response that is not running or queued",
    "watch_exists": "watch.create with an id already watched",
    "watch_not_found": "watch.delete of an id not watched",
    "invalid_resume_handle": "?resume= names no session that can still be resumed",
    "server_error": "the server failed; the session goes on unless a go_away follows",
    "session_limit": "the server is full (sessions or memory); the connection is closed after this error",
    "setting_locked": "session.update of a setting that cannot change once the stream has started",
    "budget_too_large": "session.update asks for more working memory than this server gives one session (or none: null)",
    "watch_limit": "watch.create beyond the watches one session may hold",
    "response_limit": "response.create beyond the responses one session may have open at once",
    "engine_fault": "the engine failed on this request or step; the request ends 'failed', the session goes on",
    "session_closed": "the session ended (an unusable engine state, the server stopping, a slow consumer); "
                      "the connection is closed after this error",
    "slow_consumer": "the client read server events too slowly; the connection is closed after this error",
    "too_many_errors": "the client sent more refused messages than limits.max_error_burst (then max_errors_per_s); "
                       "the connection is closed after this error (the session stays resumable)",
}

CLIENT_EVENT_TYPES = (
    "session.update",
    "conversation.item.create",
    "response.create",
    "response.cancel",
    "input_frame.append",
    "watch.create",
    "watch.delete",
    "webrtc.offer",
)

SERVER_EVENT_TYPES = (
    "session.created",
    "session.updated",
    "conversation.item.created",
    "response.created",
    "response.output_text.delta",
    "response.done",
    "response.acknowledged",
    "watch.created",
    "watch.deleted",
    "memory.update",
    "input_frame.stats",
    "input_frame.rate",
    "session.resumption_update",
    "session.go_away",
    "webrtc.answer",
    "error",
)

MEMORY_POLICIES = ("window", "infinipot", "proxy-attention", "merge")
RESPONSE_STATUSES = ("completed", "cancelled", "incomplete", "failed")
RESPONSE_TRIGGERS = ("user", "deferred", "watch", "commentary")
#: Upper bound of ``max_new_tokens`` and ``max_output_tokens``.
MAX_OUTPUT_TOKENS = 4096

_MAX_ID_CHARS = 128
_WATCH_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}", re.ASCII)
_DATA_URL = re.compile(r"data:image/(?:jpeg|jpg|png);base64,", re.IGNORECASE)
_MISSING: Any = object()
# Trigger parameters a watch.create may set, and whether each is an integer.
# session.update fields: dotted path under "session" -> SessionUpdate attribute.
_SESSION_FIELDS = {"instructions": "instructions", "sampling.max_new_tokens": "max_new_tokens",
                   "sampling.temperature": "temperature", "memory.budget_tokens": "budget_tokens",
                   "memory.policy": "policy", "memory.positions": "positions", "interrupt": "interrupt",
                   "probe_every_frames": "probe_every_frames", "probe_every_s": "probe_every_s"}
# Seconds fields are stream seconds; m, n, window and min_history are the deprecated counts (probes at 1/s),
# still accepted and converted by TriggerSpec.
_TRIGGER_PARAMS = {"on": False, "off": False, "hold_s": False, "window_s": False, "rearm_s": False,
                   "threshold": False, "baseline": False, "z": False, "history_s": False, "min_history_s": False,
                   "m": True, "n": True, "window": True, "min_history": True}


# --------------------------------------------------------------------------- field checks


def _path(base: str, name: str) -> str:
    return f"{base}.{name}" if base else name


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(param: str, message: str) -> ProtocolError:
    return ProtocolError("invalid_value", message, param)


def _object(value: object, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(param, f"must be an object, got {_json_type(value)}")
    return value


def _required(obj: Mapping[str, Any], name: str, base: str) -> Any:
    value = obj.get(name, _MISSING)
    if value is _MISSING:
        raise _bad(_path(base, name), "is required")
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _text(value: object, param: str, max_chars: int, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise _bad(param, f"must be a string, got {_json_type(value)}")
    if not empty_ok and not value.strip():
        raise _bad(param, "must be a non-empty string")
    if len(value) > max_chars:
        raise _bad(param, f"is {len(value)} characters, the limit is {max_chars}")
    if not _utf8_ok(value):
        raise _bad(param, "must be valid Unicode (no lone surrogates)")
    return value


def _ident(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise _bad(param, f"must be a string, got {_json_type(value)}")
    if not 1 <= len(value) <= _MAX_ID_CHARS or not value.isprintable() or not _utf8_ok(value):
        raise _bad(param, f"must be 1..{_MAX_ID_CHARS} printable characters")
    return value


def _watch_id(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise _bad(param, f"must be a string, got {_json_type(value)}")
    if not _WATCH_ID.fullmatch(value):
        raise _bad(param, f"must be 1..64 characters from A-Z a-z 0-9 _ . -, got {_short(value)}")
    return value


def _int(value: object, param: str, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(param, f"must be an integer, got {_json_type(value)}")
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise _bad(param, f"must be an integer {allowed}, got {_short(value)}")
    return value


def _number(value: object, param: str, lo: float, hi: float | None = None) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad(param, f"must be a number, got {_json_type(value)}")
    if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _bad(param, f"must be a finite number {allowed}, got {_short(value)}")
    return float(value)


def _bool(value: object, param: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(param, f"must be true or false, got {_json_type(value)}")
    return value


# --------------------------------------------------------------------------- client events


@dataclass(frozen=True)
class SessionUpdate:
    """``session.update``: change the session's settings; only the fields sent change.

    Apply each field that is not None, and ``memory.budget_tokens`` whenever
    ``"memory.budget_tokens" in fields_set`` (None there means unbounded); then answer with
    :func:`session_updated`.
    """

    # New system instructions (the system prompt).
    instructions: str | None = None
    # sampling.max_new_tokens: longest answer, 1..4096 tokens.
    max_new_tokens: int | None = None
    # sampling.temperature: 0 (greedy) .. 2.
    temperature: float | None = None
    # memory.budget_tokens: working-memory cap (>= 16), or None for unbounded; see fields_set.
    budget_tokens: int | None = None
    # memory.policy: one of MEMORY_POLICIES.
    policy: str | None = None
    # memory.positions: "keep" (original positions, gaps allowed) or "reindex" (kept chunks made contiguous).
    positions: str | None = None
    # interrupt: a new user message cancels the running answer (True) or waits for it (False).
    interrupt: bool | None = None
    # probe_every_frames: score watches and deferred questions on every k-th frame (deprecated: use probe_every_s).
    probe_every_frames: int | None = None
    # probe_every_s: score watches and deferred questions at most every this many stream seconds (0: every frame).
    probe_every_s: float | None = None
    # Dotted paths of the fields the client sent, e.g. {"instructions", "memory.budget_tokens"}.
    fields_set: frozenset[str] = frozenset()
    # The client's event_id, or None.
    event_id: str | None = None

    type: ClassVar[str] = "session.update"

    def __post_init__(self) -> None:
        given = {path for path, name in _SESSION_FIELDS.items() if getattr(self, name) is not None}
        object.__setattr__(self, "fields_set", frozenset(self.fields_set) | given)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object a client sends for this event."""
        session: dict[str, Any] = {}
        for path in sorted(self.fields_set):
            value = getattr(self, _SESSION_FIELDS[path])
            node = session
            *parents, leaf = path.split(".")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
        return _client_dict(self, session=session)


@dataclass(frozen=True)
class ItemCreate:
    """``conversation.item.create``: a user message; answer it on ``response.create``.

    Echo it with :func:`conversation_item_created`. A message that opens with "tell me when" (or
    similar) is a deferred question: answer ``response.create`` for it with
    :func:`response_acknowledged`, then a response with trigger ``deferred`` when it holds.
    """

    # The text of each input_text part, in order.
    content: tuple[str, ...]
    # The client's id for the item, or None: the server assigns one.
    item_id: str | None = None
    # The client's event_id, or None.
    event_id: str | None = None

    type: ClassVar[str] = "conversation.item.create"

    @property
    def text(self) -> str:
        """The parts joined by newlines: the question to ask."""
        return "\n".join(self.content)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object a client sends for this event."""
        item: dict[str, Any] = {"type": "message", "role": "user",
                                "content": [{"type": "input_text", "text": part} for part in self.content]}
        if self.item_id is not None:
            item["id"] = self.item_id
        return _client_dict(self, item=item)


@dataclass(frozen=True)
class ResponseCreate:
    """``response.create``: answer the latest user item now; reply with :func:`response_created`."""

    # Longest answer for this response only (1..4096), or None for the session's max_new_tokens.
    max_output_tokens: int | None = None
    # The client's event_id, or None.
    event_id: str | None = None

    type: ClassVar[str] = "response.create"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object a client sends for this event."""
        response = {} if self.max_output_tokens is None else {"max_output_tokens": self.max_output_tokens}
        return _client_dict(self, response=response)


@dataclass(frozen=True)
class ResponseCancel:
    """``response.cancel``: stop a response; finish it with :func:`response_done` status ``cancelled``."""

    # The response to cancel, or None for the one being generated (queued ones are dropped too).
    response_id: str | None = None
    # The client's event_id, or None.
    event_id: str | None = None

    type: ClassVar[str] = "response.cancel"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object a client sends for this event."""
        return _client_dict(self) if self.response_id is None else _client_dict(self, response_id=self.response_id)


@dataclass(frozen=True, eq=False)
class FrameAppend:
    """``input_frame.append`` (JSON) or a binary frame message: a decoded video frame.

    Hand it to the engine with ``pts_s`` as its time, or the server's clock when ``pts_s`` is None.
    """

    # HxWx3 uint8 RGB image.
    image: np.ndarray
    # Presentation time in seconds on the client's clock, or None: use the server's clock.
    pts_s: float | None = None
    # The camera or stream it came from.
    source_id: str = "default"
    # The client's event_id, or None (always None for a binary frame).
    event_id: str | None = None
    # True when it arrived as a binary frame message, False for JSON input_frame.append.
    binary: bool = False

    type: ClassVar[str] = "input_frame.append"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object a client sends for this event; the image travels losslessly as base64 PNG."""
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(self.image[:, :, ::-1]))
        if not ok:  # pragma: no cover - cv2 encodes any valid uint8 image
            raise InputError("image: could not be encoded as PNG")
        extra: dict[str, Any] = {"frame": base64.b64encode(buf.tobytes()).decode("ascii"), "source_id": self.source_id}
        if self.pts_s is not None:
            extra["pts_s"] = self.pts_s
        return _client_dict(self, **extra)


@dataclass(frozen=True)
class WatchCreate:
    """``watch.create``: raise an alert each time ``condition`` starts to hold.

    Register it with ``spec(default)`` as the trigger rule and reply :func:`watch_created`; when it
    fires, send a proactive response (trigger ``watch``) carrying the alert.
    """

    # The watch's id: 1..64 characters from A-Z a-z 0-9 _ . -
    watch_id: str
    # What to watch for, in plain words.
    condition: str
    # Minimum seconds between two alerts, or None for the server's default.
    cooldown_s: float | None = None
    # The trigger rule with its cooldown, or None for the server's default rule.
    trigger: TriggerSpec | None = None
    # The client's event_id, or None.
    event_id: str | None = None

    type: ClassVar[str] = "watch.create"

    def spec(self, default: TriggerSpec | None = None) -> TriggerSpec | None:
        """The rule to use: ``trigger`` if sent, else ``default`` (or TriggerSpec()) with ``cooldown_s`` if sent."""
        if self.trigger is not None:
            return self.trigger
        if self.cooldown_s is not None:
            return replace(default or TriggerSpec(), cooldown_s=self.cooldown_s)
        return default

    def to_dict(self) -> dict[str, Any]:
        """The JSON object a client sends for this event."""
        watch: dict[str, Any] = {"id": self.watch_id, "condition": self.condition}
        cooldown = self.cooldown_s
        if cooldown is None and self.trigger is not None and self.trigger.cooldown_s:
            cooldown = self.trigger.cooldown_s
        if cooldown is not None:
            watch["cooldown_s"] = cooldown
        if self.trigger is not None:
            watch["trigger"] = _trigger_dict(self.trigger)
        return _client_dict(self, watch=watch)


@dataclass(frozen=True)
class WatchDelete:
    """``watch.delete``: stop a watch; reply :func:`watch_deleted`."""

    # The watch to stop.
    watch_id: str
    # The client's event_id, or None.
    event_id: str | None = None

    type: ClassVar[str] = "watch.delete"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object a client sends for this event."""
        return _client_dict(self, watch_id=self.watch_id)


@dataclass(frozen=True)
class WebRTCOffer:
    """``webrtc.offer``: start sending video over WebRTC; reply :func:`webrtc_answer`.

    The video track's frames enter the same ingest path as frames sent over the socket.
    """

    # The SDP offer text (at most 64 KiB).
    sdp: str
    # The client's event_id, or None.
    event_id: str | None = None

    type: ClassVar[str] = "webrtc.offer"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object a client sends for this event."""
        return _client_dict(self, sdp=self.sdp)


#: Any client event :func:`parse_client_message` can return.
ClientEvent = Union[SessionUpdate, ItemCreate, ResponseCreate, ResponseCancel, FrameAppend, WatchCreate, WatchDelete, WebRTCOffer]


def _client_dict(event: Any, **body: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": event.type}
    if event.event_id is not None:
        out["event_id"] = event.event_id
    out.update(body)
    return out


def _trigger_dict(spec: TriggerSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in fields(spec) if f.name != "cooldown_s" and getattr(spec, f.name) is not None}


# --------------------------------------------------------------------------- parsing


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_client_message(text: str, limits: Limits | None = None, *,
                         frame_gate: Callable[[], None] | None = None) -> ClientEvent:
    """Parse one text WebSocket message into a client event.

    Returns the typed event for the application to act on. Raises :class:`ProtocolError` with the
    code (``message_too_large``, ``invalid_json``, ``invalid_event``, ``unknown_event``,
    ``invalid_value``, ``frame_too_large``, ``invalid_frame``), the offending ``param`` and the
    client's ``event_id`` when it could be read: send :func:`error_event` built from it and go on.
    Unknown fields are ignored. ``frame_gate``, if given, is called for an ``input_frame.append``
    before its image is decoded; it may raise ProtocolError (``rate_limited``) to refuse the frame.
    """
    limits = limits or Limits()
    if not isinstance(text, str):
        raise ProtocolError("invalid_json", f"a text message must be a string, got {type(text).__name__}")
    if len(text) > limits.max_message_bytes or (
            4 * len(text) > limits.max_message_bytes and len(text.encode("utf-8", "surrogatepass")) > limits.max_message_bytes):
        raise ProtocolError("message_too_large", f"message is over the limit of {limits.max_message_bytes} bytes")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("invalid_json", f"not valid JSON: {str(exc)[:100]}") from None
    return parse_client_object(obj, limits, frame_gate=frame_gate)


def parse_client_object(obj: object, limits: Limits | None = None, *,
                        frame_gate: Callable[[], None] | None = None) -> ClientEvent:
    """Like :func:`parse_client_message`, for a message already decoded from JSON."""
    limits = limits or Limits()
    if not isinstance(obj, dict):
        raise ProtocolError("invalid_event", f"a message must be a JSON object, got {_json_type(obj)}")
    raw_id = obj.get("event_id")
    event_id = None if raw_id is None else _ident(raw_id, "event_id")
    kind = obj.get("type", _MISSING)
    if kind is _MISSING:
        raise ProtocolError("invalid_event", "a message needs a 'type'", "type", event_id)
    if not isinstance(kind, str):
        raise ProtocolError("invalid_event", f"'type' must be a string, got {_json_type(kind)}", "type", event_id)
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError("unknown_event", f"unknown event type {_short(kind)}; expected one of "
                            f"{', '.join(CLIENT_EVENT_TYPES)}", "type", event_id)
    try:
        if kind == "input_frame.append" and frame_gate is not None:
            frame_gate()
        return parser(obj, event_id, limits)
    except ProtocolError as exc:
        raise exc.with_event_id(event_id) from None


def _parse_session_update(obj: dict[str, Any], event_id: str | None, limits: Limits) -> SessionUpdate:
    session = _object(_required(obj, "session", ""), "session")
    values: dict[str, Any] = {}
    present: set[str] = set()

    def take(node: Mapping[str, Any], base: str, name: str, check: Any) -> None:
        if name in node:
            values[name] = check(node[name], f"{base}.{name}")
            present.add(f"{base}.{name}"[len("session."):])

    take(session, "session", "instructions", lambda v, p: _text(v, p, limits.max_text_chars, empty_ok=True))
    if "sampling" in session:
        sampling = _object(session["sampling"], "session.sampling")
        take(sampling, "session.sampling", "max_new_tokens", lambda v, p: _int(v, p, 1, MAX_OUTPUT_TOKENS))
        take(sampling, "session.sampling", "temperature", lambda v, p: _number(v, p, 0.0, 2.0))
    if "memory" in session:
        memory = _object(session["memory"], "session.memory")
        take(memory, "session.memory", "budget_tokens", lambda v, p: None if v is None else _int(v, p, 16))
        take(memory, "session.memory", "policy", _policy)
        take(memory, "session.memory", "positions", _positions)
    take(session, "session", "interrupt", _bool)
    take(session, "session", "probe_every_frames", lambda v, p: _int(v, p, 1))
    take(session, "session", "probe_every_s", lambda v, p: _number(v, p, 0.0, 3600.0))
    return SessionUpdate(event_id=event_id, fields_set=frozenset(present), **values)


def _positions(value: object, param: str) -> str:
    if value not in ("keep", "reindex"):
        raise _bad(param, f"must be 'keep' or 'reindex', got {_short(value)}")
    return value  # type: ignore[return-value]


def _policy(value: object, param: str) -> str:
    if value not in MEMORY_POLICIES or not isinstance(value, str):
        raise _bad(param, f"must be one of {', '.join(MEMORY_POLICIES)}, got {_short(value)}")
    return value


def _parse_item_create(obj: dict[str, Any], event_id: str | None, limits: Limits) -> ItemCreate:
    item = _object(_required(obj, "item", ""), "item")
    item_id = None if item.get("id") is None else _ident(item["id"], "item.id")
    if item.get("type", "message") != "message":
        raise _bad("item.type", f"must be 'message', got {_short(item.get('type'))}")
    if item.get("role", "user") != "user":
        raise _bad("item.role", f"must be 'user', got {_short(item.get('role'))}")
    content = _required(item, "content", "item")
    if not isinstance(content, list) or not content:
        raise _bad("item.content", "must be a non-empty array of input_text parts")
    parts: list[str] = []
    total = 0
    for i, part in enumerate(content):
        base = f"item.content[{i}]"
        part = _object(part, base)
        if part.get("type") != "input_text":
            raise _bad(f"{base}.type", f"must be 'input_text', got {_short(part.get('type'))}")
        text = _text(_required(part, "text", base), f"{base}.text", limits.max_text_chars)
        total += len(text) + (1 if parts else 0)
        if total > limits.max_text_chars:
            raise _bad(f"{base}.text", f"the message is over the limit of {limits.max_text_chars} characters")
        parts.append(text)
    return ItemCreate(event_id=event_id, content=tuple(parts), item_id=item_id)


def _parse_response_create(obj: dict[str, Any], event_id: str | None, limits: Limits) -> ResponseCreate:
    response = obj.get("response")
    if response is None:
        return ResponseCreate(event_id=event_id)
    response = _object(response, "response")
    max_tokens = response.get("max_output_tokens")
    if max_tokens is not None:
        max_tokens = _int(max_tokens, "response.max_output_tokens", 1, MAX_OUTPUT_TOKENS)
    return ResponseCreate(event_id=event_id, max_output_tokens=max_tokens)


def _parse_response_cancel(obj: dict[str, Any], event_id: str | None, limits: Limits) -> ResponseCancel:
    response_id = obj.get("response_id")
    return ResponseCancel(event_id=event_id, response_id=None if response_id is None else _ident(response_id, "response_id"))


def _parse_frame_append(obj: dict[str, Any], event_id: str | None, limits: Limits) -> FrameAppend:
    frame = _required(obj, "frame", "")
    if not isinstance(frame, str):
        raise _bad("frame", f"must be a base64 string, got {_json_type(frame)}")
    pts = obj.get("pts_s")
    pts_s = None if pts is None else _number(pts, "pts_s", 0.0)
    source_id = check_source_id(obj.get("source_id", "default"))
    match = _DATA_URL.match(frame)
    payload = frame[match.end():] if match else frame
    if (len(payload) * 3) // 4 - payload[-2:].count("=") > limits.max_frame_bytes:
        raise ProtocolError("frame_too_large", f"image is over the limit of {limits.max_frame_bytes} bytes", "frame")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_frame", "must be a JPEG or PNG file in base64", "frame") from None
    image = decode_image(data, limits, "frame")
    return FrameAppend(event_id=event_id, image=image, pts_s=pts_s, source_id=source_id)


def _parse_watch_create(obj: dict[str, Any], event_id: str | None, limits: Limits) -> WatchCreate:
    watch = _object(_required(obj, "watch", ""), "watch")
    watch_id = _watch_id(_required(watch, "id", "watch"), "watch.id")
    condition = _text(_required(watch, "condition", "watch"), "watch.condition", limits.max_text_chars)
    cooldown = watch.get("cooldown_s")
    cooldown_s = None if cooldown is None else _number(cooldown, "watch.cooldown_s", 0.0)
    trigger = watch.get("trigger")
    spec = None if trigger is None else _trigger(trigger, cooldown_s or 0.0)
    return WatchCreate(event_id=event_id, watch_id=watch_id, condition=condition, cooldown_s=cooldown_s, trigger=spec)


def _trigger(value: object, cooldown_s: float) -> TriggerSpec:
    trigger = _object(value, "watch.trigger")
    kind = _required(trigger, "kind", "watch.trigger")
    if kind not in ("threshold", "sum", "zscore") or not isinstance(kind, str):
        raise _bad("watch.trigger.kind", f"must be 'threshold', 'sum' or 'zscore', got {_short(kind)}")
    params: dict[str, Any] = {}
    for name, integer in _TRIGGER_PARAMS.items():
        if trigger.get(name) is None:
            continue
        param = f"watch.trigger.{name}"
        params[name] = _int(trigger[name], param, 0) if integer else _number(trigger[name], param, -math.inf)
    try:
        return TriggerSpec(kind=kind, cooldown_s=cooldown_s, **params)
    except ConfigError as exc:
        name = str(exc).split(":", 1)[0]
        param = "watch.cooldown_s" if name == "cooldown_s" else f"watch.trigger.{name}"
        raise _bad(param, str(exc).split(":", 1)[-1].strip()) from None


def _parse_watch_delete(obj: dict[str, Any], event_id: str | None, limits: Limits) -> WatchDelete:
    return WatchDelete(event_id=event_id, watch_id=_watch_id(_required(obj, "watch_id", ""), "watch_id"))


def _parse_webrtc_offer(obj: dict[str, Any], event_id: str | None, limits: Limits) -> WebRTCOffer:
    sdp = _required(obj, "sdp", "")
    if not isinstance(sdp, str) or not sdp.startswith("v=0") or len(sdp) > 65536:
        raise ProtocolError("invalid_value", "sdp must be an SDP offer (text starting with 'v=0', at most 64 KiB)", "sdp", event_id)
    return WebRTCOffer(event_id=event_id, sdp=sdp)


_PARSERS = {
    "session.update": _parse_session_update,
    "conversation.item.create": _parse_item_create,
    "response.create": _parse_response_create,
    "response.cancel": _parse_response_cancel,
    "input_frame.append": _parse_frame_append,
    "watch.create": _parse_watch_create,
    "watch.delete": _parse_watch_delete,
    "webrtc.offer": _parse_webrtc_offer,
}


# --------------------------------------------------------------------------- server events

_event_counter = itertools.count(1)
_event_lock = threading.Lock()


def next_event_id() -> str:
    """A fresh server event id, ``evt_000001``, ``evt_000002``, ... (unique within the process)."""
    with _event_lock:
        return f"evt_{next(_event_counter):06d}"


def _server(event_type: str, /, **body: Any) -> dict[str, Any]:
    return {"type": event_type, "event_id": next_event_id(), **body}


def _finite(value: float | None, name: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise InputError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


def _count(value: int, name: str) -> int:
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0):
        raise InputError(f"{name}: must be an integer >= 0, got {value!r}")
    return int(value)


def _attr(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


def session_created(session_id: str, model: str, limits: Limits, settings: Mapping[str, Any] | None = None,
                    ) -> dict[str, Any]:
    """``session.created``: the first event of every connection; send it before reading client events.

    ``settings`` (instructions, sampling, memory, ...) are merged into the session object.
    """
    fixed = {"id": session_id, "protocol": PROTOCOL_VERSION, "model": model, "limits": limits.to_dict()}
    return _server("session.created", session={**fixed, **{k: v for k, v in (settings or {}).items() if k not in fixed}})


def session_updated(session_id: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``session.updated``: the session's settings after a ``session.update`` was applied."""
    return _server("session.updated", session={"id": session_id, **{k: v for k, v in settings.items() if k != "id"}})


def conversation_item_created(item_id: str, text: str, role: Literal["user", "assistant"] = "user") -> dict[str, Any]:
    """``conversation.item.created``: echo a user message (or record an answer) with its server item id."""
    if role not in ("user", "assistant"):
        raise InputError(f"role: must be 'user' or 'assistant', got {role!r}")
    part = "input_text" if role == "user" else "output_text"
    return _server("conversation.item.created",
                   item={"id": item_id, "type": "message", "role": role, "content": [{"type": part, "text": text}]})


def _trigger_name(trigger: str) -> str:
    if trigger not in RESPONSE_TRIGGERS:
        raise InputError(f"trigger: must be one of {', '.join(RESPONSE_TRIGGERS)}, got {trigger!r}")
    return trigger


def _alert(alert: Any) -> dict[str, Any]:
    return {"watch_id": str(_attr(alert, "watch_id")), "condition": str(_attr(alert, "condition")),
            "t": _finite(_attr(alert, "t"), "alert.t")}


def response_created(response_id: str, trigger: str = "user", alert: Any = None,
                     client_event_id: str | None = None) -> dict[str, Any]:
    """``response.created``: a response starts; stream its text with :func:`response_output_text_delta`.

    ``trigger`` is why it was produced (RESPONSE_TRIGGERS); for trigger ``watch`` pass ``alert``, a
    mapping or object with ``watch_id``, ``condition`` and ``t`` (stream time of the firing frame).
    ``client_event_id`` is the ``event_id`` of the ``response.create`` it answers (None for alerts and
    commentary): clients bind answers to questions by it.
    """
    response: dict[str, Any] = {"id": response_id, "status": "in_progress", "trigger": _trigger_name(trigger),
                                "client_event_id": client_event_id}
    if alert is not None:
        response["alert"] = _alert(alert)
    return _server("response.created", response=response)


def response_output_text_delta(response_id: str, delta: str) -> dict[str, Any]:
    """``response.output_text.delta``: the next piece of a response's text."""
    return _server("response.output_text.delta", response_id=response_id, delta=delta)


def _evidence_entry(e: Any) -> dict[str, Any]:
    """One ``response.done`` evidence entry: ``pts_s``, ``source_id``, and ``weight`` when the frame has one."""
    entry: dict[str, Any] = {"pts_s": _finite(_attr(e, "pts_s"), "evidence.pts_s"), "source_id": str(_attr(e, "source_id"))}
    weight = e.get("weight") if isinstance(e, Mapping) else getattr(e, "weight", None)
    if weight is not None:
        entry["weight"] = _finite(weight, "evidence.weight")
    return entry


def response_done(response_id: str, status: str, trigger: str, output_text: str, evidence: Sequence[Any] = (),
                  input_tokens: int = 0, output_tokens: int = 0, alert: Any = None, *,
                  client_event_id: str | None = None, no_video: bool = False,
                  error: Mapping[str, str] | None = None, question: str | None = None) -> dict[str, Any]:
    """``response.done``: a response ended; the last event about ``response_id``.

    ``status`` is one of RESPONSE_STATUSES; ``evidence`` the frames the answer rests on
    (:class:`~streamvlm.types.Evidence` objects or mappings with ``pts_s``, ``source_id`` and optionally
    ``weight``, the frame's share of the answer's attention, written only when not None);
    ``alert`` as in :func:`response_created` for a proactive response; ``client_event_id`` as in
    :func:`response_created`; ``no_video`` True when the answer rests on no frame at all; ``error``
    (``code``, ``message``) says why a ``failed`` or ``cancelled`` response ended; ``question`` the user's
    text it answers (written only when given: user and deferred responses).
    """
    if status not in RESPONSE_STATUSES:
        raise InputError(f"status: must be one of {', '.join(RESPONSE_STATUSES)}, got {status!r}")
    response: dict[str, Any] = {
        "id": response_id,
        "status": status,
        "trigger": _trigger_name(trigger),
        "output_text": output_text,
        "evidence": [_evidence_entry(e) for e in evidence],
        "usage": {"input_tokens": _count(input_tokens, "input_tokens"), "output_tokens": _count(output_tokens, "output_tokens"),
                  "total_tokens": int(input_tokens) + int(output_tokens)},
        "client_event_id": client_event_id,
        "no_video": bool(no_video),
    }
    if question is not None:
        response["question"] = str(question)
    if error is not None:
        response["error"] = {"code": str(error["code"]), "message": str(error["message"])}
    if alert is not None:
        response["alert"] = _alert(alert)
    return _server("response.done", response=response)


def response_acknowledged(response_id: str, condition: str) -> dict[str, Any]:
    """``response.acknowledged``: a deferred question was understood; it is answered when ``condition`` holds."""
    return _server("response.acknowledged", response_id=response_id, condition=condition)


def watch_created(watch_id: str, condition: str, trigger: TriggerSpec | None = None) -> dict[str, Any]:
    """``watch.created``: a watch is active; alerts for it arrive as responses with trigger ``watch``."""
    watch: dict[str, Any] = {"id": watch_id, "condition": condition}
    if trigger is not None:
        watch["cooldown_s"] = trigger.cooldown_s
        watch["trigger"] = _trigger_dict(trigger)
    return _server("watch.created", watch=watch)


def watch_deleted(watch_id: str) -> dict[str, Any]:
    """``watch.deleted``: a watch was removed; no more alerts for it."""
    return _server("watch.deleted", watch_id=watch_id)


def memory_update(kind: str, chunks: int, tokens_before: int, tokens_after: int, up_to_s: float | None,
                  store_ram_bytes: int = 0, store_disk_bytes: int = 0) -> dict[str, Any]:
    """``memory.update``: working memory changed (compressed, evicted, merged, reindexed, spilled, dropped).

    The arguments match :class:`streamvlm.memory.manager.MemoryEvent`: ``memory_update(**asdict(event))``.
    """
    return _server("memory.update", kind=kind, chunks=_count(chunks, "chunks"),
                   tokens_before=_count(tokens_before, "tokens_before"), tokens_after=_count(tokens_after, "tokens_after"),
                   up_to_s=_finite(up_to_s, "up_to_s", optional=True),
                   store_ram_bytes=_count(store_ram_bytes, "store_ram_bytes"),
                   store_disk_bytes=_count(store_disk_bytes, "store_disk_bytes"))


def input_frame_stats(received: int, skipped: int, dropped: int, ingested: int,
                      working_tokens: int | None = None) -> dict[str, Any]:
    """``input_frame.stats``: frame counters since the session started (send every few seconds), and the
    working-memory tokens held now when known."""
    event = _server("input_frame.stats", received=_count(received, "received"), skipped=_count(skipped, "skipped"),
                    dropped=_count(dropped, "dropped"), ingested=_count(ingested, "ingested"))
    if working_tokens is not None:
        event["working_tokens"] = _count(working_tokens, "working_tokens")
    return event


def input_frame_rate(fps: float | None, reason: str, message: str) -> dict[str, Any]:
    """``input_frame.rate``: the most frames per second the server now reads from this session (``fps``),
    or ``None`` when every frame is read again; frames beyond the cap are dropped without an error."""
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number or None, got {fps!r}")
    return _server("input_frame.rate", limited=fps is not None, fps=None if fps is None else round(fps, 4),
                   reason=reason, message=message)


def session_resumption_update(new_handle: str | None, resumable: bool) -> dict[str, Any]:
    """``session.resumption_update``: the handle a client reconnects with (``?resume=<handle>``).

    Send it whenever the session reaches a state it can be resumed from; ``resumable`` False (with
    ``new_handle`` None) says it cannot be resumed right now, e.g. in the middle of an answer.
    """
    return _server("session.resumption_update", new_handle=new_handle, resumable=bool(resumable))


def session_go_away(time_left_ms: int) -> dict[str, Any]:
    """``session.go_away``: the server will close the connection in ``time_left_ms``; the client should resume."""
    return _server("session.go_away", time_left_ms=_count(time_left_ms, "time_left_ms"))


def webrtc_answer(sdp: str) -> dict[str, Any]:
    """``webrtc.answer``: the server's SDP answer to a ``webrtc.offer``."""
    return _server("webrtc.answer", sdp=sdp)


def error_event(code: str, message: str, param: str | None = None, client_event_id: str | None = None,
                response_id: str | None = None) -> dict[str, Any]:
    """``error``: a client event was refused (or the server failed); the session goes on.

    ``code`` is one of ERROR_CODES or APPLICATION_ERROR_CODES; ``param`` the offending field;
    ``client_event_id`` the event it answers; ``response_id`` the response it concerns. Build one from
    a :class:`ProtocolError` with ``error_event(e.code, e.detail, e.param, e.client_event_id)``.
    """
    error_type = "server_error" if code in ("server_error", "engine_fault", "session_closed") else "invalid_request_error"
    error = {"type": error_type, "code": code, "message": message, "param": param, "event_id": client_event_id}
    if response_id is not None:
        error["response_id"] = response_id
    return _server("error", error=error)
