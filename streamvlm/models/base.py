"""The interface every model family implements, and the shared parts of it.

An adapter knows one family's chat format, how a frame becomes tokens and pixels, how its vision tower
is called, and how its positions are numbered. It owns no cache and keeps no stream state: the runner
(:mod:`streamvlm.engine.runner`) owns tensors and the cache, the session decides what is fed when.
"""

from __future__ import annotations

import functools
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from .turns import TurnLock

if TYPE_CHECKING:
    from ..engine.batcher import VisionBatcher
    from ..engine.decoding import DecodeBatcher

__all__ = ["PreparedFrame", "ModelAdapter", "Hook"]


@dataclass
class PreparedFrame:
    """A frame after the processor, before the vision tower.

    ``input_ids`` is the whole segment the frame adds to the context (timestamp text, image markers and
    one placeholder per visual token); ``pixels`` holds the processor's tensors for this one image;
    ``grid`` is the visual token grid ``(t, h, w)`` after merging, used by multimodal RoPE.
    """

    input_ids: list[int]
    pixels: dict[str, torch.Tensor]
    grid: tuple[int, int, int]
    pts_s: float
    source_id: str = "default"

    @property
    def num_visual_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


@dataclass(frozen=True)
class Hook:
    """A hook on one module of the model, attached for one step only (see :meth:`ModelAdapter.hold`)."""

    module: torch.nn.Module
    fn: Callable[..., Any]  # torch's hook signature: (module, args[, kwargs][, output])
    pre: bool = False  # run before the module (a forward pre-hook) instead of after it
    with_kwargs: bool = False  # the hook also receives the module's keyword arguments


def _attach(hook: Hook) -> Any:
    if hook.pre:
        return hook.module.register_forward_pre_hook(hook.fn, with_kwargs=hook.with_kwargs)
    return hook.module.register_forward_hook(hook.fn, with_kwargs=hook.with_kwargs)


class ModelAdapter(ABC):
    """One model family behind one interface.

    Subclasses set ``families`` (the ``model_type`` values of ``config.json`` they accept) and implement
    the chat format, :meth:`prepare_frame`, :meth:`encode` and :meth:`position_ids`. Build one with
    :func:`streamvlm.models.load_model`, which picks the subclass from the checkpoint's config.
    """

    families: ClassVar[tuple[str, ...]] = ()
    #: Rows of the position tensor: 1 for 1-D RoPE, 3 for multimodal RoPE (temporal, height, width).
    position_rows: ClassVar[int] = 1
    #: How the family stamps a frame's time, and so the shape a time answer takes: "clock" (``Frame from
    #: 00:12:``) or "seconds" (``<12.0 seconds>``).
    time_answer_shape: ClassVar[str] = "clock"

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, source: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        self.model.eval()
        #: Held around every forward: sessions that share one loaded model take turns on it, the most
        #: urgent waiter first (answers, then probes, then frame reads: see :mod:`.turns`). Take it
        #: through :meth:`hold`, the one place that may also attach hooks.
        self.lock = TurnLock()
        # The hooks attached now, by the thread holding the lock (a stack: holds nest in one thread).
        self._attached: list[tuple[Hook, Any]] = []
        self._batcher: VisionBatcher | None = None
        self._decode_batcher: DecodeBatcher | None = None
        # Sessions on their own threads share one tokenizer, and a fast tokenizer's encode sets state on
        # it (whether special-token strings are split) before it encodes: unguarded, one session's
        # template could lose its special tokens, or a user's typed "<|im_end|>" become a real one.
        self._text_lock = threading.Lock()
        self._token_texts: list[str] | None = None

    # ---- vision encodes of every session, batched ---------------------------------------------------
    @property
    def batcher(self) -> VisionBatcher:
        """The one place frames of every session sharing this model are encoded (see
        :mod:`streamvlm.engine.batcher`): frames waiting at the same moment go through the vision tower
        in one forward. Its ``stats()`` counts batches and frames."""
        if self._batcher is None:
            from ..engine.batcher import VisionBatcher  # the engine builds on the models, not the other way

            self._batcher = VisionBatcher(self)
        return self._batcher

    @property
    def vision_batching(self) -> bool:
        """True (default): frames of different sessions waiting together are encoded in one vision forward.
        Set False for the previous mode, one frame per forward in each session's own turn (``--engine
        lock`` in ``bench serve``); the results are the same either way, only the throughput differs."""
        return self.batcher.enabled

    @vision_batching.setter
    def vision_batching(self, on: bool) -> None:
        self.batcher.enabled = bool(on)

    # ---- decode steps of every session, batched ------------------------------------------------------
    @property
    def decode_batcher(self) -> DecodeBatcher:
        """The one place decode steps of every session sharing this model run (see
        :mod:`streamvlm.engine.decoding`): steps waiting at the same moment run in one forward."""
        if self._decode_batcher is None:
            from ..engine.decoding import DecodeBatcher

            self._decode_batcher = DecodeBatcher(self)
        return self._decode_batcher

    @property
    def decode_batching(self) -> bool:
        """True (default) when the language model's layers allow it: next tokens of sessions decoding at
        the same moment run in one forward. Set False for one step per forward (``--engine lock``); the
        answers are the same either way, only the throughput differs."""
        return self.decode_batcher.active

    @decode_batching.setter
    def decode_batching(self, on: bool) -> None:
        self.decode_batcher.enabled = bool(on)

    # ---- owning the model for one step ------------------------------------------------------------
    @contextmanager
    def hold(self, hooks: Iterable[Hook] = ()) -> Iterator[None]:
        """Own the shared model for one step: take :attr:`lock`, attach ``hooks``; undo both on exit.

        The only way to attach a hook to a loaded model. Every session's forward passes run inside
        ``hold``, so another session's forward waits for the lock and can never run while these hooks
        are attached: a hook sees the tensors of its own step only. Hooks come off before the lock is
        released, also when the step raises. Reentrant in one thread (a callback that runs inside a
        held step, such as a question answered while an encode is paused, may hold it again).
        """
        with self.lock:
            start = len(self._attached)
            try:
                for hook in hooks:
                    self._attached.append((hook, _attach(hook)))
                yield
            finally:
                for _, handle in reversed(self._attached[start:]):
                    handle.remove()
                del self._attached[start:]

    def yield_turn(self) -> bool:
        """Inside a held step that can be suspended (a vision tower between layers): if another session's
        more urgent work waits for the model, take every hook of this step off, let that work run, then
        take the model back, put the hooks back and return True (False: nobody more urgent waited).

        So a hook is never on the model while another session's forward runs, even across a yield.
        """
        more_urgent = getattr(self.lock, "more_urgent_waiting", None)  # a stand-in lock (tests) may not rank waiters
        if more_urgent is None or not more_urgent():
            return False
        mine, self._attached[:] = list(self._attached), []
        for _, handle in reversed(mine):
            handle.remove()
        try:
            return self.lock.yield_turn()
        finally:  # the model is this thread's again; whoever ran meanwhile has taken its own hooks off
            self._attached[:] = [(hook, _attach(hook)) for hook, _ in mine]

    # ---- identity -----------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    # ---- text -----------------------------------------------------------------------------------
    def text_ids(self, text: str, *, user: bool = False) -> list[int]:
        """Token ids of ``text`` with no special tokens added.

        ``user=True`` splits special-token strings a user typed into plain text, so a question cannot
        close its own turn or forge a frame. Safe to call from several threads at once.
        """
        with self._text_lock:
            if user:
                try:
                    return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
                except TypeError:  # tokenizers without the option
                    pass
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        """The text of ``ids``, special tokens left out. Safe to call from several threads at once."""
        with self._text_lock:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_texts(self) -> list[str]:
        """Every token of the vocabulary decoded alone, special tokens as "" (built once, on first use)."""
        with self._text_lock:
            if self._token_texts is None:
                tok = self.tokenizer
                self._token_texts = [str(t) for t in tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=True)]
            return self._token_texts

    # ---- the chat format ------------------------------------------------------------------------
    @abstractmethod
    def conversation_start(self, system_prompt: str) -> list[int]:
        """Ids that open a conversation: the system turn and the opening of the first user turn."""

    @abstractmethod
    def question_ids(self, question: str) -> list[int]:
        """Ids that put ``question`` at the end of the current user turn and open the assistant turn."""

    @abstractmethod
    def turn_end_ids(self) -> list[int]:
        """Ids fed after an answer: end of the assistant turn and the opening of the next user turn."""

    @property
    @abstractmethod
    def stop_ids(self) -> frozenset[int]:
        """Ids that end an answer (end of turn, end of text)."""

    @property
    def banned_ids(self) -> frozenset[int]:
        """Ids an answer may never contain: image placeholders and markers (they need pixels behind them)."""
        return frozenset()

    @functools.cache  # noqa: B019 - one adapter per loaded model; the ids never change
    def yes_no_ids(self) -> tuple[list[int], list[int]]:
        """First token ids of the spellings of "yes" and "no" an answer can start with (for yes/no probes)."""
        def first_ids(words: tuple[str, ...]) -> list[int]:
            return sorted({ids[0] for w in words if (ids := self.text_ids(w))})

        yes, no = first_ids(("yes", "Yes", " yes", " Yes", "YES")), first_ids(("no", "No", " no", " No", "NO"))
        return [i for i in yes if i not in no], [i for i in no if i not in yes]

    # ---- frames ---------------------------------------------------------------------------------
    @abstractmethod
    def prepare_frame(self, image: np.ndarray, pts_s: float, source_id: str = "default") -> PreparedFrame:
        """Run the processor on one HxWx3 uint8 RGB image (CPU work, no model call)."""

    @abstractmethod
    def encode(self, frame: PreparedFrame) -> Any:
        """Run the vision tower on one prepared frame; the result goes to :meth:`forward_kwargs`."""

    def encode_batch(self, frames: list[PreparedFrame]) -> list[Any]:
        """Run the vision tower on several frames (of any sessions) and return one result per frame, in order.

        Each result is what :meth:`encode` returns for that frame alone (equal up to floating-point
        summation order). The default encodes one by one; families override it with one forward. Call
        it inside :meth:`hold`. If it raises, the caller cannot tell which frame was at fault: encode
        them one by one to find out (:class:`~streamvlm.engine.batcher.VisionBatcher` does).
        """
        return [self.encode(frame) for frame in frames]

    def batch_cost(self, frame: PreparedFrame) -> int:
        """What a frame adds to a batch, in visual tokens, for the batch's cap (the vision tower's cost grows with it)."""
        return frame.num_visual_tokens

    @abstractmethod
    def offline_kwargs(self, input_ids: torch.Tensor, frames: list[PreparedFrame]) -> dict[str, Any]:
        """Arguments for one offline forward over ``input_ids`` holding all ``frames`` (the reference path).

        The reference lets the model number positions itself, so comparing it with the streamed path
        also checks this adapter's :meth:`position_ids`.
        """

    def forward_kwargs(self, encoded: Any | None) -> dict[str, Any]:
        """Model-call arguments that place one already-encoded frame at its placeholder tokens."""
        return {} if encoded is None else {"mm_encoder_outputs": {"image": encoded}}

    # ---- positions --------------------------------------------------------------------------------
    @abstractmethod
    def position_ids(self, ids: list[int], start: int, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
        """Positions for ``ids`` appended at logical position ``start``.

        ``grids`` lists, in order, the grid of each image placeholder run in ``ids``. Returns a
        ``[position_rows, 1, len(ids)]`` LongTensor and the position the next token takes.
        """

    def model_position_ids(self, ids: list[int], start: int, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
        """:meth:`position_ids` shaped as the model's forward takes them: ``[1, len(ids)]`` for 1-D RoPE,
        ``[3, 1, len(ids)]`` for multimodal RoPE; and the position the next token takes."""
        positions, next_position = self.position_ids(ids, start, grids)
        return (positions[0] if self.position_rows == 1 else positions), next_position

    def text_layers(self) -> list[Any]:
        """The language model's decoder layers (each has ``self_attn``)."""
        inner = self.model.model
        text = getattr(inner, "language_model", None) or getattr(inner, "text_model", None)
        return list(text.layers)

    def max_positions(self) -> int:
        cfg = self.model.config.get_text_config()
        return int(getattr(cfg, "max_position_embeddings", 1 << 30))
