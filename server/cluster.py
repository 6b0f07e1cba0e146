"""The same server as replicas on Ray Serve (``glm4v-edge serve-cluster``; docs/CLUSTER.md).

One Ray Serve application with one deployment. Each replica is a Ray actor that loads the model (its own engine, KV
cache and caches) and runs this project's own FastAPI app — the same routes, auth, limits, metrics and streaming as
``glm4v-edge serve`` — as the deployment's ASGI ingress. Ray does the rest: placement (``num_gpus: 1`` per replica on
GPUs, ``0`` on a CPU), routing through its HTTP proxy, health checks, restarts and autoscaling on the number of
ongoing requests. Nothing here routes or balances by itself.

A replica is ready only once its model is loaded (the load runs in the replica's constructor), so Ray never routes
to a replica that would answer 503. Every response carries ``x-glm4v-replica`` (which replica answered); /metrics
carries a ``replica`` label; ``/v1/models`` says how many replicas are serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

from .settings import ServerSettings

log = logging.getLogger(__name__)

APP_NAME = "glm4v"
DEPLOYMENT_NAME = "GLM4VReplica"
REPLICA_HEADER = "x-glm4v-replica"


class ModelNotReadable(RuntimeError):
    """The model folder is not readable on the node a replica was placed on."""


def check_model_readable(settings: ServerSettings, node: str = "") -> None:
    """A folder ``--model`` must be readable on every node (a shared mount, or the same path on each); a hub id is
    resolved by each node from its own cache or the hub."""
    from quant.hub import describe_source

    model = settings.model
    if not model or describe_source(model) != "folder":
        return
    path = os.path.expanduser(model)
    ok = os.path.isdir(path) and os.access(path, os.R_OK | os.X_OK)
    if ok and os.path.isfile(os.path.join(path, "config.json")):
        return
    where = f" on node {node}" if node else ""
    raise ModelNotReadable(
        f"--model {model} is not a readable checkpoint folder{where}: every node needs it at the same path "
        "(a shared mount such as NFS, or a copy at that path on each node; docs/CLUSTER.md), or use a hub id"
    )


class ReplicaHeader:
    """Adds ``x-glm4v-replica: <id>`` to every response of this replica (pure ASGI: streams pass untouched)."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        return await self.app(scope, receive, tagged)


class ReplicaCount:
    """How many replicas of this deployment are RUNNING, from Ray Serve's status — refreshed by a background thread
    every 2 s, so ``/v1/models`` never waits on Ray's controller (reading it is a plain attribute)."""

    def __init__(self, app_name: str, deployment: str, fallback: int, period_s: float = 2.0):
        self.app_name, self.deployment, self.period_s = app_name, deployment, period_s
        self.value = fallback
        self._stop = threading.Event()
        threading.Thread(target=self._refresh, name="glm4v-replica-count", daemon=True).start()

    def _refresh(self) -> None:
        while not self._stop.is_set():
            try:
                from ray import serve

                status = serve.status().applications[self.app_name].deployments[self.deployment]
                self.value = int(status.replica_states.get("RUNNING", 0))
            except Exception as e:  # best-effort: /v1/models answers with the last known count
                log.debug("replica count unavailable: %s", e)
            self._stop.wait(self.period_s)

    def __call__(self) -> int:
        return self.value


class GLM4VReplica:
    """One replica: loads the model in its constructor (ready = loaded), then serves the project's FastAPI app."""

    async def __init__(self, settings: dict):
        from ray import serve

        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        node = os.uname().nodename
        self.settings = ServerSettings(**settings)
        check_model_readable(self.settings, node)
        self.count = ReplicaCount(ctx.app_name, ctx.deployment, fallback=ctx.world_size)
        from quant.request import open_model

        t0 = time.perf_counter()
        self.loaded = await asyncio.to_thread(open_model, self.settings.load_request())
        log.info("replica %s on %s: model loaded in %.1f s", self.replica_id, node, time.perf_counter() - t0)

    def __serve_build_asgi_app__(self):
        from .app import create_app

        app = create_app(self.settings, self.loaded, replica=self.replica_id)
        app.state.runtime.cluster_info = lambda: {"replica": self.replica_id, "replicas_serving": self.count()}
        app.add_middleware(ReplicaHeader, replica=self.replica_id)
        return app

    async def check_health(self) -> None:
        """Ray's health check: a replica whose engine stopped (or never started) is replaced."""
        runtime = self._asgi_app.state.runtime if hasattr(self, "_asgi_app") else None
        if runtime is not None and runtime.state == "failed":
            raise RuntimeError(f"replica {self.replica_id}: {runtime.error}")


# What a replica on another node must see as the driver does (Ray runs it in that node's raylet environment).
FORWARDED_ENV = (
    "HF_TOKEN",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "MODELSCOPE_CACHE",
    "GLM4V_USE_MODELSCOPE",
)


def driver_settings(settings: ServerSettings) -> ServerSettings:
    """The settings as every replica must read them: a relative ``--model`` folder made absolute (a replica's
    working directory is wherever its node's Ray started; there the same string would be a hub id), a bare id meant
    for ModelScope spelled ``modelscope://``."""
    from dataclasses import replace

    from quant.hub import describe_source

    model = settings.model
    if model:
        source = describe_source(model)
        if source == "folder" and os.path.isdir(os.path.expanduser(model)):
            model = str(Path(model).expanduser().resolve())
        elif source == "modelscope" and not model.startswith("modelscope://"):
            model = "modelscope://" + model
    return replace(settings, model=model)


def build_application(
    settings: ServerSettings,
    replicas: int = 1,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    num_gpus: float | None = None,
    num_cpus: float = 1.0,
    target_ongoing_requests: float | None = None,
):
    """The Ray Serve application: ``replicas`` fixed replicas, or autoscaling between ``min_replicas`` and
    ``max_replicas`` on Ray Serve's ongoing-request signal (target: ``--max-batch-size`` per replica)."""
    from ray import serve

    settings = driver_settings(settings)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    actor = {"num_gpus": 0 if num_gpus is None else num_gpus, "num_cpus": num_cpus}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    options: dict = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": actor,
        # a replica can take its whole batch and queue before Ray holds requests back
        "max_ongoing_requests": settings.max_batch_size + settings.max_queue,
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
    }
    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas if min_replicas is not None else 1
        hi = max_replicas if max_replicas is not None else max(lo, replicas)
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"--min-replicas {lo} / --max-replicas {hi}: need 0 ≤ min ≤ max and max ≥ 1")
        options["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": hi,
            "initial_replicas": min(max(replicas, lo), hi),
            "target_ongoing_requests": target_ongoing_requests or settings.max_batch_size,
        }
    else:
        if replicas < 1:
            raise ValueError("--replicas must be at least 1")
        options["num_replicas"] = replicas
    deployment = serve.deployment(**options)(serve.ingress(None)(GLM4VReplica))
    return deployment.bind(asdict(settings))
