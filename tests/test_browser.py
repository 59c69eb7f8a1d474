"""The web client in a real browser: Debian's headless chromium, with a fake camera, drives the page
served at ``/`` from camera permission to a streamed answer on screen, over WebRTC when the server
takes the offer and as JPEG frames over the socket when it does not; answers show their evidence
frames, alerts their condition and the frame that fired; the page fits 360 and 1280 px wide screens
(screenshots: set STREAMVLM_PAGE_SHOTS=docs/images); it keeps its session across a reload and a
dropped connection, starts a new one (and says so) after a server restart, queues questions typed
while offline, binds each answer to its question by ``client_event_id`` and says "no video yet" when
an answer rests on no frame.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``scripts/ci-system-deps.sh``) driven by the
Playwright package from the ``test`` extra; Playwright's own browser download is never used. The
browser's resolver maps every name to NOTFOUND except 127.0.0.1, so all traffic stays on loopback.
Missing chromium or playwright is a failure, not a skip: CI installs both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamvlm.config import ServerConfig
from streamvlm.server.app import StreamServer

CHROMIUM = "/usr/bin/chromium"

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    # Without these two, chromium sends DNS queries off the machine.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]

STEP_TIMEOUT_MS = 20_000
#: Set to a folder to keep the page's screenshots there (docs/images is where docs/page.md shows them).
SHOTS_ENV = "STREAMVLM_PAGE_SHOTS"

# The state the page shows, and the session it is in.
LIVE = "() => document.getElementById('status').dataset.state === 'live'"
SESSION_ID = "() => document.getElementById('session').dataset.id || null"
# Each question's turn: its question, answer, the evidence frames shown and the line under it.
TURNS = """() => [...document.querySelectorAll('#log .turn')].map(t => ({
  q: t.querySelector('.q .text').textContent,
  qline: t.querySelector('.q').textContent,
  a: (t.querySelector('.a') || {}).textContent || null,
  text: (t.querySelector('.a .text') || {}).textContent || null,
  status: t.dataset.status || null,
  meta: (t.querySelector('.meta') || {}).textContent || null,
  note: [...t.querySelectorAll('.note')].filter(n => !n.hidden).map(n => n.textContent).join(' ') || null,
  frames: [...t.querySelectorAll('.evidence figure')].map(f => ({
    t: Number(f.dataset.t), caption: f.querySelector('figcaption').textContent,
    img: (f.querySelector('img') || {}).src || null })),
}))"""
# What a person sees fit on the screen: no sideways scrolling, and the Ask button inside the window.
LAYOUT = """() => { const r = document.querySelector('#ask button').getBoundingClientRect();
  return { scrollWidth: document.documentElement.scrollWidth, innerWidth: innerWidth, innerHeight: innerHeight,
           ask: { left: r.left, right: r.right, top: r.top, bottom: r.bottom } }; }"""
FRAMES_READ = """(after) => { const m = /frames: (\\d+) read/.exec(document.getElementById('stats').textContent);
  return m !== null && Number(m[1]) > (after || 0) ? Number(m[1]) : false; }"""


def _require_browser():
    """Playwright's sync API and Debian's chromium, or a test failure that says how to get them."""
    problems = []
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"{CHROMIUM} is missing: run `sudo scripts/ci-system-deps.sh` (installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright as api
    except ImportError as exc:
        problems.append(f"the playwright package is missing ({exc}): pip install -e '.[test]' "
                        "(never `playwright install`: the test uses Debian's chromium)")
    if problems:
        pytest.fail("browser test prerequisites missing:\n  " + "\n  ".join(problems), pytrace=False)
    return api


class _Served:
    """The server on 127.0.0.1, running in its own asyncio loop on a background thread."""

    def __init__(self, adapter, loop: asyncio.AbstractEventLoop) -> None:
        self.adapter, self.loop = adapter, loop
        self.server: StreamServer | None = None
        self.host, self.port = "127.0.0.1", 0

    def start(self) -> None:
        async def start() -> tuple[str, int]:
            self.server = StreamServer(self.adapter, ServerConfig(port=self.port, stats_every_s=0.3))
            return await self.server.start()

        self.host, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        assert self.host == "127.0.0.1"

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
            self.server = None

    def drop_connections(self) -> int:
        """Close every open WebSocket from the server's side (code 1012, "service restart"); returns how many."""
        from websockets.asyncio.server import Server

        listener = next(v for v in vars(self.server).values() if isinstance(v, Server))

        async def close() -> int:
            connections = list(listener.connections)
            for connection in connections:
                await connection.close(1012, "the server restarts this connection")
            return len(connections)

        return asyncio.run_coroutine_threadsafe(close(), self.loop).result(30)

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextlib.contextmanager
def _served(adapter) -> Iterator[_Served]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="streamvlm-server", daemon=True)
    thread.start()
    served = _Served(adapter, loop)
    try:
        served.start()
        yield served
    finally:
        served.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _page_state(page) -> str:
    try:
        return json.dumps(page.evaluate("""() => ({
            status: document.getElementById('status').textContent,
            session: document.getElementById('session').textContent,
            camera: document.getElementById('camera').textContent,
            stats: document.getElementById('stats').textContent,
            memory: document.getElementById('memory').textContent,
            log: [...document.querySelectorAll('#log > div')].map(d => d.className + ': ' + d.textContent),
        })"""), ensure_ascii=False, indent=1)
    except Exception as exc:  # the page itself may be gone
        return f"<page state unavailable: {exc}>"


class _Browser:
    """One headless chromium with a fresh profile; records console messages, requests and the events
    the page's WebSockets received. ``step`` turns a Playwright timeout into a failure with the page's state.
    ``video``: a .y4m file the fake camera plays (looping) instead of its own test pattern."""

    def __init__(self, pw, PlaywrightError, tmp_path: Path, *, camera: bool = True, video: Path | None = None) -> None:
        self.Error = PlaywrightError
        self.console: list[str] = []
        self.requests: list[str] = []
        self.received: list[dict] = []
        args = CHROMIUM_ARGS if camera else [a for a in CHROMIUM_ARGS if a != "--use-fake-ui-for-media-stream"]
        if video is not None:
            args = [*args, f"--use-file-for-fake-video-capture={video}"]
        self.context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=args,
            permissions=["camera"] if camera else [], viewport={"width": 1280, "height": 800},
        )
        self.context.set_default_timeout(STEP_TIMEOUT_MS)
        page = self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("websocket", self._on_websocket)

    def _on_websocket(self, ws) -> None:
        def on_received(payload) -> None:
            if isinstance(payload, str):
                self.received.append(json.loads(payload))

        ws.on("framereceived", on_received)

    def step(self, what: str, fn):
        try:
            return fn()
        except self.Error as exc:
            reason = exc.message.splitlines()[0]
        types = sorted({e.get("type", "?") for e in self.received})
        pytest.fail(f"{what}: {reason}\npage: {_page_state(self.page)}\n"
                    f"event types received: {types}\nconsole: {self.console[-20:]}", pytrace=False)

    def wait(self, what: str, js: str, arg=None):
        return self.step(what, lambda: self.page.wait_for_function(js, arg=arg)).json_value()

    def load(self, url: str) -> None:
        self.step("load the page", lambda: self.page.goto(url, wait_until="load"))
        self.wait("the session is live", LIVE)

    def wait_received(self, kind: str) -> None:
        """Poll the events the page's WebSocket received; waiting on the page lets Playwright deliver them."""
        def poll() -> None:
            for _ in range(STEP_TIMEOUT_MS // 100):
                if any(e.get("type") == kind for e in self.received):
                    return
                self.page.wait_for_timeout(100)
            raise self.Error(f"no {kind} event within {STEP_TIMEOUT_MS} ms")

        self.step(f"the server sends {kind}", poll)

    def ask(self, question: str) -> None:
        self.page.fill("#question", question)
        self.page.press("#question", "Enter")

    def turn(self, question: str) -> dict:
        """The latest turn on screen for ``question``."""
        return [t for t in self.page.evaluate(TURNS) if t["q"] == question][-1]

    def done(self) -> dict[str, dict]:
        """Every response.done the page received, by response id."""
        return {e["response"]["id"]: e["response"] for e in self.received if e.get("type") == "response.done"}

    def no_page_errors(self) -> None:
        pageerrors = [c for c in self.console if c.startswith("pageerror")]
        assert not pageerrors, pageerrors

    def close(self) -> None:
        self.context.close()


@contextlib.contextmanager
def _browser(tmp_path: Path, **options) -> Iterator[_Browser]:
    sync_playwright = _require_browser()
    from playwright.sync_api import Error as PlaywrightError

    with sync_playwright() as pw:
        browser = _Browser(pw, PlaywrightError, tmp_path, **options)
        try:
            yield browser
        finally:
            browser.close()


def _turn_done(question: str) -> str:
    """JS: the latest turn of ``question`` has its response.done line."""
    return f"""() => {{ const ts = [...document.querySelectorAll('#log .turn')].filter(t =>
        t.querySelector('.q .text').textContent === {json.dumps(question)});
        return ts.length > 0 && ts[ts.length - 1].dataset.status !== undefined; }}"""


def _clock(t: float) -> str:
    """The page's mm:ss.s."""
    return f"{int(t // 60):02d}:{t % 60:04.1f}"


def _assert_evidence_shown(turn: dict, response: dict) -> None:
    """The turn shows thumbnails of frames its answer rests on, captioned with their stream times."""
    times = [e["pts_s"] for e in response["evidence"]]
    assert times and turn["frames"], (turn, response)
    assert len(turn["frames"]) <= 6
    for frame in turn["frames"]:
        assert frame["t"] in times, (frame, times)
        assert frame["caption"] == _clock(frame["t"])
        assert frame["img"] and frame["img"].startswith("data:image/jpeg"), frame
    weights = [e.get("weight") for e in response["evidence"]]
    if len(times) > 6 and None not in weights:  # the frames that weigh most: those the answer rests on
        heaviest = sorted(weights, reverse=True)[:6]
        assert sorted((weights[times.index(f["t"])] for f in turn["frames"]), reverse=True) == heaviest
    else:
        assert turn["frames"][-1]["t"] == times[-1], "the latest evidence frame is shown"


def _write_y4m(path: Path, frames: list, fps: int) -> None:
    """A .y4m (YUV 4:2:0) clip of RGB frames, for Chromium's fake camera."""
    import cv2

    h, w = frames[0].shape[:2]
    with path.open("wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            f.write(b"FRAME\n" + cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes())


def test_webcam_page_streams_an_answer_over_webrtc(request: pytest.FixtureRequest, tmp_path: Path):
    """Camera to answer: the page sends its camera track over WebRTC (JPEG until it flows), keeps the
    camera's aspect, shows the stream clock, the memory gauge and an answer with its evidence frames."""
    _require_browser()  # before the model is built: a missing browser fails fast
    with _served(request.getfixturevalue("smol")) as served, _browser(tmp_path) as b:
        page = b.page
        b.load(f"{served.base}/?fps=4")
        assert page.text_content("#session").startswith("session ")
        assert page.evaluate("() => fetch('/favicon.ico').then(r => r.status)") == 200
        b.wait("the video goes over WebRTC", "() => document.getElementById('camera').dataset.via === 'webrtc'")
        read = b.wait("frames are read", FRAMES_READ)
        b.wait("more frames are read, over WebRTC", FRAMES_READ, read + 2)
        # a 16:9 camera stays 16:9: the longer side scaled to 640, never drawn into 640x480
        video = page.eval_on_selector("#preview", "v => ({w: v.videoWidth, h: v.videoHeight, frame: v.dataset.frame})")
        w, h = map(int, video["frame"].split("x"))
        assert max(w, h) == min(640, max(video["w"], video["h"])) and abs(w / h - video["w"] / video["h"]) < 0.01, video
        assert video["w"] / video["h"] > 1.5, f"the fake camera did not give a 16:9 picture: {video}"
        clock = page.text_content("#clock")
        assert re.fullmatch(r"\d\d:\d\d\.\d", clock) and clock != "00:00.0", clock
        assert page.text_content("#memory").startswith("working memory:")

        b.ask("What do you see?")
        b.wait("the answer completes", _turn_done("What do you see?"))
        turn = b.turn("What do you see?")
        assert turn["qline"].startswith("You asked:"), turn
        assert turn["a"].startswith("Answer: ") and "  " not in turn["a"] and turn["text"] == turn["text"].strip(), turn
        assert turn["meta"].startswith(("Answered", "Cut short")), turn
        response = next(r for r in b.done().values() if r["trigger"] == "user")
        assert {e["source_id"] for e in response["evidence"]} >= {"webrtc"}, response["evidence"]
        # WebRTC frames are stamped by the server; the page's copies are the ones captured nearest in time
        assert turn["frames"] and all(f["img"] for f in turn["frames"]), turn
        assert page.input_value("#question") == "", "the question box was not cleared after asking"

        page.fill("#condition", "someone waves")
        page.press("#condition", "Enter")
        b.wait("the watch is shown",
               "() => [...document.querySelectorAll('#log .meta')].some(d => d.textContent === 'Watching for: someone waves')")
        b.wait_received("watch.created")
        errors = page.eval_on_selector_all("#log .note", "ds => ds.map(d => d.textContent)")
        assert not [e for e in errors if e.startswith("Server error")], errors

        # the memory gauge reads memory.update: working tokens against the budget, the store's size (read in the
        # same turn of the page's event loop: the server's own input_frame.stats also set the working tokens)
        text, width = page.evaluate("""() => { onEvent({type: 'memory.update', kind: 'evicted', chunks: 3, tokens_before: 4096,
            tokens_after: 3072, up_to_s: 1.5, store_ram_bytes: 1048576, store_disk_bytes: 0});
            return [document.getElementById('memory').textContent,
                    parseFloat(document.querySelector('#gauge > span').style.width)]; }""")
        assert text == "working memory: 3072 of 4096 tokens · long-term store 1.0 MiB"
        assert width == 75

        off_box = [u for u in b.requests if not re.match(rf"^(http|ws)://127\.0\.0\.1:{served.port}/", u)]
        assert not off_box, f"the page requested something off 127.0.0.1: {off_box}"
        b.no_page_errors()


def test_a_refused_webrtc_offer_falls_back_to_jpeg(request: pytest.FixtureRequest, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    """A server that cannot take WebRTC refuses the offer: the page says so and sends JPEG frames."""
    from streamvlm.protocol import messages
    from streamvlm.protocol.session import RealtimeSession

    def refuse(self, event, now):
        return [messages.error_event("server_error", "this server has no WebRTC", "sdp", event.event_id)]

    monkeypatch.setattr(RealtimeSession, "_on_WebRTCOffer", refuse)
    _require_browser()
    with _served(request.getfixturevalue("smol")) as served, _browser(tmp_path) as b:
        b.load(f"{served.base}/?fps=4")
        b.wait("the page says WebRTC is not available",
               "() => [...document.querySelectorAll('#log .meta')].some(d => d.textContent.startsWith('WebRTC is not available'))")
        read = b.wait("frames are read", FRAMES_READ)
        b.wait("frames keep coming as JPEG", FRAMES_READ, read + 1)
        assert b.page.eval_on_selector("#camera", "c => c.dataset.via") == "socket"
        b.ask("What do you see?")
        b.wait("the answer ends", _turn_done("What do you see?"))
        response = next(r for r in b.done().values() if r["trigger"] == "user")
        assert {e["source_id"] for e in response["evidence"]} == {"webcam"}
        # JPEG frames carry the page's own times: every thumbnail is the very frame the server read
        _assert_evidence_shown(b.turn("What do you see?"), response)
        b.no_page_errors()


def test_answers_land_on_their_own_questions(request: pytest.FixtureRequest, tmp_path: Path):
    """Two questions back to back: the second interrupts the first (the default), and each turn shows
    its own outcome, bound by client_event_id: the first cancelled, the second answered."""
    _require_browser()
    with _served(request.getfixturevalue("smol")) as served, _browser(tmp_path) as b:
        b.load(f"{served.base}/?fps=4&video=socket")
        b.ask("First question?")
        b.ask("Second question?")
        b.wait("both questions end", f"() => ({_turn_done('First question?')})() && ({_turn_done('Second question?')})()")
        first, second = b.turn("First question?"), b.turn("Second question?")
        assert second["status"] in ("completed", "incomplete"), second
        created = [e["response"] for e in b.received if e.get("type") == "response.created"]
        done = b.done()
        by_ask = {r["client_event_id"]: done[r["id"]]["status"] for r in created if r.get("client_event_id")}
        assert len(by_ask) == 2, created  # each response.create got its own response
        assert [first["status"], second["status"]] == [by_ask[k] for k in sorted(by_ask, key=lambda k: int(k.rsplit("_", 1)[1]))]
        if first["status"] == "cancelled":
            assert first["meta"].startswith("Stopped before it finished"), first


def test_a_reload_and_a_dropped_connection_keep_the_session(request: pytest.FixtureRequest, tmp_path: Path):
    _require_browser()
    with _served(request.getfixturevalue("smol")) as served, _browser(tmp_path) as b:
        page = b.page
        b.load(f"{served.base}/?fps=4&video=socket")
        session_id = page.evaluate(SESSION_ID)
        assert session_id and page.evaluate("() => sessionStorage.getItem('streamvlm.handle')")

        b.step("reload the page", lambda: page.reload(wait_until="load"))
        b.wait("the session is live again", LIVE)
        assert page.evaluate(SESSION_ID) == session_id, "a reload started a new session"

        assert served.drop_connections() == 1
        b.wait("the page shows the drop", "() => document.getElementById('status').dataset.state !== 'live'")
        b.wait("the page resumes", LIVE)
        assert page.evaluate(SESSION_ID) == session_id, "the page did not resume its session after the drop"
        notes = [d for d in page.eval_on_selector_all("#log .meta", "ds => ds.map(d => d.textContent)") if "new session" in d]
        assert not notes, notes

        # offline: a question typed now is queued, and sent (and answered) once the session is back
        page.click("#start")
        b.wait("the page is offline", "() => document.getElementById('status').dataset.state === 'offline'")
        assert page.text_content("#start") == "Start"
        b.ask("Are you there?")
        turn = b.turn("Are you there?")
        assert "Queued" in (turn["note"] or ""), turn
        page.click("#start")
        b.wait("live after Start", LIVE)
        b.wait("the queued question is answered", _turn_done("Are you there?"))
        assert page.evaluate(SESSION_ID) == session_id
        b.no_page_errors()


def test_after_a_server_restart_the_page_starts_a_new_session_and_says_so(request: pytest.FixtureRequest, tmp_path: Path):
    """The server stops and a new one starts on the same port: the page reconnects; the handle it kept
    names a session the new server never had, so it is refused, and the page starts a new session,
    says so, and answers again."""
    _require_browser()
    with _served(request.getfixturevalue("smol")) as served, _browser(tmp_path) as b:
        page = b.page
        b.load(f"{served.base}/?fps=4&video=socket")
        old_id = page.evaluate(SESSION_ID)
        b.wait("frames are read", FRAMES_READ)
        b.ask("Before the restart?")
        b.wait("the first answer ends", _turn_done("Before the restart?"))
        handle = page.evaluate("() => sessionStorage.getItem('streamvlm.handle')")

        served.stop()
        b.wait("the page shows the drop", "() => document.getElementById('status').dataset.state === 'reconnecting'")
        # a page that missed the goodbye (a crash, a lost network) still holds its handle
        page.evaluate("h => sessionStorage.setItem('streamvlm.handle', h)", handle)
        served.start()
        b.wait("the page is live again", LIVE)
        new_id = page.evaluate(SESSION_ID)
        assert new_id and new_id != old_id
        refused = [e for e in b.received if e.get("type") == "error" and e["error"]["code"] == "invalid_resume_handle"]
        assert refused, "the page never tried its old handle"
        notices = page.eval_on_selector_all("#log .notice", "ds => ds.map(d => d.textContent)")
        assert any("new session" in n for n in notices), notices
        assert page.evaluate("() => sessionStorage.getItem('streamvlm.handle')") not in (None, handle)

        b.ask("After the restart?")
        b.wait("the new session answers", _turn_done("After the restart?"))
        assert b.turn("After the restart?")["status"] in ("completed", "incomplete")
        b.no_page_errors()


def test_without_a_camera_answers_say_no_video_yet(request: pytest.FixtureRequest, tmp_path: Path):
    _require_browser()
    with _served(request.getfixturevalue("smol")) as served, _browser(tmp_path, camera=False) as b:
        page = b.page
        b.load(f"{served.base}/")
        b.wait("the camera is refused", "() => document.getElementById('camera').textContent.includes('unavailable')")
        b.ask("What do you see?")
        b.wait("the answer ends", _turn_done("What do you see?"))
        turn = b.turn("What do you see?")
        assert "no video yet" in turn["meta"] and not turn["frames"], turn
        assert page.text_content("#clock") == "--:--.-"


def test_shapeworld_alert_evidence_and_layout_at_360_and_1280_px(tmp_path: Path):
    """The trained ShapeWorld model watching a ShapeWorld clip played by the fake camera: the alert
    names its condition and shows the frame that fired, on the conversation and on the timeline; an
    answer shows its evidence frames; the page fits 1280 px and 360 px wide screens."""
    from conftest import load
    from streamvlm.shapeworld import make_episode
    from streamvlm.shapeworld.questions import watch_target

    _require_browser()
    episode = make_episode(3, duration_s=14.0, fps=4.0, size=256, max_shapes=2)
    colour, shape = watch_target(episode)
    condition = f"a {colour} {shape} appears"
    clip = tmp_path / "shapeworld.y4m"
    _write_y4m(clip, [frame for _, frame in episode.frames()], fps=4)
    with _served(load("shapeworld")) as served, _browser(tmp_path, video=clip) as b:
        page = b.page
        b.load(f"{served.base}/?fps=4&video=socket")
        page.fill("#condition", condition)
        page.press("#condition", "Enter")
        b.wait_received("watch.created")
        b.wait("frames are read", FRAMES_READ)
        later = f"Tell me when a {colour} {shape} appears."
        b.ask(later)
        b.wait("the page says it waits", "(q) => [...document.querySelectorAll('#log .turn')].some(t => "
               "t.querySelector('.q .text').textContent === q && /Waiting: I will answer when/.test(t.textContent))", later)
        b.ask("How many shapes are visible?")
        b.wait("the answer ends", _turn_done("How many shapes are visible?"))
        turn = b.turn("How many shapes are visible?")
        response = next(r for r in b.done().values() if r["trigger"] == "user")
        _assert_evidence_shown(turn, response)
        assert "  " not in turn["a"] and turn["text"] == response["output_text"].strip(), (turn, response)
        # the memory gauge: the session's budget (working tokens come with memory.update), frames read
        budget = next(e for e in b.received if e["type"] == "session.created")["session"]["memory"]["budget_tokens"]
        assert f"budget of {budget} tokens" in page.text_content("#memory") or f" of {budget} tokens" in page.text_content("#memory")

        b.wait("an alert is shown", "() => document.querySelector('#log .alert img') !== null")
        alert = page.eval_on_selector("#log .alert", """a => ({t: Number(a.dataset.t), condition: a.dataset.condition,
            head: a.querySelector('.head').textContent, caption: a.querySelector('figcaption').textContent})""")
        fired = next(r["alert"] for r in b.done().values() if r["trigger"] == "watch")
        assert alert["condition"] == condition and alert["t"] == fired["t"], (alert, fired)
        seconds = int(fired["t"])
        assert alert["head"] == f"Alert: {condition} at {seconds // 60:02d}:{seconds % 60:02d}", alert
        assert alert["caption"] == _clock(fired["t"])
        # the "tell me when" answer comes later, in its own entry under its question; the question says so
        b.wait("the deferred answer ends", _turn_done(later))
        asked, answered = [t for t in page.evaluate(TURNS) if t["q"] == later]
        assert re.fullmatch(r"Answered at \d\d:\d\d, below\.", asked["note"] or "") and answered["status"] == "completed", (asked, answered)
        assert answered["qline"].startswith(f"You asked: {later} at "), answered
        deferred = next(r for r in b.done().values() if r["trigger"] == "deferred")
        _assert_evidence_shown(answered, deferred)
        timeline = page.eval_on_selector_all("#alerts li", "ls => ls.map(l => l.textContent)")
        assert timeline and condition in timeline[-1], timeline
        assert page.eval_on_selector_all("#timeline .mark", "ms => ms.length") >= 1

        shots = Path(os.environ.get(SHOTS_ENV) or tmp_path)
        shots.mkdir(parents=True, exist_ok=True)
        for width, height in ((1280, 800), (360, 740)):
            page.set_viewport_size({"width": width, "height": height})
            page.wait_for_timeout(300)  # a frame or two at the new size
            layout = page.evaluate(LAYOUT)
            assert layout["scrollWidth"] <= layout["innerWidth"], f"{width} px: the page scrolls sideways: {layout}"
            ask = layout["ask"]
            assert 0 <= ask["left"] and ask["right"] <= width and 0 <= ask["top"] and ask["bottom"] <= height, \
                f"{width} px: the Ask button is off-screen: {layout}"
            page.screenshot(path=str(shots / f"page-{width}.png"))
        assert (shots / "page-360.png").read_bytes().startswith(b"\x89PNG")
        b.no_page_errors()
