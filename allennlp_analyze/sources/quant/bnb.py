"""bitsandbytes layers as transformers saves them.

4-bit (NF4, FP4): ``P.weight`` uint8 ``(n / 2, 1)``: the ``n = out * in`` codes of the matrix
flattened row-major, two to a byte, the first in the high nibble; ``P.weight.absmax`` float32,
one per block of ``blocksize`` consecutive codes (blocks cross row ends when ``in`` is not a
multiple); ``P.weight.quant_map`` float32 (16,): the code values in ``[-1, 1]``;
``P.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 bytes of a JSON object
(``quant_type``, ``blocksize``, ``dtype``, ``shape``, and with double quantization
``nested_blocksize``, ``nested_dtype``, ``nested_offset``). Double quantization stores absmax as
uint8 codes of ``P.weight.nested_quant_map`` (256 values) times ``P.weight.nested_absmax``
(float32, one per ``nested_blocksize`` blocks), plus the offset, all in float32.
Element ``k``: ``W = quant_map[code_k] * absmax[k // blocksize]``.

LLM.int8: ``P.weight`` int8 ``(out, in)`` and ``P.SCB`` float32 ``(out,)`` (each row's absmax):
``W = q * SCB / 127``.

Both quantizers round to nearest (bitsandbytes' reference ``quantize_4bit`` buckets the scaled
value by the midpoints of the sorted code table; int8 rounds ``127 w / absmax``), in float32.
"""

import json
import math
from typing import Optional, Tuple

import numpy as np

from ...errors import AnalyzeError, escape
from ...quantized import DecodedRows
from .intgrid import WholeArray, check_shape, grouped_rows

#: float32 unit roundoff: the quantizers' arithmetic.
F32_U = 2.0**-24
#: Most bytes a quant_state JSON may hold (transformers writes about 200).
MAX_STATE = 1 << 16


def code_cells(table: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For each code of a value table in [-1, 1]: the width of the interval of normalized values
    that round to it (midpoints to its sorted neighbours, ±1 at the ends) and the most a value of
    that interval lies from the code (the larger half). Duplicate values (FP4's two zeros) share
    one interval."""
    t = np.asarray(table, dtype=np.float64)
    values = np.unique(t)
    mids = (values[:-1] + values[1:]) / 2
    lo = np.concatenate([[min(-1.0, values[0])], mids])
    hi = np.concatenate([mids, [max(1.0, values[-1])]])
    where = np.searchsorted(values, t)
    width = (hi - lo)[where]
    far = np.maximum(t - lo[where], hi[where] - t)
    return width, far


def read_state(name: str, raw: np.ndarray) -> dict:
    """The JSON quant state packed into a uint8 tensor."""
    data = np.asarray(raw)
    if data.dtype != np.uint8 or data.size > MAX_STATE:
        raise AnalyzeError(f"{escape(name)} is not a packed bitsandbytes quant state")
    try:
        state = json.loads(data.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise AnalyzeError(f"{escape(name)} holds no valid JSON quant state") from None
    if not isinstance(state, dict):
        raise AnalyzeError(f"{escape(name)} holds no JSON object")
    return state


def _positive_int(state: dict, key: str, name: str) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AnalyzeError(
            f"{escape(name)}: quant state {key} {escape(value)} is not a positive integer"
        )
    return value


class FourBitMatrix(WholeArray):
    """A bitsandbytes NF4/FP4 layer as a QuantizedMatrix. ``step`` is the width of the element's
    code cell times its block's absmax; ``worst`` the far end of the cell times absmax, plus the
    error of a double-quantized absmax (half its own 8-bit code cell times the nested absmax) and
    float32 margins."""

    note: Optional[str] = None
    bound_reason: Optional[str] = None
    shape: Tuple[int, int]
    scheme: str

    def __init__(
        self, name: str, weight, absmax, quant_map, state: dict, nested_absmax=None, nested_map=None
    ):
        self.quant_type = state.get("quant_type")
        if self.quant_type not in ("nf4", "fp4"):
            raise AnalyzeError(
                f"{escape(name)}: quant type {escape(self.quant_type)} is not nf4 or fp4"
            )
        shape = state.get("shape")
        if not (
            isinstance(shape, list)
            and len(shape) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise AnalyzeError(
                f"{escape(name)}: quant state shape {escape(shape)} is not a matrix shape"
            )
        out, columns = shape
        n = out * columns
        self.blocksize = _positive_int(state, "blocksize", name)
        if np.dtype(weight.dtype) != np.uint8 or math.prod(weight.shape) != -(-n // 2):
            raise AnalyzeError(
                f"{escape(name)} holds {math.prod(weight.shape)} {weight.dtype} "
                f"values; a {out} x {columns} 4-bit matrix packs into "
                f"{-(-n // 2)} bytes"
            )
        blocks = -(-n // self.blocksize)
        check_shape(f"{name}.absmax", absmax.shape, (blocks,), f"one per {self.blocksize} codes")
        table = np.asarray(quant_map, dtype=np.float32).reshape(-1)
        if table.size != 16 or not np.all(np.isfinite(table)) or np.abs(table).max() > 1:
            raise AnalyzeError(f"{escape(name)}.quant_map is not 16 finite values in [-1, 1]")
        self._table = table.astype(np.float64)
        self._width, self._far = code_cells(table)
        self._nested = nested_absmax is not None
        if self._nested:
            nb = _positive_int(state, "nested_blocksize", name)
            if np.dtype(absmax.dtype) != np.uint8:
                raise AnalyzeError(f"{escape(name)}.absmax must be uint8 codes when nested")
            check_shape(
                f"{name}.nested_absmax",
                nested_absmax.shape,
                (-(-blocks // nb),),
                f"one per {nb} blocks",
            )
            nested_table = np.asarray(nested_map, dtype=np.float32).reshape(-1)
            if nested_table.size != 256 or np.abs(nested_table).max() > 1:
                raise AnalyzeError(f"{escape(name)}.nested_quant_map is not 256 values in [-1, 1]")
            offset = state.get("nested_offset")
            if isinstance(offset, bool) or not isinstance(offset, (int, float)):
                raise AnalyzeError(
                    f"{escape(name)}: nested_offset {escape(offset)} is not a number"
                )
            self._nested_parts = (
                nb,
                np.asarray(nested_absmax, dtype=np.float32),
                nested_table,
                code_cells(nested_table)[1],
                np.float32(offset),
            )
        self._weight, self._absmax = weight, absmax
        self.shape = (out, columns)
        self.scheme = f"{self.quant_type}-b{self.blocksize}"

    def _scales(self, first: int, last: int) -> Tuple[np.ndarray, np.ndarray]:
        """Decoded absmax of blocks ``first:last`` (float32 arithmetic, as bitsandbytes) and
        the bound on its distance to the block's true absmax."""
        raw = np.asarray(self._absmax[first:last])
        if not self._nested:
            return raw.astype(np.float64), np.zeros(raw.shape)
        nb, nested_absmax, table, far, offset = self._nested_parts
        scale = nested_absmax[np.arange(first, last) // nb]
        decoded = (table[raw] * scale).astype(np.float32) + offset  # float32, as the library
        error = far[raw] * np.abs(scale).astype(np.float64) + 4 * F32_U * (
            np.abs(decoded).astype(np.float64) + abs(float(offset))
        )
        return decoded.astype(np.float64), error

    def rows(self, start: int, stop: int) -> DecodedRows:
        columns = self.shape[1]
        k0, k1 = start * columns, stop * columns
        flat = np.asarray(self._weight).reshape(-1)[k0 // 2 : -(-k1 // 2)]
        pairs = np.empty((flat.size, 2), np.uint8)
        pairs[:, 0], pairs[:, 1] = flat >> 4, flat & 0xF
        codes = pairs.reshape(-1)[k0 % 2 : k0 % 2 + (k1 - k0)]
        first, last = k0 // self.blocksize, -(-k1 // self.blocksize)
        absmax, error = self._scales(first, last)
        block = np.arange(k0, k1) // self.blocksize - first
        a, e = absmax[block], error[block]
        values = self._table[codes] * a
        step = self._width[codes] * np.abs(a)
        worst = (
            self._far[codes] * (np.abs(a) + e)
            + np.abs(self._table[codes]) * e
            + 4 * F32_U * np.abs(a)
        )
        r = stop - start
        return DecodedRows(
            values.reshape(r, columns), step.reshape(r, columns), worst.reshape(r, columns)
        )


class Int8RowMatrix(WholeArray):
    """LLM.int8 (``weight`` int8, ``SCB`` row absmax) as a QuantizedMatrix: step ``SCB / 127``,
    worst half a step plus the float32 arithmetic of the quantizer."""

    note: Optional[str] = None
    bound_reason: Optional[str] = None
    scheme: str = "int8-rowwise"
    shape: Tuple[int, int]

    def __init__(self, name: str, weight, scb):
        if np.dtype(weight.dtype) != np.int8 or len(weight.shape) != 2:
            raise AnalyzeError(f"{escape(name)} must be an int8 matrix for LLM.int8")
        check_shape(
            f"{name[: -len('weight')]}SCB", scb.shape, (weight.shape[0],), "one absmax per row"
        )
        self._weight, self._scb = weight, scb
        self.shape = tuple(weight.shape)

    def rows(self, start: int, stop: int) -> DecodedRows:
        codes = np.asarray(self._weight[start:stop])
        scale = np.asarray(self._scb[start:stop], dtype=np.float64)[:, None] / 127
        return grouped_rows(codes, None, scale, np.zeros(self.shape[1], np.int64), F32_U)
