"""Can one training reader process feed an H200? Samples/s of the training reader (pipeline.data.LatentShardStream)
at the ImageNet-256 shard format, against what one H200 consumes training DiT-XL/2.

The shards are written here in the format ShardEncoder writes (pipeline.shard_encoder.sample_record): per sample the
SD-VAE posterior moments of the image and of its mirror (8 x 32 x 32 fp16 each: mean and log-variance of 4 latent
channels), the label and the source's facts, in WebDataset tars of --samples-per-shard samples. The moments are
random (the reader's cost does not depend on their values); the log-variances lie in the range a VAE gives.

The reader does all it does in training: shard order and a shuffle buffer per epoch, the rank's share, a random
flip (picking the image or its mirror), a posterior sample z = (mean + exp(logvar / 2) * noise) * 0.18215 in fp32,
collation into (B, 4, 32, 32) batches. Measured in this process alone (what one DataLoader worker, or the training
process itself with train.loader_workers=0, gives), over --epochs full passes after one batch of warm-up;
the median of --rounds such rounds.

The consumer: one H200 trains the official XL/2 at 545 img/s (bf16 + torch.compile + fused AdamW, batch 64;
reference/dit_facts.md section 8) and about 1,110 img/s at the hardware limit (the same model at 100% MFU).
Target: one reader process at least 10x the 545 img/s, so that the reader is never the bottleneck (several GPUs per
node each have their own reader; the DataLoader's workers multiply it).

    python benchmarks/reader_throughput.py [--samples 8192] [--batch 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.codecs import CodecInfo  # noqa: E402
from pipeline.data import LatentShardStream  # noqa: E402
from pipeline.manifest import Manifest, ShardEntry, SourceInfo  # noqa: E402
from pipeline.shard_encoder import sample_record, shard_name  # noqa: E402

H200_XL2_IMG_S = 545.0  # official XL/2, bf16 + compile + fused AdamW, batch 64 (dit_facts.md section 8)
H200_XL2_LIMIT_IMG_S = 1110.0  # the same model at the GPU's measured bf16 matrix rate
TARGET = 10.0
STORED_SHAPE = (8, 32, 32)  # SD-VAE moments at 256 px: [mean, logvar] x 4 channels, 32 x 32
SD_VAE = CodecInfo(
    "vae",
    latent_channels=4,
    scale_factor=0.18215,
    stores_moments=True,
    vae="stabilityai/sd-vae-ft-ema",
    downsample=8,
    dtype="fp32",
)


def write_shards(out: Path, samples: int, per_shard: int, classes: int = 1000, seed: int = 0) -> Manifest:
    """Shards of random moments in the pipeline's format, and their manifest (written beside them)."""
    import hashlib

    import webdataset as wds

    rng = np.random.default_rng(seed)
    entries = []
    for index, lo in enumerate(range(0, samples, per_shard)):
        name, count = shard_name(index), min(per_shard, samples - lo)
        with open(out / name, "wb") as f:
            with wds.TarWriter(f, encoder=False, mtime=0) as writer:
                for key in range(lo, lo + count):
                    both = rng.standard_normal((2, *STORED_SHAPE), dtype=np.float32)
                    both[:, 4:] = -2.0 - 2.0 * np.abs(both[:, 4:])  # log-variances of a trained VAE: well below 0
                    both = both.astype(np.float16)
                    label = int(rng.integers(classes))
                    meta = {"source": f"n{label:08d}/{key}.JPEG", "width": 500, "height": 375, "label": label}
                    writer.write(sample_record(key, both[0], both[1], label, meta))
        data = (out / name).read_bytes()
        entries.append(ShardEntry(index, name, count, hashlib.sha256(data).hexdigest(), len(data)))
    manifest = Manifest(
        resolution=256,
        class_names=tuple(f"n{c:08d}" for c in range(classes)),
        source=SourceInfo("synthetic", samples, "0" * 64),
        config={},
        planned_shards=len(entries),
        shards=tuple(entries),
        complete=True,
        codec=SD_VAE,
        latent_shape=(4, 32, 32),
        stored_shape=STORED_SHAPE,
    )
    manifest.save(str(out))
    return manifest


def reader_rate(root: Path, batch: int, epochs: int) -> tuple[float, tuple]:
    """Samples/s of one reader over `epochs` full passes after one warm-up batch, and the first batch's shapes."""
    stream = LatentShardStream(str(root), batch_size=batch)
    batches = iter(stream)
    z, y = next(batches)
    num_batches = epochs * stream.batches_per_epoch
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    return batch * num_batches / (time.perf_counter() - start), (tuple(z.shape), str(z.dtype), tuple(y.shape))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8192, help="samples written (default 8192)")
    parser.add_argument("--samples-per-shard", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="per-GPU batch (default 64, as in the H200 figure)")
    parser.add_argument("--epochs", type=int, default=2, help="full passes per round (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (default 3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # one reader process: one core
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = write_shards(root, args.samples, args.samples_per_shard)
        rounds = [reader_rate(root, args.batch, args.epochs) for _ in range(args.rounds)]
        rate, shapes = float(np.median([r for r, _ in rounds])), rounds[0][1]
        shard_bytes = sum(s.bytes for s in manifest.shards) / manifest.total
    result = {
        "reader_samples_s": rate,
        "rounds_samples_s": [r for r, _ in rounds],
        "batch": args.batch,
        "samples": args.samples,
        "bytes_per_sample": shard_bytes,
        "batch_shapes": shapes,
        "x_h200_xl2": rate / H200_XL2_IMG_S,
        "x_h200_xl2_limit": rate / H200_XL2_LIMIT_IMG_S,
    }
    print(f"reader, one process, ImageNet-256 VAE shards ({shard_bytes / 1024:.1f} KiB a sample), batch {args.batch}:")
    print(
        f"  {rate:10.0f} samples/s (median of {args.rounds} rounds); "
        f"batches {shapes[0]} {shapes[1]}, labels {shapes[2]}"
    )
    print(f"  {result['x_h200_xl2']:10.1f} x an H200 training XL/2 ({H200_XL2_IMG_S:.0f} img/s)")
    print(f"  {result['x_h200_xl2_limit']:10.1f} x the same at the hardware limit ({H200_XL2_LIMIT_IMG_S:.0f} img/s)")
    verdict = "met" if result["x_h200_xl2"] >= TARGET else "NOT met"
    print(f"  target >= {TARGET:.0f}x the 545 img/s: {verdict}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
