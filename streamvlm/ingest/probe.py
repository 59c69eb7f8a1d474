"""Asking a network camera why it refused: one HTTP GET or RTSP DESCRIBE, status line and headers only.

OpenCV's FFmpeg backend reports a failed open as "cannot open" and hides the server's answer, so a
camera URL with a typo (404), wrong credentials (401) or no permission (403) would look like a camera
that is off and be retried forever. After an open fails, :func:`probe` asks the server once itself
and :func:`is_permanent` says whether its answer will not change by retrying.

The probe sends the URL's credentials (Basic, or Digest when the server asks for it), reads only the
status line and headers (an MJPEG stream's body is never read), and never raises: a probe that cannot
connect, times out or gets no parseable answer returns a result without a status, which callers treat
as temporary. No state, no threads; the caller passes the timeout.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import urllib.parse
from dataclasses import dataclass

__all__ = ["ProbeResult", "probe", "is_permanent", "PERMANENT_STATUSES"]

PERMANENT_STATUSES: frozenset[int] = frozenset({400, 401, 402, 403, 404, 405, 406, 407, 410, 414, 415, 451})
"""Answers that mean "this URL will not work as given" (retrying cannot help); 408, 429 and 5xx are temporary."""

_DEFAULT_PORTS = {"http": 80, "https": 443, "rtsp": 554, "rtsps": 322}
_MAX_HEADER_BYTES = 16 * 1024


@dataclass(frozen=True)
class ProbeResult:
    """What the server said: ``status`` (None when there was no answer) and a short human-readable ``reason``."""

    status: int | None
    reason: str

    def __str__(self) -> str:
        return self.reason


def is_permanent(result: ProbeResult) -> bool:
    """True when the server's answer will not change by retrying (e.g. 401, 403, 404)."""
    return result.status in PERMANENT_STATUSES


def probe(url: str, timeout_s: float) -> ProbeResult:
    """Ask the server behind an ``http(s)://`` or ``rtsp(s)://`` ``url`` for it once; never raises.

    At most two requests (the second only to answer an authentication challenge), each bounded by
    ``timeout_s`` for connecting and for reading the answer's headers.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            return ProbeResult(None, f"cannot probe {scheme or 'this'} URL")
        status, reason, headers = _ask(parts, scheme, timeout_s, authorization=_basic(parts))
        if status == 401 and parts.username is not None:
            challenge = headers.get("www-authenticate", "")
            if challenge.lower().startswith("digest"):
                answer = _digest(parts, _method(scheme), _target(parts, scheme), challenge)
                status, reason, headers = _ask(parts, scheme, timeout_s, authorization=answer)
        protocol = "RTSP" if scheme.startswith("rtsp") else "HTTP"
        return ProbeResult(status, f"{protocol} {status} {reason}".rstrip())
    except (OSError, ValueError, UnicodeError) as exc:
        return ProbeResult(None, f"no answer to a probe ({exc.__class__.__name__}: {exc})")


def _method(scheme: str) -> str:
    return "DESCRIBE" if scheme.startswith("rtsp") else "GET"


def _target(parts: urllib.parse.SplitResult, scheme: str) -> str:
    """The request target: the full URL without credentials for RTSP, the path and query for HTTP."""
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if scheme.startswith("rtsp"):
        host = parts.hostname if ":" not in (parts.hostname or "") else f"[{parts.hostname}]"
        port = f":{parts.port}" if parts.port else ""
        return f"{scheme}://{host}{port}{path}"
    return path


def _ask(parts: urllib.parse.SplitResult, scheme: str, timeout_s: float, authorization: str | None) -> tuple[int, str, dict[str, str]]:
    """Send one request and return (status, reason phrase, headers lower-cased); OSError/ValueError on failure."""
    host = parts.hostname or ""
    port = parts.port or _DEFAULT_PORTS[scheme]
    lines = [f"{_method(scheme)} {_target(parts, scheme)} {'RTSP/1.0' if scheme.startswith('rtsp') else 'HTTP/1.1'}"]
    if scheme.startswith("rtsp"):
        lines += ["CSeq: 1", "Accept: application/sdp"]
    else:
        lines += [f"Host: {parts.netloc.rpartition('@')[2]}", "Accept: */*", "Connection: close"]
    lines.append("User-Agent: streamvlm-probe")
    if authorization:
        lines.append(f"Authorization: {authorization}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    raw = socket.create_connection((host, port), timeout=timeout_s)
    try:
        sock = ssl.create_default_context().wrap_socket(raw, server_hostname=host) if scheme in ("https", "rtsps") else raw
        with sock:
            sock.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < _MAX_HEADER_BYTES:
                block = sock.recv(4096)
                if not block:
                    break
                head += block
    finally:
        raw.close()
    text = head.split(b"\r\n\r\n", 1)[0].decode("iso-8859-1")
    status_line, *header_lines = text.split("\r\n")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith(("HTTP/", "RTSP/")) or not code.isdigit():
        raise ValueError(f"not an HTTP/RTSP answer: {status_line[:60]!r}")
    headers = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(code), reason.strip(), headers


def _basic(parts: urllib.parse.SplitResult) -> str | None:
    if parts.username is None:
        return None
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _digest(parts: urllib.parse.SplitResult, method: str, uri: str, challenge: str) -> str:
    """The Digest (MD5, RFC 2617) answer to ``challenge`` with the URL's credentials."""
    fields = dict(_challenge_fields(challenge[len("digest"):]))
    realm, nonce = fields.get("realm", ""), fields.get("nonce", "")
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")

    def md5(text: str) -> str:
        return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()

    ha1, ha2 = md5(f"{user}:{realm}:{password}"), md5(f"{method}:{uri}")
    answer = {"username": user, "realm": realm, "nonce": nonce, "uri": uri}
    if "auth" in [q.strip() for q in fields.get("qop", "").split(",")]:
        cnonce = os.urandom(8).hex()
        answer.update(qop="auth", nc="00000001", cnonce=cnonce, response=md5(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}"))
    else:
        answer["response"] = md5(f"{ha1}:{nonce}:{ha2}")
    if "opaque" in fields:
        answer["opaque"] = fields["opaque"]
    unquoted = {"qop", "nc"}
    return "Digest " + ", ".join(f"{k}={v}" if k in unquoted else f'{k}="{v}"' for k, v in answer.items())


def _challenge_fields(text: str) -> list[tuple[str, str]]:
    """``key=value`` pairs of an authentication challenge (values quoted or not)."""
    out, i = [], 0
    while i < len(text):
        while i < len(text) and text[i] in " ,":
            i += 1
        eq = text.find("=", i)
        if eq < 0:
            break
        key = text[i:eq].strip().lower()
        i = eq + 1
        if i < len(text) and text[i] == '"':
            end = text.find('"', i + 1)
            end = len(text) if end < 0 else end
            out.append((key, text[i + 1 : end]))
            i = end + 1
        else:
            end = text.find(",", i)
            end = len(text) if end < 0 else end
            out.append((key, text[i:end].strip()))
            i = end
    return out
