"""Where weights come from: :func:`open_source` turns a path, URL, state dict or module into a
:class:`~allennlp_analyze.tensors.WeightSource` (tensor list first, arrays on demand).

One module per kind of source; torch is imported only for live modules: safetensors, pickled
torch files (read by this package's own reader, :mod:`.torch_format`) and numpy files need
numpy alone.
"""
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

from .. import limits
from ..checkpoint_config import load_config
from ..errors import AnalyzeError
from ..tensors import WeightSource
from ._common import TensorDictSource, is_tensor, read_index
from .archive import ArchiveSource, SerializationDirSource
from .checkpoint import find_weights
from .folder import open_folder
from .gguf_file import GGUFSource
from .module import ModuleSource
from .numpy_file import NpySource, NpzSource, looks_like_npz
from .safetensors_file import SafetensorsSource, ShardedSafetensorsSource, looks_like_safetensors
from .torch_file import ShardedTorchSource, TorchFileSource

__all__ = [
    "open_source", "open_path", "ArchiveSource", "SerializationDirSource", "SafetensorsSource",
    "ShardedSafetensorsSource", "TorchFileSource", "ShardedTorchSource", "ModuleSource",
    "TensorDictSource", "NpySource", "NpzSource", "GGUFSource",
]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_KNOWN = ("a .tar.gz model archive, a .safetensors file or index, a PyTorch state dict or "
          "checkpoint (.th/.pt/.pth/.bin/.ckpt), a numpy .npy/.npz file, a .gguf file, or a "
          "model folder")


def _index_kind(path: Path):
    shards = list(read_index(path).values())
    if all(s.endswith(".safetensors") for s in shards):
        return ShardedSafetensorsSource
    return ShardedTorchSource


def open_path(path: Union[str, os.PathLike], label: Optional[str] = None,
              checkpoint_key: Optional[str] = None) -> WeightSource:
    """Open a local file or folder, choosing the source by name (and by content where the name
    says nothing). ``checkpoint_key`` picks the part of a pickled checkpoint to analyze
    (:mod:`.checkpoint`); other kinds of file ignore it. The ``config.json`` of an archive, or
    else the one in the folder (or beside the file), becomes the source's ``config``: evidence
    of what its tensors are (:mod:`allennlp_analyze.checkpoint_config`)."""
    source = _open_path(Path(path), label, checkpoint_key)
    if getattr(source, "config", None) is None and not isinstance(source, ArchiveSource):
        p = Path(path)
        source.config = load_config((p if p.is_dir() else p.parent) / "config.json")
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
    name = p.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return ArchiveSource(p, label, checkpoint_key)
    if name.endswith(".index.json"):
        return _index_kind(p)(p, label)
    if name.endswith(".safetensors"):
        return SafetensorsSource(p, label)
    if name.endswith((".th", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")):
        return TorchFileSource(p, label, checkpoint_key)
    if name.endswith(".npz"):
        return NpzSource(p, label)
    if name.endswith(".npy"):
        return NpySource(p, label)
    if name.endswith(".gguf"):
        return GGUFSource(p, label)
    # No telling name (e.g. a cached download): look at the content.
    try:
        with limits.open_regular(p) as f:
            head = f.read(4)
    except OSError as e:
        raise AnalyzeError(f"cannot read {p}: {e.strerror or e}") from None
    if looks_like_safetensors(p):
        return SafetensorsSource(p, label)
    if head == b"GGUF":
        return GGUFSource(p, label)
    if head[:2] == b"\x1f\x8b":
        return ArchiveSource(p, label, checkpoint_key)
    if head == b"\x93NUM":
        return NpySource(p, label)
    if head == b"PK\x03\x04" and looks_like_npz(p):
        return NpzSource(p, label)
    if head == b"PK\x03\x04" or head[:1] == b"\x80":
        return TorchFileSource(p, label, checkpoint_key)
    raise AnalyzeError(f"{p} is not a recognised weights file (expected {_KNOWN})")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` names a Hugging Face hub model rather than a local path: it reads as
    ``ORG/NAME[@REVISION]`` and no such local file or folder exists (a local path wins)."""
    from .hub import parse_hub_id

    return parse_hub_id(text) is not None and not os.path.lexists(text)


def open_source(spec, *, cache_dir=None, progress: Optional[bool] = None,
                checkpoint_key: Optional[str] = None) -> WeightSource:
    """A :class:`WeightSource` for ``spec``:

    * a ``torch.nn.Module`` (module types from the owning submodules);
    * a mapping of name -> torch tensor / numpy array (a state dict), or a nested training
      checkpoint holding one (the part analyzed as :mod:`.checkpoint` says, or
      ``checkpoint_key``);
    * an ``http(s)://`` URL, downloaded once into the cache (``cache_dir``, else
      ``$ALLENNLP_ANALYZE_CACHE``, else ``~/.cache/allennlp_analyze``; ``progress`` forces the
      download bar on or off, by default it shows when stderr is a terminal);
    * a local path: AllenNLP ``model.tar.gz`` or serialization directory, PyTorch state dict
      or checkpoint file (``checkpoint_key`` as for mappings), ``.safetensors`` file, sharded
      ``*.index.json``, numpy ``.npy`` / ``.npz``, or a Hugging Face model folder;
    * a Hugging Face hub id ``ORG/NAME[@REVISION]`` that is not a local path: from the Hugging
      Face cache, else downloaded there (:mod:`.hub`).

    User-caused problems raise :class:`~allennlp_analyze.errors.AnalyzeError`.
    """
    if isinstance(spec, (str, os.PathLike)):
        text = os.fsdecode(os.fspath(spec))
        match = _URL.match(text)
        if match:
            scheme = match.group(1).lower()
            if scheme in ("http", "https"):
                from .remote import open_url

                return open_url(text, cache_dir=cache_dir, progress=progress,
                                checkpoint_key=checkpoint_key)
            if scheme == "file":
                import urllib.parse
                import urllib.request

                return open_path(urllib.request.url2pathname(urllib.parse.urlsplit(text).path),
                                 checkpoint_key=checkpoint_key)
            raise AnalyzeError(f"{text}: unsupported URL scheme {scheme!r} (use http, https or a local path)")
        if is_hub_id(text):
            from .hub import open_hub

            return open_hub(text, progress=progress, checkpoint_key=checkpoint_key)
        return open_path(text, checkpoint_key=checkpoint_key)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(spec, torch.nn.Module):
        return ModuleSource(spec)
    if isinstance(spec, Mapping):
        weights = find_weights(spec, "the state dict", is_tensor, checkpoint_key)
        return TensorDictSource("state dict", weights.tensors, note=weights.note)
    if all(hasattr(spec, attr) for attr in ("label", "tensors", "load")):
        return spec  # already a WeightSource
    raise TypeError(f"open_source() cannot open a {type(spec).__name__}")
