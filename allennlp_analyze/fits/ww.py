"""WeightWatcher 0.7.7's alpha variants, reproduced on the same eigenvalues (numpy only):
``xmin-peak`` (``analyze(fix_fingers='xmin_peak', pl_package='powerlaw')``), ``clip-xmax``
(``fix_fingers='clip_xmax'``) and ``detx`` (``detX=True``). The power-law fits inside are
``powerlaw`` 1.5's (:func:`..powerlaw_fit.fit_power_law`).

WeightWatcher's eigenvalues are the squared singular values of the layer's float64 weights, not
normalized (``combined_eigenvalues``: ``evals = sv * sv``; its ``normalize`` branch is commented
out), so these functions take lambda = sv**2 in the weights' units squared. Its fits see only
``evals > EVALS_THRESH`` (1e-5, absolute); ``detx`` sees every eigenvalue.
"""

import numpy as np

from ..powerlaw_fit import fit_at_xmin, fit_power_law
from .csn_fits import from_fit
from .estimate import ClippedEstimate, DetXEstimate, Estimate, as_eigenvalues, failed, screen

#: WeightWatcher's ``constants.EVALS_THRESH``: eigenvalues at or below it are left out of fits.
EVALS_THRESH = 1e-5
#: ``fit_powerlaw``'s histogram of log10(lambda) for the peak (``num_bins = 100``).
PEAK_BINS = 100
#: ``fit_clipped_powerlaw``'s defaults: ``max_fingers`` (``DEFAULT_MAX_FINGERS``), the alpha drop
#: that marks a finger (``DEFAULT_FINGER_THRESH``) and the alpha at which it gives up.
MAX_FINGERS = 10
FINGER_THRESH = 1.0
MIN_ALPHA = 2.0
#: Slack on a cumulative log-product before the exact product decides (detx).
_LOG_SLACK = 1e-9


def _fitted(evals: np.ndarray) -> np.ndarray:
    return evals[evals > EVALS_THRESH]


def peak_xmin_range(nz: np.ndarray):
    """WeightWatcher's xmin search range for ``xmin_peak``: with ``x2 = 10**e``, ``e`` the left
    edge of the fullest of 100 equal bins of log10(lambda) (the first on ties), the range
    ``(log10(0.95 x2), 1.5 x2)``. (The lower end is a log10 although the upper end is not, as in
    its source: in effect every eigenvalue above log10(0.95 x2) up to 1.5 x2 is a candidate.)"""
    counts, edges = np.histogram(np.log10(nz), bins=PEAK_BINS)
    x2 = 10 ** edges[int(np.argmax(counts))]
    return float(np.log10(0.95 * x2)), float(1.5 * x2)


def xmin_peak(evals: np.ndarray) -> Estimate:
    """CSN fit with xmin searched only in :func:`peak_xmin_range` (candidates: the distinct
    eigenvalues in that range but its largest, as ``powerlaw.Fit(data, xmin=(lo, hi))``)."""
    nz = _fitted(as_eigenvalues(evals))
    bad = screen(as_eigenvalues(evals)) or screen(nz)
    if bad:
        return failed(bad)
    return from_fit(fit_power_law(nz, xmin_range=peak_xmin_range(nz)), "no_candidate")


def clip_xmax(evals: np.ndarray) -> ClippedEstimate:
    """``fit_clipped_powerlaw``: fit all; then, for k = 2, ..., 9, fit without the k largest
    eigenvalues; the first such fit whose alpha is more than 1 below the first fit's is kept
    (WeightWatcher reports k - 1 fingers), and the search stops early once an alpha is <= 2.
    Without such a drop the first fit stands (0 fingers)."""
    x = as_eigenvalues(evals)
    nz = _fitted(x)
    bad = screen(x) or screen(nz)
    if bad:
        return failed(bad, ClippedEstimate)
    first = fit_power_law(nz)
    if first is None:  # (screen() leaves two distinct values: not reached)
        return failed("too_few", ClippedEstimate)
    best, fingers = first, 0
    for k in range(2, MAX_FINGERS):
        fit = fit_power_law(nz[:-k]) if nz.size > k else None
        alpha = np.nan if fit is None else fit.alpha  # powerlaw returns nan: no test passes
        if fit is not None and alpha + FINGER_THRESH < first.alpha:
            best, fingers = fit, k - 1
            break
        if alpha <= MIN_ALPHA:
            break
    return ClippedEstimate(
        status="ok",
        alpha=best.alpha,
        xmin=best.xmin,
        D=best.D,
        num_tail=best.num_tail,
        num_fingers=fingers,
        raw_alpha=first.alpha,
    )


def detx(evals: np.ndarray) -> DetXEstimate:
    """``detX_constraint``: rescale all eigenvalues by ``s = N / sum(lambda)`` (mean 1); going
    down from the largest, the first index i >= 1 where ``prod(s lambda[i:]) < 1`` gives
    ``detx_num = N - i`` and ``detx_val = lambda[i]`` (WeightWatcher's ``(s lambda[i]) / s``).
    Where no product drops below 1 it reports ``N`` and ``lambda[1]``, as WeightWatcher does.
    Needs two distinct positive eigenvalues (else the status says why; WeightWatcher reports 0).
    The power law is then fitted with xmin fixed at ``lambda[i]`` (``powerlaw.Fit(positive,
    xmin=lambda[i])``; no alpha where that tail has fewer than 2 distinct values)."""
    x = as_eigenvalues(evals)
    bad = screen(x)
    if bad:
        return failed(bad, DetXEstimate)
    n = x.size
    wscale = np.sqrt(n) / np.sqrt(np.sum(x))
    scaled = (wscale * wscale) * x
    idx, num = _first_product_below_one(scaled)
    if idx is None:
        idx, num = 1, n
    val = float((scaled / (wscale * wscale))[idx])
    fit = fit_at_xmin(x[x > 0], float(x[idx])) if x[idx] > 0 else None
    est = from_fit(fit)
    return DetXEstimate(
        status="ok",
        alpha=est.alpha,
        xmin=est.xmin,
        D=est.D,
        num_tail=est.num_tail,
        detx_num=num,
        detx_val=val,
    )


def _first_product_below_one(scaled: np.ndarray):
    """(i, N - i) for the largest i in [1, N) with ``np.prod(scaled[i:]) < 1`` (WeightWatcher's
    loop), or (None, None). Cumulative log sums find the candidates; the product itself (as
    WeightWatcher evaluates it) decides wherever the log sum is within round-off of 0."""
    with np.errstate(divide="ignore"):
        logs = np.log(scaled)
    tail_logs = np.cumsum(logs[::-1])[::-1]  # tail_logs[i] = sum of logs[i:]
    maybe = np.flatnonzero(tail_logs[1:] < _LOG_SLACK) + 1
    for i in maybe[::-1]:
        if tail_logs[i] < -_LOG_SLACK or np.prod(scaled[i:]) < 1.0:
            return int(i), int(scaled.size - i)
    return None, None
