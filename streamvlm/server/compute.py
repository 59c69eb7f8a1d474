"""Admission by compute on a live server: the one place that turns model timings into per-session read rates.

:class:`ComputeGovernor` sits between the session host (whatever transport) and the pure
:class:`~streamvlm.engine.admission.ComputeAdmission`. The host tells it what happened and carries out
what it returns; the class starts no task, reads no clock and touches no socket::

    governor = ComputeGovernor.from_config(config, metrics)
    greeting += governor.on_session_open(session.core, now)  # a new session (not a resume: same core)
    governor.on_frame_read(session.id, read.model_s)         # each frame read (worker FrameRead.model_s)
    governor.on_frames_replaced(session.id, n)               # frames the worker dropped (latest wins)
    for session_id, outs in governor.tick(now).items():      # every ``interval_s`` on a host-wide loop
        execute(session_id, outs)                             # input_frame.rate events to send
    governor.on_session_close(session.id)                    # the session ended for good

or, with no calls spread over the host, one task on its loop: ``asyncio.create_task(govern(host, governor))``
(:func:`govern` feeds the workers' reads, ticks with the host's sessions and executes the events).

Each tick also reads how long answers and probes held the model over the last ``window_s``
(``model_time``, the model's :meth:`~streamvlm.models.turns.TurnLock.held_seconds`) and plans frames
for what they leave (:attr:`ComputeAdmission.frame_share`), so frames and answers together never ask
for more than the model has. Each tick measures every open session's offered frame rate (frames that
reached its core, counted by
``RealtimeSession.frames_offered``, over the last ``window_s``), feeds the admission the tick's typical
model time per read (sessions take turns per forward pass, so reads overlap in wall time: the overlap
is divided out; and when workers fall behind, the frames actually read per second bound it), asks for
a plan, applies the changed caps with ``RealtimeSession.set_read_rate`` and updates the metrics
(sessions limited, read capacity). Frames above a cap come out of the core as ``FrameDropped("compute")`` commands, which the
host counts with ``metrics.frame_dropped("compute")``. With ``engine="lock"`` (the previous mode) the
governor is disabled: it plans nothing and caps nobody.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import ServerConfig
from ..engine.admission import ComputeAdmission, ReadPlan
from ..protocol.session import Out, RealtimeSession
from .metrics import ServerMetrics

__all__ = ["ComputeGovernor", "govern"]


@dataclass
class _Tracked:
    core: RealtimeSession
    # (time, frames_offered) samples of the last window, oldest first.
    samples: deque[tuple[float, int]] = field(default_factory=deque)


class ComputeGovernor:
    """Caps each session's frame read rate evenly when the sessions offer more than the model reads.

    See the module docstring for the calls a host makes. ``interval_s`` is how often the host should
    call :meth:`tick`; ``window_s`` is how far back offered rates are measured; ``smoothing`` is the
    weight of each tick's median read time in the average of seconds per frame.
    """

    def __init__(self, frame_time_share: float = 0.8, *, enabled: bool = True, metrics: ServerMetrics | None = None,
                 interval_s: float = 1.0, window_s: float = 5.0, hysteresis: float = 0.15, smoothing: float = 0.3,
                 floor_fade: float = 0.03, model_time: Callable[[], Sequence[float]] | None = None) -> None:
        self.admission = ComputeAdmission(frame_time_share, hysteresis=hysteresis, smoothing=smoothing)
        # Seconds the model was held so far by kind of work (ANSWER, PROBE, FRAME), e.g. TurnLock.held_seconds:
        # what answers and probes use is left to them, frames get the rest. None: a fixed frame share.
        self.model_time = model_time
        self._others_seen: float | None = None  # answer + probe seconds held so far, at the last tick
        self._reads: list[float] = []  # model seconds of the reads since the last tick
        self._last_tick: float | None = None
        # per tick: (seconds, model seconds read, longest read, reads, seconds answers and probes held the model)
        self._history: deque[tuple[float, float, float, int, float]] = deque()
        self._backlog = 0  # frames replaced while waiting since the last tick
        self._floor_s = 0.0  # the time per read the throughput showed when workers fell behind (fading)
        # Share by which that floor fades each tick nobody falls behind.
        self.floor_fade = float(floor_fade)
        # Frames replaced in a tick, per frame read, above which the workers count as falling behind
        # (a few are ordinary: frames that arrive together).
        self.backlog_share = 0.25
        self.enabled = enabled
        self.metrics = metrics
        # Seconds between two ticks (the host's loop sleeps this long).
        self.interval_s = float(interval_s)
        # Seconds of history an offered rate is measured over.
        self.window_s = float(window_s)
        self._sessions: dict[str, _Tracked] = {}
        self.last_plan: ReadPlan | None = None
        self.fault: str | None = None  # why the governor stopped (see disable), None while it works

    @classmethod
    def from_config(cls, config: ServerConfig, metrics: ServerMetrics | None = None,
                    model_time: Callable[[], Sequence[float]] | None = None) -> ComputeGovernor:
        """The governor a server with this config runs: enabled for ``engine="scheduler"``, not for ``lock``."""
        return cls(config.frame_time_share, enabled=config.engine == "scheduler", metrics=metrics, model_time=model_time)

    # ---- what the host reports ------------------------------------------------------------------------
    def on_session_open(self, core: RealtimeSession, now: float) -> list[Out]:
        """A new session: its offered rate is measured from ``now``. While other sessions are capped (the
        model is saturated) it starts capped at an even split too (:meth:`ComputeAdmission.admit`);
        returns the event that tells it (send it with the session's greeting), or []."""
        tracked = _Tracked(core)
        tracked.samples.append((now, core.frames_offered))
        self._sessions[core.id] = tracked
        if not self.enabled:
            return []
        cap = self.admission.admit(core.id, len(self._sessions))
        return core.set_read_rate(cap, "compute") if cap is not None else []

    def on_session_close(self, session_id: str) -> None:
        """The session ended for good: its share goes to the others at the next tick."""
        self._sessions.pop(session_id, None)
        self.admission.forget(session_id)

    def on_frame_read(self, session_id: str, model_seconds: float) -> None:
        """A frame of this session was read in ``model_seconds`` of model time (vision + prefill; a
        batched read's share). The median of each tick's reads feeds the average the capacity is
        planned from, so the average forgets at the same pace in time whatever the frame rate."""
        if isinstance(model_seconds, (int, float)) and not isinstance(model_seconds, bool) and model_seconds > 0:
            self._reads.append(float(model_seconds))

    def on_frames_read(self, session_id: str, model_seconds: Iterable[float]) -> None:
        """:meth:`on_frame_read` for each of several reads (e.g. ``r.model_s for r in counters.reads_since(seen)``)."""
        for seconds in model_seconds:
            self.on_frame_read(session_id, seconds)

    def _feed_reads(self, now: float) -> None:
        """This tick's typical read time into the admission's average.

        The median of the tick's reads (one read slowed by a busy machine does not count), divided by
        how much reads overlapped over the last ``window_s``: sessions take turns on the model per
        forward pass, so one read's wall time also holds other sessions' forwards. Reads that ran one
        after another add up to at most the time that passed plus the one that began before the window
        (hence the longest is left out); more than that is overlap, and it is divided out.

        A read costs more than its model time (decoding, preprocessing, the threads' turns): when
        workers fell behind (frames replaced while waiting, :meth:`on_frames_replaced`, more than
        ``backlog_share`` per frame read in the tick), the frames
        actually read per second over the window bound the capacity, whatever the model time says.
        That bound is kept as a floor under the time per read and fades by ``floor_fade`` a tick once
        nobody falls behind, so the caps creep back up rather than jump."""
        reads, self._reads = sorted(self._reads), []
        backlog, self._backlog = self._backlog, 0
        others = self._others_held()
        if self._last_tick is not None and now > self._last_tick:
            self._history.append((now - self._last_tick, sum(reads), max(reads, default=0.0), len(reads), others))
            while len(self._history) > 1 and sum(h[0] for h in self._history) - self._history[0][0] >= self.window_s:
                self._history.popleft()
        self._last_tick = now
        if not self._history:
            return  # no time measured yet to tell overlap from a slow model
        elapsed = sum(h[0] for h in self._history)
        if self.model_time is not None:  # answers and probes keep what they used: frames are planned for the rest
            self.admission.others_used(min(1.0, sum(h[4] for h in self._history) / elapsed))
        count = sum(h[3] for h in self._history)
        if count and backlog > self.backlog_share * len(reads):
            self._floor_s = max(self._floor_s, elapsed / count)
        else:
            self._floor_s *= 1.0 - self.floor_fade
        if not reads:
            return
        busy = sum(h[1] for h in self._history) - max(h[2] for h in self._history)
        overlap = max(1.0, busy / elapsed) if elapsed > 0 else 1.0
        self.admission.frame_read(max(reads[len(reads) // 2] / overlap, self._floor_s))

    def _others_held(self) -> float:
        """Seconds answers and probes held the model since the last tick (0 without ``model_time``)."""
        if self.model_time is None:
            return 0.0
        held = self.model_time()
        others = float(held[0]) + float(held[1])
        since, self._others_seen = (0.0 if self._others_seen is None else others - self._others_seen), others
        return max(0.0, since)

    def on_frames_replaced(self, session_id: str, count: int) -> None:
        """``count`` frames of this session were replaced by newer ones while they waited for the model
        (the worker's latest-wins drop): the reads fell behind what the session was allowed."""
        if count > 0:
            self._backlog += int(count)

    def disable(self, reason: str) -> dict[str, list[Out]]:
        """Stop governing (a fault): every cap is lifted and :attr:`fault` says why; returns the events
        that tell the capped sessions, as :meth:`tick` does."""
        self.enabled, self.fault = False, reason
        out: dict[str, list[Out]] = {}
        for sid, tracked in self._sessions.items():
            events = tracked.core.set_read_rate(None, "compute")
            if events:
                out[sid] = events
            self.admission.forget(sid)
        if self.metrics is not None:
            self.metrics.read_admission(0, self.admission.capacity_fps)
        return out

    # ---- the plan --------------------------------------------------------------------------------------
    def offered_fps(self, session_id: str, now: float) -> float:
        """Frames per second this session offered over the last ``window_s`` up to ``now`` (0 for an unknown session)."""
        tracked = self._sessions.get(session_id)
        return 0.0 if tracked is None else self._rate(tracked, now, tracked.core.frames_offered)

    def _rate(self, tracked: _Tracked, now: float, count: int) -> float:
        t0, n0 = tracked.samples[0]
        span = max(now - t0, self.interval_s)  # a session younger than one tick is measured over one tick
        return max(0, count - n0) / span

    def _measure(self, tracked: _Tracked, now: float) -> float:
        """The offered rate at ``now``, keeping this tick's sample (and one at or before the window's start)."""
        count = tracked.core.frames_offered
        rate = self._rate(tracked, now, count)
        samples = tracked.samples
        samples.append((now, count))
        while len(samples) > 2 and samples[1][0] <= now - self.window_s:
            samples.popleft()
        return rate

    def tick(self, now: float, sessions: Mapping[str, RealtimeSession] | None = None) -> dict[str, list[Out]]:
        """Plan again from the offered rates at ``now``: ``{session_id: events}`` for the sessions whose
        cap changed (send each session its events: one ``input_frame.rate``; [] while its client is
        away, which hears on its return). Ended sessions (core closed) are dropped from the books.

        ``sessions`` (optional): every session the host holds now, by id; the governor then tracks
        exactly these (new ones from now, missing ones forgotten), so the host need not report opens
        and closes itself."""
        out: dict[str, list[Out]] = {}
        if sessions is not None:
            for sid in [sid for sid in self._sessions if sid not in sessions]:
                self.on_session_close(sid)
            for sid, state in sessions.items():
                if sid not in self._sessions:
                    events = self.on_session_open(state, now)
                    if events:
                        out[sid] = events
        for sid in [sid for sid, t in self._sessions.items() if t.core.closed is not None]:
            self.on_session_close(sid)
        self._feed_reads(now)
        if not self.enabled:
            return out
        offered = {sid: self._measure(tracked, now) for sid, tracked in self._sessions.items()}
        plan = self.admission.plan(offered)
        self.last_plan = plan
        if self.metrics is not None:
            self.metrics.read_admission(plan.limited, plan.capacity_fps)
        for sid, cap in plan.changes.items():
            events = self._sessions[sid].core.set_read_rate(cap, "compute")
            if events:
                out[sid] = out.get(sid, []) + events
        return out


async def govern(host: Any, governor: ComputeGovernor, clock: Callable[[], float] = time.monotonic) -> None:
    """Run ``governor`` for a session host until cancelled (start it with the host's loops).

    Every ``governor.interval_s``: the frames each session's worker read since the last round go to
    :meth:`ComputeGovernor.on_frame_read` (``FrameRead.model_s`` from ``counters.read_log``) and the
    frames it dropped to :meth:`ComputeGovernor.on_frames_replaced` (``counters.dropped``), then
    :meth:`ComputeGovernor.tick` with the host's sessions, and the events it returns go through
    ``host._execute`` (so they are counted and sent like any other). ``host`` is a
    :class:`~streamvlm.server.driver.SessionHost` (its ``sessions``: id -> hosted session with ``core`` and
    ``worker``). The host's ``_execute`` counts ``FrameDropped`` commands with ``metrics.frame_dropped``.
    A fault in a round is not silent: every cap is lifted (a broken governor never throttles anyone),
    the governor is disabled with :attr:`ComputeGovernor.fault` naming the exception, and the exception
    ends this task (the host sees it in ``task.exception()``).
    """
    seen: dict[str, tuple[Any, int, int]] = {}  # session id -> (its worker, reads fed, frames dropped seen)
    while True:
        await asyncio.sleep(governor.interval_s)
        hosted = dict(host.sessions)
        for sid in [sid for sid in seen if sid not in hosted]:
            del seen[sid]
        for sid, session in hosted.items():
            worker = getattr(session, "worker", None)
            if worker is None:
                continue
            fed, dropped = seen[sid][1:] if sid in seen and seen[sid][0] is worker else (0, 0)  # a new worker counts from 0
            counters = worker.counters
            reads, fed = counters.read_log(fed)
            governor.on_frames_read(sid, (read.model_s for read in reads))
            dropped_now = counters.dropped
            governor.on_frames_replaced(sid, dropped_now - dropped)
            seen[sid] = (worker, fed, dropped_now)
        try:
            changes = governor.tick(clock(), {sid: s.core for sid, s in hosted.items()})
        except Exception as exc:
            changes = governor.disable(f"{type(exc).__name__}: {exc}")
            for sid, outs in changes.items():
                if sid in host.sessions:
                    await host._execute(host.sessions[sid], outs)
            raise
        for sid, outs in changes.items():
            session = host.sessions.get(sid)
            if session is not None:
                await host._execute(session, outs)
