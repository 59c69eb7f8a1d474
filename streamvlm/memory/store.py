"""Long-term store: where chunks of KV cache go once they leave working memory.

A *chunk* is a run of tokens (one frame's visual tokens, or a piece of text) whose keys and values were
evicted from the model's working KV cache. The store keeps them so a later question can bring the
relevant ones back. It has two tiers and a small index:

* **RAM tier** - chunks kept as CPU tensors, at most ``ram_bytes`` of keys and values in all.
* **Disk tier** - chunks written as one safetensors file each (tensors plus the chunk's record as JSON
  metadata), at most ``disk_bytes`` in all. The files live in the ``directory`` given to the store, or in
  a fresh temporary directory the store creates and removes again on :meth:`LongTermStore.close`. A
  temporary directory carries an owner file (host name and process id); a process killed before it could
  close its store leaves its directory behind, and the next store created on the same host removes
  such directories whose process is gone (:func:`sweep_stale_directories`).
* **Index** - one small position-free summary per chunk (the mean key per layer and kv head, or a few
  such vectors per chunk: one per group of its tokens), stored as float32. It is what :meth:`LongTermStore.search` scores; it is not counted against either
  quota (see ``StoreStats.index_bytes``). RAM-tier chunks' entries are held in RAM; disk-tier chunks'
  entries live in one index file next to the spill files and are read back block by block when a
  question is searched, so they cost no RAM between questions (``StoreStats.index_ram_bytes``).

What the store keeps in RAM for a disk-tier chunk is one fixed-size numpy row (its record fields, byte
size and index-file slot: about 80 bytes) - no Python objects per chunk - so a store that fills its disk
quota over a long stream does not grow the process's memory with the chunks it holds on disk.

Quotas, spill and drop
    The byte size of a chunk is the sum of ``numel * element_size`` over its key and value tensors.
    :meth:`LongTermStore.put` places a new chunk in RAM; then, while RAM holds more than its quota, the
    *oldest* RAM chunks (ordered by ``t_end``, then ``chunk_id``) are spilled to disk; then, while disk
    holds more than its quota, the oldest disk chunks are dropped (file and index entry deleted). A chunk
    larger than the RAM quota goes straight to disk; one larger than the disk quota as well is dropped.
    After every ``put`` both tiers are within their quotas. Nothing moves or disappears silently: ``put``
    returns a :class:`StoreEvent` for every chunk stored, spilled or dropped, and :meth:`stats` keeps the
    running drop count, bytes and the latest dropped ``t_end`` (``dropped_up_to_s``), so a caller can tell
    the user "memory before 12.5 s is gone".

Scoring
    :meth:`LongTermStore.search` scores chunks against the position-free query vectors of a question,
    ReKV-style: per layer, the mean over query heads and query tokens of ``q . index / sqrt(head_dim)``,
    where a query head uses the kv head of its group (grouped-query attention). Position-free keys (keys
    before rotary embedding, as in LiveVLM) make the score independent of where a chunk sat in the
    stream. A chunk indexed by several vectors (``[layers, vectors, kv_heads, head_dim]``) scores, per
    layer, its best vector: late interaction by max-sim as in ColBERT, so a frame is found by the part of
    it that matches rather than by its average. Layers are then combined - each layer's scores
    z-normalised across chunks and averaged - so one set of chunks is chosen for all layers and every
    retrieved chunk comes back with complete KV in every layer. With ``near > 0`` the chunks that score
    within ``near`` of the best are taken earliest first (a thing that stays on screen for many frames
    scores alike in all of them; the earliest is where it appeared).

The store is not thread-safe: call it from one thread, or guard it with a lock.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import io
import json
import math
import numbers
import os
import shutil
import socket
import tempfile
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from streamvlm.errors import ConfigError, InputError, StreamVLMError

__all__ = [
    "ChunkRecord",
    "StoreEvent",
    "StoreStats",
    "LongTermStore",
    "MANIFEST_NAME",
    "FORMAT_VERSION",
    "sweep_stale_directories",
    "file_sha256",
    "check_file",
    "seal",
    "check_seal",
]

MANIFEST_NAME = "manifest.json"
"""Name of the JSON manifest :meth:`LongTermStore.save` writes and :meth:`LongTermStore.load` reads."""

FORMAT_VERSION = 2
"""Version of the saved-store layout; :meth:`LongTermStore.load` refuses any other.

Version 2 added checksums: a sha256 per chunk file and for the index file, and a seal over the manifest
itself (its ``sha256`` field), so that any changed byte of a saved store is refused on load."""

_FORMAT_NAME = "streamvlm.longterm-store"
_CHUNK_FORMAT = "streamvlm.kv-chunk"
_INDEX_FILE = "index.safetensors"
_KINDS = ("frame", "text")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INDEX_BLOCK_BYTES = 1 << 20
"""At most this many bytes of disk-tier index entries are read into RAM at a time during a search."""
_AgeKey = tuple[float, int]
_RERANK = 256
"""With several vectors per chunk and more RAM-tier chunks than this, a search first ranks them by their mean
vector and scores only this many best by their best vector (PLAID-style candidates for ColBERT's late
interaction), so its cost stays about that of one vector per chunk."""


# --------------------------------------------------------------------------------------------- records


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class ChunkRecord:
    """What a stored chunk is: its id, kind, time span, source and logical positions.

    ``position_start`` is the logical position of the chunk's first token and ``position_end`` the one
    after its last; ``tokens`` is how many tokens have keys and values stored (their second dimension).
    Invalid values raise :class:`~streamvlm.errors.InputError` naming the field.
    """

    chunk_id: int
    kind: str
    t_start: float
    t_end: float
    source_id: str
    position_start: int
    position_end: int
    tokens: int

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InputError(f"ChunkRecord.kind must be one of {_KINDS}, got {self.kind!r}")
        for name in ("t_start", "t_end"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise InputError(f"ChunkRecord.{name} must be a finite number of seconds, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.t_end < self.t_start:
            raise InputError(f"ChunkRecord.t_end ({self.t_end}) is before t_start ({self.t_start})")
        if not isinstance(self.source_id, str):
            raise InputError(f"ChunkRecord.source_id must be a str, got {self.source_id!r}")
        for name in ("chunk_id", "position_start", "position_end", "tokens"):
            value = getattr(self, name)
            if not _is_int(value):
                raise InputError(f"ChunkRecord.{name} must be an int, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.position_end < self.position_start:
            raise InputError(
                f"ChunkRecord.position_end ({self.position_end}) is before position_start ({self.position_start})"
            )
        if self.tokens < 0:
            raise InputError(f"ChunkRecord.tokens must be >= 0, got {self.tokens}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of the record's fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChunkRecord:
        """Rebuild a record from :meth:`to_dict` output; missing or unknown keys raise InputError."""
        if not isinstance(data, Mapping):
            raise InputError(f"a ChunkRecord needs a mapping, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data))
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise InputError(f"ChunkRecord dict has missing keys {missing} and unknown keys {unknown}")
        return cls(**{name: data[name] for name in names})

    @property
    def age_key(self) -> _AgeKey:
        """Sort key for age: older chunks (smaller ``t_end``, then smaller ``chunk_id``) come first."""
        return (self.t_end, self.chunk_id)


@dataclass(frozen=True)
class StoreEvent:
    """One thing that happened to a chunk during :meth:`LongTermStore.put` (or a load).

    ``kind`` is ``"stored"`` (the new chunk was kept in RAM), ``"spilled"`` (a chunk's KV was written to
    disk: moved from RAM, or a new chunk larger than the RAM quota) or ``"dropped"`` (a chunk was deleted
    for good; its memory before ``t_end`` is gone). ``bytes`` is the chunk's KV size.
    """

    kind: str
    chunk_id: int
    t_end: float
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of the event's fields."""
        return asdict(self)


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of the store's occupancy and its drop counters. All sizes are in bytes.

    ``index_bytes`` is the size of every held chunk's index entry (float32, outside both quotas);
    ``index_ram_bytes`` the part of it held in RAM (the RAM tier's entries; the disk tier's are in a file).
    """

    ram_bytes: int
    disk_bytes: int
    ram_chunks: int
    disk_chunks: int
    dropped_chunks: int
    dropped_bytes: int
    dropped_up_to_s: float | None
    ram_quota: int
    disk_quota: int
    index_bytes: int
    index_ram_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of the statistics."""
        return asdict(self)


# ------------------------------------------------------------------------------------------ tensors


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def _check_kv(record: ChunkRecord, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Raise InputError unless keys/values are per-layer float ``[kv_heads, tokens, head_dim]`` tensors."""
    if not isinstance(keys, Sequence) or not isinstance(values, Sequence):
        raise InputError("keys and values must be lists with one tensor per layer")
    if len(keys) == 0 or len(keys) != len(values):
        raise InputError(f"keys and values need the same, non-zero number of layers; got {len(keys)} and {len(values)}")
    first = keys[0]
    for layer, (k, v) in enumerate(zip(keys, values)):
        for name, t in (("keys", k), ("values", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
                raise InputError(f"{name}[{layer}] must be a float tensor [kv_heads, tokens, head_dim]")
        if k.shape[1] != record.tokens or v.shape[:2] != k.shape[:2]:
            raise InputError(
                f"layer {layer}: keys {tuple(k.shape)} / values {tuple(v.shape)} do not hold "
                f"record.tokens={record.tokens} tokens for the same kv heads"
            )
        if k.shape[0] != first.shape[0] or k.shape[2] != first.shape[2]:
            raise InputError(f"layer {layer}: keys {tuple(k.shape)} differ in kv_heads/head_dim from layer 0")


def _check_index(index: torch.Tensor, keys: Sequence[torch.Tensor], expected: torch.Size | None) -> None:
    """Raise InputError unless ``index`` is a finite float ``[layers, kv_heads, head_dim]`` or
    ``[layers, vectors, kv_heads, head_dim]`` tensor (vectors >= 1)."""
    want = torch.Size((len(keys), keys[0].shape[0], keys[0].shape[2]))
    ok = isinstance(index, torch.Tensor) and index.is_floating_point() and (
        index.shape == want or (index.dim() == 4 and index.shape[1] >= 1 and index.shape[:1] + index.shape[2:] == want))
    if not ok:
        shape = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
        raise InputError(
            f"index must be a float tensor of shape {tuple(want)} (layers, kv_heads, head_dim) or "
            f"{(want[0], 'vectors', *want[1:])} (layers, vectors, kv_heads, head_dim), got {shape}"
        )
    if expected is not None and index.shape != expected:
        raise InputError(f"index shape {tuple(index.shape)} differs from the stored chunks' {tuple(expected)}")
    if not bool(torch.isfinite(index).all()):
        raise InputError("index holds NaN or infinite values")


# --------------------------------------------------------------------------------------- chunk files


def _write_chunk(path: Path, record: ChunkRecord, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Write one chunk as a safetensors file, atomically (a temp file renamed into place)."""
    tensors = {f"keys.{i}": k for i, k in enumerate(keys)}
    tensors.update({f"values.{i}": v for i, v in enumerate(values)})
    metadata = {"format": _CHUNK_FORMAT, "version": str(FORMAT_VERSION), "record": json.dumps(record.to_dict())}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_chunk(path: Path) -> tuple[ChunkRecord, list[torch.Tensor], list[torch.Tensor]]:
    """Read a chunk file; a missing, truncated or malformed file raises InputError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            names = set(f.keys())
            layers = sum(1 for n in names if n.startswith("keys."))
            expected = {f"{kind}.{i}" for kind in ("keys", "values") for i in range(layers)}
            if metadata.get("format") != _CHUNK_FORMAT or names != expected:
                raise InputError("not a streamvlm KV chunk (format or tensor names differ)")
            record = ChunkRecord.from_dict(json.loads(metadata["record"]))
            keys = [f.get_tensor(f"keys.{i}") for i in range(layers)]
            values = [f.get_tensor(f"values.{i}") for i in range(layers)]
    except InputError as exc:
        raise InputError(f"chunk file {path}: {exc}") from exc
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"chunk file {path} is missing, truncated or malformed: {exc}") from exc
    try:
        _check_kv(record, keys, values)
    except InputError as exc:
        raise InputError(f"chunk file {path}: {exc}") from exc
    return record, keys, values


_TEMP_PREFIX = "streamvlm-store-"
_OWNER_NAME = "owner"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def sweep_stale_directories(parent: str | Path | None = None) -> list[Path]:
    """Remove temporary store directories under ``parent`` (default: the system temporary directory)
    whose owner process on this host is gone, and return them.

    Only directories with an owner file naming this host and a process that no longer exists are
    removed; a directory without an owner file (or from another host sharing the same ``/tmp``) is
    left alone. Stores call this when they create their own temporary directory.
    """
    host = socket.gethostname()
    removed = []
    for path in Path(parent if parent is not None else tempfile.gettempdir()).glob(f"{_TEMP_PREFIX}*"):
        try:
            owner_host, pid = (path / _OWNER_NAME).read_text().split()
            stale = owner_host == host and not _process_alive(int(pid))
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _cleanup(directory: Path | None, owned: bool, tag: str, created: bool, disk_index: _DiskIndex) -> None:
    """Delete what a store wrote (spill files, the disk-tier index file) and, where it made its directory, the directory."""
    disk_index.close()
    if directory is None:
        return
    if owned:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for path in directory.glob(f"spill-{tag}-*"):
        path.unlink(missing_ok=True)
    if created:
        try:
            directory.rmdir()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    """What one put will do, decided before anything is written, so a failed write changes nothing."""

    new_in_ram: bool
    spill: list[int]          # chunk ids written to disk (RAM victims, or the new chunk)
    drop_ram: list[int]       # chunk ids deleted straight from RAM (or the new chunk) without a disk copy
    drop_disk: list[int]      # chunk ids already on disk whose files are deleted


def _quota(name: str, value: object) -> int:
    if not _is_int(value) or int(value) < 0:
        raise ConfigError(f"{name} must be an int >= 0 (a size in bytes), got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------ the tiers


@dataclass(slots=True)
class _RamChunk:
    """A RAM-tier chunk (or a new chunk in a put): its record, KV byte size and CPU tensors."""

    record: ChunkRecord
    nbytes: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class _IndexMatrix:
    """Index entries of the RAM tier as one layer-major float32 matrix ``[layers, capacity, width]``.

    ``width`` is ``kv_heads * head_dim``. Appends are amortised O(1) (the capacity doubles); a removal
    moves the last entry into the freed column, O(1). Searching reads the matrix in place, so a question
    costs one batched matrix-vector product. Column order is arbitrary; ``ids[i]`` owns column ``i``.
    """

    def __init__(self) -> None:
        self.ids: list[int] = []
        self._column: dict[int, int] = {}
        self._buf: torch.Tensor | None = None
        self._mean: torch.Tensor | None = None  # [layers, capacity, per-vector width]: each entry's mean vector

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, chunk_id: int, row: torch.Tensor, mean: torch.Tensor | None = None) -> None:
        """Add ``row`` (``[layers, width]``, float32) as ``chunk_id``'s entry (copied), and ``mean`` (``[layers,
        width / vectors]``, the mean of its vectors) when the entries hold several vectors (give it always or never)."""
        n = len(self.ids)
        if self._buf is None or n == self._buf.shape[1]:
            grown = torch.empty(row.shape[0], max(16, 2 * n), row.shape[1])
            if self._buf is not None:
                grown[:, :n] = self._buf[:, :n]
            self._buf = grown
            if mean is not None:
                means = torch.empty(mean.shape[0], grown.shape[1], mean.shape[1])
                if self._mean is not None:
                    means[:, :n] = self._mean[:, :n]
                self._mean = means
        self._buf[:, n] = row
        if mean is not None:
            assert self._mean is not None
            self._mean[:, n] = mean
        self._column[chunk_id] = n
        self.ids.append(chunk_id)

    def row(self, chunk_id: int) -> torch.Tensor:
        """A copy of ``chunk_id``'s entry, ``[layers, width]``."""
        assert self._buf is not None
        return self._buf[:, self._column[chunk_id]].clone()

    def remove(self, chunk_id: int) -> None:
        """Forget ``chunk_id``'s entry; the matrix is released once it holds none."""
        assert self._buf is not None
        col, last = self._column.pop(chunk_id), len(self.ids) - 1
        if col != last:
            moved = self.ids[last]
            self._buf[:, col] = self._buf[:, last]
            if self._mean is not None:
                self._mean[:, col] = self._mean[:, last]
            self.ids[col] = moved
            self._column[moved] = col
        self.ids.pop()
        if not self.ids:
            self._buf = None
            self._mean = None

    def view(self) -> tuple[list[int], torch.Tensor]:
        """``(ids, matrix[layers, len(ids), width])``: the live part of the matrix, not a copy."""
        assert self._buf is not None
        return self.ids, self._buf[:, : len(self.ids)]

    def mean_view(self) -> torch.Tensor | None:
        """The live part of the mean vectors, ``[layers, len(ids), width / vectors]``, or None if none are kept."""
        return None if self._mean is None else self._mean[:, : len(self.ids)]


class _DiskIndex:
    """Index entries of the disk tier: one float32 row each in a file, not in RAM.

    Slot ``s`` (bytes ``s * row_bytes`` on) holds one entry, chunk-major ``[layers, width]``, and
    ``_owners[s]`` is the chunk id it belongs to, or -1 for a free slot, which the next :meth:`add`
    reuses. Only ``_owners`` (8 bytes a slot) and the free list live in RAM, so the store's RAM does not
    grow with the chunks it keeps on disk. The file is created by the first :meth:`add` (so a store
    that never spills writes none) and deleted by :meth:`close`; :meth:`blocks` reads it back in
    blocks of at most ``_INDEX_BLOCK_BYTES`` into one buffer per search.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: io.FileIO | None = None
        self._owners = np.full(0, -1, dtype=np.int64)
        self._free: list[int] = []
        self._slots = 0
        self._layers = 0
        self._width = 0

    def __len__(self) -> int:
        return self._slots - len(self._free)

    @property
    def row_bytes(self) -> int:
        return self._layers * self._width * 4

    def add(self, chunk_id: int, row: torch.Tensor) -> int:
        """Write ``row`` (``[layers, width]``) as ``chunk_id``'s entry into a free slot; return the slot.

        An empty index takes the row's shape. A failed write (disk full) raises OSError and changes nothing.
        """
        if len(self) == 0:
            self._reset(int(row.shape[0]), int(row.shape[1]))
        slot = self._free[-1] if self._free else self._slots
        data = row.detach().to("cpu", torch.float32).contiguous().numpy()
        f = self._open()
        f.seek(slot * self.row_bytes)
        view = memoryview(data).cast("B")
        while view:
            view = view[f.write(view) :]
        if self._free:
            self._free.pop()
        else:
            self._slots += 1
            if self._slots > len(self._owners):
                self._owners = np.concatenate([self._owners, np.full(max(64, len(self._owners)), -1, dtype=np.int64)])
        self._owners[slot] = chunk_id
        return slot

    def release(self, slot: int) -> None:
        """Free ``slot`` for reuse (its bytes stay in the file until overwritten; searches skip it)."""
        self._owners[slot] = -1
        self._free.append(slot)

    def read(self, slot: int) -> torch.Tensor:
        """The entry in ``slot``, ``[layers, width]`` float32, read from the file."""
        buf = np.empty((1, self._layers * self._width), dtype=np.float32)
        self._read_into(buf, slot)
        return torch.from_numpy(buf).view(self._layers, self._width)

    def blocks(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(chunk ids, entries[n, layers, width])`` over every held entry, a block at a time.

        The entries of a block share one buffer that the next block overwrites: use them before asking for more.
        """
        if not len(self):
            return
        per_block = max(1, _INDEX_BLOCK_BYTES // self.row_bytes)
        buf = np.empty((min(per_block, self._slots), self._layers * self._width), dtype=np.float32)
        for start in range(0, self._slots, per_block):
            n = min(per_block, self._slots - start)
            self._read_into(buf[:n], start)
            owners = self._owners[start : start + n]
            live = owners >= 0
            rows = buf[:n] if live.all() else buf[:n][live]
            yield owners[live], torch.from_numpy(rows).view(-1, self._layers, self._width)

    def close(self) -> None:
        """Close and delete the file; the index is empty afterwards."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self._reset(0, 0)

    def _reset(self, layers: int, width: int) -> None:
        if self._file is not None:
            self._file.truncate(0)
        self._owners = np.full(0, -1, dtype=np.int64)
        self._free = []
        self._slots = 0
        self._layers, self._width = layers, width

    def _open(self) -> io.FileIO:
        if self._file is None:
            if self.path is None:  # unreachable: a store without a directory never spills
                raise StreamVLMError("the store has no directory for its disk-tier index")
            self._file = io.FileIO(self.path, "w+")
        return self._file

    def _read_into(self, buf: np.ndarray, slot: int) -> None:
        f = self._open()
        f.seek(slot * self.row_bytes)
        view = memoryview(buf).cast("B")
        while view:
            got = f.readinto(view)
            if not got:
                raise StreamVLMError(f"the disk-tier index file {self.path} is shorter than its entries")
            view = view[got:]


def _check_int64(record: ChunkRecord) -> None:
    """Raise InputError unless the record's int fields fit the disk tier's 64-bit columns."""
    for name in ("chunk_id", "position_start", "position_end", "tokens"):
        value = getattr(record, name)
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise InputError(f"ChunkRecord.{name} must fit in a signed 64-bit int, got {value}")


_DISK_ROW = np.dtype(
    [
        ("t_end", "f8"), ("chunk_id", "i8"), ("t_start", "f8"), ("position_start", "i8"), ("position_end", "i8"),
        ("tokens", "i8"), ("nbytes", "i8"), ("slot", "i8"), ("source", "i4"), ("kind", "i1"),
    ]
)


class _DiskRecords:
    """Records of the disk-tier chunks as rows of one numpy structured array, oldest first.

    A row is 69 bytes and no Python object (source ids are interned), so the books of the chunks on
    disk cost tens of bytes each instead of hundreds; :meth:`record` rebuilds a ChunkRecord on demand.
    Rows stay sorted by age (``t_end``, then ``chunk_id``) in ``_rows[_head:_end]``: removing the
    oldest moves ``_head`` and appending a newest fills the tail, both amortised O(1) (anything else
    shifts the rows behind it); a lookup by chunk id is one vectorised comparison.
    """

    def __init__(self) -> None:
        self._rows = np.empty(0, dtype=_DISK_ROW)
        self._head = self._end = 0
        self._sources: list[str] = []
        self._source_codes: dict[str, int] = {}

    def __len__(self) -> int:
        return self._end - self._head

    def _live(self) -> np.ndarray:
        return self._rows[self._head : self._end]

    def find(self, chunk_id: int) -> int | None:
        """Position (0 = oldest) of ``chunk_id``'s row, or None."""
        if not _INT64_MIN <= chunk_id <= _INT64_MAX:
            return None
        hits = np.flatnonzero(self._live()["chunk_id"] == chunk_id)
        return int(hits[0]) if hits.size else None

    def insert(self, record: ChunkRecord, nbytes: int, slot: int) -> None:
        """Add a row for ``record`` in age order."""
        live = self._live()
        lo = int(np.searchsorted(live["t_end"], record.t_end, "left"))
        hi = int(np.searchsorted(live["t_end"], record.t_end, "right"))
        pos = lo + int(np.searchsorted(live["chunk_id"][lo:hi], record.chunk_id))
        self._make_room()
        at = self._head + pos
        if at < self._end:
            self._rows[at + 1 : self._end + 1] = self._rows[at : self._end]
        code = self._source_codes.setdefault(record.source_id, len(self._sources))
        if code == len(self._sources):
            self._sources.append(record.source_id)
        self._rows[at] = (
            record.t_end, record.chunk_id, record.t_start, record.position_start, record.position_end,
            record.tokens, nbytes, slot, code, _KINDS.index(record.kind),
        )
        self._end += 1

    def remove(self, pos: int) -> None:
        """Delete the row at ``pos``."""
        if pos == 0:
            self._head += 1
        else:
            at = self._head + pos
            self._rows[at : self._end - 1] = self._rows[at + 1 : self._end]
            self._end -= 1
        if self._head == self._end:
            self._head = self._end = 0

    def record(self, pos: int) -> ChunkRecord:
        row = self._rows[self._head + pos]
        return ChunkRecord(
            int(row["chunk_id"]), _KINDS[int(row["kind"])], float(row["t_start"]), float(row["t_end"]),
            self._sources[int(row["source"])], int(row["position_start"]), int(row["position_end"]), int(row["tokens"]),
        )

    def nbytes(self, pos: int) -> int:
        return int(self._rows[self._head + pos]["nbytes"])

    def slot(self, pos: int) -> int:
        return int(self._rows[self._head + pos]["slot"])

    def ages(self) -> Iterator[tuple[float, int, int]]:
        """``(t_end, chunk_id, nbytes)`` of every row, oldest first, read lazily."""
        for at in range(self._head, self._end):
            row = self._rows[at]
            yield float(row["t_end"]), int(row["chunk_id"]), int(row["nbytes"])

    def clear(self) -> None:
        """Forget every row."""
        self._rows = np.empty(0, dtype=_DISK_ROW)
        self._head = self._end = 0
        self._sources.clear()
        self._source_codes.clear()

    def _make_room(self) -> None:
        if self._end < len(self._rows):
            return
        n = len(self)
        if self._head and n <= len(self._rows) // 2:
            self._rows[:n] = self._rows[self._head : self._end]
        else:
            grown = np.empty(max(64, 2 * len(self._rows)), dtype=_DISK_ROW)
            grown[:n] = self._live()
            self._rows = grown
        self._head, self._end = 0, n


# ------------------------------------------------------------------------------------------ the store


class LongTermStore:
    """Two-tier (RAM, then disk) store of evicted KV chunks with an index for retrieval.

    ``ram_bytes`` and ``disk_bytes`` are the tiers' quotas in bytes (``>= 0``, else ConfigError). Spill
    files go to ``directory`` (created if missing); with ``disk_bytes > 0`` and no directory the store makes
    a fresh temporary one that it owns. Call :meth:`close` (or use ``with``) to delete what the store wrote.
    See the module docstring for the placement rules. ``load_events`` lists the drops :meth:`load` made
    when saved chunks did not fit the new quotas (empty for a store built directly).
    """

    def __init__(self, ram_bytes: int, disk_bytes: int, directory: str | Path | None = None) -> None:
        self._ram_quota = _quota("ram_bytes", ram_bytes)
        self._disk_quota = _quota("disk_bytes", disk_bytes)
        self._ram: dict[int, _RamChunk] = {}
        self._ram_order: list[_AgeKey] = []
        self._ram_index = _IndexMatrix()
        self._disk = _DiskRecords()
        self._ram_used = 0
        self._disk_used = 0
        # (layers, kv_heads, head_dim) or (layers, vectors, kv_heads, head_dim) of the held index entries
        self._shape: tuple[int, ...] | None = None
        self._dropped_chunks = 0
        self._dropped_bytes = 0
        self._dropped_up_to: float | None = None
        self._closed = False
        self._tag = uuid.uuid4().hex[:8]
        self.load_events: tuple[StoreEvent, ...] = ()
        self._directory, owned, created = self._open_directory(directory)
        self._owned_directory = owned
        index_path = self._directory / f"spill-{self._tag}-index.f32" if self._directory is not None else None
        self._disk_index = _DiskIndex(index_path)
        self._finalizer = weakref.finalize(self, _cleanup, self._directory, owned, self._tag, created, self._disk_index)

    def _open_directory(self, directory: str | Path | None) -> tuple[Path | None, bool, bool]:
        if directory is not None:
            path = Path(directory)
            if path.exists() and not path.is_dir():
                raise ConfigError(f"directory {path} exists and is not a directory")
            created = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
            return path, False, created
        if self._disk_quota > 0:
            sweep_stale_directories()
            path = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
            (path / _OWNER_NAME).write_text(f"{socket.gethostname()} {os.getpid()}\n")
            return path, True, True
        return None, False, False

    # ------------------------------------------------------------------------------------ queries

    @property
    def directory(self) -> Path | None:
        """Where spill files and the disk-tier index file are written (None when the store has no disk tier)."""
        return self._directory

    def __len__(self) -> int:
        return len(self._ram) + len(self._disk)

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._ram or (_is_int(chunk_id) and self._disk.find(int(chunk_id)) is not None)

    def where(self, chunk_id: int) -> str:
        """``"ram"`` or ``"disk"``: the tier holding ``chunk_id``; KeyError if the store does not hold it."""
        if chunk_id in self._ram:
            return "ram"
        if _is_int(chunk_id) and self._disk.find(chunk_id) is not None:
            return "disk"
        raise KeyError(self._unknown(chunk_id))

    def records(self) -> list[ChunkRecord]:
        """Records of every chunk held (RAM and disk), oldest first (by ``t_end``, then ``chunk_id``)."""
        return [record for record, _, _ in self._held()]

    def _held(self) -> list[tuple[ChunkRecord, int, str]]:
        """``(record, bytes, tier)`` of every chunk held, oldest first."""
        held = [(c.record, c.nbytes, "ram") for c in self._ram.values()]
        held += [(self._disk.record(pos), self._disk.nbytes(pos), "disk") for pos in range(len(self._disk))]
        return sorted(held, key=lambda entry: entry[0].age_key)

    @property
    def index_shape(self) -> tuple[int, ...] | None:
        """The shape every new index entry must have (that of the held chunks), or None while the store is empty."""
        return self._shape if self._shape is not None and len(self) else None

    def index_entry(self, chunk_id: int) -> torch.Tensor:
        """A copy of a held chunk's index entry as it was put (``[layers, (vectors,) kv_heads, head_dim]``), float32.

        A disk-tier chunk's entry is read from the disk-tier index file. KeyError if the store does not hold the chunk.
        """
        self._ensure_open()
        if chunk_id in self._ram:
            row = self._ram_index.row(chunk_id)
        else:
            pos = self._disk.find(chunk_id) if _is_int(chunk_id) else None
            if pos is None:
                raise KeyError(self._unknown(chunk_id))
            row = self._disk_index.read(self._disk.slot(pos))
        assert self._shape is not None
        return row.view(self._shape)

    def stats(self) -> StoreStats:
        """Current occupancy of both tiers, the index size and the running drop counters."""
        row_bytes = math.prod(self._shape) * 4 if self._shape is not None else 0
        return StoreStats(
            ram_bytes=self._ram_used,
            disk_bytes=self._disk_used,
            ram_chunks=len(self._ram),
            disk_chunks=len(self._disk),
            dropped_chunks=self._dropped_chunks,
            dropped_bytes=self._dropped_bytes,
            dropped_up_to_s=self._dropped_up_to,
            ram_quota=self._ram_quota,
            disk_quota=self._disk_quota,
            index_bytes=len(self) * row_bytes,
            index_ram_bytes=len(self._ram) * row_bytes,
        )

    def _unknown(self, chunk_id: object) -> str:
        return (
            f"chunk {chunk_id!r} is not in the long-term store (never stored, or dropped); "
            f"dropped memory reaches up to t={self._dropped_up_to} s - check `in store` or stats() first"
        )

    def _ensure_open(self) -> None:
        if self._closed:
            raise StreamVLMError("this LongTermStore is closed; create a new one (or LongTermStore.load a saved one)")

    # ------------------------------------------------------------------------------------------ put

    def put(
        self,
        record: ChunkRecord,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        index: torch.Tensor,
    ) -> list[StoreEvent]:
        """Store a chunk and return what happened to it and to any chunk it displaced.

        ``keys``/``values`` hold one ``[kv_heads, record.tokens, head_dim]`` float tensor per layer; they
        are copied to the CPU in their own dtype, so the caller may reuse its tensors. ``index`` is the
        chunk's ``[layers, kv_heads, head_dim]`` retrieval summary, or ``[layers, vectors, kv_heads, head_dim]``
        for several vectors (scored by the best of them), kept as float32; every chunk of a store has the same shape. Malformed input, an
        id already held or an int field outside the 64-bit range raises InputError and changes nothing.
        The events come in order: the new chunk ``"stored"`` (in RAM) or ``"spilled"`` (straight to disk)
        or ``"dropped"`` (too big for both), then every spill and drop it caused. Afterwards both tiers
        are within their quotas.
        """
        self._ensure_open()
        self._check_put(record, keys, values, index)
        keys = [_cpu_copy(k) for k in keys]
        values = [_cpu_copy(v) for v in values]
        chunk = _RamChunk(record, _tensor_bytes(keys) + _tensor_bytes(values), keys, values)
        row = index.detach().to("cpu", torch.float32).reshape(index.shape[0], -1)
        plan = self._plan(record, chunk.nbytes)
        slots = self._write_spills(plan.spill, chunk, row)
        self._shape = tuple(int(x) for x in index.shape)
        return self._commit(chunk, row, plan, slots)

    def _check_put(
        self, record: ChunkRecord, keys: list[torch.Tensor], values: list[torch.Tensor], index: torch.Tensor
    ) -> None:
        if not isinstance(record, ChunkRecord):
            raise InputError(f"record must be a ChunkRecord, got {type(record).__name__}")
        _check_int64(record)
        if record.chunk_id in self:
            raise InputError(f"chunk_id {record.chunk_id} is already in the store; give each chunk a new id")
        _check_kv(record, keys, values)
        _check_index(index, keys, self._expected_shape())

    def _expected_shape(self) -> torch.Size | None:
        """The index shape a new chunk must have: that of the held chunks (None when the store is empty)."""
        return torch.Size(self._shape) if self._shape is not None and len(self) else None

    def _plan(self, record: ChunkRecord, nbytes: int) -> _Plan:
        """Decide placement: new chunk into RAM, oldest RAM chunks to disk, oldest disk chunks dropped."""
        sizes = {cid: chunk.nbytes for cid, chunk in self._ram.items()}
        sizes[record.chunk_id] = nbytes
        plan = _Plan(new_in_ram=nbytes <= self._ram_quota, spill=[], drop_ram=[], drop_disk=[])
        incoming = self._ram_victims(record.age_key, nbytes, sizes) if plan.new_in_ram else [record.age_key]
        candidates: list[_AgeKey] = []
        for key in incoming:
            if self._disk_fits(sizes[key[1]]):
                candidates.append(key)
            else:
                plan.drop_ram.append(key[1])
        total = self._disk_used + sum(sizes[cid] for _, cid in candidates)
        spilled = set(candidates)
        if total > self._disk_quota:
            arriving = sorted((t_end, cid, sizes[cid]) for t_end, cid in candidates)
            for t_end, cid, size in heapq.merge(self._disk.ages(), arriving):
                if total <= self._disk_quota:
                    break
                total -= size
                if (t_end, cid) in spilled:
                    spilled.discard((t_end, cid))
                    plan.drop_ram.append(cid)
                else:
                    plan.drop_disk.append(cid)
        plan.spill = [key[1] for key in candidates if key in spilled]
        return plan

    def _ram_victims(self, new_key: _AgeKey, nbytes: int, sizes: dict[int, int]) -> list[_AgeKey]:
        """Oldest-first RAM chunks (the new one included) that must leave RAM to meet its quota."""
        victims: list[_AgeKey] = []
        total = self._ram_used + nbytes
        for key in sorted(self._ram_order + [new_key]):
            if total <= self._ram_quota:
                break
            victims.append(key)
            total -= sizes[key[1]]
        return victims

    def _disk_fits(self, nbytes: int) -> bool:
        return self._directory is not None and nbytes <= self._disk_quota

    def _spill_path(self, chunk_id: int) -> Path:
        if self._directory is None:  # unreachable: _disk_fits never places a chunk on disk without one
            raise StreamVLMError("the store has no directory for spill files")
        return self._directory / f"spill-{self._tag}-{chunk_id}.safetensors"

    def _write_spills(self, spill: list[int], new: _RamChunk, new_row: torch.Tensor) -> dict[int, int]:
        """Write the chunk file and index entry of every chunk the plan spills; return their index slots.

        On failure everything written is deleted again and the error re-raised.
        """
        slots: dict[int, int] = {}
        written: list[int] = []
        try:
            for cid in spill:
                chunk = new if cid == new.record.chunk_id else self._ram[cid]
                row = new_row if cid == new.record.chunk_id else self._ram_index.row(cid)
                written.append(cid)
                _write_chunk(self._spill_path(cid), chunk.record, chunk.keys, chunk.values)
                slots[cid] = self._disk_index.add(cid, row)
        except BaseException:
            for cid in written:
                self._spill_path(cid).unlink(missing_ok=True)
            for slot in slots.values():
                self._disk_index.release(slot)
            raise
        return slots

    def _commit(self, new: _RamChunk, row: torch.Tensor, plan: _Plan, slots: dict[int, int]) -> list[StoreEvent]:
        """Apply a plan whose files are already written; return the events in the order described in put."""
        record = new.record
        events: list[StoreEvent] = []
        if plan.new_in_ram:
            self._enter_ram(new, row)
            events.append(StoreEvent("stored", record.chunk_id, record.t_end, new.nbytes))
        for victim in plan.spill:
            chunk = self._leave_ram(victim) if victim in self._ram else new
            self._disk.insert(chunk.record, chunk.nbytes, slots[victim])
            self._disk_used += chunk.nbytes
            events.append(StoreEvent("spilled", victim, chunk.record.t_end, chunk.nbytes))
        for victim in plan.drop_ram:
            chunk = self._leave_ram(victim) if victim in self._ram else new
            events.append(self._count_drop(victim, chunk.record.t_end, chunk.nbytes))
        for victim in plan.drop_disk:
            events.append(self._drop_disk(victim))
        return events

    def _enter_ram(self, chunk: _RamChunk, row: torch.Tensor) -> None:
        self._ram[chunk.record.chunk_id] = chunk
        bisect.insort(self._ram_order, chunk.record.age_key)
        self._ram_used += chunk.nbytes
        mean = None
        if self._shape is not None and len(self._shape) == 4 and self._shape[1] > 1:
            mean = row.view(self._shape[0], self._shape[1], -1).mean(dim=1)
        self._ram_index.append(chunk.record.chunk_id, row, mean)

    def _leave_ram(self, chunk_id: int) -> _RamChunk:
        """Take a chunk, its age key and its index entry out of the RAM tier."""
        chunk = self._ram.pop(chunk_id)
        del self._ram_order[bisect.bisect_left(self._ram_order, chunk.record.age_key)]
        self._ram_used -= chunk.nbytes
        self._ram_index.remove(chunk_id)
        return chunk

    def _drop_disk(self, chunk_id: int) -> StoreEvent:
        """Delete a disk-tier chunk: its file, its row and its index entry."""
        pos = self._disk.find(chunk_id)
        assert pos is not None
        t_end, nbytes, slot = self._disk.record(pos).t_end, self._disk.nbytes(pos), self._disk.slot(pos)
        self._spill_path(chunk_id).unlink(missing_ok=True)
        self._disk.remove(pos)
        self._disk_index.release(slot)
        self._disk_used -= nbytes
        return self._count_drop(chunk_id, t_end, nbytes)

    def _count_drop(self, chunk_id: int, t_end: float, nbytes: int) -> StoreEvent:
        """Count a drop and return its event."""
        self._dropped_chunks += 1
        self._dropped_bytes += nbytes
        if self._dropped_up_to is None or t_end > self._dropped_up_to:
            self._dropped_up_to = t_end
        return StoreEvent("dropped", chunk_id, t_end, nbytes)

    # ------------------------------------------------------------------------------------------ get

    def get(self, chunk_id: int) -> tuple[ChunkRecord, list[torch.Tensor], list[torch.Tensor]]:
        """Return ``(record, keys, values)`` of a held chunk as CPU tensors in their stored dtype.

        The tensors are the caller's own copies. A spilled chunk is read from its file and stays on disk.
        An id the store does not hold raises KeyError (check ``chunk_id in store`` first); an unreadable
        spill file raises InputError naming it.
        """
        self._ensure_open()
        if chunk_id in self._ram:
            chunk = self._ram[chunk_id]
            return chunk.record, [k.clone() for k in chunk.keys], [v.clone() for v in chunk.values]
        pos = self._disk.find(chunk_id) if _is_int(chunk_id) else None
        if pos is not None:
            _, keys, values = _read_chunk(self._spill_path(chunk_id))
            return self._disk.record(pos), keys, values
        raise KeyError(self._unknown(chunk_id))

    # --------------------------------------------------------------------------------------- search

    def search(self, queries: torch.Tensor, top_k: int, *, near: float = 0.0) -> list[tuple[int, float]]:
        """Return up to ``top_k`` ``(chunk_id, score)`` pairs, best first (ties: smaller chunk_id first).

        ``queries`` is ``[layers, q_heads, n_q, head_dim]``: the question's position-free query vectors,
        with ``q_heads`` a multiple of the chunks' ``kv_heads``; query head ``h`` is matched against kv
        head ``h // (q_heads // kv_heads)`` (grouped-query attention).

        Score of a chunk in one layer: the mean over query heads and query tokens of
        ``q . index / sqrt(head_dim)`` - ReKV-style scoring of the chunk's mean key, on position-free keys
        as in LiveVLM, so the score does not depend on where the chunk sat in the stream. Across layers,
        each layer's scores are z-normalised over the chunks (with a single chunk its raw per-layer
        scores are used; a layer where all chunks tie contributes 0) and then averaged, so layers with
        large raw dot products do not dominate. One ranking serves all layers on purpose: a retrieved
        chunk is brought back with complete KV in every layer. Chunks are scored in chunk-id order
        whichever tier holds them; the disk tier's entries are read from its index file block by block.
        An empty store returns ``[]``.

        Entries of several vectors (``[layers, vectors, kv_heads, head_dim]``) score each vector so and keep
        the best per layer (ColBERT's max-sim). Past ``_RERANK`` (256) RAM-tier chunks, only the 256 that rank
        best by their mean vector are scored so (and z-normalised among themselves with the disk tier's); the
        others are not returned. ``near > 0`` (in the combined score's units, standard
        deviations): every chunk scoring at least ``best - near`` comes first, earliest ``t_start`` first
        (then smaller chunk_id), and the rest follow by score; "best first" then means that order.
        """
        self._ensure_open()
        if not _is_int(top_k) or top_k < 0:
            raise ConfigError(f"top_k must be an int >= 0, got {top_k!r}")
        if not _is_real(near) or not math.isfinite(near) or near < 0:
            raise ConfigError(f"near must be a finite number >= 0, got {near!r}")
        if not len(self) or top_k == 0:
            return []
        assert self._shape is not None
        layers, kv_heads, head_dim = self._shape[0], self._shape[-2], self._shape[-1]
        vectors = self._shape[1] if len(self._shape) == 4 else 1
        width = kv_heads * head_dim
        grouped = self._grouped_queries(queries, layers, kv_heads, head_dim)  # [layers, width, 1]
        id_parts: list[np.ndarray] = []
        parts: list[torch.Tensor] = []  # [chunks, layers] raw scores
        if self._ram:
            ram_ids, matrix = self._ram_index.view()
            ram_ids = np.asarray(ram_ids, dtype=np.int64)
            n = len(ram_ids)
            means = self._ram_index.mean_view()
            if means is not None and n > _RERANK:  # rank by the mean vector, then score the best candidates in full
                coarse = self._combine_layers(torch.bmm(means, grouped)[..., 0].T)
                pick = torch.topk(coarse, _RERANK).indices.sort().values
                ram_ids, matrix, n = ram_ids[pick.numpy()], matrix[:, pick], _RERANK
            id_parts.append(ram_ids)
            # One batched product over every vector of every chunk, then the best vector of each chunk.
            scores = torch.bmm(matrix.reshape(layers, n * vectors, width), grouped)[..., 0]
            parts.append(scores.view(layers, n, vectors).amax(dim=-1).T)
        for block_ids, rows in self._disk_index.blocks():
            id_parts.append(block_ids)
            # Elementwise, not bmm: a block is small, and bmm on it costs more in thread hand-offs than in work.
            each = (rows.view(-1, layers, vectors, width) * grouped[:, None, :, 0]).sum(dim=-1)
            parts.append(each.amax(dim=-1))
        ids = np.concatenate(id_parts)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        combined = self._combine_layers(torch.cat(parts)[torch.from_numpy(order)])
        k = min(int(top_k), len(ids))
        first: list[int] = []
        if near > 0:
            close = torch.nonzero(combined >= combined.max() - near).flatten().tolist()
            starts = self._t_starts(ids[close])
            first = [close[j] for j in sorted(range(len(close)), key=lambda j: (starts[j], int(ids[close[j]])))][:k]
        rest = k - len(first)
        ranked = list(first)
        if rest:
            taken = torch.zeros(len(ids), dtype=torch.bool)
            taken[first] = True
            open_scores = combined.masked_fill(taken, float("-inf"))
            kth = torch.topk(open_scores, rest).values[-1]
            candidates = torch.nonzero((open_scores >= kth) & ~taken).flatten().tolist()  # ties at the cut kept, then by id
            ranked += sorted(candidates, key=lambda i: (-float(combined[i]), int(ids[i])))[:rest]
        return [(int(ids[i]), float(combined[i])) for i in ranked]

    def _t_starts(self, chunk_ids: np.ndarray) -> list[float]:
        """``t_start`` of each held chunk of ``chunk_ids``, in that order."""
        out = []
        disk = self._disk._live()
        for chunk_id in chunk_ids.tolist():
            chunk = self._ram.get(chunk_id)
            if chunk is not None:
                out.append(chunk.record.t_start)
            else:
                out.append(float(disk["t_start"][np.flatnonzero(disk["chunk_id"] == chunk_id)[0]]))
        return out

    @staticmethod
    def _grouped_queries(queries: torch.Tensor, layers: int, kv_heads: int, head_dim: int) -> torch.Tensor:
        """``[layers, kv_heads * head_dim, 1]`` such that ``entries @ it`` is each layer's score.

        The score is linear in q: the query tokens are averaged, each kv head's group of query heads is
        summed, and the result is divided by ``q_heads * sqrt(head_dim)``.
        """
        if not isinstance(queries, torch.Tensor) or queries.dim() != 4 or not queries.is_floating_point():
            raise InputError("queries must be a float tensor [layers, q_heads, n_q, head_dim]")
        q_layers, q_heads, n_q, q_dim = queries.shape
        if q_layers != layers or q_dim != head_dim or n_q == 0 or q_heads == 0 or q_heads % kv_heads:
            raise InputError(
                f"queries shape {tuple(queries.shape)} does not fit the index: need layers={layers}, "
                f"head_dim={head_dim}, n_q >= 1 and q_heads a non-zero multiple of kv_heads={kv_heads}"
            )
        q = queries.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(q).all()):
            raise InputError("queries hold NaN or infinite values")
        grouped = q.mean(dim=2).reshape(layers, kv_heads, q_heads // kv_heads, head_dim).sum(dim=2)
        return grouped.reshape(layers, kv_heads * head_dim, 1) / (q_heads * math.sqrt(head_dim))

    @staticmethod
    def _combine_layers(scores: torch.Tensor) -> torch.Tensor:
        """Z-normalise each layer's column across chunks (when there are >= 2), then average layers."""
        if scores.shape[0] < 2:
            return scores.mean(dim=1)
        mean = scores.mean(dim=0, keepdim=True)
        std = scores.std(dim=0, unbiased=False, keepdim=True)
        flat = std <= 1e-12 * mean.abs().clamp_min(1.0)
        z = (scores - mean) / torch.where(flat, torch.ones_like(std), std)
        return torch.where(flat, torch.zeros_like(z), z).mean(dim=1)

    # ------------------------------------------------------------------------------------ save/load

    def save(self, directory: str | Path) -> Path:
        """Write every held chunk, the index, the records and the drop counters into ``directory``.

        Each chunk becomes ``chunk-<id>.safetensors``, the index ``index.safetensors`` (float32 entries),
        and ``manifest.json`` (written last, atomically) ties them together with a format version, the
        sha256 of every file and a seal over the manifest itself, so :meth:`load` refuses any changed
        byte. The directory is created if missing; files from an earlier save there that the new
        manifest no longer lists are removed. The store is unchanged and stays usable; :meth:`close` never deletes
        what was saved. Returns the directory. Restore with :meth:`load`.
        """
        self._ensure_open()
        target = Path(directory)
        if self._owned_directory and self._directory is not None and target.resolve() == self._directory.resolve():
            raise ConfigError(f"cannot save into the store's own temporary directory {target}; pick another")
        target.mkdir(parents=True, exist_ok=True)
        previous = self._previous_files(target)
        held = self._held()
        entries = [self._save_chunk(target, record, nbytes, tier) for record, nbytes, tier in held]
        index = {str(record.chunk_id): self.index_entry(record.chunk_id) for record, _, _ in held}
        _write_tensors(target / _INDEX_FILE, index)
        manifest = {
            "format": _FORMAT_NAME,
            "version": FORMAT_VERSION,
            "index_file": _INDEX_FILE,
            "index_sha256": file_sha256(target / _INDEX_FILE, sync=True),
            "ram_quota": self._ram_quota,
            "disk_quota": self._disk_quota,
            "dropped_chunks": self._dropped_chunks,
            "dropped_bytes": self._dropped_bytes,
            "dropped_up_to_s": self._dropped_up_to,
            "chunks": entries,
        }
        _write_text(target / MANIFEST_NAME, json.dumps(seal(manifest), indent=1))
        for name in previous - {e["file"] for e in entries}:
            (target / name).unlink(missing_ok=True)
        return target

    @staticmethod
    def _previous_files(target: Path) -> set[str]:
        """Chunk file names listed by a manifest already in ``target`` (empty if none or unreadable)."""
        try:
            old = json.loads((target / MANIFEST_NAME).read_text())
            return {Path(e["file"]).name for e in old["chunks"]}
        except (OSError, ValueError, KeyError, TypeError):
            return set()

    def _save_chunk(self, target: Path, record: ChunkRecord, nbytes: int, tier: str) -> dict[str, Any]:
        name = f"chunk-{record.chunk_id}.safetensors"
        if tier == "ram":
            chunk = self._ram[record.chunk_id]
            _write_chunk(target / name, record, chunk.keys, chunk.values)
        else:
            tmp = target / (name + ".tmp")
            shutil.copyfile(self._spill_path(record.chunk_id), tmp)
            os.replace(tmp, target / name)
        digest = file_sha256(target / name, sync=True)
        return {"record": record.to_dict(), "bytes": nbytes, "file": name, "tier": tier, "sha256": digest}

    @classmethod
    def load(
        cls,
        directory: str | Path,
        ram_bytes: int,
        disk_bytes: int,
        *,
        spill_directory: str | Path | None = None,
    ) -> LongTermStore:
        """Restore a store written by :meth:`save`, under new quotas.

        Chunks are placed newest first: into RAM while they fit its quota, else onto disk (files copied
        into ``spill_directory`` or a fresh temporary directory), else dropped - such drops are counted in
        :meth:`stats` and listed in ``load_events``. A missing or malformed manifest, a manifest or file
        whose checksum differs (any changed byte), or a missing, truncated or inconsistent chunk or
        index file raises InputError naming the file; the saved directory itself is never modified.
        """
        source = Path(directory)
        manifest = _read_manifest(source / MANIFEST_NAME)
        check_file(source / manifest["index_file"], manifest["index_sha256"])
        index = _read_index(source / manifest["index_file"])
        store = cls(ram_bytes, disk_bytes, spill_directory)
        try:
            store._restore(source, manifest, index)
        except BaseException:
            store.close()
            raise
        return store

    def _restore(self, source: Path, manifest: dict[str, Any], index: dict[str, torch.Tensor]) -> None:
        entries = [_parse_entry(source / MANIFEST_NAME, e) for e in manifest["chunks"]]
        self._dropped_chunks = _manifest_int(manifest, "dropped_chunks")
        self._dropped_bytes = _manifest_int(manifest, "dropped_bytes")
        up_to = manifest.get("dropped_up_to_s")
        self._dropped_up_to = float(up_to) if _is_real(up_to) else None
        events: list[StoreEvent] = []
        index_path = source / manifest["index_file"]
        seen: set[int] = set()
        on_disk: list[tuple[ChunkRecord, int, int]] = []
        for record, nbytes, name, digest in sorted(entries, key=lambda e: e[0].age_key, reverse=True):
            if record.chunk_id in seen:
                raise InputError(f"{source / MANIFEST_NAME} lists chunk {record.chunk_id} twice")
            seen.add(record.chunk_id)
            if str(record.chunk_id) not in index:
                raise InputError(f"{index_path} has no index entry for chunk {record.chunk_id}")
            summary = index[str(record.chunk_id)]
            if nbytes <= self._ram_quota - self._ram_used:
                self._restore_chunk(source / name, digest, record, nbytes, summary, index_path, to_ram=True)
            elif self._disk_fits(nbytes + self._disk_used):
                slot = self._restore_chunk(source / name, digest, record, nbytes, summary, index_path, to_ram=False)
                on_disk.append((record, nbytes, slot))
            else:
                events.append(self._count_drop(record.chunk_id, record.t_end, nbytes))
        for record, nbytes, slot in reversed(on_disk):  # oldest first, so every row is appended
            self._disk.insert(record, nbytes, slot)
        self.load_events = tuple(events)

    def _restore_chunk(
        self, path: Path, digest: str, record: ChunkRecord, nbytes: int, index: torch.Tensor, index_path: Path, *, to_ram: bool
    ) -> int:
        """Verify one saved chunk file (checksum, then content) and place it in RAM or copy it into this store's disk tier.

        Returns the disk-index slot of a disk-tier chunk (-1 for RAM); its row is added by the caller.
        """
        check_file(path, digest)
        saved, keys, values = _read_chunk(path)
        if saved != record or _tensor_bytes(keys) + _tensor_bytes(values) != nbytes:
            raise InputError(f"chunk file {path} does not match its manifest entry (record or byte size differ)")
        try:  # the store is fresh while it loads: every placed chunk so far set the shape
            _check_index(index, keys, torch.Size(self._shape) if self._shape is not None else None)
        except InputError as exc:
            raise InputError(f"{index_path}, chunk {record.chunk_id}: {exc}") from exc
        row = index.to(torch.float32).reshape(index.shape[0], -1)
        self._shape = tuple(int(x) for x in index.shape)
        if to_ram:
            self._enter_ram(_RamChunk(record, nbytes, keys, values), row)
            return -1
        shutil.copyfile(path, self._spill_path(record.chunk_id))
        self._disk_used += nbytes
        return self._disk_index.add(record.chunk_id, row)

    # ----------------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Delete the spill files and disk-tier index file this store wrote (and its temporary directory); safe to call twice.

        Directories given to :meth:`save` are never touched. Afterwards every operation except
        :meth:`close`, :meth:`stats`, ``len`` and ``in`` raises StreamVLMError.
        """
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        self._ram.clear()
        self._ram_order.clear()
        self._ram_index = _IndexMatrix()
        self._disk.clear()
        self._ram_used = self._disk_used = 0

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def __enter__(self) -> LongTermStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"LongTermStore(ram={s.ram_bytes}/{s.ram_quota} B in {s.ram_chunks}, "
            f"disk={s.disk_bytes}/{s.disk_quota} B in {s.disk_chunks}, dropped={s.dropped_chunks}"
            f"{', closed' if self._closed else ''})"
        )


# ------------------------------------------------------------------------------------ saved layout


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": _FORMAT_NAME, "version": str(FORMAT_VERSION)})
    os.replace(tmp, path)


def _read_manifest(path: Path) -> dict[str, Any]:
    """Parse and check the manifest; anything missing or malformed raises InputError naming it."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"store manifest {path} is missing or not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT_NAME:
        raise InputError(f"{path} is not a streamvlm long-term store manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise InputError(
            f"{path} has format version {manifest.get('version')!r}; this streamvlm reads {FORMAT_VERSION}"
        )
    if not isinstance(manifest.get("chunks"), list) or not isinstance(manifest.get("index_file"), str):
        raise InputError(f"store manifest {path} lacks its 'chunks' list or 'index_file'")
    if Path(manifest["index_file"]).name != manifest["index_file"]:
        raise InputError(f"store manifest {path} names an index file outside its directory")
    if not _is_sha256(manifest.get("index_sha256")):
        raise InputError(f"store manifest {path} lacks the index file's checksum ('index_sha256')")
    for key in ("ram_quota", "disk_quota"):
        _manifest_int(manifest, key)
    up_to = manifest.get("dropped_up_to_s")
    if up_to is not None and (not _is_real(up_to) or not math.isfinite(up_to)):
        raise InputError(f"store manifest {path}: 'dropped_up_to_s' must be a finite number or null, got {up_to!r}")
    check_seal(path, manifest)
    return manifest


def _manifest_int(manifest: dict[str, Any], key: str) -> int:
    value = manifest.get(key, 0)
    if not _is_int(value) or value < 0:
        raise InputError(f"store manifest field {key!r} must be an int >= 0, got {value!r}")
    return int(value)


def _parse_entry(path: Path, entry: object) -> tuple[ChunkRecord, int, str, str]:
    """``(record, bytes, file name, sha256)`` of one manifest chunk entry; InputError naming the manifest if bad."""
    try:
        record = ChunkRecord.from_dict(entry["record"])  # type: ignore[index]
        nbytes, name, digest = entry["bytes"], entry["file"], entry["sha256"]  # type: ignore[index]
    except (KeyError, TypeError, InputError) as exc:
        raise InputError(f"store manifest {path} has a malformed chunk entry: {exc}") from exc
    if not _is_int(nbytes) or nbytes < 0 or not isinstance(name, str) or Path(name).name != name or not _is_sha256(digest):
        raise InputError(f"store manifest {path}: chunk {record.chunk_id} has a bad 'bytes', 'file' or 'sha256'")
    try:
        _check_int64(record)
    except InputError as exc:
        raise InputError(f"store manifest {path}: {exc}") from exc
    return record, int(nbytes), name, digest


def _read_index(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError, ValueError) as exc:
        raise InputError(f"store index file {path} is missing, truncated or malformed: {exc}") from exc


# ---------------------------------------------------------------------------------------- checksums

_SEAL_KEY = "sha256"
_HASH_BLOCK = 1 << 20


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def file_sha256(path: str | Path, *, sync: bool = False) -> str:
    """The hex sha256 of the file at ``path``, read in blocks; with ``sync`` its data is also flushed to disk.

    Raises OSError if the file cannot be read (callers that load turn that into InputError).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def check_file(path: Path, sha256: str) -> None:
    """Raise InputError naming ``path`` unless it exists and its bytes hash to ``sha256``."""
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise InputError(f"{path} is missing or unreadable: {exc}") from exc
    if actual != sha256:
        raise InputError(f"{path} is damaged: its sha256 differs from the one its manifest recorded at save")


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``manifest`` plus a ``sha256`` field over the rest of it (canonical JSON); :func:`check_seal` verifies it.

    Write the result as JSON; a manifest read back and checked cannot have changed in any byte that matters.
    """
    body = {k: v for k, v in manifest.items() if k != _SEAL_KEY}
    return {**body, _SEAL_KEY: hashlib.sha256(_canonical(body)).hexdigest()}


def check_seal(path: Path, manifest: Mapping[str, Any]) -> None:
    """Raise InputError naming ``path`` unless ``manifest`` carries a seal that matches the rest of it."""
    body = {k: v for k, v in manifest.items() if k != _SEAL_KEY}
    if not _is_sha256(manifest.get(_SEAL_KEY)):
        raise InputError(f"{path} lacks its checksum ('{_SEAL_KEY}'): it was not written by this streamvlm")
    if hashlib.sha256(_canonical(body)).hexdigest() != manifest[_SEAL_KEY]:
        raise InputError(f"{path} is damaged or was edited: its content differs from its checksum ('{_SEAL_KEY}')")
