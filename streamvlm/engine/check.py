"""The exactness check: a streamed context must give the logits of one offline prefill.

Streaming N frames one at a time and then a question must produce the same logits (within float
rounding) and the same greedy answer as feeding the identical token sequence to the model in one
offline forward, where the model numbers positions itself. This proves that frames are read once
without loss, that positions are built right, and that the cache carries everything. It is what
``streamvlm check-model`` runs before a user trusts a new checkpoint.

The tolerance fits the dtype the model runs in (:func:`tolerance_for`). In float32 the two paths
agree to within float rounding, so the bar is absolute: 1e-4. In bfloat16 and float16 a logit
carries only 8 or 11 significant bits, and the streamed and offline passes add up the same numbers
in different orders (one token at a time against one long prefill), so they differ by a few units in
the last place of the largest logit: the bar is :data:`LOW_PRECISION_ULPS` of those, e.g. about 0.8
for bfloat16 logits near 25, where one unit is 0.125. :func:`check_dtypes` runs the check for several
dtypes and also says whether each greedy answer is the float32 one.

Where the adapter batches decode steps of several sessions (:mod:`.decoding`), the check also runs
one batched step over three copies of the streamed context cut to different lengths and compares each
row with the same step alone through the model's own forward (``batched_decode_diff``, held to the
same tolerance): the path many sessions answering at once take.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig, SamplingConfig, SessionConfig
from ..models.base import ModelAdapter
from ..models.device import precision_of
from .session import StreamSession

__all__ = ["CheckReport", "check_exactness", "check_dtypes", "synthetic_frames", "tolerance_for", "FLOAT32_TOLERANCE", "LOW_PRECISION_ULPS"]

#: The largest logit difference accepted in float32 (absolute).
FLOAT32_TOLERANCE = 1e-4
#: In bfloat16 / float16: this many units in the last place at the largest reference logit's magnitude.
LOW_PRECISION_ULPS = 4


def tolerance_for(dtype: torch.dtype, logit_scale: float) -> float:
    """The logit difference :func:`check_exactness` accepts for a model in ``dtype`` whose largest
    reference logit is ``logit_scale`` in magnitude: 1e-4 in float32 (and wider types), else
    ``LOW_PRECISION_ULPS`` units in the last place at that magnitude (at least at 1.0)."""
    if torch.finfo(dtype).bits >= 32:
        return FLOAT32_TOLERANCE
    return LOW_PRECISION_ULPS * torch.finfo(dtype).eps * max(1.0, float(logit_scale))


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
    dtype: str = "float32"
    device: str = "cpu"
    #: Why this dtype ran, e.g. "bfloat16: CPU has avx512_bf16" (see streamvlm.models.device).
    dtype_reason: str = ""
    #: Whether the streamed greedy answer equals the one of the model in float32 (None: not compared).
    same_answer_as_float32: bool | None = None
    #: Largest logit difference between a batched decode step and the same steps alone (None: not batched).
    batched_decode_diff: float | None = None

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
    tolerance: float | None = None,
) -> CheckReport:
    """Stream ``frames`` and ``question`` through a :class:`StreamSession`, then compare with one offline pass.

    Compared: the logits at every question position and at every generated step (max absolute
    difference), and the greedy answers' token ids. ``tolerance`` None fits the model's dtype
    (:func:`tolerance_for`). ``ok`` is True when the answers are the same and the difference is within it.
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
    dtype = next(adapter.model.parameters()).dtype
    if tolerance is None:
        tolerance = tolerance_for(dtype, float(reference[:n].abs().max()) if n else 0.0)
    batched = _batched_decode_diff(adapter, session.runner.cache, prompt[:3]) if adapter.decode_batching else None
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
        ok=bool(same and diff <= tolerance and (batched is None or batched <= tolerance)),
        dtype=str(dtype).removeprefix("torch."),
        device=str(adapter.device),
        dtype_reason=precision_of(adapter).dtype_reason,
        batched_decode_diff=batched,
    )


def _batched_decode_diff(adapter: ModelAdapter, context: Any, tokens: list[int]) -> float:
    """One batched decode step over copies of ``context`` cut to its whole, half and a third of its length
    (``tokens[i]`` appended to row ``i``), against each step alone: the largest logit difference."""
    from .decoding import batched_step

    held = context.get_seq_length()
    lengths = [held, max(1, held // 2), max(1, held // 3)][: len(tokens)]
    caches, alone = [], []
    for n in lengths:
        for into in (caches, alone):
            cache = copy.deepcopy(context)
            if n < held:
                cache.crop(n - held)  # transformers 5.23: a negative count removes that many tokens
            into.append(cache)
    positions = [adapter.model_position_ids([token], n, [])[0] for token, n in zip(tokens, lengths)]
    with adapter.hold():
        rows = batched_step(adapter.model, caches, tokens[: len(lengths)], positions)
        diffs = []
        for cache, token, place, row in zip(alone, tokens, positions, rows):
            out = adapter.model(input_ids=torch.tensor([[token]], device=adapter.device), position_ids=place.to(adapter.device),
                                past_key_values=cache, use_cache=True)
            diffs.append(float((out.logits[0, -1].float() - row).abs().max()))
    return max(diffs)


def check_dtypes(
    model: str,
    dtypes: Sequence[str],
    frames: list[np.ndarray],
    question: str = "What happened in the video?",
    *,
    device: str = "auto",
    max_new_tokens: int = 8,
    tolerance: float | None = None,
) -> list[CheckReport]:
    """Load ``model`` once per dtype and run :func:`check_exactness` in each; float32 always runs first.

    ``dtypes`` may hold ``auto`` (resolved for ``device`` by
    :func:`~streamvlm.models.device.choose_precision`; duplicates after resolving run once).
    ``tolerance`` None fits each dtype. Every report after float32's says in
    ``same_answer_as_float32`` whether its streamed greedy answer is float32's. Each model is released
    before the next loads. Raises what :func:`~streamvlm.models.load_model` raises.
    """
    from ..models import load_model
    from ..models.device import choose_precision

    resolved = {"float32": "float32"}  # concrete dtype -> the name asked for (so "auto" keeps its reason)
    for name in dtypes:
        resolved.setdefault(choose_precision(device, name).dtype, name)
    reports: list[CheckReport] = []
    for name in resolved.values():
        adapter = load_model(ModelConfig(model=model, dtype=name, device=device))
        report = check_exactness(adapter, frames, question, max_new_tokens=max_new_tokens, tolerance=tolerance)
        del adapter
        gc.collect()
        if reports:
            report = replace(report, same_answer_as_float32=report.stream_answer_ids == reports[0].stream_answer_ids)
        reports.append(report)
    return reports
