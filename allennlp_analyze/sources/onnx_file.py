"""ONNX models (``.onnx``), read with the ``onnx`` package's protobuf classes (an optional extra,
imported when a file is opened); nothing in the model is executed.

Weights are the graph's initializers (sparse ones densified: :mod:`.onnx_sparse`) and the
tensors of its ``Constant`` nodes, in the main graph and in every subgraph (``If`` branches,
``Loop`` / ``Scan`` bodies). Each is followed
through the ops that only move it (:data:`PASS_THROUGH`: ``Cast``, ``Transpose``, ``Reshape``,
``Slice``, ``Concat``...) to the op that uses it, and that op says what it is
(:mod:`.onnx_graph`): the module type (``Linear``, ``Conv2d``, ``LSTM``, ``Embedding``...) that
:mod:`allennlp_analyze.kinds` reads as its best evidence, the orientation of a ``MatMul`` /
``Gemm`` weight (records give it out x in, as torch's ``Linear`` stores it) and the gates of a
recurrent weight. Names: the tensor's own where it is a parameter name, else one made from the
consuming node's (``/encoder/layer.0/query/MatMul`` -> ``encoder.layer.0.query.weight``).
Floating-point weights keep their storage dtype (its noise floor); QDQ weights (integer codes
that a ``DequantizeLinear`` turns into the weight) are quantized matrices, and a QDQ
``Conv`` / ``ConvTranspose`` kernel a quantized kernel sliced per position as a float one is
(:mod:`.onnx_qdq`).

Resources: a protobuf file is parsed whole, so files above protobuf's 2 GiB limit, or larger
than memory allows (:func:`~allennlp_analyze.limits.check_memory`), are refused before they are
read; every tensor's declared size is checked against the bytes it holds, and a sparse one's
dense size against memory before it is built; external data are read only from files inside
the model's folder, within their size.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import limits
from ..errors import AnalyzeError, one_line
from ..quantized import QuantizedKernel
from ..tensors import TensorInfo
from ._common import inside_folder
from .onnx_graph import Use, find_use, graph_uses, node_attr, readable_name
from .onnx_qdq import Dequantize, QdqCodes, QdqMatrix, qdq_kernel
from .onnx_sparse import densify, sparse_shape

#: protobuf's own limit on a message: larger models keep their weights as external data.
MAX_PROTOBUF = 2**31 - 1
#: Subgraph nesting followed at most (an ``If`` inside a ``Loop`` inside an ``If``...; real
#: models nest a few levels; protobuf's own parser stops near 32).
MAX_DEPTH = 16
#: Working memory taken to parse a file, in multiples of its size (its bytes and the message).
PARSE_FACTOR = 2

#: ONNX element types read as weights -> the dtype name records report (numpy's / torch's).
FLOAT_TYPES = {
    1: "float32",
    10: "float16",
    11: "float64",
    16: "bfloat16",
    17: "float8_e4m3fn",
    18: "float8_e4m3fnuz",
    19: "float8_e5m2",
    20: "float8_e5m2fnuz",
}


#: Integer element types a ``DequantizeLinear`` reads as codes: uint8, int8, uint16, int16,
#: uint4, int4 (``Constant`` nodes of these are listed; int32 / int64 ones are shape arithmetic).
CODES = {2, 3, 4, 5, 21, 22}


def _onnx():
    try:
        import onnx
    except ImportError:
        raise AnalyzeError(
            "reading .onnx files needs the onnx package: pip install 'allennlp-analyze[onnx]'"
        ) from None
    return onnx


@dataclass(frozen=True)
class _Entry:
    """Where a listed tensor comes from: the stored tensor ``proto``, an index into its first
    axis (one direction of a recurrent weight) or None, whether the record is its transpose,
    and the ``DequantizeLinear`` that makes it a weight (QDQ), if any."""

    proto: Any
    index: Optional[int]
    transpose: bool
    dequantize: Optional[Dequantize] = None


def dtype_name(onnx, data_type: int) -> str:
    """The dtype name a record reports for an ONNX element type."""
    if data_type in FLOAT_TYPES:
        return FLOAT_TYPES[data_type]
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).name
    except (KeyError, ValueError, TypeError):
        return f"onnx-type-{data_type}"


def read_model(path: Path):
    """The ``ModelProto`` of ``path`` without its external data, within the memory policy."""
    onnx = _onnx()
    try:
        with limits.open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_PROTOBUF:
                raise AnalyzeError(
                    f"{path} is {limits.format_bytes(size)}, above protobuf's "
                    f"2 GiB limit: not a valid ONNX file (large models keep "
                    f"their weights as external data)"
                )
            limits.check_memory(PARSE_FACTOR * size, f"{path} (parsed whole)")
            raw = f.read()
    except OSError as e:
        raise AnalyzeError(f"cannot read {path}: {e.strerror or one_line(e)}") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(raw)
    except Exception as e:  # protobuf's DecodeError, or a recursion limit
        raise AnalyzeError(
            f"{path} is not a valid ONNX model (truncated or corrupt: "
            f"{one_line(e) or type(e).__name__})"
        ) from None
    if not model.HasField("graph"):
        raise AnalyzeError(f"{path} is not a valid ONNX model (no graph)")
    return model


class OnnxSource:
    """One ``.onnx`` file (see the module docstring)."""

    def __init__(self, path: Union[str, os.PathLike], label: Optional[str] = None):
        self.path = Path(path)
        self.label = label or self.path.name
        self._onnx = _onnx()
        model = read_model(self.path)
        self._entries: Dict[str, _Entry] = {}
        self._infos: List[TensorInfo] = []
        self._infos_by_name: Dict[str, TensorInfo] = {}
        stored, uses = graph_uses(
            model.graph,
            MAX_DEPTH,
            str(self.path),
            lambda t: t.data_type in FLOAT_TYPES or t.data_type in CODES,
        )
        self._stored: Dict[str, Any] = {}
        for key, proto in stored:
            self._stored.setdefault(key, proto)
        for key, proto in stored:
            for piece, label in self._pieces(key, proto):
                if piece.data_location == self._onnx.TensorProto.EXTERNAL:
                    self._external_span(piece, label, self._layout(piece, label)[2])
            self._add(key, proto, find_use(key, uses, len(proto.dims)))

    def _sparse(self, proto) -> bool:
        return isinstance(proto, self._onnx.SparseTensorProto)

    def _pieces(self, key: str, proto) -> List[Tuple[Any, str]]:
        """The stored tensors that hold ``proto``'s data, with the names messages give them:
        itself, or a sparse tensor's values and indices (its declarations checked)."""
        if not self._sparse(proto):
            return [(proto, key)]
        sparse_shape(proto, f"{self.path}: sparse tensor {key!r}")
        pieces = [(proto.values, f"{key} (values)")]
        if proto.HasField("indices"):
            pieces.append((proto.indices, f"{key} (indices)"))
        return pieces

    # -- listing ------------------------------------------------------------------------------

    def _add(self, key: str, proto, use: Optional[Use]) -> None:
        shape = tuple(int(d) for d in proto.dims)
        if any(d < 0 for d in shape):
            raise AnalyzeError(f"{self.path}: tensor {key!r} has a negative dimension {shape}")
        dtype = dtype_name(
            self._onnx, proto.values.data_type if self._sparse(proto) else proto.data_type
        )
        role = use.role if use is not None else None
        module_type = use.module_type if use is not None else None
        name = key if readable_name(key) or use is None else use.name
        dq = None
        if use is not None and use.dequantize is not None:
            node = use.dequantize
            dq = Dequantize(
                node.input[1],
                node.input[2] if len(node.input) > 2 and node.input[2] else None,
                node_attr(node, "axis", 1),
                node_attr(node, "block_size", 0),
            )
            dtype = f"qdq-{dtype}"
        if use is not None and len(shape) == {"recurrent": 3, "recurrent_bias": 2}.get(role or ""):
            # directions x (gates * H) [x in]: one tensor per direction, as torch keeps them
            for d in range(shape[0]):
                suffix = "_reverse" if d == 1 else ("" if d == 0 else f"_d{d}")
                self._list(
                    f"{name}{suffix}",
                    _Entry(proto, d, False, dq),
                    shape[1:],
                    dtype,
                    module_type,
                    use.parts(shape[1]) if len(shape) == 3 else (),
                    dq is not None,
                )
            return
        transpose = bool(use is not None and use.transpose and len(shape) == 2)
        parts = use.parts(shape[0]) if use is not None and len(shape) == 2 else ()
        self._list(
            name,
            _Entry(proto, None, transpose, dq),
            shape[::-1] if transpose else shape,
            dtype,
            module_type,
            parts,
            # QDQ: a matrix, or a convolution kernel read per position; no other tensor
            dq is not None and (len(shape) == 2 or (role == "conv" and len(shape) > 2)),
        )

    def _list(
        self,
        name: str,
        entry: _Entry,
        shape: Tuple[int, ...],
        dtype: str,
        module_type: Optional[str],
        parts,
        quantized: bool,
    ) -> None:
        unique, k = name, 1
        while unique in self._entries:
            k += 1
            unique = f"{name}#{k}"
        self._entries[unique] = entry
        self._infos.append(
            TensorInfo(unique, tuple(shape), dtype, module_type, parts=parts, quantized=quantized)
        )
        self._infos_by_name[unique] = self._infos[-1]

    def tensors(self) -> Sequence[TensorInfo]:
        return list(self._infos)

    # -- reading ------------------------------------------------------------------------------

    def load(self, name: str) -> Union[np.ndarray, QdqMatrix, QuantizedKernel]:
        """The tensor as the model uses it (a sparse one densified); a QDQ weight
        (``quantized`` in its :class:`TensorInfo`) as a
        :class:`~allennlp_analyze.quantized.QuantizedMatrix` (a convolution kernel: a
        :class:`~allennlp_analyze.quantized.QuantizedKernel` of them, one per position), its
        values dequantized in float64 with each element's step as they are read."""
        entry = self._entry(name)
        if entry.dequantize is None:
            return _oriented(self._array(entry.proto, name), entry)
        info = self._infos_by_name[name]
        if not info.quantized:
            raise AnalyzeError(
                f"{self.path}: quantized tensor {name!r} of shape {info.shape} is neither a "
                f"matrix nor a convolution kernel: not read"
            )
        codes = self._codes(entry, name)
        if len(info.shape) > 2:
            return qdq_kernel(codes, info.dtype)
        if entry.index is not None:  # one direction of a recurrent weight
            return QdqMatrix(codes, info.dtype, (entry.index, None, None), 1)
        return QdqMatrix(codes, info.dtype, (None, None), 1 if entry.transpose else 0)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise AnalyzeError(f"{self.path} has no tensor named {name!r}")
        return entry

    def _codes(self, entry: _Entry, name: str) -> QdqCodes:
        """A QDQ weight's codes, scale and zero point as stored (checked to fit)."""
        q = entry.dequantize
        assert q is not None
        what = f"{self.path}: quantized tensor {name!r}"
        params: List[Optional[np.ndarray]] = []
        for value in (q.scale, q.zero_point):
            if value is None:
                params.append(None)
            elif value not in self._stored:
                raise AnalyzeError(
                    f"{what}: its scale or zero point {value!r} is not stored "
                    f"in the file (computed by the graph): not read"
                )
            else:
                params.append(self._array(self._stored[value], value))
        scale, zero_point = params
        if scale is None:
            raise AnalyzeError(f"{what}: its DequantizeLinear has no scale")
        return QdqCodes(self._array(entry.proto, name), scale, zero_point, q, what)

    def _layout(self, proto, name: str) -> Tuple[np.dtype, int, int]:
        """``(numpy dtype, element count, stored bytes)`` of a numeric stored tensor."""
        try:
            np_dtype = self._onnx.helper.tensor_dtype_to_np_dtype(proto.data_type)
        except (KeyError, ValueError, TypeError):
            raise AnalyzeError(
                f"{self.path}: tensor {name!r} has an unsupported element type {proto.data_type}"
            ) from None
        if np_dtype.kind in "OSU":
            raise AnalyzeError(f"{self.path}: tensor {name!r} holds strings, not numbers")
        count = math.prod(int(d) for d in proto.dims)
        return np_dtype, count, _stored_bytes(np_dtype, count)

    def _array(self, proto, name: str) -> np.ndarray:
        """The stored tensor as numpy in its stored precision (bfloat16 / float8 widened to
        float32 and 4-bit integers to int8, exactly); a sparse one densified."""
        onnx = self._onnx
        if self._sparse(proto):
            what = f"{self.path}: sparse tensor {name!r}"
            shape = sparse_shape(proto, what)
            values = self._array(proto.values, f"{name} (values)")
            indices = (
                self._array(proto.indices, f"{name} (indices)")
                if proto.HasField("indices")
                else None
            )
            return densify(values, indices, shape, what)
        np_dtype, count, nbytes = self._layout(proto, name)
        shape = tuple(proto.dims)
        if proto.data_location == onnx.TensorProto.EXTERNAL:
            target, offset = self._external_span(proto, name, nbytes)
            try:
                with limits.open_regular(target) as f:
                    f.seek(offset)
                    raw = f.read(nbytes)
            except OSError as e:
                raise AnalyzeError(
                    f"cannot read {target} (external data of {self.path}): "
                    f"{e.strerror or one_line(e)}"
                ) from None
            if len(raw) != nbytes:
                raise AnalyzeError(f"{target} is truncated (tensor {name!r})")
            proto = onnx.TensorProto(dims=proto.dims, data_type=proto.data_type, raw_data=raw)
        elif proto.HasField("raw_data"):
            if len(proto.raw_data) != nbytes:
                raise AnalyzeError(
                    f"{self.path}: tensor {name!r} of shape {shape} needs "
                    f"{nbytes} bytes, its data hold {len(proto.raw_data)}"
                )
        else:
            held = _typed_count(proto)
            if held != _typed_needed(np_dtype, count):
                raise AnalyzeError(
                    f"{self.path}: tensor {name!r} of shape {shape} holds "
                    f"{held} values, not {count}"
                )
        try:
            array = onnx.numpy_helper.to_array(proto)
        except Exception as e:
            raise AnalyzeError(f"{self.path}: cannot read tensor {name!r}: {one_line(e)}") from None
        kind = array.dtype.name
        # ml_dtypes' bfloat16, float8, float4 (kind "V", or "f" for some), int4...: widened
        # exactly to numpy's own types
        if "float" in kind and kind not in ("float16", "float32", "float64"):
            array = array.astype(np.float32)
        elif array.dtype.kind == "V":
            array = array.astype(np.int8 if kind.startswith("int") else np.uint8)
        return array

    def _external_span(self, proto, name: str, nbytes: int) -> Tuple[Path, int]:
        """``(file, offset)`` of an external-data tensor's ``nbytes`` bytes, checked: a file
        inside the model's folder (no absolute path, no ``..``, no link leading out), holding
        them within its size. Checked for every tensor when the model is opened."""
        info = {e.key: e.value for e in proto.external_data}
        location = info.get("location", "")
        folder = self.path.parent
        target = folder / location
        if not inside_folder(folder, location):
            raise AnalyzeError(
                f"{self.path}: tensor {name!r} has its data at {location!r}, "
                f"outside the model's folder: refused"
            )
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise AnalyzeError(
                f"{self.path}: tensor {name!r} has a bad external-data offset or length"
            ) from None
        if offset < 0 or (length is not None and length != nbytes):
            raise AnalyzeError(
                f"{self.path}: tensor {name!r} has external data of offset "
                f"{offset} and length {length}, its shape needs {nbytes} bytes"
            )
        try:
            with limits.open_regular(target) as f:
                size = os.fstat(f.fileno()).st_size
        except OSError as e:
            raise AnalyzeError(
                f"cannot read {target} (external data of {self.path}): {e.strerror or one_line(e)}"
            ) from None
        if offset + nbytes > size:
            raise AnalyzeError(
                f"{target} is truncated (tensor {name!r} ends at byte "
                f"{offset + nbytes}, the file holds {size})"
            )
        return target, offset

    def __repr__(self) -> str:
        return f"<OnnxSource {self.label!r}>"


#: Bits of the element types packed several to a byte.
_PACKED_BITS = {"int4": 4, "uint4": 4, "float4_e2m1fn": 4, "int2": 2, "uint2": 2}


def _oriented(array: np.ndarray, entry: _Entry) -> np.ndarray:
    """A stored array as listed: one direction of it, transposed, C-contiguous."""
    if entry.index is not None:
        array = array[entry.index]
    if entry.transpose:
        array = array.T
    return array if array.flags.c_contiguous else array.copy(order="C")


def _stored_bytes(np_dtype: np.dtype, count: int) -> int:
    """Bytes of ``count`` values as stored (4-bit and 2-bit types pack two / four a byte)."""
    bits = _PACKED_BITS.get(np_dtype.name)
    return count * np_dtype.itemsize if bits is None else -(-count * bits // 8)


def _typed_count(proto) -> int:
    """Values a tensor holds in its typed fields."""
    return max(
        len(proto.float_data),
        len(proto.int32_data),
        len(proto.int64_data),
        len(proto.double_data),
        len(proto.uint64_data),
    )


def _typed_needed(np_dtype: np.dtype, count: int) -> int:
    """Values of the typed field that ``count`` elements take (packed types: several to a
    value, as to a byte; complex numbers: 2 each)."""
    if np_dtype.kind == "c":
        return 2 * count
    bits = _PACKED_BITS.get(np_dtype.name)
    return count if bits is None else -(-count * bits // 8)


def looks_like_onnx(head: bytes) -> bool:
    """Sniff: a ``ModelProto`` starts with its ``ir_version`` (field 1, a small varint) and
    then the tag of another of its fields."""
    return (
        len(head) >= 3
        and head[0] == 0x08
        and 1 <= head[1] <= 32
        and head[2] in (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72)
    )
