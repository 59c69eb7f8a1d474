"""``run_serve_bench``: K client sessions against an in-process server, short run with the tiny model."""

from __future__ import annotations

import json

import pytest

from streamvlm.bench.serve import run_serve_bench, run_serve_sweep
from streamvlm.cli import main
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
    # the server's side: frames read, how evenly, how late; admission by compute; the precision it ran in
    assert result["engine"] == "scheduler"
    per_session = result["frames_read_per_session"]
    assert len(per_session) == 2 and sum(per_session) == pytest.approx(result["frames_read_per_s"] * 4)
    assert result["share_max_min"] == pytest.approx(max(per_session) / min(per_session))
    assert 0 <= result["lag_p50_s"] <= result["lag_p95_s"]
    assert result["sessions_capped"] >= 0 and result["frames_dropped_compute"] >= 0
    assert {"device", "dtype"} <= set(result)
    # where the model's time went: shares of the run that add up to 1, and the frame ceiling they imply
    share = result["model_share"]
    assert set(share) == {"answer", "probe", "frame", "idle"} and all(0 <= v <= 1 for v in share.values())
    assert sum(share.values()) == pytest.approx(1.0, abs=1e-3) and share["answer"] > 0 and share["frame"] > 0
    assert result["model_s_per_frame"] > 0 and result["model_s_per_answer"] > 0
    assert result["frames_read_per_s_ceiling"] == pytest.approx((1 - share["answer"] - share["probe"]) / result["model_s_per_frame"], rel=1e-3)


def test_serve_bench_rejects_bad_arguments():
    for kwargs in ({"sessions": 0}, {"fps": 0}, {"duration": -1.0}, {"fps": float("nan")}, {"engine": "turbo"}):
        with pytest.raises(ConfigError):
            run_serve_bench("tiny-smolvlm", **kwargs)
    with pytest.raises(ConfigError):
        run_serve_sweep("tiny-smolvlm", sessions=[1, 0])
    assert main(["bench", "serve", "--sessions", "1,two"]) == 2  # a clear error, before any model loads
    assert main(["bench", "serve", "--engine", "lock,turbo", "--sessions", "1,2"]) == 2


def test_one_invocation_compares_engines_across_session_counts(tmp_path):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--model", "tiny-smolvlm", "--sessions", "2,1", "--engine", "lock,scheduler",
                 "--fps", "2", "--duration", "2", "--ask-together", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["benchmark"], result["sessions"], result["engines"]) == ("serve", [1, 2], ["lock", "scheduler"])
    assert {"device", "dtype"} <= set(result) and all(r["ask_together"] for r in result["runs"])
    runs = [(r["engine"], r["sessions"]) for r in result["runs"]]
    assert runs == [("lock", 1), ("lock", 2), ("scheduler", 1), ("scheduler", 2)]
    assert all(r["frames_read_per_s"] > 0 and len(r["frames_read_per_session"]) == r["sessions"] for r in result["runs"])
    for run in result["runs"]:  # lock reads one frame per vision forward; each run counts its own forwards
        assert run["vision_batches"]["frames"] >= sum(run["frames_read_per_session"]) - run["sessions"]
        if run["engine"] == "lock":
            assert run["vision_batch_mean"] == 1.0 and run["vision_batches"]["max_batch"] == 1
            assert run["decode_batches"]["steps"] == 0  # the lock steps alone, outside the batcher
        else:
            assert run["decode_batches"]["steps"] > 0
    rows = {(row["engine"], row["sessions"]): row for row in result["comparison"]}
    assert rows[("lock", 1)]["frames_read_per_s_vs_single"] == 1.0 and rows[("lock", 2)]["frames_read_per_s_vs_lock"] == 1.0
    by_run = {(r["engine"], r["sessions"]): r for r in result["runs"]}
    assert rows[("scheduler", 2)]["frames_read_per_s_vs_lock"] == pytest.approx(
        by_run[("scheduler", 2)]["frames_read_per_s"] / by_run[("lock", 2)]["frames_read_per_s"])
    assert rows[("scheduler", 2)]["frames_read_per_s_vs_single"] == pytest.approx(
        by_run[("scheduler", 2)]["frames_read_per_s"] / by_run[("scheduler", 1)]["frames_read_per_s"])
    assert rows[("scheduler", 2)]["frames_ceiling_vs_single"] == pytest.approx(
        by_run[("scheduler", 2)]["frames_read_per_s_ceiling"] / by_run[("scheduler", 1)]["frames_read_per_s"])
