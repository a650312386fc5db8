"""The formats of weight files, one :class:`SourceFormat` entry each, in :data:`FORMATS`: how a
file of the format is recognized (by its name, else by its first bytes), which globs pick it
in a model folder, and the reader that opens it (a
:class:`~allennlp_analyze.tensors.WeightSource`).

Order matters, and is the folder preference order: a file is claimed by the first entry whose
suffix (and ``name_check``) matches its name; a file whose name says nothing by the first
entry whose ``sniff`` claims its content (entries with ``sniff_last``, whose sniffers claim a
broad family such as any zip or any pickle, after all the others); a folder by the first entry
with exactly one file matching its ``folder_globs``. Adding a format is one reader module and
one entry here (CONTRIBUTING.md). Formats that are recognised but not read (TFLite, SavedModel,
Core ML) come last, from :mod:`.unsupported`: their openers name the format and what to convert
it to.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from .. import limits
from ..errors import AnalyzeError
from ..tensors import WeightSource
from ._common import read_index, shard_order
from .archive import ArchiveSource
from .gguf_file import GGUFSource
from .keras_file import KerasSource, claims_name, looks_like_keras
from .keras_shards import ShardedKerasSource, check_shard, read_shard_index
from .numpy_file import NpySource, NpzSource, looks_like_npz
from .onnx_file import OnnxSource, looks_like_onnx
from .quant.packed import packed_opener
from .safetensors_file import SafetensorsSource, ShardedSafetensorsSource, looks_like_safetensors
from .torch_file import ShardedTorchSource, TorchFileSource
from .unsupported import UNSUPPORTED, Unsupported, refuse

#: Bytes of a file that content sniffers see (``head``); shorter where the file is.
HEAD_BYTES = 16
#: An opener: ``(path, label or None, checkpoint_key or None) -> WeightSource``.
Opener = Callable[[Path, Optional[str], Optional[str]], WeightSource]
#: A content sniffer: ``(path, head) -> bool``; it may read the file, never raises.
Sniffer = Callable[[Path, bytes], bool]


@dataclass(frozen=True)
class SourceFormat:
    """One format of weight file."""

    #: Short name (``"safetensors"``).
    name: str
    #: Lower-case endings of the file names it claims (``(".safetensors",)``).
    suffixes: Tuple[str, ...]
    #: Opens one file of the format.
    opener: Opener
    #: Claims a file whose name says nothing, from its first ``HEAD_BYTES`` (and its path).
    sniff: Optional[Sniffer] = None
    #: The sniffer claims a broad family (any zip, any pickle): tried after all the others.
    sniff_last: bool = False
    #: A further test of a file its suffix matched (it may read the file).
    name_check: Optional[Callable[[Path], bool]] = None
    #: Globs that pick its file in a model folder (several matches are refused).
    folder_globs: Tuple[str, ...] = ()
    #: How the "not a recognised weights file" message names it ("" where another entry's
    #: phrase covers it).
    expected: str = ""
    #: False for a format that is recognised but not read (:mod:`.unsupported`): its opener
    #: refuses the file in one line; hub downloads never fetch it.
    readable: bool = True
    #: For the index of a sharded format: the shard files it names (relative to its folder,
    #: in order), read from the index (raises AnalyzeError for an invalid one); URLs and hub
    #: downloads fetch them beside it.
    shards: Optional[Callable[[Path], List[str]]] = None
    #: How a shard downloaded beside such an index is checked before it is cached (raises
    #: AnalyzeError); None: it is opened as a source of its own.
    shard_check: Optional[Callable[[Path], object]] = None

    def claims_name(self, path: Path) -> bool:
        """Whether ``path``'s name says it is of this format."""
        return path.name.lower().endswith(self.suffixes) and (
            self.name_check is None or self.name_check(path)
        )


def _safetensors_shards(path: Path) -> bool:
    """Whether every shard of the checkpoint index ``path`` is a safetensors file."""
    return all(s.endswith(".safetensors") for s in read_index(path).values())


def _index_shards(path: Path) -> List[str]:
    """The shards a ``*.index.json`` (``weight_map``) names, in order of first mention."""
    return shard_order(read_index(path))


def _checkpoint(cls) -> Opener:
    """The opener of a pickled kind, which takes the checkpoint key."""
    return lambda path, label, checkpoint_key: cls(path, label, checkpoint_key)


def _plain(cls) -> Opener:
    """The opener of a kind that holds tensors only (no checkpoint key)."""
    return lambda path, label, checkpoint_key: cls(path, label)


_ZIP = b"PK\x03\x04"

FORMATS: List[SourceFormat] = [
    SourceFormat(
        "sharded-safetensors",
        (".index.json",),
        packed_opener(ShardedSafetensorsSource),
        name_check=_safetensors_shards,
        folder_globs=("*.safetensors.index.json",),
        shards=_index_shards,
    ),
    SourceFormat(
        "safetensors",
        (".safetensors",),
        packed_opener(SafetensorsSource),
        sniff=lambda path, head: looks_like_safetensors(path),
        folder_globs=("*.safetensors",),
        expected="a .safetensors file or index",
    ),
    SourceFormat(
        "sharded-torch",
        (".index.json",),
        _plain(ShardedTorchSource),
        folder_globs=("*.bin.index.json", "*.pt.index.json", "*.pth.index.json"),
        shards=_index_shards,
    ),
    SourceFormat(
        "torch",
        (".th", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"),
        _checkpoint(TorchFileSource),
        sniff=lambda path, head: head[:4] == _ZIP or head[:1] == b"\x80",
        sniff_last=True,
        folder_globs=("*.th", "*.pt", "*.pth", "*.bin", "*.ckpt"),
        expected="a PyTorch state dict or checkpoint (.th/.pt/.pth/.bin/.ckpt)",
    ),
    SourceFormat(
        "archive",
        (".tar.gz", ".tgz"),
        _checkpoint(ArchiveSource),
        sniff=lambda path, head: head[:2] == b"\x1f\x8b",
        folder_globs=("*.tar.gz", "*.tgz"),
        expected="a .tar.gz model archive",
    ),
    SourceFormat(
        "npz",
        (".npz",),
        _plain(NpzSource),
        sniff=lambda path, head: head[:4] == _ZIP and looks_like_npz(path),
        folder_globs=("*.npz",),
        expected="a numpy .npy/.npz file",
    ),
    SourceFormat(
        "npy",
        (".npy",),
        _plain(NpySource),
        sniff=lambda path, head: head[:4] == b"\x93NUM",
        folder_globs=("*.npy",),
    ),
    SourceFormat(
        "sharded-keras",
        (".weights.json",),
        _plain(ShardedKerasSource),
        folder_globs=("*.weights.json",),
        shards=lambda path: read_shard_index(path)[0],
        shard_check=check_shard,  # a shard alone may hold the later half of a layer
    ),
    SourceFormat(
        "keras",
        (".keras", ".h5", ".hdf5"),
        _plain(KerasSource),
        sniff=looks_like_keras,
        name_check=claims_name,
        folder_globs=("*.keras", "*.h5"),
        expected="a Keras .keras/.weights.h5/.h5 file or sharded .weights.json index",
    ),
    SourceFormat(
        "gguf",
        (".gguf",),
        _plain(GGUFSource),
        sniff=lambda path, head: head[:4] == b"GGUF",
        folder_globs=("*.gguf",),
        expected="a .gguf file",
    ),
    SourceFormat(
        "onnx",
        (".onnx",),
        _plain(OnnxSource),
        sniff=lambda path, head: looks_like_onnx(head),
        folder_globs=("*.onnx",),
        expected="an ONNX model (.onnx)",
    ),
]


def _refused(entry: Unsupported) -> SourceFormat:
    """The entry of a format that is recognised but not read: its opener raises the one line."""
    sniff = (lambda path, head: entry.matches_head(head)) if entry.magic else None
    return SourceFormat(
        entry.key,
        entry.suffixes,
        lambda path, label, key: refuse(entry, path),
        sniff=sniff,
        folder_globs=entry.folder_globs,
        readable=False,
    )


#: Formats recognised but not read, after every readable one (a folder with weights that can be
#: read is read).
FORMATS += [_refused(u) for u in UNSUPPORTED]


def names_shards(path: Path) -> bool:
    """Whether ``path``'s name is that of a sharded format's index (a file not fetched yet may
    be asked: only the suffix counts)."""
    return any(f.shards is not None and path.name.lower().endswith(f.suffixes) for f in FORMATS)


def index_shards(path: Path) -> Tuple[List[str], Optional[Callable[[Path], object]]]:
    """The shard files that the index ``path`` (a file named as :func:`names_shards` says)
    names, in order, and how each is checked when downloaded (its format's ``shard_check``;
    None: opened as a source of its own)."""
    for fmt in FORMATS:
        if fmt.shards is not None and fmt.claims_name(path):
            return fmt.shards(path), fmt.shard_check
    raise AnalyzeError(f"{path} is not the index of a sharded checkpoint")


def get(name: str) -> SourceFormat:
    """The format called ``name``."""
    return next(f for f in FORMATS if f.name == name)


def by_name(path: Path) -> Optional[SourceFormat]:
    """The first format whose name test claims ``path``; None where the name says nothing."""
    return next((f for f in FORMATS if f.claims_name(path)), None)


def read_head(path: Path) -> bytes:
    """The first ``HEAD_BYTES`` of the regular file ``path`` (raises OSError, AnalyzeError)."""
    with limits.open_regular(path) as f:
        return f.read(HEAD_BYTES)


def by_content(path: Path, head: bytes) -> Optional[SourceFormat]:
    """The first format whose sniffer claims ``path`` (``head``: its first bytes), the
    ``sniff_last`` ones last; None where none does."""
    ordered = sorted(
        ((f, f.sniff) for f in FORMATS if f.sniff is not None), key=lambda pair: pair[0].sniff_last
    )
    return next((f for f, sniff in ordered if sniff(path, head)), None)


def expected() -> str:
    """What a weights file may be, for the message about a file no format claims."""
    return ", ".join(f.expected for f in FORMATS if f.expected) + ", or a model folder"


def folder_globs() -> List[str]:
    """Every glob that picks a weights file in a model folder, in preference order."""
    return [g for f in FORMATS for g in f.folder_globs]


def suffixes() -> Tuple[str, ...]:
    """Every file-name ending that some format claims (a name with one is a file's)."""
    return tuple(s for f in FORMATS for s in f.suffixes)
