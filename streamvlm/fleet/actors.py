"""The camera fleet on Ray: one restartable actor per camera, one recorder actor that owns the event log.

``Fleet(config).start()`` (inside ``ray.init``) creates

* the **recorder** (named ``recorder`` in the namespace ``streamvlm-fleet-<name>``, on the driver's
  node, restarted if it dies): the only writer of the SQLite event log (``EventLog.record`` with each
  event's key, so an event written twice is kept once) and the keeper of every camera's last status,
  which it also writes to ``SNAPSHOT_DIR/status.json`` about once a second;
* one **camera actor** per camera (``max_restarts=-1``), asking Ray for its group's ``num_cpus``,
  ``num_gpus`` and custom resources. It loads the model, resumes from the camera's newest snapshot
  and reads its source on a thread (:class:`~streamvlm.fleet.loop.CameraLoop`); its methods
  (``status``, ``ask``, ``stop``) run beside that thread. When the actor's process or its node dies, Ray
  starts it again (on any node with the resources) and the constructor resumes from the snapshot.

One actor per camera (not one per group): a fault or a restart touches one camera, and Ray places
each camera by its own resources; cameras of a group share a GPU through fractional ``num_gpus``.
The cost is one model copy per camera (small for the models a camera watch needs; see docs/fleet.md).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import StreamVLMError
from .camera import FleetEvent
from .config import CameraConfig, FleetConfig

__all__ = ["Fleet", "namespace_of", "status_file", "RECORDER"]

_log = logging.getLogger("streamvlm.fleet")

RECORDER = "recorder"
_STATUS_EVERY_S = 0.5


def namespace_of(config: FleetConfig) -> str:
    """The Ray namespace of a fleet: where its recorder can be found by name."""
    return f"streamvlm-fleet-{config.name}"


def status_file(config: FleetConfig) -> Path:
    """Where the recorder keeps every camera's last status, for ``streamvlm fleet FILE --status`` (any machine)."""
    return config.snapshot_dir / "status.json"


def write_status_file(path: Path, statuses: dict[str, dict[str, Any]]) -> None:
    """Replace ``path`` atomically with the cameras' statuses (camera id -> status) and the time written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps({"written_wall": time.time(), "cameras": statuses}, default=str))
    os.replace(tmp, path)


class _Recorder:
    """Writes every camera's events to the event log (once per key) and keeps their last status."""

    def __init__(self, event_db: str, webhook: str | None = None, status_path: str | None = None) -> None:
        from ..server.eventlog import EventLog
        from ..server.webhook import WebhookSender

        self.log = EventLog(event_db)
        self.statuses: dict[str, dict[str, Any]] = {}
        self.status_path = status_path
        self.status_error: str | None = None  # the last failure to write ``status_path``
        self._statuses_lock = threading.Lock()  # reports arrive on the actor's thread, the writer runs on its own
        self._changed = threading.Event()
        if status_path:
            threading.Thread(target=self._write_statuses, name="fleet-status", daemon=True).start()
        self.sender = WebhookSender(webhook, self.log) if webhook else None
        if self.sender is not None:
            self.sender.start()  # its backlog is in the log: a restarted recorder goes on delivering it

    def record(self, events: list[dict[str, Any]]) -> list[bool]:
        """Log ``events`` (FleetEvent fields) durably; for each, whether it was new. Returns after the commit.

        Alerts and answers are also queued for the webhook, once per key.
        """
        new = []
        for e in events:
            sinks = (self.sender.sink,) if self.sender is not None and e["kind"] in ("alert", "answer") else ()
            new.append(self.log.record(e["camera_id"], e["kind"], e["payload"], stream_t=e["stream_t"], key=e["key"], sinks=sinks)[1])
        if self.sender is not None and any(new):
            self.sender.notify()
        return new

    def report(self, status: dict[str, Any]) -> None:
        with self._statuses_lock:
            self.statuses[status["camera"]] = {**status, "reported_wall": time.time()}
        self._changed.set()

    def _write_statuses(self) -> None:
        """Keep ``status_path`` (on the shared storage) at most a second behind the reports: what ``--status`` reads."""
        path = Path(self.status_path)
        while True:
            self._changed.wait()
            self._changed.clear()
            try:
                write_status_file(path, self.all_statuses())
                self.status_error = None
            except Exception as exc:  # the storage is away for a moment: say so; the next report writes it again
                self.status_error = f"{type(exc).__name__}: {exc}"
                _log.warning("fleet status file %s not written: %s", path, self.status_error)
            time.sleep(1.0)

    def all_statuses(self) -> dict[str, dict[str, Any]]:
        with self._statuses_lock:
            return dict(self.statuses)

    def events(self, after_id: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Logged events with an id above ``after_id``, oldest first."""
        return self.log.list(after_id=after_id, limit=limit)


class _CameraActor:
    """One camera, restartable: the constructor resumes from the newest snapshot and starts reading."""

    def __init__(self, fleet: FleetConfig, camera: CameraConfig, run_id: str, namespace: str, home: str | None) -> None:
        import ray

        from .loop import CameraLoop

        if home:
            os.environ["STREAMVLM_HOME"] = home
        context = ray.get_runtime_context()
        node = context.get_node_id()
        self.recorder = ray.get_actor(RECORDER, namespace=namespace)
        recorder = self.recorder

        def sink(events: list[FleetEvent]) -> None:
            ray.get(recorder.record.remote([asdict(e) for e in events]))

        self.loop = CameraLoop(fleet, camera, sink, run_id=run_id, node=f"{ray.util.get_node_ip_address()}/{node[:8]}")
        self.node_id = node
        self._stop = threading.Event()
        threading.Thread(target=self.loop.run, name=f"camera-{camera.id}", daemon=True).start()
        threading.Thread(target=self._report, name=f"status-{camera.id}", daemon=True).start()

    def _report(self) -> None:
        while not self._stop.wait(_STATUS_EVERY_S):
            try:
                self.recorder.report.remote(self.loop.status())
            except Exception:  # the recorder is restarting: the next report catches up
                pass

    def status(self) -> dict[str, Any]:
        return {**self.loop.status(), "node_id": self.node_id, "pid": os.getpid()}

    def ask(self, question: str, request_id: str) -> dict[str, Any]:
        return self.loop.ask(question, request_id)

    def stop(self) -> None:
        self.loop.stop()
        self._stop.set()


class Fleet:
    """The driver's handle on a running fleet. Call inside ``ray.init(...)``: :meth:`start`, then
    :meth:`wait` / :meth:`statuses` / :meth:`ask`; :meth:`stop` at the end (actors also end with the driver).

    ``prefer_nodes`` (camera id -> Ray node id) places a camera on a node while that node lives (a soft
    preference: after the node is lost the camera restarts wherever its resources are free).
    """

    def __init__(self, config: FleetConfig, *, run_id: str | None = None, prefer_nodes: dict[str, str] | None = None) -> None:
        self.config = config
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.namespace = namespace_of(config)
        self.prefer_nodes = dict(prefer_nodes or {})
        self.recorder: Any = None
        self.actors: dict[str, Any] = {}

    def start(self) -> Fleet:
        """Create the recorder and one actor per camera (they load and start reading on their own)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        try:
            ray.get_actor(RECORDER, namespace=self.namespace)
        except ValueError:
            pass
        else:
            raise StreamVLMError(f"a fleet named {self.config.name!r} is already running on this Ray cluster "
                                 "(give this one another [fleet] name)")
        here = ray.get_runtime_context().get_node_id()
        recorder_cls = ray.remote(_Recorder)
        self.recorder = recorder_cls.options(
            name=RECORDER, namespace=self.namespace, num_cpus=0, max_restarts=-1, max_task_retries=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        ).remote(str(self.config.event_db), self.config.webhook, str(status_file(self.config)))
        ray.get(self.recorder.all_statuses.remote())  # up before any camera needs it
        camera_cls = ray.remote(_CameraActor)
        home = os.environ.get("STREAMVLM_HOME")
        for camera in self.config.cameras:
            group = self.config.group_of(camera)
            options: dict[str, Any] = dict(num_cpus=group.num_cpus, num_gpus=group.num_gpus, max_restarts=-1,
                                           max_concurrency=4, name=f"camera-{camera.id}", namespace=self.namespace)
            if group.resources:
                options["resources"] = dict(group.resources)
            if camera.id in self.prefer_nodes:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.prefer_nodes[camera.id], soft=True)
            self.actors[camera.id] = camera_cls.options(**options).remote(self.config, camera, self.run_id, self.namespace, home)
        return self

    def statuses(self, timeout_s: float = 2.0) -> dict[str, dict[str, Any]]:
        """Each camera's status from its actor; a camera whose actor does not answer in time (restarting,
        waiting for resources) shows its last reported status with state ``unreachable``."""
        import ray

        last = ray.get(self.recorder.all_statuses.remote())
        refs = {cid: actor.status.remote() for cid, actor in self.actors.items()}
        out: dict[str, dict[str, Any]] = {}
        for cid, ref in refs.items():
            try:
                out[cid] = ray.get(ref, timeout=timeout_s)
            except Exception as exc:  # RayActorError, GetTimeoutError: not reachable right now
                out[cid] = {**last.get(cid, {"camera": cid}), "state": "unreachable", "error": type(exc).__name__}
        return out

    def wait(self, timeout_s: float | None = None, poll_s: float = 0.5, on_poll=None) -> dict[str, dict[str, Any]]:
        """Block until every camera has ended or failed (or ``timeout_s``); returns the statuses."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            statuses = self.statuses()
            if on_poll is not None:
                on_poll(statuses)
            if all(s.get("state") in ("ended", "failed") for s in statuses.values()):
                return statuses
            if deadline is not None and time.monotonic() > deadline:
                raise StreamVLMError(f"the fleet did not finish within {timeout_s:.0f} s: "
                                     + ", ".join(f"{c} {s.get('state')}" for c, s in statuses.items()))
            time.sleep(poll_s)

    def ask(self, camera_id: str, question: str, request_id: str, timeout_s: float = 300.0) -> dict[str, Any]:
        """Ask one camera a question from its memory; the answer is logged once per ``request_id``."""
        import ray

        if camera_id not in self.actors:
            raise StreamVLMError(f"no camera {camera_id!r} in fleet {self.config.name!r}")
        return ray.get(self.actors[camera_id].ask.remote(question, request_id), timeout=timeout_s)

    def kill(self, camera_id: str) -> None:
        """Kill a camera's actor process as a crash would (Ray restarts it)."""
        import ray

        ray.kill(self.actors[camera_id], no_restart=False)

    def events(self, after_id: int = 0) -> list[dict[str, Any]]:
        import ray

        return ray.get(self.recorder.events.remote(after_id))

    def stop(self) -> None:
        """Stop every camera and the recorder for good."""
        import ray

        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        if self.recorder is not None:
            try:
                ray.kill(self.recorder, no_restart=True)
            except Exception:
                pass
