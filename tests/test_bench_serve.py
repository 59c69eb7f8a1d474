"""``run_serve_bench``: K client sessions against an in-process server, short run with the tiny model."""

from __future__ import annotations

import json

import pytest

from streamvlm.bench.serve import run_serve_bench
from streamvlm.errors import ConfigError


def test_serve_bench_reports_latency_frames_and_memory():
    result = run_serve_bench("tiny-smolvlm", sessions=2, fps=2, duration=4)
    json.dumps(result)  # JSON-ready
    assert result["benchmark"] == "serve" and result["model"] == "tiny-smolvlm"
    assert (result["sessions"], result["fps"], result["duration_s"]) == (2, 2.0, 4.0)
    assert 0 < result["event_latency_p50_s"] <= result["event_latency_p95_s"] < 5
    assert result["event_latency_samples"] >= 6
    assert result["questions"] >= 2 and result["answers"] >= 1
    assert 0 < result["ttft_p50_s"] <= result["ttft_p95_s"]
    frames = result["frames"]
    assert set(frames) == {"sent", "received", "skipped", "dropped", "ingested"}
    assert 0 < frames["received"] <= frames["sent"] <= 2 * 2 * 4
    assert frames["received"] == frames["skipped"] + frames["dropped"] + frames["ingested"]
    assert frames["ingested"] > 0
    assert len(result["frames_dropped_per_session"]) == 2 and sum(result["frames_dropped_per_session"]) == frames["dropped"]
    assert 0 < result["rss_start_bytes"] and 0 < result["rss_end_bytes"]
    assert result["rss_growth_ratio"] == pytest.approx(result["rss_end_bytes"] / result["rss_at_10pct_bytes"])
    assert 0.5 < result["rss_growth_ratio"] < 3
    assert len(result["memory_per_session_bytes"]) == 2 and all(b > 0 for b in result["memory_per_session_bytes"])


def test_serve_bench_rejects_bad_arguments():
    for kwargs in ({"sessions": 0}, {"fps": 0}, {"duration": -1.0}, {"fps": float("nan")}):
        with pytest.raises(ConfigError):
            run_serve_bench("tiny-smolvlm", **kwargs)
