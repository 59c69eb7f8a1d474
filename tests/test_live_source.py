"""LiveSource against a real RTSP server on 127.0.0.1, a file, and a URL with nothing listening.

The RTSP server is tests/rtsp_server.py run by the system python (GStreamer's RTSP server through
PyGObject). If it cannot start, the RTSP tests FAIL (they do not skip): CI installs the packages
with ``scripts/ci-system-deps.sh``. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamvlm.errors import ConfigError, SourceError
from streamvlm.ingest import write_test_clip
from streamvlm.ingest.live import LiveSource, SourceConfig, SourceEvent
from streamvlm.types import Frame

SYSTEM_PYTHON = os.environ.get("STREAMVLM_SYSTEM_PYTHON", "/usr/bin/python3")
SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
READY_TIMEOUT_S = 15.0
INSTALL_HINT = "install the system packages with: sudo scripts/ci-system-deps.sh"

# Short timeouts so a dropped stream is noticed quickly.
FAST = SourceConfig(open_timeout_s=2.0, read_timeout_s=1.5, backoff_initial_s=0.2, backoff_max_s=1.0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RtspServer:
    """tests/rtsp_server.py as a subprocess serving rtsp://127.0.0.1:PORT/test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"rtsp://127.0.0.1:{port}/test"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        if not os.path.exists(SYSTEM_PYTHON):
            pytest.fail(f"system python {SYSTEM_PYTHON} not found; the RTSP test server needs it ({INSTALL_HINT})")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(SERVER_SCRIPT), str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if line.strip() == "READY":
                    return
                if line == "":  # EOF: the server exited
                    break
            elif self.proc.poll() is not None:
                break
        self.stop()
        stderr = self.proc.stderr.read() if self.proc.stderr else ""
        pytest.fail(
            f"the GStreamer RTSP test server did not start on 127.0.0.1:{self.port} "
            f"(exit status {self.proc.returncode}); {INSTALL_HINT}\n--- server stderr ---\n{stderr.strip()}"
        )

    def kill(self) -> None:
        """Kills the server abruptly, like a camera losing power."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Terminates the server (SIGTERM, then SIGKILL) and reaps it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def rtsp_server():
    server = RtspServer(free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


def wait_for_event(source: LiveSource, kind: str, timeout: float, seen: list[SourceEvent]) -> SourceEvent:
    """Drains events into ``seen`` until one of ``kind`` arrives; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in source.events():
            seen.append(event)
            if event.kind == kind:
                return event
        time.sleep(0.05)
    pytest.fail(f"no {kind!r} event within {timeout} s; events so far: {seen}")


def check_frame(frame: Frame | None, shape: tuple[int, int, int]) -> Frame:
    assert frame is not None
    assert frame.image.shape == shape
    assert frame.image.dtype == np.uint8
    assert frame.image.flags["C_CONTIGUOUS"]
    return frame


# ---------------------------------------------------------------------- RTSP


def test_frames_flow_latest_wins(rtsp_server: RtspServer) -> None:
    with LiveSource(rtsp_server.url, FAST) as src:
        first = check_frame(src.wait_frame(10.0), (240, 320, 3))
        assert first.source_id == rtsp_server.url
        assert src.online

        # Timestamps increase from frame to frame.
        pts = [first.pts_s]
        for _ in range(5):
            pts.append(check_frame(src.wait_frame(5.0, after=pts[-1]), (240, 320, 3)).pts_s)
        assert all(b > a for a, b in zip(pts, pts[1:]))
        assert all(0.0 <= p <= src.now() for p in pts)

        # Nobody reads for a while: frames pile up as overwrites, not as a queue.
        before = src.stats
        time.sleep(0.8)
        after = src.stats
        assert after["read"] - before["read"] >= 4
        assert after["overwritten"] - before["overwritten"] >= 3

        # latest() gives the newest frame only, then nothing until a newer one arrives.
        newest = check_frame(src.latest(), (240, 320, 3))
        assert newest.pts_s > pts[-1]
        assert src.now() - newest.pts_s < 1.0
        again = src.latest()
        assert again is not None and again.pts_s >= newest.pts_s
        nxt = src.latest(after=again.pts_s)
        assert nxt is None or nxt.pts_s > again.pts_s

        events = src.events()
        assert [e.kind for e in events][:1] == ["online"]
        assert src.stats["reconnects"] == 0
    assert not src.running
    assert src.events()[-1].kind == "closed"


def test_camera_drop_out_and_reconnect(rtsp_server: RtspServer) -> None:
    seen: list[SourceEvent] = []
    src = LiveSource(rtsp_server.url, FAST)
    try:
        src.start()
        before = check_frame(src.wait_frame(10.0), (240, 320, 3))
        wait_for_event(src, "online", 5.0, seen)

        rtsp_server.kill()
        offline = wait_for_event(src, "offline", 8.0, seen)
        assert not src.online
        assert offline.t > before.pts_s
        last_before = src.latest()
        assert last_before is not None

        rtsp_server.start()  # same port
        online = wait_for_event(src, "online", 15.0, seen)
        assert online.t > offline.t
        after = check_frame(src.wait_frame(5.0, after=last_before.pts_s), (240, 320, 3))
        assert after.pts_s > last_before.pts_s > before.pts_s
        later = check_frame(src.wait_frame(5.0, after=after.pts_s), (240, 320, 3))
        assert later.pts_s > after.pts_s
        assert src.online
        assert src.stats["reconnects"] >= 1
        assert [e.kind for e in seen].count("offline") == 1
    finally:
        assert src.stop()


def test_nothing_listening_backs_off_and_stops_promptly() -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/test"
    cfg = SourceConfig(
        open_timeout_s=2.0, read_timeout_s=1.5, backoff_initial_s=0.1, backoff_factor=2.0, backoff_max_s=30.0
    )
    src = LiveSource(url, cfg).start()
    seen: list[SourceEvent] = []
    try:
        offline = wait_for_event(src, "offline", 5.0, seen)
        assert offline.attempt == 1
        # Further attempts are errors (one offline per outage), spaced by a growing backoff.
        wait_for_event(src, "error", 5.0, seen)
        third = wait_for_event(src, "error", 5.0, seen)
        attempts = [e for e in seen if e.kind in ("offline", "error")]
        assert [e.attempt for e in attempts] == [1, 2, 3]
        assert third.attempt == 3
        gaps = [b.t - a.t for a, b in zip(attempts, attempts[1:])]
        assert gaps[0] >= 0.1 * 0.9 and gaps[1] >= 0.2 * 0.9
        assert not src.online and src.latest() is None
        assert src.wait_frame(0.05) is None
    finally:
        began = time.monotonic()
        assert src.stop()
        assert time.monotonic() - began < 3.0

    # Stopping in the middle of a long backoff sleep is prompt too.
    slow = LiveSource(url, SourceConfig(open_timeout_s=2.0, backoff_initial_s=20.0, backoff_max_s=20.0)).start()
    try:
        wait_for_event(slow, "offline", 5.0, [])
        time.sleep(0.2)
    finally:
        began = time.monotonic()
        assert slow.stop()
        assert time.monotonic() - began < 3.0
    events = slow.events()
    assert [e.kind for e in events] == ["closed"]
    assert slow.stats["attempts"] == 1
    slow.stop()  # idempotent


def test_gives_up_after_max_attempts() -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/test"
    src = LiveSource(url, SourceConfig(open_timeout_s=2.0, backoff_initial_s=0.05, max_attempts=2)).start()
    try:
        seen: list[SourceEvent] = []
        closed = wait_for_event(src, "closed", 5.0, seen)
        assert [e.kind for e in seen] == ["offline", "error", "closed"]
        assert "gave up" in closed.message
        assert src.stats["attempts"] == 2
        assert src.wait_frame(5.0) is None  # returns at once: the source has ended
    finally:
        src.stop()


# ---------------------------------------------------------------------- file


def test_file_source_yields_frames_then_closes(tmp_path: Path) -> None:
    clip = write_test_clip(tmp_path / "clip.mp4", seconds=1.0, fps=10.0)
    frames: list[Frame] = []
    with LiveSource(clip) as src:
        while True:
            frame = src.wait_frame(3.0, after=frames[-1].pts_s if frames else None)
            if frame is None:
                break
            frames.append(check_frame(frame, (96, 128, 3)))
        events = src.events()
    assert len(frames) >= 5  # played at the clip's 10 fps, so the reader keeps up
    assert all(f.source_id == "clip.mp4" for f in frames)
    assert all(b.pts_s > a.pts_s for a, b in zip(frames, frames[1:]))
    assert [e.kind for e in events] == ["online", "closed"]
    assert "end of file" in events[-1].message
    assert src.stats["read"] == 10
    assert src.stats["reconnects"] == 0 and src.stats["attempts"] == 1
    assert src.latest() is not None  # the last frame stays available
    with pytest.raises(SourceError):
        src.start()


def test_file_source_fast_mode_keeps_only_latest(tmp_path: Path) -> None:
    clip = write_test_clip(tmp_path / "clip.mp4", seconds=1.0, fps=10.0)
    src = LiveSource(clip, realtime=False, source_id="cam-a").start()
    try:
        closed = wait_for_event(src, "closed", 10.0, [])
        assert closed.kind == "closed"
        stats = src.stats
        assert stats["read"] == 10 and stats["overwritten"] == 9
        frame = check_frame(src.latest(), (96, 128, 3))
        assert frame.source_id == "cam-a"
        assert src.latest(after=frame.pts_s) is None
    finally:
        src.stop()


def test_missing_file_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        LiveSource(tmp_path / "nope.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    src = LiveSource(junk).start()
    try:
        closed = wait_for_event(src, "closed", 10.0, seen := [])
        assert [e.kind for e in seen] == ["error", "closed"]
        assert "cannot read file" in closed.message
        assert src.latest() is None
    finally:
        src.stop()


# -------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"open_timeout_s": 0},
        {"read_timeout_s": -1.0},
        {"read_timeout_s": float("nan")},
        {"open_timeout_s": float("inf")},
        {"backoff_initial_s": 0.0},
        {"backoff_initial_s": 5.0, "backoff_max_s": 1.0},
        {"backoff_factor": 0.5},
        {"backoff_factor": True},
        {"max_attempts": 0},
        {"max_attempts": 1.5},
        {"max_attempts": True},
        {"open_timeout_s": "5"},
    ],
)
def test_bad_config_raises(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SourceConfig(**kwargs)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ConfigError):
        LiveSource("ftp://127.0.0.1/x")
    with pytest.raises(ConfigError):
        LiveSource("")
    with pytest.raises(ConfigError):
        LiveSource(-1)
    with pytest.raises(ConfigError):
        LiveSource(True)
    with pytest.raises(ConfigError):
        LiveSource("rtsp:///nohost")
    with pytest.raises(ConfigError):
        LiveSource("rtsp://127.0.0.1:1/x", config={"open_timeout_s": 1})  # type: ignore[arg-type]
    src = LiveSource("rtsp://127.0.0.1:1/x")
    with pytest.raises(ConfigError):
        src.wait_frame(-1)
    with pytest.raises(ConfigError):
        src.latest(after=float("nan"))


def test_url_kinds_and_redaction() -> None:
    assert LiveSource(0).source_id == "webcam:0"
    assert LiveSource("2").source_id == "webcam:2"
    src = LiveSource("rtsp://user:secret@127.0.0.1:8554/cam")
    assert "secret" not in src.source_id and "secret" not in repr(src)
    assert LiveSource("https://127.0.0.1/live.m3u8").source_id == "https://127.0.0.1/live.m3u8"
    # Not started: nothing to read, stop is harmless, and a stopped source cannot start.
    assert src.latest() is None and src.events() == [] and not src.online
    assert src.stop()
    with pytest.raises(SourceError):
        src.start()


def test_backoff_schedule() -> None:
    cfg = SourceConfig(backoff_initial_s=0.5, backoff_factor=2.0, backoff_max_s=3.0)
    assert [cfg.backoff_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert SourceConfig(backoff_factor=1.0).backoff_s(50) == 0.5
    assert SourceConfig().backoff_s(10_000) == 10.0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
