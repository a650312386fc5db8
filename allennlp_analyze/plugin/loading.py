"""What ``allennlp analyze`` is given, opened as a weight source: the built AllenNLP model
where possible (so every matrix carries its module type), else the archive's raw weights.

Safety, for archives from the internet:

* URLs are fetched by the standalone command's downloader (:mod:`allennlp_analyze.sources.remote`:
  timeouts, size limits, nothing cached unless complete and usable), into AllenNLP's cache
  folder (``$ALLENNLP_CACHE_ROOT/cache``, default ``~/.allennlp/cache``) unless ``--cache-dir``
  names another.
* The archive is read by the standalone command's one-pass reader
  (:func:`~allennlp_analyze.sources.archive.scan_archive`), so that both commands accept and
  refuse the same archives (truncated, corrupt, ambiguous, gzip bombs), and only the files a
  model is built from (``config.json``, ``meta.json``, ``vocabulary/``, the weights) are
  extracted, as regular files, into a temporary folder removed once the model is built; an
  archive with an absolute or ``..`` member name, a link or a device is not extracted at all
  (its raw weights are analyzed).
* ``config.json`` is read as plain JSON (no Jsonnet evaluation, nested at most
  ``limits.MAX_JSON_DEPTH`` deep), and a config that could run or fetch code while the model is
  built is not built: a ``"type"`` naming a class by import path (AllenNLP would import it and
  call it with the config's arguments), nested archives (``_pretrained``, ``archive_file``),
  ``trust_remote_code`` and ``override_weights_file``.
* The weights file is read by :mod:`allennlp_analyze.sources.torch_file`, as the raw-weights
  path and ``allennlp-analyze`` read it (no code from it is run; the same checkpoint rule and
  ``--checkpoint-key``), and handed to AllenNLP re-written as a plain state dict of tensors.
  Any other ``torch.load`` made while the model is built runs with ``weights_only=True``:
  torch >= 2.6 defaults to it, but the environment variable
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` turns that default off for calls that do not pass it,
  so they run under ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which overrides even an explicit
  ``weights_only=False``.
* Only the model is built (``Model.load``, as ``load_archive`` does); the dataset readers,
  which may download tokenizers, are not. Only regular files are opened (a FIFO in a
  serialization directory's vocabulary would block AllenNLP forever).
"""

import contextlib
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

from .. import limits
from ..errors import AnalyzeError, escape, one_line
from ..sources import is_hub_id, open_path, registry, remote
from ..sources.archive import find_serialization_weights, member_parts, scan_archive
from ..sources.hub import resolve_hub
from ..sources.module import ModuleSource
from ..sources.torch_file import TorchFileSource
from ..tensors import WeightSource

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
#: Config keys that fetch or load other archives / remote code while a model is built.
UNSAFE_KEYS = ("_pretrained", "archive_file", "trust_remote_code", "override_weights_file")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class NotBuilt(Exception):
    """The model of an archive cannot be built here; its raw weights are analyzed instead."""


def stderr_notice(message: str) -> None:
    print(f"allennlp analyze: note: {escape(message)}", file=sys.stderr, flush=True)


def open_model_source(
    spec: str,
    *,
    weights_file: Optional[str] = None,
    overrides: Any = "",
    cuda_device: int = -1,
    cache_dir: Optional[str] = None,
    progress: Optional[bool] = None,
    notice: Callable[[str], None] = stderr_notice,
    checkpoint_key: Optional[str] = None,
) -> WeightSource:
    """A weight source for ``spec`` (an archive path, a serialization directory or an http(s)
    URL): the built model (:class:`ModuleSource`, module types filled in) when it can be built,
    else its raw weights, with a one-line ``notice`` saying why. Other files (state dicts,
    safetensors, Hugging Face folders) are opened as ``allennlp-analyze`` opens them.
    ``checkpoint_key`` picks the part of a nested checkpoint, as for ``allennlp-analyze``.
    Problems the user can fix raise :class:`AnalyzeError`."""
    local, label, url = resolve(spec, cache_dir, progress)

    def open_local(path: Path) -> WeightSource:
        buildable = _looks_like_archive(path) or (
            path.is_dir() and (path / "config.json").is_file()
        )
        if not buildable:
            return open_path(weights_file or path, label=label, checkpoint_key=checkpoint_key)
        notes: List[str] = []
        try:
            model = build_model(
                path,
                weights_file=weights_file,
                overrides=overrides,
                cuda_device=cuda_device,
                checkpoint_key=checkpoint_key,
                weights_note=notes.append,
            )
        except NotBuilt as e:
            source = open_path(weights_file or path, label=label, checkpoint_key=checkpoint_key)
            notice(
                f"{label}: analyzing the raw weights; the model was not built ({_short(str(e))})"
            )
            return source
        source = ModuleSource(model, label=label)
        source.note = notes[0] if notes else None
        return source

    return open_local(local) if url is None else remote.open_cached(url, local, open_local)


def _short(reason: str, limit: int = 200) -> str:
    """A reason cut to its first sentence when long (AllenNLP's messages go on with advice)."""
    if len(reason) > limit:
        end = reason.find(". ", 30)
        if 0 < end < limit:
            return reason[:end]
        return reason[: limit - 3] + "..."
    return reason


def resolve(
    spec: str, cache_dir: Optional[str] = None, progress: Optional[bool] = None
) -> Tuple[Path, str, Optional[str]]:
    """``(local path, label, url or None)``; the label is the one ``allennlp-analyze`` gives."""
    text = os.fsdecode(os.fspath(spec))
    match = _URL.match(text)
    if match:
        scheme = match.group(1).lower()
        if scheme in ("http", "https"):
            return (
                remote.fetch(text, cache_directory(cache_dir), progress),
                remote.url_basename(text),
                text,
            )
        if scheme == "file":
            import urllib.parse
            import urllib.request

            text = urllib.request.url2pathname(urllib.parse.urlsplit(text).path)
        else:
            raise AnalyzeError(
                f"{text}: unsupported URL scheme {scheme!r} (use http, https or a local path)"
            )
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


def _looks_like_archive(path: Path) -> bool:
    """Whether ``path`` is a file whose content is an archive's (the registry's sniffer)."""
    if not path.is_file():
        return False
    sniff = registry.get("archive").sniff
    if sniff is None:
        return False
    try:
        return sniff(path, registry.read_head(path))
    except (OSError, AnalyzeError):
        return False


# -- building the model ---------------------------------------------------------------------


def build_model(
    local: Path,
    *,
    weights_file: Optional[str] = None,
    overrides: Any = "",
    cuda_device: int = -1,
    checkpoint_key: Optional[str] = None,
    weights_note: Callable[[str], None] = lambda note: None,
):
    """The AllenNLP model of an archive or serialization directory, with its trained weights
    (read as :func:`plain_weights` says; its note, if any, goes to ``weights_note``), in eval
    mode. Raises :class:`NotBuilt` where it cannot be built (and :class:`AnalyzeError` for a
    bad ``--overrides`` / ``--cuda-device``)."""
    check_cuda_device(cuda_device)
    if weights_file:
        check_weights_file(weights_file)
    weights: Union[str, Path, None]
    with tempfile.TemporaryDirectory(prefix="allennlp-analyze-") as tmp:
        if local.is_dir():
            serialization_dir = local
            weights = weights_file or find_serialization_weights(local)
            _check_vocabulary(local)
        else:
            contents = scan_archive(local, extract_to=Path(tmp))
            if contents.unsafe:
                raise NotBuilt(f"unsafe archive member, not extracted: {contents.unsafe}")
            if contents.folder is None or contents.weights is None:
                raise NotBuilt("no weights.th / best.th")
            serialization_dir = contents.folder
            weights = weights_file or serialization_dir / member_parts(contents.weights)[-1]
        if weights is None:
            raise NotBuilt("no weights.th / best.th")
        config = read_config(serialization_dir / "config.json", overrides)
        reason = unsafe_config_reason(config)
        if reason:
            raise NotBuilt(f"config.json {reason}, which is not run for an analysis")
        weights = plain_weights(
            Path(weights), Path(tmp) / "analyzed-weights.th", checkpoint_key, weights_note
        )
        from allennlp.common.params import Params
        from allennlp.models.model import Model

        try:
            with weights_only_torch_load(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = Model.load(
                    Params(config),
                    serialization_dir=str(serialization_dir),
                    weights_file=str(weights),
                    cuda_device=cuda_device,
                )
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:
            raise NotBuilt(f"{type(e).__name__}: {one_line(e)}") from None
    model.eval()
    return model


def _check_vocabulary(folder: Path) -> None:
    """A serialization directory's vocabulary holds regular files only (AllenNLP would block on
    a FIFO there, or read a device without end)."""
    vocabulary = folder / "vocabulary"
    try:
        entries = list(os.scandir(vocabulary)) if vocabulary.is_dir() else []
        for entry in entries:
            if not entry.is_file():
                raise NotBuilt(f"vocabulary/{entry.name} is not a regular file")
    except OSError as e:
        raise NotBuilt(f"cannot read vocabulary/: {e.strerror or one_line(e)}") from None


def plain_weights(
    weights: Path, dest: Path, checkpoint_key: Optional[str], note: Callable[[str], None]
) -> Path:
    """``weights`` read as ``allennlp-analyze`` reads a weights file (no code run; nested
    checkpoints by the same rule) and written to ``dest`` as a plain state dict of tensors,
    the file AllenNLP is given. Unreadable weights raise :class:`NotBuilt` (the raw-weights
    path then reports why)."""
    import numpy as np
    import torch

    try:
        source = TorchFileSource(weights, checkpoint_key=checkpoint_key)
        state = {i.name: torch.from_numpy(np.array(source.load(i.name))) for i in source.tensors()}
    except AnalyzeError as e:
        raise NotBuilt(str(e)) from None
    torch.save(state, dest)
    if source.note:
        note(source.note)
    return dest


def check_weights_file(weights_file: str) -> None:
    """``--weights-file``: a regular file."""
    try:
        limits.require_regular(weights_file)
    except OSError as e:
        raise AnalyzeError(f"--weights-file {weights_file}: {e.strerror or one_line(e)}") from None
    except AnalyzeError as e:
        raise AnalyzeError(f"--weights-file: {e}") from None


def check_cuda_device(cuda_device: int) -> None:
    """``--cuda-device``: -1 (the CPU) or the index of a CUDA device present."""
    if cuda_device is not None and cuda_device < -1:
        raise AnalyzeError(
            f"--cuda-device must be -1 (the CPU) or a GPU's index (got {cuda_device})"
        )
    if cuda_device is None or cuda_device < 0:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_device >= count:
        raise AnalyzeError(
            f"--cuda-device {cuda_device}: this machine has "
            f"{count or 'no'} CUDA device{'s' if count != 1 else ''}"
        )


def overrides_dict(overrides: Any) -> dict:
    """``--overrides`` (a JSON / Jsonnet string, or a dict) as a dict; anything else is an
    :class:`AnalyzeError`."""
    if isinstance(overrides, str):
        from allennlp.common.params import parse_overrides

        try:
            overrides = parse_overrides(overrides)
        except Exception as e:
            raise AnalyzeError(
                f"--overrides is not valid JSON or Jsonnet: {one_line(e)[:200]}"
            ) from None
    if not isinstance(overrides, dict):
        raise AnalyzeError("--overrides must be a JSON object")
    return overrides


def read_config(path: Path, overrides: Any = "") -> dict:
    """``config.json`` as plain JSON (never evaluated as Jsonnet), with ``overrides`` (a JSON /
    Jsonnet string or a dict, as AllenNLP's ``--overrides``) applied."""
    try:
        config = limits.parse_json(limits.read_regular(path, limits.MAX_TEXT_FILE).decode("utf-8"))
    except FileNotFoundError:
        raise NotBuilt("no config.json") from None
    except AnalyzeError as e:
        raise NotBuilt(str(e).replace(str(path), "config.json")) from None
    except (OSError, ValueError) as e:
        raise NotBuilt(f"config.json is not readable JSON ({one_line(e)[:120]})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise NotBuilt("config.json has no 'model' section")
    if overrides:
        from allennlp.common.params import with_overrides

        try:
            config = with_overrides(config, overrides_dict(overrides))
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
                if (
                    key == "type"
                    and isinstance(value, str)
                    and "." in value
                    and value not in registered
                ):
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
