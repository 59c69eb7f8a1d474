"""Everything a realtime transport does that does not depend on the transport: the session host.

:class:`SessionHost` drives the two Sans-I/O cores for one loaded model and many connections: each
connection gets a :class:`~streamvlm.protocol.Connection` (bytes to validated client events, errors,
framing) and each session a :class:`~streamvlm.protocol.session.RealtimeSession` (what those events
mean); the host moves messages between a socket, the cores and the session's
:class:`~streamvlm.engine.worker.LiveWorker` (the model thread), and carries out the commands the
core returns. All sessions share one loaded model (its one owner, the adapter lock, lets them take turns).

What the host decides: admission (live sessions, memory; parked sessions never block a live one), a
bounded outbox per connection (memory and stats updates are dropped first; a client that stays too
slow is closed with ``slow_consumer``), resumption (``?resume=<handle>``; a second connection with a
live session's handle takes it over), ending sessions with a reason, and, with a
:class:`~streamvlm.server.handoff.Handoff`, snapshots of sessions to shared storage so that a resume
lands on any replica (see :mod:`.handoff`).

A transport (:mod:`.app` for websockets, :mod:`.asgi` for ASGI servers and Ray Serve) answers HTTP
itself, accepts the WebSocket, wraps it in a :class:`Socket` and awaits :meth:`SessionHost.handle`; it
calls :meth:`SessionHost.start_loops` on its event loop before the first connection and
:meth:`SessionHost.close` when it stops. The host knows nothing about HTTP, handshakes or ports.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import deque
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from .. import protocol as p
from ..config import ServerConfig
from ..engine.session import StreamSession
from ..engine.worker import LiveWorker
from ..errors import StreamVLMError
from ..models.base import ModelAdapter
from ..protocol import session as core
from ..types import Frame
from .compute import ComputeGovernor, govern
from .eventlog import EventLog
from .metrics import ServerMetrics

__all__ = ["SessionHost", "Socket", "SocketClosed", "OUTBOX_SOFT", "OUTBOX_HARD"]

# Outbox of one connection: past SOFT queued events, memory and stats updates are dropped; past HARD
# the client is too slow to serve and its connection is closed (the session stays resumable).
OUTBOX_SOFT = 64
OUTBOX_HARD = 1024


def _report_governor_end(task: asyncio.Task) -> None:
    """A governor that stopped on a fault has lifted every cap; say so where the operator looks."""
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        print(f"streamvlm: admission by compute stopped, read rates are no longer capped: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)


class SocketClosed(Exception):
    """Raised by a :class:`Socket` when the connection is closed (by either side); the host then parks the session."""


class Socket(Protocol):
    """One accepted WebSocket as the host sees it; each transport wraps its own connection in this.

    ``path`` is the request target with its query (``/v1/realtime?resume=...``). ``recv`` returns the
    next message (``str`` for text, ``bytes`` for binary) and raises :class:`SocketClosed` once the
    connection is gone; ``send`` writes one text message (raises :class:`SocketClosed` likewise);
    ``close`` closes with a WebSocket close code and reason and never raises for a closed socket.
    """

    path: str

    async def recv(self) -> str | bytes: ...

    async def send(self, text: str) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class Outbox:
    """The events waiting to be written to one connection, bounded as described above."""

    def __init__(self) -> None:
        self.items: deque[dict] = deque()
        self.ready = asyncio.Event()
        self.overflowed = False
        self.dropped = 0
        self.closing: tuple[int, str] | None = None  # close the connection with this once the rest is written

    def close_after(self, code: int, reason: str) -> None:
        self.closing = (code, reason)
        self.ready.set()

    def put(self, event: dict) -> None:
        if len(self.items) >= OUTBOX_SOFT and event["type"] in core.DROPPABLE_EVENTS:
            self.dropped += 1
            return
        if len(self.items) >= OUTBOX_HARD:
            self.overflowed = True
        self.items.append(event)
        self.ready.set()


class HostedSession:
    """One realtime session on this host: its core, its model thread, its connection while it has one."""

    def __init__(self, host: SessionHost, state: core.RealtimeSession) -> None:
        self.host = host
        self.core = state
        self.worker: LiveWorker | None = None
        self.ws: Socket | None = None
        self.outbox = Outbox()
        self.detached_at: float | None = None
        self.opened_at = time.monotonic()
        self.pump: asyncio.Task | None = None
        self.warned = False  # a go_away was sent
        self.peer: Any = None  # the WebRTC peer connection, if the client sends video that way
        self.frames_seen = 0  # worker frames already reported to the metrics
        self.dropped_seen = 0
        self.watch_specs: dict[str, core.Watch] = {}  # the watches as created, to re-create them after a move
        self.snapshot_key: str | None = None  # where its latest snapshot lies in the shared storage, if any

    @property
    def id(self) -> str:
        return self.core.id

    def send(self, event: dict) -> None:
        if self.ws is not None:
            self.outbox.put(event)

    async def stop_worker(self) -> None:
        if self.peer is not None:
            await self.peer.close()
            self.peer = None
        if self.worker is not None:
            await self.worker.stop()
            if self.pump is not None:
                await self.pump
            self.host._sync_frames(self)
            self.worker.session.close()
            self.worker = None


class SessionHost:
    """Serve one loaded model to many realtime sessions over any transport.

    ``start_loops()`` on the transport's event loop, ``await handle(socket)`` per accepted WebSocket,
    ``await close()`` to end. ``handoff`` (optional) snapshots sessions to shared storage so a resume
    lands on any replica that shares it.
    """

    def __init__(self, adapter: ModelAdapter, config: ServerConfig | None = None, *, limits: p.Limits | None = None,
                 handoff: Any = None) -> None:
        self.adapter = adapter
        self.config = config or ServerConfig()
        self.limits = limits or p.Limits()
        self.metrics = ServerMetrics()
        # One engine for every session: frames of sessions waiting together share a vision forward, their
        # answers' next tokens share a language-model forward, and
        # admission by compute caps read rates evenly when the offered frames exceed what the model reads
        # ("lock": the previous mode, one frame per forward and no caps).
        adapter.vision_batching = adapter.decode_batching = self.config.engine == "scheduler"
        self.governor = ComputeGovernor.from_config(self.config, self.metrics, model_time=adapter.lock.held_seconds)
        self.metrics.track_live(
            live=lambda: sum(s.ws is not None for s in self.sessions.values()),
            parked=lambda: sum(s.ws is None for s in self.sessions.values()),
            working_tokens=self._working_tokens,
        )
        self.sessions: dict[str, HostedSession] = {}
        self.log = EventLog(self.config.event_db) if self.config.event_db else None
        self.policy = core.SessionPolicy(self.config.session_budget_tokens, self.config.max_session_budget_tokens,
                                         self.config.max_watches, self.limits.max_frames_per_s,
                                         self.config.session_store_ram_bytes, self.config.session_store_disk_bytes,
                                         self.config.max_open_responses)
        self.handoff = handoff
        if handoff is not None:
            handoff.attach(self)
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    def _working_tokens(self) -> int:
        total = 0
        for session in list(self.sessions.values()):
            try:  # read while the model threads work: a figure for the gauge, not a promise
                total += int(session.worker.session.stats()["working_tokens"]) if session.worker is not None else 0
            except Exception:
                pass
        return total

    # ---- lifecycle -------------------------------------------------------------------------------
    def start_loops(self) -> None:
        """Start the host's own loops (the reaper; the snapshot loop with a handoff) on the running event
        loop. Idempotent; a transport calls it before its first connection."""
        if self._tasks:
            return
        self._tasks.append(asyncio.create_task(self._reap()))
        if self.governor.enabled:
            task = asyncio.create_task(govern(self, self.governor))
            task.add_done_callback(_report_governor_end)
            self._tasks.append(task)
        if self.handoff is not None:
            self._tasks.append(asyncio.create_task(self.handoff.run()))

    async def close(self) -> None:
        """Tell every client (``session.go_away``, then ``session_closed``), stop every worker.

        With a handoff, live sessions are snapshotted first and their clients told to resume (close
        1001, no ``session_closed``): another replica takes them up. The transport closes its port after."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self.handoff is not None:
            await self.handoff.drain()  # snapshots of parked sessions still being written
        for session in list(self.sessions.values()):
            session.send(p.session_go_away(0))
            if self.handoff is not None and await self.handoff.save(session):
                await self._release(session, "the server is stopping; resume with your handle", "moved", close_code=1001)
            else:
                await self._end(session, "the server is stopping", "server_stopping", close_code=1001)
        await asyncio.sleep(0.05)  # let the writers flush those events
        if self.log is not None:
            self.log.close()

    # ---- admission ------------------------------------------------------------------------------------
    def _budget_in_use(self) -> int:
        return sum(s.core.budget_tokens for s in self.sessions.values())

    def _budget_check(self, extra: int) -> str | None:
        if self._budget_in_use() + extra <= self.config.global_budget_tokens:
            return None
        return f"the server's working memory is in use ({self._budget_in_use()} of {self.config.global_budget_tokens} tokens)"

    def can_admit(self) -> bool:
        """Room for one more live session, counting parked sessions as evictable."""
        live = [s for s in self.sessions.values() if s.ws is not None]
        budget = sum(s.core.budget_tokens for s in live) + self.config.session_budget_tokens
        return len(live) < self.config.max_sessions and budget <= self.config.global_budget_tokens

    async def _make_room(self) -> None:
        """End the oldest parked sessions until a new live one fits (parked never block live)."""
        parked = sorted((s for s in self.sessions.values() if s.ws is None), key=lambda s: s.detached_at or 0.0)
        while parked and (len(self.sessions) >= self.config.max_sessions + self.config.max_parked_sessions
                          or self._budget_in_use() + self.config.session_budget_tokens > self.config.global_budget_tokens):
            await self._end(parked.pop(0), "a live session needed the room of this parked one", "evicted")

    async def _reap(self) -> None:
        """End parked sessions past their resume window, and sessions past their maximum age."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if session.ws is None and session.detached_at is not None and now - session.detached_at > self.config.resume_window_s:
                    await self._end(session, "the resume window ran out", "expired")
                elif self.config.max_session_s is not None and session.ws is not None:
                    left = self.config.max_session_s - (now - session.opened_at)
                    if left <= self.config.go_away_notice_s and not session.warned:
                        session.warned = True
                        session.send(p.session_go_away(int(max(0.0, left) * 1000)))
                    if left <= 0:
                        await session.ws.close(1001, "session time is up")

    async def _end(self, session: HostedSession, reason: str, metric: str, close_code: int | None = None) -> None:
        """End a session for good: open responses fail with the reason, the client is told, the worker stops."""
        if self.sessions.pop(session.id, None) is None:
            return
        await self._execute(session, session.core.close(reason, "session_closed", close_code))
        self.metrics.session_closed(metric)
        await session.stop_worker()
        if self.handoff is not None:
            self.handoff.forget(session)

    async def _release(self, session: HostedSession, reason: str, metric: str, close_code: int) -> None:
        """Let a session go from this host without ending it: its snapshot (already saved) carries it on
        elsewhere. The client's connection closes with ``close_code`` and it resumes with its handle."""
        if self.sessions.pop(session.id, None) is None:
            return
        if self.handoff is not None:
            self.handoff.released(session)
        if session.ws is not None:
            session.outbox.close_after(close_code, reason[:120])
        self.metrics.session_closed(metric)
        await session.stop_worker()

    # ---- connections ----------------------------------------------------------------------------------
    async def handle(self, ws: Socket) -> None:
        """Serve one accepted WebSocket until it closes: a new session, or ``?resume=<handle>`` of a
        parked (or live: taken over) one, here or, with a handoff, from the shared snapshots."""
        self.start_loops()
        handle = (parse_qs(urlsplit(ws.path).query).get("resume") or [None])[0]
        now = time.monotonic()
        if handle is not None:
            session = next((s for s in self.sessions.values() if s.core.handle == handle), None)
            if session is None and self.handoff is not None:
                try:
                    session = await self.handoff.restore(handle)
                except StreamVLMError as exc:  # a snapshot that cannot be loaded: say why
                    self.metrics.session_refused("invalid_resume_handle")
                    await self._refuse(ws, "invalid_resume_handle", f"the session's snapshot cannot be loaded: {exc}", 1008)
                    return
            if session is None:
                self.metrics.session_refused("invalid_resume_handle")
                await self._refuse(ws, "invalid_resume_handle", "no session to resume with this handle", 1008)
                return
            if session.ws is not None:  # the same client again (a reload): the new connection takes over
                old = session.ws
                session.ws = None
                await old.close(1000, "resumed on another connection")
            self.metrics.session_resumed()
            greeting = session.core.resumed(now)
        else:
            await self._make_room()
            if not self.can_admit():
                self.metrics.session_refused("session_limit")
                await self._refuse(ws, "session_limit", "the server is full; try again later", 1013)
                return
            state = core.RealtimeSession(self.adapter.source, self.limits, self.policy, self._budget_check)
            session = HostedSession(self, state)
            self.sessions[session.id] = session
            self.metrics.session_opened()
            # While the model is saturated a newcomer starts at an even split, not uncapped until measured.
            greeting = state.opened(now) + self.governor.on_session_open(state, now)
        session.ws, session.detached_at, session.outbox = ws, None, Outbox()
        await self._execute(session, greeting)
        await self._serve_connection(session, ws)

    def adopt(self, state: core.RealtimeSession) -> HostedSession:
        """Register a session rebuilt from elsewhere (a snapshot), parked until its client attaches."""
        session = HostedSession(self, state)
        session.detached_at = time.monotonic()
        self.sessions[session.id] = session
        return session

    async def _refuse(self, ws: Socket, code: str, message: str, close_code: int) -> None:
        self.metrics.protocol_error(code)
        try:
            await ws.send(json.dumps(p.error_event(code, message)))
        except SocketClosed:
            pass
        await ws.close(close_code, message[:120])

    async def _serve_connection(self, session: HostedSession, ws: Socket) -> None:
        conn = p.Connection(self.limits, clock_free=True)
        writer = asyncio.create_task(self._write(session, ws))
        stats = asyncio.create_task(self._stats(session))
        try:
            while True:
                message = await ws.recv()
                now = time.monotonic()
                events = conn.receive_bytes(message, now) if isinstance(message, bytes) else conn.receive_text(message, now)
                for text in conn.data_to_send():
                    error = json.loads(text)
                    if error["error"]["code"] == "rate_limited" and error["error"]["param"] != "message":  # a frame
                        self.metrics.frame_received()
                        self.metrics.frame_dropped("rate_limited")
                    self._count(error)
                    session.send(error)
                for event in events:
                    await self._execute(session, session.core.client_event(event, now))
                if conn.too_many_errors:
                    message = (f"more than {self.limits.max_error_burst} refused messages (then "
                               f"{self.limits.max_errors_per_s:g} per second); closing")
                    await self._execute(session, [p.error_event("too_many_errors", message)])
                    session.outbox.close_after(1008, "too many errors")
                    await writer  # it writes what is queued, then closes
                    break
                if writer.done():  # the writer closed the connection (slow consumer, too many errors)
                    break
        except SocketClosed:
            pass
        finally:
            writer.cancel()
            stats.cancel()
            if session.ws is ws:  # not taken over by a newer connection
                session.ws = None
                session.detached_at = time.monotonic()
                outs = session.core.detached(session.detached_at)
                session.core.keep_missed(session.outbox.items)
                if session.id in self.sessions:
                    await self._execute(session, outs)
                    await self._park(session)

    async def _park(self, session: HostedSession) -> None:
        parked = sorted((s for s in self.sessions.values() if s.ws is None), key=lambda s: s.detached_at or 0.0)
        while len(parked) > self.config.max_parked_sessions:
            await self._end(parked.pop(0), "too many sessions wait to be resumed", "evicted")
        if self.handoff is not None and session.id in self.sessions:
            self.handoff.parked(session)  # snapshotted to shared storage: it resumes on any replica

    async def _write(self, session: HostedSession, ws: Socket) -> None:
        outbox = session.outbox
        try:
            while True:
                await outbox.ready.wait()
                if outbox.overflowed:
                    message = f"more than {OUTBOX_HARD} events waited for this client; read faster (the session can be resumed)"
                    self.metrics.protocol_error("slow_consumer")
                    await ws.send(json.dumps(p.error_event("slow_consumer", message)))
                    await ws.close(1008, "slow consumer")
                    return
                while outbox.items:
                    await ws.send(json.dumps(outbox.items.popleft(), allow_nan=False))
                if outbox.closing is not None:
                    await ws.close(*outbox.closing)
                    return
                outbox.ready.clear()
        except SocketClosed:
            pass

    async def _stats(self, session: HostedSession) -> None:
        while True:
            await asyncio.sleep(self.config.stats_every_s)
            if session.worker is not None:
                self._sync_frames(session)
                c = session.worker.counters
                try:  # read while the model thread works: a figure, not a promise
                    working: int | None = int(session.worker.session.stats()["working_tokens"])
                except Exception:
                    working = None
                session.send(p.input_frame_stats(c.received, c.skipped, c.dropped, c.ingested, working))

    # ---- carrying out the core's decisions ---------------------------------------------------------------
    async def _execute(self, session: HostedSession, outs: list) -> None:
        for out in outs:
            if isinstance(out, dict):
                self._count(out)
                if self.log is not None and out["type"] == "response.done":
                    self.log.append(session.id, out["type"], out, stream_t=(out["response"].get("alert") or {}).get("t"))
                if self.handoff is not None and out["type"] == "session.resumption_update" and out.get("new_handle"):
                    self.handoff.handle_changed(session)  # the new handle resumes on any replica
                session.send(out)
            elif isinstance(out, core.StartWorker):
                await self._start_worker(session, out)
            elif isinstance(out, core.Close):
                if session.ws is not None:
                    session.outbox.close_after(out.code, out.reason)  # after the events that say why
                if out.code == 1011:
                    self.metrics.engine_fault("session")
                if session.id in self.sessions:
                    self.sessions.pop(session.id)
                    self.metrics.session_closed("engine_fault" if out.code == 1011 else "closed")
                    asyncio.ensure_future(session.stop_worker())
                    if self.handoff is not None:
                        self.handoff.forget(session)
            elif isinstance(out, core.Observe):
                self.metrics.first_token(out.value)
            elif isinstance(out, core.Watch):  # kept even before the worker runs: a move re-creates it
                session.watch_specs[out.watch_id] = out
                if session.worker is not None:
                    session.worker.watch(out.watch_id, out.condition, spec=out.spec)
            elif isinstance(out, core.Unwatch):
                session.watch_specs.pop(out.watch_id, None)
                if session.worker is not None:
                    session.worker.unwatch(out.watch_id)
            elif isinstance(out, core.FrameDropped):
                self.metrics.frame_dropped(out.reason)
            elif session.worker is None:
                continue  # the worker could not start; the core has ended the session
            elif isinstance(out, core.SubmitFrame):
                self.metrics.frame_received()
                outcome = session.worker.submit_frame(Frame(out.image, out.pts_s, out.source_id))
                if outcome != "queued":
                    self.metrics.frame_dropped("skipped_duplicate" if outcome == "skipped" else "replaced")
                    session.dropped_seen += outcome == "replaced"
            elif isinstance(out, core.Ask):
                session.worker.ask(out.text, request_id=out.request_id, max_new_tokens=out.max_new_tokens)
            elif isinstance(out, core.Cancel):
                session.worker.cancel(out.request_id)
            elif isinstance(out, core.UpdateSampling):
                session.worker.session.config = out.session
            elif isinstance(out, core.AcceptOffer):
                try:
                    await self._accept_offer(session, out.sdp)
                except Exception as exc:  # a bad SDP or no WebRTC support: the client falls back to socket frames
                    await self._execute(session, [p.error_event("invalid_value", f"the WebRTC offer could not be "
                                                                f"answered: {type(exc).__name__}: {exc}", "sdp", out.event_id)])

    def _count(self, event: dict) -> None:
        kind = event["type"]
        if kind == "response.done":
            response = event["response"]
            self.metrics.response_done(response["status"], response["trigger"])
            if response["trigger"] == "watch":
                self.metrics.alert()
        elif kind == "error":
            code = event["error"]["code"]
            self.metrics.protocol_error(code)
            if code == "engine_fault":
                self.metrics.engine_fault("request")

    def _sync_frames(self, session: HostedSession) -> None:
        """Report the frames the worker read (with their lag) and refused since the last call."""
        if session.worker is None:
            return
        c = session.worker.counters
        reads, session.frames_seen = c.read_log(session.frames_seen)
        for read in reads:
            self.metrics.frame_read(read.lag_s)
        refused = c.dropped - session.dropped_seen
        if refused > 0:
            self.metrics.frame_dropped("refused", refused)
            session.dropped_seen = c.dropped

    async def _start_worker(self, session: HostedSession, start: core.StartWorker,
                            stream: StreamSession | None = None) -> None:
        """Start the session's model thread on a new StreamSession (or on ``stream``, one restored from a
        snapshot), with the watches the session holds."""
        if stream is None:
            try:
                stream = StreamSession(self.adapter, start.session, start.memory)
            except StreamVLMError as exc:  # settings the engine refuses: the session cannot run
                await self._execute(session, session.core.close(f"the engine refused the session's settings: {exc}",
                                                                "session_closed", 1011))
                return
        session.worker = self._make_worker(stream, start)
        await session.worker.start()
        for watch in session.watch_specs.values():
            session.worker.watch(watch.watch_id, watch.condition, spec=watch.spec)
        session.pump = asyncio.create_task(self._pump(session, session.worker))

    def _make_worker(self, stream: StreamSession, start: core.StartWorker) -> LiveWorker:
        if self.handoff is not None:
            return self.handoff.worker(stream, start.controller)
        return LiveWorker(stream, start.controller)

    async def _pump(self, session: HostedSession, worker: LiveWorker) -> None:
        """Every worker event through the core to the client; a worker that stops unasked ends the session."""
        async for event in worker.events():
            await self._execute(session, session.core.worker_event(event.kind, event.data, time.monotonic()))
        await self._execute(session, session.core.worker_stopped(time.monotonic()))

    async def _accept_offer(self, session: HostedSession, sdp: str) -> None:
        from .webrtc import accept_offer, loopback_ice_only

        if self.config.host in ("127.0.0.1", "localhost", "::1"):
            loopback_ice_only()
        if session.peer is not None:
            await session.peer.close()

        def on_frame(image, timestamp: int | None, clock_rate: int | None, received_s: float) -> None:
            # runs on the event loop: through the core (rate limit, RTP time rebased at the first frame)
            asyncio.ensure_future(self._execute(session, session.core.track_frame(image, timestamp, clock_rate, received_s)))

        answer, session.peer = await accept_offer(sdp, on_frame, ice_servers=self.config.ice_servers)
        session.send(p.webrtc_answer(answer))
