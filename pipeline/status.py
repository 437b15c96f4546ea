"""`ditscale status EXPERIMENT`: where a study stands, read from the workspace and MLflow without disturbing it.

    ditscale status quickstart

One row per trial: its state (new; queued or running while a `ditscale run`/`sweep` holds the study's lock; stopped,
which the same command resumes; done; failed, with the reason), its step, latest loss and FID, its measured
throughput and time left; then the study's expected time left. Time left comes from the measured throughput: a
running trial's own (its latest img/s), a trial that has not started from the seconds per step per Gflop that the
measured trials show, scheduled longest first on as many slots as the sweep runs at once. Nothing here starts Ray or
a server: MLflow is read through the running study's server, MLFLOW_TRACKING_URI or the workspace's SQLite store.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from pipeline import schema
from pipeline.config import ExperimentConfig
from pipeline.layout import Workspace
from pipeline.lock import LockHolder, StudyLock
from pipeline.plan import SweepPlan, Trial, plan_study
from pipeline.trial_state import State

FINAL = (State.DONE, State.FAILED)
WAITING = (State.NEW, State.QUEUED, State.STOPPED)
ORDER = (State.DONE, State.RUNNING, State.QUEUED, State.STOPPED, State.NEW, State.FAILED)  # the summary line's


@dataclass
class TrialRow:
    """One trial's row of the report."""

    trial: Trial
    state: State  # pipeline.trial_state's
    reason: str  # why it failed, or what to know about it ("" if nothing)
    step: int  # the last step it logged (or finished)
    steps: int  # its train.steps
    loss: float | None
    fid: tuple[int, float] | None  # (step, FID) of its latest scored milestone
    img_per_s: float | None
    seconds_left: float | None  # training time left (None: unknown)
    estimated: bool = False  # seconds_left from other trials' throughput, not its own
    unscored: int = 0  # milestones written (or still to come) without a score

    def __post_init__(self) -> None:
        self.state = State(self.state)

    @property
    def seconds_per_step(self) -> float | None:
        if not self.img_per_s:
            return None
        return self.trial.experiment.train.global_batch_size / self.img_per_s


@dataclass
class StudyStatus:
    plan: SweepPlan
    trials: list[TrialRow]
    holder: LockHolder | None  # the lock's record (live or stale), if any
    live: LockHolder | None  # the holder, if it is still at work
    uri: str | None  # where MLflow was read

    @property
    def slots(self) -> int:
        """Trials at a time: what the running sweep recorded, resources.max_concurrent_trials, or those running."""
        if self.live is not None and self.live.facts.get("concurrent_trials"):
            return int(self.live.facts["concurrent_trials"])
        resources = self.plan.experiment.resources
        return resources.max_concurrent_trials or max(1, sum(s.state == "running" for s in self.trials))


def gather(experiment: ExperimentConfig, workdir: str) -> StudyStatus:
    """Read the study's state: plan, lock, trial folders and MLflow."""
    from pipeline import tracking

    plan = plan_study(experiment, workdir)
    holder = StudyLock(Workspace(workdir).lock(experiment.name)).read()
    live = holder if holder is not None and holder.stale_reason() is None else None
    running_uri = live.facts.get("tracking_uri") if live is not None else None
    uri = tracking.reading_uri(experiment.tracking.tracking_uri, workdir, running_uri)
    runs = tracking.trial_runs_by_name(uri, experiment.mlflow_experiment, experiment.name) if uri else {}
    states = [trial_row(plan, t, runs.get(t.run_name), uri, live) for t in plan.trials]
    estimate_unstarted(states)
    return StudyStatus(plan, states, holder, live, uri)


def study_status(experiment: ExperimentConfig, workdir: str) -> str:
    """The status report of `experiment` in `workdir` (see the module docstring)."""
    return render(gather(experiment, workdir), workdir)


def trial_row(plan: SweepPlan, trial: Trial, run, uri: str | None, live: LockHolder | None) -> TrialRow:
    """A trial's row: its state (pipeline.trial_state, from its folder and the live holder of the study's lock) and
    what its run logged."""
    from pipeline import tracking

    steps = trial.experiment.train.steps
    metric = lambda key: tracking.metric_history(uri, run.info.run_id, key) if run is not None else []  # noqa: E731
    losses, fids, speeds = metric(schema.LOSS), metric(schema.FID), metric(schema.IMG_PER_S)
    current = plan.state(trial, live.started_unix_s if live is not None else None)
    state = current.state
    step = current.done_step if current.done_step is not None else (losses[-1][0] if losses else 0)
    reason = current.failure.reason if current.failure is not None else ""
    if run is not None and run.data.tags.get(schema.RESUME_WARNING):
        reason = reason or run.data.tags[schema.RESUME_WARNING]
    img_per_s = speeds[-1][1] if speeds else None
    scored = {s for s, _ in fids}
    milestones = set(plan.layout(trial).milestones())
    future = {m for m in trial.experiment.train.milestone_steps if m > step} if state not in FINAL else set()
    row = TrialRow(
        trial, state, reason, step, steps, losses[-1][1] if losses else None, fids[-1] if fids else None, img_per_s,
        None, unscored=len((milestones | future) - scored),
    )  # fmt: skip
    if state in (State.RUNNING, State.STOPPED) and row.seconds_per_step:
        row.seconds_left = (steps - step) * row.seconds_per_step
    elif state in FINAL:
        row.seconds_left = 0.0
    return row


def estimate_unstarted(states: list[TrialRow]) -> None:
    """Time left of trials without a throughput of their own: steps x the median seconds per step per (Gflops x
    batch) of the trials that have one (a step's cost scales with the model's Gflops and the batch)."""
    rates = [
        s.seconds_per_step / (s.trial.gflops * s.trial.experiment.train.global_batch_size)
        for s in states
        if s.seconds_per_step
    ]
    if not rates:
        return
    rate = statistics.median(rates)
    for s in states:
        if s.seconds_left is None:
            train = s.trial.experiment.train
            s.seconds_left = (s.steps - s.step) * rate * s.trial.gflops * train.global_batch_size
            s.estimated = True


def time_left(states: list[TrialRow], slots: int) -> float | None:
    """The training time left: the running trials finish their steps, and the others start longest first on the
    first free slot (what the sweep does). None if a trial's time cannot be estimated yet."""
    if any(s.seconds_left is None for s in states):
        return None
    running = sorted((s.seconds_left for s in states if s.state == State.RUNNING), reverse=True)
    waiting = sorted((s.seconds_left for s in states if s.state in WAITING), reverse=True)
    free = running[:slots] + [0.0] * max(0, slots - len(running))
    for seconds in running[slots:] + waiting:
        i = free.index(min(free))
        free[i] += seconds
    return max(free, default=0.0)


def _minutes(seconds: float | None, estimated: bool = False) -> str:
    if seconds is None:
        return "?"
    text = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
    return ("~" if estimated else "") + text


def render(status: StudyStatus, workdir: str) -> str:
    experiment, states, live, holder = status.plan.experiment, status.trials, status.live, status.holder
    slots, left = status.slots, time_left(status.trials, status.slots)
    if live is not None:
        head = f"study {experiment.name} in {workdir}: at work: {live.describe()}"
    elif holder is not None:
        head = (
            f"study {experiment.name} in {workdir}: not running (the last run's lock is stale: {holder.stale_reason()})"
        )
    else:
        head = f"study {experiment.name} in {workdir}: not running"
    lines = [head, f"MLflow: {status.uri or 'no store yet'}"]
    width = max([16] + [len(s.trial.run_name) for s in states])
    lines.append(
        f"{'run':<{width}} {'preset':<13} {'state':<8} {'step':>15} {'loss':>8} {'FID (step)':>16} {'img/s':>9} "
        f"{'time left':>10}"
    )
    for s in states:
        fid = f"{s.fid[1]:.4g} ({s.fid[0]:,})" if s.fid else "-"
        loss = f"{s.loss:.4f}" if s.loss is not None else "-"
        speed = f"{s.img_per_s:.1f}" if s.img_per_s else "-"
        steps = f"{s.step:,}/{s.steps:,}"
        lines.append(
            f"{s.trial.run_name:<{width}} {s.trial.preset:<13} {s.state.value:<8} {steps:>15} {loss:>8} {fid:>16} "
            f"{speed:>9} {_minutes(s.seconds_left, s.estimated):>10}" + (f"  {s.reason}" if s.reason else "")
        )
    counts = {k: sum(s.state == k for s in states) for k in ORDER}
    lines.append(", ".join(f"{v} {k.value}" for k, v in counts.items() if v) + f" of {len(states)} trials")
    unscored = sum(s.unscored for s in states)
    if left is None:
        lines.append("time left: unknown until a trial has logged its throughput")
    elif all(s.state in FINAL for s in states):
        lines.append("training: nothing left" + (f"; {unscored} milestone(s) not scored yet" if unscored else ""))
    else:
        lines.append(
            f"expected time left: {_minutes(left)} of training ({slots} trial(s) at a time, longest first, from the "
            f"measured throughput; trial start-up not counted)"
            + (f"; {unscored} milestone(s) still to score" if unscored else "")
        )
    if status.plan.manifest is None:
        lines.append(f"(no shards at {status.plan.shards} yet: run names are provisional)")
    lines.append(f"as of {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return "\n".join(lines)
