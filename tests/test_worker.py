"""The live worker with a real tiny model on a real event loop: priorities, dropping, dedup, alerts."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from streamvlm import Frame, SamplingConfig, SessionConfig, StreamSession
from streamvlm.dialogue import ControllerConfig, TriggerSpec
from streamvlm.engine.check import synthetic_frames
from streamvlm.engine.worker import LiveWorker, WorkerConfig

ALWAYS = TriggerSpec(kind="threshold", on=0.0, off=0.0, m=1, n=1)  # fires on the first probe: tests the plumbing


def frames(n: int, seed: int = 0) -> list[Frame]:
    return [Frame(img, float(i), "cam") for i, img in enumerate(synthetic_frames(n, seed=seed))]


async def collect(worker: LiveWorker, until, timeout: float = 60.0) -> list:
    seen = []

    async def run():
        async for event in worker.events():
            seen.append(event)
            if until(event, seen):
                return

    await asyncio.wait_for(run(), timeout)
    return seen


def session(adapter, max_new_tokens: int = 4) -> StreamSession:
    return StreamSession(adapter, SessionConfig(sampling=SamplingConfig(max_new_tokens=max_new_tokens)))


def test_probe_leaves_cache_and_ledger_identical(adapter):
    s = session(adapter)
    for f in frames(2):
        s.ingest(f)
    keys = [layer.keys.clone() for layer in s.runner.cache.layers]
    books = s.memory.ledger.to_dict()
    p = s.probe(["Is there a red square?", "Is the door open?"])
    assert len(p) == 2 and all(0.0 <= x <= 1.0 for x in p)
    assert s.memory.ledger.to_dict() == books
    assert all(torch.equal(layer.keys, k) for layer, k in zip(s.runner.cache.layers, keys))
    assert s.probe(["Is there a red square?"])[0] == pytest.approx(p[0], abs=1e-6)  # deterministic


def test_answers_stream_with_evidence(smol):
    async def main():
        worker = LiveWorker(session(smol))
        await worker.start()
        for f in frames(3):
            worker.submit_frame(f)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        rid = worker.ask("What do you see?")
        events = await collect(worker, lambda e, _: e.kind == "answer.done")
        await worker.stop()
        return rid, events, worker.counters

    rid, events, counters = asyncio.run(main())
    done = events[-1]
    assert done.data["request_id"] == rid and done.data["trigger"] == "user"
    assert [e.pts_s for e in done.data["answer"].evidence][-1] == 2.0
    deltas = "".join(e.data["text"] for e in events if e.kind == "answer.delta")
    assert deltas.strip() == done.data["answer"].text
    assert counters.received == 3 and counters.ingested + counters.dropped + counters.skipped == 3


async def wait_idle(worker: LiveWorker, timeout: float = 60.0) -> None:
    async def run():
        while not worker.idle:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(run(), timeout)


def balanced(counters, pending: int = 0) -> bool:
    return counters.received == counters.skipped + counters.dropped + counters.ingested + pending


def test_latest_frame_wins_and_duplicates_are_skipped(smol):
    async def main():
        worker = LiveWorker(session(smol), config=WorkerConfig(dedup_threshold=2.0))
        fs = frames(5, seed=1)
        results = [worker.submit_frame(f) for f in fs]  # before start: the model is not free yet
        results.append(worker.submit_frame(Frame(fs[-1].image.copy(), 5.0, "cam")))  # same view, later: replaces the waiting one
        assert worker.pending == 1 and balanced(worker.counters, 1)
        await worker.start()
        await wait_idle(worker)
        results.append(worker.submit_frame(Frame(fs[-1].image.copy(), 6.0, "cam")))  # same view as the frame read: skipped
        await asyncio.sleep(0.2)
        await worker.stop()
        return results, worker.counters, worker.session

    results, counters, s = asyncio.run(main())
    assert results == ["queued"] + ["replaced"] * 5 + ["skipped"]
    assert (counters.received, counters.dropped, counters.skipped, counters.ingested) == (7, 5, 1, 1) and balanced(counters)
    assert [e.pts_s for e in s.frames] == [5.0]  # only the newest frame reached the model
    assert len(counters.lag_s) == 1 and counters.lag_s[0] >= 0 and counters.ingested_pts == [5.0]
    (read,) = counters.reads_since(0)
    assert read.pts_s == 5.0 and read.model_s > 0  # the model time of the one read is measured


def test_counters_keep_only_recent_reads_and_report_each_once():
    """An hours-long stream must not grow the worker's memory: reads are counted, and only the last are kept."""
    from streamvlm.engine.worker import RECENT_READS, FrameRead, WorkerCounters

    c = WorkerCounters()
    seen, reported = 0, []
    for i in range(RECENT_READS * 3):
        c.recent.append(FrameRead(float(i), 0.0, 0.1))
        c.ingested += 1
        if i % 7 == 0 or i < 10:  # a reporter that looks now and then reports each read once, in order
            reported += [r.pts_s for r in c.reads_since(seen)]
            seen = c.ingested
    assert len(c.recent) == RECENT_READS and len(c.lag_s) == RECENT_READS
    assert reported == [float(i) for i in range(len(reported))]
    assert [r.pts_s for r in c.reads_since(c.ingested - 3)] == [float(RECENT_READS * 3 - k) for k in (3, 2, 1)]
    assert len(c.reads_since(0)) == RECENT_READS  # a reporter far behind gets what is kept, no more


def test_watch_alerts_and_deferred_questions_are_answered(smol):
    async def main():
        worker = LiveWorker(session(smol), ControllerConfig(default_trigger=ALWAYS))
        await worker.start()
        worker.watch("w1", "a red square is visible")
        rid = worker.ask("Tell me when a blue circle appears.")
        await asyncio.sleep(0.1)
        worker.submit_frame(frames(1)[0])
        events = await collect(worker, lambda e, seen: any(x.kind == "alert" for x in seen) and any(x.kind == "answer.done" for x in seen))
        await worker.stop()
        return rid, events

    rid, events = asyncio.run(main())
    kinds = [e.kind for e in events]
    assert "acknowledged" in kinds and kinds.index("acknowledged") < kinds.index("answer.done")
    alert = next(e for e in events if e.kind == "alert")
    assert alert.data["watch_id"] == "w1" and alert.data["evidence_t"] == 0.0
    done = next(e for e in events if e.kind == "answer.done")
    assert done.data["request_id"] == rid and done.data["trigger"] == "deferred"


def test_cancel_stops_a_long_answer(smol):
    async def main():
        worker = LiveWorker(session(smol, max_new_tokens=3000))
        await worker.start()
        worker.submit_frame(frames(1)[0])
        await asyncio.sleep(0.2)
        worker.ask("Tell me everything.")
        events = await collect(worker, lambda e, _: e.kind == "answer.delta")
        worker.cancel()
        events += await collect(worker, lambda e, _: e.kind == "answer.done")
        await worker.stop()
        return events

    events = asyncio.run(main())
    answer = events[-1].data["answer"]
    assert answer.finish_reason in ("cancelled", "stop") and len(answer.token_ids) < 3000


def test_bench_live_reports_the_documented_figures(tmp_path):
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "live.json"
    proc = subprocess.run(
        [sys.executable, "-m", "streamvlm.cli", "bench", "live", "--model", "tiny-smolvlm", "--fps", "5", "--duration", "3",
         "--budget", "600", "--json", str(out)], capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    frames = result["frames"]
    assert frames["received"] == 15 and frames["skipped"] >= 1  # the static middle third is skipped
    assert frames["ingested"] + frames["skipped"] + frames["dropped"] == frames["received"]
    assert result["ttft_idle_s"] > 0 and result["ttft_load_s"] > 0
    assert 0 <= result["lag_p50_s"] <= result["lag_p95_s"]
    assert result["change_reaction_s"] is not None
    assert len(result["lag_by_frame"]) == frames["ingested"] and result["lag_max_s"] >= result["lag_p95_s"]
    last_read = result["lag_by_frame"][-1]  # the source's last frame (2.8 s) is read unless a read was under way
    assert (result["lag_last_frame_s"] is None) == (last_read[0] != 2.8)
    if result["lag_last_frame_s"] is not None:
        assert abs(result["lag_last_frame_s"] - last_read[1]) < 1e-4
    assert set(result["preemptions"]) == {"encode_pauses", "prefill_restarts"} and result["torch_threads"] >= 1


def test_batched_probes_equal_probes_one_by_one(adapter):
    s = session(adapter)
    for f in frames(2, seed=4):
        s.ingest(f)
    prompts = ["Is there a red square?", "Is the door open now?", "Is it raining?"]
    together = s.probe(prompts)
    alone = [s.probe([p])[0] for p in prompts]
    assert together == pytest.approx(alone, abs=1e-5)


def test_a_burst_with_duplicates_never_runs_time_backwards(smol):
    """A frame that waited may be older than the stream clock (a refreshed duplicate, a question): no error, time only moves forward."""

    async def main():
        worker = LiveWorker(session(smol))
        fs = frames(3, seed=2)
        worker.submit_frame(fs[0])
        worker.submit_frame(Frame(fs[0].image.copy(), 5.0, "cam"))  # duplicate of the waiting frame, later time
        await worker.start()
        worker.submit_frame(fs[1])
        await asyncio.sleep(0.5)
        worker.ask("What now?")
        events = await collect(worker, lambda e, _: e.kind in ("answer.done", "error"))
        await worker.stop()
        return events, worker.session

    events, s = asyncio.run(main())
    assert events[-1].kind == "answer.done", events[-1]
    times = [e.pts_s for e in s.frames]
    assert times == sorted(times)


class Instrumented:
    """A session's runner with a log of its steps, and slow layers: the tiny model made as slow as a real one."""

    def __init__(self, s: StreamSession, *, vision_sleep: float = 0.0, frame_prefill_sleep: float = 0.0) -> None:
        self.log: list[tuple[str, float]] = []
        self.encoding, self.frame_prefill = threading.Event(), threading.Event()
        runner = s.runner
        encode, prefill = runner.encode, runner.prefill
        in_frame_prefill = False

        def logged_encode(frame, **kw):
            self.log.append(("encode", frame.pts_s))
            self.encoding.set()
            out = encode(frame, **kw)
            self.log.append(("encoded", frame.pts_s))
            return out

        def logged_prefill(ids, **kw):
            nonlocal in_frame_prefill
            frame = kw.get("encoded") is not None
            self.log.append(("frame prefill" if frame else "prefill", time.perf_counter()))
            in_frame_prefill = frame
            if frame:
                self.frame_prefill.set()
            try:
                return prefill(ids, **kw)
            finally:
                in_frame_prefill = False

        def slow_vision(module, args):
            time.sleep(vision_sleep)

        def slow_frame_prefill(module, args):
            if in_frame_prefill:
                time.sleep(frame_prefill_sleep)

        runner.encode, runner.prefill = logged_encode, logged_prefill
        model = s.adapter.model.model
        self.handles = [layer.register_forward_pre_hook(slow_vision) for layer in model.vision_model.encoder.layers]
        self.handles += [layer.register_forward_pre_hook(slow_frame_prefill) for layer in s.adapter.text_layers()]

    def close(self) -> None:
        for handle in self.handles:  # the adapter is shared by other tests
            handle.remove()

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.log]


def run_question_during(smol, step: str) -> tuple:
    """Frame 0.0 in memory; frame 1.0 submitted; a question asked once the worker is in ``step`` of reading it."""
    s = session(smol)
    s.ingest(frames(1)[0].image, 0.0)
    probe = Instrumented(s, vision_sleep=0.6 if step == "encode" else 0.0, frame_prefill_sleep=0.6 if step == "prefill" else 0.0)

    async def main():
        worker = LiveWorker(s)
        await worker.start()
        assert worker.submit_frame(Frame(frames(2, seed=3)[1].image, 1.0, "cam")) == "queued"
        started = probe.encoding if step == "encode" else probe.frame_prefill
        assert await asyncio.to_thread(started.wait, 30)
        rid = worker.ask("What do you see?")
        events = await collect(worker, lambda e, _: e.kind == "answer.done")
        await wait_idle(worker)
        await worker.stop()
        return rid, events, worker.counters

    try:
        rid, events, counters = asyncio.run(main())
    finally:
        probe.close()
    return s, probe, rid, events, counters


@pytest.mark.parametrize("step", ["encode", "prefill"])
def test_a_question_asked_while_a_frame_is_read_is_answered_from_that_frame(smol, step):
    # The frame reached the worker before the question: the answer waits for it (issue: a question sent right
    # after a frame was answered from no frames). The read is neither suspended nor restarted for it.
    s, probe, rid, events, counters = run_question_during(smol, step)
    kinds = probe.kinds()
    assert kinds.count("encode") == 1 and kinds.count("frame prefill") == 1
    assert kinds.index("encoded") < kinds.index("frame prefill") < kinds.index("prefill")
    done = events[-1]
    assert done.data["request_id"] == rid
    assert [e.pts_s for e in done.data["answer"].evidence] == [0.0, 1.0]
    assert counters.restarted == 0  # (the message itself may be read while the encode pauses; its answer waits)
    assert (counters.ingested, counters.dropped) == (1, 0) and balanced(counters) and counters.ingested_pts == [1.0]


def test_stop_during_a_frame_encode_abandons_it_and_the_counters_add_up(smol):
    s = session(smol)
    s.ingest(frames(1)[0].image, 0.0)
    probe = Instrumented(s, vision_sleep=0.5)

    async def main():
        worker = LiveWorker(s)
        await worker.start()
        worker.submit_frame(Frame(frames(2, seed=3)[1].image, 1.0, "cam"))
        assert await asyncio.to_thread(probe.encoding.wait, 30)
        await worker.stop()
        return worker

    try:
        worker = asyncio.run(main())
    finally:
        probe.close()
    assert probe.kinds() == ["encode"]  # stopped inside the vision tower: never finished, never prefilled
    assert [e.pts_s for e in s.frames] == [0.0] and s.last_t == 0.0
    c = worker.counters
    assert (c.received, c.dropped, c.ingested, worker.pending) == (1, 1, 0, 0) and balanced(c)
