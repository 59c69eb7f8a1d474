"""The server's HTTP side with real peers on 127.0.0.1: a websockets server whose ``process_request``
is :func:`streamvlm.server.http.process_request`, reached by the websockets client and by raw sockets
(for what a client library would not send: a second Host header, none at all)."""

from __future__ import annotations

import asyncio
import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import InvalidStatus
from websockets.server import ServerProtocol

from streamvlm.cli import build_parser
from streamvlm.config import ServerConfig
from streamvlm.errors import ConfigError, InputError
from streamvlm.server.http import AllowedHosts, HostName, parse_host, process_request
from streamvlm.server.metrics import ServerMetrics


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


class Served:
    """A websockets server on 127.0.0.1 with the project's HTTP checks and a handler that greets."""

    def __init__(self, config: ServerConfig, ready: str | None) -> None:
        self.config, self.ready = config, ready
        self.metrics = ServerMetrics()
        self.sessions = 0

    async def __aenter__(self) -> Served:
        async def handler(ws) -> None:
            self.sessions += 1
            await ws.send(json.dumps({"type": "session.created"}))

        hook = functools.partial(process_request, config=self.config, metrics=self.metrics, ready=self.ready)
        self.server = await serve(handler, "127.0.0.1", 0, process_request=hook)
        self.port = next(iter(self.server.sockets)).getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def upgrade(self, authority: str, **kwargs) -> str:
        """Open the realtime WebSocket naming ``authority`` in Host; return the greeting."""
        async with connect(f"ws://{authority}/v1/realtime", host="127.0.0.1", port=self.port, proxy=None, **kwargs) as ws:
            return json.loads(await ws.recv())["type"]

    async def refused(self, authority: str, **kwargs) -> tuple[int, str]:
        with pytest.raises(InvalidStatus) as info:
            await self.upgrade(authority, **kwargs)
        response = info.value.response
        return response.status_code, bytes(response.body).decode()

    async def raw(self, path: str, headers: list[tuple[str, str]]) -> tuple[int, dict[str, str], str]:
        """Send a GET with exactly these headers; return (status, headers, body)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        lines = [f"GET {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers), "", ""]
        writer.write("\r\n".join(lines).encode())
        await writer.drain()
        data = await reader.read()  # refusals and routes answer with Connection: close
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in header_lines)
        return int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()}, body.decode()

    def metric(self, name: str, **labels: str) -> float:
        body, _ = self.metrics.render()
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0


def served(ready: str | None = "tiny-smolvlm", **config) -> Served:
    return Served(ServerConfig(port=0, **config), ready)


def test_a_page_on_a_rebound_name_gets_no_session():
    """DNS rebinding: evil.example now resolves to 127.0.0.1, so its page's Origin matches its Host."""
    async def main():
        async with served() as s:
            status, body = await s.refused(f"evil.example:{s.port}", origin=f"http://evil.example:{s.port}")
            assert status == 403
            assert "--allowed-host evil.example" in body
            assert s.sessions == 0
            # without an Origin (a program, not a page) the name is refused just the same
            assert (await s.refused(f"evil.example:{s.port}"))[0] == 403
            # the loopback names are served on any port, with or without an Origin on them
            for authority in (f"localhost:{s.port}", f"127.0.0.1:{s.port}", f"[::1]:{s.port}", "localhost"):
                assert await s.upgrade(authority, origin=f"http://{authority}") == "session.created"
            assert await s.upgrade(f"127.0.0.1:{s.port}") == "session.created"
            assert s.sessions == 5
            assert s.metric("streamvlm_http_rejected_total", reason="host") == 2

    run(main())


def test_every_route_but_healthz_checks_the_host():
    async def main():
        async with served() as s:
            evil = [("Host", f"evil.example:{s.port}")]
            for path in ("/", "/index.html", "/readyz", "/metrics", "/missing"):
                status, _, body = await s.raw(path, evil)
                assert status == 403, path
                assert "--allowed-host" in body
            status, _, body = await s.raw("/healthz", evil)
            assert (status, body) == (200, "ok\n")
            own = [("Host", f"127.0.0.1:{s.port}")]
            status, _, body = await s.raw("/readyz", own)
            assert (status, body) == (200, "ready tiny-smolvlm\n")
            status, headers, body = await s.raw("/", own)
            assert status == 200 and headers["content-type"].startswith("text/html") and "<video" in body
            assert (await s.raw("/missing", own))[0] == 404

    run(main())


def test_allowed_hosts_extend_the_loopback_names():
    async def main():
        async with served(allowed_hosts=("cam.lan", "box.lan:1")) as s:
            # "cam.lan" allows any port, as Host and as a page's Origin
            assert await s.upgrade(f"cam.lan:{s.port}", origin=f"http://cam.lan:{s.port}") == "session.created"
            assert await s.upgrade(f"CAM.lan.:{s.port}") == "session.created"
            # "box.lan:1" allows port 1 only
            assert (await s.refused(f"box.lan:{s.port}"))[0] == 403
            assert (await s.raw("/readyz", [("Host", "box.lan:1")]))[0] == 200
            assert (await s.refused(f"evil.example:{s.port}", origin=f"http://evil.example:{s.port}"))[0] == 403

    run(main())


def test_the_bound_host_is_allowed_unless_it_binds_every_address():
    assert AllowedHosts.from_config(ServerConfig(host="cam.lan", token="t")).allows(HostName("cam.lan", 8765))
    every = AllowedHosts.from_config(ServerConfig(host="0.0.0.0", token="t"))
    assert not every.allows(HostName("0.0.0.0", 8765))
    assert not every.allows(HostName("192.168.1.5", 8765))
    assert every.allows(HostName("127.0.0.1", 8765))
    lan = AllowedHosts.from_config(ServerConfig(host="0.0.0.0", token="t", allowed_hosts=("192.168.1.5:8765",)))
    assert lan.allows(HostName("192.168.1.5", 8765)) and not lan.allows(HostName("192.168.1.5", 9000))


def test_a_browser_origin_is_checked_against_the_allowed_hosts():
    async def main():
        async with served(allowed_origins=("https://app.example",)) as s:
            own = f"127.0.0.1:{s.port}"
            # a page served by this server under another loopback name may connect
            assert await s.upgrade(own, origin=f"http://localhost:{s.port}") == "session.created"
            assert await s.upgrade(own, origin="https://app.example") == "session.created"
            status, body = await s.refused(own, origin=f"http://evil.example:{s.port}")
            assert status == 403 and "--allowed-origin" in body
            assert (await s.refused(own, origin="null"))[0] == 403
            assert s.metric("streamvlm_http_rejected_total", reason="origin") == 2

    run(main())


def test_a_repeated_or_missing_host_header_is_a_400_not_a_server_error():
    async def main():
        async with served() as s:
            for headers in ([("Host", f"127.0.0.1:{s.port}"), ("Host", f"evil.example:{s.port}")],
                            [("Host", f"127.0.0.1:{s.port}"), ("Host", f"127.0.0.1:{s.port}")],
                            [],
                            [("Host", "user@evil.example")],
                            [("Host", "localhost:99999")]):
                for path in ("/", "/v1/realtime"):
                    status, _, body = await s.raw(path, headers)
                    assert status == 400, (path, headers)
                    assert "Host" in body and "Traceback" not in body and len(body) < 200
            own = [("Host", f"127.0.0.1:{s.port}")]
            status, _, body = await s.raw("/v1/realtime", own + [("Origin", "http://localhost"), ("Origin", "http://evil.example")])
            assert status == 400 and "Origin" in body
            assert s.metric("streamvlm_http_rejected_total", reason="bad_request") == 11

    run(main())


def test_the_realtime_api_takes_a_bearer_token():
    async def main():
        async with served(token="s3cret") as s:
            own = f"127.0.0.1:{s.port}"
            assert (await s.refused(own))[0] == 401
            assert (await s.refused(own, additional_headers={"Authorization": "Bearer nope"}))[0] == 401
            for scheme in ("Bearer", "bearer"):
                assert await s.upgrade(own, additional_headers={"Authorization": f"{scheme} s3cret"}) == "session.created"
            async with connect(f"ws://{own}/v1/realtime?access_token=s3cret", proxy=None) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"
            status, _, body = await s.raw("/v1/realtime", [("Host", own), ("Authorization", "Bearer s3cret"), ("Authorization", "Bearer x")])
            assert status == 400 and "Authorization" in body
            # the token does not open the door to another host
            status, _ = await s.refused(f"evil.example:{s.port}", additional_headers={"Authorization": "Bearer s3cret"})
            assert status == 403

    run(main())


def test_metrics_and_readiness_routes():
    async def main():
        async with served(ready=None) as s:
            own = [("Host", f"localhost:{s.port}")]
            assert (await s.raw("/readyz", own))[:3:2] == (503, "loading\n")
            s.metrics.session_opened()
            status, headers, body = await s.raw("/metrics", own)
            assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
            families = {f.name: f for f in text_string_to_metric_families(body)}
            assert families["streamvlm_sessions_opened"].samples[0].value == 1
            status, headers, _ = await s.raw("/metrics", own + [("Accept", "application/openmetrics-text; version=1.0.0")])
            assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")

    run(main())


def test_config_and_cli_take_allowed_hosts():
    config = ServerConfig(allowed_hosts=("cam.lan", "cam.lan:8765", "10.0.0.5", "[fe80::1]:80", "::1"))
    assert config.allowed_hosts[0] == "cam.lan"
    for bad in ("http://cam.lan", "cam.lan/x", "cam lan", "cam.lan:70000", "[zz]", "*.lan", ""):
        with pytest.raises(ConfigError, match="allowed_hosts"):
            ServerConfig(allowed_hosts=(bad,))
    args = build_parser().parse_args(["serve", "--allowed-host", "cam.lan", "--allowed-host", "10.0.0.5:8765"])
    assert args.allowed_host == ["cam.lan", "10.0.0.5:8765"]


def test_host_parsing_normalises_what_browsers_send():
    assert parse_host("LocalHost.:8765") == HostName("localhost", 8765)
    assert parse_host("[0:0:0:0:0:0:0:1]") == HostName("::1")
    assert parse_host("cam.lan:") == HostName("cam.lan")
    for bad in ("", "a b", "[::1", "x:y", "user@host", "[1.2.3.4]"):
        with pytest.raises(InputError):
            parse_host(bad)


_HEADER_TEXT = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)


@settings(max_examples=300, deadline=None)
@given(hosts=st.lists(_HEADER_TEXT, max_size=3), origin=st.none() | _HEADER_TEXT,
       path=st.sampled_from(["/", "/v1/realtime", "/readyz", "/metrics", "/healthz", "/x?y=1"]))
def test_any_host_and_origin_get_an_answer_never_an_exception(hosts, origin, path):
    """Whatever a client puts in Host and Origin, the answer is a response or the upgrade, and a
    non-loopback name that was not allowed never gets past the check."""
    from websockets.datastructures import Headers
    from websockets.http11 import Request

    class Connection:
        protocol = ServerProtocol()

        def respond(self, status, text):
            return self.protocol.reject(status, text)

    headers = Headers([("Host", h) for h in hosts] + ([("Origin", origin)] if origin is not None else []))
    response = process_request(Connection(), Request(path, headers), config=ServerConfig(allowed_hosts=("cam.lan",)),
                               metrics=ServerMetrics(), ready="m")
    if path == "/healthz":
        assert response is not None and response.status_code == 200
        return
    if response is None or response.status_code == 200:
        assert len(hosts) == 1
        host = parse_host(hosts[0])
        assert host.name in ("localhost", "cam.lan") or host.name.startswith("127.") or host.name == "::1"
    else:
        assert response.status_code in (400, 403, 404)
