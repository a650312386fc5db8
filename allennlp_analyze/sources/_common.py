"""Helpers shared by the sources: in-memory tensor dicts, torch -> numpy, name ordering.

Nothing here imports torch at module level: a value is a torch tensor only if torch is
already imported (``sys.modules``), so safetensors-only runs never pay for it.
"""
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .. import limits
from ..errors import AnalyzeError
from ..tensors import TensorInfo

#: Keys under which training checkpoints commonly keep the model's state dict.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights")


def one_line(text: Any) -> str:
    """``text`` squeezed onto one line (error details from libraries may span several)."""
    return " ".join(str(text).split())


def natural_key(name: str):
    """Sort key that orders ``layer.2`` before ``layer.10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


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


def _is_tensor(value: Any) -> bool:
    return isinstance(value, np.ndarray) or is_torch_tensor(value)


def _all_tensors(mapping: Mapping) -> bool:
    return len(mapping) > 0 and all(isinstance(k, str) and _is_tensor(v) for k, v in mapping.items())


def as_state_dict(obj: Any, origin: str) -> Mapping:
    """Validate ``obj`` as a flat ``{name: tensor}`` mapping, unwrapping a training checkpoint
    such as ``{"state_dict": {...}, "epoch": 3}`` or ``{"model": {...}}`` when the wrapped
    mapping holds tensors only. Anything else is refused with an :class:`AnalyzeError`."""
    current = obj
    for _ in range(3):
        if not isinstance(current, Mapping):
            break
        if _all_tensors(current):
            return current
        inner = [current[k] for k in WRAPPER_KEYS if k in current and isinstance(current[k], Mapping)]
        if not inner:
            break
        current = inner[0]
    if not isinstance(current, Mapping):
        raise AnalyzeError(
            f"{origin} is not a plain tensor state dict (it holds {type(current).__name__}, not a dict of tensors)"
        )
    if len(current) == 0:
        raise AnalyzeError(f"{origin} holds no tensors")
    for key, value in current.items():
        if not isinstance(key, str):
            raise AnalyzeError(f"{origin} is not a plain tensor state dict (key {key!r} is not a string)")
        if not _is_tensor(value):
            raise AnalyzeError(
                f"{origin} is not a plain tensor state dict ({key!r} holds {type(value).__name__}, not a tensor)"
            )
    raise AssertionError("unreachable")  # pragma: no cover


class TensorDictSource:
    """Tensors already in memory (torch tensors and/or numpy arrays), in mapping order.

    Arrays handed out by :meth:`load` may share memory with the stored tensors; they are made
    read-only so that an analysis cannot modify the model's weights in place.
    """

    def __init__(self, label: str, state: Mapping, origin: Optional[str] = None,
                 module_types: Optional[Dict[str, Optional[str]]] = None):
        self.label = label
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
            array = torch_to_numpy(value) if is_torch_tensor(value) else numpy_to_numpy(np.asarray(value))
        except Exception as e:  # e.g. a meta tensor, which has no data
            raise AnalyzeError(f"cannot read tensor {name!r} of {self._origin}: {one_line(e)}") from None
        array = array.view()
        array.flags.writeable = False
        return array

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
            raise AnalyzeError(f"{path} is not a valid checkpoint index (bad shard file {shard!r} for {name!r})")
    return weight_map


def safe_relative(name: str) -> bool:
    """Whether ``name`` is a relative path that stays inside its folder."""
    parts = re.split(r"[\\/]", name)
    return not (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts)


def shard_order(weight_map: Dict[str, str]) -> List[str]:
    """Shard files in order of first appearance in the index."""
    return list(dict.fromkeys(weight_map.values()))
