"""The command line as a user runs it: `streamvlm run`, `check-model`, `bench latency`, and its errors."""

from __future__ import annotations

import json
import os
import re
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
    assert 0 <= report["batched_decode_diff"] <= 1e-4  # sessions answering at once: one batched step, as alone


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


# ---- failing fast, before a model loads ---------------------------------------------------------------
@pytest.mark.parametrize("model, hint", [("tiny-smolvm", "Did you mean 'tiny-smolvlm'"), ("M", "placeholder"),
                                         ("shapewrld", "Did you mean 'shapeworld'")])
def test_an_unknown_model_fails_before_loading_with_a_suggestion(model, hint):
    proc = run_cli("run", "--model", model, "--fast", "--max-new-tokens", "1", timeout=60)
    assert proc.returncode == 2
    assert hint in proc.stderr and "tiny-smolvlm" in proc.stderr
    assert "loading" not in proc.stderr and not proc.stdout  # nothing was loaded, nothing was asked


def test_a_hub_id_that_is_not_cached_fails_at_once_when_offline(monkeypatch):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=os.devnull + "-none")
    proc = subprocess.run([sys.executable, "-m", "streamvlm.cli", "check-model", "Qwen/Qwen2.5-VL-3B-Instruct"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert "not in the local Hub cache" in proc.stderr and "offline" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "/nonexistent/clip.mp4"], "does not exist"),
    (["run", "--memory-budget", "5"], "--memory-budget 5"),
    (["run", "--policy", "lru"], "policy"),
    (["run", "--ask", "soon: what?"], "TIME: question"),
])
def test_input_errors_come_before_the_model_loads(args, message):
    proc = run_cli(*args, "--model", "tiny-qwen3-vl", "--fast", timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "loading" not in proc.stderr


def test_serve_on_a_busy_port_is_one_line_before_the_model_loads():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = run_cli("serve", "--port", str(busy.getsockname()[1]), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "already in use" in proc.stderr and "--port" in proc.stderr
    assert "Traceback" not in proc.stderr and "loading" not in proc.stderr


def test_every_help_shows_defaults():
    serve = " ".join(run_cli("serve", "--help", timeout=60).stdout.split())  # argparse wraps lines
    assert "default: 8765" in serve and "default: tiny-smolvlm" in serve
    lat = " ".join(run_cli("bench", "latency", "--help", timeout=60).stdout.split())
    assert "default: 16,64,128" in lat and "default: smolvlm-256m-random" in lat


# ---- run ---------------------------------------------------------------------------------------------------
def test_run_reports_real_first_text_times_and_finish_reasons_in_words(tmp_path):
    from streamvlm.ingest import write_test_clip

    clip = write_test_clip(tmp_path / "clip.mp4", seconds=4.0, fps=10.0)
    proc = run_cli("run", str(clip), "--fps", "1", "--fast", "--max-new-tokens", "2",
                   "--ask", "2s: second?", "--ask", "1s: zebra first?", "--ask", "1s: apple next?", "--ask", "99s: after the end?")
    assert proc.returncode == 0, proc.stderr
    asked = [line.split("Q: ")[1] for line in proc.stdout.splitlines() if "] Q: " in line]
    assert asked == ["zebra first?", "apple next?", "second?", "after the end?"]  # same time: the order given
    assert "first token 0.00s" not in proc.stdout
    assert re.findall(r"first text after \d+ ms|first text after [\d.]+ s", proc.stdout)
    assert "stopped at the length limit" in proc.stdout and "| length" not in proc.stdout
    assert "past the end of the video" in proc.stderr  # warned before the model loads
    assert proc.stderr.index("past the end") < proc.stderr.index("loading")
    assert "after the video ended at 00:04.0" in proc.stdout


def test_run_answers_tell_me_when_once_it_happens(tmp_path):
    from streamvlm.demo import write_episode_clip

    write_episode_clip(tmp_path / "clip.mkv", seed=7, duration_s=8.0)  # a yellow circle appears at 2 s
    proc = run_cli("run", str(tmp_path / "clip.mkv"), "--model", "shapeworld", "--fps", "1", "--fast",
                   "--ask", "0s: Tell me when a yellow circle appears.")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "[00:00.0] Q: Tell me when a yellow circle appears."
    assert "will answer when a yellow circle appears" in lines[1]
    answer = next(line for line in lines if " A (asked at 00:00.0" in line)
    assert answer >= "[00:02.0]"  # answered when it was seen, not when asked


# ---- events ------------------------------------------------------------------------------------------------
def _logged(tmp_path):
    from streamvlm.protocol import messages
    from streamvlm.server.eventlog import EventLog

    db = tmp_path / "events.db"
    log = EventLog(db)
    for i in range(4):
        done = messages.response_done(f"resp_{i}", "completed", "user", f"answer number {i} " * 8,
                                      [{"pts_s": float(t), "source_id": "cam"} for t in range(50)])
        done["response"]["question"] = f"question {i}?"
        log.append("sess_a", "response.done", done)
    log.append("door-cam", "alert", {"watch_id": "alert1", "condition": "the door is open", "t": 12.5}, stream_t=12.5)
    log.close()
    return db


def test_events_prints_a_readable_table_newest_first(tmp_path):
    db = _logged(tmp_path)
    proc = run_cli("events", "--db", str(db), "--limit", "3", timeout=60)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["logged", "session", "kind", "at", "question", "answer", "evidence"]
    assert len(rows) == 3
    assert "door-cam" in rows[0] and "alert" in rows[0] and "the door is open" in rows[0]
    assert "question 3?" in rows[1] and "question 2?" in rows[2]  # the newest, newest first
    assert "50 frames 00:00.0-00:49.0" in rows[1] and '"pts_s"' not in proc.stdout  # evidence as a count and range
    assert all(len(row) < 220 for row in rows)  # long answers shortened


def test_events_since_takes_durations_iso_times_and_unix_times_and_json_stays_raw(tmp_path):
    import datetime
    import time as clock

    db = _logged(tmp_path)
    five_minutes_ago = (datetime.datetime.now() - datetime.timedelta(minutes=5)).isoformat(timespec="minutes")
    for since in ("10m", "2h", five_minutes_ago, str(int(clock.time()) - 300)):
        proc = run_cli("events", "--db", str(db), "--since", since, "--json", timeout=60)
        assert proc.returncode == 0, (since, proc.stderr)
        rows = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(rows) == 5, since
        assert rows[-1]["payload"]["response"]["question"] == "question 0?"  # raw, whole payload
    future = run_cli("events", "--db", str(db), "--since", "2999-01-01T00:00", timeout=60)
    assert future.returncode == 0 and not future.stdout
    bad = run_cli("events", "--db", str(db), "--since", "yesterday", timeout=60)
    assert bad.returncode == 2 and "10m" in bad.stderr


# ---- device and precision ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["run"], ["demo"], ["serve"], ["watch", "0"], ["check-model", "tiny-smolvlm"], ["bench", "latency"],
                                     ["bench", "memory"], ["bench", "live"], ["bench", "quality"]])
def test_every_command_that_loads_a_model_takes_device_and_dtype_defaulting_to_auto(command):
    from streamvlm.cli import build_parser

    args = build_parser().parse_args(command)
    assert args.device == "auto"
    assert args.dtype == ("float32,auto" if command[0] == "check-model" else "auto")


def test_check_model_checks_each_dtype_against_float32():
    proc = run_cli("check-model", "tiny-smolvlm", "--frames", "2", "--max-new-tokens", "4", "--device", "cpu", "--dtype", "float32,bfloat16")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["dtype"] == "float32" and report["max_abs_logit_diff"] <= 1e-4  # float32 stays the top level
    fp32, bf16 = report["checks"]
    assert (fp32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert fp32["tolerance"] == 1e-4 < bf16["tolerance"]  # a tolerance that fits bfloat16's 8 significant bits
    assert bf16["ok"] is True and bf16["same_answer"] is True and isinstance(bf16["same_answer_as_float32"], bool)
    assert bf16["same_answer_as_float32"] == (bf16["stream_answer_ids"] == fp32["stream_answer_ids"])
    assert "dtype bfloat16: asked for" in proc.stderr


def test_bench_latency_json_says_which_device_and_dtype_ran(tmp_path):
    out = tmp_path / "lat.json"
    proc = run_cli("bench", "latency", "--model", "tiny-smolvlm", "--frames", "2", "--repeats", "1", "--no-naive", "--quiet",
                   "--device", "cpu", "--dtype", "bfloat16", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert (result["device"], result["dtype"]) == ("cpu", "bfloat16")
    assert result["dtype_reason"].startswith("bfloat16: asked for")


def test_bench_latency_auto_dtype_is_resolved_in_the_json(tmp_path):
    from streamvlm.models.device import choose_precision

    out = tmp_path / "lat.json"
    proc = run_cli("bench", "latency", "--model", "tiny-smolvlm", "--frames", "1", "--repeats", "1", "--no-naive", "--quiet", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    expected = choose_precision("auto", "auto")
    assert (result["device"], result["dtype"], result["dtype_reason"]) == (expected.device, expected.dtype, expected.dtype_reason)
    assert result["dtype"] != "auto"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_fails_before_loading():
    proc = run_cli("run", "--device", "cuda", "--fast", "--max-new-tokens", "1", timeout=60)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--device cpu" in proc.stderr
    assert "loading" not in proc.stderr and not proc.stdout
    proc = run_cli("bench", "latency", "--device", "gpu", "--frames", "1", timeout=60)
    assert proc.returncode == 2 and "auto, cpu, cuda, cuda:N or mps" in proc.stderr
