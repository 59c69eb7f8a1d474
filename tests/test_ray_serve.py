"""`streamvlm serve --ray` on a real local Ray cluster: two nodes on 127.0.0.1, one replica on each.

A session streams frames and asks; the replica holding it is killed; the client resumes with its
handle, lands on the other replica, and an answer about a frame from before the kill rests on that
frame. Ray's processes stop at the end (Serve, the driver, the cluster).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need ray[serve] (pip install 'streamvlm[ray]')")
serve = pytest.importorskip("ray.serve", reason="the Ray tests need ray[serve] (pip install 'streamvlm[ray]')")

from websockets.asyncio.client import connect  # noqa: E402

from streamvlm.config import ModelConfig, ServerConfig  # noqa: E402
from streamvlm.deploy.local import LocalCluster  # noqa: E402
from streamvlm.deploy.serve import APP_NAME, DeployConfig, build_app  # noqa: E402
from streamvlm.engine.check import synthetic_frames  # noqa: E402
from streamvlm.protocol import encode_frame  # noqa: E402
from streamvlm.server.asgi import REPLICA_HEADER  # noqa: E402

RESULTS: dict[str, float] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster():
    """Two Ray nodes on 127.0.0.1 with 2 CPUs each; Serve, the driver and every Ray process stop after."""
    with LocalCluster(cpus=(2, 2), logging_level="WARNING") as nodes:
        try:
            yield nodes
        finally:
            serve.shutdown()


async def until(ws, kind: str, timeout: float = 60.0, seen: dict | None = None) -> dict:
    async def wait():
        while True:
            event = json.loads(await ws.recv())
            if seen is not None and event["type"] == "session.resumption_update" and event["new_handle"]:
                seen["handle"] = event["new_handle"]
            if event["type"] == kind:
                return event
    return await asyncio.wait_for(wait(), timeout)


async def ask(ws, text: str, event_id: str) -> None:
    await ws.send(json.dumps({"type": "conversation.item.create", "event_id": event_id + "-item",
                              "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    await ws.send(json.dumps({"type": "response.create", "event_id": event_id}))


def snapshot_after(root: Path, session_id: str, since: float) -> bool:
    """True once the shared directory holds a snapshot of the session, with its memory, saved after ``since``."""
    try:
        state = json.loads((root / "sessions" / session_id / "session.json").read_text())
    except (OSError, ValueError):
        return False
    return state["memory"] and state["saved_at"] > since


def test_a_session_resumes_on_the_other_replica_after_its_replica_is_killed(cluster, tmp_path, streamvlm_home):
    port = free_port()
    shared = tmp_path / "snapshots"
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    config = DeployConfig(model=ModelConfig("tiny-smolvlm"), server=ServerConfig(host="127.0.0.1", port=port, stats_every_s=0.3),
                          replicas=2, cpus_per_replica=1, snapshot_dir=str(shared), snapshot_every_s=0.5,
                          env={"STREAMVLM_HOME": streamvlm_home, "RAY_USAGE_STATS_ENABLED": "0"})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    url = f"ws://127.0.0.1:{port}/v1/realtime"

    # Each replica serves its own metrics and files where, for Prometheus' file-based discovery.
    targets = {}
    for filed in sorted((shared / "replicas").glob("*.json")):
        (entry,) = json.loads(filed.read_text())
        (target,) = entry["targets"]
        assert target.startswith("127.0.0.1:")  # nothing of the cluster listens beyond this machine
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as reply:
            targets[entry["labels"]["replica"]] = reply.read().decode()
    assert len(targets) == 2
    for replica, page in targets.items():
        assert f'streamvlm_replica_info{{replica="{replica}"}}' in page and "streamvlm_sessions_opened_total" in page

    async def main():
        seen: dict = {}
        async with connect(url) as ws:
            first_replica = ws.response.headers[REPLICA_HEADER]
            created = await until(ws, "session.created", seen=seen)
            await ws.send(encode_frame(synthetic_frames(4)[3], 3.0, "cam"))
            await ask(ws, "What do you see?", "before")
            before = await until(ws, "response.done", seen=seen)
            await until(ws, "session.resumption_update", seen=seen)  # the handle rotates after an answer
            answered_at = time.time()
            while not snapshot_after(shared, created["session"]["id"], answered_at):
                await asyncio.sleep(0.1)
            actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#RealtimeReplica#{first_replica}", namespace="serve")
            ray.kill(actor, no_restart=True)
            try:  # the connection dies with its replica
                while True:
                    await asyncio.wait_for(ws.recv(), 30)
            except Exception:
                pass
        reconnect = time.perf_counter()
        while True:  # until the proxy stops routing to the dead replica
            try:
                async with connect(url + f"?resume={seen['handle']}") as ws:
                    second_replica = ws.response.headers[REPLICA_HEADER]
                    again = await until(ws, "session.created")
                    RESULTS["reconnect_to_created_s"] = time.perf_counter() - reconnect
                    await ask(ws, "What did you see before?", "after")
                    after = await until(ws, "response.done")
                    break
            except (OSError, asyncio.TimeoutError) as exc:
                if time.perf_counter() - reconnect > 60:
                    raise AssertionError("no replica took the session up") from exc
                await asyncio.sleep(0.2)
        return created, before, first_replica, second_replica, again, after

    created, before, first, second, again, after = asyncio.run(asyncio.wait_for(main(), 150))
    print(f"reconnect to session.created on the other replica: {RESULTS['reconnect_to_created_s']:.3f} s")
    assert [e["pts_s"] for e in before["response"]["evidence"]] == [3.0]
    assert second != first
    assert again["session"]["id"] == created["session"]["id"]
    assert 3.0 in [e["pts_s"] for e in after["response"]["evidence"]]  # memory from before the kill
    assert after["response"]["status"] in ("completed", "incomplete")
