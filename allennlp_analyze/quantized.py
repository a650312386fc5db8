"""Quantized weights as the spectrum reads them: row blocks of dequantized values together with
the quantization step of every element. The noise model (:mod:`.noise_floor`) takes the step
where a floating-point format takes its ulp: variance ``step**2 / 12`` per element for the
estimate, and the per-element worst case ``worst`` for the rigorous bound where the format
guarantees one (round to nearest with a known step), else no bound and a reason.

Decoders (GGUF block types, GPTQ, AWQ, compressed-tensors, bitsandbytes, ONNX QDQ) implement
:class:`QuantizedMatrix`; each is a pure function of the stored arrays, read row block by row
block so that peak memory does not grow with the matrix's height.
"""
from dataclasses import dataclass
from typing import Optional, Protocol, Tuple

import numpy as np


@dataclass(frozen=True)
class DecodedRows:
    """Rows ``start:stop`` of a quantized matrix, all float64 of shape (rows, M), oriented out × in
    as the model uses the matrix: ``values`` the dequantized weights; ``step`` the quantization
    step of each element (weights' units); ``worst`` a rigorous bound on ``|w_q - w|`` per element
    where the format guarantees one, else None."""

    values: np.ndarray
    step: np.ndarray
    worst: Optional[np.ndarray]


class QuantizedMatrix(Protocol):
    """A matrix stored in a quantization scheme. ``scheme`` is the record's ``dtype``
    (``"Q4_K"``, ``"gptq-int4-g128"``, ``"nf4-b64"``...); ``bound_reason`` says why the record
    has no rigorous noise bound (None when :meth:`rows` gives ``worst``); ``note`` what the
    stored matrix is relative to the trained one, where it differs (GPTQ error feedback, AWQ
    column scaling)."""

    shape: Tuple[int, int]
    scheme: str
    bound_reason: Optional[str]
    note: Optional[str]

    def rows(self, start: int, stop: int) -> DecodedRows:
        """Decode rows ``start:stop`` (bounded memory: only these rows' stored blocks are read)."""
        ...
