"""ShapeWorld: determinism, ground truth against the event log, pixels, arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvlm.errors import ConfigError
from streamvlm.shapeworld import (
    CATEGORIES,
    COLOURS,
    SHAPES,
    Episode,
    QA,
    make_episode,
    make_questions,
    shape_radius,
)

SEEDS = range(12)


# -- an independent reading of the event log ------------------------------------------------------


def state_at(episode: Episode, t: float) -> dict[int, tuple[str, str]]:
    """shape_id -> (shape, colour) on screen at t, replayed from the log alone."""
    on: dict[int, tuple[str, str]] = {}
    for ev in sorted(episode.events, key=lambda e: (e.t, e.kind != "leave")):
        if ev.t > t:
            continue
        if ev.kind == "enter":
            on[ev.shape_id] = (ev.shape, ev.colour)
        elif ev.kind == "leave":
            del on[ev.shape_id]
        else:
            assert on[ev.shape_id][1] == ev.old_colour
            on[ev.shape_id] = (ev.shape, ev.colour)
    return on


def expected_answer(episode: Episode, qa: QA) -> str:
    t, q = qa.t, qa.question
    on = state_at(episode, t)
    enters = [e for e in episode.events if e.kind == "enter"]
    if q == "What shape is on screen now?":
        assert len(on) == 1
        return next(iter(on.values()))[0]
    if q == "How many shapes are visible?":
        return str(len(on))
    if q == "What colour was the first shape?":
        first = min(e.t for e in enters)
        assert first < t
        (only,) = [e for e in enters if e.t == first]
        return only.colour
    words = q.rstrip("?.").split()
    if q.startswith("Is there a"):
        colour, shape = words[3], words[4]
        return "yes" if (shape, colour) in on.values() else "no"
    if q.startswith("When did the"):
        colour, shape = words[3], words[4]
        (hit,) = [e for e in enters if e.t < t and (e.colour, e.shape) == (colour, shape)]
        return str(int(hit.t))
    if q.startswith("Tell me when a"):
        colour, shape = words[4], words[5]
        assert (shape, colour) not in on.values()
        # first time after t that such a shape is on screen (whole-second event times)
        for k in range(int(t) + 1, int(episode.duration_s) + 1):
            if (shape, colour) in state_at(episode, k).values():
                return str(k)
        raise AssertionError(f"never appears: {qa}")
    raise AssertionError(f"unknown question {q!r}")


# -- determinism ----------------------------------------------------------------------------------


def test_same_seed_same_episode_and_frames():
    a, b = make_episode(5), make_episode(5)
    assert a == b
    assert a.events == b.events
    for (ta, fa), (tb, fb) in zip(a.frames(), b.frames(), strict=True):
        assert ta == tb
        assert np.array_equal(fa, fb)
    assert make_questions(a, 3) == make_questions(b, 3)


def test_different_seeds_differ():
    a, b = make_episode(1), make_episode(2)
    assert a.events != b.events
    assert any(not np.array_equal(fa, fb) for (_, fa), (_, fb) in zip(a.frames(), b.frames()))


# -- the world ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_visible_matches_event_log(seed):
    ep = make_episode(seed)
    assert ep.events[0].kind == "enter" and ep.events[0].t <= 0.1 * ep.duration_s
    for t in [i * 0.25 for i in range(int(ep.duration_s * 4))]:
        vis = ep.visible(t)
        assert {s.shape_id: (s.shape, s.colour) for s in vis} == state_at(ep, t)
        r = shape_radius(ep.size)
        for s in vis:
            assert r - 1e-9 <= s.x <= ep.size - 1 - r + 1e-9
            assert r - 1e-9 <= s.y <= ep.size - 1 - r + 1e-9


@pytest.mark.parametrize("seed", SEEDS)
def test_event_log_is_well_formed(seed):
    ep = make_episode(seed)
    assert list(ep.events) == sorted(ep.events, key=lambda e: e.t)
    for ev in ep.events:
        assert ev.shape in SHAPES and ev.colour in COLOURS
        assert 0 <= ev.t < ep.duration_s and ev.t == int(ev.t)
        assert (ev.old_colour is not None) == (ev.kind == "change_colour")
        assert ev.old_colour != ev.colour
    assert {e.kind for e in ep.events} >= {"enter", "leave"}
    json.dumps(ep.to_dict())


@pytest.mark.parametrize("seed", [0, 3, 9])
def test_frames_are_uint8_rgb_and_never_zero(seed):
    for size in (64, 96):
        ep = make_episode(seed, size=size, duration_s=20.0)
        times = []
        for t, frame in ep.frames():
            times.append(t)
            assert frame.dtype == np.uint8 and frame.shape == (size, size, 3)
            assert frame.any() and frame.reshape(-1, 3).sum(axis=1).min() > 0
        assert times == [i / ep.fps for i in range(int(20.0 * ep.fps))]


@pytest.mark.parametrize("seed", SEEDS)
def test_shapes_drawn_in_their_colour_at_their_position(seed):
    ep = make_episode(seed)
    background = ep.render(0.0)[0, 0].astype(int)
    seen = 0
    for t, frame in ep.frames():
        vis = ep.visible(t)
        if not vis:
            assert (frame == frame[0, 0]).all()
            continue
        top = vis[-1]  # drawn last, so nothing covers it
        cx, cy = int(round(top.x)), int(round(top.y))
        patch = frame[cy - 2 : cy + 3, cx - 2 : cx + 3].reshape(-1, 3).astype(int)
        assert (np.abs(patch - np.array(COLOURS[top.colour])) <= 1).all(), (t, top)
        if len(vis) == 1:  # far from the shape: background
            far = frame[: max(0, cy - 15), :].reshape(-1, 3)
            if len(far):
                assert (far == background).all()
        seen += 1
    assert seen > 0


# -- questions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_every_answer_agrees_with_event_log(seed):
    ep = make_episode(seed)
    qas = make_questions(ep, rng_seed=seed + 100, per_category=4)
    assert all(a.t <= b.t for a, b in zip(qas, qas[1:]))
    enter_times = {(e.colour, e.shape, e.t) for e in ep.events if e.kind == "enter"}
    for qa in qas:
        assert qa.category in CATEGORIES
        assert qa.answer == qa.answer.lower() and qa.answer.strip() == qa.answer
        assert qa.answer == expected_answer(ep, qa), qa
        if qa.category == "forward":
            assert qa.tolerance_s == 2.0
            colour, shape = qa.question.rstrip(".").split()[4:6]
            assert (colour, shape, float(qa.answer)) in enter_times
            assert float(qa.answer) > qa.t
        else:
            assert qa.tolerance_s is None
        if qa.category == "probe":
            assert qa.answer in ("yes", "no")


def test_questions_cover_all_categories_and_are_deterministic():
    cats = set()
    for seed in SEEDS:
        ep = make_episode(seed)
        qas = make_questions(ep, 7)
        assert qas == make_questions(ep, 7)
        for cat in CATEGORIES:
            assert sum(q.category == cat for q in qas) <= 2
        cats |= {q.category for q in qas}
        probes = [q.answer for q in qas if q.category == "probe"]
        if len(probes) == 2:
            assert sorted(probes) == ["no", "yes"]
    assert cats == set(CATEGORIES)
    assert make_questions(make_episode(0), 7, per_category=0) == []


# -- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seed": -1},
        {"seed": 1.5},
        {"seed": True},
        {"duration_s": 0.0},
        {"duration_s": float("nan")},
        {"duration_s": float("inf")},
        {"fps": 0},
        {"fps": -2.0},
        {"size": 8},
        {"size": 64.0},
        {"max_shapes": 0},
        {"max_shapes": 2.5},
    ],
)
def test_bad_arguments_raise_config_error(kwargs):
    args = {"seed": 0, **kwargs}
    with pytest.raises(ConfigError):
        make_episode(**args)


def test_bad_render_and_question_arguments():
    ep = make_episode(0)
    for bad in (-1.0, float("nan"), "3"):
        with pytest.raises(ConfigError):
            ep.render(bad)
    with pytest.raises(ConfigError):
        make_questions(ep, -1)
    with pytest.raises(ConfigError):
        make_questions(ep, 0, per_category=-1)
    with pytest.raises(ConfigError):
        make_questions("episode", 0)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    max_shapes=st.integers(1, 5),
    duration_s=st.floats(2.0, 120.0),
)
def test_max_shapes_never_exceeded(seed, max_shapes, duration_s):
    ep = make_episode(seed, duration_s=duration_s, max_shapes=max_shapes)
    on = 0
    for ev in ep.events:  # sorted: leaves before enters at the same second
        on += {"enter": 1, "leave": -1, "change_colour": 0}[ev.kind]
        assert 0 <= on <= max_shapes
    assert ep.events[0].kind == "enter" and ep.events[0].t <= 0.1 * duration_s
    for t in ep.frame_times():
        assert len(ep.visible(t)) <= max_shapes
