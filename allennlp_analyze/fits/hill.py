"""The Hill-type estimators of the LLM papers (AlphaPruning, Lu et al. 2024; TempBalance, Zhou et
al. 2023; AlphaDecay), as their ``net_esd_estimator`` computes ``PL_Alpha_Hill``:

    alpha = 1 + m / sum_{j >= i} ln(lambda_j / lambda_i),   m = N - i,

on the N eigenvalues sorted ascending, with the tail starting at index i (its first point, the
cutoff itself, contributes ln 1 = 0; the classic Hill estimator with k = m - 1 exceedances has k,
not m, in the numerator), and ``D = max_j |1 - (lambda_{i+j} / lambda_i)**(1 - alpha) - j / m|``.

* ``hill-mid`` (their ``xmin_mid`` / ``median``): i = floor(N / 2), the top half.
* ``hill-peak`` (their ``xmin_peak`` / ``fix-finger``): i searched, as CSN with point-wise
  empirical CDF, among the eigenvalues in WeightWatcher's peak range (:func:`.ww.peak_xmin_range`,
  computed as they do it: 100 bins between the smallest and largest log10 lambda).

They run on every positive eigenvalue (their default ``filter_zeros=False``; zeros, which their
``log`` would turn into -inf, are left out here).
"""

import numpy as np

from ..powerlaw_fit import fit_points
from .csn_fits import from_fit
from .estimate import Estimate, as_eigenvalues, failed, screen
from .ww import peak_xmin_range


def _positive(evals: np.ndarray):
    x = as_eigenvalues(evals)
    bad = screen(x)
    return x[x > 0], bad


def hill_mid(evals: np.ndarray) -> Estimate:
    """Tail = the top N - floor(N / 2) positive eigenvalues."""
    x, bad = _positive(evals)
    if bad:
        return failed(bad)
    return from_fit(fit_points(x, [x.size // 2]), "all_equal")


def hill_peak(evals: np.ndarray) -> Estimate:
    """Tail from the candidate in the ESD peak's range with the smallest point-wise KS D."""
    x, bad = _positive(evals)
    if bad:
        return failed(bad)
    lo, hi = peak_xmin_range(x)
    candidates = np.flatnonzero((x[:-1] >= lo) & (x[:-1] <= hi))
    return from_fit(fit_points(x, candidates), "no_candidate")
