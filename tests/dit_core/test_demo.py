"""The demo's yardstick: features, Frechet distance and accuracy separate real data from noise."""

import numpy as np
import torch

from dit_core.demo import class_accuracy, features, frechet_distance, make_templates, run_demo, sample_data


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


def test_short_demo_runs_end_to_end():
    result = run_demo(train_seconds=1.0, num_eval=64, verbose=False)
    assert result["steps"] > 0 and np.isfinite(result["final_loss"])
    assert result["fd_real_vs_real"] < result["fd_noise"]
