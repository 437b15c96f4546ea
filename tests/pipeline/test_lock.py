"""One study at a time per workspace: a second `ditscale run`/`sweep` of the same experiment refuses and names the
first; a lock left by a process that is gone is taken over."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.layout import Workspace
from pipeline.lock import StudyLock, StudyLocked, process_start_ticks, study_lock

ROOT = Path(__file__).resolve().parents[2]

HOLD = """
import sys, time
from pipeline.lock import study_lock
with study_lock(sys.argv[1], "ditscale run smoke (the first)"):
    print("HELD", flush=True)
    time.sleep(600)
"""


@pytest.fixture()
def holder(tmp_path):
    """A live process holding the lock of experiment `smoke` in tmp_path/work."""
    workdir = tmp_path / "work"
    path = Workspace(str(workdir)).lock("smoke")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, path], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "HELD", proc.stderr.read()
    yield workdir, path, proc
    proc.kill()
    proc.wait()


def test_a_second_study_refuses_and_names_the_first(holder):
    workdir, path, proc = holder
    with pytest.raises(StudyLocked, match=rf"ditscale run smoke \(the first\)`? \(pid {proc.pid} on"):
        with study_lock(path, "ditscale sweep smoke"):
            pass
    record = json.loads(Path(path).read_text())
    assert record["pid"] == proc.pid  # the refusal left the first's lock alone


def test_the_cli_refuses_before_any_work(holder):
    workdir, path, proc = holder
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "smoke", "--workdir", str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    assert f"pid {proc.pid}" in out.stderr and "wait for it to finish" in out.stderr
    assert not (workdir / "shards").exists() and not (workdir / "toy").exists()  # nothing was started


def test_a_lock_left_by_a_dead_process_is_taken_over(holder, capsys):
    workdir, path, proc = holder
    proc.kill()
    proc.wait()
    assert Path(path).exists()  # SIGKILL leaves the lock behind
    with study_lock(path, "ditscale run smoke (the second)") as lock:
        assert lock.read().pid == os.getpid()
    assert f"process {proc.pid} is no longer running" in capsys.readouterr().err
    assert not Path(path).exists()  # released on exit


def test_a_reused_pid_and_an_old_heartbeat_are_stale(tmp_path):
    path = str(tmp_path / "ditscale.lock")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": "c", "token": "t", "facts": {}}
    now = time.time()
    # this process's pid, but a start time that is not this process's: the holder that had this pid is gone
    Path(path).write_text(
        json.dumps({**me, "start_ticks": process_start_ticks(os.getpid()) + 1, "started_unix_s": now,
                    "heartbeat_unix_s": now})
    )  # fmt: skip
    assert "pid now belongs to another process" in StudyLock(path).read().stale_reason()
    # another host: judged by its heartbeat
    fresh = {**me, "host": "elsewhere", "start_ticks": 1, "started_unix_s": now, "heartbeat_unix_s": now}
    Path(path).write_text(json.dumps(fresh))
    assert StudyLock(path).read().stale_reason() is None
    with pytest.raises(StudyLocked, match="on elsewhere"):
        StudyLock(path).acquire("ditscale run x")
    Path(path).write_text(json.dumps({**fresh, "heartbeat_unix_s": now - 3600}))
    assert "heartbeat is 60 minutes old" in StudyLock(path).read().stale_reason()
    lock = StudyLock(path)
    lock.acquire("ditscale run x")
    assert lock.read().host == socket.gethostname()
    lock.release()


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    path = str(tmp_path / "ditscale.lock")
    with study_lock(path, "ditscale run x") as outer:
        with study_lock(path, "ditscale sweep x") as inner:  # what `ditscale run` does when it calls the sweep
            assert inner is outer
            inner.update(concurrent_trials=2)
        assert Path(path).exists() and outer.read().facts == {"concurrent_trials": 2}
    assert not Path(path).exists()
