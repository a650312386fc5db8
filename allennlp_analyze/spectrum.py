"""Singular values of one weight matrix, in float64, and its numerical ranks.

Shapes: a weight W is oriented N x M with N >= M (transposed if needed; singular values do not
change), ``Q = N / M``. Its M singular values ``nu`` (descending) give the M eigenvalues
``lambda = nu**2`` of X = W^T W.

Two ways to the singular values, never computing singular vectors:

* ``"svd"``: LAPACK's divide-and-conquer SVD of W in float64 (values only). Absolute error
  about ``eps64 * nu_max`` per value: the reference.
* ``"gram"``: eigenvalues of the float64 Gram matrix G = W^T W (M x M), 3-4x cheaper. Forming G
  and the symmetric eigensolver are backward stable, so each eigenvalue carries an absolute error
  of at most about ``(N + M) * eps64 * lambda_max``; for ``nu_i = sqrt(lambda_i)`` that is a
  relative error of ``(N + M) * eps64 * lambda_max / (2 * lambda_i)``. Below
  ``lambda_i ~ 1e-16 * lambda_max`` (``nu ~ 1e-8 nu_max``) the Gram path sees nothing at all.

``"auto"`` (the default) takes the Gram path and keeps it only where that bound guarantees a
relative error of at most ``GRAM_RTOL`` (1e-8) on *every* singular value, i.e. where
``lambda_min >= (N + M) * eps64 * lambda_max / (2 * GRAM_RTOL)``, i.e.
``nu_min / nu_max >= sqrt((N + M) * eps64 / (2 * GRAM_RTOL))`` (4.6e-3 for 1536 x 384, 6.5e-3
for 3072 x 768; the measured Gram error on real and random weights is under 5% of the bound),
and where no singular value lies so close to a rank tolerance that this error could flip the
rank. Otherwise it recomputes the matrix with the float64 SVD. Ranks and nu_min
from "auto" are therefore those of the SVD path.

Numerical ranks (all count ``nu > tol``, as ``numpy.linalg.matrix_rank`` does):

* ``rank_loose``: tol = ``loose_tol`` (absolute, default 1e-3: the original study's bound);
* ``rank_numpy``: tol = ``nu_max * max(N, M) * eps`` (numpy's default);
* ``rank_nr``: tol = ``nu_max / 2 * sqrt(N + M + 1) * eps`` (Numerical Recipes);
* ``rank_noise``: tol = the noise floor (:func:`allennlp_analyze.noise_floor.noise_floor`),
  from the independent estimate of W's storage rounding passed in by the caller
  (``noise_estimate``, 0 where not given) and the spectrum: never below the float64 round-off
  of the spectrum itself, ``nu_max * max(N, M) * eps64``;

where ``eps`` is the machine epsilon of the dtype the weights were *stored* in (float32:
1.19e-7), not float64's: round-off in stored float32 weights lifts zero singular values to about
1e-7 nu_max, and a float64 eps would count them as rank.
"""
import threading
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .noise_floor import noise_floor

#: Guaranteed relative accuracy of every singular value that the Gram path is allowed to report.
GRAM_RTOL = 1e-8
#: numpy's linear-algebra gufuncs release the GIL only for calls whose output holds more than
#: 500 values (``NPY_BEGIN_THREADS_THRESHOLDED``): ``eigvalsh`` of a 384 x 384 matrix holds it
#: throughout, so threads cannot overlap it. Stacking matrices lifts a call over that size.
GIL_FREE_OUTPUT = 501
_EPS64 = float(np.finfo(np.float64).eps)
#: Per-thread working buffers (``enable_scratch``), reused from matrix to matrix: only up to
#: this many bytes each (page faults matter for small matrices; large ones are allocated afresh,
#: so that an idle worker does not hold the largest matrix's buffer).
SCRATCH_MAX_BYTES = 32 * 2**20
_SCRATCH = threading.local()


@dataclass(frozen=True)
class RankTolerances:
    """Absolute singular-value thresholds of the rank criteria (same units as W); ``noise`` is
    the noise floor (module docstring)."""

    loose: float
    numpy: float
    nr: float
    noise: float = 0.0

    def values(self) -> Tuple[float, ...]:
        """Every criterion's threshold."""
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class Spectrum:
    """Singular values ``sv`` (float64, descending, length M) of an N x M matrix (N >= M), the
    path that produced them (``"svd"``, ``"gram"``, or ``"gram>svd"`` for a Gram attempt that
    fell back), and the rank tolerances for the stored dtype's ``eps``."""

    sv: np.ndarray
    N: int
    M: int
    method: str
    tolerances: RankTolerances

    def rank(self, tol: float) -> int:
        """Number of singular values strictly above ``tol``."""
        return int(np.count_nonzero(self.sv > tol))


def orient(W: np.ndarray) -> np.ndarray:
    """W as float64 with at least as many rows as columns (N x M, N >= M)."""
    W = np.asarray(W, dtype=np.float64)
    return W.T if W.shape[0] < W.shape[1] else W


def enable_scratch() -> None:
    """Let this thread's float64 working copies (widened W, Gram matrices) reuse buffers kept
    per thread until :func:`release_scratch` or the thread's end, instead of fresh allocations:
    fresh multi-MiB buffers cost page faults that were ~1/4 of the CPU time on small models
    (buffers up to ``SCRATCH_MAX_BYTES``).
    The buffers never escape: results are new arrays."""
    if getattr(_SCRATCH, "bufs", None) is None:
        _SCRATCH.bufs = {}


def release_scratch() -> None:
    """Drop this thread's working buffers (see :func:`enable_scratch`)."""
    _SCRATCH.bufs = None


def _buffer(slot: str, shape) -> Optional[np.ndarray]:
    """This thread's float64 buffer ``slot`` viewed as ``shape``, or None when not enabled."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        return None
    size = int(np.prod(shape))
    if size * 8 > SCRATCH_MAX_BYTES:
        return None
    buf = bufs.get(slot)
    if buf is None or buf.size < size:
        buf = bufs[slot] = np.empty(size)
    return buf[:size].reshape(shape)


def _oriented64(W: np.ndarray, slot: str = "w") -> np.ndarray:
    """:func:`orient`, widening into this thread's buffer ``slot`` where enabled (the same
    values and memory layout as a fresh copy)."""
    W = np.asarray(W)
    if W.dtype != np.float64:
        out = _buffer(slot, W.shape)
        if out is not None:
            np.copyto(out, W)
            W = out
    return orient(W)


def relative_tolerances(N: int, M: int, eps: float) -> Tuple[float, float]:
    """numpy's and Numerical Recipes' tolerances as fractions of nu_max:
    ``max(N, M) * eps`` and ``sqrt(N + M + 1) * eps / 2``."""
    return max(N, M) * eps, float(np.sqrt(N + M + 1.0)) * eps / 2.0


def rank_tolerances(sv_max: float, N: int, M: int, eps: float, loose_tol: float,
                    noise: float = 0.0) -> RankTolerances:
    """The criteria's thresholds for a matrix with largest singular value ``sv_max`` and noise
    floor ``noise``."""
    rel_numpy, rel_nr = relative_tolerances(N, M, eps)
    return RankTolerances(loose=float(loose_tol), numpy=float(sv_max * rel_numpy),
                          nr=float(sv_max * rel_nr), noise=float(noise))


def singular_values(W: np.ndarray, eps: float, loose_tol: float = 1e-3, method: str = "auto",
                    device: Optional[str] = None, noise_estimate: float = 0.0) -> Spectrum:
    """Spectrum of a finite 2-D matrix ``W`` (any orientation, any float dtype).

    ``eps``: machine epsilon of W's storage dtype (sets the rank tolerances); ``method``: "auto",
    "svd" or "gram" (module docstring); ``device``: None for numpy on the CPU, or a torch device
    such as "cuda" (float64 there too; results equal the CPU path's to round-off);
    ``noise_estimate``: the independent estimate of W's storage rounding, from which (and the
    spectrum) the noise criterion's tolerance follows.
    """
    if method not in ("auto", "svd", "gram"):
        raise ValueError(f"unknown spectral method {method!r}")
    W = orient(W) if device is not None else _oriented64(W)
    N, M = W.shape
    if method == "svd":
        sv = _svd_values(W, device)
    else:
        sv = _gram_values(W, device)
        if method == "auto" and not _gram_trustworthy(
                sv, N, M, _tolerances(sv, N, M, eps, loose_tol, noise_estimate)):
            sv, method = _svd_values(W, device), "gram>svd"
        else:
            method = "gram"
    tolerances = _tolerances(sv, N, M, eps, loose_tol, noise_estimate)
    return Spectrum(sv=sv, N=N, M=M, method=method, tolerances=tolerances)


def batch_size(M: int, device: Optional[str] = None) -> int:
    """How many matrices with M columns (after orienting) :func:`singular_values_many` should
    take at once so that numpy releases the GIL during the LAPACK call (1 where it does)."""
    if device is not None or M >= GIL_FREE_OUTPUT or M < 1:
        return 1
    return -(-GIL_FREE_OUTPUT // M)


def singular_values_many(Ws: Sequence[np.ndarray], eps: Sequence[float], loose_tol: float = 1e-3,
                         method: str = "auto", device: Optional[str] = None,
                         noise_estimates: Optional[Sequence[float]] = None) -> List[Spectrum]:
    """:func:`singular_values` of several matrices of one oriented shape (N x M), each with its
    storage ``eps`` (and noise estimate, default 0), computed by stacked LAPACK calls. The
    results are those of one call per matrix, bit for bit (the gufunc runs the same LAPACK routine on each); the point is that a
    stacked call over more than 500 values in all releases the GIL (see ``GIL_FREE_OUTPUT``),
    so that worker threads overlap."""
    if method not in ("auto", "svd", "gram"):
        raise ValueError(f"unknown spectral method {method!r}")
    floors = [0.0] * len(Ws) if noise_estimates is None else list(noise_estimates)
    if len(Ws) <= 1 or device is not None:
        return [singular_values(W, e, loose_tol, method, device, f)
                for W, e, f in zip(Ws, eps, floors)]
    N, M = max(Ws[0].shape), min(Ws[0].shape)
    if any(W.ndim != 2 or (max(W.shape), min(W.shape)) != (N, M) for W in Ws):
        raise ValueError("singular_values_many needs matrices of one shape")

    def stacked(indices: Sequence[int]) -> np.ndarray:
        out = np.empty((len(indices), N, M))
        for j, i in enumerate(indices):
            W = np.asarray(Ws[i])
            out[j] = W.T if W.shape[0] < W.shape[1] else W
        return out

    if method == "svd":
        svs = list(np.linalg.svd(stacked(range(len(Ws))), compute_uv=False))
        methods = ["svd"] * len(svs)
    else:
        grams = _buffer("gram", (len(Ws), M, M))
        if grams is None:
            grams = np.empty((len(Ws), M, M))
        for i, W in enumerate(Ws):
            W = _oriented64(W)
            np.matmul(W.T, W, out=grams[i])
        lam = np.linalg.eigvalsh(grams)
        svs = [np.sqrt(np.clip(row[::-1], 0.0, None)) for row in lam]
        methods = ["gram"] * len(svs)
        if method == "auto":
            redo = [i for i, sv in enumerate(svs) if not _gram_trustworthy(
                sv, N, M, _tolerances(sv, N, M, eps[i], loose_tol, floors[i]))]
            if redo:
                exact = np.linalg.svd(stacked(redo), compute_uv=False)
                for i, sv in zip(redo, exact):
                    svs[i], methods[i] = sv, "gram>svd"
    return [Spectrum(sv=sv, N=N, M=M, method=m,
                     tolerances=_tolerances(sv, N, M, e, loose_tol, f))
            for sv, m, e, f in zip(svs, methods, eps, floors)]


def _tolerances(sv: np.ndarray, N: int, M: int, eps: float, loose_tol: float,
                noise_estimate: float) -> RankTolerances:
    return rank_tolerances(sv[0] if sv.size else 0.0, N, M, eps, loose_tol,
                           noise_floor(noise_estimate, sv, N, M, eps))


def _gram_trustworthy(sv: np.ndarray, N: int, M: int, tol: RankTolerances) -> bool:
    """Whether Gram-path singular values all carry relative error <= GRAM_RTOL and none sits
    within that error of any rank tolerance in ``tol``."""
    if sv.size == 0 or sv[0] == 0.0:
        return False
    lam_max = sv[0] ** 2
    abs_err_lambda = (N + M) * _EPS64 * lam_max
    if sv[-1] ** 2 < abs_err_lambda / (2.0 * GRAM_RTOL):
        return False
    band = 2.0 * GRAM_RTOL
    for t in tol.values():
        if np.any(np.abs(sv - t) <= band * t):
            return False
    return True


def _svd_values(W: np.ndarray, device: Optional[str]) -> np.ndarray:
    if device is None:
        return np.linalg.svd(W, compute_uv=False)
    import torch

    return torch.linalg.svdvals(torch.from_numpy(W).to(device)).cpu().numpy()


def _gram_values(W: np.ndarray, device: Optional[str]) -> np.ndarray:
    """sqrt of the Gram matrix's eigenvalues, descending; negative round-off clipped to 0."""
    if device is None:
        gram = _buffer("gram", (W.shape[1], W.shape[1]))
        lam = np.linalg.eigvalsh(W.T @ W if gram is None else np.matmul(W.T, W, out=gram))
    else:
        import torch

        t = torch.from_numpy(W).to(device)
        lam = torch.linalg.eigvalsh(t.T @ t).cpu().numpy()
    return np.sqrt(np.clip(lam[::-1], 0.0, None))
