"""AllenNLP model archives (``model.tar.gz``) and serialization directories.

An archive is read by one streaming pass (:func:`scan_archive`), the same for both front-ends:
``gzip`` checks the CRC and length, so corruption and truncation are errors, and the rules of
:mod:`allennlp_analyze.limits` bound it (decompressed size, member count). Its weights are the
``weights.th`` member (else ``best.th``), at the top or inside one top folder, read into memory
(with the ``config.json`` beside it) and parsed as any pickled torch file is
(:mod:`.torch_file`: no code from it is run); the standalone command never extracts anything,
the AllenNLP plugin extracts only the files that build a model. An archive is refused, by both,
when which weights are meant is ambiguous: two members of one name (``tar`` would let the last
win), two ``weights.th`` (or two ``best.th``) in different folders, or weights that are a link
or any other non-regular member.
"""

import gzip
import os
import re
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Dict, List, Optional, Union

from .. import limits
from ..checkpoint_config import MAX_CONFIG_BYTES, parse_config
from ..errors import AnalyzeError
from ._common import one_line
from .torch_file import PickledSource, TorchFileSource

SUFFIXES = (".tar.gz", ".tgz")
#: Weight members of an archive, in order of preference.
ARCHIVE_WEIGHTS = ("weights.th", "best.th")
#: What AllenNLP's ``Model.load`` reads besides the weights (top-level names of an archive's
#: model folder); :func:`scan_archive` extracts only these.
MODEL_FILES = ("config.json", "meta.json", "vocabulary")
GZIP_MAGIC = b"\x1f\x8b"
_MEMBER_KINDS = (
    (tarfile.TarInfo.issym, "a symbolic link"),
    (tarfile.TarInfo.islnk, "a hard link"),
    (tarfile.TarInfo.isdir, "a folder"),
    (tarfile.TarInfo.isfifo, "a FIFO"),
    (tarfile.TarInfo.ischr, "a character device"),
    (tarfile.TarInfo.isblk, "a block device"),
)


def member_parts(name: str) -> List[str]:
    """A member name as path parts, without empty and ``.`` parts (``./a//b`` -> ``[a, b]``)."""
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _kind(member: tarfile.TarInfo) -> str:
    return next((kind for test, kind in _MEMBER_KINDS if test(member)), "not a regular file")


def _unsafe_reason(member: tarfile.TarInfo, parts: List[str]) -> Optional[str]:
    """Why ``member`` must not be extracted (None if it may): absolute names, ``..``, and
    anything but regular files and folders (links, devices, FIFOs)."""
    if member.name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member.name):
        return f"{member.name!r} is an absolute name"
    if ".." in parts:
        return f"{member.name!r} leaves the archive's folder"
    if not (member.isfile() or member.isdir()):
        return f"{member.name!r} is {_kind(member)}"
    return None


def _member_file(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """The data of a regular-file member (``extractfile`` gives None for other kinds)."""
    data = tar.extractfile(member)
    if data is None:
        raise AnalyzeError(f"{member.name} is {_kind(member)}, not a regular file")
    return data


def _is_model_file(parts: List[str]) -> bool:
    """Whether a member is one of ``MODEL_FILES`` (or inside one), at the top or in a folder."""
    return bool(parts) and (parts[0] in MODEL_FILES or (len(parts) > 1 and parts[1] in MODEL_FILES))


class _Bounded:
    """A binary stream that fails once more than ``limit`` bytes were read from it."""

    def __init__(self, stream, limit: int, origin: str, compressed: int):
        self.stream, self.limit, self.origin, self.compressed = stream, limit, origin, compressed
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n if n is not None and n >= 0 else self.limit + 1 - self.count)
        self.count += len(data)
        self.expect(0)
        return data

    def expect(self, n: int) -> None:
        """Fail now if ``n`` more bytes would pass the limit (a member's declared size)."""
        if self.count + n > self.limit:
            raise AnalyzeError(
                f"{self.origin} decompresses to more than {limits.format_bytes(self.limit)} "
                f"from {limits.format_bytes(self.compressed)} (a gzip bomb?); refused "
                f"(set {limits.ENV_MAX_EXPANSION} to allow more than "
                f"{limits.max_expansion():g} times)"
            )


@dataclass
class ArchiveContents:
    """What :func:`scan_archive` found: the weights' member name (``weights``); read into
    memory, their bytes (``data``) and those of the ``config.json`` beside them (``config``,
    None where there is none); or extracted, the folder of the weights and model files under
    ``extract_to`` (``folder``) or why they were not extracted (``unsafe``)."""

    weights: str
    data: Optional[bytes] = None
    config: Optional[bytes] = None
    folder: Optional[Path] = None
    unsafe: Optional[str] = None


def scan_archive(path: Path, extract_to: Optional[Path] = None) -> ArchiveContents:
    """Stream the archive once, checking it whole (CRC, truncation, ambiguity, limits), and
    read its weights (and config) into memory, or, given ``extract_to``, extract its model files
    (``MODEL_FILES`` and the weights, regular files only) there instead. Extraction stops, with
    the reason in ``unsafe``, at the first member that is not safe to extract (absolute, ``..``,
    a link, a device) or when there are more than ``limits.MAX_EXTRACTED_FILES`` model files.
    Every problem with the archive is an :class:`AnalyzeError`."""
    origin = str(path)
    try:
        with limits.open_regular(path) as raw:
            if raw.read(2) != GZIP_MAGIC:
                raise AnalyzeError(f"{path} is not a gzip tar archive")
            raw.seek(0)
            compressed = os.fstat(raw.fileno()).st_size
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                stream = _Bounded(gz, limits.expanded_limit(compressed), origin, compressed)
                found = _Scan(origin, stream, extract_to)
                # typeshed's fileobj protocol asks for write() and close() even to read a stream
                with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                    for member in tar:
                        found.member(tar, member)
                # Read to the end of the gzip stream, so that its CRC and length are checked.
                while stream.read(1 << 20):
                    pass
    except AnalyzeError:
        raise
    except EOFError:
        raise AnalyzeError(f"{path} is truncated") from None
    except gzip.BadGzipFile as e:
        if "CRC" in str(e) or "length" in str(e).lower():
            raise AnalyzeError(f"{path} is corrupt ({one_line(e)})") from None
        raise AnalyzeError(f"{path} is not a gzip tar archive") from None
    except zlib.error as e:
        raise AnalyzeError(f"{path} is corrupt ({one_line(e)})") from None
    except tarfile.TarError as e:
        message = one_line(e)
        if "unexpected end" in message:
            raise AnalyzeError(f"{path} is truncated") from None
        if "zlib" in message or "crc" in message.lower():
            raise AnalyzeError(f"{path} is corrupt ({message})") from None
        raise AnalyzeError(f"{path} is not a gzip tar archive ({message})") from None
    except OSError as e:
        raise AnalyzeError(f"cannot read {path}: {e.strerror or one_line(e)}") from None
    return found.result()


class _Scan:
    """The member-by-member rules of :func:`scan_archive`."""

    def __init__(self, origin: str, stream: _Bounded, extract_to: Optional[Path]):
        self.origin, self.stream, self.extract_to = origin, stream, extract_to
        self.count = 0
        self.names: set = set()
        self.weights: Dict[str, str] = {}  # weights file name -> member name
        self.data: Optional[bytes] = None
        self.data_member: Optional[str] = None
        self.configs: Dict[str, bytes] = {}  # folder -> config.json bytes
        self.extracted = 0
        self.unsafe: Optional[str] = None

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.count += 1
        if self.count > limits.MAX_ARCHIVE_MEMBERS:
            raise AnalyzeError(
                f"{self.origin} holds more than {limits.MAX_ARCHIVE_MEMBERS} "
                "members (not a model archive?)"
            )
        # a stream needs no index: keep memory flat however many members (``members``: the
        # list TarFile appends every member to; typeshed does not declare it)
        tar.members.clear()  # type: ignore[attr-defined]
        parts = member_parts(member.name)
        name = "/".join(parts)
        if self.unsafe is None:
            self.unsafe = _unsafe_reason(member, parts)
        if member.isdir():
            return
        self.stream.expect(member.size)  # a bomb is refused before its member is read
        if name in self.names:
            raise AnalyzeError(
                f"{self.origin} holds two members named {name!r} (ambiguous: which one is meant?)"
            )
        self.names.add(name)
        is_weights = bool(parts) and len(parts) <= 2 and parts[-1] in ARCHIVE_WEIGHTS
        if is_weights:
            if not member.isfile():
                raise AnalyzeError(
                    f"{self.origin}: its {name} is {_kind(member)}, not a regular "
                    "file (links are not followed)"
                )
            other = self.weights.get(parts[-1])
            if other is not None:
                raise AnalyzeError(
                    f"{self.origin} holds two {parts[-1]} ({other}, {name}): "
                    "which one is meant is ambiguous"
                )
            self.weights[parts[-1]] = name
        if self.extract_to is not None:
            if self.unsafe is None and member.isfile() and (is_weights or _is_model_file(parts)):
                self._extract(tar, member, parts, self.extract_to)
        elif is_weights and self._preferred(name):
            limits.check_memory(2 * member.size, f"reading {name} of {self.origin}")
            self.data, self.data_member = _member_file(tar, member).read(), name
        elif (
            0 < len(parts) <= 2
            and parts[-1] == "config.json"
            and member.isfile()
            and member.size <= MAX_CONFIG_BYTES
        ):
            self.configs["/".join(parts[:-1])] = _member_file(tar, member).read()

    def _preferred(self, name: str) -> bool:
        """Whether ``name`` beats the weights read so far (``weights.th`` over ``best.th``)."""
        if self.data_member is None:
            return True
        rank = ARCHIVE_WEIGHTS.index
        return rank(member_parts(name)[-1]) < rank(member_parts(self.data_member)[-1])

    def _extract(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: List[str], extract_to: Path
    ) -> None:
        self.extracted += 1
        if self.extracted > limits.MAX_EXTRACTED_FILES:
            self.unsafe = f"more than {limits.MAX_EXTRACTED_FILES} model files"
            return
        target = extract_to.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _member_file(tar, member) as src, open(target, "xb") as out:
            shutil.copyfileobj(src, out, 1 << 20)

    def result(self) -> ArchiveContents:
        if not self.weights:
            raise AnalyzeError(
                f"{self.origin} holds no weights.th (not an AllenNLP model archive?)"
            )
        chosen = next(self.weights[w] for w in ARCHIVE_WEIGHTS if w in self.weights)
        folder = member_parts(chosen)[:-1]
        if self.extract_to is not None:
            return ArchiveContents(
                weights=chosen,
                unsafe=self.unsafe,
                folder=None if self.unsafe else self.extract_to.joinpath(*folder),
            )
        return ArchiveContents(
            weights=chosen, data=self.data, config=self.configs.get("/".join(folder))
        )


class ArchiveSource(PickledSource):
    """An AllenNLP ``model.tar.gz``; its weights member is read when opened."""

    def __init__(
        self,
        path: Union[str, os.PathLike],
        label: Optional[str] = None,
        checkpoint_key: Optional[str] = None,
    ):
        self.path = Path(path)
        contents = scan_archive(self.path)
        super().__init__(
            label or self.path.name,
            contents.data,
            f"{self.path} (member {contents.weights})",
            checkpoint_key,
        )
        self.config = parse_config(contents.config) if contents.config is not None else None


def _checkpoint_key(path: Path):
    """Order of AllenNLP training checkpoints ``model_state_epoch_3.th`` /
    ``model_state_e3_b120.th``: by epoch then batch."""
    return [int(n) for n in re.findall(r"\d+", path.name)]


def find_serialization_weights(folder: Path) -> Optional[Path]:
    """The weights of an AllenNLP serialization directory: ``best.th``, else ``weights.th``,
    else the latest ``model_state_*.th``; ``None`` if there are none."""
    for name in ("best.th", "weights.th"):
        if (folder / name).is_file():
            return folder / name
    checkpoints = sorted(
        (p for p in folder.glob("model_state_*.th") if p.is_file()), key=_checkpoint_key
    )
    return checkpoints[-1] if checkpoints else None


class SerializationDirSource(TorchFileSource):
    """An AllenNLP serialization directory (``config.json`` plus ``best.th`` or checkpoints)."""

    def __init__(
        self,
        folder: Union[str, os.PathLike],
        label: Optional[str] = None,
        checkpoint_key: Optional[str] = None,
    ):
        folder = Path(folder)
        weights = find_serialization_weights(folder)
        if weights is None:
            raise AnalyzeError(f"{folder} holds no best.th, weights.th or model_state_*.th")
        self.folder = folder
        self.weights_path = weights
        super().__init__(
            weights, label=label or folder.resolve().name, checkpoint_key=checkpoint_key
        )
