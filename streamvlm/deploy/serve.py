"""The realtime API as a Ray Serve application: replicas that each hold one loaded model.

Each replica (:class:`RealtimeReplica`, an actor Ray Serve places and restarts) loads the model once and
serves :class:`~streamvlm.server.asgi.RealtimeApp` over a :class:`~streamvlm.server.driver.SessionHost`
through Serve's ASGI ingress; Serve's HTTP proxy routes each request and each WebSocket to a replica,
and a WebSocket stays on its replica for its lifetime. Every replica attaches a
:class:`~streamvlm.server.handoff.Handoff` on the same shared directory, so a session resumes
(``?resume=<handle>``) on whichever replica the proxy picks: parked sessions are snapshotted when
their client leaves, live ones every ``snapshot_every_s`` seconds, and a replica that stops (scaled
down, redeployed) snapshots its sessions and sends its clients off to resume elsewhere.

Per replica: Serve calls :meth:`RealtimeReplica.check_health` (a replica whose host loops died is
replaced); ``/metrics`` carries ``streamvlm_replica_info{replica=...}`` and every response names its
replica in the ``X-Streamvlm-Replica`` header.

Use it from Python (:func:`build_app` then ``serve.run``), from the command line (``streamvlm serve
--ray``, :func:`run`), or as a Serve config (``serve run streamvlm.deploy.serve:app_builder
model=shapeworld snapshot_dir=/shared/streamvlm replicas=2``). docs/deployment.md has the whole story.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from ..config import ModelConfig, ServerConfig
from ..errors import ConfigError
from ..server.handoff import HandoffConfig
from .local import loopback_only

__all__ = ["RealtimeReplica", "DeployConfig", "build_app", "app_builder", "run", "APP_NAME"]

APP_NAME = "streamvlm"


@dataclass(frozen=True)
class DeployConfig:
    """One Serve application: the model, how many replicas with what resources, and the shared snapshots."""

    model: ModelConfig = field(default_factory=ModelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    # Replicas, each holding one copy of the model.
    replicas: int = 2
    # GPUs each replica reserves (0: CPU; fractions share a GPU between replicas).
    gpus_per_replica: float = 0.0
    # CPUs each replica reserves.
    cpus_per_replica: float = 1.0
    # The directory every replica shares for session snapshots (required: it is what makes resume work anywhere).
    snapshot_dir: str = ""
    # Seconds between snapshots of a connected session (None: only parked ones and at stop).
    snapshot_every_s: float | None = 10.0
    # Environment for the replicas' processes (e.g. STREAMVLM_HOME where presets and checkpoints are cached).
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or self.replicas < 1:
            raise ConfigError(f"replicas: must be an integer >= 1, got {self.replicas!r}")
        for name in ("gpus_per_replica", "cpus_per_replica"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}: must be a number >= 0, got {value!r}")
        HandoffConfig(self.snapshot_dir or "", self.snapshot_every_s)  # checks both (ConfigError)


@serve.deployment
@serve.ingress()
class RealtimeReplica:
    """One replica: loads the model, builds the session host with its handoff, and serves the ASGI app."""

    def __init__(self, model: dict, server: dict, handoff: dict) -> None:
        from ..models import load_model
        from ..server.asgi import RealtimeApp
        from ..server.driver import SessionHost
        from ..server.handoff import Handoff

        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (a test constructing it directly)
            self.replica = f"pid{os.getpid()}"
        print(f"streamvlm: replica {self.replica}: loading {model['model']}", file=sys.stderr, flush=True)
        adapter = load_model(ModelConfig(**model))
        server_config = ServerConfig(**{**server, "allowed_origins": tuple(server["allowed_origins"]),
                                        "allowed_hosts": tuple(server["allowed_hosts"]),
                                        "ice_servers": tuple(server["ice_servers"])})
        self.sessions = SessionHost(adapter, server_config, handoff=Handoff(HandoffConfig(**handoff, replica=self.replica)))
        self.realtime = RealtimeApp(self.sessions, replica=self.replica)
        self.metrics_target = self._serve_own_metrics(Path(handoff["snapshot_dir"]))

    def _serve_own_metrics(self, shared: Path) -> Path:
        """Serve this replica's own Prometheus metrics on a port of its node (through the Serve proxy,
        ``/metrics`` answers from whichever replica it picks), and file the address for Prometheus'
        file-based discovery as ``SNAPSHOT_DIR/replicas/<replica>.json`` (removed when the replica stops)."""
        import ray
        from prometheus_client import start_http_server

        host = ray.util.get_node_ip_address()
        self._metrics_server, _ = start_http_server(0, addr=host, registry=self.sessions.metrics.registry)
        port = self._metrics_server.server_port
        target = shared / "replicas" / f"{self.replica}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_suffix(".tmp")
        staging.write_text(json.dumps([{"targets": [f"{host}:{port}"], "labels": {"replica": self.replica}}]))
        staging.replace(target)
        print(f"streamvlm: replica {self.replica}: metrics on http://{host}:{port}/metrics", file=sys.stderr, flush=True)
        return target

    def __serve_build_asgi_app__(self) -> Any:
        return self.realtime

    async def check_health(self) -> None:
        """Serve's per-replica health check: raises (and the replica is replaced) when a host loop died."""
        for task in self.sessions._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"replica {self.replica}: a session host loop failed: {task.exception()!r}")

    async def __del__(self) -> None:
        # Serve stops the replica (scale-down, redeploy, shutdown): sessions are saved for another replica.
        try:
            await asyncio.wait_for(self.sessions.close(), 30)
        except Exception as exc:  # the replica goes anyway; say what was lost
            print(f"streamvlm: replica {self.replica}: closing its sessions failed: {exc!r}", file=sys.stderr, flush=True)
        self.metrics_target.unlink(missing_ok=True)
        self._metrics_server.shutdown()


def build_app(config: DeployConfig) -> Any:
    """The Serve application for ``config`` (pass it to ``serve.run(app, name=APP_NAME, route_prefix="/")``)."""
    if not config.snapshot_dir:
        raise ConfigError("snapshot_dir: Ray replicas need a directory they all share for session snapshots")
    server = asdict(config.server)
    # One WebSocket is one request for its whole life: room for every live session plus HTTP probes.
    ongoing = config.server.max_sessions + 16
    actor: dict[str, Any] = {"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica}
    if config.env:
        actor["runtime_env"] = {"env_vars": dict(config.env)}
    deployment = RealtimeReplica.options(
        num_replicas=config.replicas, max_ongoing_requests=ongoing, ray_actor_options=actor,
        health_check_period_s=10, graceful_shutdown_timeout_s=30,
    )
    handoff = {"snapshot_dir": str(config.snapshot_dir), "snapshot_every_s": config.snapshot_every_s}
    return deployment.bind(asdict(config.model), server, handoff)


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run streamvlm.deploy.serve:app_builder key=value ...``: model, snapshot_dir (required),
    replicas, gpus_per_replica, cpus_per_replica, snapshot_every_s, device, dtype."""
    known = {"model", "snapshot_dir", "replicas", "gpus_per_replica", "cpus_per_replica", "snapshot_every_s", "device", "dtype"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    every = args.get("snapshot_every_s", "10")
    config = DeployConfig(
        model=ModelConfig(model=args.get("model", "tiny-smolvlm"), device=args.get("device", "auto"), dtype=args.get("dtype", "auto")),
        replicas=int(args.get("replicas", 2)), gpus_per_replica=float(args.get("gpus_per_replica", 0)),
        cpus_per_replica=float(args.get("cpus_per_replica", 1)), snapshot_dir=args.get("snapshot_dir", ""),
        snapshot_every_s=None if every in ("none", "None", "0") else float(every),
    )
    return build_app(config)


def run(config: DeployConfig, *, address: str | None = None) -> None:
    """``streamvlm serve --ray``: connect to the Ray cluster at ``address`` (None: ``RAY_ADDRESS`` or a
    new local one), deploy, print where it listens, and serve until Ctrl-C (then the application is
    deleted and the replicas save their sessions)."""
    import time

    import ray

    if address is None and not os.environ.get("RAY_ADDRESS"):
        loopback_only()  # a new cluster of this machine alone: nothing of Ray listens beyond 127.0.0.1
    ray.init(address=address, include_dashboard=False if address is None else None, ignore_reinit_error=True)
    serve.start(http_options={"host": config.server.host, "port": config.server.port}, proxy_location="HeadOnly")
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    host, port = config.server.host, config.server.port
    print(f"streamvlm: serving {config.model.model} on {config.replicas} Ray replica(s) at http://{host}:{port}/ "
          f"(realtime API: ws://{host}:{port}/v1/realtime; snapshots in {config.snapshot_dir})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
