"""Where weights come from: :func:`open_source` turns a path, URL, state dict or module into a
:class:`~allennlp_analyze.tensors.WeightSource` (tensor list first, arrays on demand).

One module per kind of source, each file format an entry of :mod:`.registry` (how it is
recognized, its reader); torch is imported only for live modules: safetensors, pickled torch
files (read by this package's own reader, :mod:`.torch_format`) and numpy files need numpy
alone.
"""

import os
import re
import sys
from collections.abc import Mapping
from typing import Optional

from ..errors import AnalyzeError
from ..tensors import WeightSource
from ._common import TensorDictSource, is_tensor, torch_to_numpy
from .archive import ArchiveSource, SerializationDirSource
from .checkpoint import find_weights
from .local import open_path
from .module import ModuleSource
from .numpy_file import NpySource, NpzSource
from .safetensors_file import SafetensorsSource, ShardedSafetensorsSource
from .torch_file import ShardedTorchSource, TorchFileSource

__all__ = [
    "open_source",
    "open_path",
    "ArchiveSource",
    "SerializationDirSource",
    "SafetensorsSource",
    "ShardedSafetensorsSource",
    "TorchFileSource",
    "ShardedTorchSource",
    "ModuleSource",
    "TensorDictSource",
    "NpySource",
    "NpzSource",
    "torch_to_numpy",
]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` names a Hugging Face hub model rather than a local path: it reads as
    ``ORG/NAME[@REVISION]`` and no such local file or folder exists (a local path wins)."""
    from .hub import parse_hub_id

    return parse_hub_id(text) is not None and not os.path.lexists(text)


def open_source(
    spec, *, cache_dir=None, progress: Optional[bool] = None, checkpoint_key: Optional[str] = None
) -> WeightSource:
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

                return open_url(
                    text, cache_dir=cache_dir, progress=progress, checkpoint_key=checkpoint_key
                )
            if scheme == "file":
                import urllib.parse
                import urllib.request

                return open_path(
                    urllib.request.url2pathname(urllib.parse.urlsplit(text).path),
                    checkpoint_key=checkpoint_key,
                )
            raise AnalyzeError(
                f"{text}: unsupported URL scheme {scheme!r} (use http, https or a local path)"
            )
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
