"""Throughput of the FID stage: samples/s of sampling + decoding + features, and where the time goes.

CPU (default): a tiny preset (DiT-Mi/4, 16 px pixel codec) on toy data with the ditscale-classifier extractor.
GPU (--device cuda): DiT-XL/2 at 256 px (32x32x4 latents) with an SD-architecture VAE decoder (random weights) and
torch-fidelity's InceptionV3 (random weights: the same compute as the real extractor, no download).
Each is run with DDPM-250 (the paper's sampler) and a short sampler (DDIM-25), printing samples/s and the share of
time spent sampling (the DiT), decoding (the codec) and extracting features.

    python benchmarks/fid_throughput.py [--device cuda] [--samples 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_core.diffusion import DiffusionConfig  # noqa: E402
from dit_core.model import DiT  # noqa: E402
from dit_core.samplers import make_denoiser  # noqa: E402
from pipeline.codecs import PixelCodec, tensor_to_images  # noqa: E402
from pipeline.config import FidConfig  # noqa: E402
from pipeline.fid import features, make_extractor, make_sampler  # noqa: E402
from pipeline.fid_extractors import NAME as CLASSIFIER  # noqa: E402
from pipeline.fid_extractors import train_classifier


def random_inception_weights() -> str:
    """A state dict file for torch-fidelity's InceptionV3 with random weights: the real extractor's compute,
    without the download (the device machine reaches no network)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    class RandomInception(inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            return None if state_dict is None else super().load_state_dict(state_dict, *args, **kwargs)

    original = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = lambda *a, **k: None
    try:
        module = RandomInception("inception-v3-compat", ["2048"])
    finally:
        inception.load_state_dict_from_url = original
    path = Path(tempfile.mkdtemp()) / "inception-random.pth"
    torch.save(module.state_dict(), path)
    return str(path)


def timed(device: str, fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds), synchronising the GPU around the call."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--samples", type=int, default=None, help="images per measurement (default 200 CPU, 256 GPU)")
    parser.add_argument("--json", default="benchmarks/results/fid_throughput.json")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    n = args.samples or (256 if gpu else 200)
    torch.manual_seed(0)
    if gpu:
        from diffusers import AutoencoderKL

        model = DiT.from_preset("DiT-XL/2", input_size=32, in_channels=4).to("cuda").eval()
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
        )
        vae = vae.to("cuda", torch.bfloat16).eval()
        decode = lambda z: vae.decode(z.to(torch.bfloat16) / 0.18215).sample.float()  # noqa: E731
        fid = FidConfig(extractor="inception-v3-compat", batch_size=n)
        extractor = make_extractor(fid, random_inception_weights(), True, ["2048"])
    else:
        model = DiT.from_preset("DiT-Mi/4", input_size=16, in_channels=3, num_classes=10).eval()
        codec = PixelCodec()
        decode = codec.decode
        fid = FidConfig(extractor=CLASSIFIER, batch_size=n)
        with tempfile.TemporaryDirectory() as tmp:
            rng = np.random.default_rng(0)
            images = (rng.random((500, 16, 16, 3)) * 255).astype(np.uint8)
            train_classifier(images, rng.integers(0, 10, 500), f"{tmp}/c.pt", seconds=2)
            extractor = make_extractor(fid, f"{tmp}/c.pt", False, ["feat"])
    model_cfg = model.config
    results = []
    for sampler_name, steps in (("ddpm", 250), ("ddim", 25)):
        cfg = replace(fid, sampler=sampler_name, sampling_steps=steps)
        sampler = make_sampler(cfg, DiffusionConfig())
        g = torch.Generator(args.device).manual_seed(0)
        noise = torch.randn(n, model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size, generator=g,
                            device=args.device)  # fmt: skip
        y = torch.randint(0, model_cfg.num_classes, (n,), device=args.device)
        with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16, enabled=gpu):
            z, t_sample = timed(args.device, sampler.sample, make_denoiser(model), noise, y, generator=g)
            x, t_decode = timed(args.device, decode, z.float())
        images = tensor_to_images(x)
        _, t_feat = timed(args.device, features, images, extractor, gpu, batch_size=n)
        total = t_sample + t_decode + t_feat
        results.append({"sampler": f"{sampler_name}-{steps}", "samples": n, "samples_per_s": n / total,
                        "share_sampling": t_sample / total, "share_decoding": t_decode / total,
                        "share_features": t_feat / total, "config": asdict(cfg)})  # fmt: skip
    print(f"FID stage on {args.device}: {n} samples per measurement")
    print(f"{'sampler':<10} {'samples/s':>10} {'sampling':>9} {'decoding':>9} {'features':>9}")
    for r in results:
        print(f"{r['sampler']:<10} {r['samples_per_s']:>10.1f} {r['share_sampling']:>9.1%} "
              f"{r['share_decoding']:>9.1%} {r['share_features']:>9.1%}")  # fmt: skip
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
