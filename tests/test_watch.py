"""`streamvlm watch` against a real RTSP server that drops out mid-stream: it reconnects, continues,
and every alert and camera change is in the SQLite log (and posted to the webhook). A source that
cannot be read (not a video, a URL the server refuses) is an error with a non-zero exit, and every
run logs under its own session id."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from streamvlm.cli import main
from streamvlm.dialogue import TriggerSpec
from streamvlm.errors import SourceError
from streamvlm.ingest import write_test_clip
from streamvlm.ingest.live import SourceConfig
from streamvlm.server.eventlog import EventLog
from streamvlm.watch import run_watch

from test_eventlog import Receiver
from test_live_source import HttpCamera, RtspServer, free_port

ALWAYS = TriggerSpec(kind="threshold", on=0.0, off=0.0, m=1, n=1)


def test_watch_survives_a_camera_drop_out_and_keeps_every_alert(smol, tmp_path):
    server = RtspServer(free_port())
    receiver = Receiver()
    server.start()
    try:
        async def main():
            task = asyncio.create_task(run_watch(
                smol, server.url, ["a ball is visible"], event_db=tmp_path / "events.db", webhook=receiver.url,
                jsonl=tmp_path / "events.jsonl", trigger=ALWAYS, duration_s=25,
                source_config=SourceConfig(open_timeout_s=3, read_timeout_s=1.5, backoff_initial_s=0.3, backoff_max_s=1.0)))
            log = EventLog(tmp_path / "events.db")

            async def until(kind: str, after_id: int = 0, timeout: float = 20):
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    found = [e for e in log.list() if e["kind"] == kind and e["id"] > after_id]
                    if found:
                        return found[0]
                    await asyncio.sleep(0.2)
                raise AssertionError(f"no {kind} event within {timeout}s: {[e['kind'] for e in log.list()]}")

            await until("camera.online")
            first_alert = await until("alert")
            server.kill()  # the camera loses power
            offline = await until("camera.offline")
            server.start()
            back = await until("camera.online", offline["id"])
            await asyncio.sleep(2.0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return first_alert, back, log

        first_alert, back, log = asyncio.run(main())
    finally:
        server.stop()
    kinds = [e["kind"] for e in log.list()]
    assert kinds.index("camera.online") < kinds.index("camera.offline") < len(kinds) - kinds[::-1].index("camera.online")
    assert first_alert["payload"]["condition"] == "a ball is visible"
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == kinds  # the JSONL log mirrors the database
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(b["kind"] == "alert" for b in receiver.bodies):
        time.sleep(0.2)
    assert any(b["kind"] == "alert" for b in receiver.bodies)
    receiver.close()


@pytest.mark.parametrize("content", [b"", b"shopping list: milk, eggs\n" * 40])
def test_watch_of_a_file_that_is_not_a_video_fails_naming_it(tmp_path, capsys, content):
    junk = tmp_path / "notes.txt"
    junk.write_bytes(content)
    code = main(["watch", str(junk), "--alert", "a person falls", "--event-db", str(tmp_path / "events.db")])
    err = capsys.readouterr().err
    assert code != 0
    assert "error" in err and str(junk) in err
    assert "alert(s) raised" not in err


def test_run_watch_raises_for_a_file_that_is_not_a_video(smol, tmp_path):
    junk = tmp_path / "clip.mp4"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(SourceError, match="clip.mp4"):
        asyncio.run(run_watch(smol, str(junk), ["a ball is visible"], event_db=tmp_path / "events.db"))
    kinds = [e["kind"] for e in EventLog(tmp_path / "events.db").list()]
    assert kinds[-1] == "camera.closed"  # the reason is in the log too


def test_watch_of_a_url_the_server_refuses_exits_non_zero_with_the_reason(smol, tmp_path, capsys):
    camera = HttpCamera(404)
    try:
        # --duration only bounds a regression (retrying forever); a refusal ends the run after three quick tries.
        code = main(["watch", camera.url, "--alert", "a person falls", "--event-db", str(tmp_path / "events.db"), "--duration", "60"])
    finally:
        camera.close()
    err = capsys.readouterr().err
    assert code != 0
    assert "HTTP 404 Not Found" in err.splitlines()[-1] and camera.url in err.splitlines()[-1]
    log = EventLog(tmp_path / "events.db")
    assert [e["kind"] for e in log.list()] == ["camera.offline", "camera.error", "camera.error", "camera.closed"]


def test_every_watch_run_logs_under_its_own_session_id(smol, tmp_path):
    clip = write_test_clip(tmp_path / "clip.mp4", seconds=0.5, fps=10.0)
    for _ in range(2):
        asyncio.run(run_watch(smol, str(clip), ["a ball is visible"], event_db=tmp_path / "events.db", trigger=ALWAYS))
    events = EventLog(tmp_path / "events.db").list()
    sessions = list(dict.fromkeys(e["session"] for e in events))
    assert len(sessions) == 2 and all(s.startswith("watch_") for s in sessions)
    for session in sessions:  # each run's events are one complete run
        kinds = [e["kind"] for e in events if e["session"] == session]
        assert kinds[0] == "camera.online" and kinds[-1] == "camera.closed"


def test_watch_fps_and_cooldown_flags_are_checked_before_the_model_loads(tmp_path, capsys):
    from streamvlm.cli import build_parser

    args = build_parser().parse_args(["watch", "clip.mp4", "--alert", "x", "--fps", "2", "--cooldown", "30"])
    assert (args.fps, args.cooldown) == (2.0, 30.0)
    clip = write_test_clip(tmp_path / "clip.mp4", seconds=0.5, fps=10.0)
    assert main(["watch", str(clip), "--alert", "x", "--fps", "-1", "--model", "no-such-model"]) == 2
    assert "--fps" in capsys.readouterr().err
    assert main(["watch", str(clip), "--alert", "x", "--cooldown", "-5", "--model", "no-such-model"]) == 2
    assert "cooldown_s" in capsys.readouterr().err
