"""Which tensors of a checkpoint are the model's weights, and what they are called.

A checkpoint is whatever a training script saved: a flat state dict, or dicts and lists around
one (``{"state_dict": ..., "epoch": 3}``, ``{"model": ..., "optimizer": ...}``, a Lightning
``.ckpt``), possibly with pickled objects (read as inert placeholders, see
:mod:`.unpickle`; a pickled ``nn.Module`` is walked through its ``_parameters``,
``_buffers`` and ``_modules``). The rule, in one place (:func:`find_weights`):

1. ``key`` given (``--checkpoint-key``): the tensors under that part (a top-level key, or a
   dotted path such as ``model.encoder``), named relative to it.
2. A flat ``{name: tensor}`` mapping is the state dict itself.
3. Else the first of :data:`USUAL_KEYS` that holds tensors is taken (and again inside it, as
   long as it holds all the tensors there); the others are named in the note.
4. Else every tensor, named by its path (``encoder.layer.weight``, ``0.weight`` for lists),
   except those under optimizer and scheduler state (:data:`IGNORED`).

Non-tensor values (numbers, strings, hyper-parameters) are ignored. The note says which part
was analyzed and what was left out, whenever that is not the whole of a flat state dict.
"""

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from ..errors import AnalyzeError
from .unpickle import Inert

#: Keys under which training checkpoints keep the model's weights, in order of preference.
USUAL_KEYS = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "params",
    "ema",
    "model_ema",
    "ema_state_dict",
    "state_dict_ema",
)
#: Containers left out unless chosen with ``key``: optimizer and learning-rate scheduler state.
IGNORED = re.compile(r"^(optim|lr_sched|sched)", re.IGNORECASE)
#: Deeper nesting is refused (no checkpoint nests this deep; a crafted one could).
MAX_DEPTH = 100

Path = Tuple[str, ...]


@dataclass
class Weights:
    """The tensors chosen (name -> tensor, in file order), the owning module type of those
    that come from a pickled ``torch.nn`` module, the note (``None``: nothing to say), and the
    names of the registered buffers where the file says which tensors are buffers (a
    TorchScript archive; ``None``: not said)."""

    tensors: Dict[str, Any]
    module_types: Dict[str, str] = field(default_factory=dict)
    note: Optional[str] = None
    buffers: Optional[Set[str]] = None


def _segment(key: Any) -> str:
    return key if isinstance(key, str) else str(key)


#: Values that are never containers (a list of only these is skipped in one C-level pass).
_SCALARS = frozenset((int, float, str, bytes, bool, complex, type(None)))


def _children(node: Any) -> Iterator[Tuple[str, Any]]:
    """The named children of a container; nothing for other values."""
    if isinstance(node, Mapping):
        if not _SCALARS.issuperset(map(type, node.values())):
            for key, value in node.items():
                yield _segment(key), value
    elif isinstance(node, (list, tuple)):
        if not _SCALARS.issuperset(map(type, node)):
            for i, value in enumerate(node):
                yield str(i), value
    elif isinstance(node, Inert):
        state = node.state
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, slots)
            state = {
                **(state[0] if isinstance(state[0], dict) else {}),
                **(state[1] if isinstance(state[1], dict) else {}),
            }
        if _is_module(node):
            for part in ("_parameters", "_buffers", "_modules"):
                yield from _children(state.get(part))
            return
        if state is not None:
            yield from (
                _children(state)
                if isinstance(state, (Mapping, list, tuple))
                else [("state", state)]
            )
        for key, value in node.entries:
            yield _segment(key), value
        for i, value in enumerate(node.items):
            yield str(i), value
        for i, value in enumerate(node.args):
            yield f"arg{i}", value


def _is_module(node: Any) -> bool:
    """A pickled ``torch.nn.Module``: an inert object whose state has ``_parameters``."""
    state = node.state if isinstance(node, Inert) else None
    return isinstance(state, dict) and isinstance(state.get("_parameters"), Mapping)


def _module_type(node: Inert) -> Optional[str]:
    """The class name of a pickled module of ``torch.nn`` (``Linear``); None for others,
    whose nearest standard base class is not known without importing them."""
    module, _, name = node.global_name.rpartition(".")
    return name if module.startswith("torch.nn.") else None


def collect(
    root: Any, is_tensor: Callable[[Any], bool], origin: str
) -> List[Tuple[Path, Any, Optional[str]]]:
    """Every tensor under ``root`` with its path and owning module type, in order. Each
    container is visited once (pickles may share or cycle)."""
    found: List[Tuple[Path, Any, Optional[str]]] = []
    seen = set()
    stack: List[Tuple[Path, Any, Optional[str]]] = [((), root, None)]
    while stack:
        path, node, owner = stack.pop()
        if is_tensor(node):
            found.append((path, node, owner))
            continue
        if not isinstance(node, (Mapping, list, tuple, Inert)) or id(node) in seen:
            continue
        seen.add(id(node))
        if len(path) >= MAX_DEPTH:
            raise AnalyzeError(f"{origin} is nested more than {MAX_DEPTH} levels deep")
        here = _module_type(node) if isinstance(node, Inert) and _is_module(node) else None
        kids = [(path + (seg,), child, here) for seg, child in _children(node)]
        stack.extend(reversed(kids))
    return found


def _name(path: Path) -> str:
    return ".".join(path) if path else "tensor"


def _count(n: int) -> str:
    return f"{n} tensor{'s' if n != 1 else ''}"


def _resolve(root: Any, key: str, origin: str) -> Any:
    """The part of ``root`` that ``key`` names: a key of the top level, else a dotted path."""
    if isinstance(root, Mapping) and key in root:
        return root[key]
    node = root
    for part in key.split("."):
        children = dict(_children(node))
        if part not in children:
            top = [seg for seg, _ in _children(root)][:8]
            where = f" (its top-level keys: {', '.join(map(repr, top))})" if top else ""
            raise AnalyzeError(f"{origin} has no part {key!r}{where}")
        node = children[part]
    return node


def _is_flat(node: Any, is_tensor: Callable[[Any], bool]) -> bool:
    return (
        isinstance(node, Mapping)
        and len(node) > 0
        and all(isinstance(k, str) and is_tensor(v) for k, v in node.items())
    )


def _ignored_at(rel: Path) -> Optional[int]:
    """Index of the first ignored container on a tensor's path (its own key excluded)."""
    return next((i for i, seg in enumerate(rel[:-1]) if IGNORED.match(seg)), None)


def find_weights(
    root: Any,
    origin: str,
    is_tensor: Callable[[Any], bool],
    key: Optional[str] = None,
    inert: Iterable[str] = (),
) -> Weights:
    """The weights of a checkpoint by the module's rule, or an :class:`AnalyzeError` where
    there are none. ``inert``: names of the globals the pickle named but that were not built
    (mentioned in the note or the error)."""
    inert = sorted(inert)
    if key is not None:
        node = _resolve(root, key, origin)
        entries = collect(node, is_tensor, origin)
        if not entries:
            raise AnalyzeError(f"{origin}: the part {key!r} holds no tensors")
        return _weights(entries, origin, _not_built(inert))
    if _is_flat(root, is_tensor):
        return Weights(dict(root), note=_not_built(inert))
    entries = collect(root, is_tensor, origin)
    if not entries:
        if inert:
            raise AnalyzeError(
                f"{origin} is not a plain tensor state dict (refused to unpickle arbitrary "
                f"objects: {_names(inert)}; none was built or run) and holds no tensors"
            )
        raise AnalyzeError(
            f"{origin} is not a plain tensor state dict: it holds no tensors ({describe(root)})"
        )
    path: Path = ()
    node = root
    while isinstance(node, Mapping) and not _is_flat(node, is_tensor):
        under = [e for e in entries if e[0][: len(path)] == path]
        holding = [
            k
            for k in USUAL_KEYS
            if k in node and any(len(e[0]) > len(path) and e[0][len(path)] == k for e in under)
        ]
        if not holding:
            break
        inside = sum(1 for e in under if e[0][len(path)] == holding[0])
        if path and inside < sum(1 for e in under if _ignored_at(e[0][len(path) :]) is None):
            break  # below the top, descend only into a part that holds all its tensors
        path += (holding[0],)
        node = node[holding[0]]
    chosen: List[Tuple[Path, Any, Optional[str]]] = []
    left: Counter = Counter()
    for p, tensor, owner in entries:
        rel = p[len(path) :]
        cut = _ignored_at(rel) if p[: len(path)] == path else None
        if p[: len(path)] != path:
            left[p[0]] += 1
        elif cut is not None:
            left[".".join(p[: len(path) + cut + 1])] += 1
        else:
            chosen.append((rel, tensor, owner))
    if not chosen:
        parts = ", ".join(repr(part) for part in left)
        raise AnalyzeError(
            f"{origin} holds tensors only under {parts}, optimizer or scheduler "
            "state, left out by default (--checkpoint-key chooses a part)"
        )
    note = None
    if path or left:
        note = f"analyzed {'.'.join(path)!r}" if path else "analyzed all the tensors"
        note += f" ({_count(len(chosen))})"
        if left:
            note += "; left out " + ", ".join(f"{part!r} ({_count(n)})" for part, n in left.items())
        note += " (--checkpoint-key chooses the part)"
    built = _not_built(inert)
    return _weights(chosen, origin, "; ".join(n for n in (note, built) if n) or None)


def _names(names: List[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )


def _not_built(inert: List[str]) -> Optional[str]:
    return f"objects not built (their code never ran): {_names(inert)}" if inert else None


def _weights(
    entries: List[Tuple[Path, Any, Optional[str]]], origin: str, note: Optional[str]
) -> Weights:
    tensors: Dict[str, Any] = {}
    types: Dict[str, str] = {}
    for path, tensor, owner in entries:
        name = _name(path)
        if name in tensors:
            raise AnalyzeError(f"{origin} holds two tensors named {name!r}")
        tensors[name] = tensor
        if owner:
            types[name] = owner
    return Weights(tensors, types, note)


def describe(obj: Any, limit: int = 4) -> str:
    """A short description of a value without tensors: ``a dict of 2 entries: 'a' (int),
    'b' (str)``, ``a list of 5000000 entries (float)``."""

    def kind(value: Any) -> str:
        return value.global_name if isinstance(value, Inert) else type(value).__name__

    if isinstance(obj, Mapping):
        shown = ", ".join(f"{k!r} ({kind(v)})" for k, v in list(obj.items())[:limit])
        more = ", ..." if len(obj) > limit else ""
        return f"a dict of {len(obj)} entries{': ' if obj else ''}{shown}{more}"
    if isinstance(obj, (list, tuple)):
        kinds = sorted({kind(v) for v in obj[:1000]})
        return f"a {type(obj).__name__} of {len(obj)} entries" + (
            f" ({', '.join(kinds[:limit])})" if kinds else ""
        )
    return kind(obj)
