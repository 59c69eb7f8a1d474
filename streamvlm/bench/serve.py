"""``streamvlm bench serve``: many realtime sessions against one server, measured from the client side.

One process starts a :class:`~streamvlm.server.app.StreamServer` on 127.0.0.1 (an ephemeral port) with
one loaded model, then opens K sessions with :class:`streamvlm_client.AsyncClient`. For ``duration``
seconds every session:

* sends changing synthetic frames at ``fps`` (a shared set of moving-square images, cycled, each
  stamped with a per-session, per-frame corner marker so none is a near-duplicate of the last);
* once a second sends an empty ``session.update`` and times the ``session.updated`` reply: the
  latency of a protocol event that never waits on the model, i.e. how responsive the server's event
  loop stays under load;
* every ``ask_every`` seconds (staggered across sessions) asks a question, unless its previous answer
  is still running, and times the first streamed piece of text (TTFT, from sending the question).

Meanwhile the process's RSS is sampled every second (more often for runs under 10 s). Reported:
event latency and TTFT p50/p95, the sessions' frame counters from their last ``input_frame.stats``
(summed, plus dropped frames per session), RSS at the start, at 10 % of the run and at the end with
``rss_growth_ratio`` = end / 10 %, and each session's working memory (``working_bytes``) at the end.

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
from typing import Any

import numpy as np

from ..config import ModelConfig, ServerConfig
from ..engine.check import synthetic_frames
from ..errors import ConfigError
from ..models import load_model
from ..models.device import precision_of
from ..server.app import StreamServer
from .memory import rss_bytes

__all__ = ["run_serve_bench", "QUESTION"]

#: The question every session asks.
QUESTION = "What is happening in the video?"
_BASE_FRAMES = 32
_FRAME_SIZE = (240, 320)
_STATS_EVERY_S = 1.0
_ANSWER_GRACE_S = 60.0


def _client_module() -> ModuleType:
    """``streamvlm_client`` (installed with the project from ``client/``), imported when first needed."""
    import streamvlm_client

    return streamvlm_client


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_serve_bench(model: str | ModelConfig = "tiny-smolvlm", sessions: int = 8, fps: float = 2.0, duration: float = 30.0, *,
                    ask_every: float = 5.0, max_new_tokens: int = 16) -> dict[str, Any]:
    """Run the benchmark (about ``duration`` seconds plus model loading and the last answers) and return
    a JSON-ready dict; see the module docstring for what is measured.

    Keys: ``benchmark`` ("serve"), ``model``, ``sessions``, ``fps``, ``duration_s``,
    ``event_latency_p50_s``/``_p95_s``, ``ttft_p50_s``/``_p95_s`` (None when no answer streamed),
    ``frames`` (sent, received, skipped, dropped, ingested: summed over sessions),
    ``frames_dropped_per_session``, ``rss_start_bytes``, ``rss_at_10pct_bytes``, ``rss_end_bytes``,
    ``rss_growth_ratio``, ``memory_per_session_bytes`` (working-memory bytes of each session at the
    end), and the sample counts ``event_latency_samples``, ``questions``, ``answers``.
    Raises ConfigError for a non-positive ``sessions``, ``fps``, ``duration`` or ``ask_every``.
    """
    if isinstance(sessions, bool) or not isinstance(sessions, int) or sessions < 1:
        raise ConfigError(f"sessions: must be an integer >= 1, got {sessions!r}")
    for name, value in (("fps", fps), ("duration", duration), ("ask_every", ask_every)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name}: must be a finite number > 0, got {value!r}")
    client_module = _client_module()
    adapter = load_model(model)  # a preset, id or path, or a ModelConfig (device, dtype)
    result = asyncio.run(_run(adapter, client_module, getattr(model, "model", model), sessions, float(fps), float(duration),
                              float(ask_every), max_new_tokens))
    return {**result, **precision_of(adapter).to_dict()}


async def _run(adapter: Any, client_module: ModuleType, model: str, sessions: int, fps: float, duration: float,
               ask_every: float, max_new_tokens: int) -> dict[str, Any]:
    defaults = ServerConfig()
    config = ServerConfig(host="127.0.0.1", port=0, max_sessions=sessions, stats_every_s=_STATS_EVERY_S,
                          global_budget_tokens=max(defaults.global_budget_tokens, sessions * defaults.session_budget_tokens))
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
        result = await _measure(server, clients, base, sessions, fps, duration, ask_every)
    finally:
        for client in clients:
            await client.close()
        await server.stop()
    return {"benchmark": "serve", "model": model, "sessions": sessions, "fps": fps, "duration_s": duration, **result}


async def _measure(server: StreamServer, clients: list[Any], base: list[np.ndarray], sessions: int, fps: float,
                   duration: float, ask_every: float) -> dict[str, Any]:
    latencies: list[float] = []
    ttfts: list[float] = []
    sent = [0] * sessions
    questions = [0]
    rss: list[tuple[float, int]] = []
    answering: list[asyncio.Task[None] | None] = [None] * sessions
    side = max(2, min(_FRAME_SIZE) // 16)
    t0 = time.monotonic()
    end = t0 + duration

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
        t = t0 + min(0.5, duration / 4) + i * ask_every / sessions
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
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
