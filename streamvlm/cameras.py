"""The cameras of one ``streamvlm watch``: from command-line sources or a TOML file, checked before a model loads.

A :class:`CameraConfig` is one camera (name, source, alerts, questions, read rate, alert cooldown, memory);
a :class:`WatchPlan` is the whole run (the cameras plus the model, device, dtype and logs they share).
:func:`load_plan` reads a TOML file (see ``demos/cameras.toml``); :func:`cameras_from_sources` builds the
same cameras from ``streamvlm watch SRC [SRC ...]``. Both raise :class:`~streamvlm.errors.ConfigError`
naming the file, the camera and the key (unknown keys, a bad rate, a missing source, two cameras with
one name) and nothing else: no model is loaded and no source is opened here, so the caller checks the
sources next (:func:`streamvlm.watch.check_source`) and then loads the one model every camera shares.

The file::

    model = "shapeworld"          # top level: what the cameras share (all optional)
    fps = 1                       # and defaults for every camera: alerts, questions, fps (default 2; 0: every
                                  # frame), cooldown, budget, policy

    [[camera]]
    name = "door"                 # letters, digits, '-', '_' and '.'; unique
    source = "rtsp://cam1/stream" # a URL, a webcam index ("0") or a file (relative to the TOML file)
    alerts = ["the door is open"]
    questions = ["30s: how many people are in the room?"]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import POLICIES, MemoryConfig
from .errors import ConfigError, StreamVLMError

__all__ = ["CameraConfig", "WatchPlan", "load_plan", "parse_plan", "cameras_from_sources", "default_name", "DEFAULT_READ_FPS"]

#: Frames a camera reads per second of stream time unless told otherwise (``fps = 0``: every frame it delivers).
#: Chosen on validation episodes: the shipped model's alerts are as good at 1 and 2 frames a second (F1 0.967 and
#: 0.966) and worse when every frame of a 10 fps camera fills its short memory with near-copies (0.852); two a
#: second is also how ``streamvlm run`` reads, and the rate Qwen2.5-VL samples video at by default. A 20 fps
#: camera has a tenth of its frames read.
DEFAULT_READ_FPS = 2.0

# Keys a camera may have, and the top-level keys that are defaults for every camera.
CAMERA_KEYS = ("name", "source", "alerts", "questions", "fps", "cooldown", "budget", "policy")
DEFAULT_KEYS = ("alerts", "questions", "fps", "cooldown", "budget", "policy")
# Top-level keys that belong to the whole run.
RUN_KEYS = ("model", "device", "dtype", "event_db", "webhook", "log", "duration")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAX_FPS = 60.0


@dataclass(frozen=True)
class CameraConfig:
    """One camera of a watch. Checked at construction: a bad value raises ConfigError naming the camera and key."""

    name: str  # shown on every console line and stored in every logged event ("camera")
    source: str  # rtsp://, http(s)://, a webcam index such as "0", or a video file path
    alerts: tuple[str, ...] = ()  # conditions to alert on, e.g. "a person falls"
    questions: tuple[tuple[float, str], ...] = ()  # (stream seconds, question): asked once the camera reaches that time
    fps: float | None = DEFAULT_READ_FPS  # frames read per second of stream time; 0 or None: every frame delivered
    cooldown_s: float | None = None  # stream seconds between two alerts of one condition; None: the controller's default
    budget_tokens: int = 4096  # working-memory budget of this camera's session
    policy: str = "merge"  # memory policy (merge: a static camera costs little)

    def __post_init__(self) -> None:
        where = f"camera {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"camera name {self.name!r}: use 1-64 letters, digits, '-', '_' or '.' (starting with a letter or digit)")
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"{where}: source: a URL, webcam index or file is required")
        for i, alert in enumerate(self.alerts):
            if not isinstance(alert, str) or not alert.strip():
                raise ConfigError(f"{where}: alerts[{i}]: a condition must be non-empty text, got {alert!r}")
        if not self.alerts and not self.questions:
            raise ConfigError(f"{where}: give at least one alert (alerts = [\"a person falls\"]) or question")
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, (int, float))
                                     or not math.isfinite(self.fps) or not 0 <= self.fps <= _MAX_FPS):
            raise ConfigError(f"{where}: fps: frames read per second must be a number in (0, {_MAX_FPS:g}], "
                              f"or 0 for every frame, got {self.fps!r}")
        if self.cooldown_s is not None:
            from .dialogue import TriggerSpec

            if isinstance(self.cooldown_s, bool) or not isinstance(self.cooldown_s, (int, float)):
                raise ConfigError(f"{where}: cooldown: seconds must be a number, got {self.cooldown_s!r}")
            try:
                TriggerSpec(cooldown_s=float(self.cooldown_s))
            except StreamVLMError as exc:
                raise ConfigError(f"{where}: cooldown: {exc}") from None
        if isinstance(self.budget_tokens, bool) or not isinstance(self.budget_tokens, int) or self.budget_tokens < 16:
            raise ConfigError(f"{where}: budget: a working memory needs an integer of at least 16 tokens, got {self.budget_tokens!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"{where}: policy: must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        try:
            self.memory()
        except StreamVLMError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def memory(self) -> MemoryConfig:
        """The memory settings of this camera's session."""
        return MemoryConfig(budget_tokens=self.budget_tokens, policy=self.policy)

    def trigger(self) -> Any:
        """The alert rule of this camera's watches (a TriggerSpec), or None for the controller's default."""
        from .dialogue import TriggerSpec

        return TriggerSpec(cooldown_s=float(self.cooldown_s)) if self.cooldown_s else None


@dataclass(frozen=True)
class WatchPlan:
    """A whole watch: the cameras, and what they share. ``None`` fields mean "the command line's value or default"."""

    cameras: tuple[CameraConfig, ...]
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    event_db: Path | None = None  # one SQLite event log for every camera
    webhook: str | None = None
    log: Path | None = None  # one JSON-lines log for every camera
    duration_s: float | None = None  # stop every camera after this many seconds
    origin: str = "the command line"  # where the plan came from (error messages)


def default_name(source: str) -> str:
    """A camera name for a source given without one: the file's stem, the URL's host, or ``webcam0``."""
    if source.isdigit():
        return f"webcam{source}"
    if "://" in source:
        host = source.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1].split(":", 1)[0]
        base = host or "camera"
    else:
        base = Path(source).stem or "camera"
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", base).strip("-._") or "camera"
    return base[:64]


def cameras_from_sources(sources: Sequence[str], alerts: Sequence[str], *, questions: Sequence[tuple[float, str]] = (),
                         fps: float | None = DEFAULT_READ_FPS, cooldown_s: float | None = None, budget_tokens: int = 4096,
                         policy: str = "merge") -> tuple[CameraConfig, ...]:
    """One camera per source, each with the same alerts and settings, named by :func:`default_name`
    (``door``, ``door-2`` when two share a name). Raises ConfigError for a bad value."""
    if not sources:
        raise ConfigError("watch needs a camera: SOURCE arguments, --source, or --config cameras.toml")
    names: dict[str, int] = {}
    cameras = []
    for source in sources:
        base = default_name(source)
        names[base] = names.get(base, 0) + 1
        name = base if names[base] == 1 else f"{base}-{names[base]}"
        cameras.append(CameraConfig(name=name, source=source, alerts=tuple(alerts), questions=tuple(questions), fps=fps,
                                    cooldown_s=cooldown_s, budget_tokens=budget_tokens, policy=policy))
    return tuple(cameras)


def load_plan(path: str | Path) -> WatchPlan:
    """Read and check a cameras TOML file. Raises ConfigError (naming the file, camera and key) on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    return parse_plan(text, origin=str(path), base=path.parent)


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None


def parse_plan(text: str, *, origin: str = "cameras.toml", base: Path | None = None) -> WatchPlan:
    """Check the TOML ``text`` (see the module docstring) and return its plan; relative file sources and log
    paths are taken from ``base`` (the TOML file's folder). Raises ConfigError naming ``origin``, camera and key."""
    try:
        data = _toml_loads(text)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    known = set(RUN_KEYS) | set(DEFAULT_KEYS) | {"camera"}
    unknown = sorted(set(data) - known)
    if unknown:
        hint = " (cameras are [[camera]] tables)" if "cameras" in unknown else ""
        raise ConfigError(f"{origin}: unknown top-level key {unknown[0]!r}{hint}; known keys: {', '.join(sorted(known))}")
    tables = data.get("camera")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{origin}: no cameras: add at least one [[camera]] table with a name and a source")
    defaults = {k: data[k] for k in DEFAULT_KEYS if k in data}
    cameras: list[CameraConfig] = []
    seen: set[str] = set()
    for i, table in enumerate(tables):
        if not isinstance(table, Mapping):
            raise ConfigError(f"{origin}: camera #{i + 1}: expected a [[camera]] table")
        name = table.get("name")
        label = f"camera {name!r}" if isinstance(name, str) and name else f"camera #{i + 1}"
        try:
            camera = _camera(table, defaults, label, base)
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(f"{origin}: {message if message.startswith('camera') else f'{label}: {message}'}") from None
        if camera.name in seen:
            raise ConfigError(f"{origin}: camera #{i + 1}: name {camera.name!r} is used by another camera; names must be unique")
        seen.add(camera.name)
        cameras.append(camera)
    run = {k: data[k] for k in RUN_KEYS if k in data}
    for key in ("model", "device", "dtype", "webhook", "event_db", "log"):
        if key in run and (not isinstance(run[key], str) or not run[key]):
            raise ConfigError(f"{origin}: {key}: expected non-empty text, got {run[key]!r}")
    duration = run.get("duration")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0):
        raise ConfigError(f"{origin}: duration: seconds must be a number greater than 0, got {duration!r}")
    return WatchPlan(
        cameras=tuple(cameras), model=run.get("model"), device=run.get("device"), dtype=run.get("dtype"),
        event_db=_path(run.get("event_db"), base), webhook=run.get("webhook"), log=_path(run.get("log"), base),
        duration_s=float(duration) if duration is not None else None, origin=origin)


def _path(value: str | None, base: Path | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() or base is None else base / path


def _camera(table: Mapping[str, Any], defaults: Mapping[str, Any], label: str, base: Path | None) -> CameraConfig:
    unknown = sorted(set(table) - set(CAMERA_KEYS))
    if unknown:
        raise ConfigError(f"{label}: unknown key {unknown[0]!r}; a camera takes: {', '.join(CAMERA_KEYS)}")
    values = {**defaults, **table}
    if "name" not in values:
        raise ConfigError(f"{label}: name: every camera needs a name (shown on each line and in the event log)")
    if "source" not in values:
        raise ConfigError(f"{label}: source: missing (a URL, a webcam index such as \"0\", or a video file)")
    source = values["source"]
    if isinstance(source, int) and not isinstance(source, bool):
        source = str(source)
    if not isinstance(source, str):
        raise ConfigError(f"{label}: source: expected text (a URL, webcam index or file), got {source!r}")
    if source and not source.isdigit() and "://" not in source:
        source = str(_path(source, base))
    alerts = _strings(values.get("alerts", []), label, "alerts")
    questions = tuple(_question(q, label, i) for i, q in enumerate(_strings(values.get("questions", []), label, "questions")))
    fps, cooldown = values.get("fps", DEFAULT_READ_FPS), values.get("cooldown")
    return CameraConfig(name=values["name"], source=source, alerts=alerts, questions=questions,
                        fps=float(fps) if isinstance(fps, int) and not isinstance(fps, bool) else fps,
                        cooldown_s=cooldown, budget_tokens=values.get("budget", 4096), policy=values.get("policy", "merge"))


def _strings(value: Any, label: str, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ConfigError(f"{label}: {key}: expected a list of text, e.g. {key} = [{value!r}]")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{label}: {key}: expected a list of text, got {value!r}")
    return tuple(value)


def _question(spec: str, label: str, i: int) -> tuple[float, str]:
    from .cli import parse_timed_question

    try:
        return parse_timed_question(spec)
    except ConfigError:
        raise ConfigError(f"{label}: questions[{i}]: {spec!r}: expected 'TIME: question', e.g. '30s: how many people are there?'") from None
