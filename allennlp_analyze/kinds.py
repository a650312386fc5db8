"""What each tensor is: one classification per tensor from the best evidence available.

Evidence, strongest first (the record's ``kind_from``):

* ``module``: the owning module's type, where the model is built or an ``nn.Module`` is given
  (``Linear``, ``Embedding``, ``Conv2d``, ``LSTM``, ``MultiheadAttention``...; any subclass
  counts as the ``torch.nn`` layer it derives from), and whether the tensor is a registered
  buffer; or a Keras layer's class, which Keras files name (``Dense``, ``Conv2D``, ``LSTM``...,
  their kernels read as PyTorch lays them out: :mod:`allennlp_analyze.sources.keras_layers`);
  or the op of an ONNX graph that uses the tensor, named as the layer it implies (``MatMul``
  -> ``Linear``; a [1, n] input of an elementwise op, :data:`VECTOR_OPS`, is a vector).
  A module's ``bias`` is a vector whatever its shape (Keras's GRU stacks two, its attention
  keeps one per head);
* ``config``: the checkpoint's config where it names the layer
  (:mod:`allennlp_analyze.checkpoint_config`);
* ``structure``: what the header says. A non-float tensor is not a weight; 0-D/1-D (or more
  dimensions, only one above 1: ``1 x 1 x 4``) is a vector; a 2-D ``X.weight`` with a 1-D
  ``X.bias`` of its output size (rows, or columns for the transposed ``Conv1D`` of GPT-2) is a
  Linear; an N-D (N > 2) kernel with a bias of its out-channels is a convolution whatever its
  spatial sizes (``nn.Bilinear``'s out x in1 x in2 weight has that layout as well, so there the
  name decides), and a 4-D/5-D one without a bias (batch-normed) when its spatial sizes are at
  most :data:`MAX_KERNEL`;
* ``name``: the name's components matched as whole words (``_embedding_proj_layer`` is a layer,
  not an embedding): ``in_proj_weight`` (fused attention), ``weight_ih_l0`` / ``weight_hh``
  (recurrent), a ``*_mask`` (a mask), a module named as a layer (``lm_head``, ``q_proj``,
  ``classifier``, ``output``, ``fc``, ``dense``...: a Linear, :func:`names_layer`), a module
  whose name ends in ``embedding(s)``, ``embed``, ``embedder``, ``emb`` (``embed_tokens``,
  ``wte``, AllenNLP's ``token_embedder_*``, and the 2-D weight of a ``*_bias(es)`` table) (an
  embedding), ``conv`` / ``bilinear`` in a >2-D name;
* ``default``: a 2-D float weight nothing identifies is a ``matrix`` (analyzed, like a Linear);
  a >2-D one that is not a convolution is a ``tensor`` (never analyzed).

The kinds: ``linear``, ``attention`` (fused q/k/v where it has parts), ``recurrent`` (gates
stacked), ``matrix`` (analyzed by default); ``embedding``, ``conv`` (on request); ``tensor``,
``vector``, ``mask``, ``buffer``, ``non_float``, ``quant_metadata`` (the side tensors of a packed
quantized layer: its source says so with ``module_type`` :data:`QUANT_METADATA`) (never).

Rules revised against real files (issue 21), and why:

* Kernels are recognised by their bias, not bounded by their size: an audio model's 1-D
  convolutions stored out x in x k x 1 with k = 512 and k = 64, and wav2vec2's positional
  convolution (k = 128, weight-normed: ``weight_v`` / ``parametrizations.weight.original1``
  beside the layer's ``bias``), were ``tensor`` under the old "spatial sizes <= 32" rule. What
  is sliced is bounded instead (:data:`allennlp_analyze.selection.MAX_CONV_POSITIONS`).
* A name that identifies a layer is not overruled by a shape that equals a config's table size:
  ``lm_head.weight`` (vocab x hidden) was an ``embedding`` by its config when its shard was read
  alone, a ``matrix`` beside ``embed_tokens`` (same shape) in the whole folder. Now it is a
  ``linear`` layer by its name either way; the config's table rule skips layer names and no
  longer counts the other tensors of a shape, so that a tensor's kind does not depend on which
  files are read with it (only on its own name and shape, its config, and its own bias). A
  safetensors shard read alone is classified among the whole checkpoint's tensors (the headers
  of the shards its index names: ``selection.plan(..., context=)``), so that a bias that landed
  in the next shard still makes its weight a Linear or a kernel.
* The configs of AllenNLP models name what was left to the default on the real archives:
  dialog_qa's marker embeddings, the language model's softmax, the CRF's transitions, bilinear
  attention matrices (:mod:`allennlp_analyze.checkpoint_config`).

Whether a tensor's values are a 0/1 mask or a constant is known only once it is read
(:func:`value_kind`): the analysis checks every tensor it reads and leaves such ones out, counted
as skipped; ``--describe``, which reads none, cannot.
"""

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from .tensors import DTYPE_EPS, TensorInfo

#: The ``module_type`` a source gives the side tensors of a packed quantized layer (scales, zero
#: points, ``g_idx``, absmax, quant maps...): kind ``quant_metadata``, never analyzed.
QUANT_METADATA = "QuantizationMetadata"

#: Largest spatial size of a convolution kernel recognised without a bias beside it.
MAX_KERNEL = 32
#: Gate names of stacked recurrent weights, by gate count (PyTorch's order).
RNN_GATES = {4: ("i", "f", "g", "o"), 3: ("r", "z", "n")}
_GATES_OF_TYPE = {
    "LSTM": 4,
    "LSTMCell": 4,
    "GRU": 3,
    "GRUCell": 3,
    "RNN": 1,
    "RNNCell": 1,
    "SimpleRNN": 1,
}
_RECURRENT = re.compile(r"(?:^|\.)weight_(ih|hh|hr)(_l\d+)?(?:_reverse)?$")
_FUSED_ATTENTION = re.compile(r"(?:^|\.)in_proj_weight$")
#: A module's own parameter names: such a tensor is described by its module's name.
_LAYER_PARAM = re.compile(
    r"^(weight|bias|in_proj_weight|in_proj_bias|[qkv]_proj_weight|"
    r"(weight|bias)_(ih|hh|hr)(_l\d+)?(_reverse)?|weight_[gv]|weight_orig)$"
)
#: Wrapper modules that add a name component but are not the layer (TimeDistributed,
#: AllenNLP's encoder wrappers, DataParallel).
_WRAPPERS = {"_module", "module"}
_MODULE_KINDS = {
    **dict.fromkeys(("Linear", "LazyLinear", "Conv1D"), "linear"),  # Conv1D: GPT-2's Linear
    **dict.fromkeys(("Embedding", "EmbeddingBag"), "embedding"),
    **dict.fromkeys(
        [
            f"{lazy}Conv{t}{d}d"
            for lazy in ("", "Lazy")
            for t in ("", "Transpose")
            for d in (1, 2, 3)
        ],
        "conv",
    ),
    **dict.fromkeys(_GATES_OF_TYPE, "recurrent"),
    "MultiheadAttention": "attention",
    "Bilinear": "tensor",
    # Keras (Conv1D above is GPT-2's 2-D Linear; Keras's 3-D Conv1D kernel: see _by_module)
    **dict.fromkeys(("Dense", "EinsumDense"), "linear"),
    **dict.fromkeys(
        [f"Conv{d}D{t}" for d in (1, 2, 3) for t in ("", "Transpose") if (d, t) != (1, "")], "conv"
    ),
}
#: Module types (ONNX's elementwise and normalization ops) that take a [1, n] or [n, 1] weight
#: as a vector, broadcast over the rows or columns, not as a matrix.
VECTOR_OPS = frozenset(
    (
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "Where",
        "PRelu",
        "LayerNormalization",
        "BatchNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "SimplifiedLayerNormalization",
        "RMSNormalization",
    )
)
_EMBEDDING_HEADS = {
    "embedding",
    "embeddings",
    "embed",
    "embeds",
    "embedder",
    "emb",
    "embs",
    "wte",
    "wpe",
}
#: The last word of a module that is a Linear layer (``lm_head``, ``q_proj``, ``out_proj``,
#: ``classifier``, ``output``, ``fc1``, ``dense``, ``score``): names of layers, never of tables.
_LAYER_WORDS = {
    "head",
    "proj",
    "projection",
    "projector",
    "classifier",
    "output",
    "outputs",
    "out",
    "fc",
    "dense",
    "linear",
    "score",
    "decoder",
}
#: Parameter names of a layer's (possibly re-parametrized) weight, whose bias is ``<layer>.bias``.
_WEIGHT_PARAM = re.compile(
    r"(?:^|\.)(?:weight|weight_v|weight_orig|"
    r"parametrizations\.weight\.original1?)$"
)
_PARAMETRIZED = re.compile(r"\.parametrizations\.(\w+)\.original\d?$")
_CONV_WORDS = {"conv", "convs", "convolution", "convolutions", "conv1d", "conv2d", "conv3d"}


@dataclass(frozen=True)
class Kind:
    """What a tensor is (``kind``), on what evidence (``kind_from``: ``module``, ``config``,
    ``structure``, ``name`` or ``default``); ``parts``: the row blocks ``((label, rows), ...)``
    of a fused weight where known; ``module_type``: the owning module's type, as known or as the
    evidence implies it (``LSTM`` from its gates, ``Embedding``, ``Conv2d``); ``detail``: what
    named the kind, where the kind alone does not say (``Bilinear``)."""

    kind: str
    kind_from: str
    parts: Tuple[Tuple[str, int], ...] = ()
    module_type: Optional[str] = None
    detail: Optional[str] = None


def classify(
    tensors: Sequence[TensorInfo], configured: Optional[Mapping[str, Tuple]] = None
) -> Dict[str, Kind]:
    """The kind of every tensor, by name. ``configured`` maps names to ``(kind, parts[,
    module type])`` as the checkpoint's config gives them
    (:func:`~allennlp_analyze.checkpoint_config.config_kinds`)."""
    configured = configured or {}
    shapes = {t.name: t.shape for t in tensors}
    gates = _gates_by_layer(tensors)
    return {t.name: _classify(t, configured.get(t.name), shapes, gates) for t in tensors}


def names_layer(name: str) -> bool:
    """Whether the module that owns ``name`` (a 2-D weight) is named as a Linear layer
    (:data:`_LAYER_WORDS`: ``lm_head``, ``q_proj``, ``classifier``, ``output``...)."""
    words = _words(_described(name))
    return bool(words) and words[-1] in _LAYER_WORDS


def value_kind(array: np.ndarray) -> Optional[str]:
    """``"mask"`` when every value is 0 or 1 (both present), ``"constant"`` when all are equal
    and not 0 (an all-zero matrix stays a weight: its record says ``all_zero``), else None.
    Cost: a look at the first 64 values of the first row for ordinary weights (so that a
    memory-mapped, lazily widened tensor is not read whole), one pass for the others."""
    if array.size == 0:
        return None
    first = array
    while first.ndim > 1:
        first = first[0]
    head = np.asarray(first[:64] if first.ndim else first).reshape(-1)
    if head.min() != head.max() and not ((head == 0) | (head == 1)).all():
        return None  # neither constant nor 0/1 (NaN lands here too)
    flat = np.asarray(array).reshape(-1)
    lo, hi = flat.min(), flat.max()
    if lo == hi:
        return None if lo == 0 else "constant"
    if lo == 0 and hi == 1 and bool(((flat == 0) | (flat == 1)).all()):
        return "mask"
    return None


# -- the evidence, in order ------------------------------------------------------------------


def _classify(t: TensorInfo, configured, shapes, gates) -> Kind:
    if t.module_type == QUANT_METADATA:
        return Kind("quant_metadata", "module", module_type=t.module_type)
    if t.dtype not in DTYPE_EPS and not t.quantized:
        return Kind("non_float", "structure", module_type=t.module_type)
    if t.buffer:
        return Kind("buffer", "module", module_type=t.module_type)
    if len(t.shape) < 2 or (len(t.shape) > 2 and sum(d > 1 for d in t.shape) <= 1):
        return Kind("vector", "structure", module_type=t.module_type)
    if t.module_type in VECTOR_OPS and 1 in t.shape:  # a [1, n] scale or shift of a graph
        return Kind("vector", "module", module_type=t.module_type)
    for found in (_by_module(t), _by_config(t, configured), _by_structure(t, shapes)):
        if found is not None:
            kind, kind_from, parts, detail = found
            break
    else:
        kind, kind_from, parts, detail = _by_name(t)
    gate_count = gates.get(_recurrent_layer(t.name) or "")
    if kind == "recurrent" and not parts:
        parts = _equal_parts(t, gate_count)
    named = configured[2] if kind_from == "config" and len(configured) > 2 else None
    return Kind(
        kind, kind_from, parts, t.module_type or named or _module_type(t, kind, gate_count), detail
    )


def _by_module(t: TensorInfo):
    kind = _MODULE_KINDS.get(t.module_type or "")
    if t.module_type == "Conv1D" and len(t.shape) == 3:
        kind = "conv"  # Keras's Conv1D kernel (GPT-2's Conv1D weight is 2-D)
    if kind is None:
        return None  # no type, or a module that is not a standard layer: other evidence decides
    param = t.name.rpartition(".")[2]
    if param == "bias":
        return "vector", "module", (), None
    if kind == "attention":
        return kind, "module", t.parts or _thirds(t, param == "in_proj_weight"), None
    if kind == "recurrent":
        parts = t.parts or _equal_parts(t, _GATES_OF_TYPE[t.module_type or ""])
        return kind, "module", parts, None
    if kind == "linear" and t.parts:  # a Linear whose module computes q, k, v with it at once
        return "attention", "module", t.parts, None
    return kind, "module", t.parts, t.module_type if kind == "tensor" else None


def _by_config(t: TensorInfo, configured):
    if configured is None:
        return None
    kind, parts = configured[:2]
    return kind, "config", parts, None


def _by_structure(t: TensorInfo, shapes):
    bias = _bias_size(t, shapes)
    if len(t.shape) == 2:
        return ("linear", "structure", (), None) if bias in t.shape else None
    words = set(_words(_described(t.name)))
    if "bilinear" in words:
        return None  # nn.Bilinear: out x in1 x in2 with a bias of out; the name decides
    if bias == t.shape[0]:  # a kernel (out, in, *k) with a bias of its out-channels
        return "conv", "structure", (), None
    if len(t.shape) in (4, 5) and all(1 <= k <= MAX_KERNEL for k in t.shape[2:]):
        return "conv", "structure", (), None  # a kernel without a bias (batch-normed)
    if len(t.shape) == 3 or _CONV_WORDS & words:
        return None  # the name decides
    return "tensor", "structure", (), None


def _by_name(t: TensorInfo):
    component = _described(t.name)
    words = _words(component)
    if len(t.shape) > 2:
        if "bilinear" in words:
            return "tensor", "name", (), "Bilinear"
        if _CONV_WORDS & set(words):
            return "conv", "name", (), None
        return "tensor", "default", (), None
    if _FUSED_ATTENTION.search(t.name):
        return "attention", "name", _thirds(t, True), None
    if _RECURRENT.search(t.name):
        return "recurrent", "name", (), None
    if words and words[-1] in ("mask", "masks"):
        return "mask", "name", (), None
    if names_layer(t.name):
        return "linear", "name", (), None
    if _names_embedding(component, words, t.name):
        return "embedding", "name", (), None
    return "matrix", "default", (), None


# -- helpers ---------------------------------------------------------------------------------


def _words(component: str) -> Tuple[str, ...]:
    """The lower-case words of one name component: split at ``_``, non-alphanumerics and
    camelCase, trailing digits dropped (``conv1`` -> ``conv``, ``LayerNorm`` -> layer, norm)."""
    tokens = re.split(r"[^0-9A-Za-z]+|(?<=[a-z])(?=[A-Z])", component)
    return tuple(w for w in (re.sub(r"\d+$", "", tok).lower() for tok in tokens) if w)


def _described(name: str) -> str:
    """The name component that says what a tensor is: its own name, or for a layer's own
    parameter (``weight``, ``bias``, ``weight_ih_l0``...) its module's, skipping wrappers
    (``_module``) and list indices; a re-parametrized weight
    (``conv.parametrizations.weight.original1``) is its layer's ``weight``."""
    parts = _PARAMETRIZED.sub(r".\1", name).split(".")
    if not _LAYER_PARAM.match(parts[-1]):
        return parts[-1]
    for part in reversed(parts[:-1]):
        if part not in _WRAPPERS and not part.isdigit():
            return part
    return parts[-1]


def _names_embedding(component: str, words: Tuple[str, ...], name: str) -> bool:
    if not words:
        return False
    own_weight = name.rpartition(".")[2] == "weight"
    return (
        words[-1] in _EMBEDDING_HEADS
        or (words[0] == "embed" and words[-1] in ("tokens", "positions"))
        or (own_weight and words[:2] == ("token", "embedder"))  # AllenNLP's token_embedder_*
        or (own_weight and words[-1] in ("bias", "biases"))
    )  # a 2-D table of biases


def _bias_size(t: TensorInfo, shapes) -> Optional[int]:
    """Size of the 1-D ``bias`` beside a ``weight`` (or a weight-normed ``weight_v``,
    ``parametrizations.weight.original1``...), or None."""
    m = _WEIGHT_PARAM.search(t.name)
    if m is None:
        return None
    prefix = t.name[: m.start()]
    shape = shapes.get(f"{prefix}.bias" if prefix else "bias")
    return shape[0] if shape is not None and len(shape) == 1 else None


def _thirds(t: TensorInfo, fused: bool) -> Tuple[Tuple[str, int], ...]:
    rows = t.shape[0]
    return tuple((p, rows // 3) for p in "qkv") if fused and rows % 3 == 0 else ()


def _equal_parts(t: TensorInfo, gates: Optional[int]) -> Tuple[Tuple[str, int], ...]:
    names = RNN_GATES.get(gates or 0)
    if not names or t.shape[0] % len(names) or t.name.rpartition(".")[2].startswith("weight_hr"):
        return ()
    return tuple((g, t.shape[0] // len(names)) for g in names)


def _recurrent_layer(name: str) -> Optional[str]:
    m = _RECURRENT.search(name)
    return None if m is None else name[: m.start()]


def _gates_by_layer(tensors: Sequence[TensorInfo]) -> Dict[str, int]:
    """Gates per recurrent module (4 LSTM, 3 GRU), keyed by its parameter prefix, read off
    ``weight_hh`` (gates * H x H)."""
    counts = {}
    for t in tensors:
        m = _RECURRENT.search(t.name)
        if m and m.group(1) == "hh" and len(t.shape) == 2 and t.shape[1]:
            counts[t.name[: m.start()]] = t.shape[0] // t.shape[1]
    return counts


def _module_type(t: TensorInfo, kind: str, gates: Optional[int]) -> Optional[str]:
    """The module type a record reports: the known one, else the one the kind implies where it
    is unambiguous (as a state dict's names have always been read)."""
    if t.module_type is not None:
        return t.module_type
    if kind == "embedding":
        return "Embedding"
    if kind == "conv":
        return f"Conv{len(t.shape) - 2}d"
    if kind == "attention" and _FUSED_ATTENTION.search(t.name):
        return "MultiheadAttention"
    m = _RECURRENT.search(t.name)
    if kind == "recurrent" and m and m.group(2):  # a layer (weight_ih_l0), not a cell
        layers: Dict[Optional[int], str] = {4: "LSTM", 3: "GRU"}
        return layers.get(gates, "RNN")
    return None
