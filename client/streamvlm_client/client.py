"""A Python client for the realtime WebSocket API (``ws://host:port/v1/realtime``, docs/protocol.md).

Two front ends over one implementation:

* :class:`AsyncClient` for asyncio programs::

      async with AsyncClient.connect("ws://127.0.0.1:8765") as client:
          await client.send_frame(rgb, pts_s=0.0)
          reply = await client.answer("What do you see?")
          print(reply["text"], [e["pts_s"] for e in reply["evidence"]])

* :class:`Client`, the same methods blocking, for scripts without an event loop (it runs one in a
  background thread).

Only numpy, OpenCV, websockets and the Sans-I/O ``streamvlm.protocol`` package are imported: no torch,
no transformers, so a camera box or a web backend can use it without a model stack. Every client
event is checked locally with the same parser the server uses, so a malformed request raises
:class:`~streamvlm.protocol.ProtocolError` before anything is sent; a request the server refuses
raises :class:`ClientError` carrying the server's error ``code``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import json
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from streamvlm.errors import ConfigError, StreamVLMError
from streamvlm.protocol import FRAME_HEADER, Limits, ProtocolError, encode_frame, parse_client_object

if TYPE_CHECKING:  # only for annotations: the client never needs the ingest package
    from streamvlm.ingest import LiveSource

__all__ = ["AsyncClient", "Client", "ClientError", "DEFAULT_URL", "REALTIME_PATH", "realtime_url"]

#: Where a server started with default settings listens.
DEFAULT_URL = "ws://127.0.0.1:8765/v1/realtime"
#: The path of the realtime API; added to a URL given without a path.
REALTIME_PATH = "/v1/realtime"

_T = TypeVar("_T")
_STATS_KEYS = ("received", "skipped", "dropped", "ingested")
_FINISHED_KEPT = 256  # ended answers kept for result()


class ClientError(StreamVLMError):
    """The server refused a request, or the connection failed or ended.

    ``code`` is the server's error code (``session_limit``, ``watch_exists``, ``no_user_message``,
    ``response_not_found``, ...; see docs/protocol.md), the code of a response that ended ``failed``
    (``response_failed`` when the server named none), or one of the client's own:
    ``connection_failed`` (the server could not be reached), ``http_error`` (the WebSocket upgrade was
    refused; ``status`` holds the HTTP status, 401 for a missing or wrong token),
    ``connection_closed`` (the connection ended while waiting), ``no_handle`` (nothing to resume
    with) and ``not_resumable`` (the server said the session can no longer be resumed). ``param``,
    ``event_id`` and ``response_id`` are those of the server's ``error`` event, when it sent one;
    ``response`` is the ``response`` object of a failed ``response.done``.
    """

    def __init__(self, code: str, message: str, *, param: str | None = None, event_id: str | None = None,
                 status: int | None = None, response_id: str | None = None,
                 response: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.param = param
        self.event_id = event_id
        self.status = status
        self.response_id = response_id
        self.response = response

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> ClientError:
        """The exception for a server ``error`` event."""
        err = event.get("error") if isinstance(event.get("error"), Mapping) else {}
        return cls(str(err.get("code", "server_error")), str(err.get("message", "")),
                   param=err.get("param"), event_id=err.get("event_id"), response_id=err.get("response_id"))

    @classmethod
    def from_failed(cls, response: dict[str, Any], earlier: ClientError | None = None) -> ClientError:
        """The exception for a ``response.done`` with status ``failed``: the code the response names,
        else that of an ``error`` event about it that came first, else ``response_failed``."""
        err = response.get("error") if isinstance(response.get("error"), Mapping) else {}
        code = err.get("code") or (earlier.code if earlier else None) or "response_failed"
        message = err.get("message") or (earlier.message if earlier else None) or "the response failed"
        return cls(str(code), str(message), event_id=response.get("client_event_id"),
                   response_id=response.get("id"), response=response)


def _settle(future: asyncio.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Complete ``future`` unless it is already done; a failure is marked as seen (no 'never retrieved' noise)."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
        future.exception()


def realtime_url(url: str, resume: str | None = None) -> str:
    """The WebSocket URL for ``url``: ``ws://`` added when no scheme is given, ``http(s)`` mapped to
    ``ws(s)``, :data:`REALTIME_PATH` when there is no path, and ``?resume=<handle>`` when resuming."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"url: must be a non-empty string, got {url!r}")
    text = url.strip()
    if "://" not in text:
        text = "ws://" + text
    parts = urlsplit(text)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in ("ws", "wss"):
        raise ConfigError(f"url: the scheme must be ws://, wss://, http:// or https://, got {parts.scheme!r}")
    path = parts.path if parts.path not in ("", "/") else REALTIME_PATH
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "resume"]
    if resume is not None:
        query.append(("resume", resume))
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


class _Ask:
    """A question in flight: bound to the server's response id by the ``response.created`` whose
    ``client_event_id`` is the ``event_id`` of this question's ``response.create``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, event_ids: tuple[str, str],
                 on_delta: Callable[[str], Any] | None) -> None:
        self.event_ids = event_ids
        self.create_id = event_ids[1]  # the event_id of the response.create, echoed as client_event_id
        self.error: ClientError | None = None  # an error event about this response, before its response.done
        self.on_delta = on_delta
        self.sent_at = time.monotonic()
        self.first_delta_at: float | None = None
        self.response_id: str | None = None
        self.started: asyncio.Future[str] = loop.create_future()
        self.done: asyncio.Future[dict[str, Any]] = loop.create_future()

    def fail(self, error: BaseException) -> None:
        _settle(self.started, error=error)
        _settle(self.done, error=error)


class _Connecting:
    """What :meth:`AsyncClient.connect` returns: await it, or use it as ``async with``."""

    def __init__(self, opener: Callable[[], Coroutine[Any, Any, AsyncClient]]) -> None:
        self._opener = opener
        self._client: AsyncClient | None = None

    def __await__(self) -> Generator[Any, None, AsyncClient]:
        return self._opener().__await__()

    async def __aenter__(self) -> AsyncClient:
        self._client = await self._opener()
        return self._client

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None:
            await self._client.close()


class AsyncClient:
    """One realtime session over one WebSocket, for asyncio code.

    Open it with ``await AsyncClient.connect(url)`` (or ``async with AsyncClient.connect(url) as c``).
    State kept up to date from the server's events: :attr:`session_id`, :attr:`handle` (the latest
    resumption handle), :attr:`session` (the settings in force), :attr:`limits`, :attr:`frame_stats`
    (the latest ``input_frame.stats``), :attr:`read_rate` (the frames per second the server reads from
    this session, when it caps them) and :attr:`go_away` (the ``session.go_away`` event, if one came).

    Every server event is also kept, in order, for :meth:`events` / :meth:`next_event` (at most
    ``event_buffer`` unread ones; beyond that the oldest are dropped and counted in
    :attr:`events_dropped`).
    """

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, open_timeout: float = 10.0,
                 event_buffer: int = 4096, resume_retry_s: float = 2.0) -> None:
        """Not connected yet: use :meth:`connect`, which builds one and opens it."""
        if isinstance(event_buffer, bool) or not isinstance(event_buffer, int) or event_buffer < 0:
            raise ConfigError(f"event_buffer: must be an integer >= 0, got {event_buffer!r}")
        realtime_url(url)  # validate early
        self.url = url
        self.token = token
        self.open_timeout = float(open_timeout)
        self.resume_retry_s = float(resume_retry_s)
        #: The session's id (``session.created``); kept across :meth:`reconnect`.
        self.session_id: str | None = None
        #: The latest resumption handle (``session.resumption_update``), or None before one came.
        self.handle: str | None = None
        #: Whether the server said the session could be resumed from its current state (a
        #: ``session.resumption_update`` with ``resumable: false`` and no handle clears :attr:`handle`).
        self.resumable: bool = False
        #: The session's settings as last announced (``session.created`` / ``session.updated``).
        self.session: dict[str, Any] = {}
        #: The model the server runs.
        self.model: str | None = None
        #: The limits the connection enforces (from ``session.created``).
        self.limits: Limits = Limits()
        #: The latest ``input_frame.stats`` counters: received, skipped, dropped, ingested.
        self.frame_stats: dict[str, int] = dict.fromkeys(_STATS_KEYS, 0)
        #: Frames per second the server reads from this session (``input_frame.rate``: admission by
        #: compute); None while it reads everything sent. Frames above it are dropped without an error.
        self.read_rate: float | None = None
        #: The ``session.go_away`` event, once the server announced it will close the connection.
        self.go_away: dict[str, Any] | None = None
        #: Frames sent on this client (all connections).
        self.frames_sent = 0
        #: Server events dropped from the unread buffer because it was full.
        self.events_dropped = 0
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer: collections.deque[dict[str, Any]] = collections.deque()
        self._buffer_max = event_buffer
        self._arrived: asyncio.Event | None = None
        self._ids = itertools.count(1)
        self._id_prefix = f"c{secrets.token_hex(4)}_"  # event ids unique across clients resuming one session
        self._t0 = time.monotonic()
        self._lost = False  # the current connection ended and no reconnect is under way
        self._unbound: dict[str, _Ask] = {}  # response.create event_id -> ask, until its response.created
        self._asks: dict[str, _Ask] = {}  # response id -> ask, until response.done
        self._finished: collections.OrderedDict[str, _Ask] = collections.OrderedDict()  # the latest ended, for result()
        self._echoes_ids: bool = False  # the server echoes client_event_id (else: first in, first out)
        self._updates: collections.deque[tuple[str, asyncio.Future[dict[str, Any]]]] = collections.deque()
        self._watch_created: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._watch_deleted: dict[str, tuple[str, asyncio.Future[str]]] = {}
        self._by_event_id: dict[str, Callable[[ClientError], None]] = {}
        self._waiters: list[tuple[frozenset[str], Callable[[dict[str, Any]], bool] | None, asyncio.Future[dict[str, Any]]]] = []

    # ---- connecting ------------------------------------------------------------------------------
    @classmethod
    def connect(cls, url: str = DEFAULT_URL, token: str | None = None, resume: str | None = None, *,
                open_timeout: float = 10.0, event_buffer: int = 4096, resume_retry_s: float = 2.0) -> _Connecting:
        """Open a session: ``client = await AsyncClient.connect(url)`` or ``async with AsyncClient.connect(url) as client``.

        ``url`` is ``ws://host:port`` (the path defaults to ``/v1/realtime``); ``token`` is sent as
        ``Authorization: Bearer``; ``resume`` a resumption handle of an earlier connection, to continue
        that session (same id, conversation, watches and memory). Returns once ``session.created``
        and the first resumption handle arrived. A handle refused as ``invalid_resume_handle`` is retried for ``resume_retry_s``
        seconds, since the server may not have noticed the old connection drop yet. Raises
        :class:`ClientError` (``connection_failed``, ``http_error``, ``session_limit``,
        ``invalid_resume_handle``) or TimeoutError after ``open_timeout`` seconds.
        """
        async def opener() -> AsyncClient:
            client = cls(url, token, open_timeout=open_timeout, event_buffer=event_buffer, resume_retry_s=resume_retry_s)
            await client._open(resume)
            return client

        return _Connecting(opener)

    async def _open(self, resume: str | None) -> None:
        self._loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        deadline = time.monotonic() + self.resume_retry_s
        while True:
            try:
                await self._open_once(resume)
                return
            except ClientError as exc:
                if exc.code != "invalid_resume_handle" or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.1)

    async def _open_once(self, resume: str | None) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        target = realtime_url(self.url, resume)
        try:
            ws = await asyncio.wait_for(ws_connect(target, additional_headers=headers, max_size=None,
                                                   compression=None, open_timeout=None), self.open_timeout)
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
            raise ClientError("http_error", f"the server answered HTTP {status}: {body}", status=status) from exc
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            raise ClientError("connection_failed", f"cannot connect to {target}: {exc}") from exc
        try:
            first = json.loads(await asyncio.wait_for(ws.recv(), self.open_timeout))
        except (ConnectionClosed, ValueError) as exc:
            await ws.close()
            raise ClientError("connection_closed", f"the server closed the connection before session.created ({exc})") from exc
        except BaseException:
            await ws.close()
            raise
        if not isinstance(first, dict) or first.get("type") != "session.created":
            await ws.close()
            if isinstance(first, dict) and first.get("type") == "error":
                raise ClientError.from_event(first)
            raise ClientError("connection_closed", f"expected session.created, got {first!r:.200}")
        self._ws = ws
        self._lost = False
        self._dispatch(first)
        # The server follows session.created with a resumption handle: have it before returning.
        handle = self._loop.create_future() if self._loop is not None else None
        if handle is not None:
            self._waiters.append((frozenset({"session.resumption_update"}), None, handle))
        self._reader = asyncio.create_task(self._read(ws), name="streamvlm-client-reader")
        if handle is not None:
            with contextlib.suppress(asyncio.TimeoutError, ClientError):
                await asyncio.wait_for(asyncio.shield(handle), min(self.open_timeout, 2.0))

    async def reconnect(self) -> None:
        """Drop the connection and resume the session on a new one with the latest :attr:`handle`.

        Use it after ``session.go_away`` or a network failure. Questions still waiting fail with
        ``connection_closed`` (a response being generated is not replayed). Raises ClientError
        ``no_handle`` when no handle was received yet.
        """
        if self.handle is None:
            if self.session_id is not None and not self.resumable:
                raise ClientError("not_resumable", "the server said this session can no longer be resumed")
            raise ClientError("no_handle", "no session.resumption_update was received; nothing to resume")
        await self._disconnect()
        await self._open(self.handle)

    async def close(self) -> None:
        """Close the connection (idempotent). The session stays resumable on the server for its resume window."""
        await self._disconnect()
        self._connection_lost()

    async def _disconnect(self) -> None:
        ws, reader = self._ws, self._reader
        self._ws = None
        if ws is not None:
            await ws.close()
        if reader is not None:
            await reader

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """True while the WebSocket is open."""
        return self._ws is not None and not self._lost

    # ---- reading ---------------------------------------------------------------------------------
    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    continue  # the server sends no binary messages in this protocol version
                try:
                    event = json.loads(message)
                except ValueError:
                    continue
                if isinstance(event, dict) and isinstance(event.get("type"), str):
                    self._dispatch(event)
        except ConnectionClosed:
            pass
        finally:
            if self._ws is ws or self._ws is None:
                self._connection_lost()

    def _connection_lost(self) -> None:
        """Fail everything that waits on the server; end :meth:`events` unless a reconnect follows."""
        error = ClientError("connection_closed", "the connection to the server ended")
        for ask in [*self._unbound.values(), *self._asks.values()]:
            ask.fail(error)
        self._unbound.clear()
        self._asks.clear()
        for _, future in self._updates:
            _settle(future, error=error)
        self._updates.clear()
        for _, future in [*self._watch_created.values(), *self._watch_deleted.values()]:
            _settle(future, error=error)
        self._watch_created.clear()
        self._watch_deleted.clear()
        self._by_event_id.clear()
        for _, _, future in self._waiters:
            _settle(future, error=error)
        self._waiters.clear()
        self._lost = True
        if self._arrived is not None:
            self._arrived.set()

    def _dispatch(self, event: dict[str, Any]) -> None:
        """Update the client's state from one server event, settle whatever waited on it, and keep it."""
        kind = event["type"]
        if kind == "session.created":
            session = event.get("session") or {}
            self.session_id = session.get("id", self.session_id)
            self.model = session.get("model", self.model)
            self.session = {k: v for k, v in session.items() if k not in ("id", "protocol", "model", "limits")}
            with contextlib.suppress(TypeError, ValueError, StreamVLMError):
                known = {k: v for k, v in (session.get("limits") or {}).items() if k in Limits.__dataclass_fields__}
                self.limits = Limits(**known)
        elif kind == "session.resumption_update":
            # Handles rotate: only the newest one works. resumable false without a handle: the session
            # is closing and cannot be resumed any more.
            self.resumable = bool(event.get("resumable"))
            if event.get("new_handle"):
                self.handle = str(event["new_handle"])
            elif not self.resumable:
                self.handle = None
        elif kind == "session.updated":
            session = {k: v for k, v in (event.get("session") or {}).items() if k != "id"}
            self.session.update(session)
            if self._updates:
                event_id, future = self._updates.popleft()
                self._by_event_id.pop(event_id, None)
                _settle(future, session)
        elif kind in ("response.created", "response.acknowledged"):
            body = (event.get("response") or {}) if kind == "response.created" else event
            rid = body.get("id") if kind == "response.created" else event.get("response_id")
            if isinstance(rid, str) and rid not in self._asks:
                self._bind(body, rid, fifo=kind == "response.acknowledged" or body.get("trigger") == "user")
        elif kind == "response.output_text.delta":
            ask = self._asks.get(event.get("response_id"))  # type: ignore[arg-type]
            if ask is not None:
                if ask.first_delta_at is None:
                    ask.first_delta_at = time.monotonic()
                if ask.on_delta is not None:
                    with contextlib.suppress(Exception):
                        ask.on_delta(str(event.get("delta", "")))
        elif kind == "response.done":
            response = dict(event.get("response") or {})
            ask = self._asks.pop(response.get("id"), None)  # type: ignore[arg-type]
            if ask is None and isinstance(response.get("id"), str):  # ended before response.created bound it
                ask = self._bind(response, response["id"], fifo=False)
                self._asks.pop(response["id"], None)
            if ask is not None:
                self._finished[str(response["id"])] = ask
                while len(self._finished) > _FINISHED_KEPT:
                    self._finished.popitem(last=False)
                now = time.monotonic()
                response["text"] = response.get("output_text", "")
                response["ttft_s"] = None if ask.first_delta_at is None else ask.first_delta_at - ask.sent_at
                response["latency_s"] = now - ask.sent_at
                if response.get("status") == "failed":
                    ask.fail(ClientError.from_failed(response, ask.error))
                else:
                    _settle(ask.done, response)
        elif kind == "watch.created":
            watch = event.get("watch") or {}
            waiting = self._watch_created.pop(str(watch.get("id")), None)
            if waiting is not None:
                self._by_event_id.pop(waiting[0], None)
                _settle(waiting[1], watch)
        elif kind == "watch.deleted":
            waiting_d = self._watch_deleted.pop(str(event.get("watch_id")), None)
            if waiting_d is not None:
                self._by_event_id.pop(waiting_d[0], None)
                _settle(waiting_d[1], str(event.get("watch_id")))
        elif kind == "input_frame.stats":
            self.frame_stats = {k: int(event.get(k, 0)) for k in _STATS_KEYS}
        elif kind == "input_frame.rate":
            fps = event.get("fps") if event.get("limited") else None
            self.read_rate = float(fps) if isinstance(fps, (int, float)) and not isinstance(fps, bool) else None
        elif kind == "session.go_away":
            self.go_away = event
        elif kind == "error":
            err = event.get("error") or {}
            refused = self._by_event_id.pop(err.get("event_id"), None) if err.get("event_id") else None
            if refused is not None:
                refused(ClientError.from_event(event))
            elif err.get("response_id") in self._asks:  # about a running answer: its response.done follows
                self._asks[err["response_id"]].error = ClientError.from_event(event)
        self._keep(event)

    def _bind(self, body: Mapping[str, Any], rid: str, *, fifo: bool) -> _Ask | None:
        """Bind the question whose ``response.create`` the server names in ``client_event_id`` to
        response ``rid``. A server that does not echo ids at all gets the oldest waiting question when
        ``fifo`` (its user-triggered responses start in the order they were asked)."""
        if "client_event_id" in body:
            self._echoes_ids = True
        cid = body.get("client_event_id")
        if isinstance(cid, str):
            ask = self._unbound.pop(cid, None)
        elif fifo and not self._echoes_ids and self._unbound:
            ask = self._unbound.pop(next(iter(self._unbound)))
        else:
            ask = None
        if ask is None:
            return None
        for event_id in ask.event_ids:
            self._by_event_id.pop(event_id, None)
        ask.response_id = rid
        self._asks[rid] = ask
        _settle(ask.started, rid)
        return ask

    def _keep(self, event: dict[str, Any]) -> None:
        for waiter in list(self._waiters):
            kinds, predicate, future = waiter
            if future.done():
                self._waiters.remove(waiter)
            elif event["type"] in kinds and (predicate is None or predicate(event)):
                self._waiters.remove(waiter)
                _settle(future, event)
        if self._buffer_max == 0:
            self.events_dropped += 1
            return
        if len(self._buffer) >= self._buffer_max:
            self._buffer.popleft()
            self.events_dropped += 1
        self._buffer.append(event)
        if self._arrived is not None:
            self._arrived.set()

    async def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The oldest unread server event; None after ``timeout`` seconds without one, or once the
        connection has ended and every event was read."""
        assert self._arrived is not None, "connect() first"
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._buffer:
            if self._lost:
                return None
            self._arrived.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return None
        return self._buffer.popleft()

    async def events(self, timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every server event, in order (from ``session.created`` on), as dicts.

        Ends when the connection ends (call :meth:`reconnect` and iterate again), or after ``timeout``
        seconds without an event. Unknown event types are passed on as they are. Use one reader at a time.
        """
        while True:
            event = await self.next_event(timeout)
            if event is None:
                return
            yield event

    async def wait_for(self, *types: str, predicate: Callable[[dict[str, Any]], bool] | None = None,
                       timeout: float | None = None) -> dict[str, Any]:
        """Wait for the next server event of one of ``types`` (arriving after this call) that satisfies
        ``predicate``; independent of :meth:`events`. Raises TimeoutError or ClientError ``connection_closed``."""
        self._require_open()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        entry = (frozenset(types), predicate, future)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    # ---- sending ---------------------------------------------------------------------------------
    def _require_open(self) -> ClientConnection:
        if self._ws is None or self._lost:
            raise ClientError("connection_closed", "not connected (the connection ended or close() was called)")
        return self._ws

    def _event_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    async def send_event(self, event: dict[str, Any]) -> str:
        """Send one client event as it is (checked locally first); returns its ``event_id`` (one is added if missing).

        The low-level way in: nothing waits for the answer; read it from :meth:`events`.
        Raises ProtocolError when the event would be refused by the server's parser.
        """
        event = dict(event)
        event.setdefault("event_id", self._event_id())
        parse_client_object(event, self.limits)
        ws = self._require_open()
        try:
            await ws.send(json.dumps(event))
        except ConnectionClosed as exc:
            raise ClientError("connection_closed", "the connection ended while sending") from exc
        return str(event["event_id"])

    async def send_frame(self, image_rgb: np.ndarray | bytes, pts_s: float | None = None, source_id: str = "default",
                         *, quality: int = 85) -> None:
        """Send one video frame as a binary message.

        ``image_rgb`` is an HxWx3 uint8 RGB array (sent as JPEG at ``quality``) or the bytes of a JPEG or
        PNG file (sent as they are). ``pts_s`` is the frame's time in seconds (>= 0) on the client's
        clock; None lets the server stamp it on arrival. The server answers frames only with
        ``input_frame.stats`` (and ``error`` events for refused ones). Raises ProtocolError for an
        invalid image, time or source id, or an image over the server's size limit.
        """
        data = encode_frame(image_rgb, pts_s, source_id, quality)
        image_bytes = len(data) - FRAME_HEADER.size - len(source_id.encode("utf-8"))
        if image_bytes > self.limits.max_frame_bytes:
            raise ProtocolError("frame_too_large", f"image is {image_bytes} bytes, the server's limit is "
                                f"{self.limits.max_frame_bytes}", "image")
        ws = self._require_open()
        try:
            await ws.send(data)
        except ConnectionClosed as exc:
            raise ClientError("connection_closed", "the connection ended while sending a frame") from exc
        self.frames_sent += 1

    async def _submit(self, text: str, max_output_tokens: int | None, on_delta: Callable[[str], Any] | None) -> _Ask:
        item_id, response_id = self._event_id(), self._event_id()
        item = {"type": "conversation.item.create", "event_id": item_id,
                "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}
        create: dict[str, Any] = {"type": "response.create", "event_id": response_id}
        if max_output_tokens is not None:
            create["response"] = {"max_output_tokens": max_output_tokens}
        parse_client_object(item, self.limits)
        parse_client_object(create, self.limits)
        ws = self._require_open()
        assert self._loop is not None
        ask = _Ask(self._loop, (item_id, response_id), on_delta)

        def refused(error: ClientError) -> None:
            self._unbound.pop(ask.create_id, None)
            for event_id in ask.event_ids:
                self._by_event_id.pop(event_id, None)
            ask.fail(error)

        self._unbound[ask.create_id] = ask
        for event_id in ask.event_ids:
            self._by_event_id[event_id] = refused
        try:
            await ws.send(json.dumps(item))
            await ws.send(json.dumps(create))
        except ConnectionClosed as exc:
            raise ClientError("connection_closed", "the connection ended while sending a question") from exc
        return ask

    async def ask(self, text: str, *, max_output_tokens: int | None = None, on_delta: Callable[[str], Any] | None = None,
                  timeout: float | None = None) -> str:
        """Ask a question (``conversation.item.create`` + ``response.create``); returns the server's response id.

        Returns when the server took the question on (``response.created``, whose ``client_event_id``
        names this question's ``response.create``, so answers never land on the wrong question however
        responses interleave). Read the answer from :meth:`events` or with :meth:`result`; ``on_delta``
        is called with each piece of text as it arrives. ``max_output_tokens`` caps this answer only.
        Raises ClientError when the server refuses it (its ``code``), TimeoutError after ``timeout``.
        """
        ask = await self._submit(text, max_output_tokens, on_delta)
        return await asyncio.wait_for(asyncio.shield(ask.started), timeout)

    async def result(self, response_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for ``response.done`` of a response started by :meth:`ask` (or return it, if it already
        ended); returns it like :meth:`answer` and raises like it. ClientError ``response_not_found``
        for an id this client did not ask for."""
        ask = self._asks.get(response_id) or self._finished.get(response_id)
        if ask is None:
            raise ClientError("response_not_found", f"no question of this client is waiting for {response_id!r}")
        return await asyncio.wait_for(asyncio.shield(ask.done), timeout)

    async def answer(self, text: str, *, max_output_tokens: int | None = None, on_delta: Callable[[str], Any] | None = None,
                     timeout: float | None = None) -> dict[str, Any]:
        """Ask a question and wait for its answer: the ``response`` object of its ``response.done``.

        Keys: ``id``, ``status`` (``completed``, ``incomplete``, ``cancelled``, ...), ``trigger``,
        ``output_text``, ``evidence`` (``[{"pts_s", "source_id", "weight"}, ...]``, the frames in the
        answer's context, oldest first; the optional ``weight``, summing to 1, marks those it rests on
        most), ``question``, ``no_video``, ``client_event_id``, ``usage``; and, added by the client, ``text`` (= ``output_text``), ``ttft_s`` (seconds from
        sending the question to the first piece of text, None without text) and ``latency_s`` (to the
        end). ``on_delta`` is called with each piece of text as it streams in. A "tell me when ..."
        question returns when its condition held (or it was given up). ``status`` ``cancelled`` and
        ``incomplete`` are returned; a response that ended ``failed`` raises ClientError with the code
        the server gave (``response_failed`` if none) and the response in ``.response``. Otherwise
        raises as :meth:`ask`.
        """
        ask = await self._submit(text, max_output_tokens, on_delta)
        return await asyncio.wait_for(asyncio.shield(ask.done), timeout)

    async def update(self, session: Mapping[str, Any] | None = None, *, timeout: float | None = None,
                     **settings: Any) -> dict[str, Any]:
        """Change session settings (``session.update``) and return the settings in force (``session.updated``).

        Pass the nested ``session`` object of docs/protocol.md, or flat keywords: ``instructions``,
        ``max_new_tokens``, ``temperature`` (sampling), ``budget_tokens``, ``policy`` (memory),
        ``interrupt``, ``probe_every_frames``. With neither, an empty update is sent: the server
        answers at once, which makes it a cheap round-trip probe. Raises ClientError (e.g.
        ``setting_locked``) when the server refuses it.
        """
        body: dict[str, Any] = json.loads(json.dumps(dict(session or {})))
        groups = {"max_new_tokens": "sampling", "temperature": "sampling", "budget_tokens": "memory", "policy": "memory"}
        for key, value in settings.items():
            if key in groups:
                body.setdefault(groups[key], {})[key] = value
            elif key in ("instructions", "interrupt", "probe_every_frames"):
                body[key] = value
            else:
                raise ConfigError(f"{key}: not a session setting; use instructions, max_new_tokens, temperature, "
                                  "budget_tokens, policy, interrupt or probe_every_frames")
        event_id = self._event_id()
        event = {"type": "session.update", "event_id": event_id, "session": body}
        parse_client_object(event, self.limits)
        ws = self._require_open()
        assert self._loop is not None
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        entry = (event_id, future)

        def refused(error: ClientError) -> None:
            with contextlib.suppress(ValueError):
                self._updates.remove(entry)
            _settle(future, error=error)

        self._updates.append(entry)
        self._by_event_id[event_id] = refused
        return await self._send_and_wait(ws, event, future, timeout)

    async def watch(self, watch_id: str, condition: str, cooldown_s: float | None = None,
                    trigger: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> dict[str, Any]:
        """Raise an alert each time ``condition`` starts to hold (``watch.create``); returns the watch as
        the server registered it (``watch.created``).

        ``cooldown_s``: minimum seconds between two alerts. ``trigger``: the rule, e.g.
        ``{"kind": "threshold", "on": 0.7, "off": 0.4, "m": 2, "n": 3}`` (docs/protocol.md). Alerts
        arrive in :meth:`events` as ``response.done`` events with trigger ``watch`` and an ``alert``
        ``{watch_id, condition, t}``. Raises ClientError ``watch_exists`` for an id in use.
        """
        event_id = self._event_id()
        watch: dict[str, Any] = {"id": watch_id, "condition": condition}
        if cooldown_s is not None:
            watch["cooldown_s"] = cooldown_s
        if trigger is not None:
            watch["trigger"] = dict(trigger)
        event = {"type": "watch.create", "event_id": event_id, "watch": watch}
        parse_client_object(event, self.limits)
        return await self._keyed(event, watch_id, self._watch_created, timeout)

    async def unwatch(self, watch_id: str, *, timeout: float | None = None) -> None:
        """Remove a watch (``watch.delete``) and wait for ``watch.deleted``. Raises ClientError ``watch_not_found``."""
        event = {"type": "watch.delete", "event_id": self._event_id(), "watch_id": watch_id}
        parse_client_object(event, self.limits)
        await self._keyed(event, watch_id, self._watch_deleted, timeout)

    async def _keyed(self, event: dict[str, Any], key: str, table: dict[str, tuple[str, asyncio.Future[Any]]],
                     timeout: float | None) -> Any:
        ws = self._require_open()
        assert self._loop is not None
        if key in table:
            raise ClientError("request_pending", f"a request about {key!r} is already waiting for the server")
        event_id = str(event["event_id"])
        future: asyncio.Future[Any] = self._loop.create_future()
        table[key] = (event_id, future)

        def refused(error: ClientError) -> None:
            if table.get(key, (None,))[0] == event_id:
                del table[key]
            _settle(future, error=error)

        self._by_event_id[event_id] = refused
        return await self._send_and_wait(ws, event, future, timeout)

    @staticmethod
    async def _send_and_wait(ws: Any, event: dict[str, Any], future: asyncio.Future, timeout: float | None) -> Any:
        """Send ``event`` and wait for the server's reply to settle ``future``."""
        try:
            await ws.send(json.dumps(event))
        except ConnectionClosed as exc:
            raise ClientError("connection_closed", "the connection ended while sending") from exc
        return await asyncio.wait_for(asyncio.shield(future), timeout)

    async def cancel(self, response_id: str | None = None, *, timeout: float | None = None) -> dict[str, Any] | None:
        """Stop a response (``response.cancel``).

        With ``response_id``: waits for that response's ``response.done`` and returns its ``response``
        object (status ``cancelled``, or how it ended if it finished first); raises ClientError
        ``response_not_found`` when the server has no such response running or queued (it may have
        ended already), TimeoutError after ``timeout``.

        Without it, returns once sent: the answer being generated stops and the server drops the
        questions that have not started. Each still ends with its own ``response.done`` (status
        ``cancelled``), so their :meth:`ask`/:meth:`answer` calls return it. (Against a server that
        does not echo ``client_event_id``, questions not yet started fail with ClientError
        ``cancelled`` instead.)
        """
        event: dict[str, Any] = {"type": "response.cancel", "event_id": self._event_id()}
        if response_id is None:
            await self.send_event(event)
            if not self._echoes_ids:
                error = ClientError("cancelled", "the question was dropped by response.cancel before it started")
                for ask in list(self._unbound.values()):
                    for event_id in ask.event_ids:
                        self._by_event_id.pop(event_id, None)
                    ask.fail(error)
                self._unbound.clear()
            return None
        event["response_id"] = response_id
        parse_client_object(event, self.limits)
        ws = self._require_open()
        assert self._loop is not None
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        waiter = (frozenset({"response.done"}), lambda e: (e.get("response") or {}).get("id") == response_id, future)
        self._waiters.append(waiter)
        event_id = str(event["event_id"])
        self._by_event_id[event_id] = lambda error: _settle(future, error=error)
        try:
            done = await self._send_and_wait(ws, event, future, timeout)
        finally:
            self._by_event_id.pop(event_id, None)
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return dict(done.get("response") or {})

    # ---- streaming a camera ----------------------------------------------------------------------
    async def stream_camera(self, source: LiveSource | Iterable[Any], fps: float, *, source_id: str | None = None,
                            duration: float | None = None, quality: int = 85) -> dict[str, int]:
        """Send frames from ``source`` at ``fps`` frames per second until it ends, ``duration`` seconds
        pass, or the task is cancelled; returns counters ``read``, ``sent`` and ``replaced``.

        ``source`` is a :class:`streamvlm.ingest.LiveSource` (started here if it was not, and stopped
        at the end if so; its frames keep their ``pts_s`` and ``source_id``) or any iterable of HxWx3
        RGB arrays, JPEG/PNG bytes or objects with ``image``/``pts_s``/``source_id`` (arrays are
        stamped with seconds since the client connected). Latest wins: at each tick the newest frame
        is taken, and while the socket is still busy sending the previous one at most one frame waits;
        a newer one replaces it (counted in ``replaced``), so a slow link never builds a backlog.
        ``fps`` is capped at the server's ``max_frames_per_s``. Run it as a task next to your questions::

            streaming = asyncio.create_task(client.stream_camera(LiveSource(0), fps=2))
        """
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise ConfigError(f"fps: must be a finite number > 0, got {fps!r}")
        if duration is not None and not (isinstance(duration, (int, float)) and duration >= 0):
            raise ConfigError(f"duration: must be a number >= 0 or None, got {duration!r}")
        interval = 1.0 / min(float(fps), self.limits.max_frames_per_s)
        counts = {"read": 0, "sent": 0, "replaced": 0}
        slot: list[tuple[Any, float | None, str] | None] = [None]
        ready = asyncio.Event()
        finished = False

        async def sender() -> None:
            while True:
                await ready.wait()
                ready.clear()
                item, slot[0] = slot[0], None
                if item is None:
                    if finished:
                        return
                    continue
                await self.send_frame(item[0], item[1], item[2], quality=quality)
                counts["sent"] += 1

        live = hasattr(source, "wait_frame")
        started_here = False
        if live and not getattr(source, "running", True):
            source.start()  # type: ignore[union-attr]
            started_here = True
        frames: Iterator[Any] | None = None if live else iter(source)  # type: ignore[arg-type]
        last_pts: float | None = None
        task = asyncio.create_task(sender(), name="streamvlm-client-sender")
        start = began = time.monotonic()
        try:
            while duration is None or time.monotonic() - began < duration:
                if task.done():
                    break  # the sender failed: its exception is raised below
                if live:
                    frame = await asyncio.to_thread(source.wait_frame, max(1.0, interval), last_pts)  # type: ignore[union-attr]
                    if frame is None:
                        if not source.running:  # type: ignore[union-attr]
                            break
                        continue
                else:
                    assert frames is not None
                    frame = await asyncio.to_thread(next, frames, None)
                    if frame is None:
                        break
                counts["read"] += 1
                image, pts, sid = self._unpack(frame, source_id)
                if pts is not None:
                    last_pts = pts
                if slot[0] is not None:
                    counts["replaced"] += 1
                slot[0] = (image, pts, sid)
                ready.set()
                tick = start + counts["read"] * interval
                delay = tick - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:  # behind schedule: restart the clock instead of bursting to catch up
                    start = time.monotonic() - counts["read"] * interval
            finished = True
            ready.set()  # let the sender send the frame still waiting, then end
            await task
        except BaseException:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise
        finally:
            if started_here:
                await asyncio.to_thread(source.stop)  # type: ignore[union-attr]
        return counts

    def _unpack(self, frame: Any, source_id: str | None) -> tuple[Any, float | None, str]:
        if isinstance(frame, (np.ndarray, bytes, bytearray, memoryview)):
            return frame, time.monotonic() - self._t0, source_id or "default"
        image = getattr(frame, "image", None)
        if image is None:
            raise ConfigError(f"frames must be RGB arrays, image bytes or have an .image, got {type(frame).__name__}")
        pts = getattr(frame, "pts_s", None)
        sid = source_id or getattr(frame, "source_id", None) or "default"
        if not (isinstance(sid, str) and 1 <= len(sid) <= 128 and sid.isprintable()):
            sid = "camera"
        return image, None if pts is None else float(pts), sid


class Client:
    """The blocking twin of :class:`AsyncClient`, for code without an event loop.

    It runs an event loop in a daemon thread and forwards each call to the :class:`AsyncClient`
    there; every method has the async one's arguments and returns its result (``timeout`` where given
    bounds the wait). ``on_delta`` callbacks run on that thread. Use as a context manager or call
    :meth:`close`::

        with Client("ws://127.0.0.1:8765") as client:
            client.send_frame(rgb, pts_s=0.0)
            print(client.answer("What do you see?")["text"])
    """

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, resume: str | None = None, *,
                 open_timeout: float = 10.0, event_buffer: int = 4096, resume_retry_s: float = 2.0) -> None:
        """Connect at once (see :meth:`AsyncClient.connect`)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="streamvlm-client-loop", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._client: AsyncClient = self._call(AsyncClient.connect(
                url, token, resume, open_timeout=open_timeout, event_buffer=event_buffer, resume_retry_s=resume_retry_s))
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def connect(cls, url: str = DEFAULT_URL, token: str | None = None, resume: str | None = None, **options: Any) -> Client:
        """Same as the constructor, named like :meth:`AsyncClient.connect`."""
        return cls(url, token, resume, **options)

    def _call(self, awaitable: Awaitable[_T]) -> _T:
        if self._closed:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()  # never started: no "was never awaited" warning
            raise ClientError("connection_closed", "the client is closed")

        async def run() -> _T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    # ---- state -------------------------------------------------------------------------------------
    @property
    def session_id(self) -> str | None:
        """The session's id."""
        return self._client.session_id

    @property
    def handle(self) -> str | None:
        """The latest resumption handle."""
        return self._client.handle

    @property
    def session(self) -> dict[str, Any]:
        """The settings in force."""
        return self._client.session

    @property
    def limits(self) -> Limits:
        """The limits the connection enforces."""
        return self._client.limits

    @property
    def model(self) -> str | None:
        """The model the server runs (from ``session.created``)."""
        return self._client.model

    @property
    def go_away(self) -> dict[str, Any] | None:
        """The ``session.go_away`` event, once the server announced it will close the connection."""
        return self._client.go_away

    @property
    def resumable(self) -> bool:
        """Whether the server said the session can be resumed (see :attr:`AsyncClient.resumable`)."""
        return self._client.resumable

    @property
    def frame_stats(self) -> dict[str, int]:
        """The latest ``input_frame.stats`` counters."""
        return dict(self._client.frame_stats)

    @property
    def read_rate(self) -> float | None:
        """Frames per second the server reads from this session, when it caps them (see :attr:`AsyncClient.read_rate`)."""
        return self._client.read_rate

    @property
    def connected(self) -> bool:
        """True while the WebSocket is open."""
        return self._client.connected

    @property
    def async_client(self) -> AsyncClient:
        """The :class:`AsyncClient` underneath (its coroutines must run on this client's loop)."""
        return self._client

    # ---- requests ----------------------------------------------------------------------------------
    def send_frame(self, image_rgb: np.ndarray | bytes, pts_s: float | None = None, source_id: str = "default",
                   *, quality: int = 85) -> None:
        """See :meth:`AsyncClient.send_frame`."""
        self._call(self._client.send_frame(image_rgb, pts_s, source_id, quality=quality))

    def send_event(self, event: dict[str, Any]) -> str:
        """See :meth:`AsyncClient.send_event`."""
        return self._call(self._client.send_event(event))

    def ask(self, text: str, *, max_output_tokens: int | None = None, on_delta: Callable[[str], Any] | None = None,
            timeout: float | None = None) -> str:
        """See :meth:`AsyncClient.ask`."""
        return self._call(self._client.ask(text, max_output_tokens=max_output_tokens, on_delta=on_delta, timeout=timeout))

    def result(self, response_id: str, timeout: float | None = None) -> dict[str, Any]:
        """See :meth:`AsyncClient.result`."""
        return self._call(self._client.result(response_id, timeout))

    def answer(self, text: str, *, max_output_tokens: int | None = None, on_delta: Callable[[str], Any] | None = None,
               timeout: float | None = None) -> dict[str, Any]:
        """See :meth:`AsyncClient.answer`."""
        return self._call(self._client.answer(text, max_output_tokens=max_output_tokens, on_delta=on_delta, timeout=timeout))

    def update(self, session: Mapping[str, Any] | None = None, *, timeout: float | None = None, **settings: Any) -> dict[str, Any]:
        """See :meth:`AsyncClient.update`."""
        return self._call(self._client.update(session, timeout=timeout, **settings))

    def watch(self, watch_id: str, condition: str, cooldown_s: float | None = None,
              trigger: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> dict[str, Any]:
        """See :meth:`AsyncClient.watch`."""
        return self._call(self._client.watch(watch_id, condition, cooldown_s, trigger, timeout=timeout))

    def unwatch(self, watch_id: str, *, timeout: float | None = None) -> None:
        """See :meth:`AsyncClient.unwatch`."""
        self._call(self._client.unwatch(watch_id, timeout=timeout))

    def cancel(self, response_id: str | None = None, *, timeout: float | None = None) -> dict[str, Any] | None:
        """See :meth:`AsyncClient.cancel`."""
        return self._call(self._client.cancel(response_id, timeout=timeout))

    def wait_for(self, *types: str, predicate: Callable[[dict[str, Any]], bool] | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
        """See :meth:`AsyncClient.wait_for`."""
        return self._call(self._client.wait_for(*types, predicate=predicate, timeout=timeout))

    def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """See :meth:`AsyncClient.next_event`."""
        return self._call(self._client.next_event(timeout))

    def events(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Every server event in order, as a generator; stops after ``timeout`` seconds without one
        (never, with None) or when the connection ends."""
        while True:
            event = self.next_event(timeout)
            if event is None:
                return
            yield event

    def stream_camera(self, source: LiveSource | Iterable[Any], fps: float, *, source_id: str | None = None,
                      duration: float | None = None, quality: int = 85) -> concurrent.futures.Future[dict[str, int]]:
        """Start :meth:`AsyncClient.stream_camera` in the background and return at once.

        The returned future's ``result()`` waits for the end (the counters); ``cancel()`` stops streaming.
        """
        if self._closed:
            raise ClientError("connection_closed", "the client is closed")
        coro = self._client.stream_camera(source, fps, source_id=source_id, duration=duration, quality=quality)
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def reconnect(self) -> None:
        """See :meth:`AsyncClient.reconnect`."""
        self._call(self._client.reconnect())

    def close(self) -> None:
        """Close the connection, stop background streaming and the loop thread (idempotent)."""
        if self._closed:
            return
        try:
            self._call(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(cancel_rest(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
