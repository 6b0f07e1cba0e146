"""Serve the same OpenAI-compatible API as replicas on Ray Serve: one replica per GPU, on as many machines as join
the Ray cluster (docs/CLUSTER.md). Needs the extra: ``pip install 'glm4v-edge[cluster]'``.

    glm4v-edge serve-cluster --replicas 2 --model THUDM/glm-4v-9b --precision nf4
    glm4v-edge serve-cluster --address auto --min-replicas 1 --max-replicas 4 --model /shared/glm-4v-9b

Every ``serve`` flag means the same thing in every replica. Without ``--address`` a local Ray instance is started
(a machine with several GPUs is the first step up); ``--address auto`` joins the cluster this machine is part of
(``ray start --head`` / ``ray start --address``), ``ray://host:10001`` one elsewhere.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from . import serve as serve_command
from .options import add

log = logging.getLogger("glm4v_edge.serve_cluster")


def add_arguments(p: argparse.ArgumentParser) -> None:
    serve_command.add_arguments(p)
    add(p, "--replicas", default=1, type=int, help="replicas to run (each loads the model: one per GPU)")
    add(p, "--min-replicas", type=int, help="autoscale: fewest replicas (with --max-replicas; 0 = scale to zero)")
    add(p, "--max-replicas", type=int, help="autoscale: most replicas, on Ray Serve's ongoing-request signal")
    add(
        p,
        "--target-ongoing-requests",
        type=float,
        help="autoscale: ongoing requests per replica Ray aims for (default: --max-batch-size)",
    )
    add(
        p,
        "--address",
        help="Ray cluster to join: 'auto' (this machine's cluster) or ray://host:10001; none = start a local Ray",
    )
    add(
        p,
        "--gpus-per-replica",
        type=float,
        help="GPUs each replica reserves (default: 1 when the cluster has GPUs, else 0 — a CPU replica)",
    )
    add(p, "--cpus-per-replica", default=1.0, type=float, help="CPUs each replica reserves in Ray's accounting")


def run(args: argparse.Namespace) -> int:
    from server.settings import ServerSettings

    try:
        settings = ServerSettings.from_args(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    try:
        import ray
        from ray import serve
    except ImportError:
        log.error("serve-cluster needs Ray Serve: pip install 'glm4v-edge[cluster]'")
        return 2
    from server.cluster import APP_NAME, build_application
    from server.launch import startup_warnings

    for w in startup_warnings(settings):
        log.warning("%s", w)
    ray.init(address=args.address, include_dashboard=False, logging_level=logging.WARNING)
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = default_gpus()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # from here on: a signal while replicas load still undeploys them
        signal.signal(sig, lambda *_: stop.set())
    try:
        app = build_application(
            settings,
            replicas=args.replicas,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            num_gpus=gpus,
            num_cpus=args.cpus_per_replica,
            target_ongoing_requests=args.target_ongoing_requests,
        )
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(app, name=APP_NAME, route_prefix="/")  # returns once every replica has loaded its model
        if not stop.is_set():
            host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
            where = f"http://{host}:{settings.port}/v1"
            print(f"serving on {where} ({_replicas_text(args)}, {gpus:g} GPU each)", flush=True)
            stop.wait()
        log.info("shutting down the application")
        return 0
    except Exception as e:  # a replica that cannot start (model folder missing on a node, out of memory …)
        log.error("the application did not start: %s", str(e).strip().splitlines()[-1] if str(e).strip() else e)
        return 1
    finally:
        serve.shutdown()


def default_gpus() -> float:
    """1 GPU per replica when the Ray cluster has GPUs, else 0 (a CPU replica)."""
    import ray

    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


def _replicas_text(args) -> str:
    if args.min_replicas is not None or args.max_replicas is not None:
        return f"autoscaling {args.min_replicas if args.min_replicas is not None else 1}–{args.max_replicas} replicas"
    return f"{args.replicas} replica{'s' if args.replicas != 1 else ''}"
