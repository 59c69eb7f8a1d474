"""One language-model forward for the next token of every session decoding at the same moment.

A decode step reads every weight of the language model for one token each, so a step that carries
several tokens costs much less than several steps: measured on ``smolvlm-256m-random`` (bf16, this
CPU, contexts of 800 tokens), one token alone 58 ms, two in one step 71 ms, four 115 ms (2.0x the
tokens per second). Each session of a server decodes its answers in its own model thread, one token
per turn on the shared model, so four sessions answering at once would otherwise read the weights
four times per round. :class:`DecodeBatcher`, owned by the adapter (``adapter.decode_batcher``), is
where their steps meet, in the manner of the vision batcher (:mod:`.batcher`):

- :meth:`DecodeBatcher.step` submits the caller's next token (its cache, its position) and waits.
  Whichever waiting thread gets the model's turn (the adapter's :class:`~streamvlm.models.turns.TurnLock`,
  at the caller's priority) leads: it takes every step pending at that moment (up to ``max_batch``),
  runs one forward for all of them and hands each waiter its logits (schedule -> execute -> update).
- A thread that got its logits a moment ago is still answering: it picks its next token (about a
  millisecond) and comes back. Left alone, two answering threads would take turns forever, each
  leading a batch of one while the other picks its token. So a leader first waits for every thread
  that got a result within the last two forwards to submit its next step, for at most ``gather``
  of the last forward's time (a quarter by default) or ``min_gather_s`` (2 ms, what picking a token
  takes in Python) if longer; a thread whose answer ended costs that wait once, then it is no longer
  waited for.
- The forward batches everything that reads weights (embeddings, projections, MLPs, norms, the output
  head: one matrix product for all rows) and runs attention per row, each over its own session's cache
  (selective batching, as in Orca: Yu et al., OSDI 2022). Caches of different lengths and positions
  are never padded or copied. Each decoder layer runs its own forward (so every family's own
  projections, norms and rotary embedding apply, multimodal RoPE included); it sees a cache that
  appends each row to its own session's cache, and an attention function registered with transformers'
  attention interface that attends per row.
- A batched forward that raises is undone on every cache and re-run step by step through the caller's
  own path, so an error reaches only the step that caused it, and every waiter gets its own result or
  its own exception.
- Model time is billed fairly: each step of a batch is charged an equal share to its own thread
  (:meth:`TurnLock.charge`).
- A step alone goes through the caller's own forward (the model's own code), so one session decoding
  alone decodes exactly as before.

Language models with rotary positions and no sliding-window layers are batched (:func:`batchable`:
SmolVLM2, Qwen2.5-VL, Qwen3-VL and the tiny and ShapeWorld models); others, and ``enabled = False``
(``adapter.decode_batching = False``, the ``lock`` engine), step alone. :meth:`DecodeBatcher.stats` counts batches for benchmarks.
The batcher knows nothing about sessions or answers.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..models.base import ModelAdapter

__all__ = ["DecodeBatcher", "DecodeStats", "batchable", "batched_step"]

_PENDING, _RUNNING, _DONE = "pending", "running", "done"


@dataclass
class DecodeStats:
    """What the decode batcher did since it was made (or since :meth:`DecodeBatcher.reset_stats`)."""

    forwards: int = 0  # forwards run for decode steps (a step alone counts)
    steps: int = 0  # decode steps run through them
    max_batch: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # steps per forward -> how many forwards had it
    split: int = 0  # batched forwards that raised and were re-run step by step
    failed: int = 0  # steps whose own forward raised (their waiter got the error)

    @property
    def mean_batch(self) -> float:
        return self.steps / self.forwards if self.forwards else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"forwards": self.forwards, "steps": self.steps, "mean_batch": round(self.mean_batch, 3), "max_batch": self.max_batch,
                "sizes": dict(sorted(self.sizes.items())), "split": self.split, "failed": self.failed}


_ROWS = "streamvlm_rows"  # the attention implementation batched steps run with (registered on first use)


class _Rows:
    """The keys (or values) of each row of a batched step, each over its own session's cache."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors


class _RowsCache:
    """What a decoder layer sees as its cache in a batched step: row ``i`` is appended to ``caches[i]``."""

    def __init__(self, caches: list[Any]) -> None:
        self.caches = caches

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[_Rows, _Rows]:
        out = [cache.update(keys[i : i + 1], values[i : i + 1], layer_idx) for i, cache in enumerate(self.caches)]
        return _Rows([k for k, _ in out]), _Rows([v for _, v in out])


def _rows_attention(module: Any, query: torch.Tensor, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
                    dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of each row's one new token over that row's own keys and values (no mask: a new token
    sees its whole cache), in the layout the model's attention modules expect: ``[rows, 1, heads, dim]``."""
    if not isinstance(key, _Rows) or not isinstance(value, _Rows):
        raise TypeError("batched decode attention called outside a batched step")
    groups = getattr(module, "num_key_value_groups", 1)
    out = [torch.nn.functional.scaled_dot_product_attention(query[i : i + 1], k, v, scale=scaling, enable_gqa=groups > 1)
           for i, (k, v) in enumerate(zip(key.tensors, value.tensors))]
    return torch.cat(out).transpose(1, 2).contiguous(), None


_PARTS: weakref.WeakKeyDictionary[Any, tuple[Any, Any] | None] = weakref.WeakKeyDictionary()


def _text_parts(model: Any) -> tuple[Any, Any] | None:
    """``(text model, output head)`` when each decoder layer of ``model``'s language model can run a batch of
    one-token steps through its own forward: rotary positions, one cache per layer index, no sliding window.
    Looked at once per model (every decode step asks)."""
    try:
        return _PARTS[model]
    except (KeyError, TypeError):
        pass
    inner = getattr(model, "model", None)
    text = getattr(inner, "text_model", None)  # SmolVLM
    if text is None:
        text = getattr(inner, "language_model", None)  # Qwen2.5-VL, Qwen3-VL
    head = getattr(model, "lm_head", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    parts: tuple[Any, Any] | None = (text, head)
    if text is None or head is None or not all(hasattr(text, name) for name in needed):
        parts = None
    elif any(getattr(layer, "self_attn", None) is None or not hasattr(layer.self_attn, "layer_idx")
             or getattr(layer.self_attn, "sliding_window", None) for layer in text.layers):
        parts = None
    try:
        _PARTS[model] = parts
    except TypeError:  # not weakly referenceable: looked at again next time
        pass
    return parts


def batchable(model: Any) -> bool:
    """True when :func:`batched_step` can run ``model``'s decode steps."""
    return _text_parts(model) is not None


@torch.inference_mode()
def batched_step(model: Any, caches: list[Any], tokens: list[int], positions: list[torch.Tensor]) -> torch.Tensor:
    """One forward for one new token in each of several caches: returns float32 logits ``[len(caches), V]``.

    Row ``i`` appends ``tokens[i]`` to ``caches[i]`` (a transformers ``DynamicCache``) at ``positions[i]``
    (its position ids as the model takes them for one token: ``[1, 1]``, or ``[3, 1, 1]`` for
    multimodal RoPE) and attends over that cache only, as a forward of that token alone would. Every
    decoder layer runs its own forward on the batch; only its cache and its attention are per row.
    Call it holding the model (nothing else may run on it meanwhile). If it raises, some caches may
    hold the new token in some layers: the caller crops them back.
    """
    parts = _text_parts(model)
    if parts is None:
        raise ConfigError("this language model's decode steps cannot be batched")
    text, head = parts
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _ROWS not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(_ROWS, _rows_attention)
    device = next(head.parameters()).device
    hidden = text.embed_tokens(torch.tensor(tokens, device=device).view(-1, 1))  # [rows, 1, width]
    position_ids = torch.cat(positions, dim=-2).to(device)  # [rows, 1], or [3, rows, 1]
    embeddings = text.rotary_emb(hidden, position_ids)
    rows = _RowsCache(caches)
    config = text.config
    before = config._attn_implementation
    config._attn_implementation = _ROWS  # this model's forwards are serialized by its lock, which the caller holds
    try:
        for layer in text.layers:
            out = layer(hidden, attention_mask=None, position_ids=position_ids, past_key_values=rows, use_cache=True,
                        position_embeddings=embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
    finally:
        config._attn_implementation = before
    return head(text.norm(hidden))[:, -1].float()


class _Step:
    __slots__ = ("cache", "token", "position", "alone", "crop", "thread", "state", "result", "error")

    def __init__(self, cache: Any, token: int, position: torch.Tensor, alone: Callable[[], torch.Tensor], crop: Callable[[], None]) -> None:
        self.cache, self.token, self.position = cache, token, position
        self.alone = alone  # the caller's own forward of this step (used for a step alone, and after a failed batch)
        self.crop = crop  # undoes a partial append of this step on its cache
        self.thread = threading.current_thread()  # whom the model time is billed to
        self.state = _PENDING
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None


class DecodeBatcher:
    """Runs decode steps of every thread sharing ``adapter``, several per forward. One per adapter."""

    def __init__(self, adapter: ModelAdapter, *, max_batch: int = 16, gather: float = 0.25, min_gather_s: float = 0.002,
                 enabled: bool = True) -> None:
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ConfigError(f"max_batch: must be an integer >= 1, got {max_batch!r}")
        if not 0.0 <= gather <= 1.0:
            raise ConfigError(f"gather: must be a share of a forward in [0, 1], got {gather!r}")
        self.adapter = adapter
        self.max_batch = max_batch
        self.gather = gather  # how long a leader waits for threads still answering, as a share of the last forward
        self.min_gather_s = min_gather_s  # ... and at least this long
        self.enabled = enabled
        self._last_forward_s = 0.0
        self._answered: dict[threading.Thread, float] = {}  # thread -> when it last got its logits (monotonic)
        self.supported = batchable(adapter.model)
        self._cv = threading.Condition(threading.Lock())
        self._pending: list[_Step] = []
        self._stats = DecodeStats()

    @property
    def active(self) -> bool:
        """True when steps go through the batcher (enabled, and the model's layers can be batched)."""
        return self.enabled and self.supported

    def step(self, cache: Any, token: int, position: torch.Tensor, *, alone: Callable[[], torch.Tensor],
             crop: Callable[[], None]) -> torch.Tensor:
        """Append ``token`` at ``position`` (its position ids, as the model takes them) to ``cache`` (alone
        or with other threads' steps); return its logits ``[V]``.

        ``alone`` runs this step by the caller's own path (it holds the model itself) and returns its
        logits; ``crop`` takes back whatever a failed forward appended to ``cache``. Raises what the
        step alone raises; the cache is then as before. Call it from the thread that owns ``cache``.
        """
        if not self.active:
            return alone()
        ticket = _Step(cache, token, position, alone, crop)
        with self._cv:
            self._pending.append(ticket)
            self._cv.notify_all()  # a leader may be gathering
        lock = self.adapter.lock
        try:
            while ticket.state != _DONE:
                if ticket.state == _PENDING:
                    if lock.acquire(until=lambda: ticket.state != _PENDING):
                        try:
                            if ticket.state == _PENDING:
                                self._lead(ticket)
                        finally:
                            lock.release()
                else:
                    with self._cv:
                        self._cv.wait_for(lambda: ticket.state == _DONE)
        except BaseException:
            with self._cv:
                if ticket in self._pending:
                    self._pending.remove(ticket)
            raise
        if ticket.error is not None:
            raise ticket.error
        assert ticket.result is not None
        return ticket.result

    @property
    def pending(self) -> int:
        """Steps waiting for a forward now."""
        with self._cv:
            return len(self._pending)

    def stats(self) -> DecodeStats:
        """A copy of the counters (forwards, steps, batch sizes, splits, failures)."""
        with self._cv:
            s = self._stats
            return DecodeStats(s.forwards, s.steps, s.max_batch, dict(s.sizes), s.split, s.failed)

    def reset_stats(self) -> None:
        with self._cv:
            self._stats = DecodeStats()

    # ---- the leader's side: schedule -> execute -> update -------------------------------------------
    def _lead(self, mine: _Step) -> None:
        lock = self.adapter.lock
        with self._cv:
            self._gather(mine)
            batch = [mine] + [t for t in self._pending if t is not mine][: self.max_batch - 1]
            for ticket in batch:
                ticket.state = _RUNNING
            taken = {id(t) for t in batch}
            self._pending = [t for t in self._pending if id(t) not in taken]
        getattr(lock, "wake", lambda: None)()  # their waiters leave the lock's queue and wait for their results
        t0 = time.perf_counter()
        results: list[tuple[torch.Tensor | None, BaseException | None]] = []
        try:
            results = self._execute(batch)
        finally:  # every waiter gets its result or an error, also when the leader is interrupted
            seconds = time.perf_counter() - t0
            charge = getattr(lock, "charge", None)
            if charge is not None and len(batch) > 1:
                charge({t.thread: seconds / len(batch) for t in batch})
            with self._cv:
                for ticket, (result, error) in zip(batch, results):
                    ticket.result, ticket.error = result, error
                    self._stats.failed += error is not None
                for ticket in batch[len(results):]:
                    ticket.error = RuntimeError("the decode step's batch was interrupted")
                done = time.monotonic()
                for ticket in batch:
                    ticket.state = _DONE
                    self._answered[ticket.thread] = done
                self._cv.notify_all()

    def _gather(self, mine: _Step) -> None:
        """(Called holding ``_cv`` and the model.) Wait, briefly, for the threads still answering to submit
        their next step, so they join this forward instead of each leading one of their own."""
        if not self.gather or self._last_forward_s <= 0:
            return
        now = time.monotonic()
        recent = 2.0 * self._last_forward_s + 0.01
        self._answered = {t: at for t, at in self._answered.items() if now - at < recent}  # the rest are done answering
        expected = set(self._answered) - {mine.thread}
        if expected:
            self._cv.wait_for(lambda: expected <= {t.thread for t in self._pending} or len(self._pending) >= self.max_batch,
                              timeout=max(self.gather * self._last_forward_s, self.min_gather_s))

    def _execute(self, batch: list[_Step]) -> list[tuple[torch.Tensor | None, BaseException | None]]:
        """One forward for ``batch`` (or one per step if it raises): ``[(logits, error)]`` in order."""
        t0 = time.perf_counter()
        if len(batch) > 1:
            try:
                logits = batched_step(self.adapter.model, [t.cache for t in batch], [t.token for t in batch],
                                      [t.position for t in batch])
                self._count(len(batch), time.perf_counter() - t0)
                return [(row, None) for row in logits]
            except Exception:
                for ticket in batch:
                    ticket.crop()
                with self._cv:
                    self._stats.split += 1
        results: list[tuple[torch.Tensor | None, BaseException | None]] = []
        for ticket in batch:  # alone: the model's own forward, so an error reaches only its own step
            t0 = time.perf_counter()
            try:
                results.append((ticket.alone(), None))
            except Exception as exc:
                results.append((None, exc))
            self._count(1, time.perf_counter() - t0)
        return results

    def _count(self, n: int, seconds: float) -> None:
        with self._cv:
            self._last_forward_s = seconds
            s = self._stats
            s.forwards += 1
            s.steps += n
            s.max_batch = max(s.max_batch, n)
            s.sizes[n] = s.sizes.get(n, 0) + 1
