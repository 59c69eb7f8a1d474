"""streamvlm: watch live video with a vision-language model and talk about it while it runs.

The public API::

    from streamvlm import load_model, StreamSession
    session = StreamSession(load_model("Qwen/Qwen2.5-VL-3B-Instruct"))
    session.ingest(rgb_frame, t=12.0)
    answer = session.ask("What is on the cutting board?", t=12.5)
    print(answer.text, [e.pts_s for e in answer.evidence])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import IngestConfig, MemoryConfig, ModelConfig, SamplingConfig, SessionConfig
from .errors import (
    CapacityError,
    ConfigError,
    FrameError,
    InputError,
    ModelError,
    QuestionError,
    SourceError,
    StreamVLMError,
    TimestampError,
)
from .types import Answer, Evidence, Frame

if TYPE_CHECKING:  # torch-backed names load lazily so that `import streamvlm` stays light
    from .engine import AnswerStream, StreamSession
    from .engine.check import CheckReport, check_exactness
    from .models import ModelAdapter, load_model

__version__ = "0.1.0"

__all__ = [
    "Answer", "AnswerStream", "CapacityError", "CheckReport", "ConfigError", "Evidence", "Frame", "FrameError",
    "IngestConfig", "InputError", "MemoryConfig", "ModelAdapter", "ModelConfig", "ModelError", "QuestionError", "SamplingConfig",
    "SessionConfig", "SourceError", "StreamSession", "StreamVLMError", "TimestampError", "check_exactness", "load_model",
]

_LAZY = {
    "StreamSession": "streamvlm.engine",
    "AnswerStream": "streamvlm.engine",
    "load_model": "streamvlm.models",
    "ModelAdapter": "streamvlm.models",
    "check_exactness": "streamvlm.engine.check",
    "CheckReport": "streamvlm.engine.check",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'streamvlm' has no attribute {name!r}")
