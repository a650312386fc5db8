"""numpy's own files: ``.npy`` (one array) and ``.npz`` (a zip of ``.npy`` members, as
``np.savez`` / ``np.savez_compressed`` write them), read as ``np.load(allow_pickle=False)``
would: the header is numpy's literal (parsed by :mod:`numpy.lib.format`, never evaluated as
code, at most 10000 bytes), arrays of Python objects (which would need unpickling) are
refused, and each array's size is checked against the file before it is listed. Arrays are
memory-mapped where the file stores them uncompressed.

A ``.npy`` file's array is named after the file (``gru.npy`` -> ``gru``), a ``.npz`` file's
after its members (``np.savez(f, w=...)`` -> ``w``), in the file's order.
"""

import io
import os
import zipfile
from math import prod
from pathlib import Path
from typing import Dict, Literal, Optional, Tuple, Union

import numpy as np

from ..errors import AnalyzeError
from ..tensors import TensorInfo
from ._common import MappedSource, map_file, one_line, zip_member_data

MAGIC = b"\x93NUMPY"


class _Array:
    """Where one stored array is: ``shape``, ``dtype``, Fortran order, and its data
    (``buffer`` from byte ``start``; ``buffer`` None: read ``member`` through :mod:`zipfile`)."""

    __slots__ = ("shape", "dtype", "fortran", "buffer", "start", "member")

    def __init__(self, shape, dtype, fortran, buffer, start, member=None):
        self.shape, self.dtype, self.fortran = shape, dtype, fortran
        self.buffer, self.start, self.member = buffer, start, member

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


def read_header(f, origin: str) -> Tuple[Tuple[int, ...], np.dtype, bool]:
    """``(shape, dtype, fortran_order)`` of the ``.npy`` stream ``f``, left at its data."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]} is not read")
    except (ValueError, EOFError, SyntaxError, TypeError) as e:
        raise AnalyzeError(f"{origin} is not a valid .npy array ({one_line(e)[:200]})") from None
    if dtype.hasobject:
        raise AnalyzeError(
            f"{origin} holds Python objects, which are not read "
            "(numpy would need allow_pickle=True)"
        )
    return tuple(int(d) for d in shape), dtype, bool(fortran)


def _check_size(array: _Array, available: int, origin: str) -> None:
    if array.nbytes > available:
        raise AnalyzeError(
            f"{origin} is truncated (its {'x'.join(map(str, array.shape))} "
            f"{array.dtype.name} array needs {array.nbytes} bytes, "
            f"{available} are there)"
        )


def _read(array: _Array, zf: Optional[zipfile.ZipFile]) -> np.ndarray:
    """The array in native byte order; a read-only view of the file where it is aligned."""
    order: Literal["C", "F"] = "F" if array.fortran else "C"
    if array.buffer is None:
        if zf is None:
            raise ValueError(f"{array.member}: a zip member is read through its zip file")
        with zf.open(array.member) as f:
            f.seek(array.start)
            data = f.read(array.nbytes)
        values = np.frombuffer(data, dtype=array.dtype)
    else:
        values = np.frombuffer(
            array.buffer, dtype=array.dtype, count=prod(array.shape), offset=array.start
        )
    values = values.reshape(array.shape, order=order)
    if not array.dtype.isnative:
        return values.astype(array.dtype.newbyteorder("="))
    return values if values.flags.aligned else values.copy()  # zip offsets are arbitrary


class _NumpySource(MappedSource):
    """Arrays by name, listed without reading their data."""

    def __init__(
        self,
        label: str,
        origin: str,
        arrays: Dict[str, _Array],
        zf: Optional[zipfile.ZipFile] = None,
    ):
        infos = [TensorInfo(name, a.shape, a.dtype.name) for name, a in arrays.items()]
        super().__init__(label, origin, arrays, infos)
        self._zip = zf

    def _read(self, name: str, array: _Array) -> np.ndarray:
        try:
            return _read(array, self._zip)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise AnalyzeError(f"cannot read {name!r} of {self._origin}: {one_line(e)}") from None


class NpySource(_NumpySource):
    """One ``.npy`` file (memory-mapped)."""

    def __init__(self, path: Union[str, os.PathLike], label: Optional[str] = None):
        self.path = Path(path)
        origin = str(self.path)
        buffer = map_file(self.path)
        f = io.BytesIO(bytes(memoryview(buffer)[:70000]))  # the header is at most ~64 KiB
        shape, dtype, fortran = read_header(f, origin)
        array = _Array(shape, dtype, fortran, buffer, f.tell())
        _check_size(array, len(buffer) - f.tell(), origin)
        name = self.path.name[:-4] if self.path.name.lower().endswith(".npy") else self.path.name
        super().__init__(label or self.path.name, origin, {name: array})


class NpzSource(_NumpySource):
    """One ``.npz`` file: stored members memory-mapped, compressed ones read when loaded."""

    def __init__(self, path: Union[str, os.PathLike], label: Optional[str] = None):
        self.path = Path(path)
        origin = str(self.path)
        buffer = map_file(self.path)
        try:
            zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise AnalyzeError(f"{origin} is not a valid .npz file ({one_line(e)})") from None
        arrays: Dict[str, _Array] = {}
        for info in zf.infolist():
            if info.is_dir():
                continue
            where = f"{origin} (member {info.filename})"
            if not info.filename.endswith(".npy"):
                raise AnalyzeError(f"{where} is not a .npy array: not a numpy .npz file")
            try:
                data, start = zip_member_data(buffer, info)
                with zf.open(info) as f:
                    shape, dtype, fortran = read_header(f, where)
                    offset = f.tell()
            except (ValueError, zipfile.BadZipFile, OSError, EOFError) as e:
                raise AnalyzeError(f"{where} is unreadable ({one_line(e)})") from None
            array = (
                _Array(shape, dtype, fortran, None, offset, info)
                if data is None
                else _Array(shape, dtype, fortran, data, start + offset)
            )
            _check_size(array, info.file_size - offset, where)
            arrays[info.filename[:-4]] = array
        if not arrays:
            raise AnalyzeError(f"{origin} holds no arrays")
        super().__init__(label or self.path.name, origin, arrays, zf)


def looks_like_npz(path: Path) -> bool:
    """Sniff: a zip whose members are all ``.npy`` arrays."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)
