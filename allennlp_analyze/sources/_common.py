"""Helpers shared by the sources: in-memory tensor dicts, torch -> numpy, name ordering.

Nothing here imports torch at module level: a value is a torch tensor only if torch is
already imported (``sys.modules``), so safetensors-only runs never pay for it.
"""

import mmap
import os
import re
import struct
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .. import limits
from ..errors import AnalyzeError, one_line
from ..tensors import TensorInfo


def natural_key(name: str):
    """Sort key that orders ``layer.2`` before ``layer.10``."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)
    ]


def is_torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def torch_dtype_name(tensor) -> str:
    """``torch.float32`` -> ``"float32"``; integer names coincide with numpy's."""
    return str(tensor.dtype).replace("torch.", "")


def torch_to_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy in its stored precision; bfloat16 and float8 are widened to
    float32, which is exact."""
    t = tensor.detach()
    if t.is_sparse:
        t = t.to_dense()
    t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    name = torch_dtype_name(t)
    if name == "bfloat16" or name.startswith("float8"):
        t = t.float()
    return t.numpy()


def numpy_dtype_name(array: np.ndarray) -> str:
    return array.dtype.name


def numpy_to_numpy(array: np.ndarray) -> np.ndarray:
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, should one turn up
        return array.astype(np.float32)
    return array


def is_tensor(value: Any) -> bool:
    """A numpy array or a torch tensor (in memory)."""
    return isinstance(value, np.ndarray) or is_torch_tensor(value)


class TensorDictSource:
    """Tensors already in memory (torch tensors and/or numpy arrays), in mapping order.

    Arrays handed out by :meth:`load` may share memory with the stored tensors; they are made
    read-only so that an analysis cannot modify the model's weights in place. ``note``: which
    part of a nested checkpoint the state is (see :mod:`.checkpoint`), or ``None``.
    """

    def __init__(
        self,
        label: str,
        state: Mapping,
        origin: Optional[str] = None,
        module_types: Optional[Dict[str, Optional[str]]] = None,
        note: Optional[str] = None,
    ):
        self.label = label
        self.note = note
        self._origin = origin or label
        self._state = state
        self._module_types = module_types or {}
        self._infos: Optional[List[TensorInfo]] = None

    def tensors(self) -> Sequence[TensorInfo]:
        if self._infos is None:
            infos = []
            for name, value in self._state.items():
                if is_torch_tensor(value):
                    shape, dtype = tuple(int(d) for d in value.shape), torch_dtype_name(value)
                else:
                    shape, dtype = tuple(int(d) for d in value.shape), numpy_dtype_name(value)
                infos.append(TensorInfo(name, shape, dtype, self._module_types.get(name)))
            self._infos = infos
        return list(self._infos)

    def load(self, name: str) -> np.ndarray:
        try:
            value = self._state[name]
        except KeyError:
            raise AnalyzeError(f"{self._origin} has no tensor named {name!r}") from None
        try:
            array = (
                torch_to_numpy(value)
                if is_torch_tensor(value)
                else numpy_to_numpy(np.asarray(value))
            )
        except Exception as e:  # e.g. a meta tensor, which has no data
            raise AnalyzeError(
                f"cannot read tensor {name!r} of {self._origin}: {one_line(e)}"
            ) from None
        array = array.view()
        array.flags.writeable = False
        return array

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label!r}>"


class MappedSource:
    """A source whose tensors stay in a (memory-mapped) file until loaded: ``entries`` maps
    each name to where its data are, ``infos`` lists them; subclasses read one with
    :meth:`_read`. ``note``: what was left out or chosen, or ``None``."""

    def __init__(
        self,
        label: str,
        origin: str,
        entries: Mapping,
        infos: List[TensorInfo],
        note: Optional[str] = None,
    ):
        self.label, self._origin, self._entries, self._infos = label, origin, entries, infos
        self.note = note

    def _read(self, name: str, entry: Any) -> np.ndarray:
        raise NotImplementedError

    def tensors(self) -> Sequence[TensorInfo]:
        return list(self._infos)

    def load_mapped(self, name: str) -> np.ndarray:
        """The tensor in its stored precision, a read-only view of the file where it can be
        one (valid while the file is unchanged), else a new array."""
        entry = self._entries.get(name)
        if entry is None:
            raise AnalyzeError(f"{self._origin} has no tensor named {name!r}")
        return self._read(name, entry)

    def load(self, name: str) -> np.ndarray:
        """:meth:`load_mapped` as an array of its own."""
        array = self.load_mapped(name)
        return array if array.flags.owndata and array.flags.writeable else np.array(array)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label!r}>"


def read_index(path: Path) -> Dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded checkpoint's index."""
    try:
        index = limits.parse_json(limits.read_regular(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AnalyzeError(f"{path} is not a valid checkpoint index ({one_line(e)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise AnalyzeError(f"{path} is not a valid checkpoint index (no 'weight_map')")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or not safe_relative(shard):
            raise AnalyzeError(
                f"{path} is not a valid checkpoint index (bad shard file {shard!r} for {name!r})"
            )
    return weight_map


def safe_relative(name: str) -> bool:
    """Whether ``name`` is a relative path that stays inside its folder."""
    parts = re.split(r"[\\/]", name)
    return not (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts)


def inside_folder(folder: Path, name: str) -> bool:
    """Whether the file ``name``, relative to ``folder``, lies inside it: no absolute path, no
    ``..``, no symbolic link leading out (links are resolved), except that in a Hugging Face
    cache snapshot (``.../models--ORG--NAME/snapshots/REV/``) a link may lead into the
    repository's own ``blobs/``, where the hub's cache keeps every file's content."""
    if not name or "\x00" in name or not safe_relative(name):
        return False
    target = os.path.realpath(folder / name)
    bases = [os.path.realpath(folder)] + [b for b in [hub_blobs(folder)] if b is not None]
    return any(os.path.commonpath([target, base]) == base for base in bases)


def hub_blobs(folder: Path) -> Optional[str]:
    """The ``blobs`` folder of the Hugging Face cache repository whose snapshot ``folder`` is
    or lies in; None where ``folder`` is no such snapshot, or where the repository folder or
    its ``blobs`` is itself a link (then ``blobs`` could stand for any folder: only the real
    ``REPO/blobs`` of a real ``REPO`` is allowed)."""
    parts = Path(os.path.realpath(folder)).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(("models--", "datasets--")):
            repo = os.path.join(*parts[:i])
            blobs = os.path.join(repo, "blobs")
            if os.path.islink(blobs) or not os.path.isdir(blobs):
                return None
            return blobs
    return None


def shard_order(weight_map: Dict[str, str]) -> List[str]:
    """Shard files in order of first appearance in the index."""
    return list(dict.fromkeys(weight_map.values()))


def map_file(path: Path):
    """The file's bytes, memory-mapped read-only (``b""`` for an empty file)."""
    try:
        with limits.open_regular(path) as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise AnalyzeError(f"cannot read {path}: {e.strerror or one_line(e)}") from None


def zip_member_data(buffer, info: zipfile.ZipInfo):
    """Where a zip member's bytes lie in the zip's bytes ``buffer``: ``(buffer, offset)`` for a
    stored member (nothing copied), ``(None, offset)`` for a compressed one (to be read through
    :mod:`zipfile`). ``ValueError`` where the member's local header or data are not there, or
    it would expand more than :func:`~allennlp_analyze.limits.expanded_limit` allows (deflate
    reaches ~1000x on runs of zeros: a small file could otherwise claim gigabytes)."""
    view = memoryview(buffer)
    head = bytes(view[info.header_offset : info.header_offset + 30])
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise ValueError(f"zip member {info.filename} has a bad local header")
    name_len, extra_len = struct.unpack_from("<HH", head, 26)
    start = info.header_offset + 30 + name_len + extra_len
    if info.compress_type != zipfile.ZIP_STORED:
        if info.file_size > limits.expanded_limit(info.compress_size):
            raise ValueError(
                f"zip member {info.filename} would expand {info.file_size} bytes "
                f"from {info.compress_size}, over {limits.max_expansion():g}x: "
                f"refused ({limits.ENV_MAX_EXPANSION} allows more)"
            )
        return None, start
    if start + info.file_size > len(view):
        raise ValueError(f"zip member {info.filename} is truncated")
    return buffer, start
