"""The fleet's TOML file: which cameras, what to watch on each, where snapshots and events go.

::

    [fleet]
    name = "site-a"                    # Ray namespace; `streamvlm fleet status` finds the fleet by it
    model = "shapeworld"               # default model of every group
    snapshot_dir = "/shared/streamvlm/snapshots"   # shared storage every node can read and write
    snapshot_every_s = 10              # stream seconds between two snapshots of a camera
    event_db = "/shared/streamvlm/events.db"       # written by one recorder actor on the head node
    memory_budget = 4096               # working-memory tokens per camera
    # address = "auto"                 # an existing Ray cluster (default: start a local one)

    [groups.gpu]                       # a camera group: placement resources per camera of the group
    num_gpus = 0.25                    # four cameras of this group share one GPU
    num_cpus = 1
    # model = "Qwen/Qwen2.5-VL-3B-Instruct"   # the group's own model
    # resources = { "rack-a" = 1 }     # custom Ray resources a node must offer

    [[cameras]]
    id = "door"
    source = "rtsp://cam-door/stream"  # RTSP/HTTP URL, webcam index, or a video file
    alerts = ["a person falls", "the door is open"]
    group = "gpu"                      # default: the built-in group "default" (1 CPU, no GPU)
    fps = 1                            # frames read per second of stream time (default: every frame)
    realtime = false                   # a file only: play it at its own speed, as a camera would

:func:`load_fleet_config` reads and checks the file; every mistake is a :class:`~streamvlm.errors.ConfigError`
naming the table and key, raised before Ray or a model is started. Relative paths are taken relative
to the TOML file's directory.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["FleetConfig", "GroupConfig", "CameraConfig", "load_fleet_config", "parse_fleet_config"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class GroupConfig:
    """Resources each camera actor of the group asks Ray for (the actor lands on a node that has them)."""

    name: str
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Custom Ray resources (name -> amount) a node must offer, e.g. {"rack-a": 1}.
    resources: dict[str, float] = field(default_factory=dict)
    # The group's model (None: the fleet's).
    model: str | None = None


@dataclass(frozen=True)
class CameraConfig:
    """One camera: its source and the conditions it alerts on."""

    id: str
    source: str
    alerts: tuple[str, ...]
    group: str = "default"
    # Frames read per second of stream time (None: every frame the source gives).
    fps: float | None = None
    # A file source only: pace it at its own speed and, after a restart, resume at the live point.
    realtime: bool = False

    @property
    def is_file(self) -> bool:
        """True when the source is a video file (read to its end) rather than a URL or a webcam index."""
        return not self.source.isdigit() and "://" not in self.source


@dataclass(frozen=True)
class FleetConfig:
    name: str
    model: str
    snapshot_dir: Path
    event_db: Path
    cameras: tuple[CameraConfig, ...]
    groups: dict[str, GroupConfig]
    # Stream seconds between two snapshots of a camera (a snapshot is also taken when its source ends).
    snapshot_every_s: float = 10.0
    memory_budget: int | None = 4096
    # Ray address of an existing cluster ("auto", "ray://head:10001", ...); None starts a local cluster.
    address: str | None = None

    def group_of(self, camera: CameraConfig) -> GroupConfig:
        return self.groups[camera.group]


def load_fleet_config(path: str | Path) -> FleetConfig:
    """Read and check a fleet TOML file; raises ConfigError naming the file and the key at fault."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such fleet file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_fleet_config(data, base=path.parent, where=str(path))


def parse_fleet_config(data: dict[str, Any], *, base: Path = Path("."), where: str = "fleet") -> FleetConfig:
    """Check an already-parsed TOML table (see the module docstring for the keys)."""

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {message}")

    _only(data, {"fleet", "groups", "cameras"}, where, fail)
    fleet = _table(data.get("fleet", {}), "[fleet]", fail)
    _only(fleet, {"name", "model", "snapshot_dir", "snapshot_every_s", "event_db", "memory_budget", "address"}, "[fleet]", fail)
    name = _text(fleet.get("name", "streamvlm-fleet"), "fleet.name", fail)
    if not _ID.match(name):
        raise fail("fleet.name", f"letters, digits, '-', '_' and '.' only, got {name!r}")
    model = _text(fleet.get("model", "shapeworld"), "fleet.model", fail)
    if "snapshot_dir" not in fleet:
        raise fail("fleet.snapshot_dir", "required: a directory on storage every node shares")
    snapshot_dir = base / _text(fleet["snapshot_dir"], "fleet.snapshot_dir", fail)
    event_db = base / _text(fleet.get("event_db", str(Path(fleet["snapshot_dir"]) / "events.db")), "fleet.event_db", fail)
    every = _number(fleet.get("snapshot_every_s", 10.0), "fleet.snapshot_every_s", fail)
    if not 0 < every <= 86400:
        raise fail("fleet.snapshot_every_s", f"must be in (0, 86400] seconds, got {every!r}")
    budget = fleet.get("memory_budget", 4096)
    if budget is not None and not (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 64):
        raise fail("fleet.memory_budget", f"must be an integer >= 64 tokens, got {budget!r}")
    address = fleet.get("address")
    if address is not None:
        address = _text(address, "fleet.address", fail)

    groups = {"default": GroupConfig("default")}
    for gname, raw in _table(data.get("groups", {}), "[groups]", fail).items():
        groups[gname] = _group(gname, _table(raw, f"[groups.{gname}]", fail), fail)

    cameras_raw = data.get("cameras")
    if not isinstance(cameras_raw, list) or not cameras_raw:
        raise fail("[[cameras]]", "at least one camera is required")
    cameras: list[CameraConfig] = []
    for i, raw in enumerate(cameras_raw):
        cameras.append(_camera(_table(raw, f"cameras[{i}]", fail), i, groups, base, fail))
    ids = [c.id for c in cameras]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise fail("cameras.id", f"camera ids must be unique; repeated: {', '.join(dupes)}")
    return FleetConfig(name, model, snapshot_dir, event_db, tuple(cameras), groups, float(every), budget, address)


def _group(name: str, raw: dict[str, Any], fail) -> GroupConfig:
    where = f"groups.{name}"
    _only(raw, {"num_cpus", "num_gpus", "resources", "model"}, f"[{where}]", fail)
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


def _camera(raw: dict[str, Any], i: int, groups: dict[str, GroupConfig], base: Path, fail) -> CameraConfig:
    where = f"cameras[{i}]"
    _only(raw, {"id", "source", "alerts", "group", "fps", "realtime"}, where, fail)
    cam_id = _text(raw.get("id"), f"{where}.id", fail)
    if not _ID.match(cam_id):
        raise fail(f"{where}.id", f"letters, digits, '-', '_' and '.' only (at most 64), got {cam_id!r}")
    source = _text(raw.get("source"), f"{where}.source", fail)
    if not source.isdigit() and "://" not in source:
        source = str(base / source)
    alerts = raw.get("alerts", [])
    if not isinstance(alerts, list) or not all(isinstance(a, str) and a.strip() for a in alerts):
        raise fail(f"{where}.alerts", "must be a list of non-empty conditions")
    group = _text(raw.get("group", "default"), f"{where}.group", fail)
    if group not in groups:
        raise fail(f"{where}.group", f"no group {group!r}; defined: {', '.join(sorted(groups))}")
    fps = raw.get("fps")
    if fps is not None and not (_number(fps, f"{where}.fps", fail) > 0):
        raise fail(f"{where}.fps", f"must be > 0, got {fps!r}")
    realtime = raw.get("realtime", False)
    if not isinstance(realtime, bool):
        raise fail(f"{where}.realtime", f"must be true or false, got {realtime!r}")
    camera = CameraConfig(cam_id, source, tuple(a.strip() for a in alerts), group, None if fps is None else float(fps), realtime)
    if realtime and not camera.is_file:
        raise fail(f"{where}.realtime", "applies to a file source only (a camera is live anyway)")
    return camera


def _only(table: dict[str, Any], keys: set[str], where: str, fail) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise fail(where, f"unknown key {unknown[0]!r}; known: {', '.join(sorted(keys))}")


def _table(value: object, where: str, fail) -> dict[str, Any]:
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
