"""The Python client (client/streamvlm_client) against a real server on 127.0.0.1 with the tiny model."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading

import pytest

from streamvlm.config import ServerConfig
from streamvlm.engine.check import synthetic_frames
from streamvlm.protocol import ProtocolError
from streamvlm.server.app import StreamServer

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
