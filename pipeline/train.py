"""The per-worker training loop of one trial, run by Ray Train (TorchTrainer, DDP over the trial's workers).

Read top to bottom: set up (device, seeds, model, EMA, AdamW, restore from `ray.train.get_checkpoint()`), then the
flat loop: batch -> dit_core.TrainStep (hybrid loss -> backward -> clip -> AdamW -> EMA, no host sync), with metrics
every `log_every_steps`, resumable checkpoints every `ckpt_every_steps`, EMA milestones for the FID stage and a
validation loss.

Every step's randomness (timesteps, noise, label dropout) is seeded from (seed, rank, step) and the data stream from
(seed, epoch, reader), so a trial restored from a checkpoint continues exactly as if it had not stopped.
Only rank 0 writes checkpoints, milestones and MLflow metrics; every rank calls `ray.train.report` the same number
of times. The logged loss is the mean over ranks (each rank's own mean over the logging window).
"""

from __future__ import annotations

import math
import os
import resource
import socket
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any

import fsspec
import torch
import torch.distributed as dist

from dit_core.checkpoint import config_differences, load_checkpoint, restore, save_checkpoint
from dit_core.ema import create_ema, unwrap_model
from dit_core.flops import device_peak, train_mfu
from dit_core.flow import Process, make_process
from dit_core.model import DiT
from dit_core.training import TrainStep, adamw, enable_tf32
from pipeline.config import TrainConfig, config_to_dict
from pipeline.data import LatentShardStream, make_loader
from pipeline.layout import CHECKPOINT_FILE, TrialLayout
from pipeline.plan import TrialJob


def learning_rate(step: int, train: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to min_lr_ratio * lr at the last step."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return train.lr
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
    floor = train.min_lr_ratio
    return train.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)


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

    latest_name = latest.path.rstrip("/").rsplit("/", 1)[-1]
    older = [f for f in layout.checkpoint_folders() if f.rsplit("/", 1)[-1] < latest_name]
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


# ---------------------------------------------------------------------------------------------------------------
# Divergence: a non-finite loss or weights stop the trial for good
# ---------------------------------------------------------------------------------------------------------------


def first_nonfinite(losses: list[torch.Tensor], first_step: int) -> tuple[int, float] | None:
    """(step, value) of the first non-finite loss of a window whose first entry is step `first_step`, or None."""
    if not losses:
        return None
    values = torch.stack(losses).float()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad) == 0:
        return None
    i = int(bad[0, 0])
    return first_step + i, float(values[i])


def divergence(
    losses: list[torch.Tensor], first_step: int, weights_step: int | None, modules, world: int, device
) -> tuple[int, str] | None:
    """(step, reason) if the trial diverged: a non-finite loss in this window, or (when `weights_step` is given,
    before a checkpoint) non-finite weights. The same answer on every rank (the earliest step over ranks)."""
    found = first_nonfinite(losses, first_step)
    step, what = (found[0], f"the loss became {found[1]}") if found else (None, "")
    if step is None and weights_step is not None:
        if not all(finite_weights(m.state_dict()) for m in modules):
            step, what = weights_step, "the weights became non-finite"
    if world > 1:
        flag = torch.tensor([float(step) if step is not None else math.inf], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if math.isfinite(flag.item()) and (step is None or int(flag.item()) < step):
            step, what = int(flag.item()), "another rank's loss became non-finite"
    return None if step is None else (step, f"diverged at step {step}: {what}")


def fixed_validation_set(root: str, batch_size: int, num_batches: int, process: Process, device: torch.device):
    """Fixed batches (z, y, t, noise) from held-out shards: the same every evaluation, timesteps evenly spread
    over the process's range."""
    stream = iter(LatentShardStream(root, batch_size, seed=12345, random_flip=False, shuffle_buffer=1))
    g = torch.Generator().manual_seed(54321)
    batches = []
    for i in range(num_batches):
        z, y = next(stream)
        n = z.shape[0]
        t = process.spread_timesteps(n * num_batches)[i * n : (i + 1) * n]
        noise = torch.randn(z.shape, generator=g)
        batches.append(tuple(x.to(device) for x in (z, y, t, noise)))
    return batches


@torch.no_grad()
def validation_loss(model: torch.nn.Module, diffusion: Process, batches, autocast) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for z, y, t, noise in batches:
        with autocast:
            loss = diffusion.training_losses(model, z, t, y, noise)["loss"]
        total += loss.float().sum().item()
        count += loss.numel()
    model.train(was_training)
    return total / count


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def mfu_peak_flops(peak_tflops: float, device: torch.device, warn: bool = True) -> float | None:
    """One device's peak FLOP/s for the `mfu` metric: train.peak_tflops when set, else the dense bf16 spec of the
    CUDA device (dit_core.flops.DEVICE_PEAKS); None (no `mfu`) on a CPU without train.peak_tflops, and on a GPU the
    table does not list, with a warning that names it."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = device_peak(name)
    if peak is None and warn:
        print(
            f"train: WARNING: no dense bf16 peak is known for the device {name!r}, so `mfu` is not logged: set "
            f"train.peak_tflops (TFLOP/s of one device, dense bf16) to log it",
            flush=True,
        )
    return None if peak is None else peak.flops


def train_loop_per_worker(loop_config: dict[str, TrialJob]) -> None:
    """Ray Train entry point; `loop_config["job"]` is the trial's TrialJob, built by pipeline.sweep."""
    import ray.train
    import ray.train.torch

    from pipeline.tracking import MetricLogger, set_status, set_tags

    # --- set-up -------------------------------------------------------------------------------------------------
    job = loop_config["job"]
    e, layout = job.experiment, job.layout
    train = e.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(e.resources.cpus_per_worker)))
    else:
        enable_tf32()
    use_bf16 = train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    model_config = job.trial.model
    diffusion = make_process(e.diffusion)  # DDPM or flow matching
    torch.manual_seed(train.seed)  # the same initial weights on every rank
    model = DiT(model_config).to(device)
    ema = create_ema(model)
    more_emas = {decay: create_ema(model) for decay in train.ema_decays}
    opt = adamw(model, lr=train.lr, betas=train.adam_betas, weight_decay=train.weight_decay)
    saved_config = {
        "model": config_to_dict(model_config),
        "diffusion": config_to_dict(e.diffusion),
        "train": config_to_dict(train),
        "run_name": job.trial.run_name,
        "trained_with": {"precision": "bf16" if use_bf16 else "fp32", "compile": train.compile, "device": device.type},
    }

    start_step, resumed = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state, resumed = restore_newest(checkpoint, layout, model_config, device)
        start_step = restore(state, model, ema, opt)
        restore_more_emas(state, more_emas, start_step)
        del state

    worker = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}
    layout.record_worker(
        rank,
        {**worker, "rank": rank, "world": world, "start_step": start_step, "started_unix_s": time.time(), **resumed},
    )

    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    train_step = TrainStep(
        model,
        diffusion,
        opt,
        ema,
        ema_decay=train.ema_decay,
        more_emas=more_emas,
        grad_clip=train.grad_clip,
        autocast_dtype=torch.bfloat16 if use_bf16 else None,
        forward=ddp_model,
        compile=train.compile,
        compile_mode=train.compile_mode,
    )

    per_rank_batch = train.global_batch_size // world
    loader = make_loader(
        job.shards,
        per_rank_batch,
        rank,
        world,
        seed=train.seed,
        start_batch=start_step,
        num_workers=train.loader_workers,
    )
    batches = iter(loader)
    val_set = None
    if rank == 0 and job.val_shards:
        val_set = fixed_validation_set(job.val_shards, per_rank_batch, train.val_batches, diffusion, device)
    logger = MetricLogger(job.tracking_uri, job.mlflow_run_id, spill=layout.unsent_metrics) if rank == 0 else None
    if logger is not None:
        set_status(job.tracking_uri, job.mlflow_run_id, "RUNNING")
        if resumed.get("skipped_checkpoints"):
            skipped = ", ".join(f"{s['checkpoint']} ({s['error']})" for s in resumed["skipped_checkpoints"])
            set_tags(job.tracking_uri, job.mlflow_run_id, {"ditscale.resume_warning": f"skipped {skipped}"})
    peak = mfu_peak_flops(train.peak_tflops, device, warn=rank == 0)  # one device's; None: no `mfu` metric
    milestones = set(train.milestone_steps)

    # --- the loop -----------------------------------------------------------------------------------------------
    window = {"loss": [], "mse": [], "vb": [], "grad_norm": []}
    window_start, window_steps = time.perf_counter(), 0
    last_loss, diverged = float("nan"), None
    for step in range(start_step, train.steps):
        torch.manual_seed(step_seed(train.seed, rank, step))
        lr = learning_rate(step, train)
        for group in opt.param_groups:
            group["lr"] = lr

        z, y = next(batches)  # (B, C, h, w), (B,)
        z, y = z.to(device, non_blocking=True), y.to(device, non_blocking=True)
        log_now = (step + 1) % train.log_every_steps == 0 or step + 1 == train.steps
        out = train_step(z, y, measure_grad_norm=log_now)  # without clipping the norm is measured only to log it
        for key, value in out.items():
            window[key].append(value)
        window_steps += 1
        done = step + 1

        ckpt_now = done % train.ckpt_every_steps == 0 or done in milestones or done == train.steps
        losses = window["loss"]  # this window's per-step losses, kept for the divergence check after logging
        report = {"step": done, "steps": train.steps}
        if log_now:
            local = torch.stack([torch.stack(window[k]).float().mean() for k in ("loss", "mse", "vb", "grad_norm")])
            gathered = [torch.zeros_like(local) for _ in range(world)]
            if world > 1:
                dist.all_gather(gathered, local)
            else:
                gathered = [local]
            per_rank = torch.stack(gathered).cpu()  # (world, 4)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            elapsed, window_start = now - window_start, now  # wall time, including the previous report/checkpoint
            img_per_s = train.global_batch_size * window_steps / elapsed
            last_loss = per_rank[:, 0].mean().item()
            metrics = {
                "loss": last_loss,
                "mse": per_rank[:, 1].mean().item(),
                "vb": per_rank[:, 2].mean().item(),
                "grad_norm": per_rank[0, 3].item(),  # mean over the window when clipping, else at this step
                "lr": lr,
                "img_per_s": img_per_s,
                "step_time_s": elapsed / window_steps,
                "peak_memory_gib": peak_memory_gib(device),
                "epoch": done // loader.dataset.batches_per_epoch,
                "images_seen": done * train.global_batch_size,
            }
            if 1 < world <= 8:
                metrics.update({f"loss_rank{r}": per_rank[r, 0].item() for r in range(world)})
            if peak is not None:  # per device: the trial's img/s over `world` devices' peaks
                metrics["mfu"] = train_mfu(model_config, img_per_s, peak, num_devices=world)
            if val_set is not None and (done % train.val_every_steps == 0 or done == train.steps):
                metrics["val_loss"] = validation_loss(unwrap_model(model), diffusion, val_set, autocast)
                metrics["val_loss_ema"] = validation_loss(ema, diffusion, val_set, autocast)
            if logger is not None:
                logger.log(metrics, step=done)
            report.update(metrics)
            window = {k: [] for k in window}
            window_steps = 0

        if log_now or ckpt_now:  # before any checkpoint or milestone: never a non-finite one
            diverged = divergence(
                losses, done - len(losses) + 1, done if ckpt_now else None, (model, ema), world, device
            )
            if diverged is not None:
                break
        if done in milestones and rank == 0:
            save_milestone(layout, done, ema, saved_config)
            for decay, copy in more_emas.items():
                save_milestone(layout, done, copy, saved_config, decay)
        # One report per step at most: Ray Train hands reports to its controller through a queue of one, so a
        # second report right after the first would wait for the controller's next poll (~2 s).
        if ckpt_now and rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(
                    f"{folder}/{CHECKPOINT_FILE}",
                    model=model,
                    ema=ema,
                    optimizer=opt,
                    step=done,
                    config=saved_config,
                    extra={
                        "rng": {"torch": torch.get_rng_state()},
                        "more_emas": {repr(d): copy.state_dict() for d, copy in more_emas.items()},
                    },
                )
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
        elif ckpt_now or log_now:
            ray.train.report(report)

    # --- the end ------------------------------------------------------------------------------------------------
    if diverged is not None:  # stop for good: a re-run would diverge again at the same step
        step, reason = diverged
        print(f"train: {job.trial.run_name} {reason}", flush=True)
        if rank == 0:
            layout.mark_failed("diverged", reason, step)
            logger.close()
            set_tags(job.tracking_uri, job.mlflow_run_id, {"ditscale.failure": reason})
            set_status(job.tracking_uri, job.mlflow_run_id, "FAILED")
        return
    if rank == 0:
        logger.close()
        layout.mark_done(train.steps, last_loss, time.time())
        set_status(job.tracking_uri, job.mlflow_run_id, "FINISHED")
