"""Shard writing, in a Ray actor: one codec (the VAE loaded once) turns a list of images into one WebDataset tar.

Each sample: the ADM center crop (pipeline.images), then the codec's encoding of the image and of its mirror image.
The tar is written under a temporary name, hashed as it is written, and renamed when complete; an input that cannot
be read is skipped with its reason. pipeline.prepare plans the shards and keeps the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np

from dit_core.checkpoint import out_of_space_error
from pipeline.codecs import build_codec, images_to_tensor
from pipeline.images import SkipInput, load_image
from pipeline.manifest import ShardEntry, SkippedInput
from pipeline.storage import out_of_space, remove_quietly

if TYPE_CHECKING:
    from pipeline.prepare import PrepareConfig


def shard_name(index: int) -> str:
    return f"train-{index:06d}.tar"


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


def sample_record(
    listing_index: int, latent: np.ndarray, latent_flip: np.ndarray, label: int, meta: dict[str, Any]
) -> dict[str, Any]:
    """One sample of a shard, as webdataset's TarWriter takes it: the stored encoding of the image and of its mirror
    (fp16), the class index and the source's facts, under the key of the image's place in the sorted listing."""
    return {
        "__key__": f"{listing_index:09d}",
        "latent.npy": _npy_bytes(latent),
        "latent_flip.npy": _npy_bytes(latent_flip),
        "cls": str(label).encode("ascii"),
        "json": json.dumps(meta).encode("utf-8"),
    }


class ShardEncoder:
    """Holds one codec (the VAE loaded once) and encodes whole shards. Used as a Ray actor."""

    def __init__(
        self,
        config: PrepareConfig,
        src: str,
        out: str,
        device: str = "cpu",
        threads: int | None = None,
        decode_threads: int = 4,
    ):
        import torch

        if threads:
            torch.set_num_threads(threads)
        # the GPU Ray gave this actor, seen here (CUDA_VISIBLE_DEVICES); a logical GPU without CUDA encodes on the CPU
        device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
        self.decode_threads = decode_threads
        self.config, self.src, self.out = config, src, out
        self.codec = build_codec(config.codec, device=device)
        self.device = torch.device(device).type  # recorded per shard: "cuda" or "cpu"
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
        """The manifest fields only a loaded codec knows: codec, latent_shape, stored_shape."""
        size = self.codec.latent_size(self.config.resolution)
        stored = self.codec.latent_channels * (2 if self.codec.stores_moments else 1)
        return {
            "codec": self.codec.describe(),
            "latent_shape": (self.codec.latent_channels, size, size),
            "stored_shape": (stored, size, size),
        }

    def encode_shard(self, index: int, items: list[tuple[int, str, int]]) -> ShardEntry:
        """items: (listing index, relative path, label). Writes the shard atomically; returns its manifest entry.

        On any failure the temporary file is removed; a full file system raises OutOfSpaceError.
        """
        start = time.perf_counter()
        name = shard_name(index)
        final = f"{self.out_root}/{name}"
        tmp = f"{self.out_root}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            count, skipped, stream = self._write(tmp, items)
            self.out_fs.mv(tmp, final)
        except BaseException as exc:
            remove_quietly(self.out_fs, tmp)
            full = out_of_space(exc)
            if full is not None:
                raise out_of_space_error(full, f"shard {name} to {self.out}") from exc
            raise
        seconds = time.perf_counter() - start
        return ShardEntry(
            index, name, count, stream.hash.hexdigest(), stream.bytes, tuple(skipped), seconds, self.device
        )

    def _write(self, tmp: str, items: list[tuple[int, str, int]]) -> tuple[int, list[SkippedInput], _HashingWriter]:
        """Encode `items` into the tar at `tmp`: (samples written, inputs skipped, the stream with hash and size)."""
        import torch
        import webdataset as wds

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
                    skipped += [SkippedInput(item[1], r) for item, r, _ in loaded if isinstance(r, str)]
                    good = [(item, crop, dims) for item, crop, dims in loaded if not isinstance(crop, str)]
                    if not good:
                        continue
                    images = np.stack([crop for _, crop, _ in good])  # (B, R, R, 3) uint8
                    both = images_to_tensor(np.concatenate([images, images[:, :, ::-1]]))  # plain, then mirrored
                    with torch.inference_mode():
                        latents = self.codec.encode(both).numpy().astype(np.float16)  # (2B, stored C, h, w)
                    for k, ((listing_index, rel, label), _, (w, h)) in enumerate(good):
                        meta = {"source": rel, "width": w, "height": h, "label": label}
                        writer.write(sample_record(listing_index, latents[k], latents[len(good) + k], label, meta))
                        count += 1
        return count, skipped, stream
