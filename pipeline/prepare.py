"""prepare: an ImageNet-layout image folder -> WebDataset shards of latents, encoded by a pool of Ray actors.

    src/<class>/.../<image>.{jpg,jpeg,png,webp,bmp}   class index = position of <class> in the sorted folder names
    out/train-000000.tar ...                          <key>.latent.npy, <key>.latent_flip.npy, <key>.cls, <key>.json
    out/manifest.json                                 codec, shapes, classes, per-shard counts + sha256, skipped inputs

Each sample: the ADM center crop to the resolution in RGB (pipeline.images), then the codec's encoding of the image
and of its mirror image (posterior moments for the VAE, so training draws fresh noise and a random flip every step).
Every shard mixes classes (inputs are shuffled with a fixed seed before they are cut into shards).

Robustness: a shard is written under a temporary name and renamed when complete; the manifest is rewritten
(atomically) after every shard, so a re-run skips shards whose checksum matches and redoes the rest. An input that
cannot be read is skipped and listed in the manifest with the reason; it never stops the job. Problems that would
waste the whole run (missing source, unwritable output, an output folder made with another configuration) are
reported before any work starts. A full output file system (or a quota or file size limit) is not a bad input: it
stops the stage with an OutOfSpaceError that names the file and what to do, keeping the finished shards and the
manifest that lists them, and removing the half-written ones.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import fsspec
import numpy as np
from tqdm.auto import tqdm

from dit_core.checkpoint import OutOfSpaceError, out_of_space_error
from pipeline.codecs import CodecConfig
from pipeline.images import is_hidden, list_source
from pipeline.manifest import MANIFEST_FILE, Manifest, ShardEntry, SourceInfo
from pipeline.shard_encoder import ShardEncoder
from pipeline.storage import out_of_space


@dataclass(frozen=True)
class PrepareConfig:
    """What the shards contain. Changing any field but the runtime ones needs a new output folder."""

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("encode_batch_size", "num_workers", "verify")

    resolution: int = 256  # image side after the ADM center crop, in pixels
    codec: CodecConfig = field(default_factory=CodecConfig)
    samples_per_shard: int = 5000  # target images per shard (shards are balanced: sizes differ by at most 1)
    seed: int = 0  # seed of the input shuffle that mixes classes across shards
    max_image_pixels: int = 178_956_970  # inputs with more pixels are skipped as decompression bombs (PIL's limit)
    # Runtime only (do not change the output):
    encode_batch_size: int = 32  # images per codec call (x2 with the mirrors)
    num_workers: int = 0  # encoding actors; 0 = one per GPU of the cluster, else one per CPU
    verify: str = "sha256"  # how a re-run checks finished shards: "sha256" (read them) or "size"

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {self.resolution}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.verify not in ("sha256", "size"):
            raise ValueError(f"verify must be 'sha256' or 'size', got {self.verify!r}")

    def identity(self) -> dict[str, Any]:
        """The fields that decide the output bytes."""
        return {k: v for k, v in asdict(self).items() if k not in self.RUNTIME_FIELDS}


# ---------------------------------------------------------------------------------------------------------------
# Planning the shards (driver)
# ---------------------------------------------------------------------------------------------------------------


def plan_shards(num_files: int, samples_per_shard: int, seed: int) -> list[np.ndarray]:
    """Indices into the listing, shuffled with `seed` and cut into balanced shards (so every shard mixes classes)."""
    perm = np.random.default_rng(seed).permutation(num_files)
    num_shards = math.ceil(num_files / samples_per_shard)
    return np.array_split(perm, num_shards)


# ---------------------------------------------------------------------------------------------------------------
# Checks before any work
# ---------------------------------------------------------------------------------------------------------------


def _shard_intact(fs, path: str, entry: ShardEntry, verify: str) -> bool:
    if not fs.exists(path) or fs.size(path) != entry.bytes:
        return False
    if verify == "size":
        return True
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest() == entry.sha256


def _differences(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: existing {a!r}, requested {b!r}")
    return diffs


def _check_output(out: str) -> tuple[Any, str]:
    """Create the output folder and prove it is writable, before any work."""
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    try:
        fs.makedirs(root, exist_ok=True)
        probe = f"{root}/.write-test-{uuid.uuid4().hex[:8]}"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except (OSError, PermissionError) as exc:
        if out_of_space(exc) is not None:
            raise out_of_space_error(exc, f"a test file to the output folder {out}") from exc
        raise ValueError(f"cannot write to the output folder {out}: {exc}") from exc
    return fs, root


def _with_codec_dtype(manifest: Manifest, out: str) -> Manifest:
    """A manifest written before codec.dtype was recorded, brought up to date where its precision is known.

    pixel: no precision to know (the image is stored as it is), so fp32 is recorded, as it is now. vae: encoded in fp32
    if prepare ran on CPUs and in bf16 if on GPUs, which the folder cannot tell: refused, unless its config's codec
    has been given the dtype by hand. The codec record is left as it is (no dtype: the data identity, and so the run
    names of trials trained on the folder, do not change).
    """
    codec = manifest.config.get("codec")
    if not isinstance(codec, dict):  # malformed: the identity check reports it
        return manifest
    if "dtype" not in codec:
        if codec.get("kind") == "pixel":
            return replace(manifest, config={**manifest.config, "codec": {**codec, "dtype": "fp32"}})
        raise ValueError(
            f"output folder {out} was made before ditscale recorded the VAE's precision (codec.dtype): its shards "
            f"were encoded in fp32 if prepare ran on CPUs, in bf16 if on GPUs, and the folder cannot tell which.\n"
            f"Use a new output folder (or delete this one to rebuild it); or, if you know what made them, add "
            f'"dtype": "fp32" or "bf16" to "config" -> "codec" in {out}/{MANIFEST_FILE} and request that codec.dtype'
        )
    return manifest


def _start_or_continue(out: str, fs, root: str, config: PrepareConfig, source: SourceInfo, classes, planned: int):
    """The manifest to continue from: the folder's own if it was made with this config and source, else a new one
    (refused if the folder holds anything else)."""
    manifest = Manifest.read(out)
    if manifest is not None:
        manifest = _with_codec_dtype(manifest, out)
        diffs = _differences(manifest.config, config.identity())
        same = ("num_files", "listing_sha256")  # the root may move; the listing may not change
        diffs += _differences({k: getattr(manifest.source, k) for k in same}, {k: getattr(source, k) for k in same})
        if diffs:
            raise ValueError(
                f"output folder {out} holds shards made by a different configuration or source:\n  "
                + "\n  ".join(diffs)
                + "\nuse a new output folder (or delete this one to rebuild it)"
            )
        return manifest
    foreign = [p for p in fs.ls(root, detail=False) if not is_hidden(p)]
    if foreign:
        raise ValueError(
            f"output folder {out} is not empty and has no {MANIFEST_FILE}: "
            f"refusing to write shards among {len(foreign)} unrelated entries; choose an empty folder"
        )
    return Manifest(config.resolution, tuple(classes), source, config.identity(), planned)


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------


def _encode_shards(actors: list, todo: list[int], items, manifest: Manifest, out: str, bar) -> Manifest:
    """Encode the shards `todo`, each on the next free actor, saving the manifest after each; returns the manifest.

    On an error no new shard starts, and the ones in flight end by themselves (on a full disk they fail too and remove
    their temporaries); then the error is raised: a full disk as an OutOfSpaceError that names the file and the fix
    and counts the finished shards, which are kept.
    """
    import ray

    queue, in_flight = list(todo), {}  # in_flight: ObjectRef of a shard -> the actor writing it

    def submit(actor) -> None:
        if queue:
            index = queue.pop(0)
            in_flight[actor.encode_shard.remote(index, items(index))] = actor

    for actor in actors:
        submit(actor)
    saved = manifest  # what manifest.json lists (the shards kept from earlier runs are on disk and verified)
    try:
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor = in_flight.pop(ref)
            entry = ray.get(ref)
            submit(actor)
            manifest = manifest.with_shard(entry)
            manifest.save(out)
            saved = manifest
            bar.update(1)
            bar.set_postfix(images=manifest.total, skipped=len(manifest.skipped))
    except Exception as exc:
        if in_flight:
            ray.wait(list(in_flight), num_returns=len(in_flight))
        # An actor's error arrives inside a RayTaskError; the driver's own (manifest.save) as it is.
        full = out_of_space(exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc)
        if full is None:
            raise
        message = full.strerror if isinstance(full, OutOfSpaceError) else str(out_of_space_error(full, out))
        kept = f"finished shards kept: {len(saved.shards)} of {manifest.planned_shards}"
        raise OutOfSpaceError(full.errno, f"{message}; {kept}") from None
    return manifest


def prepare(src: str, out: str, config: PrepareConfig = PrepareConfig(), progress: bool = True) -> Manifest:
    """Shard `src` into `out` on the current Ray cluster (a local one is started if needed); returns the manifest.

    Re-running with the same arguments skips finished shards; interrupted ones are redone.
    """
    import ray

    from pipeline.ray_utils import cluster_gpus, ensure_ray

    listing = list_source(src)
    shards = plan_shards(len(listing.files), config.samples_per_shard, config.seed)
    source = SourceInfo(str(src), len(listing.files), listing.sha256())
    fs, root = _check_output(out)
    manifest = _start_or_continue(out, fs, root, config, source, listing.class_names, len(shards))
    for stale in fs.glob(f"{root}/.*.tmp-*"):  # shards (or the manifest) being written when an earlier run died
        fs.rm(stale)

    intact = [e for e in manifest.shards if _shard_intact(fs, f"{root}/{e.name}", e, config.verify)]
    manifest = replace(manifest, shards=tuple(intact), complete=False)
    done = {e.index for e in intact}
    todo = [i for i in range(len(shards)) if i not in done]

    start, images_before = time.perf_counter(), manifest.total + len(manifest.skipped)
    if todo:
        ensure_ray()
        gpus = cluster_gpus()
        workers = config.num_workers or (gpus or max(1, int(ray.cluster_resources().get("CPU", 1))))
        workers = min(workers, len(todo))
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        options.update(max_restarts=1, max_task_retries=1)  # a crashed actor (OOM, lost node) is replaced once
        device = "cuda" if gpus else "cpu"
        actor_cls = ray.remote(ShardEncoder).options(**options)
        # GPU actors decode JPEGs in 4 threads to keep the encoder busy; CPU actors own one core each.
        threads, decode_threads = (None, 4) if gpus else (1, 1)
        actors = [actor_cls.remote(config, src, out, device, threads, decode_threads) for _ in range(workers)]
        items = lambda i: [(int(j), *listing.files[j]) for j in shards[i]]  # noqa: E731
        bar = tqdm(total=len(shards), initial=len(done), desc="prepare shards", unit="shard", disable=not progress)
        try:
            manifest = replace(manifest, **ray.get(actors[0].describe.remote()))
            manifest = _encode_shards(actors, todo, items, manifest, out, bar)
        finally:
            bar.close()
            for actor in actors:
                ray.kill(actor)
    manifest = replace(manifest, complete=len(manifest.shards) == len(shards))
    manifest.save(out)

    seconds = time.perf_counter() - start
    new_images = manifest.total + len(manifest.skipped) - images_before
    if progress:
        rate = f"{new_images / seconds:.1f} images/s" if todo and seconds > 0 else "nothing to do"
        print(
            f"prepare: {len(manifest.shards)}/{len(shards)} shards ({len(todo)} written now, {len(done)} kept), "
            f"{manifest.total} images, {len(manifest.skipped)} skipped; {rate}; manifest: {out}/{MANIFEST_FILE}"
        )
        for s in manifest.skipped[:10]:
            print(f"  skipped {s.path}: {s.reason}")
        if len(manifest.skipped) > 10:
            print(f"  ... and {len(manifest.skipped) - 10} more (see the manifest)")
    return manifest
