"""Admission by compute (engine/admission.py, server/compute.py): the read rates a server grants when frames outrun the model.

Properties a user relies on: the model is never promised more frames than it reads, nobody is given more
than it sends, sessions that all send more than their share get the same rate (nobody starves), and
nobody is limited while there is room.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvlm.config import ServerConfig
from streamvlm.engine.admission import ComputeAdmission, fair_shares
from streamvlm.errors import ConfigError
from streamvlm.protocol import messages as m
from streamvlm.protocol import session as core
from streamvlm.server.compute import ComputeGovernor, govern
from streamvlm.server.metrics import ServerMetrics

EPS = 1e-9
offers = st.dictionaries(st.sampled_from("abcdefgh"), st.floats(0, 30, allow_nan=False), min_size=1, max_size=8)
seconds = st.floats(0.01, 5.0)


def fresh(seconds_per_frame: float, share: float = 0.8) -> ComputeAdmission:
    return ComputeAdmission(share, seconds_per_frame=seconds_per_frame)


@given(offered=offers, spf=seconds)
def test_a_fresh_plan_is_max_min_fair_within_capacity(offered, spf):
    plan = fresh(spf).plan(offered)
    capacity = 0.8 / spf
    assert plan.capacity_fps == pytest.approx(capacity)
    assert sum(plan.allowed.values()) <= capacity + EPS
    for key, offer in offered.items():
        assert plan.allowed[key] <= offer + EPS
    if sum(offered.values()) <= capacity:
        assert plan.limited == 0 and plan.allowed == offered
    else:
        capped = [plan.allowed[k] for k, cap in plan.caps.items() if cap is not None]
        assert capped and max(capped) - min(capped) <= EPS  # everyone above the share gets the same rate
        assert sum(plan.allowed.values()) == pytest.approx(capacity)  # and nothing is left unused
        for key, cap in plan.caps.items():  # a session below the share keeps all it offers
            if cap is None:
                assert plan.allowed[key] == offered[key] <= min(capped) + EPS


@settings(max_examples=60)
@given(steps=st.lists(st.tuples(offers, st.floats(0.01, 5.0), st.floats(0.01, 5.0)), min_size=1, max_size=12))
def test_over_any_history_the_guarantees_hold_and_caps_stay_within_hysteresis(steps):
    admission = ComputeAdmission(0.8, hysteresis=0.15, smoothing=1.0)
    for offered, measured, _ in steps:
        admission.frame_read(measured)
        plan = admission.plan(offered)
        capacity = plan.capacity_fps
        assert sum(plan.allowed.values()) <= capacity + EPS
        assert all(plan.allowed[k] <= offered[k] + EPS for k in offered)
        if sum(offered.values()) <= 0.85 * capacity:
            assert plan.limited == 0
        over = [k for k, share in fair_shares(capacity, offered).items() if share < offered[k] - EPS]
        rates = [plan.allowed[k] for k in over]
        if rates and min(rates) > 0:
            assert max(rates) / min(rates) <= 1.15 / 0.85 + EPS
        assert set(plan.changes) <= set(offered)


@given(offered=st.dictionaries(st.sampled_from("abcd"), st.floats(2, 10), min_size=2, max_size=4),
       jitter=st.lists(st.floats(0.95, 1.05), min_size=4, max_size=4), noise=st.floats(0.95, 1.05))
def test_caps_do_not_flap_with_measurement_noise(offered, jitter, noise):
    admission = fresh(1.0)  # 0.8 frames/s for everyone, far below what each offers
    first = admission.plan(offered)
    assert set(first.changes) == set(offered) and first.limited == len(offered)
    admission.frame_read(1.0 * noise)
    again = admission.plan({k: v * j for (k, v), j in zip(offered.items(), jitter)})
    assert again.changes == {}


def test_a_session_that_leaves_gives_its_share_to_the_others_and_room_lifts_every_cap():
    admission = fresh(0.5)  # 1.6 frames/s
    plan = admission.plan({"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.1})
    assert plan.caps == {"a": pytest.approx(0.5), "b": pytest.approx(0.5), "c": pytest.approx(0.5), "d": None}
    plan = admission.plan({"a": 1.0, "d": 0.1})  # b and c ended
    assert plan.caps == {"a": None, "d": None} and plan.changes == {"a": None}
    assert admission.cap_of("b") is None


def test_nothing_is_limited_before_the_first_frame_is_measured():
    admission = ComputeAdmission(0.8)
    plan = admission.plan({"a": 30.0, "b": 30.0})
    assert plan.capacity_fps is None and plan.limited == 0 and plan.changes == {}


def test_seconds_per_frame_is_a_smoothed_average():
    admission = ComputeAdmission(0.5, smoothing=0.5)
    admission.frame_read(1.0)
    admission.frame_read(2.0)
    assert admission.seconds_per_frame == pytest.approx(1.5)
    assert admission.capacity_fps == pytest.approx(0.5 / 1.5)
    admission.frame_read(0.0)  # unmeasurable: ignored
    assert admission.seconds_per_frame == pytest.approx(1.5)


@pytest.mark.parametrize("kwargs", [{"frame_time_share": 0}, {"frame_time_share": 1.5}, {"hysteresis": 1.0},
                                    {"smoothing": 0}])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        ComputeAdmission(**kwargs)
    with pytest.raises(ConfigError):
        ComputeAdmission(0.8).frame_read(float("nan"))
    with pytest.raises(ConfigError):
        ComputeAdmission(0.8).plan({"a": -1.0})


# ---- the server's governor: real session cores, a fake clock, a fake model cost ----------------------



def _frame(s: core.RealtimeSession, now: float) -> list:
    return s.client_event(m.FrameAppend(np.zeros((16, 16, 3), np.uint8), None, "cam", event_id=None), now)


class _Model:
    """A model that reads one frame at a time, ``model_s`` seconds each, as the workers share it: each
    session holds at most one waiting frame (a newer one replaces it: latest wins), and when the model
    is free it reads the frame that has waited longest."""

    def __init__(self, model_s: float) -> None:
        self.model_s, self.free_at = model_s, 0.0
        self.waiting: dict[str, float] = {}  # session id -> when its waiting frame arrived

    def run_until(self, governor: ComputeGovernor, now: float, read: dict[str, int]) -> None:
        while self.waiting:
            sid, arrived = min(self.waiting.items(), key=lambda kv: kv[1])
            start = max(self.free_at, arrived)
            if start > now:
                return
            del self.waiting[sid]
            self.free_at = start + self.model_s
            governor.on_frame_read(sid, self.model_s)
            read[sid] = read.get(sid, 0) + 1

    def offer(self, sid: str, now: float) -> None:
        self.waiting[sid] = now


def _run(governor: ComputeGovernor, sessions: list[core.RealtimeSession], start: float, seconds: int, fps: int,
         model: _Model) -> tuple[dict[str, int], dict[str, list[dict]]]:
    """Every session sends ``fps`` frames a second (in turn); the model reads what it can; the governor
    ticks every second. Returns frames read and events sent per session."""
    read = {s.id: 0 for s in sessions}
    told: dict[str, list[dict]] = {s.id: [] for s in sessions}
    for step in range(seconds * fps):
        for i, s in enumerate(sessions):
            now = start + (step + i / len(sessions)) / fps
            model.run_until(governor, now, read)
            for out in _frame(s, now):
                if isinstance(out, core.SubmitFrame):
                    model.offer(s.id, now)
                else:
                    assert isinstance(out, (core.StartWorker, core.FrameDropped)), out  # never an error event
        if step % fps == fps - 1:
            for sid, events in governor.tick(start + (step + 1) / fps).items():
                told[sid] += events
    return read, told


def test_the_governor_shares_the_model_evenly_and_says_so_then_lifts_the_caps():
    metrics = ServerMetrics()
    governor = ComputeGovernor(0.8, metrics=metrics)
    sessions = [core.RealtimeSession("m") for _ in range(4)]
    for s in sessions:
        s.opened(0.0)
        governor.on_session_open(s, 0.0)
    model = _Model(1.6)  # 4 sessions x 2 frames/s; a read takes 1.6 s: 0.5 frames/s fit in 80 % of the model
    first, told = _run(governor, sessions, 0.0, 10, 2, model)
    assert sum(first.values()) <= 7  # the model was the bottleneck
    for s in sessions:
        [event] = told[s.id]  # one announcement each, no flapping
        assert event["type"] == "input_frame.rate" and event["limited"] and event["reason"] == "compute"
        assert event["fps"] == pytest.approx(0.125, rel=0.01)
    later, told = _run(governor, sessions, 10.0, 40, 2, model)
    counts = list(later.values())
    assert max(counts) - min(counts) <= 1 and min(counts) >= 4  # every session reads, evenly (about 5 in 40 s)
    assert all(not events for events in told.values())
    assert sum(s.frames_dropped_compute for s in sessions) > 0
    assert metrics.registry.get_sample_value("streamvlm_sessions_read_limited") == 4

    for s in sessions[1:]:  # three leave: the last one gets the whole capacity
        s.close("bye")
        governor.on_session_close(s.id)
    _, told = _run(governor, sessions[:1], 50.0, 8, 2, model)
    assert [e["fps"] for e in told[sessions[0].id]] == [pytest.approx(0.5, rel=0.01)]

    _, told = _run(governor, sessions[:1], 58.0, 30, 2, _Model(0.1))  # a faster model (or batching): room for all
    events = told[sessions[0].id]
    assert events[-1]["limited"] is False and events[-1]["fps"] is None  # lifted, once the average caught up
    rising = [e["fps"] for e in events[:-1]]
    assert all(b > 1.15 * a for a, b in zip([0.5, *rising], rising))  # on the way, only moves worth announcing
    assert metrics.registry.get_sample_value("streamvlm_sessions_read_limited") == 0


def test_with_the_lock_engine_nobody_is_limited():
    governor = ComputeGovernor.from_config(ServerConfig(engine="lock"))
    sessions = [core.RealtimeSession("m") for _ in range(3)]
    for s in sessions:
        s.opened(0.0)
        governor.on_session_open(s, 0.0)
    _run(governor, sessions, 0.0, 5, 2, _Model(2.0))
    assert all(s.frames_offered == 10 and s.read_rate is None for s in sessions)


def test_a_quiet_session_keeps_its_frames_and_the_busy_ones_split_the_rest():
    governor = ComputeGovernor(0.8)
    busy, quiet = core.RealtimeSession("m"), core.RealtimeSession("m")
    for s in (busy, quiet):
        s.opened(0.0)
        governor.on_session_open(s, 0.0)
    governor.admission.frame_read(1.0)  # measured before: 0.8 frames/s in all
    for step in range(40):  # 10 s: busy sends 4 frames/s, quiet one frame every 5 s
        now = step / 4
        _frame(busy, now)
        if step % 20 == 0:
            _frame(quiet, now)
        if step % 4 == 3:
            governor.tick(now)
    assert quiet.read_rate is None and quiet.frames_dropped_compute == 0
    assert busy.read_rate == pytest.approx(0.8 - 0.2, rel=0.2)


@pytest.mark.parametrize("kwargs", [{"engine": "batch"}, {"frame_time_share": 0}, {"frame_time_share": 1.5},
                                    {"frame_time_share": float("nan")}])
def test_server_config_refuses_an_unknown_engine_or_share(kwargs):
    with pytest.raises(ConfigError):
        ServerConfig(**kwargs)
    assert (ServerConfig().engine, ServerConfig().frame_time_share) == ("scheduler", 0.8)


class _Counters:
    def __init__(self) -> None:
        self.ingested = 0
        self.dropped = 0
        self.model_s: list[float] = []

    def reads_since(self, seen: int):
        return [type("Read", (), {"model_s": s})() for s in self.model_s[seen:]]

    def read_log(self, seen: int):
        return self.reads_since(seen), self.ingested


class _Hosted:
    def __init__(self) -> None:
        self.core = core.RealtimeSession("m")
        self.core.opened(0.0)
        self.worker = type("Worker", (), {"counters": _Counters()})()


class _Host:
    """What govern() uses of a SessionHost: sessions (core, worker counters) and _execute."""

    def __init__(self, n: int) -> None:
        self.sessions = {h.core.id: h for h in (_Hosted() for _ in range(n))}
        self.executed: list[tuple[str, list]] = []

    async def _execute(self, session, outs) -> None:
        self.executed.append((session.core.id, outs))


def test_govern_feeds_the_workers_reads_and_sends_the_caps_through_the_host():
    host = _Host(2)
    clock = [0.0]
    governor = ComputeGovernor(0.8, interval_s=0.001)

    async def scenario() -> None:
        task = asyncio.create_task(govern(host, governor, clock=lambda: clock[0]))
        for second in range(1, 6):  # each session sends 2 frames/s and has one 0.5 s read a second (1.6 frames/s in all)
            for hosted in host.sessions.values():
                for k in range(2):
                    _frame(hosted.core, second - 1 + k / 2)
                c = hosted.worker.counters
                c.model_s.append(0.5)
                c.ingested += 1
            clock[0] = float(second)
            await asyncio.sleep(0.02)
        task.cancel()

    asyncio.run(scenario())
    assert governor.admission.seconds_per_frame == pytest.approx(0.5)
    told = [(sid, out) for sid, outs in host.executed for out in outs]
    assert sorted(sid for sid, _ in told) == sorted(host.sessions)  # one announcement each
    assert all(out["type"] == "input_frame.rate" and out["fps"] == pytest.approx(0.8, rel=0.01) for _, out in told)
    assert all(h.core.read_rate == pytest.approx(0.8) for h in host.sessions.values())


def test_a_fault_in_the_governor_lifts_every_cap_and_is_not_silent():
    host = _Host(1)
    [hosted] = host.sessions.values()
    governor = ComputeGovernor(0.8, interval_s=0.001)
    governor.on_session_open(hosted.core, 0.0)
    hosted.core.set_read_rate(0.5)
    governor.admission.plan = None  # the plan breaks: calling it raises TypeError

    async def scenario() -> BaseException | None:
        task = asyncio.create_task(govern(host, governor, clock=lambda: 1.0))
        await asyncio.wait([task], timeout=5)
        return task.exception()

    assert isinstance(asyncio.run(scenario()), TypeError)
    assert governor.fault is not None and "TypeError" in governor.fault and not governor.enabled
    assert hosted.core.read_rate is None
    assert [out["limited"] for _, outs in host.executed for out in outs] == [False]


def test_reads_that_overlap_in_time_are_not_taken_for_a_slower_model():
    """Sessions take turns per forward pass, so four reads in flight each last about four times as long
    as one alone: the governor plans from the time per read that passed, not the reads' wall times."""
    governor = ComputeGovernor(0.8)
    for second in range(1, 12):  # 4 reads finish every second, each having lasted 1 s (they ran side by side)
        for _ in range(4):
            governor.on_frame_read("s", 1.0)
        governor.tick(float(second))
    assert governor.admission.seconds_per_frame == pytest.approx(0.25, rel=0.15)
    serial = ComputeGovernor(0.8)
    for second in range(1, 12):  # one read of 0.9 s a second, one after another: taken as it is
        serial.on_frame_read("s", 0.9)
        serial.tick(float(second))
    assert serial.admission.seconds_per_frame == pytest.approx(0.9)


def test_when_workers_fall_behind_the_frames_actually_read_bound_the_capacity():
    """Reads cost more than their model time (decoding, preprocessing): the model time says 100 frames/s,
    but workers read 10 a second and drop the rest. The plan follows what was read, then creeps back."""
    governor = ComputeGovernor(0.8)
    for second in range(1, 8):
        for _ in range(10):
            governor.on_frame_read("s", 0.01)
        governor.on_frames_replaced("s", 5)
        governor.tick(float(second))
    assert governor.admission.capacity_fps == pytest.approx(8.0, rel=0.15)  # 80 % of the 10 frames/s read
    before = governor.admission.seconds_per_frame
    for second in range(8, 12):  # nobody falls behind any more: the bound fades, a little each tick
        for _ in range(8):
            governor.on_frame_read("s", 0.01)
        governor.tick(float(second))
    assert 0.7 * before < governor.admission.seconds_per_frame < before


def test_frames_are_planned_for_what_answers_and_probes_leave():
    admission = ComputeAdmission(0.8, seconds_per_frame=1.0, headroom=0.1, min_frame_share=0.2)
    assert admission.measured_capacity_fps == pytest.approx(0.8)  # not measured: the fixed share
    admission.others_used(0.5)  # answers took half the model: frames get 1 - 0.1 - 0.5
    assert admission.frame_share == pytest.approx(0.4) and admission.measured_capacity_fps == pytest.approx(0.4)
    admission.others_used(0.0)
    assert admission.frame_share == pytest.approx(0.8)  # never above frame_time_share
    admission.others_used(0.95)
    assert admission.frame_share == pytest.approx(0.2)  # never starved altogether
    with pytest.raises(ConfigError):
        admission.others_used(float("nan"))
    for kwargs in ({"headroom": 1.0}, {"min_frame_share": -0.1}):
        with pytest.raises(ConfigError):
            ComputeAdmission(0.8, **kwargs)


def test_the_governor_leaves_answers_the_model_time_they_use():
    """Four sessions flood frames while answers hold the model half the time: the caps add up to what
    the other half allows (less headroom), not to the fixed 80 % share that would oversubscribe it."""
    held = [0.0, 0.0, 0.0]
    governor = ComputeGovernor(0.8, model_time=lambda: tuple(held))
    fixed = ComputeGovernor(0.8)
    sessions = [core.RealtimeSession("m") for _ in range(4)]
    for s in sessions:
        s.opened(0.0)
        governor.on_session_open(s, 0.0)
        fixed.on_session_open(s, 0.0)
    for second in range(1, 16):
        held[0] += 0.5  # answers: half of every second
        for s in sessions:
            for i in range(4):  # 4 frames/s each
                _frame(s, second - 1 + i / 4)
        for g in (governor, fixed):
            g.on_frame_read("s", 1.0)
            g.tick(float(second))
    assert governor.admission.others_share == pytest.approx(0.5)
    assert governor.last_plan is not None and fixed.last_plan is not None
    assert sum(governor.last_plan.allowed.values()) == pytest.approx(0.4, rel=0.05)
    assert sum(fixed.last_plan.allowed.values()) == pytest.approx(0.8, rel=0.05)


def test_a_session_that_joins_a_saturated_model_starts_at_an_even_split():
    """A newcomer is capped from its first frame while the others are, instead of reading uncapped
    until its rate is measured: a client that reconnects again and again gains nothing by it."""
    governor = ComputeGovernor(0.8)
    sessions = [core.RealtimeSession("m") for _ in range(4)]
    for s in sessions:
        s.opened(0.0)
        assert governor.on_session_open(s, 0.0) == []  # nobody is capped yet: nothing to start at
    model = _Model(1.6)
    _run(governor, sessions, 0.0, 10, 2, model)
    capacity = governor.admission.capacity_fps
    assert all(s.read_rate is not None for s in sessions)

    late = core.RealtimeSession("m")
    greeting = late.opened(10.0)
    told = governor.on_session_open(late, 10.0)
    assert late.read_rate == pytest.approx(capacity / 5)
    assert [e["type"] for e in told] == ["input_frame.rate"] and told[0]["fps"] == pytest.approx(capacity / 5)
    assert greeting[0]["type"] == "session.created"
    read, _ = _run(governor, [*sessions, late], 10.0, 30, 2, model)
    counts = list(read.values())
    assert max(counts) - min(counts) <= 1  # the newcomer reads as much as the others, no more
    # A quiet newcomer: its cap is lifted by the next plan like anyone's.
    quiet = core.RealtimeSession("m")
    quiet.opened(40.0)
    governor.on_session_open(quiet, 40.0)
    for second in range(41, 48):
        governor.tick(float(second))
    assert quiet.read_rate is None


def test_with_the_lock_engine_a_newcomer_is_never_capped():
    governor = ComputeGovernor.from_config(ServerConfig(engine="lock"))
    governor.admission.frame_read(1.0)
    s = core.RealtimeSession("m")
    s.opened(0.0)
    assert governor.on_session_open(s, 0.0) == [] and s.read_rate is None
