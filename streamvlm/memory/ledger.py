"""The ledger: the books of what the stream has fed and where each piece lives now. Plain Python.

Every prefill adds one *chunk* (the system prompt, a frame, a question, an answer). The ledger keeps,
per chunk, its timestamps, its logical positions (as baked into its keys), how many tokens were seen
and how many are held, and its tier: ``working`` (in the cache the model attends to), ``store``
(evicted to the long-term store), ``merged`` (folded into an earlier near-identical frame) or
``dropped`` (gone, and reported). Working chunks are listed in cache order, so a chunk's physical
offset in the cache is the sum of the tokens held before it.

No torch, no I/O: the memory manager reads these books to plan, and the cache adapter applies plans.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["Chunk", "Ledger", "Plan", "WORKING", "STORE", "MERGED", "DROPPED"]

WORKING, STORE, MERGED, DROPPED = "working", "store", "merged", "dropped"
DIALOGUE = ("question", "answer")


@dataclass(slots=True)
class Chunk:
    chunk_id: int
    kind: str  # "system" | "frame" | "question" | "answer"
    t_start: float
    t_end: float
    source_id: str
    position_start: int  # position of the first token, as rotated into the keys now
    position_end: int  # the position after the chunk
    tokens_seen: int  # tokens the chunk had when it was fed
    tokens_held: int  # tokens the cache holds for it now (fewer after compression)
    protected_prefix: int = 0  # leading tokens a compressing policy must keep (a frame's timestamp text)
    tier: str = WORKING
    compressed: bool = False
    merged_frames: int = 1  # frames this chunk stands for (merge policy)
    epoch: int = 0  # the manager's compaction count when the chunk left working memory

    @property
    def is_dialogue(self) -> bool:
        return self.kind in DIALOGUE


@dataclass
class Plan:
    """What to do to working memory, decided by a policy and applied by the memory manager.

    ``keep`` maps a chunk id to the token indices (within the chunk, ascending) to keep; ``evict``
    lists chunks to move to the long-term store; ``merge`` maps a chunk id to the earlier chunk it is
    folded into. An empty plan changes nothing.
    """

    keep: dict[int, list[int]] = field(default_factory=dict)
    evict: list[int] = field(default_factory=list)
    merge: dict[int, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.keep or self.evict or self.merge)


class Ledger:
    """Chunk records in feed order; the working ones in cache order."""

    def __init__(self) -> None:
        self._chunks: dict[int, Chunk] = {}
        self._working: list[int] = []
        self._next_id = 0

    # ---- adding and moving -------------------------------------------------------------------------
    def add(self, kind: str, t_start: float, t_end: float, source_id: str, position_start: int, position_end: int, tokens: int, protected_prefix: int = 0) -> Chunk:
        chunk = Chunk(self._next_id, kind, t_start, t_end, source_id, position_start, position_end, tokens, tokens, protected_prefix)
        self._chunks[chunk.chunk_id] = chunk
        self._working.append(chunk.chunk_id)
        self._next_id += 1
        return chunk

    def extend_last(self, tokens: int, position_end: int, t_end: float | None = None) -> Chunk:
        """Grow the newest working chunk (an answer being generated)."""
        chunk = self._chunks[self._working[-1]]
        chunk.tokens_seen += tokens
        chunk.tokens_held += tokens
        chunk.position_end = position_end
        if t_end is not None:
            chunk.t_end = t_end
        return chunk

    def leave_working(self, chunk_id: int, tier: str) -> Chunk:
        chunk = self._chunks[chunk_id]
        self._working.remove(chunk_id)
        chunk.tier = tier
        return chunk

    def set_tier(self, chunk_id: int, tier: str) -> None:
        self._chunks[chunk_id].tier = tier

    def remove_newest(self, count: int) -> None:
        """Forget the ``count`` newest chunks entirely (a rolled-back scratch extension)."""
        for _ in range(count):
            chunk_id = self._working.pop()
            del self._chunks[chunk_id]
            self._next_id = chunk_id

    # ---- reading ---------------------------------------------------------------------------------------
    def __getitem__(self, chunk_id: int) -> Chunk:
        return self._chunks[chunk_id]

    def working(self) -> list[Chunk]:
        return [self._chunks[i] for i in self._working]

    def all(self) -> list[Chunk]:
        return [self._chunks[i] for i in sorted(self._chunks)]

    def offset(self, chunk_id: int) -> int:
        """Physical offset of a working chunk's first token in the cache."""
        total = 0
        for i in self._working:
            if i == chunk_id:
                return total
            total += self._chunks[i].tokens_held
        raise KeyError(f"chunk {chunk_id} is not in working memory")

    def working_tokens(self, kinds: tuple[str, ...] | None = None) -> int:
        return sum(c.tokens_held for c in self.working() if kinds is None or c.kind in kinds)

    def logical_tokens(self) -> int:
        return sum(c.tokens_seen for c in self._chunks.values())

    def counts(self) -> dict[str, int]:
        out = {WORKING: 0, STORE: 0, MERGED: 0, DROPPED: 0}
        for c in self._chunks.values():
            out[c.tier] += 1
        return out

    def __len__(self) -> int:
        return len(self._chunks)

    # ---- snapshots -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"next_id": self._next_id, "working": list(self._working), "chunks": [asdict(c) for c in self.all()]}

    @classmethod
    def from_dict(cls, data: dict) -> Ledger:
        ledger = cls()
        ledger._next_id = int(data["next_id"])
        ledger._chunks = {int(c["chunk_id"]): Chunk(**c) for c in data["chunks"]}
        ledger._working = [int(i) for i in data["working"]]
        return ledger
