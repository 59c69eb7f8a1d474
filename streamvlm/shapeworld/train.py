"""Train the ShapeWorld model from scratch, from a seed, on a CPU (or a GPU with ``--device cuda``).

Every training example is one ShapeWorld stream laid out token for token as the engine lays it out
at inference: the conversation start, then for each frame its ``Frame from MM:SS:`` text and visual
tokens, and at half seconds questions with their answers and the turn ends, as
:class:`~streamvlm.engine.session.StreamSession` writes them. The pieces come from the
:class:`~streamvlm.models.smolvlm.SmolVLMAdapter` itself, so training and serving cannot drift apart.
Only answer tokens (and the end of turn after them) carry a loss.

Questions cover the benchmark's categories (see :mod:`streamvlm.shapeworld.questions`), plus the two
yes/no probe wordings the engine uses ("Is there a red circle now?" and the dialogue controller's
"Is it true that a red circle appears right now? Answer yes or no.") and "Tell me when a red circle
appears." asked once it is on screen (the deferred question's final answer). A warm-up of short
2-4-frame streams with present-tense questions comes first.

Seeds: training episodes use seeds from :data:`TRAIN_SEED_BASE` up; evaluation during training uses
:data:`EVAL_SEED_BASE`; the quality benchmark uses seeds below both, so it is held out.

Run: ``python -m streamvlm.shapeworld.train --steps N --out DIR``; the shipped model's stages and their
commands are in its model card (``checkpoint/README.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..dialogue.controller import DEFAULT_PROBE_TEMPLATE
from ..errors import ConfigError
from ..models.smolvlm import SmolVLMAdapter
from .model import FRAME_SIZE, SYSTEM_PROMPT, VOCAB_SIZE, build_untrained
from .questions import QA, appearances, candidates, clock, parse_clock, probe_question, spoken_answer
from .world import COLOURS, SHAPES, Episode, make_episode

__all__ = ["TrainConfig", "StreamLayout", "train", "model_card", "write_card", "TRAIN_SEED_BASE", "EVAL_SEED_BASE"]

TRAIN_SEED_BASE = 1_000_000
EVAL_SEED_BASE = 500_000
_IGNORE = -100
# Relative frequency of each kind of training question.
_MIX = {"count": 2, "shape": 2, "colour": 2, "probe": 5, "first": 1, "when": 3, "tell": 1, "bind_colour": 2, "bind_shape": 2,
        "tell_now": 0}
#: Kinds the evaluation during training asks (and the model card's curves show).
_EVALUATED = [kind for kind, weight in _MIX.items() if weight]
#: Kinds asked during the short warm-up (present tense only).
_PRESENT = ("count", "shape", "colour", "probe", "bind_colour", "bind_shape")
#: Fewest recent frames a budgeted stream keeps: every memory policy keeps the last two (the quality
#: benchmark's 10 % budget keeps 2 of a 24 s episode's frames, its 25 % budget 6).
MIN_WINDOW = 2


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # length of the learning-rate schedule
    stop_after: int | None = None  # stop (and save) after this many steps of it; None = all
    batch: int = 8
    lr: float = 1e-3
    warmup_steps: int = 100  # linear learning-rate warm-up
    short_steps: int = 400  # the first steps use 2-4-frame streams with present-tense questions only
    short_every: int = 0  # after those, every short_every-th step is such a step as well (0 = none)
    min_duration_s: int = 6
    max_duration_s: int = 24
    ask_probability: float = 0.9  # chance a question is asked at each half second
    seed: int = 0
    threads: int = 1
    eval_every: int = 200
    eval_streams: int = 32
    init: str | None = None  # start from this checkpoint's weights instead of a fresh initialisation
    mix: dict[str, int] = field(default_factory=lambda: dict(_MIX))  # relative frequency of each question kind
    # Share of "no" probes asked about a near miss (its colour or its shape is on screen on another shape).
    hard_negatives: float = 0.0
    # Chance that another question follows a question at the same moment, before the next frame (at most
    # three in a row): users ask in quick succession and the dialogue controller probes right after an answer.
    follow_ups: float = 0.0
    # Steps of vision pre-training before the language steps (see pretrain_vision); 0 = none.
    vision_steps: int = 0
    # Keep the vision tower and connector as they are (for instance after vision pre-training): language
    # training alone wears the binding down before the language model has learned to read it.
    freeze_vision: bool = False
    device: str = "cpu"  # "cuda" trains on a GPU: same data and steps, different rounding
    # Share of streams laid out as a memory budget leaves them (see Stream.budget): each frame and each
    # question sees only the last 2 to budget_window frames, a question also up to budget_recall older ones.
    budgeted: float = 0.0
    budget_window: int = 6
    budget_recall: int = 4
    workers: int = 0  # processes that lay out the next batches while the model trains (0 = the main process)
    # Share of streams whose clock starts late: every frame stamp and every time answer is shifted by a
    # whole number of seconds drawn from 1 to clock_offset_max, so minute clocks (01:51, 12:07) are read
    # and spoken while the stream itself stays 6-24 frames long (positions within what the model knows).
    clock_offset: float = 0.0
    clock_offset_max: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.mix) - set(_MIX)
        if unknown or not self.mix or any(not isinstance(w, int) or w < 0 for w in self.mix.values()) or not any(self.mix.values()):
            raise ConfigError(f"mix: integer weights >= 0 (not all 0) for kinds among {', '.join(_MIX)}, got {self.mix!r}")
        if not isinstance(self.vision_steps, int) or self.vision_steps < 0:
            raise ConfigError(f"vision_steps must be an integer >= 0, got {self.vision_steps!r}")
        if not 0.0 <= self.follow_ups < 1.0:
            raise ConfigError(f"follow_ups must be a probability in [0, 1), got {self.follow_ups!r}")
        if not 0.0 <= self.budgeted <= 1.0:
            raise ConfigError(f"budgeted must be a share in [0, 1], got {self.budgeted!r}")
        if not isinstance(self.budget_window, int) or self.budget_window < MIN_WINDOW:
            raise ConfigError(f"budget_window must be an integer >= {MIN_WINDOW}, got {self.budget_window!r}")
        if not isinstance(self.budget_recall, int) or self.budget_recall < 1:
            raise ConfigError(f"budget_recall must be an integer >= 1, got {self.budget_recall!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"workers must be an integer >= 0, got {self.workers!r}")
        if not 0.0 <= self.clock_offset <= 1.0:
            raise ConfigError(f"clock_offset must be a share in [0, 1], got {self.clock_offset!r}")
        if not isinstance(self.clock_offset_max, int) or isinstance(self.clock_offset_max, bool) or self.clock_offset_max < 0:
            raise ConfigError(f"clock_offset_max must be an integer >= 0 (seconds), got {self.clock_offset_max!r}")
        if self.clock_offset > 0 and self.clock_offset_max < 1:
            raise ConfigError("clock_offset needs clock_offset_max >= 1 second: the latest start of a stream's clock")


@dataclass
class Stream:
    """One training stream: token ids, per-token targets (``-100`` where no loss), frames (``H x W x 3``
    uint8, as rendered), answer spans, and for each token the frame it belongs to (-1: none) and the
    index of the latest frame at or before it; each question span (first token, end) with the frame
    its answer rests on (-1: the present one). :meth:`budget` turns it into a budgeted stream."""

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    answers: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, first label index, end)
    frame_of: list[int] = field(default_factory=list)
    step_of: list[int] = field(default_factory=list)
    questions: list[tuple[int, int, int]] = field(default_factory=list)  # (first token, end, evidence frame)
    window: int | None = None  # None: every token sees the whole past
    offset: int = 0  # seconds the clock had run when the stream's first frame came (stamps read t + offset)
    recalled: list[list[int]] = field(default_factory=list)  # per question: older frames it sees again

    def budget(self, rng: np.random.Generator, most_recent: int = 6, most_recalled: int = 4) -> None:
        """Lay the stream out as a working-memory budget with retrieval leaves it at inference.

        Every frame's tokens see the previous ``window`` frames and no earlier ones (what the cache
        holds while the frame is fed; ``window`` is drawn from :data:`MIN_WINDOW` to ``most_recent``), a
        question and its answer the last ``window`` frames plus 1 to ``most_recalled`` older frames
        brought back from the store: always the frame the answer rests on (the first appearance for "when", the first
        shape's entry for "first"), the rest drawn at random. Positions stay those of the full stream,
        as the engine keeps them; the dialogue and the system prompt stay visible, as the quality
        benchmark keeps them. Without this a model trained only on whole streams misreads what a
        budget leaves: at a 10 % budget, with the frame of the answer brought back, the stage-5 model
        (trained on whole streams) answered 23 of 36 "When did ... appear?" right against 30 of 36 with full memory.
        """
        self.window = int(rng.integers(MIN_WINDOW, most_recent + 1))
        self.recalled = []
        for start, _end, evidence in self.questions:
            older = list(range(self.step_of[start] - self.window + 1))
            picked = [evidence] if 0 <= evidence < len(older) else []
            others = [f for f in older if f != evidence]
            extra = min(len(others), int(rng.integers(1, most_recalled + 1)) - len(picked))
            if extra > 0:
                picked += [others[i] for i in rng.choice(len(others), size=extra, replace=False)]
            self.recalled.append(sorted(picked))

    def attention(self, width: int) -> np.ndarray:
        """Which tokens each token attends to, ``[width, width]`` bool (padding beyond the stream sees itself)."""
        n = len(self.ids)
        allowed = np.eye(width, dtype=bool)
        causal = np.tril(np.ones((n, n), dtype=bool))
        if self.window is not None:
            frame, step = np.array(self.frame_of), np.array(self.step_of)
            oldest = step - self.window + (frame < 0)  # a frame sees `window` before it; what follows, the last `window`
            visible = (frame[None, :] < 0) | ((frame[None, :] >= oldest[:, None]) & (frame[None, :] <= step[:, None]))
            for (start, end, _), frames in zip(self.questions, self.recalled):
                visible[start:end] |= np.isin(frame, frames)[None, :]
            causal &= visible
        allowed[:n, :n] = causal
        return allowed


@dataclass
class Batch:
    """Right-padded streams as tensors: ``ids`` and ``labels`` are ``(B, T)``, ``mask`` is ``(B, T)`` (padding)
    or, when a stream is budgeted, ``(B, 1, T, T)`` (who attends to whom); ``frames`` holds every stream's
    frames in order, ``(N, H, W, 3)`` uint8 (a quarter of the bytes of pixels, for worker processes)."""

    ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    frames: torch.Tensor

    @classmethod
    def of(cls, streams: list[Stream], pad_id: int) -> Batch:
        width = max(len(s.ids) for s in streams)
        ids = torch.full((len(streams), width), pad_id, dtype=torch.long)
        labels = torch.full((len(streams), width), _IGNORE, dtype=torch.long)
        mask = torch.zeros((len(streams), width), dtype=torch.long)
        for i, s in enumerate(streams):
            ids[i, : len(s.ids)] = torch.tensor(s.ids)
            labels[i, : len(s.labels)] = torch.tensor(s.labels)
            mask[i, : len(s.ids)] = 1
        if any(s.window is not None for s in streams):
            mask = torch.from_numpy(np.stack([s.attention(width) for s in streams]))[:, None]
        return cls(ids, labels, mask, torch.from_numpy(np.stack([f for s in streams for f in s.frames])))

    def to(self, device: str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (self.ids, self.labels, self.mask, self.frames)))


def pixels(frames: torch.Tensor) -> torch.Tensor:
    """Rendered frames ``(N, H, W, 3)`` uint8 -> what the model reads, ``(N, 1, 3, H, W)`` in [-1, 1]: the
    image processor's rescale and normalisation (checked against it by :class:`StreamLayout`)."""
    return ((frames.float() / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2)[:, None]


class StreamLayout:
    """Builds token layouts with the engine's own adapter (chat format, frame segments, turn ends)."""

    def __init__(self, adapter: SmolVLMAdapter) -> None:
        self.adapter = adapter
        self.start = adapter.conversation_start(SYSTEM_PROMPT)
        self.turn_end = adapter.turn_end_ids()
        self.stop = adapter.end_of_utterance_id
        blank = np.full((FRAME_SIZE, FRAME_SIZE, 3), 40, np.uint8)
        self._frame_cache: dict[int, list[int]] = {}
        # The engine reads frames through the image processor; training computes the same pixels directly.
        reference = adapter.prepare_frame(blank, 0.0).pixels["pixel_values"][0, 0].numpy()
        if not np.allclose(reference, pixels(torch.from_numpy(blank[None]))[0, 0].numpy(), atol=1e-6):
            raise RuntimeError("training pixels differ from the image processor's; the recipe is out of date")

    def frame_ids(self, t: float) -> list[int]:
        key = int(t)
        if key not in self._frame_cache:
            self._frame_cache[key] = self.adapter.prepare_frame(np.full((FRAME_SIZE, FRAME_SIZE, 3), 40, np.uint8), t).input_ids
        return self._frame_cache[key]

    def stream(self, episode: Episode, questions: list[tuple[float, str, str, str]], offset: int = 0) -> Stream:
        """Lay out ``episode`` at 1 frame/s with ``questions`` = (t, kind, question, answer text), sorted by t.

        ``offset`` (whole seconds) is where the clock stood at the first frame: frame ``t`` is stamped
        ``t + offset``; the answers must already speak that clock (see :func:`shift_clock`).
        """
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ConfigError(f"offset must be a whole number of seconds >= 0, got {offset!r}")
        out = Stream(offset=offset)
        pending = list(questions)
        first_entry = min((e.t for e in episode.events if e.kind == "enter"), default=None)

        def add(ids: list[int], labels: list[int], frame: int, step: int) -> None:
            out.ids.extend(ids)
            out.labels.extend(labels)
            out.frame_of.extend([frame] * len(ids))
            out.step_of.extend([step] * len(ids))

        add(self.start, [_IGNORE] * len(self.start), -1, -1)
        for index, t in enumerate(episode.frame_times()):
            seg = self.frame_ids(t + offset)
            add(seg, [_IGNORE] * len(seg), index, index)
            out.frames.append(episode.render(t))
            while pending and pending[0][0] < t + 1:
                _, kind, question, answer = pending.pop(0)
                q = self.adapter.question_ids(question)
                a = self.adapter.text_ids(" " + answer)
                start = len(out.ids)
                add(q, [_IGNORE] * (len(q) - 1) + [a[0]], -1, index)
                first = len(out.labels) - 1
                add(a, a[1:] + [self.stop], -1, index)
                out.answers.append((kind, first, len(out.labels)))
                out.questions.append((start, len(out.ids), _evidence_frame(kind, answer, first_entry, offset)))
                add(self.turn_end, [_IGNORE] * len(self.turn_end), -1, index)
        return out


#: Question kinds whose answer is a clock time (and so moves with a stream's clock offset).
_TIMED = ("when", "tell", "tell_now")


def shift_clock(questions: list[tuple[float, str, str, str]], offset: int) -> list[tuple[float, str, str, str]]:
    """``questions`` (t, kind, question, answer) with every time answer moved ``offset`` seconds later, as a
    stream whose clock stood at ``offset`` at its first frame speaks it; other answers unchanged."""
    return [(t, kind, q, clock(parse_clock(a) + offset) if kind in _TIMED else a) for t, kind, q, a in questions]


def _evidence_frame(kind: str, answer: str, first_entry: float | None, offset: int = 0) -> int:
    """The frame (at 1 frame/s, its index is its second) an answer rests on when it is in the past: the
    appearance a time answer names (less the stream's clock ``offset``), the first shape's entry for
    "first"; -1 for the present."""
    if kind in _TIMED:
        return int(parse_clock(answer)) - offset
    if kind == "first" and first_entry is not None:
        return int(math.ceil(first_entry))
    return -1


def _pick_questions(episode: Episode, rng: np.random.Generator, mix: dict[str, int], *, short: bool,
                    ask_probability: float, hard_negatives: float = 0.0, follow_ups: float = 0.0) -> list[tuple[float, str, str, str]]:
    """Questions for a training stream at half seconds, kinds drawn with the weights ``mix``; each one is
    followed by another at the same moment with probability ``follow_ups`` (at most three in a row)."""
    by_t: dict[float, dict[str, list[QA]]] = {}
    for cat, qas in candidates(episode).items():
        for qa in qas:
            by_t.setdefault(qa.t, {}).setdefault(cat, []).append(qa)
    kinds = [k for k, w in mix.items() if w > 0 and (not short or k in _PRESENT)]
    if not kinds:
        return []
    weights = np.array([mix[k] for k in kinds], dtype=float)
    out = []
    for t, cats in sorted(by_t.items()):
        if rng.random() > ask_probability:
            continue
        for _ in range(3):
            for _ in range(4):  # a few tries to find a kind that has a question here
                kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
                item = _question_of_kind(episode, t, kind, cats, rng, hard_negatives)
                if item is not None:
                    out.append((t, kind, *item))
                    break
            if not (follow_ups and rng.random() < follow_ups):
                break
    return out


def _question_of_kind(episode: Episode, t: float, kind: str, cats: dict[str, list[QA]], rng: np.random.Generator,
                      hard_negatives: float = 0.0) -> tuple[str, str] | None:
    def pick(items: list[QA]) -> QA | None:
        return items[int(rng.integers(len(items)))] if items else None

    realtime = cats.get("realtime", [])
    backward = cats.get("backward", [])
    if kind == "count":
        qa = pick([q for q in realtime if q.question.startswith("How many")])
    elif kind == "shape":
        qa = pick([q for q in realtime if q.question.startswith("What shape")])
    elif kind == "colour":  # training-only: "What colour is the shape on screen now?" with one shape visible
        visible = episode.visible(t)
        return ("What colour is the shape on screen now?", visible[0].colour) if len(visible) == 1 else None
    elif kind == "tell_now":  # training-only: the deferred answer as the controller asks it, soon after the appearance
        return _recent_appearance(episode, t, rng)
    elif kind in ("bind_colour", "bind_shape"):  # training-only: one attribute of a shape named by the other
        return _binding_question(episode.visible(t), kind, rng)
    elif kind == "first":
        qa = pick([q for q in backward if q.question.startswith("What colour")])
    elif kind == "when":
        qa = pick([q for q in backward if q.question.startswith("When did")])
    elif kind == "tell":  # the deferred question's final answer: asked once the thing is on screen
        on_screen = {(s.colour, s.shape) for s in episode.visible(t)}
        whens = [q for q in backward if q.question.startswith("When did") and tuple(q.question.split()[3:5]) in on_screen]
        qa = pick(whens)
        if qa is not None:
            colour, shape = qa.question.split()[3:5]
            return f"Tell me when a {colour} {shape} appears.", clock(float(qa.answer))
    else:  # probe, half of them yes, in either wording
        on_screen = sorted({(s.colour, s.shape) for s in episode.visible(t)})
        if on_screen and rng.random() < 0.5:
            colour, shape = on_screen[int(rng.integers(len(on_screen)))]
            answer = "yes"
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in on_screen]
            near = [(c, s) for c, s in absent if any(c == oc or s == os_ for oc, os_ in on_screen)]
            if near and hard_negatives > 0 and rng.random() < hard_negatives:
                absent = near
            colour, shape = absent[int(rng.integers(len(absent)))]
            answer = "no"
        if rng.random() < 0.5:
            return probe_question(colour, shape), answer
        return DEFAULT_PROBE_TEMPLATE.format(condition=f"a {colour} {shape} appears"), answer
    return None if qa is None else (qa.question, spoken_answer(qa))


def _recent_appearance(episode: Episode, t: float, rng: np.random.Generator) -> tuple[str, str] | None:
    """"Tell me when a red circle appears." about a colour x shape that started to be on screen at most
    2.5 s before ``t``, answered with that moment: what the dialogue controller asks once its trigger
    fires, one or two frames after the appearance (the "tell" kind asks at any time, about the first)."""
    recent = []
    for colour, shape in sorted({(s.colour, s.shape) for s in episode.visible(t)}):
        last = max((a for a in appearances(episode, colour, shape) if a <= t), default=None)
        if last is not None and t - last <= 2.5:
            recent.append((colour, shape, last))
    if not recent:
        return None
    colour, shape, last = recent[int(rng.integers(len(recent)))]
    return f"Tell me when a {colour} {shape} appears.", clock(last)


def _binding_question(visible: list, kind: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """With two or more shapes on screen, ask the colour of the one shape of a kind ("What colour is the
    circle now?") or the shape of the one shape of a colour ("What shape is the red one now?"): answering
    needs colour and shape bound to the same object, which probes, "when" and alerts rely on."""
    if len(visible) < 2:
        return None
    key = "shape" if kind == "bind_colour" else "colour"
    unique = [s for s in visible if sum(getattr(o, key) == getattr(s, key) for o in visible) == 1]
    if not unique:
        return None
    target = unique[int(rng.integers(len(unique)))]
    if kind == "bind_colour":
        return f"What colour is the {target.shape} now?", target.colour
    return f"What shape is the {target.colour} one now?", target.shape


_COMBOS = [(colour, shape) for colour in COLOURS for shape in SHAPES]
_VISION_BATCH = 64
_VISION_LR = 1e-3


def conjunction_frames(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` frames with two or more shapes on screen (as rendered, ``(n, H, W, 3)`` uint8) and, per frame,
    which of the colour x shape combinations are on it (``(n, 12)`` of 0/1)."""
    frames, targets = [], []
    while len(frames) < n:
        episode = make_episode(int(rng.integers(TRAIN_SEED_BASE, 2**31 - 1)), duration_s=20.0, fps=1.0, size=FRAME_SIZE)
        t = float(rng.integers(0, 20))
        visible = episode.visible(t)
        if len(visible) < 2:
            continue
        on = {(s.colour, s.shape) for s in visible}
        frames.append(episode.render(t))
        targets.append([float(combo in on) for combo in _COMBOS])
    return torch.from_numpy(np.stack(frames)), torch.tensor(targets)


def _vision_parameters(model) -> list[torch.nn.Parameter]:
    return list(model.model.vision_model.parameters()) + list(model.model.connector.parameters())


class _Steps(torch.utils.data.Dataset):
    """Step ``i``'s batch is ``make(i)``: worker processes make the next batches, delivered in step order."""

    def __init__(self, make, steps: int) -> None:
        self.make, self.steps = make, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        return self.make(step)


def _batches(make, steps: int, workers: int):
    """``make(0), make(1), ...`` - made ahead by ``workers`` forked processes when ``workers > 0``; the
    batches depend only on the step, so the worker count does not change what is trained on."""
    if workers == 0 or steps == 0:
        return map(make, range(steps))
    return iter(torch.utils.data.DataLoader(_Steps(make, steps), batch_size=None, num_workers=workers,
                                            prefetch_factor=4, multiprocessing_context="fork"))


def pretrain_vision(model, steps: int, lr: float, seed: int, *, log=print, eval_every: int = 500, workers: int = 0) -> list[dict]:
    """Train the vision tower and connector alone to tell which colour x shape combinations a frame holds.

    The readout (discarded afterwards) is one linear map per visual token with the maximum taken over a
    frame's tokens: a combination counts as on screen when some token points its way. So the tower
    learns tokens in which colour and shape are bound to one object, each combination readable from
    the token that holds it - what an attention query "red circle" needs for probes, "when did the red
    circle appear?" and alerts, and what language-model training alone did not teach (docs/shapeworld.md).
    Returns the held-out history: the share of 400 frames from a separate random draw (episode seeds out
    of two billion, so a repeat of a training frame is unlikely) whose every combination is right.
    Runs on the model's device; step ``i``'s frames come from the seed ``[seed, 31, i]``.
    """
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(_COMBOS)).to(device)
    optimizer = torch.optim.AdamW(_vision_parameters(model) + list(head.parameters()), lr=lr)
    held_out = [t.to(device) for t in conjunction_frames(np.random.default_rng([seed, 37]), 400)]

    def readout(frames: torch.Tensor) -> torch.Tensor:
        return head(torch.stack(model.model.get_image_features(pixels(frames), return_dict=True).pooler_output)).amax(1)

    history, losses, started = [], [], time.perf_counter()
    draws = _batches(lambda step: conjunction_frames(np.random.default_rng([seed, 31, step]), _VISION_BATCH), steps, workers)
    for step, (frames, targets) in enumerate(draws):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(readout(frames.to(device)), targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            with torch.no_grad():
                exact = float(((readout(held_out[0]) > 0) == (held_out[1] > 0.5)).all(1).float().mean())
            entry = {"step": step + 1, "minutes": round((time.perf_counter() - started) / 60, 2),
                     "loss": round(float(np.mean(losses)), 4), "frames_exact": round(exact, 4)}
            history.append(entry)
            losses.clear()
            log(json.dumps({"vision": entry}))
    return history


def make_stream(layout: StreamLayout, seed: int, duration_s: int, cfg: TrainConfig, *, short: bool) -> Stream:
    """The training stream for episode ``seed`` (``duration_s`` frames at 1 frame/s) with its questions,
    its clock started late (by 1 to ``cfg.clock_offset_max`` s) with probability ``cfg.clock_offset`` and
    budgeted (:meth:`Stream.budget`) with probability ``cfg.budgeted``."""
    rng = np.random.default_rng([seed, 17])
    episode = make_episode(seed, duration_s=float(duration_s), fps=1.0, size=FRAME_SIZE)
    prob = 1.0 if short else cfg.ask_probability
    questions = _pick_questions(episode, rng, cfg.mix, short=short, ask_probability=prob,
                                hard_negatives=cfg.hard_negatives, follow_ups=cfg.follow_ups)
    offset_rng = np.random.default_rng([seed, 23])  # its own draws: streams without an offset stay as they were
    offset = int(offset_rng.integers(1, cfg.clock_offset_max + 1)) if offset_rng.random() < cfg.clock_offset else 0
    stream = layout.stream(episode, shift_clock(questions, offset), offset)
    budget_rng = np.random.default_rng([seed, 19])  # its own draws: streams without a budget stay as they were
    if not short and budget_rng.random() < cfg.budgeted:
        stream.budget(budget_rng, cfg.budget_window, cfg.budget_recall)
    return stream


def _duration(rng: np.random.Generator, cfg: TrainConfig, short: bool) -> int:
    return int(rng.integers(2, 5)) if short else int(rng.integers(cfg.min_duration_s, cfg.max_duration_s + 1))


def _logits(model, batch: Batch, image_token_id: int) -> torch.Tensor:
    """Logits for every position of ``batch`` (on the model's device)."""
    features = torch.cat(model.model.get_image_features(pixels(batch.frames), return_dict=True).pooler_output)
    embeds = model.get_input_embeddings()(batch.ids)
    slots = batch.ids == image_token_id
    embeds = embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))
    hidden = model.model.text_model(inputs_embeds=embeds, attention_mask=batch.mask).last_hidden_state
    return model.lm_head(hidden)


def _batch_logits(model, streams: list[Stream], pad_id: int, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for a right-padded batch of streams and the matching label tensor (on the model's device)."""
    batch = Batch.of(streams, pad_id).to(next(model.parameters()).device)
    return _logits(model, batch, image_token_id), batch.labels


def _evaluate(model, streams: list[Stream], pad_id: int, image_token_id: int) -> dict[str, float]:
    """Share of answers whose every token is the greedy choice, per kind (teacher-forced = greedy decode)."""
    right: dict[str, list[int]] = {}
    model.eval()
    with torch.no_grad():
        for i in range(0, len(streams), 8):
            chunk = streams[i : i + 8]
            logits, labels = _batch_logits(model, chunk, pad_id, image_token_id)
            guess, labels = logits.argmax(-1).cpu(), labels.cpu()
            for b, s in enumerate(chunk):
                for kind, lo, hi in s.answers:
                    ok = bool((guess[b, lo:hi] == labels[b, lo:hi]).all())
                    right.setdefault(kind, []).append(int(ok))
    model.train()
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(right.items())}


def _load_weights(model, init: Path, out: Path) -> None:
    """Copy ``init``'s weights into ``model``; its tokenizer must be the one just built in ``out``."""
    from safetensors.torch import load_file

    if (init / "tokenizer.json").read_text() != (out / "tokenizer.json").read_text():
        raise RuntimeError(f"{init} was trained with a different tokenizer; it cannot be continued with this recipe")
    try:
        model.load_state_dict(load_file(init / "model.safetensors"))
    except RuntimeError as exc:
        raise RuntimeError(f"{init} does not match the recipe's architecture: {exc}") from None


def train(cfg: TrainConfig, out: Path, *, log=print) -> dict:
    """Train from scratch and save the checkpoint (model, tokenizer, processor, ``training.json``) to ``out``.

    Progress goes to ``log`` every ``eval_every`` steps; the checkpoint is rewritten at each evaluation,
    so an interrupted run leaves its latest state behind.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_untrained(out, seed=cfg.seed)
    if cfg.init is not None:
        _load_weights(model, Path(cfg.init), out)
    model.to(cfg.device)
    vision = pretrain_vision(model, cfg.vision_steps, _VISION_LR, cfg.seed, log=log, workers=cfg.workers) if cfg.vision_steps else []
    if vision:
        model.save_pretrained(out)
        (out / "training.json").write_text(json.dumps(_record(cfg, [], vision), indent=1))
    tokenizer = AutoTokenizer.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out, backend="pil")
    adapter = SmolVLMAdapter(model, tokenizer, processor, source=str(out))
    layout = StreamLayout(adapter)
    pad_id, image_token_id = int(tokenizer.pad_token_id), adapter.image_token_id
    eval_rng = np.random.default_rng(EVAL_SEED_BASE)
    eval_cfg = replace(cfg, mix=dict(_MIX), hard_negatives=0.0, follow_ups=0.0, clock_offset=0.0)  # every stage: the same questions
    eval_lengths = [int(eval_rng.integers(12, 25)) for _ in range(cfg.eval_streams)]
    eval_streams = sorted((make_stream(layout, EVAL_SEED_BASE + i, n, eval_cfg, short=False) for i, n in enumerate(eval_lengths)),
                          key=lambda s: len(s.ids))  # similar lengths batch with little padding
    # A stage that teaches late clocks is also evaluated on the same streams with every clock started late.
    late_streams = [] if not cfg.clock_offset else sorted(
        (make_stream(layout, EVAL_SEED_BASE + i, n, replace(eval_cfg, clock_offset=1.0), short=False) for i, n in enumerate(eval_lengths)),
        key=lambda s: len(s.ids))
    batch_rng = np.random.default_rng([cfg.seed, 29])

    model.train()
    for p in _vision_parameters(model):
        p.requires_grad_(not cfg.freeze_vision)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    history: list[dict] = []
    started = time.perf_counter()
    losses: list[float] = []
    steps = min(cfg.steps, cfg.stop_after or cfg.steps)
    short = [step < cfg.short_steps or (cfg.short_every > 0 and step % cfg.short_every == 0) for step in range(steps)]
    duration = [_duration(batch_rng, cfg, s) for s in short]  # one length per batch: little padding
    first_seed = TRAIN_SEED_BASE + cfg.seed * 10_000_000

    def make_batch(step: int) -> Batch:
        return Batch.of([make_stream(layout, first_seed + step * cfg.batch + i, duration[step], cfg, short=short[step])
                         for i in range(cfg.batch)], pad_id)

    for step, batch in enumerate(_batches(make_batch, steps, cfg.workers)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = batch.to(cfg.device)
        loss = torch.nn.functional.cross_entropy(_logits(model, batch, image_token_id).flatten(0, 1), batch.labels.flatten(),
                                                 ignore_index=_IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % cfg.eval_every == 0 or step + 1 in (cfg.steps, cfg.stop_after):
            scores = _evaluate(model, eval_streams, pad_id, image_token_id)
            entry = {"step": step + 1, "minutes": round((time.perf_counter() - started) / 60, 2),
                     "loss": round(float(np.mean(losses)), 4), "eval": scores}
            if late_streams:
                entry["eval_late_clock"] = _evaluate(model, late_streams, pad_id, image_token_id)
            history.append(entry)
            losses.clear()
            log(json.dumps(entry))
            model.save_pretrained(out)
            (out / "training.json").write_text(json.dumps(_record(cfg, history, vision), indent=1))
    write_card(out)
    return _record(cfg, history, vision)


def _record(cfg: TrainConfig, history: list[dict], vision: list[dict]) -> dict:
    record = {"config": {k: v for k, v in cfg.__dict__.items() if k != "mix"}, "mix": cfg.mix, "history": history}
    if cfg.device != "cpu":
        record["hardware"] = torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda") else cfg.device
    return record | ({"vision": vision} if vision else {})


def write_card(out: Path) -> None:
    """Write ``out/README.md`` from ``out/training.json``; a run that continued another checkpoint
    (``--init``) first copies that checkpoint's stages into its ``training.json`` (key ``previous``), so
    the card lists every stage that led to the weights."""
    record = json.loads((out / "training.json").read_text())
    init = record["config"].get("init")
    if init and "previous" not in record:
        before = json.loads((Path(init) / "training.json").read_text())
        record["previous"] = before.pop("previous", []) + [before]
        (out / "training.json").write_text(json.dumps(record, indent=1))
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as weights:
        params = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    stages = record.get("previous", []) + [{k: v for k, v in record.items() if k != "previous"}]
    (out / "README.md").write_text(model_card(stages, params))


def _config(stage: dict) -> TrainConfig:
    return TrainConfig(**{k: v for k, v in stage["config"].items() if k in TrainConfig.__dataclass_fields__})


def _stage(number: int, stage: dict) -> str:
    cfg = _config(stage)
    history = stage["history"]
    last = history[-1] if history else {"step": 0, "minutes": 0, "eval": {}}
    rows = "\n".join(
        f"| {h['step']} | {h['minutes']:.1f} | {h['loss']:.3f} | "
        + " | ".join(f"{h['eval'][k]:.2f}" if k in h["eval"] else "-" for k in _EVALUATED) + " |"
        for h in history
    )
    start = f"continued from the weights of stage {number - 1}" if cfg.init else "from a fresh initialisation"
    what = f"{last['step']} steps" if cfg.steps else "vision pre-training only"
    head = f"""### Stage {number}: {what}, {start}

```
python -m streamvlm.shapeworld.train --out DIR --steps {cfg.steps}{f" --stop-after {cfg.stop_after}" if cfg.stop_after else ""} --batch {cfg.batch} --lr {cfg.lr}{f" --warmup-steps {cfg.warmup_steps}" if cfg.warmup_steps != TrainConfig.warmup_steps else ""} --seed {cfg.seed} --threads {cfg.threads} --short-steps {cfg.short_steps}{f" --short-every {cfg.short_every}" if cfg.short_every else ""}{f" --hard-negatives {cfg.hard_negatives}" if cfg.hard_negatives else ""}{f" --follow-ups {cfg.follow_ups}" if cfg.follow_ups else ""}{f" --budgeted {cfg.budgeted}" if cfg.budgeted else ""}{f" --budget-window {cfg.budget_window}" if cfg.budget_window != TrainConfig.budget_window else ""}{f" --budget-recall {cfg.budget_recall}" if cfg.budget_recall != TrainConfig.budget_recall else ""}{f" --clock-offset {cfg.clock_offset},{cfg.clock_offset_max}" if cfg.clock_offset else ""}{" --mix " + ",".join(f"{k}={v}" for k, v in stage["mix"].items()) if stage["mix"] != _MIX else ""}{f" --vision-steps {cfg.vision_steps}" if cfg.vision_steps else ""}{" --freeze-vision" if cfg.freeze_vision else ""}{f" --device {cfg.device} --workers {cfg.workers}" if cfg.device != "cpu" else ""}{" --init STAGE_%d_DIR" % (number - 1) if cfg.init else ""}
```
{_vision_stage(cfg, stage.get("vision", []))}
"""
    if not cfg.steps:
        return head
    return head + f"""AdamW (weight decay 0.01, betas 0.9/0.98), {cfg.warmup_steps} warm-up steps, cosine decay to a tenth of the
learning rate {cfg.lr} over {cfg.steps} steps (stopped after {last['step']}), gradient clipping at 1.0, float32 on
{_where(cfg, stage)}, {cfg.batch} streams per step; the first {cfg.short_steps} steps are 2-4-frame streams with
present-tense questions{f" (and one step in {cfg.short_every} after them)" if cfg.short_every else ""}, then {cfg.min_duration_s}-{cfg.max_duration_s} frames with a question at each half second with
probability {cfg.ask_probability}{f" (followed by another at the same moment with probability {cfg.follow_ups})" if cfg.follow_ups else ""}{f"; a share {cfg.budgeted} of streams laid out as a memory budget leaves them ({MIN_WINDOW}-{cfg.budget_window} recent frames, up to {cfg.budget_recall} older ones recalled per question)" if cfg.budgeted else ""}{f"; a share {cfg.clock_offset} of streams with their clock started 1-{cfg.clock_offset_max} s late (stamps and time answers shifted alike)" if cfg.clock_offset else ""}; question weights {", ".join(f"{k} {v}" for k, v in stage["mix"].items())}. Wall time {last['minutes']:.0f} minutes.

| step | minutes | loss | {" | ".join(_EVALUATED)} |
|---|---|---|{"---|" * len(_EVALUATED)}
{rows}
{_late_clock_rows(history, cfg.clock_offset_max)}"""


def _late_clock_rows(history: list[dict], most: int) -> str:
    """The curve on the same held-out streams with every clock started late, for stages that taught it."""
    late = [h for h in history if "eval_late_clock" in h]
    if not late:
        return ""
    rows = "\n".join(f"| {h['step']} | " + " | ".join(f"{h['eval_late_clock'][k]:.2f}" if k in h["eval_late_clock"] else "-"
                                                   for k in _EVALUATED) + " |" for h in late)
    return f"""
The same held-out streams with every clock started 1-{most} s late:

| step | {" | ".join(_EVALUATED)} |
|---|{"---|" * len(_EVALUATED)}
{rows}
"""


def _where(cfg: TrainConfig, stage: dict) -> str:
    if cfg.device == "cpu":
        return f"{cfg.threads} CPU thread(s)"
    return f"{stage.get('hardware', cfg.device)} with {cfg.workers} data processes"


def _vision_stage(cfg: TrainConfig, vision: list[dict]) -> str:
    if not cfg.vision_steps and not cfg.freeze_vision:
        return ""
    lines = []
    if cfg.vision_steps:
        curve = ", ".join(f"{h['frames_exact']:.2f} at {h['step']}" for h in vision)
        lines.append(f"First {cfg.vision_steps} steps of vision pre-training ({_VISION_BATCH} frames with two or more shapes per step, "
                     f"learning rate {_VISION_LR}, "
                     f"{vision[-1]['minutes'] if vision else 0:.0f} minutes): share of 400 frames from a separate draw whose every colour x shape "
                     f"combination the tokens tell right: {curve}.")
    if cfg.freeze_vision:
        lines.append("The vision tower and connector stay frozen during the language steps.")
    return "\n" + " ".join(lines) + "\n"


def model_card(stages: list[dict], params: int) -> str:
    """The checkpoint's README: what it is, the data, the commands that reproduce it, and its curves.

    ``stages`` are ``{"config": ..., "history": ...}`` records, oldest first (one per training run).
    """
    cfg = _config(stages[-1])
    return f"""# ShapeWorld model

A {params / 1e6:.2f} M-parameter vision-language model in the SmolVLM architecture
(`SmolVLMForConditionalGeneration`: 2-layer vision tower of width 64 on 8 px patches of 64x64
frames, pixel shuffle 4 -> 4 visual tokens per frame, 4-layer Llama of width 128, a {VOCAB_SIZE}-entry
byte-level BPE tokenizer with one token per digit), trained from scratch by streamvlm on ShapeWorld
streams only. It knows nothing but ShapeWorld: coloured circles, squares and triangles on a dark
background. It exists so that answer quality can be measured offline; see docs/shapeworld.md.

## Data

Every example is a ShapeWorld stream at 1 frame/s laid out exactly as the engine lays it out (system
prompt, `Frame from MM:SS:` + visual tokens per frame, questions and answers with turn ends). Episodes
use seeds {TRAIN_SEED_BASE:,} + 10,000,000 x seed and up ({cfg.batch} per step); evaluation during training uses
seeds {EVAL_SEED_BASE:,} and up; the quality benchmark and the demo use seeds below both. Question kinds and
their weights in the last stage: {", ".join(f"{k} {v}" for k, v in stages[-1]["mix"].items())} (count: "How many shapes are
visible?"; shape: "What shape is on screen now?"; colour (asked in training only): "What colour is the shape on
screen now?"; probe: "Is there a red circle now?" or the dialogue controller's "Is it true that a red
circle appears right now? Answer yes or no."; first: "What colour was the first shape?"; when: "When
did the red circle appear?" answered as the `MM:SS` of its first frame; tell: "Tell me when a red
circle appears." asked once it is on screen, answered with that time; bind_colour and bind_shape (in
training only, with two or more shapes on screen): "What colour is the circle now?" and "What shape
is the red one now?"; tell_now (in training only): "Tell me when a red circle appears." asked at most 2.5 s after
it started to be on screen, answered with that moment, as the dialogue controller asks once its trigger fires).
Only answer tokens carry a loss.

## Training

{len(stages)} stage(s), each a run of the command shown. Held-out teacher-forced accuracy during training
({cfg.eval_streams} streams of 12-24 frames; an answer counts when every token is the greedy choice, which is
exactly what greedy decoding would say; "-" where the stage did not train that kind):

{"".join(_stage(i + 1, stage) for i, stage in enumerate(stages))}"""


def _parse_mix(text: str) -> dict[str, int]:
    try:
        return {kind.strip(): int(weight) for kind, weight in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ConfigError(f"mix: expected kind=weight pairs separated by commas, got {text!r}") from None


def _parse_clock_offset(text: str | None) -> dict[str, float | int]:
    """``"P,MAX"`` -> the config's ``clock_offset`` and ``clock_offset_max``; ``None`` -> no offset."""
    if text is None:
        return {}
    try:
        share, most = text.split(",")
        return {"clock_offset": float(share), "clock_offset_max": int(most)}
    except ValueError:
        raise ConfigError(f"clock-offset: expected SHARE,MAX_SECONDS such as 0.5,1200, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamvlm.shapeworld.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the checkpoint to")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this many steps of the schedule")
    parser.add_argument("--batch", type=int, default=TrainConfig.batch)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    parser.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    parser.add_argument("--short-steps", type=int, default=TrainConfig.short_steps, help="steps of 2-4-frame warm-up streams")
    parser.add_argument("--short-every", type=int, default=TrainConfig.short_every,
                        help="after the warm-up, make every N-th step a short present-tense one too (0 = none)")
    parser.add_argument("--mix", default=None, help="question weights, e.g. probe=8,colour=2 (kinds left out: 0; "
                        f"default {','.join(f'{k}={v}' for k, v in _MIX.items())})")
    parser.add_argument("--hard-negatives", type=float, default=TrainConfig.hard_negatives,
                        help="share of 'no' probes about a near miss (colour or shape on screen on another shape)")
    parser.add_argument("--follow-ups", type=float, default=TrainConfig.follow_ups,
                        help="chance that another question follows at the same moment, before the next frame")
    parser.add_argument("--budgeted", type=float, default=TrainConfig.budgeted,
                        help="share of streams laid out as a memory budget with retrieval leaves them (recent frames + recalled ones)")
    parser.add_argument("--budget-window", type=int, default=TrainConfig.budget_window,
                        help=f"most recent frames a budgeted stream keeps (drawn from {MIN_WINDOW} up to this per stream)")
    parser.add_argument("--budget-recall", type=int, default=TrainConfig.budget_recall,
                        help="most older frames a question of a budgeted stream sees again (drawn from 1 up to this)")
    parser.add_argument("--clock-offset", default=None, metavar="P,MAX",
                        help="share P of streams whose clock starts 1 to MAX seconds late (minute clocks in 6-24-frame streams), e.g. 0.5,1200")
    parser.add_argument("--vision-steps", type=int, default=TrainConfig.vision_steps,
                        help="first train the vision tower alone this many steps to bind colour to shape (0 = none)")
    parser.add_argument("--freeze-vision", action="store_true", help="train the language model only")
    parser.add_argument("--init", default=None, help="continue from this checkpoint's weights (same tokenizer)")
    parser.add_argument("--device", default=TrainConfig.device, help="torch device to train on, e.g. cuda (default cpu)")
    parser.add_argument("--workers", type=int, default=TrainConfig.workers,
                        help="processes that make the next batches ahead (0 = the main process; results do not depend on it)")
    args = parser.parse_args(argv)
    try:
        cfg = TrainConfig(steps=args.steps, stop_after=args.stop_after, batch=args.batch, lr=args.lr, seed=args.seed,
                          threads=args.threads, warmup_steps=args.warmup_steps, eval_every=args.eval_every, short_steps=args.short_steps,
                          short_every=args.short_every, init=args.init, mix=_parse_mix(args.mix) if args.mix else dict(_MIX),
                          hard_negatives=args.hard_negatives, follow_ups=args.follow_ups, budgeted=args.budgeted,
                          budget_window=args.budget_window, budget_recall=args.budget_recall, vision_steps=args.vision_steps,
                          freeze_vision=args.freeze_vision, device=args.device, workers=args.workers,
                          **_parse_clock_offset(args.clock_offset))
    except ConfigError as exc:
        parser.error(str(exc))
    train(cfg, args.out, log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
