"""One study at a time per workspace: the lock that `ditscale run` and `ditscale sweep` hold while they work.

Two processes training the same experiment in the same workspace would fight over the trials' storage (both resume
the same run, both write its checkpoints). The first takes `<workdir>/runs/<experiment>/ditscale.lock`, a JSON record
of who holds it (host, pid, the process's start time, the command, when it started, its MLflow URI); a second
refuses with a message that names the first. A lock is stale, and is taken over with a note, when its holder is gone:
on the same host, its pid is dead or now belongs to another process (the recorded start time differs); from another
host, its heartbeat (rewritten every `HEARTBEAT_S` seconds) is older than `STALE_AFTER_S`.

The lock is reentrant within a process (`ditscale run` holds it and calls the sweep, which asks for it again).
On a local folder it is created with O_EXCL; on an object store (s3://...) creation is check-then-write, which keeps
two people apart but not two processes started in the same second.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.storage import read_json, remove, write_json

HEARTBEAT_S = 30.0  # how often the holder rewrites its heartbeat
STALE_AFTER_S = 300.0  # a lock from another host whose heartbeat is older than this is stale


class StudyLocked(ConfigError):
    """Another live process holds the study's lock; the message names it."""


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (tells a pid reused by another process apart); None if there
    is no such process or no /proc."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


@dataclass
class LockHolder:
    """The record in the lock file."""

    host: str
    pid: int
    start_ticks: int | None  # /proc/<pid>/stat starttime: a reused pid has another
    command: str
    started_unix_s: float
    heartbeat_unix_s: float
    token: str  # tells this holder's record from a successor's
    facts: dict[str, Any] = field(default_factory=dict)  # what the holder wants others to know (MLflow URI, ...)

    @classmethod
    def of_this_process(cls, command: str, facts: dict[str, Any]) -> LockHolder:
        now = time.time()
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start_ticks(pid), command, now, now, uuid.uuid4().hex, facts)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> LockHolder:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in record.items() if k in names})

    def is_this_process(self) -> bool:
        return self.host == socket.gethostname() and self.pid == os.getpid()

    def stale_reason(self, now: float | None = None) -> str | None:
        """Why the holder is gone, or None if it may still be working."""
        if self.host == socket.gethostname():
            if not pid_alive(self.pid):
                return f"process {self.pid} is no longer running"
            ticks = process_start_ticks(self.pid)
            if self.start_ticks is not None and ticks is not None and ticks != self.start_ticks:
                return f"process {self.pid} has ended (its pid now belongs to another process)"
            return None
        age = (now or time.time()) - self.heartbeat_unix_s
        if age > STALE_AFTER_S:
            return f"its heartbeat is {age / 60:.0f} minutes old"
        return None

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_unix_s))
        return f"`{self.command}` (pid {self.pid} on {self.host}, started {started})"


class StudyLock:
    """The lock file of one experiment in one workspace (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.holder: LockHolder | None = None  # ours, while held
        self.depth = 0
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # --- reading ------------------------------------------------------------------------------------------------
    def read(self) -> LockHolder | None:
        """The current holder's record (live or stale), or None when the lock is free."""
        try:
            record = read_json(self.path)
        except (ValueError, OSError):  # a record being replaced at this instant, or unreadable: treat as held
            time.sleep(0.1)
            record = read_json(self.path)
        return None if record is None else LockHolder.from_json(record)

    def live_holder(self) -> LockHolder | None:
        holder = self.read()
        return holder if holder is not None and holder.stale_reason() is None else None

    # --- taking and leaving -------------------------------------------------------------------------------------
    def acquire(self, command: str, facts: dict[str, Any] | None = None) -> None:
        """Take the lock, or raise StudyLocked naming its live holder; takes over a stale lock with a note."""
        if self.holder is not None:  # reentrant
            self.depth += 1
            return
        mine = LockHolder.of_this_process(command, facts or {})
        for _ in range(3):
            if self._create(mine):
                break
            other = self.read()
            if other is None:
                continue  # released meanwhile: try again
            if other.is_this_process():
                raise StudyLocked(f"{self.path} is held by this process already (a lock object was not reused)")
            reason = other.stale_reason()
            if reason is None:
                raise StudyLocked(
                    f"another {other.describe()} is working on this experiment in this workspace (lock "
                    f"{self.path}): wait for it to finish, or stop it (Ctrl-C) and run this command again; to run "
                    f"both at once, give one another experiment name (--set name=...) or --workdir"
                )
            print(f"lock: taking over {self.path} from {other.describe()}: {reason}", file=sys.stderr, flush=True)
            write_json(self.path, asdict(mine))
            time.sleep(0.05)
            current = self.read()
            if current is not None and current.token == mine.token:
                break
        else:
            raise StudyLocked(f"could not take {self.path}: other processes keep taking it; try again")
        self.holder, self.depth = mine, 1
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="ditscale-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _create(self, mine: LockHolder) -> bool:
        """Create the lock file if there is none; True if this call created it."""
        payload = json.dumps(asdict(mine))
        if "://" in self.path:
            if read_json(self.path) is not None:
                return False
            write_json(self.path, asdict(mine))
            return True
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        return True

    def update(self, **facts: Any) -> None:
        """Add facts to the record (e.g. the sweep's concurrency, for `ditscale status`)."""
        if self.holder is None:
            return
        self.holder.facts.update(facts)
        self._write()

    def _write(self) -> None:
        current = self.read()
        if current is None or self.holder is None or current.token != self.holder.token:
            return  # taken over by someone who judged us gone: never overwrite them
        self.holder.heartbeat_unix_s = time.time()
        write_json(self.path, asdict(self.holder))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except OSError:
                pass  # a missed heartbeat is harmless; the next one retries

    def release(self) -> None:
        if self.holder is None:
            return
        self.depth -= 1
        if self.depth > 0:
            return
        self._stop.set()
        current = self.read()
        if current is not None and current.token == self.holder.token:
            remove(self.path)
        self.holder = None


_HELD: dict[str, StudyLock] = {}  # path -> this process's lock on it (reentrancy across call sites)


@contextmanager
def study_lock(path: str, command: str, facts: dict[str, Any] | None = None) -> Iterator[StudyLock]:
    """Hold the study lock at `path` for the duration (reentrant within this process)."""
    lock = _HELD.get(path) or StudyLock(path)
    lock.acquire(command, facts)
    _HELD[path] = lock
    try:
        yield lock
    finally:
        lock.release()
        if lock.holder is None:
            _HELD.pop(path, None)
