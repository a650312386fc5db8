"""compressed-tensors' integer layouts (what vLLM's llm-compressor writes), per linear layer
``P`` of shape ``out x in`` with ``b`` bits:

* ``pack-quantized``: ``P.weight_packed`` int32 ``(out, words)``: signed codes ``q`` stored as
  ``q + 2**(b-1)``, packed along the input; from compressed-tensors 0.18 densely (code ``i`` at
  bit ``i * b`` of the row's bit stream, ``words = ceil(in * b / 32)``), before word-aligned
  (``32 // b`` codes to a word, ``words = ceil(in / (32 // b))``; the same for b = 2, 4, 8);
  ``P.weight_shape`` ``(out, in)``; ``P.weight_zero_point`` (asymmetric) packed the same way
  along the output axis, ``(words(out), G)``.
* ``naive-quantized`` / ``int-quantized``: ``P.weight`` int8 ``(out, in)`` holding ``q``, and an
  int8 ``P.weight_zero_point`` ``(out, G)`` when asymmetric.

Both: ``P.weight_scale`` ``(out, G)`` (group), ``(out, 1)`` (channel) or one value (tensor),
``P.weight_g_idx`` ``(in,)`` with activation ordering; ``W = (q - z) * s``.
"""

from typing import Callable, Optional, Tuple

import numpy as np

from ...errors import AnalyzeError, escape
from ...quantized import DecodedRows
from .intgrid import (
    WholeArray,
    check_shape,
    group_index,
    grouped_rows,
    unpack_dense,
    unpack_last,
    words,
)

#: Read the codes of rows ``start:stop`` as signed integers, shape (r, in).
CodeReader = Callable[[int, int], np.ndarray]


def packed_words(count: int, bits: int, dense: bool) -> int:
    """int32 words holding ``count`` codes of ``bits`` bits, dense or word-aligned."""
    return -(-count * bits // 32) if dense else -(-count // (32 // bits))


def unpack_codes(packed: np.ndarray, bits: int, count: int, dense: bool) -> np.ndarray:
    """Signed codes (int16) of ``count`` columns from packed uint32 rows."""
    if dense:
        codes = unpack_dense(packed, bits, count)
    else:
        codes = unpack_last(packed, bits)[..., :count]
    return codes.astype(np.int16) - (1 << (bits - 1))


def packing_of(
    name: str, words_per_row: int, columns: int, bits: int, dense_hint: Optional[bool]
) -> bool:
    """True for dense packing, False for word-aligned, from the packed width (the data), the
    library version (``dense_hint``) deciding where both widths agree and the layouts differ."""
    dense, aligned = packed_words(columns, bits, True), packed_words(columns, bits, False)
    fits = [d for d, n in ((True, dense), (False, aligned)) if n == words_per_row]
    if not fits:
        raise AnalyzeError(
            f"{escape(name)} holds {words_per_row} words per row; {columns} "
            f"{bits}-bit codes need {dense} (dense) or {aligned} (word-aligned): "
            "the bit width or the shape is wrong"
        )
    if len(fits) == 1 or 32 % bits == 0 or columns <= 32 // bits:
        return fits[0]
    if dense_hint is None:
        raise AnalyzeError(
            f"{escape(name)}: cannot tell dense from word-aligned {bits}-bit "
            "packing (no compressed-tensors version in the config)"
        )
    return dense_hint


def packed_reader(name: str, packed, shape, bits: int, dense_hint: Optional[bool]) -> CodeReader:
    """A :data:`CodeReader` over ``weight_packed`` (validated against ``shape``)."""
    out, columns = shape
    if len(packed.shape) != 2 or packed.shape[0] != out:
        raise AnalyzeError(
            f"{escape(name)} has shape {tuple(packed.shape)} for a {out} x {columns} weight"
        )
    dense = packing_of(name, packed.shape[1], columns, bits, dense_hint)
    return lambda start, stop: unpack_codes(words(packed[start:stop]), bits, columns, dense)


def packed_zero_points(
    name: str, packed, out: int, groups: int, bits: int, dense_hint: Optional[bool]
) -> np.ndarray:
    """``weight_zero_point`` packed along the output axis -> signed (out, G)."""
    if len(packed.shape) != 2 or packed.shape[1] != groups:
        raise AnalyzeError(
            f"{escape(name)} has shape {tuple(packed.shape)}, expected "
            f"(packed {out} rows, {groups})"
        )
    dense = packing_of(name, packed.shape[0], out, bits, dense_hint)
    return unpack_codes(np.ascontiguousarray(words(packed).T), bits, out, dense).T


def naive_reader(name: str, weight, bits: int) -> CodeReader:
    """A :data:`CodeReader` over an int8 ``weight`` holding the codes themselves."""
    if np.dtype(weight.dtype) != np.int8:
        raise AnalyzeError(f"{escape(name)} is {weight.dtype}, expected int8 codes")
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    def read(start: int, stop: int) -> np.ndarray:
        codes = np.asarray(weight[start:stop]).astype(np.int16)
        if codes.size and (codes.min() < low or codes.max() > high):
            raise AnalyzeError(f"{escape(name)} holds codes outside the {bits}-bit range")
        return codes

    return read


class CTMatrix(WholeArray):
    """One compressed-tensors layer as a QuantizedMatrix: integer codes (``bits`` 1..8), or with
    ``fp8`` the float8 E4M3 values of ``float-quantized`` (``codes`` then reads them as float32,
    exactly), times the scale."""

    note: Optional[str] = None
    bound_reason: Optional[str]
    shape: Tuple[int, int]
    scheme: str

    def __init__(
        self,
        name: str,
        shape,
        codes: CodeReader,
        scale,
        zero_point: Optional[np.ndarray],
        g_idx,
        group_size: Optional[int],
        bits: int,
        roundoff: Optional[float],
        bound_reason: Optional[str],
        fp8: bool = False,
    ):
        out, columns = shape
        scale_shape = tuple(scale.shape)
        if len(scale_shape) <= 1 or scale_shape == (1, 1):
            if int(np.prod(scale_shape)) != 1:
                raise AnalyzeError(
                    f"{escape(name)}.weight_scale has shape {scale_shape} for a "
                    f"{out} x {columns} weight"
                )
            self._tensor, groups = True, 1
        else:
            self._tensor, groups = False, scale_shape[1]
            check_shape(f"{name}.weight_scale", scale_shape, (out, groups), "out x groups")
        if groups > 1 and g_idx is None:
            size = group_size if group_size else -(-columns // groups)
            if size <= 0 or -(-columns // size) != groups:
                raise AnalyzeError(
                    f"{escape(name)}: {groups} scale groups for {columns} input "
                    f"columns in groups of {size}"
                )
        else:
            size = group_size or columns
        self._group = group_index(
            None if g_idx is None else np.asarray(g_idx),
            columns,
            max(size, 1),
            groups,
            f"{name}.weight_g_idx",
        )
        if zero_point is not None:
            zero_point = np.asarray(zero_point).astype(np.int16)
            if zero_point.size == 1:
                zero_point = zero_point.reshape(1, 1)
            elif zero_point.shape != (out, groups):
                raise AnalyzeError(
                    f"{escape(name)}.weight_zero_point has shape "
                    f"{zero_point.shape}, expected {(out, groups)}"
                )
        self._codes, self._scale, self._zeros = codes, scale, zero_point
        self._roundoff, self.bound_reason, self._fp8 = roundoff, bound_reason, fp8
        self.shape = (out, columns)
        kind = "tensor" if self._tensor else ("channel" if groups == 1 else f"g{size}")
        self.scheme = f"ct-fp8-{kind}" if fp8 else f"ct-int{bits}-{kind}"

    def rows(self, start: int, stop: int) -> DecodedRows:
        codes = self._codes(start, stop)
        r = codes.shape[0]
        if self._tensor:
            scale = np.full((r, 1), float(np.asarray(self._scale).reshape(-1)[0]))
        else:
            scale = np.asarray(self._scale[start:stop])
        zeros = self._zeros
        if zeros is not None:
            zeros = np.broadcast_to(zeros, (r, 1)) if zeros.shape == (1, 1) else zeros[start:stop]
        if self._fp8:
            return fp8_rows(codes, scale, self._group, self._roundoff)
        return grouped_rows(codes, zeros, scale, self._group, self._roundoff)


def fp8_reader(name: str, weight) -> CodeReader:
    """A :data:`CodeReader` over a float8 E4M3 ``weight`` (read as float32, exactly)."""
    return lambda start, stop: np.asarray(weight[start:stop], dtype=np.float32)


def e4m3_spacing(values: np.ndarray) -> np.ndarray:
    """The spacing of float8 E4M3 numbers at each value: ``2**(e - 3)`` in binade ``e``,
    ``2**-9`` among the subnormals (below ``2**-6``)."""
    magnitude = np.abs(values.astype(np.float64))
    exponent = np.floor(np.log2(np.maximum(magnitude, 2.0**-6)))
    return np.exp2(exponent - 3)


def fp8_rows(
    values8: np.ndarray, scales: np.ndarray, group: np.ndarray, roundoff: Optional[float]
) -> DecodedRows:
    """``f * s`` for float8 values ``f``: the step is the E4M3 spacing at ``f`` times ``|s|``;
    ``worst`` (round to nearest of ``x / s`` to E4M3, the quotient in precision ``roundoff``)
    ``|s| (spacing / 2 + u (|f| + spacing))``."""
    s = np.asarray(scales, dtype=np.float64)[:, group]
    f = values8.astype(np.float64)
    spacing = e4m3_spacing(f)
    step = spacing * np.abs(s)
    worst = (
        None if roundoff is None else np.abs(s) * (spacing / 2 + roundoff * (np.abs(f) + spacing))
    )
    return DecodedRows(f * s, step, worst)
