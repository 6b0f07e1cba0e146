"""The ``serve-cluster`` application for Ray's config-file deployments (``serve deploy``, KubeRay ``RayService``):

    import_path: glm4v_edge.cluster_app:app

Built at import from the ``GLM4V_*`` environment variables — every ``serve`` / ``serve-cluster`` flag has one
(``GLM4V_MODEL``, ``GLM4V_PRECISION``, ``GLM4V_REPLICAS``, ``GLM4V_GPUS_PER_REPLICA`` …); the config file's
``deployments`` section may override the replica count and resources (docs/CLUSTER.md).
"""

from __future__ import annotations

import argparse

from server.cluster import build_application
from server.settings import ServerSettings

from . import serve_cluster


def build(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="glm4v-edge serve-cluster")
    serve_cluster.add_arguments(parser)
    args = parser.parse_args(argv or [])
    return build_application(
        ServerSettings.from_args(args),
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        num_gpus=args.gpus_per_replica if args.gpus_per_replica is not None else _default_gpus(),
        num_cpus=args.cpus_per_replica,
        target_ongoing_requests=args.target_ongoing_requests,
    )


def _default_gpus() -> float:
    """As serve-cluster: 1 per replica when the Ray cluster (already joined by ``serve deploy``) has GPUs."""
    import ray

    return serve_cluster.default_gpus() if ray.is_initialized() else 0


app = build()
