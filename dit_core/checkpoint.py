"""Training checkpoints: {model, ema, opt, step, config} (plus anything in `extra`), written atomically.

Files are plain torch.save dicts of tensors and Python primitives, so they load with `weights_only=True` (no pickled
code runs). The config is stored as a dict of dicts, e.g. {"model": asdict(DiTConfig), "diffusion": ...}; loading
with `expected_model_config` refuses a checkpoint built for another architecture and says which fields differ.

Atomic: a save writes `.<name>.tmp-<pid>` beside the target, syncs it and renames it over the target, so a writer
killed part-way leaves the previous checkpoint intact. The temporary of a killed writer is never loaded (its name
starts with a dot, and load_checkpoint refuses it) and is removed by the next save of the same path (one writer per
path, as rank 0 in training). A full disk, a quota or a file size limit raises OutOfSpaceError, which names the
file and what to do; the half-written temporary is removed.
"""

from __future__ import annotations

import errno
import glob
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_core.config import DiTConfig
from dit_core.ema import unwrap_model

OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota reached, file size limit


class OutOfSpaceError(OSError, ValueError):
    """A write refused for lack of space (ENOSPC), quota (EDQUOT) or a file size limit (EFBIG): an OSError with that
    errno, whose message names the file and what to do. Also a ValueError, so command-line tools print the message
    rather than a traceback."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)  # (errno, message): survives pickling, e.g. out of a Ray worker

    def __str__(self) -> str:
        return self.strerror


def out_of_space_error(exc: OSError, what: str, then: str = "run the same command again") -> OutOfSpaceError:
    """The OutOfSpaceError for `exc` (errno in OUT_OF_SPACE_ERRNOS) raised while writing `what`."""
    fix = {
        errno.ENOSPC: "free space on that file system",
        errno.EDQUOT: "free space on that file system or raise your quota",
        errno.EFBIG: "raise the file size limit (ulimit -f, or the file system's)",
    }[exc.errno]
    return OutOfSpaceError(exc.errno, f"{os.strerror(exc.errno).lower()} while writing {what}: {fix} and {then}")


def is_temporary(path: str | os.PathLike) -> bool:
    """True for the temporary file of a save in progress (or of a writer that was killed): `.<name>.tmp-<pid>`."""
    name = Path(path).name
    return name.startswith(".") and ".tmp-" in name


class _Recorder:
    """A write-only stream that keeps the OSError of a failed write (torch.save reraises it as a RuntimeError)."""

    def __init__(self, stream):
        self.stream, self.error = stream, None

    def write(self, data) -> int:
        try:
            return self.stream.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.stream.flush()


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    step: int,
    config: dict[str, Any],
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint to `path` via a temporary file and an atomic rename; returns the path.

    Raises OutOfSpaceError when the file system is full (or a quota or file size limit is reached); the previous
    checkpoint at `path`, if any, is then left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "model": unwrap_model(model).state_dict(),
        "step": int(step),
        "config": config,
    }
    if ema is not None:
        payload["ema"] = ema.state_dict()
    if optimizer is not None:
        payload["opt"] = optimizer.state_dict()
    payload.update(extra or {})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):  # of a writer killed part-way
        stale.unlink(missing_ok=True)
    stream = None
    try:
        with open(tmp, "wb") as f:
            stream = _Recorder(f)
            torch.save(payload, stream)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        cause = stream.error if stream is not None and stream.error is not None else exc
        if isinstance(cause, OSError) and cause.errno in OUT_OF_SPACE_ERRNOS:
            raise out_of_space_error(cause, f"checkpoint {path}") from exc
        raise
    return path


def config_differences(
    saved: dict[str, Any], expected: dict[str, Any], ignore: tuple[str, ...] = DiTConfig.RUNTIME_FIELDS
) -> list[str]:
    """'field: saved X, expected Y' for each field that differs (missing fields count as different); fields that do
    not change the weights (`ignore`) may differ."""
    diffs = []
    for key in sorted(set(saved) | set(expected)):
        if key in ignore:
            continue
        if saved.get(key, "<missing>") != expected.get(key, "<missing>"):
            diffs.append(
                f"{key}: checkpoint {saved.get(key, '<missing>')!r}, expected {expected.get(key, '<missing>')!r}"
            )
    return diffs


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    expected_model_config: DiTConfig | None = None,
) -> dict[str, Any]:
    """Load a checkpoint onto `map_location` (any device, whatever it was saved from).

    With expected_model_config, raise ValueError listing the differing fields if the stored model config differs.
    """
    path = Path(path)
    if is_temporary(path):
        raise ValueError(
            f"{path} is the temporary file of a checkpoint save that did not finish (its writer was stopped): it is "
            f"never a checkpoint; load {path.parent / path.name[1:].rsplit('.tmp-', 1)[0]} instead"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (check the run folder and the step number)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(
            f"{path} is not a dit_core checkpoint (expected a dict with 'model' and 'config'); "
            f"for official DiT checkpoints use dit_core.interop.load_official_checkpoint"
        )
    if expected_model_config is not None:
        saved = ckpt["config"].get("model", {})
        diffs = config_differences(saved, asdict(expected_model_config))
        if diffs:
            raise ValueError(
                f"checkpoint {path} was trained with another model config:\n  "
                + "\n  ".join(diffs)
                + "\nbuild the model from the checkpoint's config (model_config_from_checkpoint) or pick the "
                "matching checkpoint"
            )
    return ckpt


def model_config_from_checkpoint(ckpt: dict[str, Any]) -> DiTConfig:
    """The DiTConfig stored in a checkpoint dict."""
    return DiTConfig(**ckpt["config"]["model"])


def restore(
    ckpt: dict[str, Any],
    model: nn.Module,
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Load the states of a checkpoint dict into model, ema and optimizer (strictly); returns the step."""
    unwrap_model(model).load_state_dict(ckpt["model"], strict=True)
    if ema is not None:
        if "ema" not in ckpt:
            raise ValueError("checkpoint has no EMA weights")
        ema.load_state_dict(ckpt["ema"], strict=True)
    if optimizer is not None:
        if "opt" not in ckpt:
            raise ValueError("checkpoint has no optimizer state")
        optimizer.load_state_dict(ckpt["opt"])
    return int(ckpt["step"])
