"""calc: the metrics of one checkpoint (pipeline.fid.study scores a whole study with them).

    ditscale fid quickstart --checkpoint PATH        # one checkpoint, printed only

A checkpoint's samples are drawn and embedded by the sampling actors (pipeline.fid.sampling), which return
features; this process merges them slice by slice against the real images' statistics (pipeline.fid.reference) and
computes torch-fidelity's metrics: FID always; IS, KID and precision/recall on request, FD_DINOV2 in DINOv2's
features. The facts returned beside the metrics name the extractor, the sampler and the precision of sampling,
decoding and training, so that numbers made differently are never mixed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from pipeline import schema
from pipeline.config import FidConfig
from pipeline.fid import classifier, reference, sampling
from pipeline.manifest import Manifest


def frechet_distance(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    """torch-fidelity's FID between two (mu, sigma) statistics."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    if stats_1["mu"].shape != stats_2["mu"].shape:
        raise ValueError(f"statistics of different dimensions: {stats_1['mu'].shape} vs {stats_2['mu'].shape}")
    s1 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_1.items()}
    s2 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_2.items()}
    return float(fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"])


@dataclass
class ScoringSetup:
    """What scoring needs before any sample: the feature spaces (the extractor trained once, for the classifier) and
    the real images' statistics in each (computed once on the actors and cached). `prepare_scoring` builds it once
    per process and FID settings; calling it ahead of the first checkpoint (`StudyScorer.warm_up`) takes this work
    off the critical path, and a missing extractor (weights, hub cache) fails there, before any sampling."""

    main: reference.FeatureSpace
    dinov2: reference.FeatureSpace | None
    reference: dict[str, np.ndarray]  # mu, sigma of the real images in `main`
    dinov2_reference: dict[str, np.ndarray] | None
    classify: bool  # the classifier extractor also judges class fidelity: its logits score the samples' labels


_SETUPS: dict[str, ScoringSetup] = {}


def prepare_scoring(fid: FidConfig, manifest: Manifest, workdir: str, pool: sampling.SamplerPool) -> ScoringSetup:
    """The ScoringSetup of `fid` for this dataset (see there); the real images are embedded on `pool`'s actors."""
    weights = reference.extractor_weights(fid, manifest, workdir, pool=pool)
    key = json.dumps(
        [reference.reference_key(fid, manifest, weights), fid.reference_npz, fid.metrics, fid.dinov2, workdir]
    )
    if key in _SETUPS:
        return _SETUPS[key]
    main, dinov2 = reference.scoring_spaces(fid, weights)
    pool.prepare([main] + ([dinov2] if dinov2 else []))
    keep = bool({"kid", "prc"} & set(fid.metrics))
    ref_stats, ref_feats = reference.reference_statistics(fid, manifest, workdir, main, pool, keep_features=keep)
    if keep:
        reference.real_features(fid, manifest, main, pool, ref_feats)
    dinov2_ref = None
    if dinov2 is not None:
        space = replace(fid, extractor=fid.dinov2, extractor_weights="", reference_npz="")
        dinov2_ref, _ = reference.reference_statistics(space, manifest, workdir, dinov2, pool)
    _SETUPS[key] = ScoringSetup(main, dinov2, ref_stats, dinov2_ref, fid.extractor == classifier.NAME)
    return _SETUPS[key]


def check_sample_count(fid: FidConfig) -> None:
    """Enough samples for a full-rank covariance in every feature space asked for."""
    spaces = [(fid.extractor, "fid.extractor")] + ([(fid.dinov2, "fid.dinov2")] if "fd_dinov2" in fid.metrics else [])
    for extractor, field_name in spaces:
        dim = reference.FEATURE_DIM.get(extractor)
        if dim and fid.num_samples <= dim:
            smaller = ", or fid.dinov2=dinov2-vit-s-14 (384-d)" if field_name == "fid.dinov2" else ""
            raise ValueError(
                f"fid.num_samples={fid.num_samples} gives a rank-deficient covariance of the {dim}-d {extractor} "
                f"features ({field_name}): use more than {dim} samples (the paper uses 50,000){smaller}"
            )


GRID_IMAGES = 100  # samples kept for the grid image logged beside each score


def sample_features(checkpoint: str, fid: FidConfig, spaces, pool: sampling.SamplerPool, all_images: bool, progress):
    """(slice index, [features per space], the checkpoint's training facts, images) of every slice of the
    checkpoint's samples, in slice order, drawn and embedded by the actors of `pool`; images are the slice's first
    ones that the grid still needs (all of them when `all_images`, for fid.save_npz), else None."""
    calls = []
    for index, count in sampling.slices(fid):
        wanted = count if all_images else max(0, min(count, GRID_IMAGES - index * fid.slice_size))
        calls.append((index, "embed_samples", (checkpoint, fid, index, count, tuple(spaces), wanted), count))
    for index, (feats, trained_with, images) in sampling.dispatch(pool, calls, "fid samples", progress):
        yield index, feats, trained_with, images


def score_checkpoint(
    checkpoint: str,
    manifest: Manifest,
    fid: FidConfig,
    workdir: str,
    workers: int = 0,
    progress: bool = True,
    pool: sampling.SamplerPool | None = None,
    npz_path: str | None = None,
) -> tuple[dict[str, float], np.ndarray, dict[str, str]]:
    """(metrics, the first 100 samples, facts) of one EMA checkpoint against the dataset's reference statistics.

    The actors of `pool` (a new pool if None) sample, decode and embed each slice on their own devices and return
    features; this process merges them into running statistics slice by slice, in slice order (the same FID
    whatever the number of actors), and holds features only where KID, precision/recall or the Inception Score need
    them. With fid.save_npz and `npz_path`, the samples are streamed into that ADM-evaluator .npz (arr_0) one slice
    at a time. Facts: the extractor, the sampler, and the precision of sampling, decoding and training.
    """
    from dit_core.checkpoint import load_checkpoint, model_config_from_checkpoint

    if pool is None:
        with sampling.SamplerPool(manifest.codec, fid, workers) as own:
            return score_checkpoint(checkpoint, manifest, fid, workdir, progress=progress, pool=own, npz_path=npz_path)
    ckpt = load_checkpoint(checkpoint)  # clear error if missing or not a dit_core checkpoint
    model_config = model_config_from_checkpoint(ckpt)
    del ckpt
    latent = manifest.latent_shape
    if (model_config.in_channels, model_config.input_size, model_config.input_size) != tuple(latent):
        raise ValueError(
            f"{checkpoint} is a model of {model_config.in_channels}x{model_config.input_size}x"
            f"{model_config.input_size} latents, but the dataset's latents are {'x'.join(map(str, latent))}"
        )
    check_sample_count(fid)
    setup = prepare_scoring(fid, manifest, workdir, pool)
    spaces = (setup.main,) + ((setup.dinov2,) if setup.dinov2 else ())
    layer = setup.main.layer
    keep_feats = bool({"kid", "prc"} & set(fid.metrics))
    gen = reference.Moments(reference.FEATURE_DIM.get(fid.extractor, 2048))
    dino = reference.Moments(reference.FEATURE_DIM[fid.dinov2]) if setup.dinov2 else None
    kept, logits, correct, grid, trained_with = [], [], 0, [], {}
    npz = _NpzWriter(npz_path, fid.num_samples) if fid.save_npz and npz_path else None

    t0 = time.perf_counter()
    for index, feats, slice_trained_with, images in sample_features(checkpoint, fid, spaces, pool, bool(npz), progress):
        main, trained_with = feats[0], slice_trained_with
        gen.add(main[layer])
        if keep_feats:
            kept.append(main[layer])
        if dino is not None:
            dino.add(feats[1]["dinov2"])
        if setup.classify:
            labels = sampling.slice_labels(fid, index, len(main[layer]), model_config.num_classes).numpy()
            correct += int((main["logits_unbiased"].argmax(1) == labels).sum())
        if "isc" in fid.metrics:
            logits.append(main["logits_unbiased"])
        if images is not None:
            if npz is not None:
                npz.write(images)
            if sum(len(g) for g in grid) < GRID_IMAGES:
                grid.append(images[: GRID_IMAGES - sum(len(g) for g in grid)])
    t_sample = time.perf_counter() - t0
    if npz is not None:
        npz.close()

    metrics = {"fid": frechet_distance(gen.statistics(), setup.reference)}
    if keep_feats:
        gen_feats = torch.from_numpy(np.concatenate(kept))
        ref_feats = torch.from_numpy(reference.real_features(fid, manifest, setup.main, pool))
        if "kid" in fid.metrics:
            from torch_fidelity.metric_kid import kid_features_to_metric

            subset = min(1000, len(gen_feats), len(ref_feats))
            kid = kid_features_to_metric(gen_feats, ref_feats, kid_subset_size=subset, verbose=False)
            metrics["kid"] = float(kid["kernel_inception_distance_mean"])
        if "prc" in fid.metrics:
            from torch_fidelity.metric_prc import prc_features_to_metric

            prc = prc_features_to_metric(gen_feats, ref_feats, verbose=False)
            metrics["precision"], metrics["recall"] = float(prc["precision"]), float(prc["recall"])
    if dino is not None:
        metrics["fd_dinov2"] = frechet_distance(dino.statistics(), setup.dinov2_reference)
    if setup.classify:
        metrics["class_accuracy"] = correct / fid.num_samples
    if "isc" in fid.metrics:
        from torch_fidelity.metric_isc import isc_features_to_metric

        isc = isc_features_to_metric(torch.from_numpy(np.concatenate(logits)))
        metrics["isc"] = float(isc["inception_score_mean"])
    metrics["fid_sample_seconds"] = t_sample
    weights = setup.main.weights
    facts = {
        schema.FID_EXTRACTOR: fid.extractor,
        schema.FID_EXTRACTOR_WEIGHTS: reference.reference_key(fid, manifest, weights)["weights"]
        or "torch-fidelity default",
        schema.FID_REFERENCE: fid.reference_npz or "dataset statistics",
        schema.FID_NUM_SAMPLES: str(fid.num_samples),
        schema.FID_SAMPLER: f"{fid.sampler}-{fid.sampling_steps}",
        schema.FID_CFG_SCALE: str(fid.cfg_scale),
        schema.FID_GUIDANCE_CHANNELS: str(fid.guidance_channels or "all"),
        schema.FID_GUIDANCE_INTERVAL: str(list(fid.guidance_interval) or "all steps"),
        schema.FID_LABELS: fid.labels,
        schema.FID_EVALUATIONS_PER_IMAGE: str(fid.evaluations_per_image),
        **pool.facts(fid),
        schema.FID_TRAIN_PRECISION: str(trained_with.get("precision", "unrecorded")),
        schema.FID_TRAIN_COMPILE: str(trained_with.get("compile", "unrecorded")).lower(),
    }
    if "fd_dinov2" in fid.metrics:
        facts[schema.FID_DINOV2_EXTRACTOR] = fid.dinov2
    if setup.classify:
        facts[schema.FID_CLASSIFIER_REAL_ACCURACY] = f"{classifier.held_out_accuracy(weights):.4f}"
    samples = np.concatenate(grid) if grid else np.zeros((0, *manifest_image_shape(manifest)), np.uint8)
    return metrics, samples, facts


def manifest_image_shape(manifest: Manifest) -> tuple[int, int, int]:
    return (manifest.resolution, manifest.resolution, 3)


class _NpzWriter:
    """An ADM-evaluator .npz (one uint8 NHWC array arr_0) written slice by slice: a memory-mapped .npy beside it,
    zipped into place at the end, so no more than one slice of images is in memory at a time."""

    def __init__(self, path: str, count: int):
        self.path, self.count, self.filled, self.array = path, count, 0, None
        self.npy = f"{path}.arr_0.npy"

    def write(self, images: np.ndarray) -> None:
        if self.array is None:
            shape = (self.count, *images.shape[1:])
            self.array = np.lib.format.open_memmap(self.npy, mode="w+", dtype=np.uint8, shape=shape)
        self.array[self.filled : self.filled + len(images)] = images
        self.filled += len(images)

    def close(self) -> None:
        import zipfile

        if self.array is None:
            return
        self.array.flush()
        del self.array
        tmp = f"{self.path}.tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            z.write(self.npy, "arr_0.npy")
        os.replace(tmp, self.path)
        os.remove(self.npy)


def fd_dinov2(images: np.ndarray, fid: FidConfig, manifest: Manifest, workdir: str, pool) -> float:
    """FD_DINOv2 (EDM2, dgm-eval) of uint8 (N, H, W, 3) images: the Frechet distance in the features of
    torch-fidelity's `fid.dinov2` extractor (loaded through torch.hub in the actors of `pool`), against the real
    images' statistics in the same space."""
    import ray

    space = reference.FeatureSpace(fid.dinov2, "", ("dinov2",))
    check_sample_count(replace(fid, num_samples=len(images), metrics=("fid", "fd_dinov2")))
    ref, _ = reference.reference_statistics(
        replace(fid, extractor=fid.dinov2, extractor_weights="", reference_npz=""), manifest, workdir, space, pool
    )
    actor = pool.actors[pool.first_ready()]
    feats = ray.get(actor.embed_images.remote(images, (space,)))[0]["dinov2"]
    return frechet_distance(reference.statistics(feats), ref)
