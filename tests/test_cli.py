"""The command line as a user runs it: `streamvlm run`, `check-model`, `bench latency`, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from streamvlm.cli import main, parse_timed_question
from streamvlm.errors import ConfigError


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamvlm.cli", *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("12s: what is on the board?", (12.0, "what is on the board?")),
        ("95: what did the person cut first?", (95.0, "what did the person cut first?")),
        ("1m35s: and then?", (95.0, "and then?")),
        ("1h2m: late?", (3720.0, "late?")),
        ("01:35: clock style", (95.0, "clock style")),
        ("1:01:35: long clock", (3695.0, "long clock")),
        ("2.5s: fractional", (2.5, "fractional")),
    ],
)
def test_parse_timed_question(spec, expected):
    assert parse_timed_question(spec) == expected


@pytest.mark.parametrize("spec", ["what is this?", "12s:", "soon: what?", ": no time"])
def test_parse_timed_question_rejects_bad_specs(spec):
    with pytest.raises(ConfigError, match="TIME: question"):
        parse_timed_question(spec)


def test_check_model_prints_json_and_passes():
    proc = run_cli("check-model", "tiny-qwen2.5-vl", "--frames", "3")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"] == "tiny-qwen2.5-vl" and report["frames"] == 3
    assert report["ok"] is True and report["same_answer"] is True
    assert report["max_abs_logit_diff"] <= 1e-4


def test_check_model_fails_with_nonzero_exit_when_not_exact():
    # A negative tolerance can never be met: the command must say so with its exit status.
    proc = run_cli("check-model", "tiny-smolvlm", "--frames", "2", "--tolerance", "-1")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["ok"] is False


def test_run_default_plays_generated_clip_and_answers_at_timestamps():
    proc = run_cli("run", "--fast", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert "random weights" in proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("[00:01.0] Q: What colour is the background?") for line in lines)
    assert any(line.startswith("[00:03.0] A: ") for line in lines)
    evidence = [line for line in lines if "evidence:" in line]
    assert len(evidence) == 2
    # a question at 1 s sees the frames sampled (2 fps) at or before 1 s: 0.0, 0.5 and 1.0
    assert "evidence: 3 frames 00:00.0-00:01.0" in evidence[0]
    assert "evidence: 7 frames 00:00.0-00:03.0" in evidence[1]
    assert "frames read once" in proc.stderr


def test_run_on_a_file_with_questions(tmp_path):
    from streamvlm.ingest import write_test_clip

    clip = write_test_clip(tmp_path / "clip.mp4", seconds=4.0, fps=10.0)
    proc = run_cli("run", str(clip), "--model", "tiny-qwen3-vl", "--fps", "1", "--fast", "--max-new-tokens", "3",
                   "--ask", "1.5s: what changed?", "--ask", "10s: after the end?")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "[00:01.5] Q: what changed?" in out and "[00:10.0] Q: after the end?" in out
    assert "evidence: 2 frames 00:00.0-00:01.0" in out  # frames at 0 s and 1 s precede the question at 1.5 s
    assert "evidence: 4 frames 00:00.0-00:03.0" in out  # a question past the end sees the whole clip


def test_run_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.mp4"), "--fast"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--ask", "no time here", "--fast"]) == 2
    assert "TIME: question" in capsys.readouterr().err
    assert main(["run", "--fps", "0", "--fast"]) == 2
    assert main(["check-model", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_bench_latency_writes_the_documented_json(tmp_path):
    out = tmp_path / "lat.json"
    proc = run_cli("bench", "latency", "--model", "tiny-smolvlm", "--frames", "2,4", "--repeats", "1", "--json", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [r["frames"] for r in result["results"]] == [2, 4]
    for r in result["results"]:
        assert r["ttft_stream_s"] > 0 and r["ttft_naive_s"] > 0
        assert r["ratio"] == pytest.approx(r["ttft_naive_s"] / r["ttft_stream_s"])
    ingest = result["ingest"]
    assert ingest["frames"] == 4
    assert ingest["vision_s"] > 0 and ingest["prefill_s"] > 0 and ingest["overhead_s"] >= 0


def test_bench_latency_with_a_memory_budget_and_no_baseline(tmp_path):
    out = tmp_path / "lat.json"
    proc = run_cli("bench", "latency", "--model", "tiny-smolvlm", "--frames", "3,12", "--repeats", "1", "--memory-budget", "200",
                   "--no-naive", "--json", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["memory_budget_tokens"] == 200
    for r in result["results"]:
        assert r["ttft_naive_s"] is None and r["ratio"] is None and r["ttft_stream_s"] > 0
    assert result["results"][-1]["context_tokens"] <= 200  # the working memory stayed within its budget
