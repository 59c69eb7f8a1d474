"""Event log (real SQLite) and webhook delivery (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from streamvlm.errors import ConfigError
from streamvlm.server.eventlog import EventLog
from streamvlm.server.webhook import WebhookSender


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


def test_webhook_url_must_be_http():
    with pytest.raises(ConfigError):
        WebhookSender("ftp://example", None)  # type: ignore[arg-type]
