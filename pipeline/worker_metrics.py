"""What a training worker measures besides the step itself: the metric window between two logs, the watch for a
non-finite loss, the validation loss on fixed held-out batches, peak memory and the peak FLOP/s behind `mfu`.

Nothing here reads a tensor back to the host between logs: the window keeps the per-step device scalars, and the
non-finite watch keeps the first bad step on the device, read one step late.
"""

from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist

from dit_core.flops import device_peak, train_mfu
from dit_core.flow import Process
from pipeline import schema
from pipeline.data import LatentShardStream


def finite_weights(state: dict[str, torch.Tensor]) -> bool:
    """Whether every floating-point tensor of a state dict is finite."""
    return all(bool(torch.isfinite(t).all()) for t in state.values() if torch.is_floating_point(t))


class NonFiniteWatch:
    """The first step whose loss was not finite, kept on the device: updated every step without a host sync and
    agreed by every rank (an all-reduce of the earliest bad step), so that all ranks stop at the same step and the
    trial's failure names the exact first bad step.

    Called before `update` of step k, `seen()` reads the value copied at step k - 1: the host waits at most for
    step k - 1 to end while step k is queued on a GPU. Called after `update`, it reads step k's, waiting for it: the
    loop does so only where it synchronises anyway (logs, checkpoints, the last step).
    """

    NONE = 2**62  # no bad step yet

    def __init__(self, device: torch.device, world: int):
        self.device, self.world = device, world
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.host = torch.full((), self.NONE, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.copied = None  # the CUDA event of the last copy to the host (None on a CPU: copies are synchronous)

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Fold in the loss of `step` (a device scalar)."""
        bad = ~torch.isfinite(loss.detach().float())
        self.first = torch.where(bad & (self.first == self.NONE), torch.full_like(self.first, step), self.first)
        if self.world > 1:
            dist.all_reduce(self.first, op=dist.ReduceOp.MIN)
        self.host.copy_(self.first, non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record()

    def seen(self) -> int | None:
        """The first bad step over every rank as of the last `update`; None if all were finite. Every rank gets the
        same answer at the same step."""
        if self.copied is not None:
            self.copied.synchronize()
        value = int(self.host)
        return None if value == self.NONE else value


def weights_diverged(modules, world: int, device: torch.device) -> bool:
    """Whether any rank holds non-finite weights in `modules` (checked before a checkpoint: never a bad one)."""
    bad = torch.tensor([0.0 if all(finite_weights(m.state_dict()) for m in modules) else 1.0], device=device)
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


class MetricWindow:
    """The steps since the last log: their loss terms as device scalars, and at a log step the record MLflow gets:
    each term's window mean averaged over the ranks (every rank's own loss too, for up to 8), the grad norm of rank
    0, the trial's throughput (global batch) and its MFU per device."""

    TERMS = (schema.LOSS, schema.MSE, schema.VB, schema.GRAD_NORM)

    def __init__(self, global_batch_size: int, world: int, device: torch.device, model_config, peak_flops):
        self.global_batch_size, self.world, self.device = global_batch_size, world, device
        self.model_config, self.peak_flops = model_config, peak_flops
        self.values: dict[str, list[torch.Tensor]] = {k: [] for k in self.TERMS}
        self.start, self.steps = time.perf_counter(), 0

    def add(self, out: dict[str, torch.Tensor]) -> None:
        """A step's terms (the grad norm only at the steps that measure it: with clipping every step, else the log
        step's)."""
        for key in self.TERMS:
            if key in out:
                self.values[key].append(out[key])
        self.steps += 1

    def report(self) -> dict[str, float]:
        """The window's record (a collective: every rank calls it at the same steps); starts a new window."""
        local = torch.stack([torch.stack(self.values[k]).float().mean() for k in self.TERMS])
        gathered = [torch.zeros_like(local) for _ in range(self.world)]
        if self.world > 1:
            dist.all_gather(gathered, local)
        else:
            gathered = [local]
        per_rank = torch.stack(gathered).cpu()  # (world, 4)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed = now - self.start  # wall time, including the previous report and checkpoint
        img_per_s = self.global_batch_size * self.steps / elapsed
        record = {
            schema.LOSS: per_rank[:, 0].mean().item(),
            schema.MSE: per_rank[:, 1].mean().item(),
            schema.VB: per_rank[:, 2].mean().item(),
            schema.GRAD_NORM: per_rank[0, 3].item(),  # mean over the window when clipping, else at this step
            schema.IMG_PER_S: img_per_s,
            schema.STEP_TIME_S: elapsed / self.steps,
            schema.PEAK_MEMORY_GIB: peak_memory_gib(self.device),
        }
        if 1 < self.world <= 8:
            record.update({schema.loss_of_rank(r): per_rank[r, 0].item() for r in range(self.world)})
        if self.peak_flops:
            record[schema.MFU] = train_mfu(self.model_config, img_per_s, self.peak_flops, num_devices=self.world)
        self.values = {k: [] for k in self.TERMS}
        self.start, self.steps = now, 0
        return record


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


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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
