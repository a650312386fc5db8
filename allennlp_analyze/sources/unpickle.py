"""A pickle reader that never runs code from the file.

Python's pickle runs code in exactly these places: the globals it looks up (``find_class``:
an import and an attribute lookup), the calls it makes with them (``REDUCE``, ``NEWOBJ``,
``INST``/``OBJ``), the methods it calls on what those calls returned (``BUILD`` ->
``__setstate__``; ``APPEND(S)``, ``SETITEM(S)``, ``ADDITEMS`` on objects that are not plain
lists, dicts and sets) and ``persistent_load``. Here ``find_class`` never imports anything: it
answers from a fixed table of the caller's own functions (``known``, e.g. torch's tensor
rebuilders re-implemented as inert records), and every other global becomes an
:class:`Inert` class made on the spot, named after the global and recorded. Calling such a
class, or an instance of it, only stores the arguments; ``__setstate__``, item and append
calls only store theirs. So the objects a file can reach are plain containers and numbers,
the caller's records and inert placeholders, and the only functions it can call are the
caller's own. The unpickling itself is CPython's C implementation (fast); the input is read
through a bounded window (:class:`Window`), and the pickled structure is limited to
:data:`MAX_PICKLE_BYTES`.
"""

import _compat_pickle
import pickle
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

#: The pickled object structure (not tensor data, which stays in the file) may take at most
#: this many bytes; Python objects cost a small multiple of their pickled size.
MAX_PICKLE_BYTES = 128 << 20
#: Distinct globals a pickle may name (each costs a small class).
MAX_GLOBALS = 10_000


class PickleTooLarge(Exception):
    """The pickle's object structure exceeds :data:`MAX_PICKLE_BYTES`."""


class Inert:
    """An object a pickle describes but that is never built: ``Inert`` classes stand for the
    globals it names (``global_name``), instances for what calling them would have made.
    Everything the pickle hands them is stored, nothing is run."""

    __slots__ = ("args", "kwargs", "state", "items", "entries")
    global_name = "?"
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    state: Any
    items: List[Any]
    entries: List[Tuple[Any, Any]]

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        self.items = []
        self.entries = []
        return self

    def __call__(self, *args, **kwargs):
        return type(self)(*args, **kwargs)

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.entries.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def add(self, value):
        self.items.append(value)

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"


def _inert_class(name: str) -> type:
    return type("Inert", (Inert,), {"__slots__": (), "global_name": name, "__module__": __name__})


def global_name(module: str, name: str) -> str:
    """``module.name`` with Python 2's module names mapped to Python 3's (``__builtin__``),
    control characters escaped (names from a file must not write to the terminal)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    full = f"{module}.{name}"
    return full if full.isprintable() else full.encode("unicode_escape").decode("ascii")


class Window:
    """A read-only file-like view of ``buffer[start:]`` (``bytes`` or ``mmap``) for
    :class:`pickle.Unpickler`: reads never return more than is there, and consuming more than
    ``limit`` bytes raises :class:`PickleTooLarge`. (The C unpickler does allocate what a
    bytes or string length field claims before it reads: untouched pages, freed as soon as the
    read comes up short; a claim beyond the memory there is is a ``MemoryError``.) ``peek``
    lets it read ahead in large chunks (a list of 5 million floats: 0.26 s, against 0.93 s
    through ``io.BytesIO``, one run on a shared machine)."""

    def __init__(self, buffer, start: int = 0, limit: int = MAX_PICKLE_BYTES):
        self._obj = buffer
        self._buf = memoryview(buffer)
        self.pos = self._start = start
        self._limit = limit

    def _take(self, stop: int) -> bytes:
        stop = min(stop, len(self._buf))
        if stop - self._start > self._limit:
            raise PickleTooLarge()
        data = self._buf[self.pos : stop].tobytes()
        self.pos = stop
        return data

    def read(self, n: int = -1) -> bytes:
        return self._take(len(self._buf) if n is None or n < 0 else self.pos + n)

    def readinto(self, target) -> int:
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)

    def readline(self) -> bytes:
        end = self._obj.find(b"\n", self.pos)
        return self._take(len(self._buf) if end < 0 else end + 1)

    def peek(self, n: int = 0) -> bytes:
        return self._buf[self.pos : self.pos + max(n, 1)].tobytes()


class _Unpickler(pickle.Unpickler):
    def __init__(
        self, window: Window, known: Dict[str, Any], persistent_load: Optional[Callable[[Any], Any]]
    ):
        super().__init__(window)
        self._known = known
        self._classes: Dict[str, type] = {}
        self.inert: Set[str] = set()
        self._persistent_load = persistent_load

    def persistent_load(self, pid):
        if self._persistent_load is None:  # as pickle.Unpickler without one
            raise pickle.UnpicklingError("a persistent id, but no persistent_load function")
        return self._persistent_load(pid)

    def find_class(self, module, name):
        if not (isinstance(module, str) and isinstance(name, str)):
            raise pickle.UnpicklingError("a global with a non-string name")
        full = global_name(module, name)
        if full in self._known:
            return self._known[full]
        cls = self._classes.get(full)
        if cls is None:
            if len(self._classes) >= MAX_GLOBALS:
                raise pickle.UnpicklingError(f"more than {MAX_GLOBALS} different globals")
            cls = self._classes[full] = _inert_class(full)
            self.inert.add(full)
        return cls


def load(
    window: Window,
    known: Optional[Dict[str, Any]] = None,
    persistent_load: Optional[Callable[[Any], Any]] = None,
) -> Tuple[Any, Set[str]]:
    """Unpickle one object from ``window`` (left just after it): ``(object, names of the
    globals that became inert)``. ``known`` maps ``module.name`` to the caller's own objects.
    Raises :class:`pickle.UnpicklingError`, :class:`PickleTooLarge`, ``EOFError`` and the
    usual ``ValueError`` / ``TypeError`` / ``KeyError`` ... of malformed pickles."""
    unpickler = _Unpickler(window, known or {}, persistent_load)
    return unpickler.load(), unpickler.inert
