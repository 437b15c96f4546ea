"""Scaling laws that predict: the saturating law L(C) = E + A C^-alpha, compute-optimal frontiers (Chinchilla's
approaches 2 and 3) and the held-out check.

    law = fit_saturating(compute, loss)               # L(C) = E + A * C^-alpha, bootstrap intervals of E, A, alpha
    frontier = isoflop_frontier(points)               # approach 2: a parabola in log N per budget -> N_opt ~ C^a
    surface = fit_parametric(params, tokens, loss)    # approach 3: L(N, D) = E + A / N^alpha + B / D^beta
    check = held_out(gflops, fid, holdout=1)          # fit without the largest model(s), predict them

Every fit refuses data that cannot support it with a FitError that says why (too few points, too few distinct
sizes, NaN, all-equal compute); a caller shows that message in place of a line. Rows with equal x are replicates
(seeds) of one grid point: bootstraps resample points, each with all its seeds (analysis.fits.resample). How often
each interval covers the truth is measured in tests/analysis and stated in docs/analysis.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize

from analysis.fits import FitError, PowerLaw, _clean, clusters, fit_power_law, resample, t_quantile

SAME_SIZE_DECADES = 0.05  # parameter counts within 12% are one model size (patch sizes change N by well under 1%)


def distinct_sizes(params) -> int:
    """How many model sizes `params` holds, counting counts within SAME_SIZE_DECADES of each other as one."""
    logn = np.sort(np.log10(np.asarray(params, dtype=float)))
    return int(1 + (np.diff(logn) > SAME_SIZE_DECADES).sum()) if logn.size else 0


# ---------------------------------------------------------------------------------------------------------------
# L(C) = E + A * C^-alpha
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaturatingLaw:
    """y = E + A * x^-alpha: a power law that levels off at the irreducible value E."""

    E: float
    A: float
    alpha: float
    E_ci: tuple[float, float]  # 95% bootstrap intervals
    A_ci: tuple[float, float]
    alpha_ci: tuple[float, float]
    n: int
    samples: np.ndarray  # bootstrap draws of (E, log10 A, alpha)
    alpha_seed_ci: tuple[float, float] | None = None  # alpha's interval from seed noise alone (None: one seed)
    t: float = 1.96  # the band's multiplier of its bootstrap standard error (t_quantile of the distinct points)

    @property
    def seed_share(self) -> float | None:
        """The width of alpha's seed-only interval over that of its full interval."""
        if self.alpha_seed_ci is None or self.alpha_ci[1] == self.alpha_ci[0]:
            return None
        return float((self.alpha_seed_ci[1] - self.alpha_seed_ci[0]) / (self.alpha_ci[1] - self.alpha_ci[0]))

    def __call__(self, x):
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha

    def band(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise 95% band of the law: log10 y +- t x its bootstrap standard error at each x (the percentiles of
        the bootstrap lines covered 86% at 8 budgets)."""
        x = np.asarray(x, dtype=float)
        lines = self.samples[:, :1] + 10 ** self.samples[:, 1:2] * x[None] ** -self.samples[:, 2:3]  # (B, len(x))
        centre, half = np.log10(self(x)), self.t * np.log10(lines).std(axis=0, ddof=1)
        return 10 ** (centre - half), 10 ** (centre + half)


def _saturating_once(lx: np.ndarray, ly: np.ndarray, x0: float, start: np.ndarray | None = None) -> np.ndarray:
    """(E, log10 A', alpha) minimising the squared log residuals of y = E + A' (x / x0)^-alpha (x in log10 units,
    lx = log10 x - log10 x0); several starts unless `start` is given."""
    y = 10**ly

    def residual(theta):
        log_e, log_a, alpha = theta
        return np.log10(10**log_e + 10 ** (log_a - alpha * lx)) - ly

    starts = [start] if start is not None else [
        np.array([np.log10(f * y.min()), np.log10(max(y.mean() - f * y.min(), 1e-12)), alpha])
        for f in (0.05, 0.5, 0.9) for alpha in (0.1, 0.4, 1.0)
    ]  # fmt: skip
    best = None
    for theta in starts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = optimize.least_squares(residual, theta, bounds=([-12, -12, 0.0], [12, 12, 4.0]))
        if best is None or result.cost < best.cost:
            best = result
    return best.x


def fit_saturating(x, y, bootstrap: int = 300, seed: int = 0, what: str = "L(C) = E + A C^-alpha") -> SaturatingLaw:
    """y = E + A x^-alpha by least squares on log y; percentile intervals of a bootstrap over the points (each with
    all its seeds), and a second one over the seeds alone for alpha's seed share."""
    x, y = _clean(x, y, what)
    if np.unique(x).size < 4:
        raise FitError(f"{what}: {np.unique(x).size} distinct points for 3 parameters; it needs at least 4")
    x0 = 10 ** np.log10(x).mean()  # conditioning: the fit sees x / x0
    lx, ly = np.log10(x / x0), np.log10(y)
    theta = _saturating_once(lx, ly, x0)
    rng, groups = np.random.default_rng(seed), clusters(x)

    def bootstrap_draws(seeds_only: bool) -> np.ndarray:
        out = []
        for _ in range(bootstrap):
            idx = resample(groups, rng, seeds_only)
            if np.unique(lx[idx]).size >= 3:
                out.append(_saturating_once(lx[idx], ly[idx], x0, start=theta))
        return np.array(out)

    draws = bootstrap_draws(False)
    seed_ci = None
    if np.bincount(groups).max() > 1:
        seed_ci = tuple(float(v) for v in np.percentile(bootstrap_draws(True)[:, 2], [2.5, 97.5]))
    # in the caller's units: A = A' x0^alpha
    samples = np.column_stack([10 ** draws[:, 0], draws[:, 1] + draws[:, 2] * np.log10(x0), draws[:, 2]])
    E, log_a, alpha = 10 ** theta[0], theta[1] + theta[2] * np.log10(x0), theta[2]
    ci = [tuple(float(v) for v in np.percentile(samples[:, k], [2.5, 97.5])) for k in range(3)]
    a_ci = (10 ** ci[1][0], 10 ** ci[1][1])
    t = t_quantile(np.unique(x).size, parameters=3)
    return SaturatingLaw(float(E), float(10**log_a), float(alpha), ci[0], a_ci, ci[2], int(x.size), samples, seed_ci, t)


# ---------------------------------------------------------------------------------------------------------------
# Compute-optimal frontiers: isoFLOP profiles (approach 2) and the parametric surface (approach 3)
# ---------------------------------------------------------------------------------------------------------------


def count_sizes(rows: pd.DataFrame) -> int:
    """Model sizes among `rows`: their `size` names where known (patch sizes of one width are one size), else
    their parameter counts (distinct_sizes)."""
    return int(rows["size"].nunique()) if "size" in rows else distinct_sizes(rows["params"])


def isoflop_points(curves: pd.DataFrame, num_budgets: int = 8, value: str = "loss") -> pd.DataFrame:
    """Each model's `value` read off its curve (log-interpolated in compute) at shared compute budgets: rows of
    label, seed, params, budget. `curves` holds label, seed, params, compute_flops and `value` per logged step."""
    curves = curves[np.isfinite(curves[value]) & (curves["compute_flops"] > 0)]
    if curves.empty or curves["compute_flops"].nunique() < 2:
        return pd.DataFrame(columns=["label", "seed", "params", "budget", value])
    budgets = np.geomspace(curves["compute_flops"].min(), curves["compute_flops"].max(), num_budgets)
    rows = []
    for (label, seed), run in curves.groupby(["label", "seed"]):
        run = run.sort_values("compute_flops")
        logc = np.log10(run["compute_flops"].to_numpy())
        size = run["size"].iloc[0] if "size" in run else None
        for budget in budgets:
            if logc[0] <= np.log10(budget) <= logc[-1]:
                rows.append({"label": label, "seed": seed, "params": float(run["params"].iloc[0]), "budget": budget,
                             value: float(np.interp(np.log10(budget), logc, run[value].to_numpy()))}
                            | ({"size": size} if size is not None else {}))  # fmt: skip
    return pd.DataFrame(rows)


def _size_codes(points: pd.DataFrame) -> np.ndarray:
    """Each row's model size as an integer: its `size` name where known, else its parameter count (counts within
    SAME_SIZE_DECADES of each other are one size, as distinct_sizes counts them)."""
    if "size" in points:
        return pd.factorize(points["size"])[0]
    logn = np.log10(points["params"].to_numpy(dtype=float))
    levels = np.unique(logn)
    return np.searchsorted(levels[1:][np.diff(levels) > SAME_SIZE_DECADES], logn, side="right")


def _optima(budget, logn, size, value, min_sizes: int) -> list[tuple[float, float]]:
    """isoflop_optima on arrays (one entry per point)."""
    optima = []
    for b in np.unique(budget):
        at = budget == b
        if np.unique(size[at]).size < min_sizes:
            continue
        c2, c1, _ = np.polyfit(logn[at], value[at], 2)
        if c2 <= 0:
            continue  # no minimum
        vertex = -c1 / (2 * c2)
        if logn[at].min() <= vertex <= logn[at].max():
            optima.append((float(b), float(10**vertex)))
    return optima


def isoflop_optima(points: pd.DataFrame, value: str = "loss", min_sizes: int = 3) -> list[tuple[float, float]]:
    """(budget, N_opt) for every budget whose parabola in log10 N has its minimum inside the sizes it saw."""
    if points.empty:
        return []
    columns = points["budget"].to_numpy(dtype=float), np.log10(points["params"].to_numpy(dtype=float))
    return _optima(*columns, _size_codes(points), points[value].to_numpy(dtype=float), min_sizes)


@dataclass(frozen=True)
class Frontier:
    """Compute-optimal model size N_opt(C) ~ C^a and data D_opt(C) = C / (6 N_opt) ~ C^b (b = 1 - a)."""

    optima: list[tuple[float, float]]  # (budget FLOPs, N_opt)
    a: float
    a_ci: tuple[float, float]
    b: float
    b_ci: tuple[float, float]
    fit: PowerLaw  # N_opt against C

    def n_opt(self, compute):
        return self.fit(compute)

    def d_opt(self, compute):
        return np.asarray(compute, dtype=float) / (6 * self.n_opt(compute))


def isoflop_frontier(
    points: pd.DataFrame, value: str = "loss", min_sizes: int = 3, bootstrap: int = 300, seed: int = 0
) -> Frontier:
    """Chinchilla's approach 2 (Liang et al. for DiTs): at each compute budget a parabola in log N over the models'
    `value`; its vertex is N_opt(C); N_opt ~ C^a by least squares in log-log. The interval resamples the models
    (each with all its seeds) and redoes every parabola; like the fit, a draw needs 3 budgets with an inside minimum."""
    if points.empty:
        raise FitError("isoFLOP profiles: no compute budget is reached by any model's curve")
    optima = isoflop_optima(points, value, min_sizes)
    if len(optima) < 3:
        sizes = max(count_sizes(rows) for _, rows in points.groupby("budget"))
        raise FitError(
            f"isoFLOP profiles: {len(optima)} compute budget(s) with a minimum inside the sizes trained (at most "
            f"{sizes} distinct sizes share a budget); N_opt(C) needs 3 budgets, each reached by {min_sizes}+ sizes "
            f"with the best one neither the smallest nor the largest: train sizes on both sides of the optimum"
        )
    c, n = np.array(optima).T
    fit, _ = fit_power_law(c, n, bootstrap=200, seed=seed, what="N_opt vs C")
    rng, exponents = np.random.default_rng(seed), []
    by_model = points.groupby(["label", "seed"], sort=False)
    row_model, labels = by_model.ngroup().to_numpy(), by_model["label"].first().to_numpy()  # models in one order
    model_groups = clusters(pd.factorize(labels)[0])  # a model's seeds are drawn together
    rows_of = [np.flatnonzero(row_model == m) for m in range(labels.size)]
    columns = (points["budget"].to_numpy(dtype=float), np.log10(points["params"].to_numpy(dtype=float)),
               _size_codes(points), points[value].to_numpy(dtype=float))  # fmt: skip
    for _ in range(bootstrap):
        idx = np.concatenate([rows_of[m] for m in resample(model_groups, rng)])
        found = _optima(*(column[idx] for column in columns), min_sizes)
        if len(found) >= 3:  # as the fit itself needs: a draw with two budgets gives a noisy, skewed slope
            bc, bn = np.log10(np.array(found)).T
            exponents.append(np.polyfit(bc, bn, 1)[0])
    a_ci = tuple(float(v) for v in np.percentile(exponents, [2.5, 97.5])) if len(exponents) > 10 else fit.b_ci
    return Frontier(optima, float(fit.b), a_ci, float(1 - fit.b), (1 - a_ci[1], 1 - a_ci[0]), fit)


@dataclass(frozen=True)
class Parametric:
    """L(N, D) = E + A / N^alpha + B / D^beta (Chinchilla's approach 3), with N_opt ~ C^(beta / (alpha + beta))."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    ci: dict[str, tuple[float, float]]
    n: int

    def __call__(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)


def _parametric_once(logn, logd, ly, starts) -> np.ndarray:
    def residual(theta):
        e, a, alpha, b, beta = theta
        return np.log(np.exp(e) + np.exp(a - alpha * logn) + np.exp(b - beta * logd)) - ly

    best = None
    for theta in starts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = optimize.least_squares(
                residual, theta, loss="huber", f_scale=1e-3, bounds=([-20, -20, 0, -20, 0], [20, 40, 3, 40, 3])
            )
        if best is None or result.cost < best.cost:
            best = result
    return best.x


def fit_parametric(N, D, L, bootstrap: int = 100, seed: int = 0, sizes=None) -> Parametric:
    """Approach 3 by Huber regression (delta 1e-3) on log L from a grid of starts, as Chinchilla fits it; the interval
    resamples model sizes (with all their points). Needs 3+ model sizes (`sizes`: their names, else counted from N),
    3+ distinct D and 8+ points."""
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    size_count = len(set(sizes)) if sizes is not None else distinct_sizes(N)
    what = "L(N, D) = E + A/N^alpha + B/D^beta"
    if not (np.isfinite(N).all() and np.isfinite(D).all() and np.isfinite(L).all()) or (L <= 0).any():
        raise FitError(f"{what}: missing (NaN) or non-positive losses; drop the failed trials")
    if size_count < 3 or np.unique(D).size < 3 or N.size < 8:
        raise FitError(
            f"{what}: {size_count} model sizes, {np.unique(D).size} data sizes and {N.size} points; the "
            f"surface needs 3+ sizes trained on 3+ amounts of data (8+ points): add sizes, or train.steps as a "
            f"grid axis, or log the loss more often"
        )
    n0, d0 = np.exp(np.log(N).mean()), np.exp(np.log(D).mean())  # conditioning
    logn, logd, ly = np.log(N / n0), np.log(D / d0), np.log(L)
    starts = [np.array([np.log(f * L.min()), np.log(max(L.mean() - f * L.min(), 1e-9) / 2), al,
                        np.log(max(L.mean() - f * L.min(), 1e-9) / 2), be])
              for f in (0.3, 0.8) for al in (0.2, 0.6) for be in (0.2, 0.6)]  # fmt: skip
    theta = _parametric_once(logn, logd, ly, starts)

    def natural(t):  # A' / (N / n0)^alpha = (A' n0^alpha) / N^alpha
        e, a, alpha, b, beta = t
        return np.array([np.exp(e), np.exp(a) * n0**alpha, alpha, np.exp(b) * d0**beta, beta])

    rng, groups, draws = np.random.default_rng(seed), clusters(N), []
    for _ in range(bootstrap):
        idx = resample(groups, rng)
        if np.unique(N[idx]).size >= 2:
            draws.append(natural(_parametric_once(logn[idx], logd[idx], ly[idx], [theta])))
    draws = np.array(draws)
    names = ["E", "A", "alpha", "B", "beta"]
    ci = {k: tuple(float(v) for v in np.percentile(draws[:, i], [2.5, 97.5])) for i, k in enumerate(names)}
    exps = draws[:, 4] / (draws[:, 2] + draws[:, 4])
    ci["a"] = tuple(float(v) for v in np.percentile(exps, [2.5, 97.5]))
    values = natural(theta)
    return Parametric(*(float(v) for v in values), ci=ci, n=int(N.size))


# ---------------------------------------------------------------------------------------------------------------
# The held-out check
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    """A power law fitted without the largest model(s), and what it predicts for them."""

    fit: PowerLaw
    x: list[float]  # the held-out x values
    predicted: list[float]
    interval: list[tuple[float, float]]  # 95% prediction interval (fit uncertainty and the residual scatter)
    measured: list[float]  # mean over the held-out point's replicates

    @property
    def errors(self) -> list[float]:
        """(predicted - measured) / measured."""
        return [(p - m) / m for p, m in zip(self.predicted, self.measured)]

    @property
    def inside(self) -> list[bool]:
        return [lo <= m <= hi for (lo, hi), m in zip(self.interval, self.measured)]


def held_out(x, y, holdout: int = 1, bootstrap: int = 2000, seed: int = 0, what: str = "held-out") -> HeldOut:
    """Fit y = a x^b on all but the `holdout` largest distinct x, predict those. The 95% prediction interval of a
    held-out point's mean (over its seeds) is log10 of the prediction +- t x sqrt(se^2 + s^2): se the bootstrap
    standard error of the fitted line there, s^2 the scatter of the fitted points' means about the line (with
    points - 2 degrees of freedom), t as in fit_power_law."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    distinct = np.unique(x)
    if holdout < 1 or distinct.size - holdout < 3:
        raise FitError(
            f"{what}: {distinct.size} distinct points; holding out {holdout} leaves {distinct.size - holdout}, "
            f"and a fit with an interval needs 3"
        )
    cut = distinct[-holdout]
    train = x < cut
    fit, samples = fit_power_law(x[train], y[train], bootstrap=bootstrap, seed=seed, what=f"{what} (the fit)")
    fitted = distinct[distinct < cut]
    means = np.array([np.mean(y[x == value]) for value in fitted])
    scatter = np.sum((np.log10(means) - np.log10(fit(fitted))) ** 2) / (fitted.size - 2)  # s^2, log10 units
    held = distinct[distinct >= cut]
    predicted, interval, measured = [], [], []
    for value in held:
        se = np.std(samples[:, 0] + samples[:, 1] * np.log10(value), ddof=1)
        centre, half = np.log10(fit(value)), fit.t * np.sqrt(se**2 + scatter)
        predicted.append(float(fit(value)))
        interval.append((float(10 ** (centre - half)), float(10 ** (centre + half))))
        measured.append(float(np.mean(y[x == value])))
    return HeldOut(fit, [float(v) for v in held], predicted, interval, measured)
