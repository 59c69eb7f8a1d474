"""The server as users (and hostile clients) drive it, through real WebSocket connections on 127.0.0.1.

Each test is a failure seen in use: questions sent back to back, a question right after a frame, a
failing answer, an engine that breaks, a client asking for unbounded memory or a thousand watches,
parked sessions filling the server, a reload racing its own old connection, oversized messages.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamvlm.config import ServerConfig
from streamvlm.engine.check import synthetic_frames
from streamvlm.engine.session import StreamSession
from streamvlm.protocol import Limits, encode_frame
from streamvlm.server.app import StreamServer


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


async def started(adapter, limits: Limits | None = None, **config):
    server = StreamServer(adapter, ServerConfig(port=0, stats_every_s=0.3, **config), limits=limits)
    host, port = await server.start()
    return server, f"ws://{host}:{port}/v1/realtime"


async def recv(ws, timeout: float = 60.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def until(ws, predicate, timeout: float = 90.0) -> list[dict]:
    """Every event up to and including the first for which ``predicate`` is true."""
    seen: list[dict] = []

    async def wait():
        while True:
            seen.append(await recv(ws, timeout))
            if predicate(seen[-1]):
                return seen

    return await asyncio.wait_for(wait(), timeout)


def item(text: str, event_id: str = "i") -> str:
    return json.dumps({"type": "conversation.item.create", "event_id": event_id,
                       "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})


def create(event_id: str, **response) -> str:
    return json.dumps({"type": "response.create", "event_id": event_id, "response": response})


def done_for(event_id: str):
    return lambda e: e["type"] == "response.done" and e["response"]["client_event_id"] == event_id


def metric(server: StreamServer, name: str, **labels) -> float:
    body, _ = server.metrics.render()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def test_questions_sent_back_to_back_each_get_created_and_done_bound_to_their_event(smol):
    async def main():
        server, url = await started(smol)
        try:
            async with connect(url) as ws:
                await ws.send(encode_frame(synthetic_frames(1)[0], 0.0, "cam"))
                for i in range(3):
                    await ws.send(item(f"Question {i}?"))
                    await ws.send(create(f"q{i}"))
                events = []
                for i in range(3):
                    events += await until(ws, done_for(f"q{i}"))
        finally:
            await server.stop()
        created = [e["response"]["client_event_id"] for e in events if e["type"] == "response.created"]
        done = {e["response"]["client_event_id"]: e["response"]["status"] for e in events if e["type"] == "response.done"}
        assert created == ["q0", "q1", "q2"]
        assert set(done) == {"q0", "q1", "q2"} and done["q2"] in ("completed", "incomplete")
        assert all(status in ("completed", "incomplete", "cancelled") for status in done.values())
        assert not [e for e in events if e["type"] == "error"]

    run(main())


def test_a_question_right_after_a_frame_is_answered_from_it_and_max_output_tokens_holds(smol):
    async def main():
        server, url = await started(smol)
        try:
            async with connect(url) as ws:
                await ws.send(encode_frame(synthetic_frames(1)[0], 0.0, "cam"))
                await ws.send(item("What do you see?"))
                await ws.send(create("q", max_output_tokens=2))
                events = await until(ws, done_for("q"))
        finally:
            await server.stop()
        response = events[-1]["response"]
        assert [e["pts_s"] for e in response["evidence"]] == [0.0] and response["no_video"] is False
        assert response["usage"]["output_tokens"] <= 2

    run(main())


def test_an_answer_asked_before_any_frame_says_it_has_no_video(smol):
    async def main():
        server, url = await started(smol)
        try:
            async with connect(url) as ws:
                await ws.send(item("What do you see?"))
                await ws.send(create("q"))
                return (await until(ws, done_for("q")))[-1]["response"]
        finally:
            await server.stop()

    response = run(main())
    assert response["evidence"] == [] and response["no_video"] is True


def test_a_failing_answer_ends_failed_naming_it_and_the_session_goes_on(smol, monkeypatch):
    real = StreamSession.ask_stream

    def flaky(self, question, *a, **k):
        if "FAIL" in question:
            raise RuntimeError("stack expects each tensor to be equal size")
        return real(self, question, *a, **k)

    monkeypatch.setattr(StreamSession, "ask_stream", flaky)

    async def main():
        server, url = await started(smol)
        try:
            async with connect(url) as ws:
                await ws.send(item("FAIL now"))
                await ws.send(create("bad"))
                failed = await until(ws, done_for("bad"))
                await ws.send(item("And now?"))
                await ws.send(create("good"))
                good = await until(ws, done_for("good"))
            return failed, good, metric(server, "streamvlm_engine_faults_total", kind="request")
        finally:
            await server.stop()

    failed, good, faults = run(main())
    error = next(e for e in failed if e["type"] == "error")
    assert error["error"]["code"] == "engine_fault" and error["error"]["event_id"] == "bad"
    assert error["error"]["response_id"] == failed[-1]["response"]["id"] and "equal size" in error["error"]["message"]
    assert failed[-1]["response"]["status"] == "failed"
    assert good[-1]["response"]["status"] in ("completed", "incomplete")
    assert faults == 1


def test_an_engine_that_leaves_the_session_unusable_closes_it_with_the_reason(smol, monkeypatch):
    def breaks(self, *a, **k):
        self.broken = "the cache was left half-written"
        raise RuntimeError("prefill failed")

    monkeypatch.setattr(StreamSession, "encode_frame", breaks)

    async def main():
        server, url = await started(smol)
        try:
            async with connect(url) as ws:
                await ws.send(item("What do you see?"))
                await ws.send(encode_frame(synthetic_frames(1)[0], 0.0, "cam"))
                await ws.send(create("q"))
                events = []
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        events.append(await recv(ws))
            await asyncio.sleep(0.2)
            return events, closed.value, len(server.sessions), metric(server, "streamvlm_engine_faults_total", kind="session")
        finally:
            await server.stop()

    events, closed, sessions, faults = run(main())
    assert closed.rcvd.code == 1011
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert any(e["code"] == "session_closed" and "half-written" in e["message"] for e in errors)
    assert [e["response"]["status"] for e in events if e["type"] == "response.done"] == ["failed"]
    assert events[-1] == {**events[-1], "type": "session.resumption_update", "new_handle": None, "resumable": False}
    assert sessions == 0 and faults == 1


def test_cancel_of_an_unknown_response_is_an_error_and_cancels_nothing(smol):
    async def main():
        server, url = await started(smol)
        try:
            async with connect(url) as ws:
                await ws.send(json.dumps({"type": "session.update", "session": {"sampling": {"max_new_tokens": 40}}}))
                await ws.send(item("Tell me everything."))
                await ws.send(create("q"))
                await until(ws, lambda e: e["type"] == "response.output_text.delta")
                await ws.send(json.dumps({"type": "response.cancel", "event_id": "k", "response_id": "resp_nope"}))
                events = await until(ws, done_for("q"))
        finally:
            await server.stop()
        error = next(e for e in events if e["type"] == "error")
        assert (error["error"]["code"], error["error"]["event_id"]) == ("response_not_found", "k")
        assert events[-1]["response"]["status"] in ("completed", "incomplete")  # not cancelled

    run(main())


def test_a_hostile_client_cannot_lock_others_out(smol):
    async def main():
        server, url = await started(smol, max_sessions=2, max_watches=8)
        try:
            async with connect(url) as hostile:
                await hostile.send(json.dumps({"type": "session.update", "event_id": "b",
                                               "session": {"memory": {"budget_tokens": 10**12}}}))
                budget = await until(hostile, lambda e: e["type"] == "error")
                await hostile.send(json.dumps({"type": "session.update", "event_id": "n",
                                               "session": {"memory": {"budget_tokens": None}}}))
                unbounded = await until(hostile, lambda e: e["type"] == "error")
                for i in range(12):
                    await hostile.send(json.dumps({"type": "watch.create", "event_id": f"w{i}",
                                                   "watch": {"id": f"w{i}", "condition": "a dog"}}))
                huge = json.dumps({"type": "watch.create", "event_id": "huge",
                                   "watch": {"id": "h", "condition": "a cat", "trigger": {"kind": "threshold", "n": 10**30}}})
                await hostile.send(huge)
                watches = await until(hostile, lambda e: e["type"] == "error" and e["error"]["event_id"] == "huge")
                await hostile.send("x" * (4 * 2**20 + 1))
                too_large = await until(hostile, lambda e: e["type"] == "error" and e["error"]["code"] == "message_too_large")
                # the hostile connection is still served, and a new client is admitted beside it
                await hostile.send(item("Still there?"))
                await hostile.send(create("still"))
                await until(hostile, done_for("still"))
                async with connect(url) as other:
                    created = await recv(other)
            return budget, unbounded, watches, too_large, created
        finally:
            await server.stop()

    budget, unbounded, watches, too_large, created = run(main())
    assert budget[-1]["error"]["code"] == "budget_too_large" and unbounded[-1]["error"]["code"] == "budget_too_large"
    limits = [e["error"]["event_id"] for e in watches if e["type"] == "error" and e["error"]["code"] == "watch_limit"]
    assert limits == ["w8", "w9", "w10", "w11"]
    assert watches[-1]["error"]["code"] == "invalid_value" and watches[-1]["error"]["param"] == "watch.trigger.n"
    assert too_large[-1]["error"]["code"] == "message_too_large"
    assert created["type"] == "session.created"


def test_parked_sessions_never_block_a_new_one(smol):
    async def main():
        server, url = await started(smol, max_sessions=1, max_parked_sessions=2, resume_window_s=60)
        try:
            admitted = 0
            for _ in range(6):  # e.g. a page reloaded again and again, each time as a new session
                async with connect(url) as ws:
                    admitted += (await recv(ws))["type"] == "session.created"
            async with connect(url) as ws:
                last = await recv(ws)
            return admitted, last, metric(server, "streamvlm_sessions_opened_total"), metric(server, "streamvlm_sessions_closed_total", reason="evicted")
        finally:
            await server.stop()

    admitted, last, opened, evicted = run(main())
    assert admitted == 6 and last["type"] == "session.created"
    assert opened == 7 and evicted == 4  # counters that never went down when sessions ended


def test_a_reload_takes_its_session_over_and_gets_what_it_missed(smol):
    async def main():
        server, url = await started(smol)
        try:
            async with connect(url) as first:
                created = await recv(first)
                handle = (await recv(first))["new_handle"]
                await first.send(encode_frame(synthetic_frames(1)[0], 0.0, "cam"))
                await first.send(item("What do you see?"))
                await first.send(create("q"))
                await until(first, lambda e: e["type"] == "response.created")
                # the same page again, before the old connection closed: it takes the session over
                async with connect(url + f"?resume={handle}") as second:
                    again = await until(second, lambda e: e["type"] == "session.created")
                    events = await until(second, done_for("q"))
                    with pytest.raises(ConnectionClosed):
                        while True:
                            await recv(first, 5)
            return created, again, events
        finally:
            await server.stop()

    created, again, events = run(main())
    assert again[-1]["session"]["id"] == created["session"]["id"]
    assert events[-1]["response"]["status"] in ("completed", "incomplete", "cancelled")


def test_the_outbox_drops_memory_updates_first_and_flags_a_consumer_that_stays_too_slow():
    from streamvlm.server.app import _OUTBOX_HARD, _OUTBOX_SOFT, _Outbox

    async def main():
        box = _Outbox()
        for i in range(_OUTBOX_SOFT):
            box.put({"type": "response.output_text.delta", "delta": str(i)})
        box.put({"type": "memory.update"})
        box.put({"type": "input_frame.stats"})
        assert box.dropped == 2 and len(box.items) == _OUTBOX_SOFT and not box.overflowed
        for i in range(_OUTBOX_HARD - _OUTBOX_SOFT):
            box.put({"type": "response.done"})
        assert not box.overflowed  # answers are never dropped; only past the hard limit is the client too slow
        box.put({"type": "response.done"})
        assert box.overflowed and box.ready.is_set()

    asyncio.run(main())


def test_dns_rebinding_is_refused_by_the_real_server(smol):
    from websockets.exceptions import InvalidStatus

    async def main():
        server, url = await started(smol)
        port = url.split(":")[2].split("/")[0]
        try:
            with pytest.raises(InvalidStatus) as refused:
                # evil.example resolves to 127.0.0.1 now: its page's Origin matches its Host
                async with connect(f"ws://evil.example:{port}/v1/realtime", host="127.0.0.1", port=int(port),
                                   origin=f"http://evil.example:{port}"):
                    pass
            return refused.value.response.status_code, len(server.sessions)
        finally:
            await server.stop()

    status, sessions = run(main())
    assert status == 403 and sessions == 0


def test_ids_are_unique_across_servers_and_restarts():
    from streamvlm.protocol.ids import new_id
    from streamvlm.protocol.session import RealtimeSession

    ids = {RealtimeSession("m").id for _ in range(200)} | {new_id("sess") for _ in range(200)}
    assert len(ids) == 400 and all(i.startswith("sess_") for i in ids)


def test_a_client_that_keeps_sending_garbage_is_closed_and_others_are_served(smol):
    async def main():
        server, url = await started(smol, limits=Limits(max_error_burst=20, max_errors_per_s=1.0))
        try:
            async with connect(url) as other:
                await recv(other)
                async with connect(url) as hostile:
                    await recv(hostile)
                    errors = []
                    try:
                        for _ in range(200):
                            await hostile.send("{not json")
                    except ConnectionClosed:
                        pass  # closed while still sending: the errors already sent are still read below
                    with pytest.raises(ConnectionClosed) as closed:
                        while True:
                            event = await recv(hostile)
                            if event["type"] == "error":
                                errors.append(event["error"]["code"])
                await other.send(item("Still there?"))
                await other.send(create("q"))
                done = await until(other, done_for("q"))
            return errors, closed.value, done[-1], metric(server, "streamvlm_protocol_errors_total", code="too_many_errors")
        finally:
            await server.stop()

    errors, closed, done, counted = run(main())
    assert errors[-1] == "too_many_errors" and errors.count("invalid_json") >= 20 and closed.rcvd.code == 1008
    assert done["response"]["status"] in ("completed", "incomplete") and counted == 1


def test_sessions_offering_more_frames_than_the_model_reads_are_capped_evenly_and_told(smol):
    """Admission by compute, end to end: two clients flood frames at a model whose frame share is tiny; each
    hears ``input_frame.rate`` with the same cap, frames beyond it are dropped without error events, and the
    server counts them; the previous engine ("lock") caps nobody."""
    async def flood(url: str, seconds: float) -> list[dict]:
        frames = synthetic_frames(4)
        events: list[dict] = []
        async with connect(url) as ws:
            loop = asyncio.get_running_loop()
            end, i = loop.time() + seconds, 0
            while loop.time() < end:
                await ws.send(encode_frame(frames[i % 4], i * 0.05, "cam"))
                i += 1
                await asyncio.sleep(0.05)
                while True:
                    try:
                        events.append(json.loads(await asyncio.wait_for(ws.recv(), 0.001)))
                    except asyncio.TimeoutError:
                        break
        return events

    async def main(engine: str):
        server, url = await started(smol, engine=engine, frame_time_share=0.002)
        try:
            results = await asyncio.gather(flood(url, 5.0), flood(url, 5.0))
            return results, metric(server, "streamvlm_frames_dropped_total", reason="compute")
        finally:
            await server.close()

    (a, b), dropped = run(main("scheduler"))
    caps = []
    for events in (a, b):
        assert not [e for e in events if e["type"] == "error"]  # a cap is not the client's fault
        rates = [e for e in events if e["type"] == "input_frame.rate"]
        assert rates and rates[0]["limited"] and rates[0]["reason"] == "compute"
        caps.append(rates[-1]["fps"])
    assert max(caps) <= 1.2 * min(caps)  # the same share for both
    assert dropped > 0
    (a, b), dropped = run(main("lock"))
    assert not [e for e in a + b if e["type"] == "input_frame.rate"] and dropped == 0
