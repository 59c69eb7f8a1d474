"""One client connection as a Sans-I/O state machine: messages in, events and replies out.

The transport (an asyncio WebSocket handler, a test) feeds every message it receives to
:meth:`Connection.receive_text` or :meth:`Connection.receive_bytes`, acts on the client events they
return, queues server events with :meth:`Connection.send`, and writes whatever
:meth:`Connection.data_to_send` returns as text messages::

    conn = Connection(Limits())
    conn.send(session_created(session_id, model_name, conn.limits))
    for message in websocket:                      # whatever the I/O layer is
        if isinstance(message, str):
            events = conn.receive_text(message, now=loop_time())
        else:
            events = conn.receive_bytes(message, now=loop_time())
        for event in events:
            ...                                    # hand to the session; it calls conn.send(...)
        for text in conn.data_to_send():
            websocket.send(text)

Nothing the client sends can make ``receive_*`` raise: a bad message becomes an ``error`` event
in the outgoing queue (OpenAI Realtime style) and the session goes on. The connection never
reads a clock unless built with ``clock_free=False``; time is the ``now`` the caller passes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

from ..errors import InputError
from .frames import Limits, ProtocolError, decode_frame
from .messages import ClientEvent, FrameAppend, error_event, parse_client_message

__all__ = ["Connection", "FrameRateLimiter"]

# Slack for float time arithmetic, so frames exactly 1/rate apart are never refused by rounding.
_EPSILON = 1e-6


class FrameRateLimiter:
    """Token bucket: ``rate`` frames per second sustained, bursts of up to ``max(1, rate)`` frames.

    Call :meth:`allow` once per frame with the current time; False means drop the frame. Time only
    moves when the caller says so; a ``now`` earlier than the last one counts as no time passing.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        # Frames per second added to the bucket.
        self.rate = float(rate)
        # Bucket size: how many frames may arrive at once after a pause (default: one second's worth).
        self.capacity = float(burst) if burst is not None else max(1.0, self.rate)
        self._tokens = self.capacity
        self._last: float | None = None

    def allow(self, now: float | None) -> bool:
        """Take one frame's token at time ``now`` (seconds; None: no time passed). True if the frame may pass."""
        if now is not None:
            if self._last is not None and now > self._last:
                self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            if self._last is None or now > self._last:
                self._last = now
        if self._tokens >= 1.0 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1.0)
            return True
        return False


class Connection:
    """The protocol state of one WebSocket connection to ``/v1/realtime``.

    ``limits`` bounds what the client may send. With ``clock_free=True`` (the default) the
    connection never reads a clock: pass ``now`` (seconds, any monotonic origin) with every frame;
    a frame received with ``now=None`` is rate-limited as if no time had passed since the last
    ``now``. With ``clock_free=False``, ``now=None`` reads :func:`time.monotonic`.
    """

    def __init__(self, limits: Limits | None = None, clock_free: bool = True) -> None:
        # What the client may send.
        self.limits = limits if limits is not None else Limits()
        # True: never read a clock; time is only what the caller passes as ``now``.
        self.clock_free = clock_free
        self._outgoing: list[str] = []
        self._limiter = FrameRateLimiter(self.limits.max_frames_per_s)
        self._messages = FrameRateLimiter(self.limits.max_messages_per_s, 2 * self.limits.max_messages_per_s)
        self._errors = FrameRateLimiter(self.limits.max_errors_per_s, self.limits.max_error_burst)
        self._now: float | None = None
        # True once the client caused more errors than limits allow: close the connection (too_many_errors).
        self.too_many_errors = False
        self._error_counts: dict[str, int] = {}
        # Client messages received, text and binary, valid or not.
        self.messages_received = 0
        # Frames accepted (JSON or binary), after rate limiting and decoding.
        self.frames_accepted = 0

    # ----------------------------------------------------------------------- receiving

    def receive_text(self, text: str, now: float | None = None) -> list[ClientEvent]:
        """Feed one text message; returns the valid client events in it (zero or one).

        A refused message queues an ``error`` event instead; fetch it with :meth:`data_to_send`.
        ``now`` is the arrival time in seconds, used to rate-limit ``input_frame.append``.
        """
        now = self._check_now(now)
        self.messages_received += 1
        try:
            self._gate_message(now)
            if isinstance(text, (bytes, bytearray, memoryview)):
                try:
                    text = bytes(text).decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolError("invalid_json", "a text message must be UTF-8") from None
            event = parse_client_message(text, self.limits, frame_gate=lambda: self._gate_frame(now))
        except ProtocolError as exc:
            self._refuse(exc)
            return []
        if isinstance(event, FrameAppend):
            self.frames_accepted += 1
        return [event]

    def receive_bytes(self, data: bytes, now: float | None = None) -> list[ClientEvent]:
        """Feed one binary message (a frame, see :mod:`.frames`); returns the frame as a FrameAppend, or [].

        Frames beyond ``limits.max_frames_per_s`` are dropped with a ``rate_limited`` error;
        malformed or oversized ones with ``invalid_frame`` / ``frame_too_large`` /
        ``message_too_large``. ``now`` is the arrival time in seconds.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"receive_bytes takes bytes, got {type(data).__name__}; pass text messages to receive_text")
        now = self._check_now(now)
        self.messages_received += 1
        try:
            self._gate_message(now)
            data = bytes(data)
            size = len(data)
            if size > self.limits.max_message_bytes:
                raise ProtocolError("message_too_large",
                                    f"message is {size} bytes, the limit is {self.limits.max_message_bytes}")
            self._gate_frame(now)
            frame = decode_frame(data, self.limits)
        except ProtocolError as exc:
            self._refuse(exc)
            return []
        self.frames_accepted += 1
        return [FrameAppend(frame.image, frame.pts_s, frame.source_id, binary=True)]

    def _check_now(self, now: float | None) -> float | None:
        if now is None:
            return None if self.clock_free else time.monotonic()
        if not (isinstance(now, (int, float)) and not isinstance(now, bool) and math.isfinite(now)):
            raise InputError(f"now: must be a finite number of seconds, got {now!r}")
        return float(now)

    def _gate_frame(self, now: float | None) -> None:
        if not self._limiter.allow(now):
            raise ProtocolError("rate_limited", f"more than {self.limits.max_frames_per_s:g} frames per second; "
                                "frame dropped, send fewer frames")

    def _gate_message(self, now: float | None) -> None:
        self._now = now
        if not self._messages.allow(now):
            raise ProtocolError("rate_limited", f"more than {self.limits.max_messages_per_s:g} messages per second; "
                                "message dropped", "message")

    def _refuse(self, exc: ProtocolError) -> None:
        if not self._errors.allow(self._now):
            self.too_many_errors = True
        self._error_counts[exc.code] = self._error_counts.get(exc.code, 0) + 1
        self.send(error_event(exc.code, exc.detail, exc.param, exc.client_event_id))

    # ----------------------------------------------------------------------- sending

    def send(self, event: Mapping[str, Any]) -> None:
        """Queue a server event (a dict from the builders in :mod:`.messages`) as JSON text.

        Raises :class:`~streamvlm.errors.InputError` if it has no string ``type`` and ``event_id``
        or cannot be written as strict JSON (NaN, infinity, non-JSON types); nothing is queued then.
        """
        if not isinstance(event, Mapping) or not isinstance(event.get("type"), str) \
                or not isinstance(event.get("event_id"), str):
            raise InputError("event: must be a mapping with string 'type' and 'event_id'; use the messages builders")
        try:
            text = json.dumps(event, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
            text.encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise InputError(f"event {event.get('type')!r}: not JSON-serialisable: {exc}") from None
        self._outgoing.append(text)

    def send_error(self, code: str, message: str, param: str | None = None, client_event_id: str | None = None) -> None:
        """Queue an ``error`` event (e.g. an APPLICATION_ERROR_CODES code) and count it."""
        self._error_counts[code] = self._error_counts.get(code, 0) + 1
        self.send(error_event(code, message, param, client_event_id))

    def data_to_send(self) -> list[str]:
        """Return and forget the queued outgoing messages, oldest first; write each as one text message."""
        out, self._outgoing = self._outgoing, []
        return out

    # ----------------------------------------------------------------------- state

    @property
    def error_counts(self) -> dict[str, int]:
        """How many ``error`` events were queued, by code (a copy)."""
        return dict(self._error_counts)
