"""``streamvlm bench memory``: what a long stream costs in memory under a bounded working memory.

One run streams N synthetic frames as fast as the model can read them into a session with a token
budget and a compression policy, and records every ``sample_every`` frames (and at the last frame):

* working memory: the tokens and bytes of the cache the model attends to (must stay within budget);
* the long-term store: bytes held in RAM and on disk for evicted chunks;
* the process's resident set size (RSS), to show it levels off instead of growing with the stream.

At the end it times three short questions (one output token each) whose answers go through
retrieval from the store, and it compares how many frames one MiB of working memory stands for
against an uncompressed cache (a short unbounded run on the same model and frames).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..config import MemoryConfig, ModelConfig, SamplingConfig, SessionConfig
from ..engine import StreamSession
from ..engine.check import synthetic_frames
from ..errors import ConfigError
from ..models import ModelAdapter, load_model

__all__ = ["run_memory_bench", "rss_bytes", "stream_frames"]

QUESTIONS = ("What colour is the square?", "Where was the square at the start?", "What is in the background?")
_BASE_FRAMES = 64
def rss_bytes() -> int:
    """This process's resident set size in bytes (peak RSS where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB elsewhere


def stream_frames(n: int, *, height: int = 240, width: int = 320) -> Iterator[np.ndarray]:
    """Yield ``n`` distinct RGB frames lazily: 64 synthetic frames cycled, each marked by its index.

    Only the 64 base frames and the current one are held, so a long run measures the session's
    memory rather than the benchmark's input.
    """
    base = synthetic_frames(min(n, _BASE_FRAMES), height=height, width=width)
    side = max(2, min(height, width) // 16)
    for i in range(n):
        frame = base[i % len(base)].copy()
        frame[:side, :side] = ((i * 37) % 256, (i * 101) % 256, (i // len(base) * 53) % 256)
        yield frame


def _sample(frame: int, stats: dict[str, Any]) -> dict[str, int]:
    return {
        "frame": frame,
        "working_bytes": int(stats["working_bytes"]),
        "working_tokens": int(stats["working_tokens"]),
        "store_ram_bytes": int(stats["store_ram_bytes"]),
        "store_disk_bytes": int(stats["store_disk_bytes"]),
        "rss_bytes": rss_bytes(),
    }


def _uncompressed_bytes_per_frame(adapter: ModelAdapter, frames: int, frame_size: tuple[int, int]) -> float:
    """Cache bytes per frame of an unbounded (exact, uncompressed) session after ``frames`` frames."""
    session = StreamSession(adapter, SessionConfig(sampling=SamplingConfig(max_new_tokens=1)), MemoryConfig())
    try:
        for i, frame in enumerate(stream_frames(frames, height=frame_size[0], width=frame_size[1])):
            session.ingest(frame, float(i))
        return float(session.stats()["cache_bytes"]) / frames
    finally:
        session.close()


def _time_retrieval(session: StreamSession) -> tuple[list[float], list[float], list[float]]:
    """Time retrieval for each closing question: the whole step, the search alone, and the answer's first token."""
    memory, retrieve_s, search_s, ttfts = session.memory, [], [], []
    for question in QUESTIONS:
        ids = session.adapter.question_ids(question)
        t0 = time.perf_counter()
        placed = memory.retrieve(ids)
        retrieve_s.append(time.perf_counter() - t0)
        if placed is not None:
            memory.release(placed)
        if memory.store is not None and len(memory.store):
            queries = memory.retrieval_queries(ids)
            t0 = time.perf_counter()
            memory.store.search(queries, memory.config.retrieval_top_k)
            search_s.append(time.perf_counter() - t0)
        ttfts.append(session.ask(question, session.last_t).ttft_s)
    return retrieve_s, search_s or [0.0], ttfts


def run_memory_bench(
    model: ModelConfig,
    frames: int,
    policy: str,
    *,
    budget_tokens: int,
    store_ram_bytes: int,
    store_disk_bytes: int,
    sample_every: int = 100,
    frame_size: tuple[int, int] = (240, 320),
    progress: bool = True,
) -> dict[str, Any]:
    """Run the benchmark and return the result as a JSON-ready dict (see ``docs/benchmarks.md``).

    ``summary`` holds: ``max_working_bytes`` (over every frame), ``budget_bytes``, ``rss_growth_ratio``
    (RSS at the last sample / RSS at the sample nearest 10 % of the run), ``retrieval_s`` (median time of
    a whole retrieval for the closing questions: query vectors, search, fetch, re-rotate, insert),
    ``retrieval_search_s`` (the store search alone), ``ttft_with_retrieval_s`` (median time to first token
    of those questions), ``frames_per_working_mb`` (frames streamed per MiB of the
    largest working memory) and ``uncompressed_frames_per_working_mb`` (the same for an unbounded cache,
    from its bytes per frame over ``min(frames, 64)`` frames, system prompt included), and the store's
    final occupancy and chunk counts.
    """
    from tqdm import tqdm

    if not isinstance(frames, int) or frames < 1:
        raise ConfigError(f"frames: must be an integer >= 1, got {frames!r}")
    if not isinstance(sample_every, int) or sample_every < 1:
        raise ConfigError(f"sample_every: must be an integer >= 1, got {sample_every!r}")
    memory = MemoryConfig(budget_tokens=budget_tokens, policy=policy, store_ram_bytes=store_ram_bytes, store_disk_bytes=store_disk_bytes)
    adapter = load_model(model)
    session = StreamSession(adapter, SessionConfig(sampling=SamplingConfig(max_new_tokens=1)), memory)
    try:
        samples: list[dict[str, int]] = []
        max_working = 0
        bar = tqdm(total=frames, desc=f"stream ({policy})", unit="frame", disable=not progress)
        for i, frame in enumerate(stream_frames(frames, height=frame_size[0], width=frame_size[1])):
            session.ingest(frame, float(i))
            stats = session.stats()
            max_working = max(max_working, int(stats["working_bytes"]))
            n = i + 1
            if n % sample_every == 0 or n == frames:
                samples.append(_sample(n, stats))
                bar.set_postfix_str(
                    f"working {stats['working_tokens']} tok, store {stats['store_ram_bytes'] / 2**20:.1f}+{stats['store_disk_bytes'] / 2**20:.1f} MiB"
                )
            bar.update(1)
        bar.close()
        final = session.stats()
        retrieve_s, search_s, ttfts = _time_retrieval(session)
    finally:
        session.close()

    uncompressed = _uncompressed_bytes_per_frame(adapter, min(frames, _BASE_FRAMES), frame_size)
    early = min(samples, key=lambda s: (abs(s["frame"] - 0.1 * frames), s["frame"]))
    return {
        "benchmark": "memory",
        "model": model.model,
        "policy": policy,
        "frames": frames,
        "budget_tokens": budget_tokens,
        "samples": samples,
        "summary": {
            "max_working_bytes": max_working,
            "budget_bytes": final["budget_bytes"],
            "rss_growth_ratio": samples[-1]["rss_bytes"] / early["rss_bytes"],
            "retrieval_s": statistics.median(retrieve_s),
            "retrieval_search_s": statistics.median(search_s),
            "ttft_with_retrieval_s": statistics.median(ttfts),
            "frames_per_working_mb": frames / (max_working / 2**20),
            "uncompressed_frames_per_working_mb": 2**20 / uncompressed,
            "store_ram_bytes": int(final["store_ram_bytes"]),
            "store_disk_bytes": int(final["store_disk_bytes"]),
            "chunks_stored": int(final["chunks_stored"]),
            "chunks_dropped": int(final["chunks_dropped"]),
        },
    }
