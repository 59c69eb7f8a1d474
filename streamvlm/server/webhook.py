"""Posting events to a webhook, with retries and a backlog that survives restarts.

The sender never holds events itself: it reads what is due from the :class:`EventLog`, POSTs each as
JSON, and marks it delivered (2xx) or schedules a retry with exponential backoff. Run it in a thread
(:meth:`start`) or call :meth:`deliver_due` yourself. The thread never dies quietly: when the log
itself fails (the database is locked, the disk is full) it logs a warning naming the error (logger
``streamvlm.webhook``), keeps it in :attr:`WebhookSender.last_error`, backs off and tries again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request

from ..errors import ConfigError
from .eventlog import EventLog

__all__ = ["WebhookSender"]

_log = logging.getLogger("streamvlm.webhook")


class WebhookSender:
    def __init__(self, url: str, log: EventLog, *, timeout_s: float = 5.0, backoff_s: float = 1.0, backoff_max_s: float = 300.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--webhook {url!r}: expected an http:// or https:// URL")
        self.url, self.log = url, log
        self.sink = f"webhook:{url}"
        self.timeout_s, self.backoff_s, self.backoff_max_s = timeout_s, backoff_s, backoff_max_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None  # the last failure of the delivery loop itself (not of a POST)
        self.loop_failures = 0  # how many times the delivery loop failed

    def deliver_due(self, now: float | None = None) -> int:
        """POST every event that is due now; returns how many were delivered."""
        now = time.time() if now is None else now
        sent = 0
        for event_id, attempts, event in self.log.due(self.sink, now):
            request = urllib.request.Request(
                self.url, data=json.dumps(event).encode(), headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    ok = 200 <= response.status < 300
                    error = f"HTTP {response.status}"
            except (urllib.error.URLError, OSError, ValueError) as exc:
                ok, error = False, str(exc)
            if ok:
                self.log.delivered(event_id, self.sink)
                sent += 1
            else:
                delay = min(self.backoff_max_s, self.backoff_s * 2**attempts)
                self.log.failed(event_id, self.sink, error, now + delay)
                break  # keep order: later events wait for this one
        return sent

    def notify(self) -> None:
        """Something new was logged: deliver soon."""
        self._wake.set()

    def start(self, poll_s: float = 1.0) -> None:
        def run() -> None:
            failed = 0  # failures in a row
            while not self._stop.is_set():
                try:
                    self.deliver_due()
                    failed = 0
                except Exception as exc:  # the log failed, not a POST: say so, back off, try again
                    failed += 1
                    self.loop_failures += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    _log.warning("webhook %s: delivery stopped by %s; retrying", self.url, self.last_error)
                self._wake.wait(min(self.backoff_max_s, self.backoff_s * 2 ** (failed - 1)) if failed else poll_s)
                self._wake.clear()

        self._thread = threading.Thread(target=run, name="streamvlm-webhook", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 1)
