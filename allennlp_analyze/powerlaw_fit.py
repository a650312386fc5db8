"""Clauset–Shalizi–Newman (CSN) fit of a continuous power law to a sample, exact and vectorized.

For each candidate lower cutoff ``xmin = u_k`` (every distinct value of the sample but the largest)
the tail ``x >= u_k`` gets the closed-form maximum-likelihood exponent

    alpha_k = 1 + n_k / sum(ln(x_i / u_k)),

and the Kolmogorov–Smirnov distance between the tail's empirical CDF and the fitted one,

    D_k = max over distinct u_j >= u_k of | T_kj - E_kj |,
    T_kj = 1 - (u_j / u_k) ** (1 - alpha_k)   [ / (1 - (xmax / u_k) ** (1 - alpha_k)) with xmax ],
    E_kj = (F_j - F_k) / (1 - F_k),  F_j = fraction of the sample strictly below u_j.

The fit is the candidate with the smallest D (the first one on ties). These are exactly the
semantics of ``powerlaw==1.5``'s ``Fit(data, xmax=...)`` for continuous, positive data. With
``xmax`` that package maximizes its likelihood by Nelder–Mead started at the closed form; its
likelihood keeps the untruncated normalizer, whose exact maximizer *is* the closed form, so it
mostly returns the closed form too; where its float arithmetic overflows or rounds (typically
a few top candidates with large alpha) it does not, and :mod:`._bounded_fit` reproduces its
Nelder–Mead for exactly those. (``powerlaw`` 2.x differs: it caps alpha at 3.)

Cost: alphas for all candidates come from one reverse cumulative sum of logs; D for all candidates
from broadcasting on a grid of tail points, which bounds every D_k from below; candidates whose
bound exceeds an exactly evaluated D are dropped, and the grid is refined for the rest.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import numpy.typing as npt

from ._bounded_fit import bounded_alphas

#: Entries of one broadcast block (rows x columns) in the exact KS pass: 2**20 float64 = 8 MiB.
_BLOCK = 1 << 20
#: Grid points per candidate's tail for the KS bounds (evenly spaced in rank over the tail).
_GRID = 16
#: Slack added to the best exact D before pruning (absorbs round-off; keeps near-ties exact).
_SLACK = 1e-12


@dataclass(frozen=True)
class PowerLawFit:
    """A CSN fit. ``alpha``: exponent of the density p(x) ~ x**-alpha (x >= xmin);
    ``xmin``: chosen lower cutoff (same units as the data); ``xmax``: the upper bound used, or
    ``None`` for the untruncated fit; ``D``: KS distance of the tail, in [0, 1];
    ``num_tail``: sample points >= xmin (as ``powerlaw``'s ``n_tail``, points above xmax
    included); ``num_candidates``: number of xmin candidates (in ``xmin_range`` where given)."""

    alpha: float
    xmin: float
    xmax: Optional[float]
    D: float
    num_tail: int
    num_candidates: int


def fit_power_law(
    values: np.ndarray,
    xmax: Optional[float] = None,
    xmin_range: Optional[Tuple[float, float]] = None,
) -> Optional[PowerLawFit]:
    """Fit a continuous power law to positive, finite ``values`` (any order, 1-D).

    ``xmax``: optional upper bound (e.g. the largest value); values above it are left out of the
    fit as in ``powerlaw``. ``xmin_range``: ``(lo, hi)`` restricts the xmin candidates as
    ``powerlaw``'s ``Fit(values, xmin=(lo, hi))`` does: the distinct values v with
    ``min(lo, hi) <= v <= max(lo, hi)``, the largest of them dropped (every tail keeps all the
    values above its xmin). Returns ``None`` when fewer than two distinct values remain, where no
    tail with two points exists, or when no candidate lies in ``xmin_range``. Raises
    ``ValueError`` on non-positive or non-finite values.
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size and not (np.isfinite(x).all() and x[0] > 0):
        raise ValueError("power-law fit needs positive, finite values")
    n_above = 0
    if xmax is not None:
        xmax = float(xmax)
        keep = int(np.searchsorted(x, xmax, side="right"))
        n_above = x.size - keep
        x = x[:keep]
    first = np.flatnonzero(np.r_[True, x[1:] != x[:-1]]) if x.size else np.zeros(0, np.intp)
    u = x[first]  # distinct values, ascending; first[j] = number of points below u[j]
    if u.size < 2:
        return None
    n = x.size
    cand_first = first[:-1]
    # Logs relative to the largest value, accurate to a few ulps of themselves (see _log_ratio):
    # every log difference below then carries an error small against the tail's own spread.
    y = _log_ratio(x, x[-1])
    alphas = _candidate_alphas(y, cand_first)
    exact: Dict[int, float] = {}
    rows = None
    if xmax is not None:
        # powerlaw 1.5 fits bounded tails by Nelder-Mead from the closed form, which leaves it
        # where the likelihood overflows or rounds; those candidates get its result (exactly).
        alphas, exact = bounded_alphas(x, u, cand_first, alphas)
        valid = alphas > 1.0  # powerlaw's in_range(); it ignores the others if any is valid
        if exact and valid.any() and not valid.all():
            rows = np.flatnonzero(valid)
    num_candidates = u.size - 1
    if xmin_range is not None:
        lo, hi = min(xmin_range), max(xmin_range)
        inside = np.flatnonzero((u >= lo) & (u <= hi))[:-1]
        num_candidates = inside.size
        rows = inside if rows is None else np.intersect1d(rows, inside)
        if rows.size == 0:
            return None
    lu = y[first]
    log_xmax = None if xmax is None else float(_log_ratio(np.array([xmax]), x[-1])[0])
    best = _argmin_ks(lu, first, n, alphas, log_xmax, rows)
    xmin = float(u[best])
    tail = x[cand_first[best] :]
    # The winner's alpha and D once more, directly (no cumulative sums), in powerlaw's own
    # arithmetic (logs and powers of ratios to xmin), so that they agree with it to round-off
    # even where a tail spans only a few ulps and that arithmetic is itself inexact.
    alpha = exact.get(best)
    if alpha is None:
        alpha = 1.0 + tail.size / np.sum(np.log(tail / xmin))
    D = _ks_direct(u[best:], first[best:], n, alpha, xmax)
    return PowerLawFit(
        alpha=float(alpha),
        xmin=xmin,
        xmax=xmax,
        D=D,
        num_tail=int(tail.size + n_above),
        num_candidates=int(num_candidates),
    )


def fit_at_xmin(values: np.ndarray, xmin: float) -> Optional[PowerLawFit]:
    """The power law with a fixed lower cutoff, as ``powerlaw`` 1.5's ``Fit(values, xmin=xmin)``:
    the closed-form exponent of the values ``>= xmin`` and the KS distance of that tail (empirical
    CDF on the distinct values). ``None`` when fewer than two distinct values are ``>= xmin``."""
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size and not (np.isfinite(x).all() and x[0] > 0):
        raise ValueError("power-law fit needs positive, finite values")
    tail = x[int(np.searchsorted(x, xmin, side="left")) :]
    if tail.size < 2 or tail[0] == tail[-1]:
        return None
    first = np.flatnonzero(np.r_[True, tail[1:] != tail[:-1]])
    alpha = 1.0 + tail.size / np.sum(_tail_logs(tail, xmin))
    # the empirical CDF restarts at xmin: points below it are not part of the tail's sample
    D = _ks_direct(
        np.r_[float(xmin), tail[first]] if tail[0] != xmin else tail[first],
        np.r_[0, first] if tail[0] != xmin else first,
        tail.size,
        alpha,
        None,
    )
    return PowerLawFit(
        alpha=float(alpha),
        xmin=float(xmin),
        xmax=None,
        D=D,
        num_tail=int(tail.size),
        num_candidates=1,
    )


def _tail_logs(tail: np.ndarray, xmin: float) -> np.ndarray:
    """``log(tail / xmin)`` as ``powerlaw`` computes it, or by :func:`_log_ratio` where a ratio
    leaves float64's range (a subnormal xmin)."""
    with np.errstate(over="ignore"):
        ratio = tail / xmin
    return np.log(ratio) if np.isfinite(ratio[-1]) else _log_ratio(tail, xmin)


def _log_ratio(x: np.ndarray, ref: float) -> np.ndarray:
    """``log(x / ref)`` for positive ``x`` and ``ref``, with a relative error of a few ulps even
    where x is within rounding of ref. (``log(x) - log(ref)`` has an absolute error of about
    ``eps * |log x|``, which for x ~ 1e6 exceeds the whole log-spread of a tail whose values
    agree to 1e-15, and makes alpha infinite or D wrong there; ``powerlaw`` takes logs of
    ratios, which are exact for neighbouring values.)"""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(under="ignore", over="ignore"):
        d = (x - ref) / ref  # x - ref is exact for ref / 2 <= x <= 2 ref (Sterbenz)
        near = np.abs(d) <= 0.5
        far = x[~near]
        q = far / ref
    out = np.empty_like(x)
    out[near] = np.log1p(d[near])
    # ratio representable: one rounding, then the log; else the difference of logs
    ok = (q >= np.finfo(np.float64).tiny) & (q <= np.finfo(np.float64).max)
    out[~near] = np.where(ok, np.log(np.where(ok, q, 1.0)), np.log(far) - np.log(ref))
    return out


def _candidate_alphas(y: np.ndarray, cand_first: np.ndarray) -> np.ndarray:
    """MLE alpha of the tail starting at each candidate's first index, from ``y``, the logs of
    the sorted sample relative to its largest value (:func:`_log_ratio`).

    Every tail holds the largest value (y = 0), so its log-ratio sum is at least ``|y_k|``,
    while each term's error is a few ulps of ``|y_k|``: the cumulative sums lose nothing."""
    tail_sums = np.cumsum(y[::-1])[::-1]  # tail_sums[i] = sum of y[i:]
    n_tail = y.size - cand_first
    log_ratio_sums = tail_sums[cand_first] - n_tail * y[cand_first]
    return 1.0 + n_tail / log_ratio_sums


def _deviations(
    lu: np.ndarray,
    first: np.ndarray,
    n: int,
    alphas: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    log_xmax: Optional[float],
):
    """Fitted CDF ``T`` and empirical CDF ``E`` of the tails of candidates ``rows`` (indices into
    the distinct values, whose logs are ``lu``) at the distinct values ``cols`` (2-D, one row per
    candidate, or 1-D shared); both (len(rows), columns). One formula serves the bounds and the
    exact pass, so a bound and the exact value agree bit for bit where they meet."""
    lu_rows = lu[rows][:, None]
    expo = (1.0 - alphas)[:, None]
    theory = 1.0 - np.exp(expo * (lu[cols] - lu_rows))
    if log_xmax is not None:
        theory /= 1.0 - np.exp(expo * (log_xmax - lu_rows))
    f_rows = first[rows][:, None].astype(np.float64)
    empirical = (first[cols] - f_rows) / (n - f_rows)
    return theory, empirical


def _ks_exact(
    lu: np.ndarray, first: np.ndarray, n: int, alpha: float, row: int, log_xmax: Optional[float]
) -> float:
    """KS distance of one candidate's tail: the largest deviation over every point of it."""
    theory, empirical = _deviations(
        lu, first, n, np.array([alpha]), np.array([row]), np.arange(row, lu.size), log_xmax
    )
    return float(np.abs(theory - empirical).max())


def _ks_direct(
    u: np.ndarray, first: np.ndarray, n: int, alpha: float, xmax: Optional[float]
) -> float:
    """KS distance of the tail whose distinct values are ``u`` (``u[0]`` = xmin; ``first``: points
    below each), with the fitted CDF written as ``powerlaw`` 1.5 evaluates it."""
    with np.errstate(over="ignore", under="ignore"):  # (huge ratio) ** (negative) -> 0
        theory = 1.0 - (u / u[0]) ** (1.0 - alpha)
        if xmax is not None:
            theory /= 1.0 - (1.0 - (1.0 - (xmax / u[0]) ** (1.0 - alpha)))
    f = first / float(n)
    empirical = (f - f[0]) / (1.0 - f[0])
    return float(np.abs(theory - empirical).max())


def _argmin_ks(
    lu: np.ndarray,
    first: np.ndarray,
    n: int,
    alphas: np.ndarray,
    log_xmax: Optional[float],
    rows: Optional[np.ndarray] = None,
) -> int:
    """Index of the candidate with the smallest KS distance (first on ties), exactly.

    A candidate's largest deviation on a grid of its tail points is a lower bound on its D.
    The candidate with the smallest bound is evaluated exactly; every candidate whose bound
    exceeds the best exact D seen can neither win nor tie, and is dropped. The grid is refined
    (8x) for the survivors until it holds every point of their tails, where the bound is D.
    """
    m = lu.size
    rows = np.arange(m - 1) if rows is None else rows  # candidates considered (ascending)
    points, best_d = _GRID, np.inf
    while True:
        points = min(points, m - 1)
        lower = _grid_lower_bounds(lu, first, n, alphas[rows], rows, points, log_xmax)
        probe = int(np.argmin(lower))
        best_d = min(best_d, _ks_exact(lu, first, n, alphas[rows[probe]], rows[probe], log_xmax))
        keep = lower <= best_d + _SLACK
        rows, lower = rows[keep], lower[keep]
        if points == m - 1:
            # Bounds are exact now; rows ascend, so argmin's first hit is the first among equals.
            return int(rows[np.argmin(lower)])
        points *= 8


def _grid_lower_bounds(
    lu: np.ndarray,
    first: np.ndarray,
    n: int,
    alphas: np.ndarray,
    rows: np.ndarray,
    points: int,
    log_xmax: Optional[float],
) -> np.ndarray:
    """Largest deviation |T - E| of each candidate in ``rows`` on ``points`` + 1 grid points
    spread evenly over its tail: a lower bound on its KS distance, equal to it where the tail
    has at most ``points`` + 1 distinct values (the grid then holds all of them)."""
    span = lu.size - 1 - rows
    # Integer arithmetic: floor(i * span / points) in floats can land one below an integer
    # (14 * 5 / 14 -> 4.999...), skip a tail point, and leave the "exact" last pass short.
    steps = np.arange(points + 1, dtype=np.int64)
    lower = np.empty(rows.size)
    step = max(1, _BLOCK // (points + 1))
    for s in range(0, rows.size, step):
        r = rows[s : s + step]
        grid = r[:, None] + (steps * span[s : s + step, None]) // points
        theory, empirical = _deviations(lu, first, n, alphas[s : s + step], r, grid, log_xmax)
        lower[s : s + step] = np.abs(theory - empirical).max(axis=1)
    return lower


def fit_points(values: np.ndarray, candidates: "npt.ArrayLike") -> Optional[PowerLawFit]:
    """The point-wise variant of the KS search used by AlphaPruning and TempBalance: with ``x``
    the sorted sample (n values), each index ``i`` in ``candidates`` proposes xmin = x[i] with
    the tail ``x[i:]`` (ties below index i left out), ``alpha_i = 1 + m / sum(ln(x[i:] / x[i]))``
    (m = n - i) and ``D_i = max_j |1 - (x[i+j] / x[i])**(1 - alpha_i) - j / m|``; the first
    smallest D wins. Candidates whose tail holds a single distinct value are skipped. ``None``
    when no candidate remains."""
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size and not (np.isfinite(x).all() and x[0] > 0):
        raise ValueError("power-law fit needs positive, finite values")
    rows = np.asarray(candidates, dtype=np.intp)
    rows = rows[(rows >= 0) & (rows < x.size - 1)]
    rows = np.unique(rows[x[rows] < x[-1]])
    if rows.size == 0:
        return None
    n = x.size
    points = np.arange(n)
    y = _log_ratio(x, x[-1])
    alphas = _candidate_alphas(y, points[:-1])
    best = _argmin_ks(y, points, n, alphas, None, rows)
    tail = x[best:]
    xmin = float(x[best])
    alpha = 1.0 + tail.size / np.sum(_tail_logs(tail, xmin))
    D = _ks_direct(tail, np.arange(tail.size), tail.size, alpha, None)
    return PowerLawFit(
        alpha=float(alpha),
        xmin=xmin,
        xmax=None,
        D=D,
        num_tail=int(tail.size),
        num_candidates=int(rows.size),
    )
