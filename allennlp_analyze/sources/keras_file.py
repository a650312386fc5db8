"""Keras weight files, read with ``h5py`` alone: no Keras import, nothing in the file is run
(``keras.models.load_model`` would deserialize the model, ``Lambda`` layers and all).

Three layouts:

* a Keras 3 ``.keras`` file: a zip of ``config.json``, ``metadata.json`` and
  ``model.weights.h5``; the HDF5 member is read in place where it is stored (Keras stores it
  uncompressed), else copied into an anonymous temporary file (never extracted by name);
* a Keras 3 ``.weights.h5`` (``model.save_weights``): one group per object (``layers/dense/vars``
  with datasets ``0``, ``1``...; ``vars`` has the object's name as attribute ``name``), the
  layer classes from a Keras ``config.json`` beside it where there is one, else from the keys
  (Keras names them after the class: ``dense_1``, ``conv2d``, ``lstm/cell``);
* a legacy ``.h5`` (Keras 2, or Keras 3's ``model.save("m.h5")``): attributes ``model_config``
  (the config, JSON) and ``layer_names``, and per layer ``weight_names`` (``dense_1/kernel:0``).

Tensors are named by their Keras path (``dense_1.kernel``, ``mha.query.kernel``,
``lstm.lstm_cell.recurrent_kernel``), listed in the config's order (without one: by name), and
oriented as PyTorch lays out the same layer (:mod:`.keras_layers`), module types from the layer
classes. A trained model's optimizer state (a root ``optimizer`` group) is not read. bfloat16
and float8 variables (opaque HDF5 types named by a ``dtype`` attribute) are widened exactly.
Keras 3's sharded weights (a ``*.weights.json`` index and its ``.weights.h5`` shards) are read
as one source by :mod:`.keras_shards`, with the machinery here: :class:`KerasWalk` merges the
groups of several HDF5 files (:class:`Hdf5Part`) before naming anything, and
:class:`KerasWeights` reads each variable from the file holding it.

Bounds (:mod:`allennlp_analyze.limits`): groups nested at most ``MAX_DEPTH`` deep and at most
``limits.MAX_ARCHIVE_MEMBERS`` objects; only hard links are followed; a dataset whose data lie
in another file (external storage, virtual datasets), beyond the end of the file, were never
written, or would decompress more than ``limits.expanded_limit`` allows is refused when the file
is opened, before anything is read. Uncompressed contiguous data are memory-mapped; chunked
data are read through h5py after a memory check. Whatever h5py raises on a corrupt file is one
:class:`AnalyzeError` line. Not bounded here: the HDF5 library walks the file's own structures
(heaps, B-trees) itself, and a corrupt one can make it loop (seen once in 1500 randomly mutated
files: a global-heap object of a legacy ``model_config``); only a separate process with a
deadline would bound that.
"""

import io
import mmap
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from .. import limits
from ..checkpoint_config import MAX_CONFIG_BYTES, load_config
from ..errors import AnalyzeError, one_line
from ..tensors import TensorInfo
from ._common import MappedSource, map_file, natural_key, safe_relative, zip_member_data
from .keras_layers import (
    Layer,
    Placement,
    class_of_key,
    contradiction,
    layer_configs,
    layer_keys,
    place,
    variable_names,
)
from .safetensors_file import widen

SUFFIXES = (".keras", ".weights.h5", ".h5", ".hdf5")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
WEIGHTS_MEMBER = "model.weights.h5"
#: Deepest group nesting walked (real files: a few levels per nested model).
MAX_DEPTH = 32
#: Longest object or variable name taken from a file (longer ones: the HDF5 key instead).
MAX_NAME = 1000
#: Root groups of a Keras 3 file that are not the model's weights.
NOT_MODEL = ("optimizer", "metrics", "compile_metrics", "compile_loss")
#: What h5py raises on a corrupt file (the HDF5 library's checks, surfacing as any of these).
_HDF5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeError)
#: Keras's opaque HDF5 types (named by the dataset's ``dtype`` attribute): the numpy dtype of
#: their bits and the safetensors code that widens them to float32, exactly.
_OPAQUE: Dict[str, Tuple[np.dtype, str]] = {
    "bfloat16": (np.dtype("<u2"), "BF16"),
    "float8_e4m3fn": (np.dtype("u1"), "F8_E4M3"),
    "float8_e5m2": (np.dtype("u1"), "F8_E5M2"),
}


@dataclass
class _Variable:
    """One stored variable: the dataset's HDF5 path, its shape and dtype as stored (for
    bfloat16 / float8: of its bits, ``code`` saying how they widen), where its raw bytes are
    (``offset`` into the mapped HDF5 data, None: read through h5py), how it is read
    (``placement``), and which of the source's HDF5 files holds it (``part``)."""

    path: str
    shape: Tuple[int, ...]
    dtype: np.dtype
    offset: Optional[int]
    placement: Placement
    code: Optional[str] = None
    part: int = 0


@dataclass
class Hdf5Part:
    """One open HDF5 file of Keras weights: h5py's handle (``h5``) on the bytes
    ``buffer[start : start + size]``, and how messages name it (``where``)."""

    h5: Any
    buffer: Any
    start: int
    size: int
    where: str


@dataclass
class _Node:
    """A group of Keras 3 weights, merged over the files holding parts of it: its HDF5 path
    (``""``: the root), its subgroups by key, whether it is an object (it has a ``vars``
    group), the object's name (that group's ``name`` attribute, in whichever file has one) and
    its variables by key (``"0"``, ``"1"``...: the part holding it and its dataset)."""

    path: str
    children: Dict[str, "_Node"] = field(default_factory=dict)
    is_object: bool = False
    name: Optional[str] = None
    datasets: Dict[str, Tuple[int, Any]] = field(default_factory=dict)


def is_hdf5(head: bytes) -> bool:
    return head[:8] == HDF5_MAGIC


def looks_like_keras(path: Path, head: bytes) -> bool:
    """Sniff (``head``: the file's first bytes): a zip holding ``model.weights.h5`` (a
    ``.keras`` file), or an HDF5 file laid out as Keras writes weights (a legacy
    ``layer_names`` / ``model_config``, or Keras 3's ``layers`` / ``vars`` groups)."""
    try:
        if head[:4] == ZIP_MAGIC:
            with zipfile.ZipFile(path) as zf:
                return WEIGHTS_MEMBER in zf.namelist()
        if not is_hdf5(head):
            return False
        with _h5py().File(path, "r") as h5:
            return hdf5_layout(h5) is not None
    except (OSError, AnalyzeError, ValueError, RuntimeError, KeyError, zipfile.BadZipFile):
        return False


def claims_name(path: Path) -> bool:
    """Whether a file named as Keras names them is read as one: a ``.keras`` file, or an
    ``.h5`` / ``.hdf5`` file that is HDF5 (other ``.h5`` files are left to other formats)."""
    if path.name.lower().endswith(".keras"):
        return True
    try:
        with limits.open_regular(path) as f:
            return is_hdf5(f.read(8))
    except (OSError, AnalyzeError):
        return False


def _h5py():
    try:
        import h5py
    except ImportError:
        raise AnalyzeError(
            "reading Keras files needs h5py (pip install 'allennlp-analyze[keras]')"
        ) from None
    return h5py


def hdf5_layout(h5) -> Optional[str]:
    """``"legacy"``, ``"keras3"`` or None (not a Keras weights file)."""
    if "layer_names" in h5.attrs or "model_config" in h5.attrs:
        return "legacy"
    groups = [k for k in ("layers", "vars") if k in h5]
    return "keras3" if groups else None


class _Window(io.RawIOBase):
    """The bytes ``[start, start + size)`` of ``buffer`` as a read-only seekable file."""

    def __init__(self, buffer, start: int, size: int):
        self._view, self._start, self._size, self._pos = memoryview(buffer), start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._size)[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        b[:n] = self._view[self._start + self._pos : self._start + self._pos + n]
        self._pos += n
        return n


def open_hdf5(buffer, start: int, size: int, where: str) -> Hdf5Part:
    """The HDF5 file in ``buffer[start : start + size]`` opened by h5py (``where``: how
    messages name it)."""
    try:
        h5 = _h5py().File(_Window(buffer, start, size), "r")
    except _HDF5_ERRORS as e:
        raise AnalyzeError(f"{where} is not a readable HDF5 file ({one_line(e)[:300]})") from None
    return Hdf5Part(h5, buffer, start, size, where)


def config_beside(path: Path) -> Optional[Mapping]:
    """The Keras model config in a ``config.json`` beside ``path``; None where there is none,
    or it is not a Keras config."""
    beside = load_config(path.parent / "config.json")
    return beside if _is_keras_config(beside) else None


class KerasWeights(MappedSource):
    """Keras weights held by one or more open HDF5 files (``parts``), their variables named
    by a :class:`KerasWalk` over them; each variable is read from the file holding it."""

    def __init__(self, label: str, origin: str, parts: Sequence[Hdf5Part], walk: "KerasWalk"):
        infos = [
            TensorInfo(
                name,
                v.placement.shape(v.shape),
                _dtype_name(v),
                v.placement.module_type,
                parts=v.placement.parts,
            )
            for name, v in walk.variables.items()
        ]
        super().__init__(label, origin, walk.variables, infos)
        self._parts = list(parts)

    def _read(self, name: str, v: _Variable) -> np.ndarray:
        part = self._parts[v.part]
        try:
            if v.offset is None:
                limits.check_memory(
                    prod(v.shape) * v.dtype.itemsize, f"reading {name} of {self._origin}"
                )
                raw = np.asarray(part.h5[v.path][()]).view(v.dtype)
            else:
                raw = np.frombuffer(
                    part.buffer, dtype=v.dtype, count=prod(v.shape), offset=part.start + v.offset
                ).reshape(v.shape)
        except _HDF5_ERRORS as e:
            raise AnalyzeError(
                f"cannot read {name!r} of {part.where}: {one_line(e)[:300]}"
            ) from None
        if not raw.dtype.isnative:
            raw = raw.astype(raw.dtype.newbyteorder("="))
        elif not raw.flags.aligned:
            raw = raw.copy()
        return v.placement.apply(raw if v.code is None else widen(raw, v.code))


class KerasSource(KerasWeights):
    """A Keras ``.keras``, ``.weights.h5`` or legacy ``.h5`` file (told apart by content)."""

    def __init__(self, path: Union[str, os.PathLike], label: Optional[str] = None):
        self.path = Path(path)
        origin = str(self.path)
        buffer = map_file(self.path)
        head = bytes(memoryview(buffer)[:8])
        config = None
        self._temp = None  # the anonymous copy of a compressed weights member, if any
        zipped = head[:4] == ZIP_MAGIC
        if zipped:
            buffer, start, size, config = self._open_zip(buffer, origin)
            where = f"{origin} (member {WEIGHTS_MEMBER})"
        elif is_hdf5(head):
            start, size, where = 0, len(buffer), origin
        else:
            raise AnalyzeError(f"{origin} is not a Keras file (neither a .keras zip nor HDF5)")
        part = open_hdf5(buffer, start, size, where)
        try:  # HDF5's own checks of a corrupt file surface as any of these, anywhere
            walk = self._walk(part, config, zipped)
        except _HDF5_ERRORS as e:
            raise AnalyzeError(f"{where} is corrupt HDF5 ({one_line(e)[:300]})") from None
        super().__init__(label or self.path.name, origin, [part], walk)

    def _walk(self, part: Hdf5Part, config: Optional[Mapping], zipped: bool) -> "KerasWalk":
        """The file's variables, with its config (its own, else a Keras ``config.json``
        beside an HDF5 file) in ``self.config``."""
        kind = hdf5_layout(part.h5)
        if kind is None:
            raise AnalyzeError(
                f"{part.where} is an HDF5 file but not Keras weights (no "
                "'layers', 'vars' or 'layer_names')"
            )
        if kind == "legacy":
            config = _legacy_config(part.h5, part.where)
        if config is None and not zipped:
            config = config_beside(self.path)
        self.config: Mapping = config or {}
        walk = KerasWalk(self.config, [part], part.where)
        if kind == "legacy":
            walk.legacy()
        else:
            walk.gather(0)
            walk.keras3()
        return walk

    def _open_zip(self, buffer, origin: str):
        """The weights member's bytes (buffer, start, size) and the parsed ``config.json``."""
        try:
            zf = zipfile.ZipFile(_Window(buffer, 0, len(buffer)))
            infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise AnalyzeError(f"{origin} is not a valid .keras zip ({one_line(e)})") from None
        if len(infos) > limits.MAX_ARCHIVE_MEMBERS:
            raise AnalyzeError(f"{origin} holds more than {limits.MAX_ARCHIVE_MEMBERS} members")
        members: Dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if not safe_relative(info.filename):
                raise AnalyzeError(
                    f"{origin} holds a member {info.filename!r} that leaves the "
                    "archive's folder: refused"
                )
            if info.filename in members:
                raise AnalyzeError(
                    f"{origin} holds two members named {info.filename!r} "
                    "(ambiguous: which one is meant?)"
                )
            members[info.filename] = info
        weights, cfg = members.get(WEIGHTS_MEMBER), members.get("config.json")
        if weights is None:
            raise AnalyzeError(f"{origin} holds no {WEIGHTS_MEMBER} (not a Keras 3 .keras file?)")
        config = None
        if cfg is not None:
            if cfg.file_size > MAX_CONFIG_BYTES:
                raise AnalyzeError(
                    f"{origin}: its config.json declares {cfg.file_size} bytes, "
                    f"more than {MAX_CONFIG_BYTES}: refused"
                )
            config = _parse_config(self._read_member(zf, buffer, cfg, origin), origin)
        try:
            data, start = zip_member_data(buffer, weights)
        except ValueError as e:
            raise AnalyzeError(f"{origin}: {one_line(e)}") from None
        if data is not None:
            return data, start, weights.file_size, config
        self._temp = temp = self._extract(zf, weights, origin)
        mapped = mmap.mmap(temp.fileno(), 0, access=mmap.ACCESS_READ)
        return mapped, 0, len(mapped), config

    @staticmethod
    def _read_member(zf: zipfile.ZipFile, buffer, info: zipfile.ZipInfo, origin: str) -> bytes:
        try:
            zip_member_data(buffer, info)  # headers, truncation, expansion ratio
            with zf.open(info) as f:
                return f.read(MAX_CONFIG_BYTES + 1)
        except (ValueError, zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
            raise AnalyzeError(
                f"{origin}: member {info.filename} is unreadable ({one_line(e)})"
            ) from None

    @staticmethod
    def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, origin: str):
        """A compressed weights member, copied into an anonymous temporary file (bounded by
        its declared size, which :func:`zip_member_data` held to the expansion limit)."""
        temp = tempfile.TemporaryFile()
        try:
            with zf.open(info) as src:
                shutil.copyfileobj(src, temp, 1 << 20)
            temp.flush()
            if temp.tell() == 0:
                raise AnalyzeError(f"{origin}: its {WEIGHTS_MEMBER} is empty")
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
            temp.close()
            raise AnalyzeError(
                f"{origin}: member {WEIGHTS_MEMBER} is unreadable ({one_line(e)})"
            ) from None
        return temp


def _parse_config(data: bytes, where: str):
    try:
        config = limits.parse_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AnalyzeError(f"{where}: its config is not valid JSON ({one_line(e)})") from None
    if not _is_keras_config(config):
        raise AnalyzeError(
            f"{where}: its config is not a Keras model config (no 'class_name' and 'config')"
        )
    return config


def _is_keras_config(config) -> bool:
    return (
        isinstance(config, dict)
        and isinstance(config.get("class_name"), str)
        and isinstance(config.get("config"), (dict, list))
    )


def _legacy_config(h5, where: str):
    raw = h5.attrs.get("model_config")
    if raw is None:
        return None
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw[()]
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    if not isinstance(raw, bytes) or len(raw) > MAX_CONFIG_BYTES:
        raise AnalyzeError(
            f"{where}: its model_config attribute is not a JSON text of at most "
            f"{MAX_CONFIG_BYTES} bytes"
        )
    return _parse_config(raw, where)


def _text(value) -> Optional[str]:
    """An HDF5 string attribute (bytes or str) as str, None where it is not one."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and 0 < len(value) <= MAX_NAME else None


class KerasWalk:
    """The variables of Keras weights held by one or more HDF5 files (``parts``), checked and
    named (``variables``, in order). A Keras 3 file's groups are first merged over the files
    (:meth:`gather`, once per file: a sharded file's object may have variables in two), then
    named (:meth:`keras3`); a legacy file is read whole (:meth:`legacy`)."""

    def __init__(self, config: Mapping, parts: Sequence[Hdf5Part], where: str):
        """``config``: the model's Keras config (``{}`` where there is none); ``where``: the
        weights as a whole, for messages."""
        self.h5py = _h5py()
        self.configs = layer_configs(config) if config else {}
        self.parts, self.where = list(parts), where
        self.order = {name: i for i, name in enumerate(self.configs)}
        self.variables: Dict[str, _Variable] = {}
        self.count = 0
        self.tree = _Node("")
        inner = config.get("config")
        self.model_config = inner if isinstance(inner, dict) else {"layers": inner}

    # -- structure --------------------------------------------------------------------------

    def _children(self, group, path: str, depth: int, where: str):
        """``(key, object)`` of a group's members, hard links only, bounded (over all the
        parts together)."""
        if depth > MAX_DEPTH:
            raise AnalyzeError(
                f"{where}: groups nested more than {MAX_DEPTH} levels deep "
                f"(at {path[:200]!r}): refused"
            )
        out = []
        for key in group:
            self.count += 1
            if self.count > limits.MAX_ARCHIVE_MEMBERS:
                raise AnalyzeError(
                    f"{where} holds more than {limits.MAX_ARCHIVE_MEMBERS} "
                    "HDF5 objects (not a Keras weights file?)"
                )
            link = group.get(key, getlink=True)
            if not isinstance(link, self.h5py.HardLink):
                raise AnalyzeError(
                    f"{where}: {path}/{key} is a link "
                    f"({type(link).__name__}), which is not followed"
                )
            out.append((key, group[key]))
        return out

    def _lookup(self, group, name: str):
        """``group[name]`` for a ``/``-separated name, through hard links only."""
        node = group
        for part in name.split("/"):
            if not isinstance(node, self.h5py.Group) or part not in node:
                return None
            if not isinstance(node.get(part, getlink=True), self.h5py.HardLink):
                raise AnalyzeError(
                    f"{self.where}: {name} is reached through a link, which is not followed"
                )
            node = node[part]
        return node

    # -- Keras 3 ----------------------------------------------------------------------------

    def gather(self, index: int) -> None:
        """Merge the groups of the Keras 3 file ``parts[index]`` into the tree (a variable
        that another file holds too is refused: which one is meant?)."""
        part = self.parts[index]
        try:  # HDF5's own checks of a corrupt file surface as any of these, anywhere
            stack = [(part.h5, self.tree, 0)]
            while stack:
                group, node, depth = stack.pop()
                for key, obj in self._children(group, node.path or "/", depth, part.where):
                    if not isinstance(obj, self.h5py.Group) or (depth == 0 and key in NOT_MODEL):
                        continue
                    if key == "vars":
                        self._gather_vars(node, obj, index)
                    else:
                        child = node.children.setdefault(key, _Node(f"{node.path}/{key}"))
                        stack.append((obj, child, depth + 1))
        except _HDF5_ERRORS as e:
            raise AnalyzeError(f"{part.where} is corrupt HDF5 ({one_line(e)[:300]})") from None

    def _gather_vars(self, node: _Node, group, index: int) -> None:
        where = self.parts[index].where
        node.is_object = True
        name = _text(group.attrs.get("name"))
        if name is not None and node.name not in (None, name):
            raise AnalyzeError(
                f"{where}: {group.name} names its object {name!r}, another file "
                f"{node.name!r}: the files contradict each other"
            )
        node.name = node.name or name
        for key, dataset in self._children(group, group.name, 0, where):
            if not isinstance(dataset, self.h5py.Dataset):
                raise AnalyzeError(
                    f"{where}: {group.name} holds something other than datasets 0, 1, ... "
                    "(not Keras 3 weights)"
                )
            if key in node.datasets:
                other = self.parts[node.datasets[key][0]].where
                raise AnalyzeError(
                    f"{self.where}: {group.name}/{key} is stored both in {other} and in "
                    f"{where} (ambiguous: which one is meant?)"
                )
            node.datasets[key] = (index, dataset)

    def holders(self) -> Dict[str, Set[int]]:
        """``{HDF5 path of a vars group: the parts holding its variables}`` of the gathered
        tree (the ``weight_map`` a Keras sharded index should have)."""
        found: Dict[str, Set[int]] = {}
        stack = [self.tree]
        while stack:
            node = stack.pop()
            if node.datasets:
                found[f"{node.path}/vars"] = {part for part, _ in node.datasets.values()}
            stack.extend(node.children.values())
        return found

    def keras3(self) -> None:
        """Name the gathered variables: by their objects' names, in the config's order."""
        stack: List[Tuple[_Node, Tuple[str, ...], Layer, Optional[dict]]] = [
            (self.tree, (), Layer(None, "", self.model_config), {})
        ]
        found: List[Tuple[tuple, _Node, Layer]] = []
        while stack:
            node, names, owner, keyed = stack.pop()
            if node.is_object:
                found.append((names, node, owner))
            for key, child in sorted(node.children.items()):  # HDF5's order: by name
                if child.is_object:  # an object (layer, cell, sublayer)
                    layer = self._layer(key, child.name, owner, child.path, keyed)
                    stack.append((child, names + (layer.name,), layer, None))
                else:  # a container (a model's ``layers``)
                    stack.append((child, names, owner, layer_keys(owner.config)))
        found.sort(
            key=lambda f: [(self.order.get(n, len(self.order)), natural_key(n)) for n in f[0]]
        )
        for names, node, owner in found:
            self._variables(names, node, owner)

    def _layer(
        self, key: str, named: Optional[str], parent: Layer, path: str, keyed: Optional[dict]
    ) -> Layer:
        """The object stored under ``key`` inside ``parent``, named ``named`` (its ``vars``
        attribute; files of Keras versions that wrote none: the config's layer that Keras
        keys so, from its model's layer list, else the key). A model's layer (``keyed``: the
        keys of its model's layers) takes its class from the config where it names it, else
        from the key; they must agree. A layer's own parts (a cell, the query of an attention)
        are not looked up in the config: their names are Keras's, not unique."""
        configured = None
        if keyed is not None:
            configured = self.configs.get(named) if named else keyed.get(key)
        name = named or (configured[1].get("name") if configured else None) or key
        by_key = class_of_key(key, name, parent.class_name)
        if configured is not None and by_key is not None and configured[0] != by_key:
            raise AnalyzeError(
                f"{self.where}: the config says layer {name!r} is a "
                f"{configured[0]}, but the weights store it as a {by_key} "
                f"({path}): the config contradicts the weights"
            )
        if configured is not None:
            return Layer(configured[0], name, configured[1], parent.class_name)
        # a sublayer the config does not list: its own class, the enclosing layer's config
        return Layer(by_key, name, parent.config or {}, parent.class_name)

    def _variables(self, names: tuple, node: _Node, owner: Layer) -> None:
        keys = sorted(node.datasets)
        if keys != sorted(str(i) for i in range(len(keys))):
            raise AnalyzeError(
                f"{self.where}: {node.path}/vars holds something other than "
                "datasets 0, 1, ... (not Keras 3 weights)"
            )
        for i, param in enumerate(variable_names(owner, len(keys))):
            index, dataset = node.datasets[str(i)]
            self._add(".".join(names + (param,)), index, dataset, owner, param)

    # -- legacy -----------------------------------------------------------------------------

    def legacy(self) -> None:
        """Read the legacy file ``parts[0]`` (its ``layer_names`` and ``weight_names``)."""
        root = self.parts[0].h5
        full = "model_config" in root.attrs and "model_weights" in root
        weights = root["model_weights"] if full else root
        for layer_name in self._names(weights.attrs.get("layer_names"), "layer_names"):
            group = self._lookup(weights, layer_name)
            if not isinstance(group, self.h5py.Group):
                raise AnalyzeError(
                    f"{self.where}: layer_names lists {layer_name!r}, which is "
                    "not a group of the file"
                )
            # without a config, a name Keras made up says the class (``dense_1``: Dense)
            cls, cfg = self.configs.get(layer_name, (class_of_key(layer_name, "", None), {}))
            layer = Layer(cls, layer_name, cfg)
            for weight_name in self._names(
                group.attrs.get("weight_names"), "weight_names", optional=True
            ):
                dataset = self._lookup(group, weight_name)
                if not isinstance(dataset, self.h5py.Dataset):
                    raise AnalyzeError(
                        f"{self.where}: layer {layer_name!r} lists weight "
                        f"{weight_name!r}, which is not a dataset of the file"
                    )
                parts = re.sub(r":\d+$", "", weight_name).split("/")
                if layer_name in parts:  # Keras 3 writes a Sequential's name first
                    parts = parts[parts.index(layer_name) :]
                owner = self._legacy_owner(layer, parts)
                self._add(".".join(parts), 0, dataset, owner, parts[-1])

    def _names(self, value, what: str, optional: bool = False) -> List[str]:
        if value is None and optional:
            return []
        items = list(value) if isinstance(value, np.ndarray) and value.ndim == 1 else None
        texts = [] if items is None else [_text(x) for x in items]
        names = [n for n in texts if n is not None]
        if items is None or len(names) < len(texts) or len(names) > limits.MAX_ARCHIVE_MEMBERS:
            raise AnalyzeError(f"{self.where}: its {what} attribute is not a list of names")
        return names

    def _legacy_owner(self, layer: Layer, parts: List[str]) -> Layer:
        """The object owning a legacy weight ``layer/[sub/...]/param``: each component below
        the layer is a layer of a nested model (as the config lists it) or a part of the layer
        above it."""
        owner = layer
        for part in parts[1:-1]:
            if owner.class_name is None:
                break
            if isinstance((owner.config or {}).get("layers"), list) and part in self.configs:
                cls, cfg = self.configs[part]
                owner = Layer(cls, part, cfg, owner.class_name)
            else:
                owner = _part_of(owner, part)
        return owner

    # -- one variable -----------------------------------------------------------------------

    def _add(self, name: str, index: int, dataset, owner: Layer, param: str) -> None:
        """Add the variable ``param`` of ``owner``, ``dataset`` of ``parts[index]``."""
        part = self.parts[index]
        try:  # HDF5's own checks of a corrupt file surface as any of these, anywhere
            self._add_checked(name, index, dataset, owner, param)
        except _HDF5_ERRORS as e:
            raise AnalyzeError(f"{part.where} is corrupt HDF5 ({one_line(e)[:300]})") from None

    def _add_checked(self, name: str, index: int, dataset, owner: Layer, param: str) -> None:
        part = self.parts[index]
        shape = tuple(int(d) for d in dataset.shape) if dataset.shape is not None else ()
        where = f"{part.where}: {dataset.name}"
        dtype, code = np.dtype(dataset.dtype), None
        if dtype.kind == "V":
            tag = _text(dataset.attrs.get("dtype"))
            if tag in _OPAQUE and _OPAQUE[tag][0].itemsize == dtype.itemsize:
                dtype, code = _OPAQUE[tag]
        problem = contradiction(owner, param, shape)
        if problem:
            raise AnalyzeError(f"{self.where}: {problem}: the config contradicts the weights")
        floating = dtype.kind == "f" or code
        offset = self._check(dataset, shape, dtype, where, part.size) if floating else None
        placement = place(owner, param, shape)
        if name in self.variables or not name:
            name = dataset.name.strip("/").replace("/", ".")
        self.variables[name] = _Variable(dataset.name, shape, dtype, offset, placement, code, index)

    def _check(
        self, dataset, shape: Tuple[int, ...], dtype: np.dtype, where: str, size: int
    ) -> Optional[int]:
        """Where a float dataset's raw bytes are (None: chunked or compact, read through h5py)
        in its file of ``size`` bytes, refusing data that are not there or not in the file."""
        h5d = self.h5py.h5d
        nbytes = prod(shape) * dtype.itemsize
        dcpl = dataset.id.get_create_plist()
        layout = dcpl.get_layout()
        if layout not in (h5d.CONTIGUOUS, h5d.CHUNKED, h5d.COMPACT):
            raise AnalyzeError(f"{where} is a virtual dataset (data from other files): not read")
        if dcpl.get_external_count():
            raise AnalyzeError(f"{where} keeps its data in an external file: not read")
        if nbytes == 0:
            return None
        if layout == h5d.CONTIGUOUS:
            offset = dataset.id.get_offset()
            if offset is None:
                raise AnalyzeError(
                    f"{where} has no data (its {_shape(shape)} values were never written)"
                )
            if offset + nbytes > size:
                raise AnalyzeError(
                    f"{where} is truncated or lies about its size (its "
                    f"{_shape(shape)} {dtype.name} values need {nbytes} bytes at "
                    f"{offset}, the file has {size})"
                )
            return offset
        if layout == h5d.CHUNKED:
            stored = dataset.id.get_storage_size()
            if stored > size:
                raise AnalyzeError(
                    f"{where} is truncated ({stored} bytes of chunks, the file has {size})"
                )
            if dcpl.get_nfilters() == 0 and stored < nbytes:
                raise AnalyzeError(
                    f"{where} has chunks missing ({stored} of its {nbytes} bytes are stored)"
                )
            if nbytes > limits.expanded_limit(stored):
                raise AnalyzeError(
                    f"{where} would expand to {nbytes} bytes from {stored}, over "
                    f"{limits.max_expansion():g}x: refused "
                    f"({limits.ENV_MAX_EXPANSION} allows more)"
                )
        return None


def _part_of(layer: Layer, name: str) -> Layer:
    """The part ``name`` of ``layer`` in a legacy file: an attention's projections are
    ``EinsumDense``, a ``Bidirectional``'s halves its wrapped layer's class, a recurrent
    layer's cell its cell class; the layer's config comes along (it says the sizes)."""
    cls = layer.class_name
    if cls == "MultiHeadAttention":
        return Layer("EinsumDense", name, layer.config, cls)
    inner = (layer.config or {}).get("layer") if cls == "Bidirectional" else None
    if isinstance(inner, dict) and isinstance(inner.get("class_name"), str):
        cfg = inner.get("config")
        return Layer(inner["class_name"], name, cfg if isinstance(cfg, dict) else {}, cls)
    return Layer(class_of_key(name, name, cls) or cls, name, layer.config, cls)


def _dtype_name(v: _Variable) -> str:
    """The storage dtype's name as :data:`~allennlp_analyze.tensors.DTYPE_EPS` knows it."""
    return next((name for name, (_, code) in _OPAQUE.items() if code == v.code), v.dtype.name)


def _shape(shape: Tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"
