"""A model against its base: which matrices pair up, and what changed in each (ΔW = W - W_base).

Pairing (:func:`pair_records`), on the records' names (those of a fused part or a convolution
position end in their slice; only equal slices pair):

1. identical names whose shapes are equal or transposed;
2. for the rest, the base matrix whose name shares the longest common dotted suffix with the
   model's (at least two components, e.g. ``query.weight``), among those of equal or transposed
   shape: an AllenNLP model that wraps a Hugging Face encoder
   (``_text_field_embedder.token_embedder_tokens.transformer_model.encoder.layer.0...``) meets
   the encoder saved alone (``encoder.layer.0...``). Where several base matrices share that
   longest suffix, or one base matrix is the best for several model matrices, none of them is
   paired: they are listed as ambiguous. Matrices without a partner are listed as unmatched.
   Nothing is paired silently on a weaker rule.

Per pair (:func:`delta_fields`; ``W`` and ``W_base`` read as stored, widened to float64, the
subtraction exact for float32 and narrower operands):

* ``delta_rel`` = ‖ΔW‖_F / ‖W_base‖_F, the latter sqrt(Σ σ²) of the base record's singular
  values (None where W_base is all zero);
* ``delta_sv_max`` = ‖ΔW‖₂, the largest singular value of ΔW from its full spectrum
  (:func:`delta_singular_values`: a Gram eigen-decomposition, or LAPACK's SVD where the Gram
  cannot resolve the values near the noise floor; either way sv_max to about 1e-14 relative,
  no power iteration);
* ``delta_noise_floor``: the storage noise of ΔW, W's ``noise_floor`` + W_base's (each operand's
  rounding E, ‖E₁ - E₂‖₂ <= ‖E₁‖₂ + ‖E₂‖₂), raised to float64's SVD round-off
  ``sv_max(ΔW) * max(N, M) * eps64`` where that is larger; ``delta_rank``: singular values of ΔW
  above it;
* ``delta_stable_rank`` = ‖ΔW‖_F² / ‖ΔW‖₂², ``delta_effective_rank``: Roy & Vetterli's
  (:func:`allennlp_analyze.spectral_metrics.effective_rank`) of ΔW's singular values;
* ``d_sv_max``, ``d_sv_min``, ``d_alpha``: the model's record minus the base's (None where
  either has none);
* ``base_sv_below_delta``: how many of W_base's singular values are below ‖ΔW‖₂: directions of
  the base that a change of this size can no longer resolve (Weyl: each singular value moved
  by at most ‖ΔW‖₂);
* WeightWatcher 0.7's ``distances()`` (``WeightWatcher.matrix_distance``) under its method
  names: ``distance_raw`` and ``distance_euclidean`` are both ``np.linalg.norm(W1 - W2)``, the
  Frobenius norm of the difference ("raw" on the layer's tensor, "euclidean" averaged over its
  extracted matrices: one matrix here, so the same value); ``distance_cka`` is its uncentered
  "CKA", ``‖W1ᵀ W2‖_F / (‖W1ᵀ W1‖_F ‖W2ᵀ W2‖_F)`` with the matrices as stored (out x in),
  exactly as WeightWatcher divides it: by the product of the two norms, not its square root,
  so it is not scale-invariant (it is not Kornblith et al.'s CKA); WeightWatcher adds 1e-6 to
  a denominator below 1e-6, which is kept. ‖WᵀW‖_F = sqrt(Σ σ⁴) is taken from the records'
  spectra; the cross term costs one product of W and W_base (O(N M min(N, M))).

The comparison costs, per pair, the spectrum of ΔW (its Gram, N M², and an M x M eigenvalue
problem) and the cross product of CKA (2 N M²) on top of the two models' own analyses
(``benchmarks/lora_cost.py`` measures the ratio and that floor side by side).
"""

import math
from dataclasses import dataclass, field, replace
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
)

import numpy as np

from . import limits
from .records import MatrixRecord
from .spectral_metrics import effective_rank
from .spectrum import singular_values
from .tensors import DTYPE_EPS

#: Fewest dotted name components a suffix match needs ("query.weight"; "weight" alone matches
#: every matrix).
MIN_SUFFIX = 2
#: The record fields that a comparison with a base fills (None without a base).
BASE_FIELDS = (
    "base_name",
    "delta_rel",
    "delta_sv_max",
    "delta_rank",
    "delta_noise_floor",
    "delta_stable_rank",
    "delta_effective_rank",
    "d_sv_max",
    "d_sv_min",
    "d_alpha",
    "base_sv_below_delta",
    "distance_raw",
    "distance_euclidean",
    "distance_cka",
)

#: A matrix as the record describes it (its stored orientation, ``record.shape``), any float dtype.
MatrixLoader = Callable[[MatrixRecord], np.ndarray]


class Matrix(Protocol):
    """What pairing reads of a record (or of a plan's :class:`MatrixKey`)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Tuple[int, ...]: ...

    @property
    def slice(self) -> Optional[str]: ...


class MatrixKey(NamedTuple):
    """A planned matrix's name, shape and slice: pairing from metadata alone (``--describe``)."""

    name: str
    shape: Tuple[int, ...]
    slice: Optional[str]


def record_key(r: Matrix) -> str:
    """What pairing compares: the record's name (that of a fused part or a convolution position
    ends in its slice, ``in_proj_weight[q]``)."""
    return r.name


@dataclass
class Pairing:
    """How two runs' records pair up: ``pairs`` (index in the model's records, index in the
    base's, whether the base matrix is the transpose), the model's ``unmatched`` keys, the
    base's ``unmatched_base`` keys, and ``ambiguous`` model keys with their tied candidates."""

    pairs: List[Tuple[int, int, bool]] = field(default_factory=list)
    unmatched: List[str] = field(default_factory=list)
    unmatched_base: List[str] = field(default_factory=list)
    ambiguous: Dict[str, List[str]] = field(default_factory=dict)

    def part(self, start: int, stop: int) -> "Pairing":
        """The pairs of the model's records ``start:stop`` (a part of a source), their model
        indices counted from ``start``; the lists of names are left out."""
        return Pairing([(i - start, j, t) for i, j, t in self.pairs if start <= i < stop])


def _fits(a: Matrix, b: Matrix) -> Optional[bool]:
    """Whether ``b`` pairs with ``a`` as itself (False) or transposed (True); None if neither."""
    if a.slice != b.slice:
        return None
    if tuple(a.shape) == tuple(b.shape):
        return False
    if tuple(a.shape) == tuple(reversed(b.shape)):
        return True
    return None


def _common_suffix(a: Tuple[str, ...], b: Tuple[str, ...]) -> int:
    """Number of trailing components ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


def pair_records(records: Sequence[Matrix], base: Sequence[Matrix]) -> Pairing:
    """Pair the model's ``records`` with the ``base``'s (module docstring: identical names,
    then the longest common dotted suffix, shapes equal or transposed; ties never paired).
    Records or :class:`MatrixKey` of plans."""
    out = Pairing()
    base_by_key: Dict[str, int] = {record_key(b): j for j, b in enumerate(base)}
    taken: Dict[int, int] = {}
    rest: List[int] = []
    for i, r in enumerate(records):
        j = base_by_key.get(record_key(r))
        t = None if j is None else _fits(r, base[j])
        if j is None or t is None:
            rest.append(i)
        else:
            out.pairs.append((i, j, t))
            taken[j] = i
    free = [j for j in range(len(base)) if j not in taken]
    parts = {j: base[j].name.split(".") for j in free}
    best: Dict[int, Tuple[int, bool]] = {}
    claims: Dict[int, List[int]] = {}
    for i in rest:
        r, mine = records[i], tuple(records[i].name.split("."))
        scored = [
            (_common_suffix(mine, tuple(parts[j])), j, t)
            for j in free
            if (t := _fits(r, base[j])) is not None
        ]
        top = max((s for s, _, _ in scored), default=0)
        tied = [(j, t) for s, j, t in scored if s == top]
        if top < MIN_SUFFIX:
            out.unmatched.append(record_key(r))
        elif len(tied) > 1:
            out.ambiguous[record_key(r)] = [record_key(base[j]) for j, _ in tied]
        else:
            best[i] = tied[0]
            claims.setdefault(tied[0][0], []).append(i)
    for j, claimants in claims.items():
        if len(claimants) == 1:
            out.pairs.append((claimants[0], j, best[claimants[0]][1]))
            taken[j] = claimants[0]
        else:
            for i in claimants:
                out.ambiguous[record_key(records[i])] = [record_key(base[j])]
    out.pairs.sort()
    out.unmatched_base = [record_key(b) for j, b in enumerate(base) if j not in taken]
    return out


def _difference(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def _root_sum(sv: np.ndarray, p: int) -> float:
    """sqrt(Σ σᵖ) of singular values ``sv`` (descending), scaled by σ_max against overflow:
    ‖W‖_F for p = 2, ‖WᵀW‖_F for p = 4."""
    if sv.size == 0 or sv[0] == 0.0:
        return 0.0
    return float(sv[0] ** (p // 2) * math.sqrt(np.sum((sv / sv[0]) ** p)))


#: Rows (or columns) of the two operands widened to float64 at a time by :func:`cross_norm`.
CROSS_BLOCK_ELEMENTS = 2**22


def cross_norm(W1: np.ndarray, W2: np.ndarray) -> float:
    """‖W1ᵀ W2‖_F in float64 for two N x M matrices of any float dtype, widened a block at a
    time (about :data:`CROSS_BLOCK_ELEMENTS` entries of each): for N >= M the M x M product
    summed over row blocks, else ‖W1ᵀW2‖_F² = <W1 W1ᵀ, W2 W2ᵀ>_F with the N x N products
    summed over column blocks: O(N M min(N, M)) either way."""
    N, M = W1.shape
    if N >= M:
        step = max(1, CROSS_BLOCK_ELEMENTS // max(1, M))
        C = np.zeros((M, M))
        for a in range(0, N, step):
            b1 = np.asarray(W1[a : a + step], dtype=np.float64)
            C += b1.T @ np.asarray(W2[a : a + step], dtype=np.float64)
        return float(np.linalg.norm(C))
    step = max(1, CROSS_BLOCK_ELEMENTS // max(1, N))
    G1, G2 = np.zeros((N, N)), np.zeros((N, N))
    for a in range(0, M, step):
        c1 = np.asarray(W1[:, a : a + step], dtype=np.float64)
        c2 = np.asarray(W2[:, a : a + step], dtype=np.float64)
        G1 += c1 @ c1.T
        G2 += c2 @ c2.T
    return math.sqrt(max(0.0, float(np.vdot(G1, G2))))


def ww_cka(cross: float, sv: np.ndarray, sv_base: np.ndarray) -> float:
    """WeightWatcher's ``matrix_distance(W1, W2, "cka")``: ‖W1ᵀW2‖_F / (‖W1ᵀW1‖_F ‖W2ᵀW2‖_F),
    1e-6 added to a denominator below 1e-6 (module docstring); ``cross``: ‖W1ᵀW2‖_F
    (:func:`cross_norm`); ``sv``, ``sv_base``: the two matrices' singular values."""
    norm = _root_sum(sv, 4) * _root_sum(sv_base, 4)
    return cross / (norm + 1e-6 if norm < 1e-6 else norm)


def delta_singular_values(D: np.ndarray, floor: float, method: str = "auto") -> np.ndarray:
    """ΔW's singular values (descending). "auto": the Gram path alone
    (:func:`~allennlp_analyze.spectrum.singular_values` with ``method="gram"``), kept where it
    resolves what the fields need: sv_max (to about (N + M) eps64 relative) and the count above
    ``floor``, i.e. no eigenvalue within the Gram's absolute error dλ = 4 (N + M) eps64 λ_max of
    floor², and floor² > 2 dλ; else LAPACK's SVD. (The rank tolerances of the analysis, whose
    absolute loose bound and eps64 tolerances would send nearly every ΔW to the SVD, play no
    part here.) The small values of a kept Gram spectrum are within sqrt(dλ) of the truth: the
    effective rank takes them as they are. "svd" / "gram": that path."""
    eps64 = DTYPE_EPS["float64"]
    if method != "auto":
        return singular_values(D, eps64, 0.0, method).sv
    sv = singular_values(D, eps64, 0.0, "gram").sv
    if sv.size and sv[0] > 0.0:
        lam, f2 = sv**2, floor**2
        dlam = 4.0 * sum(D.shape) * eps64 * lam[0]
        if f2 <= 2.0 * dlam or bool(np.any(np.abs(lam - f2) <= dlam)):
            return singular_values(D, eps64, 0.0, "svd").sv
    return sv


def delta_fields(
    W: np.ndarray,
    W_base: np.ndarray,
    rec: MatrixRecord,
    base: MatrixRecord,
    sv: np.ndarray,
    sv_base: np.ndarray,
    method: str = "auto",
) -> Tuple[Dict[str, Any], np.ndarray, np.ndarray]:
    """The base fields (:data:`BASE_FIELDS`, module docstring) of one pair, W_base already in
    W's orientation; ``sv`` / ``sv_base``: the two records' singular values (descending). Also
    returns ΔW (float64) and its singular values. ΔW is the one N x M float64 array formed
    (the difference of the operands widened, in one pass); CKA's product reads the operands as
    they are, a block at a time, and ‖W_base‖_F comes from ``sv_base``. A matrix equal to its
    base (a frozen layer) costs one comparison of the two: ΔW and its values are 0 and CKA's
    cross term is ‖WᵀW‖_F = sqrt(Σ σ⁴) from ``sv``, with no product formed."""
    operands = (rec.noise_floor or 0.0) + (base.noise_floor or 0.0)
    if np.array_equal(W, W_base):
        D = np.zeros(np.shape(W))
        fro_d, cross, d_sv = 0.0, _root_sum(sv, 4), np.zeros(min(D.shape))
    else:
        D = np.subtract(W, W_base, dtype=np.float64)
        fro_d, cross = float(np.linalg.norm(D)), cross_norm(W, W_base)
        d_sv = delta_singular_values(D, operands, method)
    fro_b = _root_sum(sv_base, 2)  # ‖W_base‖_F from its spectrum: no pass over it
    cka = ww_cka(cross, sv, sv_base)
    top = float(d_sv[0]) if d_sv.size else 0.0
    floor = max(operands, top * max(D.shape) * DTYPE_EPS["float64"])
    fields = {
        "base_name": base.name,
        "delta_rel": fro_d / fro_b if fro_b > 0 else None,
        "delta_sv_max": top,
        "delta_noise_floor": floor,
        "delta_rank": int(np.count_nonzero(d_sv > floor)),
        "delta_stable_rank": float(np.sum((d_sv / top) ** 2)) if top > 0 else None,
        "delta_effective_rank": effective_rank(d_sv),
        "d_sv_max": _difference(rec.sv_max, base.sv_max),
        "d_sv_min": _difference(rec.sv_min, base.sv_min),
        "d_alpha": _difference(rec.alpha, base.alpha),
        "base_sv_below_delta": int(np.count_nonzero(sv_base < top)) if sv_base.size else None,
        "distance_raw": fro_d,
        "distance_euclidean": fro_d,
        "distance_cka": cka,
    }
    return fields, D, d_sv


#: What ``--delta`` makes of a pair: (ΔW, the model's record with its base fields, the base's
#: record) -> ΔW's own record.
DeltaAnalysis = Callable[[np.ndarray, MatrixRecord, MatrixRecord], MatrixRecord]
#: How the pairs are run: ``map``, or a bounded parallel map with the same signature (results
#: in any order).
PairMap = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]


@dataclass
class Comparison:
    """A model's records with their base fields filled (unpaired ones as they were), the
    pairing, and, when asked for, each pair's ΔW record with ΔW's singular values, by record
    index."""

    records: List[MatrixRecord]
    pairing: Pairing
    deltas: Dict[int, Tuple[MatrixRecord, np.ndarray]] = field(default_factory=dict)


class Side(NamedTuple):
    """One side of a comparison: its records, their singular values (aligned with them) and a
    loader of its matrices (record -> matrix as stored)."""

    records: Sequence[MatrixRecord]
    spectra: Sequence[np.ndarray]
    load: MatrixLoader


def compare_records(
    model: Side,
    base_side: Side,
    method: str = "auto",
    delta: Optional[DeltaAnalysis] = None,
    pair_map: PairMap = map,
    pairing: Optional[Pairing] = None,
) -> Comparison:
    """Pair the ``model``'s records with the ``base_side``'s (:func:`pair_records`) and fill
    each pair's base fields from the two matrices (the loaders called in this thread, pair
    after pair) and the two records' singular values; ``delta``: also analyze each pair's ΔW
    (while it is in memory). ``pair_map`` runs the pairs' arithmetic: with a bounded parallel
    map of ``k`` workers, at most about ``k + 1`` pairs' matrices are in memory at a time (both
    as stored, ΔW in float64). ``pairing``: the pairs to compare where they were decided over
    more records than ``model``'s (a part of a source, :meth:`Pairing.part`)."""
    records, spectra, load = model
    base, base_spectra, load_base = base_side
    if pairing is None:
        pairing = pair_records(records, base)
    todo = [
        (i, j, t)
        for i, j, t in pairing.pairs
        if records[i].sv_max is not None and base[j].sv_max is not None  # else nonfinite
    ]
    if todo:  # before any pair is read
        big = max((records[i] for i, _, _ in todo), key=lambda r: _size(r.shape))
        N, M = max(big.shape), min(big.shape)
        limits.check_memory(
            limits.comparison_memory(N, M), f"comparing {big.name} ({N} x {M}) with its base"
        )

    def loaded() -> Iterator[Tuple[int, int, np.ndarray, np.ndarray]]:
        for i, j, transposed in todo:
            W_base = np.asarray(load_base(base[j]))
            yield i, j, load(records[i]), W_base.T if transposed else W_base

    def one(item: Tuple[int, int, np.ndarray, np.ndarray]):
        i, j, W, W_base = item
        values, D, d_sv = delta_fields(
            W, W_base, records[i], base[j], spectra[i], base_spectra[j], method
        )
        rec = replace(records[i], **values)
        extra = None if delta is None else (delta(D, rec, base[j]), d_sv)
        return i, rec, extra

    out = list(records)
    deltas: Dict[int, Tuple[MatrixRecord, np.ndarray]] = {}
    for i, rec, extra in pair_map(one, loaded()):
        out[i] = rec
        if extra is not None:
            deltas[i] = extra
    return Comparison(out, pairing, deltas)


def _size(shape: Tuple[int, ...]) -> int:
    return math.prod(int(n) for n in shape)


def ranked_by_change(records: Sequence[MatrixRecord]) -> List[Tuple[str, float]]:
    """``(model:name, delta_rel)`` of the compared records, largest change first."""
    moved = [
        (f"{r.model}:{record_key(r)}", r.delta_rel) for r in records if r.delta_rel is not None
    ]
    return sorted(moved, key=lambda kv: -kv[1])
