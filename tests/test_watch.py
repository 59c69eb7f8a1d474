"""`streamvlm watch` against a real RTSP server that drops out mid-stream: it reconnects, continues,
and every alert and camera change is in the SQLite log (and posted to the webhook)."""

from __future__ import annotations

import asyncio
import json
import time

from streamvlm.dialogue import TriggerSpec
from streamvlm.ingest.live import SourceConfig
from streamvlm.server.eventlog import EventLog
from streamvlm.watch import run_watch

from test_eventlog import Receiver
from test_live_source import RtspServer, free_port

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
