"""One realtime session as a Sans-I/O state machine: client events and worker outcomes in, server events and commands out.

The transport (the websockets server, an ASGI app, a test) owns the sockets and the model thread; this
class owns everything else a session means to its client: settings and when they lock, ids, pairing
items with responses, every response's lifecycle, watches and their limits, resumption handles, and
what a client that was away missed. It reads no clock (``now`` is passed in) and does no I/O::

    core = RealtimeSession(model="shapeworld", limits=Limits(), policy=SessionPolicy(4096, 16384))
    send(core.opened(now))                            # session.created, session.resumption_update
    for event in client_events:                       # parsed by protocol.Connection
        for out in core.client_event(event, now):
            if isinstance(out, dict): send(out)       # a server event
            else: execute(out)                        # a command for the worker (Ask, Cancel, ...)
    for kind, data in worker_outcomes:                # what the model thread reported
        handle(core.worker_event(kind, data, now))
    send(core.set_read_rate(0.5))                     # admission by compute: input_frame.rate; frames above
                                                      # it come out as FrameDropped("compute"), not errors

The invariant every transport relies on: every ``response.create`` yields exactly one
``response.created`` (at once) and exactly one ``response.done`` (``completed | cancelled |
incomplete | failed``), nothing about that response after its ``response.done``, and every ``error``
names the client ``event_id`` or the ``response_id`` it belongs to. It holds whatever the worker does,
because the core keeps the books: an outcome for a response that already ended is ignored, and a worker
that stops ends every open response ``failed``.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Union

from ..config import MemoryConfig, SessionConfig
from ..dialogue import ControllerConfig
from ..dialogue.controller import parse_forward_request
from ..dialogue.triggers import TriggerSpec
from ..errors import ConfigError, TimestampError
from ..ingest.clock import SessionClock
from . import messages as m
from .connection import FrameRateLimiter
from .frames import Limits
from .ids import new_id

__all__ = [
    "RealtimeSession",
    "SessionPolicy",
    "DROPPABLE_EVENTS",
    "Command",
    "StartWorker",
    "SubmitFrame",
    "Ask",
    "Cancel",
    "Watch",
    "Unwatch",
    "UpdateSampling",
    "AcceptOffer",
    "Close",
    "Observe",
    "FrameDropped",
    "READ_RATE_EVENT",
]

# Settings that shape the context: they cannot change once a frame or a question went in.
_LOCKED = ("instructions", "memory.budget_tokens", "memory.policy", "memory.positions", "interrupt", "probe_every_frames",
           "probe_every_s")
# What a client that is away keeps for its return (answers and alerts; memory and stats are not kept).
_MISSED_KEPT = 256
DROPPABLE_EVENTS = ("memory.update", "input_frame.stats")
#: The server event that announces a cap on the frames the server reads from this session, or its lifting.
READ_RATE_EVENT = "input_frame.rate"
_STATUS = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled"}


@dataclass(frozen=True)
class SessionPolicy:
    """What one session may take: memory budget (default and most), watches, frames per second."""

    # Working-memory budget a session starts with, in tokens.
    default_budget_tokens: int = 4096
    # Largest budget session.update may ask for; None (unbounded) is never granted.
    max_budget_tokens: int = 16384
    # Watches one session may hold at once.
    max_watches: int = 32
    # Frames per second a WebRTC track may feed (WebSocket frames are limited by Limits.max_frames_per_s).
    max_frames_per_s: float = 30.0
    # The session's long-term store: bytes in RAM, and on disk beyond that (0: older chunks are dropped).
    store_ram_bytes: int = 64 * 2**20
    store_disk_bytes: int = 0
    # Responses one session may have open at once (answering, queued, or waiting for their condition).
    max_open_responses: int = 16


# ---- commands for the transport --------------------------------------------------------------------


@dataclass(frozen=True)
class StartWorker:
    """Create the model thread for this session with these settings (once; before any other command)."""

    session: SessionConfig
    memory: MemoryConfig
    controller: ControllerConfig


@dataclass(frozen=True)
class SubmitFrame:
    """Offer a frame to the worker (it may skip or replace it; see LiveWorker.submit_frame)."""

    image: Any
    pts_s: float
    source_id: str


@dataclass(frozen=True)
class Ask:
    """Ask the worker; it reports the outcome under ``request_id``."""

    request_id: str
    text: str
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class Cancel:
    """Cancel one request, or (None) the running answer and every queued one."""

    request_id: str | None = None


@dataclass(frozen=True)
class Watch:
    watch_id: str
    condition: str
    spec: TriggerSpec | None


@dataclass(frozen=True)
class Unwatch:
    watch_id: str


@dataclass(frozen=True)
class UpdateSampling:
    """New sampling settings for answers from now on (the worker's session config)."""

    session: SessionConfig


@dataclass(frozen=True)
class AcceptOffer:
    """Answer a WebRTC offer; frames of the track go to :meth:`RealtimeSession.track_frame`."""

    sdp: str
    event_id: str | None = None  # the offer's client event id, for the error if it cannot be answered


@dataclass(frozen=True)
class Close:
    """Close the connection with this WebSocket close code and reason; the session ends (not resumable)."""

    code: int
    reason: str


@dataclass(frozen=True)
class Observe:
    """A measurement for the metrics: ``name`` is ``time_to_first_token`` (seconds)."""

    name: str
    value: float


@dataclass(frozen=True)
class FrameDropped:
    """A frame was dropped by the core without an error event: count it under ``reason`` (``compute``:
    above the read rate the server set with :meth:`RealtimeSession.set_read_rate`)."""

    reason: str


Command = Union[StartWorker, SubmitFrame, Ask, Cancel, Watch, Unwatch, UpdateSampling, AcceptOffer, Close, Observe, FrameDropped]
Out = Union[dict, Command]


@dataclass
class _Response:
    trigger: str
    client_event_id: str | None
    asked_at: float
    question: str | None = None  # the user's text it answers (None for commentary)
    first_token: bool = False
    max_new_tokens: int | None = None  # the response.create's max_output_tokens (None: the session's)


@dataclass
class RealtimeSession:
    """The state of one realtime session; see the module docstring for how a transport drives it."""

    model: str
    limits: Limits = field(default_factory=Limits)
    policy: SessionPolicy = field(default_factory=SessionPolicy)
    # Checks a new budget against what the server has left; returns None (granted) or why not.
    budget_check: Callable[[int], str | None] = lambda tokens: None
    id: str = field(default_factory=lambda: new_id("sess"))

    def __post_init__(self) -> None:
        self.session_config = SessionConfig()
        self.memory_config = MemoryConfig(budget_tokens=self.policy.default_budget_tokens,
                                          store_ram_bytes=self.policy.store_ram_bytes,
                                          store_disk_bytes=self.policy.store_disk_bytes)
        self.controller_config = ControllerConfig()
        self.handle = secrets.token_urlsafe(24)
        self.started = False  # a frame or question went in: context-shaping settings are locked
        self.worker_started = False
        self.closed: str | None = None  # why the session ended, once it has
        self.attached = False
        self.watches: dict[str, str] = {}
        self._user_text: str | None = None
        self._responses: dict[str, _Response] = {}
        self._missed: deque[dict] = deque(maxlen=_MISSED_KEPT)
        self.clock = SessionClock()  # every source's frames on one monotonic stream time (docs/clocks.md)
        self._track_limiter = FrameRateLimiter(self.policy.max_frames_per_s)
        # Admission by compute (set by the server): frames per second read from this session, None: no cap.
        self.read_rate: float | None = None
        self._read_limiter: FrameRateLimiter | None = None
        self._rate_told: float | None = None  # the cap the client was last told about (None: none)
        self._read_reason = "compute"
        self.frames_offered = 0  # valid frames that reached the core, before the compute cap
        self.frames_dropped_compute = 0  # of those, dropped by the compute cap

    # ---- settings -------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        s = self.session_config
        return {
            "instructions": s.system_prompt,
            "sampling": {"max_new_tokens": s.sampling.max_new_tokens, "temperature": s.sampling.temperature},
            "memory": {"budget_tokens": self.memory_config.budget_tokens, "policy": self.memory_config.policy,
                       "positions": self.memory_config.positions},
            "interrupt": self.controller_config.interrupt,
            "probe_every_frames": self.controller_config.probe_every_frames,
            "probe_every_s": self.controller_config.probe_every_s,
        }

    @property
    def budget_tokens(self) -> int:
        """The working-memory budget this session holds (counted against the server's total)."""
        return int(self.memory_config.budget_tokens or self.policy.max_budget_tokens)

    @property
    def open_responses(self) -> tuple[str, ...]:
        """Response ids created and not done yet, oldest first."""
        return tuple(self._responses)

    def open_response_books(self) -> list[dict[str, Any]]:
        """What the session knows of each open response, oldest first (for a snapshot): ``response_id``,
        ``trigger``, ``client_event_id``, the ``question`` it answers (None for commentary) and its
        ``max_output_tokens`` (None: the session's)."""
        return [{"response_id": rid, "trigger": r.trigger, "client_event_id": r.client_event_id, "question": r.question,
                 "max_output_tokens": r.max_new_tokens} for rid, r in self._responses.items()]

    @property
    def missed(self) -> list[dict]:
        """The events kept for a client that is away (oldest first); :meth:`resumed` sends them."""
        return list(self._missed)

    # ---- connection ----------------------------------------------------------------------------------
    def opened(self, now: float) -> list[Out]:
        """A client connected and got this new session: the first events to send."""
        self.attached = True
        self.clock = SessionClock(origin_s=now)  # stream time runs from the session's opening
        return [m.session_created(self.id, self.model, self.limits, self.settings()), self._resumption()]

    def detached(self, now: float) -> list[Out]:
        """The client left; the session waits to be resumed. Cancels what was answering (a client gone
        mid-answer leaves nothing running); outcomes from now on are kept for its return."""
        self.attached = False
        return [Cancel(None)] if self._responses and self.worker_started else []

    def keep_missed(self, events: Iterable[dict]) -> None:
        """Events that were queued for the client but not written when it left: kept for its return."""
        for event in events:
            if event["type"] not in DROPPABLE_EVENTS:
                self._missed.append(event)

    def resumed(self, now: float) -> list[Out]:
        """The client came back with the handle: session.created, what it missed, a new handle."""
        self.attached = True
        if self.closed is not None:
            return [m.error_event("session_closed", f"the session has ended: {self.closed}"),
                    m.session_resumption_update(None, False)]
        missed, self._missed = list(self._missed), deque(maxlen=_MISSED_KEPT)
        rate = [self._rate_event()] if self.read_rate is not None or self._rate_told is not None else []
        return [m.session_created(self.id, self.model, self.limits, self.settings()), *missed, *rate, self._resumption()]

    def close(self, reason: str, code: str = "session_closed", close_code: int | None = None) -> list[Out]:
        """End the session for good (server stopping, eviction, a fault): every open response ends
        ``failed``; the client learns that it cannot resume; ``close_code`` adds a Close command."""
        if self.closed is not None:
            return []
        self.closed = reason
        out: list[Out] = [*self._fail_all(code, reason), m.error_event(code, reason), m.session_resumption_update(None, False)]
        if close_code is not None:
            out.append(Close(close_code, reason[:120]))
        return self._deliver(out)

    # ---- client events ---------------------------------------------------------------------------------
    def client_event(self, event: m.ClientEvent, now: float) -> list[Out]:
        """Carry out one valid client event (parsed by protocol.Connection); refusals are error events."""
        if self.closed is not None:
            return [m.error_event("session_closed", f"the session has ended: {self.closed}", None, event.event_id)]
        handler = getattr(self, "_on_" + type(event).__name__)
        return handler(event, now)

    def _start(self, *, lock: bool = True) -> list[Out]:
        """The worker's StartWorker command, the first time; ``lock``: context-shaping settings lock now."""
        self.started = self.started or lock
        if self.worker_started:
            return []
        self.worker_started = True
        return [StartWorker(self.session_config, self.memory_config, self.controller_config)]

    def _on_SessionUpdate(self, event: m.SessionUpdate, now: float) -> list[Out]:
        cid = event.event_id
        locked = sorted(set(_LOCKED) & set(event.fields_set))
        if self.started and locked:
            return [m.error_event("setting_locked", f"{locked[0]} cannot change once the stream has started",
                                  f"session.{locked[0]}", cid)]
        memory = self.memory_config
        if "memory.budget_tokens" in event.fields_set:
            budget = event.budget_tokens
            cap = self.policy.max_budget_tokens
            if budget is None or budget > cap:
                asked = "unbounded memory (null)" if budget is None else f"{budget} tokens"
                return [m.error_event("budget_too_large", f"this server gives one session at most {cap} working-memory "
                                      f"tokens; {asked} was asked", "session.memory.budget_tokens", cid)]
            refused = self.budget_check(budget - self.budget_tokens) if budget > self.budget_tokens else None
            if refused:
                return [m.error_event("budget_too_large", refused, "session.memory.budget_tokens", cid)]
            memory = replace(memory, budget_tokens=budget)
        if event.policy is not None:
            memory = replace(memory, policy=event.policy)
        if event.positions is not None:
            memory = replace(memory, positions=event.positions)
        s = self.session_config
        sampling = replace(s.sampling, **{k: v for k, v in (("max_new_tokens", event.max_new_tokens),
                                                             ("temperature", event.temperature)) if v is not None})
        self.session_config = replace(s, sampling=sampling, system_prompt=event.instructions or s.system_prompt)
        self.memory_config = memory
        cc = self.controller_config
        self.controller_config = replace(cc, interrupt=cc.interrupt if event.interrupt is None else event.interrupt,
                                         probe_every_frames=event.probe_every_frames or cc.probe_every_frames,
                                         probe_every_s=cc.probe_every_s if event.probe_every_s is None else event.probe_every_s)
        out: list[Out] = [UpdateSampling(self.session_config)] if self.worker_started else []
        return out + [m.session_updated(self.id, self.settings())]

    def _on_ItemCreate(self, event: m.ItemCreate, now: float) -> list[Out]:
        self._user_text = event.text
        return [m.conversation_item_created(event.item_id or new_id("item"), event.text)]

    def _on_ResponseCreate(self, event: m.ResponseCreate, now: float) -> list[Out]:
        if not self._user_text:
            return [m.error_event("no_user_message", "send conversation.item.create first", None, event.event_id)]
        if len(self._responses) >= self.policy.max_open_responses:  # the user message stays for a later response.create
            return [m.error_event("response_limit", f"a session may have {self.policy.max_open_responses} responses open; "
                                  "wait for one to end or cancel one", None, event.event_id)]
        text, self._user_text = self._user_text, None
        rid = new_id("resp")
        trigger = "deferred" if parse_forward_request(text) is not None else "user"
        self._responses[rid] = _Response(trigger, event.event_id, now, text, max_new_tokens=event.max_output_tokens)
        out = self._start()
        return out + [m.response_created(rid, trigger, client_event_id=event.event_id),
                      Ask(rid, text, event.max_output_tokens)]

    def reopen(self, response_id: str, trigger: str, client_event_id: str | None, question: str, now: float,
               max_new_tokens: int | None = None) -> list[Out]:
        """A response opened elsewhere (its ``response.created`` went out from the server the session moved
        from) goes on here: it is open again under the same id, and its question is asked of this
        server's worker (the Ask command to carry out once the worker runs), with the ``max_output_tokens``
        it was created with. It ends exactly once, as any other."""
        self._responses[response_id] = _Response(trigger, client_event_id, now, question, max_new_tokens=max_new_tokens)
        return [Ask(response_id, question, max_new_tokens)]

    def _on_ResponseCancel(self, event: m.ResponseCancel, now: float) -> list[Out]:
        rid = event.response_id
        if rid is None and not self._responses:
            return [m.error_event("response_not_found", "no response is running or waiting", None, event.event_id)]
        if rid is not None and rid not in self._responses:
            return [m.error_event("response_not_found", f"no response {rid!r} is running or waiting", "response_id",
                                  event.event_id, rid)]
        return [Cancel(rid)]

    def _on_FrameAppend(self, event: m.FrameAppend, now: float) -> list[Out]:
        return self._frame(event.image, event.pts_s, event.source_id, now)

    def track_frame(self, image: Any, timestamp: int | None, clock_rate: int | None, now: float,
                    source_id: str = "webrtc") -> list[Out]:
        """A frame of a WebRTC track (RTP ``timestamp`` at ``clock_rate`` Hz) received at ``now``:
        rate-limited like any frame ([] if dropped; a ``FrameDropped`` above the compute cap),
        stamped with RTP time rebased at the first frame."""
        if self.closed is not None or not self._track_limiter.allow(now):
            return []
        if not self._read_allows(now):
            return [FrameDropped("compute")]
        return self._start() + [SubmitFrame(image, self.clock.stamp_rtp(source_id, timestamp, clock_rate, now), source_id)]

    def _frame(self, image: Any, pts_s: float | None, source_id: str, now: float) -> list[Out]:
        try:  # the sender's pts_s while it behaves, else the receive clock; monotonic per session
            t = self.clock.stamp(source_id, pts_s, now)
        except TimestampError as exc:
            return [m.error_event("invalid_value", str(exc), "pts_s")]
        if not self._read_allows(now):
            return [FrameDropped("compute")]
        return self._start() + [SubmitFrame(image, t, source_id)]

    # ---- admission by compute ------------------------------------------------------------------------
    def set_read_rate(self, fps: float | None, reason: str = "compute") -> list[Out]:
        """The server reads at most ``fps`` frames per second from this session from now on (None: no cap).

        Frames above the cap are dropped without an error event (the client is not at fault): each is a
        ``FrameDropped(reason)`` command for the transport's metrics. Returns the ``input_frame.rate``
        event that tells the client (to send), or [] when nothing changed; while the client is away the
        new cap is kept and announced on its return. Raises ConfigError (a ValueError) for a rate that
        is not a finite number > 0.
        """
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0):
            raise ConfigError(f"read rate: must be a finite number > 0 or None, got {fps!r}")
        if self.closed is not None or fps == self.read_rate:
            return []
        self.read_rate, self._read_reason = (None if fps is None else float(fps)), reason
        if fps is None:
            self._read_limiter = None
        elif self._read_limiter is None:
            # Bursts of at most two frames: frames pass about evenly spaced (a longer burst would wait in
            # the worker and be replaced there), and one that came late is made up for. Full: the next frame passes.
            self._read_limiter = FrameRateLimiter(fps, burst=2.0)
        else:
            self._read_limiter.rate = float(fps)
        return [self._rate_event()] if self.attached else []

    def _read_allows(self, now: float) -> bool:
        """Count a valid frame as offered and take it from the compute cap; False: drop it (counted)."""
        self.frames_offered += 1
        if self._read_limiter is None or self._read_limiter.allow(now):
            return True
        self.frames_dropped_compute += 1
        return False

    def _rate_event(self) -> dict:
        """``input_frame.rate`` for the cap in force (and remember that the client was told)."""
        self._rate_told = self.read_rate
        reason = self._read_reason
        if self.read_rate is None:
            message = "the server reads every frame this session sends again (up to limits.max_frames_per_s)"
        else:
            message = (f"the server reads at most {self.read_rate:.3g} frames per second from this session ({reason}: "
                       "its share of the model); frames beyond are dropped without an error")
        return m.input_frame_rate(self.read_rate, reason, message)

    def _on_WatchCreate(self, event: m.WatchCreate, now: float) -> list[Out]:
        cid = event.event_id
        if event.watch_id in self.watches:
            return [m.error_event("watch_exists", f"watch {event.watch_id!r} exists", "watch.id", cid)]
        if len(self.watches) >= self.policy.max_watches:
            return [m.error_event("watch_limit", f"a session may hold {self.policy.max_watches} watches; "
                                  "delete one first", "watch.id", cid)]
        self.watches[event.watch_id] = event.condition
        spec = event.spec(self.controller_config.default_trigger)
        return self._start(lock=False) + [Watch(event.watch_id, event.condition, spec), m.watch_created(event.watch_id, event.condition, spec)]

    def _on_WatchDelete(self, event: m.WatchDelete, now: float) -> list[Out]:
        if self.watches.pop(event.watch_id, None) is None:
            return [m.error_event("watch_not_found", f"no watch {event.watch_id!r}", "watch_id", event.event_id)]
        out: list[Out] = [Unwatch(event.watch_id)] if self.worker_started else []
        return out + [m.watch_deleted(event.watch_id)]

    def _on_WebRTCOffer(self, event: m.WebRTCOffer, now: float) -> list[Out]:
        return self._start() + [AcceptOffer(event.sdp, event.event_id)]

    # ---- worker outcomes ---------------------------------------------------------------------------------
    def worker_event(self, kind: str, data: Mapping[str, Any], now: float) -> list[Out]:
        """What the model thread reported (LiveWorker events: ``kind`` and its data); the events to send.

        Nothing is reported once the session has ended (what was open ended with it)."""
        if self.closed is not None:
            return []
        out: list[Out]
        rid = data.get("request_id")
        if kind == "answer.started":
            out = []
            if rid not in self._responses and data["trigger"] == "commentary":  # the worker spoke up by itself
                self._responses[rid] = _Response(data["trigger"], None, now)
                out = [m.response_created(rid, data["trigger"])]
        elif kind == "answer.delta":
            response = self._responses.get(rid)
            if response is None:
                return []
            out = [m.response_output_text_delta(rid, data["text"])]
            if not response.first_token:
                response.first_token = True
                out.insert(0, Observe("time_to_first_token", now - response.asked_at))
        elif kind == "answer.done":
            response = self._responses.pop(rid, None)
            if response is None:
                return []
            answer = data["answer"]
            out = [m.response_done(rid, _STATUS.get(answer.finish_reason, "completed"), response.trigger, answer.text,
                                   answer.evidence, answer.prompt_tokens, len(answer.token_ids),
                                   client_event_id=response.client_event_id, no_video=not answer.evidence,
                                   question=response.question)]
            if self.attached:  # a state the session can be resumed from: a fresh handle (the old one stops working)
                out.append(self._resumption())
        elif kind == "request.ended":
            out = self._end(rid, data["status"], data.get("code") or "cancelled", data.get("message") or "")
        elif kind == "gave_up":
            out = self._end(rid, "incomplete", "not_seen", data["reason"], text=data["reason"])
        elif kind == "acknowledged":
            out = [m.response_acknowledged(rid, data["condition"])] if rid in self._responses else []
        elif kind == "alert":
            alert_id = new_id("resp")
            alert = {"watch_id": data["watch_id"], "condition": data["condition"], "t": data["evidence_t"]}
            evidence = [{"pts_s": data["evidence_t"], "source_id": data.get("source_id") or "default"}]
            out = [m.response_created(alert_id, "watch", alert),  # its text: the condition that now holds
                   m.response_done(alert_id, "completed", "watch", data["condition"], evidence, alert=alert)]
        elif kind == "memory":
            event = data["memory_event"]
            out = [m.memory_update(**{f: getattr(event, f) for f in event.__dataclass_fields__})]
        elif kind == "error":
            param = "watch.id" if data.get("watch_id") else None
            out = [m.error_event(data.get("code") or "engine_fault", data["message"], param, None, rid)]
        elif kind == "fatal":
            out = self.close(data["reason"], "session_closed", 1011)
            return out
        else:
            out = []
        return self._deliver(out)

    def worker_stopped(self, now: float) -> list[Out]:
        """The model thread is gone. If the session was not closed on purpose, that is a fault: say so."""
        if self.closed is not None:
            return []
        return self.close("the session's model thread stopped", "session_closed", 1011)

    # ---- internals -----------------------------------------------------------------------------------------
    def _end(self, rid: str, status: str, code: str, message: str, text: str = "") -> list[Out]:
        response = self._responses.pop(rid, None)
        if response is None:
            return []
        done = m.response_done(rid, status, response.trigger, text, client_event_id=response.client_event_id,
                               no_video=True, error={"code": code, "message": message}, question=response.question)
        if status != "failed":
            return [done]
        return [m.error_event(code, message, None, response.client_event_id, rid), done]

    def _fail_all(self, code: str, reason: str) -> list[Out]:
        out: list[Out] = []
        for rid in list(self._responses):
            out += self._end(rid, "failed", code, reason)
        return out

    def _resumption(self) -> dict:
        self.handle = secrets.token_urlsafe(24)
        return m.session_resumption_update(self.handle, True)

    def _deliver(self, out: Iterable[Out]) -> list[Out]:
        """While the client is away, keep what it must not miss (answers, alerts, errors) for its return."""
        out = list(out)
        if self.attached:
            return out
        kept: list[Out] = []
        for item in out:
            if isinstance(item, dict):
                if item["type"] not in DROPPABLE_EVENTS:
                    self._missed.append(item)
            else:
                kept.append(item)
        return kept
