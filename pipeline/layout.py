"""Where everything lives in a workspace: the one module that knows the folder and file names.

    <workdir>/toy/<style><res>-c<classes>-n<per class>-s<seed>/    toy images (ImageNet layout)
    <workdir>/shards/...                                            shard folders (as data.shards names them)
    <workdir>/runs/<experiment>/<run>/                              one trial (Ray Train's storage of that run)
        checkpoint_*/checkpoint.pt                                  resumable checkpoints (written through Ray Train)
        checkpoint_*/ditscale_step.json                             the step each holds (checkpoints go by step)
        milestones/ema-0000600.pt                                   EMA weights at the steps the fid stage scores
        milestones/ema0.999-0000600.pt                              ... of a further EMA decay (train.ema_decays)
        workers/rank0.json                                          which process and node each rank ran on
        ditscale_done.json                                          written last: the trial finished its steps
        ditscale_failed.json                                        why it stopped for good (diverged, an error)
        unsent_metrics.jsonl                                        metric points MLflow could not take (replayed)
    <workdir>/runs/<experiment>/_tune/                              Ray Tune's own state
    <workdir>/runs/<experiment>/ditscale.lock                       held by the `ditscale run`/`sweep` at work
    <workdir>/fid/reference/, <workdir>/fid/extractors/             FID caches
    <workdir>/analysis/<experiment>/                                figures, tables, fits
    <workdir>/mlflow.db, <workdir>/mlartifacts/                     the embedded MLflow store

A workspace is a local folder or an fsspec URI (s3://...) for everything but the MLflow store. Stages ask this
module for paths; none builds them or parses file names itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.storage import exists, list_names, read_json, remove, write_json
from pipeline.trial_state import Failure

CHECKPOINT_FILE = "checkpoint.pt"  # inside each Ray Train checkpoint folder
CHECKPOINT_STEP_FILE = "ditscale_step.json"  # beside it: {"step": N}, so that checkpoints are ordered by step


def write_checkpoint_step(folder: str, step: int) -> None:
    """Record the step a checkpoint folder holds (before Ray Train copies the folder into the trial's)."""
    write_json(f"{folder}/{CHECKPOINT_STEP_FILE}", {"step": step})


def checkpoint_step(folder: str) -> int | None:
    """The step a checkpoint folder holds, or None when its record is missing or unreadable."""
    try:
        record = read_json(f"{folder}/{CHECKPOINT_STEP_FILE}")
        return None if record is None else int(record["step"])
    except (ValueError, KeyError, TypeError, OSError):
        return None


_MILESTONE = re.compile(r"^ema([0-9.]*)-(\d{7})\.pt$")  # ema-<step> (train.ema_decay) or ema<decay>-<step>


def ema_label(decay: float) -> str:
    """'ema0.999': names a further EMA decay's milestone files and its metrics (`ema0.999/fid`)."""
    return "ema" + f"{float(decay):.10f}".rstrip("0").rstrip(".")


def resolve_workdir(workdir: str | None = None) -> str:
    """--workdir, else DITSCALE_WORKDIR, else ./ditscale-work; local paths made absolute."""
    chosen = workdir or os.environ.get("DITSCALE_WORKDIR") or "ditscale-work"
    return chosen if "://" in chosen else str(Path(chosen).resolve())


@dataclass(frozen=True)
class TrialLayout:
    """The folder of one trial: <workdir>/runs/<experiment>/<run name>."""

    root: str

    @property
    def run_name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    @property
    def storage(self) -> str:
        """Ray Train's storage_path: the trial folder is <storage>/<run name>."""
        return self.root.rstrip("/").rsplit("/", 1)[0]

    # --- EMA milestones ------------------------------------------------------------------------------------------
    def milestone(self, step: int, decay: float | None = None) -> str:
        """The EMA weights at `step`: of train.ema_decay (decay None), or of a further decay of train.ema_decays."""
        return f"{self.root}/milestones/{'ema' if decay is None else ema_label(decay)}-{step:07d}.pt"

    def milestones(self, decay: float | None = None) -> dict[int, str]:
        """{step: path} of the EMA milestones written so far, of train.ema_decay (None) or of `decay`."""
        folder, wanted = f"{self.root}/milestones", "" if decay is None else ema_label(decay).removeprefix("ema")
        return {
            int(m[2]): f"{folder}/{name}"
            for name in list_names(folder)
            if (m := _MILESTONE.match(name)) and m[1] == wanted
        }

    # --- the finished marker -------------------------------------------------------------------------------------
    @property
    def done_file(self) -> str:
        return f"{self.root}/ditscale_done.json"

    def mark_done(self, step: int, final_loss: float, finished_unix_s: float) -> None:
        write_json(self.done_file, {"step": step, "final_loss": final_loss, "finished_unix_s": finished_unix_s})

    def done_record(self) -> dict[str, Any] | None:
        """{"step", "final_loss", "finished_unix_s"} of a finished trial, or None."""
        return read_json(self.done_file)

    def done_step(self) -> int | None:
        """The step the trial finished at, or None if it has not finished."""
        record = self.done_record()
        return None if record is None else int(record["step"])

    # --- the failure record ---------------------------------------------------------------------------------------
    @property
    def failure_file(self) -> str:
        return f"{self.root}/ditscale_failed.json"

    def mark_failed(self, failure: Failure) -> None:
        """Record why the trial stopped for good (pipeline.trial_state.Failure: its kind decides whether a re-run
        trains it again)."""
        write_json(self.failure_file, failure.to_json())

    def failure(self) -> Failure | None:
        """The last failure recorded, or None (also for a torn record: it is rewritten by the next failure)."""
        try:
            record = read_json(self.failure_file)
            return None if record is None else Failure.from_json(record)
        except (ValueError, KeyError, TypeError):
            return None

    def clear_failure(self) -> None:
        remove(self.failure_file)

    # --- resumable checkpoints -----------------------------------------------------------------------------------
    def has_checkpoint(self) -> bool:
        """Whether Ray Train has registered a checkpoint of this trial (a re-run resumes from it)."""
        return exists(f"{self.root}/checkpoint_manager_snapshot.json")

    def checkpoint_folders(self) -> list[tuple[int | None, str]]:
        """(step, folder) of the checkpoint folders Ray Train wrote for this trial, by the step each holds, newest
        first; a folder whose step record is missing or torn (a write cut short) comes last, step None."""
        names = [n for n in list_names(self.root) if n.startswith("checkpoint_") and not n.endswith(".json")]
        found = [(checkpoint_step(f"{self.root}/{n}"), f"{self.root}/{n}") for n in names]
        return sorted(found, key=lambda item: (item[0] is not None, item[0] or 0, item[1]), reverse=True)

    @property
    def unsent_metrics(self) -> str:
        """Metric points that could not reach MLflow when the trial ended: replayed by the next run."""
        return f"{self.root}/unsent_metrics.jsonl"

    # --- per-rank records ----------------------------------------------------------------------------------------
    def worker_file(self, rank: int) -> str:
        return f"{self.root}/workers/rank{rank}.json"

    def record_worker(self, rank: int, facts: dict[str, Any]) -> None:
        write_json(self.worker_file(rank), facts)

    def worker(self, rank: int) -> dict[str, Any] | None:
        return read_json(self.worker_file(rank))


@dataclass(frozen=True)
class Workspace:
    """A workspace folder (local path or URI) and the paths inside it."""

    root: str

    def path(self, path: str) -> str:
        """A path from a config: URIs and absolute paths as they are, others under the workspace."""
        if "://" in path or Path(path).is_absolute():
            return path
        return f"{self.root.rstrip('/')}/{path}"

    @property
    def is_local(self) -> bool:
        return "://" not in self.root

    def runs(self, experiment: str) -> str:
        """Ray storage of an experiment's trials: <runs>/<run name>/ per trial."""
        return self.path(f"runs/{experiment}")

    def tune_storage(self, experiment: str) -> str:
        return f"{self.runs(experiment)}/_tune"

    def lock(self, experiment: str) -> str:
        """The study lock of `experiment` (pipeline.lock): held by the `ditscale run` or `sweep` at work on it."""
        return f"{self.runs(experiment)}/ditscale.lock"

    def trial(self, experiment: str, run_name: str) -> TrialLayout:
        return TrialLayout(f"{self.runs(experiment)}/{run_name}")

    def toy(self, style: str, resolution: int, num_classes: int, per_class: int, seed: int) -> str:
        return self.path(f"toy/{style}{resolution}-c{num_classes}-n{per_class}-s{seed}")

    def analysis(self, experiment: str) -> str:
        return self.path(f"analysis/{experiment}")

    @property
    def fid_reference(self) -> Path:
        return Path(self.path("fid/reference"))

    @property
    def fid_extractors(self) -> Path:
        return Path(self.path("fid/extractors"))

    @property
    def mlflow_db(self) -> Path:
        return Path(self.path("mlflow.db"))

    @property
    def mlflow_artifacts(self) -> Path:
        return Path(self.path("mlartifacts"))

    @property
    def mlflow_log(self) -> Path:
        return Path(self.path("mlflow-server.log"))
