"""``powerlaw`` 1.5's bounded fit (``Fit(data, xmax=...)``), reproduced where it leaves the
closed form.

With ``xmax`` set, ``powerlaw`` 1.5 does not use the closed-form exponent: it minimizes its negative
log-likelihood with ``scipy.optimize.fmin`` (Nelder–Mead, ``xtol = ftol = 1e-4``) started *at* the
closed form ``alpha0 = 1 + n / sum(ln(x / xmin))``. Its likelihood keeps the untruncated
normalizer, whose exact maximizer is ``alpha0``, so Nelder–Mead returns ``alpha0`` itself exactly
as long as every trial point evaluates worse than the start. That fails in two ways:

* overflow: the density is evaluated as ``x**-a * (a - 1) * xmin**(a - 1)``; for large ``a`` and
  ``xmin`` (e.g. the top few eigenvalues ~1e4 of a random matrix, with alpha ~70) the factors
  overflow or underflow, the log-likelihood becomes ``+inf`` or NaN and the simplex walks off
  (alpha 74.2 where the closed form is 72.4);
* round-off: near the end the simplex probes points ~1e-4 from the start, where the true
  likelihood gain ``n * delta**2 / 2`` (``delta = 1e-4 / (alpha0 - 1)``) can fall below the
  round-off of a sum of ``n`` logs, and a trial point can win by rounding.

:func:`bounded_alphas` keeps ``alpha0`` for every candidate where a bound shows neither can happen
(no overflow, and the likelihood gain at every trial point exceeds a worst-case bound on the
round-off of both evaluations), and for the others (typically the few top candidates) runs the
same Nelder–Mead on the same floating-point objective, step for step, so the result equals
``powerlaw``'s bit for bit. Nothing here needs scipy.
"""

import sys
from typing import Dict, Tuple

import numpy as np

_EPS = float(np.finfo(np.float64).eps)
#: ``10 ** sys.float_info.min_10_exp``: what ``powerlaw`` puts in place of zero likelihoods.
_TINY = 10**sys.float_info.min_10_exp
#: ``scipy.optimize.fmin`` defaults for one parameter.
_XATOL = _FATOL = 1e-4
_MAXFUN = _MAXITER = 200
#: Largest |log| of any intermediate that we accept as safely inside float64's normal range.
_LOG_LIMIT = 700.0


def bounded_alphas(
    x: np.ndarray, u: np.ndarray, cand_first: np.ndarray, alphas: np.ndarray
) -> Tuple[np.ndarray, Dict[int, float]]:
    """The exponents ``powerlaw`` 1.5 reports for each xmin candidate of a bounded fit.

    ``x``: the sorted sample, already cut at xmax; ``u``: its distinct values; ``cand_first``:
    index in ``x`` of each candidate's first point; ``alphas``: the closed-form exponents (to
    round-off). Returns the alphas, with the candidates where Nelder–Mead may leave the closed
    form replaced by its result, and those replacements by candidate index (exact values)."""
    n_tail = (x.size - cand_first).astype(np.float64)
    log_xmin = np.log(u[:-1])
    log_top = float(np.log(x[-1]))
    risky = np.flatnonzero(~_stays_at_start(alphas, n_tail, log_xmin, log_top))
    if risky.size == 0:
        return alphas, {}
    alphas = alphas.copy()
    exact: Dict[int, float] = {}
    for k in risky:
        tail = x[cand_first[k] :]
        xmin = u[k]
        alpha0 = 1 + len(tail) / np.sum(np.log(tail / xmin))  # powerlaw's initial parameter
        exact[int(k)] = alphas[k] = float(_fmin(tail, xmin, alpha0))
    return alphas, exact


def reference_objective(tail: np.ndarray, xmin: np.float64, a: np.float64):
    """``-sum(loglikelihoods(tail))`` of ``powerlaw`` 1.5's bounded power law, in its arithmetic:
    densities ``tail**-a * ((a - 1) * xmin**(a - 1))``, zeros replaced by ``_TINY``, every density
    ``_TINY`` when ``a <= 1``, logs summed left to right (Python's ``sum``)."""
    if not a > 1:
        likelihoods = np.tile(_TINY, tail.size)
    else:
        likelihoods = tail**-a * ((a - 1) * xmin ** (a - 1))
        likelihoods[likelihoods == 0] = _TINY
    return -sum(np.log(likelihoods))


class _OutOfCalls(Exception):
    pass


def _fmin(tail: np.ndarray, xmin: np.float64, alpha0: np.float64) -> np.float64:
    with np.errstate(all="ignore"):  # overflow is part of what is reproduced
        return _fmin_loop(tail, xmin, alpha0)


def _fmin_loop(tail: np.ndarray, xmin: np.float64, alpha0: np.float64) -> np.float64:
    """``scipy.optimize.fmin(reference_objective, alpha0)[0]`` for one parameter, with scipy's
    defaults (simplex ``[x0, 1.05 x0]``; reflection 1, expansion 2, contraction 1/2, shrink 1/2;
    xatol = fatol = 1e-4; 200 calls and iterations), operation for operation."""
    calls = 0

    def f(a):
        nonlocal calls
        if calls >= _MAXFUN:
            raise _OutOfCalls
        calls += 1
        return reference_objective(tail, xmin, a)

    x0 = np.float64(alpha0)
    sim = [x0, (1 + 0.05) * x0 if x0 != 0 else np.float64(0.00025)]
    fsim = [np.inf, np.inf]
    try:
        for k in range(2):
            fsim[k] = f(sim[k])
    except _OutOfCalls:
        pass
    _sort2(sim, fsim)
    iterations = 1
    while calls < _MAXFUN and iterations < _MAXITER:
        try:
            if abs(sim[1] - sim[0]) <= _XATOL and abs(fsim[0] - fsim[1]) <= _FATOL:
                break
            xbar = sim[0] / 1
            xr = 2 * xbar - 1 * sim[1]
            fxr = f(xr)
            if fxr < fsim[0]:
                xe = 3 * xbar - 2 * sim[1]
                fxe = f(xe)
                if fxe < fxr:
                    sim[1], fsim[1] = xe, fxe
                else:
                    sim[1], fsim[1] = xr, fxr
            else:  # with one parameter fsim[-2] is fsim[0]: always a contraction
                shrink = False
                if fxr < fsim[1]:
                    xc = 1.5 * xbar - 0.5 * sim[1]
                    fxc = f(xc)
                    if fxc <= fxr:
                        sim[1], fsim[1] = xc, fxc
                    else:
                        shrink = True
                else:
                    xcc = 0.5 * xbar + 0.5 * sim[1]
                    fxcc = f(xcc)
                    if fxcc < fsim[1]:
                        sim[1], fsim[1] = xcc, fxcc
                    else:
                        shrink = True
                if shrink:
                    sim[1] = sim[0] + 0.5 * (sim[1] - sim[0])
                    fsim[1] = f(sim[1])
            iterations += 1
        except _OutOfCalls:
            pass
        _sort2(sim, fsim)
    return sim[0]


def _sort2(sim: list, fsim: list) -> None:
    """``np.argsort`` order of two values (stable; NaN last), applied to both lists."""
    f0, f1 = fsim
    if f1 < f0 or (f0 != f0 and f1 == f1):
        sim.reverse()
        fsim.reverse()


def _stays_at_start(
    alpha0: np.ndarray, n: np.ndarray, log_xmin: np.ndarray, log_top: float
) -> np.ndarray:
    """Per candidate: True where ``fmin`` provably returns its start ``alpha0``.

    With x0 best, 1-D Nelder–Mead from ``[x0, 1.05 x0]`` only reflects and contracts: it
    evaluates ``x0 +- d_j``, ``d_j = 0.05 x0 / 2**j``, until ``d_j <= xatol`` and the value
    difference ``<= fatol``. The objective is ``g(a) = -n ln(a-1) + (a-1) S + const`` in exact
    arithmetic, so ``g(x0 + d) - g(x0) = n h(delta)``, ``h(delta) = delta - ln(1 + delta)``,
    ``delta = d / (x0 - 1)``. A trial point cannot beat x0 when (1) every intermediate stays far
    inside the normal float range (|log| <= 700), and (2) ``n h(delta)`` exceeds the sum of
    worst-case round-off bounds ``E`` of both evaluations: per density a few ulps plus the
    rounding of ``a - 1`` amplified by ``a |ln xmin|``, per log 4 ulps of its size ``T``, and
    ``(n - 1) eps sum|terms|`` for the left-to-right sum. Points with ``a <= 1`` evaluate to
    ``n * 706.9``, above any start with ``T <= 700``.

    One vectorized pass bounds all trial points of all candidates at once (the range
    ``[0.95, 1.05] x0``, the smallest distance); the few candidates it cannot clear are walked
    through the trial distances one by one."""
    a0 = np.asarray(alpha0, dtype=np.float64)
    big = np.maximum(np.abs(log_xmin), abs(log_top))
    spread = log_top - log_xmin
    with np.errstate(all="ignore"):
        # Coarse pass. Trial points lie in [lo, hi]; the first distance <= xatol is d_min.
        lo, hi = 0.95 * a0 * (1 - 1e-9), 1.05 * a0 * (1 + 1e-9)
        log_am1 = np.maximum(np.abs(np.log(lo - 1.0)), np.abs(np.log(hi - 1.0)))
        t = log_am1 + hi * spread + big
        err = _EPS * n * (12.0 + hi * np.abs(log_xmin) + (n + 8.0) * t)
        d_min = 0.05 * a0 * 0.5 ** np.maximum(0.0, np.ceil(np.log2(0.05 * a0 / _XATOL)))
        d_min = np.where(d_min > _XATOL * (1 - 1e-9), 0.5 * d_min, d_min)
        delta = 1.01 * d_min / (a0 - 1.0)
        rise = n * delta * delta / (2.0 * np.maximum(1.0 - delta, 1e-300))
        delta = 0.99 * d_min / (a0 - 1.0)
        gain = n * delta * delta / (2.0 * (1.0 + delta))
        ok = (
            (lo > 1.0 + 1e-6)
            & (a0 < 1e9)
            & (n * _EPS < 1e-6)
            & (delta < 0.5)
            & (hi * big <= _LOG_LIMIT)
            & (t <= _LOG_LIMIT)
            & (log_am1 + hi * np.abs(log_xmin) <= _LOG_LIMIT)
            & (rise + 2.0 * err < _FATOL * (1 - 1e-9))
            & (gain > 2.02 * err)
        )
    rest = np.flatnonzero(~ok)
    if rest.size:
        ok[rest] = _stays_at_start_stepwise(
            a0[rest], n[rest], log_xmin[rest], big[rest], spread[rest]
        )
    return ok


def _stays_at_start_stepwise(
    a0: np.ndarray, n: np.ndarray, log_xmin: np.ndarray, big: np.ndarray, spread: np.ndarray
) -> np.ndarray:
    """:func:`_stays_at_start` for each trial distance in turn (both sides), until the stopping
    test surely passes."""
    with np.errstate(all="ignore"):

        def bound(a):
            """(no overflow at trial point a, round-off bound E(a)) for a > 1."""
            log_am1 = np.abs(np.log(a - 1.0))
            t = log_am1 + a * spread + big
            fine = (
                (a * big <= _LOG_LIMIT)
                & (t <= _LOG_LIMIT)
                & (log_am1 + a * np.abs(log_xmin) <= _LOG_LIMIT)
            )
            return fine, _EPS * n * (12.0 + a * np.abs(log_xmin) + (n + 8.0) * t)

        ok, e0 = bound(a0)
        ok &= (a0 > 1.0 + 1e-6) & (a0 < 1e9) & (n * _EPS < 1e-6) & np.isfinite(e0)
        d = 0.05 * a0
        pending = ok.copy()
        for _ in range(_MAXITER // 2 - 5):
            if not pending.any():
                break
            fine_side, err_side = [], []
            for side in (1.0, -1.0):
                a = a0 + side * d
                below = a < 1.0 - 1e-9  # objective n * 706.9: worse than x0 (T <= 700)
                near_one = np.abs(a - 1.0) <= 1e-9 + 1e-6
                fine, err = bound(a)
                delta = 0.99 * (a - a0) / (a0 - 1.0)
                gain = n * delta * delta / (2.0 * np.maximum(1.0, 1.0 + delta))
                ok &= ~pending | below | (~near_one & fine & (gain > 1.01 * (err + e0)))
                fine_side.append(fine & ~near_one & ~below)
                err_side.append(err)
            # Stopping test at this distance: |g(x0 +- d) - g(x0)| <= n h_max(delta) + E.
            delta = 1.01 * d / (a0 - 1.0)
            rise = n * delta * delta / (2.0 * np.maximum(1.0 - delta, 1e-300))
            done = (
                (d <= _XATOL * (1 - 1e-9))
                & (delta < 0.5)
                & fine_side[0]
                & fine_side[1]
                & (rise + e0 + np.maximum(*err_side) < _FATOL * (1 - 1e-9))
            )
            pending &= ~done & ok
            d = np.where(pending, d * 0.5, d)
        ok &= ~pending  # never surely stopped within the call budget
    return ok
