"""Throughput of the prepare stage and of the shard reader, with the peers they replace, in one run.

1. prepare images/s on toy data with the pixel codec and with a small AutoencoderKL (random weights, built here).
2. Reader samples/s over those VAE shards against the on-the-fly path they remove: read the source JPEG, ADM crop,
   mirror, VAE-encode, sample the posterior, every time a sample is used. Printed as a ratio.
3. VAE encode images/s through the pipeline's encoder (ShardEncoder.encode_shard: decode, crop, encode image and
   mirror, write) against diffusers' AutoencoderKL.encode alone on the same images. With --device cuda the VAE has
   the Stable Diffusion architecture at 256 px in bf16 (746 img/s measured for a bare encode on an H200); the pipeline
   should reach at least 80% of the bare encode, counting both the image and its mirror.

    python benchmarks/prepare_throughput.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.codecs import CodecConfig, VaeCodec, images_to_tensor, latent_from_stored  # noqa: E402
from pipeline.data import LatentShardStream  # noqa: E402
from pipeline.images import list_source, load_image  # noqa: E402
from pipeline.prepare import PrepareConfig, ShardEncoder, prepare  # noqa: E402
from pipeline.toy import ToyDataConfig, write_toy_dataset  # noqa: E402


def build_vae(path: Path, sd_architecture: bool) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    if sd_architecture:  # the Stable Diffusion VAE's architecture (sd-vae-ft-ema), random weights
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=256,
        )
    else:  # small: 2 levels, /2 downsampling
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
        )
    vae.save_pretrained(path)
    return path


def time_prepare(src: Path, out: Path, config: PrepareConfig) -> float:
    start = time.perf_counter()
    manifest = prepare(str(src), str(out), config, progress=False)
    return manifest.total / (time.perf_counter() - start)


def reader_rate(shards: Path, batch: int, epochs: int = 3) -> float:
    """Samples/s of the training reader over `epochs` full passes (so the shuffle buffer cannot hide the reading)."""
    stream = LatentShardStream(str(shards), batch_size=batch)
    batches = iter(stream)
    next(batches)
    num_batches = epochs * stream.batches_per_epoch
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    return batch * num_batches / (time.perf_counter() - start)


def on_the_fly_rate(src: Path, vae_path: Path, resolution: int, batch: int, num_batches: int, device: str) -> float:
    """What training without precomputed latents does per batch: decode JPEGs, crop, random flip, encode, sample."""
    listing = list_source(str(src))
    codec = VaeCodec(str(vae_path), device=device)
    description = codec.describe()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(num_batches):
        crops = []
        for j in rng.integers(0, len(listing.files), batch):
            crop, _ = load_image((src / listing.files[j][0]).read_bytes(), resolution, 10**9)
            crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
        moments = codec.encode(images_to_tensor(np.stack(crops)))
        latent_from_stored(moments, description)
    return batch * num_batches / (time.perf_counter() - start)


def encoder_vs_bare(src: Path, out: Path, vae_path: Path, resolution: int, batch: int, device: str) -> dict:
    listing = list_source(str(src))
    config = PrepareConfig(
        resolution=resolution, codec=CodecConfig(kind="vae", vae=str(vae_path)), encode_batch_size=batch
    )
    encoder = ShardEncoder(config, str(src), str(out), device=device)
    items = [(i, *listing.files[i]) for i in range(len(listing.files))]
    encoder.encode_shard(0, items[: batch * 2])  # warm-up
    start = time.perf_counter()
    entry = encoder.encode_shard(1, items)
    if device == "cuda":
        torch.cuda.synchronize()
    pipeline_img_s = 2 * entry["count"] / (time.perf_counter() - start)  # image + mirror per sample
    x = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    vae = encoder.codec.vae
    with torch.no_grad():
        for _ in range(2):
            vae.encode(x.to(device, encoder.codec.dtype))
        if device == "cuda":
            torch.cuda.synchronize()
        rounds = max(1, 2 * len(items) // batch)
        start = time.perf_counter()
        for _ in range(rounds):
            vae.encode(x.to(device, encoder.codec.dtype)).latent_dist.mean.float().cpu()
        if device == "cuda":
            torch.cuda.synchronize()
    bare_img_s = batch * rounds / (time.perf_counter() - start)
    return {
        "pipeline_encode_img_s": pipeline_img_s,
        "bare_encode_img_s": bare_img_s,
        "encode_ratio": pipeline_img_s / bare_img_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default="benchmarks/results/prepare_throughput.json")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    import ray

    ray.init(num_cpus=None if gpu else 2, include_dashboard=False, log_to_driver=False)
    resolution = 256 if gpu else 32
    results: dict = {"device": args.device, "resolution": resolution}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_class = 100 if gpu else 40
        write_toy_dataset(tmp / "src", ToyDataConfig(per_class=per_class, resolution=resolution), progress=False)
        vae = build_vae(tmp / "vae", sd_architecture=gpu)
        pixel = PrepareConfig(resolution=resolution, codec=CodecConfig(kind="pixel"), samples_per_shard=100)
        results["prepare_pixel_img_s"] = time_prepare(tmp / "src", tmp / "pixel", pixel)
        vae_cfg = PrepareConfig(
            resolution=resolution, codec=CodecConfig(kind="vae", vae=str(vae)), samples_per_shard=100
        )
        results["prepare_vae_img_s"] = time_prepare(tmp / "src", tmp / "vae-shards", vae_cfg)
        batch = 64 if gpu else 32
        results["reader_samples_s"] = reader_rate(tmp / "vae-shards", batch)
        results["on_the_fly_samples_s"] = on_the_fly_rate(tmp / "src", vae, resolution, batch, 3, args.device)
        results["reader_ratio"] = results["reader_samples_s"] / results["on_the_fly_samples_s"]
        results.update(encoder_vs_bare(tmp / "src", tmp / "enc", vae, resolution, batch, args.device))

    print(f"prepare, pixel codec          {results['prepare_pixel_img_s']:10.1f} images/s")
    print(f"prepare, VAE codec            {results['prepare_vae_img_s']:10.1f} images/s")
    print(f"reader over VAE shards        {results['reader_samples_s']:10.1f} samples/s")
    print(f"on-the-fly decode + encode    {results['on_the_fly_samples_s']:10.1f} samples/s")
    print(f"  reader / on-the-fly         {results['reader_ratio']:10.1f} x")
    print(f"pipeline VAE encode           {results['pipeline_encode_img_s']:10.1f} images/s (image + mirror)")
    print(f"bare AutoencoderKL.encode     {results['bare_encode_img_s']:10.1f} images/s")
    print(f"  pipeline / bare             {results['encode_ratio']:10.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
