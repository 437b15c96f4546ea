"""dit_core on its own: train a tiny class-conditional DiT on a synthetic latent distribution on the CPU, sample
from its EMA weights with the paper's sampler (DDPM, learned variance), and check the samples against the data.

    python -m dit_core.demo [--seconds 60 | --steps 2000]

The data: 4 classes of (4, 8, 8) "latents". Class k is a fixed smooth template P_k times a random amplitude
a ~ U(0.6, 1.4), plus N(0, 0.1^2) noise. The check computes, for generated and held-out real samples, the features
(projection on each template, residual norm); it reports the class accuracy of generated samples (nearest template)
and the Frechet distance of their features to the real ones, next to the same distance for a second real set (the
floor) and for pure noise (the ceiling).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import linalg

from dit_core.diffusion import DiffusionConfig, GaussianDiffusion, sample_timesteps
from dit_core.ema import create_ema, update_ema
from dit_core.model import DiT
from dit_core.samplers import DDPMSampler, make_denoiser

NUM_CLASSES, CHANNELS, SIZE = 4, 4, 8


def make_templates(seed: int = 1234) -> torch.Tensor:
    """(K, C, H, W) smooth unit-RMS templates, one per class."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(NUM_CLASSES, CHANNELS, 3, 3, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=True)
    return smooth / smooth.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()


def sample_data(templates: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples (x (n, C, H, W), y (n,)) of the synthetic distribution."""
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    amplitude = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=generator)
    x = amplitude * templates[y] + 0.1 * torch.randn(n, CHANNELS, SIZE, SIZE, generator=generator)
    return x, y


def features(x: torch.Tensor, templates: torch.Tensor) -> np.ndarray:
    """(n, K + 1): projections on the unit-norm templates and the norm of the residual."""
    flat = x.flatten(1).double()
    basis = templates.flatten(1).double()
    basis = basis / basis.norm(dim=1, keepdim=True)
    coeffs = flat @ basis.T  # (n, K)
    residual = (flat - coeffs @ basis).norm(dim=1, keepdim=True)
    return torch.cat([coeffs, residual], dim=1).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def class_accuracy(x: torch.Tensor, y: torch.Tensor, templates: torch.Tensor) -> float:
    """Share of samples whose best-matching template (largest projection) is their label's."""
    return float((torch.from_numpy(features(x, templates)[:, :NUM_CLASSES]).argmax(1) == y).float().mean())


def run_demo(
    train_seconds: float = 60.0,
    train_steps: int = 0,
    seed: int = 0,
    num_eval: int = 1000,
    verbose: bool = True,
    batch_size: int = 64,
    lr: float = 2e-3,
    ema_decay: float = 0.99,
) -> dict:
    """Train for about `train_seconds`, or for exactly `train_steps` steps if > 0 (the same model on every machine),
    then sample and score; returns the figures and whether they pass."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    templates = make_templates()
    model = DiT.from_preset("DiT-d2w64/2", input_size=SIZE, in_channels=CHANNELS, num_classes=NUM_CLASSES)
    ema = create_ema(model)
    diffusion = GaussianDiffusion(DiffusionConfig())  # the paper's: linear betas, eps + learned sigma, hybrid loss
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 50))
    log = print if verbose else (lambda *a, **k: None)
    budget = f"{train_steps} steps" if train_steps > 0 else f"{train_seconds:.0f} s"
    log(f"training DiT-d2w64/2 ({model.num_params(True):,} params) for {budget} on the CPU ...")

    step, start, batch, loss = 0, time.perf_counter(), batch_size, torch.tensor(float("nan"))
    while (step < train_steps) if train_steps > 0 else (time.perf_counter() - start < train_seconds):
        x0, y = sample_data(templates, batch, g)
        t = sample_timesteps(batch, diffusion.config.num_timesteps, generator=g)
        loss = diffusion.training_losses(model, x0, t, y)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        warmup.step()
        update_ema(ema, model, decay=ema_decay)
        step += 1
        if verbose and step % 200 == 0:
            log(f"  step {step:5d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.0f} s)")

    log(f"sampling {num_eval} latents with DDPM-250 (learned variance) from the EMA weights ...")
    y = torch.arange(num_eval) % NUM_CLASSES
    noise = torch.randn(num_eval, CHANNELS, SIZE, SIZE, generator=g)
    denoise = make_denoiser(ema, num_timesteps=diffusion.config.num_timesteps)
    samples = DDPMSampler(diffusion.config, respacing="250").sample(denoise, noise, y, generator=g)

    real_a, real_y = sample_data(templates, num_eval, g)
    real_b, _ = sample_data(templates, num_eval, g)
    fd = frechet_distance(features(samples, templates), features(real_a, templates))
    fd_floor = frechet_distance(features(real_b, templates), features(real_a, templates))
    fd_noise = frechet_distance(features(noise, templates), features(real_a, templates))
    acc = class_accuracy(samples, y, templates)
    result = {
        "steps": step,
        "final_loss": loss.item(),
        "class_accuracy": acc,
        "real_class_accuracy": class_accuracy(real_a, real_y, templates),
        "fd_samples": fd,
        "fd_real_vs_real": fd_floor,
        "fd_noise": fd_noise,
    }
    result["passed"] = acc >= 0.9 and fd < 0.05 * fd_noise
    log(
        f"\n{step} steps. Samples vs data, features = template projections (Frechet distance, lower is better):\n"
        f"  generated samples   FD {fd:8.3f}   class accuracy {acc:6.1%}\n"
        f"  second real set     FD {fd_floor:8.3f}   class accuracy {result['real_class_accuracy']:6.1%} (floor)\n"
        f"  pure noise          FD {fd_noise:8.3f}   class accuracy ~{1 / NUM_CLASSES:.0%} (chance)\n"
        f"{'PASS' if result['passed'] else 'FAIL'}: samples match the data "
        f"(need accuracy >= 90% and FD < 5% of the noise FD)"
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    parser.add_argument("--steps", type=int, default=0, help="> 0: train exactly this many steps instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    raise SystemExit(0 if run_demo(args.seconds, args.steps, args.seed)["passed"] else 1)


if __name__ == "__main__":
    main()
