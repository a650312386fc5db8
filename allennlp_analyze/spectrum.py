"""Singular values of one weight matrix, in float64, and its numerical ranks.

Shapes: a weight W is oriented N x M with N >= M (transposed if needed; singular values do not
change), ``Q = N / M``. Its M singular values ``nu`` (descending) give the M eigenvalues
``lambda = nu**2`` of X = W^T W. Singular values of W itself are never needed with vectors.

**Scaling.** Where max |w_ij| lies outside [2**-200, 2**200], W is multiplied by the power of two
2**-e that brings it into [0.5, 1) before anything else (exact: only exponents change), so that
no finite matrix overflows in W^T W (1e160 would) or underflows (1e-300, denormals); the values
are scaled back by 2**e (``Spectrum.exponent``; ``Spectrum.scaled`` keeps them unscaled where
nu itself rounds in float64). Inside that range nothing is scaled.

**Blocks.** W is read in row blocks of ``BLOCK_ROWS`` rows (of the oriented matrix), widened to
float64 one block at a time, so a 128k x 4096 matrix stored in bf16 never exists whole in
float64: its Gram matrix is ``G = sum_b W_b^T W_b``. The arithmetic depends on the shape only
(block and panel boundaries are fixed by N and M), never on how the data arrives: a matrix read
from a memory map block by block and the same matrix in memory give the same bits.

Paths to the values (``Spectrum.method``):

* ``"svd"``: LAPACK's SVD of W in float64 (values only): absolute error about
  ``eps64 * nu_max`` per value, the reference. A matrix of more than one block is first reduced
  by a blocked QR (``R`` of [R; W_b], block after block), then the SVD of the M x M ``R``
  (backward stable, the same error class).
* ``"gram"``: eigenvalues of the float64 Gram matrix, 3-4x cheaper. Forming G and the
  symmetric eigensolver are backward stable, so each eigenvalue carries an absolute error of at
  most about ``dlam = (N + M) * eps64 * lambda_max``; for ``nu_i = sqrt(lambda_i)`` that is
  ``dlam / (2 nu_i)``: the Gram path sees nothing below ``nu ~ 1e-8 nu_max``.
* ``"gram+ritz"``: the near-square path. The Gram eigenvalues are kept where accurate (below);
  the bottom cluster of k of them is recomputed by Rayleigh–Ritz on W itself: after the one
  tridiagonalization T = Q^T G Q (``dsytrd``, whose reflectors are kept) and all eigenvalues
  of T (``dsterf``), the eigenvectors of T for the k smallest (``dstein``, inverse iteration),
  ``V_k = Q Z`` (``dormtr``), ``Y = W V_k`` (N x k, blockwise) and its thin SVD
  ``Y = P S F^T`` give Ritz values ``s`` and vectors ``X = V_k F`` (M x k), ``P`` (N x k).
  They replace the bottom k values where the bound below holds; cost: syrk + eigvalsh plus
  ~6 N M k flops.
* ``"gram>svd"`` / ``"gram+ritz>svd"``: the Gram attempt (and the Ritz step) could not be
  trusted, so the matrix was recomputed by the SVD path.

``"auto"`` (the default) keeps a Gram value only where its bound guarantees both a relative
error <= ``GRAM_RTOL`` (1e-8), i.e. ``lambda >= dlam / (2 GRAM_RTOL)``, and an absolute one <=
``ACCURACY_C * (N + M) * eps64 * nu_max``, i.e. ``nu >= nu_max / (2 ACCURACY_C)``; if all M
qualify (``nu_min / nu_max >= max(sqrt((N + M) eps64 / (2 GRAM_RTOL)), 1 / 128)``: 7.8e-3 where
N + M < 5500, 0.019 for 32000 x 2048) the result is ``"gram"``. Otherwise the j0 values below
that limit, plus a margin (k in [j0, j0 + max(4, j0/4)], at the largest gap lambda_{k+1} -
lambda_k, k <= M/4) take the Ritz step.

**The Ritz bound** (a-posteriori; derived in docs/numerics.md, "Near-square and tall matrices").
With X and P orthonormal, ``R1 = W X - P S`` (round-off of forming Y and its SVD: ``||R1|| <=
e1``) and the residual ``R2 = W^T P - X S`` (computed), W is orthogonally equivalent to ``[[S,
R2^T X_perp], [0, W22]]`` up to a perturbation of norm ``||R1||``. Its Gram matrix has the
off-diagonal block ``S R2^T X_perp`` of norm ``h <= ||R2 S||_F + e2 s_max`` (``e2``: the
round-off of computing R2). The eigenvalues of the bottom-right block are at least
``lambda_{k+1}(W^T W) - h`` (Weyl) and ``lambda_{k+1} >= (sqrt(lambda^gram_{k+1} - dlam) -
e1)^2``, so the gap is ``eta = (sqrt(lambda^gram_{k+1} - dlam) - e1)^2 - h - s_max^2``; by the
quadratic residual bound for Hermitian block matrices (Li & Li, LAA 395, 2005: |lambda_i -
theta_i| <= h^2 / eta), the i-th smallest singular value of W lies in ``[sqrt(max(s_i^2 - beta,
0)) - e1, sqrt(s_i^2 + beta) + e1]``, ``beta = h^2 / eta``. With ``e1 = e2 = (N + M) eps64
nu_max`` (the normwise round-off model of the Gram bound above; numpy's SVD is within the same
``(N + M) eps64 nu_max`` of the exact values), the Ritz values are kept when ``eta > 0`` and
every interval's half-width plus that SVD error is at most ``ACCURACY_C * (N + M) * eps64 *
nu_max``: then every reported value is within that of ``numpy.linalg.svd``. Measured errors are
~1 eps64 nu_max (tests); the bound is typically 1e-3 of the limit.

Ranks: where any value lies within its error bound (Gram values: ``2 GRAM_RTOL`` relative;
Ritz values: the interval above plus the SVD's error) of any rank tolerance, the matrix takes
the SVD path, so ranks from "auto" are those of ``numpy.linalg.svd``'s values.

The LAPACK steps the near-square path needs (kept reflectors, ``dstein``, ``dormtr``, ``dsyrk``
accumulating in place) are called in numpy's own OpenBLAS (:mod:`._lapack`); where that library
cannot be used, the Gram eigenvalues come from ``numpy.linalg.eigvalsh`` and a matrix that the
Gram path cannot settle takes ``"gram>svd"``. Tall matrices with large Grams (M >=
``TWO_STAGE_MIN_M``, N >= ``TWO_STAGE_MIN_Q`` M) take the two-stage reduction
``dsytrd_2stage`` instead of ``dsytrd`` (backward stable too: the same error model, its
eigenvalues within ~1e-14 lambda_max of ``eigvalsh``'s); it keeps no reflectors, so a matrix
that needs the Ritz step is reduced again by ``dsytrd`` (the Gram formed anew from W's blocks).
With ``method="gram"`` (no Ritz step, no SVD) every Gram of M >= ``TWO_STAGE_MIN_M`` takes it,
whatever N / M.

Numerical ranks (all count ``nu > tol``, as ``numpy.linalg.matrix_rank`` does):

* ``rank_loose``: tol = ``loose_tol`` (absolute, default 1e-3: the original study's bound);
* ``rank_numpy``: tol = ``nu_max * max(N, M) * eps`` (numpy's default);
* ``rank_nr``: tol = ``nu_max / 2 * sqrt(N + M + 1) * eps`` (Numerical Recipes);
* ``rank_noise``: tol = the noise floor (:func:`allennlp_analyze.noise_floor.noise_floor`),
  from the independent estimate of W's storage rounding (``noise_estimate`` passed in by the
  caller, 0 where not given, or accumulated from W's own row blocks in the same pass as the
  Gram matrix where ``noise_dtype`` names the storage dtype) and the spectrum: never below the
  float64 round-off of the spectrum itself, ``nu_max * max(N, M) * eps64``;

where ``eps`` is the machine epsilon of the dtype the weights were *stored* in (float32:
1.19e-7), not float64's: round-off in stored float32 weights lifts zero singular values to about
1e-7 nu_max, and a float64 eps would count them as rank.
"""

import threading
from dataclasses import dataclass, fields
from functools import partial
from typing import Callable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from . import _lapack
from .noise_floor import (
    BLOCK_ELEMENTS,
    NoiseAccumulator,
    QuantizationNoiseAccumulator,
    StorageNoise,
    noise_floor,
)
from .quantized import DecodedRows

#: Guaranteed relative accuracy of every singular value that the Gram path is allowed to report.
GRAM_RTOL = 1e-8
#: c of the accuracy target: every value from "auto" is within c (N + M) eps64 nu_max of
#: ``numpy.linalg.svd``'s (Gram values kept only above nu_max / (2 c); Ritz values checked).
ACCURACY_C = 64.0
#: numpy's linear-algebra gufuncs release the GIL only for calls whose output holds more than
#: 500 values (``NPY_BEGIN_THREADS_THRESHOLDED``): ``eigvalsh`` of a 384 x 384 matrix holds it
#: throughout, so threads cannot overlap it. Stacking matrices lifts a call over that size
#: (only without :mod:`._lapack`, whose ctypes calls always release the GIL).
GIL_FREE_OUTPUT = 501
#: Rows of the oriented matrix per block (widened to float64 one at a time).
BLOCK_ROWS = 2048
#: Gram column panels of about this width: the unit that idle workers share (``parallel``).
PANEL_COLS = 512
#: At most this fraction of the M values goes through the Ritz step (else the SVD is cheaper).
RITZ_MAX_FRACTION = 0.25
#: Grams of at least this size, of matrices at least this much taller than wide, take the
#: two-stage tridiagonal reduction (``dsytrd_2stage``: 0.62-0.80x of ``dsytrd``'s time at 2048,
#: 0.70-0.75x at 4096, 1.1x at 768-1024, one thread): they are expected to keep the Gram values
#: (nu_min / nu_max of a random one is (sqrt(Q) - 1) / (sqrt(Q) + 1) >= 0.1, far above the
#: limit); one that needs the Ritz step is reduced again by ``dsytrd``, whose reflectors it uses.
TWO_STAGE_MIN_M = 1536
TWO_STAGE_MIN_Q = 1.5
#: No scaling while max |w| lies within 2**-SAFE_EXPONENT ... 2**SAFE_EXPONENT.
SAFE_EXPONENT = 200
_EPS64 = float(np.finfo(np.float64).eps)
#: Per-thread working buffers (``enable_scratch``), reused from matrix to matrix: only up to
#: this many bytes each (page faults matter for small matrices; large ones are allocated afresh,
#: so that an idle worker does not hold the largest matrix's buffer).
SCRATCH_MAX_BYTES = 32 * 2**20
_SCRATCH = threading.local()

#: Runs independent tasks (callables) and returns when all are done: in sequence by default;
#: the analysis passes one that lends idle workers (results never depend on it).
Parallel = Callable[[List[Callable[[], None]]], None]


class NonFiniteError(ValueError):
    """The matrix holds NaN or Inf."""


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
    path that produced them (module docstring: ``"svd"``, ``"gram"``, ``"gram+ritz"``,
    ``"gram>svd"``, ``"gram+ritz>svd"``), and the rank tolerances for the stored dtype's
    ``eps``. ``scaled`` = ``sv * 2**-exponent`` exactly (None where ``exponent`` is 0): W was
    scaled by that power of two, and ``sv`` itself may round to 0 or a denormal. ``noise``:
    W's storage rounding where it was accumulated here (``noise_dtype``)."""

    sv: np.ndarray
    N: int
    M: int
    method: str
    tolerances: RankTolerances
    exponent: int = 0
    scaled: Optional[np.ndarray] = None
    noise: Optional[StorageNoise] = None

    def rank(self, tol: float) -> int:
        """Number of singular values strictly above ``tol``."""
        return int(np.count_nonzero(self.sv > tol))

    @property
    def unit_sv(self) -> np.ndarray:
        """``sv * 2**-exponent``: the values as computed (all in float64's normal range)."""
        return self.sv if self.scaled is None else self.scaled


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


def working_memory(N: int, M: int) -> int:
    """Bytes of float64 working memory :func:`singular_values` needs at its peak for an N x M
    matrix (either orientation). One row block (N <= ``BLOCK_ROWS``): the widened copy of W
    plus the larger of the SVD's own copy of it and the Gram matrix with the eigensolver's copy
    of it, ``8 N M + 8 max(N M, 2 M^2)``. Several blocks (streamed): the Gram matrix, kept
    while a fallback runs (8 M^2), and that fallback's blocked QR: R and its SVD's copy
    (2 x 8 M^2), [R; W_b] and LAPACK's copy of it (2 x 8 (M + B) M), i.e.
    ``8 (5 M^2 + 2 B M)`` with B = ``BLOCK_ROWS``, whatever N (the Ritz step, where it runs,
    takes at most 8 M^2 for its N x k blocks)."""
    N, M = max(N, M), min(N, M)
    if N <= BLOCK_ROWS:
        return 8 * N * M + 8 * max(N * M, 2 * M * M)
    return 8 * (5 * M * M + 2 * BLOCK_ROWS * M)


def _empty(slot: str, shape) -> np.ndarray:
    out = _buffer(slot, shape)
    return np.empty(shape) if out is None else out


class _Rows:
    """W oriented N x M (N >= M) as float64 row blocks scaled by ``2**-exponent``.

    ``W`` may be any 2-D array-like that supports slicing and ``numpy.asarray`` (a memory map,
    or a lazily widened bf16 view): only one block is widened at a time, except that a matrix
    of one block is widened once and kept (``whole``). ``scan``: find max |w| first (scaling,
    NaN/Inf); without it (``checked`` False) the caller must check finiteness, e.g. on the Gram
    matrix's diagonal; only float64 storage can need scaling, so it is always scanned.
    ``noise_dtype``: accumulate the storage rounding of the stored values of that dtype
    (:class:`~allennlp_analyze.noise_floor.NoiseAccumulator`) from each block as it is first
    read, so that no extra pass over W is needed (:attr:`noise`). A quantized W (a
    :class:`~allennlp_analyze.quantized.QuantizedView`: its parts have ``decode()``) feeds
    each block's steps and worst cases to a
    :class:`~allennlp_analyze.noise_floor.QuantizationNoiseAccumulator` instead, whatever
    ``noise_dtype``. Raises :class:`NonFiniteError`."""

    def __init__(self, W, scan: bool = True, noise_dtype: Optional[str] = None):
        if not hasattr(W, "shape"):
            W = np.asarray(W)
        self.src = W if W.shape[0] >= W.shape[1] else W.T
        self.N, self.M = (int(n) for n in self.src.shape)
        self.bounds = [(a, min(a + BLOCK_ROWS, self.N)) for a in range(0, self.N, BLOCK_ROWS)]
        self.exponent = 0
        self.whole: Optional[np.ndarray] = None
        self.checked = scan or np.dtype(getattr(W, "dtype", np.float64)).itemsize > 4
        self._noise: Union[NoiseAccumulator, QuantizationNoiseAccumulator, None] = None
        if hasattr(self.src, "decode"):
            self._noise = QuantizationNoiseAccumulator(
                self.M, getattr(getattr(W, "matrix", None), "bound_reason", None)
            )
        elif noise_dtype is not None:
            self._noise = NoiseAccumulator(noise_dtype, self.M)
        self._fed: Set[int] = set()
        if len(self.bounds) <= 1:
            self.whole = self._widened(0, self.N, "w", scale=False, feed=not self.checked)
        if not self.checked:
            return  # float32 and narrower: |w| < 2**128, W^T W cannot overflow in float64
        if self.whole is not None:
            big = _magnitude(self.whole)
        else:
            big = np.max([self._scanned(a, b) for a, b in self.bounds])
        if not np.isfinite(big):
            raise NonFiniteError("the matrix holds NaN or Inf")
        if self.whole is not None:
            self._feed(0, self.whole)  # the stored values, before any scaling
        if big > 0 and not 2.0**-SAFE_EXPONENT <= big <= 2.0**SAFE_EXPONENT:
            self.exponent = int(np.frexp(big)[1])
            if self.whole is not None:
                self.whole = self._widened(0, self.N, "w", scale=True, feed=False)

    def _widened(self, a: int, b: int, slot: str, scale: bool, feed: bool = True) -> np.ndarray:
        """Rows a:b as C-ordered float64, scaled by 2**-exponent where ``scale``: the caller's
        own array where it already is that, else a copy (never written through); their stored
        values go to the noise accumulator where ``feed``."""
        part = self.src[a:b]
        if (
            not (scale and self.exponent)
            and isinstance(part, np.ndarray)
            and part.dtype == np.float64
            and part.flags.c_contiguous
        ):
            if feed:
                self._feed(a, part)
            return part
        out = _empty(slot, (b - a, self.M))
        values, stored = _read(part)
        np.copyto(out, values)
        if feed:  # the float64 copy holds the same values, in rows the accumulator reads fast
            self._feed(a, stored if stored is not values or values.flags.c_contiguous else out)
        _release(part)
        if scale and self.exponent:
            _ldexp(out, -self.exponent, out=out)
        return out

    def _scanned(self, a: int, b: int) -> float:
        part = self.src[a:b]
        values, stored = _read(part)
        big = _magnitude(values)
        if np.isfinite(big):  # NaN/Inf ends the analysis: nothing to accumulate
            self._feed(a, stored)
        _release(part)
        return big

    def _feed(self, start: int, values) -> None:
        """The stored values (or a quantized block's :class:`DecodedRows`) of the block at row
        ``start`` to the noise accumulator, once, in pieces of about ``BLOCK_ELEMENTS`` entries
        (its cache-sized working copies)."""
        if self._noise is None or start in self._fed:
            return
        self._fed.add(start)
        if isinstance(values, DecodedRows):
            self._noise.update(values)  # type: ignore[arg-type]
            return
        step = max(1, BLOCK_ELEMENTS // max(1, self.M))
        for a in range(0, values.shape[0], step):
            self._noise.update(values[a : a + step])

    @property
    def noise(self) -> Optional[StorageNoise]:
        """W's storage rounding (``noise_dtype``), once every block has been read."""
        if self._noise is None or len(self._fed) < len(self.bounds):
            return None
        return self._noise.result()

    def noise_estimate(self, given: float) -> float:
        """The independent rounding estimate: accumulated here, else ``given``."""
        noise = self.noise
        return given if noise is None else noise.estimate

    def block(self, i: int) -> np.ndarray:
        """Row block i (C-ordered float64, scaled); valid until the next call."""
        if self.whole is not None:
            return self.whole
        a, b = self.bounds[i]
        return self._widened(a, b, "block", scale=True)

    def blocks(self):
        for i, (a, b) in enumerate(self.bounds):
            yield a, b, self.block(i)

    def dense(self) -> np.ndarray:
        """The whole scaled matrix (for the torch path and the stacked calls)."""
        if self.whole is not None:
            return self.whole
        return np.concatenate([np.array(blk) for _, _, blk in self.blocks()])


def _read(part) -> Tuple[np.ndarray, object]:
    """A part of W read: its values, and what the noise accumulator takes of it (the stored
    values themselves, or a quantized part's :class:`DecodedRows`)."""
    decode = getattr(part, "decode", None)
    if decode is None:
        values = np.asarray(part)
        return values, values
    decoded = decode()
    return decoded.values, decoded


def _release(part) -> None:
    """Let a memory-mapped source's view drop the pages of ``part`` once read and copied."""
    release = getattr(part, "release", None)
    if release is not None:
        release()


def _ldexp(x, exponent: int, out=None):
    """x * 2**exponent, exactly; rounding to 0 / denormals / inf (for values that are outside
    float64's range in the weights' units) without warnings."""
    with np.errstate(over="ignore", under="ignore"):
        return np.ldexp(x, exponent, out=out) if out is not None else np.ldexp(x, exponent)


def _magnitude(a: np.ndarray) -> float:
    """max |a| (NaN where a holds NaN, inf where it holds an infinity; 0 when empty)."""
    if a.size == 0:
        return 0.0
    hi, lo = float(np.max(a)), float(np.min(a))
    if hi != hi or lo != lo:
        return float("nan")
    return max(hi, -lo)


def relative_tolerances(N: int, M: int, eps: float) -> Tuple[float, float]:
    """numpy's and Numerical Recipes' tolerances as fractions of nu_max:
    ``max(N, M) * eps`` and ``sqrt(N + M + 1) * eps / 2``."""
    return max(N, M) * eps, float(np.sqrt(N + M + 1.0)) * eps / 2.0


def rank_tolerances(
    sv_max: float, N: int, M: int, eps: float, loose_tol: float, noise: float = 0.0
) -> RankTolerances:
    """The criteria's thresholds for a matrix with largest singular value ``sv_max`` and noise
    floor ``noise``."""
    rel_numpy, rel_nr = relative_tolerances(N, M, eps)
    return RankTolerances(
        loose=float(loose_tol),
        numpy=float(sv_max * rel_numpy),
        nr=float(sv_max * rel_nr),
        noise=float(noise),
    )


def _tolerances(
    sv: np.ndarray, N: int, M: int, eps: float, loose_tol: float, noise_estimate: float
) -> RankTolerances:
    """Every criterion's threshold for the (true-unit) singular values ``sv``."""
    return rank_tolerances(
        sv[0] if sv.size else 0.0, N, M, eps, loose_tol, noise_floor(noise_estimate, sv, N, M, eps)
    )


def _tolerance_values(tol: RankTolerances, exponent: int) -> List[float]:
    """Every rank tolerance (whatever criteria RankTolerances holds), scaled by 2**-exponent."""
    return [float(_ldexp(v, -exponent)) for v in tol.values()]


def singular_values(
    W,
    eps: float,
    loose_tol: float = 1e-3,
    method: str = "auto",
    device: Optional[str] = None,
    noise_estimate: float = 0.0,
    parallel: Optional[Parallel] = None,
    noise_dtype: Optional[str] = None,
) -> Spectrum:
    """Spectrum of a finite 2-D matrix ``W`` (any orientation, any float dtype; any array-like
    that slices, such as a memory map: it is read in row blocks).

    ``eps``: machine epsilon of W's storage dtype (sets the rank tolerances); ``method``: "auto",
    "svd" or "gram" (module docstring); ``device``: None for numpy on the CPU, or a torch device
    such as "cuda" (float64 there too, W whole; results equal the CPU path's to round-off);
    ``noise_estimate``: the independent estimate of W's storage rounding, from which (and the
    spectrum) the noise criterion's tolerance follows; ``noise_dtype`` instead accumulates it
    (and ``Spectrum.noise``) from W's blocks as they are read, for stored values of that dtype;
    ``parallel``: runs the Gram's independent panels (see :data:`Parallel`). Raises
    :class:`NonFiniteError` for NaN/Inf.
    """
    if method not in ("auto", "svd", "gram"):
        raise ValueError(f"unknown spectral method {method!r}")
    rows = _Rows(W, scan=device is not None or method == "svd", noise_dtype=noise_dtype)
    if device is not None:
        sv, method = _torch_values(rows, eps, loose_tol, method, device, noise_estimate)
    elif method == "svd":
        sv = _exact(rows)
    else:
        lapack = _lapack.backend()
        parallel = parallel or _in_sequence
        two_stage = (
            lapack is not None
            and lapack.two_stage
            and rows.M >= TWO_STAGE_MIN_M
            and (method == "gram" or rows.N >= TWO_STAGE_MIN_Q * rows.M)
        )
        G, lam, trd = _gram_eigenvalues(rows, lapack, parallel, two_stage)
        sv = _sqrt_desc(lam)
        if method == "auto" and two_stage and _below_gram_limit(sv, rows.N, rows.M):
            # the Ritz step needs the reflectors that the two-stage reduction does not keep
            G, lam, trd = _gram_eigenvalues(rows, lapack, parallel, False)
            sv = _sqrt_desc(lam)
        if method == "auto":
            sv, method = _settle(
                rows,
                sv,
                lam,
                G,
                trd,
                lapack,
                _scaled_tolerances(rows, sv, eps, loose_tol, noise_estimate),
            )
    return _spectrum(sv, rows, method, eps, loose_tol, noise_estimate)


def _gram_eigenvalues(
    rows: "_Rows", lapack, parallel: Parallel, two_stage: bool
) -> Tuple[np.ndarray, np.ndarray, Optional[tuple]]:
    """G (overwritten by the reduction where LAPACK is used), its eigenvalues ascending, and
    the tridiagonal form with its reflectors ``(d, e, tau)`` where ``dsytrd`` made it."""
    G = _gram(rows, lapack, parallel)
    if not rows.checked and not np.isfinite(np.diagonal(G)).all():
        raise NonFiniteError("the matrix holds NaN or Inf")  # G_jj = sum_i w_ij^2
    if lapack is None:
        return G, np.linalg.eigvalsh(G), None
    if two_stage:
        return G, lapack.eigenvalues_2stage(G), None
    d, e, tau = lapack.sytrd(G)
    return G, lapack.sterf(d, e), (d, e, tau)


def _spectrum(
    sv: np.ndarray, rows: "_Rows", method: str, eps: float, loose_tol: float, noise_estimate: float
) -> Spectrum:
    e = rows.exponent
    true = _ldexp(sv, e) if e else sv
    tolerances = _tolerances(
        true, rows.N, rows.M, eps, loose_tol, rows.noise_estimate(noise_estimate)
    )
    return Spectrum(
        sv=true,
        N=rows.N,
        M=rows.M,
        method=method,
        tolerances=tolerances,
        exponent=e,
        scaled=sv if e else None,
        noise=rows.noise,
    )


def _scaled_tolerances(
    rows: "_Rows", sv: np.ndarray, eps: float, loose_tol: float, noise_estimate: float
) -> List[float]:
    """Every rank tolerance for the scaled values ``sv``, in their units."""
    true = _ldexp(sv, rows.exponent) if rows.exponent else sv
    return _tolerance_values(
        _tolerances(true, rows.N, rows.M, eps, loose_tol, rows.noise_estimate(noise_estimate)),
        rows.exponent,
    )


def _in_sequence(tasks: List[Callable[[], None]]) -> None:
    for task in tasks:
        task()


def _sqrt_desc(lam: np.ndarray) -> np.ndarray:
    """sqrt of ascending eigenvalues, descending; negative round-off clipped to 0."""
    return np.sqrt(np.clip(lam[::-1], 0.0, None))


def _panels(M: int) -> List[Tuple[int, int]]:
    """Column panels of the Gram's lower triangle, about ``PANEL_COLS`` wide and of equal area
    (fixed by M alone)."""
    P = max(1, M // PANEL_COLS)
    cuts = [int(round(M * (1.0 - np.sqrt(1.0 - j / P)))) for j in range(P + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _gram(rows: _Rows, lapack, parallel: Parallel) -> np.ndarray:
    """G = sum over row blocks of W_b^T W_b (M x M float64). With the LAPACK backend only the
    lower triangle of G's Fortran view is formed, panel by panel, in place; else by matmul."""
    M = rows.M
    G = _empty("gram", (M, M))
    for i, (_, _, blk) in enumerate(rows.blocks()):
        if lapack is not None:
            beta = 0.0 if i == 0 else 1.0
            parallel([partial(lapack.gram_update, G, blk, c0, c1, beta) for c0, c1 in _panels(M)])
        elif i == 0:
            np.matmul(blk.T, blk, out=G)
        else:
            G += blk.T @ blk
    if rows.N == 0:
        G[...] = 0.0
    return G


def _exact(rows: _Rows) -> np.ndarray:
    """The SVD path: values of the (scaled) W, through a blocked QR for several blocks."""
    if rows.whole is not None:
        return np.linalg.svd(rows.whole, compute_uv=False)
    R: Optional[np.ndarray] = None
    for _, _, blk in rows.blocks():
        # numpy's stubs type qr() as QRResult whatever the mode; mode="r" returns R alone
        R = np.linalg.qr(blk if R is None else np.vstack([R, blk]), mode="r")  # type: ignore[assignment]
    if R is None:
        raise ValueError("a matrix without rows has no SVD")
    return np.linalg.svd(R, compute_uv=False)


def _gram_limit(N: int, M: int, lam_max: float) -> float:
    """Smallest eigenvalue whose Gram value is kept: relative error <= GRAM_RTOL and absolute
    (in nu) <= ACCURACY_C (N + M) eps64 nu_max."""
    dlam = (N + M) * _EPS64 * lam_max
    return max(dlam / (2.0 * GRAM_RTOL), lam_max / (4.0 * ACCURACY_C**2))


def _below_gram_limit(sv: np.ndarray, N: int, M: int) -> bool:
    """Whether nonzero Gram-path singular values (descending) reach below
    :func:`_gram_limit`: the values the Ritz step (or the SVD) must recompute."""
    return bool(sv.size) and sv[0] > 0.0 and sv[-1] ** 2 < _gram_limit(N, M, sv[0] ** 2)


def _gram_trustworthy(sv: np.ndarray, N: int, M: int, tolerances: Sequence[float]) -> bool:
    """Whether Gram-path singular values all meet :func:`_gram_limit` and none sits within
    their error of a rank tolerance."""
    if sv.size == 0 or sv[0] == 0.0 or _below_gram_limit(sv, N, M):
        return False
    return not _near(sv, tolerances, 2.0 * GRAM_RTOL * np.asarray(tolerances)[:, None])


def _near(sv: np.ndarray, tolerances: Sequence[float], band) -> bool:
    """Whether any value lies within ``band`` (per tolerance, or per tolerance and value) of
    any tolerance."""
    if not len(tolerances):
        return False
    t = np.asarray(tolerances)[:, None]
    return bool(np.any(np.abs(sv[None, :] - t) <= band))


def _settle(
    rows: _Rows, sv: np.ndarray, lam: np.ndarray, G: np.ndarray, trd, lapack, tols: List[float]
) -> Tuple[np.ndarray, str]:
    """The "auto" decision after the Gram eigenvalues: keep them, add the Ritz step, or fall
    back to the SVD (module docstring); ``tols``: every rank tolerance, in sv's units."""
    N, M = rows.N, rows.M
    if _gram_trustworthy(sv, N, M, tols):
        return sv, "gram"
    if not _below_gram_limit(sv, N, M):
        return _exact(rows), "gram>svd"  # accurate, but a value sits on a rank tolerance
    k = _cluster(lam, N, M) if trd is not None else None
    if k is None or (rows.whole is None and 2 * N * k > M * M):
        return _exact(rows), "gram>svd"
    ritz = _ritz(rows, G, trd, lam, k, lapack)
    if ritz is not None:
        s, err = ritz
        ref = (N + M) * _EPS64 * sv[0]  # numpy's SVD's own error, in the same model
        limit = ACCURACY_C * (N + M) * _EPS64 * sv[0]
        kept = sv[: M - k]
        if (
            err.max() + ref <= limit
            and not _near(s, tols, err[None, :] + ref)
            and not _near(kept, tols, 2.0 * GRAM_RTOL * np.asarray(tols)[:, None])
        ):
            return np.concatenate([kept, s]), "gram+ritz"
    return _exact(rows), "gram+ritz>svd"


def _cluster(lam: np.ndarray, N: int, M: int) -> Optional[int]:
    """How many of the smallest eigenvalues (ascending ``lam``) the Ritz step recomputes: the
    j0 below :func:`_gram_limit`, plus a margin up to the largest gap lambda_{k+1} - lambda_k
    for k in [j0, j0 + max(4, j0 / 4)]; None where that would exceed ``RITZ_MAX_FRACTION``
    of M."""
    j0 = int(np.searchsorted(lam, _gram_limit(N, M, lam[-1])))
    lo = max(j0, 1)
    hi = min(j0 + max(4, j0 // 4), M - 1, int(RITZ_MAX_FRACTION * M))
    if lo > hi:
        return None
    ks = np.arange(lo, hi + 1)
    return int(ks[np.argmax(lam[ks] - lam[ks - 1])])


def _ritz(
    rows: _Rows, G: np.ndarray, trd, lam: np.ndarray, k: int, lapack
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Rayleigh–Ritz for the k smallest eigenvalues: the Ritz values (descending) and each
    one's error bound (module docstring), or None where the bound cannot be formed."""
    N, M = rows.N, rows.M
    d, e, tau = trd
    Zt = lapack.stein(d, e, lam[:k])
    if Zt is None:
        return None
    V = lapack.ormtr(G, tau, Zt).T  # M x k, orthonormal columns
    Y = np.empty((N, k))
    for a, b, blk in rows.blocks():
        np.matmul(blk, V, out=Y[a:b])
    P, s, Ft = np.linalg.svd(Y, full_matrices=False)
    R = -(V @ Ft.T) * s  # - X S
    for a, b, blk in rows.blocks():
        R += blk.T @ P[a:b]
    lam_max = float(lam[-1])
    nu_max = np.sqrt(lam_max)
    e1 = (N + M) * _EPS64 * nu_max
    h = float(np.linalg.norm(R * s)) + e1 * s[0]
    nxt = np.sqrt(max(lam[k] - (N + M) * _EPS64 * lam_max, 0.0)) - e1
    eta = max(nxt, 0.0) ** 2 - h - s[0] ** 2
    if not eta > 0:
        return None
    beta = h * h / eta
    theta = s * s
    err = np.maximum(np.sqrt(theta + beta) - s, s - np.sqrt(np.maximum(theta - beta, 0.0))) + e1
    return s, err


def batch_size(M: int, device: Optional[str] = None) -> int:
    """How many matrices with M columns (after orienting) :func:`singular_values_many` should
    take at once so that their LAPACK call releases the GIL (1 where it does anyway)."""
    if device is not None or M >= GIL_FREE_OUTPUT or M < 1 or _lapack.backend() is not None:
        return 1
    return -(-GIL_FREE_OUTPUT // M)


def singular_values_many(
    Ws: Sequence,
    eps: Sequence[float],
    loose_tol: float = 1e-3,
    method: str = "auto",
    device: Optional[str] = None,
    noise_estimates: Optional[Sequence[float]] = None,
    parallel: Optional[Parallel] = None,
    noise_dtypes: Optional[Sequence[Optional[str]]] = None,
) -> List[Optional[Spectrum]]:
    """:func:`singular_values` of several matrices of one oriented shape (N x M), each with its
    storage ``eps`` (and noise estimate, default 0, or storage dtype whose rounding is
    accumulated from its blocks); None for a matrix with NaN/Inf. Without the LAPACK backend
    they are computed by stacked numpy calls, whose results are those of one call per matrix,
    bit for bit (the gufunc runs the same LAPACK routine on each); the point is that a stacked
    call over more than 500 values in all releases the GIL (see ``GIL_FREE_OUTPUT``)."""
    if method not in ("auto", "svd", "gram"):
        raise ValueError(f"unknown spectral method {method!r}")
    estimates = [0.0] * len(Ws) if noise_estimates is None else list(noise_estimates)
    dtypes = [None] * len(Ws) if noise_dtypes is None else list(noise_dtypes)
    if len(Ws) <= 1 or device is not None or _lapack.backend() is not None:
        return [
            _or_none(singular_values, W, e, loose_tol, method, device, f, parallel, d)
            for W, e, f, d in zip(Ws, eps, estimates, dtypes)
        ]
    rows = [_or_none(_Rows, W, True, d) for W, d in zip(Ws, dtypes)]
    if any(r is None or r.whole is None for r in rows):
        return [
            None if r is None else singular_values(W, e, loose_tol, method, None, f, None, d)
            for W, e, f, d, r in zip(Ws, eps, estimates, dtypes, rows)
        ]
    N, M = rows[0].N, rows[0].M
    if any((r.N, r.M) != (N, M) for r in rows):
        raise ValueError("singular_values_many needs matrices of one shape")
    stacked = [r.whole for r in rows]
    if method == "svd":
        svs = list(np.linalg.svd(np.stack(stacked), compute_uv=False))
        methods = ["svd"] * len(svs)
    else:
        grams = _empty("gram", (len(Ws), M, M))
        for i, W in enumerate(stacked):
            np.matmul(W.T, W, out=grams[i])
        svs = [_sqrt_desc(row) for row in np.linalg.eigvalsh(grams)]
        methods = ["gram"] * len(svs)
        if method == "auto":
            redo = [
                i
                for i, (sv, r) in enumerate(zip(svs, rows))
                if not _gram_trustworthy(
                    sv, N, M, _scaled_tolerances(r, sv, eps[i], loose_tol, estimates[i])
                )
            ]
            if redo:
                exact = np.linalg.svd(np.stack([stacked[i] for i in redo]), compute_uv=False)
                for i, sv in zip(redo, exact):
                    svs[i], methods[i] = sv, "gram>svd"
    return [
        _spectrum(sv, r, m, e, loose_tol, f)
        for sv, m, e, f, r in zip(svs, methods, eps, estimates, rows)
    ]


def _or_none(fn, *args):
    try:
        return fn(*args)
    except NonFiniteError:
        return None


def _torch_values(
    rows: _Rows, eps: float, loose_tol: float, method: str, device: str, noise_estimate: float
) -> Tuple[np.ndarray, str]:
    """The Gram / SVD paths through torch on ``device`` (float64, the whole scaled matrix)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(rows.dense())).to(device)
    if method != "svd":
        lam = torch.linalg.eigvalsh(t.T @ t).cpu().numpy()
        sv = _sqrt_desc(lam)
        if method == "gram":
            return sv, "gram"
        if _gram_trustworthy(
            sv, rows.N, rows.M, _scaled_tolerances(rows, sv, eps, loose_tol, noise_estimate)
        ):
            return sv, "gram"
        method = "gram>svd"
    return torch.linalg.svdvals(t).cpu().numpy(), method
