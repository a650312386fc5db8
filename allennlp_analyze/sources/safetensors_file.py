"""safetensors files, single or sharded, read with numpy alone (no torch, no safetensors package).

Format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
data, offsets relative to its start. Each :meth:`load` reads one tensor's bytes with one read.
safetensors keeps no model order, so names are listed in natural order (``layer.2`` before
``layer.10``).
"""

import math
import mmap
import os
import struct
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from .. import limits
from ..errors import AnalyzeError
from ..tensors import Mapped, TensorInfo
from ._common import natural_key, one_line, read_index

#: The safetensors library refuses headers above 100 MB; so do we.
MAX_HEADER = 100_000_000


def _float8_table(
    exp_bits: int, man_bits: int, bias: int, ieee: bool, fnuz: bool = False
) -> np.ndarray:
    """float32 value of each of the 256 float8 bit patterns (E4M3FN: no infinities,
    S.1111.111 is NaN; E5M2: IEEE-like; ``fnuz`` (torch's E4M3FNUZ / E5M2FNUZ): no infinities,
    no negative zero, 1.0000.000 alone is NaN)."""
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    man = codes & ((1 << man_bits) - 1)
    normal = (1.0 + man / 2.0**man_bits) * np.exp2(exp.astype(np.float64) - bias)
    subnormal = (man / 2.0**man_bits) * 2.0 ** (1 - bias)
    values = sign * np.where(exp == 0, subnormal, normal)
    top = (1 << exp_bits) - 1
    if fnuz:
        values = np.where(codes == 0x80, np.nan, values)
    elif ieee:
        values = np.where((exp == top) & (man == 0), sign * np.inf, values)
        values = np.where((exp == top) & (man != 0), np.nan, values)
    else:
        values = np.where((exp == top) & (man == (1 << man_bits) - 1), np.nan, values)
    return values.astype(np.float32)


# safetensors dtype -> (numpy storage dtype, reported dtype name)
_DTYPES: Dict[str, Tuple[np.dtype, str]] = {
    "F64": (np.dtype("<f8"), "float64"),
    "F32": (np.dtype("<f4"), "float32"),
    "F16": (np.dtype("<f2"), "float16"),
    "BF16": (np.dtype("<u2"), "bfloat16"),
    "F8_E4M3": (np.dtype("u1"), "float8_e4m3fn"),
    "F8_E5M2": (np.dtype("u1"), "float8_e5m2"),
    "I64": (np.dtype("<i8"), "int64"),
    "I32": (np.dtype("<i4"), "int32"),
    "I16": (np.dtype("<i2"), "int16"),
    "I8": (np.dtype("i1"), "int8"),
    "U64": (np.dtype("<u8"), "uint64"),
    "U32": (np.dtype("<u4"), "uint32"),
    "U16": (np.dtype("<u2"), "uint16"),
    "U8": (np.dtype("u1"), "uint8"),
    "BOOL": (np.dtype("?"), "bool"),
}
#: The float8 codes that :func:`widen` decodes -> ``_float8_table`` arguments; the FNUZ ones
#: are torch's (no safetensors dtype), for torch files.
_FLOAT8_FORMATS: Dict[str, Tuple[int, int, int, bool, bool]] = {
    "F8_E4M3": (4, 3, 7, False, False),
    "F8_E5M2": (5, 2, 15, True, False),
    "F8_E4M3FNUZ": (4, 3, 8, False, True),
    "F8_E5M2FNUZ": (5, 2, 16, False, True),
}
_FLOAT8: Dict[str, np.ndarray] = {}


def widen(raw: np.ndarray, st_dtype: str) -> np.ndarray:
    """Stored bits -> numpy array of the stored precision (bfloat16/float8 -> float32, exactly)."""
    if st_dtype == "BF16":
        bits = raw.astype(np.uint32)
        bits <<= 16  # in place: one temporary, not two
        return bits.view(np.float32)
    if st_dtype in _FLOAT8_FORMATS:
        if st_dtype not in _FLOAT8:
            _FLOAT8[st_dtype] = _float8_table(*_FLOAT8_FORMATS[st_dtype])
        return _FLOAT8[st_dtype][raw]
    return raw


class _Entry:
    __slots__ = ("info", "st_dtype", "begin", "end")

    def __init__(self, info: TensorInfo, st_dtype: str, begin: int, end: int):
        self.info, self.st_dtype, self.begin, self.end = info, st_dtype, begin, end


def read_header(path: Path) -> Tuple[int, Dict[str, _Entry]]:
    """Parse and validate the header: ``(data start offset, {name: entry})``."""

    def corrupt(why: str) -> AnalyzeError:
        return AnalyzeError(f"{path} has a corrupt safetensors header ({why})")

    try:
        with limits.open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise AnalyzeError(f"{path} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise corrupt(f"header length {n} is implausible")
            if 8 + n > size:
                raise AnalyzeError(
                    f"{path} is truncated or has a corrupt safetensors header "
                    f"(header length {n} exceeds the file size {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise AnalyzeError(f"cannot read {path}: {e.strerror or one_line(e)}") from None
    try:
        header = limits.parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise corrupt(f"invalid JSON: {one_line(e)}") from None
    if not isinstance(header, dict):
        raise corrupt("not a JSON object")
    data_size = size - 8 - n
    entries: Dict[str, _Entry] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(spec, dict):
            raise corrupt(f"entry {name!r} is not an object")
        st_dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(st_dtype, str) or st_dtype not in _DTYPES:
            raise corrupt(f"tensor {name!r} has unknown dtype {st_dtype!r}")
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise corrupt(f"tensor {name!r} has a bad shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise corrupt(f"tensor {name!r} has bad data offsets {offsets!r}")
        storage, dtype_name = _DTYPES[st_dtype]
        begin, end = offsets
        if end - begin != math.prod(shape) * storage.itemsize:  # exact: no int64 overflow
            raise corrupt(
                f"tensor {name!r}: data offsets {offsets} do not match shape {shape} and "
                f"dtype {st_dtype}"
            )
        if end > data_size:
            raise AnalyzeError(
                f"{path} is truncated (tensor {name!r} ends at data byte {end}, "
                f"the file holds {data_size})"
            )
        entries[name] = _Entry(
            TensorInfo(name, tuple(shape), dtype_name, None), st_dtype, 8 + n + begin, 8 + n + end
        )
    return 8 + n, entries


def read_tensor(path: Path, entry: _Entry):
    """One tensor, memory-mapped read-only as a :class:`~..tensors.Mapped` view (no copy: its
    pages are read where it is used, in the worker that analyzes it, block by block for a tall
    matrix; bfloat16/float8 widened to float32 only where read). For transient use only (the
    mapping follows the file): ``load`` copies it."""
    storage = _DTYPES[entry.st_dtype][0]
    nbytes = entry.end - entry.begin
    if nbytes == 0:
        return widen(np.empty(entry.info.shape, dtype=storage), entry.st_dtype)
    start = entry.begin - entry.begin % mmap.ALLOCATIONGRANULARITY
    try:
        with limits.open_regular(path) as f:
            if os.fstat(f.fileno()).st_size < entry.end:
                raise AnalyzeError(f"{path} is truncated (tensor {entry.info.name!r})")
            mapped = mmap.mmap(f.fileno(), entry.end - start, access=mmap.ACCESS_READ, offset=start)
    except OSError as e:
        raise AnalyzeError(f"cannot read {path}: {e.strerror or one_line(e)}") from None
    raw = np.frombuffer(
        mapped, dtype=storage, count=nbytes // storage.itemsize, offset=entry.begin - start
    ).reshape(entry.info.shape)
    decode = None
    if entry.st_dtype == "BF16" or entry.st_dtype in _FLOAT8_FORMATS:
        decode = lambda bits, st_dtype=entry.st_dtype: widen(bits, st_dtype)  # noqa: E731
    return Mapped(raw, decode, mapped)


def _owned(array) -> np.ndarray:
    """A fresh writable array: the caller's to keep, whatever later happens to the file."""
    if isinstance(array, Mapped):
        return np.array(array)
    return array if array.flags.writeable else array.copy()


class SafetensorsSource:
    """One ``.safetensors`` file. ``context``: where it is one shard of a checkpoint, every
    tensor of the whole (:func:`sharded_whole`, set by the registry's opener,
    :func:`~.quant.packed.packed_opener`), of which the kinds are decided."""

    context: Optional[Sequence[TensorInfo]] = None

    def __init__(self, path: Union[str, os.PathLike], label: Optional[str] = None):
        self.path = Path(path)
        self.label = label or self.path.name
        _, self._entries = read_header(self.path)

    def tensors(self) -> Sequence[TensorInfo]:
        return [self._entries[n].info for n in sorted(self._entries, key=natural_key)]

    def load(self, name: str) -> np.ndarray:
        entry = self._entries.get(name)
        if entry is None:
            raise AnalyzeError(f"{self.path} has no tensor named {name!r}")
        return _owned(read_tensor(self.path, entry))

    def load_mapped(self, name: str) -> np.ndarray:
        """:meth:`load` without the copy: a read-only view of the file's pages, valid while the
        file is unchanged (the analysis holds each one only while analyzing it)."""
        entry = self._entries.get(name)
        if entry is None:
            raise AnalyzeError(f"{self.path} has no tensor named {name!r}")
        return read_tensor(self.path, entry)

    def __repr__(self) -> str:
        return f"<SafetensorsSource {self.label!r}>"


class ShardedSafetensorsSource:
    """``model.safetensors.index.json`` and the shards it names (all headers read up front)."""

    def __init__(self, index_path: Union[str, os.PathLike], label: Optional[str] = None):
        self.index_path = Path(index_path)
        self.label = label or self.index_path.name
        weight_map = read_index(self.index_path)
        headers: Dict[str, Dict[str, _Entry]] = {}
        self._where: Dict[str, Tuple[Path, _Entry]] = {}
        for name, shard in weight_map.items():
            if shard not in headers:
                path = self.index_path.parent / shard
                if not path.is_file():
                    raise AnalyzeError(
                        f"{path} (a shard named in {self.index_path}) does not exist"
                    )
                headers[shard] = read_header(path)[1]
            entry = headers[shard].get(name)
            if entry is None:
                raise AnalyzeError(
                    f"{self.index_path.parent / shard} lacks {name!r}, which {self.index_path} "
                    "places there"
                )
            self._where[name] = (self.index_path.parent / shard, entry)

    def tensors(self) -> Sequence[TensorInfo]:
        return [self._where[n][1].info for n in sorted(self._where, key=natural_key)]

    def load(self, name: str) -> np.ndarray:
        found = self._where.get(name)
        if found is None:
            raise AnalyzeError(f"{self.index_path} has no tensor named {name!r}")
        return _owned(read_tensor(*found))

    def load_mapped(self, name: str) -> np.ndarray:
        """:meth:`load` without the copy (see :meth:`SafetensorsSource.load_mapped`)."""
        found = self._where.get(name)
        if found is None:
            raise AnalyzeError(f"{self.index_path} has no tensor named {name!r}")
        return read_tensor(*found)

    def __repr__(self) -> str:
        return f"<ShardedSafetensorsSource {self.label!r}>"


def shard_index(path: Path) -> Optional[Path]:
    """The ``*.safetensors.index.json`` beside ``path`` that names it as a shard (indexes that
    cannot be read are passed over); None where none does."""
    for index in sorted(path.parent.glob("*.safetensors.index.json")):
        try:
            if path.name in read_index(index).values():
                return index
        except AnalyzeError:  # a broken or unrelated index beside it: look at the others
            continue
    return None


def sharded_whole(path: Path) -> Optional["ShardedSafetensorsSource"]:
    """The sharded checkpoint (headers only read) whose ``*.safetensors.index.json`` beside
    ``path`` names it as a shard; None where none does, or where the checkpoint cannot be
    listed (the shard is then read on its own)."""
    index = shard_index(path)
    if index is None:
        return None
    try:
        return ShardedSafetensorsSource(index)
    except AnalyzeError:
        return None


def looks_like_safetensors(path: Path) -> bool:
    """Sniff: a plausible header length followed by ``{``."""
    try:
        with limits.open_regular(path) as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except (OSError, AnalyzeError):
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= min(MAX_HEADER, size - 8) and head[8:9] == b"{"
