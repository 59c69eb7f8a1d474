"""One camera's watch as a plain object: frames in, alerts out, saved and restored whole (no Ray here).

:class:`CameraJob` owns a :class:`~streamvlm.engine.session.StreamSession` and a
:class:`~streamvlm.dialogue.DialogueController` with one watch per alert condition. Each frame is read
once, the watches are probed on it when the controller asks, and every alert comes back as a
:class:`FleetEvent` whose ``key`` is the same whichever process raises it (camera id, watch id, stream
time of the evidence frame). The caller writes events to the log *before* it saves the next snapshot,
so after a restart from that snapshot an alert is either in the log already (re-raised, ignored by
its key) or raised again from the frames read after the snapshot (never lost).

:class:`SnapshotStore` keeps a camera's snapshots as numbered generations under one directory on
shared storage; a ``LATEST`` file, replaced atomically, names the newest complete one, and the one
before it is kept as a fallback. What the job does not know: where frames come from, Ray, the log.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import MemoryConfig, SamplingConfig, SessionConfig
from ..dialogue import Alert, DialogueController, Poll, TriggerSpec
from ..engine.session import StreamSession
from ..engine.snapshot import sync_dir
from ..errors import InputError, StreamVLMError
from ..models.base import ModelAdapter
from ..types import Frame
from .config import CameraConfig

__all__ = ["CameraJob", "FleetEvent", "SnapshotStore", "alert_key", "answer_key", "load_controller"]

_STATE, _CONTROLLER, _SESSION, _LATEST = "state.json", "controller.pkl", "session", "LATEST"


# What a controller snapshot may name: the dialogue package's own classes and a few plain containers.
_CONTROLLER_MODULES = ("streamvlm.dialogue.controller", "streamvlm.dialogue.triggers")
_PLAIN = {("collections", "deque"), ("builtins", "set"), ("builtins", "frozenset")}


class _ControllerUnpickler(pickle.Unpickler):
    """Loads a controller snapshot and nothing else: a pickle may name any callable, and calls it while
    it loads, so one written by whoever can write the shared snapshot directory (its checksum sits
    beside it) would run their code here. Only the dialogue package's classes and plain containers
    are let through; any other name is refused before it is imported or called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        if module in _CONTROLLER_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"a controller snapshot may not name {module}.{name}")


def load_controller(blob: bytes, where: Path | str = "controller snapshot") -> DialogueController:
    """The :class:`DialogueController` in ``blob`` (written by :meth:`CameraJob.save`). Raises
    InputError naming ``where`` for a blob that is not one, or names anything but the controller's own
    classes (nothing it names outside them is imported or run)."""
    try:
        controller = _ControllerUnpickler(io.BytesIO(blob)).load()
    except Exception as exc:  # refused names, damage, or a checksum-clean pickle of another version of the code
        raise InputError(f"{where}: cannot be read as a controller snapshot: {exc}") from exc
    if not isinstance(controller, DialogueController):
        raise InputError(f"{where}: not a dialogue controller")
    return controller


def alert_key(camera_id: str, watch_id: str, evidence_t: float) -> str:
    """The idempotency key of an alert: the same alert raised again after a restart has the same key."""
    return f"{camera_id}/{watch_id}/{evidence_t:.3f}"


def answer_key(camera_id: str, request_id: str) -> str:
    """The idempotency key of an answer to the caller's ``request_id`` (retrying the request reuses it)."""
    return f"{camera_id}/answer/{request_id}"


@dataclass(frozen=True)
class FleetEvent:
    """Something a camera reports: ``kind`` is ``alert``, ``answer`` or ``camera.<what>``; ``key`` is its log id."""

    kind: str
    camera_id: str
    key: str | None
    stream_t: float | None
    payload: dict[str, Any] = field(default_factory=dict)


class CameraJob:
    """The watch of one camera. Drive it from one thread: :meth:`read` each frame, :meth:`ask`, :meth:`save`."""

    def __init__(self, adapter: ModelAdapter, camera: CameraConfig, *, memory: MemoryConfig | None = None,
                 trigger: TriggerSpec | None = None, max_new_tokens: int = 24) -> None:
        self.camera = camera
        self.session = StreamSession(adapter, SessionConfig(sampling=SamplingConfig(max_new_tokens=max_new_tokens)),
                                     memory or camera.memory())
        self.controller = DialogueController()
        for i, condition in enumerate(camera.alerts):
            self.controller.add_watch(f"alert{i + 1}", condition, 0.0, trigger or camera.trigger())
        self.questions_asked = 0  # the camera's timed questions (in time order) asked so far
        self.frames_read = 0
        self.last_pts: float | None = None  # stream time of the newest frame read
        self.alerts = 0
        self.last_alert: dict[str, Any] | None = None
        self.started_wall = time.time()  # wall time of stream time 0 (a paced file's live point)
        self.offset_s = 0.0  # added to a live source's clock so that stream time keeps rising across restarts

    # ---- the watch -----------------------------------------------------------------------------------
    def read(self, frame: Frame) -> list[FleetEvent]:
        """Read one frame (stream time ``frame.pts_s``, later than the last) and probe the watches if due.

        Returns the alerts it raised. Raises the session's InputError for a bad frame (the job is
        unchanged) and SessionBrokenError if the engine can no longer go on.
        """
        self.session.ingest(frame)
        t = frame.pts_s
        self.frames_read += 1
        self.last_pts = t
        events: list[FleetEvent] = []
        for action in self.controller.frame(t, frame.source_id):
            if isinstance(action, Poll):
                scores = self.session.probe([p.prompt for p in action.probes])
                for fired in self.controller.scores(t, {p.probe_id: s for p, s in zip(action.probes, scores)}):
                    if isinstance(fired, Alert):
                        events.append(self._alert(fired))
        return events

    def due_questions(self, t: float) -> list[tuple[str, str]]:
        """The camera's timed questions due at stream time ``t`` not asked yet, as ``(request_id, question)``;
        they count as asked once returned (the caller asks them now, before the next frame)."""
        ordered = sorted(enumerate(self.camera.questions), key=lambda item: (item[1][0], item[0]))
        due = []
        while self.questions_asked < len(ordered) and ordered[self.questions_asked][1][0] <= t + 1e-9:
            index, (_, question) = ordered[self.questions_asked]
            due.append((f"q{index + 1}", question))
            self.questions_asked += 1
        return due

    def ask(self, question: str, request_id: str) -> FleetEvent:
        """Answer ``question`` now from memory (working and long-term); the event's key comes from ``request_id``."""
        t = self.last_pts if self.last_pts is not None else 0.0
        answer = self.session.ask(question, t)
        evidence = [{"pts_s": e.pts_s, "source_id": e.source_id, "weight": e.weight} for e in answer.evidence]
        payload = {"request_id": request_id, "question": question, "text": answer.text, "asked_at_s": answer.asked_at_s,
                   "evidence": evidence, "finish_reason": answer.finish_reason}
        return FleetEvent("answer", self.camera.id, answer_key(self.camera.id, request_id), t, payload)

    def _alert(self, alert: Alert) -> FleetEvent:
        self.alerts += 1
        payload = {"watch_id": alert.watch_id, "condition": alert.condition, "t": alert.evidence_t, "camera": self.camera.id}
        self.last_alert = payload
        return FleetEvent("alert", self.camera.id, alert_key(self.camera.id, alert.watch_id, alert.evidence_t),
                          alert.evidence_t, payload)

    def state(self) -> dict[str, Any]:
        """The job's books (no tensors): what a snapshot stores beside the session."""
        return {"camera": self.camera.id, "source": self.camera.source, "alerts_watched": list(self.camera.alerts),
                "frames_read": self.frames_read, "last_pts": self.last_pts, "alerts": self.alerts, "questions_asked": self.questions_asked,
                "last_alert": self.last_alert, "started_wall": self.started_wall, "offset_s": self.offset_s}

    # ---- snapshots -----------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write the whole job (session, controller, books) into the new directory ``directory``."""
        directory.mkdir(parents=True)
        self.session.save(directory / _SESSION)
        blob = pickle.dumps(self.controller, protocol=pickle.HIGHEST_PROTOCOL)
        _write(directory / _CONTROLLER, blob)
        state = {**self.state(), "saved_wall": time.time(), "controller_sha256": hashlib.sha256(blob).hexdigest()}
        _write(directory / _STATE, json.dumps(state).encode())

    @classmethod
    def load(cls, adapter: ModelAdapter, camera: CameraConfig, directory: Path) -> tuple[CameraJob, dict[str, Any]]:
        """Rebuild a job saved by :meth:`save`; returns it and its saved books.

        Raises InputError naming the directory for a damaged snapshot, or one of another camera, source
        or set of alert conditions (the TOML changed: the old memory does not apply).
        """
        try:
            state = json.loads((directory / _STATE).read_text())
            blob = (directory / _CONTROLLER).read_bytes()
        except (OSError, ValueError) as exc:
            raise InputError(f"{directory}: snapshot books unreadable: {exc}") from exc
        if hashlib.sha256(blob).hexdigest() != state.get("controller_sha256"):
            raise InputError(f"{directory / _CONTROLLER}: damaged (checksum differs)")
        mine = (camera.id, camera.source, list(camera.alerts))
        theirs = (state.get("camera"), state.get("source"), state.get("alerts_watched"))
        if mine != theirs:
            raise InputError(f"{directory}: made for camera {theirs[0]!r} on {theirs[1]!r} watching {theirs[2]!r}; "
                             f"the configuration now says {mine[1]!r} watching {mine[2]!r}")
        controller = load_controller(blob, directory / _CONTROLLER)
        session = StreamSession.load(adapter, directory / _SESSION)
        job = cls.__new__(cls)
        job.camera, job.session, job.controller = camera, session, controller
        job.frames_read, job.last_pts, job.alerts = int(state["frames_read"]), state["last_pts"], int(state["alerts"])
        job.questions_asked = int(state["questions_asked"])
        job.last_alert, job.started_wall, job.offset_s = state["last_alert"], float(state["started_wall"]), float(state["offset_s"])
        return job, state

    def close(self) -> None:
        self.session.close()


class SnapshotStore:
    """A camera's snapshots under ``root`` (shared storage): ``gen-00000001/``, ..., and ``LATEST`` naming the newest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def latest_generation(self) -> int:
        """The newest complete generation (0 when there is none)."""
        try:
            return int((self.root / _LATEST).read_text().strip().removeprefix("gen-"))
        except (OSError, ValueError):
            return 0

    def save(self, job: CameraJob) -> int:
        """Save ``job`` as the next generation and point ``LATEST`` at it (atomically); returns its number.

        Until ``LATEST`` is replaced the previous generation stays the one a restart loads.
        """
        previous = self.latest_generation()
        number = max([previous, *self._generations()]) + 1  # past any generation a crash left half-written
        target = self.root / f"gen-{number:08d}"
        job.save(target)
        _write(self.root / (_LATEST + ".tmp"), f"gen-{number:08d}\n".encode())
        os.replace(self.root / (_LATEST + ".tmp"), self.root / _LATEST)
        sync_dir(self.root)
        for old in self._generations():  # keep the new one and the complete one before it
            if old not in (number, previous):
                shutil.rmtree(self.root / f"gen-{old:08d}", ignore_errors=True)
        return number

    def load(self, adapter: ModelAdapter, camera: CameraConfig) -> tuple[CameraJob | None, dict[str, Any] | None, list[str]]:
        """The newest snapshot that loads: ``(job, books, problems)``; ``(None, None, problems)`` when none does.

        ``problems`` names each newer snapshot that was skipped and why (report them: a fallback to an
        older snapshot re-reads more frames, and none at all means memory starts empty).
        """
        problems: list[str] = []
        latest = self.latest_generation()
        for number in sorted((n for n in self._generations() if n <= latest), reverse=True):
            try:
                job, state = CameraJob.load(adapter, camera, self.root / f"gen-{number:08d}")
                return job, state, problems
            except StreamVLMError as exc:
                problems.append(f"snapshot gen-{number:08d} skipped: {exc}")
        return None, None, problems

    def _generations(self) -> list[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("gen-") and p.name[4:].isdigit():
                out.append(int(p.name[4:]))
        return sorted(out)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
