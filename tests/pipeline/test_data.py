"""The shard reader: shapes, exact coverage, equal batches on every rank, exact resume."""

from collections import Counter

import pytest
import torch

from pipeline.codecs import CodecConfig
from pipeline.data import LatentShardStream, make_loader
from pipeline.manifest import Manifest
from pipeline.prepare import PrepareConfig, prepare
from pipeline.toy import ToyDataConfig, write_toy_dataset


def toy_shards(root, per_class: int, samples_per_shard: int) -> str:
    """Pixel-codec shards of 3 toy classes at 16 px under `root`."""
    write_toy_dataset(root / "src", ToyDataConfig(num_classes=3, per_class=per_class, resolution=16), progress=False)
    config = PrepareConfig(resolution=16, codec=CodecConfig(kind="pixel"), samples_per_shard=samples_per_shard)
    prepare(str(root / "src"), str(root / "shards"), config, progress=False)
    return str(root / "shards")


@pytest.fixture(scope="module")
def shards(ray_session, tmp_path_factory):
    """30 toy images of 3 classes at 16 px in 4 uneven shards (8, 8, 7, 7)."""
    return toy_shards(tmp_path_factory.mktemp("data"), per_class=10, samples_per_shard=8)


def test_batches_have_the_right_shapes_and_labels(shards):
    stream = LatentShardStream(shards, batch_size=5, epochs=1)
    batches = list(stream)
    assert len(batches) == stream.batches_per_epoch == 6
    z, y = batches[0]
    assert z.shape == (5, 3, 16, 16) and z.dtype == torch.float32 and y.dtype == torch.int64
    assert -1.01 <= z.min() and z.max() <= 1.01
    # One epoch whose batches add up to the data sees every sample exactly once: 10 per class.
    assert Counter(int(v) for _, y in batches for v in y) == {0: 10, 1: 10, 2: 10}


def test_epochs_differ_and_flips_happen(shards):
    batches = list(LatentShardStream(shards, batch_size=30, epochs=2))
    (z0, y0), (z1, y1) = batches
    assert not torch.equal(y0, y1)  # reshuffled
    noflip = list(LatentShardStream(shards, batch_size=30, epochs=1, random_flip=False))[0][0]
    mirrored = torch.flip(noflip, dims=[3])
    # every image of the flipped stream is either the plain or the mirrored crop of some image
    plain_or_mirror = [any(torch.equal(img, ref) for ref in (*noflip, *mirrored)) for img in z0]
    assert all(plain_or_mirror)
    assert any(any(torch.equal(img, ref) for ref in mirrored) for img in z0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_with_uneven_shards_get_equal_batches(shards, num_workers):
    counts = []
    for rank in range(2):
        loader = make_loader(shards, batch_size=4, rank=rank, world_size=2, epochs=3, num_workers=num_workers)
        counts.append(sum(1 for _ in loader))
    assert counts[0] == counts[1] == 3 * (30 // 8)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_the_same_stream(shards, num_workers):
    full = list(make_loader(shards, batch_size=4, epochs=3, num_workers=num_workers, seed=3))
    for start in (1, 7, 9):
        resumed = list(make_loader(shards, batch_size=4, epochs=3, num_workers=num_workers, seed=3, start_batch=start))
        assert len(resumed) == len(full) - start
        for (za, ya), (zb, yb) in zip(full[start:], resumed):
            assert torch.equal(za, zb) and torch.equal(ya, yb)


def test_reader_errors(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="ditscale prepare"):
        Manifest.load(str(tmp_path))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        LatentShardStream(shards, batch_size=16, world_size=2)
    with pytest.raises(ValueError, match="outside world size"):
        LatentShardStream(shards, batch_size=2, rank=2, world_size=2)


def test_fast_tar_reader_matches_tarfile(tmp_path):
    """Our header parser yields exactly what tarfile reads, for ustar and pax archives with long names."""
    import io
    import tarfile

    from pipeline.data import tar_members

    for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"a{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            for i, size in enumerate([0, 1, 511, 512, 513, 5000]):
                info = tarfile.TarInfo(f"{'d' * (150 if fmt != tarfile.USTAR_FORMAT else 40)}/{i:03d}.bin")
                info.size, info.mtime = size, 1.5 if fmt == tarfile.PAX_FORMAT else 0
                tf.addfile(info, io.BytesIO(bytes([i]) * size))
        with tarfile.open(path) as tf:
            expected = [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]
        with open(path, "rb") as f:
            got = [(m["fname"], m["data"]) for m in tar_members(f, str(path))]
        assert got == expected and len(got) == 6


def test_npy_fast_path_matches_numpy_and_refuses_pickles():
    import io

    import numpy as np

    from pipeline.data import load_npy

    for array in (np.arange(24, dtype=np.float16).reshape(2, 3, 4), np.ones((3, 2, 2), np.float32)):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        for _ in range(2):  # parsed, then from the header cache
            np.testing.assert_array_equal(load_npy(buf.getvalue()), array)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_npy(buf.getvalue())


@pytest.fixture(scope="module")
def many_shards(ray_session, tmp_path_factory):
    """60 toy images of 3 classes at 16 px in 15 shards of 4: more shards than the 6 readers of 3 ranks x 2 workers."""
    return toy_shards(tmp_path_factory.mktemp("many"), per_class=20, samples_per_shard=4)


def read_keys(root, rank, world_size, num_workers, epochs, batch_size=5, start_batch=0):
    """The sample keys of every batch one rank reads, in order."""
    loader = make_loader(root, batch_size, rank, world_size, 1, start_batch, num_workers, epochs, with_keys=True)
    return [keys for _, _, keys in loader]


@pytest.mark.parametrize("batch_size", [5, 4])  # batches that add up to the data, and batches that leave some over
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("data", ["shards", "many_shards"])  # 4 shards, fewer than 6 readers; 15 shards, more
def test_ranks_read_disjoint_samples_within_an_epoch(data, world_size, num_workers, batch_size, request):
    """In every epoch each rank reads batches_per_epoch x batch_size samples, none twice, and no two ranks share a
    sample: together they read batches_per_epoch x batch_size x world_size distinct samples (with batch size 5,
    which divides the data, every sample exactly once)."""
    root = request.getfixturevalue(data)
    per_epoch = LatentShardStream(root, batch_size, world_size=world_size).batches_per_epoch
    ranks = [read_keys(root, rank, world_size, num_workers, 2, batch_size) for rank in range(world_size)]
    assert all(len(keys) == 2 * per_epoch for keys in ranks)
    for epoch in range(2):
        read = [[k for batch in keys[epoch * per_epoch : (epoch + 1) * per_epoch] for k in batch] for keys in ranks]
        assert all(len(set(keys)) == len(keys) == per_epoch * batch_size for keys in read), "a sample read twice"
        union = set().union(*map(set, read))
        assert len(union) == per_epoch * batch_size * world_size, "two ranks read the same sample"
        if batch_size == 5:
            assert len(union) == Manifest.load(root).total


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_rank_resumes_with_exactly_its_remaining_batches(shards, num_workers):
    """Two ranks, 3 batches per epoch: resuming at start_batch yields exactly the batches an uninterrupted rank
    yields from there on, the same samples in the same order."""
    for rank in range(2):
        full = read_keys(shards, rank, 2, num_workers, epochs=3)
        assert len(full) == 3 * 3
        for start in (1, 3, 4, 8):  # inside the first epoch, at the second's start, inside it, the last batch
            assert read_keys(shards, rank, 2, num_workers, epochs=3, start_batch=start) == full[start:]
