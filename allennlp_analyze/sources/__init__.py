"""Where weights come from: :func:`open_source` turns a path, URL, state dict or module into a
:class:`~allennlp_analyze.tensors.WeightSource` (tensor list first, arrays on demand).

One module per kind of source; torch is imported only for pickled files and live modules, so
reading safetensors needs numpy alone.
"""
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

from .. import limits
from ..errors import AnalyzeError
from ..tensors import WeightSource
from ._common import TensorDictSource, as_state_dict, read_index
from .archive import ArchiveSource, SerializationDirSource
from .folder import open_folder
from .module import ModuleSource
from .safetensors_file import SafetensorsSource, ShardedSafetensorsSource, looks_like_safetensors
from .torch_file import ShardedTorchSource, TorchFileSource

__all__ = [
    "open_source", "open_path", "ArchiveSource", "SerializationDirSource", "SafetensorsSource",
    "ShardedSafetensorsSource", "TorchFileSource", "ShardedTorchSource", "ModuleSource",
    "TensorDictSource",
]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_KNOWN = ("a .tar.gz model archive, a .safetensors file or index, a PyTorch state dict "
          "(.th/.pt/.pth/.bin), or a model folder")


def _index_kind(path: Path):
    shards = list(read_index(path).values())
    if all(s.endswith(".safetensors") for s in shards):
        return ShardedSafetensorsSource
    return ShardedTorchSource


def open_path(path: Union[str, os.PathLike], label: Optional[str] = None) -> WeightSource:
    """Open a local file or folder, choosing the source by name (and by content where the name
    says nothing)."""
    p = Path(path)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as e:
        raise AnalyzeError(f"cannot read {p}: {e.strerror or e}") from None
    if not exists:
        raise AnalyzeError(f"{p} does not exist")
    if is_dir:
        return open_folder(p, label)
    try:
        limits.require_regular(p)  # a FIFO would block, /dev/zero never end
    except OSError as e:
        raise AnalyzeError(f"cannot read {p}: {e.strerror or e}") from None
    name = p.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return ArchiveSource(p, label)
    if name.endswith(".index.json"):
        return _index_kind(p)(p, label)
    if name.endswith(".safetensors"):
        return SafetensorsSource(p, label)
    if name.endswith((".th", ".pt", ".pth", ".bin", ".ckpt")):
        return TorchFileSource(p, label)
    # No telling name (e.g. a cached download): look at the content.
    try:
        with limits.open_regular(p) as f:
            head = f.read(4)
    except OSError as e:
        raise AnalyzeError(f"cannot read {p}: {e.strerror or e}") from None
    if looks_like_safetensors(p):
        return SafetensorsSource(p, label)
    if head[:2] == b"\x1f\x8b":
        return ArchiveSource(p, label)
    if head == b"PK\x03\x04" or head[:1] == b"\x80":
        return TorchFileSource(p, label)
    raise AnalyzeError(f"{p} is not a recognised weights file (expected {_KNOWN})")


def open_source(spec, *, cache_dir=None, progress: Optional[bool] = None) -> WeightSource:
    """A :class:`WeightSource` for ``spec``:

    * a ``torch.nn.Module`` (module types from the owning submodules);
    * a mapping of name -> torch tensor / numpy array (a state dict; ``{"state_dict": ...}``
      style checkpoints are unwrapped);
    * an ``http(s)://`` URL, downloaded once into the cache (``cache_dir``, else
      ``$ALLENNLP_ANALYZE_CACHE``, else ``~/.cache/allennlp_analyze``; ``progress`` forces the
      download bar on or off, by default it shows when stderr is a terminal);
    * a local path: AllenNLP ``model.tar.gz`` or serialization directory, PyTorch state dict
      file, ``.safetensors`` file, sharded ``*.index.json``, or a Hugging Face model folder.

    User-caused problems raise :class:`~allennlp_analyze.errors.AnalyzeError`.
    """
    if isinstance(spec, (str, os.PathLike)):
        text = os.fsdecode(os.fspath(spec))
        match = _URL.match(text)
        if match:
            scheme = match.group(1).lower()
            if scheme in ("http", "https"):
                from .remote import open_url

                return open_url(text, cache_dir=cache_dir, progress=progress)
            if scheme == "file":
                import urllib.parse
                import urllib.request

                return open_path(urllib.request.url2pathname(urllib.parse.urlsplit(text).path))
            raise AnalyzeError(f"{text}: unsupported URL scheme {scheme!r} (use http, https or a local path)")
        return open_path(text)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(spec, torch.nn.Module):
        return ModuleSource(spec)
    if isinstance(spec, Mapping):
        return TensorDictSource("state dict", as_state_dict(spec, "the state dict"))
    if all(hasattr(spec, attr) for attr in ("label", "tensors", "load")):
        return spec  # already a WeightSource
    raise TypeError(f"open_source() cannot open a {type(spec).__name__}")
