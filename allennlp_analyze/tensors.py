"""What every weight source hands to the analysis: tensor metadata first, arrays on demand.

Sources (``allennlp_analyze.sources``) list their tensors as :class:`TensorInfo` without reading
any data, so that selection can decide up front what to analyze, and then load each selected
tensor exactly once through :meth:`WeightSource.load`.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, Tuple

import numpy as np

#: Unit round-off (machine epsilon) of the storage dtypes we meet, as ``np.finfo(dtype).eps``.
#: It sets the noise floor of stored weights and so the numpy / Numerical-Recipes rank tolerances.
DTYPE_EPS = {
    "float64": 2.0**-52,
    "float32": 2.0**-23,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
}


@dataclass(frozen=True)
class TensorInfo:
    """One named parameter of a model, without its data.

    ``shape`` is the parameter's full shape, ``dtype`` its storage dtype name as in
    :data:`DTYPE_EPS` (``"float32"``, ``"bfloat16"`` ...; integer tensors keep their numpy name),
    ``module_type`` the class name of the owning module when known (``"Linear"``, ``"LSTM"``,
    ``"MultiheadAttention"``, ``"Embedding"``, ``"Conv2d"``...), else ``None``.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str
    module_type: Optional[str] = None


class WeightSource(Protocol):
    """A model's weights: a label for reports, the tensor list, and lazy loading."""

    label: str

    def tensors(self) -> Sequence[TensorInfo]:
        """All parameters, in the model's order, without reading their data."""
        ...

    def load(self, name: str) -> np.ndarray:
        """The named tensor as a numpy array of its stored precision (bfloat16 is widened to
        float32 exactly). Raises :class:`~allennlp_analyze.errors.AnalyzeError` if unreadable."""
        ...


class Widened:
    """A read-only view of stored bits (bfloat16, float8) that widens to float32 only what is
    read: slicing (``view[a:b]``, ``view[:, :, i, j]``, ``view.T``) gives another view, and
    ``numpy.asarray(view)`` the widened float32 array of just that part. Sources hand it out for
    transient use, so that a tall matrix is widened block by block rather than copied whole.

    ``raw``: the stored bits (e.g. a memory-mapped uint16 array); ``widen``: bits -> float32,
    exactly."""

    def __init__(self, raw: np.ndarray, widen: Callable[[np.ndarray], np.ndarray]):
        self._raw, self._widen = raw, widen

    shape = property(lambda self: self._raw.shape)
    ndim = property(lambda self: self._raw.ndim)
    size = property(lambda self: self._raw.size)
    nbytes = property(lambda self: self._raw.size * 4)  # of the float32 it widens to
    dtype = np.dtype(np.float32)

    @property
    def T(self) -> "Widened":
        return Widened(self._raw.T, self._widen)

    def __getitem__(self, key) -> "Widened":
        return Widened(self._raw[key], self._widen)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._widen(self._raw)
        return out if dtype is None else out.astype(dtype, copy=False)
