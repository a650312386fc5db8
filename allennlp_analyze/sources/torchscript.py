"""TorchScript archives (``torch.jit.save``): the module's parameters and buffers, read from the
archive's pickle with the same inert unpickler as every torch file; its code is never compiled,
imported or run (no ``torch.jit.load``).

A TorchScript archive is a torch zip (``<folder>/data.pkl``, storages ``<folder>/data/<key>``)
with ``constants.pkl`` (the code's tensor constants: not weights, not read) and ``code/``: the
modules' classes as TorchScript source. ``data.pkl`` holds the top module as an object of its
class (``__torch__.torch.nn.modules.linear.Linear``, a user's ``__torch__.MyNet``, with
``___torch_mangle_N`` components where one class was compiled twice) whose state is a dict of
its attributes: tensors, submodules (objects of such classes), and everything else a scripted
module keeps (``training``, an LSTM's ``_flat_weights`` list, which repeats its parameters).

Which attributes are parameters and which buffers is declared in the class's source, one line
each (``__parameters__ = ["weight", "bias", ]``, ``__buffers__ = [...]``): those lines are read
as text (:func:`declarations`) and give the state dict's names, in its order (a module's
parameters, its buffers, then its submodules'). A class whose source is missing from the archive
contributes the tensors among its attributes (not those inside lists or dicts).
The module type of a tensor is its owner's class name (``Linear``; a user's class by its own
name: TorchScript does not keep the base classes, so a subclass of ``nn.Linear`` is known by
its own name only and the other evidence decides its kind).
"""

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ..errors import AnalyzeError
from .checkpoint import MAX_DEPTH, Weights
from .unpickle import Inert

#: Source files of the archive's classes read for their declarations, at most this many bytes
#: in all (real archives: kilobytes to a few MiB); beyond, the rest are not read.
MAX_CODE_BYTES = 64 << 20
_ROOT = "__torch__"
_CLASS = re.compile(r"^class (\w+)\(Module\):\n((?:[ \t]+__\w+__ = \[[^\]\n]*\]\n)+)", re.MULTILINE)
_DECLARED = re.compile(r"^[ \t]+__(parameters|buffers)__ = \[([^\]\n]*)\]$", re.MULTILINE)
_NAME = re.compile(r'"([^"\\]*)"')


@dataclass
class ScriptArchive:
    """What a TorchScript archive's pickle holds: the top ``module`` (an inert object) and,
    per class (``__torch__.torch.nn.modules.linear.Linear``), its declared parameter and buffer
    names (:func:`declarations`); ``constants``: how many tensor records its code's constants
    have (``constants/<key>``: where ``torch.jit.freeze`` moves the weights, without names)."""

    module: Any
    declared: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = field(default_factory=dict)
    constants: int = 0


def declarations(sources: Dict[str, str]) -> Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]]:
    """``{class: (parameters, buffers)}`` from the archive's code files, given as ``{path under
    code/ (``__torch__/torch/nn/modules/linear.py``): text}``; only the declaration lines are
    read."""
    found = {}
    for path, text in sources.items():
        module = path[: -len(".py")].replace("/", ".")
        for m in _CLASS.finditer(text):
            lists = {
                kind: tuple(_NAME.findall(names)) for kind, names in _DECLARED.findall(m.group(2))
            }
            found[f"{module}.{m.group(1)}"] = (
                lists.get("parameters", ()),
                lists.get("buffers", ()),
            )
    return found


def is_script_module(node: Any) -> bool:
    """An object of a TorchScript class (``__torch__.*``) with a dict of attributes."""
    return (
        isinstance(node, Inert)
        and isinstance(node.state, dict)
        and (node.global_name == _ROOT or node.global_name.startswith(_ROOT + "."))
    )


def class_name(global_name: str) -> str:
    """``__torch__.torch.nn.modules.linear.___torch_mangle_3.Linear`` -> ``Linear``."""
    return global_name.rpartition(".")[2]


def script_weights(
    archive: ScriptArchive, origin: str, is_tensor: Callable[[Any], bool], key: Optional[str] = None
) -> Weights:
    """The archive's parameters and buffers, named as the module's ``state_dict()`` names them
    (``key``: only those under that submodule, named relative to it), their owners' class
    names, and which are buffers."""
    if not is_script_module(archive.module):
        raise AnalyzeError(f"{origin} is a TorchScript archive whose data.pkl holds no module")
    tensors: Dict[str, Any] = {}
    types: Dict[str, str] = {}
    buffers: Set[str] = set()
    undeclared: Set[str] = set()
    seen: Set[int] = set()
    stack: List[Tuple[str, Inert, int]] = [("", archive.module, 0)]
    while stack:
        prefix, node, depth = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if depth > MAX_DEPTH:
            raise AnalyzeError(f"{origin} nests modules more than {MAX_DEPTH} levels deep")
        state: Dict[Any, Any] = node.state
        declared = archive.declared.get(node.global_name)
        if declared is None:
            undeclared.add(node.global_name)
            own = [(n, False) for n, v in state.items() if isinstance(n, str) and is_tensor(v)]
        else:
            own = [(n, False) for n in declared[0]] + [(n, True) for n in declared[1]]
        for attr, is_buffer in own:
            value = state.get(attr)
            if not is_tensor(value):
                continue  # a declared parameter that is None (Linear(bias=False))
            name = prefix + attr
            tensors[name] = value
            types[name] = class_name(node.global_name)
            if is_buffer:
                buffers.add(name)
        children = [
            (f"{prefix}{attr}.", child, depth + 1)
            for attr, child in state.items()
            if isinstance(attr, str) and is_script_module(child)
        ]
        stack.extend(reversed(children))
    if key is not None:
        start = key + "."
        tensors = {n[len(start) :]: t for n, t in tensors.items() if n.startswith(start)}
        if not tensors:
            raise AnalyzeError(
                f"{origin}: the TorchScript module has no submodule {key!r} holding tensors"
            )
        types = {n[len(start) :]: t for n, t in types.items() if n.startswith(start)}
        buffers = {n[len(start) :] for n in buffers if n.startswith(start)}
    if not tensors:
        frozen = (
            f": its {archive.constants} constant tensors (torch.jit.freeze puts the "
            "weights there) have no names; save the module before freezing it"
            if archive.constants
            else ""
        )
        raise AnalyzeError(
            f"{origin} is a TorchScript archive without parameters or buffers{frozen}"
        )
    note = (
        "a TorchScript archive: parameters and buffers read from its pickle (its code was "
        "neither compiled nor run)"
    )
    if undeclared:
        note += f"; classes without declarations in code/: {', '.join(sorted(undeclared)[:3])}"
    return Weights(tensors, types, note, None if undeclared else buffers)
