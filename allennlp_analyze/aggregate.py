"""Per-model aggregates of a run: how many matrices, how many with log10 nu_min under a threshold,
and how alpha is distributed.

Counts are of records, so a convolution kernel counts once per analyzed slice (spatial position)
and a fused matrix split with ``--split-fused`` once per part.
"""

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from .records import MatrixRecord


@dataclass
class ModelAggregate:
    """One model's (or, with ``model == "all"``, the whole run's) aggregate.

    ``matrices``: records; ``with_spectrum``: those with a nu_min (all but non-finite ones);
    ``below_threshold``: those with log10 nu_min < ``log10_threshold`` (an exact 0 counts);
    ``fraction_below`` = below_threshold / with_spectrum (None if none has a spectrum).
    ``alpha_*``: over the ``fitted`` records; quartiles by linear interpolation (numpy's
    default percentile), ``None`` when nothing was fitted. ``num_spikes``: spikes summed over
    the records with an MP bulk fit; ``*_mean``: means over the records that have the value;
    ``randomized`` / ``with_traps`` / ``num_traps`` (with ``randomize``): records analyzed
    randomized, those with a correlation trap, traps in all; each ``None`` where no record has
    the value."""

    model: str
    matrices: int
    with_spectrum: int
    below_threshold: int
    fraction_below: Optional[float]
    fitted: int
    alpha_mean: Optional[float]
    alpha_median: Optional[float]
    alpha_q1: Optional[float]
    alpha_q3: Optional[float]
    alpha_min: Optional[float]
    alpha_max: Optional[float]
    num_spikes: Optional[int] = None
    mp_softrank_mean: Optional[float] = None
    entropy_mean: Optional[float] = None
    effective_rank_mean: Optional[float] = None
    log_alpha_norm_mean: Optional[float] = None
    randomized: Optional[int] = None
    with_traps: Optional[int] = None
    num_traps: Optional[int] = None
    rand_distance_mean: Optional[float] = None


@dataclass
class Aggregate:
    """The per-model aggregates (in the order models were given) and the total over all."""

    log10_threshold: float
    models: List[ModelAggregate]
    total: ModelAggregate

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def below(r: MatrixRecord, log10_threshold: float) -> bool:
    """Whether record ``r``'s nu_min is under 10**log10_threshold (exact zeros included)."""
    return r.sv_min is not None and (
        r.sv_min == 0.0 or (r.log10_sv_min is not None and r.log10_sv_min < log10_threshold)
    )


def model_aggregate(
    model: str, records: Sequence[MatrixRecord], log10_threshold: float
) -> ModelAggregate:
    with_sv = [r for r in records if r.sv_min is not None]
    n_below = sum(below(r, log10_threshold) for r in with_sv)
    alphas = np.array([r.alpha for r in records if r.alpha is not None and math.isfinite(r.alpha)])
    stats: Dict[str, Optional[float]] = dict.fromkeys(
        ("alpha_mean", "alpha_median", "alpha_q1", "alpha_q3", "alpha_min", "alpha_max")
    )
    if alphas.size:
        q1, med, q3 = np.percentile(alphas, [25, 50, 75])
        stats = dict(
            alpha_mean=float(alphas.mean()),
            alpha_median=float(med),
            alpha_q1=float(q1),
            alpha_q3=float(q3),
            alpha_min=float(alphas.min()),
            alpha_max=float(alphas.max()),
        )
    traps = _values(records, "num_traps")
    return ModelAggregate(
        model,
        len(records),
        len(with_sv),
        n_below,
        n_below / len(with_sv) if with_sv else None,
        int(alphas.size),
        **stats,
        num_spikes=_total(_values(records, "num_spikes")),
        mp_softrank_mean=_mean(_values(records, "mp_softrank")),
        entropy_mean=_mean(_values(records, "entropy")),
        effective_rank_mean=_mean(_values(records, "effective_rank")),
        log_alpha_norm_mean=_mean(_values(records, "log_alpha_norm")),
        randomized=len(traps) if traps else None,
        with_traps=sum(t > 0 for t in traps) if traps else None,
        num_traps=_total(traps),
        rand_distance_mean=_mean(_values(records, "rand_distance")),
    )


def _values(records: Sequence[MatrixRecord], name: str) -> list:
    return [v for v in (getattr(r, name) for r in records) if v is not None and math.isfinite(v)]


def _mean(values: list) -> Optional[float]:
    return float(np.mean(values)) if values else None


def _total(values: list) -> Optional[int]:
    return int(sum(values)) if values else None


def aggregate(
    records: Sequence[MatrixRecord], models: Sequence[str] = (), log10_threshold: float = -8.0
) -> Aggregate:
    """Aggregates of ``records`` per model (``models`` gives the order; models of the records
    that it does not name follow in order of appearance) and over all records."""
    order = list(dict.fromkeys(list(models) + [r.model for r in records]))
    by_model: Dict[str, List[MatrixRecord]] = {m: [] for m in order}
    for r in records:
        by_model[r.model].append(r)
    return Aggregate(
        log10_threshold=float(log10_threshold),
        models=[model_aggregate(m, by_model[m], log10_threshold) for m in order],
        total=model_aggregate("all", records, log10_threshold),
    )


def aggregate_text(agg: Aggregate, wide: bool = False) -> str:
    """The aggregate as an aligned table (one row per model, then "all" when several); ``wide``
    adds the spectral metrics' columns (spikes, mean MP soft rank, entropy, effective rank and,
    with ``randomize``, matrices with traps)."""
    thr = f"{agg.log10_threshold:g}"
    header = [
        "model",
        "matrices",
        f"log10 sv_min < {thr}",
        "fitted",
        "alpha mean",
        "median",
        "q1",
        "q3",
    ]
    rows = agg.models + ([agg.total] if len(agg.models) > 1 else [])
    cells = [
        [a.model, str(a.matrices), _fraction(a), str(a.fitted)]
        + [_f(v) for v in (a.alpha_mean, a.alpha_median, a.alpha_q1, a.alpha_q3)]
        for a in rows
    ]
    if wide:
        traps = agg.total.with_traps is not None
        header += ["spikes", "mp_softrank", "entropy", "eff. rank"] + (
            ["with traps"] if traps else []
        )
        for a, c in zip(rows, cells):
            c += [
                _f(a.num_spikes, "{:d}"),
                _f(a.mp_softrank_mean),
                _f(a.entropy_mean),
                _f(a.effective_rank_mean, "{:.1f}"),
            ] + ([_f(a.with_traps, "{:d}")] if traps else [])
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header)]

    def line(c: List[str]) -> str:
        return (
            "    "
            + "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))
            ).rstrip()
        )

    out = [
        f"  per model (alpha quartiles q1/q3; sv_min under 10^{thr}, --log10-threshold"
        + ("; spikes summed, spectral metrics' means" if wide else "")
        + "):",
        line(header),
        "    " + "  ".join("-" * w for w in widths),
    ]
    out += [line(c) for c in cells]
    return "\n".join(out) + "\n"


def _fraction(a: ModelAggregate) -> str:
    if a.fraction_below is None:
        return "-"
    return f"{a.below_threshold}/{a.with_spectrum} ({100 * a.fraction_below:.1f}%)"


def _f(v, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)
