"""Helpers shared by the integer-grid decoders: bit unpacking of int32 words, the unit roundoff
of a scale's storage dtype, validation of side arrays, and ``(q - z) * s`` by column group.

All functions are vectorized numpy over whole row blocks (no Python loop over groups)."""

from typing import Optional, Sequence, Tuple

import numpy as np

from ...errors import AnalyzeError, escape
from ...quantized import DecodedRows

#: Unit roundoff (half the spacing at 1) of the dtypes a scale is stored in: a stored scale is
#: within this relative distance of the value the quantizer computed.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def unit_roundoff(dtype: str, what: str) -> float:
    """The unit roundoff of a floating scale dtype; AnalyzeError for anything else."""
    try:
        return UNIT_ROUNDOFF[dtype]
    except KeyError:
        raise AnalyzeError(
            f"{escape(what)} is stored as {escape(dtype)}, not as a floating-point scale"
        ) from None


def words(array) -> np.ndarray:
    """An int32/uint32 array (or memory-mapped view) read as uint32 words."""
    out = np.asarray(array)
    if out.dtype not in (np.int32, np.uint32):
        raise AnalyzeError(f"packed words must be int32, got {out.dtype}")
    return out.view(np.uint32)


def unpack_last(packed: np.ndarray, bits: int) -> np.ndarray:
    """Codes of ``bits`` bits, ``32 // bits`` per uint32 word, least significant first, along
    the last axis: shape ``(..., n)`` -> ``(..., n * (32 // bits))`` uint8 (the word-aligned
    packing of GPTQ, AWQ and compressed-tensors before 0.18)."""
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint32) * bits
    codes = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per).astype(np.uint8)


def unpack_dense(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes of a dense bit stream along the last axis (code ``i`` at bit
    ``i * bits`` of the little-endian word sequence, crossing word boundaries: compressed-tensors
    0.18 and later): ``(..., n)`` uint32 -> ``(..., count)`` uint8."""
    if 32 % bits == 0:
        return unpack_last(packed, bits)[..., :count]
    start = np.arange(count, dtype=np.int64) * bits
    word, offset = start // 32, (start % 32).astype(np.uint64)
    padded = np.concatenate([packed, np.zeros(packed.shape[:-1] + (1,), np.uint32)], axis=-1)
    pair = padded[..., word].astype(np.uint64) | (padded[..., word + 1].astype(np.uint64) << 32)
    return ((pair >> offset) & np.uint64((1 << bits) - 1)).astype(np.uint8)


def check_shape(name: str, shape: Sequence[int], expected: Tuple[int, ...], why: str) -> None:
    """AnalyzeError naming the side tensor when its shape is not ``expected``."""
    if tuple(shape) != tuple(expected):
        raise AnalyzeError(f"{escape(name)} has shape {tuple(shape)}, expected {expected} ({why})")


def group_index(
    g_idx: Optional[np.ndarray], columns: int, group_size: int, groups: int, name: str
) -> np.ndarray:
    """The group of each input column: ``g_idx`` as stored (act-order: any permutation) after
    checking its length and range, else ``column // group_size``."""
    if g_idx is None:
        index = np.arange(columns, dtype=np.int64) // group_size
    else:
        index = np.asarray(g_idx).astype(np.int64).reshape(-1)
        if index.size != columns:
            raise AnalyzeError(
                f"{escape(name)} has {index.size} entries for {columns} input columns"
            )
    if index.size and (index.min() < 0 or index.max() >= groups):
        raise AnalyzeError(
            f"{escape(name)} names groups {int(index.min())}..{int(index.max())}, "
            f"the scales hold {groups}"
        )
    return index


def grouped_rows(
    codes: np.ndarray,
    zeros: Optional[np.ndarray],
    scales: np.ndarray,
    group: np.ndarray,
    roundoff: Optional[float],
) -> DecodedRows:
    """``(codes - zeros[:, group]) * scales[:, group]`` in float64 for a row block: ``codes``
    (r, M) integers, ``zeros`` (r, G) or None, ``scales`` (r, G) float, ``group`` (M,). The step
    is ``|scale|``. ``roundoff``: None where the quantizer does not round to nearest (no bound),
    else the unit roundoff ``u`` of its arithmetic; then
    ``worst = |s| (1/2 + u (|q - z| + 1) + u (|q| + 1))``: half a step, plus what rounding the
    quotient ``x / s`` (magnitude at most ``|q - z| + 1``) and the sum ``x / s + z`` (magnitude
    at most ``|q| + 1``, signed codes) in that precision can add; this also covers a code clamped
    at the end of its range when the scale and zero came from the range's min/max."""
    s = np.asarray(scales, dtype=np.float64)[:, group]
    signed = codes.astype(np.float64)
    q = signed.copy()
    if zeros is not None:
        q -= np.asarray(zeros, dtype=np.float64)[:, group]
    values = q * s
    step = np.abs(s)
    if roundoff is None:
        return DecodedRows(values, step, None)
    return DecodedRows(values, step, step * (0.5 + roundoff * (np.abs(q) + np.abs(signed) + 2)))


def int_bits(value, what: str, allowed: Sequence[int]) -> int:
    """A bit width from a config, checked against what the decoder supports."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise AnalyzeError(
            f"{escape(what)}: {escape(value)} bits is not supported "
            f"(supported: {', '.join(map(str, allowed))})"
        )
    return value


def config_int(value, what: str) -> Optional[int]:
    """An optional integer from a config (``group_size``...): None stays None; anything but an
    integer is an AnalyzeError naming ``what``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise AnalyzeError(f"{escape(what)} {escape(value)} is not an integer")
    return value


class WholeArray:
    """``numpy.asarray(matrix)``: the whole matrix decoded, float64 out x in (for element-wise
    users such as ``--base``; the spectrum reads row blocks through ``rows``)."""

    shape: Tuple[int, int]

    def rows(self, start: int, stop: int) -> DecodedRows:
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = np.asarray(self.rows(0, self.shape[0]).values, dtype=np.float64)
        return values if dtype is None else values.astype(dtype, copy=False)
