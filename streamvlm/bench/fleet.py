"""``streamvlm bench fleet``: camera actors on a local Ray cluster of one and of two nodes, and their recovery.

Three measurements, each on a fresh ``ray.cluster_utils.Cluster`` on this machine (dashboard and usage
stats off; every Ray process stopped afterwards), all cameras reading the same ShapeWorld clip as fast
as they can (except the paced camera of 3):

1. **Throughput**: ``cameras`` camera actors on one node, then the same number spread over two nodes;
   frames read per second (all cameras together, first frame to last) and the ratio of the two. The
   nodes of a local cluster share this machine's cores, so the ratio says what Ray's placement costs
   or gains here, not what a second machine adds.
2. **Recovery after a kill** (file read as fast as possible): an uninterrupted camera and a victim
   whose actor is killed after its first alert. Seconds from the kill to the victim's next frame,
   frames read again (those after its last snapshot), and the alerts of the event log compared with
   the uninterrupted camera's: lost and doubled must both be 0.
3. **Recovery of a live camera** (the clip paced at its own speed): the frames whose moment passed
   while the actor was down are not read; their count is ``frames_missed``.

The recovery runs use ``alert_model`` (default: the shipped ShapeWorld model, whose alerts are real);
the throughput run uses ``model`` (default: the tiny-smolvlm preset).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ..deploy.local import LocalCluster

__all__ = ["run_fleet_bench"]



def _config(root: Path, clip: Path, model: str, names: list[str], *, fps: float, every_s: float, realtime: bool = False,
            condition: str = "a red square appears"):
    from ..fleet.config import parse_fleet_config

    text = (f'model = "{model}"\nfps = {fps}\nevent_db = "{root / "events.db"}"\n'
            f'[fleet]\nname = "bench"\nsnapshot_dir = "{root / "snapshots"}"\nsnapshot_every_s = {every_s}\n')
    for name in names:
        text += f'\n[[camera]]\nname = "{name}"\nsource = "{clip}"\nalerts = ["{condition}"]\nrealtime = {str(realtime).lower()}\n'
    return parse_fleet_config(text, origin="bench")


def _throughput(root: Path, clip: Path, model: str, cameras: int, nodes: int, fps: float) -> dict[str, Any]:
    import ray

    from ..fleet.actors import Fleet

    with LocalCluster(cpus=(max(1, -(-cameras // nodes)),) * nodes):
        names = [f"cam{i}" for i in range(cameras)]
        node_ids = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        config = _config(root / f"tp-{nodes}", clip, model, names, fps=fps, every_s=86400)
        fleet = Fleet(config, prefer_nodes={n: node_ids[i % len(node_ids)] for i, n in enumerate(names)}).start()
        statuses = fleet.wait(timeout_s=900)
        fleet.stop()
    frames = sum(s["frames_this_start"] for s in statuses.values())
    span = max(s["last_frame_wall"] for s in statuses.values()) - min(s["first_frame_wall"] for s in statuses.values())
    return {"nodes": nodes, "cameras": cameras, "frames": frames, "seconds": round(span, 3),
            "frames_per_s": round(frames / span, 3) if span > 0 else None,
            "per_camera_frames_per_s": {c: round(s["frames_this_start"] / max(1e-9, s["last_frame_wall"] - s["first_frame_wall"]), 3)
                                        for c, s in statuses.items()},
            "nodes_used": len({s["node_id"] for s in statuses.values()})}


def _recovery(root: Path, clip: Path, condition: str, model: str, fps: float, every_s: float, realtime: bool) -> dict[str, Any]:

    from ..fleet.actors import Fleet
    from ..server.eventlog import EventLog

    with LocalCluster(cpus=(2, 2)) as cluster:
        second = cluster.nodes[1].node_id
        config = _config(root / ("live" if realtime else "fast"), clip, model, ["steady", "victim"], fps=fps, every_s=every_s,
                         realtime=realtime, condition=condition)
        fleet = Fleet(config, prefer_nodes={"victim": second}).start()
        deadline = time.monotonic() + 600
        while True:
            before = fleet.statuses()["victim"]
            if before.get("last_alert") and before.get("frames_read", 0) >= before["last_alert"]["t"] * fps + 3:
                break
            if before.get("state") in ("ended", "failed") or time.monotonic() > deadline:
                raise RuntimeError(f"the victim never alerted before its end: {before}")
            time.sleep(0.02)
        killed_at = time.time()
        fleet.kill("victim")
        while True:
            after = fleet.statuses()["victim"]
            if after.get("restarts") == 1 and after.get("first_frame_wall"):
                break
            time.sleep(0.02)
        statuses = fleet.wait(timeout_s=900)
        fleet.stop()
    log = EventLog(config.event_db)
    try:
        def alerts(camera: str) -> list[tuple[str, float]]:
            return [(e["payload"]["watch_id"], e["stream_t"]) for e in log.list(session=camera, kinds=("alert",))]

        reference, victim = alerts("steady"), alerts("victim")
    finally:
        log.close()
    end = statuses["victim"]
    missed_window = (before["last_pts"], end["resumed_after"])
    return {
        "realtime": realtime,
        "snapshot_every_s": every_s,
        "killed_at_stream_s": before["last_pts"],
        "resumed_from_snapshot_at_s": end["resumed_after"],
        "kill_to_next_frame_s": round(after["first_frame_wall"] - killed_at, 3),
        # Frames read after the last snapshot and before the kill (at least: the victim may have read one or
        # two more between the last look and the kill). A file read fast reads them again; a live camera
        # cannot, so they are gone from memory (their alerts were logged already).
        "frames_after_snapshot": max(0, before["frames_read"] - end["frames_in_snapshot"]),
        # Frames whose moment came while the actor was down (live only): never read by anyone.
        "frames_not_read_during_recovery": max(0, end["missed"] - max(0, before["frames_read"] - end["frames_in_snapshot"])) if realtime else 0,
        "alerts_reference": reference,
        "alerts_logged": victim,
        # An alert of the reference missing from the victim's log; for a live camera, one whose frame
        # passed while the actor was down is not counted (the camera never showed it to anyone).
        "alerts_lost": sum(1 for a in reference if a not in victim and not (realtime and missed_window[0] < a[1])),
        "alerts_doubled": len(victim) - len(set(victim)),
        # Alerts raised between the snapshot and the kill: raised again after the restart (file read fast; the
        # log kept one of each) or, live, not re-raised and already logged.
        "alerts_between_snapshot_and_kill": sum(1 for _, t in victim if end["resumed_after"] < t <= before["last_pts"]),
    }


def _condition(episode) -> str:
    """The alert condition of an episode: the appearance the ShapeWorld demo watches for."""
    from ..shapeworld.questions import watch_target

    colour, shape = watch_target(episode)
    return f"a {colour} {shape} appears"


def run_fleet_bench(*, model: str = "tiny-smolvlm", alert_model: str = "shapeworld", cameras: int = 2, seconds: float = 120.0,
                    snapshot_every_s: float = 20.0, live: bool = True, live_seconds: float = 20.0) -> dict[str, Any]:
    """Run the three measurements (see the module docstring) and return them as one JSON-ready dict.

    Clips are ShapeWorld episode 7 at 1 frame/s (the rate the ShapeWorld model was trained on): ``seconds``
    long for the throughput and the kill, ``live_seconds`` for the camera paced in real time.
    """
    from ..demo import write_episode_clip

    started = time.time()
    fps = 1.0
    with tempfile.TemporaryDirectory(prefix="streamvlm-bench-fleet-") as tmp:
        root = Path(tmp)
        clip, live_clip = root / "clip.mkv", root / "live.mkv"
        condition = _condition(write_episode_clip(clip, seed=7, duration_s=seconds, fps=fps))
        one = _throughput(root, clip, model, cameras, 1, fps)
        two = _throughput(root, clip, model, cameras, 2, fps)
        result: dict[str, Any] = {
            "bench": "fleet", "model": model, "alert_model": alert_model, "clip_s": seconds, "clip_fps": fps,
            "cpu_count": os.cpu_count(),
            "throughput": {"one_node": one, "two_nodes": two,
                           "scaling": round(two["frames_per_s"] / one["frames_per_s"], 3) if one["frames_per_s"] else None},
            "condition": condition,
            "recovery": _recovery(root, clip, condition, alert_model, fps, snapshot_every_s, realtime=False),
        }
        if live:
            live_condition = _condition(write_episode_clip(live_clip, seed=7, duration_s=live_seconds, fps=fps))
            result["recovery_live"] = {"condition": live_condition,
                                       **_recovery(root, live_clip, live_condition, alert_model, fps, snapshot_every_s, realtime=True)}
    result["alerts_lost"] = sum(result[k]["alerts_lost"] for k in ("recovery", "recovery_live") if k in result)
    result["alerts_doubled"] = sum(result[k]["alerts_doubled"] for k in ("recovery", "recovery_live") if k in result)
    result["passed"] = result["alerts_lost"] == 0 and result["alerts_doubled"] == 0
    result["wall_s"] = round(time.time() - started, 1)
    return result
