"""``bench soak`` and ``bench storm``: the live server under many sessions and hostile clients, short CI versions.

The soak drives real WebSocket clients through the real server (tiny random-weight model, 127.0.0.1)
and checks what a client relies on: no engine fault, every ``response.create`` answered by exactly one
``response.created`` and one ``response.done``, no thread left behind. The storm checks that hostile
clients neither lock new users out nor starve a live session of its answers.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import threading

import pytest

from streamvlm.bench import storm
from streamvlm.bench.soak import LifecycleChecker, metric_total, run_soak_bench
from streamvlm.bench.storm import run_storm_bench
from streamvlm.errors import ConfigError, StreamVLMError


def _created(rid: str, cid: str | None, trigger: str = "user") -> dict:
    return {"type": "response.created", "response": {"id": rid, "status": "in_progress", "trigger": trigger, "client_event_id": cid}}


def _done(rid: str, cid: str | None, status: str = "completed", trigger: str = "user", tokens: int = 3) -> dict:
    return {"type": "response.done", "response": {"id": rid, "status": status, "trigger": trigger, "client_event_id": cid,
                                                  "usage": {"output_tokens": tokens}, "no_video": False}}


def test_lifecycle_checker_accepts_a_clean_session_and_names_each_broken_rule():
    clean = LifecycleChecker()
    clean.asked("c1", 0.0)
    clean.asked("c2", 0.0, max_tokens=2)
    clean.asked("c3", 0.0)
    for event in (_created("r1", "c1"), _created("r2", "c2"),
                  {"type": "response.output_text.delta", "response_id": "r1", "delta": "a"},
                  _done("r1", "c1", "cancelled"), _done("r2", "c2", "incomplete", tokens=2),
                  {"type": "error", "error": {"code": "no_user_message", "event_id": "c3"}},
                  _created("alert1", None, "watch"), _done("alert1", None, trigger="watch")):
        clean.received(event, 1.0)
    clean.finish()
    assert clean.violations == {} and clean.answers() == 1 and clean.alerts == 1

    broken = LifecycleChecker()
    for cid in ("lost", "twice", "late", "long"):
        broken.asked(cid, 0.0, max_tokens=2 if cid == "long" else None)
    for event in (_created("r1", "twice"), _done("r1", "twice"), _done("r1", "twice"),
                  _created("r2", "late"), _done("r2", "late"), {"type": "response.output_text.delta", "response_id": "r2", "delta": "x"},
                  _done("r3", None),
                  _created("r4", "long"), _done("r4", "long", "incomplete", tokens=48)):
        broken.received(event, 1.0)
    broken.finish()
    assert broken.violations == {"duplicate_done": 1, "event_after_done": 1, "done_without_created": 1,
                                 "max_output_tokens_exceeded": 1, "no_created": 1, "no_done": 1}


def test_lifecycle_checker_does_not_expect_answers_cut_off_by_the_clients_own_disconnect():
    checker = LifecycleChecker()
    checker.asked("c1", 0.0)
    checker.received(_created("r1", "c1"), 0.1)
    checker.disconnected()
    checker.asked("c2", 1.0)  # after the resume
    checker.received(_created("r2", "c2"), 1.1)
    checker.received(_done("r2", "c2"), 1.2)
    checker.finish()
    assert checker.violations == {} and checker.pending() == []


def test_metric_total_sums_every_label_set():
    text = ('# TYPE streamvlm_engine_faults_total counter\nstreamvlm_engine_faults_total{reason="a"} 2.0\n'
            'streamvlm_engine_faults_total{reason="b"} 1.0\nstreamvlm_engine_faults_created 1.7e9\n')
    assert metric_total(text, "streamvlm_engine_faults_total") == 3.0
    assert metric_total(text, "streamvlm_missing_total") is None and metric_total(None, "x") is None


def test_soak_short_run_has_no_engine_fault_no_lifecycle_violation_and_no_leaked_thread():
    result = run_soak_bench("tiny-smolvlm", sessions=2, frames=150, seed=0, policies=("merge", "proxy-attention"),
                            fps=30.0, budget_tokens=128, drain_timeout_s=60.0, progress=False)
    json.dumps(result)
    detail = result["sessions_detail"]
    assert {(s["policy"], s["positions"]) for s in detail} == {(p, q) for p in ("merge", "proxy-attention") for q in ("keep", "reindex")}
    faults = [e for s in detail for e in s["fault_examples"]]
    examples = [e for s in detail for e in s["violation_examples"]]
    assert result["engine_faults"] == 0, faults
    assert not result["engine_faults_metric"], faults
    assert result["lifecycle_violations"] == 0, examples
    assert result["threads_after"] <= result["threads_before"]
    assert result["passed"]
    # The run exercised what it claims to: every kind of client action, answers, resumes, frames read.
    for segment in detail:
        assert set(segment["actions"]) >= {"ask", "ask_burst", "ask_deferred", "cancel", "cancel_known", "cancel_unknown",
                                           "watch_create", "watch_delete", "resume"}
        assert segment["settings_applied"]["policy"]
    assert result["answers"] > 0 and result["resumes"] > 0
    assert result["errors"].get("response_not_found", 0) > 0  # unknown ids are refused, not mistaken for the running answer
    assert 0 < result["frames"]["ingested"] <= result["frames"]["sent"] == 2 * 150


def test_storm_short_run_admits_new_sessions_and_the_live_session_gets_every_answer():
    result = run_storm_bench("tiny-smolvlm", messages=600, churn=20, watches=60, questions=2, new_sessions=2,
                             quiet_s=0.0, settle_timeout_s=0.0, answer_timeout_s=60.0, progress=False)
    json.dumps(result)
    live = result["live"]
    # Timed quietly before and after the storm, at least `questions` times each (no wait for a full memory here).
    assert result["ttft_samples_before"] >= 2 and result["ttft_samples_after"] >= 2 and result["settled_s"] is None
    assert result["new_sessions_refused"] == 0 and result["new_sessions_admitted"] == 2
    assert result["new_sessions_answered"] == 2
    assert live["questions"] >= 1 + 2 + 2 + 2 and live["unanswered"] == 0, live
    assert live["lifecycle_violations"] == 0 and not live["closed_by_server"], live
    assert result["churn"].get("refused", 0) == 0  # parked sessions never lock a new one out
    huge = result["hostile"]["huge"]
    assert huge["errors"].get("message_too_large") == sum(huge["sent"].values()) and huge["server_closes"] == {}
    assert result["passed"]
    # The attackers ran in their own process (not on the server's event loop), which ended cleanly.
    assert result["hostile_process"] and result["processes"]["hostile"]["pid"] != os.getpid()
    assert result["processes"]["main"]["pid"] == os.getpid()
    assert result["hostile_exitcode"] == 0 and result["hostile_cpu_s"] > 0
    # Every planned message was sent, or given up because the server closed or refused its connection
    # (it closes a client after too many errors, and a reconnect may meet its rate limits): most get through.
    assert result["hostile_messages"] + result["hostile_undelivered"] >= 600 and result["hostile_messages"] >= 450
    assert set(result["hostile"]) >= {"noise", "duplicate_ids", "huge", "watches", "frame_flood"}
    assert multiprocessing.active_children() == []
    assert result["threads_after"] <= result["threads_before"] and result["threads_new"] == []


def test_storm_that_fails_midway_ends_its_hostile_process_and_threads(monkeypatch):
    async def broken_pump(self, on_progress, stall_s):
        await asyncio.sleep(0.5)  # the storm is under way
        raise StreamVLMError("storm: lost the hostile process")

    monkeypatch.setattr(storm._HostileProcess, "pump", broken_pump)
    threads = threading.active_count()
    with pytest.raises(StreamVLMError, match="lost the hostile process"):
        run_storm_bench("tiny-smolvlm", messages=600, churn=5, watches=10, questions=1, new_sessions=1,
                        answer_timeout_s=60.0, progress=False)
    assert multiprocessing.active_children() == []
    assert threading.active_count() <= threads


def test_soak_and_storm_refuse_bad_arguments_before_loading_a_model():
    for kwargs in ({"sessions": 0}, {"frames": 0}, {"fps": 0.0}, {"policies": ("lru",)}, {"positions": ()}, {"budget_tokens": 8}):
        with pytest.raises(ConfigError):
            run_soak_bench("no-such-model", **kwargs)
    for kwargs in ({"messages": 1}, {"questions": 0}, {"fps": 60.0}, {"churn": -1}, {"quiet_s": -1.0},
                   {"settle_timeout_s": float("inf")}):
        with pytest.raises(ConfigError):
            run_storm_bench("no-such-model", **kwargs)
