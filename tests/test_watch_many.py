"""`streamvlm watch` with several cameras in one process: one model loaded once, one event log in which
every event names its camera, one console whose lines name the camera, a refused camera reported by name
while the others go on, a TOML file checked (camera and key named) before the model loads, and a summary
per camera at the end or on Ctrl-C."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import streamvlm.models as models
from streamvlm.cameras import CameraConfig, parse_plan
from streamvlm.cli import main
from streamvlm.dialogue import TriggerSpec
from streamvlm.errors import ConfigError
from streamvlm.ingest import write_test_clip
from streamvlm.server.eventlog import EventLog
from streamvlm.watch import CameraWatch

from test_live_source import HttpCamera

ALWAYS = TriggerSpec(kind="threshold", on=0.0, off=0.0, m=1, n=1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def loads(monkeypatch):
    """Every model load of the command, counted (the real loader still runs)."""
    calls: list[object] = []
    real = models.load_model

    def counting(*args, **kwargs):
        calls.append(args[0] if args else kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    return calls


def test_two_shapeworld_cameras_share_one_model_and_each_alerts_only_on_what_it_sees(tmp_path, capsys, loads):
    from streamvlm.demo import write_episode_clip
    from streamvlm.shapeworld.questions import appearances

    door = write_episode_clip(tmp_path / "door.mkv", seed=7, duration_s=8.0)
    yard = write_episode_clip(tmp_path / "yard.mkv", seed=3, duration_s=8.0)
    assert appearances(door, "yellow", "circle") == [2.0] and appearances(yard, "yellow", "circle") == []
    (tmp_path / "cameras.toml").write_text('''
model = "shapeworld"
event_db = "events.db"          # next to this file
fps = 1
alerts = ["a yellow circle appears"]

[[camera]]
name = "door"
source = "door.mkv"

[[camera]]
name = "yard"
source = "yard.mkv"
questions = ["3s: What colour is the circle?"]
''')
    code = main(["watch", "--config", str(tmp_path / "cameras.toml"), "--device", "cpu", "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(loads) == 1  # one model for both cameras
    events = EventLog(tmp_path / "events.db").list()
    assert len({e["session"] for e in events}) == 1  # one run, one log
    alerts = [e for e in events if e["kind"] == "alert"]
    door_alerts = [e["payload"]["t"] for e in alerts if e["payload"]["camera"] == "door"]
    assert door_alerts and all(abs(t - 2.0) <= 2.0 for t in door_alerts)  # ShapeWorld's ±2 s for "appears"
    assert not [e for e in alerts if e["payload"]["camera"] == "yard"]  # the yard never shows a yellow circle
    assert {e["payload"]["source"] for e in alerts} == {"door.mkv"}
    answers = [e["payload"] for e in events if e["kind"] == "answer"]
    assert [(a["camera"], a["question"], a["text"].strip().lower()) for a in answers] == [("yard", "What colour is the circle?", "red")]
    assert re.search(r"^\[door 00:0\d\.\d\] ALERT a yellow circle appears$", out, re.M)
    assert "[yard" in out and not re.search(r"^\[yard .*ALERT", out, re.M)
    for name in ("door", "yard"):  # one summary line per camera, and each camera's online/closed named
        assert re.search(rf"camera {name} \({name}\.mkv\): 8 frame\(s\) taken, \d+ read by the model, \d+ alert\(s\), \d+ answer\(s\); ended", err)
        assert f"streamvlm: {name}: camera online" in err and f"streamvlm: {name}: camera closed" in err


def test_alerts_of_every_camera_land_in_the_one_event_log_with_their_camera(smol, tmp_path, capsys):
    clips = [write_test_clip(tmp_path / f"{name}.mp4", seconds=1.0, fps=10.0) for name in ("hall", "dock", "roof")]
    cameras = [CameraConfig(name=clip.stem, source=str(clip), alerts=("a ball is visible",)) for clip in clips]
    watch = CameraWatch(smol, cameras, event_db=tmp_path / "events.db", trigger=ALWAYS, jsonl=tmp_path / "events.jsonl")
    reports = asyncio.run(watch.run())
    assert [(r.name, r.failure) for r in reports] == [("hall", None), ("dock", None), ("roof", None)]
    assert all(r.frames_read > 0 and r.alerts > 0 for r in reports)
    events = EventLog(tmp_path / "events.db").list()
    for report in reports:
        mine = [e for e in events if e["payload"].get("camera") == report.name]
        assert [e["kind"] for e in mine][0] == "camera.online" and [e["kind"] for e in mine][-1] == "camera.closed"
        assert sum(e["kind"] == "alert" for e in mine) == report.alerts
        assert all(e["payload"]["source"] == f"{report.name}.mp4" for e in mine)
    assert all("camera" in e["payload"] for e in events)  # nothing logged without its camera
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == len(events)
    out = capsys.readouterr().out
    assert {line.split()[0] for line in out.splitlines() if "ALERT" in line} == {"[hall", "[dock", "[roof"}


def test_a_refused_camera_is_named_and_the_others_read_to_the_end(tmp_path, capsys, loads):
    clip = write_test_clip(tmp_path / "lobby.mp4", seconds=3.0, fps=10.0)
    camera = HttpCamera(404)
    try:
        # --duration only bounds a regression (retrying forever); a refusal ends that camera after three quick tries.
        code = main(["watch", str(clip), camera.url, "--alert", "a person falls", "--event-db", str(tmp_path / "events.db"),
                     "--duration", "60"])
    finally:
        camera.close()
    err = capsys.readouterr().err
    assert code == 2 and len(loads) == 1
    last = err.splitlines()[-1]
    assert "1 of 2 camera(s) failed" in last and "camera '127.0.0.1'" in last and "HTTP 404 Not Found" in last
    assert re.search(r"streamvlm: 127\.0\.0\.1: camera FAILED: .*HTTP 404", err)  # said when it happened
    # a 10 fps file read at the default 2 frames a second: 6 of its 30 frames are taken
    assert re.search(r"camera lobby \(lobby\.mp4\): 6 frame\(s\) taken, [1-9]\d* read by the model, .*; ended", err)
    events = EventLog(tmp_path / "events.db").list()
    lobby = [e["kind"] for e in events if e["payload"]["camera"] == "lobby"]
    assert lobby[0] == "camera.online" and lobby[-1] == "camera.closed"
    refused = [e for e in events if e["payload"]["camera"] == "127.0.0.1"]
    assert refused[-1]["kind"] == "camera.closed" and "404" in refused[-1]["payload"]["message"]


@pytest.mark.parametrize("toml, expected", [
    ('[[camera]]\nname = "door"\nsource = "a.mp4"\nalerts = ["x"]\nfsp = 2\n', r"camera 'door': unknown key 'fsp'"),
    ('[[camera]]\nname = "door"\nsource = "a.mp4"\nalerts = ["x"]\nfps = -1\n', r"camera 'door': fps: .*\(0, 60\], or 0"),
    ('[[camera]]\nname = "door"\nsource = "a.mp4"\nalerts = ["x"]\nfps = "fast"\n', r"camera 'door': fps"),
    ('[[camera]]\nname = "door"\nalerts = ["x"]\n', r"camera 'door': source: missing"),
    ('[[camera]]\nsource = "a.mp4"\nalerts = ["x"]\n', r"camera #1: name"),
    ('[[camera]]\nname = "door"\nsource = "a.mp4"\nalerts = ["x"]\n[[camera]]\nname = "door"\nsource = "b.mp4"\nalerts = ["y"]\n',
     r"camera #2: name 'door' is used by another camera"),
    ('[[camera]]\nname = "door"\nsource = "a.mp4"\nalerts = "a person falls"\n', r"camera 'door': alerts: expected a list"),
    ('[[camera]]\nname = "door"\nsource = "a.mp4"\n', r"camera 'door': give at least one alert"),
    ('[[camera]]\nname = "door"\nsource = "a.mp4"\nalerts = ["x"]\nquestions = ["soon: who?"]\n', r"camera 'door': questions\[0\]"),
    ('[[camera]]\nname = "door"\nsource = "a.mp4"\nalerts = ["x"]\npolicy = "lru"\n', r"camera 'door': policy"),
    ('[[camera]]\nname = "door"\nsource = "a.mp4"\nalerts = ["x"]\nbudget = 8\n', r"camera 'door': budget"),
    ('[[camera]]\nname = "door"\nsource = "a.mp4"\nalerts = ["x"]\ncooldown = -5\n', r"camera 'door': cooldown"),
    ('fps = 99\n[[camera]]\nname = "door"\nsource = "a.mp4"\nalerts = ["x"]\n', r"camera 'door': fps"),  # a bad default names who gets it
    ('modle = "shapeworld"\n[[camera]]\nname = "door"\nsource = "a.mp4"\nalerts = ["x"]\n', r"unknown top-level key 'modle'"),
    ('[[cameras]]\nname = "door"\n', r"unknown top-level key 'cameras' \(cameras are \[\[camera\]\] tables\)"),
    ('model = "shapeworld"\n', r"no cameras"),
    ('[[camera]\nname = "door"\n', r"not valid TOML"),
    ('[[camera]]\nname = "front door"\nsource = "a.mp4"\nalerts = ["x"]\n', r"camera name 'front door'"),
])
def test_a_bad_cameras_file_names_the_camera_and_the_key(toml, expected):
    with pytest.raises(ConfigError, match=rf"^cameras\.toml: {expected}"):
        parse_plan(toml, origin="cameras.toml")


def test_a_camera_reads_two_frames_a_second_unless_told_otherwise():
    from streamvlm.cameras import DEFAULT_READ_FPS, cameras_from_sources

    camera = '[[camera]]\nname = "door"\nsource = "a.mp4"\nalerts = ["x"]\n'
    assert DEFAULT_READ_FPS == 2.0 and parse_plan(camera).cameras[0].fps == 2.0
    assert parse_plan("fps = 0\n" + camera).cameras[0].fps == 0  # every frame the source delivers
    assert parse_plan(camera + "fps = 10\n").cameras[0].fps == 10.0
    assert cameras_from_sources(["a.mp4"], ["x"])[0].fps == 2.0
    assert CameraConfig(name="door", source="a.mp4", alerts=("x",)).fps == 2.0


def test_a_bad_cameras_file_or_camera_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the cameras were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    bad = tmp_path / "cameras.toml"
    bad.write_text('[[camera]]\nname = "door"\nsource = "a.mp4"\nalerts = ["x"]\nfps = 120\n')
    assert main(["watch", "--config", str(bad)]) == 2
    assert f"{bad}: camera 'door': fps" in capsys.readouterr().err
    missing = tmp_path / "missing.toml"
    missing.write_text('[[camera]]\nname = "gate"\nsource = "nowhere.mp4"\nalerts = ["x"]\n')
    assert main(["watch", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "camera 'gate'" in err and "nowhere.mp4" in err
    assert main(["watch", "--config", str(bad), "--alert", "x"]) == 2
    assert "--alert does not combine with --config" in capsys.readouterr().err
    assert main(["watch", "--alert", "x"]) == 2
    assert "watch needs a camera" in capsys.readouterr().err


def test_ctrl_c_stops_every_camera_and_prints_a_summary_per_camera(tmp_path):
    for name in ("east", "west"):
        write_test_clip(tmp_path / f"{name}.mp4", seconds=60.0, fps=5.0)
    (tmp_path / "cameras.toml").write_text('model = "tiny-smolvlm"\nevent_db = "events.db"\nalerts = ["a ball is visible"]\nfps = 1\n'
                                           '[[camera]]\nname = "east"\nsource = "east.mp4"\n'
                                           '[[camera]]\nname = "west"\nsource = "west.mp4"\n')
    proc = subprocess.Popen([sys.executable, "-m", "streamvlm.cli", "watch", "--config", str(tmp_path / "cameras.toml")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        online: set[str] = set()
        deadline = time.monotonic() + 240  # a bound for a hung run, not a timing assertion
        while online != {"east", "west"} and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            match = re.match(r"streamvlm: (\w+): camera online", line)
            if match:
                online.add(match.group(1))
        assert online == {"east", "west"}
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    for name in ("east", "west"):
        assert re.search(rf"camera {name} \({name}\.mp4\): \d+ frame\(s\) taken, \d+ read by the model, \d+ alert\(s\), "
                         r"0 answer\(s\); stopped", err)
    assert "Traceback" not in err


def test_a_camera_whose_model_session_breaks_ends_named_and_the_others_go_on(smol, tmp_path, capsys):
    clips = [write_test_clip(tmp_path / f"{name}.mp4", seconds=1.0, fps=10.0) for name in ("bad", "good")]
    cameras = [CameraConfig(name=clip.stem, source=str(clip), alerts=("a ball is visible",)) for clip in clips]
    watch = CameraWatch(smol, cameras, event_db=tmp_path / "events.db", trigger=ALWAYS)
    watch._cameras[0].worker.session.broken = "an injected fault"  # as the engine marks a session it cannot restore
    bad, good = asyncio.run(watch.run())
    assert bad.failure and "an injected fault" in bad.failure
    assert good.failure is None and good.ended and good.frames_read > 0
    assert "streamvlm: bad: camera FAILED: the model session stopped" in capsys.readouterr().err
    failed = [e for e in EventLog(tmp_path / "events.db").list() if e["kind"] == "camera.failed"]
    assert [e["payload"]["camera"] for e in failed] == ["bad"] and "an injected fault" in failed[0]["payload"]["message"]
    assert any("bad" in line and "FAILED" in line for line in watch.summary_lines())


def test_the_example_cameras_file_is_valid_and_its_paths_are_next_to_it():
    from streamvlm.cameras import load_plan

    plan = load_plan(ROOT / "demos" / "cameras.toml")
    assert [c.name for c in plan.cameras] == ["door", "yard"] and plan.model == "shapeworld"
    assert plan.cameras[0].source == str(ROOT / "demos" / "door.mkv") and plan.event_db == ROOT / "demos" / "events.db"
    assert plan.cameras[0].alerts == ("a yellow circle appears",)  # the top-level default
    assert plan.cameras[1].questions == ((3.0, "What colour is the circle?"),)


def test_an_rtsp_camera_that_drops_comes_back_while_the_other_camera_reads_on(smol, tmp_path):
    """One `watch`, two cameras: an RTSP camera whose server dies mid-stream and comes back, and a file.
    The file camera reads to its end while the other is down; the RTSP camera is logged offline, then
    online again, and the model reads its frames after the return. Neither camera fails."""
    from test_live_source import FAST, RtspServer, free_port

    server = RtspServer(free_port())
    server.start()
    clip = write_test_clip(tmp_path / "lobby.mp4", seconds=6.0, fps=10.0)
    cameras = [CameraConfig(name="yard", source=server.url, alerts=("a ball is visible",), fps=5.0),
               CameraConfig(name="lobby", source=str(clip), alerts=("a ball is visible",), fps=5.0)]
    err = io.StringIO()
    watch = CameraWatch(smol, cameras, event_db=tmp_path / "events.db", source_config=FAST, err=err, duration_s=180)
    yard, lobby = watch.reports

    async def said(text: str, count: int = 1) -> None:
        deadline = time.monotonic() + 60  # bounds a hung run; not a timing assertion
        while err.getvalue().count(text) < count:
            assert time.monotonic() < deadline, f"never said {text!r} x{count}:\n{err.getvalue()}"
            await asyncio.sleep(0.05)

    async def main() -> tuple[int, int]:
        run = asyncio.create_task(watch.run())
        try:
            await said("yard: camera online")
            await said("lobby: camera online")
            while yard.frames_read == 0:  # the model has read the camera before it drops
                assert not run.done(), err.getvalue()
                await asyncio.sleep(0.05)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, server.kill)
            await said("yard: camera offline")
            down_at = yard.frames_read
            while not lobby.ended:  # the file camera reads to its end while the other is down
                assert not run.done(), err.getvalue()
                await asyncio.sleep(0.1)
            await loop.run_in_executor(None, server.start)  # the same port: the camera comes back
            await said("yard: camera online", 2)
            back_at = yard.frames_read
            while yard.frames_read <= back_at + 2:  # the model reads the returning stream
                assert not run.done(), err.getvalue()
                await asyncio.sleep(0.1)
            return down_at, back_at
        finally:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)

    try:
        down_at, back_at = asyncio.run(main())
    finally:
        server.stop()
    assert lobby.failure is None and lobby.ended and lobby.frames_read > 0
    assert yard.failure is None and yard.frames_read > back_at >= down_at > 0
    kinds = [e["kind"] for e in EventLog(tmp_path / "events.db").list() if e["payload"]["camera"] == "yard"]
    assert kinds.count("camera.offline") >= 1 and kinds.count("camera.online") >= 2
    assert kinds.index("camera.offline") < len(kinds) - 1 - kinds[::-1].index("camera.online")
