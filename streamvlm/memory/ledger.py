"""The ledger: the books of what the stream has fed and where each piece lives now. Plain Python.

Every prefill adds one *chunk* (the system prompt, a frame, a question, an answer). The ledger keeps,
per chunk, its timestamps, its logical positions (as baked into its keys), how many tokens were seen
and how many are held, and its tier: ``working`` (in the cache the model attends to), ``store``
(evicted to the long-term store), ``merged`` (folded into an earlier near-identical frame) or
``dropped`` (gone, and reported). Working chunks are listed in cache order, so a chunk's physical
offset in the cache is the sum of the tokens held before it.

Working chunks are :class:`Chunk` objects the manager edits in place. A chunk that has left working
memory no longer changes (except its tier, through :meth:`Ledger.set_tier`), so the ledger keeps it as
one row of compact stdlib arrays - about 90 bytes and no Python object per chunk - and ``ledger[id]``
returns a fresh :class:`Chunk` copy of it. A stream of hours thus keeps its books without the ledger's
memory growing by an object per frame; counts and logical tokens are running totals.

No torch, no I/O: the memory manager reads these books to plan, and the cache adapter applies plans.
"""

from __future__ import annotations

from array import array
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


_KIND_NAMES = ("system", "frame", "question", "answer")
_TIERS = (WORKING, STORE, MERGED, DROPPED)
_GONE = -1  # tier code of an id with no departed chunk


class _Departed:
    """Chunks that have left working memory: one row per chunk id in typed stdlib arrays.

    Row ``i`` belongs to chunk id ``i`` (ids are dense: the ledger hands them out in order), so a lookup
    is an array index. Kinds, tiers and source ids are stored as small codes (sources interned).
    """

    _FLOATS = ("t_start", "t_end")
    _INTS = ("position_start", "position_end", "tokens_seen", "tokens_held", "protected_prefix", "merged_frames", "epoch")

    def __init__(self) -> None:
        self._floats = {name: array("d") for name in self._FLOATS}
        self._ints = {name: array("q") for name in self._INTS}
        self._kind = array("b")
        self._tier = array("b")
        self._compressed = array("b")
        self._source = array("q")
        self._sources: list[str] = []
        self._source_codes: dict[str, int] = {}
        self.tier_counts = {tier: 0 for tier in _TIERS[1:]}
        self.tokens_seen = 0

    def __len__(self) -> int:
        return sum(self.tier_counts.values())

    def __contains__(self, chunk_id: int) -> bool:
        return 0 <= chunk_id < len(self._tier) and self._tier[chunk_id] != _GONE

    def ids(self) -> list[int]:
        return [i for i, tier in enumerate(self._tier) if tier != _GONE]

    def put(self, chunk: Chunk) -> None:
        """Keep ``chunk`` (which has just left working memory) as its row."""
        i = chunk.chunk_id
        if i < 0:
            raise ValueError(f"chunk ids are >= 0, got {i}")
        missing = i + 1 - len(self._tier)
        if missing > 0:
            for column in (*self._floats.values(), *self._ints.values(), self._source):
                column.extend([0] * missing)
            self._kind.extend([0] * missing)
            self._compressed.extend([0] * missing)
            self._tier.extend([_GONE] * missing)
        elif self._tier[i] != _GONE:
            self._forget(i)
        for name, column in self._floats.items():
            column[i] = getattr(chunk, name)
        for name, column in self._ints.items():
            column[i] = getattr(chunk, name)
        code = self._source_codes.setdefault(chunk.source_id, len(self._sources))
        if code == len(self._sources):
            self._sources.append(chunk.source_id)
        self._source[i] = code
        self._kind[i] = _KIND_NAMES.index(chunk.kind)
        self._compressed[i] = chunk.compressed
        self._tier[i] = _TIERS.index(chunk.tier)
        self.tier_counts[chunk.tier] += 1
        self.tokens_seen += chunk.tokens_seen

    def get(self, chunk_id: int) -> Chunk:
        """A fresh :class:`Chunk` with the row's values; KeyError if there is none."""
        if chunk_id not in self:
            raise KeyError(chunk_id)
        i = chunk_id
        return Chunk(
            chunk_id=i, kind=_KIND_NAMES[self._kind[i]], source_id=self._sources[self._source[i]],
            tier=_TIERS[self._tier[i]], compressed=bool(self._compressed[i]),
            **{name: column[i] for name, column in self._floats.items()},
            **{name: column[i] for name, column in self._ints.items()},
        )

    def set_tier(self, chunk_id: int, tier: str) -> None:
        if chunk_id not in self:
            raise KeyError(chunk_id)
        self.tier_counts[_TIERS[self._tier[chunk_id]]] -= 1
        self._tier[chunk_id] = _TIERS.index(tier)
        self.tier_counts[tier] += 1

    def _forget(self, chunk_id: int) -> None:
        self.tier_counts[_TIERS[self._tier[chunk_id]]] -= 1
        self.tokens_seen -= self._ints["tokens_seen"][chunk_id]
        self._tier[chunk_id] = _GONE


class Ledger:
    """Chunk records in feed order; the working ones in cache order."""

    def __init__(self) -> None:
        self._chunks: dict[int, Chunk] = {}  # working chunks
        self._working: list[int] = []
        self._departed = _Departed()
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
        """Move a working chunk to ``tier``; the returned object is no longer the ledger's (read it, do not edit it)."""
        chunk = self._chunks.pop(chunk_id)
        self._working.remove(chunk_id)
        chunk.tier = tier
        self._departed.put(chunk)
        return chunk

    def set_tier(self, chunk_id: int, tier: str) -> None:
        if chunk_id in self._chunks:
            self._chunks[chunk_id].tier = tier
        else:
            self._departed.set_tier(chunk_id, tier)

    def remove_newest(self, count: int) -> None:
        """Forget the ``count`` newest chunks entirely (a rolled-back scratch extension)."""
        for _ in range(count):
            chunk_id = self._working.pop()
            del self._chunks[chunk_id]
            self._next_id = chunk_id

    # ---- reading ---------------------------------------------------------------------------------------
    def __getitem__(self, chunk_id: int) -> Chunk:
        """A working chunk itself, or a copy of a chunk that has left working memory; KeyError if unknown."""
        chunk = self._chunks.get(chunk_id)
        return chunk if chunk is not None else self._departed.get(chunk_id)

    def working(self) -> list[Chunk]:
        return [self._chunks[i] for i in self._working]

    def all(self) -> list[Chunk]:
        return [self[i] for i in sorted([*self._chunks, *self._departed.ids()])]

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
        return self._departed.tokens_seen + sum(c.tokens_seen for c in self._chunks.values())

    def counts(self) -> dict[str, int]:
        out = {WORKING: 0, **self._departed.tier_counts}
        for c in self._chunks.values():  # a chunk being evicted is already booked to its new tier
            out[c.tier] += 1
        return out

    def __len__(self) -> int:
        return len(self._chunks) + len(self._departed)

    # ---- snapshots -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"next_id": self._next_id, "working": list(self._working), "chunks": [asdict(c) for c in self.all()]}

    @classmethod
    def from_dict(cls, data: dict) -> Ledger:
        ledger = cls()
        ledger._next_id = int(data["next_id"])
        ledger._working = [int(i) for i in data["working"]]
        working = set(ledger._working)
        for c in data["chunks"]:
            chunk = Chunk(**c)
            if chunk.chunk_id in working:
                ledger._chunks[chunk.chunk_id] = chunk
            else:
                ledger._departed.put(chunk)
        return ledger
