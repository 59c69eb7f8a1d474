"""The runner owns the model's tensors for one stream: the KV cache and the position counter.

It executes what it is told (encode a frame, prefill tokens, decode one token) and decides nothing:
which tokens go in, and when, is the session's business. Every call either completes or leaves the
cache exactly as it was, so a failed step never corrupts a stream.

Two steps can be interrupted at a layer boundary, for a caller that has something more urgent (the
live worker, when a question arrives during a frame read): the vision tower can be *paused* (a
callback runs between its layers, with the encode suspended on the stack; the vision tower does not
touch the cache, so anything may run there, and the encode then continues where it stopped), and a
prefill can be *abandoned* (:class:`Preempted`; the cache is restored, as after any failed forward).

The model is shared by every session of a server; a runner uses it only inside
:meth:`ModelAdapter.hold` (the model's lock), and every hook it needs (pause points, pre-emption
checks, query capture) is attached inside the same hold as the forward pass it is for and removed
before the hold ends, so another session's forward never meets it.

It keeps two lengths apart: ``logical_length`` counts every token the stream has seen; the physical
length (``cache_length``) counts the tokens the cache holds. Without compression they are equal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from ..errors import CapacityError
from ..models.base import Hook, ModelAdapter, PreparedFrame

__all__ = ["Runner", "StepTimes", "Preempted", "SpanAttention"]


class Preempted(Exception):
    """A prefill was stopped at a layer boundary because its caller asked; the cache is as it was before it."""


@dataclass
class StepTimes:
    """Wall-clock seconds spent inside the model, accumulated since the last :meth:`Runner.take_times`."""

    vision_s: float = 0.0  # vision tower (encode)
    prefill_s: float = 0.0  # language model over prompt/frame tokens
    decode_s: float = 0.0  # language model, one token at a time
    calls: dict[str, int] = field(default_factory=lambda: {"encode": 0, "prefill": 0, "decode": 0})


@dataclass
class SpanAttention:
    """How a prefill's last position divides its attention between given spans of the cache.

    The caller (who knows from the ledger where each chunk sits in the cache) names the spans and the
    language-model layers to read, and passes this object to one :meth:`Runner.prefill`. For each
    read layer the prefill adds the exact softmax attention (q·K of the position as the layer computes
    it, averaged over the query heads) of its *last* new position, summed over each span, to ``mass``;
    and the same for its *first* new position (which sees the cache but none of the new tokens'
    content) to ``baseline``. :meth:`shares` then weighs the spans. The forward's output is unchanged;
    the cost is two query rows and two q·K rows per read layer.
    """

    spans: list[tuple[int, int]]  # [start, end) physical offsets in the cache, one per item of interest
    layers: tuple[int, ...]  # indices into ModelAdapter.text_layers() to read
    mass: torch.Tensor = field(init=False)  # [len(spans)] the last position's attention, summed over read layers
    baseline: torch.Tensor = field(init=False)  # [len(spans)] the first position's, summed over read layers
    reads: int = 0  # layers read into ``mass``
    baseline_reads: int = 0  # layers read into ``baseline`` (none when the prefill had one token)

    def __post_init__(self) -> None:
        self.mass = torch.zeros(len(self.spans), dtype=torch.float64)
        self.baseline = torch.zeros(len(self.spans), dtype=torch.float64)

    def shares(self) -> list[float] | None:
        """Each span's weight: its share of the last position's attention, discounted by the first's; they sum to 1.

        Every query of a decoder pays some attention to the newest and the oldest frames whatever it
        asks (a recency and first-frame bias). The first position of the prefill shows that bias
        without the new tokens' content, so each span's share ``m`` of the last position's attention is
        divided by ``b + 1/n`` (``b`` its share of the first position's, ``n`` the number of spans) and
        the results normalised. Without a baseline (a one-token prefill) the shares are ``m`` itself.
        None when nothing was read, there are no spans, or no attention reached any of them.
        """
        total = float(self.mass.sum())
        if not self.reads or not self.spans or not total > 0.0:
            return None
        share = self.mass / total
        base_total = float(self.baseline.sum())
        if self.baseline_reads and base_total > 0.0:
            share = share / (self.baseline / base_total + 1.0 / len(self.spans))
            share = share / share.sum()
        return [float(w) for w in share]


class Runner:
    """Model tensors for one stream. Create one per stream with the adapter of a loaded model."""

    def __init__(self, adapter: ModelAdapter, *, keep_ids: bool = True) -> None:
        self.adapter = adapter
        self.model = adapter.model
        self.cache = DynamicCache(config=self.model.config.get_text_config())
        self.next_position = 0  # the position the next token takes
        # Every token fed, in order, while the cache holds exactly that sequence (``keep_ids``); a bounded
        # memory edits the cache, so its sessions keep only the count, and memory stays bounded.
        self.keep_ids = keep_ids
        self.ids: list[int] = []
        self.seen = 0  # tokens fed (the logical length)
        self.times = StepTimes()
        self.last_positions = torch.empty(adapter.position_rows, 0, dtype=torch.long)  # of the last call, [rows, n]
        self._max_positions = adapter.max_positions()
        self._vision_points: list[torch.nn.Module] | None = None
        self.last_vision_s = 0.0  # seconds the last encode spent in the vision tower, pauses excluded
        # Seconds this runner's language-model forwards held the model (waiting for a turn excluded): the
        # model time a step really cost, for admission by compute (read it before and after a step).
        self.forward_s = 0.0

    # ---- lengths ------------------------------------------------------------------------------------
    @property
    def logical_length(self) -> int:
        return self.seen

    @property
    def cache_length(self) -> int:
        return int(self.cache.get_seq_length())

    def cache_bytes(self) -> int:
        """Bytes held by the KV cache tensors."""
        total = 0
        for layer in self.cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    # ---- steps --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, frame: PreparedFrame, *, pause: Callable[[], None] | None = None) -> Any:
        """Run the vision tower on one frame. The result is meant for one :meth:`prefill`.

        ``pause`` is called in this thread before every vision layer and each of its sub-blocks; what
        it runs (a question, say) runs with this encode suspended, and the encode then goes on exactly
        as if it had not stopped (the vision tower reads nothing that other steps change). Time spent
        inside ``pause`` is not counted as vision time. If ``pause`` raises, the encode is abandoned.

        Frames of other sessions on the same model that wait at the same moment are encoded in the same
        forward (``adapter.batcher``, :mod:`.batcher`; off with ``adapter.vision_batching = False``):
        the result is this frame's alone, and its vision time is its share of that forward. While the
        frame waits in another session's batch, ``pause`` is still called now and then, so this
        session's answers are not held up by the batch; the batch yields the model to them.
        """
        out, self.last_vision_s = self.adapter.batcher.encode(frame, pause=pause, points=self._pause_points())
        self.times.vision_s += self.last_vision_s
        self.times.calls["encode"] += 1
        return out

    @torch.inference_mode()
    def prefill(
        self,
        ids: list[int],
        *,
        grids: list[tuple[int, int, int]] | None = None,
        encoded: Any | None = None,
        all_logits: bool = False,
        abort_if: Callable[[], bool] | None = None,
        attention: SpanAttention | None = None,
    ) -> torch.Tensor:
        """Append ``ids`` to the cache and return logits: ``[V]`` for the last token, ``[len(ids), V]`` with ``all_logits``.

        ``encoded`` is the vision output for the image placeholders in ``ids`` and ``grids`` their
        token grids. Raises :class:`CapacityError` (cache untouched) when the positions would pass the
        model's maximum. ``abort_if`` is asked before every language-model layer; when it answers
        true the prefill stops there and raises :class:`Preempted`, with the cache untouched.
        ``attention``, if given, receives the attention of the first and the last new token over its
        spans (see :class:`SpanAttention`); if the prefill fails, it receives nothing.
        """
        t0 = time.perf_counter()
        hooks: list[Hook] = []
        if abort_if is not None:
            owner = threading.get_ident()

            def hook(module: Any, args: Any) -> None:
                if threading.get_ident() == owner and abort_if():
                    raise Preempted("prefill abandoned for more urgent work")

            hooks = [Hook(layer, hook, pre=True) for layer in self.adapter.text_layers()]
        hooks += self._attention_hooks(attention)
        logits = self._forward(ids, grids or [], encoded, keep=0 if all_logits else 1, hooks=hooks, attention=attention)
        self.times.prefill_s += time.perf_counter() - t0
        self.times.calls["prefill"] += 1
        return logits if all_logits else logits[-1]

    @torch.inference_mode()
    def decode(self, token_id: int) -> torch.Tensor:
        """Append one token and return the next token's logits ``[V]``.

        When other sessions sharing the model decode at the same moment, the step may run in one forward
        with theirs (``adapter.decode_batcher``, :mod:`.decoding`); the result is the same either way."""
        t0 = time.perf_counter()
        ids = [token_id]
        positions, next_position = self._positions(ids, [])
        held = self.cache_length
        logits = self.adapter.decode_batcher.step(
            self.cache, token_id, positions,
            alone=lambda: self._run(ids, positions, None, keep=1)[-1], crop=lambda: self._crop_to(held))
        self._advance(ids, positions, next_position)
        self.times.decode_s += time.perf_counter() - t0
        self.times.calls["decode"] += 1
        return logits

    def mark(self) -> tuple[int, int, int]:
        """A point to come back to with :meth:`rollback`: (tokens held, next position, tokens seen)."""
        return (self.cache_length, self.next_position, self.seen)

    def rollback(self, mark: tuple[int, int, int]) -> None:
        """Forget every token fed after ``mark``; the cache returns to exactly what it held then.

        Valid only while nothing before the mark was edited (no eviction in between).
        """
        held, position, seen = mark
        self._crop_to(held)
        if self.keep_ids:
            del self.ids[len(self.ids) - (self.seen - seen) :]
        self.seen = seen
        self.next_position = position

    @torch.inference_mode()
    def last_logits_of_branches(self, branches: list[list[int]]) -> torch.Tensor:
        """Feed several independent continuations of the context in one forward and roll them back.

        Every branch starts at the current position and sees the cache and itself only (a
        block-diagonal 4-D attention mask), exactly as if it were fed alone. Returns the last token's
        logits of each branch, ``[len(branches), V]``. The cache is unchanged afterwards.
        """
        held = self.cache_length
        ids = [token for branch in branches for token in branch]
        positions = torch.cat([self.adapter.model_position_ids(branch, self.next_position, [])[0] for branch in branches], dim=-1)
        total = len(ids)
        mask = torch.zeros(1, 1, total, held + total, dtype=torch.bool)
        mask[..., :held] = True
        ends, start = [], 0
        for branch in branches:
            end = start + len(branch)
            mask[0, 0, start:end, held + start : held + end] = torch.ones(len(branch), len(branch), dtype=torch.bool).tril()
            ends.append(end - 1)
            start = end
        if self.model.config.get_text_config()._attn_implementation == "eager":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        device = self.adapter.device
        with self.adapter.hold():
            try:
                out = self.model(
                    input_ids=torch.tensor([ids], device=device), position_ids=positions.to(device), attention_mask=mask.to(device),
                    past_key_values=self.cache, use_cache=True, logits_to_keep=0,
                )
            finally:
                self._crop_to(held)
        return out.logits[0, ends].float()

    @torch.inference_mode()
    def query_vectors(self, ids: list[int], *, rotated: bool) -> torch.Tensor:
        """Each layer's query vectors for ``ids`` fed at the end of the context, ``[layers, q_heads, n, head_dim]``.

        Computed on a throw-away extension that is rolled back: the cache is unchanged afterwards.
        ``rotated=False`` gives position-free queries (before RoPE), for matching position-free keys;
        ``rotated=True`` gives them as attention sees them, for scoring against cached keys.
        """
        captured: list[torch.Tensor] = []
        owner = threading.get_ident()

        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            if threading.get_ident() != owner:  # a forward outside the model's owner (an unlocked caller)
                return
            captured.append(_queries(module, args, kwargs, rotated=rotated))

        hooks = [Hook(layer.self_attn, hook, with_kwargs=True) for layer in self.adapter.text_layers()]
        with self.adapter.hold(hooks):  # the same hold as the forward: no other session's pass can reach the hook
            mark = self.mark()
            try:
                self._forward(ids, [], None, keep=1)
            finally:
                self.rollback(mark)
        return torch.stack(captured)

    def take_times(self) -> StepTimes:
        """Return the accumulated timings and start counting afresh."""
        times, self.times = self.times, StepTimes()
        return times

    # ---- internals ---------------------------------------------------------------------------------
    def _attention_hooks(self, attention: SpanAttention | None) -> list[Hook]:
        """Hooks that read the first and last new positions' attention over ``attention.spans`` (for one forward's hold)."""
        if attention is None or not attention.spans:
            return []
        owner = threading.get_ident()
        layers = self.adapter.text_layers()
        starts = torch.tensor([a for a, _ in attention.spans])
        ends = torch.tensor([b for _, b in attention.spans])

        def span_sums(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
            """Softmax attention of one query ``[Hq, D]`` over ``keys`` ``[Hk, N, D]``, head-averaged, summed per span."""
            group = q.shape[0] // keys.shape[0]
            logits = torch.einsum("hgd,hnd->hgn", q.view(keys.shape[0], group, -1), keys) * scale
            probs = torch.softmax(logits, dim=-1).mean(dim=(0, 1)).double()  # [N]
            cumulative = torch.cat([probs.new_zeros(1), probs.cumsum(0)])  # every span's sum from one prefix sum
            n = cumulative.shape[0] - 1
            return cumulative[ends.clamp(max=n)] - cumulative[starts.clamp(max=n)]

        def reader(index: int) -> Callable[..., None]:
            def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
                if threading.get_ident() != owner:
                    return
                keys = self.cache.layers[index].keys[0].float()  # [Hk, N, D]: this forward's keys already appended
                new = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[1]
                scale = float(getattr(module, "scaling", module.head_dim**-0.5))
                q = _queries(module, args, kwargs, rotated=True, rows=[0, new - 1] if new > 1 else [0])  # [Hq, 1|2, D]
                attention.mass += span_sums(q[:, -1], keys, scale)
                attention.reads += 1
                if new > 1:  # the first new token sees the cache and itself only (causal)
                    attention.baseline += span_sums(q[:, 0], keys[:, : keys.shape[1] - new + 1], scale)
                    attention.baseline_reads += 1

            return hook

        return [Hook(layers[i].self_attn, reader(i), with_kwargs=True) for i in attention.layers]

    def _pause_points(self) -> list[torch.nn.Module]:
        """The vision tower's layers and their direct sub-blocks: every module list outside the language model."""
        if self._vision_points is None:
            text = {id(m) for layer in self.adapter.text_layers() for m in layer.modules()}
            points: list[torch.nn.Module] = []
            for module in self.model.modules():
                if isinstance(module, torch.nn.ModuleList) and not any(id(m) in text for m in module.modules()):
                    for layer in module:
                        points.append(layer)
                        points.extend(layer.children())
            self._vision_points = points
        return self._vision_points

    def _crop_to(self, length: int) -> None:
        # Layer by layer: a forward that failed midway extended only the layers before the failure.
        for layer in self.cache.layers:
            keys = getattr(layer, "keys", None)
            extra = keys.shape[-2] - length if isinstance(keys, torch.Tensor) and keys.dim() >= 2 else 0
            if extra > 0:
                layer.crop(-extra)  # transformers 5.23: a negative count removes that many tokens

    def _forward(
        self, ids: list[int], grids: list[tuple[int, int, int]], encoded: Any | None, keep: int, hooks: list[Hook] | None = None,
        attention: SpanAttention | None = None,
    ) -> torch.Tensor:
        positions, next_position = self._positions(ids, grids)
        logits = self._run(ids, positions, encoded, keep, hooks, attention)
        self._advance(ids, positions, next_position)
        return logits

    def _positions(self, ids: list[int], grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
        """The position ids of ``ids`` fed next (as the model takes them) and the next position after them.

        Raises :class:`CapacityError` when that passes the model's maximum."""
        positions, next_position = self.adapter.model_position_ids(ids, self.next_position, grids)
        if next_position > self._max_positions:
            raise CapacityError(
                f"the stream would reach position {next_position}, past the model's maximum of {self._max_positions}; "
                "start a new session or enable memory compression"
            )
        return positions, next_position

    def _run(
        self, ids: list[int], positions: torch.Tensor, encoded: Any | None, keep: int, hooks: list[Hook] | None = None,
        attention: SpanAttention | None = None,
    ) -> torch.Tensor:
        """One forward of ``ids`` on this stream's cache; returns float32 logits ``[n, V]``. The cache is as
        before when it raises; the position counters are the caller's (:meth:`_advance`)."""
        device = self.adapter.device
        held = self.cache_length
        saved = (attention.mass.clone(), attention.baseline.clone(), attention.reads, attention.baseline_reads) if attention is not None else None
        try:
            with self.adapter.hold(hooks or ()):
                t_held = time.perf_counter()
                out = self.model(
                    input_ids=torch.tensor([ids], device=device),
                    position_ids=positions.to(device),
                    past_key_values=self.cache,
                    use_cache=True,
                    logits_to_keep=keep,
                    **self.adapter.forward_kwargs(encoded),
                )
                self.forward_s += time.perf_counter() - t_held
        except BaseException:
            self._crop_to(held)
            if attention is not None and saved is not None:
                attention.mass, attention.baseline, attention.reads, attention.baseline_reads = saved  # a failed forward adds nothing
            raise
        return out.logits[0].float()

    def _advance(self, ids: list[int], positions: torch.Tensor, next_position: int) -> None:
        """``ids`` are in the cache now: move the position counters past them."""
        self.next_position = next_position
        self.last_positions = positions.reshape(positions.shape[0] if positions.dim() == 3 else 1, -1).cpu()
        self.seen += len(ids)
        if self.keep_ids:
            self.ids.extend(ids)


def _queries(module: Any, args: tuple, kwargs: dict, *, rotated: bool, rows: list[int] | None = None) -> torch.Tensor:
    """The query vectors an attention module computes in its forward, ``[q_heads, n, head_dim]`` (float32).

    Read in a hook on ``self_attn`` with kwargs. ``rotated`` applies RoPE as the module does (for
    scoring against cached keys); ``rows`` limits the work to those positions of the forward's input.
    """
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cos, sin = kwargs["position_embeddings"] if rotated else (None, None)
    if rows is not None:
        hidden = hidden[:, rows]
        if rotated:
            cos, sin = cos[:, rows], sin[:, rows]
    batch, length, _ = hidden.shape
    q = module.q_proj(hidden).view(batch, length, -1, module.head_dim)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    q = q.transpose(1, 2).float()
    if rotated:
        cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
        half = q.shape[-1] // 2
        q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
    return q[0]
