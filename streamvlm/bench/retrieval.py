"""``streamvlm bench retrieval``: searching a long-term store of many chunks, at a real model's layer sizes.

Builds a :class:`~streamvlm.memory.store.LongTermStore` holding ``chunks`` chunks whose index entries
have the given shape (default: SmolVLM2-256M, 30 layers x 3 key/value heads x 64, 9 query heads, and the
engine's :data:`~streamvlm.memory.manager.INDEX_VECTORS` vectors per chunk, scored by the best) and
times ``search`` (with the engine's near-tie rule, :data:`~streamvlm.memory.manager.RECALL_NEAR`) for a
question of ``question_tokens`` query vectors per layer. The search cost depends
on the index alone, so the chunks carry a one-token payload to keep the benchmark within RAM; fetching
``top_k`` full-size chunks (78 tokens, every layer) is timed separately, from RAM and from disk.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch

from ..config import MemoryConfig
from ..memory.manager import INDEX_VECTORS, RECALL_NEAR
from ..memory.store import ChunkRecord, LongTermStore

__all__ = ["run_retrieval_bench"]


def run_retrieval_bench(
    chunks: int = 10_000, *, layers: int = 30, kv_heads: int = 3, q_heads: int = 9, head_dim: int = 64,
    chunk_tokens: int = 78, question_tokens: int = 20, top_k: int = MemoryConfig.retrieval_top_k, repeats: int = 20, seed: int = 0,
    vectors: int = INDEX_VECTORS,
) -> dict[str, Any]:
    """Time ``search`` over ``chunks`` index entries ``[layers, vectors, kv_heads, head_dim]`` (``vectors=0``: the
    single-vector shape ``[layers, kv_heads, head_dim]``) and fetching ``top_k`` full chunks; returns the figures."""
    shape = (layers, kv_heads, head_dim) if vectors == 0 else (layers, vectors, kv_heads, head_dim)
    gen = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="streamvlm-bench-") as tmp:
        store = LongTermStore(ram_bytes=1 << 40, disk_bytes=0)
        tiny = torch.zeros(kv_heads, 1, head_dim)
        for i in range(chunks):
            record = ChunkRecord(i, "frame", float(i), float(i), "bench", i * chunk_tokens, (i + 1) * chunk_tokens, 1)
            store.put(record, [tiny] * layers, [tiny] * layers, torch.randn(*shape, generator=gen))
        search_s = []
        for _ in range(repeats):
            queries = torch.randn(layers, q_heads, question_tokens, head_dim, generator=gen)
            t0 = time.perf_counter()
            store.search(queries, top_k, near=RECALL_NEAR)
            search_s.append(time.perf_counter() - t0)
        store.close()

        full = [torch.randn(kv_heads, chunk_tokens, head_dim, generator=gen) for _ in range(layers)]
        chunk_bytes = 2 * sum(t.numel() * t.element_size() for t in full)
        fetch = LongTermStore(ram_bytes=top_k * chunk_bytes, disk_bytes=4 * top_k * chunk_bytes, directory=tmp)
        for i in range(2 * top_k):  # the first top_k spill to disk, the last top_k stay in RAM
            index = torch.randn(*shape, generator=gen)
            fetch.put(ChunkRecord(i, "frame", float(i), float(i), "bench", 0, chunk_tokens, chunk_tokens), full, full, index)
        times = {}
        for tier, ids in (("disk", range(top_k)), ("ram", range(top_k, 2 * top_k))):
            t0 = time.perf_counter()
            for i in ids:
                fetch.get(i)
            times[tier] = time.perf_counter() - t0
        fetch.close()
    return {
        "benchmark": "retrieval",
        "chunks": chunks,
        "index_shape": list(shape),
        "q_heads": q_heads,
        "question_tokens": question_tokens,
        "top_k": top_k,
        "search_s": statistics.median(search_s),
        "search_all_s": search_s,
        "fetch_top_k_ram_s": times["ram"],
        "fetch_top_k_disk_s": times["disk"],
        "chunk_bytes": chunk_bytes,
        "torch_threads": torch.get_num_threads(),
    }
