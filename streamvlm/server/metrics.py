"""The server's Prometheus metrics: one registry per server, counters that only go up.

:class:`ServerMetrics` holds its own :class:`~prometheus_client.CollectorRegistry`, so several servers in
one process (tests, a benchmark) never share or collide on a value. The transport calls it where an
outcome happens (a session opens, a response ends, a frame is dropped) and serves :meth:`render` at
``/metrics``. Counters are never derived from live sessions, so they keep counting after a session
ends; gauges say what is live now. This module knows nothing about sessions or sockets.

Exported (``# TYPE`` in brackets; counters carry the ``_total`` suffix on the wire):

====================================================  =======================================================
``streamvlm_sessions_opened_total`` (counter)          new sessions admitted (a resume is not a new session)
``streamvlm_sessions_resumed_total`` (counter)         parked sessions taken up again with a resume handle
``streamvlm_sessions_refused_total{reason}``           sessions refused: ``session_limit``, ``invalid_resume_handle``, ...
``streamvlm_sessions_closed_total{reason}``            sessions ended: ``client_closed``, ``expired``, ``max_age``,
                                                       ``engine_fault``, ``slow_consumer``, ``server_stopping``, ...
``streamvlm_frames_received_total`` (counter)          frames that reached the server (any transport)
``streamvlm_frames_dropped_total{reason}``             frames not read: ``rate_limited``, ``replaced`` (latest wins),
                                                       ``skipped_duplicate``, ``refused``, ``compute`` (above the
                                                       session's read rate under admission by compute), ...
``streamvlm_frames_read_total`` (counter)              frames the model read into memory (encoded and prefilled)
``streamvlm_responses_total{status,trigger}``          responses ended, by ``response.done`` status and trigger
``streamvlm_alerts_total`` (counter)                   watch alerts raised
``streamvlm_protocol_errors_total{code}``              ``error`` events sent, by code
``streamvlm_engine_faults_total{kind}``                exceptions from the model's step, by kind (``request``:
                                                       the request failed and the session went on; ``session``:
                                                       the session was closed)
``streamvlm_http_rejected_total{reason}``              HTTP requests refused before any session: ``host``,
                                                       ``origin``, ``unauthorized``, ``bad_request``, ``not_found``
``streamvlm_sessions_live`` (gauge)                    sessions with a connected client
``streamvlm_sessions_parked`` (gauge)                  sessions waiting to be resumed
``streamvlm_working_memory_tokens`` (gauge)            working-memory tokens held, all sessions together
``streamvlm_sessions_read_limited`` (gauge)            sessions whose frame read rate is capped now (admission by
                                                       compute: the sessions offer more frames than the model reads)
``streamvlm_read_capacity_fps`` (gauge)                frames per second the model reads within the frames' share of
                                                       its time, as measured (0 before the first read)
``streamvlm_time_to_first_token_seconds`` (histogram)  ``response.create`` to the first text delta
``streamvlm_frame_lag_seconds`` (histogram)            a frame's arrival to the end of its prefill
====================================================  =======================================================

Every metric has HELP text. Responses for every status and trigger, both kinds of engine fault, and
frames dropped for ``compute`` exist from the start (value 0), so ``rate()`` and alert rules work before the first event. Label
values are the server's own codes, never client input, which keeps the number of series bounded.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from ..protocol.messages import RESPONSE_STATUSES, RESPONSE_TRIGGERS

__all__ = ["ServerMetrics", "TTFT_BUCKETS", "FRAME_LAG_BUCKETS"]

#: Seconds from ``response.create`` to the first delta: interactive answers land in the first buckets,
#: a model queued behind other sessions or on a slow CPU in the last.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Seconds from a frame's arrival to the end of its prefill.
FRAME_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Every metric of one server, in a registry of its own.

    The attributes are the prometheus_client objects themselves (``metrics.frames_received.inc()``,
    ``metrics.frames_dropped.labels(reason="replaced").inc()``); the methods below name the common
    outcomes. Gauges can be set as they change (``metrics.sessions_live.set(3)``) or read at scrape time
    with :meth:`track_live`. Thread-safe (prometheus_client locks each value), so a model thread may
    count too.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_opened = Counter("streamvlm_sessions_opened", "New sessions admitted.", registry=r)
        self.sessions_resumed = Counter("streamvlm_sessions_resumed", "Parked sessions resumed with a handle.", registry=r)
        self.sessions_refused = Counter("streamvlm_sessions_refused", "Sessions refused, by reason.", ["reason"], registry=r)
        self.sessions_closed = Counter("streamvlm_sessions_closed", "Sessions ended, by reason.", ["reason"], registry=r)
        self.frames_received = Counter("streamvlm_frames_received", "Frames that reached the server.", registry=r)
        self.frames_dropped = Counter("streamvlm_frames_dropped", "Frames not read by the model, by reason.", ["reason"], registry=r)
        self.frames_read = Counter("streamvlm_frames_read", "Frames read into memory (encoded and prefilled).", registry=r)
        self.responses = Counter("streamvlm_responses", "Responses ended, by status and trigger.", ["status", "trigger"], registry=r)
        self.alerts = Counter("streamvlm_alerts", "Watch alerts raised.", registry=r)
        self.protocol_errors = Counter("streamvlm_protocol_errors", "Error events sent to clients, by code.", ["code"], registry=r)
        self.engine_faults = Counter("streamvlm_engine_faults", "Exceptions from the model's step, by kind.", ["kind"], registry=r)
        self.http_rejected = Counter("streamvlm_http_rejected", "HTTP requests refused before a session, by reason.", ["reason"], registry=r)
        self.sessions_live = Gauge("streamvlm_sessions_live", "Sessions with a connected client.", registry=r)
        self.sessions_parked = Gauge("streamvlm_sessions_parked", "Sessions waiting to be resumed.", registry=r)
        self.working_memory_tokens = Gauge("streamvlm_working_memory_tokens", "Working-memory tokens held, all sessions.", registry=r)
        self.sessions_read_limited = Gauge("streamvlm_sessions_read_limited",
                                           "Sessions whose frame read rate is capped for compute now.", registry=r)
        self.read_capacity_fps = Gauge("streamvlm_read_capacity_fps",
                                       "Frames per second the model reads within the frames' share of its time.", registry=r)
        self.time_to_first_token = Histogram("streamvlm_time_to_first_token_seconds", "Seconds from response.create to the first text delta.",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.frame_lag = Histogram("streamvlm_frame_lag_seconds", "Seconds from a frame's arrival to the end of its prefill.",
                                   buckets=FRAME_LAG_BUCKETS, registry=r)
        for status in RESPONSE_STATUSES:
            for trigger in RESPONSE_TRIGGERS:
                self.responses.labels(status=status, trigger=trigger)
        for kind in ("request", "session"):
            self.engine_faults.labels(kind=kind)
        self.frames_dropped.labels(reason="compute")

    # ---- outcomes: one call where each happens --------------------------------------------------------
    def session_opened(self) -> None:
        """A new session was admitted (not a resume: see :meth:`session_resumed`)."""
        self.sessions_opened.inc()

    def session_resumed(self) -> None:
        self.sessions_resumed.inc()

    def session_refused(self, reason: str) -> None:
        """A connection got no session; ``reason`` is the error code it was sent (``session_limit``, ...)."""
        self.sessions_refused.labels(reason=reason).inc()

    def session_closed(self, reason: str) -> None:
        """A session ended for good (not parked): count it once, when its resources are released."""
        self.sessions_closed.labels(reason=reason).inc()

    def frame_received(self) -> None:
        self.frames_received.inc()

    def frame_dropped(self, reason: str, count: int = 1) -> None:
        """``count`` frames will never be read; ``reason`` as in the module table."""
        if count:
            self.frames_dropped.labels(reason=reason).inc(count)

    def frame_read(self, lag_s: float | None = None) -> None:
        """A frame was prefilled; ``lag_s`` is the seconds since it arrived (not observed when None)."""
        self.frames_read.inc()
        if lag_s is not None:
            self.frame_lag.observe(max(0.0, lag_s))

    def read_admission(self, limited: int, capacity_fps: float | None) -> None:
        """Admission by compute planned again: ``limited`` sessions are capped now; the model reads
        ``capacity_fps`` frames per second within the frames' share (None: not measured yet, shown as 0).
        Frames dropped above a cap are counted with :meth:`frame_dropped` (``compute``)."""
        self.sessions_read_limited.set(limited)
        self.read_capacity_fps.set(capacity_fps or 0.0)

    def first_token(self, seconds: float) -> None:
        """The first delta of a response went out ``seconds`` after its ``response.create``."""
        self.time_to_first_token.observe(max(0.0, seconds))

    def response_done(self, status: str, trigger: str) -> None:
        """A ``response.done`` went out. An alert also counts as :meth:`alert`."""
        self.responses.labels(status=status, trigger=trigger).inc()

    def alert(self) -> None:
        self.alerts.inc()

    def protocol_error(self, code: str) -> None:
        """An ``error`` event with this code went out."""
        self.protocol_errors.labels(code=code).inc()

    def engine_fault(self, kind: str) -> None:
        """The model's step raised: ``request`` (that request failed) or ``session`` (the session closed)."""
        self.engine_faults.labels(kind=kind).inc()

    def http_refused(self, reason: str) -> None:
        self.http_rejected.labels(reason=reason).inc()

    def track_live(self, *, live: Callable[[], float], parked: Callable[[], float],
                   working_tokens: Callable[[], float]) -> None:
        """Read the three gauges from these functions at each scrape instead of setting them.

        The functions run in the scraping thread (the event loop for ``/metrics``): keep them cheap
        and free of locks the model thread holds.
        """
        self.sessions_live.set_function(live)
        self.sessions_parked.set_function(parked)
        self.working_memory_tokens.set_function(working_tokens)

    # ---- exposition ------------------------------------------------------------------------------------
    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for ``/metrics``: ``(body, content_type)``.

        ``accept`` is the request's ``Accept`` header: OpenMetrics when the scraper asks for it, else
        the Prometheus text format 0.0.4.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
