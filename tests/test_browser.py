"""The web client in a real browser: Debian's headless chromium, with a fake camera, drives the page
served at ``/`` from camera permission to a streamed answer on screen; the page keeps its session
across a reload and a dropped connection, queues questions typed while offline, binds each answer to
its question by ``client_event_id`` and says "no video yet" when an answer rests on no frame.

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

# A streamed answer on screen: an "A: " line that has grown past its prefix, or one followed by the
# response.done meta line ("user · completed · evidence ...").
ANSWER_ON_SCREEN = """() => [...document.querySelectorAll('#log .turn')].some(turn => {
  const a = turn.querySelector('.a'), meta = turn.querySelector('.meta');
  return a !== null && (a.textContent.length > 3 || (meta !== null && meta.textContent.includes('user ·')));
})"""
# The state the page shows, and the session it is in.
LIVE = "() => document.getElementById('status').dataset.state === 'live'"
SESSION_ID = "() => document.getElementById('session').dataset.id || null"
# Each question's turn: its question, answer and the response.done line under it.
TURNS = """() => [...document.querySelectorAll('#log .turn')].map(t => ({
  q: t.querySelector('.q').textContent,
  a: (t.querySelector('.a') || {}).textContent || null,
  meta: (t.querySelector('.meta') || {}).textContent || null,
  note: [...t.querySelectorAll('.note')].filter(n => !n.hidden).map(n => n.textContent).join(' ') || null,
}))"""


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

    def __init__(self, server: StreamServer, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        self.server, self.loop, self.host, self.port = server, loop, host, port

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


@contextlib.contextmanager
def _served(adapter) -> Iterator[_Served]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="streamvlm-server", daemon=True)
    thread.start()
    holder: dict[str, StreamServer] = {}

    async def start() -> tuple[str, int]:
        holder["server"] = StreamServer(adapter, ServerConfig(port=0, stats_every_s=0.3))
        return await holder["server"].start()

    try:
        host, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
        assert host == "127.0.0.1"
        yield _Served(holder["server"], loop, host, port)
    finally:
        if "server" in holder:
            asyncio.run_coroutine_threadsafe(holder["server"].stop(), loop).result(30)
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
            log: [...document.querySelectorAll('#log div')].map(d => d.className + ': ' + d.textContent),
        })"""), ensure_ascii=False, indent=1)
    except Exception as exc:  # the page itself may be gone
        return f"<page state unavailable: {exc}>"


class _Browser:
    """One headless chromium with a fresh profile; records console messages, requests and the events
    the page's WebSockets received. ``step`` turns a Playwright timeout into a failure with the page's state."""

    def __init__(self, pw, PlaywrightError, tmp_path: Path, *, camera: bool = True) -> None:
        self.Error = PlaywrightError
        self.console: list[str] = []
        self.requests: list[str] = []
        self.received: list[dict] = []
        args = CHROMIUM_ARGS if camera else [a for a in CHROMIUM_ARGS if a != "--use-fake-ui-for-media-stream"]
        self.context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=args,
            permissions=["camera"] if camera else [], viewport={"width": 1100, "height": 720},
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
        return self.step(what, lambda: self.page.wait_for_function(js, arg=arg))

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
    """JS: the turn of ``question`` has its response.done line."""
    return f"""() => [...document.querySelectorAll('#log .turn')].some(t =>
        t.querySelector('.q').textContent === {json.dumps('Q: ' + question)} && t.querySelector('.meta') !== null)"""


def test_webcam_page_streams_an_answer_in_headless_chromium(request: pytest.FixtureRequest, tmp_path: Path):
    _require_browser()  # before the model is built: a missing browser fails fast
    with _served(request.getfixturevalue("smol")) as served, _browser(tmp_path) as b:
        page = b.page
        base = f"http://{served.host}:{served.port}"
        b.step("load the page", lambda: page.goto(f"{base}/?fps=4", wait_until="load"))
        b.wait("the session is live", LIVE)
        assert page.text_content("#session").startswith("session ")
        # the fake camera is granted and frames are read: input_frame.stats with ingested > 0
        b.wait("the stats line shows frames read",
               "() => { const m = /frames:.* (\\d+) read/.exec(document.getElementById('stats').textContent);"
               " return m !== null && Number(m[1]) > 0; }")
        assert page.eval_on_selector("#preview", "v => v.srcObject !== null && v.videoWidth > 0"), \
            "the preview <video> shows no camera stream"

        b.ask("What do you see?")
        b.wait("the question is echoed",
               "() => [...document.querySelectorAll('#log .q')].some(d => d.textContent === 'Q: What do you see?')")
        b.wait("a streamed answer appears", ANSWER_ON_SCREEN)
        b.wait("the answer completes with evidence",
               "() => [...document.querySelectorAll('#log .meta')].some(d => /^user · \\w+ · evidence /.test(d.textContent))")
        assert page.input_value("#question") == "", "the question box was not cleared after asking"

        page.fill("#condition", "someone waves")
        page.press("#condition", "Enter")
        b.wait("the watch is shown",
               "() => [...document.querySelectorAll('#log .meta')].some(d => d.textContent === 'watching for: someone waves')")
        b.wait_received("watch.created")

        errors = [d for d in page.eval_on_selector_all("#log div", "ds => ds.map(d => d.textContent)") if d.startswith("error:")]
        assert not errors, f"the server reported errors: {errors}"

        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        data = shot.read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n"), f"bad screenshot {shot} ({len(data)} bytes)"

        types = {e.get("type") for e in b.received}
        assert {"session.created", "input_frame.stats", "response.created", "response.done"} <= types, types
        # (Chromium's DevTools protocol does not report Blob frames sent, so count them at the server)
        stats = [e for e in b.received if e.get("type") == "input_frame.stats"][-1]
        assert stats["received"] > 0 and stats["ingested"] > 0, stats
        off_box = [u for u in b.requests if not re.match(rf"^(http|ws)://127\.0\.0\.1:{served.port}/", u)]
        assert not off_box, f"the page requested something off 127.0.0.1: {off_box}"
        pageerrors = [c for c in b.console if c.startswith("pageerror")]
        assert not pageerrors, pageerrors


def test_answers_land_on_their_own_questions(request: pytest.FixtureRequest, tmp_path: Path):
    """Two questions back to back: the second interrupts the first (the default), and each turn shows
    its own outcome, bound by client_event_id: the first cancelled, the second answered."""
    _require_browser()
    with _served(request.getfixturevalue("smol")) as served, _browser(tmp_path) as b:
        b.step("load the page", lambda: b.page.goto(f"http://{served.host}:{served.port}/?fps=4", wait_until="load"))
        b.wait("the session is live", LIVE)
        b.ask("First question?")
        b.ask("Second question?")
        b.wait("both questions end", f"() => ({_turn_done('First question?')})() && ({_turn_done('Second question?')})()")
        turns = {t["q"]: t for t in b.page.evaluate(TURNS)}
        first, second = turns["Q: First question?"], turns["Q: Second question?"]
        assert second["meta"].startswith("user · completed") or second["meta"].startswith("user · incomplete"), second
        assert first["meta"].startswith("user · "), first
        created = [e["response"] for e in b.received if e.get("type") == "response.created"]
        done = {e["response"]["id"]: e["response"] for e in b.received if e.get("type") == "response.done"}
        by_ask = {r["client_event_id"]: done[r["id"]]["status"] for r in created if r.get("client_event_id")}
        assert len(by_ask) == 2, created  # each response.create got its own response
        statuses = [first["meta"].split(" · ")[1], second["meta"].split(" · ")[1]]
        assert statuses == [by_ask[k] for k in sorted(by_ask, key=lambda k: int(k.rsplit("_", 1)[1]))]


def test_a_reload_and_a_dropped_connection_keep_the_session(request: pytest.FixtureRequest, tmp_path: Path):
    _require_browser()
    with _served(request.getfixturevalue("smol")) as served, _browser(tmp_path) as b:
        page = b.page
        b.step("load the page", lambda: page.goto(f"http://{served.host}:{served.port}/?fps=4", wait_until="load"))
        b.wait("the session is live", LIVE)
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
        turn = page.evaluate(TURNS)[-1]
        assert turn["q"] == "Q: Are you there?" and "queued" in (turn["note"] or ""), turn
        page.click("#start")
        b.wait("live after Start", LIVE)
        b.wait("the queued question is answered", _turn_done("Are you there?"))
        assert page.evaluate(SESSION_ID) == session_id
        pageerrors = [c for c in b.console if c.startswith("pageerror")]
        assert not pageerrors, pageerrors


def test_without_a_camera_answers_say_no_video_yet(request: pytest.FixtureRequest, tmp_path: Path):
    _require_browser()
    with _served(request.getfixturevalue("smol")) as served, _browser(tmp_path, camera=False) as b:
        page = b.page
        b.step("load the page", lambda: page.goto(f"http://{served.host}:{served.port}/", wait_until="load"))
        b.wait("the session is live", LIVE)
        b.wait("the camera is refused", "() => document.getElementById('camera').textContent.includes('unavailable')")
        b.ask("What do you see?")
        b.wait("the answer ends", _turn_done("What do you see?"))
        turn = page.evaluate(TURNS)[-1]
        assert turn["meta"].endswith("no video yet"), turn
