"""The training-side reader: latent shards -> endless batches (z, y) for one rank, deterministic and resumable.

Splitting: with R ranks and K DataLoader workers there are G = R * K readers. Every rank yields exactly
`batches_per_epoch = total // (batch_size * R)` batches per epoch, so uneven shards can never leave one DDP rank
waiting. Each epoch the shards are permuted with (seed, epoch) and their samples, in that order, are cut into G
consecutive runs, one per reader, each as long as the batches its reader makes in the epoch need (plus an equal share
of the samples no batch needs): no sample is read twice within an epoch, by one rank or by two, whether there are
more shards than readers or fewer. A reader opens only the shards its run touches.

Per sample: a random choice of the plain or the mirrored latent, then z = (mean + exp(logvar / 2) * eps) * scale with
fresh eps (for the pixel codec z is the stored latent). Shuffling uses a buffer per reader. All randomness derives
from (seed, epoch, reader), so the stream is a pure function of its arguments: `start_batch` skips ahead and resumes
exactly where an interrupted run stopped.
"""

from __future__ import annotations

import io
import itertools
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
    """Batches (z (B, C, h, w) float32, y (B,) int64) for one rank; see the module docstring. With `with_keys`
    (off by default; for tests) each batch also carries its samples' shard keys: (z, y, keys: list[str])."""

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
        with_keys: bool = False,
    ):
        super().__init__()
        self.root = str(root).rstrip("/")
        self.manifest = manifest or Manifest.load(self.root)
        self.urls = [f"{self.root}/{s.name}" for s in self.manifest.shards]
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.start_batch, self.epochs = seed, start_batch, epochs
        self.shuffle_buffer, self.random_flip = shuffle_buffer, random_flip
        self.with_keys = with_keys  # also yield each batch's sample keys (__key__), to see which samples were read
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        total = self.manifest.total
        self.batches_per_epoch = total // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.root} holds {total} samples, fewer than one global batch "
                f"({batch_size} x {world_size} ranks): lower the batch size or prepare more data"
            )

    def __iter__(self) -> Iterator[tuple]:
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
                first = epoch * B + (logical - epoch * B) % K  # this worker's first position in the epoch
                batches = self._batches(epoch, reader, readers, self._run(epoch, reader, K))
                for _ in range((position - first) // K):  # made by an earlier run: recompute, do not yield
                    next(batches)
            yield next(batches)
            position += K

    def _run(self, epoch: int, reader: int, workers: int) -> tuple[int, int]:
        """[lo, hi): the reader's consecutive run of the epoch's samples (in shard order). Reader g = rank * K +
        logical worker k makes the batches at positions p of the epoch with p % K == k; its run holds that many
        batches' samples, plus its share of the samples the epoch's batches leave over."""
        B, readers = self.batches_per_epoch, self.world_size * workers
        made = [len(range(epoch * B + (k - epoch * B) % workers, (epoch + 1) * B, workers)) for k in range(workers)]
        need = [made[g % workers] * self.batch_size for g in range(readers)]
        spare = self.manifest.total - sum(need)  # >= 0: batches_per_epoch x batch_size x ranks <= total
        sizes = [n + spare // readers + (g < spare % readers) for g, n in enumerate(need)]
        lo = sum(sizes[:reader])
        return lo, lo + sizes[reader]

    def _batches(self, epoch: int, reader: int, readers: int, run: tuple[int, int]) -> Iterator[tuple]:
        """The batches of one reader in one epoch, from its run of samples; all randomness from (seed, epoch,
        reader)."""
        rng = np.random.default_rng([self.seed, epoch, reader])
        noise = torch.Generator().manual_seed(int(rng.integers(2**62)))
        buffer = min(self.shuffle_buffer, max(1, self.manifest.total // readers))  # no repeats in the buffer
        samples = self._shuffled(self._samples(epoch, *run), rng, buffer)
        while True:
            batch = list(itertools.islice(samples, self.batch_size))
            if len(batch) < self.batch_size:
                raise ValueError(
                    f"the shards in {self.root} hold fewer samples than manifest.json counts: re-run ditscale prepare"
                )
            flips = rng.random(self.batch_size) < 0.5 if self.random_flip else np.zeros(self.batch_size, bool)
            decoded = [decode_sample(s, bool(f)) for s, f in zip(batch, flips)]
            stored = torch.from_numpy(np.stack([d[0] for d in decoded]))
            z = latent_from_stored(stored, self.manifest.codec, generator=noise)
            y = torch.tensor([d[1] for d in decoded], dtype=torch.long)
            yield (z, y, [s["__key__"] for s in batch]) if self.with_keys else (z, y)

    def _samples(self, epoch: int, lo: int, hi: int) -> Iterator[dict[str, Any] | None]:
        """Raw samples lo..hi-1 of the epoch's shard order, then None (the end of the run)."""
        order = np.random.default_rng([self.seed, epoch, 0, 7]).permutation(len(self.urls))
        start = 0  # index of shard i's first sample in the epoch's order
        for i in order:
            count = self.manifest.shards[i].count
            if start < hi and lo < start + count:
                for n, sample in enumerate(iter_shard(self.urls[i]), start):
                    if n >= hi:
                        break
                    if n >= lo:
                        yield sample
            start += count
        yield None

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
