"""`ditscale status`: the time left from the measured throughput, scheduled as the sweep schedules (longest first on
the free slots); the states and rows themselves are checked against real sweeps in test_faults.py."""

import pytest

from pipeline.experiment_files import load_experiment
from pipeline.plan import DataSpec, expand_trials
from pipeline.status import TrialRow, estimate_unstarted, time_left
from tests.helpers import pixel_manifest


@pytest.fixture(scope="module")
def trials():
    """The smoke grid's four trials (d2w64 and d4w128 x patch 4 and 8), steps 30, batch 16."""
    return {t.preset: t for t in expand_trials(load_experiment("smoke"), DataSpec.of(pixel_manifest()))}


def state(trial, state, step=0, img_per_s=None, seconds_left=None):
    return TrialRow(trial, state, "", step, trial.experiment.train.steps, None, None, img_per_s, seconds_left)


def test_a_running_trial_has_its_own_time_left_and_the_others_are_scaled_by_gflops(trials):
    big, small = trials["DiT-d4w128/4"], trials["DiT-d2w64/8"]
    running = state(big, "running", step=10, img_per_s=160.0)  # batch 16: 0.1 s per step
    running.seconds_left = (30 - 10) * running.seconds_per_step
    queued = state(small, "queued")
    estimate_unstarted([running, queued])
    assert running.seconds_left == pytest.approx(2.0) and not running.estimated
    # a step costs in proportion to Gflops x batch: the small trial's 30 steps at the big one's rate per Gflop
    assert queued.estimated
    assert queued.seconds_left == pytest.approx(30 * 0.1 * small.gflops / big.gflops)


def test_nothing_measured_means_unknown(trials):
    rows = [state(t, "new") for t in trials.values()]
    estimate_unstarted(rows)
    assert all(r.seconds_left is None for r in rows) and time_left(rows, slots=2) is None


def test_time_left_schedules_longest_first_on_the_free_slots(trials):
    t = list(trials.values())
    done = state(t[0], "done", seconds_left=0.0)
    running = state(t[1], "running", seconds_left=10.0)
    waiting = [state(t[2], "queued", seconds_left=6.0), state(t[3], "new", seconds_left=5.0)]
    # two slots: one busy for 10 s, one free; 6 s starts at once, 5 s after it (at 6): done at 11
    assert time_left([done, running, *waiting], slots=2) == pytest.approx(11.0)
    # one slot: everything in a row
    assert time_left([done, running, *waiting], slots=1) == pytest.approx(21.0)
    # three slots: each its own
    assert time_left([done, running, *waiting], slots=3) == pytest.approx(10.0)
    assert time_left([done], slots=2) == 0.0
