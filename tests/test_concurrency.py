"""Sessions sharing one loaded model: a session's hooks only ever see its own forward passes (issue 14, item 1)."""

from __future__ import annotations

import threading

import numpy as np
import torch

from streamvlm import MemoryConfig, SamplingConfig, SessionConfig, StreamSession
from streamvlm.engine.check import synthetic_frames
from streamvlm.models.base import Hook


class ObservedLock:
    """The adapter's lock, reporting when a thread other than ``owner`` starts waiting for it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.owner: int | None = None
        self.other_waits = threading.Event()

    def acquire(self, *args, **kwargs) -> bool:
        if self.owner is not None and threading.get_ident() != self.owner:
            self.other_waits.set()
        return self.inner.acquire(*args, **kwargs)

    def release(self) -> None:
        self.inner.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def test_a_forward_of_one_session_never_reaches_the_hooks_of_another(smol, monkeypatch):
    # Session B is in the middle of a frame prefill (between two language-model layers) when session A, on
    # another thread, asks for its retrieval queries (hooks on every attention layer). A must wait for the
    # model before attaching them: the rest of B's forward may not feed A's hooks (it made A's thread die with
    # "stack expects each tensor to be equal size", or gave it B's queries), and A gets what it gets alone.
    a = StreamSession(smol)
    b = StreamSession(smol)
    a.ingest(synthetic_frames(1, seed=1)[0], 0.0)
    question = smol.question_ids("What is on the table?")
    alone = a.runner.query_vectors(question, rotated=False)

    lock = ObservedLock(smol.lock)
    monkeypatch.setattr(smol, "lock", lock)
    results: dict[str, object] = {}

    def session_a() -> None:
        try:
            results["a"] = a.runner.query_vectors(question, rotated=False)
        except BaseException as exc:  # reported below, with the assertion
            results["a"] = exc

    thread = threading.Thread(target=session_a)
    calls = 0

    def in_the_middle_of_b() -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:  # B's forward has passed its first layer: A starts now and waits for the model
            lock.owner = threading.get_ident()
            thread.start()
            assert lock.other_waits.wait(30), "session A never asked for the model"
        return False

    encoded = b.encode_frame(synthetic_frames(1, seed=2)[0], 0.0)
    b.commit_frame(encoded, preempt=in_the_middle_of_b)
    thread.join(30)
    assert calls == len(smol.text_layers()) and not thread.is_alive()
    got = results["a"]
    assert not isinstance(got, BaseException), f"session A failed: {got!r}"
    assert torch.equal(got, alone)


def test_hooks_are_attached_only_while_the_model_is_held(smol, monkeypatch):
    # The one way to attach a hook holds the model's lock for as long as the hook is on; another thread that
    # wants the model waits until the hook is gone, and then finds none.
    lock = ObservedLock(smol.lock)
    monkeypatch.setattr(smol, "lock", lock)
    layer = smol.text_layers()[0]
    fired: list[int] = []
    seen_by_other: list[int] = []

    def other() -> None:
        with smol.hold():  # waits until the first hold ends
            seen_by_other.append(len(layer._forward_pre_hooks))

    thread = threading.Thread(target=other)
    with smol.hold([Hook(layer, lambda module, args: fired.append(1), pre=True)]):
        assert len(layer._forward_pre_hooks) == 1
        lock.owner = threading.get_ident()
        thread.start()
        assert lock.other_waits.wait(30)  # the other thread is waiting for the model now
        assert not seen_by_other
    thread.join(30)
    assert seen_by_other == [0] and not layer._forward_pre_hooks and not fired


def _frames(n: int, seed: int) -> list[np.ndarray]:
    return synthetic_frames(n, height=48, width=64, seed=seed)


def _spilling_questioner(smol) -> tuple[StreamSession, list]:
    """A session whose small budget has sent frames to the store, asking questions (with retrieval) and probes."""
    session = StreamSession(
        smol, SessionConfig(system_prompt="Watch.", sampling=SamplingConfig(max_new_tokens=4)),
        MemoryConfig(budget_tokens=160, retrieval_top_k=2),
    )
    for i, frame in enumerate(_frames(8, seed=21)):
        session.ingest(frame, float(i))
    assert session.stats()["chunks_stored"] > 0  # questions now query the store
    return session, []


def _ask_many(session: StreamSession, out: list) -> None:
    for i in range(12):
        answer = session.ask(f"What happened at second {i}?")
        out.append(("answer", answer.token_ids, tuple(e.pts_s for e in answer.evidence)))
        out.append(("probe", tuple(round(p, 6) for p in session.probe(["Is something red?", "Is it moving?"]))))


def test_two_sessions_on_one_model_answer_as_they_would_alone(smol):
    # One session streams frames without pause while another, whose memory has spilled to the store, asks
    # questions (each one scores the store with hooked retrieval queries) and probes. Every answer, its
    # evidence and every probe equal those of the same session run alone, and neither thread fails.
    alone_session, alone = _spilling_questioner(smol)
    _ask_many(alone_session, alone)
    alone_session.close()

    streamer = StreamSession(smol, SessionConfig(sampling=SamplingConfig(max_new_tokens=2)), MemoryConfig(budget_tokens=200))
    questioner, shared = _spilling_questioner(smol)
    done = threading.Event()
    failures: list[BaseException] = []
    streamed = 0

    def stream() -> None:
        nonlocal streamed
        frames = _frames(16, seed=5)
        try:
            while not done.is_set():
                streamer.ingest(frames[streamed % len(frames)], float(streamed))
                streamed += 1
                if streamed % 10 == 0:
                    streamer.ask("Anything new?")
        except BaseException as exc:
            failures.append(exc)

    def ask() -> None:
        try:
            _ask_many(questioner, shared)
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    threads = [threading.Thread(target=stream), threading.Thread(target=ask)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures, f"a session failed: {failures[0]!r}"
    assert streamed > 0
    assert shared == alone
    questioner.close()
    streamer.close()


def test_a_yield_takes_this_steps_hooks_off_while_another_session_runs(adapter):
    """A vision encode that yields the model to another session's answer leaves no hook of its own on it."""
    import threading

    from streamvlm.models.base import Hook
    from streamvlm.models.turns import ANSWER, FRAME

    layer = adapter.text_layers()[0]
    fired: list[int] = []
    seen_by_other: list[int] = []
    yielded = threading.Event()
    other_done = threading.Event()

    def hook(module, args):
        fired.append(threading.get_ident())

    def frame_step():
        with adapter.lock.priority(FRAME), adapter.hold([Hook(layer, hook, pre=True)]):
            wait_for(lambda: adapter.lock.waiting == 1)
            assert adapter.yield_turn()
            yielded.set()
            assert len(layer._forward_pre_hooks) == 1  # back on after the yield

    def answer_step():
        with adapter.lock.priority(ANSWER), adapter.hold():
            seen_by_other.append(len(layer._forward_pre_hooks))
        other_done.set()

    reader = threading.Thread(target=frame_step)
    reader.start()
    wait_for(lambda: len(layer._forward_pre_hooks) == 1)
    asker = threading.Thread(target=answer_step)
    asker.start()
    reader.join(10)
    asker.join(10)
    assert yielded.is_set() and other_done.is_set()
    assert seen_by_other == [0] and len(layer._forward_pre_hooks) == 0


def wait_for(predicate, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)
