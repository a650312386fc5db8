"""A live ``torch.nn.Module`` (an AllenNLP ``Model`` included).

Names are the module's ``state_dict()`` keys, in its order (so they match a saved state dict
of the same model); ``module_type`` is the class name of the submodule that owns each tensor (the standard
``torch.nn`` layer it derives from, if any: see :func:`layer_type`).
Arrays share memory with the parameters where they are on the CPU and are read-only.
"""
from typing import Dict, Optional

from ._common import TensorDictSource, is_torch_tensor


def layer_type(cls) -> str:
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
    owners = {prefix: layer_type(type(sub)) for prefix, sub in module.named_modules(remove_duplicate=False)}
    types = {}
    for name in names:
        prefix = name.rpartition(".")[0]
        types[name] = owners.get(prefix)
    return types


class ModuleSource(TensorDictSource):
    def __init__(self, module, label: Optional[str] = None):
        self.module = module
        state = module.state_dict(keep_vars=True)
        # Extra state (``get_extra_state``) may be any object; only tensors are weights.
        state = {name: value for name, value in state.items() if is_torch_tensor(value)}
        label = label or type(module).__name__
        super().__init__(label, state, origin=f"module {label}", module_types=_module_types(module, state))
