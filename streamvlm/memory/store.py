"""Long-term store: where chunks of KV cache go once they leave working memory.

A *chunk* is a run of tokens (one frame's visual tokens, or a piece of text) whose keys and values were
evicted from the model's working KV cache. The store keeps them so a later question can bring the
relevant ones back. It has two tiers and a small index:

* **RAM tier** - chunks kept as CPU tensors, at most ``ram_bytes`` of keys and values in all.
* **Disk tier** - chunks written as one safetensors file each (tensors plus the chunk's record as JSON
  metadata), at most ``disk_bytes`` in all. The files live in the ``directory`` given to the store, or in
  a fresh temporary directory the store creates and removes again on :meth:`LongTermStore.close`.
* **Index** - one small position-free summary per chunk (typically the mean key per layer and kv head),
  held in RAM for every chunk in either tier. It is what :meth:`LongTermStore.search` scores; it is not
  counted against either quota (see ``StoreStats.index_bytes``).

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
    stream. Layers are then combined - each layer's scores z-normalised across chunks and averaged - so
    one set of chunks is chosen for all layers and every retrieved chunk comes back with complete KV in
    every layer.

The store is not thread-safe: call it from one thread, or guard it with a lock.
"""

from __future__ import annotations

import bisect
import json
import math
import numbers
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from streamvlm.errors import ConfigError, InputError, StreamVLMError

__all__ = ["ChunkRecord", "StoreEvent", "StoreStats", "LongTermStore", "MANIFEST_NAME", "FORMAT_VERSION"]

MANIFEST_NAME = "manifest.json"
"""Name of the JSON manifest :meth:`LongTermStore.save` writes and :meth:`LongTermStore.load` reads."""

FORMAT_VERSION = 1
"""Version of the saved-store layout; :meth:`LongTermStore.load` refuses any other."""

_FORMAT_NAME = "streamvlm.longterm-store"
_CHUNK_FORMAT = "streamvlm.kv-chunk"
_INDEX_FILE = "index.safetensors"
_KINDS = ("frame", "text")
_AgeKey = tuple[float, int]


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
    """A snapshot of the store's occupancy and its drop counters. All sizes are in bytes."""

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
    """Raise InputError unless ``index`` is a finite float ``[layers, kv_heads, head_dim]`` tensor."""
    want = torch.Size((len(keys), keys[0].shape[0], keys[0].shape[2]))
    if not isinstance(index, torch.Tensor) or not index.is_floating_point() or index.shape != want:
        shape = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
        raise InputError(
            f"index must be a float tensor of shape {tuple(want)} (layers, kv_heads, head_dim), got {shape}"
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


def _cleanup(directory: Path | None, owned: bool, files: dict[int, Path], created: bool) -> None:
    """Delete the spill files a store wrote and, where the store made its directory, the directory."""
    for path in list(files.values()):
        path.unlink(missing_ok=True)
    files.clear()
    if directory is None:
        return
    if owned:
        shutil.rmtree(directory, ignore_errors=True)
    elif created:
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


class _IndexMatrix:
    """Index entries as one layer-major float32 matrix ``[layers, capacity, kv_heads * head_dim]``.

    Appends are amortised O(1) (the capacity doubles); a removal shifts the entries after it (drops
    are rare). Searching reads it in place, so a question costs one batched matrix-vector product.
    """

    def __init__(self) -> None:
        self.ids: list[int] = []
        self._buf: torch.Tensor | None = None

    def append(self, chunk_id: int, index: torch.Tensor) -> None:
        row = index.detach().to("cpu", torch.float32).reshape(index.shape[0], -1)
        n = len(self.ids)
        if self._buf is None or n == self._buf.shape[1]:
            grown = torch.empty(row.shape[0], max(16, 2 * n), row.shape[1])
            if self._buf is not None:
                grown[:, :n] = self._buf[:, :n]
            self._buf = grown
        self._buf[:, n] = row
        self.ids.append(chunk_id)

    def remove(self, chunk_id: int) -> None:
        pos = self.ids.index(chunk_id)
        n = len(self.ids)
        assert self._buf is not None
        self._buf[:, pos : n - 1] = self._buf[:, pos + 1 : n].clone()
        self.ids.pop(pos)

    def view(self) -> tuple[list[int], torch.Tensor]:
        assert self._buf is not None
        return self.ids, self._buf[:, : len(self.ids)]


class LongTermStore:
    """Two-tier (RAM, then disk) store of evicted KV chunks with a RAM index for retrieval.

    ``ram_bytes`` and ``disk_bytes`` are the tiers' quotas in bytes (``>= 0``, else ConfigError). Spill
    files go to ``directory`` (created if missing); with ``disk_bytes > 0`` and no directory the store makes
    a fresh temporary one that it owns. Call :meth:`close` (or use ``with``) to delete what the store wrote.
    See the module docstring for the placement rules. ``load_events`` lists the drops :meth:`load` made
    when saved chunks did not fit the new quotas (empty for a store built directly).
    """

    def __init__(self, ram_bytes: int, disk_bytes: int, directory: str | Path | None = None) -> None:
        self._ram_quota = _quota("ram_bytes", ram_bytes)
        self._disk_quota = _quota("disk_bytes", disk_bytes)
        self._records: dict[int, ChunkRecord] = {}
        self._nbytes: dict[int, int] = {}
        self._index: dict[int, torch.Tensor] = {}
        self._ram: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._disk: dict[int, Path] = {}
        self._ram_order: list[_AgeKey] = []
        self._disk_order: list[_AgeKey] = []
        self._ram_used = 0
        self._disk_used = 0
        self._index_used = 0
        self._dropped_chunks = 0
        self._dropped_bytes = 0
        self._dropped_up_to: float | None = None
        self._matrix = _IndexMatrix()  # the same entries, layer-major, for fast search
        self._closed = False
        self._tag = uuid.uuid4().hex[:8]
        self.load_events: tuple[StoreEvent, ...] = ()
        self._directory, owned, created = self._open_directory(directory)
        self._owned_directory = owned
        self._finalizer = weakref.finalize(self, _cleanup, self._directory, owned, self._disk, created)

    def _open_directory(self, directory: str | Path | None) -> tuple[Path | None, bool, bool]:
        if directory is not None:
            path = Path(directory)
            if path.exists() and not path.is_dir():
                raise ConfigError(f"directory {path} exists and is not a directory")
            created = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
            return path, False, created
        if self._disk_quota > 0:
            return Path(tempfile.mkdtemp(prefix="streamvlm-store-")), True, True
        return None, False, False

    # ------------------------------------------------------------------------------------ queries

    @property
    def directory(self) -> Path | None:
        """Where spill files are written (None when the store has no disk tier)."""
        return self._directory

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._records

    def where(self, chunk_id: int) -> str:
        """``"ram"`` or ``"disk"``: the tier holding ``chunk_id``; KeyError if the store does not hold it."""
        if chunk_id in self._ram:
            return "ram"
        if chunk_id in self._disk:
            return "disk"
        raise KeyError(self._unknown(chunk_id))

    def records(self) -> list[ChunkRecord]:
        """Records of every chunk held (RAM and disk), oldest first (by ``t_end``, then ``chunk_id``)."""
        return [self._records[cid] for _, cid in sorted(self._ram_order + self._disk_order)]

    def stats(self) -> StoreStats:
        """Current occupancy of both tiers, the index size and the running drop counters."""
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
            index_bytes=self._index_used,
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
        chunk's ``[layers, kv_heads, head_dim]`` retrieval summary. Malformed input or an id already held
        raises InputError and changes nothing. The events come in order: the new chunk ``"stored"`` (in
        RAM) or ``"spilled"`` (straight to disk) or ``"dropped"`` (too big for both), then every spill and
        drop it caused. Afterwards both tiers are within their quotas.
        """
        self._ensure_open()
        self._check_put(record, keys, values, index)
        keys = [_cpu_copy(k) for k in keys]
        values = [_cpu_copy(v) for v in values]
        nbytes = _tensor_bytes(keys) + _tensor_bytes(values)
        plan = self._plan(record, nbytes)
        pending = {record.chunk_id: (keys, values)}
        written = self._write_spills(plan.spill, record, pending)
        return self._commit(record, nbytes, _cpu_copy(index), plan, pending, written)

    def _check_put(
        self, record: ChunkRecord, keys: list[torch.Tensor], values: list[torch.Tensor], index: torch.Tensor
    ) -> None:
        if not isinstance(record, ChunkRecord):
            raise InputError(f"record must be a ChunkRecord, got {type(record).__name__}")
        if record.chunk_id in self._records:
            raise InputError(f"chunk_id {record.chunk_id} is already in the store; give each chunk a new id")
        _check_kv(record, keys, values)
        expected = next(iter(self._index.values())).shape if self._index else None
        _check_index(index, keys, expected)

    def _plan(self, record: ChunkRecord, nbytes: int) -> _Plan:
        """Decide placement: new chunk into RAM, oldest RAM chunks to disk, oldest disk chunks dropped."""
        sizes = {cid: self._nbytes[cid] for _, cid in self._ram_order}
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
        for key in sorted(self._disk_order + candidates):
            if total <= self._disk_quota:
                break
            if key in spilled:
                total -= sizes[key[1]]
                spilled.discard(key)
                plan.drop_ram.append(key[1])
            else:
                total -= self._nbytes[key[1]]
                plan.drop_disk.append(key[1])
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

    def _write_spills(
        self, spill: list[int], record: ChunkRecord, pending: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]
    ) -> dict[int, Path]:
        """Write every chunk the plan spills; on failure delete what was written and re-raise."""
        written: dict[int, Path] = {}
        try:
            for cid in spill:
                keys, values = pending[cid] if cid in pending else self._ram[cid]
                path = self._spill_path(cid)
                _write_chunk(path, record if cid == record.chunk_id else self._records[cid], keys, values)
                written[cid] = path
        except BaseException:
            for path in written.values():
                path.unlink(missing_ok=True)
            raise
        return written

    def _commit(
        self,
        record: ChunkRecord,
        nbytes: int,
        index: torch.Tensor,
        plan: _Plan,
        pending: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]],
        written: dict[int, Path],
    ) -> list[StoreEvent]:
        """Apply a plan whose files are already written; return the events in the order described in put."""
        cid = record.chunk_id
        self._add(record, nbytes, index)
        events: list[StoreEvent] = []
        if plan.new_in_ram:
            self._ram[cid] = pending[cid]
            bisect.insort(self._ram_order, record.age_key)
            self._ram_used += nbytes
            events.append(StoreEvent("stored", cid, record.t_end, nbytes))
        for victim in plan.spill:
            self._forget_ram(victim)
            self._disk[victim] = written[victim]
            bisect.insort(self._disk_order, self._records[victim].age_key)
            self._disk_used += self._nbytes[victim]
            events.append(self._event("spilled", victim))
        for victim in plan.drop_ram:
            self._forget_ram(victim)
            events.append(self._drop(victim))
        for victim in plan.drop_disk:
            self._disk.pop(victim).unlink(missing_ok=True)
            self._remove_key(self._disk_order, self._records[victim].age_key)
            self._disk_used -= self._nbytes[victim]
            events.append(self._drop(victim))
        return events

    def _add(self, record: ChunkRecord, nbytes: int, index: torch.Tensor) -> None:
        self._records[record.chunk_id] = record
        self._nbytes[record.chunk_id] = nbytes
        self._index[record.chunk_id] = index
        self._index_used += index.numel() * index.element_size()
        self._matrix.append(record.chunk_id, index)

    def _forget_ram(self, chunk_id: int) -> None:
        """Remove a chunk's tensors from the RAM tier (no-op for a new chunk that never entered it)."""
        if self._ram.pop(chunk_id, None) is not None:
            self._remove_key(self._ram_order, self._records[chunk_id].age_key)
            self._ram_used -= self._nbytes[chunk_id]

    @staticmethod
    def _remove_key(order: list[_AgeKey], key: _AgeKey) -> None:
        del order[bisect.bisect_left(order, key)]

    def _event(self, kind: str, chunk_id: int) -> StoreEvent:
        return StoreEvent(kind, chunk_id, self._records[chunk_id].t_end, self._nbytes[chunk_id])

    def _drop(self, chunk_id: int) -> StoreEvent:
        """Forget a chunk's record and index entry, count the drop, and return its event."""
        event = self._event("dropped", chunk_id)
        del self._records[chunk_id]
        del self._nbytes[chunk_id]
        index = self._index.pop(chunk_id)
        self._index_used -= index.numel() * index.element_size()
        self._matrix.remove(chunk_id)
        self._dropped_chunks += 1
        self._dropped_bytes += event.bytes
        if self._dropped_up_to is None or event.t_end > self._dropped_up_to:
            self._dropped_up_to = event.t_end
        return event

    # ------------------------------------------------------------------------------------------ get

    def get(self, chunk_id: int) -> tuple[ChunkRecord, list[torch.Tensor], list[torch.Tensor]]:
        """Return ``(record, keys, values)`` of a held chunk as CPU tensors in their stored dtype.

        The tensors are the caller's own copies. A spilled chunk is read from its file and stays on disk.
        An id the store does not hold raises KeyError (check ``chunk_id in store`` first); an unreadable
        spill file raises InputError naming it.
        """
        self._ensure_open()
        if chunk_id in self._ram:
            keys, values = self._ram[chunk_id]
            return self._records[chunk_id], [k.clone() for k in keys], [v.clone() for v in values]
        if chunk_id in self._disk:
            _, keys, values = _read_chunk(self._disk[chunk_id])
            return self._records[chunk_id], keys, values
        raise KeyError(self._unknown(chunk_id))

    # --------------------------------------------------------------------------------------- search

    def search(self, queries: torch.Tensor, top_k: int) -> list[tuple[int, float]]:
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
        chunk is brought back with complete KV in every layer. An empty store returns ``[]``.
        """
        self._ensure_open()
        if not _is_int(top_k) or top_k < 0:
            raise ConfigError(f"top_k must be an int >= 0, got {top_k!r}")
        if not self._index or top_k == 0:
            return []
        ids, matrix = self._matrix.view()
        scores = self._layer_scores(queries, matrix, self._kv_heads())
        combined = self._combine_layers(scores)
        k = min(int(top_k), len(ids))
        kth = torch.topk(combined, k).values[-1]
        candidates = torch.nonzero(combined >= kth).flatten().tolist()  # ties at the cut are kept, then ordered by id
        ranked = sorted(candidates, key=lambda i: (-float(combined[i]), ids[i]))[:k]
        return [(ids[i], float(combined[i])) for i in ranked]

    def _kv_heads(self) -> int:
        return int(next(iter(self._index.values())).shape[1])

    @staticmethod
    def _layer_scores(queries: torch.Tensor, matrix: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """``[chunks, layers]``: mean over query heads and tokens of ``q . index / sqrt(head_dim)``.

        ``matrix`` is the index, layer-major: ``[layers, chunks, kv_heads * head_dim]``.
        """
        layers, _, width = matrix.shape
        head_dim = width // kv_heads
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
        # The score is linear in q: average the tokens, then sum each kv head's group of query heads.
        grouped = q.mean(dim=2).reshape(layers, kv_heads, q_heads // kv_heads, head_dim).sum(dim=2).reshape(layers, width, 1)
        return torch.bmm(matrix, grouped)[..., 0].T / (q_heads * math.sqrt(head_dim))

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

        Each chunk becomes ``chunk-<id>.safetensors``, the index ``index.safetensors``, and
        ``manifest.json`` (written last, atomically) ties them together with a format version. The
        directory is created if missing; files from an earlier save there that the new manifest no
        longer lists are removed. The store is unchanged and stays usable; :meth:`close` never deletes
        what was saved. Returns the directory. Restore with :meth:`load`.
        """
        self._ensure_open()
        target = Path(directory)
        if self._owned_directory and self._directory is not None and target.resolve() == self._directory.resolve():
            raise ConfigError(f"cannot save into the store's own temporary directory {target}; pick another")
        target.mkdir(parents=True, exist_ok=True)
        previous = self._previous_files(target)
        entries = [self._save_chunk(target, cid) for _, cid in sorted(self._ram_order + self._disk_order)]
        index = {str(cid): t for cid, t in self._index.items()}
        _write_tensors(target / _INDEX_FILE, index)
        manifest = {
            "format": _FORMAT_NAME,
            "version": FORMAT_VERSION,
            "index_file": _INDEX_FILE,
            "ram_quota": self._ram_quota,
            "disk_quota": self._disk_quota,
            "dropped_chunks": self._dropped_chunks,
            "dropped_bytes": self._dropped_bytes,
            "dropped_up_to_s": self._dropped_up_to,
            "chunks": entries,
        }
        _write_text(target / MANIFEST_NAME, json.dumps(manifest, indent=1))
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

    def _save_chunk(self, target: Path, chunk_id: int) -> dict[str, Any]:
        name = f"chunk-{chunk_id}.safetensors"
        record = self._records[chunk_id]
        if chunk_id in self._ram:
            keys, values = self._ram[chunk_id]
            _write_chunk(target / name, record, keys, values)
            tier = "ram"
        else:
            tmp = target / (name + ".tmp")
            shutil.copyfile(self._disk[chunk_id], tmp)
            os.replace(tmp, target / name)
            tier = "disk"
        return {"record": record.to_dict(), "bytes": self._nbytes[chunk_id], "file": name, "tier": tier}

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
        :meth:`stats` and listed in ``load_events``. A missing or malformed manifest, or a missing,
        truncated or inconsistent chunk or index file, raises InputError naming the file; the saved
        directory itself is never modified.
        """
        source = Path(directory)
        manifest = _read_manifest(source / MANIFEST_NAME)
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
        for record, nbytes, name in sorted(entries, key=lambda e: e[0].age_key, reverse=True):
            if record.chunk_id in self._records:
                raise InputError(f"{source / MANIFEST_NAME} lists chunk {record.chunk_id} twice")
            if str(record.chunk_id) not in index:
                raise InputError(f"{index_path} has no index entry for chunk {record.chunk_id}")
            summary = index[str(record.chunk_id)]
            if nbytes <= self._ram_quota - self._ram_used:
                self._restore_chunk(source / name, record, nbytes, summary, index_path, to_ram=True)
            elif self._disk_fits(nbytes + self._disk_used):
                self._restore_chunk(source / name, record, nbytes, summary, index_path, to_ram=False)
            else:
                self._add(record, nbytes, summary)
                events.append(self._drop(record.chunk_id))
        self.load_events = tuple(events)

    def _restore_chunk(
        self, path: Path, record: ChunkRecord, nbytes: int, index: torch.Tensor, index_path: Path, *, to_ram: bool
    ) -> None:
        """Validate one saved chunk file and place it in RAM or copy it into this store's disk tier."""
        saved, keys, values = _read_chunk(path)
        if saved != record or _tensor_bytes(keys) + _tensor_bytes(values) != nbytes:
            raise InputError(f"chunk file {path} does not match its manifest entry (record or byte size differ)")
        expected = next(iter(self._index.values())).shape if self._index else None
        try:
            _check_index(index, keys, expected)
        except InputError as exc:
            raise InputError(f"{index_path}, chunk {record.chunk_id}: {exc}") from exc
        self._add(record, nbytes, index)
        if to_ram:
            self._ram[record.chunk_id] = (keys, values)
            bisect.insort(self._ram_order, record.age_key)
            self._ram_used += nbytes
            return
        target = self._spill_path(record.chunk_id)
        shutil.copyfile(path, target)
        self._disk[record.chunk_id] = target
        bisect.insort(self._disk_order, record.age_key)
        self._disk_used += nbytes

    # ----------------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Delete the spill files this store wrote (and its temporary directory); safe to call twice.

        Directories given to :meth:`save` are never touched. Afterwards every operation except
        :meth:`close`, :meth:`stats`, ``len`` and ``in`` raises StreamVLMError.
        """
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        self._records.clear()
        self._ram.clear()
        self._index.clear()
        self._nbytes.clear()
        self._ram_order.clear()
        self._disk_order.clear()
        self._ram_used = self._disk_used = self._index_used = 0
        self._matrix = _IndexMatrix()

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
    return manifest


def _manifest_int(manifest: dict[str, Any], key: str) -> int:
    value = manifest.get(key, 0)
    if not _is_int(value) or value < 0:
        raise InputError(f"store manifest field {key!r} must be an int >= 0, got {value!r}")
    return int(value)


def _parse_entry(path: Path, entry: object) -> tuple[ChunkRecord, int, str]:
    """``(record, bytes, file name)`` of one manifest chunk entry; InputError naming the manifest if bad."""
    try:
        record = ChunkRecord.from_dict(entry["record"])  # type: ignore[index]
        nbytes, name = entry["bytes"], entry["file"]  # type: ignore[index]
    except (KeyError, TypeError, InputError) as exc:
        raise InputError(f"store manifest {path} has a malformed chunk entry: {exc}") from exc
    if not _is_int(nbytes) or nbytes < 0 or not isinstance(name, str) or Path(name).name != name:
        raise InputError(f"store manifest {path}: chunk {record.chunk_id} has a bad 'bytes' or 'file'")
    return record, int(nbytes), name


def _read_index(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError, ValueError) as exc:
        raise InputError(f"store index file {path} is missing, truncated or malformed: {exc}") from exc
