"""A local file or folder to its :class:`~allennlp_analyze.tensors.WeightSource`: the format
from the file's name, else from its content (:mod:`.registry`), a folder by
:func:`.folder.open_folder`; the ``config.json`` beside it becomes the source's config."""

import os
from pathlib import Path
from typing import Optional, Union

from .. import limits
from ..checkpoint_config import load_config
from ..errors import AnalyzeError
from ..tensors import WeightSource
from . import registry
from .archive import ArchiveSource
from .folder import open_folder


def open_path(
    path: Union[str, os.PathLike], label: Optional[str] = None, checkpoint_key: Optional[str] = None
) -> WeightSource:
    """Open a local file or folder, choosing the source by name (and by content where the name
    says nothing). ``checkpoint_key`` picks the part of a pickled checkpoint to analyze
    (:mod:`.checkpoint`); other kinds of file ignore it. The ``config.json`` of an archive, or
    else the one in the folder (or beside the file), becomes the source's ``config``: evidence
    of what its tensors are (:mod:`allennlp_analyze.checkpoint_config`)."""
    source = _open_path(Path(path), label, checkpoint_key)
    if getattr(source, "config", None) is None and not isinstance(source, ArchiveSource):
        p = Path(path)
        config = load_config((p if p.is_dir() else p.parent) / "config.json")
        setattr(source, "config", config)  # noqa: B010 - optional evidence, not in WeightSource
    return source


def _open_path(p: Path, label: Optional[str], checkpoint_key: Optional[str]) -> WeightSource:
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as e:
        raise AnalyzeError(f"cannot read {p}: {e.strerror or e}") from None
    if not exists:
        raise AnalyzeError(f"{p} does not exist")
    if is_dir:
        return open_folder(p, label, checkpoint_key)
    try:
        limits.require_regular(p)  # a FIFO would block, /dev/zero never end
    except OSError as e:
        raise AnalyzeError(f"cannot read {p}: {e.strerror or e}") from None
    fmt = registry.by_name(p)
    if fmt is None or fmt.sniff_last:
        # No telling name (e.g. a cached download), or one a broad family claims (`.bin`: any
        # pickle): the content decides where a format's own signature claims it (a GGUF or
        # safetensors file saved as model.bin is read as what it is).
        try:
            head = registry.read_head(p)
        except OSError as e:
            raise AnalyzeError(f"cannot read {p}: {e.strerror or e}") from None
        found = registry.by_content(p, head)
        if fmt is None or (found is not None and not found.sniff_last):
            fmt = found
    if fmt is None:
        raise AnalyzeError(f"{p} is not a recognised weights file (expected {registry.expected()})")
    return fmt.opener(p, label, checkpoint_key)
