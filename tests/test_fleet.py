"""The camera fleet: config, resume from snapshots with an idempotent event log, and real local Ray clusters.

The Ray tests start ``ray.cluster_utils.Cluster`` with two nodes on this machine (dashboard and usage
stats off, a few logical CPUs each), run the shipped ShapeWorld model on a ShapeWorld clip, and stop
every Ray process at the end. An uninterrupted camera on the same clip is the reference: the camera
that is killed (or whose node is removed) must log exactly its alerts and answer as it does.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from streamvlm.errors import ConfigError
from streamvlm.fleet import CameraLoop, load_fleet_config, parse_fleet_config
from streamvlm.fleet.loop import events_to_log
from streamvlm.server.eventlog import EventLog

CONDITION = "a yellow circle appears"  # seed 7: a yellow circle enters at 2 s of this 16 s clip, and the model sees it


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    from streamvlm.demo import write_episode_clip

    path = tmp_path_factory.mktemp("fleet-clip") / "clip.mkv"
    write_episode_clip(path, seed=7, duration_s=16.0)
    return path


def _toml(tmp: Path, clip: Path, cameras: tuple[str, ...], every_s: float = 10.0, extra: str = "") -> str:
    text = (f'model = "shapeworld"\nfps = 1\nevent_db = "{tmp / "events.db"}"\n{extra}\n'
            f'[fleet]\nname = "test"\nsnapshot_dir = "{tmp / "snapshots"}"\nsnapshot_every_s = {every_s}\n')
    for name in cameras:
        text += f'\n[[camera]]\nname = "{name}"\nsource = "{clip}"\nalerts = ["{CONDITION}"]\n'
    return text


def _alerts(log: EventLog, camera: str) -> list[tuple[str, float]]:
    return [(e["payload"]["watch_id"], e["stream_t"]) for e in log.list(session=camera, kinds=("alert",))]


# ---- the file -----------------------------------------------------------------------------------------
def test_the_fleet_file_is_the_watch_cameras_file_plus_placement(tmp_path):
    path = tmp_path / "cameras.toml"
    path.write_text(_toml(tmp_path, Path("clip.mkv"), ("door",)) + 'group = "gpu"\n'
                    + '[groups.gpu]\nnum_gpus = 0.25\nresources = { rack-a = 1 }\n')
    config = load_fleet_config(path)
    (camera,) = config.cameras
    assert (camera.id, camera.alerts, camera.fps, camera.source) == ("door", (CONDITION,), 1.0, str(tmp_path / "clip.mkv"))
    assert config.group_of(camera).num_gpus == 0.25 and config.group_of(camera).resources == {"rack-a": 1.0}
    assert config.snapshot_dir == tmp_path / "snapshots" and config.snapshot_every_s == 10.0
    bad = {
        'snapshot_every_s = 10.0\n': 'snapshot_every_s = -1\n',  # [fleet]
        'group = "gpu"': 'group = "nope"',  # an undefined group
        'alerts = [': 'colour = "red"\nalerts = [',  # a key the watch's camera does not take
    }
    for old, new in bad.items():
        with pytest.raises(ConfigError, match="snapshot_every_s|group|colour"):
            parse_fleet_config(path.read_text().replace(old, new, 1), base=tmp_path)
    with pytest.raises(ConfigError, match="snapshot_dir"):
        parse_fleet_config('[[camera]]\nname = "a"\nsource = "x.mkv"\nalerts = ["b"]\n[fleet]\nname = "x"\n')


# ---- resume and the event log, without Ray ------------------------------------------------------------
class _Crash(BaseException):
    """Stands for the process dying: nothing after it runs (no final snapshot, no end event)."""


def _run_loop(config, camera, log, *, crash_after: int | None = None) -> CameraLoop:
    """Run one camera's loop on a thread until its source ended (or it "died" after ``crash_after`` frames)."""
    from conftest import load

    loop = CameraLoop(config, camera, lambda events: events_to_log(log, events), run_id="run-1", load_adapter=load)
    died: list[BaseException] = []

    def run():
        from unittest import mock

        from streamvlm.fleet.camera import CameraJob

        read = CameraJob.read

        def read_or_die(job, frame):
            if crash_after is not None and job.frames_read >= crash_after:
                raise _Crash
            return read(job, frame)

        try:
            with mock.patch.object(CameraJob, "read", read_or_die):
                loop.run()
        except _Crash as exc:
            died.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive() and loop.status()["state"] not in ("ended", "failed"):
        time.sleep(0.05)
    assert bool(died) == (crash_after is not None) and loop.status()["state"] != "failed", loop.status()
    return loop


def test_a_camera_that_dies_resumes_from_its_snapshot_and_logs_each_alert_once(tmp_path, clip):
    config = parse_fleet_config(_toml(tmp_path, clip, ("steady", "victim")), base=tmp_path)
    steady, victim = config.cameras
    log = EventLog(config.event_db)
    reference = _run_loop(config, steady, log)
    assert _alerts(log, "steady") == [("alert1", 2.0)]

    _run_loop(config, victim, log, crash_after=7)  # snapshot at 0 s, the alert at 2 s logged, dies after 6 s
    assert _alerts(log, "victim") == [("alert1", 2.0)]
    resumed = _run_loop(config, victim, log)  # what Ray does: a new process, the same camera
    status = resumed.status()
    assert (status["state"], status["restarts"], status["resumed_after"], status["frames_read"]) == ("ended", 1, 0.0, 16)
    assert status["frames_this_start"] == 15  # frames 1..15: those after the snapshot, read again
    assert _alerts(log, "victim") == _alerts(log, "steady")  # raised again at 2 s, logged once
    started = log.list(session="victim", kinds=("camera.started",))
    assert [e["payload"]["resumed"] for e in started] == [False, True]

    question = "What colour was the first shape?"  # about the first frames, read before the crash
    answers = [loop.ask(question, "q-color")["payload"] for loop in (reference, resumed)]
    assert answers[0]["text"] == answers[1]["text"] and answers[1]["evidence"][0]["pts_s"] == 0.0
    assert [e["pts_s"] for e in answers[0]["evidence"]] == [e["pts_s"] for e in answers[1]["evidence"]]
    resumed.ask(question, "q-color")  # a retried request: answered again, logged once
    assert len(log.list(session="victim", kinds=("answer",))) == 1
    reference.stop(), resumed.stop()


def test_a_damaged_snapshot_falls_back_to_the_one_before_and_says_why(tmp_path, clip):
    from conftest import load

    from streamvlm.fleet import CameraJob, SnapshotStore
    from streamvlm.ingest import read_video

    config = parse_fleet_config(_toml(tmp_path, clip, ("door",)), base=tmp_path)
    (camera,) = config.cameras
    store = SnapshotStore(config.snapshot_dir / "door")
    job = CameraJob(load("shapeworld"), camera)
    frames = read_video(clip, 1.0, source_id="door")
    for _ in range(2):
        for _ in range(3):
            job.read(next(frames))
        store.save(job)
    frames.close()
    (config.snapshot_dir / "door" / "gen-00000002" / "controller.pkl").write_bytes(b"not a controller")
    restored, state, problems = store.load(load("shapeworld"), camera)
    assert restored is not None and (restored.frames_read, restored.last_pts) == (3, 2.0)
    assert len(problems) == 1 and "gen-00000002" in problems[0] and "damaged" in problems[0]
    other = parse_fleet_config(_toml(tmp_path, clip, ("door",)).replace(CONDITION, "a red square appears"), base=tmp_path)
    assert store.load(load("shapeworld"), other.cameras[0])[0] is None  # the alerts changed: the old memory does not apply
    restored.close(), job.close()


def test_a_camera_whose_source_cannot_be_read_ends_failed_naming_it(tmp_path, clip):
    import shutil

    from conftest import load

    shutil.copy(clip, tmp_path / "gone.mkv")
    config = parse_fleet_config(_toml(tmp_path, tmp_path / "gone.mkv", ("door",)), base=tmp_path)
    (tmp_path / "gone.mkv").unlink()  # it went away after the file was checked
    log = EventLog(config.event_db)
    loop = CameraLoop(config, config.cameras[0], lambda events: events_to_log(log, events), run_id="r", load_adapter=load)
    loop.run()  # returns: a failed camera does not wait for questions
    status = loop.status()
    assert status["state"] == "failed" and "gone.mkv" in status["error"]
    (failed,) = log.list(kinds=("camera.failed",))
    assert "gone.mkv" in failed["payload"]["reason"]
    with pytest.raises(Exception, match="failed"):
        loop.ask("What is there?", "q1", timeout_s=1)


# ---- a real local Ray cluster -------------------------------------------------------------------------
@pytest.fixture
def cluster():
    """Two Ray nodes on 127.0.0.1: the head (2 CPUs) and a second node (1 CPU); every Ray process stops after."""
    pytest.importorskip("ray")
    from streamvlm.deploy.local import LocalCluster

    with LocalCluster(cpus=(2, 1)) as nodes:
        yield nodes.cluster, nodes.nodes[1]


def _wait_for(fleet, camera: str, ready) -> dict:
    deadline = time.monotonic() + 120
    while True:
        status = fleet.statuses()[camera]
        if ready(status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def test_a_camera_survives_its_actor_killed_and_its_node_lost_with_memory_and_every_alert_once(cluster, tmp_path, clip):
    from streamvlm.fleet.actors import Fleet
    from streamvlm.fleet.run import fleet_status, format_status, read_status

    head_cluster, second = cluster
    config = parse_fleet_config(_toml(tmp_path, clip, ("steady", "victim")), base=tmp_path)
    fleet = Fleet(config, prefer_nodes={"victim": second.node_id}).start()
    # The victim has logged its alert (2 s) and read on; its only snapshot so far holds the first frame.
    before = _wait_for(fleet, "victim", lambda s: s.get("last_alert") and s.get("frames_read", 0) >= 5)
    assert before["node_id"] == second.node_id
    fleet.kill("victim")  # the actor's process dies mid-stream; Ray starts it again (on its node, still there)
    again = _wait_for(fleet, "victim", lambda s: s.get("restarts") == 1 and s.get("frames_this_start", 0) >= 2)
    assert again["pid"] != before["pid"] and again["resumed_after"] is not None
    head_cluster.remove_node(second)  # the node and every process on it are gone: the victim moves to the head

    statuses = fleet.wait(timeout_s=180)
    victim = statuses["victim"]
    assert {s["state"] for s in statuses.values()} == {"ended"}
    assert (victim["restarts"], victim["node_id"]) == (2, head_cluster.head_node.node_id)
    assert victim["frames_read"] == statuses["steady"]["frames_read"] == 16
    log = EventLog(config.event_db)
    try:
        assert _alerts(log, "victim") == _alerts(log, "steady") == [("alert1", 2.0)]  # none lost, none doubled
        assert [e["payload"]["resumed"] for e in log.list(session="victim", kinds=("camera.started",))] == [False, True, True]
    finally:
        log.close()
    question = "What colour was the first shape?"  # about the first frames, read before both failures
    steady, resumed = (fleet.ask(cam, question, "q1")["payload"] for cam in ("steady", "victim"))
    assert resumed["text"] == steady["text"] and resumed["evidence"][0]["pts_s"] == 0.0
    assert [e["pts_s"] for e in resumed["evidence"]] == [e["pts_s"] for e in steady["evidence"]]

    rows = {r["camera"]: r for r in fleet_status(config)}  # from the actors themselves
    assert (rows["victim"]["restarts"], rows["steady"]["restarts"]) == (2, 0)
    deadline = time.monotonic() + 30
    while True:  # what `streamvlm fleet FILE --status` prints: the recorder's copy on the shared storage
        written = {r["camera"]: r for r in read_status(config)[0]}
        if written["victim"].get("restarts") == 2 and written["victim"].get("state") == "ended" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (written["victim"]["restarts"], written["victim"]["frames_read"], written["steady"]["restarts"]) == (2, 16, 0)
    table = format_status(list(written.values()))
    assert "victim" in table and CONDITION in table
    fleet.stop()


def test_the_status_writer_says_when_a_write_fails_and_writes_the_next_report(tmp_path, monkeypatch, caplog):
    # The recorder keeps status.json (what `fleet --status` reads) in a thread of its own. A failed write
    # must not end that thread quietly and freeze the file: it is logged, kept, and the next report is written.
    import json
    import logging

    from streamvlm.fleet import actors

    path = tmp_path / "status.json"
    real = actors.write_status_file
    fail = [True]

    def flaky(target, statuses):
        if fail[0]:
            fail[0] = False
            raise RuntimeError("dictionary changed size during iteration")
        real(target, statuses)

    monkeypatch.setattr(actors, "write_status_file", flaky)
    with caplog.at_level(logging.WARNING, logger="streamvlm.fleet"):
        recorder = actors._Recorder(str(tmp_path / "events.db"), status_path=str(path))
        recorder.report({"camera": "door", "state": "reading"})
        deadline = time.monotonic() + 10
        while recorder.status_error is None:
            assert time.monotonic() < deadline, "the failed write was never reported"
            time.sleep(0.01)
        assert recorder.status_error == "RuntimeError: dictionary changed size during iteration"
        recorder.report({"camera": "yard", "state": "reading"})
        while not (path.exists() and set(json.loads(path.read_text())["cameras"]) == {"door", "yard"}):
            assert time.monotonic() < deadline, "the next report was never written"
            time.sleep(0.01)
    assert recorder.status_error is None
    assert any("dictionary changed size" in r.getMessage() for r in caplog.records)


def test_fleet_status_of_a_fleet_that_never_ran_says_so(tmp_path, clip):
    import subprocess
    import sys

    (tmp_path / "cameras.toml").write_text(_toml(tmp_path, clip, ("door",)))
    proc = subprocess.run([sys.executable, "-m", "streamvlm.cli", "fleet", str(tmp_path / "cameras.toml"), "--status"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no status of fleet 'test'" in proc.stderr


def test_streamvlm_fleet_runs_a_camera_file_to_its_end_and_status_shows_it(tmp_path, clip, monkeypatch):
    import subprocess
    import sys

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "cameras.toml").write_text(_toml(tmp_path, clip, ("door",)))
    run = subprocess.run([sys.executable, "-m", "streamvlm.cli", "fleet", str(tmp_path / "cameras.toml")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [f"[door 00:02.0] ALERT {CONDITION}"]
    log = EventLog(tmp_path / "events.db")
    assert [e["key"] for e in log.list(kinds=("alert",))] == ["door/alert1/2.000"]
    log.close()
    status = subprocess.run([sys.executable, "-m", "streamvlm.cli", "fleet", str(tmp_path / "cameras.toml"), "--status", "--json"],
                            capture_output=True, text=True, timeout=120, env=env)
    import json

    (row,) = [json.loads(line) for line in status.stdout.splitlines()]
    assert (row["camera"], row["state"], row["frames_read"], row["restarts"]) == ("door", "ended", 16, 0)


def test_a_live_camera_whose_stream_drops_is_logged_offline_and_reads_on_when_it_returns(tmp_path):
    """A fleet camera on a real RTSP server that dies mid-stream and comes back on the same port: the loop
    neither ends nor fails; the outage is in the event log (offline, then online again) and the model
    reads the returning stream."""
    from conftest import load
    from test_live_source import RtspServer, free_port

    server = RtspServer(free_port())
    server.start()
    config = parse_fleet_config(_toml(tmp_path, server.url, ("yard",)).replace("fps = 1", "fps = 2"), base=tmp_path)
    (camera,) = config.cameras
    assert camera.source == server.url
    log = EventLog(config.event_db)
    loop = CameraLoop(config, camera, lambda events: events_to_log(log, events), run_id="r", load_adapter=load)
    thread = threading.Thread(target=loop.run, daemon=True)

    def kinds() -> list[str]:
        return [e["kind"] for e in log.list(session="yard") if e["kind"].startswith("camera.")]

    def wait(what, ready) -> None:
        deadline = time.monotonic() + 90  # bounds a hung run; not a timing assertion
        while not ready():
            assert time.monotonic() < deadline and loop.status()["state"] not in ("ended", "failed"), (what, loop.status(), kinds())
            time.sleep(0.1)

    try:
        thread.start()
        wait("online and reading", lambda: "camera.online" in kinds() and loop.status()["frames_read"] >= 2)
        server.kill()
        wait("offline", lambda: "camera.offline" in kinds())
        down_at = loop.status()["frames_read"]
        server.start()  # the same port
        wait("online again", lambda: kinds().count("camera.online") >= 2)
        back_at = loop.status()["frames_read"]
        wait("reading again", lambda: loop.status()["frames_read"] >= back_at + 2)
    finally:
        loop.stop()
        thread.join(60)
        server.stop()
    assert not thread.is_alive() and loop.status()["state"] != "failed", loop.status()
    assert down_at >= 2 and loop.status()["frames_read"] >= back_at + 2
    seen = kinds()
    assert seen.index("camera.offline") < len(seen) - 1 - seen[::-1].index("camera.online")  # online after the outage
