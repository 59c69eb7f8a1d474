"""``streamvlm watch``: monitor one camera or many for hours, with one model, and report alerts.

Each camera is a :class:`~streamvlm.ingest.live.LiveSource` (RTSP, HTTP, file or webcam; reconnecting with
backoff) feeding its own :class:`~streamvlm.engine.worker.LiveWorker`, whose watches are the camera's
alert conditions. Every camera's session shares the one loaded model (one adapter: the engine serialises,
and batches where it can, the model work of all of them), one SQLite event log, one JSON-lines log, one
webhook and one console. Every alert is written to the event log before it is printed, appended to the
JSONL log or posted to the webhook (which retries, and whose backlog survives a restart). Every logged
event carries the camera's ``camera`` name and redacted ``source``, and every console line names the
camera when there are several. Camera online/offline changes are logged too, all under a session id
that is new for every run (``watch_...``), so ``streamvlm events --session ID`` shows one run.

Cameras that fail: a network camera that drops mid-stream is reopened by its reader with exponential
back-off, forever (each outage is logged as ``camera.offline``, each failed try as ``camera.error``, the
return as ``camera.online``). A camera that cannot be read at all (a file that is not a video, a server
that keeps refusing with HTTP/RTSP 401, 403, 404, ...) ends alone with a ``camera.closed`` event that says
why; one whose model session breaks ends with a ``camera.failed`` event; either way a console line names
it, its summary line says ``FAILED`` and why, and the other cameras go on.
:meth:`CameraWatch.run` returns when every camera ended (files at their end), after ``duration_s``, or
when cancelled (Ctrl-C); :meth:`CameraWatch.summary_lines` then says per camera what was read and raised.
:func:`run_watch` is the one-camera form, which raises the camera's SourceError.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from .cameras import DEFAULT_READ_FPS, CameraConfig, default_name
from .config import MemoryConfig, SessionConfig
from .dialogue import TriggerSpec
from .engine.session import StreamSession
from .engine.worker import LiveWorker
from .errors import ConfigError, SourceError
from .ingest.file import probe_video
from .ingest.live import LiveSource, SourceConfig
from .ingest.sampler import FpsSampler
from .models.base import ModelAdapter
from .protocol.ids import new_id
from .server.eventlog import EventLog
from .server.webhook import WebhookSender

__all__ = ["run_watch", "check_source", "CameraWatch", "CameraReport"]


def check_source(source: str, camera: str | None = None) -> None:
    """Fail fast, before a model is loaded, on a source that cannot work.

    Raises ConfigError for an unusable URL or webcam index and SourceError for a file that is missing or
    is not a video OpenCV can decode; with ``camera``, the message starts with ``camera 'NAME':``. Network
    sources and webcams are only checked for form here: they are opened (and retried) by the watch itself.
    """
    try:
        probe = LiveSource(int(source) if source.isdigit() else source)  # validates; opens nothing
        if not source.isdigit() and "://" not in source:
            probe_video(source)
        probe.stop()
    except (ConfigError, SourceError) as exc:
        if camera is None:
            raise
        raise (ConfigError if isinstance(exc, ConfigError) else SourceError)(f"camera {camera!r}: {exc}") from exc


def _clock(t: float) -> str:
    minutes, seconds = divmod(max(0.0, t), 60)
    return f"{int(minutes):02d}:{seconds:04.1f}"


@dataclass
class CameraReport:
    """What one camera did so far (filled while it runs; read it any time, also after Ctrl-C)."""

    name: str
    source: str  # the source without credentials
    frames_received: int = 0  # frames taken from the source (after the fps cap)
    frames_read: int = 0  # frames the model read (the rest were near-duplicates or dropped while it was busy)
    alerts: int = 0
    answers: int = 0
    failure: str | None = None  # why the camera ended early; None while it runs or after it ended normally
    ended: bool = False  # the source ended (a file's end, or a failure) and the model finished its work; False if stopped


class _Camera:
    """One camera of a :class:`CameraWatch`: its source, its worker on the shared model, its books."""

    def __init__(self, cfg: CameraConfig, adapter: ModelAdapter, watch: CameraWatch, source_config: SourceConfig | None,
                 memory: MemoryConfig | None, trigger: TriggerSpec | None) -> None:
        target: str | int = int(cfg.source) if cfg.source.isdigit() else cfg.source
        self.cfg, self.watch = cfg, watch
        self.source = LiveSource(target, source_config or SourceConfig(), source_id=cfg.name)
        self.report = CameraReport(cfg.name, LiveSource(target).source_id)  # the default id has credentials removed
        self.worker = LiveWorker(StreamSession(adapter, SessionConfig(), memory or cfg.memory()))
        self.trigger = trigger or cfg.trigger()
        self.questions = sorted(cfg.questions)
        self.asked: dict[str, str] = {}  # request id -> question, until it ends
        self.fatal: str | None = None

    def record(self, kind: str, payload: dict[str, Any], stream_t: float | None = None) -> None:
        self.watch.record(kind, {"camera": self.cfg.name, "source": self.report.source, **payload}, stream_t)

    def say(self, text: str, t: float | None = None, *, err: bool = False) -> None:
        self.watch.say(self.cfg.name, text, t, err=err)

    def log_source_events(self) -> None:
        for event in self.source.events():
            self.record(f"camera.{event.kind}", asdict(event), event.t)
            self.say(f"camera {event.kind} {event.message}".rstrip(), err=True)

    async def run(self) -> None:
        """Read the camera until it ends or the task is cancelled; the camera's books are in :attr:`report`."""
        self.source.start()
        await self.worker.start()
        for i, condition in enumerate(self.cfg.alerts):
            self.worker.watch(f"alert{i + 1}", condition, spec=self.trigger)
        reporter = asyncio.create_task(self._report())
        try:
            await self._feed()
            await self._settle()  # the source ended: let the model read what it was given and answer
            self.report.ended = True
        finally:
            self.source.stop()
            self.log_source_events()
            await self.worker.stop()
            await reporter
            self.worker.session.close()
            self.report.frames_read = self.worker.counters.ingested
            self._finish()

    def _finish(self) -> None:
        failure = self.source.failure
        reason = self.fatal or (str(failure) if failure is not None else None)
        for request_id, question in self.asked.items():  # asked but cut short by the end of the run
            self.record("gave_up", {"question": question, "message": "not answered: the watch stopped first"})
        self.asked.clear()
        if reason:
            self.report.failure = reason
            if self.fatal:  # a source's failure is logged already, as its camera.closed event with the reason
                self.record("camera.failed", {"message": reason})
            self.say(f"camera FAILED: {reason} (the other cameras go on)", err=True)

    async def _feed(self) -> None:
        loop = asyncio.get_running_loop()
        last: float | None = None
        sampler = FpsSampler(self.cfg.fps) if self.cfg.fps else None  # slots anchored at the first frame: read jitter drops nothing
        while (self.source.running or self.source.latest(after=last) is not None) and self.fatal is None:
            frame = await loop.run_in_executor(self.watch.waiters, self.source.wait_frame, 0.5, last)
            self.log_source_events()
            self.report.frames_read = self.worker.counters.ingested  # the report is read while it runs
            if frame is None:
                continue
            last = frame.pts_s
            while self.questions and self.questions[0][0] < frame.pts_s:  # asked after the frames up to its time
                self._ask(*self.questions.pop(0))
            if sampler is None or sampler.offer(frame.pts_s):
                self.report.frames_received += 1
                self.worker.submit_frame(frame)
        self.log_source_events()  # the reader's last words (why it closed)
        if last is not None:
            while self.questions and self.questions[0][0] <= last + 1e-6:
                self._ask(*self.questions.pop(0))
        for t, question in self.questions:
            ended = f"at {_clock(last)}" if last is not None else "before its first frame"
            self.record("gave_up", {"question": question, "message": f"not asked: the source ended {ended}, before {_clock(t)}"}, t)
            self.say(f"question not asked: {question!r} (the source ended {ended}, before {_clock(t)})", err=True)
        self.questions = []

    def _ask(self, t: float, question: str) -> None:
        request_id = self.worker.ask(question, t)
        self.asked[request_id] = question
        self.say(f"Q: {question}", t)

    async def _settle(self) -> None:
        while self.fatal is None and (not self.worker.idle or self.asked):
            await asyncio.sleep(0.05)

    async def _report(self) -> None:
        async for event in self.worker.events():
            d = event.data
            if event.kind == "alert":
                self.report.alerts += 1
                self.record("alert", {"watch_id": d["watch_id"], "condition": d["condition"], "t": d["evidence_t"]}, d["evidence_t"])
                self.say(f"ALERT {d['condition']}", d["evidence_t"])
            elif event.kind == "answer.done":
                question = self.asked.pop(d["request_id"], None)
                answer = d["answer"]
                if question is None:  # a narration or an answer nobody here asked for
                    continue
                self.report.answers += 1
                self.record("answer", {"question": question, "text": answer.text, "t": answer.asked_at_s}, answer.asked_at_s)
                self.say(f"A: {answer.text.strip()}  (to: {question})", answer.asked_at_s)
            elif event.kind in ("gave_up", "request.ended"):
                question = self.asked.pop(d["request_id"], d.get("question", ""))
                message = d.get("reason") or d.get("message") or d.get("status", "")
                self.record("gave_up" if event.kind == "gave_up" else "failed", {"question": question, "message": message})
                self.say(f"no answer to {question!r}: {message}", err=True)
            elif event.kind == "error":
                self.record("error", {"code": d.get("code"), "message": d.get("message"), "watch_id": d.get("watch_id")})
                self.say(f"error: {d.get('message')}", err=True)
            elif event.kind == "fatal":
                self.fatal = f"the model session stopped: {d.get('reason')}"


class CameraWatch:
    """Several cameras on one loaded model, one event log and one console.

    Create, ``await run()`` (returns when every camera ended, after ``duration_s``, or raises CancelledError
    when cancelled), then read :attr:`reports` / :meth:`summary_lines` (also after a cancel). A camera that
    failed has its reason in its report's ``failure``; :meth:`run` itself never raises for one camera.
    Console lines go to ``out`` (alerts, answers) and ``err`` (camera changes, failures), prefixed with the
    camera's name when ``labelled`` (default: when there are several cameras).
    """

    def __init__(self, adapter: ModelAdapter, cameras: Sequence[CameraConfig], *, event_db: Path, webhook: str | None = None,
                 jsonl: Path | None = None, duration_s: float | None = None, session_name: str | None = None,
                 source_config: SourceConfig | None = None, labelled: bool | None = None,
                 out: TextIO | None = None, err: TextIO | None = None, memory: MemoryConfig | None = None,
                 trigger: TriggerSpec | None = None) -> None:
        if not cameras:
            raise ValueError("CameraWatch needs at least one camera")
        self.session_name = session_name or new_id("watch")
        self.duration_s = duration_s
        self.labelled = len(cameras) > 1 if labelled is None else labelled
        self._out, self._err = out, err
        self._event_db, self._webhook, self._jsonl = event_db, webhook, jsonl
        # one thread per camera waits for its next frame: a shared pool would make cameras queue for each other
        self.waiters = ThreadPoolExecutor(max_workers=len(cameras), thread_name_prefix="streamvlm-camera")
        self._cameras = [_Camera(cfg, adapter, self, source_config, memory, trigger) for cfg in cameras]
        self._log: EventLog | None = None
        self._sender: WebhookSender | None = None
        self._jsonl_file: Any = None

    @property
    def reports(self) -> list[CameraReport]:
        return [camera.report for camera in self._cameras]

    def say(self, camera: str, text: str, t: float | None = None, *, err: bool = False) -> None:
        stamp = " ".join(part for part in (camera if self.labelled else "", _clock(t) if t is not None else "") if part)
        line = (f"[{stamp}] {text}" if stamp else text) if not err else (
            f"streamvlm: {camera}: {text}" if self.labelled else f"streamvlm: {text}")
        print(line, file=(self._err or sys.stderr) if err else (self._out or sys.stdout), flush=True)

    def record(self, kind: str, payload: dict[str, Any], stream_t: float | None = None) -> None:
        """Log one event durably (the SQLite log first), then mirror it to the JSONL log and wake the webhook."""
        if self._log is None:
            return
        sinks = (self._sender.sink,) if self._sender else ()
        self._log.append(self.session_name, kind, payload, stream_t=stream_t, sinks=sinks)
        if self._jsonl_file:
            self._jsonl_file.write(json.dumps({"kind": kind, "session": self.session_name, "stream_t": stream_t, "payload": payload}) + "\n")
            self._jsonl_file.flush()
        if self._sender:
            self._sender.notify()

    async def run(self) -> list[CameraReport]:
        """Run every camera until all ended (or ``duration_s`` passed); returns the reports."""
        names = ", ".join(c.cfg.name for c in self._cameras)
        print(f"streamvlm: watch session {self.session_name}, {len(self._cameras)} camera(s): {names} "
              f"(list its events with: streamvlm events --session {self.session_name})", file=self._err or sys.stderr, flush=True)
        self._log = EventLog(self._event_db)
        self._sender = WebhookSender(self._webhook, self._log) if self._webhook else None
        if self._sender:
            self._sender.start()
        self._jsonl_file = self._jsonl.open("a") if self._jsonl else None
        tasks = [asyncio.create_task(camera.run(), name=f"camera {camera.cfg.name}") for camera in self._cameras]
        try:
            done, _ = await asyncio.wait(tasks, timeout=self.duration_s)
            for task in done:  # a camera task that raised (a fault in this module): report it by name, never drop it
                if task.exception() is not None:
                    camera = self._cameras[tasks.index(task)]
                    camera.report.failure = camera.report.failure or f"{type(task.exception()).__name__}: {task.exception()}"
                    camera.say(f"camera FAILED: {camera.report.failure}", err=True)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._sender:
                self._sender.stop()
                self._sender.deliver_due()
            if self._jsonl_file:
                self._jsonl_file.close()
            self._log.close()
            self.waiters.shutdown(wait=False)
        return self.reports

    def failures(self) -> list[SourceError | None]:
        """Per camera, the SourceError its source ended with (SourceRefusedError, not a video, gave up), or None."""
        return [camera.source.failure for camera in self._cameras]

    def summary_lines(self) -> list[str]:
        """One line per camera: frames taken and read, alerts, answers, and how it ended."""
        lines = []
        for r in self.reports:
            how = f"FAILED: {r.failure}" if r.failure else ("ended" if r.ended else "stopped")
            lines.append(f"streamvlm: camera {r.name} ({r.source}): {r.frames_received} frame(s) taken, {r.frames_read} read "
                         f"by the model, {r.alerts} alert(s), {r.answers} answer(s); {how}")
        return lines


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
    fps: float | None = DEFAULT_READ_FPS,
) -> int:
    """Watch one camera until the source ends, ``duration_s`` passes, or the task is cancelled; returns alerts raised.

    ``fps`` caps the frames read per second of stream time (default 2; 0 or None: every new frame the source
    delivers); the trigger rules count stream seconds, not frames.
    ``trigger`` (e.g. ``TriggerSpec(cooldown_s=30)``) is the rule of every alert (default: the controller's).

    Events are logged under ``session_name`` (default: a fresh ``watch_...`` id, printed on stderr).
    Raises the source's SourceError (e.g. SourceRefusedError for a URL the server keeps refusing) when
    the source ended because it could not be read; alerts raised before that stay logged.
    """
    camera = CameraConfig(name=default_name(source), source=source, alerts=tuple(alerts), fps=fps)
    watch = CameraWatch(adapter, [camera], event_db=event_db, webhook=webhook, jsonl=jsonl, duration_s=duration_s,
                        session_name=session_name, source_config=source_config,
                        memory=memory or MemoryConfig(budget_tokens=4096), trigger=trigger)
    await watch.run()
    failure = watch.failures()[0]
    if failure is not None:
        raise failure
    return watch.reports[0].alerts
