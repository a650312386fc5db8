"""A live ``torch.nn.Module`` (an AllenNLP ``Model`` included).

Names are the module's ``state_dict()`` keys, in its order (so they match a saved state dict of
the same model); ``module_type`` is the class name of the submodule that owns each tensor (the
standard ``torch.nn`` layer it derives from, if any: see :func:`layer_type`); ``buffer`` tells
registered buffers from parameters; ``parts`` gives the q/k/v row blocks of a fused projection
where its module says how it splits (:func:`fused_parts`). Arrays share memory with the
parameters where they are on the CPU and are read-only.
"""

from dataclasses import replace
from typing import Dict, Optional, Sequence, Tuple

from ..tensors import TensorInfo

from ._common import TensorDictSource, is_torch_tensor


def layer_type(cls: type) -> str:
    """The name of the standard ``torch.nn`` layer a module class is (``Linear`` for
    ``NonDynamicallyQuantizableLinear`` or a user's ``class MyLinear(nn.Linear)``), else the
    class's own name."""
    import torch.nn as nn

    for base in cls.__mro__:
        if base is nn.Module:
            break
        if getattr(nn, base.__name__, None) is base:
            return base.__name__
    return cls.__name__


def _module_types(module, names) -> Dict[str, Optional[str]]:
    owners = {
        prefix: layer_type(type(sub))
        for prefix, sub in module.named_modules(remove_duplicate=False)
    }
    types = {}
    for name in names:
        prefix = name.rpartition(".")[0]
        types[name] = owners.get(prefix)
    return types


def fused_parts(module) -> Dict[str, Tuple[Tuple[str, int], ...]]:
    """``{weight name: ((part, rows), ...)}`` of the fused projections whose modules say how they
    split: AllenNLP's ``MultiHeadSelfAttention`` (0.x) computes q, k, v with one Linear,
    ``_combined_projection``, of ``2 * _attention_dim + _values_dim`` outputs, in that order."""
    found: Dict[str, Tuple[Tuple[str, int], ...]] = {}
    for prefix, sub in module.named_modules():
        proj = getattr(sub, "_combined_projection", None)
        a, v = getattr(sub, "_attention_dim", None), getattr(sub, "_values_dim", None)
        weight = getattr(proj, "weight", None)
        if (
            isinstance(a, int)
            and isinstance(v, int)
            and weight is not None
            and weight.dim() == 2
            and weight.shape[0] == 2 * a + v
        ):
            name = (
                f"{prefix}._combined_projection.weight" if prefix else "_combined_projection.weight"
            )
            found[name] = (("q", a), ("k", a), ("v", v))
    return found


class ModuleSource(TensorDictSource):
    def __init__(self, module, label: Optional[str] = None):
        self.module = module
        state = module.state_dict(keep_vars=True)
        # Extra state (``get_extra_state``) may be any object; only tensors are weights.
        state = {name: value for name, value in state.items() if is_torch_tensor(value)}
        label = label or type(module).__name__
        super().__init__(
            label, state, origin=f"module {label}", module_types=_module_types(module, state)
        )
        self._buffers = {name for name, _ in module.named_buffers(remove_duplicate=False)}
        self._parts = fused_parts(module)

    def tensors(self) -> Sequence[TensorInfo]:
        return [
            replace(i, buffer=i.name in self._buffers, parts=self._parts.get(i.name, ()))
            for i in super().tensors()
        ]
