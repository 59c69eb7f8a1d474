"""``streamvlm watch``: monitor a camera for hours and report alerts.

A :class:`~streamvlm.ingest.live.LiveSource` (RTSP, HTTP, file or webcam; reconnecting with backoff)
feeds a :class:`~streamvlm.engine.worker.LiveWorker` whose watches are the ``--alert`` conditions.
Every alert is written to the SQLite event log before it is printed, appended to the JSONL log or
posted to the webhook (which retries, and whose backlog survives a restart). Camera online/offline
changes are logged too.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .config import MemoryConfig, SessionConfig
from .dialogue import TriggerSpec
from .engine.session import StreamSession
from .engine.worker import LiveWorker
from .ingest.live import LiveSource, SourceConfig
from .models.base import ModelAdapter
from .server.eventlog import EventLog
from .server.webhook import WebhookSender

__all__ = ["run_watch"]


async def run_watch(
    adapter: ModelAdapter,
    source: str,
    alerts: list[str],
    *,
    event_db: Path,
    webhook: str | None = None,
    jsonl: Path | None = None,
    memory: MemoryConfig | None = None,
    duration_s: float | None = None,
    session_name: str = "watch",
    trigger: TriggerSpec | None = None,
    source_config: SourceConfig | None = None,
) -> int:
    """Run until the source ends, ``duration_s`` passes, or the task is cancelled; returns alerts raised."""
    log = EventLog(event_db)
    sender = WebhookSender(webhook, log) if webhook else None
    sinks = (sender.sink,) if sender else ()
    if sender:
        sender.start()
    worker = LiveWorker(StreamSession(adapter, SessionConfig(), memory or MemoryConfig(budget_tokens=4096)))
    camera = LiveSource(int(source) if source.isdigit() else source, source_config or SourceConfig()).start()
    await worker.start()
    for i, condition in enumerate(alerts):
        worker.watch(f"alert{i + 1}", condition, spec=trigger)
    raised = 0
    jsonl_file = jsonl.open("a") if jsonl else None

    def record(kind: str, payload: dict, stream_t: float | None = None) -> None:
        log.append(session_name, kind, payload, stream_t=stream_t, sinks=sinks)  # durable first
        if jsonl_file:
            jsonl_file.write(json.dumps({"kind": kind, "session": session_name, "stream_t": stream_t, "payload": payload}) + "\n")
            jsonl_file.flush()
        if sender:
            sender.notify()

    async def feed() -> None:
        loop = asyncio.get_running_loop()
        last = None
        while camera.running or camera.latest(after=last) is not None:
            frame = await loop.run_in_executor(None, camera.wait_frame, 0.5, last)
            for event in camera.events():
                record(f"camera.{event.kind}", asdict(event), event.t)
                print(f"streamvlm: camera {event.kind} {event.message}", file=sys.stderr, flush=True)
            if frame is not None:
                last = frame.pts_s
                worker.submit_frame(frame)

    async def report() -> None:
        nonlocal raised
        async for event in worker.events():
            if event.kind == "alert":
                raised += 1
                d = event.data
                record("alert", {"watch_id": d["watch_id"], "condition": d["condition"], "t": d["evidence_t"]}, d["evidence_t"])
                minutes, seconds = divmod(d["evidence_t"], 60)
                print(f"[{int(minutes):02d}:{seconds:04.1f}] ALERT {d['condition']}", flush=True)

    reporter = asyncio.create_task(report())
    try:
        await asyncio.wait_for(feed(), duration_s) if duration_s else await feed()
    except asyncio.TimeoutError:
        pass
    finally:
        camera.stop()
        await asyncio.sleep(0.5)  # let the last probes report
        await worker.stop()
        await reporter
        worker.session.close()
        if sender:
            sender.stop()
            sender.deliver_due()
        if jsonl_file:
            jsonl_file.close()
        log.close()
    return raised
