"""benchmarks/reader_throughput.py measures the real training reader on shards in the real format: a small run of it
reads back batches of the ImageNet-256 latent shape, and its shards hold exactly the fields ShardEncoder writes."""

import io
import sys
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import reader_throughput  # noqa: E402


def test_a_small_run_reads_imagenet_256_batches(tmp_path, capsys):
    result = reader_throughput.main(
        ["--samples", "192", "--samples-per-shard", "64", "--batch", "32", "--epochs", "1", "--rounds", "1"]
    )
    assert result["batch_shapes"] == ((32, 4, 32, 32), "torch.float32", (32,))
    assert result["reader_samples_s"] > 0 and result["x_h200_xl2"] == result["reader_samples_s"] / 545.0
    assert "x an H200 training XL/2" in capsys.readouterr().out


def test_the_shards_are_in_shard_encoders_format(tmp_path):
    manifest = reader_throughput.write_shards(tmp_path, samples=10, per_shard=4)
    assert [s.count for s in manifest.shards] == [4, 4, 2] and manifest.stored_shape == (8, 32, 32)
    with tarfile.open(tmp_path / manifest.shards[0].name) as tar:
        names = tar.getnames()
        latent = np.load(io.BytesIO(tar.extractfile("000000000.latent.npy").read()))
    # the names and dtypes pipeline.shard_encoder.sample_record gives every sample the pipeline writes
    first = sorted(n for n in names if n.startswith("000000000."))
    assert first == sorted(f"000000000.{k}" for k in ("latent.npy", "latent_flip.npy", "cls", "json"))
    assert latent.dtype == np.float16 and latent.shape == (8, 32, 32) and (latent[4:] < 0).all()
