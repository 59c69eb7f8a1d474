"""The event log: every alert and answer is written to SQLite before it is reported as delivered.

One table of events (what happened, for whom, when, as JSON) and one of deliveries (which sink still
owes which event: a webhook that is down keeps its backlog here, across restarts). The database runs
in WAL mode so readers (``streamvlm events``) never block the writer.

An event may carry a ``key`` that is unique in the log (:meth:`EventLog.record`): writing the same
key again is ignored and returns the first event's id, so a producer that repeats itself after a
restart (a camera actor re-raising an alert from frames it reads again) logs each event once and its
webhook fires once. A database made before keys existed gains the column when it is opened.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["EventLog", "EventSummary", "summarize", "parse_since"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    wall_time REAL NOT NULL,
    session TEXT NOT NULL,
    kind TEXT NOT NULL,
    stream_t REAL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_session ON events (session, id);
CREATE TABLE IF NOT EXISTS deliveries (
    event_id INTEGER NOT NULL REFERENCES events(id),
    sink TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    delivered_at REAL,
    last_error TEXT,
    PRIMARY KEY (event_id, sink)
);
"""


class EventLog:
    """An append-only log of events in SQLite, safe to use from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._add_keys()

    def _add_keys(self) -> None:
        """Give a database from before event keys its ``key`` column and unique index (idempotent, race-safe)."""
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in cur.execute("PRAGMA table_info(events)")}
            if "key" not in columns:
                cur.execute("ALTER TABLE events ADD COLUMN key TEXT")
            cur.execute("CREATE UNIQUE INDEX IF NOT EXISTS events_by_key ON events (key)")
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def append(self, session: str, kind: str, payload: dict[str, Any], *, stream_t: float | None = None, sinks: tuple[str, ...] = ()) -> int:
        """Write one event (and a pending delivery for each sink) durably; returns its id.

        Returns only after the transaction committed: report the event as delivered after this call.
        """
        return self.record(session, kind, payload, stream_t=stream_t, sinks=sinks)[0]

    def record(self, session: str, kind: str, payload: dict[str, Any], *, stream_t: float | None = None,
               sinks: tuple[str, ...] = (), key: str | None = None) -> tuple[int, bool]:
        """Write one event once: ``(id, True)`` when it is new, ``(id of the first, False)`` when ``key`` is logged already.

        A repeated key changes nothing (no second row, no second delivery). ``key=None`` always writes
        a new event. Returns only after the transaction committed, as :meth:`append` does.
        """
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.execute(
                    "INSERT OR IGNORE INTO events (wall_time, session, kind, stream_t, payload, key) VALUES (?, ?, ?, ?, ?, ?)",
                    (time.time(), session, kind, stream_t, json.dumps(payload, default=str), key),
                )
                if cur.rowcount == 0:  # the key is logged already
                    event_id = int(cur.execute("SELECT id FROM events WHERE key = ?", (key,)).fetchone()[0])
                    cur.execute("COMMIT")
                    return event_id, False
                event_id = int(cur.lastrowid)
                cur.executemany("INSERT INTO deliveries (event_id, sink) VALUES (?, ?)", [(event_id, s) for s in sinks])
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return event_id, True

    def list(self, *, since: float | None = None, session: str | None = None, kinds: tuple[str, ...] = (), limit: int = 1000,
             newest_first: bool = False, after_id: int | None = None) -> list[dict[str, Any]]:
        """Events, oldest first (``newest_first``: the latest ``limit`` events, latest first); ``since`` is a wall-clock Unix time.

        ``after_id``: only events logged after the one with that id (to follow the log). Each is a dict:
        ``id``, ``wall_time``, ``session``, ``kind``, ``stream_t``, ``payload``, ``key`` (None if it has none).
        """
        sql, args = "SELECT id, wall_time, session, kind, stream_t, payload, key FROM events WHERE 1=1", []
        if since is not None:
            sql += " AND wall_time >= ?"
            args.append(since)
        if after_id is not None:
            sql += " AND id > ?"
            args.append(after_id)
        if session is not None:
            sql += " AND session = ?"
            args.append(session)
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            args.extend(kinds)
        sql += f" ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [{"id": r[0], "wall_time": r[1], "session": r[2], "kind": r[3], "stream_t": r[4], "payload": json.loads(r[5]), "key": r[6]}
                for r in rows]

    # ---- deliveries ----------------------------------------------------------------------------------
    def due(self, sink: str, now: float, limit: int = 100) -> list[tuple[int, int, dict[str, Any]]]:
        """Undelivered events for ``sink`` whose retry time has come: ``(event_id, attempts, event)``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT d.event_id, d.attempts, e.wall_time, e.session, e.kind, e.stream_t, e.payload FROM deliveries d "
                "JOIN events e ON e.id = d.event_id WHERE d.sink = ? AND d.delivered_at IS NULL AND d.next_try <= ? "
                "ORDER BY d.event_id LIMIT ?",
                (sink, now, limit),
            ).fetchall()
        return [
            (r[0], r[1], {"id": r[0], "wall_time": r[2], "session": r[3], "kind": r[4], "stream_t": r[5], "payload": json.loads(r[6])})
            for r in rows
        ]

    def delivered(self, event_id: int, sink: str) -> None:
        with self._lock:
            self._db.execute("UPDATE deliveries SET delivered_at = ? WHERE event_id = ? AND sink = ?", (time.time(), event_id, sink))

    def failed(self, event_id: int, sink: str, error: str, next_try: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_try = ?, last_error = ? WHERE event_id = ? AND sink = ?",
                (next_try, error[:500], event_id, sink),
            )

    def backlog(self, sink: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM deliveries WHERE sink = ? AND delivered_at IS NULL", (sink,)).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ---- reading the log as a person ---------------------------------------------------------------------
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """A ``--since`` value as a Unix time: a duration back from ``now`` (``"90s"``, ``"10m"``, ``"2h"``,
    ``"1d"``), an ISO date or time (``"2026-03-01"``, ``"2026-03-01T14:30"``; local time unless it names a
    zone) or a Unix time in seconds. Raises ConfigError with the accepted forms otherwise."""
    now = time.time() if now is None else now
    text = text.strip()
    match = _DURATION.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_S[match.group(2).lower()]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ConfigError(f"--since {text!r}: expected a duration (90s, 10m, 2h, 1d), an ISO time "
                          "(2026-03-01T14:30) or a Unix time in seconds") from None


@dataclass(frozen=True)
class EventSummary:
    """One logged event in words, for a table: what happened, to what question, with what evidence."""

    # Wall-clock Unix time it was logged.
    wall_time: float
    session: str
    # "answer", "alert", "cancelled", "failed", or the logged kind as it is ("camera.offline", ...).
    kind: str
    # Stream time of the event (the alert's frame, the camera event's clock), if it has one.
    stream_t: float | None
    # The question or the watched condition ("" when the log does not have it).
    question: str
    # The answer text, an alert's condition, or a camera event's message.
    text: str
    # How many frames the answer rests on, and the first and last of their stream times.
    evidence_frames: int
    evidence_span: tuple[float, float] | None


def summarize(event: dict[str, Any]) -> EventSummary:
    """Turn one :meth:`EventLog.list` row (a ``response.done``, a watch alert, a camera event) into words."""
    payload = event.get("payload") or {}
    response = payload.get("response") if isinstance(payload.get("response"), dict) else None
    kind, question, text, stamps = str(event.get("kind", "")), "", "", []
    if response is not None:  # a realtime session's response.done
        alert = response.get("alert") or {}
        status = response.get("status", "")
        kind = "alert" if response.get("trigger") == "watch" else ("answer" if status in ("completed", "incomplete", "") else status)
        question = str(response.get("question") or payload.get("question") or alert.get("condition") or "")
        text = str(response.get("output_text") or "")
        stamps = [float(e["pts_s"]) for e in response.get("evidence") or [] if isinstance(e, dict) and "pts_s" in e]
    elif kind == "alert":  # `streamvlm watch`
        question = str(payload.get("condition", ""))
        text = f"watch {payload.get('watch_id', '?')} fired"
        stamps = [float(payload["t"])] if isinstance(payload.get("t"), (int, float)) else []
    else:  # an answer of a fleet camera, a camera event, ...
        question = str(payload.get("question", ""))
        text = str(payload.get("text") or payload.get("message") or payload.get("reason") or "")
        stamps = [float(e["pts_s"]) for e in payload.get("evidence") or [] if isinstance(e, dict) and isinstance(e.get("pts_s"), (int, float))]
    span = (min(stamps), max(stamps)) if stamps else None
    # A camera of a many-camera watch or a fleet names itself: that is the "session" a reader looks for.
    session = f"{payload['camera']} ({event.get('session', '')})" if payload.get("camera") and payload.get("camera") != event.get("session") \
        else str(event.get("session", ""))
    return EventSummary(float(event.get("wall_time") or 0.0), session, kind, event.get("stream_t"),
                        question, text, len(stamps), span)
