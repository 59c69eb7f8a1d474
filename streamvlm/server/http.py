"""The server's HTTP side: routes, the Host allowlist, the bearer token and the browser origin check.

:func:`process_request` is the websockets server's ``process_request`` hook. It answers plain HTTP
requests itself and returns ``None`` only for a WebSocket upgrade on :data:`REALTIME_PATH` that passed
every check; the server then completes the handshake and runs the session. It knows nothing about
sessions: what it serves comes from the config, the metrics and the ``ready`` text.

Checks, in order (the first that fails answers):

1. ``/healthz`` answers ``ok`` to anyone (liveness probes send whatever ``Host`` they like).
2. The request has exactly one well-formed ``Host`` header, else 400.
3. That host is allowed (:class:`AllowedHosts`), else 403 with how to allow it. This is what stops
   DNS rebinding: a page on ``evil.example`` whose name now resolves to 127.0.0.1 still sends
   ``Host: evil.example``.
4. Routes: ``/readyz``, ``/metrics``, ``/`` and ``/index.html`` (the web client) and ``/favicon.ico``, else 404 unless
   the path is :data:`REALTIME_PATH`.
5. For the WebSocket: the bearer token when the server has one (``Authorization: Bearer ...`` or
   ``?access_token=...``), else 401; a browser's ``Origin`` must be on an allowed host or listed in
   ``allowed_origins``, else 403.

A header the checks read that comes twice (``Host``, ``Origin``, ``Authorization``) is a 400, never
a server error. Every refusal counts in ``streamvlm_http_rejected_total{reason}``.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from ..config import ServerConfig
from ..errors import ConfigError, InputError
from .metrics import ServerMetrics

__all__ = ["REALTIME_PATH", "AllowedHosts", "HostName", "parse_host", "process_request"]

#: The WebSocket endpoint of the realtime API.
REALTIME_PATH = "/v1/realtime"
_STATIC = Path(__file__).parent / "static"
#: Addresses that mean "every interface": binding one says nothing about the names clients use.
_ANY_ADDRESS = ("", "0.0.0.0", "::")
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?))(?::(?P<port>\d{0,5}))?",
                   re.ASCII)
_TEXT = "text/plain; charset=utf-8"
#: Answered before any check: liveness probes send whatever Host they like, and "ok" tells nobody anything.
_PROBES = ("/healthz",)


@dataclass(frozen=True)
class HostName:
    """A host as compared: ``name`` lower-case without a trailing dot (IP addresses in canonical form,
    IPv6 without brackets) and ``port``, None when not given (the scheme's default port)."""

    name: str
    port: int | None = None

    def __str__(self) -> str:
        name = f"[{self.name}]" if ":" in self.name else self.name
        return name if self.port is None else f"{name}:{self.port}"


def parse_host(value: str) -> HostName:
    """Parse a ``Host`` header or an ``--allowed-host`` entry: ``name``, ``name:port``, ``[v6]``,
    ``[v6]:port``, or a bare IPv6 address (no port). Raises :class:`InputError` for anything else."""
    text = value.strip()
    if text.count(":") >= 2 and not text.startswith("["):
        text = f"[{text}]"  # a bare IPv6 address
    match = _HOST.fullmatch(text)
    if match is None:
        raise InputError(f"host: {value[:100]!r} is not a host name or address with an optional :port")
    port = int(match["port"]) if match["port"] else None
    if port is not None and port > 65535:
        raise InputError(f"host: port {port} is out of range")
    if match["v6"] is not None:
        try:
            return HostName(str(ipaddress.IPv6Address(match["v6"])), port)
        except ValueError:
            raise InputError(f"host: {value[:100]!r} is not an IPv6 address") from None
    name = match["name"].rstrip(".").lower()
    try:
        name = str(ipaddress.IPv4Address(name))
    except ValueError:
        pass  # a name
    return HostName(name, port)


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class AllowedHosts:
    """The hosts a request may name: loopback (any port), the bound ``host`` unless it binds every
    address (any port), and the ``allowed_hosts`` entries (a port, when given, must match).

    A host without a port (the scheme's default) matches an entry without a port or with port 80 or
    443. Build with :meth:`from_config`; ask with :meth:`allows` or :meth:`allows_origin`.
    """

    def __init__(self, entries: Iterable[HostName]) -> None:
        self.entries = tuple(entries)

    @classmethod
    def from_config(cls, config: ServerConfig) -> AllowedHosts:
        """Raises :class:`ConfigError` for an entry of ``allowed_hosts`` that is not a host."""
        entries: list[HostName] = []
        if config.host not in _ANY_ADDRESS:
            try:
                entries.append(HostName(parse_host(config.host).name))
            except InputError:
                pass  # not a name a client can send (the OS resolved it when binding)
        for entry in config.allowed_hosts:
            try:
                entries.append(parse_host(entry))
            except InputError as e:
                raise ConfigError(f"allowed_hosts: {e}") from None
        return cls(entries)

    def allows(self, host: HostName) -> bool:
        if _is_loopback(host.name):
            return True
        return any(e.name == host.name and (e.port is None or e.port == host.port or (host.port is None and e.port in (80, 443)))
                   for e in self.entries)

    def allows_origin(self, origin: str, allowed_origins: Iterable[str] = ()) -> bool:
        """An ``Origin`` header: listed in ``allowed_origins``, or ``http(s)://`` on an allowed host."""
        if origin in allowed_origins:
            return True
        try:
            url = urlsplit(origin)
            if url.scheme not in ("http", "https") or not url.netloc or url.path or url.query or url.fragment:
                return False
            return self.allows(parse_host(url.netloc))
        except (ValueError, InputError):
            return False


class _Refusal(Exception):
    def __init__(self, status: HTTPStatus, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def _one(headers: Headers, name: str, *, required: bool = False) -> str | None:
    """The value of a header that must not repeat: 400 when it does (or is missing and ``required``)."""
    values = headers.get_all(name)
    if len(values) > 1:
        raise _Refusal(HTTPStatus.BAD_REQUEST, "bad_request", f"the {name} header must be sent once, not {len(values)} times\n")
    if not values and required:
        raise _Refusal(HTTPStatus.BAD_REQUEST, "bad_request", f"a {name} header is required\n")
    return values[0] if values else None


def process_request(connection: ServerConnection, request: Request, *, config: ServerConfig,
                    metrics: ServerMetrics, ready: str | None) -> Response | None:
    """Answer an HTTP request, or return None to go on with the WebSocket upgrade on :data:`REALTIME_PATH`.

    Bind the keywords once and pass the result to ``websockets.asyncio.server.serve(...,
    process_request=functools.partial(process_request, config=..., metrics=..., ready=...))``.
    ``ready`` is the text ``/readyz`` shows after ``ready`` (the model's source); None answers 503
    ("loading"). Refusals are plain-text responses that say what to change; nothing a client sends
    makes this raise.
    """
    path, _, query = request.path.partition("?")
    if path in _PROBES:
        return _respond(connection, HTTPStatus.OK, b"ok\n", _TEXT)
    allowed = AllowedHosts.from_config(config)
    try:
        _check_host(request.headers, allowed)
        if path == "/readyz":
            if ready is None:
                return _respond(connection, HTTPStatus.SERVICE_UNAVAILABLE, b"loading\n", _TEXT)
            return _respond(connection, HTTPStatus.OK, f"ready {ready}\n".encode(), _TEXT)
        if path == "/metrics":
            body, content_type = metrics.render(",".join(request.headers.get_all("Accept")))
            return _respond(connection, HTTPStatus.OK, body, content_type)
        if path in ("/", "/index.html"):
            return _respond(connection, HTTPStatus.OK, (_STATIC / "index.html").read_bytes(), "text/html; charset=utf-8")
        if path == "/favicon.ico":
            return _respond(connection, HTTPStatus.OK, (_STATIC / "favicon.ico").read_bytes(), "image/x-icon")
        if path != REALTIME_PATH:
            raise _Refusal(HTTPStatus.NOT_FOUND, "not_found", "not found\n")
        _check_token(request.headers, parse_qs(query), config.token)
        _check_origin(request.headers, allowed, config.allowed_origins)
    except _Refusal as refusal:
        metrics.http_refused(refusal.reason)
        return _respond(connection, refusal.status, refusal.message.encode(), _TEXT)
    return None


def _check_host(headers: Headers, allowed: AllowedHosts) -> None:
    try:
        host = parse_host(_one(headers, "Host", required=True) or "")
    except InputError:
        raise _Refusal(HTTPStatus.BAD_REQUEST, "bad_request", "the Host header is not a host name or address with an optional :port\n") from None
    if not allowed.allows(host):
        raise _Refusal(HTTPStatus.FORBIDDEN, "host",
                       f"this server does not answer for host {str(host)!r}; if clients reach it by that name, start it with "
                       f"--allowed-host {HostName(host.name)} (ServerConfig.allowed_hosts)\n")


def _check_token(headers: Headers, query: dict[str, list[str]], token: str | None) -> None:
    if not token:
        return
    given = _one(headers, "Authorization") or ""
    scheme, _, credentials = given.partition(" ")
    if scheme.lower() == "bearer":
        presented = credentials.strip()
    else:
        presented = (query.get("access_token") or [""])[0]
    if not hmac.compare_digest(presented.encode(), token.encode()):
        raise _Refusal(HTTPStatus.UNAUTHORIZED, "unauthorized",
                       "a valid bearer token is required (Authorization: Bearer TOKEN, or ?access_token=TOKEN)\n")


def _check_origin(headers: Headers, allowed: AllowedHosts, allowed_origins: tuple[str, ...]) -> None:
    origin = _one(headers, "Origin")
    if origin is not None and not allowed.allows_origin(origin, allowed_origins):
        raise _Refusal(HTTPStatus.FORBIDDEN, "origin",
                       f"origin {origin[:200]!r} is not allowed; serve the page from an allowed host "
                       f"(--allowed-host) or start the server with --allowed-origin {origin[:200]}\n")


def _respond(connection: ServerConnection, status: HTTPStatus, body: bytes, content_type: str) -> Response:
    response = connection.respond(status, "")
    response.body = body
    del response.headers["Content-Length"]
    del response.headers["Content-Type"]
    response.headers["Content-Length"] = str(len(body))
    response.headers["Content-Type"] = content_type
    return response
