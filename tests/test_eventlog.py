"""Event log (real SQLite) and webhook delivery (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from streamvlm.errors import ConfigError
from streamvlm.server.eventlog import EventLog
from streamvlm.server.webhook import WebhookSender


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that answers with the status codes it is told, and records bodies."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.bodies: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if status == 200:
                    receiver.bodies.append(body)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_events_are_durable_and_filterable(tmp_path):
    log = EventLog(tmp_path / "events.db")
    a = log.append("s1", "alert", {"watch_id": "door", "t": 12.5}, stream_t=12.5)
    log.append("s2", "answer", {"text": "a cup"})
    log.close()
    log = EventLog(tmp_path / "events.db")  # reopened: nothing lost
    everything = log.list()
    assert [e["id"] for e in everything] == [a, a + 1]
    assert everything[0]["payload"] == {"watch_id": "door", "t": 12.5} and everything[0]["stream_t"] == 12.5
    assert [e["kind"] for e in log.list(session="s2")] == ["answer"]
    assert log.list(since=everything[1]["wall_time"] + 10) == []
    assert [e["session"] for e in log.list(kinds=("alert",))] == ["s1"]


def test_webhook_retries_and_its_backlog_survives_a_restart(tmp_path, receiver):
    db = tmp_path / "events.db"
    log = EventLog(db)
    sender = WebhookSender(receiver.url, log, backoff_s=0.0)
    receiver.statuses = [503]
    first = log.append("s1", "alert", {"n": 1}, sinks=(sender.sink,))
    log.append("s1", "alert", {"n": 2}, sinks=(sender.sink,))
    assert sender.deliver_due() == 0  # the endpoint is down: nothing marked delivered, order kept
    assert log.backlog(sender.sink) == 2
    log.close()

    log = EventLog(db)  # a restart
    sender = WebhookSender(receiver.url, log, backoff_s=0.0)
    assert sender.deliver_due() == 2
    assert [b["payload"]["n"] for b in receiver.bodies] == [1, 2] and receiver.bodies[0]["id"] == first
    assert log.backlog(sender.sink) == 0
    assert sender.deliver_due() == 0  # never twice


def test_webhook_to_a_closed_port_backs_off(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = EventLog(tmp_path / "events.db")
    sender = WebhookSender(f"http://127.0.0.1:{port}/", log, backoff_s=30.0, timeout_s=1.0)
    log.append("s", "alert", {}, sinks=(sender.sink,))
    assert sender.deliver_due(now=1000.0) == 0
    assert log.due(sender.sink, now=1000.0) == []  # not due again before the backoff
    assert len(log.due(sender.sink, now=1031.0)) == 1


def test_the_webhook_thread_says_when_the_log_fails_and_goes_on_delivering(tmp_path, receiver, monkeypatch, caplog):
    # The sender's thread reads what is due from the log. If that read fails (a locked or full disk),
    # the thread must not die quietly and leave every later alert undelivered: it logs the error, keeps
    # it, and delivers once the log answers again.
    log = EventLog(tmp_path / "events.db")
    sender = WebhookSender(receiver.url, log, backoff_s=0.05)
    due = log.due
    failures = [2]

    def flaky_due(sink, now):
        if failures[0]:
            failures[0] -= 1
            raise sqlite3.OperationalError("database is locked")
        return due(sink, now)

    monkeypatch.setattr(log, "due", flaky_due)
    log.append("s", "alert", {"n": 1}, sinks=(sender.sink,))
    with caplog.at_level(logging.WARNING, logger="streamvlm.webhook"):
        sender.start(poll_s=0.05)
        try:
            wait_until(lambda: len(receiver.bodies) == 1, timeout=10)
        finally:
            sender.stop()
    assert [b["payload"]["n"] for b in receiver.bodies] == [1]
    assert sender.loop_failures == 2 and sender.last_error == "OperationalError: database is locked"
    assert sum("database is locked" in r.getMessage() for r in caplog.records) == 2
    log.close()


def test_webhook_url_must_be_http():
    with pytest.raises(ConfigError):
        WebhookSender("ftp://example", None)  # type: ignore[arg-type]


def test_the_newest_events_come_first_when_asked(tmp_path):
    log = EventLog(tmp_path / "events.db")
    ids = [log.append("s", "answer", {"text": str(i)}) for i in range(5)]
    assert [e["id"] for e in log.list(limit=2, newest_first=True)] == [ids[4], ids[3]]
    assert [e["id"] for e in log.list(limit=2)] == ids[:2]  # the default order stays oldest first
    log.close()


def test_since_accepts_durations_iso_times_and_unix_times():
    from datetime import datetime

    from streamvlm.server.eventlog import parse_since

    now = 1_800_000_000.0
    assert parse_since("10m", now) == now - 600 and parse_since("2h", now) == now - 7200 and parse_since("90s", now) == now - 90
    assert parse_since("1d", now) == now - 86400 and parse_since("1700000000", now) == 1_700_000_000.0
    assert parse_since("2026-03-01T14:30") == datetime(2026, 3, 1, 14, 30).timestamp()
    assert parse_since("2026-03-01T14:30:00Z") == datetime.fromisoformat("2026-03-01T14:30:00+00:00").timestamp()
    with pytest.raises(ConfigError, match="10m"):
        parse_since("last tuesday", now)


def test_a_logged_answer_reads_as_question_answer_and_evidence_range():
    from streamvlm.protocol import messages
    from streamvlm.server.eventlog import summarize

    done = messages.response_done("resp_1", "completed", "user", "a red square",
                                  [{"pts_s": 3.0, "source_id": "cam"}, {"pts_s": 7.5, "source_id": "cam"}])
    done["response"]["question"] = "What is there?"
    row = summarize({"wall_time": 1.0, "session": "s", "kind": "response.done", "stream_t": None, "payload": done})
    assert (row.kind, row.question, row.text, row.evidence_frames, row.evidence_span) == ("answer", "What is there?", "a red square", 2, (3.0, 7.5))
    alert = summarize({"wall_time": 1.0, "session": "w", "kind": "alert", "stream_t": 4.0,
                       "payload": {"watch_id": "door", "condition": "the door is open", "t": 4.0}})
    assert (alert.kind, alert.question, alert.evidence_span) == ("alert", "the door is open", (4.0, 4.0))
    many = summarize({"wall_time": 1.0, "session": "run_1", "kind": "alert", "stream_t": 4.0,
                      "payload": {"watch_id": "w1", "condition": "the door is open", "t": 4.0, "camera": "door"}})
    assert many.session == "door (run_1)"  # a camera of a many-camera watch is named in the table


def test_an_event_key_is_logged_once_and_its_webhook_fires_once(tmp_path, receiver):
    log = EventLog(tmp_path / "events.db")
    sender = WebhookSender(receiver.url, log, backoff_s=0.0)
    first, new = log.record("door", "alert", {"t": 4.0}, stream_t=4.0, sinks=(sender.sink,), key="door/alert1/4.000")
    again, new_again = log.record("door", "alert", {"t": 4.0}, stream_t=4.0, sinks=(sender.sink,), key="door/alert1/4.000")
    other, _ = log.record("door", "alert", {"t": 9.0}, stream_t=9.0, sinks=(sender.sink,), key="door/alert1/9.000")
    assert (new, new_again, again) == (True, False, first) and other != first
    assert [e["key"] for e in log.list()] == ["door/alert1/4.000", "door/alert1/9.000"]
    assert sender.deliver_due() == 2 and [b["payload"]["t"] for b in receiver.bodies] == [4.0, 9.0]
    log.append("door", "camera.online", {})  # events without a key are never merged
    log.append("door", "camera.online", {})
    assert len(log.list(kinds=("camera.online",))) == 2


def test_a_database_from_before_keys_is_migrated_when_opened(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, wall_time REAL NOT NULL, session TEXT NOT NULL,
                             kind TEXT NOT NULL, stream_t REAL, payload TEXT NOT NULL);
        CREATE TABLE deliveries (event_id INTEGER NOT NULL REFERENCES events(id), sink TEXT NOT NULL,
                                 attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0,
                                 delivered_at REAL, last_error TEXT, PRIMARY KEY (event_id, sink));
        INSERT INTO events (wall_time, session, kind, stream_t, payload) VALUES (1.0, 'old', 'alert', 2.0, '{"t": 2.0}');
    """)
    db.commit()
    db.close()
    log = EventLog(path)
    assert [(e["session"], e["payload"], e["key"]) for e in log.list()] == [("old", {"t": 2.0}, None)]
    _, new = log.record("cam", "alert", {}, key="k")
    assert new and log.record("cam", "alert", {}, key="k")[1] is False
    log.close()
    log = EventLog(path)  # opening a migrated database again changes nothing
    assert len(log.list()) == 2
    log.close()


def test_a_fleet_cameras_answer_reads_with_its_evidence_range():
    from streamvlm.server.eventlog import summarize

    row = summarize({"wall_time": 1.0, "session": "door", "kind": "answer", "stream_t": 5.0,
                     "payload": {"question": "What shape is on screen now?", "text": "circle",
                                 "evidence": [{"pts_s": 0.0, "source_id": "door"}, {"pts_s": 5.0, "source_id": "door"}]}})
    assert (row.kind, row.question, row.text, row.evidence_frames, row.evidence_span) == ("answer", "What shape is on screen now?", "circle", 2, (0.0, 5.0))
