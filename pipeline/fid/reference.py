"""ref: the real images, the feature extractor, and the reference statistics they give, computed once and cached.

Reference statistics (mu, sigma) of the real images (the training crop of the images the shards kept) are cached per
(dataset, resolution, extractor, weights, image count) under the workspace's fid/reference/ folder, with the key
stored beside them so a mismatch is refused; or they come from an ADM reference batch (.npz with mu and sigma), so
that ImageNet numbers are comparable with the paper's.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
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


# ---------------------------------------------------------------------------------------------------------------
# Real images and the feature extractor
# ---------------------------------------------------------------------------------------------------------------


def real_images(manifest: Manifest, max_images: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, R, R, 3) ADM crops of the dataset's source images (those the manifest kept) and their labels."""
    import fsspec

    listing = list_source(manifest.source.root)
    if listing.sha256() != manifest.source.listing_sha256:
        raise ValueError(f"the source folder {listing.root} changed since the shards were made; re-run prepare")
    skipped = {s.path for s in manifest.skipped}
    files = [(rel, label) for rel, label in listing.files if rel not in skipped]
    if max_images and max_images < len(files):
        keep = np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False))
        files = [files[i] for i in keep]
    root = manifest.source.root.rstrip("/")

    def load(item):
        with fsspec.open(f"{root}/{item[0]}", "rb") as f:
            return load_image(f.read(), manifest.resolution, 10**12)[0]

    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(load, files))
    return np.stack(images), np.array([label for _, label in files])


def extractor_weights(fid: FidConfig, manifest: Manifest, workdir: str, images_labels=None) -> str:
    """The weights file of the configured extractor ('' = torch-fidelity's download); trains the classifier once."""
    if fid.extractor != classifier.NAME:
        return fid.extractor_weights
    budget = f"n{fid.classifier_steps}" if fid.classifier_steps > 0 else f"s{int(fid.classifier_seconds)}"
    key = f"{manifest.source.listing_sha256[:12]}-r{manifest.resolution}-{budget}"
    path = Workspace(workdir).fid_extractors / f"classifier-{key}.pt"
    if not path.exists():
        images, labels = images_labels if images_labels is not None else real_images(manifest)
        facts = classifier.train_classifier(
            images, labels, path, seconds=fid.classifier_seconds, steps=fid.classifier_steps
        )
        print(
            f"fid: trained the {classifier.NAME} extractor ({facts['steps']} steps, held-out accuracy "
            f"{facts['accuracy']:.1%}) -> {path}"
        )
    return str(path)


_EXTRACTORS: dict[tuple, Any] = {}  # one instance per (extractor, weights, device, layers) per process


def make_extractor(fid: FidConfig, weights: str, cuda: bool, layers: list[str]):
    """torch-fidelity's feature extractor `fid.extractor` (built once per process: a stage scoring many checkpoints
    loads the weights once)."""
    from torch_fidelity.utils import create_feature_extractor

    classifier.register()
    key = (fid.extractor, weights, cuda, tuple(layers))
    if weights and os.path.isfile(weights):
        key += (os.stat(weights).st_mtime_ns,)
    if key in _EXTRACTORS:
        return _EXTRACTORS[key]
    kwargs = {"feature_extractor_weights_path": weights} if weights else {}
    try:
        _EXTRACTORS[key] = create_feature_extractor(fid.extractor, layers, cuda=cuda, verbose=False, **kwargs)
        return _EXTRACTORS[key]
    except Exception as exc:
        if fid.extractor in DINOV2_EXTRACTORS:
            import torch.hub

            hint = (
                f"torch-fidelity loads DINOv2 through torch.hub; offline, fill the hub cache {torch.hub.get_dir()} "
                f"(set TORCH_HOME) on a machine with network first (docs/fid.md), or drop fd_dinov2 from fid.metrics"
            )
        else:
            hint = f"offline, set fid.extractor_weights to a local weights file, or fid.extractor={classifier.NAME}"
        raise ValueError(f"cannot create the feature extractor {fid.extractor!r}: {exc}\n{hint}") from exc


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


def reference_statistics(
    fid: FidConfig, manifest: Manifest, workdir: str, weights: str, extractor, cuda: bool
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
            raise ValueError(
                f"{fid.reference_npz} has {stats['mu'].shape[0]}-d statistics; {fid.extractor} "
                f"gives {FEATURE_DIM[fid.extractor]}-d features"
            )
        return stats, None
    key = reference_key(fid, manifest, weights)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Workspace(workdir).fid_reference / f"{fid.extractor}-{digest}.npz"
    if path.exists():
        with np.load(path) as npz:
            saved = json.loads(str(npz["key"]))
            if saved != key:
                raise ValueError(f"reference statistics {path} were made for {saved}, not {key}: delete the file")
            return {"mu": npz["mu"], "sigma": npz["sigma"]}, None
    images, _ = real_images(manifest, fid.reference_images, fid.seed)
    feats = features(images, extractor, cuda)
    stats = statistics(feats[feature_layer(fid)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"], key=json.dumps(key, sort_keys=True))
    os.replace(tmp, path)
    return stats, feats


_REAL_FEATURES: dict[str, dict[str, torch.Tensor]] = {}  # reference key -> features, for KID and PRC


def real_features(
    fid: FidConfig, manifest: Manifest, weights: str, extractor, cuda: bool, computed=None
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
