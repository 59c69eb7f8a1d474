"""``streamvlm bench soak``: many sessions, long accelerated streams and random client behaviour, through the real server.

One process starts a :class:`~streamvlm.server.app.StreamServer` on 127.0.0.1 (an ephemeral port)
with one loaded model and a frame-rate limit of ``fps``, then runs ``sessions`` client slots at once.
Every slot is a raw WebSocket client (the ``websockets`` library, JSON events and binary frames, no
helper library in between), so what is counted is exactly what the server sent. Each slot plays
``frames`` synthetic frames as fast as the rate limit allows, split over one or more sessions: every
pair of memory policy and position strategy (``session.update`` ``memory.policy`` /
``memory.positions``, locked once a stream starts) gets its own session, and the pairs are dealt to
the slots in turn. Between frames a seeded random schedule mixes in:

* questions (``conversation.item.create`` + ``response.create``), sometimes two or three back to
  back, sometimes with ``max_output_tokens``, sometimes a "tell me when ..." (deferred) question;
* ``response.cancel`` without an id, with the id of a response of this session, with an unknown id;
* ``watch.create`` / ``watch.delete`` (also of an id that is not watched);
* a disconnect followed by ``?resume=<latest handle>`` (or, when the server says the session cannot
  be resumed, a fresh session with the same settings).

Every ``response.create`` carries a unique ``event_id``; a :class:`LifecycleChecker` per session
correlates the server's response events by ``response.client_event_id`` and counts *lifecycle
violations*: a create without exactly one ``response.created`` and exactly one ``response.done``, a
response event after its ``done``, a ``done`` without ``created``, a status outside the four, more
output tokens than ``max_output_tokens`` allowed, a resume refused with the latest handle, a session
closed or refused by the server. *Engine faults* are ``error`` events with code ``server_error`` or
``engine_fault`` plus the server's ``streamvlm_engine_faults_total`` metric when it exports one.

Also reported: errors by code, answers and frame counters per session (the server's last
``input_frame.stats``), the process's RSS (``VmRSS``) when 10 % of all frames were sent and at the
end (``rss_growth_ratio`` = end / 10 %), and ``threading.active_count()`` before the server started
and after it stopped. Server and clients share one process and one event loop, so RSS includes the
clients (small: they hold counters, not events).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.protocol import State

from ..config import ModelConfig, POLICIES, ServerConfig
from ..engine.check import synthetic_frames
from ..errors import ConfigError
from ..models import load_model
from ..models.device import precision_of
from ..protocol import Limits, encode_frame
from ..server.app import StreamServer
from .memory import rss_bytes

__all__ = [
    "FAULT_CODES",
    "POSITIONS",
    "LifecycleChecker",
    "WireClient",
    "run_soak_bench",
    "vm_rss_bytes",
    "scrape_metrics",
    "metric_total",
    "free_threads",
]

#: ``error`` codes that mean the server (not the client) failed.
FAULT_CODES = frozenset({"server_error", "engine_fault"})
#: The position strategies of ``MemoryConfig.positions``.
POSITIONS = ("keep", "reindex")
_STATUSES = frozenset({"completed", "cancelled", "incomplete", "failed"})
_ANSWERED = frozenset({"completed", "incomplete"})
_FRAME_SIZE = (120, 160)
_BASE_FRAMES = 32
_STATS_EVERY_S = 0.5
_PTS_STEP_S = 0.5  # stream time between two frames: a 2 fps camera played as fast as the rate limit allows
_MAX_WATCHES = 3
_EXAMPLES = 20
QUESTIONS = ("What is happening in the video?", "What colour is the square?", "Where is the square now?",
             "What changed since the start?", "Describe the background.")
CONDITIONS = ("a red square is visible", "the square touches the left edge", "the background turns white")


def proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes, or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def vm_rss_bytes() -> int:
    """This process's resident set size in bytes (``VmRSS``; the memory bench's reading where /proc has none)."""
    rss = proc_status_bytes("VmRSS")
    return rss if rss is not None else rss_bytes()


def free_threads() -> int:
    """Live Python threads, not counting tqdm's progress-bar monitor (it outlives the bars by design)."""
    return sum(1 for t in threading.enumerate() if type(t).__name__ != "TMonitor")


# --------------------------------------------------------------------------- the lifecycle checker (no I/O)


@dataclass
class _Ask:
    """One ``response.create`` this client sent, and what the server said about it."""

    cid: str  # its event_id
    sent_at: float
    deferred: bool = False
    max_tokens: int | None = None  # response.max_output_tokens, when sent
    rid: str | None = None
    created: int = 0
    done: int = 0
    status: str | None = None
    first_delta_at: float | None = None
    done_at: float | None = None
    refused: str | None = None  # the code of an error naming this create, when refused before any response.created
    interrupted: bool = False  # its connection was closed by the client before its response.done

    @property
    def resolved(self) -> bool:
        return self.done > 0 or (self.refused is not None and self.created == 0) or self.interrupted


@dataclass
class LifecycleChecker:
    """Checks the request lifecycle of one realtime session from the events its client saw. No I/O, no clock.

    Call :meth:`asked` when sending a ``response.create`` (with its unique ``event_id``),
    :meth:`received` for every server event, :meth:`disconnected` when the client closes the connection
    itself (responses then still open are not expected to finish: nothing is replayed after a resume),
    and :meth:`finish` at the end; then read :attr:`violations` (counts by kind) and
    :attr:`examples`. Responses are matched to creates by ``response.client_event_id``; when the server
    sends no such field the checker counts ``missing_client_event_id`` and falls back to binding
    responses to creates in order, so the other checks still mean something.
    """

    asks: dict[str, _Ask] = field(default_factory=dict)
    violations: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    alerts: int = 0
    no_video: int = 0
    _by_rid: dict[str, _Ask | None] = field(default_factory=dict)
    _created: set[str] = field(default_factory=set)
    _done: set[str] = field(default_factory=set)
    _unbound: deque[_Ask] = field(default_factory=deque)

    def asked(self, cid: str, now: float, *, deferred: bool = False, max_tokens: int | None = None) -> None:
        """Record a ``response.create`` sent with ``event_id`` ``cid`` at ``now`` (seconds, any origin)."""
        ask = _Ask(cid, now, deferred=deferred, max_tokens=max_tokens)
        self.asks[cid] = ask
        self._unbound.append(ask)

    def violation(self, kind: str, detail: str) -> None:
        """Count one violation of ``kind`` (keeping the first few ``detail`` strings as examples)."""
        self.violations[kind] += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(f"{kind}: {detail}")

    def _bind_fallback(self, rid: str, *, deferred_only: bool = False) -> _Ask | None:
        for ask in list(self._unbound):
            if ask.rid is None and ask.refused is None and (ask.deferred or not deferred_only):
                self._unbound.remove(ask)
                ask.rid = rid
                self._by_rid[rid] = ask
                return ask
        return None

    def received(self, event: dict[str, Any], now: float) -> None:
        """Feed one server event (any type; those not about responses or errors are ignored)."""
        kind = event.get("type")
        if kind == "response.created":
            self._on_created(event.get("response") or {})
        elif kind == "response.output_text.delta":
            rid = event.get("response_id")
            self._after_done_or_unknown(rid, kind)
            ask = self._by_rid.get(rid) if isinstance(rid, str) else None
            if ask is not None and ask.first_delta_at is None:
                ask.first_delta_at = now
        elif kind == "response.acknowledged":
            rid = event.get("response_id")
            if isinstance(rid, str) and rid not in self._by_rid:
                self._bind_fallback(rid, deferred_only=True)
            self._after_done_or_unknown(rid, kind)
        elif kind == "response.done":
            self._on_done(event.get("response") or {}, now)
        elif kind == "error":
            error = event.get("error") or {}
            ask = self.asks.get(error.get("event_id")) if isinstance(error.get("event_id"), str) else None
            if ask is not None and ask.created == 0 and ask.refused is None:
                ask.refused = str(error.get("code"))
                if ask in self._unbound:
                    self._unbound.remove(ask)

    def _after_done_or_unknown(self, rid: Any, kind: str) -> None:
        if rid in self._done:
            self.violation("event_after_done", f"{kind} for {rid}")
        elif rid not in self._created:
            self.violation("event_without_created", f"{kind} for {rid}")

    def _on_created(self, response: dict[str, Any]) -> None:
        rid = response.get("id")
        if not isinstance(rid, str):
            self.violation("malformed_response", f"response.created without an id: {response}")
            return
        if rid in self._created:
            self.violation("duplicate_created", rid)
            return
        self._created.add(rid)
        if response.get("trigger") in ("watch", "commentary"):
            self._by_rid[rid] = None
            if response.get("trigger") == "watch":
                self.alerts += 1
            return
        if "client_event_id" not in response:
            self.violation("missing_client_event_id", f"response.created {rid}")
            ask = self._by_rid.get(rid) or self._bind_fallback(rid)
        else:
            cid = response["client_event_id"]
            ask = self.asks.get(cid) if isinstance(cid, str) else None
            if ask is None:
                self.violation("created_for_unknown_event", f"{rid} names {cid!r}")
                self._by_rid[rid] = None
                return
            if ask in self._unbound:
                self._unbound.remove(ask)
            ask.rid = rid
            self._by_rid[rid] = ask
        if ask is None:
            return
        ask.created += 1
        if ask.created > 1:
            self.violation("duplicate_created", f"{ask.cid} got a second response {rid}")

    def _on_done(self, response: dict[str, Any], now: float) -> None:
        rid = response.get("id")
        status = response.get("status")
        if rid in self._done:
            self.violation("duplicate_done", str(rid))
            return
        if rid not in self._created:
            self.violation("done_without_created", f"{rid} ({response.get('trigger')}, {status})")
        self._done.add(rid)
        if status not in _STATUSES:
            self.violation("bad_status", f"{rid}: {status!r}")
        if response.get("no_video") is True and status in _ANSWERED:
            self.no_video += 1
        ask = self._by_rid.get(rid) if isinstance(rid, str) else None
        if rid not in self._by_rid and response.get("trigger") not in ("watch", "commentary"):
            ask = self._bind_fallback(rid) if "client_event_id" not in response else self.asks.get(response["client_event_id"])
            if isinstance(rid, str):
                self._by_rid[rid] = ask
        if ask is None:
            return
        if "client_event_id" in response and response["client_event_id"] != ask.cid:
            self.violation("done_names_other_event", f"{rid}: {response['client_event_id']!r} != {ask.cid!r}")
        ask.done += 1
        ask.status = status
        ask.done_at = now
        used = (response.get("usage") or {}).get("output_tokens")
        if ask.max_tokens is not None and isinstance(used, int) and used > ask.max_tokens:
            self.violation("max_output_tokens_exceeded", f"{rid}: {used} > {ask.max_tokens}")

    def disconnected(self) -> None:
        """The client closed the connection: responses still open may end unseen."""
        for ask in self.asks.values():
            if ask.done == 0 and not (ask.refused is not None and ask.created == 0):
                ask.interrupted = True

    def pending(self) -> list[_Ask]:
        """Creates still waiting for their ``response.done`` (not refused, not cut off by a disconnect)."""
        return [ask for ask in self.asks.values() if not ask.resolved]

    def finish(self) -> None:
        """Count the creates that never got their ``response.created`` / ``response.done``; call once, at the end."""
        for ask in self.asks.values():
            if ask.resolved and ask.done == 0:
                continue  # refused, or cut off by the client's own disconnect
            if ask.created == 0:
                self.violation("no_created", ask.cid)
            if ask.done == 0:
                self.violation("no_done", f"{ask.cid} ({ask.rid})")

    def answers(self) -> int:
        """Responses to this client's questions that ended ``completed`` or ``incomplete``."""
        return sum(1 for ask in self.asks.values() if ask.status in _ANSWERED)

    def statuses(self) -> Counter[str]:
        return Counter(ask.status for ask in self.asks.values() if ask.status is not None)


# --------------------------------------------------------------------------- a raw WebSocket client


class WireClient:
    """One raw WebSocket connection to ``/v1/realtime`` that counts what the server sends.

    A reader task parses every text message, counts it by type, hands it to the ``checker`` (if any)
    and keeps the latest resume handle, ``input_frame.stats`` and close code; errors are counted by
    code. Nothing is kept per event, so a long run holds constant memory. Send with :meth:`send` /
    :meth:`send_raw` / :meth:`send_frame` (they return False once the connection is closed), wait
    with :meth:`wait_for` / :meth:`wait_until`, end with :meth:`close`.
    """

    def __init__(self, ws: ClientConnection, checker: LifecycleChecker | None) -> None:
        self.ws = ws
        self.checker = checker
        self.types: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.errors_without_event_id = 0
        self.fault_examples: list[str] = []  # "code: message" of the first few fault-coded errors
        self.session_id: str | None = None
        self.handle: str | None = None
        self.resumable = False
        self.frame_stats: dict[str, Any] | None = None
        self.session: dict[str, Any] | None = None  # the settings of the last session.created / session.updated
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = asyncio.Event()
        self.closing = False  # this side started the close
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[dict[str, Any] | None]]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, *, resume: str | None = None, checker: LifecycleChecker | None = None,
                      timeout: float = 10.0) -> WireClient:
        """Open a connection (``?resume=`` when ``resume`` is given). Raises OSError or InvalidHandshake when refused at the HTTP level."""
        target = f"{url}?resume={quote(resume, safe='')}" if resume else url
        ws = await connect(target, compression=None, max_size=2**24, open_timeout=timeout, close_timeout=timeout)
        return cls(ws, checker)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.types["<binary>"] += 1
                    continue
                try:
                    event = json.loads(message)
                except ValueError:
                    self.types["<unparsable>"] += 1
                    continue
                if isinstance(event, dict):
                    self._on_event(event)
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.close_reason = self.ws.close_reason or ""
            self.closed.set()
            for _, future in self._waiters:
                if not future.done():
                    future.set_result(None)
            self._waiters.clear()

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = str(event.get("type"))
        self.types[kind] += 1
        if kind in ("session.created", "session.updated"):
            session = event.get("session") or {}
            self.session = session
            self.session_id = session.get("id", self.session_id)
        elif kind == "session.resumption_update":
            self.handle = event.get("new_handle")
            self.resumable = bool(event.get("resumable")) and self.handle is not None
        elif kind == "input_frame.stats":
            self.frame_stats = event
        elif kind == "error":
            error = event.get("error") or {}
            self.errors[str(error.get("code"))] += 1
            if error.get("event_id") is None:
                self.errors_without_event_id += 1
            if error.get("code") in FAULT_CODES and len(self.fault_examples) < _EXAMPLES:
                self.fault_examples.append(f"{error.get('code')}: {error.get('message')}")
        if self.checker is not None:
            self.checker.received(event, time.monotonic())
        for predicate, future in list(self._waiters):
            if not future.done() and predicate(event):
                future.set_result(event)
                self._waiters.remove((predicate, future))

    @property
    def faults(self) -> int:
        """``error`` events whose code says the server failed."""
        return sum(self.errors[code] for code in FAULT_CODES)

    async def send(self, event: dict[str, Any]) -> bool:
        """Send one JSON event; False when the connection is closed."""
        return await self.send_raw(json.dumps(event))

    async def send_raw(self, data: str | bytes) -> bool:
        """Send one text or binary message as it is; False when the connection is closed."""
        try:
            await self.ws.send(data)
            return True
        except ConnectionClosed:
            return False

    async def send_frame(self, image: np.ndarray | bytes, pts_s: float | None, source_id: str = "default") -> bool:
        """Send one binary frame message; False when the connection is closed."""
        return await self.send_raw(encode_frame(image, pts_s, source_id))

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """The next event for which ``predicate`` is true, or None on timeout or when the connection closes."""
        if self.closed.is_set():
            return None
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass or the connection closes (False)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.closed.is_set() or time.monotonic() >= deadline:
                return condition()
            await asyncio.sleep(0.05)
        return True

    async def opened(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """Wait for ``session.created``; the refusing ``error`` event (e.g. ``session_limit``) or None if none came."""
        event = await self.wait_for(lambda e: e.get("type") in ("session.created", "error"), timeout)
        if event is None and self.closed.is_set():
            return None
        return event

    async def close(self, timeout: float = 10.0) -> None:
        """Close the connection and wait until every message the server sent before its close was read."""
        self.closing = True
        if self.ws.state is not State.CLOSED:
            try:
                await asyncio.wait_for(self.ws.close(), timeout)
            except (asyncio.TimeoutError, ConnectionClosed, OSError):
                pass
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except asyncio.TimeoutError:
            self._reader.cancel()


# --------------------------------------------------------------------------- /metrics


async def scrape_metrics(host: str, port: int, timeout: float = 5.0) -> str | None:
    """``GET /metrics`` from the server; the exposition text, or None when it is not served."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].split(" ")[1:2] == ["200"]:
            return None
        length = next((int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), None)
        body = await asyncio.wait_for(reader.readexactly(length) if length is not None else reader.read(), timeout)
        return body.decode("utf-8", "replace")
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        return None
    finally:
        writer.close()


def metric_total(text: str | None, name: str) -> float | None:
    """The sum of every sample of metric ``name`` (all label sets) in exposition ``text``; None when absent."""
    total: float | None = None
    for line in (text or "").splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key.split("{", 1)[0].strip() == name:
            try:
                total = (total or 0.0) + float(value)
            except ValueError:
                continue
    return total


# --------------------------------------------------------------------------- the soak


class _Pacer:
    """Spaces sends ``1 / rate`` seconds apart; after a stall (an action, a resume) it restarts instead of bursting."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next = time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        if self.next > now:
            await asyncio.sleep(self.next - now)
        elif now - self.next > 0.25:
            self.next = now
        self.next += self.interval


_ACTIONS = ("ask", "ask_burst", "ask_deferred", "cancel", "cancel_known", "cancel_unknown", "watch_create",
            "watch_delete", "resume")
_WEIGHTS = (30, 8, 4, 8, 8, 6, 10, 6, 8)


def _schedule(rng: random.Random, frames: int) -> dict[int, list[str]]:
    """Frame index -> actions to take after that frame: every kind at least once, then a weighted random mix."""
    count = max(len(_ACTIONS), frames // 20)
    kinds = list(_ACTIONS) + rng.choices(_ACTIONS, weights=_WEIGHTS, k=count - len(_ACTIONS))
    rng.shuffle(kinds)
    plan: dict[int, list[str]] = {}
    last = max(2, frames - 1)
    for kind in kinds:
        plan.setdefault(rng.randrange(1, last), []).append(kind)
    return plan


@dataclass
class _Context:
    url: str
    host: str
    port: int
    base: list[np.ndarray]
    fps: float
    budget_tokens: int
    max_new_tokens: int
    drain_timeout_s: float
    total_frames: int
    sent_total: int = 0
    rss_at_10pct: int | None = None
    bar: Any = None

    def frame_sent(self) -> None:
        self.sent_total += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.rss_at_10pct is None and self.sent_total >= 0.1 * self.total_frames:
            self.rss_at_10pct = vm_rss_bytes()


class _Segment:
    """One session (with its resumes) of one slot: one policy and position strategy, a share of the slot's frames."""

    def __init__(self, ctx: _Context, slot: int, index: int, policy: str, positions: str, frames: int, rng: random.Random) -> None:
        self.ctx, self.slot, self.index = ctx, slot, index
        self.policy, self.positions, self.frames = policy, positions, frames
        self.rng = rng
        self.checker = LifecycleChecker()
        self.client: WireClient | None = None
        self.ids = itertools.count(1)
        self.watches: list[str] = []
        self.watch_ids = itertools.count(1)
        self.sent = 0
        self.k = 0  # frame index within the session: its stream time is k * _PTS_STEP_S
        self.actions: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.errors_without_event_id = 0
        self.faults = 0
        self.fault_examples: list[str] = []
        self.stats: dict[str, dict[str, Any]] = {}  # session id -> its last input_frame.stats
        self.session_ids: list[str] = []
        self.resumes = 0
        self.fresh_sessions = 0
        self.server_closes: Counter[str] = Counter()
        self.settings_applied: dict[str, bool] = {}

    def eid(self) -> str:
        return f"soak{self.slot}.{self.index}.{next(self.ids)}"

    # ---- connections ------------------------------------------------------------------------------
    async def _open(self, resume: str | None = None) -> bool:
        """Connect (or resume); on a fresh session send the settings. False when the server refused."""
        try:
            client = await WireClient.connect(self.ctx.url, resume=resume, checker=self.checker)
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
            self.checker.violation("session_refused", f"connect failed: {exc!r}")
            return False
        self.client = client
        first = await client.opened()
        if first is None or first.get("type") != "session.created":
            code = ((first or {}).get("error") or {}).get("code", f"closed {client.close_code}")
            self.checker.violation("resume_refused" if resume else "session_refused", str(code))
            await self._retire()
            return False
        sid = str(client.session_id)
        if resume is not None and self.session_ids and sid != self.session_ids[-1]:
            self.checker.violation("resume_changed_session", f"{self.session_ids[-1]} -> {sid}")
        if sid not in self.session_ids:
            self.session_ids.append(sid)
        if resume is None:
            cid = self.eid()
            await client.send({"type": "session.update", "event_id": cid, "session": {
                "memory": {"budget_tokens": self.ctx.budget_tokens, "policy": self.policy, "positions": self.positions},
                "sampling": {"max_new_tokens": self.ctx.max_new_tokens, "temperature": 0.0}}})
            reply = await client.wait_for(lambda e: e.get("type") == "session.updated"
                                          or (e.get("type") == "error" and (e.get("error") or {}).get("event_id") == cid), 10.0)
            memory = ((reply or {}).get("session") or {}).get("memory") or {}
            self.settings_applied = {"policy": memory.get("policy") == self.policy, "positions": memory.get("positions") == self.positions}
        return True

    async def _retire(self) -> None:
        """Fold the current connection's counters into the segment's and close it."""
        client = self.client
        if client is None:
            return
        self.client = None
        by_server = client.closed.is_set() and not client.closing
        await client.close()
        if by_server:
            self.server_closes[str(client.close_code)] += 1
        self.errors.update(client.errors)
        self.errors_without_event_id += client.errors_without_event_id
        self.faults += client.faults
        self.fault_examples += client.fault_examples[:_EXAMPLES - len(self.fault_examples)]
        if client.frame_stats is not None and client.session_id is not None:
            self.stats[client.session_id] = client.frame_stats

    async def _recover(self) -> bool:
        """The server closed the connection under us: count it, then resume (or start afresh)."""
        assert self.client is not None
        self.checker.violation("closed_by_server", f"code {self.client.close_code} {self.client.close_reason!r}")
        handle = self.client.handle if self.client.resumable else None
        await self._retire()
        self.checker.disconnected()
        return await self._reconnect(handle)

    async def _reconnect(self, handle: str | None) -> bool:
        if handle is not None:
            self.resumes += 1
            if await self._open(resume=handle):
                return True
        self.fresh_sessions += 1
        self.k = 0
        self.watches.clear()
        return await self._open()

    # ---- actions -------------------------------------------------------------------------------------
    async def _ask(self, client: WireClient, *, deferred: bool = False) -> None:
        text = f"Tell me when {self.rng.choice(CONDITIONS)}." if deferred else self.rng.choice(QUESTIONS)
        await client.send({"type": "conversation.item.create", "event_id": self.eid(), "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
        cid = self.eid()
        event: dict[str, Any] = {"type": "response.create", "event_id": cid}
        max_tokens = self.rng.choice((1, 2)) if self.rng.random() < 0.25 else None
        if max_tokens is not None:
            event["response"] = {"max_output_tokens": max_tokens}
        self.checker.asked(cid, time.monotonic(), deferred=deferred, max_tokens=max_tokens)
        await client.send(event)

    async def _act(self, kind: str) -> None:
        client = self.client
        if client is None:
            return
        self.actions[kind] += 1
        if kind == "ask":
            await self._ask(client)
        elif kind == "ask_burst":
            for _ in range(self.rng.randint(2, 3)):
                await self._ask(client)
        elif kind == "ask_deferred":
            await self._ask(client, deferred=True)
        elif kind == "cancel":
            await client.send({"type": "response.cancel", "event_id": self.eid()})
        elif kind == "cancel_known":
            open_ = [a.rid for a in self.checker.asks.values() if a.rid is not None and a.done == 0]
            known = [a.rid for a in self.checker.asks.values() if a.rid is not None]
            choices = open_ if open_ and self.rng.random() < 0.7 else known
            event: dict[str, Any] = {"type": "response.cancel", "event_id": self.eid()}
            if choices:
                event["response_id"] = self.rng.choice(choices)
            await client.send(event)
        elif kind == "cancel_unknown":
            await client.send({"type": "response.cancel", "event_id": self.eid(), "response_id": f"resp_unknown_{self.rng.randrange(10**6)}"})
        elif kind == "watch_create":
            if len(self.watches) >= _MAX_WATCHES:
                await self._act("watch_delete")
                return
            wid = f"w{next(self.watch_ids)}"
            watch: dict[str, Any] = {"id": wid, "condition": self.rng.choice(CONDITIONS), "cooldown_s": self.rng.choice((0, 1, 5))}
            if self.rng.random() < 0.5:
                watch["trigger"] = {"kind": "threshold", "on": 0.6, "off": 0.4, "m": 1, "n": 2}
            self.watches.append(wid)
            await client.send({"type": "watch.create", "event_id": self.eid(), "watch": watch})
        elif kind == "watch_delete":
            wid = self.watches.pop(self.rng.randrange(len(self.watches))) if self.watches and self.rng.random() < 0.8 else "w_never"
            await client.send({"type": "watch.delete", "event_id": self.eid(), "watch_id": wid})
        elif kind == "resume":
            # Mostly let running answers finish first (a resumable point); sometimes drop mid-answer.
            if self.rng.random() < 0.7:
                await client.wait_until(lambda: client.resumable and all(a.deferred for a in self.checker.pending()), 10.0)
            handle = client.handle if client.resumable else None
            await self._retire()
            self.checker.disconnected()
            await asyncio.sleep(self.rng.choice((0.0, 0.05, 0.3)))
            await self._reconnect(handle)

    # ---- the run -------------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        plan = _schedule(self.rng, self.frames)
        pacer = _Pacer(self.ctx.fps * 0.9)
        side = max(2, min(_FRAME_SIZE) // 16)
        opened = await self._open()
        for n in range(self.frames):
            if not opened:
                self.ctx.frame_sent()  # keep the progress bar honest about frames that will never be sent
                continue
            await pacer.wait()
            image = self.ctx.base[(self.k + 7 * self.slot) % len(self.ctx.base)].copy()
            image[:side, :side] = ((self.k * 37) % 256, (self.slot * 53 + self.index * 19) % 256, (n // len(self.ctx.base) * 101) % 256)
            assert self.client is not None
            if not await self.client.send_frame(image, self.k * _PTS_STEP_S, f"cam{self.slot}"):
                opened = await self._recover()
                self.ctx.frame_sent()
                continue
            self.sent += 1
            self.k += 1
            self.ctx.frame_sent()
            for kind in plan.get(n, ()):
                await self._act(kind)
                if self.client is None or self.client.closed.is_set():
                    opened = self.client is not None and await self._recover()
        if opened:
            await self._drain()
        await self._retire()
        self.checker.finish()
        return self._report()

    async def _drain(self) -> None:
        """End the segment: cancel deferred questions, ask once more, wait for every response to end and for the counters."""
        client = self.client
        assert client is not None
        for ask in self.checker.pending():
            if ask.deferred and ask.rid is not None:
                await client.send({"type": "response.cancel", "event_id": self.eid(), "response_id": ask.rid})
        await self._ask(client)
        await client.wait_until(lambda: not self.checker.pending(), self.ctx.drain_timeout_s)
        await client.wait_for(lambda e: e.get("type") == "input_frame.stats", _STATS_EVERY_S * 4 + 2.0)

    def _report(self) -> dict[str, Any]:
        stats = {key: sum(int(s.get(key, 0)) for s in self.stats.values()) for key in ("received", "skipped", "dropped", "ingested")}
        asks = self.checker.asks.values()
        return {
            "slot": self.slot,
            "policy": self.policy,
            "positions": self.positions,
            "settings_applied": self.settings_applied,
            "sessions": self.session_ids,
            "frames_sent": self.sent,
            "frames": stats,
            "questions": len(self.checker.asks),
            "answers": self.checker.answers(),
            "statuses": dict(self.checker.statuses()),
            "refused_questions": sum(1 for a in asks if a.refused is not None and a.created == 0),
            "cut_off_by_disconnect": sum(1 for a in asks if a.interrupted and a.done == 0),
            "no_video_answers": self.checker.no_video,
            "alerts": self.checker.alerts,
            "actions": dict(self.actions),
            "resumes": self.resumes,
            "fresh_sessions": self.fresh_sessions,
            "server_closes": dict(self.server_closes),
            "errors": dict(self.errors),
            "errors_without_event_id": self.errors_without_event_id,
            "engine_faults": self.faults,
            "fault_examples": self.fault_examples,
            "violations": dict(self.checker.violations),
            "violation_examples": self.checker.examples,
        }


def _deal(combos: Sequence[tuple[str, str]], sessions: int) -> list[list[tuple[str, str]]]:
    """Give each of ``sessions`` slots its (policy, positions) pairs in turn, so that every pair is run at least once."""
    rounds = max(len(combos), sessions)
    return [[combos[j % len(combos)] for j in range(i, rounds, sessions)] for i in range(sessions)]


def _check_args(sessions: int, frames: int, fps: float, budget_tokens: int, policies: Sequence[str], positions: Sequence[str]) -> None:
    for name, value, low in (("sessions", sessions, 1), ("frames", frames, 1), ("budget_tokens", budget_tokens, 16)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}: must be an integer >= {low}, got {value!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ConfigError(f"fps: must be a finite number > 0, got {fps!r}")
    if not policies or any(p not in POLICIES for p in policies):
        raise ConfigError(f"policies: each must be one of {', '.join(POLICIES)}, got {list(policies)!r}")
    if not positions or any(p not in POSITIONS for p in positions):
        raise ConfigError(f"positions: each must be one of {', '.join(POSITIONS)}, got {list(positions)!r}")


def run_soak_bench(model: str | ModelConfig = "tiny-smolvlm", sessions: int = 4, frames: int = 3000, *, seed: int = 0,
                   policies: Iterable[str] = POLICIES, positions: Iterable[str] = POSITIONS, fps: float = 60.0,
                   budget_tokens: int = 256, max_new_tokens: int = 4, drain_timeout_s: float = 120.0,
                   progress: bool = True) -> dict[str, Any]:
    """Run the soak (``sessions`` slots x ``frames`` frames each at up to ``fps``) and return a JSON-ready dict.

    See the module docstring for what runs and what is counted. Top-level keys: ``benchmark``
    ("soak"), the arguments, ``engine_faults`` (error events with a fault code, plus
    ``engine_faults_metric`` when the server exports ``streamvlm_engine_faults_total``),
    ``lifecycle_violations`` (total) and ``violations`` (by kind), ``errors`` (by code), ``questions``,
    ``answers``, ``answers_per_session``, ``frames`` (sent and the server's counters, summed),
    ``rss_at_10pct_bytes``, ``rss_end_bytes``, ``rss_growth_ratio``, ``threads_before``,
    ``threads_after``, ``settings_not_applied`` (pairs the server did not echo back in
    ``session.updated``), ``passed`` (no faults, no violations, threads back to baseline) and
    ``sessions_detail`` (one entry per slot and pair). Raises ConfigError for bad arguments.
    """
    policies, positions = tuple(policies), tuple(positions)
    _check_args(sessions, frames, fps, budget_tokens, policies, positions)
    adapter = load_model(model)  # a preset, id or path, or a ModelConfig (device, dtype)
    precision = precision_of(adapter).to_dict()
    threads_before = free_threads()
    started = time.monotonic()
    result = asyncio.run(_soak(adapter, sessions, frames, seed, policies, positions, float(fps), budget_tokens,
                               max_new_tokens, drain_timeout_s, progress))
    deadline = time.monotonic() + 10.0
    while free_threads() > threads_before and time.monotonic() < deadline:
        time.sleep(0.1)
    threads_after = free_threads()
    faults = result["engine_faults"] + int(result["engine_faults_metric"] or 0)
    violations = result["lifecycle_violations"]
    return {
        "benchmark": "soak", "model": getattr(model, "model", model), **precision, "sessions": sessions, "frames_per_session": frames, "seed": seed,
        "policies": list(policies), "positions": list(positions), "fps": float(fps), "budget_tokens": budget_tokens,
        "max_new_tokens": max_new_tokens, "wall_s": round(time.monotonic() - started, 1),
        **result,
        "threads_before": threads_before, "threads_after": threads_after,
        "passed": faults == 0 and violations == 0 and threads_after <= threads_before,
    }


async def _soak(adapter: Any, sessions: int, frames: int, seed: int, policies: tuple[str, ...], positions: tuple[str, ...],
                fps: float, budget_tokens: int, max_new_tokens: int, drain_timeout_s: float, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    plan = _deal([(pol, pos) for pol in policies for pos in positions], sessions)
    budget = max(ServerConfig.session_budget_tokens, budget_tokens)
    parked = sessions * (max(len(p) for p in plan) + 2)  # every segment's session may sit parked for the resume window
    config = ServerConfig(host="127.0.0.1", port=0, max_sessions=parked, max_session_budget_tokens=max(ServerConfig.max_session_budget_tokens, budget),
                          global_budget_tokens=parked * budget, stats_every_s=_STATS_EVERY_S, resume_window_s=30.0,
                          # a small RAM store that spills to disk, so RSS growth measures leaks, not the store filling up
                          session_store_ram_bytes=2 * 2**20, session_store_disk_bytes=256 * 2**20)
    server = StreamServer(adapter, config, limits=Limits(max_frames_per_s=fps))
    host, port = await server.start()
    ctx = _Context(f"ws://{host}:{port}/v1/realtime", host, port, synthetic_frames(_BASE_FRAMES, height=_FRAME_SIZE[0], width=_FRAME_SIZE[1]),
                   fps, budget_tokens, max_new_tokens, drain_timeout_s, sessions * frames)
    ctx.bar = tqdm(total=ctx.total_frames, desc="soak", unit="frame", disable=not progress)

    async def slot(i: int) -> list[dict[str, Any]]:
        rng = random.Random(f"{seed}:{i}")
        share = [frames // len(plan[i]) + (1 if j < frames % len(plan[i]) else 0) for j in range(len(plan[i]))]
        return [await _Segment(ctx, i, j, pol, pos, n, rng).run() for j, ((pol, pos), n) in enumerate(zip(plan[i], share))]

    try:
        detail = [seg for segs in await asyncio.gather(*(slot(i) for i in range(sessions))) for seg in segs]
        rss_end = vm_rss_bytes()
        metrics = await scrape_metrics(host, port)
    finally:
        ctx.bar.close()
        await server.stop()
    violations: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for seg in detail:
        violations.update(seg["violations"])
        errors.update(seg["errors"])
    frames_total = {"sent": sum(s["frames_sent"] for s in detail)}
    for key in ("received", "skipped", "dropped", "ingested"):
        frames_total[key] = sum(s["frames"][key] for s in detail)
    rss_10 = ctx.rss_at_10pct or rss_end
    return {
        "engine_faults": sum(s["engine_faults"] for s in detail),
        "engine_faults_metric": metric_total(metrics, "streamvlm_engine_faults_total"),
        "lifecycle_violations": sum(violations.values()),
        "violations": dict(violations),
        "errors": dict(errors),
        "questions": sum(s["questions"] for s in detail),
        "answers": sum(s["answers"] for s in detail),
        "answers_per_session": [s["answers"] for s in detail],
        "frames": frames_total,
        "resumes": sum(s["resumes"] for s in detail),
        "rss_at_10pct_bytes": rss_10,
        "rss_end_bytes": rss_end,
        "rss_growth_ratio": rss_end / rss_10 if rss_10 else None,
        "settings_not_applied": sorted({f"{s['policy']}/{s['positions']}: {k}" for s in detail
                                        for k, ok in s["settings_applied"].items() if not ok}),
        "sessions_detail": detail,
    }
