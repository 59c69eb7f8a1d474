"""The Python client (client/streamvlm_client) against a real server on 127.0.0.1 with the tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from streamvlm.config import ServerConfig
from streamvlm.engine.check import synthetic_frames
from streamvlm.protocol import ProtocolError
from streamvlm.server.app import StreamServer

from websockets.asyncio.server import serve

from streamvlm_client import AsyncClient, Client, ClientError
from streamvlm_client.client import realtime_url

FIRE_AT_ONCE = {"kind": "threshold", "on": 0.0, "off": 0.0, "m": 1, "n": 1}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def started(adapter, **config) -> tuple[StreamServer, str]:
    server = StreamServer(adapter, ServerConfig(port=0, stats_every_s=0.3, **config))
    host, port = await server.start()
    return server, f"ws://{host}:{port}"


def test_async_client_through_a_whole_session_and_a_resume(smol):
    async def main():
        server, url = await started(smol)
        try:
            async with AsyncClient.connect(url) as client:
                assert client.session_id and client.handle and client.model
                session_id = client.session_id
                settings = await client.update(max_new_tokens=12)
                assert settings["sampling"]["max_new_tokens"] == 12
                for i, img in enumerate(synthetic_frames(3)):
                    await client.send_frame(img, float(i), "cam")
                # answers do not wait for frames still being read: wait until all three are accounted for
                stats = await client.wait_for(
                    "input_frame.stats", predicate=lambda e: e["received"] == 3 and e["skipped"] + e["dropped"] + e["ingested"] == 3, timeout=30
                )
                assert stats["received"] == 3 and client.frame_stats["received"] == 3
                deltas: list[str] = []
                reply = await client.answer("What do you see?", on_delta=deltas.append, timeout=60)
                assert reply["status"] in ("completed", "incomplete") and reply["trigger"] == "user"
                assert isinstance(reply["text"], str) and reply["text"] == reply["output_text"]
                assert "".join(deltas).strip() == reply["text"].strip()  # the streamed pieces make the answer
                assert [e["pts_s"] for e in reply["evidence"]][-1] == 2.0
                assert all(e["source_id"] == "cam" for e in reply["evidence"])
                assert (reply["ttft_s"] is None) == (not deltas)  # no text, no first token time
                assert reply["ttft_s"] is None or 0 < reply["ttft_s"] <= reply["latency_s"]
                # refusals: locally (never sent) and by the server (with its code)
                with pytest.raises(ProtocolError):
                    await client.answer("")
                with pytest.raises(ClientError) as info:
                    await client.update(instructions="too late")
                assert info.value.code == "setting_locked"
                # a watch that fires on the first probe; its alert arrives through events()
                watch = await client.watch("red", "a red square is visible", cooldown_s=0, trigger=FIRE_AT_ONCE)
                assert watch["id"] == "red" and watch["trigger"]["kind"] == "threshold"
                with pytest.raises(ClientError) as info:
                    await client.watch("red", "again")
                assert info.value.code == "watch_exists"
                await client.send_frame(synthetic_frames(5)[4], 3.0, "cam")
                seen = []
                async for event in client.events(timeout=30):
                    seen.append(event["type"])
                    if event["type"] == "response.done" and event["response"]["trigger"] == "watch":
                        assert event["response"]["alert"] == {"watch_id": "red", "condition": "a red square is visible", "t": 3.0}
                        break
                assert seen[:2] == ["session.created", "session.resumption_update"]
                assert {"session.updated", "response.created", "response.output_text.delta", "watch.created", "error"} <= set(seen)
                await client.unwatch("red")
                # cancel a long answer once it streams
                await client.update(max_new_tokens=3000)
                first = asyncio.Event()
                long = asyncio.create_task(client.answer("Tell me everything.", on_delta=lambda _: first.set()))
                started_streaming = asyncio.create_task(first.wait())
                await asyncio.wait({long, started_streaming}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
                if first.is_set():  # a random model may end its answer at once; cancel only what streams
                    await client.cancel()
                    assert (await asyncio.wait_for(long, 30))["status"] == "cancelled"
                else:
                    started_streaming.cancel()
                    assert (await asyncio.wait_for(long, 30))["status"] in ("completed", "incomplete")
                handle = client.handle
            assert not client.connected
            # a new connection with the handle continues the same session, memory included
            async with AsyncClient.connect(url, resume=handle) as again:
                assert again.session_id == session_id
                await again.update(max_new_tokens=4)
                rid = await again.ask("And now?")
                reply = await again.result(rid, timeout=60)
                assert reply["id"] == rid and 3.0 in [e["pts_s"] for e in reply["evidence"]]
                # reconnect() resumes in place
                await again.reconnect()
                assert again.connected and again.session_id == session_id
                assert (await again.answer("Still there?", timeout=60))["status"] in ("completed", "incomplete")
        finally:
            await server.stop()

    run(main())


def test_stream_camera_paces_frames_and_connection_errors_are_client_errors(smol):
    async def main():
        server, url = await started(smol, max_sessions=1, token="s3cret", resume_window_s=30)
        try:
            with pytest.raises(ClientError) as info:
                await AsyncClient.connect(url)
            assert (info.value.code, info.value.status) == ("http_error", 401)
            async with AsyncClient.connect(url, token="s3cret") as client:
                with pytest.raises(ClientError) as info:
                    await AsyncClient.connect(url, token="s3cret")
                assert info.value.code == "session_limit"
                frames = synthetic_frames(40)
                counts = await client.stream_camera(iter(frames), fps=20, duration=1.0, source_id="synthetic")
                assert 5 <= counts["read"] <= 25 and counts["sent"] + counts["replaced"] == counts["read"]
                stats = await client.wait_for("input_frame.stats", predicate=lambda e: e["received"] == counts["sent"], timeout=30)
                assert stats["received"] == stats["skipped"] + stats["dropped"] + stats["ingested"]
                reply = await client.answer("What moved?", max_output_tokens=4, timeout=60)
                assert {e["source_id"] for e in reply["evidence"]} == {"synthetic"}
            with pytest.raises(ClientError) as info:
                await AsyncClient.connect(url, token="s3cret", resume="no-such-handle", resume_retry_s=0)
            assert info.value.code == "invalid_resume_handle"
        finally:
            await server.stop()

    run(main())


def test_the_blocking_client(smol):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, url = asyncio.run_coroutine_threadsafe(started(smol), loop).result(60)
    try:
        with Client(url) as client:
            assert client.session_id and client.handle
            client.update(max_new_tokens=6)
            streaming = client.stream_camera(synthetic_frames(6), fps=10)
            assert streaming.result(30)["read"] == 6
            reply = client.answer("What is there?", timeout=60)
            assert reply["status"] in ("completed", "incomplete") and reply["evidence"]
            kinds = []
            for event in client.events(timeout=10):
                kinds.append(event["type"])
                if event["type"] == "response.done":
                    break
            assert kinds[0] == "session.created" and kinds[-1] == "response.done" and "input_frame.stats" in kinds
            assert client.watch("w1", "something moves")["id"] == "w1"
            session_id = client.session_id
            client.reconnect()
            assert client.session_id == session_id
            with pytest.raises(ClientError) as info:
                client.watch("w1", "the watch survived the reconnect")
            assert info.value.code == "watch_exists"
        with pytest.raises(ClientError):
            client.answer("closed?")
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_realtime_url():
    assert realtime_url("127.0.0.1:8765") == "ws://127.0.0.1:8765/v1/realtime"
    assert realtime_url("http://h:1/", resume="a b") == "ws://h:1/v1/realtime?resume=a+b"
    assert realtime_url("wss://h/x/v1/realtime?resume=old&k=v", resume="new") == "wss://h/x/v1/realtime?k=v&resume=new"


def test_importing_the_client_does_not_import_torch():
    code = ("import streamvlm_client, sys; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ), timeout=60)


# ---- against a scripted server: binding, failures, handles, cancels ---------------------------------

class Scripted:
    """A realtime server on 127.0.0.1 that follows a script: ``handler(ws, say)`` gets every client
    event after the opening ``session.created`` + ``session.resumption_update``."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.received: list[dict] = []
        self._n = 0

    async def __aenter__(self) -> str:
        self._server = await serve(self._serve, "127.0.0.1", 0)
        host, port = next(iter(self._server.sockets)).getsockname()[:2]
        return f"ws://{host}:{port}"

    async def __aexit__(self, *exc_info) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, ws) -> None:
        async def say(kind: str, **fields) -> None:
            self._n += 1
            await ws.send(json.dumps({"type": kind, "event_id": f"evt_{self._n}", **fields}))

        await say("session.created", session={"id": "sess_fake", "protocol": "streamvlm.realtime.v1", "model": "fake-model"})
        await say("session.resumption_update", new_handle="h1", resumable=True)
        events = []
        async for message in ws:
            event = json.loads(message)
            self.received.append(event)
            events.append(event)
            await self.handler(event, say)


def _question(events: list[dict], create: dict) -> str:
    """The text of the user message that ``create`` answers (the item sent just before it)."""
    items = [e for e in events[: events.index(create)] if e["type"] == "conversation.item.create"]
    return items[-1]["item"]["content"][0]["text"]


def test_answers_bind_to_their_questions_by_client_event_id_when_responses_are_reordered():
    """Three questions at once; the server starts and finishes them out of order: each answer still
    lands on its own question (a first-in-first-out client gives question 1 the answer to question 3)."""
    creates: list[dict] = []

    async def handler(event, say):
        if event["type"] != "response.create":
            return
        creates.append(event)
        if len(creates) < 3:
            return
        for i in (2, 0, 1):
            await say("response.created", response={"id": f"resp_{i}", "status": "in_progress", "trigger": "user",
                                                    "client_event_id": creates[i]["event_id"]})
        await say("response.created", response={"id": "resp_alert", "status": "in_progress", "trigger": "watch",
                                                "client_event_id": None})
        for i in (1, 2, 0):
            text = "answer to " + _question(scripted.received, creates[i])
            await say("response.output_text.delta", response_id=f"resp_{i}", delta=text)
            await say("response.done", response={"id": f"resp_{i}", "status": "completed", "trigger": "user",
                                                 "client_event_id": creates[i]["event_id"], "output_text": text,
                                                 "evidence": [], "no_video": True})

    scripted = Scripted(handler)

    async def main():
        async with scripted as url, AsyncClient.connect(url) as client:
            questions = ["one?", "two?", "three?"]
            replies = await asyncio.gather(*(client.answer(q, timeout=10) for q in questions))
            assert [r["text"] for r in replies] == [f"answer to {q}" for q in questions]
            assert [r["id"] for r in replies] == ["resp_0", "resp_1", "resp_2"]
            assert all(r["no_video"] is True for r in replies)
            ids = [c["event_id"] for c in creates]
            assert len(set(ids)) == 3
            async with AsyncClient.connect(url) as other:  # another client (say, resuming the session) never reuses them
                other_id = await other.send_event({"type": "response.cancel"})
            assert other_id not in ids and other_id.split("_")[0] != ids[0].split("_")[0]

    run(main())


def test_a_failed_response_raises_its_code():
    async def handler(event, say):
        if event["type"] == "response.create":
            ref = {"id": "resp_9", "trigger": "user", "client_event_id": event["event_id"]}
            await say("response.created", response={**ref, "status": "in_progress"})
            await say("error", error={"type": "server_error", "code": "engine_fault", "message": "the model step raised",
                                      "param": None, "event_id": event["event_id"], "response_id": "resp_9"})
            await say("response.done", response={**ref, "status": "failed", "output_text": "", "evidence": [],
                                                 "error": {"code": "engine_fault", "message": "the model step raised"}})

    async def main():
        async with Scripted(handler) as url, AsyncClient.connect(url) as client:
            with pytest.raises(ClientError) as info:
                await client.answer("What now?", timeout=10)
            assert info.value.code == "engine_fault" and info.value.response_id == "resp_9"
            assert info.value.response["status"] == "failed"
            rid = await client.ask("And again?", timeout=10)  # ask() returns the id; result() raises the same
            with pytest.raises(ClientError) as info:
                await client.result(rid, timeout=10)
            assert info.value.code == "engine_fault"

    run(main())


def test_resume_handles_rotate_and_a_closing_session_is_not_resumable():
    async def handler(event, say):
        if event["type"] == "session.update" and event["session"].get("instructions") == "close":
            await say("session.resumption_update", new_handle=None, resumable=False)  # the session is closing
        elif event["type"] == "session.update":
            await say("session.resumption_update", new_handle="h2", resumable=True)
        await say("session.updated", session={"id": "sess_fake"})

    async def main():
        async with Scripted(handler) as url, AsyncClient.connect(url) as client:
            assert client.handle == "h1" and client.resumable
            await client.update()
            assert client.handle == "h2"  # only the newest handle works: it replaced the old one
            await client.update(instructions="close")
            assert client.handle is None and not client.resumable
            with pytest.raises(ClientError) as info:
                await client.reconnect()
            assert info.value.code == "not_resumable"

    run(main())


def test_cancel_names_a_response_and_an_unknown_one_is_not_found():
    async def handler(event, say):
        if event["type"] == "response.create":
            await say("response.created", response={"id": "resp_1", "status": "in_progress", "trigger": "user",
                                                    "client_event_id": event["event_id"]})
        elif event["type"] == "response.cancel" and event.get("response_id") == "resp_1":
            await say("response.done", response={"id": "resp_1", "status": "cancelled", "trigger": "user",
                                                 "output_text": "", "evidence": []})
        elif event["type"] == "response.cancel":
            await say("error", error={"type": "invalid_request_error", "code": "response_not_found",
                                      "message": "no such response", "param": "response_id", "event_id": event["event_id"]})

    async def main():
        async with Scripted(handler) as url, AsyncClient.connect(url) as client:
            with pytest.raises(ClientError) as info:
                await client.cancel("resp_nope", timeout=10)
            assert info.value.code == "response_not_found"
            rid = await client.ask("Tell me everything.", timeout=10)
            done = await client.cancel(rid, timeout=10)
            assert done["status"] == "cancelled"
            assert (await client.result(rid, timeout=10))["status"] == "cancelled"

    run(main())


def test_the_readme_lists_only_what_the_clients_have():
    """Every call and state name the client README documents exists on AsyncClient and on Client."""
    readme = (Path(__file__).parents[1] / "client" / "README.md").read_text()
    state = re.search(r"^State\b(.+?)\.\n\n", readme, re.S | re.M)
    assert state, "the README's State: paragraph is gone"
    names = [n for n in re.findall(r"`(\w+)`", state.group(1)) if n not in ("AsyncClient", "Client")]
    assert {"model", "go_away", "handle", "resumable"} <= set(names)
    calls = re.findall(r"^\| `(?:AsyncClient\.)?(\w+)\(", readme, re.M)
    assert len(calls) >= 10
    unconnected = AsyncClient("ws://127.0.0.1:1")  # the constructor does not connect
    missing = [f"AsyncClient.{n}" for n in names + calls if not hasattr(unconnected, n)]
    missing += [f"Client.{n}" for n in names + calls if not hasattr(Client, n)]
    assert not missing, missing
