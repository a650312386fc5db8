"""GPTQ's packed layout (AutoGPTQ / GPTQModel / optimum, the ``gptq`` checkpoint format).

Per linear layer ``out x in`` with ``b`` bits (2, 4 or 8) and ``G`` groups:
``qweight`` int32 ``(in * b / 32, out)``: input rows packed ``32 / b`` to a word, least
significant bits first; ``qzeros`` int32 ``(G, out * b / 32)``: zero points packed the same way
along the output axis; ``scales`` float16 ``(G, out)``; ``g_idx`` int32 ``(in,)``: the group of
each input column (act-order, ``desc_act``, makes it non-monotone). Element
``W[o, i] = scales[g, o] * (q[i, o] - z[g, o])`` with ``g = g_idx[i]``. Format v1 stores
``z - 1`` (AutoGPTQ's historical offset), v2 (GPTQModel's ``gptq_v2``) stores ``z``.

GPTQ rounds each column after adding the error of the columns before it, so the stored matrix
is not the trained one rounded: no per-element bound relative to the trained weights."""

from typing import Optional, Tuple

import numpy as np

from ...errors import AnalyzeError, escape
from ...quantized import DecodedRows
from .intgrid import WholeArray, check_shape, group_index, grouped_rows, unpack_last, words

GPTQ_NOTE = (
    "GPTQ error feedback: each column was rounded after absorbing the rounding error of "
    "the columns before it, so the stored matrix is not the trained one rounded; the "
    "step describes the grid of the stored matrix, not its distance to the trained one"
)
GPTQ_NO_BOUND = (
    "GPTQ's error feedback moves weights by more than half a step before rounding: "
    "no per-element bound relative to the trained weights"
)


def zero_offset(
    stored: np.ndarray, bits: int, label: Optional[str], sym: Optional[bool], name: str
) -> Tuple[int, str]:
    """The offset to add to the stored zero codes (1 for v1, 0 for v2), and how it was decided.

    The data decide where they can: a symmetric layer's zeros are all ``2**(b-1)`` in v2 and all
    ``2**(b-1) - 1`` in v1, whatever the label says. Otherwise the label (``gptq`` -> v1,
    ``gptq_v2`` -> v2; none -> v1, what transformers and AutoGPTQ write)."""
    mid = 1 << (bits - 1)
    if stored.size and np.all(stored == mid):
        return 0, "v2 (zeros all 2^(b-1): symmetric, stored without offset)"
    if stored.size and np.all(stored == mid - 1):
        return 1, "v1 (zeros all 2^(b-1)-1: symmetric, stored minus one)"
    if sym:
        raise AnalyzeError(
            f"{escape(name)}: the config says symmetric but the zero points are "
            f"not all {mid - 1} (v1) or {mid} (v2)"
        )
    if label in (None, "gptq", "gptq_v1"):
        return 1, "v1 (asymmetric; from the format label)"
    if label == "gptq_v2":
        return 0, "v2 (asymmetric; from the format label)"
    raise AnalyzeError(f"{escape(name)}: unknown GPTQ checkpoint format {escape(label)!s}")


class GPTQMatrix(WholeArray):
    """One GPTQ-packed linear layer as a :class:`~allennlp_analyze.quantized.QuantizedMatrix`
    (out x in, float64 rows)."""

    bound_reason: Optional[str] = GPTQ_NO_BOUND
    note: Optional[str]
    shape: Tuple[int, int]
    scheme: str

    def __init__(
        self,
        name: str,
        qweight,
        qzeros,
        scales,
        g_idx,
        bits: int,
        group_size: Optional[int],
        label: Optional[str] = None,
        sym: Optional[bool] = None,
    ):
        if bits not in (2, 4, 8):
            raise AnalyzeError(
                f"{escape(name)}: {bits}-bit GPTQ packing is not supported "
                "(2, 4 and 8 bits are; 3-bit words straddle columns)"
            )
        if len(qweight.shape) != 2 or len(scales.shape) != 2:
            raise AnalyzeError(f"{escape(name)}: qweight and scales must be matrices")
        packed_rows, out = qweight.shape
        columns = packed_rows * 32 // bits
        groups = scales.shape[0]
        check_shape(f"{name}.scales", scales.shape, (groups, out), "groups x output features")
        if g_idx is None and group_size not in (None, -1):
            if group_size <= 0 or -(-columns // group_size) != groups:
                raise AnalyzeError(
                    f"{escape(name)}: {groups} scale groups for {columns} input "
                    f"columns in groups of {group_size}"
                )
        size = group_size if group_size not in (None, -1) else -(-columns // max(groups, 1))
        self._group = group_index(
            None if g_idx is None else np.asarray(g_idx),
            columns,
            max(size, 1),
            groups,
            f"{name}.g_idx",
        )
        if out * bits % 32:
            raise AnalyzeError(
                f"{escape(name)}: {out} output features do not fill whole "
                f"{bits}-bit zero-point words"
            )
        check_shape(
            f"{name}.qzeros",
            qzeros.shape,
            (groups, out * bits // 32),
            f"{bits}-bit zero points packed along the output features",
        )
        stored = unpack_last(words(qzeros), bits)
        offset, self.convention = zero_offset(stored, bits, label, sym, name)
        self._zeros = stored.astype(np.int16) + offset  # (G, out)
        self._qweight, self._scales, self._bits = qweight, scales, bits
        self.shape = (out, columns)
        self.groups = groups
        act = g_idx is not None and np.any(np.diff(self._group) < 0)
        self.scheme = (
            f"gptq-int{bits}-"
            + (f"g{size}" if groups > 1 else "channel")
            + ("-actorder" if act else "")
        )
        self.note = f"{GPTQ_NOTE}; zero points {self.convention}"

    def rows(self, start: int, stop: int) -> DecodedRows:
        block = words(self._qweight[:, start:stop])  # (in * b / 32, r)
        codes = unpack_last(np.ascontiguousarray(block.T), self._bits)  # (r, in)
        scales = np.asarray(self._scales[:, start:stop]).T
        return grouped_rows(codes, self._zeros[:, start:stop].T, scales, self._group, None)
