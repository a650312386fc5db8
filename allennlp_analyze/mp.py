"""The Marchenko–Pastur (MP) law: the eigenvalue density of X = W^T W for a random W.

Scaling used throughout this package (and printed on the figures):

    W is N x M (N >= M, Q = N / M >= 1) with i.i.d. entries of mean 0 and variance sigma^2.
    The M eigenvalues lambda of X = W^T W, divided by N, follow MP with ratio y = M / N = 1 / Q:

        x = lambda / N,   support  x in [sigma^2 (1 - 1/sqrt(Q))^2, sigma^2 (1 + 1/sqrt(Q))^2]

        rho(x) = Q / (2 pi sigma^2 x) * sqrt((x_+ - x) (x - x_-))       (integrates to 1)

    so in the units of the records (lambda = nu^2, no 1/N, as in the original study) the support
    is [sigma^2 N (1 - 1/sqrt(Q))^2, sigma^2 N (1 + 1/sqrt(Q))^2] and rho_lambda(l) =
    rho(l / N) / N. Every function takes ``scale``: 1 for x = lambda / N, N for lambda itself.

    sigma^2 is estimated from the matrix as ||W||_F^2 / (N M) = sum(nu^2) / (N M) (the mean
    squared entry, i.e. the mean eigenvalue of X is sigma^2 N): the random matrix with the same
    shape and the same Frobenius norm. For Q = 1 the lower edge is 0 and rho diverges there like
    x^(-1/2) (still integrable). M <= N, so there is no point mass at 0.

Pure numpy.
"""

from typing import Tuple

import numpy as np


def mp_support(Q: float, sigma2: float = 1.0, scale: float = 1.0) -> Tuple[float, float]:
    """Edges (lambda_-, lambda_+) = scale * sigma2 * (1 -/+ 1/sqrt(Q))^2 of the MP support."""
    if not Q >= 1.0:
        raise ValueError(f"Q = N / M must be >= 1 (got {Q})")
    r = 1.0 / np.sqrt(Q)
    return float(scale * sigma2 * (1.0 - r) ** 2), float(scale * sigma2 * (1.0 + r) ** 2)


def mp_density(lam, Q: float, sigma2: float = 1.0, scale: float = 1.0) -> np.ndarray:
    """MP density at ``lam`` (0 outside the support), in the units of ``lam``:
    ``scale`` = 1 for x = lambda / N, ``scale`` = N for lambda = nu^2 itself."""
    lo, hi = mp_support(Q, sigma2, scale)
    lam = np.asarray(lam, dtype=np.float64)
    x = lam / scale
    a, b = lo / scale, hi / scale
    out = np.zeros_like(x)
    inside = (x > a) & (x < b) & (x > 0)
    xi = x[inside]
    out[inside] = Q / (2.0 * np.pi * sigma2 * xi) * np.sqrt((b - xi) * (xi - a))
    return out / scale


def estimate_sigma2(sv: np.ndarray, N: int, M: int) -> float:
    """sigma^2 = ||W||_F^2 / (N M) from W's singular values ``sv`` (||W||_F^2 = sum nu^2)."""
    sv = np.asarray(sv, dtype=np.float64)
    return float(np.sum(sv * sv) / (N * M))
