"""AllenNLP model archives (``model.tar.gz``) and serialization directories.

An archive is never extracted to disk: it is streamed once through ``gzip`` (which checks the
CRC, so corruption and truncation are reported) and ``tarfile``, and the ``weights.th`` member
(else ``best.th``) is read into memory and parsed as any pickled torch file is
(:mod:`.torch_file`: no code from it is run). Links and other non-regular members are never
followed.
"""
import gzip
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Optional, Union

from ..checkpoint_config import MAX_CONFIG_BYTES, parse_config
from ..errors import AnalyzeError
from ._common import one_line
from .torch_file import PickledSource, TorchFileSource

SUFFIXES = (".tar.gz", ".tgz")
#: Weight members of an archive, in order of preference.
ARCHIVE_WEIGHTS = ("weights.th", "best.th")
GZIP_MAGIC = b"\x1f\x8b"


def _member_rank(name: str) -> Optional[int]:
    """Preference of a member as the archive's weights (lower is better), ``None`` if it is not
    one: ``weights.th`` / ``best.th`` at the top level or inside a single top folder."""
    parts = _path_parts(name)
    if not parts or len(parts) > 2 or parts[-1] not in ARCHIVE_WEIGHTS:
        return None
    return ARCHIVE_WEIGHTS.index(parts[-1]) * 2 + (len(parts) - 1)


def _path_parts(name: str) -> list:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _config_folder(name: str) -> Optional[str]:
    """The folder of a ``config.json`` member at the top level or in a single top folder."""
    parts = _path_parts(name)
    return "/".join(parts[:-1]) if 0 < len(parts) <= 2 and parts[-1] == "config.json" else None


def read_archive_weights(path: Path) -> tuple:
    """``(member name, bytes, config bytes or None)``: the archive's weights and the
    ``config.json`` beside them, reading the whole archive once."""
    try:
        with open(path, "rb") as raw:
            if raw.read(2) != GZIP_MAGIC:
                raise AnalyzeError(f"{path} is not a gzip tar archive")
            raw.seek(0)
            best = None  # (rank, name, bytes)
            links, configs = [], {}
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                with tarfile.open(fileobj=gz, mode="r|") as tar:
                    for member in tar:
                        rank = _member_rank(member.name)
                        folder = _config_folder(member.name)
                        if folder is not None and member.isfile() \
                                and member.size <= MAX_CONFIG_BYTES:
                            configs[folder] = tar.extractfile(member).read()
                        if rank is None:
                            continue
                        if not member.isfile():
                            links.append(member.name)
                            continue
                        if best is None or rank < best[0]:
                            handle = tar.extractfile(member)
                            best = (rank, member.name, handle.read())
                # Read to the end of the gzip stream, so that its CRC and length are checked.
                while gz.read(1 << 20):
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
    if best is None:
        why = f" ({links[0]} is a link, which is not followed)" if links else ""
        raise AnalyzeError(f"{path} holds no weights.th (not an AllenNLP model archive?){why}")
    return best[1], best[2], configs.get("/".join(_path_parts(best[1])[:-1]))


class ArchiveSource(PickledSource):
    """An AllenNLP ``model.tar.gz``; its weights member is read when opened."""

    def __init__(self, path: Union[str, os.PathLike], label: Optional[str] = None,
                 checkpoint_key: Optional[str] = None):
        self.path = Path(path)
        member, data, config = read_archive_weights(self.path)
        super().__init__(label or self.path.name, data, f"{self.path} (member {member})",
                         checkpoint_key)
        self.config = parse_config(config) if config is not None else None


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
    checkpoints = sorted((p for p in folder.glob("model_state_*.th") if p.is_file()), key=_checkpoint_key)
    return checkpoints[-1] if checkpoints else None


def is_serialization_dir(folder: Path) -> bool:
    return (folder / "config.json").is_file() and find_serialization_weights(folder) is not None


class SerializationDirSource(TorchFileSource):
    """An AllenNLP serialization directory (``config.json`` plus ``best.th`` or checkpoints)."""

    def __init__(self, folder: Union[str, os.PathLike], label: Optional[str] = None,
                 checkpoint_key: Optional[str] = None):
        folder = Path(folder)
        weights = find_serialization_weights(folder)
        if weights is None:
            raise AnalyzeError(f"{folder} holds no best.th, weights.th or model_state_*.th")
        self.folder = folder
        self.weights_path = weights
        super().__init__(weights, label=label or folder.resolve().name,
                         checkpoint_key=checkpoint_key)
