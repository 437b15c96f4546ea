"""The spill file of a MetricLogger: metric points MLflow has not taken yet, kept on disk so that no process death
loses them (`<trial>/unsent_metrics.jsonl`; the next MetricLogger on the same file sends them).

One JSON object per line, {"key", "value", "timestamp", "step"}. Lines are only appended, whole, and fsynced; on a
URI whose file system cannot append (s3://...) the file is rewritten under a temporary name and moved into place. A
line that does not parse (the torn last line of a process killed while appending) is skipped with a warning and
never stops a reader; the next append starts on a line of its own. The file is removed (one unlink) only once every
point in it has been sent.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


def _line(m) -> bytes:
    return (json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n").encode()


def _point(line: bytes):
    """The Metric a line holds; None for a line that is torn or not a point."""
    from mlflow.entities import Metric

    try:
        d = json.loads(line)
        return Metric(str(d["key"]), float(d["value"]), int(d["timestamp"]), int(d["step"]))
    except (ValueError, KeyError, TypeError):
        return None


class SpillFile:
    """An append-only file of metric points at `path` (a local path or an fsspec URI)."""

    def __init__(self, path: str):
        self.path = path
        self.fs, self.target = fsspec.core.url_to_fs(path)
        self.local = isinstance(self.fs, LocalFileSystem)

    def exists(self) -> bool:
        return self.fs.exists(self.target)

    def append(self, points: Sequence) -> None:
        """Append `points` as whole lines and make them durable (fsync) before returning."""
        data = b"".join(_line(m) for m in points)
        if not data:
            return
        if not self.local:
            old = self.fs.cat_file(self.target) if self.exists() else b""
            folder, _, name = self.target.rpartition("/")
            tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
            self.fs.pipe_file(tmp, old + (b"\n" if old and not old.endswith(b"\n") else b"") + data)
            self.fs.mv(tmp, self.target)
            return
        path = Path(self.target)
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line: ours starts on a line of its own
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new name itself must survive a crash
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def _lines(self, offset: int) -> Iterator[tuple[bytes, int]]:
        """(line, offset after it) from byte `offset` on."""
        with self.fs.open(self.target, "rb") as f:
            f.seek(offset)
            for line in f:
                offset += len(line)
                yield line, offset

    def count(self) -> int:
        """How many points the file holds; a warning names each line that does not parse."""
        if not self.exists():
            return 0
        good = 0
        for number, (line, _) in enumerate(self._lines(0), 1):
            if not line.strip():
                continue
            if _point(line) is None:
                print(
                    f"MLflow: skipped line {number} of {self.path}, which holds no metric point (torn by a process "
                    f"killed while writing it?): {line[:80]!r}",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                good += 1
        return good

    def read(self, offset: int, max_points: int) -> tuple[list, int]:
        """Up to `max_points` points from byte `offset`: (points, the offset after them). Lines that do not parse
        are skipped (`count` names them)."""
        points: list = []
        if not self.exists():
            return points, offset
        for line, end in self._lines(offset):
            point = _point(line) if line.strip() else None
            if point is not None:
                points.append(point)
            offset = end
            if len(points) == max_points:
                break
        return points, offset

    def remove_if_read(self, offset: int) -> bool:
        """Remove the file if it holds nothing past byte `offset` (every point in it sent); True if it is gone."""
        if not self.exists():
            return True
        if self.fs.size(self.target) > offset:
            return False
        self.fs.rm(self.target)
        return True
