"""AutoAWQ's packed layouts (4 bits, asymmetric, per group).

GEMM (``version: gemm``): ``qweight`` int32 ``(in, out / 8)``, eight output columns to a word in
the interleaved order ``[0, 2, 4, 6, 1, 3, 5, 7]`` (nibble ``k`` holds column ``ORDER[k]``);
``qzeros`` int32 ``(G, out / 8)`` packed the same way; ``scales`` float16 ``(G, out)``.
GEMV (``version: gemv``): ``qweight`` int32 ``(out, in / 8)`` packed along the input in natural
order; ``qzeros`` int32 ``(out, Z)`` and ``scales`` ``(out, 8 Z)``, padded past the ``G`` groups.
Element ``W[o, i] = s[g, o] * (q - z)`` with ``g = i // group_size``, zeros stored as they are.

AWQ stores ``W diag(s)`` for activation-aware column scales ``s`` (``1 / s`` folded into the
previous layer) and searches a clipping range: no per-element bound against the trained W."""

from typing import Optional, Tuple

import numpy as np

from ...errors import AnalyzeError, escape
from ...quantized import DecodedRows
from .intgrid import WholeArray, check_shape, group_index, grouped_rows, unpack_last, words

#: Nibble k of a GEMM word holds output column ORDER[k] of its eight.
ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
#: Column c of eight sits in nibble REVERSE[c].
REVERSE = np.argsort(ORDER)
AWQ_NOTE = (
    "AWQ column scaling: the stored matrix is W diag(s) (1/s folded into the previous "
    "layer), rounded after a clipping search; the step is that of the stored matrix"
)
AWQ_NO_BOUND = (
    "AWQ stores column-scaled weights and clips their range: no per-element bound "
    "relative to the trained weights"
)


def _check_groups(name: str, columns: int, group_size: Optional[int]) -> int:
    size = columns if group_size in (None, -1) else group_size
    if size <= 0 or columns % size:
        raise AnalyzeError(
            f"{escape(name)}: {columns} input columns are not whole groups of {size}"
        )
    return size


class AWQMatrix(WholeArray):
    """One AWQ-packed linear layer (GEMM or GEMV layout) as a QuantizedMatrix."""

    bound_reason: Optional[str] = AWQ_NO_BOUND
    note: Optional[str] = AWQ_NOTE
    shape: Tuple[int, int]
    scheme: str

    def __init__(
        self,
        name: str,
        qweight,
        qzeros,
        scales,
        bits: int,
        group_size: Optional[int],
        version: str = "gemm",
    ):
        if bits != 4:
            raise AnalyzeError(f"{escape(name)}: {bits}-bit AWQ is not supported (4 bits is)")
        if version not in ("gemm", "gemv"):
            raise AnalyzeError(
                f"{escape(name)}: the AWQ layout {escape(version)!s} is re-tiled "
                "for a kernel and not supported (gemm and gemv are)"
            )
        if len(qweight.shape) != 2 or len(scales.shape) != 2 or len(qzeros.shape) != 2:
            raise AnalyzeError(f"{escape(name)}: qweight, qzeros and scales must be matrices")
        self._gemm = version == "gemm"
        if self._gemm:
            columns, out = qweight.shape[0], qweight.shape[1] * 8
            if group_size is None and scales.shape[0]:  # not said: the scales' groups
                group_size = columns // scales.shape[0]
            size = _check_groups(name, columns, group_size)
            groups = columns // size
            check_shape(f"{name}.scales", scales.shape, (groups, out), "groups x output")
            check_shape(f"{name}.qzeros", qzeros.shape, (groups, out // 8), "packed zeros")
            zeros = unpack_last(words(qzeros), 4).reshape(groups, -1, 8)[:, :, REVERSE]
            self._zeros = zeros.reshape(groups, out).T  # (out, G)
        else:
            out, columns = qweight.shape[0], qweight.shape[1] * 8
            size = _check_groups(name, columns, 128 if group_size is None else group_size)
            groups = columns // size
            width = qzeros.shape[1]
            if qzeros.shape[0] != out or width * 8 < groups:
                raise AnalyzeError(
                    f"{escape(name)}.qzeros has shape {tuple(qzeros.shape)}, "
                    f"expected ({out}, >= {-(-groups // 8)})"
                )
            check_shape(f"{name}.scales", scales.shape, (out, width * 8), "padded GEMV scales")
            self._zeros = unpack_last(words(qzeros), 4)[:, :groups]  # (out, G)
        self._group = group_index(None, columns, size, groups, name)
        self._qweight, self._scales, self._groups = qweight, scales, groups
        self.shape = (out, columns)
        self.scheme = f"awq-int4-g{size}" if groups > 1 else "awq-int4-channel"

    def rows(self, start: int, stop: int) -> DecodedRows:
        zeros = self._zeros[start:stop]
        if self._gemm:
            lo, hi = start // 8, -(-stop // 8)
            packed = words(self._qweight[:, lo:hi])  # (in, w)
            codes = unpack_last(packed, 4).reshape(packed.shape[0], -1, 8)[:, :, REVERSE]
            codes = codes.reshape(packed.shape[0], -1)[:, start - 8 * lo : stop - 8 * lo].T
            scales = np.asarray(self._scales[:, start:stop]).T
        else:
            codes = unpack_last(words(self._qweight[start:stop]), 4)
            scales = np.asarray(self._scales[start:stop, : self._groups])
        return grouped_rows(codes, zeros, scales, self._group, None)
