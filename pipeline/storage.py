"""Files on a local path or any fsspec URI: small JSON records written atomically (to a hidden temporary name beside
the target, then renamed, so a reader never sees half a file), existence checks and folder listings.

A write that fails removes its temporary; one refused for lack of space, quota or file size raises
dit_core's OutOfSpaceError (an OSError and a ValueError) naming the file and what to do (`out_of_space` finds such an
error behind another).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import fsspec

from dit_core.checkpoint import OUT_OF_SPACE_ERRNOS, out_of_space_error


def out_of_space(exc: BaseException | None) -> OSError | None:
    """The disk-full, quota or file-size error that is `exc` or caused it (through __cause__ / __context__), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def remove_quietly(fs, path: str) -> None:
    """Delete `path` if it exists; a failure to delete is ignored (the caller is already handling an error)."""
    try:
        if fs.exists(path):
            fs.rm(path)
    except OSError:
        pass


def write_json(path: str, payload: dict[str, Any], indent: int | None = None) -> None:
    """Write `payload` to `path` atomically. Raises OutOfSpaceError if the file system is full; `path` then keeps its
    previous content."""
    fs, target = fsspec.core.url_to_fs(path)
    folder, _, name = target.rpartition("/")
    fs.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "w") as f:
            json.dump(payload, f, indent=indent)
        fs.mv(tmp, target)
    except BaseException as exc:
        remove_quietly(fs, tmp)
        full = out_of_space(exc)
        if full is not None:
            raise out_of_space_error(full, path) from exc
        raise


def remove(path: str) -> None:
    """Delete the file at `path`, if there is one."""
    fs, target = fsspec.core.url_to_fs(path)
    if fs.exists(target):
        fs.rm(target)


def read_json(path: str) -> dict[str, Any] | None:
    """The record at `path`, or None if there is none."""
    fs, target = fsspec.core.url_to_fs(path)
    if not fs.exists(target):
        return None
    with fs.open(target, "r") as f:
        return json.load(f)


def exists(path: str) -> bool:
    fs, target = fsspec.core.url_to_fs(path)
    return fs.exists(target)


def list_names(folder: str) -> list[str]:
    """The names (not paths) of the entries of `folder`, sorted; [] if it does not exist."""
    fs, root = fsspec.core.url_to_fs(folder)
    if not fs.exists(root):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
