"""Small JSON records (manifests, markers) on a local path or any fsspec URI, written atomically: to a hidden
temporary name beside the target, then renamed, so a reader never sees half a file."""

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
