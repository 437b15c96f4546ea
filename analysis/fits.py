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
    a_ci: tuple[float, float]  # 95% bootstrap interval
    b_ci: tuple[float, float]
    r2: float  # of the log-log line
    n: int

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
    if x.size < 3:
        raise FitError(f"{what}: {x.size} points; a fit with an interval needs at least 3 presets")
    if np.unique(x).size < 2:
        raise FitError(f"{what}: every point has the same x ({x[0]:g}); vary model size or patch size")
    return x, y


def fit_power_law(x, y, bootstrap: int = 2000, seed: int = 0, what: str = "fit") -> tuple[PowerLaw, np.ndarray]:
    """Least squares of log10 y on log10 x; returns the fit and the bootstrap samples of (log10 a, b)."""
    x, y = _clean(x, y, what)
    lx, ly = np.log10(x), np.log10(y)
    b, log_a = np.polyfit(lx, ly, 1)
    residual = ly - (log_a + b * lx)
    r2 = 1 - residual.var() / ly.var() if ly.var() > 0 else 1.0
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, x.size, x.size)
        if np.unique(lx[idx]).size < 2:
            continue
        bb, aa = np.polyfit(lx[idx], ly[idx], 1)
        samples.append((aa, bb))
    samples = np.array(samples)
    a_lo, a_hi = np.percentile(samples[:, 0], [2.5, 97.5])
    b_lo, b_hi = np.percentile(samples[:, 1], [2.5, 97.5])
    fit = PowerLaw(10**log_a, b, (10**a_lo, 10**a_hi), (b_lo, b_hi), float(r2), int(x.size))
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


def isoflop_optimum(params, compute, loss, min_points_per_budget: int = 3) -> list[tuple[float, float]]:
    """Liang et al.'s isoFLOP method: for each compute budget with enough models, fit loss as a parabola in
    log10(params) and return (budget, optimal params). Budgets with fewer points are skipped."""
    params, compute, loss = (np.asarray(v, dtype=float) for v in (params, compute, loss))
    out = []
    for budget in np.unique(np.round(np.log10(compute), 1)):
        mask = np.round(np.log10(compute), 1) == budget
        if mask.sum() < min_points_per_budget or np.unique(params[mask]).size < 3:
            continue
        c2, c1, _ = np.polyfit(np.log10(params[mask]), loss[mask], 2)
        if c2 <= 0:
            continue  # no minimum inside the range
        out.append((10**budget, 10 ** (-c1 / (2 * c2))))
    return out
