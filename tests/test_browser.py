"""The web client in a real browser: Debian's headless chromium, with a fake camera, drives the page
served at ``/`` from camera permission to a streamed answer on screen.

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
ANSWER_ON_SCREEN = """() => {
  const rows = [...document.querySelectorAll('#log > div')];
  return rows.some((row, i) => row.textContent.startsWith('A: ') && (row.textContent.length > 3
    || rows.slice(i + 1).some(r => r.classList.contains('meta') && r.textContent.includes('user ·'))));
}"""


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


@contextlib.contextmanager
def _served(adapter) -> Iterator[tuple[str, int]]:
    """The server on 127.0.0.1, running in its own asyncio loop on a background thread."""
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
        yield host, port
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
            stats: document.getElementById('stats').textContent,
            log: [...document.querySelectorAll('#log > div')].map(d => d.className + ': ' + d.textContent),
        })"""), ensure_ascii=False, indent=1)
    except Exception as exc:  # the page itself may be gone
        return f"<page state unavailable: {exc}>"


def test_webcam_page_streams_an_answer_in_headless_chromium(request: pytest.FixtureRequest, tmp_path: Path):
    sync_playwright = _require_browser()  # before the model is built: a missing browser fails fast
    from playwright.sync_api import Error as PlaywrightError

    with _served(request.getfixturevalue("smol")) as (host, port):
        _drive_page(sync_playwright, PlaywrightError, host, port, tmp_path)


def _drive_page(sync_playwright, PlaywrightError, host: str, port: int, tmp_path: Path) -> None:
    base = f"http://{host}:{port}"
    console: list[str] = []
    requests: list[str] = []
    received: list[dict] = []

    def on_websocket(ws) -> None:
        def on_received(payload) -> None:
            if isinstance(payload, str):
                received.append(json.loads(payload))

        ws.on("framereceived", on_received)

    def wait_received(kind: str) -> None:
        """Poll the events the page's WebSocket received; waiting on the page lets Playwright deliver them."""
        for _ in range(STEP_TIMEOUT_MS // 100):
            if any(e.get("type") == kind for e in received):
                return
            page.wait_for_timeout(100)
        raise PlaywrightError(f"no {kind} event within {STEP_TIMEOUT_MS} ms")

    def step(what: str, fn) -> None:
        try:
            fn()
            return
        except PlaywrightError as exc:
            reason = exc.message.splitlines()[0]
        types = sorted({e.get("type", "?") for e in received})
        pytest.fail(f"{what}: {reason}\npage: {_page_state(page)}\n"
                    f"event types received: {types}\nconsole: {console[-20:]}", pytrace=False)

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            permissions=["camera"], viewport={"width": 1100, "height": 720},
        )
        try:
            context.set_default_timeout(STEP_TIMEOUT_MS)
            page = context.pages[0] if context.pages else context.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.on("websocket", on_websocket)

            step("load the page", lambda: page.goto(f"{base}/?fps=4", wait_until="load"))
            step("a session is created",
                 lambda: page.wait_for_function("() => document.getElementById('status').textContent.startsWith('session')"))
            # the fake camera is granted and frames are read: input_frame.stats with ingested > 0
            step("the stats line shows frames read", lambda: page.wait_for_function(
                "() => { const m = /frames:.* (\\d+) read/.exec(document.getElementById('stats').textContent);"
                " return m !== null && Number(m[1]) > 0; }"))
            assert page.eval_on_selector("#preview", "v => v.srcObject !== null && v.videoWidth > 0"), \
                "the preview <video> shows no camera stream"

            page.fill("#question", "What do you see?")
            page.press("#question", "Enter")
            step("the question is echoed", lambda: page.wait_for_function(
                "() => [...document.querySelectorAll('#log > .q')].some(d => d.textContent === 'Q: What do you see?')"))
            step("a streamed answer appears", lambda: page.wait_for_function(ANSWER_ON_SCREEN))
            step("the answer completes with evidence", lambda: page.wait_for_function(
                "() => [...document.querySelectorAll('#log > .meta')].some(d => /^user · \\w+ · evidence /.test(d.textContent))"))
            assert page.input_value("#question") == "", "the question box was not cleared after asking"

            page.fill("#condition", "someone waves")
            page.press("#condition", "Enter")
            step("the watch is shown", lambda: page.wait_for_function(
                "() => [...document.querySelectorAll('#log > .meta')].some(d => d.textContent === 'watching for: someone waves')"))
            step("the server confirms the watch with watch.created", lambda: wait_received("watch.created"))

            errors = [d for d in page.eval_on_selector_all("#log > div", "ds => ds.map(d => d.textContent)")
                      if d.startswith("error:")]
            assert not errors, f"the server reported errors: {errors}"

            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            data = shot.read_bytes()
            assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n"), f"bad screenshot {shot} ({len(data)} bytes)"

            types = {e.get("type") for e in received}
            assert {"session.created", "input_frame.stats", "response.created", "response.done"} <= types, types
            # (Chromium's DevTools protocol does not report Blob frames sent, so count them at the server)
            stats = [e for e in received if e.get("type") == "input_frame.stats"][-1]
            assert stats["received"] > 0 and stats["ingested"] > 0, stats
            off_box = [u for u in requests if not re.match(rf"^(http|ws)://127\.0\.0\.1:{port}/", u)]
            assert not off_box, f"the page requested something off 127.0.0.1: {off_box}"
            pageerrors = [c for c in console if c.startswith("pageerror")]
            assert not pageerrors, pageerrors
        finally:
            context.close()
