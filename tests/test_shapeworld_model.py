"""The ShapeWorld model: training layout equals serving, the recipe trains, the shipped checkpoint answers,
and the quality benchmark and demo score answers against the ground truth."""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from streamvlm.bench.quality import (PROBE_CASES, EpisodeScore, QualityConfig, match_alerts, probe_binding, run_episode, run_quality,
                                     sweep_memory)
from streamvlm.cli import main
from streamvlm.config import MemoryConfig, SessionConfig
from streamvlm.engine.session import StreamSession
from streamvlm.errors import ConfigError, ModelError
from streamvlm.models import load_model
from streamvlm.models.smolvlm import SmolVLMAdapter
from streamvlm.shapeworld import COLOURS, QA, SHAPES, make_episode, make_questions
from streamvlm.shapeworld.model import SYSTEM_PROMPT, build_untrained, checkpoint_dir
from streamvlm.shapeworld.questions import appearances, clock, is_correct, parse_clock, probe_question, spoken_answer, watch_target
from streamvlm.shapeworld.train import (_MIX, StreamLayout, TrainConfig, _batch_logits, _binding_question, _pick_questions,
                                        _recent_appearance, conjunction_frames, make_stream, pretrain_vision, train)

SHIPPED = (checkpoint_dir() / "config.json").exists()
needs_checkpoint = pytest.mark.skipif(not SHIPPED, reason="the ShapeWorld checkpoint is not in this tree")


# -- answers and ground truth --------------------------------------------------------------------------------


def test_clock_round_trip() -> None:
    assert clock(7.9) == "00:07" and clock(125) == "02:05"
    assert parse_clock("00:12") == 12 and parse_clock(" 1:05.") == 65 and parse_clock("12 seconds") == 12
    assert parse_clock("red") is None and parse_clock("") is None and parse_clock("1:2:3:4") is None


def test_is_correct_times_within_tolerance_words_exact() -> None:
    when = QA(9.5, "backward", "When did the red circle appear?", "7")
    assert spoken_answer(when) == "00:07"
    assert is_correct(when, "00:08") and is_correct(when, "00:06") and not is_correct(when, "00:09")
    shape = QA(3.5, "realtime", "What shape is on screen now?", "circle")
    assert spoken_answer(shape) == "circle"
    assert is_correct(shape, " Circle.") and not is_correct(shape, "circles")


def test_appearances_are_rising_edges_of_visibility() -> None:
    for seed in range(6):
        ep = make_episode(seed, duration_s=30)
        colour, shape = watch_target(ep)
        times = appearances(ep, colour, shape)
        assert times, "the watched thing appears"
        for t in times:
            now = {(s.colour, s.shape) for s in ep.visible(t)}
            before = {(s.colour, s.shape) for s in ep.visible(t - 1)} if t >= 1 else set()
            assert (colour, shape) in now and (colour, shape) not in before


def test_match_alerts_one_to_one_within_tolerance() -> None:
    assert match_alerts([5.0, 5.5, 20.0], [4.0, 30.0]) == 1  # two alerts near one truth count once
    assert match_alerts([], [1.0]) == 0 and match_alerts([3.0], [0.0]) == 0


# -- the training layout is the engine's layout ------------------------------------------------------------------


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> SmolVLMAdapter:
    out = tmp_path_factory.mktemp("shapeworld-untrained")
    build_untrained(out, seed=1)
    return load_model(str(out))


def test_training_logits_equal_streaming_logits(untrained: SmolVLMAdapter) -> None:
    """The loss is taken exactly where, and on exactly what, the engine computes its answer."""
    layout = StreamLayout(untrained)
    ep = make_episode(11, duration_s=5, fps=1.0, size=64)
    question = "How many shapes are visible?"
    stream = layout.stream(ep, [(4.5, "count", question, str(len(ep.visible(4.5))))])
    kind, first, _end = stream.answers[0]
    with torch.no_grad():
        logits, labels = _batch_logits(untrained.model, [stream], untrained.tokenizer.pad_token_id, untrained.image_token_id)
    session = StreamSession(untrained, SessionConfig(system_prompt=SYSTEM_PROMPT))
    for t, image in ep.frames():
        session.ingest(image, t)
    answer_stream = session.ask_stream(question, 4.5, return_logits=True)
    for _ in answer_stream:
        pass
    streamed = answer_stream.logits
    assert session.runner.ids[: first + 1] == stream.ids[: first + 1]
    assert labels[0, first].item() == stream.labels[first]
    diff = (logits[0, first] - streamed[len(untrained.question_ids(question)) - 1]).abs().max().item()
    assert diff < 1e-4, diff
    session.close()


def test_budgeted_training_streams_see_what_a_budget_with_retrieval_leaves(untrained: SmolVLMAdapter) -> None:
    """A budgeted stream's loss is taken on what the engine computes under a window budget of two frames
    with the older frames brought back by retrieval: each frame fed next to its two predecessors only."""
    layout = StreamLayout(untrained)
    ep = make_episode(11, duration_s=7, fps=1.0, size=64)
    question = "When did the red circle appear?"
    stream = layout.stream(ep, [(6.5, "when", question, "00:02")])
    assert stream.questions[0][2] == 2  # the answer rests on the frame at 00:02
    stream.window, stream.recalled = 2, [[0, 1, 2, 3, 4]]  # what retrieval of every stored frame brings back
    first = stream.answers[0][1]
    with torch.no_grad():
        budgeted, _ = _batch_logits(untrained.model, [stream], untrained.tokenizer.pad_token_id, untrained.image_token_id)
        stream.window = None
        whole, _ = _batch_logits(untrained.model, [stream], untrained.tokenizer.pad_token_id, untrained.image_token_id)
    system = len(untrained.conversation_start(SYSTEM_PROMPT))
    frame = len(untrained.prepare_frame(ep.render(0.0), 0.0).input_ids)
    memory = MemoryConfig(budget_tokens=system + 200 + 2 * frame, text_budget_tokens=200, recent_frames=2, retrieval_top_k=100)
    session = StreamSession(untrained, SessionConfig(system_prompt=SYSTEM_PROMPT), memory)
    for t, image in ep.frames():
        session.ingest(image, t)
    assert session.stats()["chunks_stored"] == 5
    answer_stream = session.ask_stream(question, 6.5, return_logits=True)
    for _ in answer_stream:
        pass
    streamed = answer_stream.logits[len(untrained.question_ids(question)) - 1]
    assert (budgeted[0, first] - streamed).abs().max().item() < 1e-4
    assert (whole[0, first] - streamed).abs().max().item() > 1e-3  # the frames' own context differs from the whole stream's
    session.close()


def test_budgeting_recalls_the_frame_an_answer_rests_on(untrained: SmolVLMAdapter) -> None:
    layout = StreamLayout(untrained)
    cfg = TrainConfig(budgeted=1.0, mix={"when": 1, "first": 1, "count": 1})
    budgeted = [make_stream(layout, 1_000_000 + i, 20, cfg, short=False) for i in range(6)]
    checked = 0
    for stream in budgeted:
        assert stream.window is not None and 2 <= stream.window <= 6
        for (start, _end, evidence), frames in zip(stream.questions, stream.recalled):
            older = stream.step_of[start] - stream.window + 1
            assert 1 <= len(frames) <= 4 or older <= 0
            assert all(0 <= f < older for f in frames)
            if 0 <= evidence < older:
                assert evidence in frames
                checked += 1
    assert checked >= 10
    plain = make_stream(layout, 1_000_000, 20, replace(cfg, budgeted=0.0), short=False)
    assert plain.window is None and plain.ids == budgeted[0].ids  # a budget changes who sees whom, not the stream
    wide = [make_stream(layout, 1_000_000 + i, 24, replace(cfg, budget_window=12, budget_recall=8), short=False) for i in range(6)]
    assert max(s.window for s in wide) > 6 and all(s.window <= 12 for s in wide)
    assert max(len(f) for s in wide for f in s.recalled) > 4 and all(len(f) <= 8 for s in wide for f in s.recalled)
    for bad in ({"budget_window": 1}, {"budget_recall": 0}, {"budgeted": 1.5}):
        with pytest.raises(ConfigError):
            replace(cfg, **bad)


def test_training_runs_and_the_result_loads(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=3, batch=2, warmup_steps=1, short_steps=1, min_duration_s=6, max_duration_s=7, eval_every=3, eval_streams=2)
    first, second = tmp_path / "first", tmp_path / "second"
    history = train(cfg, first, log=lambda _line: None)["history"]
    assert history[-1]["step"] == 3 and np.isfinite(history[-1]["loss"])
    assert json.loads((first / "training.json").read_text())["config"]["steps"] == 3
    adapter = load_model(str(first))
    assert isinstance(adapter, SmolVLMAdapter) and adapter.image_seq_len == 4
    # A second stage continues from the first one's weights, and its card lists both stages.
    train(replace(cfg, steps=1, eval_every=1, init=str(first)), second, log=lambda _line: None)
    record = json.loads((second / "training.json").read_text())
    assert [stage["config"]["steps"] for stage in record["previous"]] == [3]
    card = (second / "README.md").read_text()
    assert "### Stage 1: 3 steps, from a fresh initialisation" in card and "### Stage 2: 1 steps, continued" in card
    assert "--init STAGE_1_DIR" in card


def test_worker_processes_do_not_change_what_is_trained(tmp_path: Path) -> None:
    """Batches made ahead by worker processes are the batches the main process would make, in order."""
    from safetensors.torch import load_file

    cfg = TrainConfig(steps=2, batch=2, warmup_steps=1, short_steps=1, min_duration_s=6, max_duration_s=7, eval_every=2,
                      eval_streams=2, vision_steps=2)
    train(cfg, tmp_path / "here", log=lambda _line: None)
    train(replace(cfg, workers=2), tmp_path / "ahead", log=lambda _line: None)
    here, ahead = load_file(tmp_path / "here" / "model.safetensors"), load_file(tmp_path / "ahead" / "model.safetensors")
    assert here.keys() == ahead.keys() and all(torch.equal(here[k], ahead[k]) for k in here)
    with pytest.raises(ConfigError, match="workers"):
        TrainConfig(workers=-1)


def test_continuing_needs_the_same_architecture(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    build_untrained(tmp_path / "other")
    weights = load_file(tmp_path / "other" / "model.safetensors")
    weights.pop(next(iter(weights)))
    save_file(weights, tmp_path / "other" / "model.safetensors")
    with pytest.raises(RuntimeError, match="does not match the recipe's architecture"):
        train(TrainConfig(steps=1, init=str(tmp_path / "other")), tmp_path / "out", log=lambda _line: None)


@pytest.mark.parametrize("seed", range(6))
def test_binding_questions_name_one_shape_and_answer_its_other_attribute(seed: int) -> None:
    episode = make_episode(seed, duration_s=20, fps=1.0, size=64)
    rng = np.random.default_rng(seed)
    asked = 0
    for t in episode.frame_times():
        visible = episode.visible(t)
        for kind in ("bind_colour", "bind_shape"):
            item = _binding_question(visible, kind, rng)
            if len(visible) < 2:  # one shape on screen needs no binding: the plain questions cover it
                assert item is None
                continue
            if item is None:
                continue
            asked += 1
            question, answer = item
            named = question.split()[4]  # "What colour is the circle now?" / "What shape is the red one now?"
            key = "shape" if kind == "bind_colour" else "colour"
            matches = [s for s in visible if getattr(s, key) == named]
            assert len(matches) == 1  # the question names exactly one shape on screen
            assert answer == (matches[0].colour if kind == "bind_colour" else matches[0].shape)
    assert asked > 0


def test_tell_now_asks_about_a_recent_appearance_and_answers_its_moment() -> None:
    """The deferred answer as the controller asks it: about something that started to be on screen at
    most 2.5 s ago, answered with that moment."""
    asked = 0
    for seed in range(8):
        episode = make_episode(seed, duration_s=20, fps=1.0, size=64)
        for t in (k + 0.5 for k in range(20)):
            item = _recent_appearance(episode, t, np.random.default_rng(seed))
            recent = {(c, s, a) for c, s in {(v.colour, v.shape) for v in episode.visible(t)}
                      for a in appearances(episode, c, s) if a <= t and t - a <= 2.5
                      and not any(a < b <= t for b in appearances(episode, c, s))}
            if item is None:
                assert not recent
                continue
            question, answer = item
            colour, shape = question.split()[4:6]
            assert (colour, shape, parse_clock(answer)) in recent, (seed, t, item, recent)
            asked += 1
    assert asked > 10


def test_follow_up_questions_share_their_moment() -> None:
    """With follow-ups, some moments hold two or three questions (as when a user asks twice before the next
    frame, or the controller probes right after an answer); without them, one at most."""
    from collections import Counter

    def per_moment(follow_ups: float) -> Counter:
        counts: Counter = Counter()
        for seed in range(6):
            episode = make_episode(seed, duration_s=20, fps=1.0, size=64)
            asked = _pick_questions(episode, np.random.default_rng(seed), _MIX, short=False, ask_probability=0.9, follow_ups=follow_ups)
            counts.update(Counter(Counter(t for t, *_ in asked).values()))
        return counts

    assert set(per_moment(0.0)) == {1}
    assert set(per_moment(0.5)) == {1, 2, 3}
    with pytest.raises(ConfigError, match="follow_ups"):
        TrainConfig(follow_ups=1.0)


def test_conjunction_frames_label_what_is_on_screen() -> None:
    pixels, targets = conjunction_frames(np.random.default_rng(5), 6)
    again = conjunction_frames(np.random.default_rng(5), 6)
    assert torch.equal(pixels, again[0]) and torch.equal(targets, again[1])
    assert pixels.shape == (6, 64, 64, 3) and pixels.dtype == torch.uint8 and targets.shape == (6, 12)
    assert (targets.sum(1) >= 1).all() and set(targets.unique().tolist()) <= {0.0, 1.0}


def test_vision_pretraining_changes_only_the_vision_tower(tmp_path: Path) -> None:
    model = build_untrained(tmp_path / "m")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = pretrain_vision(model, 2, 1e-3, 0, log=lambda _line: None, eval_every=1)
    assert [h["step"] for h in history] == [1, 2] and all(0 <= h["frames_exact"] <= 1 for h in history)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".vision_model." in k or ".connector." in k for k in changed), sorted(changed)
    with pytest.raises(ConfigError, match="vision_steps"):
        TrainConfig(vision_steps=-1)


def test_training_streams_are_deterministic(untrained: SmolVLMAdapter) -> None:
    layout = StreamLayout(untrained)
    a, b = (make_stream(layout, 123, 10, TrainConfig(), short=False) for _ in range(2))
    assert a.ids == b.ids and a.labels == b.labels and all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames))


# -- the shipped checkpoint --------------------------------------------------------------------------------------


@needs_checkpoint
def test_shipped_checkpoint_is_small_and_documented() -> None:
    size = sum(p.stat().st_size for p in checkpoint_dir().iterdir())
    assert size <= 20 * 2**20
    card = (checkpoint_dir() / "README.md").read_text()
    assert "python -m streamvlm.shapeworld.train" in card


@needs_checkpoint
def test_shipped_checkpoint_answers_fixed_questions() -> None:
    """Held-out episodes (seeds 100-111; training uses 500,000 and up), questions fixed by seed.

    The shipped model reads the present (what shape, how many), remembers the first shape's colour and
    tells when a shape first appeared (docs/shapeworld.md has its benchmark figures). Real-time
    questions must be answered at least 85 % right and clearly better than always giving the most
    common answer; "What colour was the first shape?" at most one wrong; "When did the red circle
    appear?" at least 70 % right within 1 s (measured 15 of 18; the previous checkpoint: 6).
    """
    adapter = load_model("shapeworld")
    outcomes: list[tuple[QA, str, bool]] = []
    for seed in range(100, 112):
        ep = make_episode(seed, duration_s=16, fps=1.0, size=64)
        qas = [q for q in make_questions(ep, rng_seed=seed, per_category=2)
               if q.category in ("realtime", "backward")]
        session = StreamSession(adapter, SessionConfig())
        pending = list(qas)
        for t, image in ep.frames():
            session.ingest(image, t)
            while pending and pending[0].t < t + 1:
                qa = pending.pop(0)
                text = session.ask(qa.question, qa.t).text
                outcomes.append((qa, text, is_correct(qa, text)))
        session.close()
    realtime = [o for o in outcomes if o[0].category == "realtime"]
    first = [o for o in outcomes if o[0].question == "What colour was the first shape?"]
    when = [o for o in outcomes if o[0].question.startswith("When did")]
    assert len(realtime) >= 20 and len(first) >= 5 and len(when) >= 10
    accuracy = sum(ok for _, _, ok in realtime) / len(realtime)
    by_question: dict[str, list[str]] = {}
    for qa, _, _ in realtime:
        by_question.setdefault(qa.question, []).append(qa.answer)
    majority = sum(max(answers.count(a) for a in answers) for answers in by_question.values()) / len(realtime)
    wrong = [(qa.t, qa.question, qa.answer, text) for qa, text, ok in outcomes if not ok]
    assert accuracy >= 0.85 and accuracy >= majority + 0.25, (accuracy, majority, wrong)
    assert sum(not ok for _, _, ok in first) <= 1, wrong
    assert sum(ok for _, _, ok in when) >= 0.7 * len(when), wrong


@needs_checkpoint
def test_shipped_model_answers_from_recalled_frames_under_a_small_budget() -> None:
    """At a 10 % budget only the last two frames stay in working memory; questions about the past are
    answered from the frames retrieval brings back (8 per question). On held-out seeds 100-111 the shipped
    model keeps at least 90 % of its full-memory backward accuracy (measured: 58 of 72 against 62; the
    stage-5 model, trained on whole streams only, 53 against 63)."""
    adapter = load_model("shapeworld")
    cfg = QualityConfig(per_category=6)
    budgeted = full = 0
    for seed in range(100, 112):
        whole = run_episode(adapter, seed, MemoryConfig(), cfg)
        small = run_episode(adapter, seed, sweep_memory(whole, 0.1, "window", 8), cfg)
        assert small.frame_tokens <= 2 * whole.frame_tokens // whole.frames  # two frames' worth of visual tokens
        full += whole.right["backward"]
        budgeted += small.right["backward"]
    assert budgeted >= 0.9 * full, (budgeted, full)


@needs_checkpoint
def test_shipped_model_answers_a_question_that_follows_another() -> None:
    """A question asked right after another one, before the next frame (a user asking twice, the
    controller probing after an answer), is still answered from the frame: a probe about a shape on
    screen is "yes" and one about a colour x shape that is not is "no", each asked after a "When did
    ..." question at the same moment."""
    adapter = load_model("shapeworld")
    outcomes = []
    for seed in range(100, 108):
        ep = make_episode(seed, duration_s=16, fps=1.0, size=64)
        t = next(k + 0.5 for k in range(4, 16) if ep.visible(k + 0.5))
        colour, shape = ep.visible(t)[0].colour, ep.visible(t)[0].shape
        on = {(s.colour, s.shape) for s in ep.visible(t)}
        absent = next((c, s) for c in COLOURS for s in SHAPES if (c, s) not in on and c != colour and s != shape)
        session = StreamSession(adapter, SessionConfig())
        for ft, image in ep.frames():
            if ft > t:
                break
            session.ingest(image, ft)
        for thing, truth in (((colour, shape), "yes"), (absent, "no")):
            session.ask(f"When did the {colour} {shape} appear?", t)
            outcomes.append((seed, thing, truth, session.ask(probe_question(*thing), t).text.strip().lower()))
        session.close()
    wrong = [o for o in outcomes if o[2] != o[3]]
    assert len(wrong) <= 1, wrong


@needs_checkpoint
def test_shipped_probes_read_the_frame() -> None:
    """The yes/no probes behind deferred answers and alerts bind colour to shape: on held-out episodes a
    true probe scores far above one whose colour only, or shape only, is on screen on another shape
    and one about what is not on screen at all."""
    result = probe_binding(load_model("shapeworld"), [100, 101, 102], 10.0)
    p = {case: v["mean_p_yes"] for case, v in result.items()}
    assert p["yes"] >= 0.8 and all(p["yes"] - p[case] >= 0.5 for case in ("colour_only", "shape_only", "neither")), p


# -- the benchmark and the demo ----------------------------------------------------------------------------------


def test_quality_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError):
        QualityConfig(budgets=(1.5,))
    with pytest.raises(ConfigError):
        QualityConfig(policies=("nope",))
    with pytest.raises(ConfigError):
        QualityConfig(episodes=0)
    with pytest.raises(ConfigError):
        QualityConfig(retrieval_top_k=0)  # "retrieval off" is swept anyway


def test_run_episode_scores_every_question(untrained: SmolVLMAdapter) -> None:
    cfg = QualityConfig(episodes=1, duration_s=10, per_category=1)
    score = run_episode(untrained, 3, MemoryConfig(), cfg)
    qas = make_questions(make_episode(3, duration_s=10, fps=1.0, size=64), rng_seed=3, per_category=1)
    # every question is scored once ("when" questions count in backward too)
    whens = sum(q.question.startswith("When did") for q in qas)
    assert sum(score.asked.values()) == len(qas) + whens
    assert score.tokens > 0 and score.truths >= 1


def test_sweep_stays_inside_its_budget(untrained: SmolVLMAdapter) -> None:
    cfg = QualityConfig(episodes=1, duration_s=10, per_category=1, budgets=(0.5,), policies=("window",), retrieval_top_k=6)
    result = run_quality(untrained, cfg)
    assert [(r["budget"], r["policy"], r["retrieval"], r["top_k"]) for r in result["sweep"]] == [(0.5, "window", True, 6), (0.5, "window", False, 0)]
    assert set(result["full"]["accuracy"]) <= {"realtime", "backward", "when", "forward", "probe"}


def test_quality_reports_the_test_split_with_an_interval_beside_every_accuracy(untrained: SmolVLMAdapter) -> None:
    from streamvlm.bench.quality import format_table, wilson_interval
    from streamvlm.shapeworld.splits import split_of

    cfg = QualityConfig(episodes=1, duration_s=8, per_category=1, budgets=(0.5,), policies=("window",))
    result = run_quality(untrained, cfg)
    assert result["split"] == "test" and split_of(result["seeds"][0]) == "test"
    for summary in [result["full"], *result["sweep"]]:
        assert summary["accuracy"] and set(summary["interval"]) == set(summary["accuracy"])
        for category, (low, high) in summary["interval"].items():
            right = round(summary["accuracy"][category] * summary["asked"][category])
            assert [low, high] == [round(v, 4) for v in wilson_interval(right, summary["asked"][category])]
            assert low <= summary["accuracy"][category] <= high
        assert "precision_interval" in summary["alerts"] and "recall_interval" in summary["alerts"]
    assert format_table(result).count("[") >= len(result["full"]["accuracy"]) * 3


def test_probe_binding_sorts_every_probe_into_its_case(untrained: SmolVLMAdapter) -> None:
    result = probe_binding(untrained, [3], 6.0)
    episode = make_episode(3, duration_s=6.0, fps=1.0, size=64)
    on_screen = [{(s.colour, s.shape) for s in episode.visible(t)} for t in episode.frame_times()]
    assert list(result) == list(PROBE_CASES)
    assert sum(case["probes"] for case in result.values()) == 12 * len(on_screen)  # every colour x shape, every frame
    assert result["yes"]["probes"] == sum(len(on) for on in on_screen)
    for case in result.values():
        if case["probes"]:
            assert 0 <= case["mean_p_yes"] <= 1 and 0 <= case["share_above_half"] <= 1


def test_episode_score_summary() -> None:
    s = EpisodeScore()
    s.add("realtime", True)
    s.add("realtime", False)
    s.alerts, s.alerts_true, s.truths = 2, 1, 1
    out = s.summary()
    assert out["accuracy"]["realtime"] == 0.5
    assert out["alerts"]["precision"] == 0.5 and out["alerts"]["recall"] == 1.0 and abs(out["alerts"]["f1"] - 2 / 3) < 1e-3


@needs_checkpoint
def test_bench_quality_cli_writes_json_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "q.json", tmp_path / "q.png"
    rc = main(["bench", "quality", "--episodes", "1", "--duration", "8", "--budgets", "25", "--policies", "window",
               "--top-k", "8", "--json", str(out), "--plot", str(png), "--quiet"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["model"] == "shapeworld" and [r["top_k"] for r in result["sweep"]] == [8, 0]
    assert set(result["probe_binding"]) == set(PROBE_CASES)
    assert png.stat().st_size > 1000


@needs_checkpoint
def test_demo_prints_answers_against_truth() -> None:
    from streamvlm.demo import DemoConfig, run_demo

    out = io.StringIO()
    summary = asyncio.run(run_demo(load_model("shapeworld"), DemoConfig(realtime=False, draw=True), out))
    text = out.getvalue()
    assert summary["questions"] >= 3 and summary["frames_read"] >= 1
    assert "truth:" in text and ("✓" in text or "✗" in text)
    assert "\x1b[38;2;" in text  # frames drawn with 24-bit colour half blocks
    assert summary["correct"] >= summary["questions"] // 2


def test_unknown_checkpoint_dir_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        load_model(str(tmp_path / "missing"))
