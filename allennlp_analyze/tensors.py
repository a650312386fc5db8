"""What every weight source hands to the analysis: tensor metadata first, arrays on demand.

Sources (``allennlp_analyze.sources``) list their tensors as :class:`TensorInfo` without reading
any data, so that selection can decide up front what to analyze, and then load each selected
tensor exactly once through :meth:`WeightSource.load`.
"""

import mmap
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, Tuple

import numpy as np

from .noise_floor import FORMATS

#: Machine epsilon (spacing at 1, ``np.finfo(dtype).eps``) of the floating-point storage dtypes we
#: analyze (float64, float32, float16, bfloat16, the float8 formats): it sets the numpy /
#: Numerical-Recipes rank tolerances; :data:`~allennlp_analyze.noise_floor.FORMATS` also gives
#: each one's smallest normal exponent, for the noise floor.
DTYPE_EPS = {name: fmt.eps for name, fmt in FORMATS.items()}


def storage_eps(dtype: str) -> float:
    """Machine epsilon of storage ``dtype`` (:data:`DTYPE_EPS`); 0 for a quantization scheme
    (``"Q4_K"``...): no floating-point grid, its noise is its quantization step's
    (:mod:`allennlp_analyze.quantized`), and numpy's / NR's eps-based ranks say nothing."""
    return DTYPE_EPS.get(dtype, 0.0)


@dataclass(frozen=True)
class TensorInfo:
    """One named parameter of a model, without its data.

    ``shape`` is the parameter's full shape, ``dtype`` its storage dtype name as in
    :data:`DTYPE_EPS` (``"float32"``, ``"bfloat16"`` ...; integer tensors keep their numpy name),
    ``module_type`` the class name of the owning module when known (``"Linear"``, ``"LSTM"``,
    ``"MultiheadAttention"``, ``"Embedding"``, ``"Conv2d"``...), else ``None``.
    Sources that know the module fill ``buffer`` (True for a registered buffer, False for a
    parameter) and ``parts``: the row blocks ``((label, rows), ...)`` of a fused weight whose
    module says how it is split (AllenNLP's ``_combined_projection``: q, k, v of the attention
    and values sizes). :mod:`allennlp_analyze.kinds` reads them as the best evidence.
    ``quantized``: ``dtype`` names a quantization scheme (``"Q4_K"``), and :meth:`WeightSource.load`
    gives a :class:`~allennlp_analyze.quantized.QuantizedMatrix`; ``stored_name``: the name in
    the file where the source maps it to another (GGUF's ``blk.0.attn_q.weight``).
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str
    module_type: Optional[str] = None
    buffer: Optional[bool] = None
    parts: Tuple[Tuple[str, int], ...] = ()
    quantized: bool = False
    stored_name: Optional[str] = None


class WeightSource(Protocol):
    """A model's weights: a label for reports, the tensor list, and lazy loading."""

    label: str

    def tensors(self) -> Sequence[TensorInfo]:
        """All parameters, in the model's order, without reading their data."""
        ...

    def load(self, name: str) -> np.ndarray:
        """The named tensor as a numpy array of its stored precision (bfloat16 and float8 are
        widened to float32 exactly). Raises :class:`~allennlp_analyze.errors.AnalyzeError` if
        unreadable."""
        ...


class Mapped:
    """A memory-mapped tensor as stored, read-only, for transient use by the analysis.

    Slicing (``view[a:b]``, ``view[:, :, i, j]``, ``view.T``) gives another view and reads
    nothing; ``numpy.asarray(view)`` reads just that part, widened to float32 (exactly) where the
    storage is bfloat16 or float8 (``widen``: stored bits -> float32); ``release()`` drops the
    pages of a contiguous part from the process's memory once it has been copied (they stay in
    the OS page cache). A tall matrix is thus read and widened block by block, and its pages do
    not pile up in the process's resident memory."""

    def __init__(
        self,
        raw: np.ndarray,
        widen: Optional[Callable[[np.ndarray], np.ndarray]] = None,
        mapping=None,
    ):
        self._raw, self._widen, self._mapping = raw, widen, mapping

    shape = property(lambda self: self._raw.shape)
    ndim = property(lambda self: self._raw.ndim)
    size = property(lambda self: self._raw.size)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self._widen is not None else self._raw.dtype

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def T(self) -> "Mapped":
        return Mapped(self._raw.T, self._widen, self._mapping)

    def __getitem__(self, key) -> "Mapped":
        return Mapped(self._raw[key], self._widen, self._mapping)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._raw if self._widen is None else self._widen(self._raw)
        if copy and out is self._raw:
            out = out.copy()
        return out if dtype is None else out.astype(dtype, copy=False)

    def release(self) -> None:
        """Drop the memory pages that lie wholly inside this (contiguous) part."""
        m = self._mapping
        if m is None or not self._raw.flags.c_contiguous or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin = self._raw.ctypes.data - np.frombuffer(m, dtype=np.uint8, count=1).ctypes.data
        page = mmap.PAGESIZE
        lo, hi = -(-begin // page) * page, (begin + self._raw.nbytes) // page * page
        if hi > lo:
            m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
