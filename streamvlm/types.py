"""Plain data that crosses module boundaries: frames in, answers out.

No torch and no asyncio here, so transports and clients can use these types without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Frame", "Evidence", "Answer"]


@dataclass(frozen=True)
class Frame:
    """One video frame.

    ``image`` is an HxWx3 uint8 RGB array; ``pts_s`` its presentation time in seconds on the
    stream's clock (monotonic per source); ``source_id`` names the camera, file or client it came from.
    """

    image: np.ndarray
    pts_s: float
    source_id: str = "default"


@dataclass(frozen=True)
class Evidence:
    """A frame an answer rests on: its timestamp, where it came from, and how much the answer used it.

    ``weight`` is the frame's share of the attention the answer paid to all its evidence frames (the
    weights of one answer's evidence sum to 1; the largest mark the frames the answer rests on most);
    None where it was not measured (a frame list that is not an answer's, such as
    :attr:`StreamSession.frames`).
    """

    pts_s: float
    source_id: str = "default"
    weight: float | None = None


@dataclass(frozen=True)
class Answer:
    """A finished answer.

    ``text`` is the decoded answer; ``token_ids`` the generated ids (without the stop token);
    ``asked_at_s`` the stream time of the question; ``evidence`` the frames that were in the model's
    context when it answered (recalled ones included), oldest first, each with its attention ``weight``; ``finish_reason`` is ``"stop"`` (end of turn),
    ``"length"`` (max tokens reached) or ``"cancelled"`` (the caller stopped reading the stream).
    ``ttft_s`` and ``total_s`` are wall-clock seconds to the first token and to the end.
    """

    text: str
    token_ids: tuple[int, ...]
    asked_at_s: float
    evidence: tuple[Evidence, ...]
    finish_reason: str
    ttft_s: float
    total_s: float
    question: str = ""
    prompt_tokens: int = 0
    context_tokens: int = 0
    extra: dict = field(default_factory=dict)
