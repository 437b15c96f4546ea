"""Scaling-law fits: power laws in log-log space with bootstrap intervals, correlations, the compute frontier.

    fit = fit_power_law(gflops, fid)        # fid = a * gflops^b, least squares on (log x, log y)
    fit.b, fit.b_ci                         # exponent and its 95% bootstrap interval
    correlation(gflops, fid)                # Pearson of fid with log10 gflops (the paper reports -0.93)

Degenerate input (fewer than 3 distinct points, all-equal x, NaN or non-positive values) raises FitError with the
reason: no line is ever drawn through data that cannot support one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


class FitError(ValueError):
    """The data cannot support the fit; the message says why."""


LEVEL = 0.95  # every interval of the analysis


def t_quantile(points: int, parameters: int = 2) -> float:
    """Student's t at (1 + LEVEL) / 2 with points - parameters degrees of freedom: the multiplier of a bootstrap
    standard error when a law is fitted on few distinct points (4.30 at 4 points, 2.78 at 6, 2.23 at 12)."""
    return float(stats.t.ppf((1 + LEVEL) / 2, max(points - parameters, 1)))


@dataclass(frozen=True)
class PowerLaw:
    """y = a * x^b, fitted on log10 scale."""

    a: float
    b: float
    a_ci: tuple[float, float]  # 95%: estimate +- t x the bootstrap standard error (points, each with its seeds)
    b_ci: tuple[float, float]
    r2: float  # of the log-log line
    n: int  # rows (points x seeds)
    b_seed_ci: tuple[float, float] | None = None  # the exponent's interval from seed noise alone (points fixed)
    t: float = 1.96  # the multiplier of the standard errors above (t_quantile of the distinct points)

    @property
    def seed_share(self) -> float | None:
        """How much of the exponent's interval is seed noise: its width with only the seeds resampled, over its
        width with the points (and their seeds) resampled (None without replicates)."""
        if self.b_seed_ci is None or self.b_ci[1] == self.b_ci[0]:
            return None
        return float((self.b_seed_ci[1] - self.b_seed_ci[0]) / (self.b_ci[1] - self.b_ci[0]))

    def __call__(self, x):
        return self.a * np.asarray(x, dtype=float) ** self.b

    def band(self, x, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise 95% band of the fitted line: +- t x the bootstrap standard error of log10 y at each x, from the
        bootstrap samples of (log a, b)."""
        logx = np.log10(np.asarray(x, dtype=float))
        lines = samples[:, :1] + samples[:, 1:2] * logx[None]  # (B, len(x))
        centre, half = np.log10(self(x)), self.t * lines.std(axis=0, ddof=1)
        return 10 ** (centre - half), 10 ** (centre + half)


def _clean(x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise FitError(f"{what}: x and y have different lengths ({x.size} vs {y.size})")
    if np.isnan(x).any() or np.isnan(y).any():
        raise FitError(
            f"{what}: {int(np.isnan(x).sum() + np.isnan(y).sum())} missing (NaN) values; score every "
            f"checkpoint first (`ditscale fid`) or drop those trials"
        )
    if (x <= 0).any() or (y <= 0).any():
        raise FitError(f"{what}: a power law needs positive values")
    if np.unique(x).size == 1 and x.size > 1:
        raise FitError(f"{what}: every point has the same x ({x[0]:g}); vary model size or patch size")
    if np.unique(x).size < 3:
        raise FitError(
            f"{what}: {np.unique(x).size} distinct points; a fit with an interval needs at least 3 presets "
            f"(replicates of one point do not count twice)"
        )
    return x, y


def clusters(x) -> np.ndarray:
    """The replicate group of each row: rows with the same x are seeds of one grid point."""
    return np.unique(np.asarray(x, dtype=float), return_inverse=True)[1]


def resample(groups: np.ndarray, rng: np.random.Generator, seeds_only: bool = False) -> np.ndarray:
    """Row indices of one bootstrap draw: grid points with replacement, each with all its replicates (seeds), as a
    cluster bootstrap draws them. `seeds_only` keeps the points and resamples the seeds within each."""
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    if seeds_only:
        return np.concatenate([rng.choice(m, m.size) for m in members])
    return np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])


def resample_counts(groups: np.ndarray, rng: np.random.Generator, draws: int, seeds_only: bool = False) -> np.ndarray:
    """(draws, rows): how often each row is drawn in each of `draws` bootstrap draws, as `resample` draws them."""
    point, size = np.unique(groups, return_inverse=True)[1], np.unique(groups).size  # each row's point; G
    if not seeds_only:
        return rng.multinomial(size, np.full(size, 1 / size), size=draws)[:, point].astype(float)  # (draws, rows)
    counts = np.zeros((draws, groups.size))
    for m in (np.flatnonzero(point == g) for g in range(size)):
        counts[:, m] = rng.multinomial(m.size, np.full(m.size, 1 / m.size), size=draws)
    return counts


def weighted_lines(lx: np.ndarray, ly: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(draws, 2): least squares (intercept, slope) of ly on lx for each row of `counts` (rows drawn that often);
    draws that hold fewer than 2 distinct x are left out."""
    per_x = counts @ (clusters(lx)[:, None] == np.arange(np.unique(lx).size)[None])  # (draws, distinct x)
    counts = counts[(per_x > 0).sum(axis=1) >= 2]
    total = counts.sum(axis=1, keepdims=True)
    mx, my = (counts * lx).sum(1, keepdims=True) / total, (counts * ly).sum(1, keepdims=True) / total
    slope = (counts * (lx - mx) * (ly - my)).sum(1) / (counts * (lx - mx) ** 2).sum(1)
    return np.column_stack([my[:, 0] - slope * mx[:, 0], slope])


def fit_power_law(x, y, bootstrap: int = 2000, seed: int = 0, what: str = "fit") -> tuple[PowerLaw, np.ndarray]:
    """Least squares of log10 y on log10 x; returns the fit and the bootstrap samples of (log10 a, b).

    Rows with equal x are replicates (seeds) of one grid point. The interval is the estimate +- t x the standard
    error of a cluster bootstrap (points with replacement, each with all its seeds), t from Student's t with
    (distinct points - 2) degrees of freedom: the former percentile interval (of a bootstrap over points, then seeds
    within each) covered 89% at 8 points (tests/analysis/test_fits.py measures this one). A second bootstrap over
    the seeds alone (points fixed) says how much of the interval is seed noise."""
    x, y = _clean(x, y, what)
    lx, ly = np.log10(x), np.log10(y)
    b, log_a = np.polyfit(lx, ly, 1)
    residual = ly - (log_a + b * lx)
    r2 = 1 - residual.var() / ly.var() if ly.var() > 0 else 1.0
    rng = np.random.default_rng(seed)
    groups = clusters(x)
    t = t_quantile(np.unique(x).size)
    samples = weighted_lines(lx, ly, resample_counts(groups, rng, bootstrap))
    sd_log_a, sd_b = samples.std(axis=0, ddof=1)
    seed_ci = None
    if np.bincount(groups).max() > 1:
        sd_seed = weighted_lines(lx, ly, resample_counts(groups, rng, bootstrap, seeds_only=True))[:, 1].std(ddof=1)
        seed_ci = (float(b - t * sd_seed), float(b + t * sd_seed))
    a_ci = (float(10 ** (log_a - t * sd_log_a)), float(10 ** (log_a + t * sd_log_a)))
    b_ci = (float(b - t * sd_b), float(b + t * sd_b))
    fit = PowerLaw(float(10**log_a), float(b), a_ci, b_ci, float(r2), int(x.size), seed_ci, t)
    return fit, samples


@dataclass(frozen=True)
class Correlation:
    pearson: float  # of y with log10 x
    pearson_p: float
    spearman: float
    n: int


def correlation(x, y, what: str = "correlation") -> Correlation:
    """Pearson correlation of y with log10 x (the paper's -0.93 for FID vs Gflops) and Spearman's rho."""
    x, y = _clean(x, y, what)
    if np.unique(y).size < 2:
        raise FitError(f"{what}: every point has the same y ({y[0]:g}); nothing to correlate")
    pearson = stats.pearsonr(np.log10(x), y)
    return Correlation(float(pearson.statistic), float(pearson.pvalue), float(stats.spearmanr(x, y).statistic), x.size)


def compute_frontier(compute, value) -> np.ndarray:
    """Indices of the points on the lower envelope of value vs compute (the best value at or below each budget)."""
    compute, value = np.asarray(compute, dtype=float), np.asarray(value, dtype=float)
    order = np.argsort(compute)
    frontier, best = [], np.inf
    for i in order:
        if value[i] < best:
            frontier.append(i)
            best = value[i]
    return np.array(frontier, dtype=int)
