"""sweep: a grid of DiT trials on Ray Tune, each trial one Ray Train TorchTrainer, tracked in MLflow.

    ditscale sweep quickstart [--set train.steps=2000] [--dry-run]

The plan (pipeline.plan) gives the trials and their stable run names. For each trial a Tune function trainable
builds and fits a `TorchTrainer` of that name in the experiment's runs folder (pipeline.layout). Ray Train V2 finds
an earlier run of that name in storage and hands its latest checkpoint to the workers, so running the same command
again resumes interrupted trials; finished trials are not started at all. A trial that fails for good (after
`resources.max_failures` worker-group restarts) is reported and does not stop the others.

MLflow: one parent run per sweep, one child run per trial (params: flattened config, preset, params, Gflops;
tags: sweep, git commit, dataset manifest hash), metrics logged by the trial's rank 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import schema
from pipeline.config import ExperimentConfig, config_to_dict, flatten
from pipeline.dry_run import dry_run_report
from pipeline.manifest import Manifest
from pipeline.plan import SweepPlan, Trial, TrialJob, plan_sweep, trial_job, trial_params
from pipeline.recorder import record_failure
from pipeline.slots import check_fits, slots_that_fit
from pipeline.trial_state import Failure, FailureKind, State, TrialState


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def manifest_hash(manifest: Manifest) -> str:
    return hashlib.sha256(json.dumps(manifest.to_json(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# One trial = one TorchTrainer (runs inside a Tune trial actor)
# ---------------------------------------------------------------------------------------------------------------


def run_trial(job: TrialJob) -> None:
    """Build and fit the trial's TorchTrainer (resuming from storage if it exists); runs in a Tune trial actor."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train import train_loop_per_worker

    # The Train controller takes reports off each worker's queue of one when it polls; the default 2 s poll would
    # stall a worker that reports twice within 2 s. 0.25 s keeps reports cheap at negligible controller CPU.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Starting a worker group (a process per worker, importing torch) can take longer than Ray's default 60 s on a
    # loaded node; a slow start is not a failure and must not use up resources.max_failures.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    r = job.experiment.resources
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=r.workers_per_trial, use_gpu=bool(r.gpus_per_worker), resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=job.layout.run_name,
            storage_path=job.layout.storage,
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.experiment.train.keep_checkpoints),
            callbacks=[TuneReportCallback()],
        ),
    )
    if job.layout.failure() is not None:  # an error of an earlier attempt: this one tries again
        job.layout.clear_failure()
    try:
        trainer.fit()
        if job.after_training is not None:  # fid.schedule "between": in this slot, on the resources it released
            after_training(job)
    except TrainingFailedError as exc:
        # Failed for good (after resources.max_failures restarts of the worker group): recorded for the outcome and
        # MLflow, and not raised, so that Tune restarts a trial only when its own process is lost (a node failure).
        record_failure(job.layout, job.tracking_uri, job.mlflow_run_id, Failure(FailureKind.ERROR, failure_reason(exc)))


def after_training(job: TrialJob) -> None:
    """Run the job's after-training step (`ditscale run` scores the trial's milestones there, fid.schedule
    "between"); a failure is reported, never the trial's: the trial has trained, and the fid pass after the sweep
    scores what is left and raises what is wrong."""
    try:
        job.after_training(job)
    except Exception as exc:  # noqa: BLE001
        print(f"[{job.trial.run_name}] after training: {failure_reason(exc)}", flush=True)


def failure_reason(exc: BaseException) -> str:
    """The last line of an error (its message, not its traceback), at most 300 characters."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else repr(exc))[:300]


def _progress_callback(interval_s: float):
    from ray import tune

    class TrialProgress(tune.Callback):
        """One line per trial with step, loss and img/s, at most every `interval_s` seconds per trial."""

        def __init__(self):
            self.last: dict[str, float] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            name = trial.config["job"].trial.run_name
            if "loss" not in result or time.time() - self.last.get(name, 0) < interval_s:
                return
            self.last[name] = time.time()
            val = f"  val {result['val_loss']:.4f}" if "val_loss" in result else ""
            print(
                f"[{name}] step {result['step']:>7,}/{result['steps']:,}  loss {result['loss']:.4f}{val}  "
                f"{result['img_per_s']:8.1f} img/s",
                flush=True,
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[{trial.config['job'].trial.run_name}] FAILED: {trial.error_file}", flush=True)

    return TrialProgress()


# ---------------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrialOutcome:
    trial: Trial
    status: State  # DONE, FAILED (see failure) or STOPPED (interrupted: the same command resumes it)
    failure: Failure | None
    step: int
    final_loss: float | None
    img_per_s: float | None
    mlflow_run_id: str

    @property
    def error(self) -> str | None:
        """What to tell people: the failure's reason, or how to resume an interrupted trial."""
        if self.failure is not None:
            return self.failure.reason
        if self.status is State.STOPPED:
            return "stopped (Ctrl-C) at its latest checkpoint: run the same command to resume"
        return None


def max_concurrent(experiment: ExperimentConfig, reserved: dict[str, float] | None = None) -> int:
    """resources.max_concurrent_trials, or as many trials as the Ray cluster holds beside `reserved`."""
    import ray

    return max(1, slots_that_fit(experiment, ray.cluster_resources(), reserved))


def check_cluster(experiment: ExperimentConfig, reserved: dict[str, float] | None = None) -> None:
    """One trial fits on the Ray cluster beside `reserved`; else a ConfigError that says what to change."""
    import ray

    check_fits(experiment, ray.cluster_resources(), reserved)


def run_sweep(
    experiment: ExperimentConfig,
    workdir: str,
    progress_interval_s: float = 15.0,
    reserved: dict[str, float] | None = None,
    after_training: Callable[[TrialJob], Any] | None = None,
    plan: SweepPlan | None = None,
) -> list[TrialOutcome]:
    """Run (or resume) every unfinished trial of the experiment; returns one outcome per trial.

    Holds the study's lock (pipeline.lock) while it works; `reserved` ({"CPU": ..., "GPU": ...}) is left free for
    work beside the trials (`ditscale run` samples FID there, fid.schedule "spare"); `after_training(job)` runs in each
    trial's slot once it has trained (`ditscale run` scores its milestones there, fid.schedule "between"). Raises
    KeyboardInterrupt
    after a clean stop on Ctrl-C
    (the trials keep their latest checkpoints; the same command resumes them).
    """
    from ray import tune

    from pipeline import tracking
    from pipeline.lock import study_lock
    from pipeline.ray_utils import ensure_ray

    plan = plan or plan_sweep(experiment, workdir)  # `ditscale run` plans once and hands its plan to every stage
    states = {t.run_name: plan.state(t) for t in plan.trials}
    todo = [t for t in plan.trials if states[t.run_name].to_train]
    done = sum(s.state is State.DONE for s in states.values())
    resume = sum(s.state is State.STOPPED for s in states.values())
    diverged = sum(s.to_train is False and s.state is State.FAILED for s in states.values())
    print(
        f"sweep {experiment.name}: {len(plan.trials)} trials ({done} done, {resume} to resume, "
        f"{len(todo) - resume} new"
        + (f", {diverged} diverged earlier" if diverged else "")
        + f"); storage {plan.storage}",
        flush=True,
    )
    lock_path = plan.workspace.lock(experiment.name)
    with (
        study_lock(lock_path, command_line()) as lock,
        tracking.tracking_uri(experiment.tracking.tracking_uri, workdir) as uri,
    ):
        exp_id = tracking.experiment_id(uri, experiment.mlflow_experiment)
        tags = {"git_commit": git_commit(), "manifest_hash": manifest_hash(plan.manifest), "workdir": workdir}
        parent = tracking.sweep_run(uri, exp_id, experiment.name, flatten(config_to_dict(experiment)), tags)
        run_ids = {
            t.run_name: tracking.trial_run(
                uri, exp_id, parent, experiment.name, t.run_name, trial_params(plan, t), {**tags, "preset": t.preset}
            )
            for t in plan.trials
        }
        results: dict[str, Any] = {}
        if todo:
            ensure_ray()
            check_cluster(experiment, reserved)
            concurrency = max_concurrent(experiment, reserved)
            alone = max_concurrent(experiment)
            if concurrency < alone:
                print(
                    f"sweep: {concurrency} trial(s) at a time beside the FID sampling actors ({alone} without them): "
                    f"lower fid.workers or fid.cpus_per_worker / gpus_per_worker, or score between trials or after "
                    f"the sweep (fid.schedule=between or after)",
                    flush=True,
                )
            lock.update(tracking_uri=uri, concurrent_trials=concurrency)
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our one-line-per-trial progress instead of Tune's
            # longest first: the largest trials start at once, so that none trains alone at the end
            todo.sort(key=lambda t: -t.training_compute["flops"])
            jobs = [trial_job(plan, t, uri, run_ids[t.run_name], after_training) for t in todo]
            tuner = tune.Tuner(
                tune.with_resources(run_trial_from_tune, {"CPU": 0, "memory": 1}),  # the driver needs no CPU
                param_space={"job": tune.grid_search(jobs)},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
                run_config=tune.RunConfig(
                    name=f"tune-{int(time.time())}",
                    storage_path=plan.workspace.tune_storage(experiment.name),
                    verbose=0,
                    callbacks=[_progress_callback(progress_interval_s)],
                    # A trial whose own process is lost (its node died) starts again and resumes from its latest
                    # checkpoint; a trial that fails for good inside Ray Train returns normally (run_trial).
                    failure_config=tune.FailureConfig(max_failures=experiment.resources.max_failures),
                ),
            )
            for result in tuner.fit():
                results[result.config["job"].trial.run_name] = result
        outcomes = [_outcome(plan, t, results.get(t.run_name), run_ids[t.run_name], uri) for t in plan.trials]
        interrupted = any(o.status is State.STOPPED for o in outcomes)
        for o in outcomes:
            if o.status is State.STOPPED:
                tracking.set_status(uri, o.mlflow_run_id, "KILLED")
        all_done = all(o.status is State.DONE for o in outcomes)
        tracking.set_status(uri, parent, "FINISHED" if all_done else "KILLED" if interrupted else "FAILED")
    print(summary_table(outcomes), flush=True)
    if interrupted:
        raise KeyboardInterrupt(
            f"sweep {experiment.name} interrupted: the trials stopped at their latest checkpoints; run the same "
            f"command again to resume them"
        )
    return outcomes


def command_line() -> str:
    """How this process was started, as the study lock records it."""
    import shlex
    import sys

    words = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(shlex.quote(w) for w in words)[:500]


def run_trial_from_tune(config: dict[str, Any]) -> None:
    run_trial(config["job"])


def _outcome(plan: SweepPlan, trial: Trial, result, run_id: str, uri: str) -> TrialOutcome:
    """What became of a trial in this sweep: DONE; FAILED, with the failure its record holds (diverged, or failed
    for good inside Ray Train), or LOST when Tune gave up on its process (recorded now); or STOPPED: Tune stopped it
    (Ctrl-C) before it finished, failed or raised, and it resumes from its latest checkpoint. A trial this sweep did
    not run keeps the state its folder says."""
    from pipeline import tracking

    state = plan.state(trial)
    if state.state is not State.DONE and state.failure is None and result is not None:
        if result.error is not None:
            failure = Failure(FailureKind.LOST, failure_reason(result.error), None, time.time())
            record_failure(plan.layout(trial), uri, run_id, failure)
            state = TrialState(State.FAILED, failure)
        else:
            state = TrialState(State.STOPPED)
    losses = tracking.metric_history(uri, run_id, schema.LOSS)
    speeds = tracking.metric_history(uri, run_id, schema.IMG_PER_S)
    return TrialOutcome(
        trial=trial,
        status=state.state,
        failure=state.failure,
        step=state.done_step if state.done_step is not None else (losses[-1][0] if losses else 0),
        final_loss=losses[-1][1] if losses else None,
        img_per_s=speeds[-1][1] if speeds else None,
        mlflow_run_id=run_id,
    )


def summary_table(outcomes: list[TrialOutcome]) -> str:
    width = max([16] + [len(o.trial.run_name) for o in outcomes])
    lines = [f"{'run':<{width}} {'preset':<10} {'Gflops':>9} {'step':>9} {'loss':>8} {'img/s':>9}  status"]
    for o in outcomes:
        loss = f"{o.final_loss:.4f}" if o.final_loss is not None else "-"
        speed = f"{o.img_per_s:.1f}" if o.img_per_s is not None else "-"
        status = o.status.value if o.error is None else f"{o.status.value}: {o.error}"
        lines.append(
            f"{o.trial.run_name:<{width}} {o.trial.preset:<10} {o.trial.gflops:>9.4f} {o.step:>9,} {loss:>8} "
            f"{speed:>9}  {status}"
        )
    failed = [o for o in outcomes if o.status is State.FAILED]
    diverged = [o for o in failed if not o.failure.retried]
    stopped = [o for o in outcomes if o.status is State.STOPPED]
    summary = f"{len(outcomes) - len(failed) - len(stopped)}/{len(outcomes)} trials done"
    if failed:
        summary += f"; {len(failed)} failed"
        if len(diverged) < len(failed):
            summary += ": re-run the same command to retry those that did not diverge"
        if diverged:
            summary += (
                f"; {len(diverged)} diverged (a re-run skips them: they would diverge again; lower train.lr, "
                f"set train.grad_clip, or change the design)"
            )
    if stopped:
        summary += f"; {len(stopped)} interrupted: re-run the same command to resume them"
    lines.append(summary)
    return "\n".join(lines)


def main_sweep(experiment: ExperimentConfig, workdir: str, dry_run: bool) -> int:
    if dry_run:
        print(dry_run_report(experiment, workdir))
        return 0
    outcomes = run_sweep(experiment, workdir)
    return 0 if all(o.status is State.DONE for o in outcomes) else 1
