"""A trial's checkpoints: the resumable ones Ray Train keeps (written by rank 0, with the step each holds beside
it), the EMA milestones the fid stage scores, and resuming from the newest checkpoint that reads back whole.

A checkpoint is a dit_core checkpoint (model, EMA, AdamW, step, config, RNG, further EMAs) in a folder handed to
`ray.train.report`; `ditscale_step.json` beside it lets the fallback order checkpoints by the step they hold, not
by the folder's timestamp. A milestone is the EMA weights alone, written under a temporary name and renamed.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from typing import Any

import fsspec
import torch

from dit_core.checkpoint import config_differences, load_checkpoint, save_checkpoint
from pipeline.layout import CHECKPOINT_FILE, TrialLayout, checkpoint_step, write_checkpoint_step


def save_resumable(folder: str, step: int, model, ema, opt, config: dict[str, Any], more_emas: dict) -> None:
    """Everything a resume needs at `step`, into `folder` (which the caller reports to Ray Train)."""
    save_checkpoint(
        f"{folder}/{CHECKPOINT_FILE}",
        model=model,
        ema=ema,
        optimizer=opt,
        step=step,
        config=config,
        extra={
            "rng": {"torch": torch.get_rng_state()},
            "more_emas": {repr(d): copy.state_dict() for d, copy in more_emas.items()},
        },
    )
    write_checkpoint_step(folder, step)


def save_milestone(
    layout: TrialLayout, step: int, ema: torch.nn.Module, config: dict[str, Any], decay: float | None = None
) -> str:
    """EMA weights at `step` for the FID stage, where the layout keeps milestones (a dit_core checkpoint); `decay`
    names a further EMA of train.ema_decays (None: train.ema_decay's)."""
    path = layout.milestone(step, decay)
    extra = {
        "weights": "ema",
        "ema_decay": config["train"]["ema_decay"] if decay is None else decay,
        "trained_with": config.get("trained_with", {}),  # precision, compile, device: recorded with every FID
    }
    if "://" not in path:
        save_checkpoint(path, model=ema, step=step, config=config, extra=extra)
        return path
    fs, remote = fsspec.core.url_to_fs(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = save_checkpoint(f"{tmp}/{remote.rsplit('/', 1)[-1]}", model=ema, step=step, config=config, extra=extra)
        fs.put(str(local), remote)
    return path


def restore_more_emas(state: dict[str, Any], more_emas: dict[float, torch.nn.Module], step: int) -> None:
    """Load each further EMA from a resumed checkpoint; one the checkpoint lacks (a decay added since) starts again
    from the restored weights, with a warning."""
    saved = state.get("more_emas", {})
    for decay, copy in more_emas.items():
        if repr(decay) in saved:
            copy.load_state_dict(saved[repr(decay)], strict=True)
        else:
            copy.load_state_dict(state["model"], strict=True)
            print(f"train: EMA {decay} is not in the checkpoint of step {step}: it starts from that step's weights")


# ---------------------------------------------------------------------------------------------------------------
# Resuming: the newest checkpoint that reads back whole
# ---------------------------------------------------------------------------------------------------------------


def finite_weights(state: dict[str, torch.Tensor]) -> bool:
    """Whether every floating-point tensor of a state dict is finite."""
    return all(bool(torch.isfinite(t).all()) for t in state.values() if torch.is_floating_point(t))


class ConfigMismatch(ValueError):
    """A checkpoint of another architecture in the trial's folder: never skipped silently."""


def readable_state(folder: str, model_config, device: torch.device) -> dict[str, Any]:
    """The checkpoint in a Ray Train checkpoint folder, loaded and checked: ValueError if it is unreadable
    (truncated, corrupt, not a dit_core checkpoint) or holds non-finite weights; a checkpoint of another architecture
    is an error of the experiment, not of the file, and raises ConfigMismatch."""
    state = load_checkpoint(f"{folder}/{CHECKPOINT_FILE}", map_location=device)
    diffs = config_differences(state["config"].get("model", {}), asdict(model_config))
    if diffs:
        raise ConfigMismatch(f"checkpoint {folder} was trained with another model config: {'; '.join(diffs)}")
    if not finite_weights(state["model"]) or not finite_weights(state.get("ema", {})):
        raise ValueError(f"checkpoint {folder} holds non-finite weights")
    return state


def restore_newest(latest, layout: TrialLayout, model_config, device: torch.device) -> tuple[dict[str, Any], dict]:
    """The state of Ray Train's latest checkpoint or, when that one does not read back whole (the process was killed
    while writing it, the disk filled), of the newest older one that does, with a warning; and what was skipped.
    Raises if none of the trial's checkpoints can be read."""
    from ray.train import Checkpoint

    latest_path = latest.path.rstrip("/")
    latest_step = checkpoint_step(latest_path)
    older = [
        folder
        for step, folder in layout.checkpoint_folders()  # by the step each holds, newest first
        if folder.rstrip("/") != latest_path and (latest_step is None or step is None or step < latest_step)
    ]
    candidates = [latest, *(Checkpoint.from_directory(f) if "://" not in f else Checkpoint(f) for f in older)]
    skipped = []
    for checkpoint in candidates:
        name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            with checkpoint.as_directory() as folder:
                state = readable_state(folder, model_config, device)
        except ConfigMismatch:
            raise
        except (ValueError, FileNotFoundError, OSError) as exc:
            skipped.append({"checkpoint": name, "error": str(exc).splitlines()[0][:300]})
            print(
                f"train: WARNING: cannot resume from {name} ({skipped[-1]['error']}); trying an older one", flush=True
            )
            continue
        if skipped:
            print(f"train: WARNING: resumed from the older {name} (step {state['step']})", flush=True)
        return state, {"restored_from": name, "skipped_checkpoints": skipped}
    raise RuntimeError(
        f"none of the checkpoints of {layout.root} can be read ({'; '.join(s['error'] for s in skipped)}): "
        f"move the trial's folder away to start it again from step 0"
    )
