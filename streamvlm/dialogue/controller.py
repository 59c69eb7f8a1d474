"""The dialogue controller: who speaks when, as a pure state machine (Sans-I/O).

The controller owns no model, no clock and no socket. The engine around it reports what happened
(a frame was ingested, the user said something, probe scores came back, a generation started or
finished, time passed) by calling one method per event; each method returns the list of actions to
carry out, in order::

    controller = DialogueController(ControllerConfig(interrupt=True))
    for action in controller.user_message("q1", "Tell me when the kettle boils", t=3.0):
        execute(action)          # here: Acknowledge
    for action in controller.frame(t=4.0):
        execute(action)          # here: Poll -> score each probe on the frame, then call scores()
    for action in controller.scores(t=4.0, scores={"deferred:q1": 0.93}):
        execute(action)

Actions and what the engine does with each:

* :class:`AnswerNow` -- generate an answer to ``question`` from the current context and stream it
  out; call :meth:`~DialogueController.generation_started` / :meth:`~DialogueController.generation_finished`.
* :class:`Narrate` -- generate a short narration of what is happening; same start/finish calls.
* :class:`CancelGeneration` -- stop the named generation now (its finish call may follow; it is ignored).
* :class:`Acknowledge` -- tell the user the forward request was understood and will be answered later.
* :class:`Poll` -- score each probe's prompt as P(yes) on the current frame of ``source_id`` and
  call :meth:`~DialogueController.scores` with the results keyed by probe id.
* :class:`Alert` -- notify the user that a watched condition started to hold at ``evidence_t``.
* :class:`GiveUp` -- tell the user the forward request cannot be answered (e.g. "not seen yet").

Time ``t`` is seconds on the stream clock, passed in with every event; it must never go backwards.
Any event that raises (:class:`~streamvlm.errors.InputError`, :class:`~streamvlm.errors.TimestampError`)
leaves the controller exactly as it was: fix the input and call again.

At most one generation (answer or narration) runs at a time. Once the controller has emitted an
``AnswerNow`` or ``Narrate`` it counts that request as generating until ``generation_finished`` (or
it cancels it), so answers decided meanwhile are queued rather than sent to a busy engine.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from ..errors import ConfigError, InputError, QuestionError
from .triggers import TriggerRule, TriggerSpec, check_score, check_time, make_rule

__all__ = [
    "ControllerConfig",
    "DialogueController",
    "Action",
    "AnswerNow",
    "Acknowledge",
    "Poll",
    "Probe",
    "Alert",
    "CancelGeneration",
    "Narrate",
    "GiveUp",
    "AnswerTrigger",
    "DEFAULT_PROBE_TEMPLATE",
    "DEFERRED_PREFIX",
    "NARRATION_PREFIX",
    "NOT_SEEN_YET",
    "parse_forward_request",
    "clean_condition",
]

AnswerTrigger = Literal["user", "deferred", "watch", "commentary"]

#: Default yes/no probe wording; ``{condition}`` is replaced by the watched condition.
DEFAULT_PROBE_TEMPLATE = "Is it true that {condition} right now? Answer yes or no."
#: Probe ids of deferred questions are this prefix followed by the request id.
DEFERRED_PREFIX = "deferred:"
#: :attr:`GiveUp.reason` when a deferred question's condition was never observed.
NOT_SEEN_YET = "not seen yet"
#: Request ids of narrations are this prefix followed by a counter.
NARRATION_PREFIX = "narration:"


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class AnswerNow:
    """Generate an answer to ``question`` now; report it with generation_started/finished."""

    # Stream time the action is issued at.
    t: float
    # Id to report in generation_started / generation_finished.
    request_id: str
    # The user's text, verbatim (for a deferred question: the original forward request).
    question: str
    # Why it is answered now: "user" (asked just now), "deferred" (its condition fired),
    # "watch" or "commentary" (reserved for answers raised by those paths).
    trigger: AnswerTrigger
    # A deferred answer's evidence, (since, seen): its condition began after ``since`` (the score
    # before the first one that counted) and was seen on the frame at ``seen``, when its rule fired;
    # ``t`` is later when the answer waited behind another. None for other answers.
    evidence: tuple[float, float] | None = None


@dataclass(frozen=True)
class Acknowledge:
    """Tell the user the forward request was understood; it will be answered when ``condition`` holds."""

    # Stream time the action is issued at.
    t: float
    # The deferred question's request id.
    request_id: str
    # The condition being waited for, as parsed from the request.
    condition: str


@dataclass(frozen=True)
class Probe:
    """One yes/no question to score on the current frame."""

    # Key to use for this probe's score in DialogueController.scores.
    probe_id: str
    # The full yes/no prompt; its score is P(yes).
    prompt: str


@dataclass(frozen=True)
class Poll:
    """Score every probe's P(yes) on the current frame of ``source_id``, then call ``scores``."""

    # Stream time of the frame to score.
    t: float
    # The probes, watches first then deferred questions, each in the order they were added.
    probes: tuple[Probe, ...]
    # The source whose frame triggered the poll.
    source_id: str = "default"


@dataclass(frozen=True)
class Alert:
    """Notify the user that the watched ``condition`` started to hold."""

    # Stream time the action is issued at.
    t: float
    # The watch that fired.
    watch_id: str
    # Its condition.
    condition: str
    # Time of the scores that fired it (the frame showing the condition).
    evidence_t: float


@dataclass(frozen=True)
class CancelGeneration:
    """Stop generating ``request_id`` now; a later generation_finished for it is ignored."""

    # Stream time the action is issued at.
    t: float
    # The generation to stop.
    request_id: str


@dataclass(frozen=True)
class Narrate:
    """Generate a short narration of what is happening now; report it with generation_started/finished."""

    # Stream time the action is issued at.
    t: float
    # Id to report in generation_started / generation_finished.
    request_id: str


@dataclass(frozen=True)
class GiveUp:
    """Tell the user the deferred question will not be answered, and why."""

    # Stream time the action is issued at.
    t: float
    # The deferred question's request id.
    request_id: str
    # The user's original text.
    question: str
    # Why: NOT_SEEN_YET when the condition was never observed (stream ended or timed out).
    reason: str


Action = AnswerNow | Acknowledge | Poll | Alert | CancelGeneration | Narrate | GiveUp


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ControllerConfig:
    """How the controller schedules probes, answers and narration; checked when built (ConfigError)."""

    # Poll the probes at most every probe_every_s stream seconds per source (0 = every frame): the same
    # probe rate whatever the input frame rate.
    probe_every_s: float = 0.0
    # Deprecated (depends on the frame rate): also skip all but every probe_every_frames-th frame of a source.
    probe_every_frames: int = 1
    # True: a user message cancels the running generation (start of activity interrupts).
    # False: it waits in the queue until the running generation finishes.
    interrupt: bool = True
    # Give up on a deferred question this many seconds after it was asked; None = wait for stream end.
    deferred_timeout_s: float | None = None
    # Narrate at most this often, and only after the scene changed; None = no commentary.
    commentary_every_s: float | None = None
    # Yes/no probe wording; must contain "{condition}" and no other replacement field.
    probe_template: str = DEFAULT_PROBE_TEMPLATE
    # Rule for deferred questions and for watches added without a spec.
    default_trigger: TriggerSpec = field(default_factory=TriggerSpec)

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: {message}")

        def positive_or_none(value: object) -> bool:
            return value is None or (
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and value != float("inf")
            )

        require(isinstance(self.probe_every_frames, int) and not isinstance(self.probe_every_frames, bool)
                and self.probe_every_frames >= 1, "probe_every_frames",
                f"must be an integer >= 1, got {self.probe_every_frames!r}")
        require(isinstance(self.probe_every_s, (int, float)) and not isinstance(self.probe_every_s, bool)
                and 0 <= self.probe_every_s <= 3600, "probe_every_s",
                f"must be a number of seconds in [0, 3600], got {self.probe_every_s!r}")
        require(isinstance(self.interrupt, bool), "interrupt", f"must be True or False, got {self.interrupt!r}")
        require(positive_or_none(self.deferred_timeout_s), "deferred_timeout_s",
                f"must be None or a finite number of seconds > 0, got {self.deferred_timeout_s!r}")
        require(positive_or_none(self.commentary_every_s), "commentary_every_s",
                f"must be None or a finite number of seconds > 0, got {self.commentary_every_s!r}")
        require(isinstance(self.default_trigger, TriggerSpec), "default_trigger",
                f"must be a TriggerSpec, got {type(self.default_trigger).__name__}")
        require(isinstance(self.probe_template, str) and _template_fields(self.probe_template) == {"condition"},
                "probe_template", f"must contain {{condition}} and no other field, got {self.probe_template!r}")


def _template_fields(template: str) -> set[str] | None:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError:
        return None


# --------------------------------------------------------------------------- parsing

_FORWARD = re.compile(
    r"^\s*(?:please\s+)?"
    r"(?:tell\s+me|let\s+me\s+know|notify\s+me|alert\s+me|wake\s+me(?:\s+up)?)"
    r"\s+when\s+(?P<condition>.*?)\s*[?.]?\s*$",
    re.IGNORECASE | re.DOTALL,
)


def clean_condition(condition: str) -> str:
    """``condition`` without surrounding whitespace and without one trailing '?' or '.'."""
    text = condition.strip()
    if text[-1:] in ("?", "."):
        text = text[:-1].rstrip()
    return text


def parse_forward_request(text: str) -> str | None:
    """The condition X of a forward request ("tell me when X", "let me know when X", "notify me when X",
    "alert me when X", "wake me when X"; case-insensitive, optional trailing '?' or '.'), else None."""
    match = _FORWARD.match(text)
    if match is None:
        return None
    condition = clean_condition(match.group("condition"))
    return condition or None


# --------------------------------------------------------------------------- state


@dataclass
class _Watch:
    condition: str
    probe: Probe
    rule: TriggerRule


@dataclass
class _Deferred:
    question: str
    condition: str
    asked_t: float
    probe: Probe
    rule: TriggerRule


def _check_id(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{name}: must be a non-empty string, got {value!r}")
    return value


class DialogueController:
    """Decides when to answer, poll, alert, narrate, cancel or give up; performs none of it.

    Feed it events with its methods (``user_message``, ``add_watch``, ``remove_watch``, ``frame``,
    ``scores``, ``generation_started``, ``generation_finished``, ``cancel``, ``tick``,
    ``stream_ended``, ``frame_changed``); each returns the actions to execute, in order. Read its
    state with ``watches``, ``pending_deferred``, ``generating``, ``queued``, ``probes``, ``last_t``,
    ``ended``, ``frames_seen``, ``last_narration_t``, ``scene_changed`` and :meth:`rule`.
    """

    def __init__(self, config: ControllerConfig | None = None) -> None:
        if config is None:
            config = ControllerConfig()
        if not isinstance(config, ControllerConfig):
            raise ConfigError(f"config: must be a ControllerConfig, got {type(config).__name__}")
        self.config = config
        self._start_t: float | None = None
        self._last_t: float | None = None
        self._ended = False
        self._watches: dict[str, _Watch] = {}
        self._deferred: dict[str, _Deferred] = {}
        self._generating: str | None = None
        self._queue: list[AnswerNow] = []
        self._frames: dict[str, int] = {}
        self._last_poll: dict[str, float] = {}
        self._last_narration_t: float | None = None
        self._changed = False
        self._narrations = 0

    # ------------------------------------------------------------------ inspectable state

    @property
    def watches(self) -> Mapping[str, str]:
        """Active watches: watch id -> condition, in the order they were added (read-only)."""
        return MappingProxyType({wid: w.condition for wid, w in self._watches.items()})

    @property
    def pending_deferred(self) -> tuple[str, ...]:
        """Request ids of deferred questions still waiting for their condition, oldest first."""
        return tuple(self._deferred)

    @property
    def generating(self) -> str | None:
        """Request id of the answer or narration being generated, or None when idle."""
        return self._generating

    @property
    def queued(self) -> tuple[AnswerNow, ...]:
        """Answers waiting for the running generation to finish, first to go first."""
        return tuple(self._queue)

    @property
    def probes(self) -> tuple[Probe, ...]:
        """The probes the next Poll will list: watches first, then deferred questions."""
        return tuple(w.probe for w in self._watches.values()) + tuple(d.probe for d in self._deferred.values())

    @property
    def last_t(self) -> float | None:
        """Time of the latest event, or None before the first one."""
        return self._last_t

    @property
    def ended(self) -> bool:
        """Whether stream_ended has been received."""
        return self._ended

    @property
    def frames_seen(self) -> Mapping[str, int]:
        """Frames received so far, per source id (read-only)."""
        return MappingProxyType(dict(self._frames))

    @property
    def last_narration_t(self) -> float | None:
        """Time of the latest Narrate, or None before the first one."""
        return self._last_narration_t

    @property
    def scene_changed(self) -> bool:
        """Whether frame_changed(changed=True) arrived since the latest Narrate (commentary is eligible)."""
        return self._changed

    def rule(self, probe_id: str) -> TriggerRule:
        """The live trigger rule behind a probe id (watch id or ``deferred:<request_id>``), for inspection."""
        if probe_id in self._watches:
            return self._watches[probe_id].rule
        if probe_id.startswith(DEFERRED_PREFIX) and probe_id[len(DEFERRED_PREFIX):] in self._deferred:
            return self._deferred[probe_id[len(DEFERRED_PREFIX):]].rule
        raise InputError(f"probe_id: no active probe {probe_id!r}")

    # ------------------------------------------------------------------ events

    def user_message(self, request_id: str, text: str, t: float) -> list[Action]:
        """The user said ``text``. Returns what to do about it.

        A forward request ("tell me when X", ...) becomes a deferred question: ``[Acknowledge]`` now,
        an ``AnswerNow(trigger="deferred")`` once X is seen (or ``GiveUp``). After the stream ended it
        is given up at once. Any other text is answered now: ``[AnswerNow(trigger="user")]``, preceded
        by ``CancelGeneration`` of the running generation when ``config.interrupt`` is on; with it off
        and something generating, nothing is returned yet and the answer is queued (see ``queued``).
        Raises QuestionError for empty text, InputError for a request id already in use.
        """
        check_time(t, self._last_t)
        _check_id(request_id, "request_id")
        if not isinstance(text, str) or not text.strip():
            raise QuestionError(f"text: must be a non-empty string, got {text!r}")
        if request_id in self._active_request_ids():
            raise InputError(f"request_id: {request_id!r} is already in use")

        condition = parse_forward_request(text)
        if condition is not None:
            self._advance(t)
            if self._ended:
                return [GiveUp(t, request_id, text, NOT_SEEN_YET)]
            prompt = self.config.probe_template.format(condition=condition)
            probe = Probe(DEFERRED_PREFIX + request_id, prompt)
            self._deferred[request_id] = _Deferred(text, condition, t, probe, make_rule(self.config.default_trigger))
            return [Acknowledge(t, request_id, condition)]

        self._advance(t)
        answer = AnswerNow(t, request_id, text, "user")
        if self._generating is None:
            self._generating = request_id
            return [answer]
        if self.config.interrupt:
            cancelled = self._generating
            self._generating = request_id
            return [CancelGeneration(t, cancelled), answer]
        self._queue.append(answer)
        return []

    def add_watch(self, watch_id: str, condition: str, t: float, spec: TriggerSpec | None = None) -> list[Action]:
        """Start watching for ``condition``; it is probed from the next poll and alerts on every rising edge.

        ``spec`` picks the trigger rule (default: ``config.default_trigger``). Returns ``[]``.
        Raises InputError for an empty or duplicate id, an id starting with ``deferred:``, an empty
        condition, or a stream that has ended; ConfigError for a spec that is not a TriggerSpec.
        """
        check_time(t, self._last_t)
        _check_id(watch_id, "watch_id")
        if watch_id in self._watches:
            raise InputError(f"watch_id: {watch_id!r} is already watched")
        if watch_id.startswith(DEFERRED_PREFIX):
            raise InputError(f"watch_id: must not start with {DEFERRED_PREFIX!r}, got {watch_id!r}")
        cleaned = clean_condition(condition) if isinstance(condition, str) else ""
        if not cleaned:
            raise InputError(f"condition: must be a non-empty string, got {condition!r}")
        if self._ended:
            raise InputError("add_watch: the stream has ended")
        rule = make_rule(self.config.default_trigger if spec is None else spec)
        probe = Probe(watch_id, self.config.probe_template.format(condition=cleaned))
        self._watches[watch_id] = _Watch(cleaned, probe, rule)
        self._advance(t)
        return []

    def remove_watch(self, watch_id: str, t: float) -> list[Action]:
        """Stop watching ``watch_id``; later scores for it are ignored. Returns ``[]``.

        Raises InputError if no such watch is active.
        """
        check_time(t, self._last_t)
        if watch_id not in self._watches:
            raise InputError(f"watch_id: no active watch {watch_id!r}")
        del self._watches[watch_id]
        self._advance(t)
        return []

    def frame(self, t: float, source_id: str = "default") -> list[Action]:
        """A frame of ``source_id`` at time ``t`` was ingested. Returns, in order:

        ``GiveUp`` for deferred questions past ``deferred_timeout_s``; one ``Poll`` of every active
        probe when at least ``probe_every_s`` stream seconds passed since the source's last poll (and
        this is its ``probe_every_frames``-th frame): score them on this frame and call ``scores``;
        ``Narrate`` when commentary is due. Raises InputError after stream_ended.
        """
        check_time(t, self._last_t)
        _check_id(source_id, "source_id")
        if self._ended:
            raise InputError("frame: the stream has ended")
        self._advance(t)
        actions: list[Action] = self._expire(t)
        count = self._frames.get(source_id, 0) + 1
        self._frames[source_id] = count
        probes = self.probes
        last_poll = self._last_poll.get(source_id)
        due = last_poll is None or t - last_poll >= self.config.probe_every_s - 1e-6
        if count % self.config.probe_every_frames == 0 and probes and due:
            self._last_poll[source_id] = t
            actions.append(Poll(t, probes, source_id))
        actions.extend(self._maybe_narrate(t))
        return actions

    def scores(self, t: float, scores: Mapping[str, float]) -> list[Action]:
        """Probe results for the frame at ``t``: probe id -> P(yes). Returns what the scores set off.

        Each score feeds its probe's rule. A watch whose rule fires gives ``Alert`` (evidence_t=t);
        a deferred question whose rule fires is done and gives ``AnswerNow(trigger="deferred")``,
        queued instead if something is generating. Ids that are not (or no longer) active are ignored;
        missing ids leave their rule untouched. Raises InputError for a score outside [0, 1].
        """
        check_time(t, self._last_t)
        if not isinstance(scores, Mapping):
            raise InputError(f"scores: must be a mapping of probe id to P(yes), got {type(scores).__name__}")
        for probe_id, score in scores.items():
            check_score(score, t, None, what=f"scores[{probe_id!r}]")
        self._advance(t)
        actions: list[Action] = []
        for watch_id, watch in self._watches.items():
            if watch_id in scores and watch.rule.update(scores[watch_id], t):
                actions.append(Alert(t, watch_id, watch.condition, t))
        for request_id, deferred in list(self._deferred.items()):
            probe_id = deferred.probe.probe_id
            if probe_id in scores and deferred.rule.update(scores[probe_id], t):
                del self._deferred[request_id]
                since = deferred.rule.last_fire_since
                evidence = (t if since is None else min(max(since, 0.0), t), t)  # stream times start at 0
                actions.extend(self._dispatch(AnswerNow(t, request_id, deferred.question, "deferred", evidence)))
        return actions

    def generation_started(self, request_id: str, t: float) -> list[Action]:
        """The engine started generating ``request_id``. Returns ``[]``.

        Confirms an emitted AnswerNow/Narrate; when idle it records a generation the engine started
        by itself. Raises InputError if a different request is generating.
        """
        check_time(t, self._last_t)
        _check_id(request_id, "request_id")
        if self._generating is not None and self._generating != request_id:
            raise InputError(f"request_id: {request_id!r} started while {self._generating!r} is generating")
        self._generating = request_id
        self._advance(t)
        return []

    def generation_finished(self, request_id: str, t: float) -> list[Action]:
        """The engine finished (or stopped) generating ``request_id``.

        If it was the running generation, the next queued answer goes out now: ``[AnswerNow]`` (its
        ``t`` is this event's time), else ``[]``. A finish for any other request (one that was
        cancelled or replaced) is ignored.
        """
        check_time(t, self._last_t)
        _check_id(request_id, "request_id")
        self._advance(t)
        if request_id != self._generating:
            return []
        self._generating = None
        if not self._queue:
            return []
        answer = replace(self._queue.pop(0), t=t)
        self._generating = answer.request_id
        return [answer]

    def cancel(self, t: float) -> list[Action]:
        """The user asked to stop: ``[CancelGeneration]`` for the running generation and the queue is
        dropped; ``[]`` when idle. Deferred questions and watches stay active."""
        check_time(t, self._last_t)
        self._advance(t)
        if self._generating is None:
            return []
        running = self._generating
        self._generating = None
        self._queue.clear()
        return [CancelGeneration(t, running)]

    def withdraw(self, request_id: str, t: float) -> list[Action]:
        """The user cancelled one request: it leaves the queue or the deferred questions, or, if it is
        generating, ``[CancelGeneration]`` is returned (the next queued answer then goes out when its
        finish arrives). Returns ``[]`` when nothing was running; raises InputError for an unknown id."""
        check_time(t, self._last_t)
        _check_id(request_id, "request_id")
        self._advance(t)
        if request_id == self._generating:
            return [CancelGeneration(t, request_id)]
        if self._deferred.pop(request_id, None) is not None:
            return []
        queued = [a for a in self._queue if a.request_id == request_id]
        if not queued:
            raise InputError(f"request_id: no pending request {request_id!r}")
        self._queue.remove(queued[0])
        return []

    def tick(self, t: float) -> list[Action]:
        """Time passed with nothing else happening. Returns ``GiveUp`` for timed-out deferred
        questions and ``Narrate`` if commentary is due."""
        check_time(t, self._last_t)
        self._advance(t)
        return self._expire(t) + self._maybe_narrate(t)

    def stream_ended(self, t: float) -> list[Action]:
        """The video ended. Every pending deferred question is given up (``GiveUp``, reason
        NOT_SEEN_YET), oldest first; queued answers still go out as generations finish. Frames and
        new watches are refused from now on. A second call returns ``[]``."""
        check_time(t, self._last_t)
        self._advance(t)
        self._ended = True
        actions: list[Action] = [GiveUp(t, rid, d.question, NOT_SEEN_YET) for rid, d in self._deferred.items()]
        self._deferred.clear()
        return actions

    def frame_changed(self, t: float, changed: bool) -> list[Action]:
        """Hint from frame deduplication: whether the latest frame differs from the previous one.

        A change makes commentary eligible at the next frame or tick. Returns ``[]``.
        """
        check_time(t, self._last_t)
        if not isinstance(changed, bool):
            raise InputError(f"changed: must be True or False, got {changed!r}")
        self._advance(t)
        self._changed = self._changed or changed
        return []

    # ------------------------------------------------------------------ internals

    def _advance(self, t: float) -> None:
        if self._start_t is None:
            self._start_t = float(t)
        self._last_t = float(t)

    def _active_request_ids(self) -> set[str]:
        ids = set(self._deferred)
        ids.update(answer.request_id for answer in self._queue)
        if self._generating is not None:
            ids.add(self._generating)
        return ids

    def _dispatch(self, answer: AnswerNow) -> list[Action]:
        """Emit ``answer`` now if idle, else queue it behind the running generation (never interrupts)."""
        if self._generating is None:
            self._generating = answer.request_id
            return [answer]
        self._queue.append(answer)
        return []

    def _expire(self, t: float) -> list[Action]:
        timeout = self.config.deferred_timeout_s
        if timeout is None:
            return []
        expired = [rid for rid, d in self._deferred.items() if t - d.asked_t >= timeout]
        actions: list[Action] = []
        for rid in expired:
            deferred = self._deferred.pop(rid)
            actions.append(GiveUp(t, rid, deferred.question, NOT_SEEN_YET))
        return actions

    def _maybe_narrate(self, t: float) -> list[Action]:
        every = self.config.commentary_every_s
        if every is None or self._ended:
            return []
        # Before the first narration the interval is measured from the first event.
        since = self._start_t if self._last_narration_t is None else self._last_narration_t
        if not self._changed or self._generating is not None or since is None or t - since < every:
            return []
        self._narrations += 1
        request_id = f"{NARRATION_PREFIX}{self._narrations}"
        self._generating = request_id
        self._last_narration_t = t
        self._changed = False
        return [Narrate(t, request_id)]
