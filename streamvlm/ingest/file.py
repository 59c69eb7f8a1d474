"""Reading frames from video files, probing them, and writing a synthetic test clip.

Decoding goes through OpenCV (`cv2.VideoCapture`). Frames come out as RGB
uint8 arrays with presentation times in seconds, ready to be wrapped as
`streamvlm.types.Frame` and streamed onward.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import cv2
import numpy as np

from streamvlm.errors import ConfigError, SourceError
from streamvlm.ingest.sampler import FpsSampler
from streamvlm.types import Frame

__all__ = ["VideoInfo", "probe_video", "read_video", "write_test_clip", "renders_text"]

StrPath = str | os.PathLike[str]

# FourCCs of the codecs FFmpeg uses to draw a text file (.txt, .nfo, ANSI art) as pictures: it "plays"
# a shopping list as 25 fps video, which is a document, not a video.
_TEXT_CODECS = frozenset({"ansi"})


def renders_text(capture: cv2.VideoCapture) -> bool:
    """True when an opened capture decodes text drawn as pictures (a text file read by FFmpeg's tty demuxer)."""
    try:
        tag = int(capture.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF
    except (TypeError, ValueError, OverflowError):
        return False
    return tag.to_bytes(4, "little").decode("latin-1").strip().lower() in _TEXT_CODECS


@dataclass(frozen=True)
class VideoInfo:
    """Basic properties of a video file, as reported by the container.

    ``fps``, ``frame_count`` and ``duration_s`` are None when the container
    does not report them; the caller then learns them by reading the frames.
    ``frame_count`` is the container's figure and may differ slightly from the
    number of frames `read_video` actually yields.
    """

    width: int
    height: int
    fps: float | None
    frame_count: int | None
    duration_s: float | None


def probe_video(path: StrPath) -> VideoInfo:
    """Opens ``path``, decodes its first frame, and returns its `VideoInfo`.

    Raises `SourceError` if the path does not exist, is not a file, or is not
    a readable video (OpenCV cannot open it or it yields no frame).
    """
    file_path = _existing_file(path)
    capture = _open_capture(file_path)
    try:
        ok, first = capture.read()
        if not ok or first is None:
            raise _not_readable(file_path)
        height, width = first.shape[:2]
        fps = _positive_or_none(capture.get(cv2.CAP_PROP_FPS))
        count_raw = _positive_or_none(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()
    frame_count = int(round(count_raw)) if count_raw is not None else None
    duration_s = frame_count / fps if frame_count is not None and fps is not None else None
    return VideoInfo(
        width=int(width),
        height=int(height),
        fps=fps,
        frame_count=frame_count,
        duration_s=duration_s,
    )


def read_video(
    path: StrPath,
    fps: float | None = None,
    *,
    start_s: float = 0.0,
    end_s: float | None = None,
    source_id: str | None = None,
) -> Iterator[Frame]:
    """Yields the frames of the video file at ``path`` in order, as `Frame` objects.

    Each frame's image is an HxWx3 uint8 RGB C-contiguous array; ``pts_s`` is
    its presentation time in seconds (from the container's timestamps, or
    ``index / container fps`` when the backend gives no usable timestamps).

    * ``fps``: when given, frames are thinned to this rate by timestamp using
      `FpsSampler` (the first frame at or after ``start_s`` is always kept);
      when None, every frame is yielded.
    * ``start_s`` / ``end_s``: only frames with ``start_s <= pts_s < end_s``
      are yielded; reading stops at the first frame at or after ``end_s``.
      Earlier frames are decoded and skipped, not seeked over.
    * ``source_id``: stored on every frame; defaults to the file name.

    Arguments and the file are checked when this is called: `ConfigError` for
    a bad ``fps``, ``start_s`` or ``end_s``; `SourceError` if the path does
    not exist or is not a readable video. The file is opened again when
    iteration starts and released when iteration ends, fails, or the iterator
    is closed; the caller should exhaust or ``close()`` the iterator (a ``for``
    loop that runs to the end does this).
    """
    sampler_fps = _check_fps(fps)
    start, end = _check_window(start_s, end_s)
    file_path = _existing_file(path)
    _check_readable(file_path)
    sid = source_id if source_id is not None else file_path.name
    return _iter_frames(file_path, sampler_fps, start, end, sid)


def write_test_clip(
    path: StrPath,
    *,
    seconds: float = 4.0,
    fps: float = 10.0,
    size: tuple[int, int] = (128, 96),
) -> Path:
    """Writes a small synthetic MP4 clip to ``path`` and returns its path.

    The clip holds ``round(seconds * fps)`` frames of ``size`` = (width,
    height) pixels: a coloured square moving across a background whose colour
    changes every second, so neighbouring frames differ and each second looks
    different. Frame ``i`` is meant to be shown at ``i / fps`` seconds, and
    `read_video` reads it back with that timestamp. Parent folders are created.

    Raises `ConfigError` for a non-positive ``seconds`` or ``fps`` or a size
    that is not two even integers >= 2 (the encoder would crop odd sizes), and
    `SourceError` if OpenCV cannot write the file.
    """
    width, height = _check_clip_args(seconds, fps, size)
    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n_frames = max(1, round(seconds * fps))
    writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
    try:
        if not writer.isOpened():
            raise SourceError(f"cannot write video file {str(out_path)!r}: OpenCV could not open a writer")
        for index in range(n_frames):
            rgb = _test_clip_frame(index, fps, width, height)
            writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    if not out_path.is_file() or out_path.stat().st_size == 0:
        raise SourceError(f"cannot write video file {str(out_path)!r}: nothing was written")
    return out_path


# Background colours (RGB), one per second of the test clip, cycling.
_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (30, 60, 160),
    (40, 140, 60),
    (150, 50, 50),
    (120, 110, 30),
    (90, 40, 130),
    (30, 120, 130),
)
_SQUARE_COLOUR: tuple[int, int, int] = (250, 220, 40)


def _test_clip_frame(index: int, fps: float, width: int, height: int) -> np.ndarray:
    """Draws frame ``index`` of the test clip as an HxWx3 uint8 RGB array."""
    t = index / fps
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = _BACKGROUNDS[int(t) % len(_BACKGROUNDS)]
    side = max(2, min(width, height) // 4)
    # The square bounces left-right once every 2 s and drifts down over time.
    travel_x = max(0, width - side)
    travel_y = max(0, height - side)
    phase = (t / 2.0) % 1.0
    x = int(round(travel_x * (2 * phase if phase < 0.5 else 2 * (1 - phase))))
    y = int(round(travel_y * ((t / 8.0) % 1.0)))
    image[y : y + side, x : x + side] = _SQUARE_COLOUR
    return image


def _iter_frames(
    file_path: Path,
    sampler_fps: float | None,
    start_s: float,
    end_s: float | None,
    source_id: str,
) -> Iterator[Frame]:
    """Decodes ``file_path`` and yields the selected frames; releases the capture at the end."""
    capture = _open_capture(file_path)
    try:
        sampler = FpsSampler(sampler_fps) if sampler_fps is not None else None
        clock = _FrameClock(file_path, capture.get(cv2.CAP_PROP_FPS))
        index = 0
        while True:
            ok, raw = capture.read()
            if not ok or raw is None:
                if index == 0:
                    raise _not_readable(file_path)
                return
            pts_s = clock.timestamp(index, capture.get(cv2.CAP_PROP_POS_MSEC))
            index += 1
            if pts_s < start_s:
                continue
            if end_s is not None and pts_s >= end_s:
                return
            if sampler is not None and not sampler.offer(pts_s):
                continue
            yield Frame(image=_to_rgb(raw), pts_s=pts_s, source_id=source_id)
    finally:
        capture.release()


class _FrameClock:
    """Turns the backend's per-frame position into strictly increasing timestamps.

    Uses ``CAP_PROP_POS_MSEC`` while it is usable. If a frame after the first
    reports 0, a non-finite value, or a value not after the previous frame,
    switches for the rest of the file to counting frames at the container's
    fps, continuing from the last good timestamp.
    """

    def __init__(self, file_path: Path, container_fps: float) -> None:
        self._file_path = file_path
        self._container_fps = _positive_or_none(container_fps)
        self._use_backend = True
        self._last_pts: float | None = None
        self._last_index = -1

    def timestamp(self, index: int, pos_msec: float) -> float:
        """Returns the timestamp in seconds of frame ``index`` given the backend's position."""
        if self._use_backend:
            pts = pos_msec / 1000.0 if math.isfinite(pos_msec) else math.nan
            if index == 0:
                if not math.isfinite(pts) or pts < 0:
                    pts = 0.0
                return self._remember(index, pts)
            if math.isfinite(pts) and pts > 0 and self._last_pts is not None and pts > self._last_pts:
                return self._remember(index, pts)
            self._use_backend = False
        return self._remember(index, self._counted(index))

    def _counted(self, index: int) -> float:
        """Timestamp of frame ``index`` from the container fps, continuing from the last frame."""
        if self._container_fps is None:
            raise SourceError(
                f"video file {str(self._file_path)!r} has no usable frame timestamps and no frame rate"
            )
        if self._last_pts is None:
            return index / self._container_fps
        return self._last_pts + (index - self._last_index) / self._container_fps

    def _remember(self, index: int, pts: float) -> float:
        self._last_pts = pts
        self._last_index = index
        return pts


def _to_rgb(raw: np.ndarray) -> np.ndarray:
    """Converts a decoded OpenCV image (BGR, BGRA or grey) to HxWx3 uint8 RGB, C-contiguous."""
    if raw.dtype != np.uint8:
        raw = cv2.convertScaleAbs(raw)
    if raw.ndim == 2:
        rgb = cv2.cvtColor(raw, cv2.COLOR_GRAY2RGB)
    elif raw.shape[2] == 4:
        rgb = cv2.cvtColor(raw, cv2.COLOR_BGRA2RGB)
    elif raw.shape[2] == 1:
        rgb = cv2.cvtColor(raw, cv2.COLOR_GRAY2RGB)
    else:
        rgb = cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _existing_file(path: StrPath) -> Path:
    """Returns ``path`` as a Path; raises `SourceError` if it does not exist or is not a file."""
    file_path = Path(path)
    if not file_path.exists():
        raise SourceError(f"video file {str(file_path)!r} does not exist")
    if not file_path.is_file():
        raise SourceError(f"video path {str(file_path)!r} is not a file")
    return file_path


def _open_capture(file_path: Path) -> cv2.VideoCapture:
    """Opens ``file_path`` with OpenCV; raises `SourceError` if it cannot be opened or is text, not video."""
    capture = cv2.VideoCapture(str(file_path))
    if not capture.isOpened():
        capture.release()
        raise _not_readable(file_path)
    if renders_text(capture):
        capture.release()
        raise SourceError(f"file {str(file_path)!r} is text, not a video (FFmpeg would only draw its characters)")
    return capture


def _check_readable(file_path: Path) -> None:
    """Opens ``file_path`` and decodes one frame; raises `SourceError` if that fails."""
    capture = _open_capture(file_path)
    try:
        ok, first = capture.read()
        if not ok or first is None:
            raise _not_readable(file_path)
    finally:
        capture.release()


def _not_readable(file_path: Path) -> SourceError:
    return SourceError(f"file {str(file_path)!r} is not a readable video (OpenCV could not decode any frame)")


def _positive_or_none(value: float) -> float | None:
    """Returns ``value`` as a float if it is finite and positive, else None."""
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None


def _check_fps(fps: float | None) -> float | None:
    if fps is None:
        return None
    if not _is_positive_finite(fps):
        raise ConfigError(f"fps must be a finite number greater than 0 or None, got {fps!r}")
    return float(fps)


def _check_window(start_s: float, end_s: float | None) -> tuple[float, float | None]:
    if isinstance(start_s, bool) or not isinstance(start_s, Real) or not math.isfinite(start_s) or start_s < 0:
        raise ConfigError(f"start_s must be a finite number >= 0, got {start_s!r}")
    if end_s is None:
        return float(start_s), None
    if isinstance(end_s, bool) or not isinstance(end_s, Real) or math.isnan(end_s):
        raise ConfigError(f"end_s must be a number or None, got {end_s!r}")
    if end_s < start_s:
        raise ConfigError(f"end_s ({end_s!r}) must not be before start_s ({start_s!r})")
    return float(start_s), float(end_s)


def _check_clip_args(seconds: float, fps: float, size: tuple[int, int]) -> tuple[int, int]:
    if not _is_positive_finite(seconds):
        raise ConfigError(f"seconds must be a finite number greater than 0, got {seconds!r}")
    if not _is_positive_finite(fps):
        raise ConfigError(f"fps must be a finite number greater than 0, got {fps!r}")
    valid_size = (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, Integral) and not isinstance(v, bool) and v >= 2 and v % 2 == 0 for v in size)
    )
    if not valid_size:
        # The MPEG-4 encoder silently crops odd dimensions, so they are refused.
        raise ConfigError(f"size must be (width, height) with even integers >= 2, got {size!r}")
    return int(size[0]), int(size[1])


def _is_positive_finite(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
