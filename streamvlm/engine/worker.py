"""The live worker: the one bridge between a model thread and asyncio.

One thread owns the :class:`StreamSession` (the model is not thread-safe and a forward pass blocks);
asyncio code talks to it only through this class. The thread always picks the most urgent work:

1. control: user messages, watches, cancel (cheap, and they may cancel what is running);
2. answers the dialogue controller asked for (a user's first);
3. yes/no probes for watches and deferred questions;
4. the newest frame — frames are never queued: a frame that arrives while another waits replaces it
   (the older one is counted as dropped), so the worker drops rather than falls behind.

Answers do not wait for a frame read in progress. A read is two steps (:meth:`StreamSession.encode_frame`,
then :meth:`StreamSession.commit_frame`): while the vision tower runs, the worker looks for control and
answers between its layers and serves them there, with the encode suspended (the vision tower does
not touch the cache, so the encode then continues unchanged: no frame is encoded twice); a message or
an answer that arrives during the frame's prefill abandons that prefill at the next language-model
layer (the cache is left as it was), is served, and the encoded frame is then prefilled again. Time
order: an answer served meanwhile is asked at the stream time of the frames already committed and
its evidence is those frames; the frame in progress joins the context after it, at its own time or,
if the stream clock moved past that, at the current time. The frame is committed even when a newer
frame arrived meanwhile (its vision output, most of the work, is done; the newer frame waits its
turn).

Before a frame may reach the vision tower it is compared with the last frame accepted (mean absolute
difference of 32x32 grey thumbnails, 0..255): below ``dedup_threshold`` it is skipped, so a static
camera costs almost nothing; one frame is read at least every ``dedup_max_skip_s`` (default 30 s) to
keep time moving. A near-duplicate of a frame that is still *waiting* replaces it instead (the same
view, captured later; the older one counts as dropped), so the frame read is always the freshest.

Counters always satisfy ``received == skipped + dropped + ingested + pending`` (``pending``: a frame
waiting, plus one being read).

Order: a question is answered from every frame submitted before it. An answer waits (without
pre-empting) while a frame that arrived before its question is waiting or being read; a newer frame
that replaced such a frame (latest wins) is waited for in its place, so the answer sees the freshest
view of what was sent before it.

Every request passed to :meth:`LiveWorker.ask` ends exactly once: ``answer.done``, ``gave_up`` or
``request.ended`` (status ``cancelled`` or ``failed``, with an error code and message). Nothing kills
the model thread quietly: an exception in a step ends that step's request (``request.ended`` failed)
or becomes an ``error`` event, and the session goes on; a session the engine reports unusable
(``StreamSession.broken``) or a fault in the worker itself ends the thread with a ``fatal`` event
naming the reason, always followed by the end of :meth:`events`.

Everything the worker produces arrives on :meth:`events` as :class:`WorkerEvent` objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from ..dialogue import (
    Acknowledge,
    Alert,
    AnswerNow,
    CancelGeneration,
    ControllerConfig,
    DialogueController,
    GiveUp,
    Narrate,
    Poll,
    TriggerSpec,
)
from ..errors import ConfigError, InputError, QuestionError, StreamVLMError, TimestampError
from ..models.turns import ANSWER, FRAME, PROBE
from ..types import Frame
from .session import Preempted, StreamSession

__all__ = ["LiveWorker", "WorkerConfig", "WorkerEvent", "WorkerCounters"]

NARRATION_PROMPT = "In one short sentence, what changed in the video just now?"


@dataclass(frozen=True)
class WorkerConfig:
    dedup_threshold: float = 2.0  # mean |difference| of 32x32 grey thumbnails (0..255) below which a frame is skipped
    dedup_max_skip_s: float = 30.0  # read at least one frame this often even when nothing changes

    def __post_init__(self) -> None:
        if not self.dedup_threshold >= 0:
            raise ConfigError("dedup_threshold: must be >= 0 (0 disables skipping)")
        if not self.dedup_max_skip_s > 0:
            raise ConfigError("dedup_max_skip_s: must be > 0")


@dataclass(frozen=True)
class WorkerEvent:
    """Something for the client: ``kind`` is one of

    ``answer.started`` (``request_id``, ``trigger``), ``answer.delta`` (``request_id``, ``text``), ``answer.done`` (``request_id``, ``answer``, ``trigger``),
    ``acknowledged`` (``request_id``, ``condition``), ``alert`` (``watch_id``, ``condition``, ``t``,
    ``evidence_t``, ``source_id``), ``gave_up`` (``request_id``, ``question``, ``reason``),
    ``memory`` (``memory_event``), ``error`` (``code``, ``message``, ``request_id``, ``watch_id``),
    ``request.ended`` (``request_id``, ``status`` ``cancelled`` or ``failed``, ``code``, ``message``: a request
    that ended without an answer), ``fatal`` (``reason``: the model thread stops; :meth:`LiveWorker.events`
    ends right after).
    """

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FrameRead:
    """One frame read into the model: its stream time, how long it waited, and the model time it cost."""

    pts_s: float  # the stream time it was read at
    lag_s: float  # its arrival (submit) to the start of its read
    model_s: float  # seconds of model time: its vision encode plus its prefill (time spent serving others excluded)


#: How many recent reads :class:`WorkerCounters` keeps (older ones are counted, not kept: a stream of hours
#: must not grow the worker's memory).
RECENT_READS = 4096


@dataclass
class WorkerCounters:
    received: int = 0
    skipped: int = 0  # near-duplicates, never encoded
    dropped: int = 0  # replaced by a newer frame before the model was free, refused by the model, or discarded at stop
    ingested: int = 0
    recent: deque[FrameRead] = field(default_factory=lambda: deque(maxlen=RECENT_READS))  # the last reads, oldest first
    busy_s: float = 0.0  # seconds the model thread spent working
    paused: int = 0  # times a frame encode was suspended to serve control or answers first
    restarted: int = 0  # frame prefills abandoned for a message or an answer and run again after it
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_read(self, read: FrameRead) -> None:
        """Count one frame read and keep it among the recent ones (the model thread calls this)."""
        with self._lock:
            self.recent.append(read)
            self.ingested += 1

    def read_log(self, seen: int) -> tuple[list[FrameRead], int]:
        """The reads after the first ``seen`` ones (as many as are still kept, oldest first) and the count
        to pass as ``seen`` next time, taken together while the model thread may be adding reads.

        A caller that falls more than :data:`RECENT_READS` behind gets what is kept (the count of the rest
        is still in ``ingested``)."""
        with self._lock:
            total = self.ingested
            new = min(max(total - seen, 0), len(self.recent))
            reads = list(itertools.islice(reversed(self.recent), new))
        reads.reverse()
        return reads, total

    def reads_since(self, seen: int) -> list[FrameRead]:
        """The reads of :meth:`read_log` alone."""
        return self.read_log(seen)[0]

    @property
    def lag_s(self) -> list[float]:
        """Arrival-to-read seconds of the kept reads, oldest first."""
        return [r.lag_s for r in self.recent]

    @property
    def ingested_pts(self) -> list[float]:
        """Stream times of the kept reads, same order as :attr:`lag_s`."""
        return [r.pts_s for r in self.recent]


# Priority of each kind of job for a turn on the shared model (lower first).
_PRIORITY = {"control": ANSWER, "answer": ANSWER, "poll": PROBE, "frame": FRAME}


class _NoTurns:
    """Stands in for a model without a priority lock (a fake session in tests)."""

    @contextlib.contextmanager
    def priority(self, level: int, *, book: int | None = None) -> Iterator[None]:
        yield


class _Stopped(Exception):
    """Raised inside a frame read when the worker is stopping."""


def error_code(exc: BaseException) -> str:
    """The protocol error code for an exception raised by a step: the caller's mistake or the engine's fault."""
    if isinstance(exc, QuestionError):
        return "invalid_question"
    if isinstance(exc, TimestampError):
        return "invalid_time"
    if isinstance(exc, (InputError, ConfigError)):
        return "invalid_value"
    return "engine_fault"


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, StreamVLMError) else f"{type(exc).__name__}: {exc}"


class LiveWorker:
    """Drive a session live. Create, ``await start()``, feed frames and requests, read :meth:`events`, ``await stop()``."""

    def __init__(
        self,
        session: StreamSession,
        controller: ControllerConfig | None = None,
        config: WorkerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.config = config or WorkerConfig()
        self.controller = DialogueController(controller or ControllerConfig())
        self.counters = WorkerCounters()
        lock = getattr(getattr(session, "adapter", None), "lock", None)
        self._turns = lock if hasattr(lock, "priority") else _NoTurns()
        self._clock = clock
        self._cv = threading.Condition()
        self._control: deque[tuple[str, tuple]] = deque()
        self._answers: deque[AnswerNow | Narrate] = deque()
        self._polls: deque[Poll] = deque()
        self._frame: tuple[Frame, float, int] | None = None  # (frame, received at, oldest submit number it stands for)
        self._reading = False  # a frame has been taken for reading and is not committed yet
        self._reading_covers: int | None = None  # the submit number the frame being read stands for
        self._submitted = 0  # frames submitted (and not skipped) so far: each gets the next number
        self._wait_for: dict[str, int] = {}  # request id -> frames submitted before it, which its answer waits for
        self._max_tokens: dict[str, int] = {}  # request id -> its own answer length limit
        self._open: set[str] = set()  # requests asked and not ended yet
        self._last_source = "default"  # the source of the latest frame read (alerts name it in their evidence)
        self._last_thumb: np.ndarray | None = None
        self._last_read_t = -float("inf")
        self._cancel = threading.Event()
        self._running_id: str | None = None
        self._stopping = False
        self._busy = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue[WorkerEvent] | None = None
        self._ids = itertools.count(1)

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        self._thread = threading.Thread(target=self._run, name="streamvlm-model", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the model thread after the step it is in; pending work is discarded."""
        with self._cv:
            self._stopping = True
            self._cancel.set()
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def events(self) -> AsyncIterator[WorkerEvent]:
        """Every event, in order, until the worker stops."""
        assert self._events is not None, "start() first"
        while True:
            event = await self._events.get()
            if event.kind == "stopped":
                return
            yield event

    @property
    def idle(self) -> bool:
        """True when nothing is waiting or running."""
        with self._cv:
            return not (self._control or self._answers or self._polls or self._frame or self._busy)

    @property
    def pending(self) -> int:
        """Frames accepted but not yet read or dropped: one waiting, plus one being read."""
        with self._cv:
            return int(self._frame is not None) + int(self._reading)

    # ---- input (call from the event loop or any thread) ----------------------------------------------
    def submit_frame(self, frame: Frame) -> str:
        """Offer a frame. Returns ``skipped`` (near-duplicate), ``queued`` or ``replaced`` (an older waiting frame was dropped)."""
        thumb = cv2.resize(cv2.cvtColor(frame.image, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
        with self._cv:
            self.counters.received += 1
            if (
                self._frame is None  # a near-duplicate of a frame still waiting replaces it: the same view, fresher
                and self._last_thumb is not None
                and frame.pts_s - self._last_read_t < self.config.dedup_max_skip_s
                and float(np.abs(thumb - self._last_thumb).mean()) < self.config.dedup_threshold
            ):
                self.counters.skipped += 1
                self._control_event("changed", frame.pts_s, False)
                return "skipped"
            self._last_thumb, self._last_read_t = thumb, frame.pts_s
            self._submitted += 1
            replaced = self._frame is not None
            covers = self._submitted
            if self._frame is not None:
                self.counters.dropped += 1
                covers = self._frame[2]  # questions that waited for the replaced frame wait for this one
            self._frame = (frame, self._clock(), covers)
            self._cv.notify()
        return "replaced" if replaced else "queued"

    def ask(self, text: str, t: float | None = None, request_id: str | None = None, *, max_new_tokens: int | None = None) -> str:
        """Send a user message (a question, or "tell me when ..."); returns its request id.

        The answer comes from every frame submitted before this call. ``max_new_tokens`` caps this
        answer only. The request ends exactly once (see the module docstring).
        """
        request_id = request_id or f"req-{next(self._ids)}"
        with self._cv:
            self._open.add(request_id)
            self._wait_for[request_id] = self._submitted
            if max_new_tokens is not None:
                self._max_tokens[request_id] = int(max_new_tokens)
            self._control.append(("message", (request_id, text, t)))
            self._cv.notify()
        return request_id

    def watch(self, watch_id: str, condition: str, t: float | None = None, spec: TriggerSpec | None = None) -> None:
        self._control_event("watch", watch_id, condition, t, spec)

    def unwatch(self, watch_id: str, t: float | None = None) -> None:
        self._control_event("unwatch", watch_id, t)

    def cancel(self, request_id: str | None = None) -> None:
        """Stop one request (``request_id``), or the answer being generated and every queued one (None).

        A request not started yet ends ``request.ended`` cancelled; a running one ends ``answer.done``
        with finish reason ``cancelled``. Deferred questions and watches stay active unless named.
        """
        if request_id is None or request_id == self._running_id:
            self._cancel.set()
        self._control_event("cancel", request_id)

    def end_stream(self) -> None:
        self._control_event("end")

    def _control_event(self, kind: str, *args: Any) -> None:
        with self._cv:
            self._control.append((kind, args))
            self._cv.notify()

    # ---- the model thread ----------------------------------------------------------------------------
    def _emit(self, kind: str, **data: Any) -> None:
        assert self._loop is not None and self._events is not None
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, WorkerEvent(kind, data))
        except RuntimeError:  # the event loop is closed: nobody is left to tell
            pass

    def _end(self, request_id: str, status: str, code: str | None = None, message: str = "") -> None:
        """End an open request without an answer (once; a request already ended is left alone)."""
        if request_id in self._open:
            self._open.discard(request_id)
            self._forget(request_id)
            self._emit("request.ended", request_id=request_id, status=status, code=code, message=message)

    def _forget(self, request_id: str) -> None:
        self._open.discard(request_id)
        self._wait_for.pop(request_id, None)
        self._max_tokens.pop(request_id, None)

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._control or self._answers or self._polls or self._frame):
                        self._cv.wait()
                    if self._stopping:
                        return
                    ready = self._ready_answer()
                    if self._control:
                        job: tuple[str, Any] = ("control", self._control.popleft())
                    elif ready is not None:
                        self._answers.remove(ready)
                        job = ("answer", ready)
                    elif self._polls:
                        job = ("poll", self._polls.popleft())
                    else:  # answers wait only while a frame they need is waiting, so there is one
                        job, self._frame = ("frame", self._frame), None
                        self._reading, self._reading_covers = True, job[1][2]
                    self._busy = True
                started = time.perf_counter()
                try:
                    self._step(job)
                finally:
                    self._busy = False
                self.counters.busy_s += time.perf_counter() - started
                if self._broken():
                    return
        except _Stopped:
            return
        except BaseException as exc:  # a fault of the worker itself: say so, never die quietly
            self._emit("fatal", reason=f"the model thread failed: {_describe(exc)}")
        finally:
            for request_id in sorted(self._open):
                self._end(request_id, "failed", "session_closed", "the session's model thread stopped")
            self._emit("stopped")

    def _step(self, job: tuple[str, Any]) -> None:
        """Run one job; an exception ends what the job was for (a request, a watch, a frame), not the thread.

        The job waits for the shared model with its priority (answers and control before probes before
        frames, across every session on the model; see models/turns.py). A frame read that a waiting
        answer needs (the answer was asked after the frame arrived) inherits the answer's priority.
        """
        kind, item = job
        level = _PRIORITY[kind]
        if kind == "frame" and self._answers:  # the answers wait only for frames in flight: this one
            level = ANSWER
        try:
            with self._turns.priority(level, book=_PRIORITY[kind]):
                getattr(self, f"_do_{kind}")(item)
        except _Stopped:
            raise
        except Exception as exc:
            code, message = error_code(exc), _describe(exc)
            if kind == "control" and item[0] == "message":
                self._end(item[1][0], "failed", code, message)
            elif kind == "answer":
                self._end(item.request_id, "failed", code, message)
            else:
                watch_id = item[1][0] if kind == "control" and item[0] in ("watch", "unwatch") else None
                self._emit("error", code=code, message=f"{kind} step failed: {message}", request_id=None, watch_id=watch_id)

    def _broken(self) -> bool:
        """True (after a ``fatal`` event) when the engine says the session can no longer be used."""
        reason = getattr(self.session, "broken", None)
        if reason:
            self._emit("fatal", reason=f"the session is unusable: {reason}")
            return True
        return False

    def _ready_answer(self) -> AnswerNow | Narrate | None:
        """The first waiting answer whose frames are all read (call with the lock held)."""
        for action in self._answers:
            need = self._wait_for.get(action.request_id)
            if need is None or not (
                (self._frame is not None and self._frame[2] <= need)
                or (self._reading_covers is not None and self._reading_covers <= need)
            ):
                return action
        return None

    def _now(self) -> float:
        return max(self.session.last_t, self.controller.last_t or 0.0, 0.0)

    def _act(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, (AnswerNow, Narrate)):
                self._answers.append(action)
            elif isinstance(action, Poll):
                self._polls.append(action)
            elif isinstance(action, CancelGeneration):
                if self._running_id == action.request_id:
                    self._cancel.set()
                else:  # superseded before it started (interrupt): it ends here, never half-started
                    for waiting in [a for a in self._answers if a.request_id == action.request_id]:
                        self._answers.remove(waiting)
                        self._end(waiting.request_id, "cancelled", None, "replaced by a newer question")
            elif isinstance(action, Alert):
                self._emit("alert", watch_id=action.watch_id, condition=action.condition, t=action.t,
                           evidence_t=action.evidence_t, source_id=self._last_source)
            elif isinstance(action, Acknowledge):
                self._emit("acknowledged", request_id=action.request_id, condition=action.condition)
            elif isinstance(action, GiveUp):
                self._forget(action.request_id)
                self._emit("gave_up", request_id=action.request_id, question=action.question, reason=action.reason)

    def _do_control(self, item: tuple[str, tuple]) -> None:
        kind, args = item
        c = self.controller
        t = self._now()
        if kind == "message":
            request_id, text, at = args
            self._act(c.user_message(request_id, text, max(t, at or 0.0)))
        elif kind == "watch":
            watch_id, condition, at, spec = args
            self._act(c.add_watch(watch_id, condition, max(t, at or 0.0), spec))
        elif kind == "unwatch":
            self._act(c.remove_watch(args[0], max(t, args[1] or 0.0)))
        elif kind == "cancel":
            self._do_cancel(args[0], t)
        elif kind == "changed":  # a skipped duplicate: nothing changed, and the clock does not move for it
            self._act(c.frame_changed(t, args[1]))
        elif kind == "end":
            self._act(c.stream_ended(t))

    def _do_cancel(self, request_id: str | None, t: float) -> None:
        c = self.controller
        if request_id is None:
            dropped = [a.request_id for a in self._answers] + [a.request_id for a in c.queued]
            self._answers.clear()
            self._act(c.cancel(t))
            for rid in dropped:
                self._end(rid, "cancelled", None, "cancelled by the client")
            return
        waiting = [a for a in self._answers if a.request_id == request_id]
        if waiting:  # dispatched but not started: the controller counts it as generating until told
            self._answers.remove(waiting[0])
            self._end(request_id, "cancelled", None, "cancelled by the client")
            self._act(c.generation_finished(request_id, t))
            return
        if request_id not in self._open:
            return  # it ended meanwhile; its end event is already on its way
        self._act(c.withdraw(request_id, t))
        if request_id != self._running_id:
            self._end(request_id, "cancelled", None, "cancelled by the client")

    def _do_frame(self, item: tuple[Frame, float, int]) -> None:
        frame, received, _ = item
        lag = self._clock() - received
        committed = False
        try:
            # A skipped near-duplicate or a question may have moved the stream clock past this frame while
            # it waited; it is read at the current time rather than refused, so time never runs backwards.
            encoded = self.session.encode_frame(frame, max(frame.pts_s, self._now()), pause=self._pause)
            runner = getattr(self.session, "runner", None)
            model_s = float(getattr(runner, "last_vision_s", 0.0) or 0.0)
            while True:
                t = max(encoded.pts_s, self._now())  # an answer served meanwhile may have moved the clock on
                try:
                    held0 = getattr(runner, "forward_s", 0.0)
                    self.session.commit_frame(encoded, t, preempt=self._answer_waiting)
                    model_s += getattr(runner, "forward_s", 0.0) - held0  # its prefill's model time, turns waited for excluded
                    break
                except Preempted:
                    self.counters.restarted += 1
                    self._serve_urgent()
            committed = True
        except _Stopped:
            return
        finally:
            with self._cv:  # one step, so the counters always add up
                self._reading, self._reading_covers = False, None
                if committed:
                    self.counters.add_read(FrameRead(t, lag, model_s))
                else:  # refused by the model (an error event follows) or discarded at stop
                    self.counters.dropped += 1
        self._last_source = frame.source_id
        for event in self.session.drain_events():
            self._emit("memory", memory_event=event)
        self._act(self.controller.frame_changed(t, True))
        self._act(self.controller.frame(t, frame.source_id))

    # ---- pre-emption of a frame read -------------------------------------------------------------------
    def _pause(self) -> None:
        """Called between the vision tower's layers while a frame is encoded: serve what should not wait."""
        with self._cv:
            urgent = bool(self._control) or self._stopping or self._ready_answer() is not None
        if urgent:
            self.counters.paused += 1
            self._serve_urgent()

    def _answer_waiting(self) -> bool:
        """Asked between the language-model layers of a frame's prefill: abandon it for this?

        Only for an answer (or a question) asked before the frame in progress arrived: one asked after
        it waits for it anyway.
        """
        with self._cv:
            if self._stopping or self._ready_answer() is not None:
                return True
            covers = self._reading_covers if self._reading_covers is not None else self._submitted
            return any(kind == "message" and self._wait_for.get(args[0], 0) < covers for kind, args in self._control)

    def _serve_urgent(self) -> None:
        """Run all waiting control and ready answers now (a frame read in progress is suspended meanwhile)."""
        while True:
            with self._cv:
                if self._stopping:
                    raise _Stopped
                ready = self._ready_answer()
                if self._control:
                    job: tuple[str, Any] = ("control", self._control.popleft())
                elif ready is not None:
                    self._answers.remove(ready)
                    job = ("answer", ready)
                else:
                    return
            self._step(job)
            if getattr(self.session, "broken", None):
                raise _Stopped  # the frame read cannot go on; the main loop reports it

    def _do_poll(self, poll: Poll) -> None:
        scores = self.session.probe([p.prompt for p in poll.probes])
        self._act(self.controller.scores(self._now(), {p.probe_id: s for p, s in zip(poll.probes, scores)}))

    def _do_answer(self, action: AnswerNow | Narrate) -> None:
        question = NARRATION_PROMPT if isinstance(action, Narrate) else action.question
        trigger = "commentary" if isinstance(action, Narrate) else action.trigger
        request_id = action.request_id
        self._open.add(request_id)  # narrations end exactly once too
        self._cancel.clear()
        self._running_id = request_id
        sampling = self.session.config.sampling
        if request_id in self._max_tokens:
            sampling = replace(sampling, max_new_tokens=self._max_tokens[request_id])
        try:
            self._act(self.controller.generation_started(request_id, self._now()))
            self._emit("answer.started", request_id=request_id, trigger=trigger)
            # A deferred answer says when its thing appeared: one time, whatever the question's wording, within
            # the evidence its rule fired on.
            deferred = trigger == "deferred"
            stream = self.session.ask_stream(question, self._now(), sampling=sampling, answer_format="time" if deferred else "auto",
                                             time_range=action.evidence if deferred else None)
            try:
                for delta in stream:
                    self._emit("answer.delta", request_id=request_id, text=delta)
                    if self._control:  # a new message may interrupt this answer
                        with self._cv:
                            pending = list(self._control)
                            self._control.clear()
                        for item in pending:
                            self._step(("control", item))
                    if self._cancel.is_set():
                        break
            finally:
                stream.close()
        except Exception as exc:
            self._end(request_id, "failed", error_code(exc), _describe(exc))
            self._act(self.controller.generation_finished(request_id, self._now()))
            return
        finally:
            self._running_id = None
        self._forget(request_id)
        self._emit("answer.done", request_id=request_id, answer=stream.answer, trigger=trigger)
        self._act(self.controller.generation_finished(request_id, self._now()))
