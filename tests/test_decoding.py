"""Decode steps of different sessions on one model share forwards, and each gets exactly what it gets alone."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from conftest import load
from streamvlm import SamplingConfig, SessionConfig, StreamSession
from streamvlm.engine.check import synthetic_frames
from streamvlm.engine.decoding import batchable, batched_step
from streamvlm.engine.runner import Runner
from streamvlm.models.turns import ANSWER


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def words(adapter) -> list[int]:
    """Plain text ids (no special or image tokens) of ``adapter``'s tokenizer."""
    return adapter.text_ids("a blue square and a red circle move across the frame while a green triangle waits " * 4)


def runners(adapter, lengths=(5, 40, 17), shifts=(0, 0, 300)) -> list[Runner]:
    """Streams of different lengths; the last one's positions run ahead of its cache (re-indexed memory)."""
    text = words(adapter)
    out = []
    for k, (n, shift) in enumerate(zip(lengths, shifts)):
        runner = Runner(adapter)
        runner.next_position += shift
        runner.prefill(text[k : k + n])
        out.append(runner)
    return out


def queued_together(adapter, step, n: int = 3) -> None:
    """Run ``step(i)`` in ``n`` threads while the model is busy, so that all ``n`` decode steps queue and
    the next holder of the model takes them together; return when every thread has ended."""
    with adapter.lock:
        threads = [threading.Thread(target=step, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        wait_until(lambda: adapter.decode_batcher.pending == n)
    for t in threads:
        t.join(30)


def place(adapter, runner: Runner, token: int) -> torch.Tensor:
    """The position ids of ``token`` fed next to ``runner``, as the model takes them."""
    return adapter.model_position_ids([token], runner.next_position, [])[0]


@pytest.mark.parametrize("name", ["tiny-smolvlm", "shapeworld", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_a_batched_step_gives_each_row_what_its_step_alone_gives(name):
    adapter = load(name)
    assert batchable(adapter.model)
    streams = runners(adapter)
    tokens = words(adapter)[3:6]
    alone_caches = [copy.deepcopy(r.cache) for r in streams]
    positions = [place(adapter, r, t) for r, t in zip(streams, tokens)]
    implementation = adapter.model.config.get_text_config()._attn_implementation
    with adapter.hold():
        batched = batched_step(adapter.model, [r.cache for r in streams], tokens, positions)
    assert adapter.model.config.get_text_config()._attn_implementation == implementation  # the model's own again
    for runner, cache, token, row in zip(streams, alone_caches, tokens, batched):
        runner.cache, mine = cache, runner.cache
        adapter.decode_batching = False
        try:
            expected = runner.decode(token)
        finally:
            adapter.decode_batching = True
        assert torch.allclose(row, expected, atol=1e-4), float((row - expected).abs().max())
        for a, b in zip(mine.layers, runner.cache.layers):  # the same keys and values were appended
            assert a.keys.shape == b.keys.shape and torch.allclose(a.keys, b.keys, atol=1e-5)
            assert torch.allclose(a.values, b.values, atol=1e-5)


def test_steps_waiting_together_run_in_one_forward_and_each_gets_its_own_logits():
    smol = load("tiny-smolvlm")
    batcher = smol.decode_batcher
    streams = runners(smol)
    reference = runners(smol)  # the same streams again, stepped alone
    smol.decode_batching = False
    try:
        expected = [r.decode(20 + i) for i, r in enumerate(reference)]
    finally:
        smol.decode_batching = True
    batcher.reset_stats()
    got: dict[int, torch.Tensor] = {}

    def step(i: int) -> None:
        with smol.lock.priority(ANSWER):
            got[i] = streams[i].decode(20 + i)

    queued_together(smol, step)
    assert batcher.stats().sizes == {3: 1}
    for i, runner in enumerate(streams):
        assert torch.allclose(got[i], expected[i], atol=1e-4)
        assert (runner.cache_length, runner.next_position, runner.seen) == (
            reference[i].cache_length, reference[i].next_position, reference[i].seen)


def test_a_step_that_fails_in_a_batch_fails_alone_and_the_others_are_answered():
    smol = load("tiny-smolvlm")
    batcher = smol.decode_batcher
    streams = runners(smol)
    before = [(r.cache_length, r.next_position) for r in streams]
    bad = smol.model.config.get_text_config().vocab_size + 5  # no such token: the embedding raises
    tokens = [21, bad, 23]
    results: dict[int, object] = {}

    def step(i: int) -> None:
        try:
            results[i] = streams[i].decode(tokens[i])
        except Exception as exc:  # noqa: BLE001 - the test looks at what each waiter got
            results[i] = exc

    batcher.reset_stats()
    queued_together(smol, step)
    stats = batcher.stats()
    assert stats.split == 1 and stats.failed == 1
    assert isinstance(results[1], IndexError)
    assert (streams[1].cache_length, streams[1].next_position) == before[1]  # untouched
    for i in (0, 2):
        assert isinstance(results[i], torch.Tensor)
        assert (streams[i].cache_length, streams[i].next_position) == (before[i][0] + 1, before[i][1] + 1)


@pytest.mark.parametrize("comes_back", [True, False])
def test_a_leader_waits_briefly_for_a_session_still_answering(comes_back):
    # Session A got its token a moment ago and is picking the next one; B leads now. B waits for A's
    # next step (at most a quarter of a forward) so both share one forward, instead of taking turns
    # forever. If A's answer has ended, B waits that long once, then goes alone.
    smol = load("tiny-smolvlm")
    batcher = smol.decode_batcher
    a, b = runners(smol, lengths=(6, 9), shifts=(0, 0))
    a_next = threading.Event()

    def answer_a() -> None:
        with smol.lock.priority(ANSWER):
            a.decode(30)  # alone: A has answered just now
            a_next.wait(30)
            if comes_back:
                a.decode(31)

    thread_a = threading.Thread(target=answer_a)
    thread_a.start()
    wait_until(lambda: a.seen == 7)
    batcher.reset_stats()
    batcher._last_forward_s = 1.0  # as on a slow machine: B may wait up to 0.25 s for A
    timer = threading.Timer(0.05, a_next.set)  # A comes back 50 ms into B's wait
    timer.start()
    t0 = time.monotonic()
    with smol.lock.priority(ANSWER):
        b.decode(40)
    waited = time.monotonic() - t0
    thread_a.join(30)
    timer.join()
    if comes_back:
        assert batcher.stats().sizes == {2: 1} and a.seen == 8
    else:
        assert batcher.stats().sizes == {1: 1} and 0.2 < waited < 5


def test_a_batch_that_fails_inside_a_layer_leaves_the_model_and_every_cache_as_before(monkeypatch):
    smol = load("tiny-smolvlm")
    streams = runners(smol)
    held = [r.cache_length for r in streams]
    implementation = smol.model.config.get_text_config()._attn_implementation
    layer = smol.model.model.text_model.layers[1]

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in layer 1")

    monkeypatch.setattr(layer.mlp, "forward", broken)
    with smol.hold(), pytest.raises(RuntimeError, match="layer 1"):
        batched_step(smol.model, [r.cache for r in streams], words(smol)[:3], [place(smol, r, 0) for r in streams])
    assert smol.model.config.get_text_config()._attn_implementation == implementation
    for runner, n in zip(streams, held):  # layer 0 took the new token, layer 1 failed: the batcher crops it back
        runner._crop_to(n)
        assert runner.cache_length == n and all(layer.keys.shape[-2] == n for layer in runner.cache.layers)


def test_sessions_answering_at_once_say_what_they_say_alone():
    smol = load("tiny-smolvlm")
    frames = synthetic_frames(3)

    def answer_all(batching: bool) -> tuple[list[str], dict[int, int]]:
        smol.decode_batching = batching
        smol.decode_batcher.reset_stats()
        sessions = [StreamSession(smol, SessionConfig(sampling=SamplingConfig(max_new_tokens=12))) for _ in range(3)]
        for i, session in enumerate(sessions):
            for k in range(i + 1):
                session.ingest(frames[k], float(k))
        texts: list[str] = [""] * 3
        start = threading.Barrier(3)

        def ask(i: int) -> None:
            start.wait()
            with smol.lock.priority(ANSWER):
                texts[i] = sessions[i].ask("What is happening?").text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return texts, smol.decode_batcher.stats().sizes

    try:
        alone, _ = answer_all(False)
        together, sizes = answer_all(True)
    finally:
        smol.decode_batching = True
    assert together == alone
    assert sum(sizes.values()) > 0  # every step went through the batcher


def test_a_model_whose_layers_cannot_be_batched_steps_alone():
    from streamvlm.engine.decoding import DecodeBatcher
    from streamvlm.models.turns import TurnLock

    class Plain:  # a model without a rotary language model: nothing to batch
        model = torch.nn.Linear(2, 2)
        lock = TurnLock()

    assert not batchable(Plain.model)
    batcher = DecodeBatcher(Plain())  # type: ignore[arg-type]
    assert not batcher.active
    logits = torch.arange(3.0)
    assert batcher.step(None, 1, torch.zeros(1, 1), alone=lambda: logits, crop=lambda: None) is logits
    assert batcher.stats().steps == 0
