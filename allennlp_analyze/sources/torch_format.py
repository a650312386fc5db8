"""PyTorch's file formats, read with numpy alone and without running any code from the file.

``torch.save`` writes either a zip (``<folder>/data.pkl``: the pickled object, whose tensors
refer to storages ``<folder>/data/<key>``, raw little-endian bytes unless ``byteorder`` says
``big``) or, before torch 1.6 or with ``_use_new_zipfile_serialization=False``, the legacy
stream: five pickles (magic number, protocol 1001, system info, the object, the list of
storage keys) followed by each storage as an int64 element count and its raw little-endian
bytes. A plain ``pickle.dump`` of tensors holds each storage as a legacy stream of its own
(``torch.storage._load_from_bytes``).
A TorchScript archive (``torch.jit.save``) is a zip of the same layout with ``constants.pkl`` and
``code/`` beside: its ``data.pkl`` is read the same way, and handed on with its classes'
parameter and buffer declarations as a :class:`~.torchscript.ScriptArchive`.

The pickles are read by :mod:`.unpickle`: torch's tensor-rebuilding functions
(``torch._utils._rebuild_tensor_v2`` ...) are replaced by functions that only record what
they are given (:class:`StridedTensor`, :class:`SparseTensor`, :class:`OpaqueTensor`), every
other global becomes inert. After the pickle every storage is checked against the file (it
must lie inside it, with the element count the pickle claims) and every tensor against its
storage, before any tensor data is touched; the data stay in the file (memory-mapped) until
:meth:`PickledTensor.read`.
"""

import io
import re
import struct
import zipfile
import zlib
from collections.abc import Mapping
from math import prod
from typing import Any, Dict, Optional, Set, Tuple

import numpy as np

from ..errors import AnalyzeError
from ._common import one_line, zip_member_data
from .safetensors_file import widen
from .torchscript import MAX_CODE_BYTES, ScriptArchive, declarations
from .unpickle import MAX_PICKLE_BYTES, PickleTooLarge, Window, load

#: torch dtype name -> (numpy dtype of its stored bits, safetensors code where numpy widens it).
NUMPY_DTYPES: Dict[str, Tuple[str, Optional[str]]] = {
    "float64": ("<f8", None),
    "float32": ("<f4", None),
    "float16": ("<f2", None),
    "bfloat16": ("<u2", "BF16"),
    "float8_e4m3fn": ("u1", "F8_E4M3"),
    "float8_e5m2": ("u1", "F8_E5M2"),
    "float8_e4m3fnuz": ("u1", "F8_E4M3FNUZ"),
    "float8_e5m2fnuz": ("u1", "F8_E5M2FNUZ"),
    "int64": ("<i8", None),
    "int32": ("<i4", None),
    "int16": ("<i2", None),
    "int8": ("i1", None),
    "uint8": ("u1", None),
    "uint16": ("<u2", None),
    "uint32": ("<u4", None),
    "uint64": ("<u8", None),
    "bool": ("?", None),
    "complex64": ("<c8", None),
    "complex128": ("<c16", None),
}
#: Bytes per element of the dtypes that are recognised but not read (quantized, exotic).
OTHER_ITEMSIZES = {
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "quint4x2": 1,
    "quint2x4": 1,
    "float8_e8m0fnu": 1,
    "complex32": 4,
    "bits8": 1,
    "bits16": 2,
}
#: Legacy storage classes (``torch.FloatStorage``) -> dtype.
STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",
}
#: Tensors not stored densely (views that repeat stored values, e.g. ``expand``; sparse
#: tensors) are read only up to this many elements in dense form, so that a file of a few
#: kilobytes cannot make the analysis allocate gigabytes and run for minutes.
MAX_DENSE_ELEMENTS = 1 << 24
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class Corrupt(Exception):
    """The file's structure is inconsistent (message: why, without the file name)."""


def itemsize(dtype: str) -> int:
    if dtype in NUMPY_DTYPES:
        return np.dtype(NUMPY_DTYPES[dtype][0]).itemsize
    return OTHER_ITEMSIZES[dtype]


class Storage:
    """One storage: ``numel`` elements of ``dtype`` at byte ``start`` of ``buffer`` (set once
    the file's layout is known), or a legacy view into another storage."""

    __slots__ = ("key", "dtype", "numel", "buffer", "start", "big_endian")

    def __init__(self, key: str, dtype: str, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.buffer: Any = None
        self.start = 0
        self.big_endian = False


class PickledTensor:
    """A tensor as the file describes it: ``shape`` and ``dtype`` (torch's name), read only
    by :meth:`read`. ``problem()`` says why it cannot be read (``None`` if it can)."""

    shape: Tuple[int, ...] = ()
    dtype = "float32"

    def problem(self) -> Optional[str]:
        return None

    def read(self) -> np.ndarray:
        raise NotImplementedError

    def check(self) -> None:
        """Raise :class:`Corrupt` where the tensor does not fit its storage."""


def _ints(value: Any, what: str) -> Tuple[int, ...]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) > 64
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise Corrupt(f"a tensor has a bad {what} {one_line(repr(value))[:80]}")
    return tuple(value)


class StridedTensor(PickledTensor):
    """An ordinary (strided) tensor: ``shape``, ``stride`` and ``offset`` in elements of
    ``dtype`` into ``storage``; ``negative`` where torch's lazy negation bit is set."""

    def __init__(
        self, storage: Any, offset: Any, shape: Any, stride: Any, dtype: str, negative: bool = False
    ):
        if not isinstance(storage, Storage):
            raise Corrupt("a tensor without a storage")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise Corrupt(f"a tensor has a bad storage offset {offset!r}")
        self.storage, self.offset, self.dtype = storage, offset, dtype
        self.shape, self.stride = _ints(shape, "shape"), _ints(stride, "stride")
        if len(self.stride) != len(self.shape):
            raise Corrupt(
                f"a tensor's shape {self.shape} and stride {self.stride} differ in length"
            )
        self.negative = negative

    @property
    def numel(self) -> int:
        return prod(self.shape)

    def span(self) -> int:
        """Storage elements from the first to the last one the tensor touches."""
        if self.numel == 0:
            return 0
        return 1 + sum((d - 1) * s for d, s in zip(self.shape, self.stride))

    def check(self) -> None:
        if self.dtype not in NUMPY_DTYPES and self.dtype not in OTHER_ITEMSIZES:
            return  # never read
        s = self.storage
        capacity = s.numel * itemsize(s.dtype) // itemsize(self.dtype)
        if self.numel and self.offset + self.span() > capacity:
            raise Corrupt(
                f"a {'x'.join(map(str, self.shape))} tensor reaches past the end of "
                f"its storage ({capacity} elements)"
            )

    def problem(self) -> Optional[str]:
        if self.dtype not in NUMPY_DTYPES:
            return f"dtype {self.dtype} is not read"
        if self.numel > self.span() and self.numel > MAX_DENSE_ELEMENTS:
            return (
                f"an expanded view of {self.span()} stored values as "
                f"{self.numel} elements, over {MAX_DENSE_ELEMENTS}"
            )
        return None

    def read(self) -> np.ndarray:
        """A read-only view of the file where it can be one (aligned, native byte order, no
        widening, no negation), else a new array: the values in their stored precision."""
        raw, code = NUMPY_DTYPES[self.dtype]
        dt = np.dtype(raw).newbyteorder(">") if self.storage.big_endian else np.dtype(raw)
        size = dt.itemsize
        start = self.storage.start + self.offset * size
        if self.numel == 0:
            array = np.zeros(self.shape, dtype=dt)
        else:
            base = np.frombuffer(self.storage.buffer, dtype=dt, count=self.span(), offset=start)
            array = np.lib.stride_tricks.as_strided(
                base, shape=self.shape, strides=[s * size for s in self.stride], writeable=False
            )
        if not dt.isnative:
            array = array.astype(dt.newbyteorder("="))
        elif not array.flags.aligned:  # legacy files: BLAS takes another path, other round-off
            array = array.copy()
        if code is not None:
            array = widen(array, code)
        if self.negative:
            array = np.negative(array)
        return array


class SparseTensor(PickledTensor):
    """A sparse COO tensor: ``indices`` (sparse dims x nnz), ``values`` (nnz, ...)."""

    def __init__(self, indices: Any, values: Any, shape: Any):
        if not (isinstance(indices, StridedTensor) and isinstance(values, StridedTensor)):
            raise Corrupt("a sparse tensor without index and value tensors")
        self.indices, self.values = indices, values
        self.shape, self.dtype = _ints(shape, "shape"), values.dtype
        ndim = len(indices.shape) == 2 and indices.shape[0]
        if (
            indices.dtype != "int64"
            or not ndim
            or values.shape[:1] != indices.shape[1:]
            or ndim + len(values.shape) - 1 != len(self.shape)
            or values.shape[1:] != self.shape[ndim:]
        ):
            raise Corrupt(
                f"a sparse tensor's indices {indices.shape} and values "
                f"{values.shape} do not fit its shape {self.shape}"
            )

    def check(self) -> None:
        self.indices.check()
        self.values.check()

    def problem(self) -> Optional[str]:
        if prod(self.shape) > MAX_DENSE_ELEMENTS:
            return (
                f"a sparse tensor of {prod(self.shape)} elements in dense form, "
                f"over {MAX_DENSE_ELEMENTS}"
            )
        return self.values.problem() or self.indices.problem()

    def read(self) -> np.ndarray:
        """The dense tensor; duplicate indices add up, as in torch's ``to_dense``."""
        index = self.indices.read()
        values = self.values.read()
        bounds = np.array(self.shape[: index.shape[0]]).reshape(-1, 1)
        if index.size and ((index < 0).any() or (index >= bounds).any()):
            raise Corrupt("a sparse tensor has indices outside its shape")
        dense = np.zeros(self.shape, dtype=values.dtype)
        np.add.at(dense, tuple(index), values)
        return dense


class OpaqueTensor(PickledTensor):
    """A tensor that is recognised but not read (quantized, meta, nested, a sparse layout
    other than COO, a tensor subclass without storage)."""

    def __init__(self, what: str, shape: Any = (), dtype: Any = "?"):
        self.what = what
        self.shape = tuple(shape) if isinstance(shape, (tuple, list)) else ()
        self.dtype = dtype if isinstance(dtype, str) else "?"

    def problem(self) -> Optional[str]:
        return f"a {self.what} tensor is not read"

    def read(self) -> np.ndarray:
        raise Corrupt(self.problem())


# -- what the pickles may call -----------------------------------------------------------------


class _DType(str):
    """A torch dtype named by the pickle (``torch.float32``)."""


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = dtype


def _metadata_negative(metadata: Any) -> bool:
    if metadata is None or (isinstance(metadata, dict) and not any(metadata.values())):
        return False
    if isinstance(metadata, dict) and set(k for k, v in metadata.items() if v) == {"neg"}:
        return True
    raise Corrupt(f"tensor metadata {one_line(repr(metadata))[:80]} is not supported")


def _rebuild_tensor(storage, offset, size, stride):
    return StridedTensor(storage, offset, size, stride, getattr(storage, "dtype", "?"))


def _rebuild_tensor_v2(
    storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None
):
    return StridedTensor(
        storage, offset, size, stride, getattr(storage, "dtype", "?"), _metadata_negative(metadata)
    )


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, _DType):
        return OpaqueTensor(f"{getattr(dtype, 'global_name', dtype)}", size)
    return StridedTensor(storage, offset, size, stride, str(dtype), _metadata_negative(metadata))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func in _REBUILDERS_SET and isinstance(args, tuple):
        return func(*args)
    return OpaqueTensor(f"subclass ({getattr(new_type, 'global_name', '?')})")


def _rebuild_sparse_tensor(layout, data):
    if layout == "sparse_coo" and isinstance(data, tuple) and len(data) in (3, 4):
        return SparseTensor(data[0], data[1], data[2])
    shape = data[-1] if isinstance(data, tuple) and data else ()
    values = data[-2] if isinstance(data, tuple) and len(data) > 1 else None
    return OpaqueTensor(f"sparse ({layout})", shape, getattr(values, "dtype", "?"))


def _rebuild_qtensor(storage, offset, size, stride, *rest):
    return OpaqueTensor("quantized", size, getattr(storage, "dtype", "?"))


def _rebuild_meta(dtype, size, stride, requires_grad=False):
    return OpaqueTensor("meta (no data)", size, dtype)


def _rebuild_opaque(what: str):
    def rebuild(*args, **kwargs):
        return OpaqueTensor(what)

    return rebuild


def _get_layout(name):
    """``torch.serialization._get_layout("torch.sparse_coo")``: the layout's name."""
    if not isinstance(name, str):
        raise Corrupt("a bad tensor layout")
    return name.rpartition(".")[2]


def _set(items=()):
    """``builtins.set`` / ``frozenset`` of a list (protocols 2 and 3 pickle sets so)."""
    if not isinstance(items, (list, tuple)):
        raise Corrupt("a set with bad arguments")
    return set(items)


def _size(dims=()):
    return _ints(dims, "size")


class _OrderedDict(dict):
    """``collections.OrderedDict`` as a plain dict (its items come as arguments or by
    SETITEMS); its attributes (a state dict's ``_metadata``, by BUILD) are dropped."""

    __slots__ = ()

    def __init__(self, items=()):
        if not isinstance(items, (list, tuple)) or not all(
            isinstance(i, (list, tuple)) and len(i) == 2 for i in items
        ):
            raise Corrupt("an OrderedDict with bad arguments")
        super().__init__(items)

    def __setstate__(self, state):
        pass


_REBUILDERS = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._utils._rebuild_sparse_tensor": _rebuild_sparse_tensor,
    "torch._utils._rebuild_qtensor": _rebuild_qtensor,
    "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta,
    "torch._utils._rebuild_nested_tensor": _rebuild_opaque("nested"),
    "torch._utils._rebuild_wrapper_subclass": _rebuild_opaque("subclass (no storage)"),
    "torch._utils._rebuild_device_tensor_from_numpy": _rebuild_opaque("device"),
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _rebuild_opaque("device"),
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
}
_REBUILDERS_SET = set(_REBUILDERS.values())


# -- numpy arrays inside pickles -------------------------------------------------------------

_SIMPLE_DTYPE = re.compile(r"^([fiuc]\d{1,2}|b1|\?)$")


class _NumpyDType:
    """``numpy.dtype(spec, align, copy)`` and its BUILD state: only a plain numeric dtype is
    ever made into a real one (:meth:`numpy`)."""

    def __init__(self, spec=None, align=False, copy=False):
        self.spec, self.order, self.structured = spec, "=", False

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 3:
            if state[1] in ("<", ">", "|", "="):
                self.order = state[1]
            self.structured = state[3] is not None

    def numpy(self) -> Optional[np.dtype]:
        if self.structured or not isinstance(self.spec, str) or not _SIMPLE_DTYPE.match(self.spec):
            return None
        return np.dtype(self.spec).newbyteorder(self.order if self.order != "|" else "=")


class NumpyArray(PickledTensor):
    """A numpy array pickled inside the file (``numpy...._reconstruct`` + BUILD, or
    ``_frombuffer``): its bytes are in the pickle; numpy's own code never runs on them."""

    def __init__(self, *args):
        self.shape, self.dtype, self._np, self._data, self._order = (), "?", None, None, "C"

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise Corrupt("a numpy array with a bad state")
        _, shape, dtype, fortran, data = state
        self._set(data, dtype, shape, "F" if fortran is True else "C")

    def _set(self, data, dtype, shape, order):
        self.shape = _ints(shape, "numpy array shape")
        self._np = dtype.numpy() if isinstance(dtype, _NumpyDType) else None
        self.dtype = self._np.name if self._np is not None else "object"
        self._order = order
        if self._np is not None:
            if (
                not isinstance(data, (bytes, bytearray))
                or len(data) != prod(self.shape) * self._np.itemsize
            ):
                raise Corrupt(f"a numpy array's data do not match its shape {self.shape}")
            self._data = bytes(data)

    def problem(self) -> Optional[str]:
        return None if self._np is not None else "a numpy array of objects is not read"

    def read(self) -> np.ndarray:
        if self._np is None:
            raise Corrupt(self.problem())
        array = np.frombuffer(self._data, dtype=self._np).reshape(self.shape, order=self._order)
        if not self._np.isnative:
            return array.astype(self._np.newbyteorder("="))
        return array if array.flags.aligned else array.copy()


def _numpy_frombuffer(data, dtype, shape, order="C"):
    array = NumpyArray()
    array._set(data, dtype, shape, "F" if order == "F" else "C")
    return array


def _numpy_scalar(dtype, data=None):
    """``numpy...multiarray.scalar(dtype, bytes)`` (``np.float64(0.5)`` in a checkpoint): the
    Python number, for a plain numeric dtype."""
    dt = dtype.numpy() if isinstance(dtype, _NumpyDType) else None
    if dt is None or not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise Corrupt("a numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype=dt)[0].item()


def _codecs_encode(text, encoding="utf-8"):
    """``_codecs.encode(text, "latin1")``: how protocol 2 pickles ``bytes``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Corrupt("a bytes object pickled in an unknown way")
    return text.encode("latin1")


def _known(nested: bool) -> Dict[str, Any]:
    """What the pickles' globals resolve to: our recorders, dtypes, layouts, storage types;
    ``torch.storage._load_from_bytes`` (storages of a plain pickle) unless ``nested``."""
    known: Dict[str, Any] = dict(_REBUILDERS)
    for name in list(NUMPY_DTYPES) + list(OTHER_ITEMSIZES):
        known[f"torch.{name}"] = _DType(name)
    for layout in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc"):
        known[f"torch.{layout}"] = layout
    for cls, dtype in STORAGE_DTYPES.items():
        known[f"torch.{cls}"] = known[f"torch.cuda.{cls}"] = _StorageType(dtype)
    known["torch.storage.UntypedStorage"] = known["torch.UntypedStorage"]
    for core in ("numpy.core", "numpy._core"):
        known[f"{core}.multiarray._reconstruct"] = NumpyArray
        known[f"{core}.numeric._frombuffer"] = _numpy_frombuffer
        known[f"{core}.multiarray.scalar"] = _numpy_scalar
    known["numpy.ndarray"] = "ndarray"
    known["numpy.dtype"] = _NumpyDType
    known["_codecs.encode"] = _codecs_encode
    known["torch.Size"] = _size
    known["torch.serialization._get_layout"] = _get_layout
    known["collections.OrderedDict"] = _OrderedDict
    known["builtins.set"] = known["builtins.frozenset"] = _set
    if not nested:
        known["torch.storage._load_from_bytes"] = _storage_from_bytes
    return known


def _storage_from_bytes(data):
    """A storage pickled on its own (``pickle.dumps`` of a tensor): a legacy stream."""
    if not isinstance(data, bytes):
        raise Corrupt("a pickled storage that is not bytes")
    root, _ = _read_stream(data, nested=True)
    if not isinstance(root, Storage):
        raise Corrupt("a pickled storage that holds no storage")
    return root


def _pid_text(value: Any) -> Any:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _storage_ref(storages: Dict[str, Storage], stype: Any, key: Any, numel: Any) -> Storage:
    if not isinstance(stype, _StorageType):
        raise Corrupt(f"a storage of unknown type {getattr(stype, 'global_name', stype)!r}")
    key = str(_pid_text(key))
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise Corrupt(f"storage {key} has a bad size {numel!r}")
    found = storages.get(key)
    if found is None:
        found = storages[key] = Storage(key, stype.dtype, numel)
    return found


def _zip_persistent_load(storages: Dict[str, Storage]):
    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and _pid_text(pid[0]) == "storage"):
            raise Corrupt(f"an unknown persistent id {one_line(repr(pid))[:80]}")
        return _storage_ref(storages, pid[1], pid[2], pid[4])

    return persistent_load


def _legacy_persistent_load(storages: Dict[str, Storage], views: Dict[str, Tuple]):
    def persistent_load(pid):
        kind = _pid_text(pid[0]) if isinstance(pid, tuple) and pid else None
        if kind == "module" and len(pid) == 4:
            return pid[1]
        if kind != "storage" or len(pid) != 6:
            raise Corrupt(f"an unknown persistent id {one_line(repr(pid))[:80]}")
        root = _storage_ref(storages, pid[1], pid[2], pid[4])
        if pid[5] is None:
            return root
        view = pid[5]
        if not (
            isinstance(view, tuple)
            and len(view) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in view[1:])
        ):
            raise Corrupt("a bad storage view")
        key = str(_pid_text(view[0]))
        if key not in views:
            views[key] = (root, view[1], Storage(key, root.dtype, view[2]))
        return views[key][2]

    return persistent_load


def _check_stored(storage: Storage, end: int, size: int) -> None:
    if end > size:
        raise Corrupt(
            f"storage {storage.key} ends at byte {end}, past the end of the file "
            f"({size} bytes): truncated?"
        )


# -- the formats -----------------------------------------------------------------------------


def _read_stream(buffer, nested: bool = False) -> Tuple[Any, Set[str]]:
    """A legacy torch stream, or a plain pickle (whose first object is not the magic number)."""
    window = Window(buffer)
    first, inert = load(window, _known(nested))
    if first != MAGIC_NUMBER or isinstance(first, bool):
        return first, inert
    protocol, _ = load(window)
    if protocol != LEGACY_PROTOCOL:
        raise Corrupt(f"unknown legacy protocol {protocol!r}")
    load(window)  # system info: the data are little-endian whatever it says
    storages: Dict[str, Storage] = {}
    views: Dict[str, Tuple] = {}
    root, inert = load(window, _known(nested), _legacy_persistent_load(storages, views))
    keys, _ = load(window)
    if not isinstance(keys, list) or not all(isinstance(k, (str, bytes)) for k in keys):
        raise Corrupt("a bad storage key list")
    pos, size = window.pos, len(memoryview(buffer))
    for key in map(lambda k: str(_pid_text(k)), keys):
        if pos + 8 > size:
            raise Corrupt("truncated (storage data missing)")
        (count,) = struct.unpack_from("<q", buffer, pos)
        storage = storages.get(key)
        if storage is None:
            raise Corrupt(f"storage {key} is not referenced")
        if count != storage.numel:
            raise Corrupt(f"storage {key} holds {count} elements, the pickle says {storage.numel}")
        storage.buffer, storage.start = buffer, pos + 8
        pos += 8 + count * itemsize(storage.dtype)
        _check_stored(storage, pos, size)
    missing = [k for k, s in storages.items() if s.buffer is None]
    if missing:
        raise Corrupt(f"storage {missing[0]} has no data")
    for root_storage, offset, view in views.values():
        if offset + view.numel > root_storage.numel:
            raise Corrupt(f"storage view {view.key} reaches past its storage")
        view.buffer = root_storage.buffer
        view.start = root_storage.start + offset * itemsize(view.dtype)
    return root, inert


def _read_zip(buffer, zf: zipfile.ZipFile) -> Tuple[Any, Set[str]]:
    infos = {i.filename: i for i in zf.infolist()}
    pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise Corrupt("a zip file without exactly one <folder>/data.pkl: not a torch.save file")
    prefix = pickles[0][: -len("data.pkl")]
    pickle_info = infos[pickles[0]]
    if pickle_info.file_size > MAX_PICKLE_BYTES:
        raise PickleTooLarge()
    order = infos.get(prefix + "byteorder")
    big = order is not None and order.file_size < 16 and zf.read(order).strip() == b"big"
    storages: Dict[str, Storage] = {}
    root, inert = load(Window(zf.read(pickle_info)), _known(False), _zip_persistent_load(storages))
    for key, storage in storages.items():
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            raise Corrupt(f"storage {key} is missing from the zip")
        nbytes = storage.numel * itemsize(storage.dtype)
        if info.file_size != nbytes:
            raise Corrupt(f"storage {key} holds {info.file_size} bytes, the pickle says {nbytes}")
        try:
            data, start = zip_member_data(buffer, info)
        except ValueError as e:
            raise Corrupt(str(e)) from None
        if data is None:
            data, start = zf.read(info), 0
        storage.buffer, storage.start, storage.big_endian = data, start, big
    if prefix + "constants.pkl" in infos:  # TorchScript: the module and its classes' declarations
        constants = sum(n.startswith(prefix + "constants/") for n in infos)
        root = ScriptArchive(root, declarations(_code(zf, prefix + "code/")), constants)
    return root, inert


def _code(zf: zipfile.ZipFile, folder: str) -> Dict[str, str]:
    """The ``.py`` files under ``folder`` of a TorchScript archive, ``{path under it: text}``,
    up to :data:`~.torchscript.MAX_CODE_BYTES` in all (each file's declared size; the zip
    reader never inflates past it)."""
    texts, total = {}, 0
    for info in zf.infolist():
        name = info.filename
        if not (name.startswith(folder) and name.endswith(".py")) or info.is_dir():
            continue
        total += info.file_size
        if total > MAX_CODE_BYTES:
            break
        texts[name[len(folder) :]] = zf.read(info).decode("utf-8", errors="replace")
    return texts


def read_torch(buffer, origin: str) -> Tuple[Any, Set[str]]:
    """The object a torch file (zip or legacy) or plain pickle holds, tensors as
    :class:`PickledTensor` records whose storages were checked against the file (the tensors
    against their storages: :func:`check`), and the names of the globals that were left
    inert. ``buffer``: the file's bytes (``bytes`` or a read-only ``mmap``).
    Every problem is an :class:`AnalyzeError` naming ``origin``."""
    head = bytes(memoryview(buffer)[:4])
    try:
        if head == b"PK\x03\x04":
            try:
                zf = zipfile.ZipFile(
                    io.BytesIO(buffer) if isinstance(buffer, bytes) else _MapFile(buffer)
                )
            except zipfile.BadZipFile:
                raise AnalyzeError(
                    f"{origin} is truncated (its zip directory is missing)"
                ) from None
            with zf:
                root, inert = _read_zip(buffer, zf)
        elif bytes(memoryview(buffer)[257:262]) == b"ustar":
            raise AnalyzeError(f"{origin} is in torch's pre-1.0 tar format, which is not read")
        else:
            root, inert = _read_stream(buffer)
    except AnalyzeError:
        raise
    except PickleTooLarge:
        raise AnalyzeError(
            f"{origin}: its pickled objects exceed "
            f"{MAX_PICKLE_BYTES >> 20} MiB (not a weights file?)"
        ) from None
    except Corrupt as e:
        raise AnalyzeError(f"{origin} is not a valid PyTorch file ({e})") from None
    except MemoryError:  # the C unpickler allocates what a length field claims, then reads
        raise AnalyzeError(
            f"{origin} is not a valid PyTorch file (a length in its pickle "
            "claims more memory than there is)"
        ) from None
    except (EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise AnalyzeError(
            f"{origin} is truncated or corrupt ({one_line(e) or 'ran out of data'})"
        ) from None
    except Exception as e:  # UnpicklingError, ValueError, TypeError ... of a malformed pickle
        message = one_line(e)
        if "truncated" in message or "ran out of input" in message.lower():
            raise AnalyzeError(f"{origin} is truncated") from None
        raise AnalyzeError(f"{origin} is not a valid PyTorch file ({message[:200]})") from None
    return root, inert


def check(tensors: Mapping, origin: str) -> None:
    """:meth:`PickledTensor.check` of each tensor (name -> tensor), as an
    :class:`AnalyzeError` naming ``origin`` and the tensor."""
    for name, tensor in tensors.items():
        try:
            tensor.check()
        except Corrupt as e:
            raise AnalyzeError(
                f"{origin} is not a valid PyTorch file (tensor {name!r}: {e})"
            ) from None


class _MapFile(io.RawIOBase):
    """A seekable read-only file over an ``mmap`` for :mod:`zipfile` (no copy)."""

    def __init__(self, buffer):
        super().__init__()
        self._buf = memoryview(buffer)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, [pos, self._pos + pos, len(self._buf) + pos][whence])
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, target) -> int:
        data = self._buf[self._pos : self._pos + len(target)]
        target[: len(data)] = data
        self._pos += len(data)
        return len(data)
