"""ONNX's QDQ weights: an integer tensor (int8, uint8, int4, uint4...) that a
``DequantizeLinear`` node turns into the weight ``y = (x - zero_point) * scale``, with one scale
(and zero point) for the whole tensor, one per slice along ``axis``, or one per block of
``block_size`` elements along ``axis`` (opset 21).

A QDQ matrix is a :class:`QdqMatrix`; a QDQ convolution kernel (out, in, *k) a
:class:`~allennlp_analyze.quantized.QuantizedKernel` whose positions are :class:`QdqMatrix`, as
a float kernel is sliced into out x in matrices per position. Both keep only the integer codes
(as stored) and their scale and zero point (:class:`QdqCodes`) and dequantize the rows a read
asks for: memory grows with the row block, not the tensor.

Values are dequantized in float64, which holds each ``(x - zero_point) * scale`` exactly (an
integer of at most 16 bits times a float32 / float16 / bfloat16 scale). Each element's
quantization step is ``|scale|``; ONNX's ``QuantizeLinear`` rounds to nearest (ties to even), so
an element within the code range is at most half a step from the weight it was quantized from
(one clipped at the range's ends may be further: the format cannot say).
"""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from ..errors import AnalyzeError
from ..quantized import DecodedRows, QuantizedKernel

#: A part of a tensor: one int or slice per axis.
Index = Tuple[Union[int, slice], ...]


@dataclass(frozen=True)
class Dequantize:
    """A ``DequantizeLinear``'s parameters: the names of its scale and zero-point values (None:
    zero), its ``axis`` and ``block_size`` (0: per tensor or per axis)."""

    scale: str
    zero_point: Optional[str]
    axis: int
    block_size: int


def _fit(
    param: np.ndarray, shape: Tuple[int, ...], axis: int, block_size: int, what: str
) -> Optional[int]:
    """How a scale or zero point fits a tensor of ``shape``: None for one value per tensor,
    else the axis it varies along (per axis, or per block of ``block_size``). An
    :class:`AnalyzeError` (``what`` names the tensor) where its shape does not fit."""
    ndim = len(shape)
    axis = axis + ndim if axis < 0 else axis
    if param.size == 1 and block_size == 0:
        return None
    if not 0 <= axis < ndim:
        raise AnalyzeError(f"{what}: axis {axis} is outside a {ndim}-D tensor")
    if block_size == 0 and param.ndim == 1 and param.shape[0] == shape[axis]:
        return axis
    blocks = -(-shape[axis] // block_size) if block_size > 0 else None
    if blocks is not None and param.shape == tuple(
        blocks if d == axis else n for d, n in enumerate(shape)
    ):
        return axis
    raise AnalyzeError(
        f"{what}: a scale or zero point of shape {param.shape} does not fit a "
        f"tensor of shape {shape} (axis {axis}, block size {block_size})"
    )


def _param_part(
    param: np.ndarray, shape: Tuple[int, ...], axis: Optional[int], block_size: int, index: Index
) -> np.ndarray:
    """A scale or zero point (fitting ``shape`` along ``axis``, :func:`_fit`) broadcast to the
    part ``index`` of the tensor: a view of the part alone, or for blocks the part's own
    values (memory: the part's size)."""
    part_shape = np.broadcast_to(np.bool_(0), shape)[index].shape  # allocates nothing
    if axis is None:
        return np.broadcast_to(param.reshape(()), part_shape)
    if block_size == 0:
        full = np.broadcast_to(
            param.reshape([-1 if d == axis else 1 for d in range(len(shape))]), shape
        )
        return full[index]
    along = index[axis]
    if isinstance(along, slice):
        blocks = np.arange(*along.indices(shape[axis])) // block_size
        basic = index[:axis] + (slice(None),) + index[axis + 1 :]
        # the axis's place once the ints before it are gone
        kept = sum(not isinstance(i, slice) for i in index[:axis])
        return np.take(param[basic], blocks, axis=axis - kept)
    return param[index[:axis] + (int(along) // block_size,) + index[axis + 1 :]]


class QdqCodes:
    """A QDQ tensor as stored: its integer ``codes`` with its ``scale`` and ``zero_point``
    (None: zero), checked to fit on construction; :meth:`decode` dequantizes a part."""

    def __init__(
        self,
        codes: np.ndarray,
        scale: np.ndarray,
        zero_point: Optional[np.ndarray],
        q: Dequantize,
        what: str,
    ):
        if codes.dtype.kind not in "iu":
            raise AnalyzeError(
                f"{what}: DequantizeLinear of {codes.dtype} values is not read (integer codes only)"
            )
        self.codes, self.shape = codes, tuple(int(d) for d in codes.shape)
        self._block = q.block_size
        self._scale = scale.astype(np.float64)
        self._scale_axis = _fit(self._scale, self.shape, q.axis, q.block_size, what)
        self._zero = None if zero_point is None else zero_point.astype(np.float64)
        if self._zero is not None:
            self._zero_axis = _fit(self._zero, self.shape, q.axis, q.block_size, what)

    def decode(self, index: Index) -> Tuple[np.ndarray, np.ndarray]:
        """``(values, step)``, float64 arrays of the part ``index`` of the codes (one int or
        slice per axis): the dequantized weights and each element's quantization step."""
        scale = _param_part(self._scale, self.shape, self._scale_axis, self._block, index)
        values = self.codes[index].astype(np.float64)
        if self._zero is not None:
            values -= _param_part(self._zero, self.shape, self._zero_axis, self._block, index)
        values *= scale
        return values, np.abs(scale)


class QdqMatrix:
    """A QDQ weight (or one matrix of it: a direction, a convolution position) as a
    :class:`~allennlp_analyze.quantized.QuantizedMatrix`, oriented as its record (out x in):
    ``scheme`` ``"qdq-int8"`` and the like; its bound holds for round to nearest within the code
    range (module docstring). ``where`` places it in the stored codes: an int per axis held
    fixed, None at its two axes, the record's rows along ``row_axis`` of them (the other: its
    columns; a transposed matrix has ``row_axis`` the later one)."""

    bound_reason: Optional[str] = None
    note: Optional[str] = None

    def __init__(
        self, codes: QdqCodes, scheme: str, where: Tuple[Optional[int], ...], row_axis: int
    ):
        axes = [d for d, i in enumerate(where) if i is None]
        if len(where) != len(codes.shape) or len(axes) != 2 or row_axis not in axes:
            raise ValueError(f"{where} (rows along {row_axis}) is no matrix of {codes.shape}")
        self._codes, self._where = codes, where
        self._row_axis, self._col_axis = row_axis, axes[0] if axes[1] == row_axis else axes[1]
        self.shape = (codes.shape[self._row_axis], codes.shape[self._col_axis])
        self.scheme = scheme

    def rows(self, start: int, stop: int) -> DecodedRows:
        return self._part(self._row_axis, slice(start, stop))

    def columns(self, start: int, stop: int) -> DecodedRows:
        """Columns ``start:stop`` as rows x (stop - start), as in :meth:`rows`: only they are
        dequantized."""
        return self._part(self._col_axis, slice(start, stop))

    def _part(self, axis: int, cut: slice) -> DecodedRows:
        index = tuple(
            cut if d == axis else slice(None) if i is None else i for d, i in enumerate(self._where)
        )
        values, step = self._codes.decode(index)
        if self._row_axis > self._col_axis:  # the stored axes' order is columns, rows
            values, step = values.T, step.T
        values, step = np.ascontiguousarray(values), np.ascontiguousarray(step)
        return DecodedRows(values, step, step / 2.0)


def qdq_kernel(codes: QdqCodes, scheme: str) -> QuantizedKernel:
    """A QDQ convolution kernel (out, in, *k): each position's out x in :class:`QdqMatrix`."""
    return QuantizedKernel(
        codes.shape, scheme, lambda pos: QdqMatrix(codes, scheme, (None, None) + pos, 0)
    )
