"""The noise floor of a stored weight matrix: how large a singular value must be to stand out
from the rounding of W to the dtype it is stored in (float64, float32, float16, bfloat16, fp8).

Model. A stored matrix is W = W_true + E, where E is the rounding (round to nearest) of every
entry to the storage format. Each error is bounded by half an ulp of the stored value,
``|e_ij| <= ulp(w_ij) / 2``, with ``ulp(w) = eps * 2**max(floor(log2 |w|), emin)``: the
spacing of the format in the binade of ``|w|`` (the larger spacing at a power of two, where
the value may have been rounded from above), and the subnormal spacing ``eps * 2**emin`` for
subnormals and stored zeros. ``eps`` is the format's machine epsilon (spacing at 1) and
``emin`` its smallest normal exponent (:data:`FORMATS`). ulp is taken from the stored values,
so a bfloat16 model saved as float32 is treated as float32 storage (its noise floor is then
float32's: the stored dtype is all a file tells us).

From the stored values (:func:`storage_noise`, weights' units):

* ``estimate``, the independent part: treating the e_ij as independent, zero-mean and uniform
  on [-ulp/2, ulp/2], i.e. with variance ``s_ij**2 = ulp(w_ij)**2 / 12``, the spectral norm of
  E is about ``sigma_row + sigma_col``, with ``sigma_row = max_i sqrt(sum_j s_ij**2)`` and
  ``sigma_col = max_j sqrt(sum_i s_ij**2)``: the leading term of the bounds
  ``E||E|| <= C (sigma_row + sigma_col + (sum_ij E e_ij**4)**(1/4))`` (Latala 2005, Proc. AMS
  133) and ``E||E|| <= (1 + d)(sigma_row + sigma_col) + C(d) max_ij s_ij sqrt(log min(N, M))``
  (Bandeira & van Handel 2016, Ann. Probab. 44, rectangular matrices with independent
  symmetric entries), sharp for i.i.d. entries (Bai-Yin: ``s (sqrt(N) + sqrt(M))``). An
  estimate, not a bound: measured (tests) 1.10-1.22 x the exact ||W_stored - W_true||_2 on
  Gaussian matrices in every dtype, 1.4-1.6 x on rank-3 products, 1.4-3.1 x on Student-t(3)
  entries, 1.2-2.9 x on MiniLM's real weights rounded to bf16 / fp16 (it errs high where a
  few rows or columns hold outsized entries);
* ``bound`` (the record's ``noise_bound``): ``||E||_2 <= sqrt(||E||_1 ||E||_inf)`` with
  ``|e_ij| <= ulp(w_ij) / 2``, i.e. ``sqrt(max_j sum_i ulp_ij / 2 * max_i sum_j ulp_ij / 2)``:
  rigorous for round-to-nearest storage, and loose (9-30 x ||E||_2 on the matrices above). By
  Weyl's inequality no singular value of W moved by more than this.

Rounding is not independent of W, though: the relative error of fl(x) depends on where x falls
between grid points, i.e. on the fractional part of log2 |x|, and has an O(eps**2) mean and
slow O(eps**2) components in it (a mean of 0.09 eps**2 for log-uniform mantissas). For a matrix
dominated by one rank-one term nu_1 u v^T, log2 |x_ij| = log2 |u_i| + log2 |v_j| + const, so
those components are themselves rank-one terms of size ~eps**2 nu_1 and add up coherently: an
exactly rank-1 product rounded to float8 has rounding singular values up to 2-7 x the
independent estimate (growing with the size), and 0.2-0.6 eps**2 (nu_1 - nu_2) above it. A
second term of comparable size breaks the additivity (rank 3 and more: no excess measured). So

    noise_floor = max(estimate + eps**2 (nu_1 - nu_2),  nu_1 max(N, M) eps64)

(:func:`noise_floor`, the record's ``noise_floor`` and the tolerance of ``rank_noise``): the
coherent term costs nothing where the top singular values cluster (random and trained weights),
and the second term is the float64 round-off of the spectrum itself, numpy's tolerance with
float64's eps, which exceeds float64 storage's rounding (so for float64 rank_noise is numpy's
rank). Known gap: rank-1 products of factors whose log2 |.| modulo 1 is far from uniform
(uniform factors) in bf16 / fp16 with thousands of rows show rounding singular values a few
percent above the floor.

Quantized weights (:mod:`allennlp_analyze.quantized`: GGUF's block types, and the other
decoders of that protocol) take the same model with the quantization step in place of the ulp
(:class:`QuantizationNoiseAccumulator`): per element the step of its block or sub-block
(variance ``step**2 / 12``: the same ``sigma_row + sigma_col`` estimate) and, where the format
guarantees round to nearest with a known step, the decoder's per-element worst case for the
bound; where it does not (K-quants' clamped codes, codebook types), the bound is None with the
reason. Measured against the exact error W_q - W (float64) of ``gguf.quants.quantize``
(tests/test_gguf.py): the estimate is 1.10-1.38 x ||E||_2 on Gaussian, rank-3 and MiniLM
matrices in Q8_0, Q5_0, Q5_1, Q4_0 and Q4_1 (1.3-2.1 x on Student-t(3) entries), the bound
12-31 x. There is no machine epsilon (:func:`~allennlp_analyze.tensors.storage_eps` is 0): the
floor is ``max(estimate, nu_1 max(N, M) eps64)``, and numpy's / NR's ranks are null.

The stored-value sums (per-row and per-column sums of ulp**2 and ulp) accumulate over row blocks
of W (:class:`NoiseAccumulator`: ``update(block)`` per block, then ``result()``);
:func:`storage_noise` runs the same accumulator over row blocks of a whole matrix. Sums are in
float64, in units of the largest binade seen (powers of two: exact rescaling), so that neither
tiny nor huge float64 weights underflow or overflow.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from .quantized import DecodedRows

_EPS64 = 2.0**-52
#: Rows are fed to the accumulator in blocks of about this many entries, whatever the matrix's
#: size: float64 working copies of 512 KiB, which stay in a core's cache between the passes.
BLOCK_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class StorageFormat:
    """A floating-point storage format: ``eps`` = spacing of the values at 1 (``2**-p`` for p
    stored mantissa bits), ``emin`` = exponent of its smallest normal number."""

    name: str
    eps: float
    emin: int


#: The storage formats we read, by dtype name (numpy's / torch's names).
FORMATS: Dict[str, StorageFormat] = {
    f.name: f
    for f in (
        StorageFormat("float64", 2.0**-52, -1022),
        StorageFormat("float32", 2.0**-23, -126),
        StorageFormat("float16", 2.0**-10, -14),
        StorageFormat("bfloat16", 2.0**-7, -126),
        StorageFormat("float8_e4m3fn", 2.0**-3, -6),  # safetensors F8_E4M3; max 448, no inf
        StorageFormat("float8_e5m2", 2.0**-2, -14),  # safetensors F8_E5M2; IEEE-like
        StorageFormat("float8_e4m3fnuz", 2.0**-3, -7),  # torch only: bias 8, no -0, no inf
        StorageFormat("float8_e5m2fnuz", 2.0**-2, -15),  # torch only: bias 16
    )
}

#: Exponent-field masks of the arrays we may hold stored values in (the values of every narrower
#: format are normal numbers of float32, which holds them exactly).
_EXPONENT_MASK: Dict[np.dtype, np.unsignedinteger] = {
    np.dtype(np.float64): np.uint64(0x7FF0000000000000),
    np.dtype(np.float32): np.uint32(0x7F800000),
    np.dtype(np.float16): np.uint16(0x7C00),
}


@dataclass(frozen=True)
class StorageNoise:
    """The rounding E of a stored matrix (weights' units): the independent-entries ``estimate``
    of ||E||_2 and a rigorous upper ``bound`` on it (module docstring); ``bound`` is None where
    the storage guarantees no per-element error (quantized formats: ``bound_reason`` says
    why)."""

    estimate: float
    bound: Optional[float]
    bound_reason: Optional[str] = None


def binade(values: np.ndarray, fmt: StorageFormat) -> np.ndarray:
    """``2**max(floor(log2 |w|), emin)`` per entry, as float64 (so ``ulp = eps * binade``).
    ``values`` hold values of ``fmt`` in a float16, float32 or float64 array."""
    values = np.asarray(values)
    if not values.dtype.isnative:  # e.g. a big-endian .npy file's array
        values = values.astype(values.dtype.newbyteorder("="))
    mask = _EXPONENT_MASK.get(values.dtype)
    if mask is None:
        raise ValueError(f"cannot take the ulp of a {values.dtype} array")
    if not values.flags.c_contiguous:
        values = np.ascontiguousarray(values)
    # the exponent field alone is the power of two of the binade (0 for zeros and subnormals
    # of the array's dtype, which the max with 2**emin then covers)
    power = (values.view(mask.dtype) & mask).view(values.dtype).astype(np.float64)
    return np.fmax(power, 2.0**fmt.emin, out=power)


def ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of storage format ``dtype`` at each stored value (float64; see module
    docstring): ``|w_true - w_stored| <= ulp / 2`` under round to nearest."""
    fmt = FORMATS[dtype]
    return binade(values, fmt) * fmt.eps


class NoiseAccumulator:
    """The rounding of an N x M stored matrix of dtype ``dtype``, fed row blocks (any number
    of rows, all M columns, in any order) with :meth:`update`; :meth:`result` gives the
    :class:`StorageNoise` of the rows seen (the same whatever the blocking, to round-off)."""

    def __init__(self, dtype: str, ncols: int):
        self._fmt = FORMATS[dtype]
        self._scale = 0.0  # power of two: the unit of the sums below
        self._col_sq = np.zeros(ncols)  # sum_i binade_ij**2 / scale**2, per column
        self._col_abs = np.zeros(ncols)  # sum_i binade_ij / scale, per column
        self._row_sq = 0.0  # max_i sum_j binade_ij**2 / scale**2
        self._row_abs = 0.0  # max_i sum_j binade_ij / scale
        self.rows = 0

    def update(self, block: np.ndarray) -> None:
        """Add rows ``block`` (k x M, stored values) to the sums."""
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[1] != self._col_sq.size:
            raise ValueError(f"expected a block of {self._col_sq.size} columns, got {block.shape}")
        if block.size == 0:
            return
        q = binade(block, self._fmt)
        if block.dtype == np.float64 or self._scale == 0.0:
            # the unit is the largest binade seen (squares of float64's binades would leave its
            # range; narrower dtypes' squares, 2**-298 to 2**256, never do, so 1 serves them)
            top = float(q.max()) if block.dtype == np.float64 else 1.0
            if top > self._scale:  # rescale the sums to the new unit (exact: powers of two)
                ratio = self._scale / top
                self._col_sq *= ratio * ratio
                self._col_abs *= ratio
                self._row_sq *= ratio * ratio
                self._row_abs *= ratio
                self._scale = top
        if self._scale != 1.0:
            q *= 1.0 / self._scale
        # row and column sums as matrix-vector products (one pass each, no temporaries)
        ones_r, ones_c = np.ones(q.shape[0]), np.ones(q.shape[1])
        self._col_abs += ones_r @ q
        self._row_abs = max(self._row_abs, float((q @ ones_c).max()))
        np.multiply(q, q, out=q)
        self._col_sq += ones_r @ q
        self._row_sq = max(self._row_sq, float((q @ ones_c).max()))
        self.rows += block.shape[0]

    def result(self) -> StorageNoise:
        """The :class:`StorageNoise` of the rows added so far (zeros before any)."""
        if self.rows == 0:
            return StorageNoise(0.0, 0.0)
        unit = self._scale * self._fmt.eps  # ulp = unit * (binade / scale)
        estimate = unit * (np.sqrt(self._row_sq / 12.0) + np.sqrt(self._col_sq.max() / 12.0))
        bound = unit / 2.0 * np.sqrt(self._row_abs * self._col_abs.max())
        return StorageNoise(float(estimate), float(bound))


class QuantizationNoiseAccumulator:
    """The quantization error of an N x M quantized matrix, fed row blocks of its
    :class:`~allennlp_analyze.quantized.DecodedRows` with :meth:`update`. The model is the
    storage rounding's, with the quantization step in place of the ulp: per element variance
    ``step**2 / 12`` (the estimate ``sigma_row + sigma_col``) and the per-element worst case
    ``|e_ij| <= worst_ij`` (the bound ``sqrt(max_j sum_i worst_ij * max_i sum_j worst_ij)``)
    where the format guarantees one; else the bound is None and ``bound_reason`` says why.
    Values of quantized formats lie in float32's range, so the sums need no rescaling."""

    def __init__(self, ncols: int, bound_reason: Optional[str] = None):
        self._col_sq = np.zeros(ncols)  # sum_i step_ij**2, per column
        self._col_abs = np.zeros(ncols)  # sum_i worst_ij, per column
        self._row_sq = 0.0  # max_i sum_j step_ij**2
        self._row_abs = 0.0  # max_i sum_j worst_ij
        self._reason = bound_reason
        self._buffer: Optional[np.ndarray] = None  # step**2 of a block, reused
        self.rows = 0

    def update(self, block: DecodedRows) -> None:
        """Add the rows of ``block`` (k x M) to the sums. A block that is the transpose of a
        C-ordered array (a wide matrix read by columns) is summed in that array's order."""
        step = np.asarray(block.step, dtype=np.float64)
        if step.ndim != 2 or step.shape[1] != self._col_sq.size:
            raise ValueError(f"expected a block of {self._col_sq.size} columns, got {step.shape}")
        if step.size == 0:
            return
        flipped = not step.flags.c_contiguous and step.T.flags.c_contiguous
        if flipped:
            step = step.T  # M x k: its rows are this block's columns
        if self._buffer is None or self._buffer.size < step.size:
            self._buffer = np.empty(step.size)
        sq = np.multiply(step, step, out=self._buffer[: step.size].reshape(step.shape))
        col_sq, row_sq = self._sums(sq, flipped)
        self._col_sq += col_sq
        self._row_sq = max(self._row_sq, row_sq)
        if block.worst is None:
            self._reason = self._reason or "the format gives no per-element error bound"
        elif self._reason is None:
            worst = np.asarray(block.worst, dtype=np.float64)
            col_abs, row_abs = self._sums(worst.T if flipped else worst, flipped)
            self._col_abs += col_abs
            self._row_abs = max(self._row_abs, row_abs)
        self.rows += block.step.shape[0]

    @staticmethod
    def _sums(a: np.ndarray, flipped: bool) -> Tuple[np.ndarray, float]:
        """Per-column sums and the largest row sum of the block that ``a`` holds (``a`` is
        the block's transpose where ``flipped``), as matrix-vector products."""
        ones_r, ones_c = np.ones(a.shape[0]), np.ones(a.shape[1])
        if flipped:
            return a @ ones_c, float((ones_r @ a).max())
        return ones_r @ a, float((a @ ones_c).max())

    def result(self) -> StorageNoise:
        """The :class:`StorageNoise` of the rows added so far (zeros before any)."""
        if self.rows == 0:
            return StorageNoise(0.0, 0.0 if self._reason is None else None, self._reason)
        estimate = np.sqrt(self._row_sq / 12.0) + np.sqrt(self._col_sq.max() / 12.0)
        if self._reason is not None:
            return StorageNoise(float(estimate), None, self._reason)
        bound = np.sqrt(self._row_abs * self._col_abs.max())
        return StorageNoise(float(estimate), float(bound))


def storage_noise(W: np.ndarray, dtype: str) -> StorageNoise:
    """The :class:`StorageNoise` of a 2-D matrix ``W`` of stored values of ``dtype`` (any
    orientation: both numbers are symmetric in rows and columns), through
    :class:`NoiseAccumulator` over row blocks of about ``BLOCK_ELEMENTS`` entries."""
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {W.shape}")
    acc = NoiseAccumulator(dtype, W.shape[1])
    step = max(1, BLOCK_ELEMENTS // max(1, W.shape[1]))
    for start in range(0, W.shape[0], step):
        acc.update(W[start : start + step])
    return acc.result()


def noise_floor(estimate: float, sv: np.ndarray, N: int, M: int, eps: float) -> float:
    """The noise floor (module docstring) of an N x M matrix with singular values ``sv``
    (descending), storage ``eps`` and independent rounding estimate ``estimate``."""
    if sv.size == 0:
        return float(estimate)
    gap = sv[0] - (sv[1] if sv.size > 1 else 0.0)
    return max(float(estimate + eps * eps * gap), float(sv[0] * max(N, M) * _EPS64))
