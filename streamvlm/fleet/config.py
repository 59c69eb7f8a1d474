"""The fleet's TOML file: the cameras file of ``streamvlm watch --config`` plus a ``[fleet]`` table.

The same cameras file runs in one process (``streamvlm watch --config cameras.toml``) or as a fleet
(``streamvlm fleet cameras.toml``); the fleet adds where snapshots go and how cameras are placed::

    model = "shapeworld"               # shared by every camera (as for watch; default tiny-smolvlm); device, dtype,
    fps = 1                            # event_db, webhook, duration, and per-camera defaults
    event_db = "/shared/streamvlm/events.db"   # written by one recorder actor on the head node

    [fleet]
    name = "site-a"                    # Ray namespace; `streamvlm fleet FILE --status` finds the fleet by it
    snapshot_dir = "/shared/streamvlm/snapshots"   # storage every node can read and write (required)
    snapshot_every_s = 10              # stream seconds between two snapshots of a camera
    # address = "auto"                 # an existing Ray cluster (default: start a local one)

    [groups.gpu]                       # a camera group: what each of its camera actors asks Ray for
    num_gpus = 0.25                    # four cameras of this group share one GPU
    num_cpus = 1
    # resources = { rack-a = 1 }       # custom Ray resources a node must offer
    # model = "Qwen/Qwen2.5-VL-3B-Instruct"   # the group's own model

    [[camera]]                         # every key of a watch camera (name, source, alerts, questions,
    name = "door"                      # fps, cooldown, budget, policy), plus:
    source = "rtsp://cam-door/stream"
    alerts = ["a person falls"]
    group = "gpu"                      # default: the group "default" (1 CPU, no GPU)
    # realtime = true                  # a file only: play it at its own speed, like a camera

:func:`load_fleet_config` reads and checks it; every mistake is a :class:`~streamvlm.errors.ConfigError`
naming the file and key, raised before Ray or a model starts. The camera keys are checked by
:mod:`streamvlm.cameras` (the watch's own rules); relative paths are relative to the file.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import cameras as watch_cameras
from ..config import MemoryConfig
from ..errors import ConfigError

__all__ = ["FleetConfig", "GroupConfig", "CameraConfig", "load_fleet_config", "parse_fleet_config"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FLEET_KEYS = {"name", "snapshot_dir", "snapshot_every_s", "address"}
_GROUP_KEYS = {"num_cpus", "num_gpus", "resources", "model"}


@dataclass(frozen=True)
class GroupConfig:
    """Resources each camera actor of the group asks Ray for (the actor lands on a node that has them)."""

    name: str
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Custom Ray resources (name -> amount) a node must offer, e.g. {"rack-a": 1}.
    resources: dict[str, float] = field(default_factory=dict)
    # The group's model (None: the file's).
    model: str | None = None


@dataclass(frozen=True)
class CameraConfig:
    """One camera of the fleet: the watch's camera (source, alerts, questions, rate, memory) and its placement."""

    watch: watch_cameras.CameraConfig
    group: str = "default"
    # A file source only: pace it at its own speed and, after a restart, resume at the live point.
    realtime: bool = False

    @property
    def id(self) -> str:
        return self.watch.name

    @property
    def source(self) -> str:
        return self.watch.source

    @property
    def alerts(self) -> tuple[str, ...]:
        return self.watch.alerts

    @property
    def questions(self) -> tuple[tuple[float, str], ...]:
        return self.watch.questions

    @property
    def fps(self) -> float | None:
        return self.watch.fps

    @property
    def is_file(self) -> bool:
        """True when the source is a video file (read to its end) rather than a URL or a webcam index."""
        return not self.source.isdigit() and "://" not in self.source

    def memory(self) -> MemoryConfig:
        return self.watch.memory()

    def trigger(self) -> Any:
        return self.watch.trigger()


@dataclass(frozen=True)
class FleetConfig:
    name: str
    model: str
    snapshot_dir: Path
    event_db: Path
    cameras: tuple[CameraConfig, ...]
    groups: dict[str, GroupConfig]
    # Stream seconds between two snapshots of a camera (one is also taken when its source ends).
    snapshot_every_s: float = 10.0
    # Ray address of an existing cluster ("auto", "ray://head:10001", ...); None starts a local cluster.
    address: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    webhook: str | None = None
    duration_s: float | None = None

    def group_of(self, camera: CameraConfig) -> GroupConfig:
        return self.groups[camera.group]


def load_fleet_config(path: str | Path) -> FleetConfig:
    """Read and check a fleet TOML file; raises ConfigError naming the file and the key at fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return parse_fleet_config(text, origin=str(path), base=path.parent)


def parse_fleet_config(text: str, *, origin: str = "fleet.toml", base: Path | None = None) -> FleetConfig:
    """Check the TOML ``text`` (see the module docstring); ``base`` resolves relative paths."""
    base = base or Path(".")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from None

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{origin}: {key}: {message}")

    fleet = _table(data.pop("fleet", None), "[fleet]", fail)
    groups_raw = _table(data.pop("groups", {}), "[groups]", fail)
    placement: list[tuple[str, bool]] = []
    for i, table in enumerate(data.get("camera") or []):
        if isinstance(table, dict):
            placement.append((table.pop("group", "default"), table.pop("realtime", False)))
    if "log" in data:
        raise fail("log", "a fleet logs to its event_db only (a JSON-lines file is not shared across nodes)")
    plan = watch_cameras.parse_plan(_to_toml(data), origin=origin, base=base)

    unknown = sorted(set(fleet) - _FLEET_KEYS)
    if unknown:
        raise fail(f"fleet.{unknown[0]}", f"unknown key; [fleet] takes: {', '.join(sorted(_FLEET_KEYS))}")
    name = _text(fleet.get("name", "streamvlm-fleet"), "fleet.name", fail)
    if not _ID.match(name):
        raise fail("fleet.name", f"letters, digits, '-', '_' and '.' only, got {name!r}")
    if "snapshot_dir" not in fleet:
        raise fail("fleet.snapshot_dir", "required: a directory on storage every node shares")
    snapshot_dir = _path(_text(fleet["snapshot_dir"], "fleet.snapshot_dir", fail), base)
    every = fleet.get("snapshot_every_s", 10.0)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not 0 < every <= 86400:
        raise fail("fleet.snapshot_every_s", f"must be a number of seconds in (0, 86400], got {every!r}")
    address = fleet.get("address")
    if address is not None:
        address = _text(address, "fleet.address", fail)

    groups = {"default": GroupConfig("default")}
    for gname, raw in groups_raw.items():
        groups[gname] = _group(gname, _table(raw, f"[groups.{gname}]", fail), fail)
    cameras = []
    for watch, (group, realtime) in zip(plan.cameras, placement):
        where = f"camera {watch.name!r}"
        if not isinstance(group, str) or group not in groups:
            raise fail(f"{where}: group", f"no group {group!r}; defined: {', '.join(sorted(groups))}")
        if not isinstance(realtime, bool):
            raise fail(f"{where}: realtime", f"must be true or false, got {realtime!r}")
        camera = CameraConfig(watch, group, realtime)
        if realtime and not camera.is_file:
            raise fail(f"{where}: realtime", "applies to a file source only (a camera is live anyway)")
        cameras.append(camera)
    event_db = plan.event_db or snapshot_dir / "events.db"
    return FleetConfig(name, plan.model or "tiny-smolvlm", snapshot_dir, event_db, tuple(cameras), groups, float(every), address,
                       plan.device or "auto", plan.dtype or "auto", plan.webhook, plan.duration_s)


def _group(name: str, raw: dict[str, Any], fail) -> GroupConfig:
    where = f"groups.{name}"
    unknown = sorted(set(raw) - _GROUP_KEYS)
    if unknown:
        raise fail(f"{where}.{unknown[0]}", f"unknown key; a group takes: {', '.join(sorted(_GROUP_KEYS))}")
    cpus = _number(raw.get("num_cpus", 1.0), f"{where}.num_cpus", fail)
    gpus = _number(raw.get("num_gpus", 0.0), f"{where}.num_gpus", fail)
    if cpus < 0 or gpus < 0 or cpus + gpus <= 0:
        raise fail(f"{where}.num_cpus", "num_cpus and num_gpus must be >= 0 and not both 0")
    resources = _table(raw.get("resources", {}), f"{where}.resources", fail)
    for key, amount in resources.items():
        if _number(amount, f"{where}.resources.{key}", fail) <= 0:
            raise fail(f"{where}.resources.{key}", f"must be > 0, got {amount!r}")
    model = raw.get("model")
    return GroupConfig(name, float(cpus), float(gpus), {k: float(v) for k, v in resources.items()},
                       None if model is None else _text(model, f"{where}.model", fail))


def _to_toml(data: dict[str, Any]) -> str:
    """The watch part of the file as TOML again (strings, numbers, booleans, lists and [[camera]] tables only)."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in data.items() if k != "camera"]
    for table in data.get("camera") or []:
        lines.append("[[camera]]")
        if isinstance(table, dict):
            lines += [f"{_key(k)} = {_value(v)}" for k, v in table.items()]
    if "camera" in data and not isinstance(data["camera"], list):
        lines.append(f"camera = {_value(data['camera'])}")  # let the watch's parser say what is wrong
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))  # dates and times: the watch's parser refuses them by type


def _path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _table(value: object, where: str, fail) -> dict[str, Any]:
    if value is None:
        raise fail(where, "required: a [fleet] table with at least snapshot_dir")
    if not isinstance(value, dict):
        raise fail(where, f"must be a table, got {type(value).__name__}")
    return value


def _text(value: object, where: str, fail) -> str:
    if not isinstance(value, str) or not value.strip():
        raise fail(where, f"must be a non-empty string, got {value!r}")
    return value.strip()


def _number(value: object, where: str, fail) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise fail(where, f"must be a number, got {value!r}")
    return float(value)
