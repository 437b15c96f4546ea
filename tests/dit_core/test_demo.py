"""The demo's yardstick: features, Frechet distance and accuracy separate real data from noise; the demo fails, and
exits non-zero, when its samples do not match the data."""

import numpy as np
import pytest
import torch

from dit_core import demo
from dit_core.demo import (
    NUM_CLASSES,
    class_accuracy,
    features,
    frechet_distance,
    make_templates,
    run_demo,
    sample_data,
)


def test_frechet_distance_of_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2 + 1  # mean shift 1 per dim, std 2: FD = 3 + 3 * (1 + 4 - 2 * 2) = 6
    assert abs(frechet_distance(a, b) - 6.0) < 0.2
    assert frechet_distance(a, a) < 1e-6


def test_yardstick_separates_data_from_noise():
    g = torch.Generator().manual_seed(0)
    templates = make_templates()
    real_a, y = sample_data(templates, 800, g)
    real_b, _ = sample_data(templates, 800, g)
    noise = torch.randn_like(real_a)
    assert class_accuracy(real_a, y, templates) == 1.0
    fa, fb, fn = features(real_a, templates), features(real_b, templates), features(noise, templates)
    assert frechet_distance(fa, fb) < 0.01 * frechet_distance(fn, fa)


def test_a_demo_too_short_to_learn_fails_its_check():
    """One training step cannot learn the data: the real samples (DDPM-250) miss it and the demo says so."""
    result = run_demo(train_steps=1, num_eval=64, verbose=False)
    assert result["steps"] == 1 and np.isfinite(result["final_loss"])
    assert result["fd_real_vs_real"] < result["fd_noise"] < result["fd_samples"]
    assert result["class_accuracy"] < 0.5 and result["passed"] is False


def data_sampler(shift: int, scale: float):
    """A stand-in for DDPMSampler that draws from the data itself: class y + shift, amplitudes times scale."""
    templates = make_templates()

    class DataSampler:
        def __init__(self, diffusion_config, respacing):
            pass

        def sample(self, denoise, noise, y, generator=None):
            amplitude = scale * (0.6 + 0.8 * torch.rand(len(y), 1, 1, 1, generator=generator))
            x = amplitude * templates[(y + shift) % NUM_CLASSES]
            return x + 0.1 * torch.randn(x.shape, generator=generator)

    return DataSampler


@pytest.mark.parametrize(
    "shift, scale, code",
    [(0, 1.0, 0), (1, 1.0, 1), (0, 3.0, 1)],
    ids=["samples from the data", "each of another class", "amplitudes 3x too large"],
)
def test_the_demo_exits_non_zero_unless_its_samples_match(monkeypatch, shift, scale, code):
    """The exit code follows the check: samples drawn from the data pass; samples of the wrong class fail on class
    accuracy (their features' distribution is the data's), samples 3x too bright fail on the Frechet distance."""
    monkeypatch.setattr(demo, "DDPMSampler", data_sampler(shift, scale))
    with pytest.raises(SystemExit) as exit:
        demo.main(["--steps", "1"])
    assert exit.value.code == code
