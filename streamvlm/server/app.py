"""The server: one port for the realtime WebSocket API, the web client page, health and metrics.

The websockets transport (the single-machine default) over :class:`~.driver.SessionHost`, which holds
everything that does not depend on the transport: the Sans-I/O cores (a
:class:`~streamvlm.protocol.Connection` per connection, a
:class:`~streamvlm.protocol.session.RealtimeSession` per session), each session's model thread,
admission, the bounded outbox, resumption and metrics (see :mod:`.driver`). This module binds the
port, answers HTTP through :func:`.http.process_request` (hosts, origins, token) and hands each
accepted WebSocket to the host. :mod:`.asgi` is the same API for ASGI servers and Ray Serve.

Routes: ``/`` (the web client), ``/healthz`` (alive), ``/readyz`` (model loaded), ``/metrics``
(Prometheus text), ``/v1/realtime`` (the WebSocket API, see docs/protocol.md).
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from .. import protocol as p
from ..config import ServerConfig
from ..models.base import ModelAdapter
from .driver import OUTBOX_HARD as _OUTBOX_HARD
from .driver import OUTBOX_SOFT as _OUTBOX_SOFT
from .driver import Outbox as _Outbox
from .driver import SessionHost, SocketClosed
from .http import process_request

__all__ = ["StreamServer"]
# The outbox and its bounds live in .driver; the names stay importable from here.
_ = (_OUTBOX_HARD, _OUTBOX_SOFT, _Outbox)


class _WebsocketsSocket:
    """A websockets connection as the host's :class:`~.driver.Socket`."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.path = ws.request.path if ws.request is not None else "/"

    async def recv(self) -> str | bytes:
        try:
            return await self.ws.recv()
        except ConnectionClosed:
            raise SocketClosed from None

    async def send(self, text: str) -> None:
        try:
            await self.ws.send(text)
        except ConnectionClosed:
            raise SocketClosed from None

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)


class StreamServer(SessionHost):
    """Serve one loaded model to many realtime sessions on one port. ``await start()``, then ``await stop()``."""

    def __init__(self, adapter: ModelAdapter, config: ServerConfig | None = None, *, limits: p.Limits | None = None,
                 handoff: Any = None) -> None:
        super().__init__(adapter, config, limits=limits, handoff=handoff)
        self._server: Any = None

    async def start(self) -> tuple[str, int]:
        """Bind the port and start serving; returns the bound ``(host, port)``."""
        self._server = await serve(
            self._handle, self.config.host, self.config.port, compression=None,
            process_request=partial(process_request, config=self.config, metrics=self.metrics, ready=self.adapter.source),
            # Messages over the limit get a message_too_large error event from the Connection; only past
            # this hard ceiling does the socket layer close the connection (1009).
            max_size=4 * self.limits.max_message_bytes,
        )
        self.start_loops()
        sock = next(iter(self._server.sockets))
        return sock.getsockname()[0], sock.getsockname()[1]

    async def stop(self) -> None:
        """Tell every client (``session.go_away``, then ``session_closed``), stop every worker, close the port."""
        await self.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, ws: ServerConnection) -> None:
        await self.handle(_WebsocketsSocket(ws))


async def serve_forever(adapter: ModelAdapter, config: ServerConfig, handoff: Any = None) -> None:
    """Run the server until cancelled (Ctrl-C). With a :class:`~.handoff.Handoff`, sessions are snapshotted
    to its directory and resume after a restart (or on another server sharing it)."""
    server = StreamServer(adapter, config, handoff=handoff)
    host, port = await server.start()
    print(f"streamvlm: serving {adapter.source} on http://{host}:{port}/ (realtime API: ws://{host}:{port}/v1/realtime)", flush=True)
    try:
        await asyncio.Future()
    finally:
        await server.stop()
