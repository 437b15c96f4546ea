"""Trial slots: how many trials a cluster trains at once beside the fid stage's sampling actors, for each
fid.schedule, and the refusal (with the fix) when not even one fits. Pure arithmetic on a {"CPU": n, "GPU": n}
mapping (what `ray.cluster_resources()` gives), so the sweep, `--dry-run` and the tests share it without Ray.

Per fid.schedule (pipeline.config.FidConfig):
    spare     the sampling actors hold their CPUs/GPUs for the whole sweep: fewer slots where the cluster has none
              to spare (an 8-GPU trial beside a 1-GPU sampler on one 8-GPU node does not fit at all)
    between   each trial scores its milestones in its own slot when it has trained: no slot lost; a slot is held
              longer by its trial's sampling time
    after     nothing held while training: the scoring comes after the last trial
"""

from __future__ import annotations

import math

from pipeline.config import ConfigError, ExperimentConfig

# Node shapes `--dry-run` reports on when no Ray cluster is connected: the 8-GPU nodes the GPU experiments are
# written for (DGX/HGX H100 or H200, p5/p4d-class cloud nodes: 8 GPUs and 96 or more CPUs), one node and two.
GPU_NODE = {"CPU": 96.0, "GPU": 8.0}


def sampling_reservation(experiment: ExperimentConfig, cluster: dict[str, float]) -> dict[str, float]:
    """What fid.schedule "spare" holds beside the trials: fid.workers actors (1 if unset) of fid.cpus_per_worker
    CPUs and, on a cluster with GPUs, fid.gpus_per_worker GPUs."""
    f = experiment.fid
    actors = f.workers or 1
    gpus = f.gpus_per_worker if cluster.get("GPU", 0) > 0 else 0.0
    return {"CPU": actors * f.cpus_per_worker, "GPU": actors * gpus}


def free_for_trials(cluster: dict[str, float], reserved: dict[str, float] | None) -> dict[str, float]:
    """The cluster's CPUs and GPUs less what others reserve beside the trials."""
    reserved = reserved or {}
    return {kind: cluster.get(kind, 0) - reserved.get(kind, 0) for kind in ("CPU", "GPU")}


def slots_that_fit(experiment: ExperimentConfig, cluster: dict[str, float], reserved=None) -> int:
    """Trials that fit at once beside `reserved` (0: not even one); resources.max_concurrent_trials caps it."""
    r = experiment.resources
    free = free_for_trials(cluster, reserved)
    # (a small epsilon: 2.0 - 0.5 over 0.75 is 2 trials, not 1.9999)
    fits = [math.floor(free["CPU"] / (r.workers_per_trial * r.cpus_per_worker) + 1e-9)]
    if r.gpus_per_worker:
        fits.append(math.floor(free["GPU"] / (r.workers_per_trial * r.gpus_per_worker) + 1e-9))
    n = max(0, min(fits))
    return min(n, r.max_concurrent_trials) if r.max_concurrent_trials else n


def check_fits(experiment: ExperimentConfig, cluster: dict[str, float], reserved=None) -> None:
    """One trial fits on the cluster beside `reserved`; else a ConfigError that says what to change."""
    r = experiment.resources
    free = free_for_trials(cluster, reserved)
    beside = ""
    if reserved and any(reserved.values()):
        held = ", ".join(f"{v:g} {k}" for k, v in reserved.items() if v)
        beside = (
            f" beside the {held} held for FID sampling while training (fid.schedule=spare: fid.workers x "
            f"fid.cpus_per_worker / gpus_per_worker)"
        )
    for kind, per_worker, fix in (
        ("GPU", r.gpus_per_worker, "set resources.gpus_per_worker=0 to train on CPUs, or add GPU nodes"),
        ("CPU", r.cpus_per_worker, "lower resources.cpus_per_worker or workers_per_trial"),
    ):
        need = r.workers_per_trial * per_worker
        if need and free[kind] < need - 1e-9:
            raise ConfigError(
                f"a trial needs {need:g} {kind}s (resources.workers_per_trial x {kind.lower()}s_per_worker) but the "
                f"Ray cluster has {free[kind]:g} free{beside}: {fix}"
                + ("; or score between trials or after the sweep (fid.schedule=between or after)" if beside else "")
            )


def describe_schedules(experiment: ExperimentConfig, clusters: dict[str, dict[str, float]]) -> list[str]:
    """`--dry-run`'s lines on what each fid.schedule costs in trial slots on each cluster shape, the chosen one
    marked."""
    chosen = experiment.fid.schedule
    lines = []
    for name, cluster in clusters.items():
        shape = ", ".join(f"{cluster.get(k, 0):g} {k}" for k in ("GPU", "CPU") if cluster.get(k, 0))
        alone = slots_that_fit(experiment, cluster)
        if alone == 0:
            lines.append(f"on {name} ({shape}): no trial fits ({_need(experiment)} each)")
            continue
        held = sampling_reservation(experiment, cluster)
        spare = slots_that_fit(experiment, cluster, held)
        held_text = ", ".join(f"{v:g} {k}" for k, v in held.items() if v)
        if spare == 0:
            spare_text = f"refused, no trial fits beside {held_text} held for sampling"
        else:
            lost = f"{alone - spare} slot(s) fewer" if spare < alone else "no slot lost"
            spare_text = f"{spare} at a time beside {held_text} held for sampling ({lost})"
        costs = {
            "spare": spare_text,
            "between": f"{alone} at a time, each slot held while its trial scores its milestones",
            "after": f"{alone} at a time, all scoring after the last trial",
        }
        text = "; ".join(f"{'*' if s == chosen else ''}{s}: {c}" for s, c in costs.items())
        lines.append(f"on {name} ({shape}), trials per fid.schedule (* = this experiment's): {text}")
    return lines


def _need(experiment: ExperimentConfig) -> str:
    r = experiment.resources
    gpus = f"{r.workers_per_trial * r.gpus_per_worker:g} GPU, " if r.gpus_per_worker else ""
    return f"{gpus}{r.workers_per_trial * r.cpus_per_worker:g} CPU"


def dry_run_clusters(experiment: ExperimentConfig, connected: dict[str, float] | None, local_cpus: int) -> dict:
    """The cluster shapes `--dry-run` reports on: the connected Ray cluster when there is one; else, for a GPU
    experiment, one and two 8-GPU nodes, and for a CPU one, this machine."""
    if connected:
        return {"the Ray cluster": connected}
    if experiment.resources.gpus_per_worker:
        return {"one 8-GPU node": dict(GPU_NODE), "two 8-GPU nodes": {k: 2 * v for k, v in GPU_NODE.items()}}
    return {"this machine": {"CPU": float(local_cpus)}}
