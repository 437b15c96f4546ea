"""The per-worker training loop of one trial, run by Ray Train (TorchTrainer, DDP over the trial's workers).

Read top to bottom: set up (device, seeds, model, EMA, AdamW, restore from `ray.train.get_checkpoint()`), then the
flat loop: batch -> dit_core.TrainStep (hybrid loss -> backward -> clip -> AdamW -> EMA, no host sync), the
non-finite watch, and at its steps a log (pipeline.worker_metrics.MetricWindow), an EMA milestone for the FID stage
and a resumable checkpoint (pipeline.recorder.TrialRecorder writes them).

Every step's randomness (timesteps, noise, label dropout) is seeded from (seed, rank, step) and the data stream from
(seed, epoch, reader), so a trial restored from a checkpoint continues exactly as if it had not stopped. Only rank 0
writes checkpoints, milestones and MLflow metrics; every rank calls `ray.train.report` the same number of times. The
logged loss is the mean over ranks (each rank's own mean over the logging window). A non-finite loss on any rank
stops every rank within a step, and the trial's failure names the first bad step.
"""

from __future__ import annotations

import math
import os
import socket
import time
from contextlib import nullcontext

import torch

from dit_core.checkpoint import restore
from dit_core.ema import create_ema, unwrap_model
from dit_core.flow import make_process
from dit_core.model import DiT
from dit_core.training import TrainStep, adamw, enable_tf32
from pipeline import schema
from pipeline.checkpoints import restore_more_emas, restore_newest
from pipeline.config import TrainConfig, config_to_dict
from pipeline.data import make_loader
from pipeline.plan import TrialJob
from pipeline.recorder import TrialRecorder
from pipeline.worker_metrics import (
    MetricWindow,
    NonFiniteWatch,
    fixed_validation_set,
    mfu_peak_flops,
    validation_loss,
    weights_diverged,
)


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


def train_loop_per_worker(loop_config: dict[str, TrialJob]) -> None:
    """Ray Train entry point; `loop_config["job"]` is the trial's TrialJob, built by pipeline.sweep."""
    import ray.train
    import ray.train.torch

    # --- set-up -------------------------------------------------------------------------------------------------
    job = loop_config["job"]
    e, layout, train = job.experiment, job.layout, job.experiment.train
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
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        state, resumed = restore_newest(checkpoint, layout, model_config, device)
        start_step = restore(state, model, ema, opt)
        restore_more_emas(state, more_emas, start_step)
        del state
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
    worker = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}
    reads = {"data_rank": loader.dataset.rank, "data_world": loader.dataset.world_size}  # the samples it reads
    layout.record_worker(
        rank,
        {**worker, "rank": rank, "world": world, **reads, "start_step": start_step, "started_unix_s": time.time()}
        | resumed,
    )
    val_set = None
    if rank == 0 and job.val_shards:
        val_set = fixed_validation_set(job.val_shards, per_rank_batch, train.val_batches, diffusion, device)
    peak = mfu_peak_flops(train.peak_tflops, device, warn=rank == 0)  # one device's; None: no `mfu` metric
    window = MetricWindow(train.global_batch_size, world, device, model_config, peak)
    watch = NonFiniteWatch(device, world)
    recorder = TrialRecorder(job, rank, saved_config)
    recorder.started(resumed)
    milestones = set(train.milestone_steps)

    # --- the loop -----------------------------------------------------------------------------------------------
    last_loss, bad_step, reason, done = float("nan"), None, "", start_step
    try:
        for step in range(start_step, train.steps):
            done = step + 1
            torch.manual_seed(step_seed(train.seed, rank, step))
            lr = learning_rate(step, train)
            for group in opt.param_groups:
                group["lr"] = lr
            z, y = next(batches)  # (B, C, h, w), (B,)
            z, y = z.to(device, non_blocking=True), y.to(device, non_blocking=True)
            log_now = done % train.log_every_steps == 0 or done == train.steps
            ckpt_now = done % train.ckpt_every_steps == 0 or done in milestones or done == train.steps
            out = train_step(z, y, measure_grad_norm=log_now)  # without clipping the norm is measured only to log it
            window.add(out)

            bad_step = watch.seen()  # up to the step before: the host does not wait for this one
            watch.update(out[schema.LOSS], done)
            if log_now or ckpt_now:  # these steps synchronise anyway: this one's too, and the weights
                bad_step = watch.seen()
                if bad_step is None and ckpt_now and weights_diverged((model, ema), world, device):
                    bad_step, reason = done, "the weights became non-finite"
            if bad_step is not None:  # on every rank at the same step: stop, never checkpoint it
                reason = f"diverged at step {bad_step}: {reason or 'the loss became non-finite (nan or inf)'}"
                break

            report = {"step": done, "steps": train.steps}
            if log_now:
                metrics = {**window.report(), schema.LR: lr, schema.EPOCH: done // loader.dataset.batches_per_epoch}
                metrics[schema.IMAGES_SEEN] = done * train.global_batch_size
                if val_set is not None and (done % train.val_every_steps == 0 or done == train.steps):
                    metrics[schema.VAL_LOSS] = validation_loss(unwrap_model(model), diffusion, val_set, autocast)
                    metrics[schema.VAL_LOSS_EMA] = validation_loss(ema, diffusion, val_set, autocast)
                last_loss = metrics[schema.LOSS]
                recorder.log(metrics, done)
                report.update(metrics)
            if done in milestones:
                recorder.milestone(done, ema, more_emas)
            # One report per step at most: Ray Train hands reports to its controller through a queue of one, so a
            # second report right after the first would wait for the controller's next poll (~2 s).
            if ckpt_now or log_now:
                recorder.report(report, (model, ema, opt, more_emas) if ckpt_now else None)
            recorder.hold_if_asked(done)
    finally:
        recorder.close()  # send or spill what is queued, whatever ends the loop

    # --- the end ------------------------------------------------------------------------------------------------
    if bad_step is not None:  # stop for good: a re-run would diverge again at the same step
        recorder.diverged(bad_step, reason, done)
    else:
        recorder.finished(train.steps, last_loss)
