"""The exactness check: a streamed context must give the logits of one offline prefill.

Streaming N frames one at a time and then a question must produce the same logits (within float
rounding) and the same greedy answer as feeding the identical token sequence to the model in one
offline forward, where the model numbers positions itself. This proves that frames are read once
without loss, that positions are built right, and that the cache carries everything. It is what
``streamvlm check-model`` runs before a user trusts a new checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..config import SamplingConfig, SessionConfig
from ..models.base import ModelAdapter
from .session import StreamSession

__all__ = ["CheckReport", "check_exactness", "synthetic_frames"]


@dataclass(frozen=True)
class CheckReport:
    model: str
    family: str
    frames: int
    context_tokens: int
    max_abs_logit_diff: float
    same_answer: bool
    stream_answer_ids: list[int]
    offline_answer_ids: list[int]
    tolerance: float
    ok: bool

    def to_dict(self) -> dict:
        return asdict(self)


def synthetic_frames(n: int, *, height: int = 96, width: int = 128, seed: int = 0) -> list[np.ndarray]:
    """``n`` distinct RGB frames: a coloured square moving over a noisy background."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        img = rng.integers(0, 64, (height, width, 3), dtype=np.uint8)
        side = max(4, min(height, width) // 3)
        y = (i * 7) % (height - side)
        x = (i * 11) % (width - side)
        img[y : y + side, x : x + side] = rng.integers(96, 256, 3, dtype=np.uint8)
        frames.append(img)
    return frames


@torch.inference_mode()
def check_exactness(
    adapter: ModelAdapter,
    frames: list[np.ndarray],
    question: str = "What happened in the video?",
    *,
    fps: float = 1.0,
    max_new_tokens: int = 8,
    tolerance: float = 1e-4,
) -> CheckReport:
    """Stream ``frames`` and ``question`` through a :class:`StreamSession`, then compare with one offline pass.

    Compared: the logits at every question position and at every generated step (max absolute
    difference), and the greedy answers' token ids.
    """
    session = StreamSession(adapter, SessionConfig(sampling=SamplingConfig(max_new_tokens=max_new_tokens)))
    for i, frame in enumerate(frames):
        session.ingest(frame, i / fps)
    context = list(session.runner.ids)
    stream = session.ask_stream(question, return_logits=True)
    answer = stream.result()
    assert stream.logits is not None
    prompt = adapter.question_ids(question.strip())

    # The reference: every token at once, positions numbered by the model, then plain greedy decoding.
    ids = torch.tensor([context + prompt], device=adapter.device)
    prepared = [adapter.prepare_frame(f, i / fps) for i, f in enumerate(frames)]
    out = adapter.model(input_ids=ids, use_cache=True, **adapter.offline_kwargs(ids.cpu(), prepared))
    ref_logits = [out.logits[0, len(context):].float()]
    cache, offline_ids = out.past_key_values, []
    next_logits = ref_logits[0][-1].clone()
    banned = list(adapter.banned_ids)
    for _ in range(max_new_tokens):
        next_logits[banned] = float("-inf")  # the session never emits image placeholders either
        token = int(torch.argmax(next_logits))
        if token in adapter.stop_ids:
            break
        offline_ids.append(token)
        step = adapter.model(input_ids=torch.tensor([[token]], device=adapter.device), past_key_values=cache, use_cache=True)
        cache, next_logits = step.past_key_values, step.logits[0, -1].float()
        ref_logits.append(next_logits[None].clone())
    reference = torch.cat(ref_logits)
    n = min(len(reference), len(stream.logits))
    diff = float((reference[:n] - stream.logits[:n]).abs().max())
    same = list(answer.token_ids) == offline_ids
    return CheckReport(
        model=adapter.source,
        family=adapter.model_type,
        frames=len(frames),
        context_tokens=len(context) + len(prompt),
        max_abs_logit_diff=diff,
        same_answer=same,
        stream_answer_ids=list(answer.token_ids),
        offline_answer_ids=offline_ids,
        tolerance=tolerance,
        ok=bool(same and diff <= tolerance),
    )
