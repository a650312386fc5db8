"""Resource limits: the one policy for what is read from outside (files, archives, downloads,
JSON) and for the memory an analysis may take, applied by the sources and both front-ends.

Settings, from the environment (a bad value is an :class:`AnalyzeError`):

==================================== ========= ================================================
``ALLENNLP_ANALYZE_CONNECT_TIMEOUT`` 30        seconds to connect to a server
``ALLENNLP_ANALYZE_READ_TIMEOUT``    60        seconds in which a download must progress: the
                                               response's headers must arrive within it, then
                                               each such window must bring ``MIN_RATE`` bytes/s
``ALLENNLP_ANALYZE_MAX_DOWNLOAD``    none      largest download, bytes (``K``/``M``/``G``/``T``
                                               suffixes, powers of 1024); never closer than
                                               ``DISK_MARGIN`` to filling the cache's disk
``ALLENNLP_ANALYZE_MAX_EXPANSION``   100       how many times its compressed size an archive or
                                               a gzip-encoded download may expand to (plus
                                               ``EXPANSION_ALLOWANCE``): beyond, a gzip bomb
``ALLENNLP_ANALYZE_MAX_MEMORY``      automatic working memory one matrix may need (default:
                                               what the system, the cgroup and the process's
                                               ``ulimit -v`` / ``-d`` leave; see
                                               :func:`available_memory`)
==================================== ========= ================================================

Fixed bounds: ``MAX_ARCHIVE_MEMBERS`` tar members, ``MAX_EXTRACTED_FILES`` files extracted to
build a model, JSON nested at most ``MAX_JSON_DEPTH`` levels, ``MAX_TEXT_FILE`` bytes of a
``--sources-from`` list. Only regular files are opened (:func:`open_regular`): a FIFO would
block forever, a device (``/dev/zero``) never ends.
"""

import json
import math
import os
import re
import stat
from types import ModuleType
from typing import Callable, Optional, Tuple, TypeVar

from .errors import AnalyzeError
from .spectrum import working_memory


def _resource_module() -> Optional[ModuleType]:
    """The ``resource`` module (rlimits), None where the platform lacks it (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    return resource


resource = _resource_module()

ENV_CONNECT_TIMEOUT = "ALLENNLP_ANALYZE_CONNECT_TIMEOUT"
ENV_READ_TIMEOUT = "ALLENNLP_ANALYZE_READ_TIMEOUT"
ENV_MAX_DOWNLOAD = "ALLENNLP_ANALYZE_MAX_DOWNLOAD"
ENV_MAX_EXPANSION = "ALLENNLP_ANALYZE_MAX_EXPANSION"
ENV_MAX_MEMORY = "ALLENNLP_ANALYZE_MAX_MEMORY"

#: Slowest download accepted: bytes per second, averaged over each read-timeout window.
MIN_RATE = 1024
#: Free space a download always leaves on the cache's disk.
DISK_MARGIN = 512 * 2**20
#: Decompressed bytes allowed on top of ``max_expansion() x`` the compressed size (so that
#: small archives of text, which compress well, are never refused).
EXPANSION_ALLOWANCE = 16 * 2**20
MAX_ARCHIVE_MEMBERS = 100_000
MAX_EXTRACTED_FILES = 1_000
MAX_JSON_DEPTH = 64
MAX_TEXT_FILE = 16 * 2**20

T = TypeVar("T")
_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _setting(name: str, default: T, parse: Callable[[str], Optional[T]], what: str) -> T:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    value: Optional[T]
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None:
        raise AnalyzeError(f"{name} must be {what} (got {text!r})")
    return value


def _positive_float(text: str) -> Optional[float]:
    value = float(text)
    return value if math.isfinite(value) and value > 0 else None


def parse_bytes(text: str) -> Optional[int]:
    """``"2G"`` -> 2**31; None for anything but a positive size."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        return None
    value = int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])
    return value if value > 0 else None


def connect_timeout() -> float:
    return _setting(ENV_CONNECT_TIMEOUT, 30.0, _positive_float, "a positive number of seconds")


def read_timeout() -> float:
    return _setting(ENV_READ_TIMEOUT, 60.0, _positive_float, "a positive number of seconds")


def max_download() -> Optional[int]:
    return _setting(ENV_MAX_DOWNLOAD, None, parse_bytes, "a size in bytes, e.g. 20G")


def max_expansion() -> float:
    return _setting(ENV_MAX_EXPANSION, 100.0, _positive_float, "a positive ratio")


def expanded_limit(compressed_size: int) -> int:
    """Most bytes that ``compressed_size`` bytes of gzip may decompress to."""
    return int(max_expansion() * compressed_size) + EXPANSION_ALLOWANCE


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# -- memory -----------------------------------------------------------------------------------


def analysis_memory(N: int, M: int) -> int:
    """Bytes of float64 working memory the analysis of one N x M matrix needs at its peak
    (:func:`allennlp_analyze.spectrum.working_memory`: for a matrix of one row block, its
    widened copy plus the larger of the SVD's copy and the Gram matrix with the eigensolver's
    copy, ``8 N M + 8 max(N M, 2 M^2)``; for a taller one, streamed, the Gram matrix and the
    blocked QR of the SVD fallback, whatever N). The stored tensor itself is not counted (it is
    memory-mapped or already in memory)."""
    return working_memory(N, M)


def comparison_memory(N: int, M: int) -> int:
    """Bytes of float64 working memory one ``--base`` pair of N x M matrices needs at its peak
    (:func:`allennlp_analyze.compare.delta_fields`): ΔW in float64, ``8 N M``, plus ΔW's
    spectrum (:func:`analysis_memory`; the operands' blocks that the cross product widens are
    smaller than its Gram matrix). The two matrices as stored are not counted, as in
    :func:`analysis_memory`."""
    return 8 * N * M + analysis_memory(N, M)


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> Optional[int]:
    """Bytes the process's memory cgroup (v2, else v1) still allows, if it has a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            base, files = "/sys/fs/cgroup", ("memory.max", "memory.current")
        elif "memory" in parts[1].split(","):
            base, files = (
                "/sys/fs/cgroup/memory",
                ("memory.limit_in_bytes", "memory.usage_in_bytes"),
            )
        else:
            continue
        for folder in (base + parts[2], base):
            limit, used = (_read_int(f"{folder}/{name}") for name in files)
            if limit is not None and used is not None and limit < 2**60:
                return max(0, limit - used)
    return None


def available_memory() -> Tuple[Optional[int], str]:
    """``(bytes, what sets them)``: memory this process can still take, the least of the
    system's ``MemAvailable``, its memory cgroup's limit less its usage, and its ``ulimit -v``
    (address space) and ``ulimit -d`` (data) less what it uses; or ``ALLENNLP_ANALYZE_MAX_MEMORY``
    when set. ``(None, "")`` where none of these is known."""
    forced = _setting(ENV_MAX_MEMORY, None, parse_bytes, "a size in bytes, e.g. 8G")
    if forced is not None:
        return forced, ENV_MAX_MEMORY
    found = []
    meminfo = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    meminfo = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if meminfo is not None:
        found.append((meminfo, "available system memory"))
    room = _cgroup_room()
    if room is not None:
        found.append((room, "the memory cgroup's limit"))
    if resource is not None:
        for limit_name, field, what in (
            (resource.RLIMIT_AS, "VmSize", "ulimit -v"),
            (resource.RLIMIT_DATA, "VmData", "ulimit -d"),
        ):
            soft = resource.getrlimit(limit_name)[0]
            if soft != resource.RLIM_INFINITY:
                used = _proc_status_kb(field) or 0
                found.append((max(0, soft - used), f"the process limit ({what})"))
    if not found:
        return None, ""
    return min(found)


def check_memory(need: int, what: str) -> None:
    """Raise an :class:`AnalyzeError` when ``need`` bytes are more than :func:`available_memory`
    leaves; ``what`` names the matrix (or file) for the message."""
    available, source = available_memory()
    if available is not None and need > available:
        raise AnalyzeError(
            f"{what} needs {format_bytes(need)} of memory, more than the "
            f"{format_bytes(available)} that {source} leaves "
            f"(leave it out with --exclude, or set {ENV_MAX_MEMORY})"
        )


# -- files ------------------------------------------------------------------------------------

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(path, mode: int) -> AnalyzeError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a plain file")
    return AnalyzeError(f"{path} is not a regular file (it is {kind})")


def require_regular(path) -> None:
    """Raise an :class:`AnalyzeError` unless ``path`` (links followed) is a regular file;
    OSError (missing, no permission) is left to the caller."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)


def open_regular(path):
    """``open(path, "rb")`` for a regular file only: a FIFO, device or socket is refused
    (:class:`AnalyzeError`) before anything is read, without blocking on it. OSError is left to
    the caller."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, max_bytes: Optional[int] = None) -> bytes:
    """The bytes of a regular file (:func:`open_regular`), refusing one above ``max_bytes``."""
    with open_regular(path) as f:
        if max_bytes is not None and os.fstat(f.fileno()).st_size > max_bytes:
            raise AnalyzeError(f"{path} is larger than {format_bytes(max_bytes)}")
        return f.read()


# -- JSON -------------------------------------------------------------------------------------


def parse_json(raw, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads(raw)``, refusing (ValueError) a document nested more than ``max_depth``
    levels deep, before any recursive code sees it, and numbers such as ``NaN``/``Infinity``
    that JSON does not have."""

    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    deep = ValueError(f"nested more than {max_depth} levels deep")
    try:
        value = json.loads(raw, parse_constant=no_constant)
    except RecursionError:
        raise deep from None
    level, depth = [value] if type(value) in (dict, list) else [], 1
    while level:  # breadth first, one nesting level at a time
        level = [
            child
            for item in level
            for child in (item.values() if type(item) is dict else item)
            if type(child) in (dict, list)
        ]
        depth += bool(level)
        if depth > max_depth:
            raise deep
    return value
