"""``streamvlm bench quality``: answer quality on held-out ShapeWorld episodes, and what memory does to it.

Episodes come from one seed split (:mod:`streamvlm.shapeworld.splits`): ``test`` by default, whose
figures are the ones to report; ``validation`` for any choice (retrieval depth, thresholds, ...). Every
proportion comes with its 95 % Wilson score interval (``interval`` beside ``accuracy``, and for alert
precision and recall).

Protocol (OVO-Bench style): each episode is streamed at 1 frame/s into a fresh
:class:`~streamvlm.engine.session.StreamSession`; every question is asked at its time, after the
frames up to it and before the next, through the same :class:`~streamvlm.dialogue.DialogueController`
the live worker uses. Forward requests ("Tell me when a red circle appears.") are deferred by the
controller, polled with yes/no probes on every frame and answered when its trigger rule fires: they
count as right when that happens within ``FORWARD_TOLERANCE_S`` of the appearance. One standing
watch per episode (a thing that appears in it) measures alert precision and recall at the same
tolerance. Answers are greedy.

The sweep repeats this with the frames' share of working memory cut to 50 %, 25 % and 10 % of the
tokens the episode's frames take with full memory (never below the two most recent frames), for every
policy, with retrieval on and off; the system prompt and the dialogue keep their full share, so what is
measured is visual memory under compression.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import POLICIES, MemoryConfig, SamplingConfig, SessionConfig
from ..dialogue import (
    AnswerNow,
    Alert,
    ControllerConfig,
    DialogueController,
    GiveUp,
    Narrate,
    Poll,
    TriggerSpec,
    make_rule,
)
from ..cameras import DEFAULT_READ_FPS
from ..engine.session import StreamSession
from ..ingest.sampler import FpsSampler
from ..errors import ConfigError
from ..models.base import ModelAdapter
from ..shapeworld import FORWARD_TOLERANCE_S, QA, make_episode, make_questions
from ..shapeworld.model import FRAME_SIZE
from ..shapeworld.world import COLOURS, SHAPES
from ..shapeworld.questions import (WHEN_TOLERANCE_S, appearances, is_correct, make_long_questions, parse_clock, probe_question,
                                    watch_target)
from ..shapeworld.world import make_long_episode
from ..shapeworld.splits import split_of, split_range

__all__ = ["QualityConfig", "EpisodeScore", "run_episode", "run_quality", "match_alerts", "probe_binding", "PROBE_CASES",
           "wilson_interval", "format_table", "watch_scores", "replay_alerts", "sweep_triggers"]

#: The normal quantile of a two-sided 95 % interval.
Z95 = 1.959963984540054


def wilson_interval(right: int, asked: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) for ``right`` successes out of ``asked``.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or ``asked`` right
    (10/10 gives about (0.72, 1.0)). Returns ``(0.0, 1.0)`` for ``asked == 0`` (nothing is known).
    Raises ConfigError unless ``0 <= right <= asked``.
    """
    if not (isinstance(right, int) and isinstance(asked, int) and 0 <= right <= asked):
        raise ConfigError(f"wilson_interval: need 0 <= right <= asked (integers), got {right!r} of {asked!r}")
    if asked == 0:
        return (0.0, 1.0)
    p = right / asked
    z2 = z * z
    centre = (p + z2 / (2 * asked)) / (1 + z2 / asked)
    half = z * math.sqrt(p * (1 - p) / asked + z2 / (4 * asked * asked)) / (1 + z2 / asked)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _interval(right: int, asked: int) -> list[float]:
    low, high = wilson_interval(right, asked)
    return [round(low, 4), round(high, 4)]

#: How a yes/no probe "Is there a <colour> <shape> now?" relates to the frame: "yes" (that shape in that
#: colour is on screen), or a "no" whose colour and shape are both on screen on different shapes
#: ("both_apart"), whose colour only or shape only is on screen, or neither.
PROBE_CASES = ("yes", "both_apart", "colour_only", "shape_only", "neither")

#: Categories reported, in order; "when" is the subset of backward questions answered with a time; "spoken" is
#: the time a deferred answer says, right within ``WHEN_TOLERANCE_S`` of the appearance, over the deferred
#: answers that came (a forward question never answered counts against "forward" only).
REPORTED = ("realtime", "backward", "when", "forward", "spoken", "probe")


@dataclass(frozen=True)
class QualityConfig:
    episodes: int = 96
    duration_s: float = 24.0
    per_category: int = 2
    # Which seed split the episodes come from: "test" (report) or "validation" (choose); see shapeworld/splits.py.
    split: str = "test"
    # First episode seed; None = the split's first seed. Every seed must lie in ``split``.
    seed_base: int | None = None
    budgets: tuple[float, ...] = (0.5, 0.25, 0.1)
    policies: tuple[str, ...] = tuple(POLICIES)
    retrieval_top_k: int = MemoryConfig.retrieval_top_k  # chunks a question brings back when retrieval is on
    # How answers are decoded (StreamSession.ask's answer_format): "auto" shapes time answers as clocks, "text" leaves them free.
    answer_format: str = "auto"
    # A deferred answer's time: "evidence" bounds it by the evidence its rule fired on (AnswerNow.evidence, as the
    # server and the CLI do), "model" only by the moment of the answer (the model's own choice among earlier times).
    deferred_time: str = "evidence"
    # "short": make_episode and make_questions (every category, a standing watch); "long": make_long_episode (events
    # spread over minutes, things coming back) and make_long_questions (backward questions a minute or more after
    # their moment, and real-time ones); no watch and no forward questions.
    layout: str = "short"
    # Working-memory positions under a budget (MemoryConfig.positions): "reindex" keeps them within what the model
    # was trained on however long the stream.
    positions: str = "keep"
    # Input rates (frames per second) at which alerts are measured apart (the standing watch only, probed every
    # frame) under a working memory capped at RATE_BUDGET_TOKENS with positions re-indexed; () = none.
    rates: tuple[float, ...] = ()
    # Frames read per second of each rate's stream, as `streamvlm watch --fps` reads a camera (its default; 0: every
    # frame): a 10 fps stream is read at 2 frames a second unless this says otherwise.
    read_fps: float = DEFAULT_READ_FPS

    def __post_init__(self) -> None:
        if not isinstance(self.episodes, int) or self.episodes < 1:
            raise ConfigError(f"episodes: must be an integer >= 1, got {self.episodes!r}")
        if not 6 <= self.duration_s <= 3600:
            raise ConfigError(f"duration_s: must be between 6 and 3600 seconds, got {self.duration_s!r}")
        if any(not 0 < b < 1 for b in self.budgets):
            raise ConfigError(f"budgets: fractions of the full-memory tokens in (0, 1), got {self.budgets!r}")
        if not isinstance(self.retrieval_top_k, int) or self.retrieval_top_k < 1:
            raise ConfigError(f"retrieval_top_k: must be an integer >= 1, got {self.retrieval_top_k!r}")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown:
            raise ConfigError(f"policies: unknown {unknown}; choose from {', '.join(POLICIES)}")
        if self.layout not in ("short", "long"):
            raise ConfigError(f"layout: must be short or long, got {self.layout!r}")
        if self.positions not in ("keep", "reindex"):
            raise ConfigError(f"positions: must be keep or reindex, got {self.positions!r}")
        if any(not (isinstance(r, (int, float)) and 0 < r <= 30) for r in self.rates):
            raise ConfigError(f"rates: frames per second in (0, 30], got {self.rates!r}")
        if isinstance(self.read_fps, bool) or not isinstance(self.read_fps, (int, float)) or not 0 <= self.read_fps <= 30:
            raise ConfigError(f"read_fps: frames read per second in (0, 30], or 0 for every frame, got {self.read_fps!r}")
        if self.answer_format not in ("auto", "text", "time"):
            raise ConfigError(f"answer_format: must be auto, text or time, got {self.answer_format!r}")
        if self.deferred_time not in ("evidence", "model"):
            raise ConfigError(f"deferred_time: must be evidence or model, got {self.deferred_time!r}")
        if self.split not in ("test", "validation", "train"):
            raise ConfigError(f"split: must be test, validation or train, got {self.split!r}")
        seeds = split_range(self.split)
        first = seeds.start if self.seed_base is None else self.seed_base
        last = first + self.episodes - 1
        if first not in seeds or last not in seeds:
            raise ConfigError(f"seed: episodes {first}-{last} are not all in the {self.split} split "
                              f"(seeds {seeds.start}-{seeds.stop - 1}; seed {first} is in {split_of(first) or 'no split'})")

    @property
    def seeds(self) -> list[int]:
        """The episode seeds, in order."""
        first = split_range(self.split).start if self.seed_base is None else self.seed_base
        return [first + i for i in range(self.episodes)]


@dataclass
class EpisodeScore:
    """Right/asked per category, alert matches, and the tokens the episode produced."""

    right: dict[str, int] = field(default_factory=dict)
    asked: dict[str, int] = field(default_factory=dict)
    alerts_true: int = 0  # alerts within tolerance of a truth event (matched one to one)
    alerts: int = 0
    truths: int = 0
    tokens: int = 0
    frames: int = 0
    frame_tokens: int = 0  # held at the end; with full memory, every frame's tokens
    dialogue_tokens: int = 0
    answers: list[dict[str, Any]] = field(default_factory=list)
    alert_times: list[float] = field(default_factory=list)  # stream times of the alerts raised, in order

    def add(self, category: str, ok: bool) -> None:
        self.asked[category] = self.asked.get(category, 0) + 1
        self.right[category] = self.right.get(category, 0) + int(ok)

    def merge(self, other: "EpisodeScore") -> None:
        for k, v in other.asked.items():
            self.asked[k] = self.asked.get(k, 0) + v
            self.right[k] = self.right.get(k, 0) + other.right.get(k, 0)
        self.alerts_true += other.alerts_true
        self.alerts += other.alerts
        self.truths += other.truths
        self.tokens += other.tokens
        self.answers.extend(other.answers)
        self.alert_times.extend(other.alert_times)

    def summary(self) -> dict[str, Any]:
        acc = {k: round(self.right.get(k, 0) / self.asked[k], 4) for k in REPORTED if self.asked.get(k)}
        interval = {k: _interval(self.right.get(k, 0), self.asked[k]) for k in REPORTED if self.asked.get(k)}
        precision = self.alerts_true / self.alerts if self.alerts else 0.0
        recall = self.alerts_true / self.truths if self.truths else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "accuracy": acc,
            "interval": interval,  # 95 % Wilson score interval of each accuracy
            "asked": {k: self.asked[k] for k in REPORTED if self.asked.get(k)},
            "alerts": {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                       "precision_interval": _interval(self.alerts_true, self.alerts),
                       "recall_interval": _interval(self.alerts_true, self.truths),
                       "raised": self.alerts, "truth": self.truths},
        }


def match_alerts(alerts: Iterable[float], truth: Iterable[float], tolerance: float = FORWARD_TOLERANCE_S) -> int:
    """How many alerts match a distinct truth time within ``tolerance`` (greedy in time order)."""
    free = sorted(truth)
    hits = 0
    for a in sorted(alerts):
        for i, t in enumerate(free):
            if abs(a - t) <= tolerance:
                hits += 1
                del free[i]
                break
    return hits


def run_episode(
    adapter: ModelAdapter, seed: int, memory: MemoryConfig, cfg: QualityConfig, *, fps: float = 1.0, ask: bool = True
) -> EpisodeScore:
    """Stream episode ``seed`` at ``fps`` frames per second through a fresh session under ``memory`` and score
    every answer and alert (``ask=False``: the standing watch only, no questions). The controller probes every
    frame, so at 10 fps its trigger rules read ten scores a second where at 1 fps they read one."""
    long = cfg.layout == "long"
    episode = (make_long_episode if long else make_episode)(seed, duration_s=cfg.duration_s, fps=fps, size=FRAME_SIZE)
    if not ask:
        questions: list[QA] = []
    elif long:
        questions = make_long_questions(episode, rng_seed=seed, per_category=cfg.per_category, min_age_s=min(60.0, cfg.duration_s / 4))
    else:
        questions = make_questions(episode, rng_seed=seed, per_category=cfg.per_category)
    session = StreamSession(adapter, SessionConfig(sampling=SamplingConfig(max_new_tokens=12)), memory)
    controller = DialogueController(ControllerConfig(probe_every_frames=1))
    score = EpisodeScore()
    colour, shape = watch_target(episode)
    pending: dict[str, QA] = {}
    alerts: list[float] = []
    ids = itertools.count()

    def act(actions: list, t: float) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, Poll):
                values = session.probe([p.prompt for p in action.probes])
                queue.extend(controller.scores(t, {p.probe_id: v for p, v in zip(action.probes, values)}))
            elif isinstance(action, AnswerNow) and not isinstance(action, Narrate):
                queue.extend(controller.generation_started(action.request_id, t))
                bound = action.evidence if cfg.deferred_time == "evidence" else None
                answer = session.ask(action.question, t, answer_format=cfg.answer_format, time_range=bound)  # type: ignore[arg-type]
                qa = pending.pop(action.request_id, None)
                if qa is not None:
                    if qa.category == "forward":  # the deferred answer: right when it comes in time
                        ok = abs(t - float(qa.answer)) <= FORWARD_TOLERANCE_S
                        spoken = parse_clock(answer.text)  # and what it says: the appearance's time, within 1 s
                        said_right = spoken is not None and abs(spoken - float(qa.answer)) <= WHEN_TOLERANCE_S
                        score.add("spoken", said_right)
                    else:
                        ok = is_correct(qa, answer.text)
                    category = "when" if qa.question.startswith("When did") else qa.category
                    score.add(category, ok)
                    if category == "when":
                        score.add("backward", ok)
                    entry = {"seed": seed, "t": t, "question": qa.question, "truth": qa.answer, "answer": answer.text, "ok": ok}
                    if qa.category == "forward":
                        entry["spoken_ok"] = said_right
                    score.answers.append(entry)
                queue.extend(controller.generation_finished(action.request_id, t))
            elif isinstance(action, Alert):
                alerts.append(action.t)
            elif isinstance(action, GiveUp):
                qa = pending.pop(action.request_id, None)
                if qa is not None:
                    score.add(qa.category, False)

    if not long:
        act(controller.add_watch("watch", f"a {colour} {shape} appears", 0.0), 0.0)
    remaining = list(questions)
    for t, image in _read(episode, cfg.read_fps):
        session.ingest(image, t)
        act(controller.frame(t), t)
        while remaining and remaining[0].t < t + 1.0 / fps:
            qa = remaining.pop(0)
            request_id = f"q{next(ids)}"
            pending[request_id] = qa
            act(controller.user_message(request_id, qa.question, qa.t), qa.t)
    act(controller.stream_ended(episode.duration_s), episode.duration_s)
    for qa in pending.values():  # never answered
        score.add(qa.category, False)
    truth = [] if long else appearances(episode, colour, shape)
    score.alerts, score.truths = len(alerts), len(truth)
    score.alert_times = list(alerts)
    score.alerts_true = match_alerts(alerts, truth)
    score.tokens = session.stats()["logical_tokens"]
    score.frames = len(episode.frame_times())
    score.frame_tokens = session.memory.ledger.working_tokens(("frame",))
    score.dialogue_tokens = session.memory.ledger.working_tokens(("question", "answer"))
    session.close()
    return score


def probe_binding(adapter: ModelAdapter, seeds: Iterable[int], duration_s: float) -> dict[str, dict[str, float | None]]:
    """Probe every colour x shape after every frame of the episodes ``seeds`` and summarise P(yes) by case.

    Returns, for each of :data:`PROBE_CASES`, how many probes fell in it, their mean P(yes) and the share
    with P(yes) > 0.5. A model that binds colour to shape scores "yes" high and every other case low;
    one that only notices whether the colour or the shape is present scores "colour_only",
    "shape_only" and "both_apart" like "yes" - which is what makes alerts and deferred answers fire on
    the wrong thing or never. The probes run on rolled-back extensions, so the stream is read once.
    """
    scores: dict[str, list[float]] = {case: [] for case in PROBE_CASES}
    combos = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    prompts = [probe_question(colour, shape) for colour, shape in combos]
    for seed in seeds:
        episode = make_episode(seed, duration_s=duration_s, fps=1.0, size=FRAME_SIZE)
        session = StreamSession(adapter, SessionConfig())
        try:
            for t, image in episode.frames():
                session.ingest(image, t)
                on = {(s.colour, s.shape) for s in episode.visible(t)}
                colours, shapes = {c for c, _ in on}, {h for _, h in on}
                for (colour, shape), p in zip(combos, session.probe(prompts)):
                    if (colour, shape) in on:
                        case = "yes"
                    elif colour in colours:
                        case = "both_apart" if shape in shapes else "colour_only"
                    else:
                        case = "shape_only" if shape in shapes else "neither"
                    scores[case].append(p)
        finally:
            session.close()
    return {case: {"probes": len(v), "mean_p_yes": round(sum(v) / len(v), 4) if v else None,
                   "share_above_half": round(sum(p > 0.5 for p in v) / len(v), 4) if v else None}
            for case, v in scores.items()}


def sweep_memory(full: EpisodeScore, fraction: float, policy: str, top_k: int, positions: str = "keep") -> MemoryConfig:
    """The memory settings for one sweep point: the frames get ``fraction`` of the tokens they take with
    full memory (never less than the most recent frames that every policy keeps), the system prompt and the dialogue keep all of theirs, so
    what is measured is visual memory under compression."""
    per_frame = -(-full.frame_tokens // max(1, full.frames))
    frames = max(int(full.frame_tokens * fraction), MemoryConfig().recent_frames * per_frame)
    budget = full.tokens - full.frame_tokens + frames
    return replace(MemoryConfig(), budget_tokens=budget, text_budget_tokens=full.dialogue_tokens, policy=policy, retrieval_top_k=top_k,
                   positions=positions)


def run_quality(
    adapter: ModelAdapter, cfg: QualityConfig, *, sweep: bool = True, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Full memory on ``cfg.episodes`` episodes of ``cfg.split``, then (``sweep``) every budget x policy x retrieval."""
    seeds = cfg.seeds
    say = progress or (lambda _msg: None)
    full = EpisodeScore()
    full_runs: dict[int, EpisodeScore] = {}
    for seed in seeds:
        one = run_episode(adapter, seed, MemoryConfig(), cfg)
        full_runs[seed] = one
        full.merge(one)
    result: dict[str, Any] = {"model": adapter.source, "config": {**cfg.__dict__}, "split": cfg.split,
                              "seeds": [seeds[0], seeds[-1]], "full": full.summary(), "sweep": []}
    result["full"]["answers"] = full.answers
    say(f"full memory: {full.summary()['accuracy']} alerts {full.summary()['alerts']}")
    if cfg.rates:
        result["rates"] = alert_rates(adapter, cfg, say)
    if cfg.layout == "long":  # probe binding is about the short episodes' frames
        return result if not sweep else _sweep(adapter, cfg, full_runs, result, say)
    result["probe_binding"] = probe_binding(adapter, seeds, cfg.duration_s)
    say(f"probe P(yes) by case: { {k: v['mean_p_yes'] for k, v in result['probe_binding'].items()} }")
    if not sweep:
        return result
    return _sweep(adapter, cfg, full_runs, result, say)


def _sweep(adapter: ModelAdapter, cfg: QualityConfig, full_runs: dict[int, EpisodeScore], result: dict[str, Any],
           say: Callable[[str], None]) -> dict[str, Any]:
    """Every budget x policy x retrieval on the episodes of ``full_runs``; rows go to ``result["sweep"]``."""
    seeds = list(full_runs)
    for fraction in cfg.budgets:
        for policy in cfg.policies:
            for top_k in (cfg.retrieval_top_k, 0):
                total = EpisodeScore()
                for seed in seeds:
                    memory = sweep_memory(full_runs[seed], fraction, policy, top_k, cfg.positions)
                    total.merge(run_episode(adapter, seed, memory, cfg))
                row = {"budget": fraction, "policy": policy, "retrieval": top_k > 0, "top_k": top_k, **total.summary()}
                result["sweep"].append(row)
                say(f"budget {fraction:.0%} {policy} retrieval={'on' if top_k else 'off'}: {row['accuracy']} "
                    f"alerts f1 {row['alerts']['f1']}")
    return result


#: The working memory the rate measurement caps every stream at: about the 24 frames (at 4 visual tokens and a
#: dozen of text each) and the dialogue the shipped model was trained on, whatever the input rate.
RATE_BUDGET_TOKENS = 512


def alert_rates(adapter: ModelAdapter, cfg: QualityConfig, say: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Alerts of the standing watch at every rate of ``cfg.rates`` on the episodes of ``cfg``: the same episodes streamed
    at each rate, every frame probed, working memory capped at :data:`RATE_BUDGET_TOKENS` with positions re-indexed
    (at 10 frames/s a 24 s episode is 240 frames, ten times what the model was trained on). One row per rate:
    precision, recall, F1 with intervals, and the alert times per seed."""
    memory = MemoryConfig(budget_tokens=RATE_BUDGET_TOKENS, positions="reindex")
    rows = []
    for fps in cfg.rates:
        total = EpisodeScore()
        times: dict[int, list[float]] = {}
        for seed in cfg.seeds:
            one = run_episode(adapter, seed, memory, cfg, fps=fps, ask=False)
            times[seed] = [round(t, 2) for t in one.alert_times]
            total.merge(one)
        row = {"fps": fps, "alerts": total.summary()["alerts"], "alert_times": times}
        rows.append(row)
        if say is not None:
            say(f"alerts at {fps:g} frames/s: {row['alerts']}")
    return rows


def watch_scores(adapter: ModelAdapter, seed: int, cfg: QualityConfig, fps: float,
                 memory: MemoryConfig | None = None) -> tuple[list[tuple[float, float]], list[float]]:
    """The standing watch's probe scores of episode ``seed`` at ``fps`` frames per second, and its true appearances.

    The episode is streamed as :func:`alert_rates` streams it (working memory capped at :data:`RATE_BUDGET_TOKENS`
    with positions re-indexed unless ``memory`` says otherwise), the controller's own probe prompt is scored on
    every frame, and ``([(t, P(yes)), ...], [appearance times])`` comes back. Probes are rolled back, so the
    scores do not depend on any trigger rule: :func:`replay_alerts` then gives, for any rule, exactly the alerts
    :func:`run_episode` would raise, without streaming the episode again.
    """
    memory = memory or MemoryConfig(budget_tokens=RATE_BUDGET_TOKENS, positions="reindex")
    episode = make_episode(seed, duration_s=cfg.duration_s, fps=fps, size=FRAME_SIZE)
    colour, shape = watch_target(episode)
    controller = DialogueController(ControllerConfig(probe_every_frames=1))
    controller.add_watch("watch", f"a {colour} {shape} appears", 0.0)
    session = StreamSession(adapter, SessionConfig(sampling=SamplingConfig(max_new_tokens=12)), memory)
    scores: list[tuple[float, float]] = []
    try:
        for t, image in _read(episode, cfg.read_fps):
            session.ingest(image, t)
            for action in controller.frame(t):
                if isinstance(action, Poll):
                    values = session.probe([p.prompt for p in action.probes])
                    scores.append((t, values[0]))
    finally:
        session.close()
    return scores, appearances(episode, colour, shape)


def _read(episode: Any, read_fps: float) -> Iterable[tuple[float, Any]]:
    """The frames of ``episode`` a camera read at ``read_fps`` takes (0: every frame), as `streamvlm watch` samples them."""
    sampler = FpsSampler(read_fps) if read_fps else None
    return ((t, image) for t, image in episode.frames() if sampler is None or sampler.offer(t))


def replay_alerts(spec: TriggerSpec, scores: Iterable[tuple[float, float]]) -> list[float]:
    """The alert times a fresh rule built from ``spec`` raises on recorded ``(t, P(yes))`` scores, in order."""
    rule = make_rule(spec)
    return [t for t, p in scores if rule.update(p, t)]


def sweep_triggers(records: dict[float, dict[int, tuple[list[tuple[float, float]], list[float]]]],
                   specs: Iterable[TriggerSpec]) -> list[dict[str, Any]]:
    """Alert F1 of every rule of ``specs`` at every rate of ``records`` (fps -> seed -> :func:`watch_scores`).

    One row per spec: ``{"spec", "f1": {fps: F1}, "worst", "mean"}``, best first by the worst rate's F1
    (ties: the mean). This is how the default rule is chosen: on validation episodes only.
    """
    rows = []
    for spec in specs:
        f1 = {}
        for fps, per_seed in records.items():
            total = EpisodeScore()
            for scores, truth in per_seed.values():
                alerts = replay_alerts(spec, scores)
                total.alerts += len(alerts)
                total.truths += len(truth)
                total.alerts_true += match_alerts(alerts, truth)
            f1[fps] = total.summary()["alerts"]["f1"]
        rows.append({"spec": spec, "f1": f1, "worst": min(f1.values()), "mean": round(sum(f1.values()) / len(f1), 4)})
    rows.sort(key=lambda r: (-r["worst"], -r["mean"]))
    return rows


def _cell(summary: dict[str, Any], category: str) -> str:
    if category not in summary["accuracy"]:
        return "-"
    low, high = summary["interval"][category]
    return f"{summary['accuracy'][category]:.2f} [{low:.2f}, {high:.2f}]"


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of a :func:`run_quality` result: every accuracy with its 95 % interval in brackets,
    alert F1 with precision and recall (each with its interval), one row for full memory and one per sweep point."""
    seeds = result.get("seeds") or ["?", "?"]
    lines = [f"{result.get('model')}: {result.get('split', '?')} split, seeds {seeds[0]}-{seeds[1]} "
             f"(accuracy [95 % Wilson interval])",
             "| budget | policy | retrieval | " + " | ".join(REPORTED) + " | alert F1 (precision [CI], recall [CI]) |",
             "|" + "---|" * (len(REPORTED) + 4)]

    def row(budget: str, policy: str, retrieval: str, summary: dict[str, Any]) -> str:
        alerts = summary["alerts"]
        p_low, p_high = alerts.get("precision_interval", [0.0, 1.0])
        r_low, r_high = alerts.get("recall_interval", [0.0, 1.0])
        alert = (f"{alerts['f1']:.2f} ({alerts['precision']:.2f} [{p_low:.2f}, {p_high:.2f}], "
                 f"{alerts['recall']:.2f} [{r_low:.2f}, {r_high:.2f}])")
        return f"| {budget} | {policy} | {retrieval} | " + " | ".join(_cell(summary, c) for c in REPORTED) + f" | {alert} |"

    lines.append(row("100 %", "(full memory)", "-", result["full"]))
    for r in result.get("sweep", []):
        lines.append(row(f"{r['budget']:.0%}", r["policy"], f"{r['top_k']} chunks" if r["retrieval"] else "off", r))
    if result.get("rates"):
        lines += ["", f"alerts by input rate (working memory {RATE_BUDGET_TOKENS} tokens, positions re-indexed, every frame probed)",
                  "| frames/s | alert F1 | precision [CI] | recall [CI] | raised / true |", "|---|---|---|---|---|"]
        for r in result["rates"]:
            a = r["alerts"]
            lines.append(f"| {r['fps']:g} | {a['f1']:.2f} | {a['precision']:.2f} [{a['precision_interval'][0]:.2f}, "
                         f"{a['precision_interval'][1]:.2f}] | {a['recall']:.2f} [{a['recall_interval'][0]:.2f}, "
                         f"{a['recall_interval'][1]:.2f}] | {a['raised']} / {a['truth']} |")
    return "\n".join(lines)
