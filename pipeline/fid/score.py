"""calc: the metrics of one checkpoint, and the fid stage that scores every milestone of a study into MLflow.

    ditscale fid quickstart                          # every milestone of every trial not scored yet
    ditscale fid quickstart --checkpoint PATH        # one checkpoint, printed only

A checkpoint's samples (pipeline.fid.sampling) and the real images' statistics (pipeline.fid.reference) go through
torch-fidelity's feature extractor and metric functions: FID always; IS, KID and precision/recall on request. Results
go to the trial's MLflow run at step = training step (metric `fid`, ...), with tags naming the extractor
(`fid.extractor`, `fid.extractor_weights`) so numbers from different extractors are never mixed, and a grid of
samples as an artifact. A trial's run refuses scores from another extractor than the one it has. The stage asks the
plan for the trials and the layout for their milestones.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError, ExperimentConfig, FidConfig
from pipeline.fid import classifier, reference, sampling
from pipeline.layout import ema_label
from pipeline.manifest import Manifest
from pipeline.plan import plan_sweep


def frechet_distance(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    """torch-fidelity's FID between two (mu, sigma) statistics."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    if stats_1["mu"].shape != stats_2["mu"].shape:
        raise ValueError(f"statistics of different dimensions: {stats_1['mu'].shape} vs {stats_2['mu'].shape}")
    s1 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_1.items()}
    s2 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_2.items()}
    return float(fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"])


def score_checkpoint(
    checkpoint: str,
    manifest: Manifest,
    fid: FidConfig,
    workdir: str,
    workers: int = 0,
    progress: bool = True,
    pool: sampling.SamplerPool | None = None,
) -> tuple[dict[str, float], np.ndarray, dict[str, str]]:
    """(metrics, samples, extractor facts) of one EMA checkpoint against the dataset's reference statistics.

    `pool` draws the samples (a stage scoring many checkpoints passes one); None starts one for this checkpoint.
    """
    from dit_core.checkpoint import load_checkpoint, model_config_from_checkpoint

    ckpt = load_checkpoint(checkpoint)  # clear error if missing or not a dit_core checkpoint
    model_config = model_config_from_checkpoint(ckpt)
    latent = manifest.latent_shape
    if (model_config.in_channels, model_config.input_size, model_config.input_size) != tuple(latent):
        raise ValueError(
            f"{checkpoint} is a model of {model_config.in_channels}x{model_config.input_size}x"
            f"{model_config.input_size} latents, but the dataset's latents are {'x'.join(map(str, latent))}"
        )
    dim = reference.FEATURE_DIM.get(fid.extractor)
    if dim and fid.num_samples <= dim:
        raise ValueError(
            f"fid.num_samples={fid.num_samples} gives a rank-deficient covariance of the {dim}-d {fid.extractor} "
            f"features: use more than {dim} samples (the paper uses 50,000)"
        )
    cuda = torch.cuda.is_available()
    weights = reference.extractor_weights(fid, manifest, workdir)
    layer = reference.feature_layer(fid)
    # the classifier extractor is also the judge of class fidelity: its logits score the samples' labels
    classify = fid.extractor == classifier.NAME
    layers = sorted({layer} | ({"logits_unbiased"} if "isc" in fid.metrics or classify else set()))
    extractor = reference.make_extractor(fid, weights, cuda, layers)
    ref_stats, ref_feats = reference.reference_statistics(fid, manifest, workdir, weights, extractor, cuda)

    dinov2 = DinoV2Space(fid, manifest, workdir, cuda) if "fd_dinov2" in fid.metrics else None

    t0 = time.perf_counter()
    samples = sampling.generate(checkpoint, manifest.codec, fid, workers, progress, pool)
    t_sample = time.perf_counter() - t0
    gen_feats = reference.features(samples, extractor, cuda)
    metrics = {"fid": frechet_distance(reference.statistics(gen_feats[layer]), ref_stats)}
    if {"kid", "prc"} & set(fid.metrics):
        ref_feats = reference.real_features(fid, manifest, weights, extractor, cuda, ref_feats)
        if "kid" in fid.metrics:
            from torch_fidelity.metric_kid import kid_features_to_metric

            subset = min(1000, len(samples), len(ref_feats[layer]))
            kid = kid_features_to_metric(gen_feats[layer], ref_feats[layer], kid_subset_size=subset, verbose=False)
            metrics["kid"] = float(kid["kernel_inception_distance_mean"])
        if "prc" in fid.metrics:
            from torch_fidelity.metric_prc import prc_features_to_metric

            prc = prc_features_to_metric(gen_feats[layer], ref_feats[layer], verbose=False)
            metrics["precision"], metrics["recall"] = float(prc["precision"]), float(prc["recall"])
    if dinov2 is not None:
        metrics["fd_dinov2"] = dinov2.distance(samples)
    if classify:
        labels = torch.from_numpy(sampling.sample_labels(fid, model_config.num_classes))
        metrics["class_accuracy"] = float((gen_feats["logits_unbiased"].argmax(1).cpu() == labels).float().mean())
    if "isc" in fid.metrics:
        from torch_fidelity.metric_isc import isc_features_to_metric

        metrics["isc"] = float(isc_features_to_metric(gen_feats["logits_unbiased"])["inception_score_mean"])
    metrics["fid_sample_seconds"] = t_sample
    facts = {
        "fid.extractor": fid.extractor,
        "fid.extractor_weights": reference.reference_key(fid, manifest, weights)["weights"] or "torch-fidelity default",
        "fid.reference": fid.reference_npz or "dataset statistics",
        "fid.num_samples": str(fid.num_samples),
        "fid.sampler": f"{fid.sampler}-{fid.sampling_steps}",
        "fid.cfg_scale": str(fid.cfg_scale),
        "fid.guidance_channels": str(fid.guidance_channels or "all"),
        "fid.guidance_interval": str(list(fid.guidance_interval) or "all steps"),
        "fid.labels": fid.labels,
        "fid.evaluations_per_image": str(fid.evaluations_per_image),
    }
    if "fd_dinov2" in fid.metrics:
        facts["fid.fd_dinov2_extractor"] = fid.dinov2
    if classify:
        facts["fid.classifier_real_accuracy"] = f"{classifier.held_out_accuracy(weights):.4f}"
    return metrics, samples, facts


class DinoV2Space:
    """FD_DINOv2 (EDM2, dgm-eval): the Frechet distance in the features of torch-fidelity's `fid.dinov2` extractor
    (loaded through torch.hub), against the real images' statistics in the same space (cached like FID's). Built
    before any sampling, so that a missing hub cache fails at once."""

    def __init__(self, fid: FidConfig, manifest: Manifest, workdir: str, cuda: bool):
        self.space = replace(fid, extractor=fid.dinov2, extractor_weights="", reference_npz="")
        dim = reference.FEATURE_DIM[fid.dinov2]
        if fid.num_samples <= dim:
            raise ValueError(
                f"fid.num_samples={fid.num_samples} gives a rank-deficient covariance of the {dim}-d {fid.dinov2} "
                f"features: use more than {dim} samples, or fid.dinov2=dinov2-vit-s-14 (384-d)"
            )
        self.layer, self.cuda = reference.feature_layer(self.space), cuda
        self.extractor = reference.make_extractor(self.space, "", cuda, [self.layer])
        self.reference, _ = reference.reference_statistics(self.space, manifest, workdir, "", self.extractor, cuda)

    def distance(self, images: np.ndarray) -> float:
        feats = reference.features(images, self.extractor, self.cuda)[self.layer]
        return frechet_distance(reference.statistics(feats), self.reference)


def fd_dinov2(images: np.ndarray, fid: FidConfig, manifest: Manifest, workdir: str, cuda: bool) -> float:
    """FD_DINOv2 of uint8 (N, H, W, 3) images (see DinoV2Space)."""
    return DinoV2Space(replace(fid, num_samples=len(images)), manifest, workdir, cuda).distance(images)


def run_fid(experiment: ExperimentConfig, workdir: str, progress: bool = True) -> list[dict[str, Any]]:
    """Score every milestone not yet scored (idempotent; safe to run while the sweep trains)."""
    from pipeline import tracking

    plan = plan_sweep(experiment, workdir)
    fid = experiment.fid  # the extractor, reference and workers: one for the study; sampling per trial
    scored_now = []
    pool = None  # started at the first checkpoint to score, stopped at the end
    with contextlib.ExitStack() as stack, tracking.tracking_uri(experiment.tracking.tracking_uri, workdir) as uri:
        exp_id = tracking.experiment_id(uri, experiment.mlflow_experiment)
        for trial in plan.trials:
            if not plan.layout(trial).milestones():
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
            for decay in (None, *trial.experiment.train.ema_decays):
                available = plan.layout(trial).milestones(decay)
                prefix = "" if decay is None else f"{ema_label(decay)}/"  # train.ema_decay's EMA: plain `fid`
                done = {step for step, _ in tracking.metric_history(uri, run.info.run_id, f"{prefix}fid")}
                for step in sorted(set(available) - done):
                    if pool is None:
                        pool = stack.enter_context(sampling.SamplerPool(plan.manifest.codec, fid))
                    metrics, samples, facts = score_checkpoint(
                        available[step], plan.manifest, trial.experiment.fid, workdir, progress=progress, pool=pool
                    )
                    metrics = {f"{prefix}{k}": v for k, v in metrics.items()}
                    with tempfile.TemporaryDirectory() as tmp:  # everything computed before anything is logged
                        name = f"samples_{prefix.replace('/', '_')}step{step:07d}"
                        grid = sampling.sample_grid(samples, Path(tmp) / f"{name}.png")
                        tracking.set_tags(uri, run.info.run_id, facts)
                        tracking.MetricLogger(uri, run.info.run_id).log(metrics, step=step)
                        tracking.log_artifact(uri, run.info.run_id, grid, "samples")
                        if fid.save_npz:
                            npz = Path(tmp) / f"{name}.npz"
                            np.savez(npz, arr_0=samples)
                            tracking.log_artifact(uri, run.info.run_id, str(npz), "samples")
                    print(
                        f"[{trial.run_name}] step {step:,}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                        flush=True,
                    )
                    scored_now.append({"run_name": trial.run_name, "step": step, "ema_decay": decay, **metrics})
    if not scored_now:
        print("fid: nothing new to score")
    return scored_now
