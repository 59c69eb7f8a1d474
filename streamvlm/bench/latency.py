"""``streamvlm bench latency``: time to first token with frames already in the cache vs. re-reading them.

For each stream length N, one run measures side by side, on the same model and the same frames:

* **stream**: the frames were ingested one by one as they arrived (each encoded and prefilled once);
  a question then prefills only its own tokens over the cache. Timed inside a scratch extension that
  is rolled back, so every question sees the same context.
* **naive**: what an offline VLM does per question: run the processor and the vision tower on all N
  frames again and prefill the whole prompt (system, N frames, question) from an empty cache.

It also splits the per-frame ingest time into vision tower, language-model prefill and everything
else (processor, tokenization, bookkeeping), as medians over all ingested frames.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import torch

from ..config import MemoryConfig, ModelConfig, SamplingConfig, SessionConfig
from ..engine import StreamSession
from ..engine.check import synthetic_frames
from ..models import ModelAdapter, load_model, precision_of

__all__ = ["run_latency_bench", "naive_ttft"]

QUESTION = "What is the person holding right now?"


@torch.inference_mode()
def naive_ttft(adapter: ModelAdapter, system_prompt: str, frames: list, question: str) -> float:
    """Seconds to the first token when every frame is re-read for the question (offline VLM usage)."""
    t0 = time.perf_counter()
    prepared = [adapter.prepare_frame(f, float(i)) for i, f in enumerate(frames)]
    ids = adapter.conversation_start(system_prompt)
    for p in prepared:
        ids += p.input_ids
    ids += adapter.question_ids(question)
    input_ids = torch.tensor([ids])
    out = adapter.model(input_ids=input_ids.to(adapter.device), logits_to_keep=1, **adapter.offline_kwargs(input_ids, prepared))
    int(torch.argmax(out.logits[0, -1]))
    return time.perf_counter() - t0


def run_latency_bench(
    model: ModelConfig, counts: list[int], *, repeats: int = 3, naive_repeats: int = 1, frame_size: tuple[int, int] = (480, 640),
    progress: bool = True, memory_budget: int | None = None, naive: bool = True,
) -> dict[str, Any]:
    """Run the benchmark and return the result as a JSON-ready dict (see ``docs/benchmarks.md``).

    ``memory_budget`` bounds the streamed session's working memory (None: uncompressed, exact);
    ``naive=False`` skips the re-reading baseline (its fields are then None). ``model.device`` and
    ``model.dtype`` may be ``auto``; the JSON's ``device``, ``dtype`` and ``dtype_reason`` say what ran.
    """
    from tqdm import tqdm

    adapter = load_model(model)
    cfg = SessionConfig(sampling=SamplingConfig(max_new_tokens=1))
    session = StreamSession(adapter, cfg, MemoryConfig(budget_tokens=memory_budget))
    frames = synthetic_frames(max(counts), height=frame_size[0], width=frame_size[1])
    ingests, results = [], []
    bar = tqdm(total=max(counts), desc="ingest", unit="frame", disable=not progress)
    for n in counts:
        while len(ingests) < n:
            i = len(ingests)
            ingests.append(session.ingest(frames[i], float(i)))
            bar.update(1)
        stream_times = []
        for _ in range(repeats):
            with session.scratch():
                stream_times.append(session.ask(QUESTION).ttft_s)
        context = session.stats()["cache_tokens"]
        bar.set_postfix_str(f"naive re-read of {n} frames")
        naive_times = [naive_ttft(adapter, cfg.system_prompt, frames[:n], QUESTION) for _ in range(naive_repeats if naive else 0)]
        stream_s = statistics.median(stream_times)
        naive_s = statistics.median(naive_times) if naive_times else None
        results.append(
            {"frames": n, "context_tokens": context, "ttft_stream_s": stream_s, "ttft_naive_s": naive_s,
             "ratio": naive_s / stream_s if naive_s else None, "ttft_stream_all_s": stream_times, "ttft_naive_all_s": naive_times}
        )
    bar.close()
    vision = statistics.median(r.vision_s for r in ingests)
    prefill = statistics.median(r.prefill_s for r in ingests)
    overhead = statistics.median(r.overhead_s for r in ingests)
    total = statistics.median(r.total_s for r in ingests)
    return {
        "benchmark": "latency",
        "model": model.model,
        "memory_budget_tokens": memory_budget,
        **precision_of(adapter).to_dict(),  # device, dtype and why (auto resolves per machine)
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "frame_size": list(frame_size),
        "tokens_per_frame": ingests[0].tokens if ingests else 0,
        "question": QUESTION,
        "repeats": {"stream": repeats, "naive": naive_repeats},
        "results": results,
        "ingest": {
            "frames": len(ingests),
            "vision_s": vision,
            "prefill_s": prefill,
            "overhead_s": overhead,
            "total_s": total,
            "overhead_pct": 100.0 * overhead / total if total else 0.0,
        },
    }
