"""Connecting to Ray: an existing cluster (RAY_ADDRESS, `ray job submit`) or a local instance on this machine."""

from __future__ import annotations

import os
import signal
from pathlib import Path

# Ray 2.60 gives a new local node 30 s (a constant in ray._private.node) to register its raylet with the GCS; on a
# machine with a load of 15 or more on 2 cores that has been seen to run out (2026-12-08, a test beside the
# quickstart). Such a start is retried, after stopping what the failed attempt started.
START_TIMEOUT_MESSAGE = "timed out during startup"
START_ATTEMPTS = 3


def _ray_children() -> list[int]:
    """This process's child processes that run Ray's own programs (GCS, raylet, log monitor...)."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != me:
                continue
            if b"/ray/" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def start_local_ray(**options) -> None:
    """ray.init(**options) for a new local instance, retried when the node times out during its start (above)."""
    import ray

    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(**options)
            return
        except Exception as exc:
            if START_TIMEOUT_MESSAGE not in str(exc) or attempt == START_ATTEMPTS:
                raise
            ray.shutdown()
            for pid in _ray_children():  # the failed attempt's GCS and raylet
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            print(
                f"ray: the local node did not register within Ray's 30 s (a loaded machine?); starting it again "
                f"({attempt + 1} of {START_ATTEMPTS})",
                flush=True,
            )


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
        start_local_ray(
            num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=log_to_driver
        )


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
