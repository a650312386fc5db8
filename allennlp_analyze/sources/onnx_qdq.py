"""ONNX's QDQ weights: an integer tensor (int8, uint8, int4, uint4...) that a
``DequantizeLinear`` node turns into the weight ``y = (x - zero_point) * scale``, with one scale
(and zero point) for the whole tensor, one per slice along ``axis``, or one per block of
``block_size`` elements along ``axis`` (opset 21).

Values are dequantized in float64, which holds each ``(x - zero_point) * scale`` exactly (an
integer of at most 16 bits times a float32 / float16 / bfloat16 scale). Each element's
quantization step is ``|scale|``; ONNX's ``QuantizeLinear`` rounds to nearest (ties to even), so
an element within the code range is at most half a step from the weight it was quantized from
(one clipped at the range's ends may be further: the format cannot say).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ..errors import AnalyzeError
from ..quantized import DecodedRows


@dataclass(frozen=True)
class Dequantize:
    """A ``DequantizeLinear``'s parameters: the names of its scale and zero-point values (None:
    zero), its ``axis`` and ``block_size`` (0: per tensor or per axis)."""

    scale: str
    zero_point: Optional[str]
    axis: int
    block_size: int


def broadcast(
    param: np.ndarray, shape: Tuple[int, ...], axis: int, block_size: int, what: str
) -> np.ndarray:
    """A scale or zero point of a tensor of ``shape`` broadcast to its shape (a view where it
    can be), or :class:`AnalyzeError` (``what`` names it) where its shape does not fit."""
    ndim = len(shape)
    axis = axis + ndim if axis < 0 else axis
    if param.size == 1 and block_size == 0:
        return np.broadcast_to(param.reshape(()), shape)
    if not 0 <= axis < ndim:
        raise AnalyzeError(f"{what}: axis {axis} is outside a {ndim}-D tensor")
    if block_size == 0 and param.ndim == 1 and param.shape[0] == shape[axis]:
        return np.broadcast_to(param.reshape([-1 if d == axis else 1 for d in range(ndim)]), shape)
    blocks = -(-shape[axis] // block_size) if block_size > 0 else None
    if blocks is not None and param.shape == tuple(
        blocks if d == axis else n for d, n in enumerate(shape)
    ):
        return np.repeat(param, block_size, axis=axis).take(range(shape[axis]), axis=axis)
    raise AnalyzeError(
        f"{what}: a scale or zero point of shape {param.shape} does not fit a "
        f"tensor of shape {shape} (axis {axis}, block size {block_size})"
    )


def dequantize(
    x: np.ndarray, scale: np.ndarray, zero_point: Optional[np.ndarray], q: Dequantize, what: str
) -> Tuple[np.ndarray, np.ndarray]:
    """``(values, step)``, float64 arrays of ``x``'s shape: the dequantized weights and each
    element's quantization step."""
    if x.dtype.kind not in "iu":
        raise AnalyzeError(
            f"{what}: DequantizeLinear of {x.dtype} values is not read (integer codes only)"
        )
    step = np.abs(broadcast(scale.astype(np.float64), x.shape, q.axis, q.block_size, what))
    values = x.astype(np.float64)
    if zero_point is not None:
        values -= broadcast(zero_point.astype(np.float64), x.shape, q.axis, q.block_size, what)
    values *= broadcast(scale.astype(np.float64), x.shape, q.axis, q.block_size, what)
    return values, np.ascontiguousarray(step)


class QdqMatrix:
    """A QDQ weight as a :class:`~allennlp_analyze.quantized.QuantizedMatrix`, oriented as its
    record (out x in): ``scheme`` ``"qdq-int8"`` and the like; its bound holds for round to
    nearest within the code range (module docstring)."""

    bound_reason: Optional[str] = None
    note: Optional[str] = None

    def __init__(self, values: np.ndarray, step: np.ndarray, scheme: str):
        if values.ndim != 2 or values.shape != step.shape:
            raise ValueError(
                f"expected a 2-D matrix and its steps, got {values.shape}, {step.shape}"
            )
        self._values, self._step = values, step
        self.shape = (int(values.shape[0]), int(values.shape[1]))
        self.scheme = scheme

    def rows(self, start: int, stop: int) -> DecodedRows:
        step = self._step[start:stop]
        return DecodedRows(self._values[start:stop], step, step / 2.0)
