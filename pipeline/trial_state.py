"""A trial's life as one typed state, read from its folder (pipeline.layout's records) and, for a study at work,
the study's lock. The sweep, `ditscale run`, `ditscale status` and the fid stage ask this module; none of them
works a state out for itself or reads a reason's wording.

    NEW ──▶ QUEUED ──▶ RUNNING ──▶ DONE
                          │  ▲
                          ▼  │ (the same command resumes it)
                       STOPPED
                          │
                          ▼
                   FAILED(kind)   DIVERGED: a non-finite loss or weights; never retried (it would diverge again)
                                  ERROR:    failed for good this time (Train's restarts used up); a re-run retries
                                  LOST:     its process or node was lost and Tune gave up on it; a re-run retries

QUEUED and RUNNING need a live holder of the study's lock: without one, a trial that has a checkpoint is STOPPED.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class State(str, enum.Enum):
    NEW = "new"
    QUEUED = "queued"
    RUNNING = "running"
    STOPPED = "stopped"
    DONE = "done"
    FAILED = "failed"


class FailureKind(str, enum.Enum):
    DIVERGED = "diverged"
    ERROR = "error"
    LOST = "lost"


@dataclass(frozen=True)
class Failure:
    """Why a trial stopped for good, as its failure record keeps it."""

    kind: FailureKind
    reason: str  # for people: the error's last line, or "diverged at step N: ..."
    step: int | None = None  # the first bad step of a divergence
    unix_s: float = 0.0
    stopped_step: int | None = None  # the step at which the trial stopped (a divergence: at most one after `step`)

    @property
    def retried(self) -> bool:
        """Whether running the same command again trains the trial again (a divergence would only repeat)."""
        return self.kind is not FailureKind.DIVERGED

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "reason": self.reason,
            "step": self.step,
            "unix_s": self.unix_s,
            "stopped_step": self.stopped_step,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Failure:
        kind, reason = FailureKind(record["kind"]), str(record["reason"])
        return cls(kind, reason, record.get("step"), record.get("unix_s", 0.0), record.get("stopped_step"))


@dataclass(frozen=True)
class TrialState:
    """Where a trial stands: its state, its failure (FAILED only), and the step it finished at (DONE only)."""

    state: State
    failure: Failure | None = None
    done_step: int | None = None

    @property
    def to_train(self) -> bool:
        """Whether a sweep trains it (again): everything but DONE and a divergence."""
        if self.state is State.DONE:
            return False
        return self.failure is None or self.failure.retried

    def label(self) -> str:
        """'done', 'failed (diverged)', ...: for tables."""
        return self.state.value + (f" ({self.failure.kind.value})" if self.failure is not None else "")


def trial_state(layout, steps: int, live_since_unix_s: float | None = None) -> TrialState:
    """The state of the trial whose folder is `layout`, trained for `steps` steps. `live_since_unix_s`: when the
    live holder of the study's lock started (None: no study at work), which tells QUEUED and RUNNING apart from
    NEW and STOPPED (a trial is RUNNING once its rank 0 started after the holder did)."""
    done = layout.done_step()
    if done is not None and done >= steps:
        return TrialState(State.DONE, done_step=done)
    failure = layout.failure()
    if failure is not None and (not failure.retried or live_since_unix_s is None):
        return TrialState(State.FAILED, failure)
    if live_since_unix_s is not None:
        worker = layout.worker(0)
        started = worker is not None and worker.get("started_unix_s", 0) >= live_since_unix_s
        return TrialState(State.RUNNING if started else State.QUEUED)
    return TrialState(State.STOPPED if layout.has_checkpoint() else State.NEW)
