"""Quantized weights as the spectrum reads them: row blocks of dequantized values together with
the quantization step of every element. The noise model (:mod:`.noise_floor`) takes the step
where a floating-point format takes its ulp: variance ``step**2 / 12`` per element for the
estimate, and the per-element worst case ``worst`` for the rigorous bound where the format
guarantees one (round to nearest with a known step), else no bound and a reason.

Decoders (GGUF block types, GPTQ, AWQ, compressed-tensors, bitsandbytes, ONNX QDQ) implement
:class:`QuantizedMatrix`; each is a pure function of the stored arrays, read row block by row
block so that peak memory does not grow with the matrix's height. A quantized convolution
kernel is a :class:`QuantizedKernel`, sliced per position into such matrices.
"""

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Tuple

import numpy as np


@dataclass(frozen=True)
class DecodedRows:
    """Rows ``start:stop`` of a quantized matrix, all float64 of shape (rows, M), oriented out × in
    as the model uses the matrix: ``values`` the dequantized weights; ``step`` the quantization
    step of each element (weights' units); ``worst`` a rigorous bound on ``|w_q - w|`` per element
    where the format guarantees one, else None. ``values`` may also be float32 where that holds
    the decoded values exactly (the decoder's own output: the spectrum widens it as it copies
    the block); ``step`` may be a broadcast view (one value per block)."""

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


def is_quantized(array) -> bool:
    """Whether a loaded tensor is a :class:`QuantizedMatrix` (rather than an array)."""
    return hasattr(array, "rows") and hasattr(array, "scheme")


class QuantizedView:
    """A :class:`QuantizedMatrix` as the spectrum reads it: a 2-D array-like of float64 values
    (``shape``, ``T``, row slices, ``numpy.asarray``) whose reads decode only the rows (or, for
    the transpose, the columns) they cover; :meth:`decode` gives the part's
    :class:`DecodedRows` (values, step, worst in the view's orientation) for the noise model.

    Columns come from the matrix's own ``columns(start, stop)`` where it has one (GGUF: only
    the blocks holding them are decoded), else from its rows decoded in row chunks of about
    ``chunk_elements`` entries, keeping only those columns (memory bounded by the part)."""

    #: ``dtype`` as the spectrum sees it: the values of every quantized format we decode lie in
    #: float32's range (small integer codes times fp16 / fp32 scales), so W^T W cannot
    #: overflow in float64 and no scaling scan is needed.
    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(
        self,
        matrix: QuantizedMatrix,
        transposed: bool = False,
        start: int = 0,
        stop: Optional[int] = None,
        chunk_elements: int = 1 << 20,
    ):
        self.matrix, self._transposed = matrix, transposed
        n = matrix.shape[1] if transposed else matrix.shape[0]
        self._start, self._stop = start, n if stop is None else stop
        self._chunk = chunk_elements

    @property
    def shape(self) -> Tuple[int, int]:
        rows, cols = self.matrix.shape
        return (self._stop - self._start, rows if self._transposed else cols)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def T(self) -> "QuantizedView":
        whole = self.matrix.shape[1] if self._transposed else self.matrix.shape[0]
        if (self._start, self._stop) != (0, whole):
            raise ValueError("only a whole quantized matrix can be transposed")
        return QuantizedView(self.matrix, not self._transposed, chunk_elements=self._chunk)

    def __getitem__(self, key) -> "QuantizedView":
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a quantized matrix is read by contiguous row slices")
        a, b, _ = key.indices(self.shape[0])
        return QuantizedView(
            self.matrix, self._transposed, self._start + a, self._start + max(a, b), self._chunk
        )

    def decode(self) -> DecodedRows:
        """The part's values, steps and worst cases, oriented as the view."""
        if not self._transposed:
            return self.matrix.rows(self._start, self._stop)
        columns = getattr(self.matrix, "columns", None)
        if columns is not None:
            part = columns(self._start, self._stop)
        else:
            part = self._columns_from_rows()
        return DecodedRows(part.values.T, part.step.T, None if part.worst is None else part.worst.T)

    def _columns_from_rows(self) -> DecodedRows:
        """Columns start:stop of the matrix from its rows, decoded chunk by chunk and cut at
        once (only the part itself is kept)."""
        n = self.matrix.shape[0]
        step = max(1, self._chunk // max(1, self.matrix.shape[1]))
        cut = slice(self._start, self._stop)
        values, steps, worst = [], [], []
        bounded = True
        for a in range(0, n, step):
            rows = self.matrix.rows(a, min(a + step, n))
            values.append(rows.values[:, cut].copy())
            steps.append(rows.step[:, cut].copy())
            if rows.worst is None:
                bounded = False
            else:
                worst.append(rows.worst[:, cut].copy())
        return DecodedRows(
            np.concatenate(values),
            np.concatenate(steps),
            np.concatenate(worst) if bounded else None,
        )

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = np.asarray(self.decode().values, dtype=np.float64)
        return values if dtype is None else values.astype(dtype, copy=False)


class QuantizedKernel:
    """A convolution kernel (out, in, *k) stored in a quantization scheme, sliced as a float
    kernel is (:func:`allennlp_analyze.selection.extract`): ``kernel[:, :, i, j]`` is the
    out x in :class:`QuantizedMatrix` at spatial position (i, j), made by ``position`` and
    decoded only as the analysis reads it, in a :class:`QuantizedView`."""

    def __init__(
        self,
        shape: Tuple[int, ...],
        scheme: str,
        position: Callable[[Tuple[int, ...]], QuantizedMatrix],
    ):
        self.shape, self.scheme, self._position = tuple(shape), scheme, position

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key) -> QuantizedView:
        if not (
            isinstance(key, tuple)
            and len(key) == len(self.shape) > 2
            and key[:2] == (slice(None), slice(None))
            and all(isinstance(k, (int, np.integer)) for k in key[2:])
        ):
            raise TypeError("a quantized kernel is read by spatial position: kernel[:, :, i, j]")
        position = tuple(int(k) for k in key[2:])
        if not all(0 <= k < n for k, n in zip(position, self.shape[2:])):
            raise IndexError(f"position {position} is outside a kernel of shape {self.shape}")
        return QuantizedView(self._position(position))


def decoded_as_read(array: Any) -> bool:
    """Whether a readable tensor (:func:`readable`) is quantized: a :class:`QuantizedView` or a
    :class:`QuantizedKernel`, decoded part by part as the analysis reads it (not scanned
    up front)."""
    return isinstance(array, (QuantizedView, QuantizedKernel))


def readable(array: Any) -> Any:
    """A loaded tensor as the analysis reads it: a :class:`QuantizedMatrix` in a
    :class:`QuantizedView`, anything else as it is."""
    return QuantizedView(array) if is_quantized(array) else array
