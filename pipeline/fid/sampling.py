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

from pipeline import schema
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


def sampling_precision(fid: FidConfig, device: str) -> str:
    """fid.precision resolved on `device`: "auto" is bf16 autocast on a GPU, fp32 on a CPU."""
    if fid.precision != "auto":
        return fid.precision
    return "bf16" if device == "cuda" else "fp32"


def compile_sampling(fid: FidConfig, device: str) -> bool:
    return fid.compile if fid.compile is not None else device == "cuda"


class SliceSampler:
    """Draws slices of samples, keeping the decoder and the model in memory between slices and checkpoints.

    A slice is a pure function of (checkpoint, fid settings, slice index): the same images whichever sampler draws it.
    One SliceSampler lives in each Ray actor of the stage (one per GPU, or one per CPU), so the VAE and the DiT are
    loaded, and compiled, once per actor rather than once per slice. A new checkpoint of the same architecture is
    copied into the loaded model, which keeps the compiled graph. The DiT samples under fid.precision (bf16 autocast
    or fp32); the VAE decodes in the dtype the shards were encoded with (the manifest's codec), in chunks sized to
    memory.
    """

    def __init__(self, codec: CodecInfo, device: str = "cpu", compile: bool = False):
        from pipeline.codecs import codec_from_info

        self.device, self.compile = device, compile
        self.codec = codec
        self.decoder = codec_from_info(codec, device=device)
        self.model = None
        self.checkpoint = None  # path of the weights in self.model
        self.diffusion_config = None
        self.trained_with: dict[str, Any] = {}  # the checkpoint's training precision and compile, as it recorded them
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
            self.trained_with = dict(ckpt.get("trained_with") or {})
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
        bf16 = sampling_precision(fid, self.device) == "bf16"
        for lo in range(0, count, fid.batch_size):
            hi = min(count, lo + fid.batch_size)
            with torch.no_grad(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=bf16):
                z = sampler.sample(denoise, noise[lo:hi], y[lo:hi].to(self.device), generator=g)
            with torch.no_grad():  # the decoder in its own dtype, outside the DiT's autocast
                out.append(tensor_to_images(self.decoder.decode(z.float())))
        return np.concatenate(out)

    def facts(self, fid: FidConfig) -> dict[str, str]:
        """How this sampler draws: device, the DiT's sampling precision and compile, the VAE's decoding dtype."""
        return {
            schema.FID_DEVICE: self.device,
            schema.FID_PRECISION: sampling_precision(fid, self.device),
            schema.FID_COMPILE: str(self.compile).lower(),
            schema.FID_DECODE_DTYPE: self.codec.dtype or "fp32",  # None: the pixel codec, or an old VAE folder
        }


def actor_device(wants_gpu: bool) -> str:
    """The device of a sampling actor: the GPU Ray gave it (CUDA_VISIBLE_DEVICES set by Ray), else the CPU; a
    logical GPU on a machine without CUDA (planning, tests) samples on the CPU."""
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


class _SamplerActor:
    """Ray actor around a SliceSampler and the feature extractors: it samples, decodes and embeds on the device Ray
    gave it, and returns features (a few KB per image), never a whole slice of images unless asked to. One CPU thread
    on a CPU, so that every slice is bitwise reproducible."""

    def __init__(self, codec: CodecInfo, wants_gpu: bool, compile: bool | None):
        self.device = actor_device(wants_gpu)
        if self.device == "cpu":
            torch.set_num_threads(1)
        self.sampler = SliceSampler(codec, self.device, compile if compile is not None else self.device == "cuda")

    def facts(self, fid: FidConfig) -> dict[str, str]:
        return self.sampler.facts(fid)

    def prepare(self, spaces) -> None:
        """Build the feature extractors now: a missing weights file or hub cache fails before any sampling."""
        from pipeline.fid.reference import make_extractor

        for space in spaces:
            make_extractor(space, self.device == "cuda")

    def sample(self, checkpoint: str, fid: FidConfig, index: int, count: int) -> np.ndarray:
        return self.sampler.sample(checkpoint, fid, index, count)

    def embed_samples(self, checkpoint: str, fid: FidConfig, index: int, count: int, spaces, keep_images: int):
        """Slice `index`'s features in each space, the checkpoint's training facts, and its first `keep_images`
        images (for the sample grid, or all of them for fid.save_npz)."""
        from pipeline.fid.reference import embed

        images = self.sampler.sample(checkpoint, fid, index, count)
        feats = [embed(images, space, self.device == "cuda", fid.batch_size) for space in spaces]
        return feats, dict(self.sampler.trained_with), (images[:keep_images] if keep_images else None)

    def embed_images(self, images: np.ndarray, spaces):
        """Features of given uint8 (N, H, W, 3) images in each space."""
        from pipeline.fid.reference import embed

        return [embed(images, space, self.device == "cuda") for space in spaces]

    def embed_real(self, root: str, paths: list[str], resolution: int, spaces):
        """Features of the real images `root/<path>` (ADM crops at `resolution`) in each space."""
        from pipeline.fid.reference import embed, load_crops

        images = load_crops(root, paths, resolution)
        return [embed(images, space, self.device == "cuda") for space in spaces]

    def train_classifier(self, manifest, path: str, fid: FidConfig, threads: int) -> dict:
        """Train the ditscale-classifier extractor on the manifest's real images, with `threads` torch threads."""
        from pipeline.fid.classifier import train_classifier
        from pipeline.fid.reference import real_images

        images, labels = real_images(manifest)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return train_classifier(images, labels, path, seconds=fid.classifier_seconds, steps=fid.classifier_steps)
        finally:
            torch.set_num_threads(before)

    def loads(self) -> int:
        return self.sampler.loads


class SamplerPool:
    """Ray actors that draw the FID samples and embed them (and the real images), alive for the whole stage:
    `fid.workers` of them (0: one per GPU, or per CPU; beside training, one), each holding `fid.cpus_per_worker`
    CPUs, and `fid.gpus_per_worker` GPUs on a cluster that has GPUs. An actor that dies (out of memory, a lost node)
    is restarted once. The driver that owns the pool touches no GPU: it sends work and merges features.

    with SamplerPool(codec, fid) as pool:
        samples = generate(checkpoint, codec, fid, pool=pool)
    """

    def __init__(self, codec: CodecInfo, fid: FidConfig, workers: int = 0, beside_training: bool = False):
        import ray

        from pipeline.ray_utils import cluster_cpus, cluster_gpus, ensure_ray

        ensure_ray()
        gpus = cluster_gpus() if fid.gpus_per_worker > 0 else 0
        self.size = workers or fid.workers or (1 if beside_training else (gpus or cluster_cpus()))
        options = {"num_cpus": fid.cpus_per_worker, **({"num_gpus": fid.gpus_per_worker} if gpus else {})}
        # outside any placement group: a Tune trial scoring in its slot ("between") must not place its actors in
        # its own small bundle, but on the resources its workers released
        options["scheduling_strategy"] = "DEFAULT"
        # the extractors' torch.hub cache (DINOv2) is where this process looks for it: the actors look there too
        hub = {k: os.environ[k] for k in ("TORCH_HOME",) if k in os.environ}
        if hub:
            options["runtime_env"] = {"env_vars": hub}
        self.reserved = {"CPU": self.size * fid.cpus_per_worker, "GPU": self.size * options.get("num_gpus", 0)}
        actor = ray.remote(_SamplerActor).options(**options, max_restarts=1, max_task_retries=1)
        self.actors = [actor.remote(codec, bool(gpus), fid.compile) for _ in range(self.size)]
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

    def first_ready(self) -> int:
        """The index of an actor that has started (waits for the first)."""
        import ray

        if not self.ready:
            probes = {self.actors[a].loads.remote(): a for a in range(len(self.actors))}
            done, _ = ray.wait(list(probes), num_returns=1)
            ray.get(done[0])
            self.ready.add(probes[done[0]])
        return min(self.ready)

    def facts(self, fid: FidConfig) -> dict[str, str]:
        """How the actors sample (device, precision, compile, decoding dtype): the same for every actor of a pool."""
        import ray

        return ray.get(self.actors[self.first_ready()].facts.remote(fid))

    def prepare(self, spaces) -> None:
        """Build the feature extractors in a started actor (the others build theirs at their first slice)."""
        import ray

        ray.get(self.actors[self.first_ready()].prepare.remote(tuple(spaces)))

    def loads(self) -> list[int]:
        """Checkpoints each started actor has read so far."""
        import ray

        return ray.get([self.actors[i].loads.remote() for i in sorted(self.ready)])


def dispatch(pool: SamplerPool, calls: list[tuple[int, str, tuple, int]], desc: str, progress: bool):
    """Run `calls` [(index, actor method, args, images)] on the started actors of `pool`, one call per actor at a
    time, and yield (index, result) in index order (so that merging results does not depend on the number of
    actors). Results that arrive early wait in memory; at most one per actor."""
    import ray
    from tqdm.auto import tqdm

    queue = sorted(calls)
    waiting: dict[int, Any] = {}
    pending: dict[Any, tuple[int, int, int]] = {}  # call in flight -> (index, actor index, images)
    probes = {pool.actors[a].loads.remote(): a for a in range(len(pool.actors)) if a not in pool.ready}
    idle = sorted(pool.ready)
    expected = [index for index, *_ in queue]
    bar = tqdm(total=sum(c[3] for c in calls), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        while expected:
            while queue and idle:
                index, method, args, images = queue.pop(0)
                actor = idle.pop()
                pending[getattr(pool.actors[actor], method).remote(*args)] = (index, actor, images)
            done, _ = ray.wait(list(pending) + list(probes), num_returns=1)
            for ref in done:
                if ref in probes:  # an actor has started (ray.get raises its start-up error, if any)
                    ray.get(ref)
                    actor = probes.pop(ref)
                    pool.ready.add(actor)
                    idle.append(actor)
                    continue
                index, actor, images = pending.pop(ref)
                waiting[index] = ray.get(ref)
                idle.append(actor)
                bar.update(images)
            while expected and expected[0] in waiting:
                index = expected.pop(0)
                yield index, waiting.pop(index)
    finally:
        bar.close()


def generate(
    checkpoint: str,
    codec: CodecInfo,
    fid: FidConfig,
    workers: int = 0,
    progress: bool = True,
    pool: SamplerPool | None = None,
) -> np.ndarray:
    """All `fid.num_samples` samples of a checkpoint as uint8 images, slices drawn by the actors of `pool` (a new
    pool if None). For tests, benchmarks and exports: the fid stage itself moves features, not images."""
    if pool is None:
        with SamplerPool(codec, fid, workers) as own:
            return generate(checkpoint, codec, fid, progress=progress, pool=own)
    calls = [(i, "sample", (checkpoint, fid, i, n), n) for i, n in slices(fid)]
    return np.concatenate([images for _, images in dispatch(pool, calls, "fid samples", progress)])


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
