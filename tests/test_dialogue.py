"""The dialogue controller and its trigger rules, driven with scripted scores and explicit times."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

from streamvlm.dialogue import (
    DEFAULT_PROBE_TEMPLATE,
    NOT_SEEN_YET,
    Acknowledge,
    Alert,
    AnswerNow,
    CancelGeneration,
    ControllerConfig,
    DialogueController,
    GiveUp,
    Narrate,
    Poll,
    Probe,
    RunningSumRule,
    ThresholdRule,
    TriggerSpec,
    ZScoreRule,
    make_rule,
    parse_forward_request,
)
from streamvlm.errors import ConfigError, InputError, QuestionError, TimestampError

DIALOGUE_DIR = pathlib.Path(__file__).resolve().parents[1] / "streamvlm" / "dialogue"


def feed(rule, scores, t0=0.0, dt=1.0):
    """Feed ``scores`` at t0, t0+dt, ...; return the times at which the rule fired."""
    return [t0 + i * dt for i, p in enumerate(scores) if rule.update(p, t0 + i * dt)]


def run_watch(controller, watch_id, scores, t0=0.0, dt=1.0):
    """Frame + scores for each score; return the evidence times of the alerts."""
    fired = []
    for i, p in enumerate(scores):
        t = t0 + i * dt
        polls = [a for a in controller.frame(t) if isinstance(a, Poll)]
        assert polls and watch_id in [probe.probe_id for probe in polls[0].probes]
        fired += [a.evidence_t for a in controller.scores(t, {watch_id: p}) if isinstance(a, Alert)]
    return fired


# --------------------------------------------------------------------------- rules


def test_threshold_rule_fires_on_rising_edge_with_hysteresis():
    rule = ThresholdRule(on=0.6, off=0.4, hold_s=1.5, window_s=3.0)
    #        0    1    2    3    4    5     6    7    8    9
    seq = [0.1, 0.9, 0.8, 0.9, 0.9, 0.5, 0.45, 0.9, 0.3, 0.9]
    # Fires on the 2nd "yes" (t=2); 0.5/0.45 are inside the band so it stays disarmed at t=7; 0.3 re-arms.
    assert feed(rule, seq) == [2.0]
    assert feed(rule, [0.9], t0=10.0) == [10.0]  # after the re-arm, 2 fresh yes votes: t=9 and t=10
    rule.reset()
    assert rule.armed and rule.votes == () and rule.last_fire_t is None
    assert feed(rule, [0.1, 0.7, 0.2, 0.7, 0.7]) == [3.0]  # 2 of the last 3 (t=1, t=3); armed, so no clear


def test_threshold_rule_needs_fresh_votes_after_rearm():
    rule = ThresholdRule(on=0.6, off=0.4, hold_s=1.5, window_s=3.0)
    # Re-armed at t=2 with an empty window: t=3 alone is not enough; t=3 and t=5 are.
    # (Keeping the old votes would have fired at t=3 on the pre-drop yes at t=1.)
    assert feed(rule, [0.9, 0.9, 0.1, 0.9, 0.1, 0.9, 0.9]) == [1.0, 5.0]


def test_running_sum_rule_fires_on_sustained_evidence_not_on_flat():
    rule = RunningSumRule(threshold=1.5, baseline=0.5)
    # acc: 0.4, 0.8, 1.2, 1.6 -> fire at t=3; disarmed until a score < 0.5.
    assert feed(rule, [0.9, 0.9, 0.9, 0.9, 0.9, 0.9]) == [3.0]
    assert rule.acc == 0.0 and not rule.armed
    assert feed(rule, [0.2, 1.0, 1.0, 1.0, 1.0], t0=6.0) == [9.0]  # re-armed at t=6, acc 0.5, 1.0, 1.5
    flat = RunningSumRule(threshold=1.5, baseline=0.5)
    assert feed(flat, [0.5] * 50) == [] and flat.acc == 0.0
    low = RunningSumRule(threshold=1.5, baseline=0.5)
    assert feed(low, [0.2, 0.3, 0.1] * 10) == []


def test_zscore_rule_fires_on_a_jump_not_on_flat_or_always_high():
    rule = ZScoreRule(z=2.5, history_s=30, min_history_s=8)
    base = [0.10, 0.12, 0.09, 0.11, 0.10, 0.12, 0.08, 0.11, 0.10, 0.09]
    assert feed(rule, base + [0.85, 0.9, 0.1, 0.1]) == [10.0]
    assert rule.last_z is not None and rule.last_z < 1.0 and rule.armed  # back to normal: re-armed

    assert feed(ZScoreRule(), [0.3] * 40) == []
    assert feed(ZScoreRule(), [0.95] * 40) == []  # always "yes" is not news
    # Not before min_history scores are known, however large the jump.
    assert feed(ZScoreRule(min_history_s=8), [0.0] * 5 + [1.0]) == []


def test_cooldown_suppresses_a_rapid_refire():
    rule = ThresholdRule(on=0.6, off=0.4, hold_s=0.5, window_s=1.0, cooldown_s=5.0)
    # t: 0 fire; 1 re-arm; 2 would fire -> suppressed; 3 drop; 4 would fire -> suppressed; 6 fires.
    assert feed(rule, [0.9, 0.1, 0.9, 0.1, 0.9, 0.1, 0.9]) == [0.0, 6.0]


def test_cooldown_suppressed_fire_stays_armed_and_fires_when_cooldown_ends():
    rule = ThresholdRule(on=0.6, off=0.4, hold_s=0.5, window_s=1.0, cooldown_s=5.0)
    # Condition rises again at t=2 and holds: fires at t=5, the first update out of the cooldown.
    assert feed(rule, [0.9, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]) == [0.0, 5.0]

    acc = RunningSumRule(threshold=1.0, baseline=0.5, cooldown_s=10.0)
    # Fires at t=1 (acc 1.0); re-arms at t=2; would fire at t=4; suppressed: acc clamped at 1.0.
    assert feed(acc, [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]) == [1.0]
    assert acc.armed and acc.acc == 1.0
    assert feed(acc, [0.4, 0.4], t0=11.0) == []  # evidence dropped below baseline by then: no late fire
    assert feed(acc, [1.0], t0=13.0) == [13.0]


def test_rules_validate_inputs_and_time():
    rule = ThresholdRule()
    rule.update(0.5, 1.0)
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(InputError):
            rule.update(bad, 2.0)
    with pytest.raises(TimestampError):
        rule.update(0.5, 0.5)
    with pytest.raises(TimestampError):
        rule.update(0.5, float("inf"))
    assert rule.last_t == 1.0 and rule.votes == (False,)


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: TriggerSpec(kind="edge"), "kind"),
        (lambda: TriggerSpec(cooldown_s=-1.0), "cooldown_s"),
        (lambda: TriggerSpec(on=1.2), "on"),
        (lambda: TriggerSpec(on=0.3, off=0.5), "off"),
        (lambda: TriggerSpec(m=4, n=3), "m"),
        (lambda: TriggerSpec(n=0), "n"),
        (lambda: TriggerSpec(m=1.5), "m"),
        (lambda: TriggerSpec(threshold=0.0), "threshold"),
        (lambda: TriggerSpec(baseline=1.0), "baseline"),
        (lambda: TriggerSpec(z=0.0), "z"),
        (lambda: TriggerSpec(window=1), "window"),
        (lambda: TriggerSpec(min_history=40), "min_history"),
        (lambda: ThresholdRule(on=0.2, off=0.3), "off"),
        (lambda: ZScoreRule(history_s=4, min_history_s=5), "min_history_s"),
        (lambda: RunningSumRule(cooldown_s=float("nan")), "cooldown_s"),
    ],
)
def test_bad_trigger_specs_raise_config_error(build, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        build()


def test_make_rule_builds_each_kind():
    assert isinstance(make_rule(TriggerSpec()), ThresholdRule)
    sum_rule = make_rule(TriggerSpec(kind="sum", threshold=2.0, baseline=0.3, cooldown_s=4.0))
    assert isinstance(sum_rule, RunningSumRule) and sum_rule.threshold == 2.0 and sum_rule.cooldown_s == 4.0
    z_rule = make_rule(TriggerSpec(kind="zscore", z=3.0, window=10, min_history=5))
    assert isinstance(z_rule, ZScoreRule) and (z_rule.z, z_rule.history_s, z_rule.min_history_s) == (3.0, 10.0, 5.0)
    with pytest.raises(ConfigError):
        make_rule("threshold")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, condition",
    [
        ("Tell me when the kettle boils", "the kettle boils"),
        ("let me know when the dog enters the room?", "the dog enters the room"),
        ("NOTIFY ME WHEN a car parks.", "a car parks"),
        ("alert me when someone waves", "someone waves"),
        ("Wake me when the game starts", "the game starts"),
        ("What is on the table?", None),
        ("tell me when", None),
        ("When does the kettle boil?", None),
    ],
)
def test_forward_requests_are_recognised(text, condition):
    assert parse_forward_request(text) == condition


# --------------------------------------------------------------------------- controller


def test_plain_question_is_answered_immediately():
    c = DialogueController()
    assert c.user_message("q1", "What is on the table?", t=1.0) == [
        AnswerNow(t=1.0, request_id="q1", question="What is on the table?", trigger="user")
    ]
    assert c.generating == "q1"
    assert c.generation_started("q1", t=1.1) == []
    assert c.generation_finished("q1", t=2.0) == [] and c.generating is None


def test_deferred_question_acknowledged_polled_answered_once():
    c = DialogueController()
    text = "Tell me when the kettle is boiling?"
    assert c.user_message("q1", text, t=0.0) == [Acknowledge(t=0.0, request_id="q1", condition="the kettle is boiling")]
    assert c.pending_deferred == ("q1",)
    prompt = DEFAULT_PROBE_TEMPLATE.format(condition="the kettle is boiling")
    assert prompt == "Is it true that the kettle is boiling right now? Answer yes or no."

    answers = []
    for i, p in enumerate([0.1, 0.2, 0.8, 0.9, 0.95, 0.9]):
        t = 1.0 + i
        actions = c.frame(t)
        if c.pending_deferred:  # polled on every frame while pending, never after
            assert actions == [Poll(t=t, probes=(Probe("deferred:q1", prompt),))]
        else:
            assert actions == []
        answers += c.scores(t, {"deferred:q1": p})
    # The default threshold rule (0.8 s of scores >= 0.6 in the last 3 s: one probe at 1/s) fires on the
    # first high score, at t=3; once. Its evidence: the kettle began to boil after the frame at t=2 (the last
    # "no") and was seen at t=3.
    assert answers == [AnswerNow(t=3.0, request_id="q1", question=text, trigger="deferred", evidence=(2.0, 3.0))]
    assert c.pending_deferred == () and c.generating == "q1"
    assert c.stream_ended(t=10.0) == []  # nothing left to give up


def test_deferred_question_gives_up_on_stream_end():
    c = DialogueController()
    c.user_message("q1", "let me know when the bus arrives", t=0.0)
    c.user_message("q2", "notify me when it rains.", t=0.5)
    for t in (1.0, 2.0):
        c.frame(t)
        c.scores(t, {"deferred:q1": 0.1, "deferred:q2": 0.2})
    assert c.stream_ended(t=3.0) == [
        GiveUp(t=3.0, request_id="q1", question="let me know when the bus arrives", reason=NOT_SEEN_YET),
        GiveUp(t=3.0, request_id="q2", question="notify me when it rains.", reason=NOT_SEEN_YET),
    ]
    assert c.pending_deferred == () and c.ended
    with pytest.raises(InputError):
        c.frame(4.0)
    # A forward request after the end cannot be seen any more.
    assert c.user_message("q3", "tell me when it stops", t=5.0) == [
        GiveUp(t=5.0, request_id="q3", question="tell me when it stops", reason=NOT_SEEN_YET)
    ]
    # Questions about what was seen are still answered.
    assert c.user_message("q4", "What colour was the bus?", t=5.0)[0].trigger == "user"


def test_deferred_question_times_out_on_tick_or_frame():
    c = DialogueController(ControllerConfig(deferred_timeout_s=10.0))
    c.user_message("a", "tell me when the door opens", t=0.0)
    c.user_message("b", "tell me when the light turns on", t=5.0)
    assert c.tick(9.9) == []
    assert c.tick(10.0) == [GiveUp(10.0, "a", "tell me when the door opens", NOT_SEEN_YET)]
    assert c.pending_deferred == ("b",)
    actions = c.frame(15.0)
    assert actions[0] == GiveUp(15.0, "b", "tell me when the light turns on", NOT_SEEN_YET)
    assert not any(isinstance(a, Poll) for a in actions)  # nothing left to probe


def test_watch_fires_once_per_rising_edge_and_again_after_drop():
    c = DialogueController()
    assert c.add_watch("dog", "the dog is on the couch", t=0.0) == []
    assert dict(c.watches) == {"dog": "the dog is on the couch"}
    #        t: 0    1    2    3    4    5    6    7    8    9
    scores = [0.1, 0.9, 0.9, 0.9, 0.9, 0.5, 0.2, 0.7, 0.8, 0.9]
    # Fires at t=1 (the first "yes"), silent while it holds and in the band, re-armed at t=6, fires again at t=7.
    assert run_watch(c, "dog", scores) == [1.0, 7.0]


def test_watch_alert_carries_condition_and_evidence_time():
    c = DialogueController(ControllerConfig(default_trigger=TriggerSpec(m=1, n=1)))
    c.add_watch("w", "a person waves.", t=0.0)
    c.frame(1.0)
    assert c.scores(1.0, {"w": 0.99}) == [Alert(t=1.0, watch_id="w", condition="a person waves", evidence_t=1.0)]


def test_watch_cooldown_suppresses_rapid_refire():
    c = DialogueController()
    c.add_watch("w", "the phone rings", t=0.0, spec=TriggerSpec(m=1, n=1, cooldown_s=5.0))
    #        t: 0    1    2    3    4    5    6    7
    scores = [0.9, 0.1, 0.9, 0.1, 0.1, 0.1, 0.9, 0.9]
    assert run_watch(c, "w", scores) == [0.0, 6.0]  # the rise at t=2 falls inside the 5 s cooldown


def test_watch_with_sum_and_zscore_specs():
    c = DialogueController()
    c.add_watch("s", "the pot boils over", t=0.0, spec=TriggerSpec(kind="sum", threshold=1.0, baseline=0.5))
    c.add_watch("z", "a ball appears", t=0.0, spec=TriggerSpec(kind="zscore", min_history=5))
    alerts = []
    for i, (ps, pz) in enumerate([(0.5, 0.1)] * 6 + [(0.9, 0.9), (0.9, 0.9), (0.9, 0.9)]):
        c.frame(float(i))
        alerts += [(a.watch_id, a.evidence_t) for a in c.scores(float(i), {"s": ps, "z": pz})]
    # sum: acc 0.4, 0.8, 1.2 -> t=8; zscore: the jump at t=6.
    assert alerts == [("z", 6.0), ("s", 8.0)]


def test_remove_watch_stops_it_and_watch_errors():
    c = DialogueController()
    c.add_watch("w", "x happens", t=0.0)
    with pytest.raises(InputError):
        c.add_watch("w", "y happens", t=0.0)
    with pytest.raises(InputError):
        c.add_watch("v", "  ", t=0.0)
    with pytest.raises(InputError):
        c.add_watch("deferred:v", "y happens", t=0.0)
    with pytest.raises(InputError):
        c.remove_watch("nope", t=0.0)
    assert c.remove_watch("w", t=1.0) == []
    assert c.watches == {} and c.frame(2.0) == []  # no probes: no Poll
    assert c.scores(2.0, {"w": 0.9}) == []  # a late score for a removed watch is ignored


def test_probe_every_frames_polls_every_third_frame_only():
    c = DialogueController(ControllerConfig(probe_every_frames=3))
    c.add_watch("w", "x happens", t=0.0)
    polled = [i for i in range(1, 10) if any(isinstance(a, Poll) for a in c.frame(float(i)))]
    assert polled == [3, 6, 9]
    # Counted per source.
    assert [any(isinstance(a, Poll) for a in c.frame(10.0 + i, source_id="cam2")) for i in range(3)] == [False, False, True]
    assert dict(c.frames_seen) == {"default": 9, "cam2": 3}


def test_two_watches_and_a_deferred_question_in_one_poll():
    c = DialogueController(ControllerConfig(probe_template="Q: {condition}?"))
    c.add_watch("a", "a cat appears", t=0.0)
    c.user_message("q", "tell me when the oven beeps", t=0.0)
    c.add_watch("b", "the door opens", t=0.0)
    assert c.frame(1.0) == [Poll(1.0, (Probe("a", "Q: a cat appears?"), Probe("b", "Q: the door opens?"),
                                       Probe("deferred:q", "Q: the oven beeps?")))]


def test_user_message_interrupts_when_configured():
    c = DialogueController(ControllerConfig(interrupt=True))
    c.user_message("q1", "What is happening?", t=0.0)
    c.generation_started("q1", t=0.1)
    assert c.user_message("q2", "Who is that?", t=1.0) == [
        CancelGeneration(t=1.0, request_id="q1"),
        AnswerNow(t=1.0, request_id="q2", question="Who is that?", trigger="user"),
    ]
    assert c.generating == "q2" and c.queued == ()
    assert c.generation_finished("q1", t=1.1) == []  # the cancelled one's finish is ignored
    assert c.generating == "q2"


def test_no_interrupt_queues_fifo_until_generation_finished():
    c = DialogueController(ControllerConfig(interrupt=False))
    c.user_message("q1", "What is happening?", t=0.0)
    assert c.user_message("q2", "Who is that?", t=1.0) == []
    assert c.user_message("q3", "Where is the cup?", t=2.0) == []
    assert [a.request_id for a in c.queued] == ["q2", "q3"]
    assert c.generation_finished("q1", t=3.0) == [AnswerNow(3.0, "q2", "Who is that?", "user")]
    assert c.generation_finished("q2", t=4.0) == [AnswerNow(4.0, "q3", "Where is the cup?", "user")]
    assert c.generation_finished("q3", t=5.0) == [] and c.generating is None


def test_alerts_and_deferred_answers_never_interrupt():
    c = DialogueController(ControllerConfig(interrupt=True, default_trigger=TriggerSpec(m=1, n=1)))
    c.add_watch("w", "the baby cries", t=0.0)
    c.user_message("d", "tell me when the timer rings", t=0.0)
    c.user_message("u", "Describe the room", t=0.5)
    c.frame(1.0)
    actions = c.scores(1.0, {"w": 0.9, "deferred:d": 0.9})
    # The alert goes out at once; the deferred answer waits for the user's answer to finish.
    assert actions == [Alert(1.0, "w", "the baby cries", 1.0)]
    # Its evidence stays that of the frame it fired on (after 0 s, seen at 1 s) while it waits and when it goes out.
    queued = AnswerNow(1.0, "d", "tell me when the timer rings", "deferred", evidence=(0.0, 1.0))
    assert c.generating == "u" and c.queued == (queued,)
    assert c.generation_finished("u", t=2.0) == [AnswerNow(2.0, "d", "tell me when the timer rings", "deferred", (0.0, 1.0))]


def test_cancel_idle_does_nothing_and_generating_cancels_and_clears_queue():
    c = DialogueController(ControllerConfig(interrupt=False))
    assert c.cancel(0.0) == []
    c.user_message("q1", "What is happening?", t=1.0)
    c.user_message("q2", "Who is that?", t=1.5)
    assert c.cancel(2.0) == [CancelGeneration(2.0, "q1")]
    assert c.generating is None and c.queued == ()
    assert c.generation_finished("q1", t=2.1) == []  # nothing left to release


def test_commentary_narrates_only_when_changed_interval_passed_and_idle():
    c = DialogueController(ControllerConfig(commentary_every_s=5.0))
    c.frame(0.0)
    assert c.tick(6.0) == []  # interval passed but nothing changed: silence
    c.frame_changed(6.5, changed=True)
    assert c.frame(7.0) == [Narrate(7.0, "narration:1")]
    assert c.generating == "narration:1" and c.last_narration_t == 7.0 and not c.scene_changed
    c.generation_finished("narration:1", t=8.0)
    c.frame_changed(9.0, changed=True)
    assert c.tick(11.0) == []  # changed, but only 4 s since the last narration
    c.user_message("q", "What is that?", t=12.0)
    assert c.tick(12.5) == []  # due, but busy answering
    c.generation_finished("q", t=13.0)
    assert c.tick(13.0) == [Narrate(13.0, "narration:2")]
    c.generation_finished("narration:2", t=14.0)
    c.frame_changed(20.0, changed=False)
    assert c.tick(30.0) == []  # no change since: silence


def test_commentary_off_by_default():
    c = DialogueController()
    c.frame_changed(0.0, changed=True)
    assert c.tick(1000.0) == []


def test_backwards_time_raises_and_leaves_state_unchanged():
    c = DialogueController(ControllerConfig(interrupt=False))
    c.add_watch("w", "x happens", t=0.0)
    c.user_message("q1", "What?", t=1.0)
    c.user_message("q2", "Why?", t=2.0)
    c.frame(3.0)
    before = (dict(c.watches), c.pending_deferred, c.generating, c.queued, c.last_t, dict(c.frames_seen),
              c.rule("w").votes)
    calls = [
        lambda: c.user_message("q3", "How?", t=2.5),
        lambda: c.user_message("q3", "tell me when y happens", t=2.5),
        lambda: c.add_watch("v", "y happens", t=1.0),
        lambda: c.remove_watch("w", t=1.0),
        lambda: c.frame(2.9),
        lambda: c.scores(2.0, {"w": 0.9}),
        lambda: c.generation_started("q1", t=0.0),
        lambda: c.generation_finished("q1", t=0.0),
        lambda: c.cancel(1.0),
        lambda: c.tick(float("nan")),
        lambda: c.stream_ended(0.0),
        lambda: c.frame_changed(0.0, True),
    ]
    for call in calls:
        with pytest.raises(TimestampError):
            call()
    # A bad score also leaves every rule untouched, even those listed before it.
    with pytest.raises(InputError):
        c.scores(4.0, {"w": 0.9, "other": 1.7})
    after = (dict(c.watches), c.pending_deferred, c.generating, c.queued, c.last_t, dict(c.frames_seen),
             c.rule("w").votes)
    assert after == before and c.last_t == 3.0 and not c.ended


def test_input_errors():
    c = DialogueController()
    with pytest.raises(QuestionError):
        c.user_message("q", "   ", t=0.0)
    with pytest.raises(InputError):
        c.user_message("", "Hello?", t=0.0)
    c.user_message("q", "Hello?", t=0.0)
    with pytest.raises(InputError):
        c.user_message("q", "Again?", t=0.0)  # id in use
    with pytest.raises(InputError):
        c.generation_started("other", t=0.0)  # q is generating
    with pytest.raises(InputError):
        c.frame_changed(0.0, changed="yes")  # type: ignore[arg-type]
    assert c.last_t == 0.0


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: ControllerConfig(probe_every_frames=0), "probe_every_frames"),
        (lambda: ControllerConfig(probe_every_frames=1.5), "probe_every_frames"),
        (lambda: ControllerConfig(interrupt="yes"), "interrupt"),
        (lambda: ControllerConfig(deferred_timeout_s=0.0), "deferred_timeout_s"),
        (lambda: ControllerConfig(commentary_every_s=-1.0), "commentary_every_s"),
        (lambda: ControllerConfig(probe_template="Is it happening?"), "probe_template"),
        (lambda: ControllerConfig(probe_template="{condition} {other}"), "probe_template"),
        (lambda: ControllerConfig(probe_template="{condition"), "probe_template"),
        (lambda: ControllerConfig(default_trigger="threshold"), "default_trigger"),
    ],
)
def test_bad_configs_raise_config_error(build, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        build()


def test_dialogue_imports_no_torch_asyncio_or_clock():
    code = (
        "import sys, streamvlm.dialogue\n"
        "bad = [m for m in ('torch', 'asyncio') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    # No module of the package imports a clock either (time may be loaded by the interpreter itself).
    for path in DIALOGUE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("torch", "asyncio", "time", "datetime"), (path.name, name)


# -- rules in stream seconds: the same alerts whatever the probe rate --------------------------------------------

def _feed_at(rule, rate: float, pattern: list[float]) -> list[float]:
    """Feed ``pattern`` (one score per second of stream) at ``rate`` probes per second; the fire times."""
    fires, i = [], 0
    while (t := i / rate) < len(pattern):
        if rule.update(pattern[int(t)], t):
            fires.append(t)
        i += 1
    return fires


# Appears at 3 s, gone at 8 s, back at 11 s; one unsure second (0.5) at 5 s while it holds.
_SCENE = [0.05, 0.1, 0.0, 0.95, 0.9, 0.5, 0.97, 0.92, 0.1, 0.05, 0.0, 0.9, 0.95, 0.99, 0.9, 0.1, 0.0]


# Ten seconds of low, varied scores, then a jump (for the z-score rule, which needs a history).
_JUMP = [0.1, 0.2, 0.05, 0.15, 0.1, 0.2, 0.05, 0.1, 0.15, 0.1, 0.95, 0.95, 0.9, 0.1, 0.15, 0.05, 0.1]


@pytest.mark.parametrize(("spec", "scene"), [(TriggerSpec(), _SCENE), (TriggerSpec(kind="sum"), _SCENE),
                                             (TriggerSpec(kind="zscore"), _JUMP)], ids=["threshold", "sum", "zscore"])
def test_rules_raise_the_same_alerts_at_1_2_and_10_probes_per_second(spec, scene):
    fires = {rate: _feed_at(make_rule(spec), rate, scene) for rate in (1.0, 2.0, 10.0)}
    assert len(fires[1.0]) >= 1
    for rate in (2.0, 10.0):
        assert len(fires[rate]) == len(fires[1.0]), fires
        assert all(abs(a - b) <= 1.0 for a, b in zip(fires[rate], fires[1.0])), fires


@pytest.mark.parametrize(("spec", "scene", "starts"), [(TriggerSpec(), _SCENE, (3, 11)), (TriggerSpec(kind="sum"), _SCENE, (3, 11)),
                                                       (TriggerSpec(kind="zscore"), _JUMP, (10,))], ids=["threshold", "sum", "zscore"])
@pytest.mark.parametrize("rate", [1.0, 2.0, 10.0])
def test_a_fire_says_where_its_evidence_starts(spec, scene, starts, rate):
    """Each fire's evidence (last_fire_since, last_fire_t] holds the moment the condition began: the time a
    deferred answer may name."""
    rule, evidence, i = make_rule(spec), [], 0
    while (t := i / rate) < len(scene):
        if rule.update(scene[int(t)], t):
            evidence.append((rule.last_fire_since, rule.last_fire_t))
        i += 1
    assert len(evidence) == len(starts), evidence
    for (since, seen), start in zip(evidence, starts):
        assert since < start <= seen, (since, start, seen)
        if spec.kind == "threshold":  # the default rule: a second or two, not its whole 3 s window
            assert seen - since <= 2.0 + 1e-9, evidence
    rule.reset()
    assert rule.last_fire_since is None


def test_threshold_rule_in_seconds_fires_once_per_appearance_at_10_fps():
    fires = _feed_at(make_rule(TriggerSpec()), 10.0, _SCENE)
    assert [round(t, 1) for t in fires] == [3.7, 11.7]  # 0.8 s of "yes" after each appearance


def test_old_count_fields_convert_to_seconds_and_mean_the_old_rule_at_one_probe_per_second():
    assert TriggerSpec(m=2, n=3) == TriggerSpec(hold_s=1.5, window_s=3.0)
    assert TriggerSpec(kind="zscore", window=10, min_history=4) == TriggerSpec(kind="zscore", history_s=10.0, min_history_s=4.0)
    with pytest.raises(ConfigError, match="^m:"):
        TriggerSpec(m=2, hold_s=1.0)
    # m of n at 1/s: fires on the m-th "yes" of the window.
    rule = make_rule(TriggerSpec(m=3, n=4))
    assert [rule.update(p, float(t)) for t, p in enumerate([0.9, 0.9, 0.1, 0.9, 0.9])] == [False, False, False, True, False]


def test_probe_every_s_polls_at_the_same_stream_times_at_any_frame_rate():
    def polls(fps: float) -> list[float]:
        c = DialogueController(ControllerConfig(probe_every_s=1.0))
        c.add_watch("w", "a ball appears", t=0.0)
        out = []
        for i in range(int(5 * fps)):
            out += [round(a.t, 3) for a in c.frame(i / fps) if isinstance(a, Poll)]
        return out

    assert polls(1.0) == polls(2.0) == polls(10.0) == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ConfigError, match="^probe_every_s:"):
        ControllerConfig(probe_every_s=-1)
