"""StreamSession: one live stream read once into the model's cache, with questions answered mid-stream.

The library API that the CLI, the server and the demos use::

    from streamvlm import StreamSession, load_model
    session = StreamSession(load_model("tiny-smolvlm"))
    session.ingest(frame_rgb, t=0.0)          # encodes the frame once and prefills its tokens
    for delta in (stream := session.ask_stream("What is on the table?", t=0.5)):
        print(delta, end="")
    answer = stream.answer                   # text, evidence timestamps, finish reason, timings

A frame is encoded and prefilled exactly once; a question appends its own tokens and the answer's to
the same cache, so later questions see the earlier dialogue and no frame is ever read again.
Frames and questions share one stream clock: a timestamp may never go backwards.

A frame read has two steps, and a live caller may take them apart: :meth:`StreamSession.encode_frame`
runs the processor and the vision tower (most of the cost; the context does not change) and
:meth:`StreamSession.commit_frame` prefills the encoded frame into the context. Between the two, or
while the vision tower is paused, a question can be answered from the frames already committed;
``ingest`` is the two in a row.

A step that fails (a forward pass raises during a frame commit, a question or a probe) is undone:
the cache is cropped back to its length before the step and the ledger forgets the step's chunks,
so the session is exactly as before and the next call works (a frame whose commit failed can be
committed again). Only a fault while memory was being compacted (older tokens already rewritten)
cannot be undone: the session then sets :attr:`StreamSession.broken` to the reason and every later
call raises :class:`SessionBrokenError` naming it; close it and start a new one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import MemoryConfig, SamplingConfig, SessionConfig
from ..errors import FrameError, QuestionError, SessionBrokenError, StreamVLMError, TimestampError
from ..memory.manager import MemoryEvent, MemoryManager, Retrieved
from ..models.base import ModelAdapter, PreparedFrame
from ..types import Answer, Evidence, Frame
from .runner import Preempted, Runner, SpanAttention
from .sampling import TimeAnswerMask, TimeShape, lead_digits, pick_token

__all__ = ["StreamSession", "AnswerStream", "IngestResult", "EncodedFrame", "Preempted", "SessionBrokenError", "AnswerFormat",
           "is_time_question", "time_shape"]

#: How an answer is decoded: "text" (free), "time" (one stream time in the shape the model's frames are stamped
#: with, then the end: see :class:`~streamvlm.engine.sampling.TimeAnswerMask`), "auto" (time for a question that
#: asks for one: :func:`is_time_question`; free text otherwise).
AnswerFormat = Literal["auto", "text", "time"]
ANSWER_FORMATS: tuple[str, ...] = ("auto", "text", "time")

# "Tell me when X" (the deferred question, answered when X starts to hold) and "When did X ...?" ask for a time.
_TIME_QUESTION = re.compile(
    r"^\s*(?:please\s+)?(?:(?:tell\s+me|let\s+me\s+know|notify\s+me|alert\s+me|wake\s+me(?:\s+up)?)\s+when\s+\S"
    r"|when\s+(?:did|does|do|was|were|is|has|have)\s+\S|at\s+what\s+time\s)",
    re.IGNORECASE,
)


def is_time_question(question: str) -> bool:
    """Whether ``question`` asks for a moment of the stream: a forward request ("Tell me when a red circle
    appears.", answered when it happens) or "When did/was ... ?" / "At what time ... ?"."""
    return bool(_TIME_QUESTION.match(question))


def time_shape(adapter: ModelAdapter) -> TimeShape:
    """The shape of the time stamps ``adapter`` writes before frames: "seconds" (Qwen: ``<12.0 seconds>``) or
    "clock" (SmolVLM and the rest: ``Frame from 00:12:``); a time answer copies it."""
    return getattr(adapter, "time_answer_shape", "clock")


def _check_time_range(time_range: object, t: float) -> tuple[float, float]:
    """``time_range`` as (first, last) floats; QuestionError unless finite numbers with 0 <= first <= last <= ``t``."""
    try:
        first, last = (float(x) for x in time_range)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise QuestionError(f"time_range: must be two stream times (first, last), got {time_range!r}") from None
    if not (math.isfinite(first) and math.isfinite(last) and 0.0 <= first <= last <= t + 1e-9):
        raise QuestionError(f"time_range: must satisfy 0 <= first <= last <= the question's time {t:g}, got {time_range!r}")
    return first, min(last, t)


@dataclass(frozen=True)
class _StepMark:
    """Where a step started, so that a failed step can be undone (see :meth:`StreamSession._step`)."""

    runner: tuple[int, int, int]  # Runner.mark(): tokens held, next position, tokens seen
    chunks: int  # working chunks in the ledger
    last_t: float  # the stream clock
    edits: int  # MemoryManager.edits: compactions begun so far


@dataclass(frozen=True)
class IngestResult:
    """What one :meth:`StreamSession.ingest` did: tokens added and seconds spent in each stage."""

    pts_s: float
    tokens: int
    vision_s: float
    prefill_s: float
    total_s: float

    @property
    def overhead_s(self) -> float:
        """Seconds outside the model's own forward passes (preprocessing, bookkeeping)."""
        return max(0.0, self.total_s - self.vision_s - self.prefill_s)


class EncodedFrame:
    """A frame through the processor and the vision tower, not yet in the context.

    Made by :meth:`StreamSession.encode_frame`; it joins the context with one
    :meth:`StreamSession.commit_frame` on the same session, at most once.
    """

    __slots__ = ("pts_s", "source_id", "vision_s", "encode_s", "committed", "_image", "_prepared", "_features", "_session")

    def __init__(self, session: StreamSession, image: np.ndarray, prepared: PreparedFrame, features: object, vision_s: float, encode_s: float) -> None:
        self.pts_s = prepared.pts_s  # the time written into the frame's tokens
        self.source_id = prepared.source_id
        self.vision_s = vision_s  # seconds in the vision tower (pauses excluded)
        self.encode_s = encode_s  # seconds of the whole encode step (pauses excluded)
        self.committed = False
        self._image = image
        self._prepared = prepared
        self._features = features
        self._session = session

    @property
    def tokens(self) -> int:
        """Tokens the frame adds to the context."""
        return len(self._prepared.input_ids)

    def __repr__(self) -> str:
        state = "committed" if self.committed else "pending"
        return f"EncodedFrame(pts_s={self.pts_s}, source_id={self.source_id!r}, tokens={self.tokens}, {state})"


class AnswerStream:
    """An answer being generated. Iterate it for text deltas; then read :attr:`answer`.

    Stopping early (``close()``, or ``break`` out of a ``for`` loop and dropping the stream) cancels
    generation: the partial answer stays in the dialogue, ``finish_reason`` is ``"cancelled"``.
    With ``return_logits`` the logits of every question token and of each generated step are kept in
    :attr:`logits` (float32, ``[n, V]``), for checks and scoring.
    """

    def __init__(self) -> None:
        self._gen: Iterator[str] = iter(())
        self.answer: Answer | None = None
        self.logits: torch.Tensor | None = None

    def __iter__(self) -> Iterator[str]:
        return self._gen

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def result(self) -> Answer:
        """Run to the end (discarding deltas not yet read) and return the answer."""
        for _ in self._gen:
            pass
        assert self.answer is not None  # set by the generator's last step
        return self.answer


class StreamSession:
    """One stream's context in one model. Not thread-safe: drive it from one thread."""

    #: Language-model layers read to weigh an answer's evidence frames (see :meth:`_evidence_attention`); 0 turns
    #: the weights off (every ``Evidence.weight`` is then None).
    evidence_layers: int = 4

    def __init__(self, adapter: ModelAdapter, config: SessionConfig | None = None, memory: MemoryConfig | None = None) -> None:
        self._restore(adapter, config or SessionConfig(), memory or MemoryConfig())
        self._feed("system", adapter.conversation_start(self.config.system_prompt), 0.0, "default")
        self.runner.take_times()

    def _restore(self, adapter: ModelAdapter, config: SessionConfig, memory: MemoryConfig) -> None:
        self.adapter = adapter
        self.config = config
        self.runner = Runner(adapter, keep_ids=not memory.bounded)
        self.memory = MemoryManager(memory, self.runner)
        self._last_t = -math.inf
        self._generating = False
        #: None while the session is usable; else why it is not (every call then raises SessionBrokenError).
        self.broken: str | None = None

    # ---- snapshots -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save working memory, long-term store and dialogue to directory ``path``; see :meth:`load`."""
        from .snapshot import save_session

        self._check_usable()
        return save_session(self, path)

    @classmethod
    def load(cls, adapter: ModelAdapter, path: str | Path) -> StreamSession:
        """Rebuild a saved session on ``adapter``'s model; the next answer equals the one without the restart.

        Raises :class:`InputError` for a truncated or corrupt snapshot, or one made with another model.
        """
        from .snapshot import load_session

        return load_session(adapter, path)

    # ---- state ---------------------------------------------------------------------------------------
    @property
    def frames(self) -> tuple[Evidence, ...]:
        """The frames in working memory, oldest first."""
        return tuple(Evidence(c.t_start, c.source_id) for c in self.memory.ledger.working() if c.kind == "frame")

    @property
    def last_t(self) -> float:
        """The latest stream time seen (``-inf`` before the first frame or question)."""
        return self._last_t

    def stats(self) -> dict[str, float | int | None]:
        """Memory in numbers: tokens seen (logical) and held (physical), bytes, budget, store, chunk counts."""
        return {
            "logical_tokens": self.runner.logical_length,
            "cache_tokens": self.runner.cache_length,
            "cache_bytes": self.runner.cache_bytes(),
            "frames": len(self.frames),
            **self.memory.stats(),
        }

    def drain_events(self) -> list[MemoryEvent]:
        """Memory events (compression, eviction, spill, drop) since the last call, oldest first."""
        events = list(self.memory.events)
        self.memory.events.clear()
        return events

    def close(self) -> None:
        """Release the long-term store's files. The session is unusable afterwards."""
        self.memory.close()

    @contextmanager
    def scratch(self) -> Iterator[StreamSession]:
        """Work on a throw-away extension of the context; on exit the session is exactly as before.

        Use it to score a probe or time a question without adding to the dialogue::

            with session.scratch():
                session.ask("Is the kettle boiling?")
        """
        self._check_usable()
        mark, last_t, chunks = self.runner.mark(), self._last_t, len(self.memory.ledger.working())
        suspended, self.memory.suspended = self.memory.suspended, True
        try:
            yield self
        finally:
            self.runner.rollback(mark)
            self.memory.forget_newest(len(self.memory.ledger.working()) - chunks)
            self.memory.suspended = suspended
            self._last_t = last_t

    # ---- ingest --------------------------------------------------------------------------------------
    def ingest(self, frame: Frame | np.ndarray, t: float | None = None, *, source_id: str | None = None) -> IngestResult:
        """Encode one frame once and append its tokens (timestamp, image) to the context.

        ``frame`` is a :class:`Frame` or an HxWx3 uint8 RGB array with ``t`` its stream time in
        seconds. Raises :class:`FrameError` or :class:`TimestampError` for bad input, leaving the session
        unchanged. The same as :meth:`encode_frame` then :meth:`commit_frame`.
        """
        self._check_usable()
        image, t, source = self._frame_input(frame, t, source_id)
        self._check_idle()
        return self.commit_frame(self.encode_frame(image, t, source_id=source))

    def encode_frame(
        self, frame: Frame | np.ndarray, t: float | None = None, *, source_id: str | None = None, pause: Callable[[], None] | None = None
    ) -> EncodedFrame:
        """The first half of :meth:`ingest`: check the frame, run the processor and the vision tower once.

        The context does not change (so this may run while an answer stream is open); the result joins
        it with :meth:`commit_frame`. ``pause``, if given, is called between the vision tower's layers
        with the encode suspended: it may use this session freely (answer a question, probe), and the
        encode then continues unchanged. Raises as :meth:`ingest` does for bad input.
        """
        self._check_usable()
        image, t, source = self._frame_input(frame, t, source_id)
        t0 = time.perf_counter()
        prepared = self.adapter.prepare_frame(image, float(t), source)
        self.memory.fits(len(prepared.input_ids))
        prepare_s = time.perf_counter() - t0
        features = self.runner.encode(prepared, pause=pause)
        vision_s = self.runner.last_vision_s
        return EncodedFrame(self, image, prepared, features, vision_s, prepare_s + vision_s)

    def commit_frame(self, encoded: EncodedFrame, t: float | None = None, *, preempt: Callable[[], bool] | None = None) -> IngestResult:
        """The second half of :meth:`ingest`: prefill an :meth:`encode_frame` result into the context.

        ``t`` defaults to the time the frame was encoded for; a later ``t`` (the stream clock moved
        on while the frame was encoded, e.g. a question was answered meanwhile) rewrites the frame's
        timestamp tokens — the processor runs again, the vision tower does not. Each encoded frame is
        committed at most once (:class:`FrameError` otherwise). ``preempt`` is asked before every
        language-model layer: when it answers true the prefill stops and :class:`Preempted` is raised
        with the session unchanged, and the frame can be committed later. Raises
        :class:`TimestampError` if ``t`` is before the latest stream time. If the prefill or the
        memory step after it fails, the commit is undone (see the module docstring) and the frame can
        be committed again.
        """
        self._check_usable()
        if not isinstance(encoded, EncodedFrame) or encoded._session is not self:
            raise FrameError("commit_frame() takes a frame encoded by this session's encode_frame()")
        if encoded.committed:
            raise FrameError(f"the frame at {encoded.pts_s:.3f}s was already committed; a frame joins the context once")
        t = encoded.pts_s if t is None else t
        self._check_time(t, what="frame")
        self._check_idle()
        t0 = time.perf_counter()
        prepared = encoded._prepared
        if float(t) != prepared.pts_s:
            prepared = self._retime(encoded, float(t))
        ids = prepared.input_ids
        prefix = ids.index(self.adapter.image_token_id) if self.adapter.image_token_id in ids else 0
        self.runner.take_times()  # this step's own times only: the encode was timed apart
        with self._step(f"frame commit at {float(t):.3f}s"):
            self._feed("frame", ids, float(t), encoded.source_id, grids=[prepared.grid], encoded=encoded._features, protected_prefix=prefix, abort_if=preempt)
            self._last_t = float(t)
            self.memory.enforce()
            encoded.committed = True
        times = self.runner.take_times()
        total = encoded.encode_s + (time.perf_counter() - t0)
        return IngestResult(float(t), len(ids), encoded.vision_s, times.prefill_s, total)

    def _frame_input(self, frame: Frame | np.ndarray, t: float | None, source_id: str | None) -> tuple[np.ndarray, float, str]:
        """Unpack and check a frame and its time (raises :class:`FrameError` / :class:`TimestampError`)."""
        if isinstance(frame, Frame):
            image, t, source = frame.image, frame.pts_s if t is None else t, frame.source_id
        else:
            image, source = frame, "default"
        source = source_id or source
        if t is None:
            raise TimestampError("ingest() needs the frame's time t in seconds")
        self._check_image(image)
        self._check_time(t, what="frame")
        return image, float(t), source

    def _retime(self, encoded: EncodedFrame, t: float) -> PreparedFrame:
        """The frame's tokens with timestamp ``t`` (the image and its vision output are unchanged)."""
        old = encoded._prepared
        new = self.adapter.prepare_frame(encoded._image, t, encoded.source_id)
        image_id = self.adapter.image_token_id
        if new.grid != old.grid or new.input_ids.count(image_id) != old.input_ids.count(image_id):
            raise FrameError("the frame's image tokens changed when its timestamp was rewritten")  # cannot happen: same image
        return new

    # ---- questions -----------------------------------------------------------------------------------
    def ask(
        self,
        question: str,
        t: float | None = None,
        *,
        sampling: SamplingConfig | None = None,
        on_delta: Callable[[str], None] | None = None,
        answer_format: AnswerFormat = "auto",
        time_range: tuple[float, float] | None = None,
    ) -> Answer:
        """Answer ``question`` at stream time ``t`` (default: the latest time seen) and return the answer.

        ``on_delta`` receives the text as it is generated. See :meth:`ask_stream` for the rules.
        """
        stream = self.ask_stream(question, t, sampling=sampling, answer_format=answer_format, time_range=time_range)
        for delta in stream:
            if on_delta is not None:
                on_delta(delta)
        assert stream.answer is not None
        return stream.answer

    def ask_stream(
        self, question: str, t: float | None = None, *, sampling: SamplingConfig | None = None, return_logits: bool = False,
        answer_format: AnswerFormat = "auto", time_range: tuple[float, float] | None = None,
    ) -> AnswerStream:
        """Start answering ``question`` and return an :class:`AnswerStream` of text deltas.

        ``answer_format`` "time" decodes the answer as one stream time shaped like the frames' stamps
        (``00:12`` for SmolVLM, ``12.0`` for Qwen) and ends it there; the digits are the model's own
        choice, only the shape is fixed. "auto" (default) does that for :func:`is_time_question`
        questions, such as the deferred "Tell me when ..." answer, and leaves other answers free ("text").
        ``time_range`` (stream seconds, first <= last <= ``t``) bounds a time answer further: only times
        that meet it may be said (for a deferred answer, its :attr:`AnswerNow.evidence`: the condition
        began after the first and was seen at the last); it has no effect on an answer that is not a time.

        Input is checked now (empty or over-long question: :class:`QuestionError`; ``t`` before the
        latest frame: :class:`TimestampError`); generation runs as the stream is iterated. The answer
        and the closing of the turn join the context, so the next question sees this exchange. If a
        step of it raises, iteration re-raises it with the whole exchange undone (no :attr:`AnswerStream.answer`):
        ask again, or, if :attr:`broken` is set, close the session.
        """
        self._check_usable()
        if not isinstance(question, str) or not question.strip():
            raise QuestionError("the question is empty")
        if len(question) > self.config.max_question_chars:
            raise QuestionError(f"the question has {len(question)} characters; the limit is {self.config.max_question_chars}")
        if answer_format not in ANSWER_FORMATS:
            raise QuestionError(f"answer_format: must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")
        if t is None:
            t = self._last_t if math.isfinite(self._last_t) else 0.0
        self._check_time(t, what="question")
        self._check_idle()
        if time_range is not None:
            time_range = _check_time_range(time_range, float(t))
        timed = answer_format == "time" or (answer_format == "auto" and is_time_question(question))
        stream = AnswerStream()
        stream._gen = self._generate(question.strip(), float(t), sampling or self.config.sampling, stream, return_logits,
                                     (time_range or (None, float(t))) if timed else None)
        return stream

    def probe(self, prompts: list[str]) -> list[float]:
        """P(yes) for each yes/no ``prompt`` about the context as it is now, e.g. "Is the kettle boiling?".

        All prompts are asked at once, each as a question on its own throw-away extension of the cache
        (one forward with a block-diagonal mask, exactly equal to asking them one by one), and rolled
        back: probing never changes memory or the dialogue. The probability is renormalised over the
        model's "yes" and "no" first tokens.
        """
        self._check_usable()
        self._check_idle()
        if not prompts:
            return []
        if any(not p.strip() for p in prompts):
            raise QuestionError("a probe prompt is empty")
        yes, no = self.adapter.yes_no_ids()
        with self._step("probe"):
            logits = self.runner.last_logits_of_branches([self.adapter.question_ids(p.strip()) for p in prompts])
        log_probs = torch.log_softmax(logits, dim=-1)
        pair = torch.stack([torch.logsumexp(log_probs[:, yes], -1), torch.logsumexp(log_probs[:, no], -1)], dim=-1)
        return [float(p) for p in torch.softmax(pair, dim=-1)[:, 0]]

    # ---- internals -----------------------------------------------------------------------------------
    def _generate(self, question: str, t: float, cfg: SamplingConfig, stream: AnswerStream, return_logits: bool,
                  timed: tuple[float | None, float] | None) -> Iterator[str]:
        self._check_usable()
        self._check_idle()  # another stream may have started since this one was created
        self._check_time(t, what="question")
        with self._step("question"):
            self._generating = True
            try:
                yield from self._answer(question, t, cfg, stream, return_logits, timed)
            finally:
                self._generating = False

    def _answer(self, question: str, t: float, cfg: SamplingConfig, stream: AnswerStream, return_logits: bool,
                timed: tuple[float | None, float] | None) -> Iterator[str]:
        """The body of one question step; a fault propagates to :meth:`_step`, which undoes the whole exchange.
        ``timed``: the answer is one time, within (earliest or None, latest)."""
        start = time.perf_counter()
        mask = None
        if timed is not None:
            shape = time_shape(self.adapter)
            mask = TimeAnswerMask(self.adapter.token_texts(), self.adapter.stop_ids, shape, lead_digits(shape, t),
                                  latest_s=timed[1], earliest_s=timed[0])
        generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        prompt_ids = self.adapter.question_ids(question)
        retrieved = self.memory.retrieve(prompt_ids)  # placed at the end of the cache: undoing the step crops it away
        evidence, attention = self._evidence_attention(retrieved)
        logits = self._feed("question", prompt_ids, t, "user", all_logits=return_logits, attention=attention)
        self._last_t = t
        self.memory.record("answer", t, t, "assistant", self.runner.last_positions[:, :0])
        stop_ids = self.adapter.stop_ids
        generated: list[int] = []
        kept: list[torch.Tensor] = []
        if return_logits:
            kept.append(logits)
            logits = logits[-1]
        pending: int | None = None  # generated but not yet fed to the cache
        finish, emitted, ttft = "cancelled", "", 0.0
        closing = True  # close the turn on the way out: after the end, or a cancel; not after a fault
        try:
            for _ in range(cfg.max_new_tokens):
                if pending is not None:
                    logits = self.runner.decode(pending)
                    self.memory.extend(self.runner.last_positions)
                    if return_logits:
                        kept.append(logits[None])
                    pending = None
                token = pick_token(logits, cfg, generator, self.adapter.banned_ids, mask)
                if token in stop_ids:
                    finish = "stop"
                    break
                if mask is not None:
                    mask.feed(token, self.adapter.decode([token]))
                generated.append(token)
                pending = token
                ttft = ttft or time.perf_counter() - start
                text = self.adapter.decode(generated)
                if text.startswith(emitted) and not text.endswith("\ufffd") and len(text) > len(emitted):
                    delta, emitted = text[len(emitted):], text
                    yield delta
            else:
                finish = "length"
            text = self.adapter.decode(generated)
            if len(text) > len(emitted) and text.startswith(emitted):
                yield text[len(emitted):]
        except GeneratorExit:  # the reader stopped early: a cancel, the partial answer stays
            raise
        except BaseException:
            closing = False  # a fault: the step is undone, nothing of this exchange stays
            raise
        finally:
            if closing:
                # Close the assistant turn (with the last generated token if it was not fed yet), so the
                # next question or frame continues a well-formed dialogue.
                self.runner.prefill(([pending] if pending is not None else []) + self.adapter.turn_end_ids())
                self.memory.extend(self.runner.last_positions)
                if retrieved is not None:
                    self.memory.release(retrieved)
                self.memory.enforce()
                self.runner.take_times()
                if return_logits:
                    stream.logits = torch.cat(kept)
                weights = attention.shares() if attention is not None else None
                if weights is not None:
                    evidence = tuple(replace(e, weight=w) for e, w in zip(evidence, weights))
                stream.answer = Answer(
                    text=self.adapter.decode(generated).strip(),
                    token_ids=tuple(generated),
                    asked_at_s=t,
                    evidence=evidence,
                    finish_reason=finish,
                    ttft_s=ttft or (time.perf_counter() - start),
                    total_s=time.perf_counter() - start,
                    question=question,
                    prompt_tokens=len(prompt_ids),
                    context_tokens=self.runner.cache_length,
                )

    def _evidence_attention(self, retrieved: Retrieved | None) -> tuple[tuple[Evidence, ...], SpanAttention | None]:
        """The answer's evidence frames (working and retrieved, oldest first) and the attention reader that weighs them.

        Each frame's span is its visual tokens in the cache (its timestamp text left out); the reader
        takes the question's last position (the one that writes the first answer token), against the
        question's first position as the baseline of what any query attends to, on
        :attr:`evidence_layers` layers spread over the middle of the language model (see
        :meth:`SpanAttention.shares`). The reader is None when there are no frames or the weights are off.
        """
        pairs: list[tuple[Evidence, tuple[int, int]]] = []
        offset = 0
        for chunk in self.memory.ledger.working():
            if chunk.kind == "frame":
                prefix = min(chunk.protected_prefix, max(0, chunk.tokens_held - 1))
                pairs.append((Evidence(chunk.t_start, chunk.source_id), (offset + prefix, offset + chunk.tokens_held)))
            offset += chunk.tokens_held
        if retrieved is not None:
            pairs += zip(retrieved.evidence, retrieved.spans)
        pairs.sort(key=lambda pair: pair[0].pts_s)
        evidence = tuple(e for e, _ in pairs)
        layers = _evidence_layers(len(self.adapter.text_layers()), self.evidence_layers)
        if not pairs or not layers:
            return evidence, None
        return evidence, SpanAttention([span for _, span in pairs], layers)

    @contextmanager
    def _step(self, what: str) -> Iterator[None]:
        """Run one step that changes the context; if it raises, undo it or mark the session broken.

        Undoing crops the cache back to its length at the start and forgets the chunks booked since,
        which is exact as long as memory did not compact during the step (compaction rewrites tokens
        older than the step). A fault after compaction began sets :attr:`broken`. The exception is
        re-raised either way; a reader that stops an answer early (``GeneratorExit``) is not a fault.
        """
        mark = _StepMark(self.runner.mark(), len(self.memory.ledger.working()), self._last_t, self.memory.edits)
        try:
            yield
        except GeneratorExit:
            raise
        except BaseException as exc:
            self._undo(what, mark, exc)
            raise

    def _undo(self, what: str, mark: _StepMark, exc: BaseException) -> None:
        reason = f"the {what} failed: {_describe(exc)}"
        if self.memory.edits != mark.edits:
            self.broken = f"{reason}, after memory compaction had begun; working memory cannot be restored"
            return
        try:
            self.runner.rollback(mark.runner)
            self.memory.forget_newest(max(0, len(self.memory.ledger.working()) - mark.chunks))
        except BaseException as again:
            self.broken = f"{reason}; undoing it failed too: {_describe(again)}"
            return
        self._last_t = mark.last_t

    def _feed(
        self, kind: str, ids: list[int], t: float, source: str, *, grids=None, encoded=None, all_logits: bool = False, protected_prefix: int = 0,
        abort_if: Callable[[], bool] | None = None, attention: SpanAttention | None = None,
    ) -> torch.Tensor:
        """Prefill one chunk and book it in the ledger."""
        logits = self.runner.prefill(ids, grids=grids, encoded=encoded, all_logits=all_logits, abort_if=abort_if, attention=attention)
        self.memory.record(kind, t, t, source, self.runner.last_positions, protected_prefix)
        return logits

    def _check_image(self, image: object) -> None:
        if not isinstance(image, np.ndarray):
            raise FrameError(f"a frame must be a numpy array, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise FrameError(f"a frame must be HxWx3 RGB, got shape {tuple(image.shape)}")
        if image.dtype != np.uint8:
            raise FrameError(f"a frame must be uint8, got {image.dtype}; convert with image.astype(np.uint8) after scaling to 0..255")
        h, w = image.shape[:2]
        lo, hi = self.config.min_frame_side, self.config.max_frame_side
        if min(h, w) < lo or max(h, w) > hi:
            raise FrameError(f"a frame of {w}x{h} pixels is outside the accepted sides {lo}..{hi}")

    def _check_time(self, t: float, *, what: str) -> None:
        if not isinstance(t, (int, float)) or not math.isfinite(t):
            raise TimestampError(f"the {what} time must be a finite number of seconds, got {t!r}")
        if t < self._last_t:
            raise TimestampError(f"the {what} time {t:.3f}s is before the latest stream time {self._last_t:.3f}s")

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise SessionBrokenError(self.broken)

    def _check_idle(self) -> None:
        if self._generating:
            raise QuestionError("an answer is still being generated; read it to the end or close() it first")


def _evidence_layers(total: int, count: int) -> tuple[int, ...]:
    """``count`` layer indices spread evenly over the middle half of ``total`` layers (all of them if fewer)."""
    if count <= 0 or total <= 0:
        return ()
    if count >= total:
        return tuple(range(total))
    lo, hi = total // 4, total - 1 - total // 4
    picks = sorted({round(lo + (hi - lo) * i / max(1, count - 1)) for i in range(count)})
    return tuple(picks)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
