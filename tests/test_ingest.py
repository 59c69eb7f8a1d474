"""Tests for streamvlm.ingest: timestamp-based sampling and reading video files."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamvlm.ingest.file as ingest_file
from streamvlm.errors import ConfigError, SourceError, TimestampError
from streamvlm.ingest import FpsSampler, VideoInfo, probe_video, read_video, write_test_clip
from streamvlm.types import Frame

CLIP_SECONDS = 4.0
CLIP_FPS = 10.0
CLIP_SIZE = (128, 96)  # (width, height)


def kept(sampler: FpsSampler, timestamps: list[float]) -> list[float]:
    return [t for t in timestamps if sampler.offer(t)]


# --------------------------------------------------------------------------- sampler


def test_sampler_30fps_source_at_1fps_keeps_one_frame_per_second() -> None:
    source = [i / 30.0 for i in range(30 * 10)]
    result = kept(FpsSampler(1.0), source)
    assert len(result) == 10
    for k, pts in enumerate(result):
        assert abs(pts - k) < 1 / 30.0


def test_sampler_does_not_drift_on_ntsc_rate() -> None:
    # 29.97 fps never lines up with whole seconds; kept frames must stay on the 1 s grid.
    source = [i / 29.97 for i in range(int(29.97 * 100))]
    sampler = FpsSampler(1.0)
    result = kept(sampler, source)
    assert len(result) == 100
    for k, pts in enumerate(result):
        # A frame within tolerance_s before the boundary counts as on it.
        assert k - sampler.tolerance_s <= pts < k + 1 / 29.97


def test_sampler_keeps_exact_average_rate_for_non_divisible_ratio() -> None:
    # 25 fps -> 10 fps: every slot of 0.1 s gets the first frame in it.
    source = [i / 25.0 for i in range(25 * 2)]
    result = kept(FpsSampler(10.0), source)
    assert len(result) == 20
    assert result[:5] == pytest.approx([0.0, 0.12, 0.2, 0.32, 0.4])


def test_sampler_irregular_timestamps() -> None:
    source = [0.0, 0.03, 0.07, 0.49, 0.51, 0.98, 1.02, 1.5, 2.7, 2.71, 3.0, 3.99]
    assert kept(FpsSampler(1.0), source) == [0.0, 1.02, 2.7, 3.0]


def test_sampler_slots_are_relative_to_first_frame() -> None:
    source = [100.25 + i * 0.05 for i in range(41)]  # 100.25 .. 102.25
    result = kept(FpsSampler(1.0), source)
    assert result == pytest.approx([100.25, 101.25, 102.25])


def test_sampler_slower_source_keeps_every_frame() -> None:
    source = [i * 0.5 for i in range(20)]  # 2 fps source
    assert kept(FpsSampler(5.0), source) == source


def test_sampler_gap_in_source_causes_no_burst() -> None:
    # After a 1.2 s gap, frames resume at 20 fps; only one per 0.5 s slot is kept.
    source = [0.0, 0.5, 1.7, 1.75, 1.8, 1.9, 1.95, 2.0, 2.05, 2.5]
    assert kept(FpsSampler(2.0), source) == [0.0, 0.5, 1.7, 2.0, 2.5]


def test_sampler_drops_repeated_timestamp() -> None:
    sampler = FpsSampler(1.0)
    assert sampler.offer(0.0) is True
    assert sampler.offer(0.0) is False
    assert sampler.offer(1.0) is True
    assert sampler.offer(1.0) is False


@pytest.mark.parametrize("fps", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, "10", None, True])
def test_sampler_rejects_bad_fps(fps: object) -> None:
    with pytest.raises(ConfigError, match="fps"):
        FpsSampler(fps)  # type: ignore[arg-type]


def test_sampler_config_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        FpsSampler(0)


def test_sampler_rejects_backwards_timestamp_and_keeps_state() -> None:
    sampler = FpsSampler(1.0)
    assert sampler.offer(0.0)
    assert not sampler.offer(0.5)
    with pytest.raises(TimestampError, match="backwards"):
        sampler.offer(0.4)
    # The bad frame is ignored; the stream goes on from the last good timestamp.
    assert not sampler.offer(0.6)
    assert sampler.offer(1.0)


@pytest.mark.parametrize("pts", [math.nan, math.inf, -math.inf])
def test_sampler_rejects_non_finite_timestamp(pts: float) -> None:
    sampler = FpsSampler(1.0)
    with pytest.raises(TimestampError):
        sampler.offer(pts)


def test_sampler_accepts_numpy_scalars() -> None:
    sampler = FpsSampler(np.float32(2.0))
    assert sampler.fps == 2.0
    assert sampler.offer(np.float64(0.0))
    assert not sampler.offer(np.float32(0.25))
    assert sampler.offer(np.float64(0.5))


increments = st.lists(
    st.one_of(
        st.just(0.0),
        st.floats(min_value=1e-4, max_value=0.2),
        st.floats(min_value=0.2, max_value=3.0),
    ),
    min_size=1,
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(
    fps=st.floats(min_value=0.2, max_value=60.0),
    start=st.floats(min_value=-1000.0, max_value=1000.0),
    steps=increments,
)
def test_sampler_properties(fps: float, start: float, steps: list[float]) -> None:
    timestamps = [start]
    for step in steps:
        timestamps.append(timestamps[-1] + step)
    sampler = FpsSampler(fps)
    decisions = [sampler.offer(t) for t in timestamps]
    kept_pts = [t for t, keep in zip(timestamps, decisions) if keep]
    interval = 1.0 / fps
    tol = sampler.tolerance_s
    eps = 1e-9

    assert decisions[0] is True
    assert kept_pts == sorted(kept_pts)

    # Exactly the first frame of every occupied slot is kept.
    def slot(t: float) -> int:
        return math.floor((t - timestamps[0] + tol) * fps)

    expected: list[float] = []
    seen_slots: set[int] = set()
    for t in timestamps:
        s = slot(t)
        if s not in seen_slots:
            seen_slots.add(s)
            expected.append(t)
    assert kept_pts == expected

    # The kept rate never exceeds fps: frames two apart in the kept sequence
    # are at least 1/fps apart, n apart at least (n-1)/fps.
    for i in range(len(kept_pts)):
        for j in range(i + 2, min(len(kept_pts), i + 6)):
            assert kept_pts[j] - kept_pts[i] >= (j - i - 1) * interval - tol - eps

    # Every gap of >= 2/fps between consecutive kept frames comes from the input:
    # no input frame lies in [a + 1/fps, b), so the input itself has a gap >= 1/fps.
    for a, b in zip(kept_pts, kept_pts[1:]):
        if b - a >= 2 * interval:
            between = [t for t in timestamps if a <= t < b]
            assert max(between) < a + interval + eps
            assert b - max(between) >= interval - tol - eps


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "demo.mp4"
    return write_test_clip(path, seconds=CLIP_SECONDS, fps=CLIP_FPS, size=CLIP_SIZE)


@pytest.fixture()
def garbage(tmp_path: Path) -> Path:
    path = tmp_path / "notes.mp4"
    path.write_text("this is a text file, not a video\n" * 50)
    return path


def test_write_test_clip_returns_existing_file(clip: Path) -> None:
    assert clip.is_file()
    assert clip.suffix == ".mp4"
    assert clip.stat().st_size > 0


def test_read_video_yields_all_frames_with_timestamps(clip: Path) -> None:
    frames = list(read_video(clip))
    assert len(frames) == round(CLIP_SECONDS * CLIP_FPS)
    width, height = CLIP_SIZE
    for index, frame in enumerate(frames):
        assert isinstance(frame, Frame)
        assert frame.image.shape == (height, width, 3)
        assert frame.image.dtype == np.uint8
        assert frame.image.flags["C_CONTIGUOUS"]
        assert abs(frame.pts_s - index / CLIP_FPS) < 1e-3
        assert frame.source_id == "demo.mp4"
    pts = [f.pts_s for f in frames]
    assert all(b > a for a, b in zip(pts, pts[1:]))


def test_read_video_accepts_str_path_and_source_id(clip: Path) -> None:
    frames = list(read_video(str(clip), source_id="cam-1"))
    assert len(frames) == 40
    assert {f.source_id for f in frames} == {"cam-1"}


def test_read_video_returns_rgb_and_content_varies(clip: Path) -> None:
    frames = list(read_video(clip))
    # The bottom-right corner shows the background: (30, 60, 160) RGB in the
    # first second, (40, 140, 60) in the second. A BGR result would swap R and B.
    first = frames[0].image[-1, -1].astype(int)
    second = frames[10].image[-1, -1].astype(int)
    assert np.abs(first - [30, 60, 160]).max() <= 12
    assert np.abs(second - [40, 140, 60]).max() <= 12
    # The square moves: consecutive frames differ.
    for a, b in zip(frames, frames[1:]):
        assert not np.array_equal(a.image, b.image)


def test_write_test_clip_other_rate_round_trips(tmp_path: Path) -> None:
    path = write_test_clip(tmp_path / "sub" / "c.mp4", seconds=2.0, fps=29.97, size=(64, 48))
    frames = list(read_video(path))
    assert len(frames) == round(2.0 * 29.97)
    assert frames[0].image.shape == (48, 64, 3)
    for index, frame in enumerate(frames):
        assert abs(frame.pts_s - index / 29.97) < 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seconds": 0},
        {"seconds": -1.0},
        {"fps": 0},
        {"fps": math.nan},
        {"size": (65, 48)},
        {"size": (0, 48)},
        {"size": (64,)},
    ],
)
def test_write_test_clip_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        write_test_clip(tmp_path / "x.mp4", **kwargs)


def test_read_video_samples_by_fps(clip: Path) -> None:
    pts = [f.pts_s for f in read_video(clip, fps=2.0)]
    assert pts == pytest.approx([k * 0.5 for k in range(8)], abs=1e-3)


def test_read_video_samples_non_divisible_fps(clip: Path) -> None:
    pts = [f.pts_s for f in read_video(clip, fps=3.0)]
    assert len(pts) == 12
    for k, t in enumerate(pts):
        assert k / 3.0 - 1e-3 <= t < k / 3.0 + 1 / CLIP_FPS


def test_read_video_fps_above_source_keeps_all(clip: Path) -> None:
    assert len(list(read_video(clip, fps=30.0))) == 40


def test_read_video_start_and_end(clip: Path) -> None:
    pts = [f.pts_s for f in read_video(clip, start_s=1.0, end_s=2.5)]
    assert pts == pytest.approx([1.0 + k * 0.1 for k in range(15)], abs=1e-3)


def test_read_video_start_end_with_fps_anchors_at_start(clip: Path) -> None:
    pts = [f.pts_s for f in read_video(clip, fps=1.0, start_s=0.5, end_s=3.0)]
    assert pts == pytest.approx([0.5, 1.5, 2.5], abs=1e-3)


def test_read_video_start_after_end_of_clip_is_empty(clip: Path) -> None:
    assert list(read_video(clip, start_s=100.0)) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fps": 0},
        {"fps": -2.0},
        {"fps": math.inf},
        {"start_s": -1.0},
        {"start_s": math.nan},
        {"start_s": 2.0, "end_s": 1.0},
        {"end_s": math.nan},
    ],
)
def test_read_video_rejects_bad_arguments_on_call(clip: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        read_video(clip, **kwargs)


def test_missing_path_raises_source_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "missing.mp4"
    with pytest.raises(SourceError, match="does not exist") as info:
        read_video(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(SourceError, match="does not exist"):
        probe_video(missing)


def test_garbage_file_raises_source_error(garbage: Path) -> None:
    with pytest.raises(SourceError, match="not a readable video") as info:
        read_video(garbage)
    assert str(garbage) in str(info.value)
    with pytest.raises(SourceError, match="not a readable video"):
        probe_video(garbage)


def test_empty_file_raises_source_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match="not a readable video"):
        read_video(empty)


@pytest.mark.parametrize("name", ["notes.txt", "readme.nfo"])
def test_a_text_file_is_not_a_video_although_ffmpeg_draws_it(tmp_path: Path, name: str) -> None:
    text = tmp_path / name
    text.write_text("shopping list: milk, eggs, bread\n" * 40)
    with pytest.raises(SourceError, match="is text, not a video") as info:
        probe_video(text)
    assert str(text) in str(info.value)
    with pytest.raises(SourceError, match="is text, not a video"):
        read_video(text)


def test_directory_raises_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a file"):
        read_video(tmp_path)


def test_probe_video(clip: Path) -> None:
    info = probe_video(clip)
    assert info == VideoInfo(width=128, height=96, fps=10.0, frame_count=40, duration_s=4.0)


class _TrackingCapture:
    """Wraps a real capture and records whether it was released.

    A wrapper rather than a subclass: cv2 classes do not support Python
    subclasses that add attributes.
    """

    opened: list[_TrackingCapture] = []

    def __init__(self, *args: object) -> None:
        self._capture = _REAL_VIDEO_CAPTURE(*args)
        self.released = False
        _TrackingCapture.opened.append(self)

    def isOpened(self) -> bool:  # noqa: N802 - mirrors the cv2 name
        return self._capture.isOpened()

    def read(self) -> tuple[bool, np.ndarray | None]:
        return self._capture.read()

    def get(self, prop: int) -> float:
        return self._capture.get(prop)

    def release(self) -> None:
        self.released = True
        self._capture.release()


_REAL_VIDEO_CAPTURE = cv2.VideoCapture


@pytest.fixture()
def tracked(monkeypatch: pytest.MonkeyPatch) -> list[_TrackingCapture]:
    _TrackingCapture.opened = []
    monkeypatch.setattr(ingest_file.cv2, "VideoCapture", _TrackingCapture)
    return _TrackingCapture.opened


def test_captures_released_after_full_read(clip: Path, tracked: list[_TrackingCapture]) -> None:
    list(read_video(clip))
    probe_video(clip)
    assert tracked and all(c.released for c in tracked)


def test_captures_released_when_closed_early(clip: Path, tracked: list[_TrackingCapture]) -> None:
    frames = read_video(clip)
    next(frames)
    next(frames)
    frames.close()  # type: ignore[attr-defined]
    assert tracked and all(c.released for c in tracked)


def test_captures_released_on_unreadable_file(garbage: Path, tracked: list[_TrackingCapture]) -> None:
    with pytest.raises(SourceError):
        read_video(garbage)
    with pytest.raises(SourceError):
        probe_video(garbage)
    assert tracked and all(c.released for c in tracked)


# --------------------------------------------------------------------------- timestamp fallback


def test_frame_clock_uses_backend_timestamps() -> None:
    clock = ingest_file._FrameClock(Path("x.mp4"), 25.0)
    assert [clock.timestamp(i, ms) for i, ms in enumerate([0.0, 33.0, 70.0])] == [0.0, 0.033, 0.07]


def test_frame_clock_falls_back_when_backend_reports_zero() -> None:
    clock = ingest_file._FrameClock(Path("x.mp4"), 25.0)
    pts = [clock.timestamp(i, 0.0) for i in range(5)]
    assert pts == pytest.approx([0.0, 0.04, 0.08, 0.12, 0.16])


def test_frame_clock_falls_back_when_backend_not_increasing() -> None:
    clock = ingest_file._FrameClock(Path("x.mp4"), 10.0)
    pts = [clock.timestamp(i, ms) for i, ms in enumerate([0.0, 100.0, 200.0, 200.0, 900.0])]
    # From the repeated value on, frames are counted at 10 fps from the last good one.
    assert pts == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_frame_clock_without_timestamps_or_fps_raises() -> None:
    clock = ingest_file._FrameClock(Path("x.mp4"), 0.0)
    assert clock.timestamp(0, 0.0) == 0.0
    with pytest.raises(SourceError, match="no usable frame timestamps"):
        clock.timestamp(1, 0.0)
