"""MetricLogger: metric points sent to one MLflow run from a thread of its own, so that the training loop never waits
on MLflow and no point is lost to a server restart, a process killed after a checkpoint, or a point MLflow refuses.

Where a point can be:
    queued     in memory, at most `max_queued_points`; past that the oldest are spilled
    spilled    in the spill file (pipeline.tracking.spill), fsynced: sent by this logger when MLflow answers again, or
               by the next MetricLogger on the same file (the next run of the trial)
    sent       taken by MLflow. A point sent twice (queued, spilled at a checkpoint while its batch was in flight, then
               sent from the file) is stored once: MLflow's store drops an exact duplicate (key, value, time, step).
    set aside  refused for good (a deleted run, a name or value MLflow rejects): warned about with its metric and
               step, counted in `refused`, never retried and never spilled
Spilled points are always older than queued ones and the file is sent first, so points arrive in the order logged.
"""

from __future__ import annotations

import collections
import itertools
import sys
import threading
import time

from pipeline.tracking.runs import client
from pipeline.tracking.spill import SpillFile

BATCH = 1000  # MLflow takes at most 1000 metrics per log_batch call
# MLflow error codes that say a request will never be taken, however often it is sent again. Any other failure
# (a connection refused, a timeout, a 5xx, a rate limit) is worth retrying.
PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"})


def is_permanent(exc: BaseException) -> bool:
    """Whether MLflow refused a request for good (an MlflowException, RestException included, with an error code of
    PERMANENT_ERRORS), not for now."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in PERMANENT_ERRORS


def describe(points) -> str:
    """'loss, mse at steps 10-40 (8 points)': which metrics and steps a group of points holds."""
    keys = sorted({str(m.key) for m in points})
    names = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    lo, hi = min(m.step for m in points), max(m.step for m in points)
    return f"{names} at step{f' {lo}' if lo == hi else f's {lo}-{hi}'} ({len(points)} point{'s' * (len(points) > 1)})"


class MetricLogger:
    """Logs metric dicts at a step to one run, from a thread of its own, and never loses a point it can send.

    `log` only queues the points. The thread sends them in order; a batch MLflow does not take for now is retried
    with backoff, one it refuses for good is split until the refused points are found, and those are set aside.
    Call `checkpoint_barrier` before reporting a checkpoint, and `close` at the end.

    uri, run_id: the tracking URI and the run the points go to.
    spill: the spill file (a path or URI), or None (then nothing survives this process and the oldest points past
        `max_queued_points` are dropped with a warning). Points found in it are sent first.
    give_up_s: `close` waits for MLflow while it took a batch in the last `give_up_s` seconds, then spills the rest.
    max_queued_points: the most points held in memory; past it the oldest are spilled, down to half of it.
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        spill: str | None = None,
        give_up_s: float = 600.0,
        max_queued_points: int = 100_000,
    ):
        self.client, self.run_id = client(uri), run_id
        self.give_up_s, self.max_queued_points = give_up_s, max_queued_points
        self.spill = SpillFile(spill) if spill else None
        self.pending: collections.deque = collections.deque()  # (sequence number, Metric) not yet taken, in order
        self.sequence = itertools.count()
        self.lock = threading.Condition()
        self.closing = threading.Event()
        self.failures = 0  # failed sends so far (each retried)
        self.last_error: str | None = None
        self.last_success = time.monotonic()
        self.refused = 0  # points set aside: refused for good by MLflow, or not numbers
        self.dropped = 0  # points dropped past max_queued_points without a spill file
        self.replayed = self.spill.count() if self.spill else 0  # points found in the spill file at the start
        self.spilled = self.replayed  # points in the spill file not sent yet
        self.spill_backlog = self.spill is not None and self.spill.exists()  # the file is there: send it, remove it
        self.spill_offset = 0  # bytes of the spill file sent so far
        self.thread = threading.Thread(target=self._send_loop, name="ditscale-metrics", daemon=True)
        self.thread.start()

    # --- the caller's side ---------------------------------------------------------------------------------------
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue the points of `metrics` (None values skipped) at `step`; returns at once."""
        from mlflow.entities import Metric

        now, points, not_numbers = int(time.time() * 1000), [], []
        for key, value in metrics.items():
            try:
                if value is not None:
                    points.append(Metric(key, float(value), now, int(step)))
            except (TypeError, ValueError):
                not_numbers.append(f"{key}={value!r}")
        with self.lock:
            if not_numbers:
                self._set_aside(len(not_numbers), f"{', '.join(not_numbers)} at step {step}", "not a number")
            self.pending.extend((next(self.sequence), m) for m in points)
            if len(self.pending) > self.max_queued_points:
                self._overflow()
            self.lock.notify_all()

    def checkpoint_barrier(self, timeout_s: float = 30.0) -> int:
        """Call before reporting a checkpoint; returns how many points were spilled.

        Waits until every point logged so far is in MLflow: at most `timeout_s` seconds, and no longer than a send
        that fails (MLflow is unreachable: waiting would not help). The points still unsent are then appended to the
        spill file and fsynced before it returns, so that a process killed right after the checkpoint loses none of
        them: this logger sends them when MLflow answers again, or the next run of the trial does. Points already
        in the spill file are durable and not waited for. Without a spill file it only waits, and returns 0.
        """
        deadline = time.monotonic() + timeout_s
        with self.lock:
            failures = self.failures
            while self.pending and self.failures == failures and self.thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.lock.wait(left)
            if not self.pending or self.spill is None:
                return 0
            count = self._spill_oldest(len(self.pending))
        _warn(
            f"{count} metric points not taken yet ({self.last_error or f'none sent in {timeout_s:.0f} s'}) are kept "
            f"in {self.spill.path} for this checkpoint; they are sent when MLflow answers, or by the next run"
        )
        return count

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every point, queued or spilled, is in MLflow (at most `timeout_s`); True if they all are."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self.lock:
            while (self.pending or self.spill_backlog) and self.thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.lock.wait(1.0 if left is None else min(1.0, left))
            return not self.pending and not self.spill_backlog

    def close(self) -> int:
        """Send what is queued or spilled (waiting while MLflow makes progress, up to `give_up_s` after its last
        success); spill the rest. Returns how many points MLflow did not take: kept in the spill file, or lost without
        one (0: every point reached MLflow or was set aside)."""
        self.closing.set()
        with self.lock:
            self.lock.notify_all()
        self.thread.join()
        with self.lock:
            lost = len(self.pending) if self.spill is None else 0
            if lost:
                _warn(f"MLflow took no metric ({self.last_error}): {describe([m for _, m in self.pending])} lost")
            elif self.pending:
                self._spill_oldest(len(self.pending))
            kept = self.spilled if self.spill_backlog else 0
        if kept:
            _warn(
                f"MLflow took no metric for {self.give_up_s:.0f} s ({self.last_error}): {kept} points kept in "
                f"{self.spill.path}, sent by the next run of this trial"
            )
        return kept + lost + self.dropped

    # --- under the lock ------------------------------------------------------------------------------------------
    def _spill_oldest(self, count: int) -> int:
        """Move the `count` oldest queued points to the spill file (durable when it returns)."""
        self.spill.append([m for _, m in itertools.islice(self.pending, count)])
        for _ in range(count):
            self.pending.popleft()
        self.spilled += count
        self.spill_backlog = True
        self.lock.notify_all()
        return count

    def _overflow(self) -> None:
        count = len(self.pending) - self.max_queued_points // 2
        if self.spill is not None:
            self._spill_oldest(count)
            return
        lost = [self.pending.popleft()[1] for _ in range(count)]
        self.dropped += count
        _warn(f"more than {self.max_queued_points} metric points queued and no spill file: dropped {describe(lost)}")

    def _set_aside(self, count: int, what: str, why: str) -> None:
        self.refused += count
        _warn(f"refused for good ({why}): {what}; set aside, never sent again ({self.refused} so far)")

    # --- the sending thread --------------------------------------------------------------------------------------
    def _next_batch(self) -> tuple[str, list, int] | None:
        """(source, points, end) to send next: the spill file's oldest points first, then the queue's; None when
        closing with nothing left. `end`: the spill file's offset after them, or the last point's sequence number."""
        with self.lock:
            while True:
                if self.spill_backlog:
                    points, end = self.spill.read(self.spill_offset, BATCH)
                    if points:
                        return "spill", points, end
                    self.spill_offset = end
                    if self.spill.remove_if_read(end):  # every point in it is sent
                        self.spill_backlog, self.spilled, self.spill_offset = False, 0, 0
                        self.lock.notify_all()
                    continue
                if self.pending:
                    items = list(itertools.islice(self.pending, BATCH))
                    return "queue", [m for _, m in items], items[-1][0]
                if self.closing.is_set():
                    return None
                self.lock.wait()

    def _send_loop(self) -> None:
        backoff = 0.5
        while True:
            try:
                batch = self._next_batch()
                if batch is None:
                    return
                source, points, end = batch
                refused = self._send(points)
            except Exception as exc:  # noqa: BLE001 (any failure but a refusal: keep the points and try again)
                with self.lock:
                    self.failures += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                    self.lock.notify_all()
                    if self.closing.is_set() and time.monotonic() - self.last_success > self.give_up_s:
                        return  # close() spills what is left
                self.closing.wait(backoff)
                backoff = min(10.0, backoff * 2)
                continue
            backoff = 0.5
            with self.lock:
                for group, why in refused:
                    self._set_aside(len(group), describe(group), why)
                if source == "spill":
                    self.spill_offset, self.spilled = end, max(0, self.spilled - len(points))
                while self.pending and self.pending[0][0] <= (end if source == "queue" else -1):
                    self.pending.popleft()  # (the points already spilled meanwhile are not queued any more)
                self.last_success = time.monotonic()
                self.lock.notify_all()

    def _send(self, points: list) -> list[tuple[list, str]]:
        """Send `points`; returns the groups MLflow refused for good, with why. A refused batch is split in halves
        until the refused points are found (all of them at once if the run itself is gone). Raises on any other
        failure."""
        try:
            self.client.log_batch(self.run_id, metrics=points)
            return []
        except Exception as exc:
            if not is_permanent(exc):
                raise
            why = f"{exc.error_code}: {str(exc).splitlines()[0][:200]}"
        if len(points) == 1 or not self._run_is_active():
            return [(points, why)]
        half = len(points) // 2
        return self._send(points[:half]) + self._send(points[half:])

    def _run_is_active(self) -> bool:
        try:
            return self.client.get_run(self.run_id).info.lifecycle_stage == "active"
        except Exception as exc:
            if is_permanent(exc):
                return False
            raise


def _warn(what: str) -> None:
    print(f"MLflow: {what}", file=sys.stderr, flush=True)
