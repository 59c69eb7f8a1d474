"""Dialogue control for live video: when to answer, poll, alert, narrate, cancel or give up.

A Sans-I/O core: no model, no clock, no event loop. The engine reports events to a
:class:`DialogueController` and carries out the actions it returns; time is passed in as data.
:mod:`.triggers` holds the rules that turn a stream of yes/no probe scores into rising-edge fires.
"""

from __future__ import annotations

from .controller import (
    DEFAULT_PROBE_TEMPLATE,
    DEFERRED_PREFIX,
    NARRATION_PREFIX,
    NOT_SEEN_YET,
    Acknowledge,
    Action,
    Alert,
    AnswerNow,
    AnswerTrigger,
    CancelGeneration,
    ControllerConfig,
    DialogueController,
    GiveUp,
    Narrate,
    Poll,
    Probe,
    clean_condition,
    parse_forward_request,
)
from .triggers import (
    STD_FLOOR,
    RunningSumRule,
    ThresholdRule,
    TriggerKind,
    TriggerRule,
    TriggerSpec,
    ZScoreRule,
    make_rule,
)

__all__ = [
    "Acknowledge",
    "Action",
    "Alert",
    "AnswerNow",
    "AnswerTrigger",
    "CancelGeneration",
    "ControllerConfig",
    "DEFAULT_PROBE_TEMPLATE",
    "DEFERRED_PREFIX",
    "DialogueController",
    "NARRATION_PREFIX",
    "GiveUp",
    "NOT_SEEN_YET",
    "Narrate",
    "Poll",
    "Probe",
    "RunningSumRule",
    "STD_FLOOR",
    "ThresholdRule",
    "TriggerKind",
    "TriggerRule",
    "TriggerSpec",
    "ZScoreRule",
    "clean_condition",
    "make_rule",
    "parse_forward_request",
]
