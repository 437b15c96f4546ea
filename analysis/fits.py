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


@dataclass(frozen=True)
class PowerLaw:
    """y = a * x^b, fitted on log10 scale."""

    a: float
    b: float
    a_ci: tuple[float, float]  # 95% bootstrap interval (over points, and over each point's seeds when replicated)
    b_ci: tuple[float, float]
    r2: float  # of the log-log line
    n: int  # rows (points x seeds)
    b_seed_ci: tuple[float, float] | None = None  # the exponent's interval from seed noise alone (points fixed)

    @property
    def seed_share(self) -> float | None:
        """How much of the exponent's interval is seed noise: its width with only the seeds resampled, over its
        width with points and seeds resampled (None without replicates)."""
        if self.b_seed_ci is None or self.b_ci[1] == self.b_ci[0]:
            return None
        return float((self.b_seed_ci[1] - self.b_seed_ci[0]) / (self.b_ci[1] - self.b_ci[0]))

    def __call__(self, x):
        return self.a * np.asarray(x, dtype=float) ** self.b

    def band(self, x, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise 95% band of the fitted line from bootstrap (log a, b) samples."""
        logx = np.log10(np.asarray(x, dtype=float))
        lines = samples[:, :1] + samples[:, 1:2] * logx[None]  # (B, len(x))
        lo, hi = np.percentile(lines, [2.5, 97.5], axis=0)
        return 10**lo, 10**hi


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
    """Row indices of a hierarchical bootstrap draw: grid points with replacement, then within each drawn point its
    replicates (seeds) with replacement. `seeds_only` keeps the points and resamples only the seeds."""
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    chosen = members if seeds_only else [members[i] for i in rng.integers(0, len(members), len(members))]
    return np.concatenate([rng.choice(m, m.size) for m in chosen])


def fit_power_law(x, y, bootstrap: int = 2000, seed: int = 0, what: str = "fit") -> tuple[PowerLaw, np.ndarray]:
    """Least squares of log10 y on log10 x; returns the fit and the bootstrap samples of (log10 a, b).

    Rows with equal x are replicates (seeds) of one grid point: the bootstrap resamples points, then seeds within
    each point, and a second bootstrap over the seeds alone says how much of the interval is seed noise."""
    x, y = _clean(x, y, what)
    lx, ly = np.log10(x), np.log10(y)
    b, log_a = np.polyfit(lx, ly, 1)
    residual = ly - (log_a + b * lx)
    r2 = 1 - residual.var() / ly.var() if ly.var() > 0 else 1.0
    rng = np.random.default_rng(seed)
    groups = clusters(x)
    replicated = np.bincount(groups).max() > 1

    def draws(seeds_only: bool) -> np.ndarray:
        out = []
        for _ in range(bootstrap):
            idx = resample(groups, rng, seeds_only)
            if np.unique(lx[idx]).size < 2:
                continue
            bb, aa = np.polyfit(lx[idx], ly[idx], 1)
            out.append((aa, bb))
        return np.array(out)

    samples = draws(False)
    a_lo, a_hi = np.percentile(samples[:, 0], [2.5, 97.5])
    b_lo, b_hi = np.percentile(samples[:, 1], [2.5, 97.5])
    seed_ci = None
    if replicated:
        seed_ci = tuple(float(v) for v in np.percentile(draws(True)[:, 1], [2.5, 97.5]))
    fit = PowerLaw(10**log_a, b, (10**a_lo, 10**a_hi), (b_lo, b_hi), float(r2), int(x.size), seed_ci)
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
