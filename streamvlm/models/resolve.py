"""Where a ``--model`` string points, decided in milliseconds and before any weights load.

:func:`locate` turns a model string into a :class:`ModelLocation`: a random-weight preset, the shipped
ShapeWorld model, a local checkpoint directory, or a Hub id (and whether its files are already in the
local Hub cache). It reads only the file system and, for a Hub id that is not cached, makes one quick
connection attempt to the Hub; it never downloads. A string that cannot work (a typo, a placeholder, a
Hub id while offline and not cached) raises :class:`ModelError` at once with the closest known names
("did you mean ..."), instead of the Hub client's retries. :func:`load_model` calls it first; the CLI
calls it before anything slow.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import ModelError
from .tiny import PRESETS, is_preset

__all__ = ["ModelLocation", "locate", "known_models", "cached_hub_models", "hub_reachable", "SHAPEWORLD"]

#: The model trained on ShapeWorld that ships inside the package (see docs/shapeworld.md).
SHAPEWORLD = "shapeworld"
# OWNER/NAME as the Hub accepts it: letters, digits, '-', '_', '.'; no '--' or '..', not starting or ending with '-' or '.'.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")


@dataclass(frozen=True)
class ModelLocation:
    """What a model string names; ``source`` is what transformers' ``from_pretrained`` is given."""

    # The string as the user gave it.
    model: str
    # "preset" (random weights, built locally on first use), "shapeworld", "path" or "hub".
    kind: str
    # A directory for presets, ShapeWorld and paths; the Hub id for "hub".
    source: str
    # For "hub": read only from the local cache (its files are there and the Hub is out of reach or offline mode is on).
    local_files_only: bool = False


def hub_cache_dir() -> Path:
    """The local Hub cache (``HF_HUB_CACHE`` / ``HF_HOME``), as the Hub client resolves it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_hub_models() -> list[str]:
    """Hub ids with a snapshot in the local cache (``models--OWNER--NAME`` folders), sorted."""
    root = hub_cache_dir()
    if not root.is_dir():
        return []
    names = []
    for entry in root.iterdir():
        if entry.name.startswith("models--") and (entry / "snapshots").is_dir():
            names.append(entry.name[len("models--"):].replace("--", "/"))
    return sorted(names)


def _is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def known_models() -> list[str]:
    """Every name that loads without a download: the presets, ``shapeworld`` and the cached Hub ids."""
    return [*PRESETS, SHAPEWORLD, *cached_hub_models()]


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether one TCP connection to the Hub's endpoint opens within ``timeout_s`` (asked once per process)."""
    from huggingface_hub import constants

    parts = urllib.parse.urlsplit(constants.ENDPOINT)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def suggest(model: str, limit: int = 3) -> list[str]:
    """The known names closest to ``model`` (case-insensitive), best first."""
    names = known_models()
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(model.lower(), list(by_lower), n=limit, cutoff=0.5)
    # a bare name typed for a Hub id ("smolvlm2-256m-video-instruct") matches its NAME part too
    tails = {n.split("/", 1)[1].lower(): n for n in names if "/" in n}
    close += [tails[t].lower() for t in difflib.get_close_matches(model.lower(), list(tails), n=limit, cutoff=0.6)]
    return list(dict.fromkeys(by_lower[c] for c in close))[:limit]


def _unknown(model: str, why: str) -> ModelError:
    hint = suggest(model)
    known = ", ".join([*PRESETS, SHAPEWORLD])
    did_you_mean = f" Did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
    return ModelError(f"model {model!r}: {why}.{did_you_mean} Models that need no download: {known}"
                      f"{'; cached: ' + ', '.join(cached_hub_models()) if cached_hub_models() else ''}.")


def locate(model: str) -> ModelLocation:
    """Say where ``model`` points, or raise :class:`ModelError` (with suggestions) if it cannot load.

    Takes milliseconds (plus at most one short connection attempt for a Hub id that is not cached);
    builds, reads and downloads nothing. Next: :func:`~streamvlm.models.load_model` loads it.
    """
    if not isinstance(model, str) or not model.strip():
        raise ModelError("--model is empty: pass a preset, shapeworld, a Hub id (OWNER/NAME) or a checkpoint directory")
    if is_preset(model):
        from .tiny import preset_dir

        return ModelLocation(model, "preset", str(preset_dir(model)))
    if model == SHAPEWORLD:
        from ..shapeworld.model import checkpoint_dir

        if not (checkpoint_dir() / "config.json").exists():
            raise ModelError(f"the ShapeWorld checkpoint is missing from {checkpoint_dir()}; reinstall streamvlm, or train it with "
                             "python -m streamvlm.shapeworld.train --out DIR and pass --model DIR")
        return ModelLocation(model, "shapeworld", str(checkpoint_dir()))
    path = Path(model).expanduser()
    if model.startswith((".", "/", "~")) or path.exists():
        if not path.is_dir():
            raise ModelError(f"model path {model!r} is not a directory with a checkpoint (config.json)")
        if not (path / "config.json").is_file():
            raise ModelError(f"cannot load model {model!r}: the directory has no config.json, so it is not a checkpoint")
        return ModelLocation(model, "path", str(path))
    if model == "M":
        raise _unknown(model, "a placeholder in the docs: put a model's name in its place, e.g. --model shapeworld")
    if not _HUB_ID.match(model):
        raise _unknown(model, "not a preset, a checkpoint directory or a Hub id of the form OWNER/NAME")
    if _is_cached(model):
        return ModelLocation(model, "hub", model, local_files_only=_offline() or not hub_reachable())
    if _offline():
        raise _unknown(model, "not in the local Hub cache, and offline mode is on (HF_HUB_OFFLINE)")
    if not hub_reachable():
        raise _unknown(model, "not in the local Hub cache, and the Hub cannot be reached from this machine")
    return ModelLocation(model, "hub", model)
