"""The server: one port for the realtime WebSocket API, the web client page, health and metrics.

A thin transport. Each WebSocket connection gets a :class:`~streamvlm.protocol.Connection` (the
Sans-I/O protocol: validation, errors, framing) and a :class:`~streamvlm.engine.worker.LiveWorker`
(the model thread and the dialogue controller) over its own :class:`StreamSession`; this module only
moves messages between them. All sessions share one loaded model and take turns on it.

Routes: ``/`` (the web client), ``/healthz`` (alive), ``/readyz`` (model loaded), ``/metrics``
(Prometheus text), ``/v1/realtime`` (the WebSocket API, see docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .. import protocol as p
from ..config import MemoryConfig, ServerConfig, SessionConfig
from ..dialogue import ControllerConfig
from ..engine.session import StreamSession
from ..engine.worker import LiveWorker, WorkerEvent
from ..models.base import ModelAdapter
from ..types import Evidence, Frame
from .eventlog import EventLog

__all__ = ["StreamServer"]

_STATIC = Path(__file__).parent / "static"
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class _Metrics:
    sessions_opened: int = 0
    sessions_refused: int = 0
    frames_received: int = 0
    frames_dropped: int = 0
    alerts: int = 0
    protocol_errors: int = 0
    ttft: list[int] = field(default_factory=lambda: [0] * (len(_TTFT_BUCKETS) + 1))
    ttft_sum: float = 0.0
    ttft_count: int = 0

    def observe_ttft(self, seconds: float) -> None:
        index = next((i for i, b in enumerate(_TTFT_BUCKETS) if seconds <= b), len(_TTFT_BUCKETS))
        self.ttft[index] += 1
        self.ttft_sum += seconds
        self.ttft_count += 1


class _Session:
    """One realtime session: its worker, settings and conversation state. Outlives its connection while resumable."""

    def __init__(self, server: StreamServer, session_id: str) -> None:
        self.server = server
        self.id = session_id
        self.handle = secrets.token_urlsafe(24)
        self.session_config = SessionConfig()
        self.memory_config = MemoryConfig(budget_tokens=server.config.session_budget_tokens)
        self.controller_config = ControllerConfig()
        self.started = False  # a frame or question went in: context-shaping settings are locked
        self.worker: LiveWorker | None = None
        self.last_user_text: str | None = None
        self.responses = itertools.count(1)
        self.items = itertools.count(1)
        self.triggers: dict[str, str] = {}
        self.asked_at: dict[str, float] = {}
        self.watches: dict[str, str] = {}
        self.connection: ServerConnection | None = None
        self.outbox: asyncio.Queue[str] = asyncio.Queue()
        self.detached_at: float | None = None
        self.opened_at = time.monotonic()
        self.events_task: asyncio.Task | None = None
        self.warned = False  # a go_away was sent
        self.peer: Any = None  # the WebRTC peer connection, if the client sends video that way

    def settings(self) -> dict[str, Any]:
        s = self.session_config
        return {
            "instructions": s.system_prompt,
            "sampling": {"max_new_tokens": s.sampling.max_new_tokens, "temperature": s.sampling.temperature},
            "memory": {"budget_tokens": self.memory_config.budget_tokens, "policy": self.memory_config.policy},
            "interrupt": self.controller_config.interrupt,
            "probe_every_frames": self.controller_config.probe_every_frames,
        }

    async def ensure_worker(self) -> LiveWorker:
        if self.worker is None:
            session = StreamSession(self.server.adapter, self.session_config, self.memory_config)
            self.worker = LiveWorker(session, self.controller_config)
            await self.worker.start()
            self.events_task = asyncio.create_task(self._pump_events())
        return self.worker

    async def close(self) -> None:
        if self.peer is not None:
            await self.peer.close()
            self.peer = None
        if self.worker is not None:
            self.worker.cancel()
            await self.worker.stop()
            if self.events_task is not None:
                await self.events_task
            self.worker.session.close()
            self.worker = None

    def send(self, event: dict[str, Any]) -> None:
        self.outbox.put_nowait(json.dumps(event))

    async def _pump_events(self) -> None:
        assert self.worker is not None
        metrics, log = self.server.metrics, self.server.log
        async for event in self.worker.events():
            for out in self._translate(event):
                if log is not None and out["type"] in ("response.done",):
                    log.append(self.id, out["type"], out, stream_t=(out["response"].get("alert") or {}).get("t"))
                self.send(out)
            if event.kind == "alert":
                metrics.alerts += 1

    def _translate(self, event: WorkerEvent) -> list[dict[str, Any]]:
        d = event.data
        if event.kind == "answer.started":
            self.triggers[d["request_id"]] = d["trigger"]
            return [p.response_created(d["request_id"], d["trigger"])]
        if event.kind == "answer.delta":
            rid = d["request_id"]
            if rid in self.asked_at:
                self.server.metrics.observe_ttft(time.monotonic() - self.asked_at.pop(rid))
            return [p.response_output_text_delta(rid, d["text"])]
        if event.kind == "answer.done":
            answer = d["answer"]
            self.asked_at.pop(d["request_id"], None)
            status = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled"}.get(answer.finish_reason, "completed")
            return [p.response_done(d["request_id"], status, d["trigger"], answer.text, answer.evidence,
                                    answer.prompt_tokens, len(answer.token_ids)),
                    p.session_resumption_update(self.handle, True)]
        if event.kind == "alert":
            rid = f"resp_alert_{next(self.responses)}"
            alert = {"watch_id": d["watch_id"], "condition": d["condition"], "t": d["evidence_t"]}
            return [p.response_created(rid, "watch", alert),
                    p.response_done(rid, "completed", "watch", "", [Evidence(d["evidence_t"])], alert=alert)]
        if event.kind == "acknowledged":
            return [p.response_acknowledged(d["request_id"], d["condition"])]
        if event.kind == "gave_up":
            return [p.response_done(d["request_id"], "incomplete", "deferred", d["reason"])]
        if event.kind == "memory":
            return [p.memory_update(**asdict(d["memory_event"]))]
        if event.kind == "error":
            return [p.error_event("server_error", d["message"])]
        return []


class StreamServer:
    """Serve one loaded model to many realtime sessions. ``await start()``, then ``await stop()``."""

    def __init__(self, adapter: ModelAdapter, config: ServerConfig | None = None, *, limits: p.Limits | None = None) -> None:
        self.adapter = adapter
        self.config = config or ServerConfig()
        self.limits = limits or p.Limits()
        self.metrics = _Metrics()
        self.sessions: dict[str, _Session] = {}
        self.log = EventLog(self.config.event_db) if self.config.event_db else None
        self._ids = itertools.count(1)
        self._server: Any = None
        self._reaper: asyncio.Task | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        self._server = await serve(
            self._handle, self.config.host, self.config.port, process_request=self._process_request,
            max_size=self.limits.max_message_bytes, compression=None,
        )
        self._reaper = asyncio.create_task(self._reap())
        sock = next(iter(self._server.sockets))
        return sock.getsockname()[0], sock.getsockname()[1]

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            if session.connection is not None:
                session.send(p.session_go_away(0))
        await asyncio.sleep(0.05)
        if self._reaper is not None:
            self._reaper.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for session in list(self.sessions.values()):
            await session.close()
        self.sessions.clear()
        if self.log is not None:
            self.log.close()

    # ---- HTTP ----------------------------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/healthz":
            return _text(connection, HTTPStatus.OK, "ok\n")
        if url.path == "/readyz":
            return _text(connection, HTTPStatus.OK, f"ready {self.adapter.source}\n")
        if url.path == "/metrics":
            return _text(connection, HTTPStatus.OK, self.render_metrics(), "text/plain; version=0.0.4")
        if url.path in ("/", "/index.html"):
            return _text(connection, HTTPStatus.OK, (_STATIC / "index.html").read_text(), "text/html; charset=utf-8")
        if url.path != "/v1/realtime":
            return _text(connection, HTTPStatus.NOT_FOUND, "not found\n")
        if not self._authorized(request.headers, parse_qs(url.query)):
            return _text(connection, HTTPStatus.UNAUTHORIZED, "a valid bearer token is required\n")
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin, request.headers.get("Host", "")):
            return _text(connection, HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed\n")
        return None

    def _authorized(self, headers: Headers, query: dict[str, list[str]]) -> bool:
        if not self.config.token:
            return True
        given = headers.get("Authorization", "")
        token = given[7:] if given.startswith("Bearer ") else (query.get("access_token") or [""])[0]
        return hmac.compare_digest(token.encode(), self.config.token.encode())

    def _origin_allowed(self, origin: str, host: str) -> bool:
        own = {f"http://{host}", f"https://{host}"}
        return origin in own or origin in self.config.allowed_origins

    def render_metrics(self) -> str:
        m = self.metrics
        live = [s for s in self.sessions.values() if s.worker is not None]
        working = sum(int(s.worker.session.stats()["working_tokens"]) for s in live)
        received = m.frames_received + sum(s.worker.counters.received for s in live)
        dropped = m.frames_dropped + sum(s.worker.counters.dropped for s in live)
        lines = [
            "# TYPE streamvlm_sessions gauge", f"streamvlm_sessions {len(self.sessions)}",
            "# TYPE streamvlm_sessions_refused_total counter", f"streamvlm_sessions_refused_total {m.sessions_refused}",
            "# TYPE streamvlm_frames_received_total counter", f"streamvlm_frames_received_total {received}",
            "# TYPE streamvlm_frames_dropped_total counter", f"streamvlm_frames_dropped_total {dropped}",
            "# TYPE streamvlm_working_memory_tokens gauge", f"streamvlm_working_memory_tokens {working}",
            "# TYPE streamvlm_alerts_total counter", f"streamvlm_alerts_total {m.alerts}",
            "# TYPE streamvlm_protocol_errors_total counter", f"streamvlm_protocol_errors_total {m.protocol_errors}",
            "# TYPE streamvlm_ttft_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip((*_TTFT_BUCKETS, float("inf")), m.ttft):
            cumulative += count
            lines.append(f'streamvlm_ttft_seconds_bucket{{le="{"+Inf" if bound == float("inf") else bound}"}} {cumulative}')
        lines += [f"streamvlm_ttft_seconds_sum {m.ttft_sum}", f"streamvlm_ttft_seconds_count {m.ttft_count}"]
        return "\n".join(lines) + "\n"

    # ---- sessions -----------------------------------------------------------------------------------
    def _budget_in_use(self) -> int:
        return sum(s.memory_config.budget_tokens or self.config.session_budget_tokens for s in self.sessions.values())

    def can_admit(self) -> bool:
        return len(self.sessions) < self.config.max_sessions and self._budget_in_use() + self.config.session_budget_tokens <= self.config.global_budget_tokens

    async def _reap(self) -> None:
        """End detached sessions past their resume window, and sessions past their maximum age."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if session.detached_at is not None and now - session.detached_at > self.config.resume_window_s:
                    self.sessions.pop(session.id, None)
                    await session.close()
                elif self.config.max_session_s is not None and session.connection is not None:
                    left = self.config.max_session_s - (now - session.opened_at)
                    if left <= self.config.go_away_notice_s and not session.warned:
                        session.warned = True
                        session.send(p.session_go_away(int(max(0.0, left) * 1000)))
                    if left <= 0:
                        await session.connection.close(1001, "session time is up")

    async def _handle(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path).query)
        handle = (query.get("resume") or [None])[0]
        if handle is not None:
            session = next((s for s in self.sessions.values() if s.handle == handle and s.connection is None), None)
            if session is None:
                await ws.send(json.dumps(p.error_event("invalid_resume_handle", "no session to resume with this handle")))
                await ws.close(1008, "invalid resume handle")
                return
            session.detached_at = None
        else:
            if not self.can_admit():
                self.metrics.sessions_refused += 1
                await ws.send(json.dumps(p.error_event("session_limit", "the server is full; try again later")))
                await ws.close(1013, "server full")
                return
            session = _Session(self, f"sess_{next(self._ids):04d}")
            self.sessions[session.id] = session
            self.metrics.sessions_opened += 1
        session.connection = ws
        session.outbox = asyncio.Queue()
        conn = p.Connection(self.limits, clock_free=False)
        session.send(p.session_created(session.id, self.adapter.source, self.limits, session.settings()))
        session.send(p.session_resumption_update(session.handle, True))
        writer = asyncio.create_task(self._write(ws, session))
        stats = asyncio.create_task(self._stats(session))
        try:
            async for message in ws:
                events = conn.receive_bytes(message) if isinstance(message, bytes) else conn.receive_text(message)
                for event in events:
                    await self._apply(session, event)
                for text in conn.data_to_send():
                    self.metrics.protocol_errors += 1
                    session.outbox.put_nowait(text)
        except ConnectionClosed:
            pass
        finally:
            writer.cancel()
            stats.cancel()
            session.connection = None
            if session.worker is not None:
                session.worker.cancel()  # a client gone mid-answer leaves nothing running
            session.detached_at = time.monotonic()

    async def _write(self, ws: ServerConnection, session: _Session) -> None:
        try:
            while True:
                await ws.send(await session.outbox.get())
        except ConnectionClosed:
            pass

    async def _stats(self, session: _Session) -> None:
        while True:
            await asyncio.sleep(self.config.stats_every_s)
            if session.worker is not None:
                c = session.worker.counters
                session.send(p.input_frame_stats(c.received, c.skipped, c.dropped, c.ingested))

    async def _apply(self, session: _Session, event: p.ClientEvent) -> None:
        """Carry out one valid client event; application-level refusals become error events."""
        cid = event.event_id
        if isinstance(event, p.SessionUpdate):
            locked = {"instructions", "memory.budget_tokens", "memory.policy", "interrupt", "probe_every_frames"} & set(event.fields_set)
            if session.started and locked:
                session.send(p.error_event("setting_locked", f"{sorted(locked)[0]} cannot change once the stream has started",
                                           f"session.{sorted(locked)[0]}", cid))
                return
            s = session.session_config
            sampling = replace(s.sampling, **{k: v for k, v in (("max_new_tokens", event.max_new_tokens), ("temperature", event.temperature)) if v is not None})
            session.session_config = replace(s, sampling=sampling, system_prompt=event.instructions or s.system_prompt)
            if "memory.budget_tokens" in event.fields_set or event.policy is not None:
                budget = event.budget_tokens if "memory.budget_tokens" in event.fields_set else session.memory_config.budget_tokens
                session.memory_config = replace(session.memory_config, budget_tokens=budget or self.config.session_budget_tokens,
                                                policy=event.policy or session.memory_config.policy)
            cc = session.controller_config
            session.controller_config = replace(cc, interrupt=cc.interrupt if event.interrupt is None else event.interrupt,
                                                probe_every_frames=event.probe_every_frames or cc.probe_every_frames)
            if session.worker is not None:
                session.worker.session.config = session.session_config
            session.send(p.session_updated(session.id, session.settings()))
        elif isinstance(event, p.FrameAppend):
            worker = await session.ensure_worker()
            session.started = True
            pts = event.pts_s if event.pts_s is not None else time.monotonic() - session.opened_at
            worker.submit_frame(Frame(event.image, max(pts, worker.session.last_t, 0.0), event.source_id))
        elif isinstance(event, p.ItemCreate):
            session.last_user_text = event.text
            session.send(p.conversation_item_created(event.item_id or f"item_{next(session.items)}", event.text))
        elif isinstance(event, p.ResponseCreate):
            if not session.last_user_text:
                session.send(p.error_event("no_user_message", "send conversation.item.create first", None, cid))
                return
            worker = await session.ensure_worker()
            session.started = True
            rid = f"resp_{next(session.responses)}"
            session.asked_at[rid] = time.monotonic()
            worker.ask(session.last_user_text, request_id=rid)
            session.last_user_text = None
        elif isinstance(event, p.ResponseCancel):
            if session.worker is not None:
                session.worker.cancel()
        elif isinstance(event, p.WatchCreate):
            if event.watch_id in session.watches:
                session.send(p.error_event("watch_exists", f"watch {event.watch_id!r} exists", "watch.id", cid))
                return
            worker = await session.ensure_worker()
            session.watches[event.watch_id] = event.condition
            spec = event.spec(session.controller_config.default_trigger)
            worker.watch(event.watch_id, event.condition, spec=spec)
            session.send(p.watch_created(event.watch_id, event.condition, spec))
        elif isinstance(event, p.WebRTCOffer):
            from .webrtc import accept_offer, loopback_ice_only

            worker = await session.ensure_worker()
            session.started = True
            if self.config.host in ("127.0.0.1", "localhost", "::1"):
                loopback_ice_only()
            if session.peer is not None:
                await session.peer.close()

            def on_frame(image, pts: float) -> None:
                worker.submit_frame(Frame(image, max(pts, worker.session.last_t, 0.0), "webrtc"))

            sdp, session.peer = await accept_offer(event.sdp, on_frame, ice_servers=self.config.ice_servers)
            session.send(p.webrtc_answer(sdp))
        elif isinstance(event, p.WatchDelete):
            if session.watches.pop(event.watch_id, None) is None:
                session.send(p.error_event("watch_not_found", f"no watch {event.watch_id!r}", "watch_id", cid))
                return
            if session.worker is not None:
                session.worker.unwatch(event.watch_id)
            session.send(p.watch_deleted(event.watch_id))


def _text(connection: ServerConnection, status: HTTPStatus, body: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    response = connection.respond(status, body)
    response.headers["Content-Type"] = content_type
    return response


async def serve_forever(adapter: ModelAdapter, config: ServerConfig) -> None:
    """Run the server until cancelled (Ctrl-C)."""
    server = StreamServer(adapter, config)
    host, port = await server.start()
    print(f"streamvlm: serving {adapter.source} on http://{host}:{port}/ (realtime API: ws://{host}:{port}/v1/realtime)", flush=True)
    try:
        await asyncio.Future()
    finally:
        await server.stop()

