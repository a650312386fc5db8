"""What a Keras layer class holds, and how each of its stored variables becomes the matrix the
analysis sees (read as data: no Keras code is imported or run).

Keras stores kernels input-first; the analysis reads them as PyTorch lays out the same layer, so
that the same layer gives the same record from either framework (Q = N / M does not depend on the
orientation, the shape column and the slices do):

* ``Dense`` kernel (in x out) -> out x in, as ``nn.Linear.weight``;
* ``EinsumDense`` kernel: its input axes (those of the equation's input operand; else the first)
  folded into columns, its output axes into rows. ``MultiHeadAttention``'s query / key / value
  kernels (d_model, heads, head_dim) become (heads * head_dim) x d_model, its output kernel
  (heads, head_dim, d_model) d_model x (heads * head_dim): the matrices they are;
* ``Conv1D/2D/3D`` kernel (spatial..., in, out) -> (out, in, spatial...), as ``nn.Conv*d``
  (sliced per position as out x in); ``Conv*DTranspose`` (spatial..., out, in) -> (in, out,
  spatial...), as ``nn.ConvTranspose*d``;
* ``LSTM`` / ``GRU`` / ``SimpleRNN`` kernel (in x gates * units) and recurrent_kernel (units x
  gates * units) -> gates * units rows, the gates in Keras's order (LSTM i, f, c, o; GRU z, r, h)
  as the row blocks ``--split-fused`` cuts;
* ``Embedding`` embeddings (vocab x dim) as stored; anything else as stored.

A layer's config (``config.json`` of a ``.keras`` file, ``model_config`` of a legacy ``.h5``) is
checked against the shapes it implies (units, filters, kernel size, heads): a config that
contradicts the weights is an :class:`~allennlp_analyze.errors.AnalyzeError`.
"""

import re
from dataclasses import dataclass
from math import prod
from typing import Dict, Mapping, Optional, Sequence, Tuple

#: Keras layer classes by the snake-case key Keras 3 files store them under (``dense``,
#: ``dense_1``: the class name, numbered within its container).
CLASS_OF_KEY = {
    "dense": "Dense",
    "einsum_dense": "EinsumDense",
    "embedding": "Embedding",
    "conv1d": "Conv1D",
    "conv2d": "Conv2D",
    "conv3d": "Conv3D",
    "conv1d_transpose": "Conv1DTranspose",
    "conv2d_transpose": "Conv2DTranspose",
    "conv3d_transpose": "Conv3DTranspose",
    "lstm": "LSTM",
    "gru": "GRU",
    "simple_rnn": "SimpleRNN",
    "lstm_cell": "LSTMCell",
    "gru_cell": "GRUCell",
    "simple_rnn_cell": "SimpleRNNCell",
    "bidirectional": "Bidirectional",
    "multi_head_attention": "MultiHeadAttention",
    "layer_normalization": "LayerNormalization",
    "batch_normalization": "BatchNormalization",
}
#: Recurrent layers and their cells: gate names, in Keras's order of the kernel's columns.
GATES = {"LSTM": ("i", "f", "c", "o"), "GRU": ("z", "r", "h"), "SimpleRNN": ()}
_CELLS = {f"{layer}Cell": layer for layer in GATES}
#: Sublayers of ``MultiHeadAttention`` (Keras 3 attribute keys), all ``EinsumDense``.
_ATTENTION_KEYS = ("query_dense", "key_dense", "value_dense", "output_dense")
_ATTENTION_OUTPUT = "attention_output"  # the output projection's name
#: Variable names in the order Keras creates them (trailing ones optional: no bias).
_VARIABLES = {
    **dict.fromkeys(
        ("Dense", "EinsumDense", *(f"Conv{d}D{t}" for d in (1, 2, 3) for t in ("", "Transpose"))),
        ("kernel", "bias"),
    ),
    "Embedding": ("embeddings",),
    **dict.fromkeys((*GATES, *_CELLS), ("kernel", "recurrent_kernel", "bias")),
}
_CONV = re.compile(r"^Conv([123])D(Transpose)?$")


@dataclass(frozen=True)
class Layer:
    """What is known of the object that owns a variable: its Keras ``class_name`` (None where
    unknown), its name, and its config (``{}`` where none was read) with the name and class
    of the layer that config describes (for a recurrent cell: its layer's)."""

    class_name: Optional[str]
    name: str
    config: Optional[Mapping] = None
    parent: Optional[str] = None


@dataclass(frozen=True)
class Placement:
    """How a stored variable is read: ``perm`` (axes order, None: as stored), then ``fold``
    (None: as is; k: the first k axes folded into columns, the rest into rows, i.e. a matrix
    ``reshape(prod(shape[:k]), -1).T``); ``module_type`` and ``parts`` as in
    :class:`~allennlp_analyze.tensors.TensorInfo`."""

    module_type: Optional[str] = None
    perm: Optional[Tuple[int, ...]] = None
    fold: Optional[int] = None
    parts: Tuple[Tuple[str, int], ...] = ()

    def shape(self, stored: Sequence[int]) -> Tuple[int, ...]:
        """The shape the analysis sees for a variable stored as ``stored``."""
        shape = tuple(stored[i] for i in self.perm) if self.perm else tuple(stored)
        if self.fold is None:
            return shape
        return prod(shape[self.fold :]), prod(shape[: self.fold])

    def apply(self, array):
        """``array`` (as stored) as the analysis sees it: a view where numpy can make one."""
        if self.perm:
            array = array.transpose(self.perm)
        if self.fold is None:
            return array
        return array.reshape(prod(array.shape[: self.fold]), -1).T


def class_of_key(key: str, name: str, parent: Optional[str]) -> Optional[str]:
    """The Keras class a Keras 3 weights file stores under ``key`` (the object's ``name``
    where the key is an attribute: a ``Bidirectional``'s ``forward_layer``), inside an object
    of class ``parent``; None where the key does not say."""
    if key == "cell" and parent in GATES:
        return f"{parent}Cell"
    if key in _ATTENTION_KEYS and parent == "MultiHeadAttention":
        return "EinsumDense"
    if key in ("forward_layer", "backward_layer") and parent == "Bidirectional":
        return class_of_key(re.sub(r"^(forward|backward)_", "", name), "", None)
    return CLASS_OF_KEY.get(re.sub(r"_\d+$", "", key))


def variable_names(layer: Layer, count: int) -> Tuple[str, ...]:
    """Names of a Keras 3 object's ``count`` stored variables (which the file keeps only by
    index): its class's where they fit, else ``"0"``, ``"1"``..."""
    known = _VARIABLES.get(layer.class_name or "", ())
    if 0 < count <= len(known) and (count == len(known) or known[count:] == ("bias",)):
        return known[:count]
    cfg = layer.config or {}
    if layer.class_name in ("LayerNormalization", "BatchNormalization"):
        names = tuple(
            n for n, flag in (("gamma", "scale"), ("beta", "center")) if cfg.get(flag, True)
        )
        if layer.class_name == "BatchNormalization":
            names += ("moving_mean", "moving_variance")
        if len(names) == count:
            return names
    return tuple(str(i) for i in range(count))


def layer_configs(config) -> Dict[str, Tuple[str, Mapping]]:
    """``{layer name: (class_name, its config)}`` of every layer a Keras model config describes
    at any depth (a name given to two layers of different classes is left out: ambiguous).
    The config is data already parsed with a bounded depth."""
    found: Dict[str, Tuple[str, Mapping]] = {}
    clash = set()
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))  # in the document's order: the model's
            continue
        if not isinstance(node, dict):
            continue
        cls, cfg = node.get("class_name"), node.get("config")
        if isinstance(cls, str) and isinstance(cfg, dict) and isinstance(cfg.get("name"), str):
            name = cfg["name"]
            if name in found and found[name][0] != cls:
                clash.add(name)
            found.setdefault(name, (cls, cfg))
        stack.extend(reversed([v for v in node.values() if isinstance(v, (dict, list))]))
    for name in clash:
        del found[name]
    return found


def snake_case(class_name: str) -> str:
    """Keras's ``to_snake_case``: ``MultiHeadAttention`` -> ``multi_head_attention``."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def layer_keys(model_config: Optional[Mapping]) -> Dict[str, Tuple[str, Mapping]]:
    """``{key: (class_name, config)}``: the keys a Keras 3 weights file stores a model's
    layers under (its class in snake case, numbered in order within the class: ``dense``,
    ``dense_1``), from the model's config (its ``layers`` list)."""
    layers = (model_config or {}).get("layers")
    keys: Dict[str, Tuple[str, Mapping]] = {}
    used: Dict[str, int] = {}
    for layer in layers if isinstance(layers, list) else ():
        cls = layer.get("class_name") if isinstance(layer, dict) else None
        cfg = layer.get("config") if isinstance(layer, dict) else None
        if not isinstance(cls, str) or not isinstance(cfg, dict):
            continue
        base = snake_case(cls)
        used[base] = used.get(base, -1) + 1
        keys[f"{base}_{used[base]}" if used[base] else base] = (cls, cfg)
    return keys


def place(layer: Layer, param: str, stored: Tuple[int, ...]) -> Placement:
    """How the variable ``param`` of ``layer``, stored with shape ``stored``, is read."""
    cls = layer.class_name or ""
    n = len(stored)
    if param == "kernel" and cls == "Dense" and n == 2:
        return Placement("Dense", fold=1)
    if param == "kernel" and cls == "EinsumDense" and n >= 2:
        return _einsum(layer, n)
    conv = _CONV.match(cls)
    if param == "kernel" and conv and n == int(conv.group(1)) + 2:
        return Placement(cls, perm=(n - 1, n - 2, *range(n - 2)))
    recurrent = _CELLS.get(cls, cls if cls in GATES else None)
    if recurrent and param in ("kernel", "recurrent_kernel") and n == 2:
        gates = GATES[recurrent]
        rows = stored[1]
        parts = (
            tuple((g, rows // len(gates)) for g in gates)
            if gates and rows % len(gates) == 0
            else ()
        )
        return Placement(recurrent, fold=1, parts=parts)
    if param == "embeddings" and cls == "Embedding":
        return Placement("Embedding")
    return Placement(_CELLS.get(cls, cls) or None)


def _einsum(layer: Layer, n: int) -> Placement:
    """An ``EinsumDense`` kernel: which axes are its input (contracted with the input)."""
    if layer.parent == "MultiHeadAttention":
        return Placement("EinsumDense", fold=n - 1 if layer.name == _ATTENTION_OUTPUT else 1)
    equation = (layer.config or {}).get("equation")
    m = re.fullmatch(r"([a-z.]+),([a-z]+)->([a-z.]+)", equation or "")
    if m and len(m.group(2)) == n and len(set(m.group(2))) == n:
        inputs = [i for i, c in enumerate(m.group(2)) if c in m.group(1)]
        outputs = [i for i in range(n) if i not in inputs]
        if inputs and outputs:
            perm = tuple(inputs + outputs)
            return Placement(
                "EinsumDense", perm=None if perm == tuple(range(n)) else perm, fold=len(inputs)
            )
    return Placement("EinsumDense", fold=1)


def contradiction(layer: Layer, param: str, stored: Tuple[int, ...]) -> Optional[str]:
    """How ``layer``'s config contradicts the stored shape of its variable ``param`` (None
    where it does not, or says nothing)."""
    expected = _expected(layer, param)
    size = "x".join(map(str, stored)) or "a scalar"
    for axis, (key, value) in expected.items():
        if not -len(stored) <= axis < len(stored) or stored[axis] != value:
            return (
                f"layer {layer.name!r} ({layer.class_name}) has a {param} of shape {size}, "
                f"but its config says {key} = {value}"
            )
    return None


def _int(value) -> Optional[int]:
    return value if type(value) is int and value > 0 else None


def _expected(layer: Layer, param: str) -> Dict[int, Tuple[str, int]]:
    """``{axis: (config key, size)}`` that the config implies for a variable, where it says."""
    cfg, cls = layer.config or {}, layer.class_name or ""
    cls = _CELLS.get(cls, cls)
    out: Dict[int, Tuple[str, int]] = {}
    units = _int(cfg.get("units"))
    if cls == "Dense" and param in ("kernel", "bias") and units:
        out[-1] = ("units", units)
    elif cls == "Embedding" and param == "embeddings":
        out.update(
            {
                axis: (key, cfg[key])
                for axis, key in ((0, "input_dim"), (1, "output_dim"))
                if _int(cfg.get(key))
            }
        )
    elif _CONV.match(cls) and param == "kernel":
        if _int(cfg.get("filters")):
            out[-2 if cls.endswith("Transpose") else -1] = ("filters", cfg["filters"])
        size = cfg.get("kernel_size")
        if isinstance(size, list) and all(_int(k) for k in size):
            out.update({i: (f"kernel_size[{i}]", k) for i, k in enumerate(size)})
    elif cls in GATES and param in ("kernel", "recurrent_kernel") and units:
        gates = max(1, len(GATES[cls]))
        out[-1] = ("units" if gates == 1 else f"{gates} gates x units", gates * units)
        if param == "recurrent_kernel":
            out[0] = ("units", units)
    elif layer.parent == "MultiHeadAttention" and param == "kernel":
        heads, key_dim = _int(cfg.get("num_heads")), _int(cfg.get("key_dim"))
        value_dim = _int(cfg.get("value_dim")) or key_dim
        dim = value_dim if layer.name in ("value", _ATTENTION_OUTPUT) else key_dim
        first = 0 if layer.name == _ATTENTION_OUTPUT else 1
        if heads and dim:
            out.update(
                {
                    first: ("num_heads", heads),
                    first + 1: ("key_dim" if dim == key_dim else "value_dim", dim),
                }
            )
    return out
