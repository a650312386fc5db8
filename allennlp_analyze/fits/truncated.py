"""``tpl``: the truncated power law p(x) = x**-alpha exp(-Lambda x) / Z(alpha, Lambda) on the
tail x >= xmin, as ``powerlaw`` 1.5's ``Fit(evals).truncated_power_law`` (xmin: the Fit's own, the
power law's KS search; the same tail), and its nested likelihood-ratio test against the power law
(``Fit.distribution_compare('power_law', 'truncated_power_law')``: R and p).

``powerlaw`` maximizes the likelihood by Nelder–Mead (``scipy.optimize.fmin``, xtol = ftol = 1e-4)
with the normalizer from ``mpmath.gammainc``, constrained to alpha > 1 and Lambda > 0. Here the
same likelihood is maximized exactly: with y = x / xmin and c = Lambda xmin,

    loglik / m = -alpha mean(ln y) - c mean(y) - ln J(alpha, c) - ln xmin,
    J(alpha, c) = int_1^inf y**-alpha exp(-c y) dy = int_0^inf exp(-(alpha-1) t - c e**t) dt,

an exponential family in (alpha, c): concave, gradient = model moments of (ln y, y) minus the
sample's, Hessian = minus their covariance. The maximum over alpha >= 1, c >= 0 is found by
safeguarded Newton iterations on the profile likelihood in c (:func:`_maximize`); J and the
moments come from
Gauss–Legendre quadrature on intervals of t on which the integrand falls by a constant factor
(relative accuracy ~1e-14). Where the maximum lies at Lambda = 0 (the power law itself: when the
sample mean of y is at least the power law's mean), it is returned exactly, with R = 0 and p = 1;
``powerlaw``'s optimizer stops at some small positive Lambda with a lower likelihood there.
"""

import math
from typing import Tuple

import numpy as np

from ..powerlaw_fit import fit_power_law
from .estimate import TruncatedEstimate, as_eigenvalues, failed, screen

#: Gauss–Legendre nodes and weights on [-1, 1] per interval.
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(12)
#: Interval ends, in units of u = -ln(integrand / its value at t = 0): the integrand falls by
#: e**-1 across each interval, to e**-48 (negligible) at the last.
_LEVELS = np.arange(0.0, 49.0, 1.0)
_MAX_NEWTON = 100
#: Narrowest tail fitted, as (largest / xmin) - 1.
_MIN_SPREAD = 1e-9
#: Newton steps for the interval ends (quadratic convergence from above; ends need no accuracy).
_BREAK_STEPS = 6


def tpl(evals: np.ndarray) -> TruncatedEstimate:
    """Truncated power law on the CSN tail of the positive eigenvalues."""
    x = as_eigenvalues(evals)
    bad = screen(x)
    if bad:
        return failed(bad, TruncatedEstimate)
    x = x[x > 0]
    fit = fit_power_law(x)
    if fit is None:  # (screen() leaves two distinct values: not reached)
        return failed("too_few", TruncatedEstimate)
    tail = x[x >= fit.xmin]
    with np.errstate(over="ignore"):
        top = tail[-1] / fit.xmin
    if not np.isfinite(top):  # ratios beyond float64: no likelihood
        return failed("nonfinite", TruncatedEstimate)
    if top - 1.0 < _MIN_SPREAD:  # the quadrature cannot resolve a tail this narrow
        return failed("all_equal", TruncatedEstimate)
    alpha, lam, loglik, loglik_pl = truncated_mle(tail, fit.xmin)
    R = loglik_pl - loglik
    return TruncatedEstimate(
        status="ok",
        alpha=alpha,
        xmin=fit.xmin,
        D=None,
        num_tail=int(tail.size),
        Lambda=lam,
        loglik=loglik,
        R=R,
        p=math.erfc(math.sqrt(abs(R))),
    )


def truncated_mle(tail: np.ndarray, xmin: float) -> Tuple[float, float, float, float]:
    """(alpha, Lambda, loglik, loglik of the power law) of the truncated power law fitted by
    maximum likelihood to ``tail`` (all >= xmin > 0, at least two distinct values)."""
    y = tail / xmin
    m = y.size
    s_log, s_lin = float(np.mean(np.log(y))), float(np.mean(y))
    beta_pl = 1.0 / s_log  # the power law's alpha - 1 (closed form)
    loglik_pl = m * (math.log(beta_pl) - math.log(xmin) - (1.0 + beta_pl) * s_log)
    # KKT at Lambda = 0: the power law is the maximum when d loglik / dc <= 0 there, i.e. the
    # sample mean of y is at least the model's, beta / (beta - 1) (infinite for beta <= 1)
    if beta_pl > 1.0 and s_lin >= beta_pl / (beta_pl - 1.0):
        return 1.0 + beta_pl, 0.0, loglik_pl, loglik_pl
    beta, c = _maximize(s_log, s_lin, beta_pl)
    log_j = _moments(beta, c)[0]
    loglik = m * (-(1.0 + beta) * s_log - c * s_lin - log_j - math.log(xmin))
    if loglik < loglik_pl:  # the optimum within round-off of Lambda = 0: the power law is
        return 1.0 + beta_pl, 0.0, loglik_pl, loglik_pl  # the better point of the two
    return 1.0 + beta, c / xmin, loglik, loglik_pl


def log_normalizer(alpha: float, lam: float, xmin: float) -> float:
    """ln Z of the truncated power law, Z = int_xmin^inf x**-alpha exp(-lam x) dx
    = xmin**(1 - alpha) J(alpha, lam xmin) (alpha >= 1, lam >= 0, not alpha = 1 with lam = 0)."""
    return (1.0 - alpha) * math.log(xmin) + _moments(alpha - 1.0, lam * xmin)[0]


def _maximize(s_log: float, s_lin: float, beta_pl: float) -> Tuple[float, float]:
    """(beta, c) maximizing the concave f(beta, c) = -(1 + beta) s_log - c s_lin - ln J over
    beta >= 0, c > 0, given that its maximum has c > 0. The profile over beta,
    P(c) = max_beta f(beta, c), is concave with P'(c) = E y - s_lin at the inner maximum
    (envelope theorem) and P''(c) = -(Var y - Cov(t, y)**2 / Var t) (Var y at beta = 0): its root
    is found by Newton's method safeguarded by a shrinking bracket [lo, hi] (P' > 0 at lo)."""
    lo, hi = 0.0, 2.0 / max(s_lin - 1.0, 1e-300)
    beta = 0.5 * beta_pl
    while True:  # P' < 0 at hi
        beta, mom = _inner(s_log, beta_pl, hi, beta)
        if mom[2] - s_lin < 0:
            break
        lo, hi = hi, 4.0 * hi
    c = 0.5 * (lo + hi)
    for _ in range(_MAX_NEWTON):
        beta, mom = _inner(s_log, beta_pl, c, beta)
        slope = mom[2] - s_lin
        if slope > 0:
            lo = c
        else:
            hi = c
        curv = mom[5] - (mom[4] ** 2 / mom[3] if beta > 0 else 0.0)
        if abs(slope) <= 1e-13 * s_lin or hi - lo <= 1e-15 * hi:
            break
        step = c + slope / curv if curv > 0 else -1.0
        c = step if lo < step < hi else (0.5 * (lo + hi) if lo > 0 else hi / 16.0)
    return beta, c


def _inner(s_log: float, beta_pl: float, c: float, beta: float):
    """The beta in [0, beta_pl] maximizing f(., c), from the guess ``beta``: the root of
    E t = s_log (E t decreases in beta; E t <= 1 / beta for c >= 0, so the root is at most
    beta_pl), or 0 where E t <= s_log already at beta = 0; and the moments there."""
    lo, hi = 0.0, beta_pl
    for _ in range(_MAX_NEWTON):
        mom = _moments(beta, c)
        gap = mom[1] - s_log
        if gap > 0:
            lo = beta
        else:
            hi = beta
        if abs(gap) <= 1e-14 * s_log or hi - lo <= 1e-15 * beta_pl:
            break
        step = beta + gap / mom[3]
        if step <= 0.0 and lo == 0.0:
            mom = _moments(0.0, c)
            if mom[1] <= s_log:
                return 0.0, mom
            lo = 0.0
        beta = step if lo < step < hi else 0.5 * (lo + hi)
    return beta, mom


def _moments(beta: float, c: float):
    """(ln J, E t, E y, Var t, Cov(t, y), Var y) under the density proportional to
    exp(-beta t - c e**t) on t >= 0 (y = e**t), beta, c >= 0, not both 0."""
    ends = _breakpoints(beta, c, _LEVELS)
    half = 0.5 * np.diff(ends)
    t = (0.5 * (ends[1:] + ends[:-1]))[:, None] + half[:, None] * _NODES[None, :]
    w = (half[:, None] * _WEIGHTS[None, :]).ravel()
    t = t.ravel()
    # the integrand times e**c: exp(-(beta t + c (e**t - 1))), in (0, 1]
    g = w * np.exp(-(beta * t + c * np.expm1(t)))
    z = g.sum()
    y = np.exp(t)
    mt, my = float(g @ t) / z, float(g @ y) / z
    dt, dy = t - mt, y - my
    return (
        math.log(z) - c,
        mt,
        my,
        float(g @ (dt * dt)) / z,
        float(g @ (dt * dy)) / z,
        float(g @ (dy * dy)) / z,
    )


def _breakpoints(beta: float, c: float, levels: np.ndarray) -> np.ndarray:
    """t >= 0 with beta t + c (e**t - 1) close to each level (increasing): a few Newton steps
    from above (the function is convex and increasing). Only interval ends for the quadrature,
    which is exact whatever they are: no tolerance is needed."""
    u = levels
    with np.errstate(divide="ignore"):
        t = np.minimum(u / beta if beta > 0 else np.inf, np.log1p(u / c) if c > 0 else np.inf)
    for _ in range(_BREAK_STEPS):
        t = t - (beta * t + c * np.expm1(t) - u) / (beta + c * np.exp(t))
    t[0] = 0.0
    return np.maximum.accumulate(t)
