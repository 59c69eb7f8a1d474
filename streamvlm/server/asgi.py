"""The realtime API as an ASGI application: the same routes, checks and sessions as :mod:`.app`, for
ASGI servers (uvicorn) and Ray Serve.

:class:`RealtimeApp` is a thin transport over :class:`~.driver.SessionHost`, built on Starlette's
request and WebSocket helpers. Every HTTP request and WebSocket handshake goes through the same
:func:`.http.process_request` as the websockets server (``/healthz``, the Host allowlist, ``/readyz``,
``/metrics``, the web page, the bearer token, the browser origin), so both transports refuse and
answer alike; an accepted WebSocket on ``/v1/realtime`` is handed to the host, which runs the
session. A refused WebSocket gets the HTTP refusal itself where the server supports the ASGI
WebSocket denial response extension (uvicorn does), else a close before the handshake (HTTP 403).

Run it with :class:`UvicornServer` (``await start()`` / ``await stop()``, like
:class:`~.app.StreamServer`), any ASGI server (``uvicorn module:app``; lifespan events start and stop
the host), or Ray Serve (:mod:`streamvlm.deploy.serve`). Messages larger than four times
``limits.max_message_bytes`` close the connection with 1009, as on the websockets server; smaller
ones over the limit are an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

from starlette.responses import Response as StarletteResponse
from starlette.websockets import WebSocket
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .driver import SessionHost, SocketClosed
from .http import REALTIME_PATH, process_request

__all__ = ["RealtimeApp", "UvicornServer"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
#: Response header naming the replica that answered (Ray Serve: the replica id), when there is one.
REPLICA_HEADER = "X-Streamvlm-Replica"


class _Responder:
    """What :func:`.http.process_request` needs of a connection: plain-text responses."""

    @staticmethod
    def respond(status: HTTPStatus, text: str) -> Response:
        body = text.encode()
        headers = Headers()
        headers["Content-Length"] = str(len(body))
        headers["Content-Type"] = "text/plain; charset=utf-8"
        return Response(int(status), HTTPStatus(status).phrase, headers, body)


def _request(scope: Scope) -> Request:
    """The ASGI request as the websockets request object the HTTP checks read (path with query, headers)."""
    query = scope.get("query_string", b"").decode("latin-1")
    path = scope.get("raw_path") or scope["path"].encode()
    target = path.decode("latin-1") if isinstance(path, bytes) else str(path)
    if query:
        target = f"{target}?{query}"
    headers = Headers()
    for name, value in scope.get("headers", []):
        headers[name.decode("latin-1")] = value.decode("latin-1")
    return Request(target, headers)


class _AsgiSocket:
    """An accepted Starlette WebSocket as the host's :class:`~.driver.Socket`."""

    def __init__(self, ws: WebSocket, path: str, max_bytes: int) -> None:
        self.ws = ws
        self.path = path
        self.max_bytes = max_bytes
        self.closed = False

    async def recv(self) -> str | bytes:
        if self.closed:
            raise SocketClosed
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            self.closed = True
            raise SocketClosed
        data = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
        if len(data) > self.max_bytes:  # the hard ceiling: as the websockets server does
            await self.close(1009, "message too big")
            raise SocketClosed
        return data

    async def send(self, text: str) -> None:
        if self.closed:
            raise SocketClosed
        try:
            await self.ws.send_text(text)
        except Exception:  # the peer went away (each server says it differently)
            self.closed = True
            raise SocketClosed from None

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)


class RealtimeApp:
    """An ASGI application serving ``host``'s sessions: ``/v1/realtime`` and the HTTP routes.

    ``replica`` (optional) names this process in a :data:`REPLICA_HEADER` response header and
    labels its metrics; ``ready`` is what ``/readyz`` reports (default: the model's source).
    Lifespan ``startup`` starts the host's loops (a first connection does too); ``shutdown`` closes
    the host (every session told, workers stopped).
    """

    def __init__(self, host: SessionHost, *, replica: str | None = None) -> None:
        self.host = host
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind not in ("http", "websocket"):
            raise ValueError(f"unsupported ASGI scope type {kind!r}")
        request = _request(scope)
        host = self.host
        refusal = process_request(_Responder(), request, config=host.config, metrics=host.metrics, ready=host.adapter.source)
        if kind == "http":
            if refusal is None:  # /v1/realtime without an upgrade
                refusal = _Responder.respond(HTTPStatus.UPGRADE_REQUIRED, f"{REALTIME_PATH} is a WebSocket endpoint\n")
            await self._http(refusal)(scope, receive, send)
            return
        ws = WebSocket(scope, receive, send)
        if refusal is not None:
            await self._deny(ws, scope, refusal)
            return
        headers = [(REPLICA_HEADER.lower().encode(), self.replica.encode())] if self.replica else None
        await ws.accept(headers=headers)
        host.start_loops()
        await host.handle(_AsgiSocket(ws, request.path, 4 * host.limits.max_message_bytes))

    def _http(self, response: Response) -> StarletteResponse:
        headers = {k: v for k, v in response.headers.raw_items() if k.lower() not in ("content-length", "connection", "date")}
        if self.replica:
            headers[REPLICA_HEADER] = self.replica
        return StarletteResponse(bytes(response.body), response.status_code, headers=headers)

    async def _deny(self, ws: WebSocket, scope: Scope, response: Response) -> None:
        if "websocket.http.response" in scope.get("extensions", {}):
            await ws.send_denial_response(self._http(response))
        else:  # the server cannot send a response: a close before the handshake is an HTTP 403
            await ws.close(1008)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.host.start_loops()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.host.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


class UvicornServer:
    """:class:`RealtimeApp` on uvicorn in the running event loop: ``await start()`` returns ``(host,
    port)`` (port 0 in the config picks a free one); ``await stop()`` ends every session and the server."""

    def __init__(self, host: SessionHost, *, replica: str | None = None) -> None:
        import uvicorn

        self.host = host
        self.app = RealtimeApp(host, replica=replica)
        config = uvicorn.Config(self.app, host=host.config.host, port=host.config.port, lifespan="on",
                                log_level="warning", access_log=False, ws_per_message_deflate=False,
                                ws_max_size=4 * host.limits.max_message_bytes + 1)
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> tuple[str, int]:
        # uvicorn's own signal handlers would take Ctrl-C from the caller, who owns the process
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start (port in use, ...)
                raise OSError("uvicorn stopped before it started")
            await asyncio.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        return sock.getsockname()[0], sock.getsockname()[1]

    async def stop(self) -> None:
        """End every session (lifespan shutdown) and stop listening."""
        await self.host.close()  # the clients are told before uvicorn drops their connections
        self.server.should_exit = True
        if self._task is not None:
            await self._task
