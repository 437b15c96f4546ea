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
from tests.analysis.coverage import Z, assert_coverage, assert_width, line_oracle, spread_oracle

# ---------------------------------------------------------------------------------------------------------------
# Replicates in the power law
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "point_noise, seed_noise, share",
    [(0.0, 0.05, (0.25, None)), (0.1, 0.005, (None, 0.06))],
    ids=["seed noise alone", "shared point deviations"],
)
def test_power_law_with_replicates_covers_and_splits_seed_noise(point_noise, seed_noise, share):
    """Two seeds per point (6 points). With noise only between seeds, the interval covers the exponent and much
    of its width is seed noise; with point-level deviations that both seeds share and little seed noise, the seed
    share is an order of magnitude smaller. Either way coverage is nominal within a binomial tolerance over 300 data
    sets, and the median width within 1.8x of the oracle's (the line through the point means with known noise; the
    exact t interval's is 1.3x). Measured over 2,000: 97.2% [1.59x] with seed share 0.55, and 96.7% [1.59x] with
    0.020 (the former percentile interval, seeds redrawn within each drawn point: 97.5% and 89.6%)."""
    x = np.repeat(np.geomspace(1, 100, 6), 2)
    covered, widths, shares = [], [], []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        y = 40 * x**-0.3 * np.exp(np.repeat(rng.normal(0, point_noise, 6), 2) + rng.normal(0, seed_noise, x.size))
        fit, _ = fit_power_law(x, y, bootstrap=500, seed=seed)
        covered.append(fit.b_ci[0] <= -0.3 <= fit.b_ci[1])
        widths.append(fit.b_ci[1] - fit.b_ci[0])
        shares.append(fit.seed_share)
    assert fit.n == 12
    assert_coverage(covered, "exponent with replicates")
    sigma = np.sqrt(point_noise**2 + seed_noise**2 / 2)  # of a point's mean over its two seeds
    assert_width(widths, line_oracle(np.log10(np.unique(x)), sigma), 1.8, "exponent with replicates")
    above, below = share
    assert (above is None or np.median(shares) > above) and (below is None or np.median(shares) < below)


def test_one_seed_has_no_seed_share_and_replicates_do_not_count_as_points():
    fit, _ = fit_power_law([1, 2, 4, 8], [10, 8, 6, 5], bootstrap=100)
    assert fit.b_seed_ci is None and fit.seed_share is None
    with pytest.raises(FitError, match="2 distinct points"):
        fit_power_law([1, 1, 2, 2], [10, 11, 8, 9])


# ---------------------------------------------------------------------------------------------------------------
# L(C) = E + A C^-alpha
# ---------------------------------------------------------------------------------------------------------------


def test_saturating_law_recovers_and_covers_over_noisy_draws():
    """L(C) = 0.1 + 30 C^-0.12 at 8 budgets with 2 seeds each: recovered from 0.2% noise; at 1% noise over 40 data
    sets the percentile interval of alpha and the band at the middle budget cover the truth at the nominal level
    within a binomial tolerance, at most 2x as wide as the estimates' own spread. Measured over 300 data sets
    (bootstrap 40): alpha 95.3% at 1.26x, the band 95.0% at 1.22x (its former percentiles: 86.0% at 0.83x)."""
    E, A, alpha = 0.1, 30.0, 0.12
    x = np.repeat(np.geomspace(1e12, 1e17, 8), 2)
    truth = E + A * x**-alpha
    law = fit_saturating(x, truth * np.exp(np.random.default_rng(0).normal(0, 0.002, x.size)), bootstrap=100)
    assert law.alpha == pytest.approx(alpha, rel=0.1) and law.E == pytest.approx(E, rel=0.15)
    assert law(x) == pytest.approx(truth, rel=0.01)
    lo, hi = law.band(x)
    assert (0 < (hi - lo) / truth).all() and ((hi - lo) / truth < 0.02).all()  # about the noise, never nothing
    middle = np.array([np.sqrt(1e12 * 1e17)])
    covered, widths, alphas, band_covered, band_widths, fitted = [], [], [], [], [], []
    for seed in range(40):
        y = truth * np.exp(np.random.default_rng(seed).normal(0, 0.01, x.size))
        law = fit_saturating(x, y, bootstrap=40, seed=seed)
        covered.append(law.alpha_ci[0] <= alpha <= law.alpha_ci[1])
        widths.append(law.alpha_ci[1] - law.alpha_ci[0])
        alphas.append(law.alpha)
        (lo,), (hi,) = law.band(middle)
        band_covered.append(lo <= E + A * middle[0] ** -alpha <= hi)
        band_widths.append(hi - lo)
        fitted.append(law(middle)[0])
    assert_coverage(covered, "alpha")
    assert_width(widths, spread_oracle(alphas), 2.0, "alpha")
    assert_coverage(band_covered, "band at the middle budget")
    assert_width(band_widths, spread_oracle(fitted), 2.0, "band at the middle budget")


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


def true_n_opt(compute):
    """argmin over N of L(N, C / 6N) for chinchilla_curves' law: dL/dN = 0 gives N^(alpha + beta) =
    alpha A / (beta B) (C / 6)^beta."""
    return (0.34 * 400 / (0.28 * 2000) * (np.asarray(compute) / 6) ** 0.28) ** (1 / 0.62)


def test_isoflop_frontier_recovers_the_compute_optimal_exponent():
    frontier = isoflop_frontier(isoflop_points(chinchilla_curves()), bootstrap=100)
    assert len(frontier.optima) >= 3
    assert frontier.a == pytest.approx(A_TRUE, abs=0.03) and frontier.b == pytest.approx(1 - A_TRUE, abs=0.03)
    c = np.array([o[0] for o in frontier.optima])
    assert frontier.n_opt(c) == pytest.approx(true_n_opt(c), rel=0.05)  # measured within 3.2%
    assert frontier.d_opt(c) == pytest.approx(c / (6 * true_n_opt(c)), rel=0.05)


def test_isoflop_interval_covers_over_noisy_replicated_draws():
    """Over 60 data sets (six sizes, two seeds, 0.4% noise) the interval of a covers the truth at the nominal level
    within a binomial tolerance, at most 2.6x as wide as the estimates' own spread. Measured over 100 data sets:
    96% at 1.90x (a draw that leaves fewer than 3 budgets with an inside minimum is refused, as the fit refuses
    such data; keeping those draws gave 100% at 3.1x)."""
    covered, widths, estimates = [], [], []
    for seed in range(60):
        points = isoflop_points(chinchilla_curves(noise=0.004, seed=seed, seeds=2))
        frontier = isoflop_frontier(points, bootstrap=60, seed=seed)
        covered.append(frontier.a_ci[0] <= A_TRUE <= frontier.a_ci[1])
        widths.append(frontier.a_ci[1] - frontier.a_ci[0])
        estimates.append(frontier.a)
    assert_coverage(covered, "isoFLOP a")
    assert_width(widths, spread_oracle(estimates), 2.6, "isoFLOP a")


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
    """Recovered from 0.2% noise; over 12 data sets at 0.3% noise (each fit runs 8 starts: 12 is what the test's
    former time allows) the interval of a = beta / (alpha + beta) covers the truth at the nominal level within a
    binomial tolerance, at most 2.5x as wide as the estimates' own spread. Measured over 100 data sets: 94% at
    1.69x."""
    curves = chinchilla_curves(noise=0.002)
    tokens = curves["compute_flops"] / (6 * curves["params"])
    surface = fit_parametric(curves["params"], tokens, curves["loss"], bootstrap=30)
    assert surface.alpha == pytest.approx(0.34, abs=0.04) and surface.beta == pytest.approx(0.28, abs=0.03)
    assert surface.E == pytest.approx(1.5, rel=0.05) and surface.a == pytest.approx(A_TRUE, abs=0.04)
    assert surface(1e6, 1e9) == pytest.approx(1.5 + 400 / 1e6**0.34 + 2000 / 1e9**0.28, rel=0.01)
    covered, widths, estimates = [], [], []
    for seed in range(12):
        c = chinchilla_curves(noise=0.003, seed=seed)
        s = fit_parametric(c["params"], c["compute_flops"] / (6 * c["params"]), c["loss"], bootstrap=25, seed=seed)
        covered.append(s.ci["a"][0] <= A_TRUE <= s.ci["a"][1])
        widths.append(s.ci["a"][1] - s.ci["a"][0])
        estimates.append(s.a)
    assert_coverage(covered, "parametric a")
    assert_width(widths, spread_oracle(estimates), 2.5, "parametric a")


def test_parametric_needs_varied_sizes_and_data():
    n = np.repeat([1e6, 1e7, 1e8], 3)
    with pytest.raises(FitError, match="1 data sizes"):
        fit_parametric(n, np.full(9, 1e9), np.linspace(2, 3, 9))  # every trial the same length
    with pytest.raises(FitError, match="NaN"):
        fit_parametric(n, np.tile([1e8, 1e9, 1e10], 3), [np.nan] + [2.0] * 8)


# ---------------------------------------------------------------------------------------------------------------
# Held-out prediction
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seeds, point_noise, seed_noise", [(1, 0.05, 0.0), (2, 0.05, 0.02)], ids=["one seed", "two seeds"]
)
def test_held_out_prediction_of_an_exact_law_and_its_coverage(seeds, point_noise, seed_noise):
    """Six points predict a seventh (at 10x the largest): an exact law exactly; with noise, over 300 data sets the
    95% prediction interval holds the held-out point's mean over its seeds at the nominal level within a binomial
    tolerance, its median width within 1.7x of the oracle's (known noise: the line's error there plus a new
    point's; the exact t interval's is 1.3x). Measured over 2,000: 96.2% [1.42x] and 95.8% [1.44x]; the former
    interval (percentiles of the bootstrap plus a drawn residual) covered 86.8% with one seed."""
    x = np.geomspace(1, 1000, 7)
    check = held_out(x, 50 * x**-0.4, holdout=1, bootstrap=300)
    assert check.x == [1000.0] and check.predicted[0] == pytest.approx(50 * 1000**-0.4, rel=1e-6)
    assert abs(check.errors[0]) < 1e-6 and check.inside == [True]
    rows = np.repeat(x, seeds)
    covered, widths = [], []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        noise = np.repeat(rng.normal(0, point_noise, x.size), seeds) + rng.normal(0, seed_noise, rows.size)
        c = held_out(rows, 50 * rows**-0.4 * np.exp(noise), bootstrap=500, seed=seed)
        covered.append(c.inside[0])
        widths.append(np.log10(c.interval[0][1] / c.interval[0][0]))
    assert_coverage(covered, "held-out prediction")
    sigma = np.sqrt(point_noise**2 + seed_noise**2 / seeds)  # of a point's mean over its seeds
    fitted = np.log10(x[:-1])
    line = line_oracle(fitted, sigma, at=3.0) / 2  # half-widths add in quadrature with the new point's
    oracle = 2 * np.sqrt(line**2 + (Z * sigma / np.log(10)) ** 2)
    assert_width(widths, oracle, 1.7, "held-out prediction")


def test_paper_table4_held_out_xl2():
    """The check anyone can run on Table 4: the eleven models other than XL/2 predict it at about 26.5 against the
    measured 19.47 (patch size and width do not trade at the same rate per Gflop), inside a wide interval."""
    check = held_out(PAPER_TABLE4["gflops"], PAPER_TABLE4["fid"], holdout=1)
    assert check.x == [118.64] and check.measured == [19.47]
    assert check.predicted[0] == pytest.approx(26.5, abs=0.1)
    assert check.errors[0] == pytest.approx(0.36, abs=0.01)
    assert check.interval[0] == pytest.approx((13.70, 51.16), abs=0.01) and check.inside == [True]


def test_held_out_needs_three_points_left():
    with pytest.raises(FitError, match="leaves 2"):
        held_out([1, 2, 3], [5, 4, 3])
