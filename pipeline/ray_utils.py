"""Connecting to Ray: an existing cluster (RAY_ADDRESS, `ray job submit`) or a local instance on this machine."""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once per process: join the cluster named by RAY_ADDRESS, else start a local instance
    (dashboard on 127.0.0.1 only). Does nothing if Ray is already initialised (tests start one per session)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # Worker output (Ray Train's per-report lines) stays in the Ray logs unless DITSCALE_RAY_LOGS=1;
    # progress and errors reach the console through the drivers of each stage.
    log_to_driver = os.environ.get("DITSCALE_RAY_LOGS", "0") == "1"
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=log_to_driver)


def cluster_gpus() -> int:
    """GPUs in the Ray cluster (0 on a CPU-only machine)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def connected_cluster() -> dict[str, float] | None:
    """The resources of the Ray cluster RAY_ADDRESS names (set by `ray job submit`, or by hand); None without one:
    a dry run starts no Ray of its own."""
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        return None
    ensure_ray()
    return dict(ray.cluster_resources())
