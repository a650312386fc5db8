"""Which parameters become which matrices, and why the others are left out.

Works on tensor metadata only (:class:`~allennlp_analyze.tensors.TensorInfo`, and the
checkpoint's config where there is one), so the whole plan, its skip counts and the progress
total are known before any weight is read; :func:`extract` then cuts a planned matrix out of its
loaded tensor. What each tensor is comes from :mod:`allennlp_analyze.kinds`: Linear, attention,
recurrent weights and unidentified 2-D weights are analyzed, embedding tables and convolution
kernels on request (``include``), nothing else.
"""

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .checkpoint_config import config_kinds
from .kinds import Kind, classify
from .options import AnalysisOptions
from .tensors import TensorInfo

#: Kinds analyzed without being asked for, and those that ``include`` adds.
ANALYZED_KINDS = ("linear", "attention", "recurrent", "matrix")
OPT_IN_KINDS = {
    "embedding": ("embeddings", "embedding table (add --include embeddings)"),
    "conv": ("conv", "convolution kernel (add --include conv)"),
}
#: Why a tensor of each other kind is never analyzed (see also :func:`_skip_reason`), and why
#: one whose values turn out not to be a weight's (:func:`~allennlp_analyze.kinds.value_kind`).
NOT_WEIGHTS = {
    "buffer": "not a weight: a buffer of its module",
    "mask": "not a weight: a mask (by its name)",
    "quant_metadata": "quantization metadata (scales, zero points, g_idx, absmax...)",
}
#: Convolution kernels with more spatial positions than this are recognised (kind ``conv``) but
#: not sliced: each position would be one matrix and one record (a 64 x 64 x 64 3-D kernel:
#: 262144). Real kernels have a few to a few hundred (wav2vec2's positional one: 128).
MAX_CONV_POSITIONS = 4096
NOT_WEIGHT_VALUES = {
    "mask": "not a weight: a mask (all values 0 or 1)",
    "constant": "not a weight: all values equal (and not 0)",
}


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
    kind: Optional[str] = None
    kind_from: Optional[str] = None


@dataclass
class Decision:
    """What selection does with one tensor: its kind, the matrices planned from it, and its
    left-out parts (or the whole tensor) counted by reason."""

    info: TensorInfo
    kind: Kind
    plans: List[MatrixPlan] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


@dataclass
class Selection:
    plans: List[MatrixPlan]
    skipped: Counter
    decisions: List[Decision] = field(default_factory=list)


def plan(
    tensors: Sequence[TensorInfo],
    options: AnalysisOptions,
    config: Optional[Mapping] = None,
    context: Optional[Sequence[TensorInfo]] = None,
) -> Selection:
    """The matrices to analyze among ``tensors`` (whose checkpoint's ``config.json``, if any, is
    ``config``), with every left-out parameter (or part of one) counted by reason.
    ``context``: every tensor of the checkpoint ``tensors`` belong to, where they are one shard
    of it: the kinds are those of the whole checkpoint (a weight's bias may sit in the next
    shard)."""
    whole = context if context else tensors
    kinds = classify(whole, config_kinds(config, whole))
    skipped: Counter = Counter()
    plans: List[MatrixPlan] = []
    decisions = []
    for t in tensors:
        d = Decision(t, kinds[t.name])
        decisions.append(d)
        reason = _parameter_skip_reason(t, d.kind, options)
        if reason:
            d.skipped[reason] += 1
        else:
            for p in _matrices_of(t, d.kind, options):
                reason = _matrix_skip_reason(p, options)
                if reason:
                    d.skipped[reason] += 1
                else:
                    d.plans.append(p)
        skipped.update(d.skipped)
        plans.extend(d.plans)
    return Selection(plans=plans, skipped=skipped, decisions=decisions)


def extract(p: MatrixPlan, array: np.ndarray) -> np.ndarray:
    """The planned 2-D matrix out of its loaded parameter."""
    if p.position is not None:
        return array[(slice(None), slice(None)) + p.position]
    if p.rows is not None:
        return array[p.rows[0] : p.rows[1]]
    return array


def _parameter_skip_reason(t: TensorInfo, kind: Kind, o: AnalysisOptions) -> Optional[str]:
    if o.match and not any(re.search(p, t.name) for p in o.match):
        return "not matched by --match"
    if any(re.search(p, t.name) for p in o.exclude):
        return "excluded by --exclude"
    if len(t.shape) >= 2 and 0 in t.shape:  # before its (maybe countless) positions are listed
        return "empty (a dimension of size 0)"
    k = kind.kind
    if k in ANALYZED_KINDS:
        return None
    if k in OPT_IN_KINDS:
        include, reason = OPT_IN_KINDS[k]
        if include not in o.include:
            return reason
        positions = math.prod(t.shape[2:]) if k == "conv" else 0
        if positions > MAX_CONV_POSITIONS:
            return f"convolution kernel of more than {MAX_CONV_POSITIONS} positions (not sliced)"
        return None
    return _skip_reason(t, kind)


def _skip_reason(t: TensorInfo, kind: Kind) -> str:
    """Why a tensor of a kind that is never analyzed is left out."""
    k = kind.kind
    if k == "non_float":
        return f"not a floating-point tensor ({t.dtype})"
    if k == "vector":
        if len(t.shape) < 2:
            return "not a matrix (0-D/1-D: biases, norms, scalars)"
        return (
            "not a matrix (a vector: one dimension above 1)"
            if sum(d > 1 for d in t.shape) <= 1
            else "not a matrix (a bias)"
        )
    if k == "tensor":
        detail = f", {kind.detail or kind.module_type}" if kind.detail or kind.module_type else ""
        return f"not a matrix or convolution kernel ({len(t.shape)}-D{detail})"
    return NOT_WEIGHTS[k]


def _matrix_skip_reason(p: MatrixPlan, o: AnalysisOptions) -> Optional[str]:
    N, M = max(p.shape), min(p.shape)
    if p.position is not None and M < o.conv_min_dim:
        return f"convolution slice smaller than --conv-min-dim {o.conv_min_dim}"
    if M < o.min_dim:
        return f"smaller side below --min-dim {o.min_dim}"
    if N / M < o.min_q:
        return f"aspect ratio Q below --min-q {o.min_q:g}"
    return None


def _matrices_of(t: TensorInfo, kind: Kind, o: AnalysisOptions) -> List[MatrixPlan]:
    if kind.kind == "conv":
        return _conv_slices(t, kind)
    rows, cols = t.shape
    base = MatrixPlan(
        name=t.name,
        param=t.name,
        module_type=kind.module_type,
        dtype=t.dtype,
        shape=(rows, cols),
        kind=kind.kind,
        kind_from=kind.kind_from,
    )
    if not (o.split_fused and kind.parts):
        return [base]
    plans, start = [], 0
    for part, n in kind.parts:
        plans.append(
            MatrixPlan(
                name=f"{t.name}[{part}]",
                param=t.name,
                module_type=kind.module_type,
                dtype=t.dtype,
                shape=(n, cols),
                rows=(start, start + n),
                part=part,
                kind=kind.kind,
                kind_from=kind.kind_from,
            )
        )
        start += n
    return plans


def _conv_slices(t: TensorInfo, kind: Kind) -> List[MatrixPlan]:
    out_ch, in_ch, *kernel = t.shape
    return [
        MatrixPlan(
            name=f"{t.name}[{','.join(map(str, pos))}]",
            param=t.name,
            module_type=kind.module_type,
            dtype=t.dtype,
            shape=(out_ch, in_ch),
            position=pos,
            part=",".join(map(str, pos)),
            kind=kind.kind,
            kind_from=kind.kind_from,
        )
        for pos in np.ndindex(*kernel)
    ]
