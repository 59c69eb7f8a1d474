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
from streamvlm.ingest.live import LiveSource, SourceConfig, SourceEvent, SourceRefusedError
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


# ----------------------------------------------------- permanent refusals


class HttpCamera:
    """An HTTP server on 127.0.0.1 that answers every GET with ``status`` (a camera URL gone wrong)."""

    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/video.mjpg"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


QUICK_RETRY = SourceConfig(open_timeout_s=2.0, read_timeout_s=1.5, backoff_initial_s=0.05, backoff_max_s=0.1)


@pytest.mark.parametrize(
    ("status", "headers", "reason"),
    [(404, {}, "HTTP 404 Not Found"), (401, {"WWW-Authenticate": 'Basic realm="cam"'}, "HTTP 401 Unauthorized"), (403, {}, "HTTP 403 Forbidden")],
)
def test_an_http_camera_that_refuses_for_good_is_given_up_with_the_reason(status: int, headers: dict, reason: str) -> None:
    camera = HttpCamera(status, headers)
    src = LiveSource(camera.url, QUICK_RETRY).start()
    try:
        seen: list[SourceEvent] = []
        closed = wait_for_event(src, "closed", 10.0, seen)
        assert [e.kind for e in seen] == ["offline", "error", "error", "closed"]
        assert all(reason in e.message for e in seen)  # each try says why
        failure = src.failure
        assert isinstance(failure, SourceRefusedError) and failure.status == status
        assert reason in str(failure) and camera.url in str(failure) and reason in closed.message
        assert src.stats["attempts"] == QUICK_RETRY.refused_attempts == 3
    finally:
        src.stop()
        camera.close()


def test_a_camera_answering_503_is_temporary_and_keeps_being_retried() -> None:
    camera = HttpCamera(503)
    src = LiveSource(camera.url, QUICK_RETRY).start()
    try:
        seen: list[SourceEvent] = []
        for _ in range(6):
            wait_for_event(src, "error", 10.0, seen)
        assert "HTTP 503" in seen[-1].message and "retrying" in seen[-1].message
        assert src.running and src.failure is None
    finally:
        src.stop()
        camera.close()
    assert src.failure is None  # stopping is not a failure


def test_an_rtsp_url_with_a_wrong_path_is_given_up_with_404(rtsp_server: RtspServer) -> None:
    url = rtsp_server.url.replace("/test", "/no-such-camera")
    src = LiveSource(url, QUICK_RETRY).start()
    try:
        closed = wait_for_event(src, "closed", 15.0, [])
        assert "RTSP 404" in closed.message
        assert isinstance(src.failure, SourceRefusedError) and src.failure.status == 404
    finally:
        src.stop()
    with LiveSource(rtsp_server.url, QUICK_RETRY) as good:  # the right path on the same server still plays
        check_frame(good.wait_frame(10.0), (240, 320, 3))
        assert good.failure is None


@pytest.mark.parametrize(
    ("name", "content"),
    [("clip.mp4", b""), ("clip.mp4", b"just some notes, not a video\n" * 20), ("notes.txt", b"just some notes, not a video\n" * 20)],
)
def test_a_file_that_is_not_a_video_ends_with_a_failure_naming_it(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    src = LiveSource(path).start()
    try:
        wait_for_event(src, "closed", 10.0, [])
        assert isinstance(src.failure, SourceError) and str(path) in str(src.failure)
    finally:
        src.stop()
    clip = write_test_clip(tmp_path / "real.mp4", seconds=0.3, fps=10.0)
    with LiveSource(clip, realtime=False) as good:
        wait_for_event(good, "closed", 10.0, [])
    assert good.failure is None  # the end of a real file is not a failure


def test_the_probe_answers_a_digest_challenge_with_the_urls_credentials() -> None:
    import hashlib
    import http.server
    import threading

    from streamvlm.ingest.probe import probe

    realm, nonce = "cam", "abc123"

    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    class Digest(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            auth = self.headers.get("Authorization", "")
            fields = dict(part.strip().split("=", 1) for part in auth[len("Digest "):].split(",") if "=" in part)
            fields = {k: v.strip('"') for k, v in fields.items()}
            ha1, ha2 = md5(f"admin:{realm}:s3cret"), md5(f"GET:{fields.get('uri')}")
            want = md5(f"{ha1}:{nonce}:{fields.get('nc')}:{fields.get('cnonce')}:auth:{ha2}")
            ok = auth.startswith("Digest ") and fields.get("response") == want
            self.send_response(200 if ok else 401)
            if not ok:
                self.send_header("WWW-Authenticate", f'Digest realm="{realm}", nonce="{nonce}", qop="auth"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Digest)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        assert probe(f"http://admin:s3cret@127.0.0.1:{port}/cam", 2.0).status == 200
        assert probe(f"http://admin:wrong@127.0.0.1:{port}/cam", 2.0).status == 401
        assert probe(f"http://127.0.0.1:{free_port()}/cam", 2.0).status is None  # nothing listening: no answer
    finally:
        server.shutdown()
        server.server_close()


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
        {"refused_attempts": 0},
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
