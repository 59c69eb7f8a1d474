"""Stream time (streamvlm/ingest/clock.py): every source's frames on one monotonic session clock.

Properties over arbitrary inputs (hypothesis), then the cases users meet: an RTP track starting at a
random 32-bit value, a wrap after 13.25 h, a sender reset, a camera restart, frozen timestamps, a
second source joining, a client replaying a recording slower or faster than real time.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvlm.errors import ConfigError, TimestampError
from streamvlm.ingest.clock import (
    RECEIVE_TIME,
    RTP_TIME,
    RTP_WRAP,
    SENDER_TIME,
    ClockPolicy,
    SessionClock,
    SourceClock,
)

EPS = 1e-6
RATE = 90_000

policies = st.builds(
    ClockPolicy,
    keep_sender_time=st.booleans(),
    max_jump_s=st.one_of(st.none(), st.floats(0.01, 1e5)),
    max_lag_s=st.one_of(st.none(), st.floats(0.01, 1e5)),
)
seconds = st.one_of(st.none(), st.floats(-1e9, 1e9, allow_nan=False, allow_infinity=False))
ticks = st.integers(-(1 << 40), 1 << 40)
receive_steps = st.floats(-5.0, 50.0, allow_nan=False)


@st.composite
def frames(draw, max_size: int = 60) -> list[tuple[str, str, object, float]]:
    """Frames from up to three sources: (source, kind, time, receive step), kind 'pts' or 'rtp'."""
    n = draw(st.integers(1, max_size))
    out = []
    for _ in range(n):
        source = draw(st.sampled_from(["a", "b", "c"]))
        kind = draw(st.sampled_from(["pts", "rtp"]))
        value = draw(seconds) if kind == "pts" else draw(ticks)
        out.append((source, kind, value, draw(receive_steps)))
    return out


@settings(max_examples=300, deadline=None)
@given(frames(), st.dictionaries(st.sampled_from(["a", "b", "c"]), policies), st.floats(0, 1e6))
def test_stream_time_never_goes_backwards_whatever_the_sources_send(sequence, chosen, start):
    clock = SessionClock(start_t=start)
    received, last = 1000.0, start
    for source, kind, value, step in sequence:
        received += step  # the receive clock may even step back: callers are not trusted
        policy = chosen.get(source, SENDER_TIME)
        if kind == "rtp":
            t = clock.stamp_rtp(source, value, RATE, received, policy=policy)
        else:
            t = clock.stamp(source, value, received, policy=policy)
        assert math.isfinite(t) and t >= last
        last = t
    assert clock.last_t == last


# One source's timestamps as a user's camera may send them: steady, frozen, jumping back, leaping.
segment = st.tuples(st.sampled_from(["steady", "frozen", "back", "leap", "jitter"]), st.integers(1, 30))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, RTP_WRAP - 1), st.lists(segment, min_size=1, max_size=8), st.floats(0.01, 0.5),
       st.sampled_from([RTP_TIME, ClockPolicy(max_jump_s=2.0, max_lag_s=1.0), ClockPolicy(keep_sender_time=True, max_lag_s=3.0)]))
def test_time_follows_the_receive_clock_even_when_rtp_freezes_wraps_or_goes_back(origin, plan, interval, policy):
    clock = SourceClock(policy)
    tick, received = origin, 50.0
    first_t = clock.stamp_rtp(tick, RATE, received)
    first_received, last_t = received, first_t
    for kind, count in plan:
        for i in range(count):
            received += interval
            if kind == "steady":
                tick += round(interval * RATE)
            elif kind == "jitter":
                tick += round(interval * RATE * (0.5 if i % 2 else 1.5))
            elif kind == "back" and i == 0:
                tick -= 20 * RATE
            elif kind == "leap" and i == 0:
                tick += 3_600 * RATE
            t = clock.stamp_rtp(tick % RTP_WRAP, RATE, received)
            # it advances with the receive clock: never more than max_lag_s behind it ...
            assert t - first_t >= (received - first_received) - policy.max_lag_s - EPS
            # ... and never leaps ahead of it
            assert t - last_t <= interval + max(policy.max_jump_s, policy.max_lag_s) + EPS
            last_t = t


near_the_wrap = st.one_of(st.integers(0, RTP_WRAP - 1), st.integers(RTP_WRAP - 1_000_000, RTP_WRAP - 1))


@settings(max_examples=300, deadline=None)
@given(near_the_wrap, st.lists(st.floats(0.02, 0.2), min_size=1, max_size=80), st.floats(0, 1e4))
def test_well_behaved_rtp_is_its_own_deltas_from_the_sessions_time(origin, gaps, session_t):
    session = SessionClock(start_t=session_t)
    clock = session.source("webrtc", RTP_TIME)
    tick, received = origin, 7.0
    first_t = clock.stamp_rtp(tick, RATE, received)
    assert first_t == session_t  # the random origin is rebased to the session's current time
    elapsed = 0
    for gap in gaps:
        step = round(gap * RATE)
        tick, elapsed, received = tick + step, elapsed + step, received + step / RATE
        assert clock.stamp_rtp(tick % RTP_WRAP, RATE, received) == first_t + elapsed / RATE
    assert sum(clock.rebases.values()) == 0


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 1e6), st.lists(st.tuples(st.floats(0, 59.0), st.floats(0, 30.0)), max_size=60))
def test_a_well_behaved_senders_time_comes_back_unchanged(pts0, steps):
    """Socket pts_s: kept exactly, whether the client replays faster or slower than real time."""
    clock = SessionClock().source("cam", SENDER_TIME)
    pts, received = pts0, 0.0
    assert clock.stamp(pts, received) == pts
    for pts_step, receive_step in steps:
        pts, received = pts + pts_step, received + receive_step
        assert clock.stamp(pts, received) == pts


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=50), st.floats(0, 1e4))
def test_frames_without_a_time_are_stamped_on_the_receive_clock(steps, start):
    session = SessionClock(start_t=start)
    clock = session.source("rtsp", RECEIVE_TIME)
    received = 3.0
    assert clock.stamp(None, received) == start
    for step in steps:
        received += step
        assert clock.stamp(None, received) == pytest.approx(start + received - 3.0)


# ---- the cases users meet ------------------------------------------------------------------------------

def test_a_webrtc_track_starts_at_the_sessions_time_not_hours_ahead():
    session = SessionClock()
    socket = session.source("browser", SENDER_TIME)
    for i in range(11):
        socket.stamp(i * 10.0, 1000.0 + i * 10.0)  # 100 s of socket frames
    track = session.source("webrtc", RTP_TIME)
    origin = 3_987_654_321  # random 32-bit start, 12.3 h worth of 90 kHz ticks
    t0 = track.stamp_rtp(origin, RATE, 1100.5)
    assert t0 == pytest.approx(100.5)
    t1 = track.stamp_rtp(origin + 9_000, RATE, 1100.6)
    assert t1 == pytest.approx(100.6)  # and it runs on: not frozen behind the socket source's time


def test_rtp_wrap_after_13_hours_is_time_going_on():
    clock = SourceClock(RTP_TIME)
    tick, received = RTP_WRAP - 45_000, 0.0  # half a second before the wrap
    times = []
    for _ in range(20):
        times.append(clock.stamp_rtp(tick % RTP_WRAP, RATE, received))
        tick, received = tick + 9_000, received + 0.1
    assert times == pytest.approx([0.1 * i for i in range(20)])
    assert clock.rebases == {"backward": 0, "leap": 0, "lag": 0, "units": 0}


def test_an_already_unwrapped_counter_that_misreads_reordering_as_a_wrap():
    """Some RTP stacks unwrap by 'any decrease is a wrap': a reordered frame then jumps 2**32 ticks."""
    clock = SourceClock(RTP_TIME)
    assert clock.stamp_rtp(90_000, RATE, 1.0) == 0.0
    clock.stamp_rtp(180_000, RATE, 2.0)
    late = clock.stamp_rtp(170_000 + RTP_WRAP, RATE, 2.05)  # 'wrapped' by the stack: really 10 000 ticks back
    nxt = clock.stamp_rtp(270_000 + RTP_WRAP, RATE, 3.0)
    assert late <= 1.2 and nxt <= 2.3  # not 13 hours ahead


def test_a_sender_reset_and_a_camera_restart_continue_from_the_receive_clock():
    clock = SourceClock(RTP_TIME)
    for i in range(10):
        clock.stamp_rtp(1_000_000 + i * 9_000, RATE, 10.0 + i * 0.1)  # t = 0.0 .. 0.9
    reset = clock.stamp_rtp(2_000_000_000, RATE, 11.0)  # a new random origin, ~6 h ahead
    assert reset == pytest.approx(1.0) and clock.rebases["leap"] == 1
    assert clock.stamp_rtp(2_000_009_000, RATE, 11.1) == pytest.approx(1.1)
    restarted = clock.stamp_rtp(0, RATE, 20.0)  # the camera came back after 9 s, counting from 0
    assert restarted == pytest.approx(10.0)
    assert clock.stamp_rtp(9_000, RATE, 20.1) == pytest.approx(10.1)

    socket = SourceClock(SENDER_TIME)
    assert [socket.stamp(p, r) for p, r in ((40.0, 0.0), (41.0, 1.0))] == [40.0, 41.0]
    assert socket.stamp(0.0, 6.0) == pytest.approx(46.0)  # the client restarted its clock
    assert socket.stamp(1.0, 7.0) == pytest.approx(47.0)
    assert socket.stamp(3.0e9, 8.0) == pytest.approx(48.0)  # a leap of 95 years is a reset, not time


def test_frozen_rtp_timestamps_do_not_freeze_the_clock():
    clock = SourceClock(RTP_TIME)
    times = [clock.stamp_rtp(123_456, RATE, 0.5 * i) for i in range(200)]  # 100 s of the same timestamp
    assert times == sorted(times)
    assert times[-1] >= 99.5 - RTP_TIME.max_lag_s
    assert clock.rebases["lag"] >= 10


def test_a_client_stepping_through_a_recording_keeps_its_timestamps():
    """pts 0, 1, 2 sent at once, then pts 3 after a minute of questions: evidence says 3.0."""
    clock = SessionClock()
    assert [clock.stamp("cam", p, 0.01 * p) for p in (0.0, 1.0, 2.0)] == [0.0, 1.0, 2.0]
    assert clock.stamp("cam", 3.0, 60.0) == 3.0
    assert clock.stamp("cam", 3.5, 60.1) == 3.5


def test_a_second_source_joins_at_the_sessions_current_time():
    clock = SessionClock()
    for i in range(5):
        clock.stamp("kitchen", 10.0 + i, 100.0 + i)  # kept: 10 .. 14
    assert clock.stamp("door", 0.0, 104.5) == pytest.approx(14.5)  # behind the session: rebased to now
    assert clock.stamp("door", 1.0, 105.5) == pytest.approx(15.5)
    assert clock.stamp("porch", 500.0, 106.0) == 500.0  # ahead: a sender's own time is kept
    assert clock.stamp("door", 2.0, 106.5) == 500.0  # never before the session's latest time
    assert clock.stamp("rtsp", None, 107.0) == pytest.approx(500.5)  # receive clock from the latest frame


def test_a_source_can_be_forgotten_and_start_again():
    clock = SessionClock()
    clock.stamp_rtp("webrtc", 5_000, RATE, 1.0)
    clock.stamp_rtp("webrtc", 95_000, RATE, 2.0)
    clock.forget("webrtc")  # a new offer replaced the track
    assert clock.stamp_rtp("webrtc", 2_000_000_000, RATE, 5.0) == pytest.approx(4.0)
    assert clock.stamp_rtp("webrtc", None, None, 6.0) == pytest.approx(5.0)  # no timestamp: receive clock


def test_bad_times_and_policies_are_refused():
    clock = SourceClock()
    for bad in (math.nan, math.inf, "1.0", True):
        with pytest.raises(TimestampError):
            clock.stamp(bad, 0.0)
        with pytest.raises(TimestampError):
            clock.stamp(1.0, bad)
    with pytest.raises(TimestampError):
        clock.stamp_rtp(1.5, RATE, 0.0)
    with pytest.raises(TimestampError):
        clock.stamp_rtp(1, 0, 0.0)
    assert clock.last_t is None  # nothing changed
    for bad in ({"max_jump_s": 0}, {"max_lag_s": -1.0}, {"max_jump_s": math.inf}, {"keep_sender_time": 1}):
        with pytest.raises(ConfigError):
            ClockPolicy(**bad)
    with pytest.raises(ConfigError):
        SourceClock("rtp")


def test_a_clock_with_an_origin_runs_from_the_sessions_opening():
    # The page's clock starts when its session opens; a WebRTC track whose first frame arrives 1.5 s later
    # (before any socket frame) must land near 1.5 s, not at 0, or the page cannot match its evidence.
    clock = SessionClock(origin_s=100.0)
    assert clock.now(101.5) == pytest.approx(1.5)
    assert clock.stamp_rtp("webrtc", 123_456, 90_000, 101.5) == pytest.approx(1.5)
    assert SessionClock().stamp_rtp("webrtc", 123_456, 90_000, 101.5) == 0.0  # without an origin: at start_t
