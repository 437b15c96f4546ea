"""The training-side reader: latent shards -> endless batches (z, y) for one rank, deterministic and resumable.

Splitting: with R ranks and K DataLoader workers there are G = R * K readers. Each epoch the shards are permuted with
(seed, epoch); reader g takes shards g, g + G, ... of that order, or, when there are fewer shards than readers, every
G-th sample of all shards. Every rank yields exactly `batches_per_epoch = total // (batch_size * R)` batches per epoch
(a reader whose shards run dry cycles through them again), so uneven shards can never leave one DDP rank waiting.

Per sample: a random choice of the plain or the mirrored latent, then z = (mean + exp(logvar / 2) * eps) * scale with
fresh eps (for the pixel codec z is the stored latent). Shuffling uses a buffer per reader. All randomness derives
from (seed, epoch, reader), so the stream is a pure function of its arguments: `start_batch` skips ahead and resumes
exactly where an interrupted run stopped.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.codecs import latent_from_stored
from pipeline.manifest import Manifest


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header, if any ("<len> path=<name>\\n" records)."""
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode()
        pos += length
    return None


def tar_members(stream, url: str) -> Iterator[dict[str, Any]]:
    """{fname, data, __url__} of each regular file in a tar stream, in the form webdataset's grouping expects.

    Python's tarfile spends ~0.1 ms on every header, which caps a reader at ~2,000 small samples/s (4 members per
    sample); this reads ustar headers directly (name, size, type) and honours pax and GNU long names.
    """
    long_name = None
    while True:
        header = stream.read(512)
        if len(header) < 512 or header == bytes(512):
            return
        kind = header[156:157]
        size = int(header[124:136].rstrip(b"\0 ").decode() or "0", 8)
        data = stream.read(size)
        if len(data) < size:
            raise ValueError(f"truncated tar shard {url}: re-run `ditscale prepare` to rebuild it")
        stream.read(-size % 512)
        if kind == b"x":  # pax extended header for the next member
            long_name = _pax_path(data) or long_name
        elif kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode()
        elif kind in (b"0", b"\0", b"7"):
            prefix = header[345:500].split(b"\0", 1)[0].decode()
            name = header[:100].split(b"\0", 1)[0].decode()
            fname = long_name or (f"{prefix}/{name}" if prefix else name)
            long_name = None
            yield {"fname": fname, "data": data, "__url__": url}
        elif kind != b"g":
            long_name = None  # directories, links: nothing to read


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard (local path or fsspec URI) as dicts of raw bytes, grouped by key (webdataset)."""
    import webdataset as wds

    opener = open(url, "rb", buffering=1 << 20) if "://" not in url else fsspec.open(url, "rb")
    with opener as raw:
        stream = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw, buffer_size=1 << 20)
        yield from wds.tariterators.group_by_keys(tar_members(stream, url))


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """An .npy payload as an array, never unpickling. Every latent of a dataset shares one header, so the header is
    parsed once (np.load parses it with ast on every call, a third of the reader's time) and then looked up."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy payload")
    header_len = int.from_bytes(data[8:10], "little") if data[6] == 1 else int.from_bytes(data[8:12], "little")
    offset = (10 if data[6] == 1 else 12) + header_len
    key = data[:offset]
    if key not in _NPY_HEADERS:
        reference = np.load(io.BytesIO(data), allow_pickle=False)
        if reference.dtype.hasobject:
            raise ValueError("object arrays are not allowed in shards")
        _NPY_HEADERS[key] = (reference.dtype, reference.shape, offset)
        return reference
    dtype, shape, offset = _NPY_HEADERS[key]
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def decode_sample(sample: dict[str, Any], flip: bool) -> tuple[np.ndarray, int]:
    """(stored latent (C', h, w) float16, label) of a raw sample; no pickles are ever loaded."""
    key = "latent_flip.npy" if flip else "latent.npy"
    try:
        return load_npy(sample[key]), int(sample["cls"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"malformed sample {sample.get('__key__')} in {sample.get('__url__')}: {exc}") from exc


class LatentShardStream(IterableDataset):
    """Batches (z (B, C, h, w) float32, y (B,) int64) for one rank; see the module docstring."""

    def __init__(
        self,
        root: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_batch: int = 0,
        epochs: int | None = None,
        shuffle_buffer: int = 2000,
        random_flip: bool = True,
        manifest: Manifest | None = None,
    ):
        super().__init__()
        self.root = str(root).rstrip("/")
        self.manifest = manifest or Manifest.load(self.root)
        self.urls = [f"{self.root}/{s.name}" for s in self.manifest.shards]
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.start_batch, self.epochs = seed, start_batch, epochs
        self.shuffle_buffer, self.random_flip = shuffle_buffer, random_flip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        total = self.manifest.total
        self.batches_per_epoch = total // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.root} holds {total} samples, fewer than one global batch "
                f"({batch_size} x {world_size} ranks): lower the batch size or prepare more data"
            )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Batch position p (counted from the start of training) is made by logical worker p % K from that worker's
        # own stream of epoch p // B. A DataLoader hands out batches of its workers round robin from worker 0, so
        # when resuming at `start_batch` physical worker k plays logical worker (start_batch + k) % K.
        info = get_worker_info()
        k, K = (info.id, info.num_workers) if info else (0, 1)
        B = self.batches_per_epoch
        logical = (self.start_batch + k) % K
        reader, readers = self.rank * K + logical, self.world_size * K
        position, epoch, batches = self.start_batch + k, None, None
        while self.epochs is None or position < self.epochs * B:
            if position // B != epoch:
                epoch = position // B
                batches = self._batches(epoch, reader, readers)
                first = epoch * B + (logical - epoch * B) % K  # this worker's first position in the epoch
                for _ in range((position - first) // K):  # made by an earlier run: recompute, do not yield
                    next(batches)
            yield next(batches)
            position += K

    def _batches(self, epoch: int, reader: int, readers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches of one reader in one epoch; all randomness from (seed, epoch, reader)."""
        rng = np.random.default_rng([self.seed, epoch, reader])
        noise = torch.Generator().manual_seed(int(rng.integers(2**62)))
        buffer = min(self.shuffle_buffer, max(1, self.manifest.total // readers))  # no repeats in the buffer
        samples = self._shuffled(self._samples(epoch, reader, readers), rng, buffer)
        while True:
            batch = [next(samples) for _ in range(self.batch_size)]
            flips = rng.random(self.batch_size) < 0.5 if self.random_flip else np.zeros(self.batch_size, bool)
            decoded = [decode_sample(s, bool(f)) for s, f in zip(batch, flips)]
            stored = torch.from_numpy(np.stack([d[0] for d in decoded]))
            z = latent_from_stored(stored, self.manifest.codec, generator=noise)
            yield z, torch.tensor([d[1] for d in decoded], dtype=torch.long)

    def _samples(self, epoch: int, reader: int, readers: int) -> Iterator[dict[str, Any] | None]:
        """Endless raw samples for `reader`: its shards of this epoch's order, cycled with a new order when dry.
        None marks the end of each pass over the reader's data."""
        cycle = 0
        while True:
            order = np.random.default_rng([self.seed, epoch, cycle, 7]).permutation(len(self.urls))
            seen = 0
            if len(self.urls) >= readers:
                for i in order[reader::readers]:
                    for sample in iter_shard(self.urls[i]):
                        seen += 1
                        yield sample
            else:  # fewer shards than readers: split by sample
                n = 0
                for i in order:
                    for sample in iter_shard(self.urls[i]):
                        if n % readers == reader:
                            seen += 1
                            yield sample
                        n += 1
            if seen == 0:
                raise ValueError(
                    f"reader {reader} of {readers} got no samples from {self.root}: "
                    f"use fewer DataLoader workers or ranks for this small dataset"
                )
            yield None
            cycle += 1

    @staticmethod
    def _shuffled(
        samples: Iterator[dict[str, Any] | None], rng: np.random.Generator, size: int
    ) -> Iterator[dict[str, Any]]:
        """A shuffle buffer of `size` samples, emptied at the end of each pass (so a pass is never mixed with the
        next: when the batches of an epoch add up to the data, every sample is seen exactly once)."""
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if sample is None:
                for j in rng.permutation(len(buffer)):
                    yield buffer[j]
                buffer = []
                continue
            if len(buffer) < size:
                buffer.append(sample)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], sample = sample, buffer[j]
            yield sample


def make_loader(
    root: str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_batch: int = 0,
    num_workers: int = 2,
    epochs: int | None = None,
    **kwargs,
) -> DataLoader:
    """A DataLoader over `LatentShardStream` (the stream batches itself: batch_size=None)."""
    stream = LatentShardStream(root, batch_size, rank, world_size, seed, start_batch, epochs, **kwargs)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
        pin_memory=torch.cuda.is_available(),
    )
