"""The event log: every alert and answer is written to SQLite before it is reported as delivered.

One table of events (what happened, for whom, when, as JSON) and one of deliveries (which sink still
owes which event: a webhook that is down keeps its backlog here, across restarts). The database runs
in WAL mode so readers (``streamvlm events``) never block the writer.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["EventLog"]

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

    def append(self, session: str, kind: str, payload: dict[str, Any], *, stream_t: float | None = None, sinks: tuple[str, ...] = ()) -> int:
        """Write one event (and a pending delivery for each sink) durably; returns its id.

        Returns only after the transaction committed: report the event as delivered after this call.
        """
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.execute(
                    "INSERT INTO events (wall_time, session, kind, stream_t, payload) VALUES (?, ?, ?, ?, ?)",
                    (time.time(), session, kind, stream_t, json.dumps(payload, default=str)),
                )
                event_id = int(cur.lastrowid)
                cur.executemany("INSERT INTO deliveries (event_id, sink) VALUES (?, ?)", [(event_id, s) for s in sinks])
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return event_id

    def list(self, *, since: float | None = None, session: str | None = None, kinds: tuple[str, ...] = (), limit: int = 1000) -> list[dict[str, Any]]:
        """Events, oldest first; ``since`` is a wall-clock Unix time."""
        sql, args = "SELECT id, wall_time, session, kind, stream_t, payload FROM events WHERE 1=1", []
        if since is not None:
            sql += " AND wall_time >= ?"
            args.append(since)
        if session is not None:
            sql += " AND session = ?"
            args.append(session)
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            args.extend(kinds)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [{"id": r[0], "wall_time": r[1], "session": r[2], "kind": r[3], "stream_t": r[4], "payload": json.loads(r[5])} for r in rows]

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
