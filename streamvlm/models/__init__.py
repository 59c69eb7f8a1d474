"""Model families behind one interface, and the loader that picks one for a checkpoint.

:func:`load_model` takes a preset name, a Hub id or a local path and returns a ready
:class:`ModelAdapter`. Checkpoints load through transformers' Auto classes exactly as a user would load
them; a first download shows the Hub's progress bars.
"""

from __future__ import annotations

import importlib.util
import sys

from ..config import ModelConfig
from ..errors import ModelError
from .base import ModelAdapter, PreparedFrame
from .device import Precision, choose_precision, precision_of
from .qwen import QwenVLAdapter
from .resolve import SHAPEWORLD, ModelLocation, locate
from .smolvlm import SmolVLMAdapter
from .tiny import PRESETS, ensure_preset

__all__ = ["ModelAdapter", "PreparedFrame", "QwenVLAdapter", "SmolVLMAdapter", "load_model", "PRESETS", "ADAPTERS", "SHAPEWORLD",
           "ModelLocation", "locate", "Precision", "choose_precision", "precision_of"]

ADAPTERS: tuple[type[ModelAdapter], ...] = (QwenVLAdapter, SmolVLMAdapter)


def _adapter_for(model_type: str) -> type[ModelAdapter]:
    for cls in ADAPTERS:
        if model_type in cls.families:
            return cls
    supported = ", ".join(f for cls in ADAPTERS for f in cls.families)
    raise ModelError(f"unsupported model family {model_type!r}; supported: {supported}")


def load_model(spec: ModelConfig | str) -> ModelAdapter:
    """Load a checkpoint and return the adapter for its family.

    ``spec`` is a :class:`ModelConfig` or just the model string: a Hub id, a path, a random-weight
    preset (built on first use) or ``"shapeworld"``, the trained model that ships with the package. Raises
    :class:`ModelError` when the id or path cannot be found (at once, before any download is tried, with
    the closest known names: see :func:`~streamvlm.models.resolve.locate`), the family is unsupported, or
    the files are incomplete; the message says which, and :class:`ConfigError` when the device is not
    on this machine. ``spec.device`` / ``spec.dtype`` ``auto`` resolve by
    :func:`~streamvlm.models.device.choose_precision`; the choice and its reason are printed on stderr
    (one ``streamvlm: ... device ..., dtype ...`` line) and kept as ``adapter.precision``
    (:func:`precision_of` reads it).
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    cfg = spec if isinstance(spec, ModelConfig) else ModelConfig(model=spec)
    where = locate(cfg.model)  # fails in milliseconds, with suggestions, on a name that cannot load
    precision = choose_precision(cfg.device, cfg.dtype)  # a missing device fails here too, before any weights load
    source = str(ensure_preset(cfg.model)) if where.kind == "preset" else where.source
    offline = {"local_files_only": True} if where.local_files_only else {}
    try:
        hf_config = AutoConfig.from_pretrained(source, revision=cfg.revision, **offline)
    except (OSError, ValueError) as exc:
        presets = ", ".join([*PRESETS, SHAPEWORLD])
        raise ModelError(f"cannot load model {cfg.model!r}: {exc}. Models that need no download: {presets}") from exc
    adapter_cls = _adapter_for(str(hf_config.model_type))
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source, revision=cfg.revision, dtype=precision.torch_dtype, attn_implementation=cfg.attn_implementation, **offline
        )
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision, **offline)
        # Without torchvision (not installable beside the CPU torch build) ask for the PIL backend directly.
        backend = None if importlib.util.find_spec("torchvision") else "pil"
        image_processor = AutoImageProcessor.from_pretrained(source, revision=cfg.revision, backend=backend, **offline)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {cfg.model!r}: {exc}") from exc
    model.to(precision.device)
    adapter = adapter_cls(model, tokenizer, image_processor, source=cfg.model)
    adapter.precision = precision  # type: ignore[attr-defined]
    print(f"streamvlm: {cfg.model}: {precision.describe()}", file=sys.stderr, flush=True)
    return adapter
