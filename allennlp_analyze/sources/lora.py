"""PEFT LoRA adapters: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
(or ``adapter_model.bin``, read by the inert unpickler).

Each adapted module holds ``lora_A`` (r x in) and ``lora_B`` (out x r); its change is
ΔW = s · B · A with s = lora_alpha / r (lora_alpha / √r with ``use_rslora``), r and lora_alpha
taken per module from ``rank_pattern`` / ``alpha_pattern`` as PEFT 0.13 takes them (the first
pattern key ``k``, rank keys before alpha keys, for which ``re.match(rf".*\\.{k}$", module)``).
ΔW is stored as the base stores the weight: transposed with ``fan_in_fan_out`` (GPT-2's Conv1D,
in x out) and for embeddings (``lora_embedding_A`` / ``_B``: ΔW = s (B A)ᵀ, vocabulary x dim).
DoRA (``lora_magnitude_vector`` m, per output unit) changes the merged weight to
m · (W + ΔW) / ‖W + ΔW‖ with the norm of each output unit's row (PEFT's ``get_weight_norm``):
it needs the base. ``modules_to_save`` (full copies of a module's weights) are ordinary tensors
of this source, named as in the base model.

The analysis of ΔW (:func:`adapter_records`) never forms the N x M matrix: with thin QR
factors B = Q_B R_B and Aᵀ = Q_A R_A, B A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so its nonzero singular values
are those of the r x r matrix R_B R_Aᵀ (times |s|), in O((N + M) r²) (LAPACK's QR and SVD, in
float64 from the stored values: backward stable, values to about r·eps64 of sv_max). Its record
(module_type "LoRA", named ``lora:<weight name>``) holds those r values: ``sv_max``, ``sv_min``
(the smallest of the r: ΔW's other M - r singular values are exactly 0), ``stable_rank``,
``effective_rank``, ``lora_r``, ``lora_scale``, and ``lora_used_rank``: the values above
round-off, ``sv_max · max(N, M) · eps`` of the adapter's storage dtype (numpy's matrix_rank
tolerance for a matrix stored so); the power-law fit of their squares where there are enough
(else status ``too_few_eigenvalues``; an all-zero B, PEFT's initialisation: ``all_zero``).
Ranks by the analysis's criteria are left out (None; ``rank_note`` says why).

With ``--base`` the adapter is merged into the base (:class:`MergedSource`): each adapted
weight W_base + ΔW (DoRA applied) is analyzed in full and compared with the base.
"""

import math
import re
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import limits
from ..errors import AnalyzeError
from ..tensors import DTYPE_EPS, TensorInfo, WeightSource

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
#: Prefix PEFT gives every saved key (its wrapper of the base model).
PEFT_PREFIX = "base_model.model."
#: Prefix of the adapter records' names.
RECORD_PREFIX = "lora:"
_PARTS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
}


def is_adapter_folder(path: Path) -> bool:
    """A folder holding ``adapter_config.json`` and an adapter weight file."""
    return (path / CONFIG_NAME).is_file() and any((path / n).is_file() for n in WEIGHT_NAMES)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: the ``name`` of the weight it changes (as the base names it),
    its tensors' keys in the adapter file (``a``, ``b``, DoRA's ``magnitude``), rank ``r`` and
    scale ``scale`` (ΔW = scale · B · A), whether ΔW is stored transposed (``transposed``:
    fan_in_fan_out or an embedding), its stored ``shape`` and the adapter's ``dtype``."""

    name: str
    a: str
    b: str
    magnitude: Optional[str]
    r: int
    scale: float
    transposed: bool
    shape: Tuple[int, int]
    dtype: str


def _config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    config = limits.parse_json(limits.read_regular(path, 1 << 20))
    if not isinstance(config, dict):
        raise AnalyzeError(f"{path} is not a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise AnalyzeError(f"{path}: peft_type {kind!r} is not LoRA (only LoRA adapters are read)")
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise AnalyzeError(f"{path}: r must be a positive integer (got {r!r})")
    if not (
        isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)
    ):
        raise AnalyzeError(f"{path}: lora_alpha must be a finite number (got {alpha!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AnalyzeError(f"{path}: {key} must be an object")
        config[key] = pattern
    for module, value in config["rank_pattern"].items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise AnalyzeError(f"{path}: rank_pattern[{module!r}] must be a positive integer")
    return config


def rank_and_alpha(config: dict, module: str) -> Tuple[int, float]:
    """r and lora_alpha of ``module`` (its name in the base model) as PEFT 0.13 picks them."""
    keys = chain(config["rank_pattern"], config["alpha_pattern"])
    key = next((k for k in keys if re.match(rf".*\.{k}$", module)), module)
    return (
        config["rank_pattern"].get(key, config["r"]),
        config["alpha_pattern"].get(key, config.get("lora_alpha", config["r"])),
    )


def _open_weights(folder: Path) -> WeightSource:
    from .safetensors_file import SafetensorsSource
    from .torch_file import TorchFileSource

    for name, cls in zip(WEIGHT_NAMES, (SafetensorsSource, TorchFileSource)):
        if (folder / name).is_file():
            return cls(folder / name)
    raise AnalyzeError(f"{folder} holds no {' or '.join(WEIGHT_NAMES)}")


class LoraAdapter:
    """A PEFT LoRA adapter folder (module docstring): ``modules`` adapted, ``config`` as read;
    as a :class:`~allennlp_analyze.tensors.WeightSource` its tensors are the full copies of
    ``modules_to_save``."""

    def __init__(self, folder, label: Optional[str] = None):
        self.folder = Path(folder)
        self.label = label or self.folder.resolve().name
        self.config = _config(self.folder)
        self._weights = _open_weights(self.folder)
        infos = {t.name: t for t in self._weights.tensors()}
        parts: Dict[str, Dict[str, str]] = {}
        self._plain: Dict[str, TensorInfo] = {}
        self._keys: Dict[str, str] = {}
        for key, info in infos.items():
            stripped = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
            found = next(
                ((stripped[: -len(s)], p) for s, p in _PARTS.items() if stripped.endswith(s)), None
            )
            if found is not None:
                parts.setdefault(found[0], {})[found[1]] = key
            elif ".lora_" not in stripped:  # lora_B.bias and the like are not weights
                self._plain[stripped] = TensorInfo(
                    stripped, info.shape, info.dtype, info.module_type
                )
                self._keys[stripped] = key
        self.modules = [self._module(m, p, infos) for m, p in sorted(parts.items())]
        self.dora = any(m.magnitude for m in self.modules)

    def _module(
        self, module: str, parts: Dict[str, str], infos: Dict[str, TensorInfo]
    ) -> LoraModule:
        where = self.folder / CONFIG_NAME
        if "A" not in parts or "B" not in parts:
            raise AnalyzeError(
                f"{self.folder}: module {module} lacks its "
                f"lora_{'A' if 'A' not in parts else 'B'} tensor"
            )
        a, b = infos[parts["A"]], infos[parts["B"]]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise AnalyzeError(
                f"{self.folder}: {module}: lora_A / lora_B are not matrices ({a.shape}, {b.shape})"
            )
        r, alpha = rank_and_alpha(self.config, module)
        if a.shape[0] != r or b.shape[1] != r:
            raise AnalyzeError(
                f"{where} gives {module} rank r = {r}, but its lora_A is "
                f"{a.shape[0]} x {a.shape[1]} and its lora_B {b.shape[0]} x "
                f"{b.shape[1]}"
            )
        if a.dtype not in DTYPE_EPS or b.dtype not in DTYPE_EPS:
            raise AnalyzeError(f"{self.folder}: {module}: lora tensors of dtype {a.dtype}")
        embedding = parts["A"].endswith("lora_embedding_A")
        transposed = embedding or bool(self.config.get("fan_in_fan_out", False))
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora", False) else alpha / r
        shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        m = parts.get("m")
        if m is not None and infos[m].shape != (shape[1] if transposed else shape[0],):
            raise AnalyzeError(
                f"{self.folder}: {module}: lora_magnitude_vector of shape "
                f"{infos[m].shape} for a {shape[0]} x {shape[1]} weight"
            )
        dtype = a.dtype if DTYPE_EPS[a.dtype] >= DTYPE_EPS[b.dtype] else b.dtype
        return LoraModule(
            module if embedding else f"{module}.weight",
            parts["A"],
            parts["B"],
            m,
            r,
            scale,
            transposed,
            shape,
            dtype,
        )

    # -- WeightSource: the modules_to_save copies ------------------------------------------
    def tensors(self) -> Sequence[TensorInfo]:
        return list(self._plain.values())

    def load(self, name: str) -> np.ndarray:
        if name not in self._keys:
            raise AnalyzeError(f"{self.folder} has no tensor named {name!r}")
        return self._weights.load(self._keys[name])

    # -- the adapted modules ---------------------------------------------------------------
    def factors(self, m: LoraModule) -> Tuple[np.ndarray, np.ndarray]:
        """(B, A) of ``m`` in float64, as stored (out x r, r x in)."""
        return (
            np.asarray(self._weights.load(m.b), dtype=np.float64),
            np.asarray(self._weights.load(m.a), dtype=np.float64),
        )

    def delta(self, m: LoraModule) -> np.ndarray:
        """ΔW = s · B · A of ``m`` as the base stores the weight (float64, dense)."""
        B, A = self.factors(m)
        D = m.scale * (B @ A)
        return D.T if m.transposed else D

    def magnitude(self, m: LoraModule) -> Optional[np.ndarray]:
        """DoRA's magnitude vector of ``m`` (float64), or None."""
        if m.magnitude is None:
            return None
        return np.asarray(self._weights.load(m.magnitude), dtype=np.float64).reshape(-1)

    def merged(self, m: LoraModule, W: np.ndarray) -> np.ndarray:
        """The base weight ``W`` (as stored) with ``m`` merged in, as PEFT's
        ``merge_and_unload`` does (DoRA: each output unit's row rescaled to its magnitude)."""
        V = np.asarray(W, dtype=np.float64) + self.delta(m)
        mag = self.magnitude(m)
        if mag is None:
            return V
        rows = V.T if m.transposed else V  # out x in
        scaled = rows * (mag / np.linalg.norm(rows, axis=1))[:, None]
        return scaled.T if m.transposed else scaled

    def __repr__(self) -> str:
        return f"<LoraAdapter {self.label!r}>"


def lora_singular_values(B: np.ndarray, A: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The r singular values (descending) of ``scale · B · A`` (B: N x r, A: r x M) from thin
    QR factors of B and Aᵀ and the SVD of the r x r product: O((N + M) r²), B A never formed."""
    _, rb = np.linalg.qr(np.asarray(B, dtype=np.float64))
    _, ra = np.linalg.qr(np.asarray(A, dtype=np.float64).T)
    return abs(scale) * np.linalg.svd(rb @ ra.T, compute_uv=False)


class MergedSource:
    """A base model with a LoRA adapter merged in: the base's tensors, the adapted weights
    read as W_base + ΔW (DoRA applied), ``modules_to_save`` as the adapter stores them. Every
    adapted module must name a base weight of its shape (a lying adapter is an
    :class:`AnalyzeError`)."""

    def __init__(self, base: WeightSource, adapter: LoraAdapter):
        self.base, self.adapter = base, adapter
        self.label = adapter.label
        self.note = f"the LoRA adapter merged into {base.label}"
        infos = {t.name: t for t in base.tensors()}
        self._modules: Dict[str, LoraModule] = {}
        for m in adapter.modules:
            info = infos.get(m.name) or infos.get(_suffix_match(m.name, infos) or "")
            if info is None:
                raise AnalyzeError(
                    f"{adapter.folder}: adapted module {m.name} is not in the "
                    f"base model {base.label}"
                )
            if tuple(info.shape) != m.shape:
                raise AnalyzeError(
                    f"{adapter.folder}: {m.name} changes a {m.shape[0]} x "
                    f"{m.shape[1]} weight, but the base's {info.name} is "
                    f"{' x '.join(map(str, info.shape))}"
                )
            self._modules[info.name] = m
        self._saved = {t.name: t for t in adapter.tensors()}
        for name, t in self._saved.items():
            if name in infos and tuple(infos[name].shape) != tuple(t.shape):
                raise AnalyzeError(
                    f"{adapter.folder}: modules_to_save {name} has shape "
                    f"{t.shape}, the base's {infos[name].shape}"
                )
        self._infos = [self._saved.get(t.name, t) for t in base.tensors()]
        self.config = getattr(base, "config", None)
        self.context = getattr(base, "context", None)

    def tensors(self) -> Sequence[TensorInfo]:
        return list(self._infos)

    def load(self, name: str) -> np.ndarray:
        if name in self._saved:
            return self.adapter.load(name)
        m = self._modules.get(name)
        if m is None:
            return self.base.load(name)
        return self.adapter.merged(m, self.base.load(name))


def _suffix_match(name: str, infos: Dict[str, TensorInfo]) -> Optional[str]:
    """The one base name that ends in ``.<name>`` or of which ``name`` ends in ``.<base>``."""
    found = [n for n in infos if n.endswith("." + name) or name.endswith("." + n)]
    return found[0] if len(found) == 1 else None


def adapter_records(adapter: LoraAdapter, options) -> Tuple[list, List[np.ndarray]]:
    """One record per adapted module (module docstring) and its r singular values."""
    from ..powerlaw_fit import fit_power_law
    from ..records import MatrixRecord
    from ..spectral_metrics import effective_rank

    records, spectra = [], []
    for m in adapter.modules:
        B, A = adapter.factors(m)
        sv = lora_singular_values(B, A, m.scale)
        N, M = max(m.shape), min(m.shape)
        rec = MatrixRecord(
            model=adapter.label,
            name=RECORD_PREFIX + m.name,
            module_type="LoRA",
            shape=m.shape,
            dtype=m.dtype,
            N=N,
            M=M,
            Q=N / M,
            kind="lora",
            kind_from="adapter",
            lora_r=m.r,
            lora_scale=m.scale,
            method="lora-qr",
            rank_note=f"LoRA adapter: Delta W = s B A has rank <= r = {m.r}; "
            "its r singular values only (see lora_used_rank)",
        )
        if not np.all(np.isfinite(sv)):
            rec.status = "nonfinite"
            records.append(rec)
            spectra.append(np.zeros(0))
            continue
        rec.sv_max, rec.sv_min = float(sv[0]), float(sv[-1])
        rec.log10_sv_min = math.log10(sv[-1]) if sv[-1] > 0 else float("-inf")
        tol = sv[0] * N * DTYPE_EPS[m.dtype]
        rec.lora_used_rank = int(np.count_nonzero(sv > tol))
        if sv[0] == 0.0:
            rec.status = "all_zero"
        else:
            lam = sv**2
            rec.stable_rank = float(np.sum(lam / lam[0]))
            rec.effective_rank = effective_rank(sv)
            rec.log_norm, rec.log_spectral_norm = (
                float(np.log10(np.sum(lam))),
                float(np.log10(lam[0])),
            )
            used = lam[sv > tol]
            rec.num_evals = int(used.size)
            fit = fit_power_law(used, xmax=lam[0] if options.fit_xmax == "max" else None)
            if fit is None:
                rec.status = "too_few_eigenvalues"
            else:
                rec.alpha, rec.D, rec.xmin, rec.xmax = fit.alpha, fit.D, fit.xmin, fit.xmax
                rec.num_tail = fit.num_tail
                rec.alpha_weighted = fit.alpha * rec.log_spectral_norm
        records.append(rec)
        spectra.append(sv)
    return records, spectra


def adapter_of(source) -> Optional[LoraAdapter]:
    """The adapter whose records ``source`` contributes: itself or the one merged into it."""
    if isinstance(source, LoraAdapter):
        return source
    if isinstance(source, MergedSource):
        return source.adapter
    return None
