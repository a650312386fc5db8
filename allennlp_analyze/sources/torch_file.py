"""Pickled PyTorch files (``.th``, ``.pt``, ``.pth``, ``.bin``, ``.ckpt``, plain pickles of
tensors, TorchScript archives: :mod:`.torchscript`), single or sharded, read without torch and
without running any code from the file.

The file is memory-mapped and parsed by :mod:`.torch_format` (zip and legacy formats; every
global but torch's tensor rebuilders inert); the weights are found by
:func:`.checkpoint.find_weights` (nested training checkpoints, Lightning ``.ckpt``, pickled
modules); each tensor is checked against its storage and the storage against the file before
anything is listed, and its data are read from the file only when it is loaded.
"""

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import AnalyzeError
from ..tensors import TensorInfo
from ._common import MappedSource, map_file, read_index, shard_order
from .checkpoint import find_weights
from .torch_format import Corrupt, PickledTensor, check, read_torch
from .torchscript import ScriptArchive, script_weights
from .unsupported import by_magic

SUFFIXES = (".th", ".pt", ".pth", ".bin", ".ckpt")


def _is_pickled_tensor(value) -> bool:
    return isinstance(value, PickledTensor)


def read_weights(buffer, origin: str, checkpoint_key: Optional[str] = None):
    """The weights of a pickled file's bytes: ``(Weights, left out)``, where the
    :class:`~.checkpoint.Weights` hold only tensors that can be read and ``left out`` names
    the others with the reason (expanded views and sparse tensors too large in dense form,
    quantized and meta tensors)."""
    if len(buffer) == 0:
        raise AnalyzeError(f"{origin} is empty")
    head = bytes(memoryview(buffer)[:16])
    refused = by_magic(head)  # a TFLite file named .bin
    if refused is not None:
        raise AnalyzeError(refused.message(origin))
    if head[:4] == b"GGUF":  # a path is read by content (registry); an archive's member is not
        raise AnalyzeError(
            f"{origin} is a GGUF file, not a PyTorch checkpoint: analyze the GGUF file by itself"
        )
    root, inert = read_torch(buffer, origin)
    if isinstance(root, ScriptArchive):
        weights = script_weights(root, origin, _is_pickled_tensor, checkpoint_key)
    else:
        weights = find_weights(root, origin, _is_pickled_tensor, checkpoint_key, inert)
    check(weights.tensors, origin)
    left = {n: t.problem() for n, t in weights.tensors.items() if t.problem()}
    if left and len(left) == len(weights.tensors):
        name, why = next(iter(left.items()))
        raise AnalyzeError(f"{origin} holds no tensor that can be read ({name!r}: {why})")
    for name in left:
        del weights.tensors[name]
    return weights, left


def _left_note(left: Dict[str, str]) -> Optional[str]:
    if not left:
        return None
    shown = ", ".join(f"{n!r} ({why})" for n, why in list(left.items())[:3])
    more = f" and {len(left) - 3} more" if len(left) > 3 else ""
    plural = "s" if len(left) > 1 else ""
    return f"left out {len(left)} tensor{plural} that are not read: {shown}{more}"


class PickledSource(MappedSource):
    """The weights of a pickled torch file given as its bytes (``bytes`` or an ``mmap``).
    ``note``: which part of a checkpoint was analyzed and what was left out (or ``None``)."""

    def __init__(self, label: str, buffer, origin: str, checkpoint_key: Optional[str] = None):
        weights, left = read_weights(buffer, origin, checkpoint_key)
        buffers = weights.buffers
        infos = [
            TensorInfo(
                name,
                t.shape,
                t.dtype,
                weights.module_types.get(name),
                None if buffers is None else name in buffers,
            )
            for name, t in weights.tensors.items()
        ]
        note = "; ".join(n for n in (weights.note, _left_note(left)) if n) or None
        super().__init__(label, origin, weights.tensors, infos, note)

    def _read(self, name: str, tensor: PickledTensor) -> np.ndarray:
        try:
            return tensor.read()
        except Corrupt as e:
            raise AnalyzeError(
                f"{self._origin} is not a valid PyTorch file (tensor {name!r}: {e})"
            ) from None


class TorchFileSource(PickledSource):
    """A pickled torch file on disk (memory-mapped: only the tensors loaded are read)."""

    def __init__(
        self,
        path: Union[str, os.PathLike],
        label: Optional[str] = None,
        checkpoint_key: Optional[str] = None,
    ):
        self.path = Path(path)
        super().__init__(
            label or self.path.name, map_file(self.path), str(self.path), checkpoint_key
        )


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
                raise AnalyzeError(
                    f"{self.index_path.parent / shard} (a shard named in {self.index_path}) "
                    "does not exist"
                )

    def _shard(self, shard: str) -> TorchFileSource:
        source = self._current_source
        if source is None or self._current != shard:
            source = TorchFileSource(self.index_path.parent / shard)
            self._current_source, self._current = source, shard
        return source

    def tensors(self) -> Sequence[TensorInfo]:
        if self._infos is None:
            infos = []
            for shard in shard_order(self._weight_map):
                wanted = {n for n, s in self._weight_map.items() if s == shard}
                found = [i for i in self._shard(shard).tensors() if i.name in wanted]
                missing = wanted - {i.name for i in found}
                if missing:
                    raise AnalyzeError(
                        f"{self.index_path.parent / shard} lacks {sorted(missing)[0]!r}, "
                        f"which {self.index_path} places there"
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
