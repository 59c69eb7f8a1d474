"""``streamvlm bench storm``: a live session beside hostile clients, through the real server.

The main process starts a :class:`~streamvlm.server.app.StreamServer` on 127.0.0.1 (an ephemeral
port) with the server's default limits (the ones ``streamvlm serve`` runs with). A *live* session (a
raw WebSocket client in the same process, see :class:`~streamvlm.bench.soak.WireClient`) streams
frames at ``fps`` and asks one question at a time, each after the previous answer ended; its time to
first token (TTFT: from sending ``response.create`` to the first ``response.output_text.delta``, or to
``response.done`` for an empty answer) is measured in three windows:

* **before**: once the session's working memory has reached its budget (its first ``memory.update``;
  at most ``settle_timeout_s`` is waited), for ``quiet_s`` seconds (at least ``questions`` times). A
  session whose memory is not yet full answers without compressing, spilling or retrieving, so timing
  it then and comparing with a storm that lasts long enough to fill it would blame the storm for the
  cost of a full memory;
* **during** the storm, until it is over (at least ``questions`` times);
* **after**, once the storm is over, for ``quiet_s`` seconds again: the storm's figure over this one
  shows whether the before window was merely an easier moment of the stream.

The hostile clients run in a second OS process (started with the ``spawn`` method: a fresh
interpreter with its own event loop), the way an attacker on another machine would: their own work
(building and sending the messages, reading the replies) does not run on the server's event loop or
hold its GIL. That process is started before the live session's first question and waits, idle,
until the storm begins; it gets the server's URL and the seeded parameters, and sends back plain data
over a pipe: progress counts, then its report (per hostile connection, the churn tally, its CPU time).
It always ends: it is joined when the storm is over, terminated (then killed) when the run fails or
its report does not come, and it stops by itself when the main process goes away.

The storm is several hostile connections at once, about ``messages`` messages in all:

* garbage text and invalid JSON (a fifth of the messages each), and pointless valid events;
* huge messages: text and binary of ``max_message_bytes`` + 1 byte (4 MiB + 1 by default);
* ``session.update`` with ``memory.budget_tokens: 10**12`` as each hostile session's first event;
* ``watches`` ``watch.create`` on one session (the first half with valid triggers, the rest with huge
  trigger values such as ``n: 10**30``) while it streams frames, so that every watch is probed;
* a flood of binary frames as fast as the socket takes them (a fifth of the messages), kept up until
  the live session has its samples;
* duplicate ids: the same ``event_id``, item id and watch id over and over (a quarter of them
  ``response.create``, so the hostile session also competes for the model);
* ``churn`` connects, each closed as soon as ``session.created`` (or a refusal) arrives.

A hostile connection the server closes is reopened (counted). After the storm every hostile
connection is closed and ``new_sessions`` fresh clients connect (from the main process); each must be
admitted (not refused with ``session_limit``) and get an answer to one question. Reported: TTFT
p50/p95 before, during and after and their ratios (target: p95 during <= 2x before), how long the
memory took to fill (``settled_s``, None when it did not within the timeout), the server process's
RSS when idle (before the storm) and its peak during it (target <= 1.5x; the main process holds the
server, the live session and the RSS sampler, not the hostile clients), refusals after the storm
(must be 0), the live session's questions and answers, engine faults, for the hostile side the
messages sent by kind, the errors they got back by code and the close codes they saw, which process
ran what, the CPU seconds each process used during the storm, and Python threads before and after.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import string
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import cv2
import numpy as np
from websockets.exceptions import InvalidHandshake

from ..config import ModelConfig, ServerConfig
from ..engine.check import synthetic_frames
from ..errors import ConfigError, StreamVLMError
from ..models import load_model
from ..models.device import precision_of
from ..protocol import Limits, encode_frame
from ..server.app import StreamServer
from .soak import QUESTIONS, LifecycleChecker, WireClient, metric_total, proc_status_bytes, scrape_metrics, vm_rss_bytes

__all__ = ["run_storm_bench"]

_FRAME_SIZE = (120, 160)
_TTFT_TARGET = 2.0
_RSS_TARGET = 1.5
_WATCHER_FPS = 10.0
_READY_TIMEOUT_S = 300.0  # a fresh interpreter importing the package on a busy machine
_JOIN_TIMEOUT_S = 10.0
_PIPE_POLL_S = 0.02


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


class _PeakRss(threading.Thread):
    """Samples VmRSS every 50 ms on its own thread (an event loop busy with a huge message cannot hide a peak)."""

    def __init__(self) -> None:
        super().__init__(name="storm-rss", daemon=True)
        self.peak = vm_rss_bytes()
        self._stop_event = threading.Event()
        self.hwm_reset = _reset_hwm()

    def run(self) -> None:
        while not self._stop_event.wait(0.05):
            self.peak = max(self.peak, vm_rss_bytes())

    def finish(self) -> int:
        """Stop sampling; the peak RSS in bytes (the kernel's high-water mark too, when it could be reset at the start)."""
        self._stop_event.set()
        self.join()
        peak = max(self.peak, vm_rss_bytes())
        if self.hwm_reset:
            peak = max(peak, _hwm())
        return peak


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    return proc_status_bytes("VmHWM") or 0


class _Hostile:
    """One hostile connection that reopens itself whenever the server closes it, and counts what happened."""

    def __init__(self, url: str, name: str, tally: Callable[[], None]) -> None:
        self.url, self.name, self.tally = url, name, tally
        self.client: WireClient | None = None
        self.sent: Counter[str] = Counter()
        self.undelivered: Counter[str] = Counter()  # given up: the server closed or refused the connection each time
        self.errors: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        self.connects = 0
        self.refused = 0
        self.faults = 0

    def _fold(self, client: WireClient) -> None:
        self.errors.update(client.errors)
        self.faults += client.faults
        if not client.closing and client.close_code is not None:
            self.closes[str(client.close_code)] += 1

    async def _ensure(self) -> WireClient | None:
        if self.client is not None and not self.client.closed.is_set():
            return self.client
        if self.client is not None:
            await self.client.close()
            self._fold(self.client)
            self.client = None
        for _ in range(20):
            try:
                client = await WireClient.connect(self.url)
            except (OSError, InvalidHandshake, asyncio.TimeoutError):
                self.refused += 1
                await asyncio.sleep(0.1)
                continue
            self.connects += 1
            first = await client.opened(5.0)
            if first is not None and first.get("type") == "session.created":
                self.client = client
                return client
            self.refused += 1
            await client.close()
            self._fold(client)
            await asyncio.sleep(0.1)
        return None

    async def send(self, kind: str, data: str | bytes) -> None:
        """Send one message (reopening the connection if the server closed it); counted under ``kind`` in
        ``sent``, or in ``undelivered`` when the server closed or refused the connection each time."""
        for _ in range(2):
            client = await self._ensure()
            if client is None:
                break
            if await client.send_raw(data):
                self.sent[kind] += 1
                self.tally()
                await asyncio.sleep(0)  # let the other hostile connections of this process send too
                return
        self.undelivered[kind] += 1

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self._fold(self.client)
            self.client = None

    def report(self) -> dict[str, Any]:
        return {"sent": dict(self.sent), "undelivered": dict(self.undelivered), "errors": dict(self.errors), "server_closes": dict(self.closes),
                "connects": self.connects, "refused": self.refused, "engine_faults": self.faults}


def _garbage(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \u00e9\u4e2d\U0001f600"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200)))


_BROKEN_JSON = ('{"type": "session.update", "session": {', "NaN", "Infinity", '{"type": }', "[1, 2", "{'type': 'x'}",
                '{"type": "response.create", "event_id": ', '"just a string', "{}}", '{"type": "watch.create", "watch": {"id": "a"')


def _huge_text(size: int) -> str:
    head = json.dumps({"type": "conversation.item.create", "event_id": "huge", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": ""}]}})
    cut = head.index('"text": ""') + len('"text": "')
    return head[:cut] + "x" * (size - len(head)) + head[cut:]


def _huge_trigger(i: int) -> dict[str, Any]:
    kinds = ({"kind": "threshold", "on": 0.6, "off": 0.4, "m": 1, "n": 10**30},
             {"kind": "threshold", "on": 0.6, "off": 0.4, "m": 10**30, "n": 10**30},
             {"kind": "zscore", "z": 2.0, "window": 10**30, "min_history": 10**30},
             {"kind": "sum", "threshold": 1e308, "baseline": 0.5})
    return kinds[i % len(kinds)]


def run_storm_bench(model: str | ModelConfig = "tiny-smolvlm", *, messages: int = 10_000, churn: int = 100, watches: int = 1000,
                    questions: int = 8, fps: float = 5.0, new_sessions: int = 3, seed: int = 0,
                    quiet_s: float = 20.0, settle_timeout_s: float = 120.0, answer_timeout_s: float = 120.0,
                    progress: bool = True) -> dict[str, Any]:
    """Run the storm (see the module docstring) and return a JSON-ready dict.

    Keys: ``benchmark`` ("storm"), the arguments, ``ttft_before_p50_s``/``_p95_s``,
    ``ttft_during_p50_s``/``_p95_s``, ``ttft_p50_ratio``, ``ttft_p95_ratio``, ``rss_idle_bytes``,
    ``rss_peak_bytes``, ``rss_peak_ratio`` (of the server's process), ``new_sessions_admitted``,
    ``new_sessions_refused``, ``new_sessions_answered``, ``live`` (questions, answers, statuses,
    lifecycle violations, whether the server closed it), ``engine_faults`` (fault-coded error events
    on every connection, and ``engine_faults_metric`` from /metrics when exported), ``hostile`` (per
    connection: messages sent by kind, messages given up by kind because the server closed or refused
    the connection each time, errors back by code, server close codes, reconnects), ``hostile_messages``
    and ``hostile_undelivered`` (those two summed), ``churn`` (admitted, refused), ``storm_s``, ``hostile_process`` (True: the hostile clients ran in
    their own process), ``processes`` (pid and role of each process), ``hostile_cpu_s`` (CPU seconds
    of the hostile process during the storm; ``hostile_cpu_total_s`` with its start-up),
    ``server_process_cpu_s`` (CPU seconds of the main process during the storm), ``hostile_exitcode``,
    ``threads_before``/``threads_after`` (Python threads before the server started and after it
    stopped) and ``threads_new`` (the names of those alive after that were not before: e.g. the
    monitor thread of the storm's own progress bar), ``targets`` (each target and whether it was met) and ``passed`` (no new session
    refused, every live question answered, the live session never closed by the server, no engine
    fault). Raises ConfigError for bad arguments (before any model is loaded or process started),
    StreamVLMError when the hostile process fails or ends without its report (it is terminated).

    The hostile process is spawned: it imports the caller's main module, so a script calling this
    needs the ``if __name__ == "__main__":`` guard (the CLI and test runners have it).
    """
    for name, value, low in (("messages", messages, 10), ("churn", churn, 0), ("watches", watches, 0),
                             ("questions", questions, 1), ("new_sessions", new_sessions, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}: must be an integer >= {low}, got {value!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 30:
        raise ConfigError(f"fps: must be a number in (0, 30] (the server's default frame-rate limit), got {fps!r}")
    for name, value in (("quiet_s", quiet_s), ("settle_timeout_s", settle_timeout_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ConfigError(f"{name}: must be a number of seconds >= 0, got {value!r}")
    adapter = load_model(model)  # a preset, id or path, or a ModelConfig (device, dtype)
    precision = precision_of(adapter).to_dict()
    started = time.monotonic()
    threads_before = threading.active_count()
    alive_before = set(threading.enumerate())
    result = asyncio.run(_storm(adapter, messages, churn, watches, questions, float(fps), new_sessions, seed,
                                float(quiet_s), float(settle_timeout_s), answer_timeout_s, progress))
    return {"benchmark": "storm", "model": getattr(model, "model", model), **precision, "messages": messages, "churn": churn, "watches": watches,
            "questions": questions, "fps": float(fps), "seed": seed, "quiet_s": float(quiet_s), "wall_s": round(time.monotonic() - started, 1), **result,
            "threads_before": threads_before, "threads_after": threading.active_count(),
            "threads_new": sorted(t.name for t in threading.enumerate() if t not in alive_before)}


def _cpu_s() -> float:
    """CPU seconds (user + system, every thread) this process has used so far."""
    times = os.times()
    return times.user + times.system


class _Live:
    """The live session: frames at a steady rate, one question at a time, TTFT per question."""

    def __init__(self, client: WireClient, checker: LifecycleChecker, frames: list[bytes], fps: float, timeout: float) -> None:
        self.client, self.checker, self.frames, self.fps, self.timeout = client, checker, frames, fps, timeout
        self.stop = asyncio.Event()
        self.ids = 0
        self.sent = 0

    def eid(self) -> str:
        self.ids += 1
        return f"live.{self.ids}"

    async def stream(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set() and not self.client.closed.is_set():
            image = self.frames[self.sent % len(self.frames)]
            if not await self.client.send_frame(image, self.sent / self.fps, "live"):
                return
            self.sent += 1
            delay = t0 + self.sent / self.fps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                t0 = time.monotonic() - self.sent / self.fps  # fell behind: keep the pace, skip the backlog

    async def until_steady(self, timeout: float) -> float | None:
        """Wait until the session's working memory has reached its budget (its first ``memory.update``:
        from then on every frame and answer pays for compression, spilling and retrieval, as during a
        long storm); the seconds waited, or None when it did not happen within ``timeout``."""
        start = time.monotonic()
        full = await self.client.wait_until(lambda: self.client.types["memory.update"] > 0, timeout)
        return round(time.monotonic() - start, 2) if full else None

    async def ask_for(self, rng: random.Random, questions: int, seconds: float) -> list[float]:
        """Ask one question after another until at least ``questions`` were asked and ``seconds`` passed; their TTFTs."""
        start, ttfts, asked = time.monotonic(), [], 0
        while not self.client.closed.is_set() and (asked < questions or time.monotonic() - start < seconds):
            t = await self.ask(rng)
            asked += 1
            if t is not None:
                ttfts.append(t)
        return ttfts

    async def ask(self, rng: random.Random) -> float | None:
        """Ask one question and wait for its answer to end; its TTFT in seconds, or None if it never ended."""
        await self.client.send({"type": "conversation.item.create", "event_id": self.eid(), "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": rng.choice(QUESTIONS)}]}})
        cid = self.eid()
        self.checker.asked(cid, time.monotonic())
        await self.client.send({"type": "response.create", "event_id": cid})
        ask = self.checker.asks[cid]
        await self.client.wait_until(lambda: ask.done > 0 or ask.refused is not None, self.timeout)
        first = ask.first_delta_at if ask.first_delta_at is not None else ask.done_at
        return None if first is None else first - ask.sent_at


class _HostileProcess:
    """The hostile clients' own OS process, seen from the main process.

    Made with :meth:`start`: a spawned interpreter that imports this module, says it is ready and
    waits. :meth:`go` starts the storm; :meth:`pump` then reads its progress until its report (or a
    failure) arrives; :meth:`enough` lets its sustained floods stop. :meth:`close` always ends it:
    joined when its report came, else terminated after a short grace (then killed).
    """

    def __init__(self, process: Any, conn: Connection) -> None:
        self.process, self._conn = process, conn
        self.pid: int | None = process.pid
        self.ready = False
        self.report: dict[str, Any] | None = None
        self.error: str | None = None
        self.exitcode: int | None = None
        self._enough_sent = False

    @classmethod
    def start(cls, params: dict[str, Any]) -> _HostileProcess:
        """Spawn the process with ``params`` (plain data: URL, seed, counts, the JPEG frames to send)."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(target=_hostile_main, args=(child, params), name="storm-hostile", daemon=True)
        try:
            process.start()
        finally:
            child.close()  # only the child holds its end: its exit reads as end-of-file here
        return cls(process, parent)

    def _drain(self, on_progress: Callable[[int], Any] | None = None) -> int:
        """Read every message waiting in the pipe (how many); a closed pipe without a report becomes ``error``."""
        alive = self.process.is_alive()  # before reading: a process found ended has nothing more on its way
        read = 0
        try:
            while self._conn.poll():
                message = self._conn.recv()
                read += 1
                kind = message[0]
                if kind == "ready":
                    self.ready = True
                elif kind == "progress" and on_progress is not None:
                    on_progress(int(message[1]))
                elif kind == "report":
                    self.report = message[1]
                elif kind == "error":
                    self.error = str(message[1])
        except (EOFError, OSError):
            pass
        if self.report is None and self.error is None and not alive:
            self.error = f"the hostile process ended (exit code {self.process.exitcode}) without a report"
        return read

    def _fail(self) -> None:
        if self.error is not None:
            raise StreamVLMError(f"storm: {self.error}")

    async def wait_ready(self, timeout: float = _READY_TIMEOUT_S) -> None:
        """Wait until the process has started and imported what it needs; StreamVLMError if it fails or takes too long."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            self._drain()
            if self.ready:
                break
            self._fail()
            if time.monotonic() > deadline:
                raise StreamVLMError(f"storm: the hostile process was not ready after {timeout:.0f} s")
            await asyncio.sleep(0.05)

    def go(self) -> None:
        """Start the storm (a process already gone is reported by :meth:`pump`)."""
        try:
            self._conn.send(("go",))
        except OSError:
            pass

    def enough(self) -> None:
        """Tell the process the live session has its samples: sustained floods may stop (idempotent)."""
        if not self._enough_sent:
            self._enough_sent = True
            try:
                self._conn.send(("enough",))
            except OSError:
                pass

    async def pump(self, on_progress: Callable[[int], Any], stall_s: float) -> dict[str, Any]:
        """Read progress until the report arrives and return it. StreamVLMError when the process fails,
        ends without a report or sends nothing (no message sent, no report) for ``stall_s`` seconds."""
        last = time.monotonic()
        while True:
            if self._drain(on_progress):
                last = time.monotonic()
            if self.report is not None:
                return self.report
            self._fail()
            if time.monotonic() - last > stall_s:
                raise StreamVLMError(f"storm: the hostile process sent nothing for {stall_s:.0f} s")
            await asyncio.sleep(_PIPE_POLL_S)

    def close(self) -> None:
        """End the process (idempotent): joined when its report came, else terminated, then killed."""
        if self.exitcode is not None:
            return
        self.enough()
        self.process.join(_JOIN_TIMEOUT_S if self.report is not None else 2.0)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.exitcode = self.process.exitcode
        self._conn.close()
        self.process.close()


async def _storm(adapter: Any, messages: int, churn: int, watches: int, questions: int, fps: float, new_sessions: int,
                 seed: int, quiet_s: float, settle_timeout_s: float, answer_timeout_s: float, progress: bool) -> dict[str, Any]:
    rng = random.Random(f"storm:{seed}")
    limits = Limits()
    server = StreamServer(adapter, ServerConfig(host="127.0.0.1", port=0), limits=limits)
    host, port = await server.start()
    url = f"ws://{host}:{port}/v1/realtime"
    images = synthetic_frames(16, height=_FRAME_SIZE[0], width=_FRAME_SIZE[1])
    jpegs = [cv2.imencode(".jpg", np.ascontiguousarray(img[:, :, ::-1]))[1].tobytes() for img in images]
    extra: list[WireClient] = []
    checker = LifecycleChecker()
    live: _Live | None = None
    hostile: _HostileProcess | None = None
    try:
        hostile = _HostileProcess.start({"url": url, "seed": seed, "messages": messages, "churn": churn, "watches": watches,
                                         "max_message_bytes": limits.max_message_bytes, "jpegs": jpegs})
        client = await WireClient.connect(url, checker=checker)
        live = _Live(client, checker, jpegs, fps, answer_timeout_s)
        if (await client.opened()) is None:
            raise ConfigError("the server did not open the live session")
        await client.send({"type": "session.update", "event_id": "live.settings",
                           "session": {"sampling": {"max_new_tokens": 4, "temperature": 0.0}}})
        streaming = asyncio.create_task(live.stream())
        await asyncio.sleep(min(2.0, 4 / fps))
        await hostile.wait_ready()  # its interpreter start-up is over before the first timed question
        await live.ask(rng)  # warm-up, not counted
        settled_s = await live.until_steady(settle_timeout_s)
        before = await live.ask_for(rng, questions, quiet_s)
        rss_idle = vm_rss_bytes()
        storm = await _storm_phase(live, hostile, rng, messages + churn, questions, max(60.0, 2 * answer_timeout_s), progress)
        hostile.close()
        quiet_after = await live.ask_for(rng, questions, quiet_s)
        after = await _fresh_sessions(url, jpegs, new_sessions, answer_timeout_s, extra)
        live.stop.set()
        await streaming
        metrics = await scrape_metrics(host, port)
    finally:
        if hostile is not None:
            hostile.close()
        for fresh in extra:
            await fresh.close()
        if live is not None:
            await live.client.close()
        await server.stop()
    return {**_summary(live, before, rss_idle, storm, after, hostile, extra, metrics, new_sessions),
            **_quiet_after(quiet_after, storm["during"]), "settled_s": settled_s}


def _quiet_after(after: list[float], during: list[float]) -> dict[str, Any]:
    """The quiet window after the storm: its TTFT percentiles, and the storm's p95 over it (a check that
    the before window was not merely an easier moment of the stream)."""
    a95 = _percentile(after, 95)
    return {"ttft_after_p50_s": _percentile(after, 50), "ttft_after_p95_s": a95, "ttft_samples_after": len(after),
            "ttft_p95_ratio_to_after": _ratio(_percentile(during, 95), a95)}


async def _storm_phase(live: _Live, hostile: _HostileProcess, rng: random.Random, total: int, questions: int, stall_s: float,
                       progress: bool) -> dict[str, Any]:
    """Let the hostile process storm while the live session keeps asking (until the hostile process has
    sent its report, and at least ``questions`` times); TTFTs during, duration, RSS peak, CPU seconds, the report."""
    bar = _progress_bar(total, progress)
    sampler = _PeakRss()
    sampler.start()
    during: list[float] = []
    asked = 0
    cpu_start = _cpu_s()
    start = time.monotonic()
    pump: asyncio.Task[dict[str, Any]] | None = None
    try:
        hostile.go()
        pump = asyncio.create_task(hostile.pump(bar.update, stall_s))
        while not live.client.closed.is_set() and (not pump.done() or asked < questions):
            if pump.done() and pump.exception() is not None:
                break
            t = await live.ask(rng)
            asked += 1
            if t is not None:
                during.append(t)
            if asked >= questions:
                hostile.enough()
        hostile.enough()
        report = await pump
        seconds = time.monotonic() - start
        cpu = _cpu_s() - cpu_start
    finally:
        if pump is not None and not pump.done():
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        rss_peak = sampler.finish()
        bar.close()
    return {"during": during, "storm_s": seconds, "rss_peak": rss_peak, "server_process_cpu_s": cpu, "report": report}


class _NoBar:
    """Stands in for the progress bar under ``progress=False`` (a disabled tqdm bar still starts a monitor thread that stays)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, progress: bool) -> Any:
    """A tqdm bar over ``total`` messages, or a do-nothing stand-in when ``progress`` is False."""
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="storm", unit="msg")


async def _fresh_sessions(url: str, jpegs: list[bytes], count: int, timeout: float, extra: list[WireClient]) -> dict[str, int]:
    """Open ``count`` new sessions (kept open, appended to ``extra``), each with two frames and a question."""
    admitted = refused = answered = 0
    for i in range(count):
        checker = LifecycleChecker()
        try:
            client = await WireClient.connect(url, checker=checker)
        except (OSError, InvalidHandshake, asyncio.TimeoutError):
            refused += 1
            continue
        extra.append(client)
        first = await client.opened()
        if first is None or first.get("type") != "session.created":
            refused += 1
            continue
        admitted += 1
        for k in range(2):
            await client.send_frame(jpegs[k], k * 0.5, "after")
        await client.send({"type": "conversation.item.create", "event_id": f"after{i}.1", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTIONS[0]}]}})
        checker.asked(f"after{i}.2", time.monotonic())
        await client.send({"type": "response.create", "event_id": f"after{i}.2"})
        await client.wait_until(lambda: not checker.pending(), timeout)
        answered += checker.answers()
    return {"admitted": admitted, "refused": refused, "answered": answered}


def _summary(live: _Live | None, before: list[float], rss_idle: int, storm: dict[str, Any], after: dict[str, int],
             hostile: _HostileProcess | None, extra: list[WireClient], metrics: str | None, new_sessions: int) -> dict[str, Any]:
    assert live is not None and hostile is not None
    client, checker = live.client, live.checker
    checker.finish()
    asks = list(checker.asks.values())
    report = storm["report"]
    connections: dict[str, dict[str, Any]] = report["hostile"]
    faults = client.faults + sum(c["engine_faults"] for c in connections.values()) + sum(c.faults for c in extra)
    during = storm["during"]
    b50, b95, d50, d95 = _percentile(before, 50), _percentile(before, 95), _percentile(during, 50), _percentile(during, 95)
    live_report = {
        "questions": len(asks), "answers": checker.answers(), "statuses": dict(checker.statuses()),
        "unanswered": sum(1 for a in asks if a.status not in ("completed", "incomplete")),
        "lifecycle_violations": sum(checker.violations.values()), "violations": dict(checker.violations),
        "violation_examples": checker.examples, "errors": dict(client.errors), "fault_examples": client.fault_examples,
        "closed_by_server": client.closed.is_set() and not client.closing, "close_code": client.close_code,
        "frames_sent": live.sent,
    }
    ttft_ratio = _ratio(d95, b95)
    rss_ratio = storm["rss_peak"] / rss_idle if rss_idle else None
    targets = {"ttft_p95_ratio_max": _TTFT_TARGET, "ttft_ok": ttft_ratio is not None and ttft_ratio <= _TTFT_TARGET,
               "rss_peak_ratio_max": _RSS_TARGET, "rss_ok": rss_ratio is not None and rss_ratio <= _RSS_TARGET}
    fault_metric = metric_total(metrics, "streamvlm_engine_faults_total")
    return {
        "ttft_before_p50_s": b50, "ttft_before_p95_s": b95, "ttft_during_p50_s": d50, "ttft_during_p95_s": d95,
        "ttft_samples_before": len(before), "ttft_samples_during": len(during),
        "ttft_p50_ratio": _ratio(d50, b50), "ttft_p95_ratio": ttft_ratio,
        "rss_idle_bytes": rss_idle, "rss_peak_bytes": storm["rss_peak"], "rss_peak_ratio": rss_ratio,
        "new_sessions_admitted": after["admitted"], "new_sessions_refused": after["refused"],
        "new_sessions_answered": after["answered"],
        "live": live_report,
        "engine_faults": faults, "engine_faults_metric": fault_metric,
        "hostile": connections,
        "hostile_messages": sum(sum(c["sent"].values()) for c in connections.values()),
        "hostile_undelivered": sum(sum(c.get("undelivered", {}).values()) for c in connections.values()),
        "churn": report["churn"],
        "storm_s": round(storm["storm_s"], 2),
        "hostile_process": report["pid"] != os.getpid(),
        "processes": {"main": {"pid": os.getpid(), "runs": ["server", "live session", "new sessions", "rss sampler"]},
                      "hostile": {"pid": report["pid"], "runs": ["hostile clients"]}},
        "hostile_cpu_s": round(report["cpu_s"], 2), "hostile_cpu_total_s": round(report["cpu_total_s"], 2),
        "server_process_cpu_s": round(storm["server_process_cpu_s"], 2),
        "hostile_exitcode": hostile.exitcode,
        "targets": targets,
        "passed": (after["refused"] == 0 and after["answered"] == new_sessions and live_report["unanswered"] == 0
                   and not live_report["closed_by_server"] and faults + int(fault_metric or 0) == 0),
    }


def _scripts(url: str, rng: random.Random, messages: int, churn: int, watches: int, jpegs: list[bytes], max_message_bytes: int,
             tally: Callable[[int], Any], hostiles: list[_Hostile], enough: asyncio.Event) -> dict[str, Any]:
    """The hostile connections' coroutines (appended to ``hostiles`` as they are made) and the churn tally."""
    fifth = messages // 5
    n_frames, n_garbage, n_broken, n_dup = fifth, fifth, fifth, fifth
    huge = 4
    n_misc = max(0, messages - n_frames - n_garbage - n_broken - n_dup - huge - watches - 4)

    def hostile(name: str) -> _Hostile:
        h = _Hostile(url, name, lambda: tally(1))
        hostiles.append(h)
        return h

    big_budget = json.dumps({"type": "session.update", "event_id": "greedy", "session": {"memory": {"budget_tokens": 10**12}}})

    async def noise() -> None:
        h = hostile("noise")
        await h.send("budget_10e12", big_budget)
        kinds = ["garbage"] * n_garbage + ["invalid_json"] * n_broken + ["misc"] * n_misc
        rng.shuffle(kinds)
        misc = (lambda: json.dumps({"type": "session.update", "session": {}}),
                lambda: json.dumps({"type": "no.such.event", "event_id": "x"}),
                lambda: json.dumps({"type": "response.cancel", "response_id": f"resp_{rng.randrange(10**9)}"}))
        for kind in kinds:
            if kind == "garbage":
                await h.send(kind, _garbage(rng))
            elif kind == "invalid_json":
                await h.send(kind, rng.choice(_BROKEN_JSON))
            else:
                await h.send(kind, rng.choice(misc)())

    async def duplicates() -> None:
        h = hostile("duplicate_ids")
        await h.send("budget_10e12", big_budget)
        item = json.dumps({"type": "conversation.item.create", "event_id": "dup", "item": {
            "id": "item_dup", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "dup?"}]}})
        create = json.dumps({"type": "response.create", "event_id": "dup"})
        watch = json.dumps({"type": "watch.create", "event_id": "dup", "watch": {"id": "dup_watch", "condition": "anything"}})
        cancel = json.dumps({"type": "response.cancel", "event_id": "dup"})
        cycle = (item, create, watch, cancel)
        for i in range(n_dup):
            await h.send("duplicate_ids", cycle[i % len(cycle)])

    async def huge_messages() -> None:
        h = hostile("huge")
        size = max_message_bytes + 1
        text = _huge_text(size)
        binary = encode_frame(jpegs[0], None)[:16 + 7] + b"\0" * (size - 23)
        for i in range(huge):
            await h.send("huge_text" if i % 2 == 0 else "huge_binary", text if i % 2 == 0 else binary)
            await asyncio.sleep(0.05)

    async def watcher() -> None:
        h = hostile("watches")
        await h.send("budget_10e12", big_budget)
        stop = asyncio.Event()

        async def frames() -> None:
            k = 0
            while not stop.is_set():
                await h.send("watcher_frames", encode_frame(jpegs[k % len(jpegs)], None, "watcher"))
                k += 1
                await asyncio.sleep(1 / _WATCHER_FPS)

        streaming = asyncio.create_task(frames())
        for i in range(watches):
            trigger = {"kind": "threshold", "on": 0.6, "off": 0.4, "m": 1, "n": 2} if i < watches // 2 else _huge_trigger(i)
            await h.send("watch_create", json.dumps({"type": "watch.create", "event_id": f"w{i}", "watch": {
                "id": f"w{i}", "condition": f"thing number {i} appears", "trigger": trigger}}))
        await enough.wait()
        stop.set()
        await streaming

    async def flood() -> None:
        h = hostile("frame_flood")
        await h.send("budget_10e12", big_budget)
        k = 0
        while k < n_frames or not enough.is_set():
            await h.send("frames" if k < n_frames else "frames_sustained", encode_frame(jpegs[k % len(jpegs)], None, "flood"))
            k += 1
            if k >= n_frames:
                await asyncio.sleep(0.02)

    churn_tally = Counter[str]()

    async def churner() -> None:
        for _ in range(churn):
            try:
                client = await WireClient.connect(url)
            except (OSError, InvalidHandshake, asyncio.TimeoutError):
                churn_tally["refused"] += 1
                tally(1)
                continue
            first = await client.opened(5.0)
            churn_tally["admitted" if first is not None and first.get("type") == "session.created" else "refused"] += 1
            await client.close()
            tally(1)

    tasks: list[Awaitable[None]] = [noise(), duplicates(), huge_messages(), watcher(), flood(), churner()]
    return {"tasks": tasks, "churn": churn_tally}


def _hostile_main(conn: Connection, params: dict[str, Any]) -> None:
    """The hostile process's entry point: say ready, wait for "go", storm, send the report, end.

    Ends without storming when the main process goes away first; any failure is sent back as
    ``("error", traceback)`` and ends the process with exit code 1.
    """
    try:
        conn.send(("ready",))
        try:
            while conn.recv()[0] != "go":
                pass
        except (EOFError, OSError):
            return  # the main process is gone
        cpu_start = _cpu_s()
        report = asyncio.run(_hostile_storm(conn, params))
        report.update(pid=os.getpid(), cpu_s=_cpu_s() - cpu_start, cpu_total_s=_cpu_s())
        conn.send(("report", report))
    except BaseException:  # noqa: BLE001 - everything goes back to the main process, which raises it
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        conn.close()


async def _hostile_storm(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    """Run every hostile script at once on this process's event loop; their reports and the churn tally.

    Every ``_PIPE_POLL_S`` the messages sent since the last look go to the main process as
    ``("progress", n)``; ``("enough",)`` from it lets the sustained floods stop, and its going away
    (end of file) stops the storm.
    """
    rng = random.Random(f"storm.hostile:{params['seed']}")
    enough = asyncio.Event()
    hostiles: list[_Hostile] = []
    sent = [0]

    def tally(n: int) -> None:
        sent[0] += n

    scripted = _scripts(params["url"], rng, params["messages"], params["churn"], params["watches"], params["jpegs"],
                        params["max_message_bytes"], tally, hostiles, enough)
    storm = asyncio.gather(*scripted["tasks"])

    def flush() -> None:
        if sent[0]:
            conn.send(("progress", sent[0]))
            sent[0] = 0

    async def link() -> None:
        while not storm.done():
            try:
                while conn.poll():
                    if conn.recv()[0] == "enough":
                        enough.set()
                flush()
            except (EOFError, OSError):
                enough.set()
                storm.cancel()  # the main process is gone: nobody is measuring
                return
            await asyncio.sleep(_PIPE_POLL_S)

    linker = asyncio.create_task(link())
    start = time.monotonic()
    try:
        await storm
    finally:
        linker.cancel()
        await asyncio.gather(linker, return_exceptions=True)
        for h in hostiles:
            await h.close()
    flush()
    return {"hostile": {h.name: h.report() for h in hostiles}, "churn": dict(scripted["churn"]),
            "storm_s": time.monotonic() - start}
