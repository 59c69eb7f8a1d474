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


def runners(adapter, lengths=(5, 40, 17), shifts=(0, 0, 300)) -> list[Runner]:
    """Streams of different lengths; the last one's positions run ahead of its cache (re-indexed memory)."""
    out = []
    for n, shift in zip(lengths, shifts):
        runner = Runner(adapter)
        runner.next_position += shift
        runner.prefill([(7 * i + n) % 200 + 3 for i in range(n)])
        out.append(runner)
    return out


@pytest.mark.parametrize("name", ["tiny-smolvlm", "shapeworld"])
def test_a_batched_step_gives_each_row_what_its_step_alone_gives(name):
    adapter = load(name)
    assert batchable(adapter.model)
    streams = runners(adapter)
    tokens = [11, 12, 13]
    alone_caches = [copy.deepcopy(r.cache) for r in streams]
    positions = [r.next_position for r in streams]
    with adapter.hold():
        batched = batched_step(adapter.model, [r.cache for r in streams], tokens, positions)
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

    with smol.lock:  # the model is busy: all three steps queue, and the next holder takes them together
        threads = [threading.Thread(target=step, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: batcher.pending == 3)
    for t in threads:
        t.join(30)
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
    with smol.lock:
        threads = [threading.Thread(target=step, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: batcher.pending == 3)
    for t in threads:
        t.join(30)
    stats = batcher.stats()
    assert stats.split == 1 and stats.failed == 1
    assert isinstance(results[1], IndexError)
    assert (streams[1].cache_length, streams[1].next_position) == before[1]  # untouched
    for i in (0, 2):
        assert isinstance(results[i], torch.Tensor)
        assert (streams[i].cache_length, streams[i].next_position) == (before[i][0] + 1, before[i][1] + 1)


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
    print("decode forwards by steps carried:", sizes)
    assert sum(sizes.values()) > 0  # every step went through the batcher


def test_models_whose_layers_cannot_be_batched_step_alone():
    qwen = load("tiny-qwen2.5-vl")
    assert not batchable(qwen.model) and not qwen.decode_batching
    runner = Runner(qwen)
    ids = qwen.question_ids("hello")
    runner.prefill(ids)
    assert runner.decode(ids[-1]).shape[-1] > 0
    assert qwen.decode_batcher.stats().steps == 0
