"""The server with real peers on 127.0.0.1: a websockets client through whole sessions, HTTP routes,
auth, limits, resumption, and malformed input that never takes the server down."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamvlm.config import ServerConfig
from streamvlm.engine.check import synthetic_frames
from streamvlm.protocol import encode_frame
from streamvlm.server.app import StreamServer
from streamvlm.server.eventlog import EventLog


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def started(adapter, **config):
    server = StreamServer(adapter, ServerConfig(port=0, stats_every_s=0.3, **config))
    host, port = await server.start()
    return server, f"ws://{host}:{port}/v1/realtime", f"http://{host}:{port}"


HANDLES: dict[int, str] = {}  # id(ws) -> the latest resume handle it was given (handles rotate)


async def next_of(ws, kind: str, timeout: float = 60.0) -> dict:
    async def wait():
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "session.resumption_update" and event["new_handle"]:
                HANDLES[id(ws)] = event["new_handle"]
            if event["type"] == kind:
                return event
    return await asyncio.wait_for(wait(), timeout)


async def ask(ws, text: str) -> None:
    await ws.send(json.dumps({"type": "conversation.item.create", "event_id": "c1",
                              "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    await ws.send(json.dumps({"type": "response.create", "event_id": "c2"}))


def test_a_whole_session_over_a_real_websocket(smol, tmp_path):
    async def main():
        server, url, _ = await started(smol, event_db=str(tmp_path / "events.db"))
        try:
            async with connect(url) as ws:
                created = await next_of(ws, "session.created")
                assert created["session"]["protocol"] == "streamvlm.realtime.v1"
                session_id = created["session"]["id"]
                handle = (await next_of(ws, "session.resumption_update"))["new_handle"]
                for i, img in enumerate(synthetic_frames(3)):
                    await ws.send(encode_frame(img, float(i), "cam"))
                # answers do not wait for frames still being read: wait until all three are accounted for
                while True:
                    stats = await next_of(ws, "input_frame.stats")
                    if stats["received"] == 3 and stats["skipped"] + stats["dropped"] + stats["ingested"] == 3:
                        break
                await ask(ws, "What do you see?")
                created = await next_of(ws, "response.created")
                assert created["response"]["trigger"] == "user"
                done = await next_of(ws, "response.done")
                assert done["response"]["status"] in ("completed", "incomplete")
                assert [e["pts_s"] for e in done["response"]["evidence"]][-1] == 2.0
                # bad input: an error event, and the session goes on
                await ws.send("{not json")
                err = await next_of(ws, "error")
                assert err["error"]["code"] == "invalid_json"
                await ws.send(json.dumps({"type": "response.create", "event_id": "x9"}))
                err = await next_of(ws, "error")
                assert (err["error"]["code"], err["error"]["event_id"]) == ("no_user_message", "x9")
                # a watch that fires on the first probe: a proactive response carrying the alert
                await ws.send(json.dumps({"type": "watch.create", "event_id": "w", "watch": {
                    "id": "red", "condition": "a red square is visible",
                    "trigger": {"kind": "threshold", "on": 0.0, "off": 0.0, "m": 1, "n": 1}}}))
                await next_of(ws, "watch.created")
                await ws.send(encode_frame(synthetic_frames(5)[4], 3.0, "cam"))
                alert = await next_of(ws, "response.done")
                while alert["response"]["trigger"] != "watch":
                    alert = await next_of(ws, "response.done")
                assert alert["response"]["alert"]["watch_id"] == "red" and alert["response"]["alert"]["t"] == 3.0
                assert HANDLES[id(ws)] != handle  # a fresh handle after each answer; only the latest resumes
                handle = HANDLES[id(ws)]
            # resume within the window: same session, memory kept
            async with connect(url + f"?resume={handle}") as ws:
                again = await next_of(ws, "session.created")
                assert again["session"]["id"] == session_id
                await ask(ws, "And now?")
                done = await next_of(ws, "response.done")
                assert 3.0 in [e["pts_s"] for e in done["response"]["evidence"]]
            logged = EventLog(tmp_path / "events.db").list()
            assert any(e["payload"]["response"]["trigger"] == "watch" for e in logged)
        finally:
            await server.stop()

    run(main())


def test_cancel_and_disconnect_leave_nothing_running(smol):
    async def main():
        server, url, _ = await started(smol)
        try:
            async with connect(url) as ws:
                await ws.send(json.dumps({"type": "session.update", "event_id": "u", "session": {"sampling": {"max_new_tokens": 3000}}}))
                await next_of(ws, "session.updated")
                await ws.send(encode_frame(synthetic_frames(1)[0], 0.0))
                await ask(ws, "Tell me everything.")
                await next_of(ws, "response.output_text.delta")
                await ws.send(json.dumps({"type": "response.cancel", "event_id": "k"}))
                done = await next_of(ws, "response.done")
                assert done["response"]["status"] == "cancelled"
                await ask(ws, "Again, everything.")
                await next_of(ws, "response.output_text.delta")
            await asyncio.sleep(0.5)  # the client left mid-answer
            session = next(iter(server.sessions.values()))
            assert session.worker is None or session.worker.idle
        finally:
            await server.stop()

    run(main())


def test_http_routes_auth_and_origin(smol):
    async def main():
        server, url, http = await started(smol, token="s3cret")
        try:
            loop = asyncio.get_running_loop()
            get = lambda path: loop.run_in_executor(None, lambda: urllib.request.urlopen(http + path, timeout=10).read().decode())  # noqa: E731
            assert (await get("/healthz")).strip() == "ok"
            assert "ready" in await get("/readyz")
            assert "streamvlm_sessions" in await get("/metrics")
            assert "<video" in await get("/")
            with pytest.raises(InvalidStatus) as info:
                async with connect(url):
                    pass
            assert info.value.response.status_code == 401
            async with connect(url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
                await next_of(ws, "session.created")
            async with connect(url + "?access_token=s3cret") as ws:
                await next_of(ws, "session.created")
            with pytest.raises(InvalidStatus) as info:
                async with connect(url + "?access_token=s3cret", origin="http://evil.example"):
                    pass
            assert info.value.response.status_code == 403
        finally:
            await server.stop()

    run(main())


def test_a_full_server_refuses_new_sessions_with_an_error(smol):
    async def main():
        server, url, _ = await started(smol, max_sessions=1, resume_window_s=30)
        try:
            async with connect(url) as first:
                await next_of(first, "session.created")
                async with connect(url) as second:
                    err = await next_of(second, "error")
                    assert err["error"]["code"] == "session_limit"
                await ask(first, "still fine?")
                await next_of(first, "response.done")  # the first session is unaffected
        finally:
            await server.stop()

    run(main())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(messages=st.lists(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                                   st.builds(lambda t: json.dumps({"type": t, "event_id": "e"}), st.sampled_from(
                                       ["session.update", "watch.delete", "response.cancel", "input_frame.append", "nope"]))),
                         min_size=1, max_size=8))
def test_malformed_messages_never_take_the_server_down_or_touch_another_session(smol, messages):
    async def main():
        server, url, _ = await started(smol)
        try:
            async with connect(url) as victim, connect(url) as bystander:
                await next_of(victim, "session.created")
                await next_of(bystander, "session.created")
                for m in messages:
                    await victim.send(m)
                await victim.send(json.dumps({"type": "session.update", "event_id": "ping", "session": {}}))
                await next_of(victim, "session.updated")  # still alive and answering
                await ask(bystander, "hello?")
                done = await next_of(bystander, "response.done")
                assert done["response"]["status"] in ("completed", "incomplete")
        finally:
            await server.stop()

    run(main())


def test_binding_elsewhere_requires_a_token():
    from streamvlm.errors import ConfigError

    with pytest.raises(ConfigError, match="token"):
        ServerConfig(host="0.0.0.0")
    assert ServerConfig(host="0.0.0.0", token="t").token == "t"


def test_go_away_comes_before_the_server_ends_a_session(smol):
    async def main():
        server, url, _ = await started(smol, max_session_s=1.5, go_away_notice_s=1.0)
        try:
            async with connect(url) as ws:
                notice = await next_of(ws, "session.go_away", timeout=10)
                assert 0 <= notice["time_left_ms"] <= 1000
                closed_at = asyncio.get_running_loop().time()
                try:
                    while True:
                        await asyncio.wait_for(ws.recv(), 10)
                except Exception:
                    pass
                assert ws.close_code == 1001
                assert asyncio.get_running_loop().time() - closed_at < 5
        finally:
            await server.stop()

    run(main())


def test_a_client_that_floods_questions_gets_the_limit_as_errors_and_every_accepted_one_ends_once(smol):
    """Twelve questions sent at once to a server that lets a session have 4 open: the first 4 are created, each
    of the other 8 gets a response_limit error naming its response.create, and each created one ends exactly once;
    once they have ended, the session answers again."""
    async def main():
        server, url, _ = await started(smol, max_open_responses=4)
        try:
            async with connect(url) as ws:
                await next_of(ws, "session.created")
                await ws.send(encode_frame(synthetic_frames(1)[0], 0.0, "cam"))
                for i in range(12):  # "tell me when" questions wait for their condition: they stay open
                    await ws.send(json.dumps({"type": "conversation.item.create", "event_id": f"i{i}", "item": {
                        "type": "message", "role": "user", "content": [{"type": "input_text", "text": f"Tell me when a red giraffe {i} appears."}]}}))
                    await ws.send(json.dumps({"type": "response.create", "event_id": f"q{i}"}))
                created, refused, ids = [], [], []
                while len(created) + len(refused) < 12:
                    event = json.loads(await asyncio.wait_for(ws.recv(), 60))
                    if event["type"] == "response.created":
                        created.append(event["response"]["client_event_id"])
                        ids.append(event["response"]["id"])
                    elif event["type"] == "error":
                        assert event["error"]["code"] == "response_limit", event
                        refused.append(event["error"]["event_id"])
                for rid in ids:  # cancel the waiting ones: each ends once
                    await ws.send(json.dumps({"type": "response.cancel", "event_id": f"k-{rid}", "response_id": rid}))
                done = []
                while len(done) < len(created):
                    event = json.loads(await asyncio.wait_for(ws.recv(), 60))
                    if event["type"] == "response.done":
                        done.append(event["response"]["client_event_id"])
                await ask(ws, "What do you see?")
                after = await next_of(ws, "response.done")
                return created, refused, done, after
        finally:
            await server.stop()

    created, refused, done, after = run(main())
    assert created == ["q0", "q1", "q2", "q3"] and refused == [f"q{i}" for i in range(4, 12)]
    assert sorted(done) == created
    assert after["response"]["client_event_id"] == "c2" and after["response"]["status"] in ("completed", "incomplete")
