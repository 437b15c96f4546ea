"""One study at a time per workspace: the lock that `ditscale run` and `ditscale sweep` hold while they work.

Two processes training the same experiment in the same workspace would fight over the trials' storage (both resume
the same run, both write its checkpoints). The first takes `<workdir>/runs/<experiment>/ditscale.lock`, a JSON record
of who holds it (host, pid, the process's start time, the command, when it started, its MLflow URI); a second
refuses with a message that names the first. A lock is stale, and is taken over with a note, when its holder is gone:
on the same host, its pid is dead or now belongs to another process (the recorded start time differs); from another
host, its heartbeat (rewritten every `HEARTBEAT_S` seconds) is older than `STALE_AFTER_S`. A record that cannot be
read (empty or cut short, left by an older version killed while writing it, or by a crash) is stale once the file is
`UNREADABLE_STALE_AFTER_S` old; a younger one is refused as held.

On a local folder every step is atomic, so exactly one of several processes ends up holding the lock:
- the record is written to a temporary file and hard-linked into place, which fails if a lock exists (the lock file
  is never seen empty or half written);
- a stale lock is taken over by renaming it to a name of this process's own (of several processes renaming the same
  file only one succeeds) and checking that the renamed record is the one judged stale (else a contender took over
  first: it is put back and the lock read again), then creating the new one as above.
On a file system without hard links the record is created with O_EXCL and then written; on an object store
(s3://...) creation is check-then-write and a takeover write-then-read-back, which keeps two people apart but not two
processes started in the same second.

A holder that finds its lock taken over (or removed) stops: the heartbeat records the loss and sends SIGINT to the
main thread, as Ctrl-C would, so a sweep stops its trials at their latest checkpoints; `study_lock` then raises
`LockLost`, naming the new holder. `StudyLock.check()` raises it at once; `update()` calls it.

The lock is reentrant within a process (`ditscale run` holds it and calls the sweep, which asks for it again).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timezone
from pathlib import Path
from typing import Any

import fsspec

from pipeline.config import ConfigError
from pipeline.storage import read_json, remove, write_json

HEARTBEAT_S = 30.0  # how often the holder rewrites its heartbeat (and checks that the lock is still its own)
STALE_AFTER_S = 300.0  # a lock from another host whose heartbeat is older than this is stale
UNREADABLE_STALE_AFTER_S = 10.0  # an unreadable lock file (empty, torn JSON) older than this, by its mtime, is stale
NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)  # os.link on a file system without them


class StudyLocked(ConfigError):
    """Another live process holds the study's lock; the message names it."""


class LockLost(StudyLocked):
    """Another process took over the lock this process held (or removed it); the message names the new holder."""


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

    def same_record(self, other: LockHolder | None) -> bool:
        """`other` is this record, unchanged (same holder, same heartbeat)."""
        return other is not None and (other.token, other.heartbeat_unix_s) == (self.token, self.heartbeat_unix_s)

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


@dataclass
class UnreadableLock(LockHolder):
    """A lock file whose record cannot be read (empty, torn JSON): held while young, stale once old (by mtime)."""

    problem: str = ""  # what is wrong with the file

    @classmethod
    def of_file(cls, path: str, problem: str) -> UnreadableLock:
        mtime = modified_unix_s(path)
        return cls("?", 0, None, "?", mtime, mtime, "", {}, problem)

    def age_s(self, now: float | None = None) -> float:
        return (now or time.time()) - self.heartbeat_unix_s

    def stale_reason(self, now: float | None = None) -> str | None:
        age = self.age_s(now)
        if age > UNREADABLE_STALE_AFTER_S:
            return f"its record is unreadable ({self.problem}) and {age:.0f} s old"
        return None

    def describe(self) -> str:
        return f"unknown process (the lock's record is unreadable: {self.problem}; written {self.age_s():.0f} s ago)"


def modified_unix_s(path: str) -> float:
    """When the file at `path` was last written; 0 (long ago) where the store does not say."""
    if "://" not in path:
        return os.stat(path).st_mtime
    fs, target = fsspec.core.url_to_fs(path)
    try:
        modified = fs.modified(target)
    except (NotImplementedError, OSError, KeyError):
        return 0.0
    return (modified if modified.tzinfo else modified.replace(tzinfo=timezone.utc)).timestamp()


def read_record(path: str) -> LockHolder | None:
    """The lock record at `path` (an UnreadableLock if it cannot be parsed), or None if there is no file."""
    try:
        record = read_json(path)
        return None if record is None else LockHolder.from_json(record)
    except FileNotFoundError:  # removed between the check and the read
        return None
    except (ValueError, TypeError, AttributeError) as exc:  # empty, torn or not a record
        empty = isinstance(exc, json.JSONDecodeError) and not exc.doc.strip()
        problem = "empty" if empty else f"not a lock record: {exc}"
        try:
            return UnreadableLock.of_file(path, problem)
        except FileNotFoundError:
            return None


def place(source: str, target: str) -> bool:
    """Give `target` the content of `source` unless `target` exists; True if this call created it. A hard link is
    atomic; without hard links, an exclusive create and a write (a kill in between leaves an unreadable record)."""
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
    try:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(Path(source).read_bytes())
    return True


def interrupt_main_thread() -> bool:
    """Send SIGINT to the main thread, as Ctrl-C would (it wakes a blocking wait); False where SIGINT is ignored or
    not handled by Python, so that it would do nothing or kill the process."""
    if not callable(signal.getsignal(signal.SIGINT)):
        return False
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    return True


class StudyLock:
    """The lock file of one experiment in one workspace (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.holder: LockHolder | None = None  # ours, while held
        self.depth = 0
        self._lost: str | None = None  # how the lock stopped being ours, once the heartbeat or check() found it
        self._writing = threading.Lock()  # the heartbeat and update() both rewrite the record
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._in_main_thread = False  # taken by the main thread: the heartbeat may interrupt it

    # --- reading ------------------------------------------------------------------------------------------------
    def read(self) -> LockHolder | None:
        """The current holder's record (live or stale; an UnreadableLock if the file cannot be parsed), or None when
        the lock is free."""
        return read_record(self.path)

    def live_holder(self) -> LockHolder | None:
        holder = self.read()
        return holder if holder is not None and holder.stale_reason() is None else None

    # --- taking and leaving -------------------------------------------------------------------------------------
    def acquire(self, command: str, facts: dict[str, Any] | None = None) -> None:
        """Take the lock, or raise StudyLocked naming its live holder; takes over a stale lock with a note."""
        if self.holder is not None:  # reentrant
            self.check()
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
            if reason is None and isinstance(other, UnreadableLock):
                raise StudyLocked(
                    f"the lock {self.path} is being written by another process, or was left unreadable "
                    f"({other.problem}, {other.age_s():.0f} s old): try again in a few seconds; an unreadable lock "
                    f"older than {UNREADABLE_STALE_AFTER_S:.0f} s is taken over"
                )
            if reason is None:
                raise StudyLocked(
                    f"another {other.describe()} is working on this experiment in this workspace (lock "
                    f"{self.path}): wait for it to finish, or stop it (Ctrl-C) and run this command again; to run "
                    f"both at once, give one another experiment name (--set name=...) or --workdir"
                )
            if self._take_over(mine, other, reason):
                break
        else:
            raise StudyLocked(f"could not take {self.path}: other processes keep taking it; try again")
        self.holder, self.depth, self._lost = mine, 1, None
        self._in_main_thread = threading.current_thread() is threading.main_thread()
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="ditscale-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _create(self, mine: LockHolder) -> bool:
        """Create the lock file if there is none; True if this call created it."""
        if "://" in self.path:
            if read_json(self.path) is not None:
                return False
            write_json(self.path, asdict(mine))
            return True
        folder, name = os.path.split(self.path)
        staged = os.path.join(folder, f".{name}.new-{mine.token}")
        write_json(staged, asdict(mine))  # whole, or not at all (disk full: OutOfSpaceError, no lock file)
        try:
            return place(staged, self.path)
        finally:
            os.unlink(staged)

    def _take_over(self, mine: LockHolder, stale: LockHolder, reason: str) -> bool:
        """Replace the record judged `stale` with ours; True if this process holds the lock now, False if a
        contender was faster (read the lock again)."""
        note = f"lock: taking over {self.path} from {stale.describe()}: {reason}"
        if "://" in self.path:
            print(note, file=sys.stderr, flush=True)
            write_json(self.path, asdict(mine))
            time.sleep(0.05)
            current = self.read()
            return current is not None and current.token == mine.token
        folder, name = os.path.split(self.path)
        aside = os.path.join(folder, f".{name}.stale-{mine.token}")
        try:
            os.rename(self.path, aside)  # of contenders renaming the same file, one succeeds
        except FileNotFoundError:
            return False
        if not stale.same_record(read_record(aside)):  # a contender took over first (or the holder came back)
            place(aside, self.path)  # put it back, unless a lock was created meanwhile (its holder then learns it)
            os.unlink(aside)
            return False
        os.unlink(aside)
        print(note, file=sys.stderr, flush=True)
        return self._create(mine)

    def update(self, **facts: Any) -> None:
        """Add facts to the record (e.g. the sweep's concurrency, for `ditscale status`); raises LockLost if the lock
        was taken over."""
        if self.holder is None:
            return
        self.holder.facts.update(facts)
        self._write()

    def _write(self) -> None:
        with self._writing:
            if self.holder is None:
                return  # released meanwhile
            self.check()  # never overwrite a successor
            self.holder.heartbeat_unix_s = time.time()
            write_json(self.path, asdict(self.holder))

    # --- finding the lock taken ---------------------------------------------------------------------------------
    def is_lost(self) -> bool:
        """Whether this process held the lock and found it taken over (by its heartbeat or `check()`)."""
        return self._lost is not None

    def check(self) -> None:
        """Raise LockLost, naming the new holder, if another process has taken over the lock this one holds (or
        removed it)."""
        if self.holder is not None and self._lost is None:
            current = self.read()
            if current is None or current.token != self.holder.token:
                time.sleep(0.2)  # a contender that moved our record aside by mistake puts it back at once
                current = self.read()
            if current is None or current.token != self.holder.token:
                taken = "was removed" if current is None else f"was taken over by {current.describe()}"
                self._lost = (
                    f"the study's lock {self.path} {taken} while this process (`{self.holder.command}`) held it: "
                    f"this process stopped its study (the trials keep their latest checkpoints); check with "
                    f"`ditscale status` whether the other is at work, wait for it or stop it, then run the same "
                    f"command again to resume"
                )
        if self._lost is not None:
            raise LockLost(self._lost)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except LockLost as exc:
                if self._stop.is_set():
                    return  # released meanwhile
                stopping = self._in_main_thread and interrupt_main_thread()
                how = "stopping the study" if stopping else "stop this process yourself (it ignores SIGINT)"
                print(f"lock: {exc} ({how})", file=sys.stderr, flush=True)
                return
            except OSError:
                pass  # a missed heartbeat is harmless; the next one retries

    def release(self) -> None:
        if self.holder is None:
            return
        self.depth -= 1
        if self.depth > 0:
            return
        self._stop.set()
        with self._writing:
            current = self.read()
            if current is not None and current.token == self.holder.token:
                remove(self.path)
            self.holder = None


_HELD: dict[str, StudyLock] = {}  # path -> this process's lock on it (reentrancy across call sites)


@contextmanager
def study_lock(path: str, command: str, facts: dict[str, Any] | None = None) -> Iterator[StudyLock]:
    """Hold the study lock at `path` for the duration (reentrant within this process). Raises LockLost, naming the
    new holder, if another process took the lock over meanwhile: the heartbeat's SIGINT (see the module docstring)
    and what it caused become LockLost, and so does a body that ended normally."""
    lock = _HELD.get(path) or StudyLock(path)
    lock.acquire(command, facts)
    _HELD[path] = lock
    try:
        yield lock
        lock.check()
    except LockLost:
        raise
    except BaseException:
        if lock.is_lost():
            lock.check()  # raises LockLost from exc
        raise
    finally:
        lock.release()
        if lock.holder is None:
            _HELD.pop(path, None)
