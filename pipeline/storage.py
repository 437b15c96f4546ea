"""Files on a local path or any fsspec URI: small JSON records written atomically (to a hidden temporary name beside
the target, then renamed, so a reader never sees half a file), existence checks and folder listings."""

from __future__ import annotations

import json
import uuid
from typing import Any

import fsspec


def write_json(path: str, payload: dict[str, Any], indent: int | None = None) -> None:
    fs, target = fsspec.core.url_to_fs(path)
    folder, _, name = target.rpartition("/")
    fs.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "w") as f:
        json.dump(payload, f, indent=indent)
    fs.mv(tmp, target)


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
