"""Keras 3 sharded weights (``model.save_weights("m.weights.json", max_shard_size=...)``), read
with ``h5py`` alone as one source: the tensors of all its shards, named and laid out as the
single ``.weights.h5`` of the same model is (:mod:`.keras_file`).

On disk (Keras 3's ``ShardedH5IOStore``): the index ``m.weights.json`` is
``{"metadata": {"total_size": bytes}, "weight_map": {vars group: shard file or [shard
files]}}``, a vars group being the HDF5 path of an object's variables (``/layers/dense/vars``,
``/vars`` for the model's own); the shards ``m_00000.weights.h5``, ``m_00001.weights.h5``...
beside it are ordinary Keras 3 weights files, each holding the groups of the variables it was
given, in the order Keras saves them, a new shard started where the next variable would
overflow ``max_shard_size``. An object whose variables straddle two shards has its vars group in
both (``0`` in one, ``1`` and ``2`` in the next), and the index lists both; its ``name``
attribute is in the first, which may hold none of its variables (then the index lists only the
next). Each shard alone is read by :class:`.keras_file.KerasSource`.

Checked when opened, before anything is listed: the index is JSON of at most
``MAX_CONFIG_BYTES`` naming at most ``limits.MAX_EXTRACTED_FILES`` shards, each a file inside
the index's folder (no absolute path, ``..`` or symbolic link leading out), a regular file; every
shard is checked as a single file is (:mod:`.keras_file`); no variable is stored in two shards;
the index places each vars group exactly in the shards that hold its variables. The index is
authoritative: a file beside it that it does not name is not read (as Keras reads none: a stale
shard of an earlier, larger save stays where it was). The Keras ``config.json`` beside the index
is used where there is one. The optimizer's groups are not read.
"""

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from .. import limits
from ..checkpoint_config import MAX_CONFIG_BYTES
from ..errors import AnalyzeError, one_line
from ._common import inside_folder, map_file
from .keras_file import (
    NOT_MODEL,
    Hdf5Part,
    KerasWalk,
    KerasWeights,
    config_beside,
    hdf5_layout,
    is_hdf5,
    open_hdf5,
)

SUFFIX = ".weights.json"


def read_shard_index(path: Path) -> Tuple[List[str], Dict[str, List[str]]]:
    """The shard files a Keras sharded index names (in order of first mention) and its
    ``weight_map`` (vars group -> shard files), checked: a bounded JSON object, shard names
    that stay inside the index's folder and at most ``limits.MAX_EXTRACTED_FILES`` of them."""
    try:
        index = limits.parse_json(limits.read_regular(path, MAX_CONFIG_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AnalyzeError(
            f"{path} is not a valid Keras sharded weights index ({one_line(e)})"
        ) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise AnalyzeError(f"{path} is not a valid Keras sharded weights index (no 'weight_map')")
    claims: Dict[str, List[str]] = {}
    shards: Dict[str, None] = {}
    for group, files in weight_map.items():
        names = [files] if isinstance(files, str) else files
        if (
            not group.startswith("/")
            or not group.endswith("/vars")
            or not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) for n in names)
        ):
            raise AnalyzeError(
                f"{path} is not a valid Keras sharded weights index (bad entry {group!r})"
            )
        for name in names:
            if not inside_folder(path.parent, name) or os.sep in name or "/" in name:
                raise AnalyzeError(f"{path} names a shard {name!r} outside its folder: refused")
            shards.setdefault(name)
            if len(shards) > limits.MAX_EXTRACTED_FILES:
                raise AnalyzeError(
                    f"{path} names more than {limits.MAX_EXTRACTED_FILES} shard files: refused"
                )
        claims[group] = list(dict.fromkeys(names))
    return list(shards), claims


def open_shard(shard: Path, origin: str) -> Hdf5Part:
    """One shard named by the index ``origin``: a regular HDF5 file in Keras 3's layout, open
    (its variables are checked against the index by :class:`ShardedKerasSource`)."""
    if not os.path.lexists(shard):
        raise AnalyzeError(f"{shard} (a shard named in {origin}) does not exist")
    try:  # a folder, FIFO or device is refused before it is read
        buffer = map_file(shard)
    except AnalyzeError as e:
        raise AnalyzeError(f"{e} (a shard named in {origin})") from None
    if not is_hdf5(bytes(memoryview(buffer)[:8])):
        raise AnalyzeError(f"{shard} (a shard named in {origin}) is not an HDF5 file")
    part = open_hdf5(buffer, 0, len(buffer), str(shard))
    if hdf5_layout(part.h5) != "keras3":
        part.h5.close()
        raise AnalyzeError(f"{shard} (a shard named in {origin}) is not Keras 3 weights")
    return part


def check_shard(shard: Path) -> None:
    """A shard downloaded beside its index (before it is cached): as :func:`open_shard`."""
    open_shard(shard, "its index").h5.close()


class ShardedKerasSource(KerasWeights):
    """A Keras 3 ``*.weights.json`` index and its ``.weights.h5`` shards, as one source."""

    def __init__(self, path: Union[str, os.PathLike], label: Optional[str] = None):
        self.path = Path(path)
        origin = str(self.path)
        shards, claims = read_shard_index(self.path)
        parts = [open_shard(self.path.parent / name, origin) for name in shards]
        self.config = config_beside(self.path) or {}
        walk = KerasWalk(self.config, parts, origin)
        for i in range(len(parts)):
            walk.gather(i)
        self._check_claims(walk, shards, claims)
        walk.keras3()
        super().__init__(label or self.path.name, origin, parts, walk)

    def _check_claims(
        self, walk: KerasWalk, shards: List[str], claims: Dict[str, List[str]]
    ) -> None:
        """The index must place each vars group exactly in the shards holding its variables
        (the optimizer's groups, which are not read, aside)."""
        held = walk.holders()
        for group, names in claims.items():
            if group.split("/")[1] in NOT_MODEL:
                continue
            holding = {shards[i] for i in held.get(group, ())}
            absent = [n for n in names if n not in holding]
            if absent:
                raise AnalyzeError(
                    f"{self.path} places {group} in {absent[0]}, which holds no variable of it"
                )
        for group, indexes in held.items():
            placed = claims.get(group, [])
            stray = [shards[i] for i in sorted(indexes) if shards[i] not in placed]
            if stray:
                raise AnalyzeError(
                    f"{self.path.parent / stray[0]} holds variables of {group}, which "
                    f"{self.path} does not place there"
                )
