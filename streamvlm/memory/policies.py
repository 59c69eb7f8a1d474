"""Compression policies: given the working chunks and the budget, decide what to keep. Training-free.

Each policy is a small class with ``plan(view) -> Plan``; :func:`make_policy` picks one by name.

* ``window`` — sinks plus a sliding window: the oldest frames and dialogue turns are evicted
  (StreamingLLM; StreamingVLM's baseline).
* ``infinipot`` — older frames are first compressed to ``keep_ratio`` of their tokens, ranked by value
  norm times temporal novelty against the newest frame (InfiniPot-V's value-norm and
  temporal-redundancy criteria); only when every older frame is compressed are the oldest evicted.
* ``proxy-attention`` — as ``infinipot``, but tokens are ranked by the attention they receive from a
  generic proxy question scored on a throw-away extension of the cache (StreamMem).
* ``merge`` — a frame whose pooled values are near-identical (cosine >= ``merge_similarity``) to the
  previous frame is folded into it: the earlier frame stands for both and its time span grows, the new
  frame costs no tokens (static cameras); beyond that, the window rule.

Always kept: the system prompt, the newest ``recent_frames`` frames, the newest ``recent_turns``
question/answer turns, and each frame's timestamp text. Every policy ends with the window rule, so
the budget holds after every step whatever the scores say.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .ledger import Chunk, Plan

__all__ = ["Budget", "MemoryView", "Policy", "make_policy", "POLICY_NAMES"]


@dataclass(frozen=True)
class Budget:
    frames: int  # tokens frames may hold
    dialogue: int  # tokens questions and answers may hold


@dataclass
class MemoryView:
    """What a policy may read: the working chunks in cache order, the budget, and lazy scores."""

    chunks: list[Chunk]
    budget: Budget
    recent_frames: int
    recent_turns: int
    keep_ratio: float
    merge_similarity: float
    #: per-token value norms ``[n]`` and pooled value vectors ``[n, F]`` of a working chunk
    token_values: Callable[[int], tuple[np.ndarray, np.ndarray]]
    #: attention from generic proxy queries to each token of the given chunks
    proxy_scores: Callable[[list[int]], dict[int, np.ndarray]]

    def frames(self) -> list[Chunk]:
        return [c for c in self.chunks if c.kind == "frame"]

    def protected(self) -> set[int]:
        keep = {c.chunk_id for c in self.chunks if c.kind == "system"}
        keep |= {c.chunk_id for c in self.frames()[-self.recent_frames :]}
        dialogue = [c for c in self.chunks if c.is_dialogue]
        if self.recent_turns:
            keep |= {c.chunk_id for c in dialogue[-2 * self.recent_turns :]}
        return keep


class Policy:
    name = "window"

    def plan(self, view: MemoryView) -> Plan:
        plan = Plan()
        self.compress(view, plan)
        _evict_oldest(view, plan)
        return plan

    def compress(self, view: MemoryView, plan: Plan) -> None:
        """Policies that compress before evicting override this."""


class WindowPolicy(Policy):
    name = "window"


class _ScoredCompression(Policy):
    """Compress the oldest uncompressed frames to keep_ratio by token score until frames fit."""

    def compress(self, view: MemoryView, plan: Plan) -> None:
        over = _frame_tokens(view, plan) - view.budget.frames
        if over <= 0:
            return
        protected = view.protected()
        candidates = [c for c in view.frames() if c.chunk_id not in protected and not c.compressed]
        scores = self.scores(view, [c.chunk_id for c in candidates]) if candidates else {}
        for chunk in candidates:
            if over <= 0:
                break
            keep = _top_tokens(scores[chunk.chunk_id], chunk, view.keep_ratio)
            if len(keep) < chunk.tokens_held:
                plan.keep[chunk.chunk_id] = keep
                over -= chunk.tokens_held - len(keep)

    def scores(self, view: MemoryView, chunk_ids: list[int]) -> dict[int, np.ndarray]:
        raise NotImplementedError


class InfiniPotPolicy(_ScoredCompression):
    name = "infinipot"

    def scores(self, view: MemoryView, chunk_ids: list[int]) -> dict[int, np.ndarray]:
        newest = view.frames()[-1].chunk_id
        _, reference = view.token_values(newest)
        ref = reference / (np.linalg.norm(reference, axis=1, keepdims=True) + 1e-8)
        out = {}
        for chunk_id in chunk_ids:
            norms, vectors = view.token_values(chunk_id)
            unit = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-8)
            redundancy = np.clip((unit @ ref.T).max(axis=1), 0.0, 1.0)  # similarity to anything in the newest frame
            out[chunk_id] = (norms / (norms.max() + 1e-8)) * (1.0 - redundancy + 1e-3)
        return out


class ProxyAttentionPolicy(_ScoredCompression):
    name = "proxy-attention"

    def scores(self, view: MemoryView, chunk_ids: list[int]) -> dict[int, np.ndarray]:
        return view.proxy_scores(chunk_ids)


class MergePolicy(Policy):
    name = "merge"

    def compress(self, view: MemoryView, plan: Plan) -> None:
        frames = view.frames()
        if len(frames) < 2:
            return
        previous, newest = frames[-2], frames[-1]
        if previous.tokens_held != newest.tokens_held and previous.compressed:
            return
        a = view.token_values(previous.chunk_id)[1].mean(axis=0)
        b = view.token_values(newest.chunk_id)[1].mean(axis=0)
        similarity = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8))
        if similarity >= view.merge_similarity:
            plan.merge[newest.chunk_id] = previous.chunk_id


_POLICIES: dict[str, type[Policy]] = {p.name: p for p in (WindowPolicy, InfiniPotPolicy, ProxyAttentionPolicy, MergePolicy)}
POLICY_NAMES = tuple(_POLICIES)


def make_policy(name: str) -> Policy:
    """The policy called ``name``; ConfigError lists the names when it is unknown."""
    if name not in _POLICIES:
        raise ConfigError(f"policy: unknown {name!r}; choose one of {', '.join(_POLICIES)}")
    return _POLICIES[name]()


# ---- shared rules ----------------------------------------------------------------------------------------
def _held_after(chunk: Chunk, plan: Plan) -> int:
    if chunk.chunk_id in plan.evict or chunk.chunk_id in plan.merge:
        return 0
    keep = plan.keep.get(chunk.chunk_id)
    return chunk.tokens_held if keep is None else len(keep)


def _frame_tokens(view: MemoryView, plan: Plan) -> int:
    return sum(_held_after(c, plan) for c in view.frames())


def _evict_oldest(view: MemoryView, plan: Plan) -> None:
    """The window rule: evict the oldest unprotected frames, then dialogue chunks, until both fit.

    If the protected chunks alone do not fit (a budget smaller than the recent window), protection
    yields too, oldest first, down to the newest chunk of each kind: the budget always holds.
    """
    protected = view.protected()
    for kinds, limit in ((("frame",), view.budget.frames), (("question", "answer"), view.budget.dialogue)):
        chunks = [c for c in view.chunks if c.kind in kinds]
        held = sum(_held_after(c, plan) for c in chunks)
        for strict in (True, False):
            for chunk in chunks[:-1] if not strict else chunks:
                if held <= limit:
                    break
                if (strict and chunk.chunk_id in protected) or chunk.chunk_id in plan.evict or chunk.chunk_id in plan.merge:
                    continue
                held -= _held_after(chunk, plan)
                plan.keep.pop(chunk.chunk_id, None)
                plan.evict.append(chunk.chunk_id)


def _top_tokens(scores: np.ndarray, chunk: Chunk, ratio: float) -> list[int]:
    """Indices to keep: the protected prefix plus the best-scoring share of the rest, in order."""
    n = chunk.tokens_held
    prefix = min(chunk.protected_prefix, n)
    target = max(prefix + 1, math.ceil(n * ratio))
    rest = np.arange(prefix, n)
    best = rest[np.argsort(-scores[prefix:n], kind="stable")[: max(0, target - prefix)]]
    return sorted(range(prefix)) + sorted(int(i) for i in best)
