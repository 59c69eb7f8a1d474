"""Snapshots: a session's working memory, long-term store and dialogue saved to a directory and loaded back.

Layout of a snapshot directory::

    manifest.json        format and version, model fingerprint, configs, runner state, ledger
    cache.safetensors    every layer's keys and values, and each working chunk's positions
    store/               the long-term store (see ``LongTermStore.save``)

``manifest.json`` is written last, so a directory without it is an interrupted save. Loading checks
the format, the model (family, vocabulary and a hash of its config) and every file, and refuses a
snapshot that does not fit with :class:`~streamvlm.errors.InputError` before anything is built.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING


from ..config import MemoryConfig, SamplingConfig, SessionConfig
from ..errors import InputError
from ..memory import cache as kv
from ..memory.ledger import Ledger

if TYPE_CHECKING:
    from ..models.base import ModelAdapter
    from .session import StreamSession

__all__ = ["save_session", "load_session", "FORMAT", "VERSION"]

FORMAT, VERSION = "streamvlm-session", 1


def fingerprint(adapter: ModelAdapter) -> dict:
    """What identifies a model for a snapshot: its family, vocabulary and a hash of its configuration."""
    text = json.dumps(adapter.model.config.to_dict(), sort_keys=True, default=str)
    return {"model_type": adapter.model_type, "vocab_size": adapter.vocab_size, "config_sha256": hashlib.sha256(text.encode()).hexdigest()}


def save_session(session: StreamSession, path: str | Path) -> Path:
    """Write ``session`` to directory ``path`` (created if needed). Not allowed while an answer is streaming."""
    from safetensors.torch import save_file

    session._check_idle()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # an interrupted re-save must not look complete
    memory = session.memory
    tensors = kv.layer_tensors(session.runner.cache)
    tensors.update({f"pos{chunk_id}": p.contiguous() for chunk_id, p in memory.positions.items()})
    save_file(tensors, str(out / "cache.safetensors"))
    if memory.store is not None:
        memory.store.save(out / "store")
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
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, out / "manifest.json")
    return out


def load_session(adapter: ModelAdapter, path: str | Path) -> StreamSession:
    """Rebuild a session saved by :func:`save_session` on ``adapter``'s model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..memory.store import LongTermStore
    from .session import StreamSession

    src = Path(path)
    manifest_path = src / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{manifest_path} is missing: {src} is not a complete snapshot") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"{manifest_path} is not a readable snapshot manifest: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise InputError(f"{manifest_path}: not a {FORMAT} snapshot of version {VERSION}")
    if manifest["model"] != fingerprint(adapter):
        raise InputError(
            f"the snapshot in {src} was made with another model ({manifest.get('model_source')}, "
            f"{manifest['model']['model_type']}); load it with that model"
        )
    try:
        tensors = load_file(str(src / "cache.safetensors"))
    except (OSError, SafetensorError, ValueError) as exc:
        raise InputError(f"{src / 'cache.safetensors'} is unreadable or truncated: {exc}") from exc

    sampling = SamplingConfig(**manifest["session_config"].pop("sampling"))
    config = SessionConfig(sampling=sampling, **manifest["session_config"])
    memory_config = MemoryConfig(**manifest["memory_config"])
    session = StreamSession.__new__(StreamSession)
    session._restore(adapter, config, memory_config)
    layers = int(manifest["layers"])
    if any(f"k{i}" not in tensors or f"v{i}" not in tensors for i in range(layers)):
        raise InputError(f"{src / 'cache.safetensors'} lacks layers the manifest lists")
    kv.load_tensors(session.runner.cache, tensors, layers)
    session.runner.next_position = int(manifest["runner"]["next_position"])
    session.runner.ids = [int(i) for i in manifest["runner"]["ids"]]
    session.runner.seen = int(manifest["runner"]["seen"])
    session._last_t = -math.inf if manifest["last_t"] is None else float(manifest["last_t"])
    memory = session.memory
    memory.ledger = Ledger.from_dict(manifest["ledger"])
    memory.compactions = int(manifest["compactions"])
    memory.positions = {c.chunk_id: tensors[f"pos{c.chunk_id}"] for c in memory.ledger.working()}
    if memory.ledger.working_tokens() != session.runner.cache_length:
        raise InputError(f"{src}: the ledger and the cache disagree ({memory.ledger.working_tokens()} vs {session.runner.cache_length} tokens)")
    if memory.store is not None and (src / "store").exists():
        memory.store.close()
        memory.store = LongTermStore.load(src / "store", memory_config.store_ram_bytes, memory_config.store_disk_bytes)
    return session
