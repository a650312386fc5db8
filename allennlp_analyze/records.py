"""Result records: one :class:`MatrixRecord` per analyzed matrix, and the run's :class:`Summary`.

The dataclass fields of :class:`MatrixRecord` are, in order, the JSON keys and CSV columns.
Units: singular values (``sv_*``) in the weights' own units; eigenvalues (``xmin``, ``xmax``) of
X = W^T W in those units squared; logs are base 10.
"""
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from statistics import mean, median
from typing import Dict, List, Optional, Sequence, Tuple

RANK_CRITERIA = ("loose", "numpy", "nr")

#: Record status codes: why a matrix has no fit (or no spectrum at all).
STATUS_TEXT = {
    "ok": "analyzed and fitted",
    "too_few_eigenvalues": "fewer than 2 distinct positive eigenvalues above round-off: no fit",
    "single_row": "1 x N matrix (one singular value): ranks only, no fit",
    "all_zero": "all-zero matrix: rank 0, no fit",
    "nonfinite": "NaN or Inf in the weights: not analyzed",
}


@dataclass
class MatrixRecord:
    """One weight matrix W, oriented N x M (N >= M), Q = N / M.

    ``rank_*``: counts of singular values above each criterion's tolerance (see
    :mod:`allennlp_analyze.spectrum`); ``rank_loss`` = M - rank under the run's chosen criterion.
    ``alpha, xmin, xmax, D, num_tail``: the power-law fit of the eigenvalues' tail
    (:mod:`allennlp_analyze.powerlaw_fit`); ``num_evals``: eigenvalues given to the fit (those
    whose singular value is above the numpy-criterion tolerance, i.e. not round-off).
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
    "gram>svd").
    ``slice``: spatial position of a convolution slice, or the part of a fused matrix.
    ``kind`` / ``kind_from``: what the tensor is and on what evidence
    (:mod:`allennlp_analyze.kinds`; None for a matrix given directly).
    Fields are ``None`` where the status rules them out.
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
    rank_loss: Optional[int] = None
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

    def rank(self, criterion: str) -> Optional[int]:
        """Rank under ``criterion`` ("loose", "numpy" or "nr")."""
        return getattr(self, f"rank_{criterion}")

    def collapsed(self, criterion: str) -> bool:
        """Whether W lost rank (rank < M) under ``criterion``; False if it has no spectrum."""
        r = self.rank(criterion)
        return r is not None and r < self.M

    def to_dict(self) -> Dict[str, object]:
        """The record as JSON-ready data (tuples as lists; non-finite floats as ``None``)."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in d.items()}


RECORD_FIELDS: Tuple[str, ...] = tuple(f.name for f in fields(MatrixRecord))


@dataclass
class Summary:
    """What one run found. ``skipped``: parameters left out, by reason; ``collapsed``: matrices
    with rank < M under each criterion; ``sv_min`` / ``sv_min_name``: the smallest nu_min and
    where; ``errors``: sources that could not be read (a run with errors is incomplete);
    ``notes``: what was read of a source where that is not all of it (the part of a nested
    checkpoint, tensors left out)."""

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

    @property
    def complete(self) -> bool:
        return not self.errors and self.status.get("nonfinite", 0) == 0

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["complete"] = self.complete
        return d


def summarize(records: List[MatrixRecord], skipped: Counter, models: List[str],
              errors: List[str], notes: Sequence[str] = ()) -> Summary:
    """Aggregate ``records`` (any number of models) into a :class:`Summary`."""
    with_sv = [r for r in records if r.sv_min is not None]
    smallest = min(with_sv, key=lambda r: r.sv_min, default=None)
    alphas = [r.alpha for r in records if r.alpha is not None]
    label = (lambda r: f"{r.model}:{r.name}") if len(models) > 1 else (lambda r: r.name)
    names = {c: [label(r) for r in records if r.collapsed(c)] for c in RANK_CRITERIA}
    return Summary(
        models=list(models),
        analyzed=len(records),
        skipped=dict(sorted(skipped.items(), key=lambda kv: -kv[1])),
        status=dict(Counter(r.status for r in records)),
        collapsed={c: len(v) for c, v in names.items()},
        collapsed_names=names,
        sv_min=None if smallest is None else smallest.sv_min,
        sv_min_name=None if smallest is None else label(smallest),
        alpha_mean=mean(alphas) if alphas else None,
        alpha_median=median(alphas) if alphas else None,
        fitted=len(alphas),
        errors=list(errors),
        notes=list(notes),
    )
