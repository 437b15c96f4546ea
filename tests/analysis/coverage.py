"""Checks of an interval method over many data sets simulated from a known law: its coverage lies within a binomial
tolerance of the nominal level, and its median width is bounded by a stated multiple of an oracle's, so that an
interval of (-inf, inf) fails as surely as one that misses the truth."""

import numpy as np

from analysis.fits import LEVEL

Z = 1.959963984540054  # the normal quantile at 97.5%: an oracle knows the noise, so it needs no t


def assert_coverage(covered, what: str, nominal: float = LEVEL) -> float:
    """`covered`: per simulated data set, whether the interval held the truth. Fails when the count lies more than 3
    standard deviations of a Binomial(n, nominal) from n x nominal (above it: an interval wider than it claims; that
    side bites from about 170 data sets on). Returns the observed coverage."""
    n, k = len(covered), int(np.sum(covered))
    sd = np.sqrt(n * nominal * (1 - nominal))
    low, high = n * nominal - 3 * sd, n * nominal + 3 * sd
    assert k >= low, (
        f"{what}: covered the truth {k}/{n} times ({k / n:.1%}), under {nominal:.0%} - 3 sd ({low / n:.1%})"
    )
    assert k <= high, f"{what}: covered {k}/{n} ({k / n:.1%}), over {nominal:.0%} + 3 sd ({high / n:.1%})"
    return k / n


def assert_width(widths, oracle: float, at_most: float, what: str) -> float:
    """The median width is positive, finite and at most `at_most` x `oracle`; returns the median over the oracle."""
    ratio = float(np.median(widths)) / oracle
    assert 0 < ratio <= at_most, f"{what}: median width {ratio:.2f} x the oracle's, more than {at_most} x"
    return ratio


def line_oracle(log_x, sigma: float, at=None) -> float:
    """Width of the 95% interval of a least-squares line's slope (or, `at` a log10 x, of its value there) in log10
    units, known the noise sigma of log y (natural log units, one value per distinct x) and the design log_x."""
    log_x = np.asarray(log_x, dtype=float)
    sxx = ((log_x - log_x.mean()) ** 2).sum()
    se = sigma / np.sqrt(sxx) if at is None else sigma * np.sqrt(1 / log_x.size + (at - log_x.mean()) ** 2 / sxx)
    return 2 * Z * se / np.log(10)


def spread_oracle(estimates) -> float:
    """Width of the 95% interval an estimator would have if it knew its own sampling spread: 2 z x the standard
    deviation of its estimates over the simulated data sets (for the nonlinear laws, which have no closed form)."""
    return 2 * Z * float(np.std(estimates, ddof=1))
