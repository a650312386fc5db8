"""What ``allennlp analyze`` is given, opened as a weight source: the built AllenNLP model
where possible (so every matrix carries its module type), else the archive's raw weights.

Safety, for archives from the internet:

* URLs are fetched once with the ``cached_path`` library that AllenNLP's own ``cached_path``
  wraps, into AllenNLP's cache (``$ALLENNLP_CACHE_ROOT/cache``, default ``~/.allennlp/cache``)
  unless ``--cache-dir`` names another; a download found unusable is dropped from the cache.
* The archive is extracted here, not by ``load_archive``: with ``tarfile``'s ``"data"`` filter
  (no ``..``, no links leaving the folder, no devices, no special permission bits) and absolute
  member names refused, into a temporary folder that is removed once the model is built; an
  archive with such a member is not extracted at all (its raw weights are analyzed).
* ``config.json`` is read as plain JSON (no Jsonnet evaluation), and a config that could run or
  fetch code while the model is built is not built: a ``"type"`` naming a class by import path
  (AllenNLP would import it and call it with the config's arguments), nested archives
  (``_pretrained``, ``archive_file``), ``trust_remote_code`` and ``override_weights_file``.
* The weights file is read by :mod:`allennlp_analyze.sources.torch_file`, as the raw-weights
  path and ``allennlp-analyze`` read it (no code from it is run; the same checkpoint rule and
  ``--checkpoint-key``), and handed to AllenNLP re-written as a plain state dict of tensors.
  Any other ``torch.load`` made while the model is built runs with ``weights_only=True``:
  torch >= 2.6 defaults to it, but the environment variable
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` turns that default off for calls that do not pass it,
  so they run under ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which overrides even an explicit
  ``weights_only=False``.
* Only the model is built (``Model.load``, as ``load_archive`` does); the dataset readers,
  which may download tokenizers, are not.
"""
import contextlib
import json
import os
import re
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple

from ..errors import AnalyzeError
from ..sources import is_hub_id, open_path
from ..sources._common import one_line
from ..sources.archive import find_serialization_weights
from ..sources.hub import resolve_hub
from ..sources.module import ModuleSource
from ..sources.remote import url_basename
from ..sources.torch_file import TorchFileSource
from ..tensors import WeightSource

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
#: Config keys that fetch or load other archives / remote code while a model is built.
UNSAFE_KEYS = ("_pretrained", "archive_file", "trust_remote_code", "override_weights_file")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_GZIP_MAGIC = b"\x1f\x8b"


class NotBuilt(Exception):
    """The model of an archive cannot be built here; its raw weights are analyzed instead."""


def stderr_notice(message: str) -> None:
    print(f"allennlp analyze: note: {message}", file=sys.stderr, flush=True)


def open_model_source(spec: str, *, weights_file: Optional[str] = None, overrides: Any = "",
                      cuda_device: int = -1, cache_dir: Optional[str] = None,
                      progress: Optional[bool] = None,
                      notice: Callable[[str], None] = stderr_notice,
                      checkpoint_key: Optional[str] = None) -> WeightSource:
    """A weight source for ``spec`` (an archive path, a serialization directory or an http(s)
    URL): the built model (:class:`ModuleSource`, module types filled in) when it can be built,
    else its raw weights, with a one-line ``notice`` saying why. Other files (state dicts,
    safetensors, Hugging Face folders) are opened as ``allennlp-analyze`` opens them.
    ``checkpoint_key`` picks the part of a nested checkpoint, as for ``allennlp-analyze``.
    Problems the user can fix raise :class:`AnalyzeError`."""
    local, label, url = resolve(spec, cache_dir, progress)
    buildable = _looks_like_archive(local) or (local.is_dir() and (local / "config.json").is_file())
    if not buildable:
        return _raw(local, label, weights_file, url, checkpoint_key)
    notes = []
    try:
        model = build_model(local, weights_file=weights_file, overrides=overrides,
                            cuda_device=cuda_device, checkpoint_key=checkpoint_key,
                            weights_note=notes.append)
    except NotBuilt as e:
        source = _raw(local, label, weights_file, url, checkpoint_key)
        notice(f"{label}: analyzing the raw weights; the model was not built ({_short(str(e))})")
        return source
    source = ModuleSource(model, label=label)
    source.note = notes[0] if notes else None
    return source


def _short(reason: str, limit: int = 200) -> str:
    """A reason cut to its first sentence when long (AllenNLP's messages go on with advice)."""
    if len(reason) > limit:
        end = reason.find(". ", 30)
        if 0 < end < limit:
            return reason[:end]
        return reason[:limit - 3] + "..."
    return reason


def resolve(spec: str, cache_dir: Optional[str] = None,
            progress: Optional[bool] = None) -> Tuple[Path, str, Optional[str]]:
    """``(local path, label, url or None)``; the label is the one ``allennlp-analyze`` gives."""
    text = os.fsdecode(os.fspath(spec))
    match = _URL.match(text)
    if match:
        scheme = match.group(1).lower()
        if scheme in ("http", "https"):
            return download(text, cache_dir, progress), url_basename(text), text
        if scheme == "file":
            import urllib.parse
            import urllib.request

            text = urllib.request.url2pathname(urllib.parse.urlsplit(text).path)
        else:
            raise AnalyzeError(f"{text}: unsupported URL scheme {scheme!r} "
                               "(use http, https or a local path)")
    if is_hub_id(text):  # ORG/NAME[@REVISION] with no such local path: its cached snapshot
        return resolve_hub(text, progress), text, None
    path = Path(text)
    try:
        if not path.exists():
            raise AnalyzeError(f"{path} does not exist")
        label = path.resolve().name if path.is_dir() else path.name
    except OSError as e:
        raise AnalyzeError(f"cannot read {path}: {e.strerror or one_line(e)}") from None
    return path, label, None


def cache_directory(cache_dir: Optional[str] = None) -> str:
    """``cache_dir``, else AllenNLP's download cache."""
    if cache_dir:
        return os.path.expanduser(cache_dir)
    from allennlp.common.file_utils import CACHE_DIRECTORY

    return CACHE_DIRECTORY


def download(url: str, cache_dir: Optional[str] = None, progress: Optional[bool] = None) -> Path:
    """The cached copy of ``url``, downloaded on first use (AllenNLP's ``cached_path``)."""
    import cached_path as _cached_path  # what allennlp.common.file_utils.cached_path calls

    show = sys.stderr.isatty() if progress is None else progress
    try:
        return Path(_cached_path.cached_path(url, cache_dir=cache_directory(cache_dir),
                                             quiet=not show))
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise AnalyzeError(f"cannot download {url}: {_download_reason(e)}") from None


def _download_reason(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if isinstance(error, FileNotFoundError):  # cached_path's answer to a 404
        return "HTTP 404 Not Found"
    if response is not None and getattr(response, "status_code", None):
        return f"HTTP {response.status_code} {response.reason or ''}".rstrip()
    text = one_line(error)
    for pattern, reason in ((r"Connection refused", "connection refused"),
                            (r"Name or service not known|nodename nor servname|"
                             r"Temporary failure in name resolution", "unknown host"),
                            (r"timed out", "timed out"),
                            (r"IncompleteRead|Connection broken|ChunkedEncodingError",
                             "the connection broke off (truncated download)")):
        if re.search(pattern, text) or re.search(pattern, type(error).__name__):
            return reason
    return text[:200] or type(error).__name__


def _looks_like_archive(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(2) == _GZIP_MAGIC
    except OSError:
        return False


def _raw(local: Path, label: str, weights_file: Optional[str], url: Optional[str],
         checkpoint_key: Optional[str]) -> WeightSource:
    """The raw weights (``weights_file`` if given), opened as ``allennlp-analyze`` does."""
    try:
        return open_path(weights_file or local, label=label, checkpoint_key=checkpoint_key)
    except AnalyzeError as e:
        if url is None:
            raise
        _evict(local)
        detail = str(e).replace(str(local), "it")  # the cache file's name means nothing
        raise AnalyzeError(f"the download of {url} is not usable: {detail}; "
                           "it was removed from the cache") from None


def _evict(cached: Path) -> None:
    """Drop a download (and cached_path's metadata and lock) from the cache."""
    for path in (cached, Path(f"{cached}.json"), Path(f"{cached}.lock")):
        try:
            path.unlink()
        except OSError:
            pass


# -- building the model ---------------------------------------------------------------------

def build_model(local: Path, *, weights_file: Optional[str] = None, overrides: Any = "",
                cuda_device: int = -1, checkpoint_key: Optional[str] = None,
                weights_note: Callable[[str], None] = lambda note: None):
    """The AllenNLP model of an archive or serialization directory, with its trained weights
    (read as :func:`plain_weights` says; its note, if any, goes to ``weights_note``), in eval
    mode. Raises :class:`NotBuilt` where it cannot be built (and :class:`AnalyzeError` for a
    bad ``--overrides`` / ``--cuda-device``)."""
    _check_cuda_device(cuda_device)
    with tempfile.TemporaryDirectory(prefix="allennlp-analyze-") as tmp:
        if local.is_dir():
            serialization_dir = local
            weights = weights_file or find_serialization_weights(local)
        else:
            serialization_dir = safe_extract(local, Path(tmp))
            weights = weights_file or _archive_weights(serialization_dir)
        if weights is None:
            raise NotBuilt("no weights.th / best.th")
        config = read_config(serialization_dir / "config.json", overrides)
        reason = unsafe_config_reason(config)
        if reason:
            raise NotBuilt(f"config.json {reason}, which is not run for an analysis")
        weights = plain_weights(Path(weights), Path(tmp) / "analyzed-weights.th", checkpoint_key,
                                weights_note)
        from allennlp.common.params import Params
        from allennlp.models.model import Model

        try:
            with weights_only_torch_load(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = Model.load(Params(config), serialization_dir=str(serialization_dir),
                                   weights_file=str(weights), cuda_device=cuda_device)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:
            raise NotBuilt(f"{type(e).__name__}: {one_line(e)}") from None
    model.eval()
    return model


def plain_weights(weights: Path, dest: Path, checkpoint_key: Optional[str],
                  note: Callable[[str], None]) -> Path:
    """``weights`` read as ``allennlp-analyze`` reads a weights file (no code run; nested
    checkpoints by the same rule) and written to ``dest`` as a plain state dict of tensors,
    the file AllenNLP is given. Unreadable weights raise :class:`NotBuilt` (the raw-weights
    path then reports why)."""
    import numpy as np
    import torch

    try:
        source = TorchFileSource(weights, checkpoint_key=checkpoint_key)
        state = {i.name: torch.from_numpy(np.array(source.load(i.name)))
                 for i in source.tensors()}
    except AnalyzeError as e:
        raise NotBuilt(str(e)) from None
    torch.save(state, dest)
    if source.note:
        note(source.note)
    return dest


def _check_cuda_device(cuda_device: int) -> None:
    if cuda_device is None or cuda_device < 0:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_device >= count:
        raise AnalyzeError(f"--cuda-device {cuda_device}: this machine has "
                           f"{count or 'no'} CUDA device{'s' if count != 1 else ''}")


def _archive_weights(folder: Path) -> Optional[Path]:
    for name in ("weights.th", "best.th"):  # as allennlp.models.archival.get_weights_path
        if (folder / name).is_file():
            return folder / name
    return None


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a ``.tar.gz`` into ``dest`` with tarfile's ``"data"`` filter and return the
    folder holding ``config.json`` (``dest``, or its single top-level folder)."""
    if not hasattr(tarfile, "data_filter"):
        raise NotBuilt("this Python's tarfile has no extraction filters (needs 3.9.17, "
                       "3.10.12, 3.11.4 or later), so the archive is not extracted")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(dest, filter=_refuse_absolute_then_data_filter)
    except tarfile.FilterError as e:
        raise NotBuilt(f"unsafe archive member, not extracted: {one_line(e)}") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise NotBuilt(f"cannot extract the archive: {one_line(e) or type(e).__name__}") from None
    if (dest / "config.json").is_file():
        return dest
    subdirs = [p for p in dest.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / "config.json").is_file():
        return subdirs[0]
    raise NotBuilt("the archive holds no config.json")


def _refuse_absolute_then_data_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" filter, except that absolute names are refused, not made relative."""
    if member.name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member.name):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def read_config(path: Path, overrides: Any = "") -> dict:
    """``config.json`` as plain JSON (never evaluated as Jsonnet), with ``overrides`` (a JSON /
    Jsonnet string or a dict, as AllenNLP's ``--overrides``) applied."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise NotBuilt("no config.json") from None
    except (OSError, ValueError) as e:
        raise NotBuilt(f"config.json is not readable JSON ({one_line(e)[:120]})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise NotBuilt("config.json has no 'model' section")
    if overrides:
        from allennlp.common.params import parse_overrides, with_overrides

        if isinstance(overrides, str):
            try:
                overrides = parse_overrides(overrides)
            except Exception as e:
                raise AnalyzeError(f"--overrides is not valid JSON or Jsonnet: "
                                   f"{one_line(e)[:200]}") from None
        if not isinstance(overrides, dict):
            raise AnalyzeError("--overrides must be a JSON object")
        try:
            config = with_overrides(config, overrides)
        except ValueError as e:
            raise AnalyzeError(f"--overrides: {one_line(e)}") from None
    return config


def _registered_names() -> set:
    from allennlp.common.registrable import Registrable

    return {name for registry in Registrable._registry.values() for name in registry}


def unsafe_config_reason(config: Any) -> Optional[str]:
    """Why building ``config`` could run or fetch code it names, or ``None``."""
    registered = _registered_names()

    def walk(obj: Any, where: str) -> Optional[str]:
        if isinstance(obj, dict):
            for key, value in obj.items():
                here = f"{where}.{key}" if where else str(key)
                if key in UNSAFE_KEYS:
                    return f"sets {here}"
                if key == "type" and isinstance(value, str) and "." in value \
                        and value not in registered:
                    return f"names the class {value!r} by import path ({here})"
                found = walk(value, here)
                if found:
                    return found
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                found = walk(item, f"{where}[{i}]")
                if found:
                    return found
        return None

    return walk(config, "")


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Every ``torch.load`` inside runs with ``weights_only=True`` (see the module docstring)."""
    saved = {k: os.environ.get(k) for k in (FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop(FORCE_NO_WEIGHTS_ONLY, None)  # torch refuses both set
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
