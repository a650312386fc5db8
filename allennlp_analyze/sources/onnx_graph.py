"""What an ONNX graph says about its weights: where each stored tensor is, and the op that uses
it (followed through the ops that only move a tensor), as the module type, orientation, gates
and name that :class:`~allennlp_analyze.sources.onnx_file.OnnxSource` lists it with.

Works on the ``onnx`` package's protobuf messages; imports nothing itself.
"""

import re
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import AnalyzeError
from ..kinds import QUANT_METADATA, VECTOR_OPS

#: Ops that move a weight without saying what it is: the op they feed decides. ``Transpose``
#: of a matrix swaps its orientation; the others keep it.
PASS_THROUGH = {
    "Cast",
    "CastLike",
    "Identity",
    "Transpose",
    "Reshape",
    "Slice",
    "Concat",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
}
#: Ops that change a weight's rows (so the gates of a recurrent weight are not in the order its
#: op reads them).
_REARRANGING = {"Reshape", "Slice", "Concat", "Flatten"}
#: Recurrent ops -> the torch names of their gates, in the order ONNX stacks them (LSTM: i, o,
#: f, c, where torch's cell gate is g; GRU: z, r, h, where torch's is n).
RECURRENT_GATES = {"LSTM": ("i", "o", "f", "g"), "GRU": ("z", "r", "n"), "RNN": ()}
#: A node name as torch's exporter writes it: ``/module/path/OpType_3``.
_TORCH_SCOPE = re.compile(r"^/(?:(?P<scope>.+)/)?(?P<op>[A-Za-z]+)(?:_(?P<k>\d+))?$")


@dataclass(frozen=True)
class Use:
    """The op that uses a weight: ``role`` (``linear``, ``conv``, ``recurrent``,
    ``recurrent_bias``, ``embedding``, ``bias``, ``vector``, ``other``), the ``module_type``
    implied (None where the op says nothing certain; a ``DequantizeLinear``'s scale or zero
    point: :data:`~allennlp_analyze.kinds.QUANT_METADATA`), the ``name`` made from the node's,
    whether the record is the stored matrix's ``transpose`` (a ``MatMul`` / ``Gemm`` weight as
    out x in), and the ``gates`` of a recurrent weight as stored (torch's names, ONNX's order)."""

    role: str
    module_type: Optional[str]
    name: str
    transpose: bool = False
    gates: Tuple[str, ...] = ()
    #: The ``DequantizeLinear`` node the stored (quantized) tensor goes through, if any.
    dequantize: Optional[Any] = None

    def parts(self, rows: int) -> Tuple[Tuple[str, int], ...]:
        """The row blocks ``((gate, rows), ...)`` of a stacked recurrent weight of ``rows``."""
        if not self.gates or rows % len(self.gates):
            return ()
        return tuple((g, rows // len(self.gates)) for g in self.gates)


#: Consumers of each value: value name -> [(node, input index)].
Consumers = Dict[str, List[Tuple[Any, int]]]


def graph_uses(
    graph, max_depth: int, origin: str, is_weight: Callable[[Any], bool]
) -> Tuple[List[Tuple[str, Any]], Consumers]:
    """The stored tensors of ``graph`` and its subgraphs (initializers, sparse initializers,
    and the values of ``Constant`` nodes that ``is_weight`` takes: not the integers of shape
    arithmetic; graph by graph, as ``(name, TensorProto)`` or ``(name, SparseTensorProto)``: a
    sparse tensor's is its values') and every value's consumers.
    Subgraphs nested deeper than ``max_depth`` are an :class:`AnalyzeError`."""
    stored: List[Tuple[str, Any]] = []
    consumers: Consumers = {}
    pending = deque([(graph, 0)])
    while pending:
        g, depth = pending.popleft()
        if depth > max_depth:
            raise AnalyzeError(f"{origin} nests subgraphs more than {max_depth} levels deep")
        stored.extend((t.name, t) for t in g.initializer)
        stored.extend((t.values.name, t) for t in g.sparse_initializer)
        for node in g.node:
            for i, value in enumerate(node.input):
                if value:
                    consumers.setdefault(value, []).append((node, i))
            for attr in node.attribute:
                if (
                    node.op_type == "Constant"
                    and attr.name == "value"
                    and attr.HasField("t")
                    and node.output
                    and is_weight(attr.t)
                ):
                    stored.append((node.output[0], attr.t))
                if (
                    node.op_type == "Constant"
                    and attr.name == "sparse_value"
                    and attr.HasField("sparse_tensor")
                    and node.output
                    and is_weight(attr.sparse_tensor.values)
                ):
                    stored.append((node.output[0], attr.sparse_tensor))
                if attr.HasField("g"):
                    pending.append((attr.g, depth + 1))
                pending.extend((sub, depth + 1) for sub in attr.graphs)
    return stored, consumers


def readable_name(name: str) -> bool:
    """Whether a value's name is a parameter name a user can read (not ``onnx::MatMul_123``,
    ``/layer/Constant_output_0`` or ``123``)."""
    return bool(name) and not (
        "::" in name or name.startswith("/") or name.isdigit() or "_output_" in name
    )


def find_use(name: str, consumers: Consumers, ndim: int) -> Optional[Use]:
    """The first op (graph order, breadth first) that uses the stored tensor ``name`` of
    ``ndim`` dimensions, followed through :data:`PASS_THROUGH` ops (and a ``DequantizeLinear``
    that takes it as its quantized input, straight from storage: :attr:`Use.dequantize`);
    None where nothing uses it."""
    seen = {name}
    # value, transposed on the way, rows unchanged, the DequantizeLinear passed
    pending = deque([(name, False, True, None)])
    while pending:
        value, flipped, direct, dequantize = pending.popleft()
        for node, i in consumers.get(value, ()):
            op = node.op_type
            if (
                op == "DequantizeLinear"
                and i == 0
                and dequantize is None
                and node.output
                and value == name
                and node.output[0] not in seen
            ):
                seen.add(node.output[0])
                pending.append((node.output[0], flipped, direct, node))
                continue
            if op in PASS_THROUGH and (i == 0 or op == "Concat"):
                if op == "Transpose":
                    perm = list(node_attr(node, "perm", []))
                    if ndim != 2 or perm not in ([], [1, 0]):
                        return replace(_use(node, i, "other", None), dequantize=dequantize)
                    flipped = not flipped
                out = node.output[0] if node.output else ""
                if out and out not in seen:
                    seen.add(out)
                    pending.append((out, flipped, direct and op not in _REARRANGING, dequantize))
                continue
            return replace(_role(node, i, ndim, flipped, direct), dequantize=dequantize)
    return None


def _role(node, i: int, ndim: int, flipped: bool, direct: bool) -> Use:
    op = node.op_type
    if op == "MatMul" and i in (0, 1):
        # A (i = 0) is used as out x in as it arrives, B (i = 1) as in x out
        return _use(node, i, "linear", "Linear", flipped if i == 0 else not flipped)
    if op == "Gemm" and i in (0, 1):
        trans = bool(node_attr(node, "transA" if i == 0 else "transB", 0)) != flipped
        return _use(node, i, "linear", "Linear", trans if i == 0 else not trans)
    if op in ("Conv", "ConvTranspose") and i == 1:
        return _use(node, i, "conv", f"{op}{max(ndim - 2, 1)}d")
    if op in RECURRENT_GATES and i in (1, 2):
        # a weight whose rows were rearranged on the way has its gates in another order
        return _use(
            node,
            i,
            "recurrent",
            op if direct else None,
            False,
            RECURRENT_GATES[op] if direct else (),
        )
    if op in RECURRENT_GATES and i == 3:
        return _use(node, i, "recurrent_bias", None)
    if op in ("Gemm", "Conv", "ConvTranspose") and i == 2:
        return _use(node, i, "bias", None)
    if op in ("DequantizeLinear", "QuantizeLinear") and i in (1, 2):
        # a scale or zero point (a blocked one has the weight's rank: no kernel, no matrix)
        return _use(node, i, "other", QUANT_METADATA)
    if op == "Gather" and i == 0:
        return _use(node, i, "embedding", "Embedding")
    if op in VECTOR_OPS:
        return _use(node, i, "vector", op)
    return _use(node, i, "other", None)


def _use(
    node,
    i: int,
    role: str,
    module_type: Optional[str],
    transpose: bool = False,
    gates: Tuple[str, ...] = (),
) -> Use:
    return Use(role, module_type, _node_param_name(node, i, role), transpose, gates)


def _node_param_name(node, i: int, role: str) -> str:
    """A name for a weight from its consuming node: torch's ``/a/b/MatMul`` -> ``a.b.weight``,
    ``/lstm/LSTM_1`` -> ``lstm.weight_ih_l1``, ``/ln/Mul_1`` -> ``ln.Mul_1.input1`` (an op that
    is no layer: the input's position); another node name ``N`` -> ``N.weight``."""
    m = _TORCH_SCOPE.match(node.name)
    scope = (m.group("scope") or "").replace("/", ".") if m else node.name
    layer = int(m.group("k") or 0) if m else 0
    param = {
        "linear": "weight",
        "conv": "weight",
        "embedding": "weight",
        "bias": "bias",
        "recurrent_bias": f"bias_l{layer}",
        "recurrent": f"weight_{'ih' if i == 1 else 'hh'}_l{layer}",
    }.get(role)
    if param is None:  # an op that is no layer: its own name and the input's position
        op = node.name.rpartition("/")[2] if m else ""
        param = f"{op}.input{i}" if op else f"input{i}"
    return f"{scope or node.op_type}.{param}"


def node_attr(node, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            if attr.ints:
                return list(attr.ints)
            return attr.i
    return default
