"""``streamvlm bench serve``: many realtime sessions against one server, measured from the client side.

One process starts a :class:`~streamvlm.server.app.StreamServer` on 127.0.0.1 (an ephemeral port) with
one loaded model, then opens K sessions with :class:`streamvlm_client.AsyncClient`. For ``duration``
seconds every session:

* sends changing synthetic frames at ``fps`` (a shared set of moving-square images, cycled, each
  stamped with a per-session, per-frame corner marker so none is a near-duplicate of the last);
* once a second sends an empty ``session.update`` and times the ``session.updated`` reply: the
  latency of a protocol event that never waits on the model, i.e. how responsive the server's event
  loop stays under load;
* every ``ask_every`` seconds (staggered across sessions; all at the same moment with ``ask_together``,
  as when many users ask at once) asks a question, unless its previous answer is still running, and
  times the first streamed piece of text (TTFT, from sending the question).

Meanwhile the process's RSS is sampled every second (more often for runs under 10 s). Reported:
event latency and TTFT p50/p95, the sessions' frame counters from their last ``input_frame.stats``
(summed, plus dropped frames per session), RSS at the start, at 10 % of the run and at the end with
``rss_growth_ratio`` = end / 10 %, and each session's working memory (``working_bytes``) at the end.
From the server side: frames read per second in all, each session's frames read and the share
``max/min`` between sessions (1.0 = perfectly even; None when a session read nothing), frame lag
(arrival to the start of its read) p50/p95, the sessions admission by compute capped (frames were
dropped above their cap) and the frames dropped for it, and the vision batches (frames per vision
forward: 1.0 for ``lock``) and decode steps (steps per language-model forward: sessions answering at
the same moment share one). The server sets the shared adapter's modes from the engine
(``adapter.vision_batching`` and ``adapter.decode_batching``: batched for ``scheduler``, one frame or
step per forward for ``lock``).

:func:`run_serve_sweep` runs several session counts and engines (``ServerConfig.engine``: ``lock``,
the previous mode where sessions take turns on one lock, and ``scheduler``) against one loaded model
in one invocation, and compares them: each run's TTFT p95 and frames read per second against the
single-session run of its engine, and each engine against ``lock`` at the same session count, so a
gain is a ratio measured in one run on one machine.

Server and clients share one event loop and one process (as they would not in production), so the
figures include the clients' own JPEG encoding; with random-weight presets the answers are noise and
only the timings mean something.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from types import ModuleType
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..config import ModelConfig, ServerConfig
from ..engine.check import synthetic_frames
from ..errors import ConfigError
from ..models import load_model
from ..models.device import precision_of
from ..server.app import StreamServer
from .memory import rss_bytes

__all__ = ["run_serve_bench", "run_serve_sweep", "QUESTION"]

#: The question every session asks.
QUESTION = "What is happening in the video?"
_BASE_FRAMES = 32
_FRAME_SIZE = (240, 320)
_STATS_EVERY_S = 1.0
_ANSWER_GRACE_S = 60.0
#: The engines ``ServerConfig.engine`` accepts (see its docstring).
ENGINES = ("lock", "scheduler")


def _client_module() -> ModuleType:
    """``streamvlm_client`` (installed with the project from ``client/``), imported when first needed."""
    import streamvlm_client

    return streamvlm_client


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _check(sessions: Sequence[int], engines: Sequence[str], fps: float, duration: float, ask_every: float) -> None:
    if not sessions or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sessions):
        raise ConfigError(f"sessions: must be integers >= 1, got {list(sessions)!r}")
    if not engines or any(e not in ENGINES for e in engines):
        raise ConfigError(f"engine: must be among {', '.join(ENGINES)}, got {list(engines)!r}")
    for name, value in (("fps", fps), ("duration", duration), ("ask_every", ask_every)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name}: must be a finite number > 0, got {value!r}")


def run_serve_bench(model: str | ModelConfig = "tiny-smolvlm", sessions: int = 8, fps: float = 2.0, duration: float = 30.0, *,
                    ask_every: float = 5.0, max_new_tokens: int = 16, engine: str = "scheduler",
                    ask_together: bool = False) -> dict[str, Any]:
    """Run the benchmark once (about ``duration`` seconds plus model loading and the last answers) and
    return a JSON-ready dict; see the module docstring for what is measured.

    Keys: ``benchmark`` ("serve"), ``model``, ``engine``, ``sessions``, ``fps``, ``duration_s``,
    ``event_latency_p50_s``/``_p95_s``, ``ttft_p50_s``/``_p95_s`` (None when no answer streamed),
    ``frames`` (sent, received, skipped, dropped, ingested: summed over sessions),
    ``frames_dropped_per_session``, ``frames_read_per_s``, ``frames_read_per_session``,
    ``share_max_min``, ``lag_p50_s``/``lag_p95_s``, ``sessions_capped`` (sessions that had frames
    dropped for compute), ``frames_dropped_compute``, ``vision_batch_mean`` (frames per vision forward; None before the first), ``vision_batches``
    (the batcher's counters for the run), ``decode_batch_mean`` (decode steps per forward; None before
    the first) and ``decode_batches`` (the decode batcher's counters),
    ``rss_start_bytes``, ``rss_at_10pct_bytes``, ``rss_end_bytes``, ``rss_growth_ratio``,
    ``memory_per_session_bytes`` (working-memory bytes of each session at the end), ``model_share``,
    ``model_s_per_frame``, ``model_s_per_answer`` and ``frames_read_per_s_ceiling`` (where the model's time went, and the
    frames per second it could read with what answers and probes left: :func:`_model_time`), the sample counts
    ``event_latency_samples``, ``questions``, ``answers``, and the device/dtype the model ran in.
    Raises ConfigError for a non-positive ``sessions``, ``fps``, ``duration`` or ``ask_every``, or an
    unknown ``engine``.
    """
    if isinstance(sessions, bool) or not isinstance(sessions, int) or sessions < 1:
        raise ConfigError(f"sessions: must be an integer >= 1, got {sessions!r}")
    _check([sessions], [engine], fps, duration, ask_every)
    client_module = _client_module()
    adapter = load_model(model)  # a preset, id or path, or a ModelConfig (device, dtype)
    result = asyncio.run(_run(adapter, client_module, getattr(model, "model", model), sessions, float(fps), float(duration),
                              float(ask_every), max_new_tokens, engine, ask_together))
    return {**result, **precision_of(adapter).to_dict()}


def run_serve_sweep(model: str | ModelConfig = "tiny-smolvlm", sessions: Sequence[int] = (1, 2, 4, 8),
                    engines: Sequence[str] = ("lock", "scheduler"), fps: float = 1.0, duration: float = 30.0, *,
                    ask_every: float = 5.0, max_new_tokens: int = 16, ask_together: bool = False) -> dict[str, Any]:
    """Run :func:`run_serve_bench` for every engine at every session count, on one loaded model, and
    compare them. Takes about ``len(engines) * len(sessions) * duration`` seconds plus the last answers.

    Returns ``benchmark`` ("serve"), ``model``, ``fps``, ``duration_s``, ``sessions`` and ``engines``
    (as run), ``runs`` (one :func:`run_serve_bench` result each, engines in the order given, session
    counts ascending), ``comparison`` (one row per run: ``ttft_p95_vs_single``,
    ``frames_read_per_s_vs_single`` and ``frames_ceiling_vs_single`` (the run's frame ceiling over the
    single run's frames read), against the smallest session count of the same engine, and
    ``ttft_p95_vs_lock`` / ``frames_read_per_s_vs_lock`` against ``lock`` at the same count when it
    ran; None where a figure is missing), and the device/dtype fields. Raises ConfigError as
    :func:`run_serve_bench` does.
    """
    counts = sorted(set(sessions)) if not isinstance(sessions, int) else [sessions]
    engines = list(dict.fromkeys(engines))
    _check(counts, engines, fps, duration, ask_every)
    client_module = _client_module()
    adapter = load_model(model)
    name = getattr(model, "model", model)
    runs: list[dict[str, Any]] = []
    for engine in engines:
        for n in counts:
            runs.append(asyncio.run(_run(adapter, client_module, name, n, float(fps), float(duration), float(ask_every),
                                         max_new_tokens, engine, ask_together)))
    return {"benchmark": "serve", "model": name, "fps": float(fps), "duration_s": float(duration), "sessions": counts,
            "engines": engines, "runs": runs, "comparison": compare_runs(runs), **precision_of(adapter).to_dict()}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare_runs(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Ratios between runs (see :func:`run_serve_sweep`): for each run, its TTFT p95 and frames read per
    second over the single-session (smallest count) run of its engine, and over ``lock`` at its count."""
    rows = []
    for run in runs:
        same = [r for r in runs if r["engine"] == run["engine"]]
        single = min(same, key=lambda r: r["sessions"])
        lock = next((r for r in runs if r["engine"] == "lock" and r["sessions"] == run["sessions"]), None)
        rows.append({
            "engine": run["engine"], "sessions": run["sessions"],
            "ttft_p95_vs_single": _ratio(run["ttft_p95_s"], single["ttft_p95_s"]),
            "frames_read_per_s_vs_single": _ratio(run["frames_read_per_s"], single["frames_read_per_s"]),
            "frames_ceiling_vs_single": _ratio(run.get("frames_read_per_s_ceiling"), single["frames_read_per_s"]),
            "ttft_p95_vs_lock": _ratio(run["ttft_p95_s"], lock["ttft_p95_s"]) if lock is not None else None,
            "frames_read_per_s_vs_lock": _ratio(run["frames_read_per_s"], lock["frames_read_per_s"]) if lock is not None else None,
            "share_max_min": run["share_max_min"],
        })
    return rows


async def _run(adapter: Any, client_module: ModuleType, model: str, sessions: int, fps: float, duration: float,
               ask_every: float, max_new_tokens: int, engine: str = "scheduler", ask_together: bool = False) -> dict[str, Any]:
    defaults = ServerConfig()
    config = ServerConfig(host="127.0.0.1", port=0, max_sessions=sessions, stats_every_s=_STATS_EVERY_S, engine=engine,
                          global_budget_tokens=max(defaults.global_budget_tokens, sessions * defaults.session_budget_tokens))
    adapter.batcher.reset_stats()  # runs of a sweep share one adapter; the server sets its batching modes from the engine
    adapter.decode_batcher.reset_stats()
    server = StreamServer(adapter, config)
    host, port = await server.start()
    url = f"ws://{host}:{port}"
    base = synthetic_frames(_BASE_FRAMES, height=_FRAME_SIZE[0], width=_FRAME_SIZE[1])
    clients: list[Any] = []
    try:
        for _ in range(sessions):
            client = await client_module.AsyncClient.connect(url, event_buffer=0)
            clients.append(client)
            await client.update(max_new_tokens=max_new_tokens)
        result = await _measure(server, clients, base, sessions, fps, duration, ask_every, ask_together)
    finally:
        for client in clients:
            await client.close()
        await server.stop()
    return {"benchmark": "serve", "model": model, "engine": engine, "sessions": sessions, "fps": fps, "duration_s": duration,
            "ask_together": ask_together, **result}


async def _measure(server: StreamServer, clients: list[Any], base: list[np.ndarray], sessions: int, fps: float,
                   duration: float, ask_every: float, ask_together: bool = False) -> dict[str, Any]:
    latencies: list[float] = []
    ttfts: list[float] = []
    sent = [0] * sessions
    questions = [0]
    rss: list[tuple[float, int]] = []
    answering: list[asyncio.Task[None] | None] = [None] * sessions
    side = max(2, min(_FRAME_SIZE) // 16)
    t0 = time.monotonic()
    end = t0 + duration
    held_at_start = server.adapter.lock.held_seconds()

    async def until(t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def frames(i: int) -> None:
        client, k = clients[i], 0
        while True:
            tick = t0 + k / fps
            if tick >= end:
                return
            await until(tick)
            image = base[(k + 5 * i) % len(base)].copy()
            image[:side, :side] = ((k * 37) % 256, (i * 53 + 17) % 256, ((k // len(base)) * 101) % 256)
            await client.send_frame(image, k / fps, f"cam{i}")
            sent[i] += 1
            k = max(k + 1, int((time.monotonic() - t0) * fps))  # fell behind: skip ticks rather than burst

    async def pings(i: int) -> None:
        t = t0 + (i / sessions)
        while t < end:
            await until(t)
            start = time.monotonic()
            await clients[i].update()
            latencies.append(time.monotonic() - start)
            t += 1.0

    async def one_answer(i: int) -> None:
        reply = await clients[i].answer(QUESTION)
        if reply.get("ttft_s") is not None:
            ttfts.append(float(reply["ttft_s"]))

    async def questions_of(i: int) -> None:
        t = t0 + min(0.5, duration / 4) + (0.0 if ask_together else i * ask_every / sessions)
        while t < end:
            await until(t)
            running = answering[i]
            if running is None or running.done():
                questions[0] += 1
                answering[i] = asyncio.create_task(one_answer(i))
            t += ask_every

    async def sample_rss() -> None:
        step = min(1.0, duration / 10)
        t = t0
        while t <= end:
            await until(t)
            rss.append((time.monotonic() - t0, rss_bytes()))
            t += step

    await asyncio.gather(sample_rss(), *(frames(i) for i in range(sessions)), *(pings(i) for i in range(sessions)),
                         *(questions_of(i) for i in range(sessions)))
    pending = [task for task in answering if task is not None and not task.done()]
    if pending:
        _, late = await asyncio.wait(pending, timeout=_ANSWER_GRACE_S)
        for task in late:
            task.cancel()
    for task in answering:
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    # The counters as of the last frame: each session's next input_frame.stats.
    async def final_stats(client: Any) -> dict[str, int]:
        try:
            return dict(await client.wait_for("input_frame.stats", timeout=_STATS_EVERY_S + 5.0))
        except (asyncio.TimeoutError, Exception):
            return dict(client.frame_stats)

    stats = await asyncio.gather(*(final_stats(c) for c in clients))
    deadline = time.monotonic() + 10.0
    live = [s.worker for s in server.sessions.values() if s.worker is not None]
    while time.monotonic() < deadline and not all(w.idle for w in live):
        await asyncio.sleep(0.05)
    memory = [int(w.session.stats()["working_bytes"]) for w in live]
    reads = _server_side(server, duration)
    reads.update(_model_time(server, held_at_start, time.monotonic() - t0, sum(reads["frames_read_per_session"]), len(ttfts)))
    rss_end = rss_bytes()
    rss.append((time.monotonic() - t0, rss_end))
    at_10 = next((b for t, b in rss if t >= 0.1 * duration), rss[-1][1])
    frames_total = {"sent": sum(sent)}
    for key in ("received", "skipped", "dropped", "ingested"):
        frames_total[key] = sum(int(s.get(key, 0)) for s in stats)
    return {
        "event_latency_p50_s": _percentile(latencies, 50),
        "event_latency_p95_s": _percentile(latencies, 95),
        "event_latency_samples": len(latencies),
        "ttft_p50_s": _percentile(ttfts, 50),
        "ttft_p95_s": _percentile(ttfts, 95),
        "questions": questions[0],
        "answers": len(ttfts),
        "frames": frames_total,
        "frames_dropped_per_session": [int(s.get("dropped", 0)) for s in stats],
        "rss_start_bytes": rss[0][1],
        "rss_at_10pct_bytes": at_10,
        "rss_end_bytes": rss_end,
        "rss_growth_ratio": rss_end / at_10 if at_10 else None,
        "memory_per_session_bytes": memory,
        **reads,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _model_time(server: StreamServer, held_at_start: tuple[float, float, float], elapsed: float, frames: int,
                answers: int) -> dict[str, Any]:
    """Where the model's time went from the start of the run to the end of its last answer, and the most
    frames per second the model could have read in that time.

    ``model_share``: the share of those seconds the model was held for answers, probes and frame reads
    (the lock's books, :meth:`~streamvlm.models.turns.TurnLock.held_seconds`), and idle. ``model_s_per_frame``:
    model seconds per frame read (a batch's forward shared by its frames), ``model_s_per_answer`` the same
    for answers (decode steps of answers running together share forwards). ``frames_read_per_s_ceiling``:
    frames per second had every second that answers and probes left gone to frames at that cost; with
    the model never idle it is the frames read per second, and no scheduler reads more frames without
    taking time from answers or making a frame cheaper."""
    spent = [max(0.0, b - a) for a, b in zip(held_at_start, server.adapter.lock.held_seconds())]
    answer, probe, frame = (x / elapsed for x in spent) if elapsed > 0 else (0.0, 0.0, 0.0)
    per_frame = spent[2] / frames if frames else None
    return {
        "model_share": {"answer": round(answer, 4), "probe": round(probe, 4), "frame": round(frame, 4),
                        "idle": round(max(0.0, 1.0 - answer - probe - frame), 4)},
        "model_s_per_frame": per_frame,
        "model_s_per_answer": spent[0] / answers if answers else None,
        "frames_read_per_s_ceiling": max(0.0, 1.0 - answer - probe) / per_frame if per_frame else None,
    }


def _server_side(server: StreamServer, duration: float) -> dict[str, Any]:
    """Frames read (in all, per session, the share between sessions), lag, admission by compute and
    vision batch sizes, from the server's own books at the end of a run."""
    hosted = list(server.sessions.values())
    counters = [s.worker.counters for s in hosted if s.worker is not None]
    per_session = sorted(int(c.ingested) for c in counters)
    per_session += [0] * (len(hosted) - len(per_session))  # sessions whose worker never started read nothing
    lags = [float(r.lag_s) for c in counters for r in c.recent]
    batches = server.adapter.batcher.stats()
    return {
        "frames_read_per_s": sum(per_session) / duration,
        "frames_read_per_session": per_session,
        "share_max_min": (max(per_session) / min(per_session)) if per_session and min(per_session) > 0 else None,
        "lag_p50_s": _percentile(lags, 50),
        "lag_p95_s": _percentile(lags, 95),
        "sessions_capped": sum(s.core.frames_dropped_compute > 0 for s in hosted),
        "frames_dropped_compute": sum(int(s.core.frames_dropped_compute) for s in hosted),
        "admission": getattr(server, "governor", None) is not None,
        "vision_batch_mean": batches.mean_batch if batches.batches else None,
        "vision_batches": batches.as_dict(),
        "decode_batch_mean": server.adapter.decode_batcher.stats().mean_batch or None,
        "decode_batches": server.adapter.decode_batcher.stats().as_dict(),
    }
