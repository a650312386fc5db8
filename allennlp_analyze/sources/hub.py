"""Hugging Face hub ids (``ORG/NAME`` or ``ORG/NAME@REVISION``) as weight sources; the only
module that imports ``huggingface_hub`` (the optional extra ``hub``).

Resolution, for a name that is not an existing local path (a local path always wins):

1. the local Hugging Face cache, with no network at all: ``$HF_HUB_CACHE``, else
   ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (the ``models--ORG--NAME/`` layout:
   ``refs/<revision>`` holds a commit hash, ``snapshots/<commit>/`` the files, symlinks to
   ``blobs/``). REVISION is a branch, a tag or a commit hash (default ``main``); a cached
   snapshot is used as it is, without asking the hub whether the branch has moved on;
2. only if the cache has no snapshot with usable weights, and ``HF_HUB_OFFLINE`` is not set:
   the hub (``$HF_ENDPOINT``, default https://huggingface.co), downloading into that cache only
   ``config.json`` and the weight files, chosen as in a model folder
   (:mod:`allennlp_analyze.sources.folder`: ``model.safetensors.index.json`` and its shards,
   else ``model.safetensors``, else the ``pytorch_model.bin`` index or file, ...), so
   safetensors are preferred over ``.bin`` and no TensorFlow / ONNX / Flax copy is fetched.
   Network calls time out after ``$HF_HUB_ETAG_TIMEOUT`` seconds (default 10).

The environment is read when a source is opened (not when ``huggingface_hub`` was imported).
An id that is neither cached nor reachable is one :class:`AnalyzeError` line.
"""

import contextlib
import fnmatch
import os
import re
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from ..errors import AnalyzeError
from ..tensors import WeightSource
from ._common import one_line
from . import registry
from .folder import HF_NAMES, open_folder
from .local import open_path
from .lora import CONFIG_NAME, WEIGHT_NAMES
from .unsupported import UNSUPPORTED, Unsupported

_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s@]+))?$")
DEFAULT_TIMEOUT_S = 10.0


def parse_hub_id(text: str) -> Optional[Tuple[str, Optional[str]]]:
    """``(repo_id, revision or None)`` when ``text`` reads as a hub model id, else None."""
    m = _ID.match(text)
    if m is None:
        return None
    repo = m.group("repo")
    org, name = repo.split("/")
    if (
        "--" in repo
        or ".." in repo
        or len(name) > 96
        or repo.endswith(".git")
        or repo.lower().endswith((".json",) + registry.suffixes())  # a file: a path
        or any(part[i] in ".-" for part in (org, name) for i in (0, -1))
    ):
        return None
    return repo, m.group("revision")


def _env_flag(*names: str) -> bool:
    return any(os.environ.get(n, "").strip().upper() in ("1", "ON", "YES", "TRUE") for n in names)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` finds it, from today's environment."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def offline(hub) -> bool:
    """Whether downloads are forbidden: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set now
    or when ``huggingface_hub`` was imported (it then refuses every request)."""
    return _env_flag("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") or bool(hub.constants.HF_HUB_OFFLINE)


def _timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_TIMEOUT_S)
    except ValueError:
        return DEFAULT_TIMEOUT_S


def _import_hub(text: str):
    """``huggingface_hub`` with its ``utils`` (errors, progress bars) loaded."""
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401  (lazily loaded attributes otherwise)
        import huggingface_hub.utils  # noqa: F401
    except ImportError:
        raise AnalyzeError(
            f"{text} is not a local path; reading it as a Hugging Face hub id "
            "needs huggingface_hub: pip install 'allennlp-analyze[hub]'"
        ) from None
    return huggingface_hub


def open_hub(
    text: str, progress: Optional[bool] = None, checkpoint_key: Optional[str] = None
) -> WeightSource:
    """The weights of hub id ``text`` (``ORG/NAME[@REVISION]``), labelled ``text``: its
    snapshot folder opened as any local folder (:func:`~allennlp_analyze.sources.open_path`)."""
    return open_path(resolve_hub(text, progress), label=text, checkpoint_key=checkpoint_key)


def resolve_hub(text: str, progress: Optional[bool] = None) -> Path:
    """The snapshot folder of hub id ``text`` in the local cache, downloaded there first when
    it is not cached (and downloads are allowed). Raises :class:`AnalyzeError`."""
    parsed = parse_hub_id(text)
    if parsed is None:
        raise AnalyzeError(
            f"{text} is neither a local path nor a Hugging Face hub id (ORG/NAME[@REVISION])"
        )
    repo, revision = parsed
    hub = _import_hub(text)
    cache = hub_cache_dir()
    folder, why = _cached(hub, repo, revision, cache)
    if folder is not None and why is None:
        return folder
    if offline(hub):
        where = (
            f"its cached snapshot {folder} is unusable: {why}"
            if folder
            else f"it is not in the Hugging Face cache {cache}"
        )
        raise AnalyzeError(
            f"{text} is not a local path, and {where}; HF_HUB_OFFLINE forbids downloading it"
        )
    return _download(hub, text, repo, revision, cache, progress)


def _cached(
    hub, repo: str, revision: Optional[str], cache: Path
) -> Tuple[Optional[Path], Optional[str]]:
    """``(snapshot folder, None)`` when the cache holds usable weights of ``repo`` at
    ``revision``; ``(folder, why not)`` for a snapshot without them; ``(None, None)`` if none."""
    try:
        folder = hub.snapshot_download(
            repo, revision=revision, cache_dir=str(cache), local_files_only=True
        )
    except (hub.utils.LocalEntryNotFoundError, FileNotFoundError):
        return None, None
    except (hub.utils.HFValidationError, ValueError) as e:
        raise AnalyzeError(f"{repo}: not a valid Hugging Face hub id ({one_line(e)})") from None
    try:
        open_folder(Path(folder))
    except AnalyzeError as e:
        return Path(folder), str(e)
    return Path(folder), None


def weight_files(names: List[str]) -> List[str]:
    """The files of a repository listing to fetch: a LoRA adapter's ``adapter_config.json`` and
    weights, else ``config.json`` (when present) and the weights a model folder would be read
    from (:func:`~.folder.open_folder`'s order, top-level files only); an index's shards are
    added once the index is read."""
    top = [n for n in names if "/" not in n]
    if CONFIG_NAME in top:  # a PEFT LoRA adapter (:mod:`.lora`): its config and its weights
        for name in WEIGHT_NAMES:
            if name in top:
                return [CONFIG_NAME, name]
    chosen: List[str] = []
    for name, _ in HF_NAMES:
        if name in top:
            chosen = [name]
            break
    else:
        for fmt in (f for f in registry.FORMATS if f.readable):
            found = sorted({n for n in top for p in fmt.folder_globs if fnmatch.fnmatch(n, p)})
            if found:
                chosen = found
                break
    return (["config.json"] if "config.json" in top else []) + chosen


def _literal(name: str) -> str:
    """``name`` as an ``fnmatch`` pattern that matches it alone (``allow_patterns`` are globs:
    a shard named ``*`` in an index must not fetch the whole repository)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def refused_listing(names: List[str]) -> Optional[Unsupported]:
    """The format that is recognised but not read of a repository listing
    whose top-level files match its folder globs (a repository of ``.gguf`` files), if any."""
    top = [n for n in names if "/" not in n]
    return next(
        (u for u in UNSUPPORTED if any(fnmatch.fnmatch(n, g) for n in top for g in u.folder_globs)),
        None,
    )


def _download(
    hub, text: str, repo: str, revision: Optional[str], cache: Path, progress: Optional[bool]
) -> Path:
    """Fetch ``config.json`` and the weight files of ``repo`` at ``revision`` into ``cache``."""
    endpoint = os.environ.get("HF_ENDPOINT") or None
    timeout = _timeout()
    try:
        info = hub.HfApi(endpoint=endpoint).model_info(repo, revision=revision, timeout=timeout)
        names = [s.rfilename for s in info.siblings or []]
        files = weight_files(names)
        if len(files) <= int("config.json" in files):
            refused = refused_listing(names)
            if refused is not None:  # only a format that is not read: named, nothing fetched
                raise AnalyzeError(refused.message(f"{text}: the repository's weights file"))
            raise AnalyzeError(
                f"{text}: the Hugging Face repository holds no weight files "
                "(looked for *.safetensors, pytorch_model.bin, *.th/*.pt/*.bin, "
                "*.tar.gz)"
            )
        with _progress(hub, progress):
            for index in [f for f in files if registry.names_shards(Path(f))]:
                path = hub.hf_hub_download(
                    repo,
                    index,
                    revision=info.sha,
                    cache_dir=str(cache),
                    endpoint=endpoint,
                    etag_timeout=timeout,
                )
                files += [s for s in registry.index_shards(Path(path))[0] if s not in files]
            folder = hub.snapshot_download(
                repo,
                revision=revision,
                cache_dir=str(cache),
                allow_patterns=[_literal(f) for f in files],
                endpoint=endpoint,
                etag_timeout=timeout,
            )
    except AnalyzeError:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise AnalyzeError(
            f"{text} is not a local path, and not cached; {_reason(hub, e)}"
        ) from None
    return Path(folder)


def _reason(hub, error: BaseException) -> str:
    """One line on why the hub could not provide a model."""
    errors = hub.utils
    if isinstance(error, errors.RevisionNotFoundError):
        return "the Hugging Face hub has no such revision"
    if isinstance(error, errors.GatedRepoError):
        return "the model is gated on the Hugging Face hub: accept its terms and log in"
    if isinstance(error, errors.RepositoryNotFoundError):
        return (
            "the Hugging Face hub has no such model (or it is private: log in with "
            "`huggingface-cli login`)"
        )
    text = one_line(error)
    cause = error.__cause__ or error.__context__
    if cause is not None:
        text += " " + one_line(cause)
    for pattern, reason in (
        (r"[Tt]imed? ?out|timeout", "timed out"),
        (r"Connection refused", "connection refused"),
        (
            r"Name or service not known|nodename nor servname|"
            r"Temporary failure in name resolution|getaddrinfo",
            "unknown host",
        ),
    ):
        if re.search(pattern, text) or re.search(pattern, type(error).__name__):
            return f"cannot reach the Hugging Face hub: {reason}"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status:
        return f"the Hugging Face hub answered HTTP {status}"
    return f"cannot fetch it from the Hugging Face hub: {type(error).__name__}: {text[:200]}"


@contextlib.contextmanager
def _progress(hub, progress: Optional[bool]):
    """Download bars on stderr when ``progress`` (None: when stderr is a terminal)."""
    show = sys.stderr.isatty() if progress is None else progress
    was_disabled = hub.utils.are_progress_bars_disabled()
    if not show:
        hub.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            hub.utils.enable_progress_bars()
