"""A camera fleet on Ray: each camera a restartable actor that snapshots its session to shared storage.

``streamvlm fleet cameras.toml`` runs it (see docs/fleet.md); the pieces:

* :mod:`~streamvlm.fleet.config`: the TOML file (cameras, groups and their resources, storage);
* :mod:`~streamvlm.fleet.camera`: :class:`CameraJob`, one camera's watch as a plain object, saved and
  restored whole; :class:`SnapshotStore`, its snapshot generations; alert and answer keys;
* :mod:`~streamvlm.fleet.loop`: :class:`CameraLoop`, what a camera actor runs (resume, read, snapshot);
* :mod:`~streamvlm.fleet.actors`: the Ray actors and :class:`Fleet`, the driver's handle;
* :mod:`~streamvlm.fleet.run`: the command (run until the sources end, print alerts; ``--status``).

Ray is imported only by :mod:`~streamvlm.fleet.actors` and :mod:`~streamvlm.fleet.run`.
"""

from __future__ import annotations

from .camera import CameraJob, FleetEvent, SnapshotStore, alert_key, answer_key
from .config import CameraConfig, FleetConfig, GroupConfig, load_fleet_config, parse_fleet_config
from .loop import CameraLoop

__all__ = ["CameraJob", "FleetEvent", "SnapshotStore", "alert_key", "answer_key", "CameraConfig", "FleetConfig",
           "GroupConfig", "load_fleet_config", "parse_fleet_config", "CameraLoop"]
