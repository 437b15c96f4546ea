"""One study at a time per workspace: a second `ditscale run`/`sweep` of the same experiment refuses and names the
first; a lock left by a process that is gone is taken over."""

import errno
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.layout import Workspace
from pipeline.lock import (
    UNREADABLE_STALE_AFTER_S,
    LockLost,
    StudyLock,
    StudyLocked,
    process_start_ticks,
    study_lock,
)

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


# --- two contenders for one stale lock, a holder that lost its lock, unreadable lock files -------------------------

CONTEND = """
import sys, time
from pathlib import Path
import pipeline.lock as L
path, sync, name, stall_s = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
judge, judging = L.LockHolder.stale_reason, {"round": None}

def judged_then_stalled(holder, now=None):
    # both contenders judge the same stale record before either takes it over; then this one stalls for stall_s
    reason = judge(holder, now)
    if reason is not None and judging["round"] is not None:
        (sync / f"{judging['round']}-{name}").touch()
        while len(list(sync.glob(f"{judging['round']}-*"))) < 2:
            time.sleep(0.002)
        judging["round"] = None
        time.sleep(stall_s)
    return reason

L.LockHolder.stale_reason = judged_then_stalled
for line in sys.stdin:  # one line per round
    judging["round"] = line.strip()
    try:
        with L.study_lock(path, f"ditscale run smoke (contender {name})"):
            print("HELD", flush=True)
            sys.stdin.readline()  # hold until the test has heard both
        print("RELEASED", flush=True)
    except L.StudyLocked as exc:
        print("REFUSED", str(exc).replace(chr(10), " "), flush=True)
"""


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def stale_record(pid: int, command: str = "ditscale run smoke (killed)") -> str:
    now = time.time()
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": pid,
            "start_ticks": 1,
            "command": command,
            "started_unix_s": now,
            "heartbeat_unix_s": now,
            "token": os.urandom(8).hex(),
            "facts": {},
        }
    )


def test_of_two_contenders_for_a_stale_lock_one_holds_it_and_the_stalled_one_is_refused(tmp_path):
    """Both judge the lock of a killed process stale; one is stalled for 150 ms (three times the old read-back
    wait) between judging and taking over. Exactly one holds the lock, every time; the other is told who."""
    path, sync = tmp_path / "ditscale.lock", tmp_path / "sync"
    sync.mkdir()
    contenders = {
        name: subprocess.Popen(
            [sys.executable, "-c", CONTEND, str(path), str(sync), name, stall_s],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, stall_s in (("A", "0"), ("B", "0.15"))
    }
    a, b = contenders["A"], contenders["B"]
    try:
        for round_ in range(5):
            path.write_text(stale_record(dead_pid()))
            for proc in (a, b):
                proc.stdin.write(f"{round_}\n")
                proc.stdin.flush()
            said = {name: proc.stdout.readline().strip() for name, proc in contenders.items()}
            assert said["A"] == "HELD" and said["B"].startswith("REFUSED"), f"round {round_}: {said}"
            assert f"contender A)` (pid {a.pid} on" in said["B"] and "wait for it to finish" in said["B"]
            assert json.loads(path.read_text())["pid"] == a.pid
            a.stdin.write("release\n")
            a.stdin.flush()
            assert a.stdout.readline().strip() == "RELEASED"
            assert not path.exists()
            assert sorted(p.name for p in tmp_path.iterdir()) == ["sync"]  # no moved-aside or staged files left
    finally:
        for proc in (a, b):
            proc.kill()
            proc.wait()


def successor(path: str) -> None:
    """Replace the lock's record with another holder's, as a contender that judged the holder gone would."""
    now = time.time()
    record = {
        "host": "elsewhere",
        "pid": 4242,
        "start_ticks": 1,
        "command": "ditscale run smoke (the second)",
        "started_unix_s": now,
        "heartbeat_unix_s": now,
        "token": "theirs",
        "facts": {},
    }
    Path(f"{path}.tmp").write_text(json.dumps(record))
    os.replace(f"{path}.tmp", path)


NAMES_THE_SUCCESSOR = r"was taken over by `ditscale run smoke \(the second\)` \(pid 4242 on elsewhere"


def test_a_holder_whose_lock_was_taken_over_learns_it(tmp_path):
    path = str(tmp_path / "ditscale.lock")
    with pytest.raises(LockLost, match=NAMES_THE_SUCCESSOR):  # the study stops even if its body ended normally
        with study_lock(path, "ditscale run smoke (the first)") as lock:
            lock.check()  # still ours
            successor(path)
            with pytest.raises(LockLost, match=NAMES_THE_SUCCESSOR):
                lock.check()
            assert lock.is_lost()
            with pytest.raises(LockLost):
                lock.update(concurrent_trials=2)  # never written over the successor's record
    assert json.loads(Path(path).read_text())["pid"] == 4242  # the release left the successor's lock alone


LOSE = """
import sys, time
import pipeline.lock as L
L.HEARTBEAT_S = 0.1
try:
    with L.study_lock(sys.argv[1], "ditscale sweep smoke (the first)"):
        print("HELD", flush=True)
        time.sleep(60)  # a sweep at work
    print("NOT STOPPED", flush=True)
except L.LockLost as exc:
    print("LOST", exc, flush=True)
    sys.exit(3)
"""


def test_the_heartbeat_stops_a_study_whose_lock_was_taken_over(tmp_path):
    path = str(tmp_path / "ditscale.lock")
    proc = subprocess.Popen(
        [sys.executable, "-c", LOSE, path], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "HELD", proc.stderr.read()
        successor(path)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 3, (out, err)
    assert re.search(f"LOST .*{NAMES_THE_SUCCESSOR}", out) and "run the same command again" in out
    assert "lock: the study's lock" in err and "stopping the study" in err
    assert json.loads(Path(path).read_text())["pid"] == 4242


UNREADABLE = {"empty": "", "torn": '{"host": "gpu-3", "pid": 12', "zeroed": "\0" * 64}


@pytest.mark.parametrize("content", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_an_unreadable_lock_is_held_while_fresh_and_taken_over_once_old(tmp_path, capsys, content):
    path = tmp_path / "ditscale.lock"
    path.write_text(content)
    holder = StudyLock(str(path)).read()  # what `ditscale status` reads: an unknown holder, no JSONDecodeError
    assert holder.stale_reason() is None and "unreadable" in holder.describe()
    with pytest.raises(StudyLocked, match=r"unreadable .* try again in a few seconds"):
        StudyLock(str(path)).acquire("ditscale run x")
    assert path.read_text() == content  # left alone
    old = time.time() - UNREADABLE_STALE_AFTER_S - 5
    os.utime(path, (old, old))
    assert "its record is unreadable" in StudyLock(str(path)).read().stale_reason()
    assert StudyLock(str(path)).live_holder() is None
    with study_lock(str(path), "ditscale run x") as lock:
        assert lock.read().pid == os.getpid()
    assert "lock: taking over" in capsys.readouterr().err
    assert not path.exists()


def test_status_reads_an_old_empty_lock(tmp_path):
    workdir = tmp_path / "work"
    path = Path(Workspace(str(workdir)).lock("smoke"))
    path.parent.mkdir(parents=True)
    path.write_text("")
    old = time.time() - UNREADABLE_STALE_AFTER_S - 5
    os.utime(path, (old, old))
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status", "smoke", "--workdir", str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "not running (the last run's lock is stale: its record is unreadable (empty)" in out.stdout


def test_without_hard_links_the_lock_is_still_exclusive(tmp_path, monkeypatch):
    def no_hard_links(source, target):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported", source)

    monkeypatch.setattr(os, "link", no_hard_links)
    path = str(tmp_path / "ditscale.lock")
    with study_lock(path, "ditscale run x") as lock:
        assert lock.read().pid == os.getpid()
        with pytest.raises(StudyLocked, match="held by this process already"):
            StudyLock(path).acquire("ditscale run x")
    assert not Path(path).exists() and list(tmp_path.iterdir()) == []
