"""One protocol suite over both transports: the websockets server and the ASGI app on uvicorn.

A client must not be able to tell them apart: the same events for a whole session, the same errors
for bad input, the same refusals at the handshake, the same resumption. Each test runs once per
transport, against a real server on 127.0.0.1 (random port) and a real websockets client.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamvlm.config import ServerConfig
from streamvlm.engine.check import synthetic_frames
from streamvlm.protocol import Limits, encode_frame

TRANSPORTS = ["websockets", "asgi"]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


class Served:
    """A running server of either transport: ``url`` (WebSocket), ``http`` (base URL), ``host`` (its SessionHost)."""

    def __init__(self, transport: str, adapter, limits: Limits | None = None, handoff=None, **config) -> None:
        cfg = ServerConfig(port=0, stats_every_s=0.3, **config)
        if transport == "websockets":
            from streamvlm.server.app import StreamServer

            self.host = self.server = StreamServer(adapter, cfg, limits=limits, handoff=handoff)
        else:
            from streamvlm.server.asgi import UvicornServer
            from streamvlm.server.driver import SessionHost

            self.host = SessionHost(adapter, cfg, limits=limits, handoff=handoff)
            self.server = UvicornServer(self.host)

    async def __aenter__(self) -> Served:
        host, port = await self.server.start()
        self.url, self.http = f"ws://{host}:{port}/v1/realtime", f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop()

    async def get(self, path: str, headers: dict | None = None) -> tuple[int, str]:
        def fetch() -> tuple[int, str]:
            request = urllib.request.Request(self.http + path, headers=headers or {})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        return await asyncio.get_running_loop().run_in_executor(None, fetch)


async def until(ws, kind: str, timeout: float = 60.0) -> dict:
    """The next event of type ``kind`` (earlier ones are read and dropped)."""
    async def wait():
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == kind:
                return event
    return await asyncio.wait_for(wait(), timeout)


async def ask(ws, text: str, event_id: str = "q") -> None:
    await ws.send(json.dumps({"type": "conversation.item.create", "event_id": event_id + "-item",
                              "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    await ws.send(json.dumps({"type": "response.create", "event_id": event_id}))


async def frames_read(ws, count: int) -> None:
    """Wait until the server accounts for ``count`` frames (read, skipped or dropped)."""
    while True:
        stats = await until(ws, "input_frame.stats")
        if stats["received"] == count and stats["skipped"] + stats["dropped"] + stats["ingested"] == count:
            return


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_session_answers_from_its_frames_with_evidence_and_refuses_bad_input(smol, transport):
    async def main():
        async with Served(transport, smol) as served, connect(served.url) as ws:
            created = await until(ws, "session.created")
            resumption = await until(ws, "session.resumption_update")
            for i, img in enumerate(synthetic_frames(2)):
                await ws.send(encode_frame(img, float(i), "cam"))
            await frames_read(ws, 2)
            await ask(ws, "What do you see?", "q1")
            started = await until(ws, "response.created")
            done = await until(ws, "response.done")
            await ws.send("{not json")
            bad_json = await until(ws, "error")
            await ws.send(json.dumps({"type": "response.create", "event_id": "x9"}))
            no_message = await until(ws, "error")
            await ws.send(json.dumps({"type": "response.cancel", "event_id": "k", "response_id": "resp_nope"}))
            not_found = await until(ws, "error")
            return created, resumption, started, done, bad_json, no_message, not_found

    created, resumption, started, done, bad_json, no_message, not_found = run(main())
    assert created["session"]["protocol"] == "streamvlm.realtime.v1" and resumption["resumable"] is True
    assert started["response"]["client_event_id"] == "q1" and done["response"]["client_event_id"] == "q1"
    assert done["response"]["status"] in ("completed", "incomplete")
    assert [e["pts_s"] for e in done["response"]["evidence"]][-1] == 1.0  # rests on the frames it was sent
    assert bad_json["error"]["code"] == "invalid_json"
    assert (no_message["error"]["code"], no_message["error"]["event_id"]) == ("no_user_message", "x9")
    assert (not_found["error"]["code"], not_found["error"]["event_id"]) == ("response_not_found", "k")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_running_answer_is_cancelled_on_request(smol, transport):
    async def main():
        async with Served(transport, smol) as served, connect(served.url) as ws:
            await ws.send(json.dumps({"type": "session.update", "event_id": "u", "session": {"sampling": {"max_new_tokens": 3000}}}))
            await until(ws, "session.updated")
            await ws.send(encode_frame(synthetic_frames(1)[0], 0.0))
            await ask(ws, "Tell me everything.")
            await until(ws, "response.output_text.delta")
            await ws.send(json.dumps({"type": "response.cancel", "event_id": "k"}))
            return await until(ws, "response.done")

    assert run(main())["response"]["status"] == "cancelled"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_message_too_large_is_an_error_and_past_the_ceiling_closes_1009(smol, transport):
    limits = Limits(max_message_bytes=64 * 1024, max_frame_bytes=32 * 1024)

    async def main():
        async with Served(transport, smol, limits=limits) as served:
            async with connect(served.url, max_size=None) as ws:
                await until(ws, "session.created")
                await ws.send(b"\x00" * (64 * 1024 + 1))
                error = await until(ws, "error")
                await ws.send(json.dumps({"type": "session.update", "event_id": "ping", "session": {}}))
                alive = await until(ws, "session.updated")
            async with connect(served.url, max_size=None) as ws:
                await until(ws, "session.created")
                await ws.send(b"\x00" * (4 * 64 * 1024 + 1))
                with pytest.raises(ConnectionClosed):
                    while True:
                        await asyncio.wait_for(ws.recv(), 10)
                return error, alive, ws.close_code

    error, alive, code = run(main())
    assert error["error"]["code"] == "message_too_large" and alive["event_id"]
    assert code == 1009


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_resume_with_the_handle_keeps_the_session_and_its_memory(smol, transport):
    async def main():
        async with Served(transport, smol) as served:
            async with connect(served.url) as ws:
                created = await until(ws, "session.created")
                handle = (await until(ws, "session.resumption_update"))["new_handle"]
                await ws.send(encode_frame(synthetic_frames(1)[0], 5.0, "cam"))
                await frames_read(ws, 1)
            async with connect(served.url + "?resume=nonsense") as ws:
                refused = await until(ws, "error")
            async with connect(served.url + f"?resume={handle}") as ws:
                again = await until(ws, "session.created")
                await ask(ws, "What did you see before?")
                done = await until(ws, "response.done")
            return created, refused, again, done

    created, refused, again, done = run(main())
    assert refused["error"]["code"] == "invalid_resume_handle"
    assert again["session"]["id"] == created["session"]["id"]
    assert 5.0 in [e["pts_s"] for e in done["response"]["evidence"]]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_handshake_checks_token_origin_and_host_and_http_routes_answer(smol, transport):
    async def main():
        async with Served(transport, smol, token="s3cret") as served:
            statuses = {}
            for name, kwargs in {"no token": {}, "wrong origin": {"origin": "http://evil.example",
                                                                  "additional_headers": {"Authorization": "Bearer s3cret"}}}.items():
                with pytest.raises(InvalidStatus) as info:
                    async with connect(served.url, **kwargs):
                        pass
                statuses[name] = info.value.response.status_code
            async with connect(served.url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
                created = await until(ws, "session.created")
            routes = {path: await served.get(path) for path in ("/healthz", "/readyz", "/metrics", "/", "/nope")}
            routes["evil host"] = await served.get("/readyz", {"Host": "evil.example"})
            return statuses, created, routes

    statuses, created, routes = run(main())
    assert statuses["no token"] == 401
    assert statuses["wrong origin"] == 403  # (ASGI servers without the denial-response extension refuse all with 403)
    assert created["type"] == "session.created"
    assert routes["/healthz"] == (200, "ok\n") and routes["/readyz"][0] == 200 and "tiny-smolvlm" in routes["/readyz"][1]
    assert routes["/metrics"][0] == 200 and "streamvlm_sessions_opened_total 1.0" in routes["/metrics"][1]
    assert routes["/"][0] == 200 and "<video" in routes["/"][1]
    assert routes["/nope"][0] == 404 and routes["evil host"][0] == 403  # DNS rebinding


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_parked_session_resumes_on_another_server_sharing_the_snapshot_directory(smol, transport, tmp_path):
    from streamvlm.server.handoff import Handoff, HandoffConfig

    def handoff(name: str) -> Handoff:
        return Handoff(HandoffConfig(str(tmp_path / "shared"), snapshot_every_s=None, replica=name))

    async def main():
        async with Served(transport, smol, handoff=handoff("a")) as a, Served(transport, smol, handoff=handoff("b")) as b:
            async with connect(a.url) as ws:
                created = await until(ws, "session.created")
                await ws.send(json.dumps({"type": "watch.create", "event_id": "w", "watch": {
                    "id": "door", "condition": "the door is open", "trigger": {"kind": "threshold", "on": 0.9, "off": 0.1}}}))
                await until(ws, "watch.created")
                await ws.send(encode_frame(synthetic_frames(1)[0], 5.0, "cam"))
                await frames_read(ws, 1)
                await ask(ws, "What do you see?", "q1")
                await until(ws, "response.done")
                handle = (await until(ws, "session.resumption_update"))["new_handle"]  # rotated after the answer
                await ask(ws, "Tell me when a red square appears.", "deferred")
                waiting = await until(ws, "response.acknowledged")
            async with connect(b.url + f"?resume={handle}") as ws:
                again = await until(ws, "session.created")
                await ask(ws, "What did you see before?", "q2")
                done = await until(ws, "response.done")
                # The deferred question moved with the session and still waits: cancelling it here ends it, once.
                await ws.send(json.dumps({"type": "response.cancel", "event_id": "c", "response_id": waiting["response_id"]}))
                ended = await until(ws, "response.done")
                moved = next(iter(b.host.sessions.values()))
                watches = {w: (s.condition, s.spec.on) for w, s in moved.watch_specs.items()}
                while a.host.sessions:  # the first server lets its parked copy go once it sees the claim
                    await asyncio.sleep(0.1)
            async with connect(a.url + f"?resume={handle}") as ws:  # a handle opens a session once
                stale = await until(ws, "error")
            return created, again, waiting, done, ended, watches, stale

    created, again, waiting, done, ended, watches, stale = run(main())
    assert again["session"]["id"] == created["session"]["id"]
    assert 5.0 in [e["pts_s"] for e in done["response"]["evidence"]]  # the memory came along
    assert watches == {"door": ("the door is open", 0.9)}  # and the watch, with its trigger rule
    assert stale["error"]["code"] == "invalid_resume_handle"
    assert done["response"]["client_event_id"] == "q2"  # nothing of the deferred question ended before
    assert ended["response"]["id"] == waiting["response_id"]
    assert (ended["response"]["client_event_id"], ended["response"]["status"]) == ("deferred", "cancelled")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_server_that_stops_saves_its_live_sessions_and_a_restarted_one_resumes_them(smol, transport, tmp_path):
    from streamvlm.server.handoff import Handoff, HandoffConfig

    def handoff() -> Handoff:
        return Handoff(HandoffConfig(str(tmp_path / "shared"), snapshot_every_s=None))

    async def main():
        async with Served(transport, smol, handoff=handoff()) as first:
            ws = await connect(first.url)
            created = await until(ws, "session.created")
            handle = (await until(ws, "session.resumption_update"))["new_handle"]
            await ws.send(encode_frame(synthetic_frames(1)[0], 2.0, "cam"))
            await frames_read(ws, 1)
        going = await until(ws, "session.go_away")  # the server stopped (a redeploy, a scale-down)
        with pytest.raises(ConnectionClosed):
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert event["type"] != "error", event  # no session_closed: it can be resumed
        async with Served(transport, smol, handoff=handoff()) as second, connect(second.url + f"?resume={handle}") as ws2:
            again = await until(ws2, "session.created")
            await ask(ws2, "What did you see?")
            done = await until(ws2, "response.done")
        return created, going, ws.close_code, again, done

    created, going, code, again, done = run(main())
    assert going["type"] == "session.go_away" and code == 1001
    assert again["session"]["id"] == created["session"]["id"]
    assert 2.0 in [e["pts_s"] for e in done["response"]["evidence"]]


def test_scale_out_flags_are_checked_before_the_model_loads(capsys, tmp_path):
    from streamvlm.cli import main

    assert main(["serve", "--replicas", "2"]) == 2
    assert main(["serve", "--ray"]) == 2
    assert main(["serve", "--snapshot-dir", str(tmp_path), "--snapshot-every", "-1"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["streamvlm: error: --replicas needs --ray",
                      "streamvlm: error: --ray needs --snapshot-dir: a directory every replica shares, for sessions to "
                      "resume on any replica",
                      "streamvlm: error: snapshot_every_s: must be a number of seconds > 0 or None, got -1.0"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_sessions_at_once_each_answer_every_question_from_their_own_frames(smol, transport):
    """Two clients stream and ask at the same time on one server, with budgets small enough that memory
    spills and questions retrieve (the path where one session's model work once broke the other's)."""
    spilled: list[dict] = []

    async def client(served: Served, name: str, offset: float) -> tuple[list[dict], list[dict]]:
        async with connect(served.url) as ws:
            await until(ws, "session.created")
            await ws.send(json.dumps({"type": "session.update", "event_id": f"{name}-u",
                                      "session": {"memory": {"budget_tokens": 128}, "sampling": {"max_new_tokens": 3}}}))
            await until(ws, "session.updated")
            done, errors = [], []
            for round_ in range(3):
                for i, img in enumerate(synthetic_frames(4, seed=round_)):
                    await ws.send(encode_frame(img, offset + 4 * round_ + i, name))
                await ask(ws, "What do you see?", f"{name}{round_}")
                while True:
                    event = json.loads(await asyncio.wait_for(ws.recv(), 60))
                    if event["type"] == "error":
                        errors.append(event)
                    if event["type"] == "memory.update":
                        spilled.append(event)
                    if event["type"] == "response.done":
                        done.append(event["response"])
                        break
            return done, errors

    async def main():
        async with Served(transport, smol) as served:
            return await asyncio.gather(client(served, "a", 0.0), client(served, "b", 1000.0))

    (a_done, a_errors), (b_done, b_errors) = run(main())
    assert a_errors == [] and b_errors == []
    assert spilled  # the budgets were reached: memory was compressed or spilled while both ran
    for done, name, offset in ((a_done, "a", 0.0), (b_done, "b", 1000.0)):
        assert [r["client_event_id"] for r in done] == [f"{name}0", f"{name}1", f"{name}2"]
        assert all(r["status"] in ("completed", "incomplete") for r in done)
        for r in done:  # evidence only from this client's own frames, and the newest one it sent
            pts = [e["pts_s"] for e in r["evidence"]]
            assert pts and all(offset <= t < offset + 12 for t in pts), pts
        assert max(e["pts_s"] for e in done[-1]["evidence"]) == offset + 11
