"""``streamvlm bench live``: a synthetic camera at real time through the live worker.

The source plays three phases of equal length: a moving scene, a static scene (the same image, which
the worker's near-duplicate check should skip before the vision tower), and a moving scene again. A
watch ("a red square is visible") runs throughout; one question is asked while frames arrive at full
rate (under load) and one after the source stops and the worker is idle. Reported: frames received,
skipped, dropped and ingested; capture-to-ingest lag p50/p95 against the frame interval; time to first
token idle vs. under load; the latency from a probed frame's capture to its alert; the CPU the process
used during the static phase once the worker had caught up with the moving scene (fraction of one core); and how long the first changed frame after the
static phase waited before the model read it. Also how often a frame read gave way to a question
(``preemptions``: times an encode was paused, prefills abandoned and re-run), each read frame's lag,
the lag of the source's last frame when it was read (no later frame can replace it, so it waits for the
read in progress: up to one whole read), and torch's intra-op thread count.

With random-weight presets the probe scores are noise, so the alert *latency* is a system figure
(capture, probe, rule, event), not a detection result.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import numpy as np
import torch

from ..config import MemoryConfig, ModelConfig, SamplingConfig, SessionConfig
from ..dialogue import ControllerConfig
from ..engine.check import synthetic_frames
from ..engine.session import StreamSession
from ..engine.worker import LiveWorker
from ..models import load_model
from ..types import Frame

__all__ = ["run_live_bench"]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def run_live_bench(model: ModelConfig, fps: float, duration: float, *, budget_tokens: int | None = 2048, probe_every: int = 2) -> dict[str, Any]:
    """Run the benchmark (takes about ``duration`` seconds plus the closing answers) and return the result."""
    adapter = load_model(model)
    session = StreamSession(adapter, SessionConfig(sampling=SamplingConfig(max_new_tokens=8)), MemoryConfig(budget_tokens=budget_tokens))
    return asyncio.run(_run(session, model.model, fps, duration, probe_every))


async def _run(session: StreamSession, model: str, fps: float, duration: float, probe_every: int) -> dict[str, Any]:
    worker = LiveWorker(session, ControllerConfig(probe_every_frames=probe_every))
    interval = 1.0 / fps
    n = max(3, int(duration * fps))
    moving = synthetic_frames(32, height=240, width=320)
    static = moving[0]
    submitted: dict[float, float] = {}  # pts -> wall time of capture
    first_delta: dict[str, float] = {}
    asked: dict[str, float] = {}
    alerts: list[dict[str, float]] = []
    done = asyncio.Event()
    finished: set[str] = set()

    async def consume() -> None:
        async for event in worker.events():
            now = time.monotonic()
            rid = event.data.get("request_id")
            if event.kind == "answer.delta" and rid not in first_delta:
                first_delta[rid] = now
            elif event.kind in ("answer.done", "request.ended"):  # a failed or cancelled request ends too
                finished.add(rid)
                first_delta.setdefault(rid, now)
                if "idle" in finished:
                    done.set()
            elif event.kind == "alert":
                alerts.append({"evidence_t": event.data["evidence_t"], "latency_s": now - submitted.get(event.data["evidence_t"], now)})

    await worker.start()
    consumer = asyncio.create_task(consume())
    worker.watch("red", "a red square is visible")
    start = time.monotonic()
    static_cpu = static_wall = 0.0
    cpu0 = wall0 = None
    change_index = 2 * n // 3
    for i in range(n):
        target = start + i * interval
        await asyncio.sleep(max(0.0, target - time.monotonic()))
        if cpu0 is None and n // 3 < i < change_index and worker.idle:  # static, and the backlog is done
            cpu0, wall0 = time.process_time(), time.monotonic()
        if i == change_index and cpu0 is not None:
            static_cpu, static_wall = time.process_time() - cpu0, time.monotonic() - wall0
        image = static if n // 3 <= i < change_index else moving[i % len(moving)]
        pts = round(i * interval, 6)
        submitted[pts] = time.monotonic()
        worker.submit_frame(Frame(image, pts, "synthetic"))
        if i == n // 5:
            asked["load"] = time.monotonic()
            worker.ask("What is moving right now?", request_id="load")
    await asyncio.sleep(0.2)
    while not worker.idle:  # let the worker drain before the idle question
        await asyncio.sleep(0.05)
    asked["idle"] = time.monotonic()
    worker.ask("What is on screen now?", request_id="idle")
    await asyncio.wait_for(done.wait(), timeout=600)
    await worker.stop()
    await consumer
    c = worker.counters
    lags = c.lag_s
    ttft = {k: first_delta.get(k, float("nan")) - t for k, t in asked.items()}
    after_change = [lag for pts, lag in zip(c.ingested_pts, lags) if pts >= change_index * interval - 1e-9]
    return {
        "benchmark": "live",
        "model": model,
        "fps": fps,
        "duration_s": duration,
        "frames": {"received": c.received, "skipped": c.skipped, "dropped": c.dropped, "ingested": c.ingested},
        "frame_interval_s": interval,
        "lag_p50_s": _percentile(lags, 50),
        "lag_p95_s": _percentile(lags, 95),
        "lag_max_s": max(lags, default=0.0),
        "lag_by_frame": [[round(pts, 3), round(lag, 4)] for pts, lag in zip(c.ingested_pts, lags)],  # [stream time, lag s]
        # The source's last frame has no successor to replace it, so it waits for the read in progress.
        "lag_last_frame_s": lags[-1] if lags and abs(c.ingested_pts[-1] - (n - 1) * interval) < 1e-6 else None,
        "ttft_idle_s": ttft["idle"],
        "ttft_load_s": ttft.get("load"),
        "ttft_load_over_idle": ttft.get("load", float("nan")) / ttft["idle"],
        "alerts": len(alerts),
        "alert_latency_p50_s": statistics.median([a["latency_s"] for a in alerts]) if alerts else None,
        "static_cpu_fraction": static_cpu / static_wall if static_wall else None,
        "change_reaction_s": after_change[0] if after_change else None,
        "preemptions": {"encode_pauses": c.paused, "prefill_restarts": c.restarted},
        "torch_threads": torch.get_num_threads(),
    }
