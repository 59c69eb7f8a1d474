"""Choosing the next token from logits: greedy, or temperature with top-k / top-p."""

from __future__ import annotations

import torch

from ..config import SamplingConfig

__all__ = ["pick_token"]


def pick_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None, banned: frozenset[int] = frozenset()) -> int:
    """The next token id for ``logits`` ``[V]`` under ``cfg``; greedy when ``cfg.temperature == 0``.

    ``banned`` ids are never chosen (image placeholders: text cannot stand in for pixels).
    """
    if banned:
        logits = logits.clone()
        logits[list(banned)] = float("-inf")
    if cfg.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(scores, min(cfg.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
