"""Every scaling law recovers known parameters from synthetic data, its intervals cover the truth over many noisy
draws, the paper's Table 4 gives its held-out number, and data that cannot support a fit gives a reason."""

import numpy as np
import pandas as pd
import pytest

from analysis.fits import FitError, fit_power_law
from analysis.laws import (
    distinct_sizes,
    fit_parametric,
    fit_saturating,
    held_out,
    isoflop_frontier,
    isoflop_points,
)
from analysis.report import PAPER_TABLE4

# ---------------------------------------------------------------------------------------------------------------
# Replicates in the power law
# ---------------------------------------------------------------------------------------------------------------


def test_power_law_with_replicates_covers_the_truth_and_splits_seed_noise():
    """Two seeds per point, noise only between seeds: the hierarchical interval covers the exponent, and a large
    part of its width is seed noise (resampling the points as well widens it further). Point-level deviations that
    the seeds share, with little seed noise, make the seed share an order of magnitude smaller."""
    covered, shares = 0, []
    x = np.repeat(np.geomspace(1, 100, 6), 2)
    for seed in range(30):
        rng = np.random.default_rng(seed)
        y = 40 * x**-0.3 * np.exp(rng.normal(0, 0.05, x.size))
        fit, _ = fit_power_law(x, y, bootstrap=300, seed=seed)
        covered += fit.b_ci[0] <= -0.3 <= fit.b_ci[1]
        shares.append(fit.seed_share)
    assert covered >= 24 and fit.n == 12
    assert np.median(shares) > 0.25
    rng = np.random.default_rng(0)
    shared = np.repeat(rng.normal(0, 0.1, 6), 2)  # each point off the law, both seeds alike
    y = 40 * x**-0.3 * np.exp(shared + rng.normal(0, 0.005, x.size))
    fit, _ = fit_power_law(x, y, bootstrap=300)
    assert fit.seed_share < 0.06


def test_one_seed_has_no_seed_share_and_replicates_do_not_count_as_points():
    fit, _ = fit_power_law([1, 2, 4, 8], [10, 8, 6, 5], bootstrap=100)
    assert fit.b_seed_ci is None and fit.seed_share is None
    with pytest.raises(FitError, match="2 distinct points"):
        fit_power_law([1, 1, 2, 2], [10, 11, 8, 9])


# ---------------------------------------------------------------------------------------------------------------
# L(C) = E + A C^-alpha
# ---------------------------------------------------------------------------------------------------------------


def test_saturating_law_recovers_and_covers_over_noisy_draws():
    E, A, alpha = 0.1, 30.0, 0.12
    x = np.repeat(np.geomspace(1e12, 1e17, 8), 2)
    truth = E + A * x**-alpha
    law = fit_saturating(x, truth * np.exp(np.random.default_rng(0).normal(0, 0.002, x.size)), bootstrap=100)
    assert law.alpha == pytest.approx(alpha, rel=0.1) and law.E == pytest.approx(E, rel=0.15)
    assert law(x) == pytest.approx(truth, rel=0.01)
    lo, hi = law.band(x)
    assert (lo <= law(x) + 1e-9).all() and (law(x) <= hi + 1e-9).all()
    covered = 0
    for seed in range(20):
        y = truth * np.exp(np.random.default_rng(seed).normal(0, 0.01, x.size))
        law = fit_saturating(x, y, bootstrap=80, seed=seed)
        covered += law.alpha_ci[0] <= alpha <= law.alpha_ci[1]
    assert covered >= 16


def test_saturating_law_needs_four_distinct_points():
    with pytest.raises(FitError, match="3 distinct points for 3 parameters"):
        fit_saturating([1, 2, 3, 3], [3, 2, 1.5, 1.4])
    with pytest.raises(FitError, match="same x"):
        fit_saturating([5, 5, 5, 5], [3, 2, 1.5, 1.4])  # all-equal compute


# ---------------------------------------------------------------------------------------------------------------
# Compute-optimal frontiers
# ---------------------------------------------------------------------------------------------------------------


def chinchilla_curves(noise: float = 0.0, seed: int = 0, seeds: int = 1) -> pd.DataFrame:
    """Loss curves of six sizes from L(N, D) = 1.5 + 400 / N^0.34 + 2000 / D^0.28 with C = 6ND."""
    rng, rows = np.random.default_rng(seed), []
    for s in range(seeds):
        for n in (1e5, 3e5, 1e6, 3e6, 1e7, 3e7):
            for d in np.geomspace(1e7, 1e11, 30):
                loss = (1.5 + 400 / n**0.34 + 2000 / d**0.28) * np.exp(rng.normal(0, noise))
                rows.append({"label": f"N{n:g}", "seed": s, "params": n, "compute_flops": 6 * n * d, "loss": loss})
    return pd.DataFrame(rows)


A_TRUE = 0.28 / (0.34 + 0.28)  # N_opt ~ C^(beta / (alpha + beta))


def test_isoflop_frontier_recovers_the_compute_optimal_exponent():
    frontier = isoflop_frontier(isoflop_points(chinchilla_curves()), bootstrap=100)
    assert len(frontier.optima) >= 3
    assert frontier.a == pytest.approx(A_TRUE, abs=0.03) and frontier.b == pytest.approx(1 - frontier.a)
    assert frontier.a_ci[0] <= frontier.a <= frontier.a_ci[1]
    c = np.array([o[0] for o in frontier.optima])
    assert frontier.d_opt(c) == pytest.approx(c / (6 * frontier.n_opt(c)))


def test_isoflop_interval_covers_over_noisy_replicated_draws():
    covered = 0
    for seed in range(10):
        points = isoflop_points(chinchilla_curves(noise=0.004, seed=seed, seeds=2))
        frontier = isoflop_frontier(points, bootstrap=60, seed=seed)
        covered += frontier.a_ci[0] - 0.02 <= A_TRUE <= frontier.a_ci[1] + 0.02
    assert covered >= 8


def test_isoflop_needs_sizes_on_both_sides_of_the_optimum():
    small = chinchilla_curves()
    small = small[small["params"] <= 3e5]  # two sizes only
    with pytest.raises(FitError, match="N_opt\\(C\\) needs 3 budgets"):
        isoflop_frontier(isoflop_points(small))
    with pytest.raises(FitError, match="no compute budget"):
        isoflop_frontier(isoflop_points(small.iloc[:0]))


def test_patch_variants_of_one_width_are_one_size():
    assert distinct_sizes([1_867_404, 1_876_656, 254_988, 259_632, 63_084, 66_576]) == 3


def test_parametric_surface_recovers_and_covers():
    curves = chinchilla_curves(noise=0.002)
    tokens = curves["compute_flops"] / (6 * curves["params"])
    surface = fit_parametric(curves["params"], tokens, curves["loss"], bootstrap=30)
    assert surface.alpha == pytest.approx(0.34, abs=0.04) and surface.beta == pytest.approx(0.28, abs=0.03)
    assert surface.E == pytest.approx(1.5, rel=0.05) and surface.a == pytest.approx(A_TRUE, abs=0.04)
    assert surface(1e6, 1e9) == pytest.approx(1.5 + 400 / 1e6**0.34 + 2000 / 1e9**0.28, rel=0.01)
    covered = 0
    for seed in range(8):
        c = chinchilla_curves(noise=0.003, seed=seed)
        s = fit_parametric(c["params"], c["compute_flops"] / (6 * c["params"]), c["loss"], bootstrap=25, seed=seed)
        covered += s.ci["a"][0] - 0.02 <= A_TRUE <= s.ci["a"][1] + 0.02
    assert covered >= 6


def test_parametric_needs_varied_sizes_and_data():
    n = np.repeat([1e6, 1e7, 1e8], 3)
    with pytest.raises(FitError, match="1 data sizes"):
        fit_parametric(n, np.full(9, 1e9), np.linspace(2, 3, 9))  # every trial the same length
    with pytest.raises(FitError, match="NaN"):
        fit_parametric(n, np.tile([1e8, 1e9, 1e10], 3), [np.nan] + [2.0] * 8)


# ---------------------------------------------------------------------------------------------------------------
# Held-out prediction
# ---------------------------------------------------------------------------------------------------------------


def test_held_out_prediction_of_an_exact_law_and_its_coverage():
    x = np.geomspace(1, 1000, 7)
    check = held_out(x, 50 * x**-0.4, holdout=1, bootstrap=300)
    assert check.x == [1000.0] and check.predicted[0] == pytest.approx(50 * 1000**-0.4, rel=1e-6)
    assert abs(check.errors[0]) < 1e-6 and check.inside == [True]
    covered = 0
    for seed in range(40):
        y = 50 * x**-0.4 * np.exp(np.random.default_rng(seed).normal(0, 0.05, x.size))
        truth = 50 * 1000**-0.4 * np.exp(np.random.default_rng(1000 + seed).normal(0, 0.05))
        c = held_out(x[:-1].tolist() + [1000.0], y[:-1].tolist() + [truth], bootstrap=300, seed=seed)
        covered += c.inside[0]
    assert covered >= 30  # a 95% prediction interval from 6 points, somewhat narrow


def test_paper_table4_held_out_xl2():
    """The check anyone can run on Table 4: the eleven models other than XL/2 predict it at about 26.5 against the
    measured 19.47 (patch size and width do not trade at the same rate per Gflop)."""
    check = held_out(PAPER_TABLE4["gflops"], PAPER_TABLE4["fid"], holdout=1)
    assert check.x == [118.64] and check.measured == [19.47]
    assert check.predicted[0] == pytest.approx(26.5, abs=0.1)
    assert check.errors[0] == pytest.approx(0.36, abs=0.01)
    lo, hi = check.interval[0]
    assert lo < check.predicted[0] < hi


def test_held_out_needs_three_points_left():
    with pytest.raises(FitError, match="leaves 2"):
        held_out([1, 2, 3], [5, 4, 3])
