"""Spectral metrics beyond ranks and the power-law fit, from one matrix's singular values and shape.

Shapes and units as in :mod:`allennlp_analyze.spectrum`: W is N x M (N >= M, Q = N / M), its
singular values ``sv`` (nu, descending, length M) give the eigenvalues lambda = nu^2 of
X = W^T W, in the weights' units squared (no 1/N). Pure numpy; float64 throughout.

**Marchenko–Pastur (MP) bulk fit** (:func:`mp_bulk_fit`). A random W with i.i.d. entries of
variance sigma^2 has its eigenvalues in ``[lambda_-, lambda_+]``,
``lambda_+- = sigma^2 (sqrt(N) +- sqrt(M))^2 = sigma^2 N (1 +- 1/sqrt(Q))^2``
(:mod:`allennlp_analyze.mp`), and its largest eigenvalue exceeds lambda_+ by a Tracy–Widom (TW)
fluctuation of scale ``s_TW = sigma^2 (sqrt(N) + sqrt(M)) (1/sqrt(N) + 1/sqrt(M))^(1/3)``
(Johnstone 2001, Ann. Stat. 29:295, Thm. 1, with N for his n - 1). An eigenvalue is a *spike*
when it lies above ``tau = lambda_+ + t * s_TW``, with ``t = TW1_Q999`` = 3.2722, the 0.999
quantile of the GOE Tracy–Widom law F1: a pure-noise matrix shows a false spike with probability
about 1e-3. sigma^2 is fitted to the bulk, not taken from the whole Frobenius norm (which counts
the spikes' energy as noise and so inflates lambda_+ exactly where there are spikes):

    k spikes, sigma^2_k = (sum of the M - k smallest lambda) / (N (M - k)),
    s(k) = #{lambda_i > tau(sigma^2_k)},  num_spikes = the smallest k with s(k) = k,

i.e. sigma^2 is the mean entry variance of W without its spikes (the MP law's mean eigenvalue
is sigma^2 N), found by removing the eigenvalues above the edge until none is left above it: the
iteration k <- s(k) from k = 0, which ends at that smallest fixed point because s is
non-decreasing in k. With no spike this *is* the Frobenius estimate ||W||_F^2 / (N M) that the
figures draw. In a spiked model W = noise + sum_k theta_k u_k v_k^T the bulk's mean is
sigma^2 N (1 - O(k / N)), so the fit is unbiased to O(k / N). All M eigenvalues enter (zeros too,
as in the MP law). ``mp_softrank = lambda_+ / lambda_max`` (Martin & Mahoney 2018, arXiv
1810.01075, "MP soft rank"): about 1 for a random matrix, small when spikes dominate.

**Entropies.** ``matrix_entropy``: WeightWatcher's matrix entropy (``RMT_Util.matrix_entropy``),
the Shannon entropy of p_i = lambda_i / sum(lambda) normalised by the log of the rank,
``-sum p ln p / ln R``: 1 for a flat spectrum of R equal values, near 0 for rank one. R is the
numpy-criterion rank with the *storage* dtype's eps for float32 / float64 weights (WeightWatcher
uses float64's eps, which counts float32 round-off as rank) and ``rank_noise`` for narrower ones
(numpy's criterion has no rank in bfloat16 / float8); WeightWatcher also adds 1e-10 to every p
and to R (a change of about 4e-8 relative on MiniLM). ``effective_rank``: Roy & Vetterli (2007,
EUSIPCO, "The effective rank"), ``exp(-sum p ln p)`` with p_i = nu_i / sum(nu) (singular
values, not eigenvalues), between 1 and M. Both use 0 ln 0 = 0. ``log_alpha_norm`` =
``log10 sum lambda_i^alpha`` (WeightWatcher's), computed as
``alpha log10 lambda_max + log10 sum (lambda_i / lambda_max)^alpha`` so it cannot overflow.

**Correlation traps** (WeightWatcher 0.7.7's ``randomize``, its ``apply_random_esd``; the
element-randomized W_rand baseline of Martin & Mahoney 2018): :func:`permuted` shuffles W's
elements with a generator seeded by the run's seed and the matrix's name (so a matrix's
permutation does not depend on the order in which matrices are analyzed, on the number of
workers, or on the model's label); the permuted matrix has the same entry distribution and no
correlations, so its ESD is MP-like, and any of its eigenvalues above *its own* bulk's spike
threshold (:func:`mp_bulk_fit` of the randomized spectrum) is a trap: a few unusually large
elements, which survive any permutation.
:func:`esd_distance` is the Jensen–Shannon distance between W's and the permuted matrix's ESDs.
"""

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .mp import estimate_sigma2, mp_support

#: 0.999 quantile of the GOE Tracy–Widom distribution F1 (the largest eigenvalue of a real
#: Wishart matrix), from Ferrari & Spohn's Fredholm determinant F1(s) = det(I - Ai(x + y + s))
#: on L^2(0, inf) by Gauss–Legendre quadrature (Bornemann 2010); its 0.90 / 0.95 / 0.99
#: quantiles 0.4501 / 0.9793 / 2.0234 are Johnstone's (2001) Table 1. Tested.
TW1_Q999 = 3.2722


@dataclass(frozen=True)
class BulkFit:
    """MP fit of the bulk of one ESD: entry variance ``sigma2`` (weights' units squared), the
    bulk edge ``lambda_plus`` and the spike threshold ``threshold`` (eigenvalue units), the
    number of eigenvalues above the threshold ``num_spikes``, and ``softrank`` =
    lambda_plus / lambda_max."""

    sigma2: float
    lambda_plus: float
    threshold: float
    num_spikes: int
    softrank: float


def spike_threshold(N: int, M: int, sigma2: float = 1.0, t: float = TW1_Q999) -> float:
    """``lambda_+ + t * s_TW`` for entry variance ``sigma2`` (module docstring)."""
    edge = mp_support(N / M, sigma2, scale=N)[1]
    s_tw = sigma2 * (math.sqrt(N) + math.sqrt(M)) * (1 / math.sqrt(N) + 1 / math.sqrt(M)) ** (1 / 3)
    return edge + t * s_tw


def mp_bulk_fit(sv: np.ndarray, N: int, M: int) -> BulkFit:
    """MP bulk fit of the singular values ``sv`` (descending, length M >= 1, not all zero) of an
    N x M matrix: spikes removed until none is left above the threshold (module docstring)."""
    sv = np.asarray(sv, dtype=np.float64)
    lam = sv * sv
    asc = lam[::-1]
    if asc.size != M or M < 1:
        raise ValueError(f"expected {M} singular values, got {asc.size}")
    # for k = 0 .. M-1 spikes removed: sigma^2_k and the number of eigenvalues above tau_k
    bulk_sums = np.cumsum(asc)[::-1]  # sum of the M - k smallest
    sigma2_k = bulk_sums / (N * (M - np.arange(M)))
    above = M - np.searchsorted(asc, sigma2_k * spike_threshold(N, M), side="right")
    k = int(np.flatnonzero(above <= np.arange(M))[0])  # s(M-1) <= M-1 always
    sigma2 = estimate_sigma2(sv[k:], N, M - k)
    lambda_plus = mp_support(N / M, sigma2, scale=N)[1]
    return BulkFit(
        sigma2=sigma2,
        lambda_plus=lambda_plus,
        threshold=sigma2 * spike_threshold(N, M),
        num_spikes=k,
        softrank=lambda_plus / float(lam[0]),
    )


def _shannon(p: np.ndarray) -> float:
    """-sum p ln p over p > 0 (nats)."""
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def matrix_entropy(sv: np.ndarray, rank: int) -> Optional[float]:
    """WeightWatcher's matrix entropy ``-sum p ln p / ln rank``, p = lambda / sum(lambda);
    ``None`` for rank < 2 (ln 1 = 0) or an all-zero spectrum."""
    lam = np.asarray(sv, dtype=np.float64) ** 2
    total = lam.sum()
    if rank < 2 or not total > 0:
        return None
    return _shannon(lam / total) / math.log(rank)


def effective_rank(sv: np.ndarray) -> Optional[float]:
    """Roy & Vetterli's effective rank ``exp(-sum p ln p)``, p = nu / sum(nu) (in [1, M]);
    ``None`` for an all-zero spectrum."""
    sv = np.asarray(sv, dtype=np.float64)
    total = sv.sum()
    if not total > 0:
        return None
    return math.exp(_shannon(sv / total))


def log_alpha_norm(sv: np.ndarray, alpha: float) -> float:
    """``log10 sum lambda^alpha`` over the eigenvalues lambda = nu^2 (sv descending, sv[0] > 0)."""
    lam = np.asarray(sv, dtype=np.float64) ** 2
    return float(alpha * math.log10(lam[0]) + math.log10(np.sum((lam / lam[0]) ** alpha)))


def esd_bins(M: int) -> int:
    """Histogram bins for an ESD of M eigenvalues: 2 sqrt(M), at least 10, at most 100."""
    return int(min(100, max(10, 2 * math.sqrt(M))))


def esd_distance(sv_a: np.ndarray, tol_a: float, sv_b: np.ndarray, tol_b: float) -> float:
    """Jensen–Shannon distance (base 2, in [0, 1]) between the ESDs of two matrices of M
    eigenvalues each, binned on one common grid: the eigenvalues whose nu is at or below the
    matrix's own round-off level ``tol`` (numpy's tolerance for float32 / float64 storage, the
    noise floor for narrower dtypes; round-off, zeros) in one bin, the others in
    ``esd_bins(M)`` bins with log-spaced edges from the smallest to the largest such lambda of
    both spectra. Finite samples of one law are not at distance 0 (a 1536 x 384 Gaussian and
    its permutation: 0.07; docs/metrics.md)."""
    sv_a, sv_b = np.asarray(sv_a, dtype=np.float64), np.asarray(sv_b, dtype=np.float64)
    M = sv_a.size
    if sv_b.size != M or M == 0:
        raise ValueError("esd_distance needs two spectra of one size")
    pos_a, pos_b = sv_a[sv_a > tol_a] ** 2, sv_b[sv_b > tol_b] ** 2
    both = np.concatenate([pos_a, pos_b])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 0.0)
    edges = np.geomspace(lo, hi, esd_bins(M) + 1) if hi > lo else None
    if edges is not None:
        edges[0], edges[-1] = lo, hi

    def hist(pos: np.ndarray) -> np.ndarray:
        counts = np.histogram(pos, edges)[0] if edges is not None else [pos.size]
        return np.concatenate([[M - pos.size], counts]) / M

    p, q = hist(pos_a), hist(pos_b)
    m = (p + q) / 2

    def kl(x: np.ndarray) -> float:
        keep = x > 0
        return float(np.sum(x[keep] * np.log2(x[keep] / m[keep])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def matrix_seed(seed: int, key: str) -> np.random.SeedSequence:
    """The seed of matrix ``key`` (its name, with part / slice) in a run seeded ``seed``:
    ``SeedSequence([seed, *blake2b-128(key) as 4 little-endian uint32])``."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
    return np.random.SeedSequence([int(seed)] + [int(w) for w in np.frombuffer(digest, "<u4")])


def permuted(W: np.ndarray, seed: int, key: str) -> np.ndarray:
    """W (any shape, its own dtype) with its elements in a random order:
    ``default_rng(matrix_seed(seed, key)).permutation(W.ravel()).reshape(W.shape)``."""
    W = np.asarray(W)
    return np.random.default_rng(matrix_seed(seed, key)).permutation(W.ravel()).reshape(W.shape)
