"""ref: the real images, the feature spaces, and the reference statistics they give, computed once and cached.

Reference statistics (mu, sigma) of the real images (the training crop of the images the shards kept) are cached per
(dataset, resolution, extractor, weights, image count) under the workspace's fid/reference/ folder, with the key
stored beside them so a mismatch is refused; or they come from an ADM reference batch (.npz with mu and sigma), so
that ImageNet numbers are comparable with the paper's.

Where the work happens: the driver (`ditscale run`, `ditscale fid`) holds no GPU and never embeds an image. It lists
the real images, hands slices of the list to the sampling actors (pipeline.fid.sampling), which load, crop and embed
them on the devices Ray gave them, and merges what comes back: per-slice features folded into running float64
moments (`Moments`), so the driver's memory does not grow with the number of images. Real features themselves are
kept only when KID or precision/recall need them (N x feature-dim float32, never images).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import DINOV2_EXTRACTORS, FidConfig
from pipeline.fid import classifier
from pipeline.images import list_source, load_image
from pipeline.layout import Workspace
from pipeline.manifest import Manifest

FEATURE_LAYER = {"inception-v3-compat": "2048", classifier.NAME: "feat", **dict.fromkeys(DINOV2_EXTRACTORS, "dinov2")}
FEATURE_DIM = {"inception-v3-compat": 2048, classifier.NAME: classifier.FEATURE_DIM, **DINOV2_EXTRACTORS}


def feature_layer(fid: FidConfig) -> str:
    return FEATURE_LAYER.get(fid.extractor, "2048")


@dataclass(frozen=True)
class FeatureSpace:
    """One torch-fidelity feature extractor and the layers read from it: what an actor embeds images with."""

    extractor: str  # torch-fidelity extractor name ("inception-v3-compat", "dinov2-vit-l-14", "ditscale-classifier")
    weights: str  # local weights file; "" = torch-fidelity's own (download or hub cache)
    layers: tuple[str, ...]  # feature layers returned, e.g. ("2048", "logits_unbiased")

    @property
    def layer(self) -> str:
        """The layer whose Frechet distance is the metric."""
        return FEATURE_LAYER.get(self.extractor, "2048")


# ---------------------------------------------------------------------------------------------------------------
# Real images and the feature extractor
# ---------------------------------------------------------------------------------------------------------------


def real_files(manifest: Manifest, max_images: int = 0, seed: int = 0) -> tuple[str, list[tuple[str, int]]]:
    """(source root, [(relative path, label)]) of the real images the manifest kept, `max_images` of them drawn
    with `seed` (0 = all), in listing order. Refuses a source folder that changed since the shards were made."""
    listing = list_source(manifest.source.root)
    if listing.sha256() != manifest.source.listing_sha256:
        raise ValueError(f"the source folder {listing.root} changed since the shards were made; re-run prepare")
    skipped = {s.path for s in manifest.skipped}
    files = [(rel, label) for rel, label in listing.files if rel not in skipped]
    if max_images and max_images < len(files):
        keep = np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False))
        files = [files[i] for i in keep]
    return manifest.source.root.rstrip("/"), files


def load_crops(root: str, paths: list[str], resolution: int) -> np.ndarray:
    """uint8 (N, R, R, 3) ADM crops of the images `root/<path>` (any fsspec URL), read by 8 threads."""
    import fsspec

    def load(rel: str) -> np.ndarray:
        with fsspec.open(f"{root}/{rel}", "rb") as f:
            return load_image(f.read(), resolution, 10**12)[0]

    with ThreadPoolExecutor(8) as pool:
        return np.stack(list(pool.map(load, paths)))


def real_images(manifest: Manifest, max_images: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, R, R, 3) ADM crops of the dataset's source images (those the manifest kept) and their labels, all in
    this process: only for training the toy classifier extractor (a few thousand small images), never for FID."""
    root, files = real_files(manifest, max_images, seed)
    return load_crops(root, [rel for rel, _ in files], manifest.resolution), np.array([label for _, label in files])


def extractor_weights(fid: FidConfig, manifest: Manifest, workdir: str, images_labels=None, pool=None) -> str:
    """The weights file of the configured extractor ('' = torch-fidelity's download); trains the classifier once:
    in a started actor of `pool` when given (the fid stage: the driver touches no accelerator, and torch's optimizers
    ask for one), else in this process (on `images_labels` when given)."""
    if fid.extractor != classifier.NAME:
        return fid.extractor_weights
    budget = f"n{fid.classifier_steps}" if fid.classifier_steps > 0 else f"s{int(fid.classifier_seconds)}"
    key = f"{manifest.source.listing_sha256[:12]}-r{manifest.resolution}-{budget}"
    path = Workspace(workdir).fid_extractors / f"classifier-{key}.pt"
    if not path.exists():
        if pool is not None and images_labels is None:
            import ray

            actor = pool.actors[pool.first_ready()]
            # as many threads as this process would use, so that the weights are those it would train
            facts = ray.get(actor.train_classifier.remote(manifest, str(path), fid, torch.get_num_threads()))
        else:
            images, labels = images_labels if images_labels is not None else real_images(manifest)
            facts = classifier.train_classifier(
                images, labels, path, seconds=fid.classifier_seconds, steps=fid.classifier_steps
            )
        print(
            f"fid: trained the {classifier.NAME} extractor ({facts['steps']} steps, held-out accuracy "
            f"{facts['accuracy']:.1%}) -> {path}"
        )
    return str(path)


def scoring_spaces(fid: FidConfig, weights: str) -> tuple[FeatureSpace, FeatureSpace | None]:
    """The feature spaces a checkpoint is embedded in: fid.extractor's (with the class logits when the Inception
    Score or the classifier's class accuracy needs them) and, when fd_dinov2 is asked for, fid.dinov2's."""
    layer = feature_layer(fid)
    logits = "isc" in fid.metrics or fid.extractor == classifier.NAME
    main = FeatureSpace(fid.extractor, weights, tuple(sorted({layer} | ({"logits_unbiased"} if logits else set()))))
    dinov2 = FeatureSpace(fid.dinov2, "", ("dinov2",)) if "fd_dinov2" in fid.metrics else None
    return main, dinov2


_EXTRACTORS: dict[tuple, Any] = {}  # one instance per (space, device) per process


def make_extractor(space: FeatureSpace, cuda: bool):
    """torch-fidelity's feature extractor for `space`, on the GPU when `cuda` (built once per process: an actor
    scoring many checkpoints loads the weights once). Called in the sampling actors, never in the driver."""
    from torch_fidelity.utils import create_feature_extractor

    classifier.register()
    key = (space, cuda)
    if space.weights and os.path.isfile(space.weights):
        key += (os.stat(space.weights).st_mtime_ns,)
    if key in _EXTRACTORS:
        return _EXTRACTORS[key]
    kwargs = {"feature_extractor_weights_path": space.weights} if space.weights else {}
    try:
        extractor = create_feature_extractor(space.extractor, list(space.layers), cuda=cuda, verbose=False, **kwargs)
    except Exception as exc:
        if space.extractor in DINOV2_EXTRACTORS:
            import torch.hub

            hint = (
                f"torch-fidelity loads DINOv2 through torch.hub; offline, fill the hub cache {torch.hub.get_dir()} "
                f"(set TORCH_HOME) on a machine with network first (docs/fid.md), or drop fd_dinov2 from fid.metrics"
            )
        else:
            hint = f"offline, set fid.extractor_weights to a local weights file, or fid.extractor={classifier.NAME}"
        raise ValueError(f"cannot create the feature extractor {space.extractor!r}: {exc}\n{hint}") from exc
    _EXTRACTORS[key] = extractor
    return extractor


def embed(images: np.ndarray, space: FeatureSpace, cuda: bool, batch_size: int = 250) -> dict[str, np.ndarray]:
    """float32 features {layer: (N, dim)} of uint8 (N, H, W, 3) images in `space`, on this process's device."""
    extractor = make_extractor(space, cuda)
    device = "cuda" if cuda else "cpu"
    out: dict[str, list[np.ndarray]] = {layer: [] for layer in space.layers}
    with torch.no_grad():
        for lo in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[lo : lo + batch_size])).permute(0, 3, 1, 2)
            feats = extractor.convert_features_tuple_to_dict(extractor(x.to(device)))  # resized, normalised inside
            for layer in space.layers:
                out[layer].append(feats[layer].float().cpu().numpy())
    return {layer: np.concatenate(values) for layer, values in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# Statistics: running float64 moments, merged slice by slice
# ---------------------------------------------------------------------------------------------------------------


class Moments:
    """Count, mean and centred second moment of feature vectors, in float64, merged batch by batch (Chan et al.'s
    parallel update): the memory of one (dim, dim) matrix whatever the number of images."""

    def __init__(self, dim: int):
        self.n, self.mean, self.m2 = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, feats: np.ndarray) -> None:
        """Fold in a batch of (n, dim) features."""
        x = np.asarray(feats, dtype=np.float64)
        n_b = len(x)
        if n_b == 0:
            return
        mean_b = x.mean(0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (self.n * n_b / n)
        self.n = n

    def statistics(self) -> dict[str, np.ndarray]:
        """mu and the unbiased covariance sigma, as np.cov (and torch-fidelity) give them."""
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 feature vectors, got {self.n}")
        return {"mu": self.mean.copy(), "sigma": self.m2 / (self.n - 1)}


def statistics(feats) -> dict[str, np.ndarray]:
    """mu and sigma of (N, dim) features at once (torch-fidelity's own function; `Moments` streams the same)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(torch.tensor(np.asarray(feats), dtype=torch.float64))  # a copy, writable


# ---------------------------------------------------------------------------------------------------------------
# Cached reference statistics
# ---------------------------------------------------------------------------------------------------------------


def reference_key(fid: FidConfig, manifest: Manifest, weights: str) -> dict[str, Any]:
    return {
        "dataset": manifest.source.listing_sha256,
        "resolution": manifest.resolution,
        "extractor": fid.extractor,
        "layer": feature_layer(fid),
        "weights": classifier.weights_digest(weights) if weights and os.path.isfile(weights) else weights,
        "images": fid.reference_images,
    }


def embed_real_images(
    fid: FidConfig, manifest: Manifest, space: FeatureSpace, pool, keep_features: bool, progress: bool = False
) -> tuple[Moments, np.ndarray | None]:
    """Running moments of the real images' `space.layer` features, embedded slice by slice on the actors of `pool`
    (pipeline.fid.sampling.SamplerPool), and the features themselves when `keep_features` (KID, PRC)."""
    from pipeline.fid.sampling import dispatch

    root, files = real_files(manifest, fid.reference_images, fid.seed)
    paths = [rel for rel, _ in files]
    chunks = [(i, paths[lo : lo + fid.slice_size]) for i, lo in enumerate(range(0, len(paths), fid.slice_size))]
    moments, kept = Moments(FEATURE_DIM.get(space.extractor, 2048)), []
    calls = [(i, "embed_real", (root, chunk, manifest.resolution, (space,)), len(chunk)) for i, chunk in chunks]
    for _, result in dispatch(pool, calls, "fid real images", progress):
        feats = result[0][space.layer]
        if moments.mean.shape[0] != feats.shape[1]:
            moments = Moments(feats.shape[1]) if moments.n == 0 else moments
        moments.add(feats)
        if keep_features:
            kept.append(feats)
    return moments, (np.concatenate(kept) if keep_features else None)


def reference_statistics(
    fid: FidConfig, manifest: Manifest, workdir: str, space: FeatureSpace, pool, keep_features: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """(mu, sigma) of the real images in `space`: from fid.reference_npz, the cache, or computed now on the actors of
    `pool` and cached. Returns the statistics and, when just computed with `keep_features`, the real features."""
    if fid.reference_npz:
        with np.load(fid.reference_npz) as npz:
            if "mu" not in npz or "sigma" not in npz:
                raise ValueError(f"{fid.reference_npz} holds no 'mu' and 'sigma' (an ADM reference batch has them)")
            stats = {"mu": npz["mu"], "sigma": npz["sigma"]}
        if stats["mu"].shape[0] != FEATURE_DIM.get(fid.extractor, stats["mu"].shape[0]):
            raise ValueError(
                f"{fid.reference_npz} has {stats['mu'].shape[0]}-d statistics; {fid.extractor} "
                f"gives {FEATURE_DIM[fid.extractor]}-d features"
            )
        return stats, None
    key = reference_key(fid, manifest, space.weights)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Workspace(workdir).fid_reference / f"{fid.extractor}-{digest}.npz"
    if path.exists():
        try:
            with np.load(path) as npz:
                saved = json.loads(str(npz["key"]))
                cached = {"mu": npz["mu"], "sigma": npz["sigma"]}
        except (OSError, ValueError, KeyError, EOFError) as exc:  # torn or empty: computed again
            print(f"fid: WARNING: cannot read the cached reference statistics {path} ({exc}); computing them again")
        else:
            if saved != key:
                raise ValueError(f"reference statistics {path} were made for {saved}, not {key}: delete the file")
            return cached, None
    moments, feats = embed_real_images(fid, manifest, space, pool, keep_features)
    stats = moments.statistics()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"], key=json.dumps(key, sort_keys=True))
    os.replace(tmp, path)
    return stats, feats


_REAL_FEATURES: dict[str, np.ndarray] = {}  # reference key -> features, for KID and PRC


def real_features(
    fid: FidConfig, manifest: Manifest, space: FeatureSpace, pool, computed: np.ndarray | None = None
) -> np.ndarray:
    """`space.layer` features of the real images (KID and PRC need them, not only their statistics), embedded once
    per process: a stage scoring many checkpoints embeds the real images once, not once per checkpoint."""
    key = json.dumps(reference_key(fid, manifest, space.weights), sort_keys=True)
    if computed is not None:
        _REAL_FEATURES[key] = computed
    if key not in _REAL_FEATURES:
        _REAL_FEATURES[key] = embed_real_images(fid, manifest, space, pool, keep_features=True)[1]
    return _REAL_FEATURES[key]
