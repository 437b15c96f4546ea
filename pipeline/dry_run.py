"""The dry run's report (`ditscale sweep EXPERIMENT --dry-run`): one row per trial with params, Gflops, training
compute and, for GPU runs, the expected accelerator-hours of training and of FID sampling; then what each
fid.schedule costs in trial slots (pipeline.slots). Plans nothing itself: it describes a SweepPlan.
"""

from __future__ import annotations

import os

from dit_core.flops import device_peak
from pipeline.config import ExperimentConfig
from pipeline.plan import SweepPlan, objective_name, plan_study
from pipeline.slots import describe_schedules, dry_run_clusters


def dry_run_report(experiment: ExperimentConfig, workdir: str) -> str:
    """The whole report: the plan (from the shards if they exist, else from the config), then the trial slots of
    each fid.schedule on the connected Ray cluster, or on the node shapes the experiment is written for."""
    from pipeline.ray_utils import connected_cluster

    clusters = dry_run_clusters(experiment, connected_cluster(), os.cpu_count() or 1)
    return "\n".join([describe_plan(plan_study(experiment, workdir)), *describe_schedules(experiment, clusters)])


# The device the dry run prices GPU-hours on when train.peak_tflops is 0: the driver cannot see the cluster's GPUs.
PLAN_DEVICE = "NVIDIA H200"


def describe_plan(plan: SweepPlan, mfu: float = 0.3) -> str:
    """The dry-run report: one row per trial with params, Gflops, training compute and, for GPU runs, the expected
    accelerator-hours of training and of FID sampling at `mfu` of one device's peak: train.peak_tflops, or (when 0)
    PLAN_DEVICE's dense bf16 datasheet figure."""
    e, t, f = plan.experiment, plan.experiment.train, plan.experiment.fid
    gpu = e.resources.gpus_per_worker > 0
    peak = t.peak_tflops * 1e12 or device_peak(PLAN_DEVICE).flops
    device = "train.peak_tflops" if t.peak_tflops else f"an {PLAN_DEVICE.removeprefix('NVIDIA ')}'s dense bf16 peak"
    cost = f"{'train GPU-h':>12} {'FID GPU-h':>10}" if gpu else ""
    width = max([18] + [len(trial.run_name) for trial in plan.trials])
    lines = [
        f"experiment {e.name}: {len(plan.trials)} trials x {t.steps:,} steps at global batch {t.global_batch_size} "
        f"on {e.resources.workers_per_trial} worker(s) each; objective {objective_name(e)}",
    ]
    labels = list(dict.fromkeys(trial.variant for trial in plan.trials if trial.variant))
    for label in labels:
        trial = next(tr for tr in plan.trials if tr.variant == label)
        settings = ", ".join(f"{path}={value}" for path, value in trial.settings.items()) or "the experiment's own"
        lines.append(f"variant {label}: {settings}; objective {objective_name(trial.experiment)}")
    lines.append(
        f"{'run':<{width}} {'preset':<13} {'params':>12} {'Gflops':>9} {'tokens':>6} {'train PFLOP':>12} "
        f"{'paper GMACs':>12} {cost}".rstrip()
    )
    total, hours = 0.0, [0.0, 0.0]
    for trial in plan.trials:
        tt, ff = trial.experiment.train, trial.experiment.fid
        scored = len(tt.milestone_steps) * (1 + len(tt.ema_decays))
        evaluations = ff.num_samples * ff.evaluations_per_image * scored
        compute = trial.training_compute
        total += compute["flops"]
        row = (
            f"{trial.run_name:<{width}} {trial.preset:<13} {trial.params:>12,} {trial.gflops:>9.4g} "
            f"{trial.model.num_tokens:>6} {compute['flops'] / 1e15:>12.4g} {compute['paper_gflops']:>12.4g}"
        )
        if gpu:
            train_h = compute["flops"] / (mfu * peak) / 3600
            fid_h = evaluations * 2e9 * trial.gflops / (mfu * peak) / 3600
            hours[0], hours[1] = hours[0] + train_h, hours[1] + fid_h
            row += f" {train_h:>12.3g} {fid_h:>10.3g}"
        lines.append(row)
    lines.append(f"total training compute: {total / 1e15:.4g} PFLOP ({total / 8.64e19:.4g} PF-days; 6 x MACs)")
    if gpu:
        lines.append(
            f"expected cost at {mfu:.0%} MFU of {peak / 1e12:.0f} TFLOP/s ({device}): {hours[0]:,.1f} GPU-hours of "
            f"training + {hours[1]:,.1f} of FID sampling ({f.num_samples:,} samples x {f.sampling_steps} steps x "
            f"{len(t.milestone_steps)} milestones); the peers' training steps reached 12-39% MFU on an H200 (small "
            f"models at the low end, a compiled XL/2 at the top)"
        )
    if plan.manifest is None:
        lines.append(
            f"(no shards at {plan.shards} yet: planned from the config, {plan.data.basis}; run names are provisional)"
        )
    else:
        lines.append("status: " + ", ".join(f"{t.run_name} {plan.state(t).label()}" for t in plan.trials))
        lines.append(f"shards: {plan.shards} ({plan.data.total} samples, latents {list(plan.data.latent_shape)})")
    lines.append(f"storage: {plan.storage}")
    return "\n".join(lines)
