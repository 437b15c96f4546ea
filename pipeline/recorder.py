"""What a trial's rank 0 writes while its workers train, so that the loop itself reads as steps and decisions:
MLflow (the run's status, metrics, tags), the EMA milestones for the fid stage, the resumable checkpoints reported
to Ray Train (every rank reports; rank 0 attaches the checkpoint), and the trial's finished or failure record.

Before a checkpoint is reported, every metric point logged so far is sent to MLflow or spilled to the trial's
unsent-metrics file (`MetricLogger.checkpoint_barrier`): a resume from that checkpoint leaves no gap in the curves,
whatever happens to the process afterwards.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from pipeline import schema
from pipeline.checkpoints import save_milestone, save_resumable
from pipeline.layout import TrialLayout
from pipeline.trial_state import Failure, FailureKind

CHECKPOINT_BARRIER_S = 60.0  # the longest a checkpoint waits for MLflow before spilling what is unsent

# Test hook: rank 0 stops after step DITSCALE_TEST_HOLD_AT_STEP, writes <DITSCALE_TEST_HOLD_FILE>.reached, and waits
# until <DITSCALE_TEST_HOLD_FILE> exists (a fault test causes its fault while the trial is known to be there).
HOLD_AT_STEP, HOLD_FILE = "DITSCALE_TEST_HOLD_AT_STEP", "DITSCALE_TEST_HOLD_FILE"


def record_failure(layout: TrialLayout, uri: str, run_id: str, failure: Failure) -> None:
    """A trial stopped for good: its failure record (the state the sweep, status and a re-run read), and its MLflow
    run FAILED with the reason and kind as tags."""
    from pipeline.tracking import set_status, set_tags

    layout.mark_failed(failure)
    set_tags(uri, run_id, {schema.FAILURE: failure.reason, schema.FAILURE_KIND: failure.kind.value})
    set_status(uri, run_id, "FAILED")


class TrialRecorder:
    """Rank 0's side effects of one trial (the other ranks' recorder only reports to Ray Train)."""

    def __init__(self, job, rank: int, saved_config: dict[str, Any]):
        from pipeline.tracking import MetricLogger

        self.job, self.layout, self.rank0, self.config = job, job.layout, rank == 0, saved_config
        self.logger = (
            MetricLogger(job.tracking_uri, job.mlflow_run_id, spill=self.layout.unsent_metrics) if rank == 0 else None
        )

    def started(self, resumed: dict[str, Any]) -> None:
        from pipeline.tracking import set_status, set_tags

        if not self.rank0:
            return
        set_status(self.job.tracking_uri, self.job.mlflow_run_id, "RUNNING")
        if resumed.get("skipped_checkpoints"):
            skipped = ", ".join(f"{s['checkpoint']} ({s['error']})" for s in resumed["skipped_checkpoints"])
            set_tags(self.job.tracking_uri, self.job.mlflow_run_id, {schema.RESUME_WARNING: f"skipped {skipped}"})

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.logger is not None:
            self.logger.log(metrics, step=step)

    def milestone(self, step: int, ema, more_emas: dict) -> None:
        """The EMA weights (each EMA's) at a milestone step, for the fid stage."""
        if not self.rank0:
            return
        save_milestone(self.layout, step, ema, self.config)
        for decay, copy in more_emas.items():
            save_milestone(self.layout, step, copy, self.config, decay)

    def report(self, report: dict[str, Any], checkpoint: tuple | None = None) -> None:
        """Report to Ray Train (every rank, at the same steps); with `checkpoint` = (model, ema, opt, more_emas),
        rank 0 writes a resumable checkpoint of report["step"] and attaches it, after every metric point logged so
        far has reached MLflow or the spill file."""
        import ray.train

        if checkpoint is None or not self.rank0:
            ray.train.report(report)
            return
        model, ema, opt, more_emas = checkpoint
        self.logger.checkpoint_barrier(CHECKPOINT_BARRIER_S)
        with tempfile.TemporaryDirectory() as folder:
            save_resumable(folder, report["step"], model, ema, opt, self.config, more_emas)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def hold_if_asked(self, step: int) -> None:
        """The test hook (HOLD_AT_STEP): rank 0 waits at `step` until the test lets it go."""
        if not self.rank0 or os.environ.get(HOLD_AT_STEP) != str(step):
            return
        release = os.environ[HOLD_FILE]
        with open(f"{release}.reached", "w") as f:
            f.write(str(step))
        while not os.path.exists(release):
            time.sleep(0.05)

    def diverged(self, step: int, reason: str, stopped_step: int) -> None:
        """Diverged at `step`, stopped at `stopped_step`, for good (a re-run would diverge again): recorded, the run
        FAILED."""
        print(f"train: {self.job.trial.run_name} {reason}", flush=True)
        if self.rank0:
            self.close()
            failure = Failure(FailureKind.DIVERGED, reason, step, time.time(), stopped_step)
            record_failure(self.layout, self.job.tracking_uri, self.job.mlflow_run_id, failure)

    def finished(self, steps: int, last_loss: float) -> None:
        from pipeline.tracking import set_status

        if self.rank0:
            self.close()
            self.layout.mark_done(steps, last_loss, time.time())
            set_status(self.job.tracking_uri, self.job.mlflow_run_id, "FINISHED")

    def close(self) -> None:
        """Send (or spill) what is still queued; safe to call twice."""
        if self.logger is not None:
            self.logger.close()
            self.logger = None
