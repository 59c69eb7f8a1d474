"""An answer's evidence is weighted: each frame's share of the attention the question paid to the frames.

The page shows the frames with the largest weights, so the weights must be well formed (one per frame,
non-negative, summing to 1), exact (the attention the model really computed), read by hooks that
never outlive the answer's hold on the shared model, and on a trained model they must point at the
frame a question is about more often than chance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamvlm import SamplingConfig, SessionConfig, StreamSession
from streamvlm.config import MemoryConfig
from streamvlm.engine.check import synthetic_frames
from streamvlm.engine.runner import SpanAttention
from streamvlm.protocol import messages as m
from streamvlm.types import Evidence

SHORT = SessionConfig(sampling=SamplingConfig(max_new_tokens=3))


def _weights_ok(evidence: tuple[Evidence, ...]) -> None:
    weights = [e.weight for e in evidence]
    assert all(w is not None and w >= 0.0 for w in weights), weights
    assert math.isclose(sum(weights), 1.0, abs_tol=1e-6), weights


def test_every_evidence_frame_has_a_weight_and_they_sum_to_one(adapter):
    session = StreamSession(adapter, SHORT)
    for i, frame in enumerate(synthetic_frames(4, seed=2)):
        session.ingest(frame, float(i), source_id="cam")
    answer = session.ask("What changed?", 3.5)
    assert [(e.pts_s, e.source_id) for e in answer.evidence] == [(0.0, "cam"), (1.0, "cam"), (2.0, "cam"), (3.0, "cam")]
    _weights_ok(answer.evidence)
    # the session's own frame list is not an answer's: no weights there
    assert all(e.weight is None for e in session.frames)


def test_an_answer_without_frames_has_no_evidence(smol):
    answer = StreamSession(smol, SHORT).ask("Anything there?", 0.0)
    assert answer.evidence == ()


def test_frames_recalled_from_the_store_are_weighted_with_the_working_ones(smol):
    session = StreamSession(smol, SessionConfig(system_prompt="Watch.", sampling=SamplingConfig(max_new_tokens=3)),
                            MemoryConfig(budget_tokens=200, policy="window", recent_frames=1, retrieval_top_k=2))
    for i, frame in enumerate(synthetic_frames(10, seed=4)):
        session.ingest(frame, float(i))
    working = {e.pts_s for e in session.frames}
    answer = session.ask("What was at the very beginning?")
    recalled = [e for e in answer.evidence if e.pts_s not in working]
    assert recalled, "retrieval brought frames back"
    assert [e.pts_s for e in answer.evidence] == sorted(e.pts_s for e in answer.evidence)  # oldest first
    assert len({e.pts_s for e in answer.evidence}) == len(answer.evidence)  # one entry per frame
    _weights_ok(answer.evidence)


def test_the_weights_are_the_attention_the_model_computed(adapter):
    """The hooks' q·K softmax equals the attention an eager offline forward reports, per cache position."""
    frames = synthetic_frames(3, seed=1)
    session = StreamSession(adapter, SHORT)
    for i, frame in enumerate(frames):
        session.ingest(frame, float(i))
    held = session.runner.cache_length
    question = adapter.question_ids("What is there?")
    layers = tuple(range(len(adapter.text_layers())))
    reader = SpanAttention([(i, i + 1) for i in range(held + len(question))], layers)
    session.runner.prefill(question, attention=reader)
    ids = torch.tensor([session.runner.ids])
    prepared = [adapter.prepare_frame(f, float(i)) for i, f in enumerate(frames)]
    adapter.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = adapter.model(input_ids=ids, output_attentions=True, **adapter.offline_kwargs(ids, prepared))
    finally:
        adapter.model.set_attn_implementation("sdpa")
    last = torch.stack([a[0, :, -1].double().mean(0) for a in out.attentions]).sum(0)
    first = torch.stack([a[0, :, held].double().mean(0) for a in out.attentions]).sum(0)
    assert reader.reads == reader.baseline_reads == len(layers)
    assert torch.allclose(reader.mass, last, atol=1e-5)
    assert torch.allclose(reader.baseline, first, atol=1e-5)


def test_no_hook_stays_on_the_model_after_an_answer(smol):
    def hooks() -> int:
        return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in smol.model.modules())

    before = hooks()
    session = StreamSession(smol, SHORT)
    for i, frame in enumerate(synthetic_frames(2)):
        session.ingest(frame, float(i))
    answer = session.ask("What is there?")
    _weights_ok(answer.evidence)  # the hooks ran
    assert hooks() == before
    with pytest.raises(RuntimeError):  # a failing forward still takes its hooks off
        with session.runner.adapter.hold(session.runner._attention_hooks(SpanAttention([(0, 1)], (0,)))):
            raise RuntimeError("boom")
    assert hooks() == before


def test_weights_can_be_turned_off(smol):
    session = StreamSession(smol, SHORT)
    session.evidence_layers = 0
    session.ingest(synthetic_frames(1)[0], 0.0)
    assert [e.weight for e in session.ask("What is there?").evidence] == [None]


def test_response_done_carries_weights_when_present():
    done = m.response_done("resp_1", "completed", "user", "a red circle",
                           [Evidence(1.0, "cam", 0.25), Evidence(2.0, "cam", 0.75), {"pts_s": 3.0, "source_id": "cam"}])
    assert done["response"]["evidence"] == [{"pts_s": 1.0, "source_id": "cam", "weight": 0.25},
                                            {"pts_s": 2.0, "source_id": "cam", "weight": 0.75},
                                            {"pts_s": 3.0, "source_id": "cam"}]


# -- the trained ShapeWorld model: the weights point at the frame the question is about ------------------------


def _shapeworld_outcomes(seeds: range) -> list[tuple[bool, bool, float, float]]:
    """For each "When did the <colour> <shape> appear?" (up to 3 per held-out episode, asked after its last
    frame): whether the top-1 / any top-3 weighted frame is within 1 s of the first frame showing that
    shape, and the chance of each for a random pick."""
    from streamvlm.models import load_model
    from streamvlm.shapeworld import make_episode
    from streamvlm.shapeworld.questions import candidates

    adapter = load_model("shapeworld")
    out = []
    for seed in seeds:
        episode = make_episode(seed, duration_s=16, fps=1.0, size=64)
        frames = list(episode.frames())
        session = StreamSession(adapter, SessionConfig())
        for t, image in frames:
            session.ingest(image, t)
        questions = list(dict.fromkeys(qa.question for qa in candidates(episode)["backward"] if qa.question.startswith("When")))
        for question in questions[:3]:
            colour, shape = question.split()[3:5]
            first = min(t for t, _ in frames if any((s.colour, s.shape) == (colour, shape) for s in episode.visible(t)))
            with session.scratch():
                answer = session.ask(question, frames[-1][0] + 0.5)
            times = np.array([e.pts_s for e in answer.evidence])
            order = times[np.argsort([-e.weight for e in answer.evidence], kind="stable")]
            near = np.abs(times - first) <= 1.0
            k = int(near.sum())
            out.append((abs(order[0] - first) <= 1.0, bool(np.any(np.abs(order[:3] - first) <= 1.0)),
                        k / len(times), 1 - math.comb(len(times) - k, 3) / math.comb(len(times), 3)))
        session.close()
    return out


@pytest.mark.skipif(not __import__("streamvlm.shapeworld.model", fromlist=["checkpoint_dir"]).checkpoint_dir().joinpath("config.json").exists(),
                    reason="the ShapeWorld checkpoint is not in this tree")
def test_shapeworld_weights_point_at_the_frame_a_question_is_about():
    """Held-out seeds 100-111, 36 questions: the heaviest frame is on or next to the shape's first frame
    far more often than chance (measured 19 of 36 against 6.4 by chance), and so is one of the top 3
    (measured 29 against 16.8). Raw attention shares without the baseline (docs/engine.md) did much
    worse: 22 of 72 top-1 against 12.4 by chance on seeds 100-123, where the weights get 39."""
    outcomes = _shapeworld_outcomes(range(100, 112))
    top1, top3 = sum(o[0] for o in outcomes), sum(o[1] for o in outcomes)
    chance1, chance3 = sum(o[2] for o in outcomes), sum(o[3] for o in outcomes)
    assert top1 >= 2 * chance1 and top3 >= 1.3 * chance3, (len(outcomes), top1, chance1, top3, chance3)
