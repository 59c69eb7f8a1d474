"""Snapshots: a session's working memory, long-term store and dialogue saved to a directory and loaded back.

Layout of a snapshot directory::

    manifest.json        format and version, model fingerprint, configs, runner state, ledger,
                         the size and sha256 of every other file, and a seal (sha256) over itself
    cache.safetensors    every layer's keys and values, and each working chunk's positions
    store/               the long-term store of a bounded session (see ``LongTermStore.save``; its own
                         manifest lists the sha256 of each chunk file and of the index)

Saving is atomic: everything is written into a fresh sibling directory, flushed, and renamed into place,
so ``path`` holds either the previous snapshot or the new one, never a mix. (If the process dies between
moving the old snapshot aside and moving the new one in, ``path`` is missing and the previous snapshot
waits beside it as ``.NAME.old-*``; :func:`load_session` says so.)

Loading refuses damage before anything is built: a manifest that is not JSON, lacks a field, holds a
value of the wrong type or range, or whose seal differs; another model (family, vocabulary, config
hash); a file that is missing or whose bytes differ from the checksum recorded at save; a tensor
missing, extra, or of the wrong dtype or shape; books (ledger, runner, store) that disagree with each
other. Each raises :class:`~streamvlm.errors.InputError` naming the path and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..config import MemoryConfig, SamplingConfig, SessionConfig
from ..errors import ConfigError, InputError
from ..memory import cache as kv
from ..memory.ledger import DROPPED, STORE, WORKING, Chunk, Ledger
from ..memory.store import check_file, check_seal, file_sha256, seal

if TYPE_CHECKING:
    from ..models.base import ModelAdapter
    from .session import StreamSession

__all__ = ["save_session", "load_session", "FORMAT", "VERSION"]

FORMAT, VERSION = "streamvlm-session", 2
"""Version 2 added the ``files`` checksums and the manifest's seal; version 1 snapshots are refused."""

MANIFEST, CACHE, STORE_DIR = "manifest.json", "cache.safetensors", "store"
_STORE_MANIFEST = f"{STORE_DIR}/manifest.json"
# What an earlier save may have left in a directory that a new save may replace.
_SNAPSHOT_ENTRIES = frozenset({MANIFEST, MANIFEST + ".tmp", CACHE, STORE_DIR})
_KINDS = ("system", "frame", "question", "answer")
_TIERS = (WORKING, STORE, "merged", DROPPED)
_TOP_KEYS = frozenset({
    "format", "version", "model", "model_source", "session_config", "memory_config", "layers",
    "runner", "last_t", "ledger", "compactions", "files", "sha256",
})


def fingerprint(adapter: ModelAdapter) -> dict:
    """What identifies a model for a snapshot: its family, vocabulary and a hash of its configuration."""
    text = json.dumps(adapter.model.config.to_dict(), sort_keys=True, default=str)
    return {"model_type": adapter.model_type, "vocab_size": adapter.vocab_size, "config_sha256": hashlib.sha256(text.encode()).hexdigest()}


# ---- save ----------------------------------------------------------------------------------------------
def save_session(session: StreamSession, path: str | Path) -> Path:
    """Write ``session`` to directory ``path``, atomically replacing an earlier snapshot there.

    Not allowed while an answer is streaming. ``path`` must be new, empty, or a snapshot (a directory
    holding other files is refused with ConfigError rather than overwritten). Returns ``path``.
    """
    from safetensors.torch import save_file

    session._check_idle()
    out = Path(path)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.saving-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        memory = session.memory
        tensors = kv.layer_tensors(session.runner.cache)
        tensors.update({f"pos{chunk_id}": p.contiguous() for chunk_id, p in memory.positions.items()})
        save_file(tensors, str(staging / CACHE))
        files = {CACHE: _describe(staging / CACHE)}
        if memory.store is not None:
            memory.store.save(staging / STORE_DIR)
            files[_STORE_MANIFEST] = _describe(staging / _STORE_MANIFEST)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "model": fingerprint(session.adapter),
            "model_source": session.adapter.source,
            "session_config": asdict(session.config),
            "memory_config": asdict(memory.config),
            "layers": len(kv._layers(session.runner.cache)),
            "runner": {"next_position": session.runner.next_position, "seen": session.runner.seen, "ids": session.runner.ids},
            "last_t": session.last_t if math.isfinite(session.last_t) else None,
            "ledger": memory.ledger.to_dict(),
            "compactions": memory.compactions,
            "files": files,
        }
        with open(staging / MANIFEST, "w") as f:
            f.write(json.dumps(seal(manifest)))
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"cannot save a snapshot to {out}: it exists and is not a directory")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in _SNAPSHOT_ENTRIES)
        if others:
            raise ConfigError(
                f"cannot save a snapshot to {out}: it holds other files ({', '.join(others[:3])}); "
                "pick a new or empty directory, or an earlier snapshot to replace"
            )


def _describe(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file just written (flushed to disk on the way)."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path, sync=True)}


def sync_dir(path: Path) -> None:
    """Make renames and new entries in the directory ``path`` durable (best effort: a file system that
    cannot sync a directory is left as it is)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _replace_dir(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` directory to ``out``; an earlier snapshot there is removed afterwards."""
    if not out.exists():
        os.rename(staging, out)
    else:
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    sync_dir(out.parent)  # make the renames durable


# ---- load ----------------------------------------------------------------------------------------------
def load_session(adapter: ModelAdapter, path: str | Path) -> StreamSession:
    """Rebuild a session saved by :func:`save_session` on ``adapter``'s model.

    Raises InputError naming the path and the problem for a snapshot that is incomplete, damaged in any
    byte, inconsistent, of another format version, or made with another model; nothing is built then.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..memory.store import LongTermStore
    from .session import StreamSession

    src = Path(path)
    manifest = _read_manifest(src, adapter)
    memory_config = _config(src, "memory_config", manifest, lambda d: MemoryConfig(**d))
    session_config = _config(src, "session_config", manifest, _session_config)
    for name, entry in manifest["files"].items():
        _check_described(src / name, entry)
    try:
        tensors = load_file(str(src / CACHE))
    except (OSError, SafetensorError, ValueError) as exc:
        raise InputError(f"{src / CACHE} is unreadable or truncated: {exc}") from exc
    _check_tensors(src / CACHE, tensors, manifest, adapter)

    session = StreamSession.__new__(StreamSession)
    session._restore(adapter, session_config, memory_config)
    try:
        kv.load_tensors(session.runner.cache, tensors, manifest["layers"])
        runner = manifest["runner"]
        session.runner.next_position = runner["next_position"]
        session.runner.ids = list(runner["ids"])
        session.runner.seen = runner["seen"]
        session._last_t = -math.inf if manifest["last_t"] is None else float(manifest["last_t"])
        memory = session.memory
        try:
            memory.ledger = Ledger.from_dict(manifest["ledger"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{src / MANIFEST}: the ledger cannot be rebuilt: {exc}") from exc
        memory.compactions = manifest["compactions"]
        memory.positions = {c.chunk_id: tensors[f"pos{c.chunk_id}"] for c in memory.ledger.working()}
        if memory.ledger.working_tokens() != session.runner.cache_length:
            raise InputError(f"{src}: the ledger and the cache disagree ({memory.ledger.working_tokens()} vs {session.runner.cache_length} tokens)")
        if memory.store is not None:
            memory.store.close()
            memory.store = LongTermStore.load(src / STORE_DIR, memory_config.store_ram_bytes, memory_config.store_disk_bytes)
            _check_store(src / STORE_DIR, memory.store, memory.ledger)
    except BaseException:
        session.close()
        raise
    return session


def _read_manifest(src: Path, adapter: ModelAdapter) -> dict[str, Any]:
    """The manifest, parsed, its schema and seal checked, and its model compared with ``adapter``'s."""
    manifest_path = src / MANIFEST
    if not src.is_dir():
        aside = sorted(src.parent.glob(f".{src.name}.old-*")) if src.parent.is_dir() else []
        hint = f"; a save into it was interrupted and the previous snapshot is at {aside[-1]}" if aside else ""
        raise InputError(f"snapshot directory {src} does not exist{hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{manifest_path} is missing: {src} is not a complete snapshot") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"{manifest_path} is not a readable snapshot manifest: {exc}") from exc
    check = _Schema(manifest_path)
    check.mapping("the manifest", manifest)
    if manifest.get("format") != FORMAT:
        check.fail(f"is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        check.fail(f"has format version {manifest.get('version')!r}; this streamvlm reads version {VERSION} only")
    model = check.mapping("'model'", manifest.get("model"), frozenset({"model_type", "vocab_size", "config_sha256"}))
    if model != fingerprint(adapter):
        check_seal(manifest_path, manifest)  # a damaged manifest says so rather than blaming the model
        raise InputError(
            f"the snapshot in {src} was made with another model ({manifest.get('model_source')}, "
            f"{model['model_type']}); load it with that model"
        )
    _check_schema(check, manifest, adapter)
    check_seal(manifest_path, manifest)
    return manifest


class _Schema:
    """Type and range checks of a parsed JSON document; every failure is an InputError naming the file and field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, message: str) -> NoReturn:
        raise InputError(f"{self.path} {message}")

    def mapping(self, where: str, value: object, required: frozenset[str] | None = None, exact: bool = False) -> dict:
        if not isinstance(value, dict):
            self.fail(f": {where} must be a JSON object, got {type(value).__name__}")
        if required is not None:
            missing = sorted(required - value.keys())
            if missing:
                self.fail(f": {where} lacks {', '.join(map(repr, missing))}")
            extra = sorted(value.keys() - required) if exact else []
            if extra:
                self.fail(f": {where} has unknown field(s) {', '.join(map(repr, extra))}")
        return value

    def integer(self, where: str, value: object, low: int | None = 0, high: int | None = None) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(f": {where} must be an integer, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            self.fail(f": {where} must be {span}, got {value}")
        return value

    def number(self, where: str, value: object) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            self.fail(f": {where} must be a finite number, got {value!r}")
        return float(value)

    def text(self, where: str, value: object) -> str:
        if not isinstance(value, str):
            self.fail(f": {where} must be a string, got {value!r}")
        return value

    def array(self, where: str, value: object) -> list:
        if not isinstance(value, list):
            self.fail(f": {where} must be a JSON array, got {type(value).__name__}")
        return value


def _check_schema(check: _Schema, m: dict[str, Any], adapter: ModelAdapter) -> None:
    """Every field's type and range, and the books' agreement with each other (not yet with the files)."""
    check.mapping("the manifest", m, _TOP_KEYS, exact=True)
    check.text("'model_source'", m["model_source"])
    check.mapping("'session_config'", m["session_config"])
    check.mapping("'memory_config'", m["memory_config"])
    text_config = adapter.model.config.get_text_config()
    layers = getattr(text_config, "num_hidden_layers", None)
    check.integer("'layers'", m["layers"], 1, layers)
    if layers is not None and m["layers"] != layers:
        check.fail(f": 'layers' is {m['layers']}, the model has {layers}")
    if m["last_t"] is not None:
        check.number("'last_t'", m["last_t"])
    compactions = check.integer("'compactions'", m["compactions"])
    chunks = _check_ledger(check, m["ledger"], compactions)

    runner = check.mapping("'runner'", m["runner"], frozenset({"next_position", "seen", "ids"}), exact=True)
    working = [c for c in chunks if c["tier"] == WORKING]
    next_position = check.integer("'runner.next_position'", runner["next_position"], 0, adapter.max_positions())
    furthest = max((c["position_end"] for c in working), default=0)
    if next_position < furthest:
        check.fail(f": 'runner.next_position' ({next_position}) is before the end of the working chunks ({furthest})")
    seen = check.integer("'runner.seen'", runner["seen"])
    booked = sum(c["tokens_seen"] for c in chunks)
    if seen != booked:
        check.fail(f": 'runner.seen' ({seen}) differs from the tokens the ledger books ({booked})")
    ids = check.array("'runner.ids'", runner["ids"])
    for i in ids:
        check.integer("a token id in 'runner.ids'", i, 0, adapter.vocab_size - 1)
    bounded = check.mapping("'memory_config'", m["memory_config"]).get("budget_tokens") is not None
    if len(ids) != (0 if bounded else seen):
        want = "none (a bounded session keeps no token ids)" if bounded else f"{seen} ('runner.seen')"
        check.fail(f": 'runner.ids' holds {len(ids)} token ids, expected {want}")
    if not bounded and any(c["tier"] != WORKING for c in chunks):
        check.fail(": an unbounded session's ledger books chunks outside working memory")
    timed = [c["t_end"] for c in chunks if c["kind"] != "system"]
    if timed and (m["last_t"] is None or m["last_t"] < max(timed)):
        check.fail(f": 'last_t' ({m['last_t']!r}) is before the latest chunk's time ({max(timed)})")

    files = check.mapping("'files'", m["files"])
    expected = {CACHE, _STORE_MANIFEST} if bounded else {CACHE}
    if set(files) != expected:
        check.fail(f": 'files' lists {sorted(files)}, expected {sorted(expected)}")
    for name, entry in files.items():
        check.mapping(f"'files.{name}'", entry, frozenset({"bytes", "sha256"}), exact=True)
        check.integer(f"'files.{name}.bytes'", entry["bytes"])
        digest = check.text(f"'files.{name}.sha256'", entry["sha256"])
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            check.fail(f": 'files.{name}.sha256' is not a sha256 digest")


def _check_ledger(check: _Schema, ledger: object, compactions: int) -> list[dict[str, Any]]:
    """The ledger's chunks, each checked; its working list must name exactly the working chunks."""
    ledger = check.mapping("'ledger'", ledger, frozenset({"next_id", "working", "chunks"}))
    next_id = check.integer("'ledger.next_id'", ledger["next_id"])
    chunks = check.array("'ledger.chunks'", ledger["chunks"])
    spec = {f.name: f for f in fields(Chunk)}
    required = frozenset(name for name, f in spec.items() if f.default is MISSING and f.default_factory is MISSING)
    ids: set[int] = set()
    for n, chunk in enumerate(chunks):
        where = f"'ledger.chunks[{n}]'"
        chunk = check.mapping(where, chunk, required)
        unknown = sorted(chunk.keys() - spec.keys())
        if unknown:
            check.fail(f": {where} has unknown field(s) {', '.join(map(repr, unknown))}")
        for name, value in chunk.items():
            annotation = spec[name].type if isinstance(spec[name].type, str) else getattr(spec[name].type, "__name__", "")
            _check_chunk_field(check, f"{where}.{name}", name, annotation, value)
        chunk_id = chunk["chunk_id"]
        if chunk_id >= next_id or chunk_id in ids:
            check.fail(f": {where} has chunk id {chunk_id}, duplicate or not below 'ledger.next_id' ({next_id})")
        ids.add(chunk_id)
        if chunk["t_end"] < chunk["t_start"]:
            check.fail(f": {where} ends ({chunk['t_end']}) before it starts ({chunk['t_start']})")
        if chunk["position_end"] < chunk["position_start"]:
            check.fail(f": {where} has position_end before position_start")
        if chunk.get("tokens_held", 0) > chunk.get("tokens_seen", 0):
            check.fail(f": {where} holds more tokens than it has seen")
        if chunk.get("epoch", 0) > compactions:
            check.fail(f": {where} has epoch {chunk['epoch']}, after 'compactions' ({compactions})")
    working = check.array("'ledger.working'", ledger["working"])
    for i in working:
        check.integer("an id in 'ledger.working'", i)
    in_working = {c["chunk_id"] for c in chunks if c.get("tier", WORKING) == WORKING}
    if len(set(working)) != len(working) or set(working) != in_working:
        check.fail(": 'ledger.working' does not list exactly the chunks whose tier is 'working'")
    return [{"tier": WORKING, **c} for c in chunks]


def _check_chunk_field(check: _Schema, where: str, name: str, annotation: str, value: object) -> None:
    if name == "kind":
        if value not in _KINDS:
            check.fail(f": {where} must be one of {_KINDS}, got {value!r}")
    elif name == "tier":
        if value not in _TIERS:
            check.fail(f": {where} must be one of {_TIERS}, got {value!r}")
    elif name == "merged_frames":
        check.integer(where, value, 1)
    elif annotation == "int":
        check.integer(where, value)
    elif annotation == "float":
        check.number(where, value)
    elif annotation == "str":
        check.text(where, value)
    elif annotation == "bool":
        if not isinstance(value, bool):
            check.fail(f": {where} must be true or false, got {value!r}")


def _check_described(path: Path, entry: dict[str, Any]) -> None:
    """Raise InputError unless the file at ``path`` has the size and sha256 its manifest entry records."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"{path} is missing: {exc}") from exc
    if size != entry["bytes"]:
        raise InputError(f"{path} is truncated or damaged: {size} bytes, the snapshot recorded {entry['bytes']}")
    check_file(path, entry["sha256"])


def _config(src: Path, key: str, manifest: dict[str, Any], build: Any) -> Any:
    try:
        return build(dict(manifest[key]))
    except (TypeError, ValueError, KeyError) as exc:  # ConfigError is a ValueError
        raise InputError(f"{src / MANIFEST}: '{key}' is not a valid configuration: {exc}") from exc


def _session_config(data: dict[str, Any]) -> SessionConfig:
    sampling = data.pop("sampling")
    if not isinstance(sampling, dict):
        raise TypeError(f"'sampling' must be an object, got {type(sampling).__name__}")
    return SessionConfig(sampling=SamplingConfig(**sampling), **data)


def _check_tensors(path: Path, tensors: dict[str, Any], manifest: dict[str, Any], adapter: ModelAdapter) -> None:
    """The cache file holds exactly the layers and the working chunks' positions, with the right dtypes and shapes."""
    import torch

    layers = manifest["layers"]
    chunks = manifest["ledger"]["chunks"]
    working = {c["chunk_id"]: c for c in chunks if c.get("tier", WORKING) == WORKING}
    expected = {f"{kv_}{i}" for kv_ in "kv" for i in range(layers)} | {f"pos{i}" for i in working}
    missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or extra:
        raise InputError(f"{path} does not hold the tensors the manifest lists (missing {missing[:4]}, unexpected {extra[:4]})")
    held = sum(c["tokens_held"] for c in working.values())
    heads, head_dim = _kv_geometry(adapter)
    dtype = adapter.model.dtype
    for i in range(layers):
        for name in (f"k{i}", f"v{i}"):
            t = tensors[name]
            if t.dtype != dtype:
                raise InputError(f"{path}: tensor {name} is {t.dtype}, the model's cache is {dtype}")
            if t.dim() != 4 or t.shape[0] != 1 or t.shape[2] != held or (heads and t.shape[1] != heads) or (head_dim and t.shape[3] != head_dim):
                raise InputError(
                    f"{path}: tensor {name} has shape {tuple(t.shape)}, expected (1, {heads or 'kv_heads'}, {held}, "
                    f"{head_dim or 'head_dim'}) for the {held} tokens the ledger holds"
                )
        if tensors[f"k{i}"].shape != tensors["k0"].shape or tensors[f"v{i}"].shape[:3] != tensors["k0"].shape[:3]:
            raise InputError(f"{path}: layer {i}'s keys or values differ in shape from layer 0's")
    next_position = manifest["runner"]["next_position"]
    for chunk_id, chunk in working.items():
        p = tensors[f"pos{chunk_id}"]
        if p.dtype != torch.long or tuple(p.shape) != (adapter.position_rows, chunk["tokens_held"]):
            raise InputError(
                f"{path}: positions of chunk {chunk_id} are {p.dtype} {tuple(p.shape)}, expected int64 "
                f"({adapter.position_rows}, {chunk['tokens_held']})"
            )
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= next_position):
            raise InputError(f"{path}: positions of chunk {chunk_id} lie outside [0, next_position={next_position})")


def _kv_geometry(adapter: ModelAdapter) -> tuple[int | None, int | None]:
    """(kv heads, head dim) of the model's cache from its text config; None where the config does not say."""
    cfg = adapter.model.config.get_text_config()
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None)
    if not head_dim and heads and getattr(cfg, "hidden_size", None):
        head_dim = cfg.hidden_size // heads
    return kv_heads, head_dim


def _check_store(path: Path, store: Any, ledger: Ledger) -> None:
    """Every chunk the ledger books as stored is in the loaded store with its record, and nothing else is.

    A chunk the store had to drop while loading (its quotas) is booked as dropped, as it would have been live.
    """
    dropped = {e.chunk_id for e in store.load_events}
    records = {r.chunk_id: r for r in store.records()}
    booked = {c.chunk_id: c for c in ledger.all() if c.tier == STORE}
    for chunk_id, chunk in booked.items():
        record = records.get(chunk_id)
        if record is None:
            if chunk_id in dropped:
                ledger.set_tier(chunk_id, DROPPED)
                continue
            raise InputError(f"{path} lacks chunk {chunk_id}, which the ledger books as stored")
        want = ("text" if chunk.is_dialogue else "frame", chunk.t_start, chunk.t_end, chunk.source_id,
                chunk.position_start, chunk.position_end, chunk.tokens_held)
        have = (record.kind, record.t_start, record.t_end, record.source_id, record.position_start, record.position_end, record.tokens)
        if have != want:
            raise InputError(f"{path}: chunk {chunk_id} differs from the ledger's record of it ({have} vs {want})")
    unbooked = sorted(set(records) - set(booked))
    if unbooked:
        raise InputError(f"{path} holds chunk(s) {unbooked[:4]} that the ledger does not book as stored")
