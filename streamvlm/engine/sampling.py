"""Choosing the next token from logits: greedy, or temperature with top-k / top-p; and time-shaped answers.

A *time answer* (the answer to "Tell me when a red circle appears." or "When did ... appear?") is a
stream time written the way the model's adapter writes it before every frame: ``MM:SS`` for SmolVLM
(``"\\nFrame from 00:12:"``), ``S.S`` seconds for Qwen (``"<12.0 seconds>"``). :class:`TimeAnswerMask`
constrains decoding to that shape and to a range of times (never after the answer's moment; for a
deferred answer, within the evidence its trigger fired on): which of the times left is said is the
model's choice (evidence that lies within one second of the clock leaves that second alone), and once a
whole time is written the only token left is the end of the answer, so an answer cannot run on into
``00:1777 square square ...``. This is grammar-constrained decoding in the manner of Outlines'
regex-guided generation and llama.cpp's GBNF grammars, reduced to one tiny automaton per shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from ..config import SamplingConfig
from ..errors import ConfigError

__all__ = ["pick_token", "TimeShape", "TIME_SHAPES", "TimeAnswerMask", "clock_step", "seconds_step", "shape_accepts",
           "lead_digits", "earliest_value", "completion_spans"]

TimeShape = Literal["clock", "seconds"]

#: One automaton step: (state, character) -> next state, or None when the character breaks the shape.
_Step = Callable[[tuple[int, int], str, int], "tuple[int, int] | None"]
#: The accepting state of both shapes.
_DONE = (9, 0)


def clock_step(state: tuple[int, int], ch: str, lead: int = 2) -> tuple[int, int] | None:
    """``MM:SS``: two to ``lead`` minute digits, ``:``, a seconds digit 0-5, a digit. States are (phase, count)."""
    phase, count = state
    if phase == 0:  # minutes
        if ch.isdigit() and ch.isascii() and count < max(2, lead):
            return (0, count + 1)
        if ch == ":" and count >= 2:
            return (1, 0)
        return None
    if phase == 1:  # seconds
        if count == 0 and ch in "012345":
            return (1, 1)
        if count == 1 and ch.isdigit() and ch.isascii():
            return _DONE
    return None


def seconds_step(state: tuple[int, int], ch: str, lead: int = 6) -> tuple[int, int] | None:
    """``S.S``: one to ``lead`` digits, ``.``, one digit (the way Qwen adapters stamp frames: ``12.0``)."""
    phase, count = state
    digit = ch.isdigit() and ch.isascii()
    if phase == 0:
        if digit and count < max(1, lead):
            return (0, count + 1)
        if ch == "." and count >= 1:
            return (1, 0)
        return None
    if phase == 1 and digit:
        return _DONE
    return None


TIME_SHAPES: dict[str, _Step] = {"clock": clock_step, "seconds": seconds_step}


def lead_digits(shape: TimeShape, latest_s: float) -> int:
    """How many leading digits a time of ``shape`` may have in a stream whose latest time is ``latest_s``:
    minutes for a clock (at least 2, as ``00:12``), whole seconds for "seconds" (at least 1)."""
    whole = int(max(0.0, latest_s) // 60) if shape == "clock" else int(max(0.0, latest_s))
    return max(2 if shape == "clock" else 1, len(str(whole)))


def shape_accepts(shape: TimeShape, text: str, lead: int = 4) -> bool:
    """Whether ``text`` (leading and trailing white space aside) is one whole time of ``shape`` with at most
    ``lead`` leading digits."""
    step, state = TIME_SHAPES[shape], (0, 0)
    for ch in text.strip():
        nxt = step(state, ch, lead)
        if nxt is None:
            return False
        state = nxt
    return state == _DONE


def earliest_value(shape: TimeShape, prefix: str) -> float:
    """The smallest number of seconds any whole time of ``shape`` starting with ``prefix`` can stand for
    (digits still to come count as zeros: ``"00:1"`` -> 10.0, ``"1"`` as a clock -> 600.0)."""
    if shape == "clock":
        minutes, _, seconds = prefix.partition(":")
        return int(minutes.ljust(2, "0") or "0") * 60.0 + int(seconds.ljust(2, "0") or "0")
    whole, _, tenth = prefix.partition(".")
    return int(whole or "0") + int(tenth or "0") / 10.0


def completion_spans(shape: TimeShape, prefix: str, lead: int) -> list[tuple[float, float]]:
    """The stretches of stream time, ``[start, end)`` seconds, that the whole times of ``shape`` starting with
    ``prefix`` name: a clock names a whole second (``"00:22"`` -> [22, 23)), "seconds" a tenth (``"12.3"`` ->
    [12.3, 12.4)). While the leading digits may still grow (up to ``lead``), one stretch per length:
    ``"1"`` as "seconds" with ``lead`` 2 is [1, 2) or [10, 20), nothing between."""
    if shape == "clock":
        head, sep, tail = prefix.partition(":")
        unit, shortest, longest = 60.0, 2, max(2, lead)
    else:
        head, sep, tail = prefix.partition(".")
        unit, shortest, longest = 1.0, 1, max(1, lead)
    if sep:
        whole = int(head) * unit
        if shape == "clock":
            size = {0: 60, 1: 10}.get(len(tail), 1)
            low = whole + (int(tail) * (10 if len(tail) == 1 else 1) if tail else 0)
            return [(low, low + size)]
        return [(whole + int(tail) / 10, whole + (int(tail) + 1) / 10)] if tail else [(whole, whole + 1.0)]
    spans = []
    for digits in range(max(len(head), shortest), longest + 1):
        low, high = int(head.ljust(digits, "0") or "0"), int(head.ljust(digits, "9") or "0")
        spans.append((low * unit, (high + 1) * unit))
    return spans


class TimeAnswerMask:
    """The tokens a time answer of ``shape`` may take next, given what it has generated so far.

    Built from every token's text (``token_texts[i]`` is token ``i`` decoded alone); only tokens made of
    digits and the shape's separator are candidates, so each step checks a few hundred tokens even in a
    150,000-token vocabulary. White space may open the answer, glued to its first token (``" 00"``) or
    as one token of its own, never inside the time. Once the time is whole, :meth:`allowed` returns
    ``stop_ids``: the caller's next token ends the answer. ``lead`` caps the leading digits (minutes of
    a clock, whole seconds): :func:`lead_digits` of the stream's latest time. ``latest_s``, when given,
    also refuses times after it (a moment the stream has not reached), and ``earliest_s`` times that end
    before it (a clock names a whole second: with ``earliest_s=22.0``, ``00:22`` may be said and
    ``00:21`` not); which of the times left is said stays the model's choice.
    """

    def __init__(self, token_texts: Sequence[str], stop_ids: frozenset[int], shape: TimeShape = "clock", lead: int = 2,
                 latest_s: float | None = None, earliest_s: float | None = None) -> None:
        if shape not in TIME_SHAPES:
            raise ConfigError(f"answer shape: must be one of {', '.join(TIME_SHAPES)}, got {shape!r}")
        if not stop_ids:
            raise ConfigError("a time answer needs the model's end-of-answer token to stop at; the adapter has none")
        self.shape = shape
        self.stop_ids = frozenset(stop_ids)
        self.lead = lead
        self.latest_s = latest_s
        self.earliest_s = earliest_s
        self._step = TIME_SHAPES[shape]
        chars = set("0123456789:.")
        self._candidates = [(i, text) for i, text in enumerate(token_texts)
                            if text.strip() and len(text.strip()) <= 8 and set(text.strip()) <= chars]
        self._spaces = [i for i, text in enumerate(token_texts) if text and not text.strip() and len(text) <= 2]
        self._state: tuple[int, int] = (0, 0)
        self._written = ""  # the characters of the time so far
        self._opened = False  # any token was written (white space may only open the answer)

    @property
    def done(self) -> bool:
        """Whether a whole time has been generated (only the end of the answer may follow)."""
        return self._state == _DONE

    @property
    def written(self) -> str:
        """The time as generated so far (without the opening white space)."""
        return self._written

    def _advance(self, text: str) -> tuple[tuple[int, int], str] | None:
        """The state and written time after ``text``, or None if it breaks the shape or leaves
        [``earliest_s``, ``latest_s``]."""
        if not self._written:
            text = text.lstrip()
        elif text != text.strip():
            return None  # no white space inside a time
        state: tuple[int, int] | None = self._state
        for ch in text:
            state = self._step(state, ch, self.lead)
            if state is None:
                return None
        written = self._written + text
        earliest = -math.inf if self.earliest_s is None else self.earliest_s + 1e-6
        latest = math.inf if self.latest_s is None else self.latest_s + 1e-6
        # Kept only if some whole time it can still become meets [earliest_s, latest_s]: no dead end on the way.
        if not any(start <= latest and end > earliest for start, end in completion_spans(self.shape, written, self.lead)):
            return None
        return state, written

    def allowed(self) -> list[int]:
        """Token ids that keep the answer a prefix of one time (``stop_ids`` once it is whole)."""
        if self.done:
            return sorted(self.stop_ids)
        allowed = [i for i, text in self._candidates if self._advance(text) is not None]
        return allowed + self._spaces if not self._opened else allowed

    def feed(self, token_id: int, text: str) -> None:
        """Record the chosen token (``text`` is its decoded text); raises ConfigError for a token :meth:`allowed` refused."""
        if token_id in self.stop_ids:
            return
        if not self._opened and text and not text.strip():
            self._opened = True
            return
        step = self._advance(text)
        if step is None:
            raise ConfigError(f"token {token_id} ({text!r}) does not continue a {self.shape} time")
        self._state, self._written = step
        self._opened = True

    def copy(self) -> "TimeAnswerMask":
        """An independent copy at the same point of the time (the candidate lists are shared)."""
        other = object.__new__(TimeAnswerMask)
        other.__dict__.update(self.__dict__)
        return other

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with every token outside :meth:`allowed` at minus infinity (a copy)."""
        allowed = self.allowed()
        masked = torch.full_like(logits, float("-inf"))
        if allowed:
            index = torch.tensor(allowed, dtype=torch.long, device=logits.device)
            masked[index] = logits[index]
        return masked


def pick_token(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None, banned: frozenset[int] = frozenset(),
    mask: TimeAnswerMask | None = None,
) -> int:
    """The next token id for ``logits`` ``[V]`` under ``cfg``; greedy when ``cfg.temperature == 0``.

    ``banned`` ids are never chosen (image placeholders: text cannot stand in for pixels). With
    ``mask``, only the tokens it allows are chosen (the caller feeds the choice back with
    :meth:`TimeAnswerMask.feed`).
    """
    if mask is not None:
        logits = mask.apply(logits)
    if banned:
        logits = logits.clone()
        logits[list(banned)] = float("-inf")
    if cfg.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(scores, min(cfg.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
