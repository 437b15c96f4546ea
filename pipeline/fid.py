"""fid: score EMA checkpoints with torch-fidelity; sampling split over Ray actors; results logged to MLflow.

    ditscale fid quickstart                          # every milestone of every trial not scored yet
    ditscale fid quickstart --checkpoint PATH        # one checkpoint, printed only

Three parts, as EDM2 splits them:
- ref: reference statistics (mu, sigma) of the real images (same ADM crop as training) per (dataset, resolution,
  extractor), computed once and cached under <workdir>/fid/reference/; or an ADM reference batch .npz (mu, sigma)
  so ImageNet numbers are comparable with the paper. A cache key stored beside the statistics refuses a mismatch.
- gen: samples from the EMA weights in slices of `fid.slice_size`; slice i has its own seed (labels, noise,
  sampler randomness), so the same request gives the same images, and the same FID, whatever the number of workers.
  Ray actors (one per GPU, or per CPU) draw the slices and keep the VAE and the DiT loaded (and, on a GPU,
  compiled) for the whole stage.
- calc: torch-fidelity feature extractor and metric functions (FID; IS, KID, precision/recall on request).

Results go to the trial's MLflow child run at step = training step (metric `fid`, ...), with tags naming the
extractor (`fid.extractor`, `fid.extractor_weights`) so numbers from different extractors are never mixed, and a
grid of samples as an artifact. A trial's run refuses scores from another extractor than the one it has.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import fid_extractors
from pipeline.config import ConfigError, ExperimentConfig, FidConfig
from pipeline.train import MILESTONE_DIR

FEATURE_LAYER = {"inception-v3-compat": "2048", fid_extractors.NAME: "feat"}
FEATURE_DIM = {"inception-v3-compat": 2048, fid_extractors.NAME: fid_extractors.FEATURE_DIM}

# ---------------------------------------------------------------------------------------------------------------
# Real images and the feature extractor
# ---------------------------------------------------------------------------------------------------------------


def real_images(manifest: dict[str, Any], max_images: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, R, R, 3) ADM crops of the dataset's source images (those the manifest kept) and their labels."""
    from pipeline.prepare import list_source, load_image

    listing = list_source(manifest["source"]["root"])
    if listing.sha256() != manifest["source"]["listing_sha256"]:
        raise ValueError(f"the source folder {listing.root} changed since the shards were made; re-run prepare")
    skipped = {s["path"] for s in manifest["skipped"]}
    files = [(rel, label) for rel, label in listing.files if rel not in skipped]
    if max_images and max_images < len(files):
        keep = np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False))
        files = [files[i] for i in keep]
    root, resolution = manifest["source"]["root"].rstrip("/"), manifest["resolution"]

    def load(item):
        import fsspec

        with fsspec.open(f"{root}/{item[0]}", "rb") as f:
            return load_image(f.read(), resolution, 10**12)[0]

    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(load, files))
    return np.stack(images), np.array([label for _, label in files])


def extractor_weights(fid: FidConfig, manifest: dict[str, Any], workdir: str, images_labels=None) -> str:
    """The weights file of the configured extractor ('' = torch-fidelity's download); trains the classifier once."""
    if fid.extractor != fid_extractors.NAME:
        return fid.extractor_weights
    budget = f"n{fid.classifier_steps}" if fid.classifier_steps > 0 else f"s{int(fid.classifier_seconds)}"
    key = f"{manifest['source']['listing_sha256'][:12]}-r{manifest['resolution']}-{budget}"
    path = Path(workdir) / "fid" / "extractors" / f"classifier-{key}.pt"
    if not path.exists():
        images, labels = images_labels if images_labels is not None else real_images(manifest)
        facts = fid_extractors.train_classifier(images, labels, path, seconds=fid.classifier_seconds,
                                                steps=fid.classifier_steps)  # fmt: skip
        print(f"fid: trained the {fid_extractors.NAME} extractor ({facts['steps']} steps, held-out accuracy "
              f"{facts['accuracy']:.1%}) -> {path}")  # fmt: skip
    return str(path)


def make_extractor(fid: FidConfig, weights: str, cuda: bool, layers: list[str]):
    from torch_fidelity.utils import create_feature_extractor

    fid_extractors.register()
    kwargs = {"feature_extractor_weights_path": weights} if weights else {}
    try:
        return create_feature_extractor(fid.extractor, layers, cuda=cuda, verbose=False, **kwargs)
    except Exception as exc:
        raise ValueError(
            f"cannot create the feature extractor {fid.extractor!r}: {exc}\n"
            f"offline, set fid.extractor_weights to a local weights file, or fid.extractor={fid_extractors.NAME}"
        ) from exc


class _Images(torch.utils.data.Dataset):
    """uint8 (N, H, W, 3) as the (3, H, W) uint8 tensors torch-fidelity expects."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


def features(images: np.ndarray, extractor, cuda: bool, batch_size: int = 250) -> dict[str, torch.Tensor]:
    """torch-fidelity features of uint8 (N, H, W, 3) images: {layer: (N, dim)}."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    return get_featuresdict_from_dataset(_Images(images), extractor, batch_size, cuda, True, False)


def statistics(feats: torch.Tensor) -> dict[str, np.ndarray]:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(feats.double())


def frechet_distance(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    """torch-fidelity's FID between two (mu, sigma) statistics."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    if stats_1["mu"].shape != stats_2["mu"].shape:
        raise ValueError(f"statistics of different dimensions: {stats_1['mu'].shape} vs {stats_2['mu'].shape}")
    s1 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_1.items()}
    s2 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_2.items()}
    return float(fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"])


# ---------------------------------------------------------------------------------------------------------------
# ref: cached reference statistics
# ---------------------------------------------------------------------------------------------------------------


def reference_key(fid: FidConfig, manifest: dict[str, Any], weights: str) -> dict[str, Any]:
    return {
        "dataset": manifest["source"]["listing_sha256"],
        "resolution": manifest["resolution"],
        "extractor": fid.extractor,
        "layer": FEATURE_LAYER.get(fid.extractor, "2048"),
        "weights": fid_extractors.weights_digest(weights) if weights and os.path.isfile(weights) else weights,
        "images": fid.reference_images,
    }


def reference_statistics(
    fid: FidConfig, manifest: dict[str, Any], workdir: str, weights: str, extractor, cuda: bool
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor] | None]:
    """(mu, sigma) of the real images: from fid.reference_npz, the cache, or computed now and cached.

    Returns the statistics and, when just computed, the real features (for KID / PRC).
    """
    if fid.reference_npz:
        with np.load(fid.reference_npz) as npz:
            if "mu" not in npz or "sigma" not in npz:
                raise ValueError(f"{fid.reference_npz} holds no 'mu' and 'sigma' (an ADM reference batch has them)")
            stats = {"mu": npz["mu"], "sigma": npz["sigma"]}
        if stats["mu"].shape[0] != FEATURE_DIM.get(fid.extractor, stats["mu"].shape[0]):
            raise ValueError(f"{fid.reference_npz} has {stats['mu'].shape[0]}-d statistics; {fid.extractor} "
                             f"gives {FEATURE_DIM[fid.extractor]}-d features")  # fmt: skip
        return stats, None
    key = reference_key(fid, manifest, weights)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(workdir) / "fid" / "reference" / f"{fid.extractor}-{digest}.npz"
    if path.exists():
        with np.load(path) as npz:
            saved = json.loads(str(npz["key"]))
            if saved != key:
                raise ValueError(f"reference statistics {path} were made for {saved}, not {key}: delete the file")
            return {"mu": npz["mu"], "sigma": npz["sigma"]}, None
    images, _ = real_images(manifest, fid.reference_images, fid.seed)
    feats = features(images, extractor, cuda)
    stats = statistics(feats[FEATURE_LAYER.get(fid.extractor, "2048")])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"], key=json.dumps(key, sort_keys=True))
    os.replace(tmp, path)
    return stats, feats


_REAL_FEATURES: dict[str, dict[str, torch.Tensor]] = {}  # reference key -> features, for KID and PRC


def real_features(
    fid: FidConfig, manifest: dict[str, Any], weights: str, extractor, cuda: bool, computed=None
) -> dict[str, torch.Tensor]:
    """Features of the real images (KID and PRC need them, not only their statistics), extracted once per process:
    a stage scoring many checkpoints reads and embeds the real images once, not once per checkpoint."""
    key = json.dumps(reference_key(fid, manifest, weights), sort_keys=True)
    if computed is not None:
        _REAL_FEATURES[key] = computed
    if key not in _REAL_FEATURES:
        images, _ = real_images(manifest, fid.reference_images, fid.seed)
        _REAL_FEATURES[key] = features(images, extractor, cuda)
    return _REAL_FEATURES[key]


# ---------------------------------------------------------------------------------------------------------------
# gen: deterministic slices of samples (Ray actors)
# ---------------------------------------------------------------------------------------------------------------


def make_sampler(fid: FidConfig, diffusion_config):
    from dit_core.samplers import DDIMSampler, DDPMSampler, DiffusersSampler, diffusers_scheduler

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
    return [(i, min(fid.slice_size, fid.num_samples - i * fid.slice_size))
            for i in range(-(-fid.num_samples // fid.slice_size))]  # fmt: skip


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

    def __init__(self, codec: dict[str, Any], device: str = "cpu", compile: bool = False):
        from pipeline.codecs import codec_from_description

        self.device, self.compile = device, compile
        self.decoder = codec_from_description(codec, device=device)
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

        return make_denoiser(model, fid.cfg_scale, fid.guidance_channels or None)

    def sample(self, checkpoint: str, fid: dict[str, Any], index: int, count: int) -> np.ndarray:
        """Slice `index` of the samples: `count` uint8 (H, W, 3) images."""
        from pipeline.codecs import tensor_to_images

        fid_cfg = FidConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fid.items()})
        model = self.load(checkpoint)
        sampler = make_sampler(fid_cfg, self.diffusion_config)
        denoise = self.denoiser(model, fid_cfg)
        cfg = model.config
        g = torch.Generator(self.device).manual_seed(fid_cfg.seed * 1_000_003 + index)
        y = slice_labels(fid_cfg, index, count, cfg.num_classes)
        noise = torch.randn(count, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g, device=self.device)
        out = []
        autocast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda")
        with torch.no_grad(), autocast:
            for lo in range(0, count, fid_cfg.batch_size):
                hi = min(count, lo + fid_cfg.batch_size)
                z = sampler.sample(denoise, noise[lo:hi], y[lo:hi].to(self.device), generator=g)
                out.append(tensor_to_images(self.decoder.decode(z.float())))
        return np.concatenate(out)


def sample_slice(
    checkpoint: str, codec: dict[str, Any], fid: dict[str, Any], index: int, count: int, device: str = "cpu"
) -> np.ndarray:
    """Slice `index` of the samples: `count` uint8 (H, W, 3) images, a pure function of (checkpoint, fid, index)."""
    return SliceSampler(codec, device).sample(checkpoint, fid, index, count)


def compile_sampling(fid: FidConfig, device: str) -> bool:
    return fid.compile if fid.compile is not None else device == "cuda"


class _SamplerActor:
    """Ray actor around a SliceSampler; one CPU thread on CPU, so that every slice is bitwise reproducible."""

    def __init__(self, codec: dict[str, Any], device: str, compile: bool):
        if device == "cpu":
            torch.set_num_threads(1)
        self.sampler = SliceSampler(codec, device, compile)

    def sample(self, checkpoint: str, fid: dict[str, Any], index: int, count: int) -> np.ndarray:
        return self.sampler.sample(checkpoint, fid, index, count)

    def loads(self) -> int:
        return self.sampler.loads


class SamplerPool:
    """Ray actors that draw the FID samples: one per GPU (or per CPU), alive for the whole stage.

    with SamplerPool(codec, fid) as pool:
        samples = generate(checkpoint, codec, fid, pool=pool)
    """

    def __init__(self, codec: dict[str, Any], fid: FidConfig, workers: int = 0):
        import ray

        from pipeline.ray_utils import cluster_cpus, cluster_gpus, ensure_ray

        ensure_ray()
        gpus = cluster_gpus()
        self.device = "cuda" if gpus else "cpu"
        self.size = workers or fid.workers or (gpus or cluster_cpus())
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        actor = ray.remote(_SamplerActor).options(**options)
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
    codec: dict[str, Any],
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
    fid_dict = asdict(fid)
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
            pending[pool.actors[actor].sample.remote(checkpoint, fid_dict, i, n)] = (i, actor)
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


# ---------------------------------------------------------------------------------------------------------------
# calc: one checkpoint
# ---------------------------------------------------------------------------------------------------------------


def score_checkpoint(
    checkpoint: str,
    manifest: dict[str, Any],
    fid: FidConfig,
    workdir: str,
    workers: int = 0,
    progress: bool = True,
    pool: SamplerPool | None = None,
) -> tuple[dict[str, float], np.ndarray, dict[str, str]]:
    """(metrics, samples, extractor facts) of one EMA checkpoint against the dataset's reference statistics.

    `pool` draws the samples (a stage scoring many checkpoints passes one); None starts one for this checkpoint.
    """
    from dit_core.checkpoint import load_checkpoint, model_config_from_checkpoint

    ckpt = load_checkpoint(checkpoint)  # clear error if missing or not a dit_core checkpoint
    model_config = model_config_from_checkpoint(ckpt)
    latent = manifest["latent_shape"]
    if [model_config.in_channels, model_config.input_size, model_config.input_size] != latent:
        raise ValueError(
            f"{checkpoint} is a model of {model_config.in_channels}x{model_config.input_size}x"
            f"{model_config.input_size} latents, but the dataset's latents are {'x'.join(map(str, latent))}"
        )
    dim = FEATURE_DIM.get(fid.extractor)
    if dim and fid.num_samples <= dim:
        raise ValueError(
            f"fid.num_samples={fid.num_samples} gives a rank-deficient covariance of the {dim}-d {fid.extractor} "
            f"features: use more than {dim} samples (the paper uses 50,000)"
        )
    cuda = torch.cuda.is_available()
    weights = extractor_weights(fid, manifest, workdir)
    layer = FEATURE_LAYER.get(fid.extractor, "2048")
    # the classifier extractor is also the judge of class fidelity: its logits score the samples' labels
    classify = fid.extractor == fid_extractors.NAME
    layers = sorted({layer} | ({"logits_unbiased"} if "isc" in fid.metrics or classify else set()))
    extractor = make_extractor(fid, weights, cuda, layers)
    ref_stats, ref_feats = reference_statistics(fid, manifest, workdir, weights, extractor, cuda)

    t0 = time.perf_counter()
    samples = generate(checkpoint, manifest["codec"], fid, workers, progress, pool)
    t_sample = time.perf_counter() - t0
    gen_feats = features(samples, extractor, cuda)
    metrics = {"fid": frechet_distance(statistics(gen_feats[layer]), ref_stats)}
    if {"kid", "prc"} & set(fid.metrics):
        ref_feats = real_features(fid, manifest, weights, extractor, cuda, ref_feats)
        if "kid" in fid.metrics:
            from torch_fidelity.metric_kid import kid_features_to_metric

            subset = min(1000, len(samples), len(ref_feats[layer]))
            kid = kid_features_to_metric(gen_feats[layer], ref_feats[layer], kid_subset_size=subset, verbose=False)
            metrics["kid"] = float(kid["kernel_inception_distance_mean"])
        if "prc" in fid.metrics:
            from torch_fidelity.metric_prc import prc_features_to_metric

            prc = prc_features_to_metric(gen_feats[layer], ref_feats[layer], verbose=False)
            metrics["precision"], metrics["recall"] = float(prc["precision"]), float(prc["recall"])
    if classify:
        labels = torch.from_numpy(sample_labels(fid, model_config.num_classes))
        metrics["class_accuracy"] = float((gen_feats["logits_unbiased"].argmax(1).cpu() == labels).float().mean())
    if "isc" in fid.metrics:
        from torch_fidelity.metric_isc import isc_features_to_metric

        metrics["isc"] = float(isc_features_to_metric(gen_feats["logits_unbiased"])["inception_score_mean"])
    metrics["fid_sample_seconds"] = t_sample
    facts = {
        "fid.extractor": fid.extractor,
        "fid.extractor_weights": reference_key(fid, manifest, weights)["weights"] or "torch-fidelity default",
        "fid.reference": fid.reference_npz or "dataset statistics",
        "fid.num_samples": str(fid.num_samples),
        "fid.sampler": f"{fid.sampler}-{fid.sampling_steps}",
        "fid.cfg_scale": str(fid.cfg_scale),
        "fid.guidance_channels": str(fid.guidance_channels or "all"),
        "fid.labels": fid.labels,
    }
    if classify:
        facts["fid.classifier_real_accuracy"] = f"{fid_extractors.held_out_accuracy(weights):.4f}"
    return metrics, samples, facts


# ---------------------------------------------------------------------------------------------------------------
# The stage: every unscored milestone of every trial
# ---------------------------------------------------------------------------------------------------------------


def milestone_steps(trial_dir: str) -> dict[int, str]:
    """{step: path} of the EMA milestones a trial has written so far."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(f"{trial_dir}/{MILESTONE_DIR}")
    if not fs.exists(root):
        return {}
    found = {}
    for path in fs.ls(root, detail=False):
        match = re.search(r"ema-(\d+)\.pt$", path)
        if match:
            found[int(match.group(1))] = path if "://" not in trial_dir else f"{trial_dir}/{MILESTONE_DIR}/{match[0]}"
    return found


def run_fid(experiment: ExperimentConfig, workdir: str, progress: bool = True) -> list[dict[str, Any]]:
    """Score every milestone not yet scored (idempotent; safe to run while the sweep trains)."""
    from pipeline import tracking
    from pipeline.sweep import plan_sweep

    plan = plan_sweep(experiment, workdir)
    fid = experiment.fid
    scored_now = []
    pool = None  # started at the first checkpoint to score, stopped at the end
    with contextlib.ExitStack() as stack, tracking.tracking_uri(experiment.tracking.tracking_uri, workdir) as uri:
        exp_id = tracking.experiment_id(uri, experiment.mlflow_experiment)
        for trial in plan.trials:
            available = milestone_steps(plan.trial_dir(trial))
            if not available:
                continue
            run = tracking.find_run(uri, exp_id, {tracking.TAG_ROLE: "trial", tracking.TAG_RUN_NAME: trial.run_name})
            if run is None:
                raise ConfigError(f"no MLflow run for trial {trial.run_name}: run `ditscale sweep {experiment.name}`")
            previous = run.data.tags.get("fid.extractor")
            if previous and previous != fid.extractor:
                raise ConfigError(
                    f"run {trial.run_name} was scored with {previous}, not {fid.extractor}: FIDs of different "
                    f"extractors must not share a curve; set fid.extractor={previous} or use another experiment name"
                )
            done = {step for step, _ in tracking.metric_history(uri, run.info.run_id, "fid")}
            for step in sorted(set(available) - done):
                if pool is None:
                    pool = stack.enter_context(SamplerPool(plan.manifest["codec"], fid))
                metrics, samples, facts = score_checkpoint(
                    available[step], plan.manifest, fid, workdir, progress=progress, pool=pool
                )
                with tempfile.TemporaryDirectory() as tmp:  # everything computed before anything is logged
                    grid = sample_grid(samples, Path(tmp) / f"samples_step{step:07d}.png")
                    tracking.set_tags(uri, run.info.run_id, facts)
                    tracking.MetricLogger(uri, run.info.run_id).log(metrics, step=step)
                    tracking.log_artifact(uri, run.info.run_id, grid, "samples")
                    if fid.save_npz:
                        npz = Path(tmp) / f"samples_step{step:07d}.npz"
                        np.savez(npz, arr_0=samples)
                        tracking.log_artifact(uri, run.info.run_id, str(npz), "samples")
                print(f"[{trial.run_name}] step {step:,}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                      flush=True)  # fmt: skip
                scored_now.append({"run_name": trial.run_name, "step": step, **metrics})
    if not scored_now:
        print("fid: nothing new to score")
    return scored_now
