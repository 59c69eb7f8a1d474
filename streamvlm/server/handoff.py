"""Sessions that outlive their replica: snapshots in shared storage, so ``?resume=<handle>`` lands anywhere.

Several servers (Ray Serve replicas, or plain processes) that share one directory (NFS, a shared
volume, a mounted bucket with rename) pass sessions to each other through it. A :class:`Handoff`
attached to a :class:`~.driver.SessionHost` writes a session's snapshot there

* when its client leaves (the session is parked, within the resume window),
* every ``snapshot_every_s`` seconds while its client is connected (so a replica that dies takes at
  most that much of the stream with it), and
* when the host stops (a replica scaled down or drained: its clients are told to resume elsewhere);

and a host that is asked to resume a handle it does not hold looks the handle up there and rebuilds
the session: working memory and long-term store (:mod:`streamvlm.engine.snapshot`, checksummed),
settings, watches with their trigger rules, what the client missed, and stream time continuing from
the last frame. Responses that were open when the snapshot was taken end ``failed`` (``server_error``)
on the new replica: exactly one ``response.done`` each, as everywhere.

Layout of the shared directory::

    sessions/<session id>/session.json   the realtime session (settings, watches, missed events, ...)
    sessions/<session id>/memory/        the engine snapshot (absent before the first frame or question)
    sessions/<session id>.moved          tombstone: another replica took the session up (its epoch inside)
    handles/<sha256 of a handle>         the session id the handle resumes (the handle itself is never stored)

Writes are atomic (a staging directory renamed into place); a resume *claims* the snapshot by renaming
it away, so two replicas never take up the same session. A replica that still holds a session another
replica has taken up (the client came back elsewhere first) sees the tombstone and lets its copy go.
Snapshots that nobody refreshed for longer than the resume window (a dead replica's parked
sessions nobody came back for) are swept by any replica.

The snapshot of a live session is taken in its model thread between two steps (:class:`SnapshotWorker`),
so it is always a consistent state; it costs that thread the time to write the session's memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from ..config import MemoryConfig, SamplingConfig, SessionConfig
from ..dialogue import ControllerConfig, TriggerSpec
from ..engine.snapshot import load_session, save_session
from ..engine.worker import LiveWorker
from ..errors import ConfigError, InputError
from ..ingest.clock import SessionClock
from ..protocol import messages as m
from ..protocol import session as core

if TYPE_CHECKING:
    from ..engine.session import StreamSession
    from .driver import HostedSession, SessionHost

__all__ = ["Handoff", "HandoffConfig", "SnapshotWorker", "handle_key"]

FORMAT, VERSION = "streamvlm-realtime-session", 1
_STATE = "session.json"
_MEMORY = "memory"


def handle_key(handle: str) -> str:
    """The file name a resume handle is filed under: a hash, so the storage never holds a usable handle."""
    return hashlib.sha256(handle.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class HandoffConfig:
    """Where snapshots go and how often; checked when built (:class:`ConfigError`)."""

    # The directory every replica shares (created if missing).
    snapshot_dir: str
    # Seconds between snapshots of a session whose client is connected; None: only when it is parked
    # or the server stops (a replica that dies then loses its live sessions).
    snapshot_every_s: float | None = 10.0
    # This replica's name, in metrics and in the snapshots it writes.
    replica: str = "local"
    # Most seconds a snapshot may wait for its model thread before it is given up (and counted as failed).
    save_timeout_s: float = 60.0
    # Snapshots not refreshed for this many seconds are swept by any replica (None: resume_window_s plus
    # two snapshot periods).
    stale_after_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.snapshot_dir, str) or not self.snapshot_dir:
            raise ConfigError("snapshot_dir: must name a directory shared by every replica")
        for name in ("snapshot_every_s", "stale_after_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: must be a number of seconds > 0 or None, got {value!r}")
        if not (isinstance(self.save_timeout_s, (int, float)) and self.save_timeout_s > 0):
            raise ConfigError(f"save_timeout_s: must be > 0, got {self.save_timeout_s!r}")


class SnapshotWorker(LiveWorker):
    """A :class:`LiveWorker` that can also save its session between two steps: :meth:`snapshot`."""

    def snapshot(self, path: Path) -> asyncio.Future:
        """Save the session to ``path`` in the model thread, after the control already queued. The
        future resolves with ``path``, or with the error (e.g. an answer still streaming: try later)."""
        assert self._loop is not None, "start() first"
        future = self._loop.create_future()
        self._control_event("snapshot", path, future)
        return future

    def _do_control(self, item: tuple[str, tuple]) -> None:
        kind, args = item
        if kind != "snapshot":
            super()._do_control(item)
            return
        path, future = args
        error: BaseException | None = None
        try:
            save_session(self.session, path)
        except Exception as exc:  # reported to the caller of snapshot(), not to the client
            error = exc
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_settle, future, path, error)


def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():  # the caller gave up waiting
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


class Handoff:
    """Snapshots of one host's sessions in the shared directory, and sessions rebuilt from them.

    Build it, pass it to the host (``SessionHost(..., handoff=Handoff(config))``); the host calls
    the hooks below. Failures to save never end a session: they are counted
    (``streamvlm_snapshots_total{outcome="failed"}``) and written to stderr with the reason.
    """

    def __init__(self, config: HandoffConfig) -> None:
        self.config = config
        self.root = Path(config.snapshot_dir)
        (self.root / "sessions").mkdir(parents=True, exist_ok=True)
        (self.root / "handles").mkdir(parents=True, exist_ok=True)
        self.host: SessionHost | None = None
        self._epochs: dict[str, int] = {}  # session id -> how many times it moved (this copy's generation)
        self._aliases: dict[str, str] = {}  # session id -> the handle key filed for it
        self._saving: set[str] = set()
        self._pending: set[asyncio.Task] = set()

    # ---- hooks the host calls ------------------------------------------------------------------------
    def attach(self, host: SessionHost) -> None:
        self.host = host
        registry = host.metrics.registry
        self.snapshots = Counter("streamvlm_snapshots", "Session snapshots in shared storage, by outcome "
                                 "(saved, failed, restored, refused).", ["outcome", "replica"], registry=registry)
        for outcome in ("saved", "failed", "restored", "refused"):
            self.snapshots.labels(outcome=outcome, replica=self.config.replica)
        info = Gauge("streamvlm_replica_info", "This replica (1); its name in the label.", ["replica"], registry=registry)
        info.labels(replica=self.config.replica).set(1)

    def worker(self, stream: StreamSession, controller: ControllerConfig) -> LiveWorker:
        return SnapshotWorker(stream, controller)

    def parked(self, session: HostedSession) -> None:
        """The client left: save the session now (in the background), so a resume lands anywhere."""
        self._spawn(self.save(session, wait_idle=True))

    def handle_changed(self, session: HostedSession) -> None:
        """The session's handle rotated: file the new one (the old one stops working, here and everywhere)."""
        new = handle_key(session.core.handle)
        old = self._aliases.get(session.id)
        if old == new:
            return
        try:
            _write_atomic(self.root / "handles" / new, session.id)
            self._aliases[session.id] = new
            if old is not None:
                (self.root / "handles" / old).unlink(missing_ok=True)
        except OSError as exc:
            self._failed(session, f"the resume handle could not be filed: {exc}")

    def released(self, session: HostedSession) -> None:
        """The session left this host alive (taken up elsewhere, or saved at stop): keep its snapshot."""
        self._aliases.pop(session.id, None)

    def forget(self, session: HostedSession) -> None:
        """The session ended for good: its snapshot and handle go too."""
        alias = self._aliases.pop(session.id, None)
        if alias is not None:
            (self.root / "handles" / alias).unlink(missing_ok=True)
        if not self._superseded(session):
            shutil.rmtree(self.root / "sessions" / session.id, ignore_errors=True)
        self._epochs.pop(session.id, None)

    async def save(self, session: HostedSession, *, wait_idle: bool = False) -> bool:
        """Write ``session``'s snapshot; True when it is in place. Never raises (a failure is counted and logged)."""
        if session.id in self._saving or self._superseded(session):
            return False
        self._saving.add(session.id)
        staging = self.root / "sessions" / f".{session.id}.saving-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir(parents=True)
            worker = session.worker
            if worker is not None:
                if wait_idle:  # a client that left mid-answer: its answer is being cancelled
                    for _ in range(100):
                        if worker.idle:
                            break
                        await asyncio.sleep(0.05)
                if not isinstance(worker, SnapshotWorker):
                    raise ConfigError("the session's worker cannot take snapshots")
                await asyncio.wait_for(worker.snapshot(staging / _MEMORY), self.config.save_timeout_s)
            state = self._describe(session, memory=worker is not None)
            await asyncio.to_thread(_write_atomic, staging / _STATE, json.dumps(state))
            if self._superseded(session):  # taken up elsewhere while this was written
                shutil.rmtree(staging, ignore_errors=True)
                return False
            await asyncio.to_thread(_replace_dir, staging, self.root / "sessions" / session.id)
            self.handle_changed(session)
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            self._failed(session, f"{type(exc).__name__}: {exc}")
            return False
        finally:
            self._saving.discard(session.id)
        self.snapshots.labels(outcome="saved", replica=self.config.replica).inc()
        return True

    async def restore(self, handle: str) -> HostedSession | None:
        """The session ``handle`` resumes, rebuilt from its snapshot and registered with the host (parked
        until the caller attaches the client); None when no snapshot holds it. Raises InputError for a
        snapshot that cannot be loaded (it is kept aside as ``.ID.damaged-*`` for inspection)."""
        assert self.host is not None
        alias = self.root / "handles" / handle_key(handle)
        try:
            session_id = alias.read_text().strip()
        except OSError:
            return None
        if not session_id or "/" in session_id or session_id.startswith("."):
            return None
        src = self.root / "sessions" / session_id
        for _ in range(60):  # the replica that holds it may be writing it right now (its client just left)
            if not any(src.parent.glob(f".{session_id}.saving-*")):
                break
            await asyncio.sleep(0.05)
        claimed = src.parent / f".{session_id}.claimed-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(src, claimed)  # atomic: one replica wins
        except OSError:
            return None
        try:
            state = json.loads((claimed / _STATE).read_text())
            epoch = _int(state, "epoch") + 1
            _write_atomic(Path(f"{src}.moved"), str(epoch))
            stream = await asyncio.to_thread(load_session, self.host.adapter, claimed / _MEMORY) if state.get("memory") else None
            session, reasks = self._rebuild(state, handle, stream)
        except Exception as exc:
            os.rename(claimed, src.parent / f".{session_id}.damaged-{uuid.uuid4().hex[:8]}")
            self.snapshots.labels(outcome="refused", replica=self.config.replica).inc()
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{claimed / _STATE}: {type(exc).__name__}: {exc}") from exc
        shutil.rmtree(claimed, ignore_errors=True)
        alias.unlink(missing_ok=True)
        self._epochs[session.id] = epoch
        if stream is not None:
            await self.host._start_worker(session, core.StartWorker(session.core.session_config, session.core.memory_config,
                                                                    session.core.controller_config), stream)
            await self.host._execute(session, reasks)  # deferred questions wait on here
        self.snapshots.labels(outcome="restored", replica=self.config.replica).inc()
        return session

    async def run(self) -> None:
        """The periodic loop: snapshots of live sessions, letting go of sessions taken up elsewhere, sweeping."""
        assert self.host is not None
        every = self.config.snapshot_every_s
        tick = min(every, 2.0) if every else 2.0
        last_save = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            host = self.host
            for session in list(host.sessions.values()):
                if self._superseded(session):
                    await host._release(session, "the session was resumed on another replica", "moved", 1000)
            if every is not None and time.monotonic() - last_save >= every:
                last_save = time.monotonic()
                for session in list(host.sessions.values()):
                    if session.ws is not None and session.id in host.sessions:
                        await self.save(session)
            await asyncio.to_thread(self._sweep)

    async def drain(self) -> None:
        """Wait for snapshots started in the background (parked sessions)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # ---- internals ---------------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _failed(self, session: HostedSession, why: str) -> None:
        self.snapshots.labels(outcome="failed", replica=self.config.replica).inc()
        print(f"streamvlm: replica {self.config.replica}: snapshot of session {session.id} failed: {why}",
              file=sys.stderr, flush=True)

    def _superseded(self, session: HostedSession) -> bool:
        """True when another replica took this session up after this copy of it began."""
        try:
            taken = int((self.root / "sessions" / f"{session.id}.moved").read_text() or 0)
        except (OSError, ValueError):
            return False
        return taken > self._epochs.get(session.id, 0)

    def _describe(self, session: HostedSession, *, memory: bool) -> dict[str, Any]:
        state = session.core
        return {
            "format": FORMAT, "version": VERSION, "id": state.id, "model": state.model,
            "epoch": self._epochs.get(session.id, 0), "saved_by": self.config.replica, "saved_at": time.time(),
            "session_config": asdict(state.session_config), "memory_config": asdict(state.memory_config),
            "controller_config": asdict(state.controller_config),
            "started": state.started, "last_t": state.clock.last_t,
            "watches": [{"watch_id": w.watch_id, "condition": w.condition, "spec": None if w.spec is None else asdict(w.spec)}
                        for w in session.watch_specs.values()],
            "missed": state.missed if session.ws is None else [],  # kept by the core for a client that is away
            "open_responses": state.open_response_books(),
            "memory": memory,
        }

    def _rebuild(self, state: dict[str, Any], handle: str, stream: StreamSession | None) -> tuple[HostedSession, list]:
        """The session of ``state``, registered with the host, and the Ask commands that carry its open
        deferred questions over ("tell me when ..." waits on here); every other open response was cut
        short by the move and ends ``failed`` (kept for the client, with the reason)."""
        assert self.host is not None
        host = self.host
        if state.get("format") != FORMAT or state.get("version") != VERSION:
            raise InputError(f"not a {FORMAT} version {VERSION} snapshot")
        if state.get("model") != host.adapter.source:
            raise InputError(f"the session ran on {state.get('model')!r}, this replica serves {host.adapter.source!r}")
        session_config = _session_config(dict(state["session_config"]))
        memory_config = MemoryConfig(**state["memory_config"])
        controller = dict(state["controller_config"])
        controller_config = ControllerConfig(default_trigger=TriggerSpec(**controller.pop("default_trigger")), **controller)
        realtime = core.RealtimeSession(state["model"], host.limits, host.policy, host._budget_check, id=str(state["id"]))
        realtime.session_config, realtime.memory_config, realtime.controller_config = session_config, memory_config, controller_config
        realtime.handle = handle
        realtime.started = bool(state["started"])
        realtime.worker_started = stream is not None
        last_t = float(state["last_t"])
        if stream is not None and math.isfinite(stream.last_t):
            last_t = max(last_t, stream.last_t)
        realtime.clock = SessionClock(start_t=last_t, origin_s=time.monotonic())
        lost, reasks = [], []
        for response in state["open_responses"]:
            if stream is not None and response["trigger"] == "deferred" and response["question"]:
                reasks += realtime.reopen(response["response_id"], response["trigger"], response["client_event_id"],
                                          response["question"], time.monotonic(), response.get("max_output_tokens"))
                continue
            message = "the replica serving this response stopped before it ended; ask again"
            lost += [m.error_event("server_error", message, None, response["client_event_id"], response["response_id"]),
                     m.response_done(response["response_id"], "failed", response["trigger"], "",
                                     client_event_id=response["client_event_id"], no_video=True,
                                     error={"code": "server_error", "message": message}, question=response["question"])]
        realtime.keep_missed([*state["missed"], *lost])
        for watch in state["watches"]:
            realtime.watches[watch["watch_id"]] = watch["condition"]
        session = host.adopt(realtime)
        for watch in state["watches"]:
            spec = None if watch["spec"] is None else TriggerSpec(**watch["spec"])
            session.watch_specs[watch["watch_id"]] = core.Watch(watch["watch_id"], watch["condition"], spec)
        return session, reasks

    def _sweep(self) -> None:
        """Remove snapshots nobody refreshed within the resume window (and old tombstones and leftovers)."""
        assert self.host is not None
        every = self.config.snapshot_every_s or 0.0
        stale = self.config.stale_after_s or (self.host.config.resume_window_s + 2 * every + 5.0)
        now = time.time()
        local = set(self.host.sessions)
        sessions = self.root / "sessions"
        for entry in sessions.iterdir():
            try:
                age = now - entry.stat().st_mtime
                if entry.name.startswith("."):
                    if age > stale and (".saving-" in entry.name or ".claimed-" in entry.name):
                        shutil.rmtree(entry, ignore_errors=True)
                elif entry.name.endswith(".moved"):
                    if age > stale:
                        entry.unlink(missing_ok=True)
                elif entry.name not in local and now - (entry / _STATE).stat().st_mtime > stale:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                continue  # another replica got there first
        for alias in (self.root / "handles").iterdir():
            try:
                if now - alias.stat().st_mtime > stale and not (sessions / alias.read_text().strip()).exists():
                    alias.unlink(missing_ok=True)
            except OSError:
                continue


def _int(state: dict[str, Any], name: str) -> int:
    value = state.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(f"'{name}' must be an integer >= 0, got {value!r}")
    return value


def _session_config(data: dict[str, Any]) -> SessionConfig:
    sampling = data.pop("sampling")
    return SessionConfig(sampling=SamplingConfig(**sampling), **data)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _replace_dir(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` directory to ``out``; an earlier snapshot there is removed afterwards."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)
