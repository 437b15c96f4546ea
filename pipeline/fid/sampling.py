"""gen: samples from an EMA checkpoint, in deterministic slices drawn by Ray actors that keep their models loaded.

Slice i of `fid.num_samples` samples has its own seed (labels, noise, sampler randomness), so the same request gives
the same images, and the same FID, whatever the number of workers. Actors (one per GPU, or per CPU) keep the VAE and
the DiT loaded (and, on a GPU, compiled) for the whole stage.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from pipeline.codecs import CodecInfo
from pipeline.config import FidConfig


def make_sampler(fid: FidConfig, diffusion_config):
    """The sampler `fid.sampler` names, for the checkpoint's diffusion config (DDPM or flow)."""
    from dit_core.samplers import DDIMSampler, DDPMSampler, DiffusersSampler, FlowSampler, diffusers_scheduler

    if fid.sampler in FlowSampler.METHODS:
        return FlowSampler(diffusion_config, fid.sampler, fid.sampling_steps)
    if fid.sampler == "ddpm":
        return DDPMSampler(diffusion_config, respacing=str(fid.sampling_steps))
    if fid.sampler == "ddim":
        return DDIMSampler(diffusion_config, respacing=str(fid.sampling_steps))
    return DiffusersSampler(diffusers_scheduler(fid.sampler, diffusion_config), fid.sampling_steps)


def slice_labels(fid: FidConfig, index: int, count: int, num_classes: int) -> torch.Tensor:
    """The class labels of slice `index`: balanced (cycling through the classes) or uniform random."""
    if fid.labels == "balanced":
        return (torch.arange(count) + index * fid.slice_size) % num_classes
    return torch.randint(0, num_classes, (count,), generator=torch.Generator().manual_seed(fid.seed + index))


def slices(fid: FidConfig) -> list[tuple[int, int]]:
    """(index, count) of every slice of the `fid.num_samples` samples, in order; the last may be short."""
    return [
        (i, min(fid.slice_size, fid.num_samples - i * fid.slice_size))
        for i in range(-(-fid.num_samples // fid.slice_size))
    ]


def sample_labels(fid: FidConfig, num_classes: int) -> np.ndarray:
    """The labels of all `fid.num_samples` samples, in the order `generate` returns them."""
    return torch.cat([slice_labels(fid, i, n, num_classes) for i, n in slices(fid)]).numpy()


class SliceSampler:
    """Draws slices of samples, keeping the decoder and the model in memory between slices and checkpoints.

    A slice is a pure function of (checkpoint, fid settings, slice index): the same images whichever sampler draws it.
    One SliceSampler lives in each Ray actor of the stage (one per GPU, or one per CPU), so the VAE and the DiT are
    loaded, and compiled, once per actor rather than once per slice. A new checkpoint of the same architecture is
    copied into the loaded model, which keeps the compiled graph.
    """

    def __init__(self, codec: CodecInfo, device: str = "cpu", compile: bool = False):
        from pipeline.codecs import codec_from_info

        self.device, self.compile = device, compile
        self.decoder = codec_from_info(codec, device=device)
        self.model = None
        self.checkpoint = None  # path of the weights in self.model
        self.diffusion_config = None
        self.loads = 0  # checkpoints read so far

    def load(self, checkpoint: str):
        """The model holding `checkpoint`'s EMA weights (read only when it differs from the last one)."""
        from dit_core.checkpoint import load_checkpoint, model_config_from_checkpoint
        from dit_core.diffusion import DiffusionConfig
        from dit_core.model import DiT

        if checkpoint != self.checkpoint:
            ckpt = load_checkpoint(checkpoint, map_location=self.device)
            config = model_config_from_checkpoint(ckpt)
            if self.model is None or self.model.config != config:
                self.model = DiT(config).to(self.device).eval().requires_grad_(False)
                if self.compile:
                    # a fresh start for each architecture (torch.compile keeps 8 graphs per function, then falls
                    # back to eager), and static shapes: a short last batch gets a graph of its own instead of
                    # turning every later batch into a dynamic-shape one
                    torch._dynamo.reset()
                    self.model.compile(dynamic=False)  # compiles __call__: forward and the batched guidance pass
            self.model.load_state_dict(ckpt["model"])
            self.diffusion_config = DiffusionConfig(**ckpt["config"]["diffusion"])
            self.checkpoint, self.loads = checkpoint, self.loads + 1
        return self.model

    def denoiser(self, model, fid: FidConfig):
        """denoise(x_t, t, y) for the sampler (benchmarks/fid_throughput.py wraps it to time the DiT forward)."""
        from dit_core.samplers import make_denoiser

        return make_denoiser(
            model,
            fid.cfg_scale,
            fid.guidance_channels or None,
            fid.guidance_interval or None,
            num_timesteps=self.diffusion_config.num_timesteps,
        )

    def sample(self, checkpoint: str, fid: FidConfig, index: int, count: int) -> np.ndarray:
        """Slice `index` of the samples: `count` uint8 (H, W, 3) images."""
        from pipeline.codecs import tensor_to_images

        model = self.load(checkpoint)
        sampler = make_sampler(fid, self.diffusion_config)
        denoise = self.denoiser(model, fid)
        cfg = model.config
        g = torch.Generator(self.device).manual_seed(fid.seed * 1_000_003 + index)
        y = slice_labels(fid, index, count, cfg.num_classes)
        noise = torch.randn(count, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g, device=self.device)
        out = []
        autocast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda")
        with torch.no_grad(), autocast:
            for lo in range(0, count, fid.batch_size):
                hi = min(count, lo + fid.batch_size)
                z = sampler.sample(denoise, noise[lo:hi], y[lo:hi].to(self.device), generator=g)
                out.append(tensor_to_images(self.decoder.decode(z.float())))
        return np.concatenate(out)


def compile_sampling(fid: FidConfig, device: str) -> bool:
    return fid.compile if fid.compile is not None else device == "cuda"


class _SamplerActor:
    """Ray actor around a SliceSampler; one CPU thread on CPU, so that every slice is bitwise reproducible."""

    def __init__(self, codec: CodecInfo, device: str, compile: bool):
        if device == "cpu":
            torch.set_num_threads(1)
        self.sampler = SliceSampler(codec, device, compile)

    def sample(self, checkpoint: str, fid: FidConfig, index: int, count: int) -> np.ndarray:
        return self.sampler.sample(checkpoint, fid, index, count)

    def loads(self) -> int:
        return self.sampler.loads


class SamplerPool:
    """Ray actors that draw the FID samples, alive for the whole stage: `fid.workers` of them (0: one per GPU, or
    per CPU; beside training, one), each holding `fid.cpus_per_worker` CPUs, and `fid.gpus_per_worker` GPUs on a
    cluster that has GPUs. An actor that dies (out of memory, a lost node) is restarted once.

    with SamplerPool(codec, fid) as pool:
        samples = generate(checkpoint, codec, fid, pool=pool)
    """

    def __init__(self, codec: CodecInfo, fid: FidConfig, workers: int = 0, beside_training: bool = False):
        import ray

        from pipeline.ray_utils import cluster_cpus, cluster_gpus, ensure_ray

        ensure_ray()
        gpus = cluster_gpus() if fid.gpus_per_worker > 0 else 0
        self.device = "cuda" if gpus else "cpu"
        self.size = workers or fid.workers or (1 if beside_training else (gpus or cluster_cpus()))
        options = {"num_cpus": fid.cpus_per_worker, **({"num_gpus": fid.gpus_per_worker} if gpus else {})}
        self.reserved = {"CPU": self.size * fid.cpus_per_worker, "GPU": self.size * options.get("num_gpus", 0)}
        actor = ray.remote(_SamplerActor).options(**options, max_restarts=1, max_task_retries=1)
        self.actors = [actor.remote(codec, self.device, compile_sampling(fid, self.device)) for _ in range(self.size)]
        # Actors known to be up. Slices go only to these: an actor still waiting for a GPU that a training trial
        # holds would otherwise sit on its slice until the trial ends.
        self.ready: set[int] = set()

    def __enter__(self) -> SamplerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the actors (they hold CPUs or GPUs that a sweep may need)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def loads(self) -> list[int]:
        """Checkpoints each started actor has read so far."""
        import ray

        return ray.get([self.actors[i].loads.remote() for i in sorted(self.ready)])


def generate(
    checkpoint: str,
    codec: CodecInfo,
    fid: FidConfig,
    workers: int = 0,
    progress: bool = True,
    pool: SamplerPool | None = None,
) -> np.ndarray:
    """All `fid.num_samples` samples of a checkpoint, slices drawn by the actors of `pool` (a new pool if None)."""
    import ray
    from tqdm.auto import tqdm

    if pool is None:
        with SamplerPool(codec, fid, workers) as own:
            return generate(checkpoint, codec, fid, progress=progress, pool=own)
    results: dict[int, np.ndarray] = {}
    pending: dict[Any, tuple[int, int]] = {}  # slice in flight -> (slice index, actor index)
    probes = {pool.actors[a].loads.remote(): a for a in range(len(pool.actors)) if a not in pool.ready}
    idle = sorted(pool.ready)
    queue = slices(fid)
    bar = tqdm(total=fid.num_samples, desc="fid samples", unit="img", disable=not progress, leave=False)
    while queue or pending:
        while queue and idle:
            i, n = queue.pop(0)
            actor = idle.pop()
            pending[pool.actors[actor].sample.remote(checkpoint, fid, i, n)] = (i, actor)
        done, _ = ray.wait(list(pending) + list(probes), num_returns=1)
        for ref in done:
            if ref in probes:  # an actor has started (ray.get raises its start-up error, if any)
                ray.get(ref)
                actor = probes.pop(ref)
                pool.ready.add(actor)
                idle.append(actor)
                continue
            index, actor = pending.pop(ref)
            results[index] = ray.get(ref)
            idle.append(actor)
            bar.update(len(results[index]))
    bar.close()
    return np.concatenate([results[i] for i in sorted(results)])


def sample_grid(images: np.ndarray, path: str | os.PathLike, columns: int = 10, rows: int = 10) -> str:
    """Save the first rows x columns samples as one PNG."""
    from PIL import Image

    n = min(len(images), rows * columns)
    rows = -(-n // columns)
    h, w = images.shape[1:3]
    canvas = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
    scale = max(1, 128 // h)
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)
    return str(path)
