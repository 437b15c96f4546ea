"""Starting a local Ray on a loaded machine: Ray 2.60 gives the node 30 s to register (a constant); a start that
times out is retried after its leftover processes are stopped, and any other error is raised at once."""

import subprocess
import sys

import pytest
import ray

from pipeline import ray_utils


def test_a_start_that_times_out_is_retried_and_other_errors_are_not(monkeypatch, capsys):
    calls, shutdowns = [], []
    failures = iter([True, False])

    def init(**options):
        calls.append(options)
        if next(failures):
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.setattr(ray_utils, "_ray_children", lambda: [])
    ray_utils.start_local_ray(num_cpus=1)
    assert calls == [{"num_cpus": 1}] * 2 and shutdowns == [1]  # the first start failed, the second one is used
    assert "starting it again (2 of 3)" in capsys.readouterr().out

    def raising(error):
        def init(**options):
            calls.append(options)
            raise error

        return init

    calls.clear()
    monkeypatch.setattr(ray, "init", raising(ValueError("num_cpus must be a number")))
    with pytest.raises(ValueError, match="num_cpus"):
        ray_utils.start_local_ray(num_cpus="x")
    assert len(calls) == 1

    calls.clear()
    monkeypatch.setattr(ray, "init", raising(Exception("The current node timed out during startup.")))
    with pytest.raises(Exception, match="timed out during startup"):
        ray_utils.start_local_ray(num_cpus=1)
    assert len(calls) == ray_utils.START_ATTEMPTS


def test_the_leftovers_are_this_processs_children_that_run_ray():
    code = "import time; time.sleep(60)"
    ray_like = subprocess.Popen([sys.executable, "-c", code, "/venv/site-packages/ray/core/raylet"])
    other = subprocess.Popen([sys.executable, "-c", code, "/somewhere/else"])
    try:
        found = ray_utils._ray_children()
        assert ray_like.pid in found and other.pid not in found
    finally:
        ray_like.kill()
        other.kill()
        ray_like.wait()
        other.wait()
