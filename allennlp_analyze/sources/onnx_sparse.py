"""ONNX sparse tensors (``GraphProto.sparse_initializer``, a ``Constant`` node's
``sparse_value``): a ``SparseTensorProto`` holds the dense shape ``dims``, the stored values
(``values``, shape [NNZ]; every other element is zero) and their ``indices``: int64 linear
indices of shape [NNZ], or coordinates of shape [NNZ, rank], ascending (lexicographically)
without repeats. Read as the dense tensor, with the rules of ONNX's checker
(``check_sparse_tensor``): a file that breaks one is an :class:`AnalyzeError` naming it.

:func:`sparse_shape` checks what the message declares (at listing, nothing read);
:func:`densify` checks the indices and builds the dense array, after
:func:`~allennlp_analyze.limits.check_memory` has accepted its size.

Works on the ``onnx`` package's protobuf messages; imports nothing itself.
"""

import math
from typing import Optional, Tuple

import numpy as np

from .. import limits
from ..errors import AnalyzeError

#: ONNX's element type of the indices (the checker takes no other).
INT64 = 7


def sparse_shape(proto, what: str) -> Tuple[int, ...]:
    """The dense shape of the ``SparseTensorProto`` ``proto`` (``what`` names it), its
    declarations checked: values of rank 1, a dense rank above 0 and positive dimensions, int64
    indices of shape [NNZ] or [NNZ, rank], and no more values than elements."""
    shape = tuple(int(d) for d in proto.dims)
    values = tuple(int(d) for d in proto.values.dims)
    if len(values) != 1:
        raise AnalyzeError(f"{what}: its values have shape {list(values)}, not [NNZ]")
    if not shape or any(d <= 0 for d in shape):
        raise AnalyzeError(
            f"{what}: a sparse tensor of dense shape {list(shape)} (ONNX needs positive dimensions)"
        )
    nnz = values[0]
    if nnz > math.prod(shape):
        raise AnalyzeError(
            f"{what}: {nnz} values in a dense shape {list(shape)} of {math.prod(shape)} elements"
        )
    if not proto.HasField("indices"):
        if nnz:
            raise AnalyzeError(f"{what}: {nnz} values and no indices")
        return shape
    indices = proto.indices
    if indices.data_type != INT64:
        raise AnalyzeError(f"{what}: its indices are of ONNX type {indices.data_type}, not int64")
    dims = tuple(int(d) for d in indices.dims)
    if dims not in ((nnz,), (nnz, len(shape))):
        raise AnalyzeError(
            f"{what}: indices of shape {list(dims)} for {nnz} values of a "
            f"{len(shape)}-D tensor (ONNX: [{nnz}] or [{nnz}, {len(shape)}])"
        )
    return shape


def densify(
    values: np.ndarray, indices: Optional[np.ndarray], shape: Tuple[int, ...], what: str
) -> np.ndarray:
    """The dense tensor of ``shape`` (checked by :func:`sparse_shape`) that holds ``values`` at
    ``indices`` (None: no values) and zeros elsewhere, in the values' dtype. Its memory is
    checked before it is allocated; indices out of range, out of order or repeated are an
    :class:`AnalyzeError` naming the first."""
    count = math.prod(shape)
    limits.check_memory(
        count * values.dtype.itemsize, f"{what} (dense {' x '.join(map(str, shape))})"
    )
    dense = np.zeros(count, dtype=values.dtype)
    if indices is None or values.size == 0:
        return dense.reshape(shape)
    linear: np.ndarray
    if indices.ndim == 1:
        bad = np.flatnonzero((indices < 0) | (indices >= count))
        if bad.size:
            raise AnalyzeError(
                f"{what}: index {int(indices[bad[0]])} of value {int(bad[0])} is outside "
                f"its {count} elements"
            )
        linear = indices
    else:
        outside = np.argwhere((indices < 0) | (indices >= np.asarray(shape)))
        if outside.size:
            i, j = (int(k) for k in outside[0])
            raise AnalyzeError(
                f"{what}: index {int(indices[i, j])} of value {i} on axis {j} is outside "
                f"its size {shape[j]}"
            )
        linear = np.ravel_multi_index(tuple(indices.T), shape)
    steps = np.diff(linear)
    if steps.size and not (steps > 0).all():
        i = int(np.argmin(steps > 0)) + 1
        how = "repeats the one before" if steps[i - 1] == 0 else "comes before the one before"
        raise AnalyzeError(f"{what}: the index of value {i} {how} (ONNX: ascending, no repeats)")
    dense[linear] = values
    return dense.reshape(shape)
