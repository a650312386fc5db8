"""What every weight source hands to the analysis: tensor metadata first, arrays on demand.

Sources (``allennlp_analyze.sources``) list their tensors as :class:`TensorInfo` without reading
any data, so that selection can decide up front what to analyze, and then load each selected
tensor exactly once through :meth:`WeightSource.load`.
"""
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Tuple

import numpy as np

from .noise_floor import FORMATS

#: Machine epsilon (spacing at 1, ``np.finfo(dtype).eps``) of the floating-point storage dtypes we
#: analyze (float64, float32, float16, bfloat16, the float8 formats): it sets the numpy /
#: Numerical-Recipes rank tolerances; :data:`~allennlp_analyze.noise_floor.FORMATS` also gives
#: each one's smallest normal exponent, for the noise floor.
DTYPE_EPS = {name: fmt.eps for name, fmt in FORMATS.items()}


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
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str
    module_type: Optional[str] = None
    buffer: Optional[bool] = None
    parts: Tuple[Tuple[str, int], ...] = ()


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
