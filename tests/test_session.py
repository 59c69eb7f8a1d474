"""StreamSession: exact streaming, multi-turn dialogue, bad input, cancellation and scratch contexts."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from streamvlm import SamplingConfig, SessionConfig, StreamSession
from streamvlm.engine.check import check_exactness, synthetic_frames
from streamvlm.errors import FrameError, QuestionError, StreamVLMError, TimestampError


def offline_logits(adapter, session: StreamSession, frames, times) -> torch.Tensor:
    """Logits of one offline forward over everything the session has been fed (the reference)."""
    ids = torch.tensor([session.runner.ids])
    prepared = [adapter.prepare_frame(f, t) for f, t in zip(frames, times)]
    with torch.inference_mode():
        return adapter.model(input_ids=ids, **adapter.offline_kwargs(ids, prepared)).logits[0].float()


def test_streaming_equals_offline_prefill(adapter):
    report = check_exactness(adapter, synthetic_frames(5), "What is moving?", max_new_tokens=10)
    assert report.max_abs_logit_diff <= 1e-4, report
    assert report.same_answer, report
    assert report.ok
    assert report.frames == 5 and report.context_tokens > 5


def test_later_questions_see_earlier_dialogue_exactly(adapter):
    """Frames, an answer, more frames, a second question: still one offline prefill's logits."""
    frames = synthetic_frames(4, seed=3)
    session = StreamSession(adapter, SessionConfig(sampling=SamplingConfig(max_new_tokens=5)))
    session.ingest(frames[0], 0.0)
    session.ingest(frames[1], 1.0)
    first = session.ask("What is there?", 1.5)
    assert first.finish_reason in ("stop", "length")
    session.ingest(frames[2], 2.0)
    session.ingest(frames[3], 3.0)
    before = len(session.runner.ids)
    stream = session.ask_stream("And before that?", 3.5, return_logits=True)
    second = stream.result()
    prompt_len = len(adapter.question_ids("And before that?"))
    ref = offline_logits(adapter, session, frames, [0.0, 1.0, 2.0, 3.0])
    streamed_question = stream.logits[:prompt_len]
    assert torch.allclose(streamed_question, ref[before : before + prompt_len], atol=1e-4, rtol=0)
    # the first exchange (question, then the answer's tokens) sits in the context the second question saw
    q1 = adapter.question_ids("What is there?")
    ids = session.runner.ids
    starts = [i for i in range(len(ids)) if ids[i : i + len(q1)] == q1]
    assert len(starts) == 1
    after = starts[0] + len(q1)
    assert tuple(ids[after : after + len(first.token_ids)]) == first.token_ids
    assert [e.pts_s for e in second.evidence] == [0.0, 1.0, 2.0, 3.0]
    assert [e.pts_s for e in first.evidence] == [0.0, 1.0]


def test_answer_reports_evidence_timing_and_finish(smol):
    session = StreamSession(smol, SessionConfig(sampling=SamplingConfig(max_new_tokens=3)))
    for i, f in enumerate(synthetic_frames(3)):
        session.ingest(f, 0.5 * i, source_id="cam1")
    deltas: list[str] = []
    answer = session.ask("What do you see?", 2.0, on_delta=deltas.append)
    assert answer.asked_at_s == 2.0
    assert [(e.pts_s, e.source_id) for e in answer.evidence] == [(0.0, "cam1"), (0.5, "cam1"), (1.0, "cam1")]
    assert answer.finish_reason in ("stop", "length")
    assert len(answer.token_ids) <= 3
    assert "".join(deltas).strip() == answer.text
    assert 0 < answer.ttft_s <= answer.total_s
    assert session.last_t == 2.0


def test_max_new_tokens_stops_with_length(smol):
    # A random model rarely emits its end-of-turn token in 2 steps; if it did, "stop" is also correct.
    session = StreamSession(smol)
    session.ingest(synthetic_frames(1)[0], 0.0)
    answer = session.ask("Describe it.", sampling=SamplingConfig(max_new_tokens=2))
    assert (answer.finish_reason, len(answer.token_ids)) in {("length", 2), ("stop", 0), ("stop", 1)}


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.zeros((32, 32), dtype=np.uint8), FrameError),
        (np.zeros((32, 32, 4), dtype=np.uint8), FrameError),
        (np.zeros((32, 32, 3), dtype=np.float32), FrameError),
        (np.zeros((2, 32, 3), dtype=np.uint8), FrameError),
        ("not an image", FrameError),
    ],
)
def test_bad_frames_are_refused_and_session_stays_usable(smol, bad, error):
    session = StreamSession(smol)
    session.ingest(synthetic_frames(1)[0], 1.0)
    held = list(session.runner.ids)
    with pytest.raises(error) as info:
        session.ingest(bad, 2.0)
    assert isinstance(info.value, StreamVLMError) and str(info.value)
    assert session.runner.ids == held and session.runner.cache_length == len(held)
    session.ingest(synthetic_frames(2)[1], 2.0)
    assert session.ask("still there?", sampling=SamplingConfig(max_new_tokens=2)).evidence[-1].pts_s == 2.0


def test_bad_times_and_questions_are_refused(smol):
    session = StreamSession(smol)
    frame = synthetic_frames(1)[0]
    session.ingest(frame, 5.0)
    held = session.runner.cache_length
    with pytest.raises(TimestampError, match="before the latest"):
        session.ingest(frame, 4.0)
    with pytest.raises(TimestampError):
        session.ingest(frame, math.nan)
    with pytest.raises(TimestampError):
        session.ask("what?", 1.0)
    with pytest.raises(QuestionError):
        session.ask("   ", 6.0)
    with pytest.raises(QuestionError):
        session.ask("x" * 5000, 6.0)
    assert session.runner.cache_length == held and session.last_t == 5.0
    session.ingest(frame, 5.0)  # an equal time is allowed
    assert session.stats()["frames"] == 2


def test_cancel_keeps_context_consistent(smol):
    """Closing a stream mid-answer ends the turn; the context stays exact for what follows."""
    frames = synthetic_frames(3, seed=5)
    session = StreamSession(smol, SessionConfig(sampling=SamplingConfig(max_new_tokens=20)))
    session.ingest(frames[0], 0.0)
    stream = session.ask_stream("Tell me a long story.")
    next(iter(stream), None)
    with pytest.raises(QuestionError, match="still being generated"):
        session.ingest(frames[1], 1.0)
    stream.close()
    assert stream.answer is not None and stream.answer.finish_reason in ("cancelled", "stop")
    session.ingest(frames[1], 1.0)
    session.ingest(frames[2], 2.0)
    before = len(session.runner.ids)
    follow = session.ask_stream("What now?", return_logits=True)
    follow.result()
    n = len(smol.question_ids("What now?"))
    ref = offline_logits(smol, session, frames, [0.0, 1.0, 2.0])
    assert torch.allclose(follow.logits[:n], ref[before : before + n], atol=1e-4, rtol=0)


def test_scratch_restores_the_cache_exactly(adapter):
    session = StreamSession(adapter)
    session.ingest(synthetic_frames(1)[0], 0.0)
    keys = [layer.keys.clone() for layer in session.runner.cache.layers]
    ids, pos = list(session.runner.ids), session.runner.next_position
    with session.scratch():
        session.ingest(synthetic_frames(2)[1], 1.0)
        session.ask("Is it red?", sampling=SamplingConfig(max_new_tokens=3))
        assert session.runner.cache_length > len(ids)
    assert session.runner.ids == ids and session.runner.next_position == pos and session.last_t == 0.0
    assert len(session.frames) == 1
    for layer, before in zip(session.runner.cache.layers, keys):
        assert torch.equal(layer.keys, before)


def test_sampling_is_repeatable_with_a_seed(smol):
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    answers = []
    for _ in range(2):
        session = StreamSession(smol)
        session.ingest(synthetic_frames(1)[0], 0.0)
        answers.append(session.ask("Guess.", sampling=cfg).token_ids)
    assert answers[0] == answers[1]


def test_failed_forward_leaves_cache_untouched(smol, monkeypatch):
    """A forward that dies after some layers wrote their keys must not leave those keys behind."""
    session = StreamSession(smol)
    session.ingest(synthetic_frames(1)[0], 0.0)
    held = (list(session.runner.ids), session.runner.cache_length, session.runner.next_position)
    last_layer = smol.model.model.text_model.layers[-1]

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(last_layer, "forward", broken)
    with pytest.raises(RuntimeError):
        session.ingest(synthetic_frames(2)[1], 1.0)
    monkeypatch.undo()
    assert (list(session.runner.ids), session.runner.cache_length, session.runner.next_position) == held
    assert all(layer.keys.shape[-2] == held[1] for layer in session.runner.cache.layers)
    assert len(session.frames) == 1 and session.last_t == 0.0
    session.ingest(synthetic_frames(2)[1], 1.0)
    assert session.stats()["frames"] == 2


def test_a_second_stream_cannot_interleave_with_the_first(smol):
    session = StreamSession(smol, SessionConfig(sampling=SamplingConfig(max_new_tokens=8)))
    session.ingest(synthetic_frames(1)[0], 0.0)
    first = session.ask_stream("one?")
    second = session.ask_stream("two?")  # created while idle: allowed
    if next(iter(first), None) is not None:  # the first is now generating
        with pytest.raises(QuestionError, match="still being generated"):
            next(iter(second))
    first.close()
    assert session.ask("three?").finish_reason in ("stop", "length")


def test_a_question_before_any_frame_is_answered_at_time_zero(smol):
    answer = StreamSession(smol).ask("Is anyone there?", sampling=SamplingConfig(max_new_tokens=2))
    assert answer.asked_at_s == 0.0 and answer.evidence == ()


def _keys(session: StreamSession) -> list[torch.Tensor]:
    return [layer.keys.clone() for layer in session.runner.cache.layers]


def test_encode_then_commit_equals_ingest(adapter):
    """The two halves of a frame read give exactly what ingest() gives: same tokens, same cache, same logits."""
    frames = synthetic_frames(3, seed=6)
    whole, split = StreamSession(adapter), StreamSession(adapter)
    for i, f in enumerate(frames):
        whole.ingest(f, float(i))
        encoded = split.encode_frame(f, float(i))
        assert split.runner.ids == whole.runner.ids[: len(split.runner.ids)] and len(split.frames) == i  # nothing joined yet
        result = split.commit_frame(encoded)
        assert encoded.committed and result.pts_s == float(i) and result.tokens == encoded.tokens
        assert result.vision_s > 0 and result.total_s >= result.vision_s + result.prefill_s
    assert split.runner.ids == whole.runner.ids
    for a, b in zip(_keys(split), _keys(whole)):
        assert torch.equal(a, b)
    q = "What moved?"
    one = whole.ask_stream(q, return_logits=True)
    two = split.ask_stream(q, return_logits=True)
    one.result(), two.result()
    assert torch.equal(one.logits, two.logits)


def test_a_question_between_encode_and_commit_is_exact(adapter):
    """Answered while a frame is encoded (also from inside the paused vision tower), then the frame is committed:
    the context is exactly "question, then frame", as one offline forward computes it."""
    frames = synthetic_frames(2, seed=7)
    cfg = SessionConfig(sampling=SamplingConfig(max_new_tokens=3))
    reference = StreamSession(adapter, cfg)
    reference.ingest(frames[0], 0.0)
    ref_answer = reference.ask("What is there?", 0.5)
    reference.ingest(frames[1], 1.0)

    plain = StreamSession(adapter, cfg)
    plain.ingest(frames[0], 0.0)
    features = plain.encode_frame(frames[1], 1.0)._features

    session = StreamSession(adapter, cfg)
    session.ingest(frames[0], 0.0)
    answers = []

    paused = []

    def pause():  # called between vision layers, the encode suspended on the stack
        if not answers:
            t0 = time.perf_counter()
            answers.append(session.ask("What is there?", 0.5))
            paused.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    encoded = session.encode_frame(frames[1], 1.0, pause=pause)
    wall = time.perf_counter() - t0
    assert len(answers) == 1 and answers[0].token_ids == ref_answer.token_ids
    assert [e.pts_s for e in answers[0].evidence] == [0.0]  # the frame being encoded is not evidence yet
    assert encoded.vision_s <= wall - paused[0] + 1e-3  # the pause is not counted as vision time
    got, want = _flatten(encoded._features), _flatten(features)
    assert got and len(got) == len(want)
    for a, b in zip(got, want):  # the paused encode equals an uninterrupted one, bit for bit
        assert torch.equal(a, b)
    session.commit_frame(encoded)
    assert session.runner.ids == reference.runner.ids
    for a, b in zip(_keys(session), _keys(reference)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    before = len(session.runner.ids)
    stream = session.ask_stream("And now?", return_logits=True)
    stream.result()
    n = len(adapter.question_ids("And now?"))
    ref = offline_logits(adapter, session, frames, [0.0, 1.0])
    assert torch.allclose(stream.logits[:n], ref[before : before + n], atol=1e-4, rtol=0)


def _flatten(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    if hasattr(value, "to_tuple"):
        return _flatten(value.to_tuple())
    return []


def test_commit_frame_rules(smol):
    from streamvlm.engine.session import Preempted

    frames = synthetic_frames(3, seed=8)
    session = StreamSession(smol)
    session.ingest(frames[0], 0.0)
    encoded = session.encode_frame(frames[1], 1.0)
    held = (list(session.runner.ids), session.runner.cache_length, session.last_t)
    with pytest.raises(Preempted):  # abandoned at a layer boundary: nothing changed, and it can be committed later
        session.commit_frame(encoded, preempt=lambda: True)
    assert (list(session.runner.ids), session.runner.cache_length, session.last_t) == held and not encoded.committed
    assert all(layer.keys.shape[-2] == held[1] for layer in session.runner.cache.layers)
    with pytest.raises(FrameError, match="this session"):
        StreamSession(smol).commit_frame(encoded)
    session.ask("Anything?", 3.0, sampling=SamplingConfig(max_new_tokens=2))  # the clock moves past the frame
    with pytest.raises(TimestampError):
        session.commit_frame(encoded)  # at its own time 1.0: refused, unchanged
    result = session.commit_frame(encoded, 3.0)  # re-timed: new timestamp tokens, the same vision output
    assert result.pts_s == 3.0 and session.frames[-1].pts_s == 3.0 and session.last_t == 3.0
    with pytest.raises(FrameError, match="already committed"):
        session.commit_frame(encoded, 4.0)
    assert len(session.frames) == 2

    # re-timing is exact: encoded for 1.0, committed at 3.0 == ingested at 3.0
    a, b = StreamSession(smol), StreamSession(smol)
    a.ingest(frames[0], 0.0)
    b.ingest(frames[0], 0.0)
    a.commit_frame(a.encode_frame(frames[2], 1.0), 3.0)
    b.ingest(frames[2], 3.0)
    assert a.runner.ids == b.runner.ids
    for x, y in zip(_keys(a), _keys(b)):
        assert torch.equal(x, y)


# ---- a failed step: undone, or the session says it is broken -------------------------------------------------
class LayerFault:
    """Counts calls of a language-model layer's forward and raises once, on call number ``at`` (0: never)."""

    def __init__(self, monkeypatch, layer, at: int = 0) -> None:
        self.calls, self.at = 0, at
        forward = layer.forward

        def faulty(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                raise RuntimeError("injected fault")
            return forward(*args, **kwargs)

        monkeypatch.setattr(layer, "forward", faulty)


def _bounded_session(smol) -> StreamSession:
    """Frames spilled to the store (questions retrieve them) and a policy that runs the model to compress."""
    from streamvlm import MemoryConfig

    session = StreamSession(smol, SessionConfig(system_prompt="Watch.", sampling=SamplingConfig(max_new_tokens=4)),
                            MemoryConfig(budget_tokens=160, policy="proxy-attention", retrieval_top_k=2))
    for i, frame in enumerate(synthetic_frames(5, height=48, width=64, seed=4)):
        session.ingest(frame, float(i))
    assert session.stats()["chunks_stored"] > 0
    return session


def _state(session: StreamSession) -> tuple:
    return (session.runner.cache_length, session.runner.next_position, session.runner.logical_length, session.last_t,
            [(c.chunk_id, c.kind, c.tokens_held) for c in session.memory.ledger.working()])


NEXT = synthetic_frames(6, height=48, width=64, seed=4)[5]


def _go_on(session: StreamSession, fault: LayerFault | None = None) -> list[tuple]:
    """What the session answers next: the question again, then a frame and another question."""
    first = session.ask("What is red?", 5.0)
    if fault is not None:
        fault.at = fault.calls  # the calls the first question made
    session.ingest(NEXT, 6.0)
    second = session.ask("And now?")
    return [(a.token_ids, a.evidence) for a in (first, second)]


def test_a_question_or_probe_that_fails_midway_is_undone_and_what_follows_is_as_without_it(smol, monkeypatch):
    # A forward pass raising anywhere in a question (retrieval queries, the question's prefill, a decode step,
    # closing the turn, the memory step after it) or in a probe: the exception reaches the caller, nothing of
    # the step stays, and the session answers what follows exactly as if the fault had never happened.
    layer = smol.text_layers()[-1]
    clean = _bounded_session(smol)
    expected_probe = clean.probe(["Is it red?", "Is it big?"])
    count = LayerFault(monkeypatch, layer, at=-1)
    expected = _go_on(clean, count)
    monkeypatch.undo()
    assert count.at >= 6  # retrieval queries, the question, decode steps, closing the turn, compression
    for at in range(1, count.at + 1):
        session = _bounded_session(smol)
        before = _state(session)
        LayerFault(monkeypatch, layer, at)
        with pytest.raises(RuntimeError, match="injected fault"):
            session.ask("What is red?", 5.0)
        assert session.broken is None and _state(session) == before, f"fault at call {at}"
        assert _go_on(session) == expected, f"fault at call {at}"
        monkeypatch.undo()

    session = _bounded_session(smol)
    before = _state(session)
    LayerFault(monkeypatch, layer, at=1)
    with pytest.raises(RuntimeError, match="injected fault"):
        session.probe(["Is it red?", "Is it big?"])
    assert session.broken is None and _state(session) == before
    assert session.probe(["Is it red?", "Is it big?"]) == expected_probe
    assert _go_on(session) == expected


def test_a_frame_commit_that_fails_is_undone_and_the_frame_can_be_committed_again(smol, monkeypatch):
    clean = _bounded_session(smol)
    clean.ingest(NEXT, 5.0)
    expected = clean.ask("What is red?").token_ids
    for at in (1, 2):  # the frame's prefill; the compression after it (a proxy-question forward)
        session = _bounded_session(smol)
        encoded = session.encode_frame(NEXT, 5.0)
        before = _state(session)
        LayerFault(monkeypatch, smol.text_layers()[-1], at=at)
        with pytest.raises(RuntimeError, match="injected fault"):
            session.commit_frame(encoded)
        assert session.broken is None and _state(session) == before and not encoded.committed, f"fault at call {at}"
        session.commit_frame(encoded)
        assert session.ask("What is red?").token_ids == expected, f"fault at call {at}"
        monkeypatch.undo()


def test_a_fault_while_memory_is_compacted_marks_the_session_broken(smol, monkeypatch):
    # Compaction rewrites older tokens: a fault there cannot be undone. The session says so, and every later
    # call raises SessionBrokenError with the reason (what the server closes the session with).
    from streamvlm.engine.session import SessionBrokenError
    from streamvlm.memory import cache

    session = _bounded_session(smol)

    def fail(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(cache, "keep_tokens", fail)
    with pytest.raises(RuntimeError, match="injected fault"):
        session.ingest(NEXT, 5.0)
    monkeypatch.undo()
    assert session.broken and "frame commit" in session.broken and "injected fault" in session.broken
    encoded = None
    for call in (lambda: session.ingest(NEXT, 6.0), lambda: session.encode_frame(NEXT, 6.0), lambda: session.ask("Why?"),
                 lambda: session.ask_stream("Why?"), lambda: session.probe(["Is it red?"]), lambda: session.save("/nonexistent/x")):
        with pytest.raises(SessionBrokenError) as info:
            encoded = call()
        assert info.value.reason == session.broken and isinstance(info.value, StreamVLMError)
    assert encoded is None
    session.close()  # closing still works
