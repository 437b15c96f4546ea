"""prepare: an ImageNet-layout image folder -> WebDataset shards of latents, encoded by a pool of Ray actors.

    src/<class>/.../<image>.{jpg,jpeg,png,webp,bmp}   class index = position of <class> in the sorted folder names
    out/train-000000.tar ...                          <key>.latent.npy, <key>.latent_flip.npy, <key>.cls, <key>.json
    out/manifest.json                                 codec, shapes, classes, per-shard counts + sha256, skipped inputs

Each sample: ADM center crop to the resolution (dit_facts.md section 3), RGB, then the codec's encoding of the image
and of its mirror image (posterior moments for the VAE, so training draws fresh noise and a random flip every step).
Every shard mixes classes (inputs are shuffled with a fixed seed before they are cut into shards).

Robustness: a shard is written under a temporary name and renamed when complete; the manifest is rewritten
(atomically) after every shard, so a re-run skips shards whose checksum matches and redoes the rest. An input that
cannot be read is skipped and listed in the manifest with the reason; it never stops the job. Problems that would
waste the whole run (missing source, unwritable output, an output folder made with another configuration) are
reported before any work starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline.codecs import CodecConfig, build_codec, images_to_tensor
from pipeline.storage import read_json, write_json

FORMAT_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PrepareConfig:
    """What the shards contain. Changing any field but the runtime ones needs a new output folder."""

    resolution: int = 256  # image side after the ADM center crop, in pixels
    codec: CodecConfig = field(default_factory=CodecConfig)
    samples_per_shard: int = 5000  # target images per shard (shards are balanced: sizes differ by at most 1)
    seed: int = 0  # seed of the input shuffle that mixes classes across shards
    max_image_pixels: int = 178_956_970  # inputs with more pixels are skipped as decompression bombs (PIL's limit)
    # Runtime only (do not change the output):
    encode_batch_size: int = 32  # images per codec call (x2 with the mirrors)
    num_workers: int = 0  # encoding actors; 0 = one per GPU of the cluster, else one per CPU
    verify: str = "sha256"  # how a re-run checks finished shards: "sha256" (read them) or "size"

    def validate(self) -> None:
        self.codec.validate()
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {self.resolution}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.verify not in ("sha256", "size"):
            raise ValueError(f"verify must be 'sha256' or 'size', got {self.verify!r}")

    def identity(self) -> dict[str, Any]:
        """The fields that decide the output bytes."""
        d = asdict(self)
        for runtime in ("encode_batch_size", "num_workers", "verify"):
            d.pop(runtime)
        return d


class SkipInput(Exception):
    """An input image that cannot be used; the message is the reason recorded in the manifest."""


# ---------------------------------------------------------------------------------------------------------------
# Listing and planning (driver)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SourceListing:
    root: str  # the source as given (path or URI)
    class_names: list[str]  # sorted class folder names; index = label
    files: list[tuple[str, int]]  # (path relative to root, label), sorted

    def sha256(self) -> str:
        h = hashlib.sha256()
        for rel, label in self.files:
            h.update(f"{rel}\t{label}\n".encode())
        return h.hexdigest()


def list_source(src: str) -> SourceListing:
    """List an ImageNet-layout folder deterministically; errors name what is missing."""
    fs, root = fsspec.core.url_to_fs(src)
    if not fs.exists(root):
        raise FileNotFoundError(f"source folder {src} does not exist")
    if not fs.isdir(root):
        raise ValueError(f"source {src} is not a folder: give the folder holding one subfolder per class")
    root = root.rstrip("/")
    class_dirs = sorted(p for p in fs.ls(root, detail=False) if fs.isdir(p) and not _hidden(p))
    if not class_dirs:
        raise ValueError(f"source folder {src} has no class subfolders: expected {src}/<class>/<image>.jpg")
    class_names = [p.rstrip("/").rsplit("/", 1)[-1] for p in class_dirs]
    files = []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(fs.find(class_dir)):
            rel = path[len(root) + 1 :]
            if path.lower().endswith(IMAGE_EXTENSIONS) and not any(_hidden(part) for part in rel.split("/")):
                files.append((rel, label))
    if not files:
        raise ValueError(f"source folder {src} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    return SourceListing(src, class_names, files)


def _hidden(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].startswith(".")


def plan_shards(num_files: int, samples_per_shard: int, seed: int) -> list[np.ndarray]:
    """Indices into the listing, shuffled with `seed` and cut into balanced shards (so every shard mixes classes)."""
    perm = np.random.default_rng(seed).permutation(num_files)
    num_shards = math.ceil(num_files / samples_per_shard)
    return np.array_split(perm, num_shards)


def shard_name(index: int) -> str:
    return f"train-{index:06d}.tar"


# ---------------------------------------------------------------------------------------------------------------
# One image: read, convert, ADM center crop
# ---------------------------------------------------------------------------------------------------------------


def center_crop_adm(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's crop: halve with a box filter while the short side >= 2 * resolution, bicubic resize of the short side
    to `resolution`, then center crop to resolution x resolution."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - resolution) // 2
    top = (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, 16-bit and float scaled to 8 bits, CMYK/palette
    converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(data: bytes, resolution: int, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes of an image file -> (uint8 (R, R, 3) crop, original (width, height)); SkipInput with the reason."""
    if not data:
        raise SkipInput("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise SkipInput(f"too large ({width}x{height} > {max_pixels} pixels; possible decompression bomb)")
            image.load()
    except SkipInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipInput(f"decompression bomb: {exc}") from None
    except Exception as exc:  # truncated, corrupt, not an image
        message = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        raise SkipInput(f"unreadable image: {type(exc).__name__}: {message}") from None
    if min(width, height) < 1:
        raise SkipInput(f"degenerate size {width}x{height}")
    try:
        crop = center_crop_adm(to_rgb(image), resolution)
    except Exception as exc:
        raise SkipInput(f"cannot convert mode {image.mode}: {type(exc).__name__}: {exc}") from None
    return np.asarray(crop, dtype=np.uint8), (width, height)


# ---------------------------------------------------------------------------------------------------------------
# Shard writing (in a Ray actor)
# ---------------------------------------------------------------------------------------------------------------


class _HashingWriter:
    """A write-only stream that hashes and counts what passes through it."""

    def __init__(self, stream):
        self.stream, self.hash, self.bytes = stream, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.bytes += len(data)
        return self.stream.write(data)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class ShardEncoder:
    """Holds one codec (the VAE loaded once) and encodes whole shards. Used as a Ray actor."""

    def __init__(
        self, config: PrepareConfig, src: str, out: str, device: str = "cpu", threads: int | None = None,
        decode_threads: int = 4,
    ):  # fmt: skip
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.decode_threads = decode_threads
        self.config, self.src, self.out = config, src, out
        self.codec = build_codec(config.codec, device=device)
        self.src_fs, self.src_root = fsspec.core.url_to_fs(src)
        self.out_fs, self.out_root = fsspec.core.url_to_fs(out)
        self.out_root = self.out_root.rstrip("/")
        self.out_fs.makedirs(self.out_root, exist_ok=True)

    def _load(self, item: tuple[int, str, int]) -> tuple[tuple[int, str, int], np.ndarray | str, tuple[int, int]]:
        """(item, crop, original size), or (item, reason it was skipped, (0, 0)). Runs in a decode thread."""
        rel = item[1]
        try:
            with self.src_fs.open(f"{self.src_root}/{rel}", "rb") as f:
                data = f.read()
            crop, dims = load_image(data, self.config.resolution, self.config.max_image_pixels)
            return item, crop, dims
        except SkipInput as exc:
            return item, str(exc), (0, 0)
        except OSError as exc:
            return item, f"cannot read file: {exc}", (0, 0)

    def describe(self) -> dict[str, Any]:
        size = self.codec.latent_size(self.config.resolution)
        stored = self.codec.latent_channels * (2 if self.codec.stores_moments else 1)
        return {
            "codec": self.codec.describe(),
            "latent_shape": [self.codec.latent_channels, size, size],
            "stored_shape": [stored, size, size],
        }

    def encode_shard(self, index: int, items: list[tuple[int, str, int]]) -> dict[str, Any]:
        """items: (listing index, relative path, label). Writes the shard atomically; returns its manifest entry."""
        import torch
        import webdataset as wds

        start = time.perf_counter()
        name = shard_name(index)
        final = f"{self.out_root}/{name}"
        tmp = f"{self.out_root}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        skipped, count = [], 0
        size = self.config.encode_batch_size
        batches = [items[lo : lo + size] for lo in range(0, len(items), size)]
        with ThreadPoolExecutor(self.decode_threads) as pool, self.out_fs.open(tmp, "wb") as raw:
            stream = _HashingWriter(raw)
            # Images of batch b + 1 are decoded by the thread pool while batch b is encoded.
            pending = [pool.submit(self._load, item) for item in batches[0]] if batches else []
            with wds.TarWriter(stream, encoder=False, mtime=0, user="ditscale", group="ditscale") as writer:
                for b in range(len(batches)):
                    loaded = [f.result() for f in pending]
                    pending = [pool.submit(self._load, item) for item in batches[b + 1]] if b + 1 < len(batches) else []
                    skipped += [{"path": item[1], "reason": r} for item, r, _ in loaded if isinstance(r, str)]
                    good = [(item, crop, dims) for item, crop, dims in loaded if not isinstance(crop, str)]
                    if not good:
                        continue
                    images = np.stack([crop for _, crop, _ in good])  # (B, R, R, 3) uint8
                    both = images_to_tensor(np.concatenate([images, images[:, :, ::-1]]))  # plain, then mirrored
                    with torch.inference_mode():
                        latents = self.codec.encode(both).numpy().astype(np.float16)  # (2B, stored C, h, w)
                    for k, ((listing_index, rel, label), _, (w, h)) in enumerate(good):
                        meta = {"source": rel, "width": w, "height": h, "label": label}
                        writer.write(
                            {
                                "__key__": f"{listing_index:09d}",
                                "latent.npy": _npy_bytes(latents[k]),
                                "latent_flip.npy": _npy_bytes(latents[len(good) + k]),
                                "cls": str(label).encode("ascii"),
                                "json": json.dumps(meta).encode("utf-8"),
                            }
                        )
                        count += 1
        self.out_fs.mv(tmp, final)
        return {
            "index": index,
            "name": name,
            "count": count,
            "sha256": stream.hash.hexdigest(),
            "bytes": stream.bytes,
            "skipped": skipped,
            "seconds": time.perf_counter() - start,
        }


# ---------------------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------------------


def read_manifest(out: str) -> dict[str, Any] | None:
    try:
        return read_json(f"{out.rstrip('/')}/{MANIFEST}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{out}/{MANIFEST} is not valid JSON ({exc}); delete it to rebuild the shards") from exc


def write_manifest(out: str, manifest: dict[str, Any]) -> None:
    write_json(f"{out.rstrip('/')}/{MANIFEST}", manifest, indent=1)


def _shard_intact(fs, path: str, entry: dict[str, Any], verify: str) -> bool:
    if not fs.exists(path) or fs.size(path) != entry["bytes"]:
        return False
    if verify == "size":
        return True
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest() == entry["sha256"]


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
        raise ValueError(f"cannot write to the output folder {out}: {exc}") from exc
    return fs, root


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------


def prepare(src: str, out: str, config: PrepareConfig = PrepareConfig(), progress: bool = True) -> dict[str, Any]:
    """Shard `src` into `out` on the current Ray cluster (a local one is started if needed); returns the manifest.

    Re-running with the same arguments skips finished shards; interrupted ones are redone.
    """
    import ray

    from pipeline.ray_utils import cluster_gpus, ensure_ray

    config.validate()
    listing = list_source(src)
    shards = plan_shards(len(listing.files), config.samples_per_shard, config.seed)
    source = {"root": str(src), "num_files": len(listing.files), "listing_sha256": listing.sha256()}
    fs, root = _check_output(out)

    manifest = read_manifest(out)
    if manifest is not None:
        diffs = _differences(manifest.get("config", {}), config.identity())
        diffs += _differences(
            {"num_files": manifest["source"]["num_files"], "listing_sha256": manifest["source"]["listing_sha256"]},
            {"num_files": source["num_files"], "listing_sha256": source["listing_sha256"]},
        )
        if diffs:
            raise ValueError(
                f"output folder {out} holds shards made by a different configuration or source:\n  "
                + "\n  ".join(diffs)
                + "\nuse a new output folder (or delete this one to rebuild it)"
            )
    else:
        foreign = [p for p in fs.ls(root, detail=False) if not _hidden(p)]
        if foreign:
            raise ValueError(
                f"output folder {out} is not empty and has no {MANIFEST}: "
                f"refusing to write shards among {len(foreign)} unrelated entries; choose an empty folder"
            )
        manifest = {
            "format_version": FORMAT_VERSION,
            "complete": False,
            "resolution": config.resolution,
            "class_names": listing.class_names,
            "num_classes": len(listing.class_names),
            "source": source,
            "planned_shards": len(shards),
            "shards": [],
            "total": 0,
            "skipped": [],
            "config": config.identity(),
        }
    for stale in fs.glob(f"{root}/.train-*.tar.tmp-*"):  # shards in flight when an earlier run died
        fs.rm(stale)

    done = {e["index"]: e for e in manifest["shards"] if _shard_intact(fs, f"{root}/{e['name']}", e, config.verify)}
    todo = [i for i in range(len(shards)) if i not in done]
    manifest["shards"] = sorted(done.values(), key=lambda e: e["index"])
    _summarise(manifest)

    start, images_before = time.perf_counter(), manifest["total"] + len(manifest["skipped"])
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
        manifest.update(ray.get(actors[0].describe.remote()))
        pool = ray.util.ActorPool(actors)
        items = lambda i: [(int(j), *listing.files[j]) for j in shards[i]]  # noqa: E731
        bar = tqdm(total=len(shards), initial=len(done), desc="prepare shards", unit="shard", disable=not progress)
        for entry in pool.map_unordered(lambda a, i: a.encode_shard.remote(i, items(i)), todo):
            manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda e: e["index"])
            _summarise(manifest)
            write_manifest(out, manifest)
            bar.update(1)
            bar.set_postfix(images=manifest["total"], skipped=len(manifest["skipped"]))
        bar.close()
        for actor in actors:
            ray.kill(actor)
    manifest["complete"] = len(manifest["shards"]) == len(shards)
    write_manifest(out, manifest)

    seconds = time.perf_counter() - start
    new_images = manifest["total"] + len(manifest["skipped"]) - images_before
    if progress:
        rate = f"{new_images / seconds:.1f} images/s" if todo and seconds > 0 else "nothing to do"
        print(
            f"prepare: {len(manifest['shards'])}/{len(shards)} shards ({len(todo)} written now, {len(done)} kept), "
            f"{manifest['total']} images, {len(manifest['skipped'])} skipped; {rate}; manifest: {out}/{MANIFEST}"
        )
        for s in manifest["skipped"][:10]:
            print(f"  skipped {s['path']}: {s['reason']}")
        if len(manifest["skipped"]) > 10:
            print(f"  ... and {len(manifest['skipped']) - 10} more (see the manifest)")
    return manifest


def _summarise(manifest: dict[str, Any]) -> None:
    manifest["total"] = sum(e["count"] for e in manifest["shards"])
    manifest["skipped"] = [s for e in manifest["shards"] for s in e["skipped"]]
