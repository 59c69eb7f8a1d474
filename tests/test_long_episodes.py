"""Long ShapeWorld episodes where memory matters: events spread over minutes, the same things coming back, questions
a minute or more after their moment; streamed under a small budget the positions stay within what the model was
trained on, and `bench quality --episode-seconds` runs them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import load
from streamvlm.bench.quality import QualityConfig, run_episode, sweep_memory
from streamvlm.cli import main
from streamvlm.config import MemoryConfig
from streamvlm.errors import ConfigError
from streamvlm.shapeworld import make_episode
from streamvlm.shapeworld.questions import candidates, make_long_questions, referent_age
from streamvlm.shapeworld.world import make_long_episode


def test_long_episodes_spread_events_and_bring_things_back() -> None:
    for seed in range(5):
        episode = make_long_episode(seed, duration_s=300.0)
        assert episode == make_long_episode(seed, duration_s=300.0)  # deterministic
        enters = [e for e in episode.events if e.kind == "enter"]
        minutes = {int(e.t // 60) for e in enters}
        assert minutes == {0, 1, 2, 3, 4}, minutes  # something happens in every minute
        counts = Counter((e.colour, e.shape) for e in enters)
        assert max(counts.values()) >= 3  # the same thing appears several times: its first and last appearance differ
        assert min(counts.values()) == 1  # and something appears exactly once
        assert all(len(episode.visible(t + 0.5)) <= 3 for t in range(300))
        lives = {}
        for e in episode.events:
            lives.setdefault(e.shape_id, []).append(e.t)
        assert all(b - a <= 12 for a, b in (v for v in lives.values() if len(v) == 2))  # short visits
    with pytest.raises(ConfigError):
        make_long_episode(-1)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_long_questions_ask_about_a_moment_a_minute_or_more_before(seed: int) -> None:
    episode = make_long_episode(seed, duration_s=300.0)
    questions = make_long_questions(episode, rng_seed=seed, per_category=2)
    valid = {(q.t, q.question, q.answer) for qs in candidates(episode).values() for q in qs}
    for qa in questions:
        assert (qa.t, qa.question, qa.answer) in valid  # the same ground truth as every other question
        age = referent_age(episode, qa)
        assert qa.category == "realtime" or (age is not None and age >= 60.0), (qa, age)
    assert questions == sorted(questions, key=lambda q: q.t)


def test_a_long_stream_under_a_budget_keeps_positions_within_training() -> None:
    """A minute at 1 frame/s (60 frames, about 1,000 tokens) under a 10 % budget with re-indexed positions:
    the next position stays about where a 24-frame training stream ends, and backward questions are asked."""
    adapter = load("shapeworld")
    cfg = QualityConfig(episodes=1, split="validation", seed_base=3, duration_s=60.0, layout="long", positions="reindex")
    full = run_episode(adapter, 3, MemoryConfig(), cfg)
    assert full.frames == 60 and full.asked.get("backward", 0) >= 1
    memory = sweep_memory(full, 0.1, "window", 4, "reindex")
    from streamvlm.bench import quality

    positions = []
    original = quality.StreamSession.close

    def close(session) -> None:  # read the session's next position just before it is closed
        positions.append(session.runner.mark()[1])
        original(session)

    quality.StreamSession.close = close
    try:
        budgeted = run_episode(adapter, 3, memory, cfg)
    finally:
        quality.StreamSession.close = original
    assert budgeted.asked == full.asked
    assert positions and positions[0] <= 700, positions  # a 24-frame training stream with its questions ends near 500
    assert full.tokens > 900


def test_bench_quality_cli_runs_long_episodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "long.json"
    code = main(["bench", "quality", "--model", "shapeworld", "--split", "validation", "--episodes", "1", "--episode-seconds", "60",
                 "--budgets", "10", "--policies", "window", "--json", str(out), "--quiet"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["config"]["layout"] == "long" and result["config"]["duration_s"] == 60.0
    assert result["config"]["positions"] == "reindex"
    assert [r["budget"] for r in result["sweep"]] == [0.1, 0.1]
    assert "backward" in result["full"]["asked"]
    assert make_episode(0).duration_s == 30.0  # the short episodes are unchanged
