"""Packed quantized layers found in a safetensors checkpoint: which family wrote them (from the
folder's ``config.json`` ``quantization_config``, checked against the tensors, or from the
tensors alone where there is no config), each layer's :class:`QuantizedMatrix` under the
layer's own name (``...q_proj.weight``, not ``qweight``), and the side tensors (scales, zero
points, ``g_idx``, absmax, quant maps, quant states, ``SCB``) that are quantization metadata,
never matrices of their own.

Families (suffixes of a layer prefix ``P``): GPTQ / AWQ ``P.qweight`` (+ ``qzeros``, ``scales``,
``g_idx``); compressed-tensors ``P.weight_packed`` (+ ``weight_scale``, ``weight_zero_point``,
``weight_g_idx``, ``weight_shape``) or an int8 ``P.weight`` with ``P.weight_scale``
(naive-quantized); bitsandbytes 4-bit ``P.weight`` with ``P.weight.absmax`` and
``P.weight.quant_state.bitsandbytes__nf4|fp4``; LLM.int8 ``P.weight`` with ``P.SCB``.
Kernel re-tiled layouts (Marlin, bitblas, ExLlama v2's EXL2) are refused in one line.
"""

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from ... import limits
from ...limits import format_bytes
from ...checkpoint_config import load_config
from ...errors import AnalyzeError, escape
from ...kinds import QUANT_METADATA
from ...quantized import QuantizedMatrix
from ...tensors import TensorInfo
from .._common import read_index
from ..safetensors_file import SafetensorsSource, sharded_whole
from .awq import AWQMatrix
from .bnb import FourBitMatrix, Int8RowMatrix, read_state
from .ctensors import (
    CTMatrix,
    fp8_reader,
    naive_reader,
    packed_reader,
    packed_words,
    packed_zero_points,
)
from .gptq import GPTQMatrix
from .intgrid import config_int, int_bits, unit_roundoff

#: Side tensors of each family, by suffix after the layer prefix.
GPTQ_SIDE = (".qzeros", ".scales", ".g_idx")
CT_SIDE = (
    ".weight_scale",
    ".weight_zero_point",
    ".weight_g_idx",
    ".weight_shape",
    ".weight_global_scale",
    ".input_scale",
    ".input_zero_point",
    ".input_global_scale",
    ".output_scale",
    ".output_zero_point",
)
BNB_SIDE = (
    ".weight.absmax",
    ".weight.quant_map",
    ".weight.nested_absmax",
    ".weight.nested_quant_map",
    ".SCB",
    ".weight_format",
)
BNB_STATE = re.compile(r"\.weight\.quant_state\.bitsandbytes__(\w+)$")
#: Tensor names of layouts re-tiled for a kernel -> the layout's name.
RETILED = (
    (re.compile(r"\.(?:q_scale_max|q_groups|q_invperm)$"), "ExLlama v2 (EXL2)"),
    (re.compile(r"\.(?:B|s)$"), "Marlin"),
)
#: llm-compressor modifiers whose weights are not the trained ones rounded to nearest.
NOT_RTN = (
    "GPTQModifier",
    "AWQModifier",
    "SmoothQuantModifier",
    "SpinQuantModifier",
    "QuIPModifier",
    "SparseGPTModifier",
)
#: Observers that take the scale from the plain min/max (no clipping search).
MINMAX_OBSERVERS = (None, "minmax", "memoryless_minmax", "static_minmax", "memoryless")
#: The ``quant_method`` values of the families decoded here.
METHODS = ("gptq", "awq", "compressed-tensors", "compressed_tensors", "bitsandbytes")
#: compressed-tensors formats read here (``dense``: plain float weights).
CT_FORMATS = {
    "pack-quantized",
    "naive-quantized",
    "int-quantized",
    "float-quantized",
    "dense",
    "mixed-precision",
}
#: Largest recipe.yaml read.
MAX_RECIPE = 1 << 20

Getter = Callable[[str], Any]


def quantization_config(config: Optional[Mapping]) -> Optional[dict]:
    """``config["quantization_config"]`` (or ``compression_config``) when it is an object."""
    if not isinstance(config, Mapping):
        return None
    found = config.get("quantization_config", config.get("compression_config"))
    return found if isinstance(found, dict) else None


def _refuse_retiled(qconfig: Optional[dict], names: Set[str]) -> None:
    if qconfig:
        said = {
            str(qconfig.get(k) or "").lower() for k in ("checkpoint_format", "format", "version")
        }
        if qconfig.get("is_marlin_format"):
            said.add("marlin")
        for layout, shown in (("marlin", "Marlin"), ("bitblas", "BitBLAS")):
            if any(layout in value for value in said):
                raise AnalyzeError(
                    f"the {shown} layout is re-tiled for its GPU kernel and "
                    "cannot be read as a matrix (convert the checkpoint back to "
                    "plain GPTQ/AWQ)"
                )
    for pattern, layout in RETILED:
        hits = [n for n in names if pattern.search(n)]
        if layout == "Marlin":
            hits = [n for n in hits if n.endswith(".B") and n[:-2] + ".s" in names]
        if hits:
            raise AnalyzeError(
                f"{escape(hits[0])}: the {layout} layout is re-tiled for its GPU "
                "kernel and cannot be read as a matrix"
            )


def _rtn_reason(weights: Mapping, recipe: Optional[str], has_g_idx: bool) -> Optional[str]:
    """None where the compressed-tensors weights were rounded to nearest from min/max scales,
    else why not (what the record's null bound says)."""
    if has_g_idx:
        return "activation-ordered groups come from GPTQ (error feedback): no per-element bound"
    if weights.get("observer") not in MINMAX_OBSERVERS:
        return (
            f"observer {escape(weights.get('observer'))} searches a clipping range: no "
            "per-element bound"
        )
    if recipe is None:
        return (
            "no recipe.yaml says the weights were rounded to nearest (llm-compressor's "
            "GPTQModifier writes the same layout): no per-element bound"
        )
    found = [m for m in NOT_RTN if m in recipe]
    if found:
        return f"recipe.yaml applies {found[0]}: the stored matrix is not the trained one rounded"
    if "QuantizationModifier" not in recipe:
        return "recipe.yaml names no QuantizationModifier: no per-element bound"
    return None


def _ct_weights_args(qconfig: Optional[dict], layer: str) -> dict:
    """The ``weights`` quantization args of the config group whose targets match ``layer``."""
    groups = (qconfig or {}).get("config_groups")
    if not isinstance(groups, dict):
        return {}
    candidates = [g for g in groups.values() if isinstance(g, dict)]
    for group in candidates:
        targets = group.get("targets") or []
        for target in targets if isinstance(targets, list) else []:
            if isinstance(target, str) and target.startswith("re:") and _matches(target, layer):
                return group.get("weights") or {}
    linear = [g for g in candidates if "Linear" in (g.get("targets") or [])]
    chosen = linear[0] if len(linear) == 1 else (candidates[0] if len(candidates) == 1 else {})
    weights = chosen.get("weights") if isinstance(chosen, dict) else None
    return weights if isinstance(weights, dict) else {}


def _matches(target: str, layer: str) -> bool:
    """Whether a ``re:`` target of a config group matches the layer (a bad pattern: no)."""
    try:
        return re.match(target[3:], layer) is not None
    except re.error:
        return False


def _ct_bits(name: str, declared, packed_shape: Tuple[int, ...], columns: int) -> int:
    """The bit width: the config's, checked against the packed width; else the width's."""
    widths = [
        b
        for b in range(1, 9)
        if packed_shape[-1] in (packed_words(columns, b, True), packed_words(columns, b, False))
    ]
    if declared is not None:
        bits = int_bits(declared, f"{name} num_bits", range(1, 9))
        if bits not in widths:
            raise AnalyzeError(
                f"{escape(name)}: the config says {bits} bits, but "
                f"{packed_shape[-1]} words per row hold {columns} codes of "
                f"{'/'.join(map(str, widths)) or 'no whole'} bits"
            )
        return bits
    if len(widths) != 1:
        raise AnalyzeError(
            f"{escape(name)}: no config, and {packed_shape[-1]} words per row fit "
            f"{columns} codes of {len(widths) or 'no'} bit widths"
        )
    return widths[0]


def _version_dense(qconfig: Optional[dict]) -> Optional[bool]:
    """True from compressed-tensors 0.18 (dense packing), False before, None if not said."""
    version = (qconfig or {}).get("version")
    m = re.match(r"(\d+)\.(\d+)", str(version)) if version else None
    return None if m is None else (int(m.group(1)), int(m.group(2))) >= (0, 18)


class PackedLayers:
    """The packed layers of one checkpoint: ``matrices`` (layer name -> QuantizedMatrix),
    ``stored`` (layer name -> the stored tensor that holds its codes), ``metadata`` (names of
    the side tensors) and ``method`` (the family)."""

    def __init__(
        self,
        infos: Sequence[TensorInfo],
        get: Getter,
        config: Optional[Mapping],
        recipe: Optional[str] = None,
    ):
        self._info = {t.name: t for t in infos}
        self._get = get
        self.qconfig = quantization_config(config)
        names = set(self._info)
        _refuse_retiled(self.qconfig, names)
        self.method = str((self.qconfig or {}).get("quant_method") or "").lower() or None
        self.recipe = recipe
        self.matrices: Dict[str, QuantizedMatrix] = {}
        self.stored: Dict[str, str] = {}
        self.metadata: Set[str] = set()
        for name in sorted(names):
            if name.endswith(".qweight"):
                self._qweight(name[: -len(".qweight")])
            elif name.endswith(".weight_packed"):
                self._ct(name[: -len(".weight_packed")], packed=True)
            elif name.endswith(".weight") and f"{name}.absmax" in names:
                self._four_bit(name)
            elif name.endswith(".weight") and name[: -len("weight")] + "SCB" in names:
                self._int8(name)
            elif (
                name.endswith(".weight")
                and f"{name}_scale" in names
                and self._info[name].dtype in ("int8", "float8_e4m3fn")
            ):
                self._ct(name[: -len(".weight")], packed=False)

    # -- helpers
    def _opt(self, name: str):
        return self._get(name) if name in self._info else None

    def _need(self, name: str):
        if name not in self._info:
            raise AnalyzeError(f"the checkpoint lacks {escape(name)}, which its packed layer needs")
        return self._get(name)

    def _add(self, layer: str, stored: str, matrix: QuantizedMatrix, side: Sequence[str]) -> None:
        self.matrices[layer], self.stored[layer] = matrix, stored
        self.metadata.update(s for s in side if s in self._info)

    # -- families
    def _qweight(self, prefix: str) -> None:
        qweight, scales = self._need(f"{prefix}.qweight"), self._need(f"{prefix}.scales")
        qzeros = self._need(f"{prefix}.qzeros")
        q = self.qconfig or {}
        method = self.method if self.method in ("gptq", "awq") else None
        if method is None:  # the tensors decide: GPTQ packs the input axis, AWQ GEMM the output
            method = (
                "awq"
                if (
                    scales.shape[-1] == 8 * qweight.shape[-1]
                    and f"{prefix}.g_idx" not in self._info
                )
                else "gptq"
            )
        side = [prefix + s for s in GPTQ_SIDE]
        matrix: QuantizedMatrix
        if method == "awq":
            gemm = scales.shape[-1] == 8 * qweight.shape[-1]
            gemv = scales.shape[0] == qweight.shape[0]
            layout = (
                "gemm"
                if gemm and not gemv
                else "gemv"
                if gemv and not gemm
                else str(q.get("version") or "gemm").lower()
            )  # the data decide where they can
            version = "gemv" if layout == "gemv" else "gemm"  # exllama loads GEMM checkpoints
            bits = int_bits(q.get("bits", q.get("w_bit", 4)), f"{prefix} AWQ bits", (4,))
            size = config_int(q.get("group_size", q.get("q_group_size")), f"{prefix} group_size")
            matrix = AWQMatrix(prefix, qweight, qzeros, scales, bits, size, version)
        else:
            out = qweight.shape[-1]
            if len(qzeros.shape) != 2 or not out or (qzeros.shape[1] * 32) % out:
                raise AnalyzeError(
                    f"{escape(prefix)}.qzeros has shape {tuple(qzeros.shape)} "
                    f"for {out} output features"
                )
            data_bits = qzeros.shape[1] * 32 // out
            declared = q.get("bits")
            if declared is not None and declared != data_bits:
                raise AnalyzeError(
                    f"{escape(prefix)}: the config says {escape(declared)} bits, "
                    f"but {prefix}.qzeros holds {data_bits}-bit zero points"
                )
            g_idx = self._opt(f"{prefix}.g_idx")
            label = q.get("checkpoint_format") or q.get("format")
            matrix = GPTQMatrix(
                prefix,
                qweight,
                qzeros,
                scales,
                None if g_idx is None else np.asarray(g_idx),
                data_bits,
                config_int(q.get("group_size"), f"{prefix} group_size"),
                label,
                q.get("sym"),
            )
        self._add(f"{prefix}.weight", f"{prefix}.qweight", matrix, side)

    def _ct(self, prefix: str, packed: bool) -> None:
        weights = _ct_weights_args(self.qconfig, prefix)
        scale_name = f"{prefix}.weight_scale"
        scale = self._need(scale_name)
        u = unit_roundoff(self._info[scale_name].dtype, scale_name)
        zero = self._opt(f"{prefix}.weight_zero_point")
        g_idx = self._opt(f"{prefix}.weight_g_idx")
        dense = _version_dense(self.qconfig)
        fp8 = False
        if packed:
            stored = f"{prefix}.weight_packed"
            words_array = self._need(stored)
            shape_values = np.asarray(self._need(f"{prefix}.weight_shape")).reshape(-1)
            if shape_values.size != 2 or np.any(shape_values <= 0) or np.any(shape_values > 2**31):
                raise AnalyzeError(
                    f"{escape(prefix)}.weight_shape {shape_values.tolist()} is not a matrix shape"
                )
            shape = (int(shape_values[0]), int(shape_values[1]))
            bits = _ct_bits(stored, weights.get("num_bits"), tuple(words_array.shape), shape[1])
            codes = packed_reader(stored, words_array, shape, bits, dense)
            if (
                zero is not None
                and len(scale.shape) == 2
                and scale.shape[1:] == zero.shape[1:]
                and zero.shape[0] != shape[0]
            ):
                zero = packed_zero_points(
                    f"{prefix}.weight_zero_point", zero, shape[0], scale.shape[1], bits, dense
                )
        else:
            stored = f"{prefix}.weight"
            weight = self._need(stored)
            if len(weight.shape) != 2:
                raise AnalyzeError(f"{escape(stored)} is not a matrix")
            shape = (int(weight.shape[0]), int(weight.shape[1]))
            bits = int_bits(weights.get("num_bits", 8), f"{stored} num_bits", range(2, 9))
            fp8 = self._info[stored].dtype == "float8_e4m3fn"
            codes = fp8_reader(stored, weight) if fp8 else naive_reader(stored, weight, bits)
        if zero is not None and not np.any(np.asarray(zero)):
            zero = None  # a symmetric scheme may store its zeros
        reason = _rtn_reason(weights, self.recipe, g_idx is not None)
        size = config_int(weights.get("group_size"), f"{prefix} group_size")
        matrix = CTMatrix(
            prefix,
            shape,
            codes,
            scale,
            zero,
            g_idx,
            size,
            bits,
            None if reason else u,
            reason,
            fp8=not packed and fp8,
        )
        self._add(f"{prefix}.weight", stored, matrix, [prefix + s for s in CT_SIDE])

    def _four_bit(self, name: str) -> None:
        states = [n for n in self._info if n.startswith(f"{name}.quant_state.")]
        if len(states) != 1 or not BNB_STATE.search(states[0]):
            raise AnalyzeError(
                f"{escape(name)}: expected one quant_state.bitsandbytes__nf4/fp4 "
                f"tensor, found {len(states)}"
            )
        state = read_state(states[0], self._get(states[0]))
        nested = self._opt(f"{name}.nested_absmax")
        matrix = FourBitMatrix(
            name,
            self._get(name),
            self._get(f"{name}.absmax"),
            self._need(f"{name}.quant_map"),
            state,
            nested,
            None if nested is None else self._need(f"{name}.nested_quant_map"),
        )
        prefix = name[: -len(".weight")]
        self._add(name, name, matrix, [prefix + s for s in BNB_SIDE] + states)

    def _int8(self, name: str) -> None:
        prefix = name[: -len(".weight")]
        matrix = Int8RowMatrix(name, self._get(name), self._get(f"{prefix}.SCB"))
        self._add(name, name, matrix, [prefix + s for s in BNB_SIDE])


class PackedSource:
    """A weight source whose packed layers read as the matrices they encode: :meth:`tensors`
    lists each packed layer once, under its own name (``stored_name`` the tensor holding its
    codes, ``quantized`` True), with ``dtype`` its scheme and shape out x in (``metadata`` names
    the side tensors, ``metadata_bytes`` their size); :meth:`load` and :meth:`quantized` give a
    layer's :class:`QuantizedMatrix`; other tensors pass through.

    Side tensors stay in the listing with ``module_type``
    :data:`~allennlp_analyze.kinds.QUANT_METADATA`: the selection counts them as quantization
    metadata, never as matrices."""

    #: Where this source is one shard of a packed checkpoint: the whole's listing (the kinds
    #: are decided on it, as for a plain shard).
    context: Optional[Sequence[TensorInfo]] = None

    def __init__(
        self,
        inner,
        config: Optional[Mapping],
        recipe: Optional[str] = None,
        layers: Optional["PackedLayers"] = None,
        own: Optional[Set[str]] = None,
    ):
        self._inner = inner
        self._config, self._recipe = config, recipe
        self.label = inner.label
        infos = inner.tensors()
        self._layers = layers or PackedLayers(infos, inner.load_mapped, config, recipe)
        if own is not None:  # one shard's part (:meth:`part`): its stored tensors only
            infos = [t for t in infos if t.name in own]
        self.metadata = frozenset(n for n in self._layers.metadata if own is None or n in own)
        self.metadata_bytes = sum(
            int(np.prod(t.shape)) * _itemsize(t.dtype) for t in infos if t.name in self.metadata
        )
        by_stored = {s: layer for layer, s in self._layers.stored.items()}
        self._own_layers = {by_stored[t.name] for t in infos if t.name in by_stored}
        listing = []
        for info in infos:
            if info.name in by_stored:
                layer = by_stored[info.name]
                matrix = self._layers.matrices[layer]
                listing.append(
                    TensorInfo(
                        layer,
                        tuple(matrix.shape),
                        matrix.scheme,
                        "Linear",
                        quantized=True,
                        stored_name=info.name if info.name != layer else None,
                    )
                )
            elif info.name in self.metadata:
                listing.append(replace(info, module_type=QUANT_METADATA))
            elif info.name not in self._layers.matrices:
                listing.append(info)
        self._listing = listing

    method = property(lambda self: self._layers.method)

    def part(self, own: Set[str], label: str) -> "PackedSource":
        """The part of this (whole) checkpoint stored in one shard: the tensors named ``own``
        (stored names), labelled ``label``, with this checkpoint's listing as its ``context``."""
        part = PackedSource(self._inner, self._config, self._recipe, self._layers, own)
        part.label, part.context = label, self.tensors()
        return part

    @property
    def note(self) -> str:
        """The run's note on this source: the family, the schemes of its packed layers, and the
        side tensors counted as quantization metadata."""
        schemes: Dict[str, int] = {}
        for layer in self._own_layers:
            scheme = self._layers.matrices[layer].scheme
            schemes[scheme] = schemes.get(scheme, 0) + 1
        listed = ", ".join(f"{n} {s}" for s, n in sorted(schemes.items()))
        return (
            f"quantization {self.method or 'detected from the tensors'}: "
            f"{len(self._own_layers)} packed layers"
            + (f" ({listed}); " if listed else "; ")
            + f"{len(self.metadata)} side tensors ({format_bytes(self.metadata_bytes)}) of "
            "quantization metadata"
        )

    def tensors(self) -> Sequence[TensorInfo]:
        return list(self._listing)

    def quantized(self, name: str) -> Optional[QuantizedMatrix]:
        return self._layers.matrices.get(name)

    def load(self, name: str):
        """A packed layer as its :class:`QuantizedMatrix` (decoded row block by row block when
        read); any other tensor as the inner source gives it."""
        matrix = self._layers.matrices.get(name)
        return self._inner.load(name) if matrix is None else matrix

    def load_mapped(self, name: str):
        matrix = self._layers.matrices.get(name)
        return self._inner.load_mapped(name) if matrix is None else matrix

    def __repr__(self) -> str:
        return f"<PackedSource {self.label!r} ({self.method or 'detected from tensors'})>"


def _itemsize(dtype: str) -> int:
    """Bytes per element of a TensorInfo dtype name (numpy's, bfloat16, float8_*)."""
    if dtype == "bfloat16" or dtype.startswith("float8"):
        return 2 if dtype == "bfloat16" else 1
    return np.dtype(dtype).itemsize


def read_recipe(folder: Path) -> Optional[str]:
    """``recipe.yaml`` next to the weights (llm-compressor writes it), as text, or None."""
    path = folder / "recipe.yaml"
    try:
        return limits.read_regular(path, MAX_RECIPE).decode("utf-8", "replace")
    except (OSError, AnalyzeError):
        return None


def has_packed_layers(infos: Sequence[TensorInfo]) -> bool:
    """Whether a tensor listing holds any packed layer (cheap: names only)."""
    names = {t.name for t in infos}
    return any(
        n.endswith((".qweight", ".weight_packed", ".SCB"))
        or f"{n}.absmax" in names
        or (n.endswith(".weight") and f"{n}_scale" in names)
        for n in names
    )


def packed_opener(cls):
    """A registry opener of a safetensors kind (``cls(path, label)``) that reads packed layers
    as matrices (:func:`open_packed`, with the ``config.json`` beside the file). One shard of a
    packed checkpoint (a file that a ``*.safetensors.index.json`` beside it names) is read as
    its part of the whole: the layers whose codes it holds, their side tensors taken from
    whichever shard holds them, and its side tensors of other shards' layers counted as
    metadata. Every shard gets the whole's listing as its ``context`` (its kinds are decided on
    the whole checkpoint)."""

    def opener(path, label, checkpoint_key):
        source = cls(path, label)
        folder = Path(path).parent
        whole = sharded_whole(Path(path)) if isinstance(source, SafetensorsSource) else None
        if whole is None:
            return open_packed(source, folder)
        source.context = whole.tensors()  # one shard of a checkpoint: kinds of the whole
        packed = open_packed(whole, folder)
        if not isinstance(packed, PackedSource):
            return source  # the whole holds no packed layer, nor does its config: neither does this
        index = whole.index_path
        own = {t.name for t in source.tensors()}
        placed = {n for n, shard in read_index(index).items() if shard == Path(path).name}
        if own != placed:  # the part would be read from elsewhere, or lose tensors
            name = sorted(own ^ placed)[0]
            where = "holds" if name in own else "lacks"
            raise AnalyzeError(
                f"{escape(path)} {where} {escape(name)!s}, which {escape(index)!s} places "
                + ("elsewhere" if name in own else "there")
            )
        return packed.part(own, source.label)

    return opener


def open_packed(source, folder: Path):
    """``source`` (a safetensors source of ``folder``) as a :class:`PackedSource` when its config
    declares a quantization or its tensors hold packed layers, else ``source`` itself. A
    quantization method we do not decode is refused in one line (its tensors are not the
    matrices they encode)."""
    config = load_config(folder / "config.json")
    qconfig = quantization_config(config)
    if qconfig is None and not has_packed_layers(source.tensors()):
        return source
    method = str((qconfig or {}).get("quant_method") or "").lower()
    groups = (qconfig or {}).get("config_groups")
    formats = {str((qconfig or {}).get("format") or "pack-quantized")} | (
        {str(g.get("format")) for g in groups.values() if isinstance(g, dict) and g.get("format")}
        if isinstance(groups, dict)
        else set()
    )
    if method.startswith("compressed") and not formats <= CT_FORMATS:
        raise AnalyzeError(
            f"{escape(folder / 'config.json')}: compressed-tensors format "
            f"{escape(sorted(formats - CT_FORMATS)[0])} is not supported "
            f"({', '.join(sorted(CT_FORMATS))} are)"
        )
    if method and method not in METHODS:
        raise AnalyzeError(
            f"{escape(folder / 'config.json')}: quantization method "
            f"{escape(method)!s} is not supported (gptq, awq, compressed-tensors "
            "and bitsandbytes are)"
        )
    return PackedSource(source, config, read_recipe(folder))
