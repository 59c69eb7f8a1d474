"""``streamvlm watch``: monitor a camera for hours and report alerts.

A :class:`~streamvlm.ingest.live.LiveSource` (RTSP, HTTP, file or webcam; reconnecting with backoff)
feeds a :class:`~streamvlm.engine.worker.LiveWorker` whose watches are the ``--alert`` conditions.
Every alert is written to the SQLite event log before it is printed, appended to the JSONL log or
posted to the webhook (which retries, and whose backlog survives a restart). Camera online/offline
changes are logged too, all under a session id that is new for every run (``watch_...``), so
``streamvlm events --session ID`` shows one run.

A source that cannot be read is an error, never a quiet "0 alerts": a file that is not a video, a
server that keeps refusing (HTTP/RTSP 401, 403, 404) or a source that gave up raises its
:class:`~streamvlm.errors.SourceError` from :func:`run_watch` once everything is closed.
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
from .ingest.file import probe_video
from .ingest.live import LiveSource, SourceConfig
from .models.base import ModelAdapter
from .protocol.ids import new_id
from .server.eventlog import EventLog
from .server.webhook import WebhookSender

__all__ = ["run_watch", "check_source"]


def check_source(source: str) -> None:
    """Fail fast, before a model is loaded, on a source that cannot work.

    Raises ConfigError for an unusable URL or webcam index and SourceError for a file that is missing or
    is not a video OpenCV can decode. Network sources and webcams are only checked for form here: they
    are opened (and retried) by the watch itself.
    """
    camera = LiveSource(int(source) if source.isdigit() else source)  # validates; opens nothing
    if not source.isdigit() and "://" not in source:
        probe_video(source)
    camera.stop()


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
    session_name: str | None = None,
    trigger: TriggerSpec | None = None,
    source_config: SourceConfig | None = None,
    fps: float | None = None,
) -> int:
    """Run until the source ends, ``duration_s`` passes, or the task is cancelled; returns alerts raised.

    ``fps`` caps the frames read per second of stream time (None: every new frame the source delivers);
    the trigger rules count stream seconds, so the same scene raises the same alerts at any ``fps``.
    ``trigger`` (e.g. ``TriggerSpec(cooldown_s=30)``) is the rule of every alert (default: the controller's).

    Events are logged under ``session_name`` (default: a fresh ``watch_...`` id, printed on stderr).
    Raises the source's SourceError (e.g. SourceRefusedError for a URL the server keeps refusing) when
    the source ended because it could not be read; alerts raised before that stay logged.
    """
    camera = LiveSource(int(source) if source.isdigit() else source, source_config or SourceConfig())  # checks the URL
    session_name = session_name or new_id("watch")
    print(f"streamvlm: watch session {session_name} (list its events with: streamvlm events --session {session_name})",
          file=sys.stderr, flush=True)
    log = EventLog(event_db)
    sender = WebhookSender(webhook, log) if webhook else None
    sinks = (sender.sink,) if sender else ()
    if sender:
        sender.start()
    worker = LiveWorker(StreamSession(adapter, SessionConfig(), memory or MemoryConfig(budget_tokens=4096)))
    camera.start()
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

    def log_camera_events() -> None:
        for event in camera.events():
            record(f"camera.{event.kind}", asdict(event), event.t)
            print(f"streamvlm: camera {event.kind} {event.message}", file=sys.stderr, flush=True)

    async def feed() -> None:
        loop = asyncio.get_running_loop()
        last = None
        submitted: float | None = None
        while camera.running or camera.latest(after=last) is not None:
            frame = await loop.run_in_executor(None, camera.wait_frame, 0.5, last)
            log_camera_events()
            if frame is not None:
                last = frame.pts_s
                if fps is None or submitted is None or frame.pts_s - submitted >= 1.0 / fps - 1e-6:
                    submitted = frame.pts_s
                    worker.submit_frame(frame)
        log_camera_events()  # the reader's last words (why it closed)

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
        log_camera_events()
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
    if camera.failure is not None:
        raise camera.failure
    return raised
