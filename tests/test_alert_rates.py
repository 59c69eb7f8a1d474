"""The same ShapeWorld episode streamed at 1, 2 and 10 frames per second raises the same alerts, through the real
engine and dialogue controller with the shipped model (every frame probed, so the trigger rule reads one, two or ten
scores a second), with working memory capped at what the model was trained on."""

from __future__ import annotations

import pytest

from conftest import load
from streamvlm.bench.quality import (RATE_BUDGET_TOKENS, QualityConfig, alert_rates, format_table, match_alerts, replay_alerts,
                                     run_episode, sweep_triggers, watch_scores)
from streamvlm.dialogue import TriggerSpec
from streamvlm.config import MemoryConfig
from streamvlm.errors import ConfigError
from streamvlm.shapeworld import make_episode
from streamvlm.shapeworld.questions import appearances, watch_target

# A validation episode (blue triangle at 8 s; measured alerts 8.0, 8.0 and 8.7 s at 1, 2 and 10 frames/s with the
# default rule; 9.0, 9.0 and 9.4 s with the earlier 1.5 s hold).
SEEDS = (2,)


def test_the_same_alerts_at_1_2_and_10_frames_per_second() -> None:
    seed = SEEDS[0]
    adapter = load("shapeworld")
    cfg = QualityConfig(episodes=1, split="validation", seed_base=seed, read_fps=0)  # every frame read
    memory = MemoryConfig(budget_tokens=RATE_BUDGET_TOKENS, positions="reindex")
    episode = make_episode(seed, duration_s=cfg.duration_s, fps=1.0)
    truth = appearances(episode, *watch_target(episode))
    times = {fps: run_episode(adapter, seed, memory, cfg, fps=fps, ask=False).alert_times for fps in (1.0, 2.0, 10.0)}
    # Read as `watch` reads a camera by default (2 frames a second), the 10 fps stream gives the 2 fps alerts.
    default = QualityConfig(episodes=1, split="validation", seed_base=seed)
    assert default.read_fps == 2.0
    assert run_episode(adapter, seed, memory, default, fps=10.0, ask=False).alert_times == times[2.0]
    for fps, alerts in times.items():
        # One alert per appearance, each within the 2 s a StreamingBench-style answer is given, nothing else.
        assert len(alerts) == len(truth) and match_alerts(alerts, truth) == len(truth), (fps, alerts, truth)
        # And at the same moment whatever the rate: within a second of the 1 frame/s alert.
        assert all(abs(a - b) <= 1.0 for a, b in zip(alerts, times[1.0])), times


def test_rates_are_checked_and_reported() -> None:
    with pytest.raises(ConfigError):
        QualityConfig(rates=(0.0,))
    adapter = load("shapeworld")
    cfg = QualityConfig(episodes=1, split="validation", seed_base=SEEDS[0], rates=(1.0,))
    rows = alert_rates(adapter, cfg)
    assert [r["fps"] for r in rows] == [1.0]
    assert all(r["alerts"]["f1"] == 1.0 for r in rows), rows
    table = format_table({"model": "shapeworld", "split": "validation", "seeds": [SEEDS[0], SEEDS[0]],
                          "full": {"accuracy": {}, "interval": {}, "alerts": rows[0]["alerts"]}, "rates": rows})
    assert "| 1 | 1.00 |" in table


def test_recorded_scores_replay_to_the_alerts_the_episode_raises() -> None:
    """A rule sweep records each episode's watch scores once and replays rules on them: the replay must give
    exactly the alerts that streaming the episode through the engine and controller raises."""
    seed = SEEDS[0]
    adapter = load("shapeworld")
    cfg = QualityConfig(episodes=1, split="validation", seed_base=seed)
    memory = MemoryConfig(budget_tokens=RATE_BUDGET_TOKENS, positions="reindex")
    scores, truth = watch_scores(adapter, seed, cfg, 2.0, memory)
    assert replay_alerts(TriggerSpec(), scores) == run_episode(adapter, seed, memory, cfg, fps=2.0, ask=False).alert_times
    rows = sweep_triggers({2.0: {seed: (scores, truth)}}, [TriggerSpec(), TriggerSpec(hold_s=3.0, window_s=3.0)])
    assert rows[0]["spec"] == TriggerSpec() and rows[0]["f1"][2.0] == 1.0 and rows[0]["worst"] >= rows[1]["worst"], rows
