"""Pickled PyTorch state dicts (``.th``, ``.pt``, ``.pth``, ``.bin``), single or sharded.

Files are only ever read with ``torch.load(..., weights_only=True)``: a pickle that would build
arbitrary objects (or run code through ``__reduce__``) is refused, never executed. Zip-format
files on disk are memory-mapped, so listing them does not read the tensor data.
"""
import io
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from ..errors import AnalyzeError
from ..tensors import TensorInfo
from ._common import TensorDictSource, as_state_dict, one_line, read_index, shard_order

SUFFIXES = (".th", ".pt", ".pth", ".bin", ".ckpt")


def _import_torch(origin: str):
    try:
        import torch
    except ImportError:
        raise AnalyzeError(f"reading {origin} needs PyTorch; install torch") from None
    return torch


def load_state_dict(source: Union[str, os.PathLike, bytes], origin: str):
    """``torch.load`` of a file path or of the file's bytes, safely, as a validated
    ``{name: tensor}`` mapping. Every failure becomes an :class:`AnalyzeError` naming ``origin``."""
    torch = _import_torch(origin)
    if isinstance(source, (bytes, bytearray, memoryview)):
        f = io.BytesIO(source)
        head, is_zip, mmap = bytes(source[:4]), zipfile.is_zipfile(f), False
        f.seek(0)
    else:
        f = os.fspath(source)
        try:
            with open(f, "rb") as handle:
                head = handle.read(4)
        except OSError as e:
            raise AnalyzeError(f"cannot read {origin}: {e.strerror or one_line(e)}") from None
        is_zip = zipfile.is_zipfile(f)
        mmap = is_zip  # only the zip format can be memory-mapped
    if head == b"PK\x03\x04" and not is_zip:
        # torch's own zip reader fails obscurely (EINVAL, negative seeks) on these
        raise AnalyzeError(f"{origin} is truncated (its zip directory is missing)")
    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": every failure is reported below instead
            warnings.simplefilter("ignore")
            obj = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "weights only load failed" in message.lower() or "weights_only" in message:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
            why = f"; it references {found.group(1)}" if found else ""
            raise AnalyzeError(
                f"{origin} is not a plain tensor state dict (refused to unpickle arbitrary objects{why})"
            ) from None
        if "truncated" in message or "ran out of input" in message.lower():
            raise AnalyzeError(f"{origin} is truncated") from None
        raise AnalyzeError(f"{origin} is not a valid PyTorch file ({one_line(message)[:200]})") from None
    except EOFError:
        raise AnalyzeError(f"{origin} is truncated") from None
    except Exception as e:  # RuntimeError from the zip reader, ValueError, KeyError ...
        message = one_line(e)
        if "TorchScript" in message:
            raise AnalyzeError(
                f"{origin} is a TorchScript archive, not a plain tensor state dict "
                "(refused to unpickle arbitrary objects)"
            ) from None
        if "central directory" in message or "truncated" in message or "unexpected EOF" in message:
            raise AnalyzeError(f"{origin} is truncated or not a valid PyTorch file") from None
        raise AnalyzeError(f"{origin} is not a valid PyTorch file ({message[:200]})") from None
    finally:
        if isinstance(f, io.BytesIO):
            f.close()
    return as_state_dict(obj, origin)


class TorchFileSource(TensorDictSource):
    """A state dict file, unpickled safely when opened (memory-mapped where the format allows,
    so that only the tensors actually loaded are read from disk)."""

    def __init__(self, path: Union[str, os.PathLike], label: Optional[str] = None):
        self.path = Path(path)
        super().__init__(label or self.path.name, load_state_dict(self.path, str(self.path)), origin=str(self.path))


class ShardedTorchSource:
    """``pytorch_model.bin.index.json`` and its shards. Names come in shard order and, within
    a shard, in the shard's own (model) order; one shard is held in memory at a time."""

    def __init__(self, index_path: Union[str, os.PathLike], label: Optional[str] = None):
        self.index_path = Path(index_path)
        self.label = label or self.index_path.name
        self._weight_map = read_index(self.index_path)
        self._infos: Optional[List[TensorInfo]] = None
        self._current: Optional[str] = None
        self._current_source: Optional[TorchFileSource] = None
        for shard in shard_order(self._weight_map):
            if not (self.index_path.parent / shard).is_file():
                raise AnalyzeError(f"{self.index_path.parent / shard} (a shard named in {self.index_path}) does not exist")

    def _shard(self, shard: str) -> TorchFileSource:
        if self._current != shard:
            path = self.index_path.parent / shard
            self._current_source = TorchFileSource(path)
            self._current = shard
        return self._current_source

    def tensors(self) -> Sequence[TensorInfo]:
        if self._infos is None:
            infos = []
            for shard in shard_order(self._weight_map):
                wanted = {n for n, s in self._weight_map.items() if s == shard}
                found = [i for i in self._shard(shard).tensors() if i.name in wanted]
                missing = wanted - {i.name for i in found}
                if missing:
                    raise AnalyzeError(
                        f"{self.index_path.parent / shard} lacks {sorted(missing)[0]!r}, which {self.index_path} places there"
                    )
                infos.extend(found)
            self._infos = infos
        return list(self._infos)

    def load(self, name: str) -> np.ndarray:
        shard = self._weight_map.get(name)
        if shard is None:
            raise AnalyzeError(f"{self.index_path} has no tensor named {name!r}")
        return self._shard(shard).load(name)

    def __repr__(self) -> str:
        return f"<ShardedTorchSource {self.label!r}>"
