"""The memory manager: keeps working memory within its budget after every step.

It reads the ledger, asks the policy for a plan, and applies it: evicted chunks are copied to the
long-term store (keys, values and a position-free index: :data:`INDEX_VECTORS` mean keys per chunk,
one per run of a frame's visual tokens or a dialogue chunk's tokens) before their tokens leave the cache; compressed chunks keep the chosen
tokens; merged frames vanish into their prototype. With ``positions="reindex"`` (or when positions pass half the model's range) the kept chunks are
re-rotated to contiguous positions. Every change is reported as a memory event.

At question time :meth:`retrieve` brings the most relevant stored chunks back into the cache (in time
order, re-rotated to their place) and :meth:`release` takes them out again after the answer, so
working memory is exactly as it was.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import MemoryConfig
from ..errors import CapacityError
from ..types import Evidence
from . import cache as kv
from .ledger import DROPPED, MERGED, STORE, Chunk, Ledger, Plan
from .policies import Budget, MemoryView, make_policy

__all__ = ["MemoryManager", "MemoryEvent", "Retrieved", "INDEX_VECTORS", "RECALL_NEAR", "index_vectors"]

PROXY_QUESTION = "What is happening in the video right now?"

#: Index vectors per stored chunk: its tokens (a frame's visual tokens, without the timestamp text) split into
#: this many runs in order, each run's mean position-free key one vector (a chunk of fewer tokens repeats them).
#: A question scores a chunk by its best vector (ColBERT's max-sim), so a frame is found by the part that shows
#: the thing asked about. Chosen on ShapeWorld validation episodes at a 10 % budget (docs/memory.md).
INDEX_VECTORS = 5

#: Chunks scoring within this many standard deviations of the best are retrieved earliest first
#: (:meth:`LongTermStore.search` ``near``): "when did X appear" and "what came first" rest on the earliest of
#: the frames that show a thing alike. Chosen with :data:`INDEX_VECTORS` (docs/memory.md).
RECALL_NEAR = 1.0


def index_vectors(keys: torch.Tensor, vectors: int = INDEX_VECTORS) -> torch.Tensor:
    """``[kv_heads, tokens, head_dim]`` position-free keys -> ``[vectors, kv_heads, head_dim]``: the mean key of
    each of ``vectors`` runs of the tokens, in order (fewer tokens than runs: each token repeated in turn)."""
    tokens = keys.shape[1]
    if tokens >= vectors:
        return torch.stack([run.mean(dim=1) for run in torch.tensor_split(keys, vectors, dim=1)])
    pick = torch.arange(vectors) * tokens // vectors
    return keys[:, pick].transpose(0, 1).contiguous()


@dataclass(frozen=True, slots=True)
class MemoryEvent:
    """One change to memory, for logs and the protocol (``memory.*`` events).

    ``kind`` is ``compressed``, ``evicted``, ``merged``, ``reindexed``, ``spilled`` (store RAM to disk)
    or ``dropped`` (store full: gone). ``tokens_before``/``tokens_after`` are working-memory tokens
    around the change, ``up_to_s`` the latest timestamp it touched.
    """

    kind: str
    chunks: int
    tokens_before: int
    tokens_after: int
    up_to_s: float | None
    store_ram_bytes: int = 0
    store_disk_bytes: int = 0


@dataclass(frozen=True)
class Retrieved:
    """Stored chunks placed back in the cache for one answer: where they sit and what they are."""

    start: int
    end: int
    evidence: tuple[Evidence, ...]
    #: Where each evidence frame's visual tokens sit in the cache, ``[start, end)``, parallel to ``evidence``.
    spans: tuple[tuple[int, int], ...] = ()


class MemoryManager:
    """Budget keeper for one session. Create it with the session's runner; call :meth:`enforce` after each step."""

    def __init__(self, config: MemoryConfig, runner: Any) -> None:
        from .store import LongTermStore

        self.config = config
        self.runner = runner
        self.ledger = Ledger()
        self.policy = make_policy(config.policy)
        # Undrained events are kept up to a bound (a session nobody reads must not grow); the oldest go first.
        self.events: deque[MemoryEvent] = deque(maxlen=4096)
        self.positions: dict[int, torch.Tensor] = {}  # working chunk -> positions rotated into its keys, [rows, n]
        self.suspended = False  # inside a scratch extension: no enforcement
        self.compactions = 0
        # Compactions begun (a plan applied, positions re-indexed): each rewrites tokens older than the
        # step that triggered it, so a failed step that saw this count change cannot be undone by cropping.
        self.edits = 0
        self._rotator = None
        self.store = None
        if config.bounded:
            # Without a store_dir the store makes (and removes again on close) its own temporary directory.
            self.store = LongTermStore(config.store_ram_bytes, config.store_disk_bytes, config.store_dir)

    # ---- books --------------------------------------------------------------------------------------
    def record(self, kind: str, t_start: float, t_end: float, source_id: str, positions: torch.Tensor, protected_prefix: int = 0) -> Chunk:
        """Book a chunk just fed to the cache; ``positions`` ``[rows, n]`` are the positions it was fed at."""
        start = int(positions.min()) if positions.numel() else self.runner.next_position
        chunk = self.ledger.add(kind, t_start, t_end, source_id, start, self.runner.next_position, positions.shape[1], protected_prefix)
        self.positions[chunk.chunk_id] = positions
        return chunk

    def extend(self, positions: torch.Tensor, t_end: float | None = None) -> None:
        """Grow the newest chunk by tokens just fed at ``positions`` (an answer being generated)."""
        chunk = self.ledger.extend_last(positions.shape[1], self.runner.next_position, t_end)
        self.positions[chunk.chunk_id] = torch.cat([self.positions[chunk.chunk_id], positions], dim=1)

    def forget_newest(self, count: int) -> None:
        """Drop the books of the ``count`` newest chunks (their tokens were rolled back)."""
        for chunk in self.ledger.working()[len(self.ledger.working()) - count :]:
            self.positions.pop(chunk.chunk_id, None)
        self.ledger.remove_newest(count)

    @property
    def rotator(self):
        if self._rotator is None:
            from .positions import KeyRotator

            self._rotator = KeyRotator(self.runner.model)
        return self._rotator

    def budget(self) -> Budget | None:
        cfg = self.config
        if cfg.budget_tokens is None:
            return None
        system = self.ledger.working_tokens(("system",))
        frames = cfg.budget_tokens - cfg.text_budget - system
        if frames <= 0:
            raise CapacityError(f"the system prompt ({system} tokens) and the dialogue budget leave no room for frames in {cfg.budget_tokens} tokens")
        return Budget(frames=frames, dialogue=cfg.text_budget)

    def fits(self, frame_tokens: int) -> None:
        """Raise CapacityError if a single frame of ``frame_tokens`` could never fit the budget."""
        budget = self.budget()
        if budget is not None and frame_tokens > budget.frames:
            raise CapacityError(f"a frame of {frame_tokens} tokens does not fit the frame budget of {budget.frames} tokens; raise budget_tokens")

    # ---- enforcing the budget ----------------------------------------------------------------------------
    def enforce(self) -> list[MemoryEvent]:
        """Bring working memory within budget (no-op when unbounded or already within). Returns new events."""
        budget = self.budget()
        if budget is None or self.suspended:
            return []
        cfg = self.config
        view = MemoryView(
            chunks=self.ledger.working(), budget=budget, recent_frames=cfg.recent_frames, recent_turns=cfg.recent_turns,
            keep_ratio=cfg.keep_ratio, merge_similarity=cfg.merge_similarity,
            token_values=self._token_values, proxy_scores=self._proxy_scores,
        )
        over = self.ledger.working_tokens(("frame",)) > budget.frames or self.ledger.working_tokens(("question", "answer")) > budget.dialogue
        plan = self.policy.plan(view) if (over or cfg.policy == "merge") else Plan()
        events = self._apply(plan) if plan else []
        gaps = any(e.kind in ("evicted", "merged") for e in events)
        if (cfg.positions == "reindex" and gaps) or self.runner.next_position > self.runner.adapter.max_positions() // 2:
            events += self._reindex()
        self.events.extend(events)
        return events

    def _apply(self, plan: Plan) -> list[MemoryEvent]:
        self.edits += 1
        before = self.ledger.working_tokens()
        events: list[MemoryEvent] = []
        keep_index: list[int] = []
        offset = 0
        stored = []
        for chunk in self.ledger.working():
            n = chunk.tokens_held
            if chunk.chunk_id in plan.evict:
                stored.append((chunk, offset))
            elif chunk.chunk_id not in plan.merge:
                local = plan.keep.get(chunk.chunk_id, range(n))
                keep_index.extend(offset + i for i in local)
            offset += n
        for chunk, start in stored:  # copy out before the tokens leave the cache
            self._to_store(chunk, start)
        kv.keep_tokens(self.runner.cache, torch.tensor(keep_index, dtype=torch.long))
        for chunk_id, kept in plan.keep.items():
            chunk = self.ledger[chunk_id]
            chunk.tokens_held, chunk.compressed = len(kept), True
            self.positions[chunk_id] = self.positions[chunk_id][:, kept]
        for chunk_id, into in plan.merge.items():
            merged = self.ledger.leave_working(chunk_id, MERGED)
            self.positions.pop(chunk_id, None)
            prototype = self.ledger[into]
            prototype.t_end = max(prototype.t_end, merged.t_end)
            prototype.merged_frames += merged.merged_frames
        for chunk, _ in stored:
            self.ledger.leave_working(chunk.chunk_id, chunk.tier)
            self.positions.pop(chunk.chunk_id, None)
        after = self.ledger.working_tokens()
        stats = self.store.stats() if self.store else None
        ram, disk = (stats.ram_bytes, stats.disk_bytes) if stats else (0, 0)
        for kind, ids in (("compressed", list(plan.keep)), ("merged", list(plan.merge)), ("evicted", [c.chunk_id for c, _ in stored])):
            if ids:
                events.append(MemoryEvent(kind, len(ids), before, after, max(self.ledger[i].t_end for i in ids), ram, disk))
        return events

    def _to_store(self, chunk: Chunk, start: int) -> None:
        from .store import ChunkRecord

        keys, values = kv.extract(self.runner.cache, start, start + chunk.tokens_held)
        positions = self.positions[chunk.chunk_id]
        # A frame is found by what it shows: its timestamp text ("Frame from 00:05:", 10 of ShapeWorld's 17
        # tokens) is left out of the index key, or questions would match clock digits instead of content.
        skip = min(chunk.protected_prefix, chunk.tokens_held - 1) if chunk.kind == "frame" else 0
        unrotated = [self.rotator.unrotate(k.float(), positions)[:, skip:] for k in keys]
        if self.store.index_shape is not None and len(self.store.index_shape) == 3:  # a store restored from an older save
            index = torch.stack([k.mean(dim=1) for k in unrotated])  # [L, H, D]
        else:
            index = torch.stack([index_vectors(k) for k in unrotated])  # [L, V, H, D]
        record = ChunkRecord(chunk.chunk_id, "text" if chunk.is_dialogue else "frame", chunk.t_start, chunk.t_end, chunk.source_id,
                             chunk.position_start, chunk.position_end, chunk.tokens_held)
        chunk.tier = STORE
        chunk.epoch = self.compactions
        for event in self.store.put(record, keys, values, index):
            if event.kind == "dropped":
                self.ledger.set_tier(event.chunk_id, DROPPED)
            if event.kind in ("dropped", "spilled"):
                s = self.store.stats()
                self.events.append(MemoryEvent(event.kind, 1, 0, 0, event.t_end, s.ram_bytes, s.disk_bytes))
        if self.ledger[chunk.chunk_id].tier == DROPPED:
            chunk.tier = DROPPED

    def _recall_room(self) -> int:
        """Positions kept free between the system prompt and the first working chunk after a re-index: room
        for what :meth:`retrieve` places just before the first working chunk (``retrieval_top_k`` chunks
        the size of the largest frame held now, and at most a quarter of the model's positions), so recalled
        chunks never take the system prompt's positions."""
        if self.store is None or not self.config.retrieval_top_k:
            return 0
        largest = max((c.tokens_held for c in self.ledger.working() if c.kind == "frame"), default=0)
        # At most a quarter of the model's positions: working memory keeps the rest (retrieve recalls what fits).
        return min(self.config.retrieval_top_k * largest, self.runner.adapter.max_positions() // 4)

    def _reindex(self) -> list[MemoryEvent]:
        """Re-rotate working chunks to contiguous positions, closing the gaps that evictions left (and
        leaving :meth:`_recall_room` after the system prompt)."""
        self.edits += 1
        position, offset = 0, 0
        room = self._recall_room()
        moves: list[tuple[Chunk, int, int]] = []  # (chunk, its physical offset, delta) of each chunk that moves
        for chunk in self.ledger.working():
            if chunk.kind != "system":
                position, room = position + room, 0
            delta = position - chunk.position_start
            if delta:
                moves.append((chunk, offset, delta))
            offset += chunk.tokens_held
            position = chunk.position_end + delta
        # The keys first, all layers in one rebuild: the books follow only once the cache holds the new positions.
        kv.rotate_spans(self.runner.cache, [(start, start + chunk.tokens_held, delta) for chunk, start, delta in moves], self.rotator)
        for chunk, _, delta in moves:
            chunk.position_start += delta
            chunk.position_end += delta
            self.positions[chunk.chunk_id] = self.positions[chunk.chunk_id] + delta
        self.runner.next_position = position
        self.compactions += 1
        tokens = self.ledger.working_tokens()
        return [MemoryEvent("reindexed", len(moves), tokens, tokens, None)] if moves else []

    # ---- scores for policies -------------------------------------------------------------------------
    def _token_values(self, chunk_id: int) -> tuple[np.ndarray, np.ndarray]:
        start = self.ledger.offset(chunk_id)
        return kv.token_values(self.runner.cache, start, start + self.ledger[chunk_id].tokens_held)

    def _proxy_scores(self, chunk_ids: list[int]) -> dict[int, np.ndarray]:
        """Attention from a generic proxy question (fed on a rolled-back extension) to each token of the chunks."""
        queries = self.runner.query_vectors(self.runner.adapter.question_ids(PROXY_QUESTION), rotated=True)  # [L, Hq, n, D]
        layers = kv._layers(self.runner.cache)
        probs = []
        for q, layer in zip(queries, layers):
            k = layer.keys[0].float()  # [Hk, N, D]
            group = q.shape[0] // k.shape[0]
            logits = torch.einsum("hgnd,hmd->hgnm", q.view(k.shape[0], group, q.shape[1], q.shape[2]), k) / q.shape[-1] ** 0.5
            probs.append(torch.softmax(logits, dim=-1).mean(dim=(0, 1, 2)))  # [N]
        attention = torch.stack(probs).mean(dim=0).numpy()
        out = {}
        for chunk_id in chunk_ids:
            start = self.ledger.offset(chunk_id)
            out[chunk_id] = attention[start : start + self.ledger[chunk_id].tokens_held]
        return out

    # ---- retrieval -----------------------------------------------------------------------------------------
    def retrieval_queries(self, question_ids: list[int]) -> torch.Tensor:
        """The position-free query vectors that score stored chunks for this question, ``[L, Hq, 1, D]``.

        Only the question's last position: it is the one that writes the first answer token, having read
        the whole question, as attention will; the template and question tokens before it query for
        themselves (on ShapeWorld at a 10 % budget, the mean over all of them recalled the wrong frames:
        backward 0.40 against 0.58, docs/benchmarks.md).
        """
        return self.runner.query_vectors(question_ids, rotated=False)[:, :, -1:]

    def retrieve(self, question_ids: list[int]) -> Retrieved | None:
        """Place the stored chunks most relevant to the question at the end of the cache; None if none.

        Up to ``retrieval_top_k`` chunks, best first. A chunk evicted before the latest re-index goes back
        just before the first working chunk, so those are recalled only as far as they fit between the
        system prompt and it (the room :meth:`_recall_room` left); the others keep their own positions."""
        if self.store is None or not len(self.store) or not self.config.retrieval_top_k:
            return None
        hits = self.store.search(self.retrieval_queries(question_ids), self.config.retrieval_top_k, near=RECALL_NEAR)
        working = self.ledger.working()
        first_working = next((c.position_start for c in working if c.kind != "system"), self.runner.next_position)
        room = first_working - next((c.position_end for c in working if c.kind == "system"), 0)
        records, moved = [], 0
        for chunk_id, _ in hits:  # best first; those that must move take room between the system prompt and working memory
            chunk = self.ledger[chunk_id]  # a stored chunk keeps the positions its record was written with
            if chunk.epoch != self.compactions:
                size = chunk.position_end - chunk.position_start
                if moved + size > room:
                    continue  # not read from the store at all
                moved += size
            records.append(self.store.get(chunk_id))
        if not records:
            return None
        records.sort(key=lambda r: (r[0].t_start, r[0].chunk_id))
        start = self.runner.cache_length
        place = first_working - moved  # the moved ones, in time order, end just before the first working chunk
        evidence, spans = [], []
        for record, keys, values in records:
            chunk = self.ledger[record.chunk_id]
            if chunk.epoch == self.compactions:
                delta = 0  # positions untouched since eviction: the original place is still right
            else:
                delta = place - record.position_start
                place += record.position_end - record.position_start
            at = self.runner.cache_length
            kv.append(self.runner.cache, [self.rotator.rotate(k, delta) for k in keys], values)
            if record.kind == "frame":
                evidence.append(Evidence(record.t_start, record.source_id))
                spans.append((at + min(chunk.protected_prefix, max(0, record.tokens - 1)), self.runner.cache_length))
        return Retrieved(start, self.runner.cache_length, tuple(evidence), tuple(spans))

    def release(self, retrieved: Retrieved) -> None:
        """Take retrieved chunks out of the cache again; working memory is as before :meth:`retrieve`."""
        kv.remove_span(self.runner.cache, retrieved.start, retrieved.end)

    # ---- reporting ---------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        counts = self.ledger.counts()
        store = self.store.stats() if self.store else None
        budget = self.config.budget_tokens
        per_token = self.runner.cache_bytes() / max(1, self.runner.cache_length)
        return {
            "working_tokens": self.ledger.working_tokens(),
            "working_bytes": self.runner.cache_bytes(),
            "budget_tokens": budget,
            "budget_bytes": int(per_token * budget) if budget else None,
            "logical_tokens": self.ledger.logical_tokens(),
            "chunks_working": counts["working"],
            "chunks_stored": counts["store"],
            "chunks_merged": counts["merged"],
            "chunks_dropped": counts["dropped"],
            "store_ram_bytes": store.ram_bytes if store else 0,
            "store_disk_bytes": store.disk_bytes if store else 0,
        }

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
