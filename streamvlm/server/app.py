"""The server: one port for the realtime WebSocket API, the web client page, health and metrics.

A thin transport over two Sans-I/O cores: each WebSocket connection gets a
:class:`~streamvlm.protocol.Connection` (bytes to validated client events, errors, framing) and each
session a :class:`~streamvlm.protocol.session.RealtimeSession` (what those events mean: ids, settings,
the lifecycle of every response, watches, resumption). This module moves messages between the socket,
the cores and the session's :class:`~streamvlm.engine.worker.LiveWorker` (the model thread), and
carries out the commands the core returns. All sessions share one loaded model (its one owner, the
adapter lock, lets them take turns).

What the transport itself decides: admission (live sessions, memory; parked sessions never block a
live one), a bounded outbox per connection (memory and stats updates are dropped first; a client that
stays too slow is closed with ``slow_consumer``), resumption (``?resume=<handle>``; a second connection
with a live session's handle takes it over), and ending sessions with a reason. HTTP routes and
checks (hosts, origins, token) live in :mod:`.http`, metrics in :mod:`.metrics`.

Routes: ``/`` (the web client), ``/healthz`` (alive), ``/readyz`` (model loaded), ``/metrics``
(Prometheus text), ``/v1/realtime`` (the WebSocket API, see docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from .. import protocol as p
from ..config import ServerConfig
from ..engine.session import StreamSession
from ..engine.worker import LiveWorker
from ..errors import StreamVLMError
from ..models.base import ModelAdapter
from ..protocol import session as core
from ..types import Frame
from .eventlog import EventLog
from .http import process_request
from .metrics import ServerMetrics

__all__ = ["StreamServer"]

# Outbox of one connection: past SOFT queued events, memory and stats updates are dropped; past HARD
# the client is too slow to serve and its connection is closed (the session stays resumable).
_OUTBOX_SOFT = 64
_OUTBOX_HARD = 1024


class _Outbox:
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
        if len(self.items) >= _OUTBOX_SOFT and event["type"] in core.DROPPABLE_EVENTS:
            self.dropped += 1
            return
        if len(self.items) >= _OUTBOX_HARD:
            self.overflowed = True
        self.items.append(event)
        self.ready.set()


class _Session:
    """One realtime session on this server: its core, its model thread, its connection while it has one."""

    def __init__(self, server: StreamServer, state: core.RealtimeSession) -> None:
        self.server = server
        self.core = state
        self.worker: LiveWorker | None = None
        self.ws: ServerConnection | None = None
        self.outbox = _Outbox()
        self.detached_at: float | None = None
        self.opened_at = time.monotonic()
        self.pump: asyncio.Task | None = None
        self.warned = False  # a go_away was sent
        self.peer: Any = None  # the WebRTC peer connection, if the client sends video that way
        self.frames_seen = 0  # worker frames already reported to the metrics
        self.dropped_seen = 0

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
            self.server._sync_frames(self)
            self.worker.session.close()
            self.worker = None


class StreamServer:
    """Serve one loaded model to many realtime sessions. ``await start()``, then ``await stop()``."""

    def __init__(self, adapter: ModelAdapter, config: ServerConfig | None = None, *, limits: p.Limits | None = None) -> None:
        self.adapter = adapter
        self.config = config or ServerConfig()
        self.limits = limits or p.Limits()
        self.metrics = ServerMetrics()
        self.metrics.track_live(
            live=lambda: sum(s.ws is not None for s in self.sessions.values()),
            parked=lambda: sum(s.ws is None for s in self.sessions.values()),
            working_tokens=self._working_tokens,
        )
        self.sessions: dict[str, _Session] = {}
        self.log = EventLog(self.config.event_db) if self.config.event_db else None
        self.policy = core.SessionPolicy(self.config.session_budget_tokens, self.config.max_session_budget_tokens,
                                         self.config.max_watches, self.limits.max_frames_per_s,
                                         self.config.session_store_ram_bytes, self.config.session_store_disk_bytes)
        self._server: Any = None
        self._reaper: asyncio.Task | None = None

    def _working_tokens(self) -> int:
        total = 0
        for session in list(self.sessions.values()):
            try:  # read while the model threads work: a figure for the gauge, not a promise
                total += int(session.worker.session.stats()["working_tokens"]) if session.worker is not None else 0
            except Exception:
                pass
        return total

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        self._server = await serve(
            self._handle, self.config.host, self.config.port, compression=None,
            process_request=partial(process_request, config=self.config, metrics=self.metrics, ready=self.adapter.source),
            # Messages over the limit get a message_too_large error event from the Connection; only past
            # this hard ceiling does the socket layer close the connection (1009).
            max_size=4 * self.limits.max_message_bytes,
        )
        self._reaper = asyncio.create_task(self._reap())
        sock = next(iter(self._server.sockets))
        return sock.getsockname()[0], sock.getsockname()[1]

    async def stop(self) -> None:
        """Tell every client (``session.go_away``, then ``session_closed``), stop every worker, close the port."""
        if self._reaper is not None:
            self._reaper.cancel()
        for session in list(self.sessions.values()):
            session.send(p.session_go_away(0))
            await self._end(session, "the server is stopping", "server_stopping", close_code=1001)
        await asyncio.sleep(0.05)  # let the writers flush those events
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
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

    async def _end(self, session: _Session, reason: str, metric: str, close_code: int | None = None) -> None:
        """End a session for good: open responses fail with the reason, the client is told, the worker stops."""
        if self.sessions.pop(session.id, None) is None:
            return
        await self._execute(session, session.core.close(reason, "session_closed", close_code))
        self.metrics.session_closed(metric)
        await session.stop_worker()

    # ---- connections ----------------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        handle = (parse_qs(urlsplit(ws.request.path).query).get("resume") or [None])[0]
        now = time.monotonic()
        if handle is not None:
            session = next((s for s in self.sessions.values() if s.core.handle == handle), None)
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
            session = _Session(self, state)
            self.sessions[session.id] = session
            self.metrics.session_opened()
            greeting = state.opened(now)
        session.ws, session.detached_at, session.outbox = ws, None, _Outbox()
        await self._execute(session, greeting)
        await self._serve_connection(session, ws)

    async def _refuse(self, ws: ServerConnection, code: str, message: str, close_code: int) -> None:
        self.metrics.protocol_error(code)
        await ws.send(json.dumps(p.error_event(code, message)))
        await ws.close(close_code, message[:120])

    async def _serve_connection(self, session: _Session, ws: ServerConnection) -> None:
        conn = p.Connection(self.limits, clock_free=True)
        writer = asyncio.create_task(self._write(session, ws))
        stats = asyncio.create_task(self._stats(session))
        try:
            async for message in ws:
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
        except ConnectionClosed:
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

    async def _park(self, session: _Session) -> None:
        parked = sorted((s for s in self.sessions.values() if s.ws is None), key=lambda s: s.detached_at or 0.0)
        while len(parked) > self.config.max_parked_sessions:
            await self._end(parked.pop(0), "too many sessions wait to be resumed", "evicted")

    async def _write(self, session: _Session, ws: ServerConnection) -> None:
        outbox = session.outbox
        try:
            while True:
                await outbox.ready.wait()
                if outbox.overflowed:
                    message = f"more than {_OUTBOX_HARD} events waited for this client; read faster (the session can be resumed)"
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
        except ConnectionClosed:
            pass

    async def _stats(self, session: _Session) -> None:
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
    async def _execute(self, session: _Session, outs: list) -> None:
        for out in outs:
            if isinstance(out, dict):
                self._count(out)
                if self.log is not None and out["type"] == "response.done":
                    self.log.append(session.id, out["type"], out, stream_t=(out["response"].get("alert") or {}).get("t"))
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
            elif isinstance(out, core.Observe):
                self.metrics.first_token(out.value)
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
            elif isinstance(out, core.Watch):
                session.worker.watch(out.watch_id, out.condition, spec=out.spec)
            elif isinstance(out, core.Unwatch):
                session.worker.unwatch(out.watch_id)
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

    def _sync_frames(self, session: _Session) -> None:
        """Report the frames the worker read (with their lag) and refused since the last call."""
        if session.worker is None:
            return
        c = session.worker.counters
        for lag in c.lag_s[session.frames_seen:]:
            self.metrics.frame_read(lag)
        session.frames_seen = len(c.lag_s)
        refused = c.dropped - session.dropped_seen
        if refused > 0:
            self.metrics.frame_dropped("refused", refused)
            session.dropped_seen = c.dropped

    async def _start_worker(self, session: _Session, start: core.StartWorker) -> None:
        try:
            stream = StreamSession(self.adapter, start.session, start.memory)
        except StreamVLMError as exc:  # settings the engine refuses: the session cannot run
            await self._execute(session, session.core.close(f"the engine refused the session's settings: {exc}",
                                                            "session_closed", 1011))
            return
        session.worker = LiveWorker(stream, start.controller)
        await session.worker.start()
        session.pump = asyncio.create_task(self._pump(session, session.worker))

    async def _pump(self, session: _Session, worker: LiveWorker) -> None:
        """Every worker event through the core to the client; a worker that stops unasked ends the session."""
        async for event in worker.events():
            await self._execute(session, session.core.worker_event(event.kind, event.data, time.monotonic()))
        await self._execute(session, session.core.worker_stopped(time.monotonic()))

    async def _accept_offer(self, session: _Session, sdp: str) -> None:
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


async def serve_forever(adapter: ModelAdapter, config: ServerConfig) -> None:
    """Run the server until cancelled (Ctrl-C)."""
    server = StreamServer(adapter, config)
    host, port = await server.start()
    print(f"streamvlm: serving {adapter.source} on http://{host}:{port}/ (realtime API: ws://{host}:{port}/v1/realtime)", flush=True)
    try:
        await asyncio.Future()
    finally:
        await server.stop()
