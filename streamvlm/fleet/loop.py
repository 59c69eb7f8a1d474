"""The camera loop: what one camera actor does, from loading the model to the end of its source.

:class:`CameraLoop` knows a camera, where its snapshots live and a ``sink`` that writes events
durably (the fleet's recorder actor; an :class:`~streamvlm.server.eventlog.EventLog` in tests). It
does not know Ray: the actor runs :meth:`CameraLoop.run` on a thread and forwards questions and
status calls to it.

On start it loads the newest snapshot that loads (memory, dialogue, watches and their trigger states)
and re-opens the source where that snapshot stopped:

* a file read as fast as possible: from the first sampled frame after the snapshot's last frame, so
  every frame read between that snapshot and a crash is read again (and an alert it raised is raised
  again, with the same key: the log keeps one);
* a file paced at its own speed (``realtime``) or a live camera: from the live point; the frames the
  camera showed while the actor was down are not read, and are counted (``missed``).

Every ``snapshot_every_s`` stream seconds (and when the source ends) the events so far are already in
the sink (the sink returns only once they are durable) and the job is saved as a new generation.
A fault ends the loop with a ``camera.failed`` event naming it; nothing ends quietly.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from ..errors import StreamVLMError
from ..types import Frame
from .camera import CameraJob, FleetEvent, SnapshotStore
from .config import CameraConfig, FleetConfig

__all__ = ["CameraLoop", "Sink"]

Sink = Callable[[list[FleetEvent]], None]


class CameraLoop:
    """One camera's life in one process. ``run`` on a thread; :meth:`ask` and :meth:`status` from any thread."""

    def __init__(self, fleet: FleetConfig, camera: CameraConfig, sink: Sink, *, run_id: str, node: str = "local",
                 load_adapter: Callable[[str], Any] | None = None) -> None:
        self.fleet, self.camera, self.sink, self.run_id, self.node = fleet, camera, sink, run_id, node
        self.store = SnapshotStore(fleet.snapshot_dir / camera.id)
        self._load_adapter = load_adapter
        self._questions: queue.Queue[tuple[str, str, dict]] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.job: CameraJob | None = None
        self._closed: str | None = None  # why questions are refused from now on (the loop failed or stopped)
        self._status: dict[str, Any] = {
            "camera": camera.id, "node": node, "state": "starting", "frames_read": 0, "frames_this_start": 0,
            "last_pts": None, "alerts": 0, "last_alert": None, "restarts": 0, "snapshot": 0, "snapshot_pts": None,
            "resumed_after": None, "frames_in_snapshot": 0, "missed": 0, "first_frame_wall": None, "last_frame_wall": None, "started_wall": time.time(), "error": None,
        }

    # ---- from other threads --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Where the camera stands, as a dict:

        ``state`` (starting, reading, ended, failed; ``error`` says why it failed), ``node``, ``frames_read``
        (in all its lives), ``frames_this_start``, ``last_pts`` (stream time of the newest frame), ``alerts``
        and ``last_alert``, ``restarts`` (in this fleet run), ``snapshot`` / ``snapshot_pts`` (newest
        generation saved and its stream time), ``resumed_after`` and ``frames_in_snapshot`` (what this
        start resumed from; None / 0 for a fresh start), ``missed`` (frames of a live or paced source
        whose moment passed while the camera was down), and wall times ``started_wall``,
        ``first_frame_wall`` and ``last_frame_wall`` of this start.
        """
        with self._lock:
            return dict(self._status)

    def ask(self, question: str, request_id: str, timeout_s: float = 300.0) -> dict[str, Any]:
        """Answer ``question`` from the camera's memory between two frames; returns the logged answer event.

        Raises the engine's error for a bad question, and StreamVLMError if the camera failed or did not
        answer within ``timeout_s``. Asking again with the same ``request_id`` logs the answer once.
        """
        reply: dict[str, Any] = {}
        done = threading.Event()
        reply["done"] = done
        with self._lock:
            if self._closed is not None:
                raise StreamVLMError(f"camera {self.camera.id} answers no more questions: {self._closed}")
            self._questions.put((question, request_id, reply))
        if not done.wait(timeout_s):
            raise StreamVLMError(f"camera {self.camera.id}: no answer within {timeout_s:.0f} s")
        if "error" in reply:
            raise reply["error"]
        return reply["event"]

    def stop(self) -> None:
        self._stop.set()

    # ---- the loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        """Load, resume, read the source to its end (or until :meth:`stop`), then keep answering questions."""
        try:
            self._start()
            self._read_source()
            self._save()
            self._set(state="ended")
            self.sink([self._event("camera.ended", {"frames_read": self.job.frames_read if self.job else 0})])
        except Exception as exc:  # a fault ends this camera with its reason, never quietly
            reason = exc if isinstance(exc, StreamVLMError) else f"{type(exc).__name__}: {exc}"
            self._set(state="failed", error=str(reason))
            try:
                self.sink([self._event("camera.failed", {"reason": str(reason)})])
            finally:
                self._fail_questions(StreamVLMError(f"camera {self.camera.id} failed: {reason}"))
            return
        while not self._stop.is_set():  # the stream ended: memory stays to answer questions
            self._serve_questions(wait_s=0.2)
        self._fail_questions(StreamVLMError(f"camera {self.camera.id} stopped"))

    def _start(self) -> None:
        model = self.fleet.group_of(self.camera).model or self.fleet.model
        adapter = (self._load_adapter or self._default_loader)(model)
        self._set(restarts=self._count_start())
        job, state, problems = self.store.load(adapter, self.camera)
        payload: dict[str, Any] = {"node": self.node, "restarts": self._status["restarts"], "problems": problems}
        if job is None:
            job = CameraJob(adapter, self.camera)
            payload["resumed"] = False
        else:
            payload.update(resumed=True, snapshot=self.store.latest_generation(), resumed_after=job.last_pts,
                           frames_in_snapshot=job.frames_read)
            if not self.camera.is_file:  # the live clock starts again at 0: keep stream time rising
                job.offset_s = (job.last_pts or 0.0) + max(0.0, time.time() - float(state["saved_wall"])) + 1e-3
        self.job = job
        self._set(state="reading", frames_read=job.frames_read, last_pts=job.last_pts, alerts=job.alerts,
                  last_alert=job.last_alert, resumed_after=job.last_pts if payload["resumed"] else None,
                  snapshot_pts=job.last_pts if payload["resumed"] else None,
                  frames_in_snapshot=job.frames_read if payload["resumed"] else 0)
        self.sink([self._event("camera.started", payload)])

    def _default_loader(self, model: str) -> Any:
        from ..config import ModelConfig
        from ..models import load_model

        return load_model(ModelConfig(model=model, device=self.fleet.device, dtype=self.fleet.dtype))

    def _read_source(self) -> None:
        job = self.job
        assert job is not None
        every, last_saved = self.fleet.snapshot_every_s, job.last_pts
        for frame in self._frames(job):
            events = job.read(frame)
            now = time.time()
            self._set(frames_read=job.frames_read, frames_this_start=self._status["frames_this_start"] + 1,
                      last_pts=job.last_pts, alerts=job.alerts, last_alert=job.last_alert,
                      first_frame_wall=self._status["first_frame_wall"] or now, last_frame_wall=now)
            for request_id, question in job.due_questions(frame.pts_s):
                events.append(job.ask(question, request_id))
            if events:
                self.sink(events)  # durable before any snapshot that covers this frame
            self._serve_questions()
            if last_saved is None or frame.pts_s - last_saved >= every - 1e-9:
                self._save()
                last_saved = frame.pts_s
            if self._stop.is_set():
                return

    def _save(self) -> None:
        if self.job is None or self.job.last_pts is None:
            return
        number = self.store.save(self.job)
        self._set(snapshot=number, snapshot_pts=self.job.last_pts)

    def _frames(self, job: CameraJob) -> Iterator[Frame]:
        if self.camera.is_file:
            yield from self._file_frames(job)
        else:
            yield from self._live_frames(job)

    def _file_frames(self, job: CameraJob) -> Iterator[Frame]:
        from ..ingest import read_video

        after = job.last_pts
        for frame in read_video(self.camera.source, self.camera.fps, source_id=self.camera.id):
            if after is not None and frame.pts_s <= after + 1e-9:
                continue  # read before the snapshot: in memory already
            if self.camera.realtime:
                due = job.started_wall + frame.pts_s
                if time.time() - due > 0.5:  # its moment passed while the camera was down: a live camera shows it no more
                    self._set(missed=self._status["missed"] + 1)
                    continue
                while not self._stop.is_set() and time.time() < due:
                    self._serve_questions(wait_s=min(0.05, max(0.0, due - time.time())))
            if self._stop.is_set():
                return
            yield frame

    def _live_frames(self, job: CameraJob) -> Iterator[Frame]:
        from ..ingest import LiveSource
        from ..ingest.sampler import FpsSampler

        source = LiveSource(int(self.camera.source) if self.camera.source.isdigit() else self.camera.source)
        source.start()
        raw_last: float | None = None
        sampler = FpsSampler(self.camera.fps) if self.camera.fps else None  # the watch's sampling: jitter drops nothing
        try:
            while not self._stop.is_set() and (source.running or source.latest(after=raw_last) is not None):
                frame = source.wait_frame(0.5, raw_last)
                for event in source.events():
                    self.sink([self._event(f"camera.{event.kind}", asdict(event))])
                if frame is None:
                    self._serve_questions()
                    continue
                raw_last = frame.pts_s
                t = frame.pts_s + job.offset_s
                if sampler is None or sampler.offer(t):
                    yield Frame(frame.image, t, self.camera.id)
        finally:
            source.stop()
            for event in source.events():
                self.sink([self._event(f"camera.{event.kind}", asdict(event))])
        if source.failure is not None:
            raise source.failure

    # ---- questions -----------------------------------------------------------------------------------
    def _serve_questions(self, wait_s: float = 0.0) -> None:
        while True:
            try:
                question, request_id, reply = self._questions.get(timeout=wait_s) if wait_s else self._questions.get_nowait()
            except queue.Empty:
                return
            wait_s = 0.0
            try:
                if self.job is None:
                    raise StreamVLMError(f"camera {self.camera.id} is not loaded yet")
                event = self.job.ask(question, request_id)
                self.sink([event])
                reply["event"] = _as_dict(event)
            except Exception as exc:
                reply["error"] = exc
            reply["done"].set()

    def _fail_questions(self, error: Exception) -> None:
        with self._lock:
            self._closed = str(error)
        while True:
            try:
                _, _, reply = self._questions.get_nowait()
            except queue.Empty:
                return
            reply["error"] = error
            reply["done"].set()

    # ---- books ---------------------------------------------------------------------------------------
    def _count_start(self) -> int:
        """Restarts of this camera in this fleet run (0 on the first start), kept beside its snapshots."""
        path = self.store.root / "starts.json"
        self.store.root.mkdir(parents=True, exist_ok=True)
        try:
            books = json.loads(path.read_text())
        except (OSError, ValueError):
            books = {}
        starts = int(books.get("starts", 0)) + 1 if books.get("run") == self.run_id else 1
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run": self.run_id, "starts": starts}))
        os.replace(tmp, path)
        return starts - 1

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._status.update(changes)

    def _event(self, kind: str, payload: dict[str, Any]) -> FleetEvent:
        t = self.job.last_pts if self.job is not None else None
        return FleetEvent(kind, self.camera.id, None, t, payload)


def _as_dict(event: FleetEvent) -> dict[str, Any]:
    return {"kind": event.kind, "camera": event.camera_id, "key": event.key, "stream_t": event.stream_t, "payload": event.payload}


def events_to_log(log: Any, events: list[FleetEvent]) -> list[bool]:
    """Write ``events`` to an EventLog under their camera ids; returns for each whether it was new."""
    return [log.record(e.camera_id, e.kind, e.payload, stream_t=e.stream_t, key=e.key)[1] for e in events]
