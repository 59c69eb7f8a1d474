"""Frames of different sessions on one model share vision forwards, and each session gets exactly its own encoding."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from streamvlm import SamplingConfig, SessionConfig, StreamSession
from streamvlm.engine.batcher import choose_batch
from streamvlm.engine.check import synthetic_frames
from streamvlm.errors import ModelError
from streamvlm.models.turns import ANSWER, FRAME, TurnLock


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def tensors(out) -> list[torch.Tensor]:
    """Every tensor a vision output hands to the language model (pooled features, deepstack features)."""
    found = list(out.pooler_output)
    for layer in getattr(out, "deepstack_features", None) or []:
        found.extend(layer)
    return found


def close(a, b, tol: float = 1e-4) -> bool:
    ta, tb = tensors(a), tensors(b)
    return len(ta) == len(tb) and all(x.shape == y.shape and float((x - y).abs().max()) < tol for x, y in zip(ta, tb))


@pytest.fixture
def smol(smol, monkeypatch):
    """tiny-smolvlm with a lock of its own for this test: which waiting thread takes the model first
    (who leads a batch) must not depend on the recent use of an earlier test's threads."""
    monkeypatch.setattr(smol, "lock", TurnLock())
    return smol


@pytest.fixture
def fresh_batcher(adapter):
    """The family's adapter with batching on and clean counters (restored after the test)."""
    batcher = adapter.batcher
    before = (batcher.enabled, batcher.max_batch, batcher.max_batch_tokens)
    batcher.enabled = True
    batcher.reset_stats()
    yield batcher
    batcher.enabled, batcher.max_batch, batcher.max_batch_tokens = before
    batcher.reset_stats()


def test_a_batched_encode_equals_each_frame_encoded_alone(adapter):
    # Frames of two sizes (two cameras), as sessions would submit them; fp32: equal to summation order.
    frames = synthetic_frames(3, seed=1) + synthetic_frames(2, height=48, width=64, seed=2)
    prepared = [adapter.prepare_frame(f, float(i)) for i, f in enumerate(frames)]
    with torch.inference_mode(), adapter.hold():
        alone = [adapter.encode(p) for p in prepared]
        together = adapter.encode_batch(prepared)
    assert len(together) == len(prepared)
    for a, b in zip(alone, together):
        assert close(a, b)


def _threads(targets) -> list[threading.Thread]:
    threads = [threading.Thread(target=t) for t in targets]
    for thread in threads:
        thread.start()
    return threads


def _hold_while_submitting(adapter, n: int, targets) -> list[threading.Thread]:
    """Start ``targets`` while the model is busy, release it once ``n`` frames wait: they meet in one batch."""
    adapter.lock.acquire()
    try:
        threads = _threads(targets)
        wait_until(lambda: adapter.batcher.pending == n)
    finally:
        adapter.lock.release()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    return threads


def test_sessions_reading_at_once_share_one_forward_and_answer_as_alone(adapter, fresh_batcher):
    sampling = SessionConfig(sampling=SamplingConfig(max_new_tokens=4))
    frames = synthetic_frames(3, seed=7)

    def answers_alone(frame) -> tuple:
        s = StreamSession(adapter, sampling)
        s.ingest(frame, 0.0)
        out = (s.ask("What is on the table?").token_ids, s.probe(["Is something red?"]))
        s.close()
        return out

    alone = [answers_alone(f) for f in frames]
    fresh_batcher.reset_stats()
    sessions = [StreamSession(adapter, sampling) for _ in frames]
    failures: list[BaseException] = []

    def read(i: int):
        def run() -> None:
            try:
                sessions[i].ingest(frames[i], 0.0)
            except BaseException as exc:
                failures.append(exc)
        return run

    _hold_while_submitting(adapter, len(frames), [read(i) for i in range(len(frames))])
    assert not failures, failures
    stats = fresh_batcher.stats()
    assert (stats.batches, stats.frames, stats.max_batch) == (1, 3, 3)  # three frames, one vision forward
    together = [(s.ask("What is on the table?").token_ids, s.probe(["Is something red?"])) for s in sessions]
    for (tokens, probe), (tokens_alone, probe_alone) in zip(together, alone):
        assert tokens == tokens_alone and probe == pytest.approx(probe_alone, abs=1e-4)
    for s in sessions:
        s.close()


def test_a_fault_in_one_frame_fails_only_that_frame(smol, monkeypatch):
    batcher = smol.batcher
    batcher.reset_stats()
    prepared = [smol.prepare_frame(f, float(i)) for i, f in enumerate(synthetic_frames(3, seed=3))]
    poisoned = prepared[1]
    real_encode, real_batch = smol.encode, smol.encode_batch

    def encode(frame):
        if frame is poisoned:
            raise ModelError("this frame cannot be read")
        return real_encode(frame)

    def encode_batch(frames):
        if any(f is poisoned for f in frames):
            raise RuntimeError("the batched forward failed")
        return real_batch(frames)

    monkeypatch.setattr(smol, "encode", encode)
    monkeypatch.setattr(smol, "encode_batch", encode_batch)
    results: dict[int, object] = {}

    def submit(i: int):
        def run() -> None:
            with torch.inference_mode():
                try:
                    results[i] = batcher.encode(prepared[i])[0]
                except BaseException as exc:
                    results[i] = exc
        return run

    _hold_while_submitting(smol, 3, [submit(i) for i in range(3)])
    assert isinstance(results[1], ModelError) and "cannot be read" in str(results[1])
    with torch.inference_mode():
        for i in (0, 2):
            assert close(results[i], real_encode(prepared[i]))
    stats = batcher.stats()
    assert stats.split == 1 and stats.failed == 1


def test_another_sessions_question_runs_while_a_batch_is_in_the_vision_tower(smol, monkeypatch):
    # Two sessions' frames are in one batch, led by session L's thread. Session M, whose frame is in that
    # batch, has a question to serve: it does not wait for the batch to finish; the batch yields to it
    # between vision layers.
    batcher = smol.batcher
    m = StreamSession(smol)
    m.ingest(synthetic_frames(1, seed=11)[0], 0.0)
    probe_alone = m.probe(["Is something red?"])
    prepared = [smol.prepare_frame(f, 1.0) for f in synthetic_frames(2, seed=12)]
    events: list[str] = []
    started = threading.Event()
    real_batch = smol.encode_batch

    def encode_batch(frames):
        events.append(f"batch of {len(frames)} starts")
        started.set()
        # M's question waits for the model now (M's thread is in its pause, so it is no longer the thread
        # waiting in the batcher for the model: the waiter counted is M's question)
        wait_until(lambda: asking.is_set() and smol.lock.waiting >= 1)
        out = real_batch(frames)
        events.append("batch done")
        return out

    monkeypatch.setattr(smol, "encode_batch", encode_batch)
    probed: list[float] = []
    asking = threading.Event()

    def m_pause() -> None:  # M's worker: serve what should not wait, while its frame is in L's batch
        if started.is_set() and not probed:
            asking.set()
            with smol.lock.priority(ANSWER):
                probed.extend(m.probe(["Is something red?"]))
            events.append("M answered")

    results: dict[str, object] = {}

    def leader() -> None:
        with torch.inference_mode():
            results["L"] = batcher.encode(prepared[0], points=m.runner._pause_points())[0]

    def member() -> None:
        with torch.inference_mode():
            results["M"] = batcher.encode(prepared[1], pause=m_pause, points=m.runner._pause_points())[0]

    smol.lock.acquire()
    try:
        lead = _threads([leader])
        wait_until(lambda: batcher.pending == 1 and smol.lock.waiting == 1)  # L queues first: it will lead
        follow = _threads([member])
        wait_until(lambda: batcher.pending == 2)
    finally:
        smol.lock.release()
    for t in lead + follow:
        t.join(60)
    assert events == ["batch of 2 starts", "M answered", "batch done"]
    assert probed == pytest.approx(probe_alone, abs=1e-6)
    with torch.inference_mode():
        for key, frame in zip(("L", "M"), prepared):
            assert close(results[key], smol.encode(frame))
    m.close()


class Stop(Exception):
    """A worker stopping: its pause raises."""


def test_a_stopping_leader_hands_its_batch_back_and_a_stopping_member_is_dropped(smol):
    batcher = smol.batcher
    batcher.reset_stats()
    prepared = [smol.prepare_frame(f, 2.0) for f in synthetic_frames(3, seed=13)]
    points = StreamSession(smol).runner._pause_points()
    stop_leader = threading.Event()
    results: dict[str, object] = {}

    def leader_pause() -> None:
        if stop_leader.is_set():
            raise Stop("the leader's worker stops")

    def run(name: str, frame, pause) -> None:
        with torch.inference_mode():
            try:
                results[name] = batcher.encode(frame, pause=pause, points=points)[0]
            except BaseException as exc:
                results[name] = exc

    def member_pause() -> None:
        if "gone" not in results and stop_leader.is_set():
            raise Stop("the member's worker stops")

    smol.lock.acquire()
    try:
        threads = _threads([lambda: run("leader", prepared[0], leader_pause)])
        wait_until(lambda: batcher.pending == 1)
        threads += _threads([lambda: run("other", prepared[1], None)])
        wait_until(lambda: batcher.pending == 2)
        stop_leader.set()  # the leader stops at its first vision layer
    finally:
        smol.lock.release()
    threads[0].join(60)
    threads[1].join(60)
    assert isinstance(results["leader"], Stop)
    with torch.inference_mode():
        assert close(results["other"], smol.encode(prepared[1]))  # led again by its own thread
    # A member whose worker stops while its frame waits is dropped; the batch goes on without it.
    batcher.reset_stats()
    smol.lock.acquire()
    try:
        threads = _threads([lambda: run("kept", prepared[2], None)])
        wait_until(lambda: batcher.pending == 1)
        threads += _threads([lambda: run("gone", prepared[0], member_pause)])
        wait_until(lambda: not threads[1].is_alive())
    finally:
        smol.lock.release()
    threads[0].join(60)
    assert isinstance(results["gone"], Stop)
    with torch.inference_mode():
        assert close(results["kept"], smol.encode(prepared[2]))
    stats = batcher.stats()
    assert stats.dropped == 1 and stats.frames == 1 and batcher.pending == 0


def test_lock_mode_reads_one_frame_per_forward(smol):
    batcher = smol.batcher
    batcher.reset_stats()
    smol.vision_batching = False
    try:
        prepared = [smol.prepare_frame(f, 0.0) for f in synthetic_frames(3, seed=4)]
        out: list[object] = []

        def submit(frame):
            def go() -> None:
                with torch.inference_mode():
                    out.append(batcher.encode(frame)[0])
            return go

        smol.lock.acquire()
        try:
            threads = _threads([submit(p) for p in prepared])
            wait_until(lambda: smol.lock.waiting == 3)
        finally:
            smol.lock.release()
        for t in threads:
            t.join(60)
        stats = batcher.stats()
        assert (stats.batches, stats.frames, stats.max_batch) == (3, 3, 1) and len(out) == 3
    finally:
        smol.vision_batching = True


def test_sessions_flooding_frames_of_different_cost_get_equal_model_time():
    # Two sessions keep frames waiting; one's frames cost 3 s of model time, the other's 1 s. The model
    # serves one frame per forward; each forward is billed to its session. Over a long run their shares
    # of model time stay within 1.25x of each other (a count-fair order would give 3:1).
    now = [0.0]
    lock = TurnLock(half_life_s=30.0, clock=lambda: now[0])
    cost = {1: 3.0, 2: 1.0}

    class Ticket:  # what choose_batch reads of a waiting frame
        def __init__(self, thread: int, arrival: int) -> None:
            self.thread, self.level, self.arrival, self.cost = thread, FRAME, arrival, 1

    pending = [Ticket(1, 0), Ticket(2, 1)]
    arrivals = 2
    used = {1: 0.0, 2: 0.0}
    with lock:
        for _ in range(400):
            (chosen,) = choose_batch(pending, None, lock.usage, max_batch=1, max_tokens=1 << 30)
            pending.remove(chosen)
            now[0] += cost[chosen.thread]
            used[chosen.thread] += cost[chosen.thread]
            lock.charge({chosen.thread: cost[chosen.thread]})
            pending.append(Ticket(chosen.thread, arrivals))  # it floods: the next frame waits at once
            arrivals += 1
    assert max(used.values()) / min(used.values()) <= 1.25


def test_batch_limits_are_checked(smol):
    from streamvlm.engine.batcher import VisionBatcher
    from streamvlm.errors import ConfigError

    for bad in ({"max_batch": 0}, {"max_batch_tokens": 0}, {"poll_s": 0.0}):
        with pytest.raises(ConfigError):
            VisionBatcher(smol, **bad)


def test_a_frame_an_answer_waits_for_is_not_slowed_by_other_sessions_frames():
    """A batch led by a frame that an answer needs carries only frames as urgent: the answer waits for one encode."""
    class Ticket:
        def __init__(self, thread: int, level: int, arrival: int) -> None:
            self.thread, self.level, self.arrival, self.cost = thread, level, arrival, 1

    urgent = Ticket(1, ANSWER, 0)
    frames = [Ticket(2, FRAME, 1), Ticket(3, FRAME, 2)]
    also_urgent = Ticket(4, ANSWER, 3)
    assert choose_batch([urgent, *frames, also_urgent], urgent, lambda thread: 0.0, 8, 1 << 30) == [urgent, also_urgent]
    plain = frames[0]  # a frame read nobody waits for still takes every frame waiting
    assert choose_batch([urgent, *frames, also_urgent], plain, lambda thread: 0.0, 8, 1 << 30) == [plain, urgent, also_urgent, frames[1]]
