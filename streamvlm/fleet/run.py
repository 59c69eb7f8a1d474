"""``streamvlm fleet cameras.toml``: run the fleet until its sources end; ``--status``: ask a running fleet.

:func:`run_fleet` joins the Ray cluster named in the TOML (``address``; none: it starts a local one),
starts the fleet (see :mod:`~streamvlm.fleet.actors`), prints each alert and each camera start,
restart and failure as it is logged, and returns when every camera's source has ended (files), when
``duration_s`` passed, or on Ctrl-C; the actors end with it. ``--status`` prints :func:`read_status`:
each camera's last report, which the recorder keeps in ``SNAPSHOT_DIR/status.json`` (so any machine
that mounts the storage can read it, no Ray connection needed); :func:`fleet_status` asks the actors
themselves from a program connected to the cluster.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO

from ..errors import StreamVLMError
from ..deploy.local import loopback_only
from .actors import RECORDER, Fleet, namespace_of, status_file, write_status_file
from .config import FleetConfig

__all__ = ["run_fleet", "fleet_status", "read_status", "format_status"]


def _init_ray(config: FleetConfig) -> None:
    """Join the file's cluster; without an address, start a new local cluster (never join someone else's)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = config.address or "local"
    kwargs: dict[str, Any] = dict(namespace=namespace_of(config), logging_level="WARNING", log_to_driver=False)
    if address == "local":  # a cluster of this machine alone: nothing listens beyond 127.0.0.1
        loopback_only()
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError) as exc:
        where = "a new local cluster" if address == "local" else address
        raise StreamVLMError(f"cannot reach the Ray cluster at {where}: {exc}") from exc


def run_fleet(config: FleetConfig, *, duration_s: float | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the fleet; returns 0 when every camera ended cleanly, 1 when one failed (its reason is printed)."""
    import ray

    _init_ray(config)
    fleet = Fleet(config)
    try:
        fleet.start()
        print(f"streamvlm: fleet {config.name}: {len(config.cameras)} camera(s), snapshots in {config.snapshot_dir}, "
              f"events in {config.event_db} (status: streamvlm fleet FILE --status)", file=err, flush=True)
        deadline = None if duration_s is None else time.monotonic() + duration_s
        seen = 0
        while True:
            for event in fleet.events(seen):
                seen = event["id"]
                _print_event(event, out, err)
            statuses = fleet.statuses()
            if all(s.get("state") in ("ended", "failed") for s in statuses.values()):
                for event in fleet.events(seen):
                    _print_event(event, out, err)
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.5)
        time.sleep(1.2)  # the recorder's last write of status.json, then the final word: the actors' own
        write_status_file(status_file(config), fleet.statuses())
        failed = {c: s for c, s in statuses.items() if s.get("state") == "failed"}
        for camera, status in failed.items():
            print(f"streamvlm: camera {camera} failed: {status.get('error')}", file=err, flush=True)
        return 1 if failed else 0
    except KeyboardInterrupt:
        return 130
    finally:
        fleet.stop()
        ray.shutdown()


def _print_event(event: dict[str, Any], out: TextIO, err: TextIO) -> None:
    camera, kind, payload, t = event["session"], event["kind"], event["payload"], event["stream_t"]
    if kind == "alert":
        minutes, seconds = divmod(float(payload.get("t", t or 0.0)), 60)
        print(f"[{camera} {int(minutes):02d}:{seconds:04.1f}] ALERT {payload.get('condition')}", file=out, flush=True)
    elif kind == "camera.started":
        if payload.get("resumed"):
            print(f"streamvlm: camera {camera} restarted on {payload.get('node')} (restart {payload.get('restarts')}), "
                  f"resumed from its snapshot at {payload.get('resumed_after')} s", file=err, flush=True)
        for problem in payload.get("problems") or []:
            print(f"streamvlm: camera {camera}: {problem}", file=err, flush=True)
    elif kind in ("camera.failed", "camera.offline", "camera.online", "camera.closed", "camera.error"):
        print(f"streamvlm: camera {camera} {kind.split('.', 1)[1]}: {payload.get('reason') or payload.get('message', '')}",
              file=err, flush=True)


def fleet_status(config: FleetConfig, timeout_s: float = 2.0) -> list[dict[str, Any]]:
    """The running fleet's cameras, one dict each (camera, node, state, frames_read, last_alert, restarts, ...).

    Call from a program connected to the fleet's Ray cluster: asks each camera's actor, and shows a camera
    that does not answer within ``timeout_s`` with its last report and state ``unreachable``. Raises
    StreamVLMError when no fleet of that name runs there. Without a connection use :func:`read_status`.
    """
    import ray

    namespace = namespace_of(config)
    try:
        recorder = ray.get_actor(RECORDER, namespace=namespace)
    except ValueError:
        raise StreamVLMError(f"no fleet {config.name!r} is running on this Ray cluster (start it: streamvlm fleet FILE)") from None
    last = ray.get(recorder.all_statuses.remote(), timeout=timeout_s * 5)
    rows = []
    for camera in config.cameras:
        try:
            actor = ray.get_actor(f"camera-{camera.id}", namespace=namespace)
            rows.append(ray.get(actor.status.remote(), timeout=timeout_s))
        except Exception as exc:
            rows.append({**last.get(camera.id, {"camera": camera.id}), "state": "unreachable", "error": type(exc).__name__})
    return rows


def read_status(config: FleetConfig) -> tuple[list[dict[str, Any]], float]:
    """What ``--status`` prints, from any machine that mounts the snapshot storage: the cameras' last reports
    (written by the recorder about once a second) and the age of that file in seconds.

    Raises StreamVLMError when the fleet never wrote one there.
    """
    path = status_file(config)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise StreamVLMError(f"no status of fleet {config.name!r} in {path} (start it: streamvlm fleet FILE)") from None
    cameras = data.get("cameras") or {}
    rows = [cameras.get(c.id, {"camera": c.id, "state": "not started"}) for c in config.cameras]
    return rows, max(0.0, time.time() - float(data.get("written_wall") or 0.0))


def format_status(rows: list[dict[str, Any]]) -> str:
    """The status rows as a table for a person."""
    header = f"{'camera':<16} {'node':<24} {'state':<11} {'frames':>7} {'at':>8} {'restarts':>8}  last alert"
    lines = [header]
    for r in rows:
        alert = r.get("last_alert")
        said = f"{alert['condition']} at {alert['t']:.1f}s" if alert else "-"
        at = f"{r['last_pts']:.1f}s" if isinstance(r.get("last_pts"), (int, float)) else "-"
        lines.append(f"{r.get('camera', '?'):<16} {str(r.get('node', '-')):<24} {r.get('state', '?'):<11} "
                     f"{r.get('frames_read', 0):>7} {at:>8} {r.get('restarts', 0):>8}  {said}")
    return "\n".join(lines)
