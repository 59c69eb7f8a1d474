"""Reading a live video source (RTSP / HTTP camera, webcam, or a file played as a camera).

`LiveSource` runs one background **reader thread** that owns the
`cv2.VideoCapture`. The caller never blocks on the network: it asks for the
newest frame whenever it is ready for one.

Latest wins
    The reader decodes frames as fast as the source delivers them and keeps
    only the newest one. A frame nobody took before the next one arrived is
    dropped (and counted in ``stats["overwritten"]``), so a slow consumer always
    sees the present, never a growing backlog. Frames are HxWx3 uint8 RGB,
    C-contiguous; their ``pts_s`` is the time the frame was read, in seconds on
    the source's clock (0 at `LiveSource.start`), strictly increasing per source
    and across reconnections.

Reconnection
    When a live source cannot be opened, or a read fails or times out (the
    camera dropped off the network, the server restarted), the reader emits one
    ``offline`` event for the outage, releases the capture, sleeps with
    exponential backoff (``backoff_initial_s * backoff_factor**n``, at most
    ``backoff_max_s``; `LiveSource.stop` cuts the sleep short) and reopens.
    Each further failed attempt in the same outage emits an ``error`` event.
    When frames flow again it emits ``online``. With ``max_attempts`` set, the
    source gives up after that many consecutive failed attempts and closes.
    A file source is not reconnected: at its end (or if it cannot be read) it
    emits ``closed`` and the reader stops; the last frame stays available.

Permanent refusals
    OpenCV hides why a network stream did not open, so after a failed open the
    reader asks the server once itself (`streamvlm.ingest.probe`: an HTTP GET
    or RTSP DESCRIBE, headers only) and puts its answer in the event message.
    An answer that retrying cannot change (401, 403, 404, ...) counts towards
    ``refused_attempts``: after that many in a row the source gives up and
    closes with `SourceRefusedError` as its `LiveSource.failure`. Connection
    refused, timeouts, 5xx and camera drop-outs stay temporary.

Nothing is raised from the reader thread: every problem becomes a
`SourceEvent`, drained with `LiveSource.events`; when the source ended
because it could not be read, `LiveSource.failure` holds the error for the
caller to raise. All public methods are thread-safe.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from streamvlm.errors import ConfigError, SourceError, SourceRefusedError
from streamvlm.types import Frame
from streamvlm.ingest.file import _to_rgb, renders_text
from streamvlm.ingest.probe import ProbeResult, is_permanent, probe

__all__ = ["SourceConfig", "SourceEvent", "LiveSource", "SourceRefusedError", "EVENT_KINDS"]

EVENT_KINDS: tuple[str, ...] = ("online", "offline", "error", "closed")

# URL schemes handed to FFmpeg as network streams (reconnected on failure).
_NETWORK_SCHEMES: frozenset[str] = frozenset({"rtsp", "rtsps", "http", "https"})
# At most this many undrained events are kept; the oldest are dropped first.
_MAX_EVENTS = 1024
# Frame rate assumed for pacing a file whose container reports none.
_DEFAULT_FILE_FPS = 30.0
# stop() waits this much longer than the longest blocking capture call.
_JOIN_MARGIN_S = 1.0


@dataclass(frozen=True)
class SourceConfig:
    """Timeouts and reconnection policy of a `LiveSource`.

    * ``open_timeout_s``: how long opening a network stream may take.
    * ``read_timeout_s``: how long a read may wait for the next frame before the
      stream counts as dropped.
    * ``backoff_initial_s``, ``backoff_factor``, ``backoff_max_s``: after the
      ``n``-th consecutive failure (n = 1, 2, ...) the reader sleeps
      ``min(backoff_max_s, backoff_initial_s * backoff_factor**(n - 1))``.
    * ``max_attempts``: consecutive failed open attempts after which the source
      gives up and closes; None retries forever.
    * ``refused_attempts``: consecutive open attempts answered with a permanent
      error (HTTP/RTSP 401, 403, 404, ...) after which the source gives up with
      `SourceRefusedError`.

    Raises `ConfigError` for a value out of range.
    """

    open_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    backoff_factor: float = 2.0
    max_attempts: int | None = None
    refused_attempts: int = 3

    def __post_init__(self) -> None:
        for name in ("open_timeout_s", "read_timeout_s", "backoff_initial_s", "backoff_max_s"):
            value = getattr(self, name)
            if not _is_positive_finite(value):
                raise ConfigError(f"{name} must be a finite number greater than 0, got {value!r}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError(
                f"backoff_max_s ({self.backoff_max_s!r}) must not be less than "
                f"backoff_initial_s ({self.backoff_initial_s!r})"
            )
        factor = self.backoff_factor
        if isinstance(factor, bool) or not isinstance(factor, Real) or not math.isfinite(factor) or factor < 1:
            raise ConfigError(f"backoff_factor must be a finite number >= 1, got {factor!r}")
        attempts = self.max_attempts
        if attempts is not None and (isinstance(attempts, bool) or not isinstance(attempts, Integral) or attempts < 1):
            raise ConfigError(f"max_attempts must be an integer >= 1 or None, got {attempts!r}")
        refused = self.refused_attempts
        if isinstance(refused, bool) or not isinstance(refused, Integral) or refused < 1:
            raise ConfigError(f"refused_attempts must be an integer >= 1, got {refused!r}")

    def backoff_s(self, failures: int) -> float:
        """Seconds to sleep after the ``failures``-th consecutive failure (1-based)."""
        delay = float(self.backoff_initial_s)
        for _ in range(max(0, failures - 1)):
            delay *= self.backoff_factor
            if delay >= self.backoff_max_s:
                break
        return min(delay, float(self.backoff_max_s))


@dataclass(frozen=True)
class SourceEvent:
    """Something that happened to a `LiveSource`.

    * ``kind``: ``"online"`` (frames flow, after start or after an outage),
      ``"offline"`` (the source could not be opened or stopped delivering; once
      per outage), ``"error"`` (a further failed attempt during an outage, or an
      unexpected problem in the reader) or ``"closed"`` (the reader stopped: end
      of file, `LiveSource.stop`, or gave up; always the last event).
    * ``t``: seconds on the source's clock (0 at `LiveSource.start`).
    * ``message``: human-readable detail; credentials in URLs are redacted.
    * ``attempt``: the open attempt the event concerns, counted from 1 since
      the source was last online (0 when no attempt is involved, e.g. a stream
      that was up and then dropped).
    """

    kind: str
    t: float
    message: str = ""
    attempt: int = 0


class LiveSource:
    """A live video source read by a background thread; the caller takes the newest frame.

    ``url`` is one of:

    * ``rtsp://``, ``rtsps://``, ``http://`` or ``https://`` (MJPEG, HLS, ...),
      opened with OpenCV's FFmpeg backend with the configured open and read
      timeouts; reconnected on failure.
    * a webcam index: an ``int`` >= 0 or a string of digits; reconnected on failure.
    * a path to a video file (str or path-like), played at its own frame rate
      (``realtime=True``, as if it were a camera) or as fast as it decodes
      (``realtime=False``); ``closed`` at its end, never reconnected.

    ``source_id`` is stored on every frame; it defaults to the URL without
    credentials, ``"webcam:N"``, or the file name. ``clock`` is the time source
    for timestamps (seconds, monotonic).

    Raises `ConfigError` for an unusable ``url``, ``config`` or ``source_id``,
    and `SourceError` if a file path does not exist. Nothing is opened until
    `start`. See the module docstring for latest-wins and reconnect behaviour.

    Use as a context manager (``with LiveSource(url) as src:`` starts and stops
    it), or call `start` and `stop`.
    """

    def __init__(
        self,
        url: str | int | os.PathLike[str],
        config: SourceConfig | None = None,
        *,
        source_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        realtime: bool = True,
    ) -> None:
        if config is None:
            config = SourceConfig()
        if not isinstance(config, SourceConfig):
            raise ConfigError(f"config must be a SourceConfig, got {type(config).__name__}")
        if not callable(clock):
            raise ConfigError("clock must be a callable returning seconds")
        if source_id is not None and (not isinstance(source_id, str) or not source_id):
            raise ConfigError(f"source_id must be a non-empty string or None, got {source_id!r}")
        self._target, self._kind, default_id, self._display = _classify(url)
        self.config = config
        self.source_id = source_id if source_id is not None else default_id
        self._clock = clock
        self._realtime = bool(realtime)

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0: float | None = None
        self._finished = False
        self._online = False
        self._failure: SourceError | None = None

        # The newest frame: the decoded BGR image as the capture gave it, its
        # timestamp and sequence number, and its RGB `Frame` once someone asked.
        self._raw: np.ndarray | None = None
        self._pts: float = -math.inf
        self._seq = 0
        self._frame: Frame | None = None
        self._taken = True

        self._events: collections.deque[SourceEvent] = collections.deque(maxlen=_MAX_EVENTS)
        self._stats = {"read": 0, "overwritten": 0, "reconnects": 0, "attempts": 0}

    # ----------------------------------------------------------------- control

    def start(self) -> LiveSource:
        """Starts the reader thread and returns self. Does nothing if already running.

        The source's clock starts at 0 here. Raises `SourceError` if the source
        was stopped or closed (make a new `LiveSource` instead).
        """
        with self._lock:
            if self._stop.is_set() or self._finished:
                raise SourceError(f"source {self._display!r} was stopped; create a new LiveSource to read it again")
            if self._thread is not None:
                return self
            self._t0 = self._clock()
            self._thread = threading.Thread(
                target=self._run, name=f"LiveSource[{self.source_id}]", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Stops the reader thread and waits for it; idempotent. Returns True once it has ended.

        A backoff sleep is cut short at once; a capture call in progress is
        waited for (bounded by the open or read timeout), so by default this
        waits at most ``max(open_timeout_s, read_timeout_s) + 1`` seconds.
        Frames already read stay available through `latest`.
        """
        if timeout is None:
            timeout = max(self.config.open_timeout_s, self.config.read_timeout_s) + _JOIN_MARGIN_S
        elif not isinstance(timeout, Real) or isinstance(timeout, bool) or math.isnan(timeout) or timeout < 0:
            raise ConfigError(f"timeout must be a number >= 0 or None, got {timeout!r}")
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            with self._cond:
                self._finished = True
                self._cond.notify_all()
            return True
        if thread is not threading.current_thread():
            thread.join(timeout)
        return not thread.is_alive()

    def __enter__(self) -> LiveSource:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ frames

    def latest(self, after: float | None = None) -> Frame | None:
        """Returns the newest frame, or None if there is none (newer than ``after``, when given).

        Never blocks on the source. Older frames are not queued: only the newest
        one is ever returned.
        """
        after = _check_after(after)
        with self._lock:
            if self._raw is None or (after is not None and self._pts <= after):
                return None
            self._taken = True
            if self._frame is not None:
                return self._frame
            raw, pts, seq = self._raw, self._pts, self._seq
        frame = Frame(image=_to_rgb(raw), pts_s=pts, source_id=self.source_id)
        with self._lock:
            if self._seq == seq:
                self._frame = frame
        return frame

    def wait_frame(self, timeout: float, after: float | None = None) -> Frame | None:
        """Waits up to ``timeout`` seconds for a frame newer than ``after`` and returns the newest.

        With ``after`` None any frame will do (one already there is returned at
        once). Returns None on timeout, or as soon as the source has stopped
        with no such frame.
        """
        if isinstance(timeout, bool) or not isinstance(timeout, Real) or math.isnan(timeout) or timeout < 0:
            raise ConfigError(f"timeout must be a number >= 0, got {timeout!r}")
        after = _check_after(after)
        deadline = time.monotonic() + float(timeout)
        with self._cond:
            while self._raw is None or (after is not None and self._pts <= after):
                if self._finished:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
        return self.latest(after)

    # ------------------------------------------------------------------- state

    def events(self) -> list[SourceEvent]:
        """Returns and removes the events that happened since the last call, oldest first."""
        with self._lock:
            drained = list(self._events)
            self._events.clear()
        return drained

    @property
    def online(self) -> bool:
        """True while frames are flowing (from the first frame of a connection until it fails)."""
        with self._lock:
            return self._online

    @property
    def failure(self) -> SourceError | None:
        """Why the source ended, when it ended because it could not be read; None otherwise.

        Set when the reader closes on a file that is not a readable video (`SourceError`), a server that
        refused ``refused_attempts`` times in a row (`SourceRefusedError`), or after ``max_attempts``
        failed attempts (`SourceError`). None while running, at the end of a file and after `stop`.
        Raise it to report the failure; the ``closed`` event carries the same message.
        """
        with self._lock:
            return self._failure

    @property
    def running(self) -> bool:
        """True from `start` until the reader thread has ended."""
        with self._lock:
            return self._thread is not None and not self._finished

    @property
    def stats(self) -> dict[str, int]:
        """Counters: ``read`` (frames decoded), ``overwritten`` (replaced before anyone took them),
        ``reconnects`` (times the source came back online after an outage), ``attempts`` (open attempts)."""
        with self._lock:
            return dict(self._stats)

    def now(self) -> float:
        """Seconds on the source's clock (0 at `start`; 0.0 before it)."""
        with self._lock:
            t0 = self._t0
        return 0.0 if t0 is None else self._clock() - t0

    def __repr__(self) -> str:
        return f"LiveSource({self._display!r}, source_id={self.source_id!r}, online={self.online})"

    # ------------------------------------------------------------ reader thread

    def _run(self) -> None:
        reason = "stopped"
        try:
            reason = self._read_loop()
        except BaseException as exc:  # noqa: BLE001 - the reader must never raise
            reason = f"reader failed: {exc!r}"
            self._fail(SourceError(f"{self._display}: {reason}"))
            self._emit("error", reason)
        finally:
            with self._cond:
                self._online = False
                self._push_event("closed", reason, 0)
                self._finished = True
                self._cond.notify_all()

    def _read_loop(self) -> str:
        """Opens, reads and reopens until stopped; returns why it ended."""
        cfg = self.config
        attempt = 0  # open attempts since the source was last online
        failures = 0  # consecutive failures, for the backoff delay
        refusals = 0  # consecutive opens the server answered with a permanent error
        in_outage = False
        while not self._stop.is_set():
            attempt += 1
            with self._lock:
                self._stats["attempts"] += 1
            capture, problem, answer = self._open()
            refusals = refusals + 1 if answer is not None and is_permanent(answer) else 0
            got_frames = False
            if capture is not None:
                try:
                    got_frames, problem = self._pump(capture, attempt, in_outage)
                finally:
                    _release(capture)
            if self._stop.is_set():
                return "stopped"
            if self._kind == "file":
                if got_frames:
                    return f"end of file {self._display!r}"
                self._emit("error", problem, attempt)
                reason = f"cannot read file {self._display!r}: {problem}"
                self._fail(SourceError(f"{reason}; is it a video file?"))
                return reason
            if got_frames:
                # The stream was up and dropped: a new outage begins.
                attempt, failures, in_outage = 0, 1, True
                self._emit("offline", f"{self._display}: {problem}; reconnecting", 0)
            else:
                failures += 1
                refused = answer if answer is not None and refusals >= cfg.refused_attempts else None
                gave_up = refused is not None or (cfg.max_attempts is not None and attempt >= cfg.max_attempts)
                detail = f"{self._display}: {problem}"
                if not gave_up:
                    detail += f"; retrying in {cfg.backoff_s(failures):.3g} s"
                self._emit("error" if in_outage else "offline", detail, attempt)
                in_outage = True
                if refused is not None:
                    reason = f"gave up on {self._display}: the server answered {refused} {refusals} times in a row"
                    self._fail(SourceRefusedError(f"{reason}; check the URL and credentials", url=self._display, status=refused.status or 0))
                    return reason
                if gave_up:
                    reason = f"gave up on {self._display} after {attempt} failed attempt(s)"
                    self._fail(SourceError(f"{reason}; the last: {problem}"))
                    return reason
            if self._stop.wait(cfg.backoff_s(failures)):
                return "stopped"
        return "stopped"

    def _open(self) -> tuple[Any, str, ProbeResult | None]:
        """Opens the capture; returns (capture, "", None) or (None, why it failed, the server's answer if probed).

        After a failed network open the server is asked once why (OpenCV does not say).
        """
        try:
            capture = _open_capture(self._target, self._kind, self.config)
            problem = ""
        except Exception as exc:  # noqa: BLE001 - OpenCV errors become events
            capture, problem = None, f"cannot open ({exc})"
        if capture is not None and capture.isOpened():
            if self._kind != "file" or not renders_text(capture):
                return capture, "", None
            problem = "it is text, not a video (FFmpeg would only draw its characters)"
        _release(capture)
        problem = problem or "cannot open"
        if self._kind != "network" or self._stop.is_set():
            return None, problem, None
        answer = probe(str(self._target), self.config.open_timeout_s)
        if answer.status is None:
            return None, problem, answer
        return None, f"{problem}: the server answered {answer}", answer

    def _fail(self, error: SourceError) -> None:
        with self._lock:
            self._failure = error

    def _pump(self, capture: Any, attempt: int, in_outage: bool) -> tuple[bool, str]:
        """Reads frames until a read fails or stop; returns (any frames read, why it ended)."""
        pacer = _FilePacer(capture) if self._kind == "file" and self._realtime else None
        got_frames = False
        while not self._stop.is_set():
            try:
                ok, raw = capture.read()
            except Exception as exc:  # noqa: BLE001
                return got_frames, f"read failed ({exc})"
            if not ok or raw is None or raw.size == 0:
                if self._kind == "file":
                    return got_frames, "no frame could be decoded" if not got_frames else "end of file"
                return got_frames, f"no frame within {self.config.read_timeout_s:g} s (read failed or timed out)"
            if pacer is not None and not pacer.wait(self._stop):
                return got_frames, "stopped"
            self._publish(raw, first=not got_frames, attempt=attempt, in_outage=in_outage)
            got_frames = True
        return got_frames, "stopped"

    def _publish(self, raw: np.ndarray, *, first: bool, attempt: int, in_outage: bool) -> None:
        """Makes ``raw`` the newest frame; on the first frame of a connection, goes online."""
        now = self._clock() - (self._t0 or 0.0)
        with self._cond:
            pts = now if now > self._pts else math.nextafter(self._pts, math.inf)
            if self._raw is not None and not self._taken:
                self._stats["overwritten"] += 1
            self._raw, self._pts, self._frame, self._taken = raw, pts, None, False
            self._seq += 1
            self._stats["read"] += 1
            if first:
                self._online = True
                if in_outage:
                    self._stats["reconnects"] += 1
                how = "back online" if in_outage else "online"
                self._push_event("online", f"{self._display}: {how}, frames flowing", attempt)
            self._cond.notify_all()

    def _emit(self, kind: str, message: str, attempt: int = 0) -> None:
        with self._cond:
            if kind in ("offline", "closed"):
                self._online = False
            self._push_event(kind, message, attempt)
            self._cond.notify_all()

    def _push_event(self, kind: str, message: str, attempt: int) -> None:
        """Appends an event; the caller holds the lock."""
        t = self._clock() - (self._t0 or 0.0)
        self._events.append(SourceEvent(kind=kind, t=t, message=message, attempt=attempt))


class _FilePacer:
    """Holds back frames of a file so they come out at the file's own rate, like a camera."""

    def __init__(self, capture: Any) -> None:
        self._capture = capture
        fps = _finite_positive(capture.get(cv2.CAP_PROP_FPS))
        self._step = 1.0 / (fps or _DEFAULT_FILE_FPS)
        self._start: float | None = None
        self._media_t = -math.inf

    def wait(self, stop: threading.Event) -> bool:
        """Sleeps until the frame just read is due; False if ``stop`` was set meanwhile."""
        pos = _finite_positive(self._capture.get(cv2.CAP_PROP_POS_MSEC))
        if self._start is None:
            self._start = time.monotonic()
            self._media_t = 0.0
            return not stop.is_set()
        media_t = pos / 1000.0 if pos is not None and pos / 1000.0 > self._media_t else self._media_t + self._step
        self._media_t = media_t
        delay = self._start + media_t - time.monotonic()
        if delay > 0:
            return not stop.wait(delay)
        return not stop.is_set()


def _classify(url: object) -> tuple[str | int, str, str, str]:
    """Returns (capture target, kind, default source id, display name) for ``url``.

    kind is "network", "webcam" or "file". Raises ConfigError / SourceError.
    """
    if isinstance(url, bool):
        raise ConfigError(f"url must be a URL, a file path or a webcam index, got {url!r}")
    if isinstance(url, Integral):
        index = int(url)
        if index < 0:
            raise ConfigError(f"webcam index must be >= 0, got {index}")
        return index, "webcam", f"webcam:{index}", f"webcam {index}"
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str):
        raise ConfigError(f"url must be a str, a path or an int, got {type(url).__name__}")
    text = url.strip()
    if not text:
        raise ConfigError("url must not be empty")
    if text.isdigit():
        index = int(text)
        return index, "webcam", f"webcam:{index}", f"webcam {index}"
    scheme, sep, _ = text.partition("://")
    if sep:
        if scheme.lower() not in _NETWORK_SCHEMES:
            allowed = ", ".join(f"{s}://" for s in sorted(_NETWORK_SCHEMES))
            raise ConfigError(
                f"unsupported URL scheme {scheme!r} in {_redact(text)!r}; use {allowed}, a file path or a webcam index"
            )
        if not urllib.parse.urlsplit(text).hostname:
            raise ConfigError(f"URL {_redact(text)!r} has no host")
        shown = _redact(text)
        return text, "network", shown, shown
    path = Path(url)
    if not path.exists():
        raise SourceError(f"video file {url!r} does not exist")
    if not path.is_file():
        raise SourceError(f"video path {url!r} is not a file")
    return str(path), "file", path.name, str(path)


def _redact(url: str) -> str:
    """Returns ``url`` with any user name and password removed."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def _open_capture(target: str | int, kind: str, config: SourceConfig) -> Any:
    """Creates the OpenCV capture for ``target`` (FFmpeg with timeouts for URLs and files)."""
    if kind == "webcam":
        return cv2.VideoCapture(int(target))
    params = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        _to_ms(config.open_timeout_s),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        _to_ms(config.read_timeout_s),
    ]
    return cv2.VideoCapture(str(target), cv2.CAP_FFMPEG, params)


def _release(capture: Any) -> None:
    if capture is None:
        return
    try:
        capture.release()
    except Exception:  # noqa: BLE001 - releasing must not raise in the reader
        pass


def _to_ms(seconds: float) -> int:
    return max(1, int(round(seconds * 1000.0)))


def _check_after(after: float | None) -> float | None:
    if after is None:
        return None
    if isinstance(after, bool) or not isinstance(after, Real) or math.isnan(after):
        raise ConfigError(f"after must be a number or None, got {after!r}")
    return float(after)


def _finite_positive(value: float) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _is_positive_finite(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
