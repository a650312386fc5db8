"""Which parameters become which matrices, and why the others are left out.

Works on tensor metadata only (:class:`~allennlp_analyze.tensors.TensorInfo`), so the whole plan,
its skip counts and the progress total are known before any weight is read; :func:`extract` then
cuts a planned matrix out of its loaded tensor.
"""
import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .options import AnalysisOptions
from .tensors import DTYPE_EPS, TensorInfo

#: Gate names of the stacked recurrent weights, by gate count (PyTorch's order).
RNN_GATES = {4: ("i", "f", "g", "o"), 3: ("r", "z", "n")}
_RNN_WEIGHT = re.compile(r"(?:^|\.)weight_(ih|hh)_l\d+(?:_reverse)?$")
_FUSED_ATTENTION = re.compile(r"(?:^|\.)in_proj_weight$")


@dataclass(frozen=True)
class MatrixPlan:
    """One matrix to analyze: rows ``rows`` (start, stop) of parameter ``param``, or for a
    convolution kernel (out, in, *k) the out x in matrix at spatial index ``position``.
    ``shape`` is the matrix's own shape (before orienting); ``part`` names the fused part or
    the convolution position (the record's ``slice``)."""

    name: str
    param: str
    module_type: Optional[str]
    dtype: str
    shape: Tuple[int, int]
    rows: Optional[Tuple[int, int]] = None
    position: Optional[Tuple[int, ...]] = None
    part: Optional[str] = None


@dataclass
class Selection:
    plans: List[MatrixPlan]
    skipped: Counter


def plan(tensors: Sequence[TensorInfo], options: AnalysisOptions) -> Selection:
    """The matrices to analyze among ``tensors``, with every left-out parameter (or part of one)
    counted by reason."""
    skipped: Counter = Counter()
    plans: List[MatrixPlan] = []
    gates_by_layer = _rnn_gate_counts(tensors)
    for t in tensors:
        reason = _parameter_skip_reason(t, options)
        if reason:
            skipped[reason] += 1
            continue
        for p in _matrices_of(t, options, gates_by_layer):
            reason = _matrix_skip_reason(p, options)
            if reason:
                skipped[reason] += 1
            else:
                plans.append(p)
    return Selection(plans=plans, skipped=skipped)


def extract(p: MatrixPlan, array: np.ndarray) -> np.ndarray:
    """The planned 2-D matrix out of its loaded parameter."""
    if p.position is not None:
        return array[(slice(None), slice(None)) + p.position]
    if p.rows is not None:
        return array[p.rows[0]:p.rows[1]]
    return array


def is_embedding(t: TensorInfo) -> bool:
    """An embedding table: by module type when known, else by the owning module's name."""
    if t.module_type is not None:
        return "Embedding" in t.module_type
    parts = t.name.split(".")
    owner = parts[-2] if len(parts) >= 2 else parts[-1]
    return "embed" in owner.lower()


def _parameter_skip_reason(t: TensorInfo, o: AnalysisOptions) -> Optional[str]:
    if o.match and not any(re.search(p, t.name) for p in o.match):
        return "not matched by --match"
    if any(re.search(p, t.name) for p in o.exclude):
        return "excluded by --exclude"
    if t.dtype not in DTYPE_EPS:
        return f"not a floating-point tensor ({t.dtype})"
    if len(t.shape) < 2:
        return "not a matrix (0-D/1-D: biases, norms, scalars)"
    if 0 in t.shape:  # before its (maybe countless) convolution positions are listed
        return "empty (a dimension of size 0)"
    if len(t.shape) > 2:
        if t.module_type is not None and "conv" not in t.module_type.lower():
            # e.g. nn.Bilinear's (out, in1, in2): not a stack of spatial positions
            return f"not a matrix or convolution kernel ({len(t.shape)}-D, {t.module_type})"
        if "conv" not in o.include:
            return "convolution kernel (add --include conv)"
        return None
    if is_embedding(t) and "embeddings" not in o.include:
        return "embedding table (add --include embeddings)"
    return None


def _matrix_skip_reason(p: MatrixPlan, o: AnalysisOptions) -> Optional[str]:
    N, M = max(p.shape), min(p.shape)
    if p.position is not None and M < o.conv_min_dim:
        return f"convolution slice smaller than --conv-min-dim {o.conv_min_dim}"
    if M < o.min_dim:
        return f"smaller side below --min-dim {o.min_dim}"
    if N / M < o.min_q:
        return f"aspect ratio Q below --min-q {o.min_q:g}"
    return None


def _rnn_gate_counts(tensors: Sequence[TensorInfo]) -> Dict[str, int]:
    """Gates per recurrent layer (4 LSTM, 3 GRU), keyed by the layer's parameter prefix,
    read off ``weight_hh`` (gates * H x H) where the module type is not known."""
    counts = {}
    for t in tensors:
        m = _RNN_WEIGHT.search(t.name)
        if m and m.group(1) == "hh" and len(t.shape) == 2 and t.shape[1]:
            counts[t.name[:m.start()]] = t.shape[0] // t.shape[1]
    return counts


def _matrices_of(t: TensorInfo, o: AnalysisOptions,
                 gates_by_layer: Dict[str, int]) -> List[MatrixPlan]:
    if len(t.shape) > 2:
        return _conv_slices(t)
    rows, cols = t.shape
    module_type = t.module_type
    parts: Sequence[str] = ()
    if _FUSED_ATTENTION.search(t.name):
        module_type = module_type or "MultiheadAttention"
        parts = ("q", "k", "v")
    elif _RNN_WEIGHT.search(t.name):
        gates = gates_by_layer.get(t.name[:_RNN_WEIGHT.search(t.name).start()])
        if module_type is None:
            module_type = {4: "LSTM", 3: "GRU"}.get(gates, "RNN")
        parts = RNN_GATES.get(gates, ())
    elif module_type is None and is_embedding(t):
        module_type = "Embedding"
    base = MatrixPlan(name=t.name, param=t.name, module_type=module_type, dtype=t.dtype,
                      shape=(rows, cols))
    if not (o.split_fused and parts and rows % len(parts) == 0):
        return [base]
    h = rows // len(parts)
    return [MatrixPlan(name=f"{t.name}[{part}]", param=t.name, module_type=module_type,
                       dtype=t.dtype, shape=(h, cols), rows=(i * h, (i + 1) * h), part=part)
            for i, part in enumerate(parts)]


def _conv_slices(t: TensorInfo) -> List[MatrixPlan]:
    out_ch, in_ch, *kernel = t.shape
    module_type = t.module_type or f"Conv{len(kernel)}d"
    return [MatrixPlan(name=f"{t.name}[{','.join(map(str, pos))}]", param=t.name,
                       module_type=module_type, dtype=t.dtype, shape=(out_ch, in_ch),
                       position=pos, part=",".join(map(str, pos)))
            for pos in np.ndindex(*kernel)]
