"""Result records: one :class:`MatrixRecord` per analyzed matrix, and the run's :class:`Summary`.

The dataclass fields of :class:`MatrixRecord` are, in order, the JSON keys and CSV columns.
Units: singular values (``sv_*``) and noise levels (``noise_floor``, ``noise_bound``) in the
weights' own units; eigenvalues (``xmin``, ``xmax``) of X = W^T W in those units squared; logs are
base 10.
"""

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from statistics import mean, median
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .spectrum import relative_tolerances
from .tensors import DTYPE_EPS

#: The rank criteria every record carries (``rank_<criterion>``).
RANK_CRITERIA = ("loose", "numpy", "nr", "noise")
#: Storage dtypes in which numpy's tolerance means what it says (far below nu_max): their default
#: ("auto") criterion is the loose bound, as in the original study, and their round-off level
#: numpy's tolerance; every narrower dtype (float16, bfloat16, float8) is judged by its noise
#: floor (:func:`criterion_for`, :func:`roundoff_criterion`).
WIDE_DTYPES = ("float32", "float64")
#: What ``--rank-criterion`` accepts: a criterion, or "auto" (per dtype, see :func:`criterion_for`).
CRITERION_CHOICES = RANK_CRITERIA + ("auto",)


def criterion_for(criterion: str, dtype: str) -> str:
    """The criterion that ``criterion`` means for a matrix stored as ``dtype``: itself, or for
    "auto" the loose bound for float32 / float64 storage and the noise floor for narrower dtypes
    (whose noise floor can lie above the loose bound, or their numpy tolerance above nu_max)."""
    if criterion != "auto":
        return criterion
    return "loose" if dtype in WIDE_DTYPES else "noise"


def roundoff_criterion(dtype: str) -> str:
    """The criterion whose tolerance separates round-off from signal for a matrix stored as
    ``dtype``, whatever the run's rank criterion: numpy's for float32 / float64 (the original
    analysis: it also covers the round-off of the float32 arithmetic that produced the weights,
    above their storage rounding), the noise floor for narrower dtypes (numpy's is at or above
    nu_max there). The power-law fit, the entropy's rank and the ESD distance's zero bin use it."""
    return "numpy" if dtype in WIDE_DTYPES else "noise"


#: Record status codes: why a matrix has no fit (or no spectrum at all).
STATUS_TEXT = {
    "ok": "analyzed and fitted",
    "too_few_eigenvalues": "fewer than 2 distinct positive eigenvalues above round-off: no fit",
    "no_fit": "the first --fit estimator found no tail to fit (no xmin candidate in its range)",
    "single_row": "1 x N matrix (one singular value): ranks only, no fit",
    "all_zero": "all-zero matrix: rank 0, no fit",
    "nonfinite": "NaN or Inf in the weights: not analyzed",
}


@dataclass
class MatrixRecord:
    """One weight matrix W, oriented N x M (N >= M), Q = N / M.

    ``rank_*``: counts of singular values above each criterion's tolerance (see
    :mod:`allennlp_analyze.spectrum`), ``None`` for numpy / nr where that tolerance is at or above
    sv_max or, for narrow storage, calls values above ``noise_bound`` noise (``rank_note`` says
    which); ``noise_floor`` / ``noise_bound``: estimate and rigorous bound
    of the spectral norm of W's storage rounding (:mod:`allennlp_analyze.noise_floor`);
    ``rank_noise`` counts singular values above ``noise_floor``; ``rank_loss`` = M - rank under
    ``rank_criterion``, the run's criterion as it applies to this matrix's dtype.
    ``alpha, xmin, xmax, D, num_tail``: the power-law fit of the eigenvalues' tail by the
    first estimator of the run's ``fit`` option, named in ``fit`` (default "csn",
    :mod:`allennlp_analyze.powerlaw_fit`); every estimator the run names also fills its own
    columns (``alpha_<estimator>, xmin_<estimator>, D_<estimator>``; ``tpl_*`` for the truncated
    power law: alpha, Lambda (1 / eigenvalue units), xmin, the likelihood ratio R against the
    power law and its p; ``clip_xmax_fingers``; ``detx_num, detx_val``), None where not
    requested (:mod:`allennlp_analyze.fits`, docs/estimators.md). ``warning``: WeightWatcher's
    label of ``alpha``: "over-trained" (< 2), "under-trained" (> 6), with "fingers" added where
    clip-xmax removed eigenvalues, "" otherwise. ``num_evals``: eigenvalues given to the fit (those
    whose singular value is above the round-off level of :func:`roundoff_criterion`: numpy's
    tolerance for float32 / float64 storage, the noise floor for narrower dtypes).
    ``stable_rank`` = sum(lambda) / lambda_max; ``log_norm`` = log10 sum(lambda) (squared
    Frobenius norm); ``log_spectral_norm`` = log10 lambda_max; ``alpha_weighted`` =
    alpha * log10 lambda_max; ``log_alpha_norm`` = log10 sum(lambda^alpha).
    ``mp_sigma2, lambda_plus, num_spikes, mp_softrank``: the Marchenko–Pastur fit of the bulk
    (entry variance, bulk edge, eigenvalues above the edge's Tracy–Widom margin,
    lambda_plus / lambda_max); ``entropy``: WeightWatcher's matrix entropy; ``effective_rank``:
    Roy & Vetterli's; ``rand_*``, ``num_traps`` (with ``randomize``): W with its elements
    permuted: its nu_max, its bulk edge, its eigenvalues above its own bulk's spike threshold
    (correlation traps), and the Jensen–Shannon distance of its ESD from W's
    (:mod:`allennlp_analyze.spectral_metrics`). ``method``: spectral path ("svd", "gram",
    "gram+ritz", "gram>svd", "gram+ritz>svd"; see :mod:`allennlp_analyze.spectrum`).
    ``slice``: spatial position of a convolution slice, or the part of a fused matrix.
    ``kind`` / ``kind_from``: what the tensor is and on what evidence
    (:mod:`allennlp_analyze.kinds`; None for a matrix given directly). ``stored_name``: the
    tensor's name in the file where ``name`` is mapped from it (GGUF), else None.
    Quantized matrices (``dtype`` a scheme such as ``"Q4_K"``): ``noise_floor`` from the
    quantization steps, ``noise_bound`` None where the format guarantees no per-element error
    (``rank_note`` says why), ``rank_numpy`` / ``rank_nr`` None (no machine epsilon).
    Fields are ``None`` where the status rules them out.

    Against a base model (``--base``; None without one, see :mod:`allennlp_analyze.compare`):
    ``base_name`` the paired base matrix; ``delta_rel`` = ||W - W_base||_F / ||W_base||_F;
    ``delta_sv_max`` = ||W - W_base||_2; ``delta_rank`` its singular values above
    ``delta_noise_floor`` (the two operands' noise floors added); ``delta_stable_rank``,
    ``delta_effective_rank`` of W - W_base; ``d_sv_max``, ``d_sv_min``, ``d_alpha``: this record
    minus the base's; ``base_sv_below_delta``: W_base's singular values below ``delta_sv_max``;
    ``distance_raw``, ``distance_euclidean``, ``distance_cka``: WeightWatcher's ``distances()``.
    A LoRA adapter's module (:mod:`allennlp_analyze.sources.lora`): ``lora_r`` its rank r,
    ``lora_scale`` s (Delta W = s B A), ``lora_used_rank`` its singular values above round-off.
    """

    model: str
    name: str
    module_type: Optional[str]
    kind: Optional[str] = field(default=None, kw_only=True)
    kind_from: Optional[str] = field(default=None, kw_only=True)
    shape: Tuple[int, ...]
    dtype: str
    N: int
    M: int
    Q: float
    sv_max: Optional[float] = None
    sv_min: Optional[float] = None
    log10_sv_min: Optional[float] = None
    rank_loose: Optional[int] = None
    rank_numpy: Optional[int] = None
    rank_nr: Optional[int] = None
    rank_noise: Optional[int] = None
    noise_floor: Optional[float] = None
    noise_bound: Optional[float] = None
    rank_loss: Optional[int] = None
    rank_criterion: Optional[str] = None
    rank_note: Optional[str] = None
    alpha: Optional[float] = None
    xmin: Optional[float] = None
    xmax: Optional[float] = None
    D: Optional[float] = None
    num_tail: Optional[int] = None
    num_evals: Optional[int] = None
    stable_rank: Optional[float] = None
    log_norm: Optional[float] = None
    log_spectral_norm: Optional[float] = None
    alpha_weighted: Optional[float] = None
    log_alpha_norm: Optional[float] = None
    fit: Optional[str] = None
    warning: Optional[str] = None
    alpha_csn: Optional[float] = None
    xmin_csn: Optional[float] = None
    D_csn: Optional[float] = None
    alpha_csn_xmax: Optional[float] = None
    xmin_csn_xmax: Optional[float] = None
    D_csn_xmax: Optional[float] = None
    alpha_xmin_peak: Optional[float] = None
    xmin_xmin_peak: Optional[float] = None
    D_xmin_peak: Optional[float] = None
    alpha_clip_xmax: Optional[float] = None
    xmin_clip_xmax: Optional[float] = None
    D_clip_xmax: Optional[float] = None
    clip_xmax_fingers: Optional[int] = None
    tpl_alpha: Optional[float] = None
    tpl_lambda: Optional[float] = None
    tpl_xmin: Optional[float] = None
    tpl_R: Optional[float] = None
    tpl_p: Optional[float] = None
    alpha_hill_mid: Optional[float] = None
    xmin_hill_mid: Optional[float] = None
    D_hill_mid: Optional[float] = None
    alpha_hill_peak: Optional[float] = None
    xmin_hill_peak: Optional[float] = None
    D_hill_peak: Optional[float] = None
    alpha_detx: Optional[float] = None
    xmin_detx: Optional[float] = None
    D_detx: Optional[float] = None
    detx_num: Optional[int] = None
    detx_val: Optional[float] = None
    mp_sigma2: Optional[float] = None
    lambda_plus: Optional[float] = None
    num_spikes: Optional[int] = None
    mp_softrank: Optional[float] = None
    entropy: Optional[float] = None
    effective_rank: Optional[float] = None
    rand_sv_max: Optional[float] = None
    rand_lambda_plus: Optional[float] = None
    num_traps: Optional[int] = None
    rand_distance: Optional[float] = None
    method: Optional[str] = None
    slice: Optional[str] = None
    status: str = "ok"
    stored_name: Optional[str] = None
    base_name: Optional[str] = None
    delta_rel: Optional[float] = None
    delta_sv_max: Optional[float] = None
    delta_rank: Optional[int] = None
    delta_noise_floor: Optional[float] = None
    delta_stable_rank: Optional[float] = None
    delta_effective_rank: Optional[float] = None
    d_sv_max: Optional[float] = None
    d_sv_min: Optional[float] = None
    d_alpha: Optional[float] = None
    base_sv_below_delta: Optional[int] = None
    distance_raw: Optional[float] = None
    distance_euclidean: Optional[float] = None
    distance_cka: Optional[float] = None
    lora_r: Optional[int] = None
    lora_scale: Optional[float] = None
    lora_used_rank: Optional[int] = None

    def rank(self, criterion: str) -> Optional[int]:
        """Rank under ``criterion`` (one of :data:`CRITERION_CHOICES`; "auto" as it applies to
        this record's dtype)."""
        return getattr(self, f"rank_{criterion_for(criterion, self.dtype)}")

    def collapsed(self, criterion: str) -> bool:
        """Whether W lost rank (rank < M) under ``criterion``; False if it has no spectrum or
        the criterion has no rank for it (``rank_note`` says why)."""
        r = self.rank(criterion)
        return r is not None and r < self.M

    def to_dict(self) -> Dict[str, object]:
        """The record as JSON-ready data (tuples as lists; non-finite floats as ``None``)."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MatrixRecord":
        """The record that :meth:`to_dict` wrote: ``shape`` a tuple again, and the non-finite
        values it can hold restored from their nulls (``log10_sv_min`` = -inf where
        ``sv_min`` is 0, ``Q`` = inf where ``M`` is 0)."""
        rec = cls(**d)
        rec.shape = tuple(rec.shape)
        if rec.log10_sv_min is None and rec.sv_min == 0.0:
            rec.log10_sv_min = float("-inf")
        if rec.Q is None and rec.M == 0:
            rec.Q = float("inf")
        return rec


RECORD_FIELDS: Tuple[str, ...] = tuple(f.name for f in fields(MatrixRecord))


@dataclass
class SourceInfo:
    """One source of a run: how it was named (``source``, the path or URL as given; None for
    an in-memory model), its own ``label``, the ``model`` label its records carry (``label``
    made unique within the run with " #2", " #3"...), how many ``records`` it gave, its
    parameters left out, by reason (``skipped``), and its ``note`` (e.g. which part of a
    nested checkpoint was read), if any."""

    source: Optional[str]
    label: str
    model: str
    records: int
    skipped: Dict[str, int]
    note: Optional[str] = None


@dataclass
class BaseSummary:
    """The comparison with a base model (``--base``, :mod:`allennlp_analyze.compare`): the base's
    ``label``, the matrices ``paired``; the model's ``unmatched`` matrices and the base's
    (``unmatched_base``), ``ambiguous`` ones with their tied candidates (never paired), all as
    ``model:name[slice]``; ``moved``: ``(model:name, delta_rel)`` ranked by relative change,
    largest first."""

    label: str
    paired: int
    unmatched: List[str]
    unmatched_base: List[str]
    ambiguous: Dict[str, List[str]]
    moved: List[Tuple[str, float]]


@dataclass
class Summary:
    """What one run found. ``skipped``: parameters left out, by reason; ``collapsed``: matrices
    with rank < M under each criterion (and "auto"); ``rank_undefined``: matrices with a
    spectrum but no rank under a criterion (``rank_note`` says why), never counted as
    collapsed; ``tolerance_ratio``: the largest numpy / nr tolerance as a fraction of sv_max among
    the matrices ranked under it (it flags any matrix of condition number above its inverse);
    ``sv_min`` / ``sv_min_name``: the smallest nu_min and where; ``errors``: sources that could
    not be read (a run with errors is incomplete); ``notes``: what was read of a source where
    that is not all of it (the part of a nested checkpoint, tensors left out); ``base``: the
    comparison with a base model, if any."""

    models: List[str]
    analyzed: int
    skipped: Dict[str, int]
    status: Dict[str, int]
    collapsed: Dict[str, int]
    collapsed_names: Dict[str, List[str]]
    sv_min: Optional[float]
    sv_min_name: Optional[str]
    alpha_mean: Optional[float]
    alpha_median: Optional[float]
    fitted: int
    errors: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    rank_undefined: Dict[str, int] = field(default_factory=dict)
    tolerance_ratio: Dict[str, float] = field(default_factory=dict)
    base: Optional["BaseSummary"] = None

    @property
    def complete(self) -> bool:
        return not self.errors and self.status.get("nonfinite", 0) == 0

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["complete"] = self.complete
        if self.base is None:  # a run without --base: the summary as ever
            del d["base"]
        return d


def summarize(
    records: List[MatrixRecord],
    skipped: Counter,
    models: List[str],
    errors: List[str],
    notes: Sequence[str] = (),
) -> Summary:
    """Aggregate ``records`` (any number of models) into a :class:`Summary`."""
    with_sv = [r for r in records if r.sv_min is not None]
    smallest = min(
        ((r.sv_min, r) for r in records if r.sv_min is not None),
        key=lambda pair: pair[0],
        default=None,
    )
    alphas = [r.alpha for r in records if r.alpha is not None]
    label = (lambda r: f"{r.model}:{r.name}") if len(models) > 1 else (lambda r: r.name)
    names = {c: [label(r) for r in records if r.collapsed(c)] for c in CRITERION_CHOICES}
    return Summary(
        models=list(models),
        analyzed=len(records),
        skipped=dict(sorted(skipped.items(), key=lambda kv: -kv[1])),
        status=dict(Counter(r.status for r in records)),
        collapsed={c: len(v) for c, v in names.items()},
        collapsed_names=names,
        sv_min=None if smallest is None else smallest[0],
        sv_min_name=None if smallest is None else label(smallest[1]),
        alpha_mean=mean(alphas) if alphas else None,
        alpha_median=median(alphas) if alphas else None,
        fitted=len(alphas),
        errors=list(errors),
        notes=list(notes),
        rank_undefined={
            c: n for c in RANK_CRITERIA if (n := sum(r.rank(c) is None for r in with_sv))
        },
        tolerance_ratio=_tolerance_ratios(with_sv),
    )


def _tolerance_ratios(records: List[MatrixRecord]) -> Dict[str, float]:
    """Largest numpy / nr tolerance over sv_max among ``records`` that have that rank."""
    ratios: Dict[str, float] = {}
    for r in (r for r in records if r.dtype in DTYPE_EPS):  # quantized: no eps, no such rank
        for c, ratio in zip(("numpy", "nr"), relative_tolerances(r.N, r.M, DTYPE_EPS[r.dtype])):
            if r.rank(c) is not None:
                ratios[c] = max(ratios.get(c, 0.0), ratio)
    return ratios
