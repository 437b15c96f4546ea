"""Throughput of the FID stage and the share of its time spent in the DiT forward, through the stage's own code.

The stage's sampler (pipeline.fid.sampling.SliceSampler: checkpoint load, sampling, decoding, compiled on a GPU as
the stage compiles it) draws one slice, then torch-fidelity extracts the features. Every DiT call is timed as it
runs (CUDA events on a GPU, so no host sync is added; wall time on a CPU), and `DiT forward` = time in those calls /
the stage's time: the issue's target is at least 85% on a GPU. Two samplers: DDPM-250 (the paper) and DDIM-25.

CPU (default): DiT-d4w128/4 at 16 px (pixel codec), ditscale-classifier extractor, eager, fp32.
GPU (--device cuda): DiT-XL/2 at 256 px (32x32x4 latents), bf16, compiled; an SD-architecture VAE saved with
save_pretrained and loaded as the stage loads it, and torch-fidelity's InceptionV3, both with random weights (the
real compute, without downloads: the device machine reaches no network). The first slice of each run is a warm-up
(compilation), not timed. Each sampler's result is written as soon as it exists.

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

from prepare_throughput import build_vae  # noqa: E402  (benchmarks/, the script's own folder)

from dit_core.checkpoint import save_checkpoint  # noqa: E402
from dit_core.diffusion import DiffusionConfig  # noqa: E402
from dit_core.model import DiT  # noqa: E402
from pipeline.codecs import CodecInfo, PixelCodec  # noqa: E402
from pipeline.config import FidConfig  # noqa: E402
from pipeline.fid.classifier import NAME as CLASSIFIER  # noqa: E402
from pipeline.fid.classifier import train_classifier  # noqa: E402
from pipeline.fid.reference import FeatureSpace, embed  # noqa: E402
from pipeline.fid.sampling import SliceSampler, compile_sampling  # noqa: E402


def random_inception_weights(folder: str) -> str:
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
    path = Path(folder) / "inception-random.pth"
    torch.save(module.state_dict(), path)
    return str(path)


def sd_vae_codec(folder: str) -> CodecInfo:
    """An SD-architecture AutoencoderKL with random weights, saved as a local folder; its codec description."""
    build_vae(Path(folder) / "vae", sd_architecture=True)
    return CodecInfo(
        "vae", latent_channels=4, scale_factor=0.18215, stores_moments=True, vae=f"{folder}/vae", downsample=8
    )


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class TimedSliceSampler(SliceSampler):
    """The stage's SliceSampler with every DiT call timed: CUDA events on a GPU (no host sync), wall time on a CPU."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def denoiser(self, model, fid):
        denoise = super().denoiser(model, fid)
        gpu = self.device == "cuda"

        def timed(x, t, y):
            if gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = denoise(x, t, y)
                end.record()
                self.calls.append((start, end))
            else:
                start = time.perf_counter()
                out = denoise(x, t, y)
                self.calls.append(time.perf_counter() - start)
            return out

        return timed

    def forward_seconds(self) -> float:
        """Seconds spent in the DiT calls recorded so far (then forgets them)."""
        synchronize(self.device)
        if self.device == "cuda":
            total = sum(start.elapsed_time(end) for start, end in self.calls) / 1e3
        else:
            total = sum(self.calls)
        self.calls = []
        return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--samples", type=int, default=None, help="images per measurement (default 200 CPU, 256 GPU)")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="fid.compile (auto: GPU)")
    parser.add_argument("--json", default="benchmarks/results/fid_throughput.json")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but no CUDA device is visible")
    n = args.samples or (256 if gpu else 200)
    compile_flag = {"auto": None, "on": True, "off": False}[args.compile]
    tmp = tempfile.mkdtemp()
    torch.manual_seed(0)
    if gpu:
        preset, size, channels, classes = "DiT-XL/2", 32, 4, 1000
        codec = sd_vae_codec(tmp)
        fid = FidConfig(extractor="inception-v3-compat", batch_size=n, compile=compile_flag)
        space = FeatureSpace("inception-v3-compat", random_inception_weights(tmp), ("2048",))
    else:
        preset, size, channels, classes = "DiT-d4w128/4", 16, 3, 10
        codec = PixelCodec().describe()
        fid = FidConfig(extractor=CLASSIFIER, batch_size=n, compile=compile_flag)
        rng = np.random.default_rng(0)
        images = (rng.random((500, 16, 16, 3)) * 255).astype(np.uint8)
        train_classifier(images, rng.integers(0, 10, 500), f"{tmp}/c.pt", seconds=2)
        space = FeatureSpace(CLASSIFIER, f"{tmp}/c.pt", ("feat",))
    model = DiT.from_preset(preset, input_size=size, in_channels=channels, num_classes=classes)
    config = {"model": asdict(model.config), "diffusion": asdict(DiffusionConfig())}
    checkpoint = str(save_checkpoint(f"{tmp}/ema.pt", model=model, step=0, config=config))
    del model
    sampler = TimedSliceSampler(codec, args.device, compile_sampling(fid, args.device))
    name = torch.cuda.get_device_name() if gpu else "cpu"
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for sampler_name, steps in (("ddpm", 250), ("ddim", 25)):
        cfg = replace(fid, sampler=sampler_name, sampling_steps=steps, num_samples=n, slice_size=n)
        sampler.sample(checkpoint, replace(cfg, sampling_steps=2), 0, n)  # warm-up: compile, allocate
        sampler.forward_seconds()
        start = time.perf_counter()
        images = sampler.sample(checkpoint, cfg, 0, n)  # sampling + decoding (+ load: cached here)
        synchronize(args.device)
        t_slice = time.perf_counter() - start
        t_forward = sampler.forward_seconds()
        start = time.perf_counter()
        embed(images, space, gpu, batch_size=n)  # as the sampling actors embed a slice
        synchronize(args.device)
        t_feat = time.perf_counter() - start
        total = t_slice + t_feat
        results.append(
            {
                "sampler": f"{sampler_name}-{steps}",
                "preset": preset,
                "samples": n,
                "compiled": sampler.compile,
                "samples_per_s": n / total,
                "share_dit_forward": t_forward / total,
                "share_features": t_feat / total,
                "share_sampler_and_decode_other": (t_slice - t_forward) / total,
                "seconds": total,
                "config": asdict(cfg),
            }
        )
        out.write_text(json.dumps({"device": name, "torch": torch.__version__, "results": results}, indent=2))
    print(f"FID stage on {name}: {preset}, {n} samples per measurement, compiled: {sampler.compile}")
    print(f"{'sampler':<10} {'samples/s':>10} {'DiT forward':>12} {'rest of slice':>14} {'features':>9}")
    for r in results:
        print(
            f"{r['sampler']:<10} {r['samples_per_s']:>10.1f} {r['share_dit_forward']:>12.1%} "
            f"{r['share_sampler_and_decode_other']:>14.1%} {r['share_features']:>9.1%}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
