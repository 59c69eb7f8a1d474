"""Every demo runs end to end as a user runs it: a subprocess, the shipped ShapeWorld model, real answers.

The server demos talk to a real ``streamvlm serve --model shapeworld`` started here on 127.0.0.1, port 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_py(*args: str, stdin: str | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, input=stdin, timeout=timeout,
                          env=dict(os.environ))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server on a free port; yields its ws:// URL and stops it with Ctrl-C (SIGINT)."""
    db = tmp_path_factory.mktemp("server") / "events.db"
    proc = subprocess.Popen([sys.executable, "-m", "streamvlm.cli", "serve", "--model", "shapeworld", "--port", "0", "--event-db", str(db)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            match = re.search(r"ws://[0-9.]+:\d+", line)
            if match and not found:
                found.append(match.group(0))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(120)
    assert found, "the server did not start"
    yield found[0]
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """An 8 s ShapeWorld clip (seed 7): a yellow circle appears at 2 s."""
    from streamvlm.demo import write_episode_clip
    from streamvlm.shapeworld.questions import appearances

    path = tmp_path_factory.mktemp("clip") / "clip.mkv"
    episode = write_episode_clip(path, seed=7, duration_s=8.0)
    assert appearances(episode, "yellow", "circle") == [2.0]
    return path


def test_video_questions_answers_a_shapeworld_clip_with_evidence_and_truth():
    proc = run_py("demos/video_questions.py", "--duration", "12")
    assert proc.returncode == 0, proc.stderr
    answers = [line for line in proc.stdout.splitlines() if "(evidence:" in line]
    assert answers and all(re.search(r"evidence: \d+ frames, \d\d:\d\d-\d\d:\d\d; truth: ", a) for a in answers)
    assert re.search(r"\d+ of \d+ answers match the ground truth", proc.stdout)
    assert "✓" in proc.stdout  # the shipped model gets some right: the answers are real, not noise


def test_rtsp_monitor_reports_online_alerts_and_exits_at_the_end_of_a_file(server, clip):
    proc = run_py("demos/rtsp_monitor.py", str(clip), "--alert", "a yellow circle appears", "--url", server, "--linger", "2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "camera online" in out and "camera closed" in out
    assert out.index("camera online") < out.index("camera closed")  # said when it happened, not after the end
    assert re.search(r"ALERT alert1: a yellow circle appears \(the frame at stream time [\d.]+ s fired it\)", out)
    assert "the source ended: " in out.splitlines()[-1]


def test_webcam_chat_answers_a_typed_question_with_its_evidence(server, clip):
    proc = run_py("demos/webcam_chat.py", "--url", server, "--source", str(clip), stdin="What shape is on screen now?\n")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\[completed; evidence: ", proc.stdout)


def test_websocket_integration_prints_answers_with_evidence_and_truth(server):
    proc = run_py("demos/websocket_integration.py", "--url", server, "--speed", "0")
    assert proc.returncode == 0, proc.stderr
    assert "response.done" in proc.stdout
    assert "evidence: []" not in proc.stdout


def test_streamvlm_demo_ties_waiting_to_its_question_and_says_the_tolerance():
    proc = run_py("-m", "streamvlm.cli", "demo", "--fast", "--no-draw", "--duration", "16")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    waiting = [line for line in lines if "will answer when" in line]
    assert waiting and all(line.startswith("[") and "Tell me when" in line for line in waiting)  # no orphan line
    assert any("±" in line and "counts" in line for line in lines)
    for line in lines:  # the time it said is judged on its own: never a bare ✓ after a wrong spoken time
        if "the time it said" in line:
            assert re.search(r"the time it said [✓✗]\)$", line)
    assert re.search(r"accuracy \d+/\d+", proc.stdout)


# ---- the docs name only what exists ---------------------------------------------------------------------
def _documented_state() -> list[str]:
    text = (ROOT / "client" / "README.md").read_text()
    state = text[text.index("State, on `AsyncClient` and `Client` alike:"):]
    state = state[: state.index("\n\n")]
    return re.findall(r"`(\w+)`", state.split(":", 1)[1])


def test_the_client_readme_lists_only_attributes_both_clients_have():
    import inspect

    from streamvlm_client import AsyncClient, Client

    names = _documented_state()
    assert {"session_id", "handle", "model", "go_away", "connected"} <= set(names)
    async_init = inspect.getsource(AsyncClient.__init__)
    for name in names:
        assert hasattr(AsyncClient, name) or f"self.{name}" in async_init, f"AsyncClient has no {name!r}"
        assert hasattr(Client, name), f"Client has no {name!r}"


def test_every_cli_flag_in_the_readme_exists():
    import argparse

    from streamvlm.cli import build_parser

    def sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices.get(name)
        return None

    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    commands = [line.split("#")[0] for line in text.splitlines() if line.strip().startswith("streamvlm ")]
    assert len(commands) >= 8
    for command in commands:
        words = command.split()
        parser = sub(build_parser(), words[1])
        assert parser is not None, command
        if len(words) > 2 and sub(parser, words[2]) is not None:
            parser = sub(parser, words[2])
        known = {option for action in parser._actions for option in action.option_strings}
        for flag in re.findall(r"(?<!\S)(--[a-z][a-z-]*)", command):
            assert flag in known, f"{flag} in README command {command.strip()!r} is not an option of streamvlm {words[1]}"
        assert " M " not in f" {command} ", f"README command with the placeholder M: {command.strip()!r}"
