"""GGUF files (llama.cpp, Ollama, LM Studio): every tensor with its own GGML type, quantized
ones read as :class:`~allennlp_analyze.quantized.QuantizedMatrix` (decoded row block by row
block with :mod:`.quant.gguf_blocks`), float ones (F32, F16, BF16, F64) as arrays.

Format (little-endian): ``GGUF``, version (2 or 3), tensor count and key-value count (u64),
the key-value pairs (a string key, a u32 value type, the value: scalars, strings as u64 length
+ bytes, arrays as u32 item type + u64 count + items), the tensor infos (name, u32 dims, u64
``ne`` per dim with ``ne[0]`` the row length, u32 GGML type, u64 offset), then, at the next
multiple of ``general.alignment`` (32), the data. The header is scanned here before anything
else (:func:`scan`): every count, length, shape and offset is checked against the file's size
first, so that a hostile header costs no memory; tensors are then memory-mapped views of the
file (``numpy.memmap``), read only where they are decoded. (``gguf.GGUFReader`` is not used:
it parses every metadata array item by item in Python and stops at a type it does not know,
where this reader lists that tensor as undecodable and goes on.)

Names: GGUF's (``blk.0.attn_q.weight``) become the Hugging Face names of the file's
architecture through the ``gguf`` package's own tensor-name map (``gguf.TensorNameMap``,
inverted: of the Hugging Face names that map to a GGUF name, the one transformers'
Llama-style models use is preferred, :func:`_hf_preference`; other families' checkpoints
may name some tensors differently). The stored name stays in ``TensorInfo.stored_name``.
llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` head by head for the
architectures in
:data:`PERMUTED_ARCHITECTURES`; the rows are put back in the Hugging Face order here (from the
file's head counts), so that a record's matrix equals the source checkpoint's element-wise.
3-D expert stacks (``*_exps``) give one matrix per expert (``...experts.<e>...``).

Needs the optional ``gguf`` package (``pip install allennlp-analyze[gguf]``).
"""

import functools
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import limits
from ..errors import AnalyzeError, one_line
from ..quantized import DecodedRows
from ..tensors import TensorInfo

MAGIC = b"GGUF"
#: GGML_MAX_DIMS.
MAX_DIMS = 4
#: Longest string accepted in a header (keys, names, metadata values such as chat templates).
MAX_STRING = 16 * 2**20
#: Deepest nesting of metadata arrays accepted.
MAX_ARRAY_DEPTH = 4
#: Architectures whose attn_q / attn_k rows llama.cpp's ``convert_hf_to_gguf.py`` permutes with
#: ``LlamaModel.permute`` (heads' halves interleaved for its rotary embedding).
PERMUTED_ARCHITECTURES = frozenset(
    {
        "llama",
        "deci",
        "granite",
        "granitemoe",
        "minicpm",
        "arctic",
        "olmo",
        "chameleon",
        "deepseek",
        "bailingmoe",
    }
)
#: Byte size of GGUF's fixed-size metadata value types (by type number).
_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
#: GGML types read as plain arrays: type number -> (numpy storage, dtype name); integer
#: tensors are listed (and left out as not floating-point).
_FLOATS: Dict[int, Tuple[np.dtype, str]] = {
    0: (np.dtype("<f4"), "float32"),
    1: (np.dtype("<f2"), "float16"),
    28: (np.dtype("<f8"), "float64"),
    30: (np.dtype("<u2"), "bfloat16"),
    24: (np.dtype("i1"), "int8"),
    25: (np.dtype("<i2"), "int16"),
    26: (np.dtype("<i4"), "int32"),
    27: (np.dtype("<i8"), "int64"),
}


@dataclass(frozen=True)
class MetadataArray:
    """A metadata array, kept as its item type number and length (the items are skipped)."""

    item_type: int
    length: int


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header: stored name, ``ne`` (row length first), GGML type number,
    the byte offset of its data in the file, and its byte size (None: a type unknown here)."""

    name: str
    ne: Tuple[int, ...]
    qtype: int
    start: int
    nbytes: Optional[int]

    @property
    def count(self) -> int:
        """Number of elements."""
        return int(np.prod(self.ne, dtype=object))


@dataclass(frozen=True)
class Header:
    """What :func:`scan` found: the version, the metadata (arrays as :class:`MetadataArray`),
    the tensors, and the file's size."""

    version: int
    metadata: Dict[str, object]
    tensors: List[TensorEntry]
    size: int


class _Cursor:
    """Reads the header from a memory map with every length checked against the file."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> AnalyzeError:
        return AnalyzeError(f"{self.path} is not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)"
            )

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str, keep: bool = True) -> str:
        n = self.unpack("<Q", f"length of {what}")
        if n > MAX_STRING:
            raise self.fail(f"{what} claims {n} bytes (more than {MAX_STRING})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n]) if keep else b""
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> object:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY or depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} has value type {vtype}, unknown or nested too deep")
        itype = self.unpack("<I", f"item type of {what}")
        count = self.unpack("<Q", f"length of {what}")
        least = (
            struct.calcsize(_SCALAR[itype])
            if itype in _SCALAR
            else 8
            if itype == _STRING
            else 12
            if itype == _ARRAY
            else None
        )
        if least is None:
            raise self.fail(f"{what} holds items of unknown type {itype}")
        self.need(count * least, f"{what} ({count} items)")
        if itype in _SCALAR:
            self.pos += count * least
        else:
            for _ in range(count):
                if itype == _STRING:
                    self.string(what, keep=False)
                else:
                    self.value(_ARRAY, what, depth + 1)
        return MetadataArray(itype, count)


def scan(path: Path) -> Header:
    """The header of the GGUF file at ``path``, every size checked before it is used (module
    docstring): one :class:`AnalyzeError` line for a truncated or lying header."""
    try:
        with limits.open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise AnalyzeError(f"{path} is not a valid GGUF file: only {size} bytes")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _scan(_Cursor(buf, size, path))
    except OSError as e:
        raise AnalyzeError(f"cannot read {path}: {e.strerror or one_line(e)}") from None


def _scan(c: _Cursor) -> Header:
    if bytes(c.buf[:4]) != MAGIC:
        raise c.fail("no GGUF magic")
    c.pos = 4
    version = c.unpack("<I", "version")
    if version not in (2, 3):
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        raise c.fail(
            "big-endian files are not supported"
            if swapped in (2, 3)
            else f"version {version} (2 and 3 are read)"
        )
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "key-value count")
    # every pair takes >= 13 bytes, every tensor info >= 32: refuse absurd counts up front
    c.need(n_kv * 13 + n_tensors * 32, f"{n_kv} key-value pairs and {n_tensors} tensor infos")
    metadata: Dict[str, object] = {}
    for _ in range(n_kv):
        key = c.string("a metadata key")
        vtype = c.unpack("<I", f"value type of {key!r}")
        if key in metadata:
            raise c.fail(f"metadata key {key!r} appears twice")
        metadata[key] = c.value(vtype, repr(key))
    alignment = metadata.get("general.alignment", 32)
    if (
        not isinstance(alignment, int)
        or alignment <= 0
        or alignment & (alignment - 1)
        or alignment > 2**20
    ):
        raise c.fail(f"general.alignment {alignment!r} is not a power of two up to 2**20")
    infos = []
    for _ in range(n_tensors):
        name = c.string("a tensor name")
        n_dims = c.unpack("<I", f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        ne = tuple(c.unpack("<Q", f"shape of {name!r}") for _ in range(n_dims))
        qtype = c.unpack("<I", f"type of {name!r}")
        offset = c.unpack("<Q", f"offset of {name!r}")
        infos.append((name, ne, qtype, offset))
    data_start = -(-c.pos // alignment) * alignment
    return Header(version, metadata, [_entry(c, data_start, *i) for i in infos], c.size)


def _entry(
    c: _Cursor, data_start: int, name: str, ne: Tuple[int, ...], qtype: int, offset: int
) -> TensorEntry:
    """A tensor info checked against the file: a shape whose size fits the file, whole blocks
    per row, data inside the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    count = 1
    for n in ne:
        count *= n  # Python integers: no overflow; the size check below bounds it
    if count > 8 * c.size:
        raise c.fail(f"tensor {name!r} of shape {ne} has more elements than the file has bits")
    start = data_start + offset
    if start > c.size:
        raise c.fail(f"tensor {name!r} starts at byte {start}, past the end ({c.size})")
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        return TensorEntry(name, ne, qtype, start, None)
    if ne[0] % block:
        raise c.fail(
            f"tensor {name!r}: row length {ne[0]} is not a multiple of its "
            f"{GGMLQuantizationType(qtype).name} block size {block}"
        )
    nbytes = count // block * type_size
    if start + nbytes > c.size:
        raise c.fail(
            f"tensor {name!r} ({nbytes} bytes at byte {start}) runs past the end of "
            f"the file ({c.size} bytes): truncated"
        )
    return TensorEntry(name, ne, qtype, start, nbytes)


def hf_names(arch: str, n_blocks: int, stored: Sequence[str]) -> Dict[str, str]:
    """Hugging Face names of the stored tensor names (``blk.0.attn_q.weight`` ->
    ``model.layers.0.self_attn.q_proj.weight``) through ``gguf.TensorNameMap`` of ``arch``,
    inverted (module docstring); names it does not know stay as they are."""
    import gguf

    arch_id = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), None)
    if arch_id is None:
        return {}
    candidates: Dict[str, List[str]] = {}
    for key, (_, gguf_name) in gguf.TensorNameMap(arch_id, n_blocks).mapping.items():
        if key != gguf_name:
            candidates.setdefault(gguf_name, []).append(key)
    names = {}
    for name in stored:
        base, dot, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias") or base not in candidates:
            continue
        names[name] = min(candidates[base], key=_hf_preference) + dot + suffix
    return names


def _hf_preference(key: str) -> int:
    """Rank of a Hugging Face name candidate (lowest wins, ties in the map's order):
    transformers' Llama-style names first (``model.layers.N...``, then ``lm_head`` and
    ``model.<one name>`` such as ``model.embed_tokens``, then other ``model.`` names)."""
    if key.startswith("model.layers."):
        return 0
    if key == "lm_head" or re.fullmatch(r"model\.[a-z_]+", key):
        return 1
    return 2 if key.startswith("model.") else 3


def head_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order of llama.cpp's ``LlamaModel.permute`` (``W_gguf = W_hf[perm]``) for a matrix
    of ``rows`` rows in ``n_head`` heads (the kv head count for attn_k)."""
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(-1)


class GGUFMatrix:
    """One 2-D quantized tensor of a GGUF file (a :class:`~allennlp_analyze.quantized.
    QuantizedMatrix`): ``raw`` the stored rows (out x bytes per row, a view of the mapped
    file), ``order`` the stored row of each row of the matrix (None: the same)."""

    def __init__(
        self,
        raw: np.ndarray,
        qtype: int,
        cols: int,
        order: Optional[np.ndarray],
        bound_reason: Optional[str],
    ):
        from .quant.gguf_blocks import block_type

        t = block_type(qtype)
        self.raw, self.qtype, self.order = raw, qtype, order
        self.shape = (int(raw.shape[0]), cols)
        self.scheme = t.name
        self.bound_reason = bound_reason if t.bound_reason is None else t.bound_reason
        self.note = None if order is None else "rows put back in Hugging Face order"
        self._block, self._type_size = t.block_size, t.type_size

    def _stored(self, start: int, stop: int) -> np.ndarray:
        return self.raw[start:stop] if self.order is None else self.raw[self.order[start:stop]]

    def rows(self, start: int, stop: int) -> DecodedRows:
        """Rows start:stop, decoded (:func:`.quant.gguf_blocks.decode`)."""
        from .quant.gguf_blocks import decode

        return decode(self.qtype, self._stored(start, stop), self.bound_reason is None)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole matrix decoded, float64 (for callers that want the values as an array,
        e.g. ``--base``'s element-wise difference)."""
        values = np.asarray(self.rows(0, self.shape[0]).values, dtype=np.float64)
        return values if dtype is None else values.astype(dtype, copy=False)

    def columns(self, start: int, stop: int) -> DecodedRows:
        """Columns start:stop of every row (out x (stop - start)): only the blocks holding
        them are decoded, in row chunks."""
        from .quant.gguf_blocks import decode

        b0, b1 = start // self._block, -(-stop // self._block)
        cut = slice(start - b0 * self._block, stop - b0 * self._block)
        parts = []
        chunk = max(1, (1 << 22) // max(1, (b1 - b0) * self._block))
        for a in range(0, self.shape[0], chunk):
            raw = self._stored(a, min(a + chunk, self.shape[0]))
            d = decode(
                self.qtype,
                raw[:, b0 * self._type_size : b1 * self._type_size],
                self.bound_reason is None,
            )
            parts.append(
                DecodedRows(
                    d.values[:, cut], d.step[:, cut], None if d.worst is None else d.worst[:, cut]
                )
            )
        if len(parts) == 1:
            return parts[0]
        worst = [p.worst for p in parts if p.worst is not None]
        return DecodedRows(
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.step for p in parts]),
            np.concatenate(worst) if len(worst) == len(parts) else None,
        )


_EXPERTS = re.compile(r"_exps\.(weight|bias)$")
#: Module types by GGUF name (the kinds' best evidence).
_EMBEDDING = ("token_embd", "pos_embd", "token_types")


class GGUFSource:
    """One ``.gguf`` file (:mod:`module docstring <allennlp_analyze.sources.gguf_file>`)."""

    def __init__(self, path: Union[str, os.PathLike], label: Optional[str] = None):
        self.path = Path(path)
        self.label = label or self.path.name
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise AnalyzeError(
                f"{self.path}: reading GGUF files needs the gguf package "
                "(pip install 'allennlp-analyze[gguf]')"
            ) from None
        header = scan(self.path)
        meta = header.metadata
        self.metadata = meta
        arch = str(meta.get("general.architecture", ""))
        blocks = meta.get(f"{arch}.block_count", 0)
        names = hf_names(
            arch, blocks if isinstance(blocks, int) else 0, [t.name for t in header.tensors]
        )
        self._heads = (
            meta.get(f"{arch}.attention.head_count"),
            meta.get(f"{arch}.attention.head_count_kv"),
        )
        self._permuted = arch in PERMUTED_ARCHITECTURES
        self._imatrix = any(k.startswith("quantize.imatrix") for k in meta)
        self._infos: List[TensorInfo] = []
        self._where: Dict[str, Tuple[TensorEntry, Optional[int]]] = {}
        undecodable = []
        for t in header.tensors:
            if t.nbytes is None or not _decodable(t.qtype):
                undecodable.append(f"{t.name} ({_type_name(t.qtype)})")
                continue
            self._add(t, names.get(t.name, t.name))
        self._data: Optional[np.memmap] = None
        self.note = _describe(header.version, meta, undecodable)

    def _add(self, t: TensorEntry, name: str) -> None:
        shape = tuple(reversed(t.ne))
        dtype = _FLOATS[t.qtype][1] if t.qtype in _FLOATS else _type_name(t.qtype)
        quantized = t.qtype not in _FLOATS
        stem = t.name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        module = "Embedding" if stem in _EMBEDDING else "Linear" if len(shape) >= 2 else None
        if len(shape) == 3 and _EXPERTS.search(t.name):
            for e in range(shape[0]):
                expert = (
                    name.replace("experts.", f"experts.{e}.", 1)
                    if "experts." in name
                    else f"{name}[{e}]"
                )
                self._put(
                    TensorInfo(
                        expert,
                        shape[1:],
                        dtype,
                        module,
                        quantized=quantized,
                        stored_name=f"{t.name}[{e}]",
                    ),
                    t,
                    e,
                )
            return
        self._put(
            TensorInfo(
                name,
                shape,
                dtype,
                module,
                quantized=quantized,
                stored_name=t.name if name != t.name else None,
            ),
            t,
            None,
        )

    def _put(self, info: TensorInfo, t: TensorEntry, expert: Optional[int]) -> None:
        if info.name in self._where:
            raise AnalyzeError(
                f"{self.path}: two tensors named {info.name!r}"
                f" (stored as {info.stored_name or info.name!r})"
            )
        self._infos.append(info)
        self._where[info.name] = (t, expert)

    def tensors(self) -> Sequence[TensorInfo]:
        return list(self._infos)

    def _map(self) -> np.memmap:
        if self._data is None:
            try:
                self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
            except OSError as e:
                raise AnalyzeError(
                    f"cannot read {self.path}: {e.strerror or one_line(e)}"
                ) from None
        return self._data

    def load(self, name: str):
        """A quantized tensor as a :class:`GGUFMatrix` (decoded when read), a float one as
        an array (float32 for BF16, exactly); attn_q / attn_k rows in Hugging Face order."""
        found = self._where.get(name)
        if found is None:
            raise AnalyzeError(f"{self.path} has no tensor named {name!r}")
        t, expert = found
        nbytes = t.nbytes or 0  # listed tensors all have a size
        raw = self._map()[t.start : t.start + nbytes]
        shape = tuple(reversed(t.ne))
        order = self._row_order(t, shape)
        if t.qtype in _FLOATS:
            array = raw.view(_FLOATS[t.qtype][0]).reshape(shape)
            if expert is not None:
                array = array[expert]
            if order is not None:
                array = array[order]
            if t.qtype == 30:
                from gguf import GGMLQuantizationType, quants

                array = quants.dequantize(
                    np.asarray(array).view(np.uint8), GGMLQuantizationType.BF16
                )
            return np.array(array)
        rows = raw.reshape(-1, nbytes // max(1, t.count // t.ne[0]))  # stored rows x bytes
        if expert is not None:
            rows = rows[expert * shape[1] : (expert + 1) * shape[1]]
        from .quant.gguf_blocks import IMATRIX_REASON

        return GGUFMatrix(
            rows, t.qtype, shape[-1], order, IMATRIX_REASON if self._imatrix else None
        )

    def _row_order(self, t: TensorEntry, shape: Tuple[int, ...]) -> Optional[np.ndarray]:
        """Inverse of llama.cpp's head permutation for attn_q / attn_k (module docstring)."""
        stem = t.name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if (
            not self._permuted
            or stem not in ("attn_q", "attn_k")
            or len(shape) != 2
            or not t.name.endswith(".weight")
        ):
            return None
        heads = self._heads[1] if stem == "attn_k" and self._heads[1] else self._heads[0]
        if not isinstance(heads, int) or heads <= 0 or shape[0] % (2 * heads):
            raise AnalyzeError(
                f"{self.path}: {t.name} has {shape[0]} rows, not a whole "
                f"number of head pairs for {heads!r} heads"
            )
        return np.argsort(head_permutation(shape[0], heads))

    def __repr__(self) -> str:
        return f"<GGUFSource {self.label!r}>"


def _type_name(qtype: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


@functools.lru_cache(maxsize=None)
def _decodable(qtype: int) -> bool:
    """Whether ``gguf.quants.dequantize`` decodes GGML type ``qtype`` (tried on one zero
    block; the plain types are read as they are)."""
    if qtype in _FLOATS:
        return True
    import gguf

    try:
        t = gguf.GGMLQuantizationType(qtype)
        gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[t][1]), np.uint8), t)
    except (ValueError, KeyError, NotImplementedError):
        return False
    return True


def _describe(version: int, meta: Dict[str, object], undecodable: List[str]) -> str:
    """The source's note: architecture, file type, context length, block count, and the
    tensors that could not be decoded."""
    import gguf

    arch = meta.get("general.architecture", "unknown")
    parts = [f"GGUF v{version}", f"architecture {arch}"]
    ftype = meta.get("general.file_type")
    if isinstance(ftype, int):
        try:
            parts.append(f"file type {gguf.LlamaFileType(ftype).name.replace('MOSTLY_', '')}")
        except ValueError:
            parts.append(f"file type {ftype}")
    for key, what in ((f"{arch}.context_length", "context"), (f"{arch}.block_count", "blocks")):
        if key in meta:
            parts.append(f"{what} {meta[key]}")
    text = ", ".join(parts)
    if undecodable:
        text += "; not analyzed, type not decodable by gguf: " + ", ".join(undecodable)
    return text
