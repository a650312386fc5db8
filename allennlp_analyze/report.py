"""Writers: an aligned table with a summary for people, JSON and CSV for programs."""

import csv
import json
import math
from typing import IO, List, Optional

from .aggregate import Aggregate, aggregate, aggregate_text
from .api import Analysis
from .errors import escape
from .journal import write_jsonl
from .records import RECORD_FIELDS, STATUS_TEXT, BaseSummary, MatrixRecord, Summary

FORMATS = ("table", "json", "csv", "jsonl")


def write(analysis: Analysis, fmt: str, out: IO[str], wide: bool = False) -> None:
    """Write ``analysis`` to ``out`` as "table" (``wide``: with the spectral metrics' columns),
    "json", "csv" or "jsonl"."""
    if fmt == "table":
        write_table(analysis, out, wide=wide)
    else:
        {"json": write_json, "csv": write_csv, "jsonl": write_lines}[fmt](analysis, out)


def write_lines(analysis: Analysis, out: IO[str]) -> None:
    """JSON lines: a header, then each source's records and its end line
    (:mod:`allennlp_analyze.journal`)."""
    write_jsonl(analysis.options, analysis.sources, analysis.records, out)


def run_aggregate(analysis: Analysis) -> Aggregate:
    """The per-model aggregate of ``analysis`` (see :mod:`allennlp_analyze.aggregate`)."""
    return aggregate(analysis.records, analysis.summary.models, analysis.options.log10_threshold)


def write_json(analysis: Analysis, out: IO[str]) -> None:
    """``{"records": [...], "summary": {..., "aggregate": {...}}, "options": {...}}``;
    non-finite numbers are null (JSON has no NaN or Infinity). Names are kept exact: JSON's
    own escapes (``\\n``, ``\\u001b``) carry control characters."""
    summary = analysis.summary.to_dict()
    summary["aggregate"] = run_aggregate(analysis).to_dict()
    doc = {
        "records": analysis.to_dicts(),
        "summary": _finite(summary),
        "options": _finite(vars(analysis.options)),
    }
    json.dump(doc, out, indent=1, allow_nan=False, default=list)
    out.write("\n")


def _finite(value):
    """``value`` with every non-finite float inside it (dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_csv(analysis: Analysis, out: IO[str]) -> None:
    """One row per record, columns :data:`~allennlp_analyze.records.RECORD_FIELDS`; shape as
    ``NxM``, missing values empty, names escaped as in the table (:func:`~.errors.escape`)."""
    writer = csv.DictWriter(out, fieldnames=RECORD_FIELDS, lineterminator="\n")
    writer.writeheader()
    for rec in analysis.records:
        d = rec.to_dict()
        d["shape"] = "x".join(map(str, rec.shape))
        writer.writerow(
            {k: ("" if v is None else escape(v) if isinstance(v, str) else v) for k, v in d.items()}
        )


def write_table(analysis: Analysis, out: IO[str], wide: bool = False) -> None:
    """The records as an aligned table, then the summary; ``wide`` adds the columns of the MP
    bulk fit, the entropies and (with ``randomize``) the correlation traps. Names from the
    input are escaped (:func:`~.errors.escape`: one line each, nothing a terminal acts on)."""
    multi = len(analysis.summary.models) > 1
    rand = analysis.options.randomize
    extra = (WIDE_COLUMNS + (RAND_COLUMNS if rand else ())) if wide else ()
    based = analysis.summary.base is not None
    header = (["model"] if multi else []) + [
        "name",
        "type",
        "N x M",
        "Q",
        "sv_max",
        "sv_min",
        "log10 sv_min",
        "rank loose/numpy/nr/noise",
        "alpha",
        "D",
        "xmin",
        "tail",
        *extra,
        *(BASE_COLUMNS if based else ()),
        "status",
    ]
    rows = [
        [
            escape(c)
            for c in ([r.model] if multi else [])
            + _table_row(r, wide, rand)[:-1]
            + (_base_cells(r) if based else [])
            + [r.status]
        ]
        for r in analysis.records
    ]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    left = {"model", "name", "type", "status"}

    def line(cells: List[str]) -> str:
        return "  ".join(
            c.ljust(w) if h in left else c.rjust(w) for c, w, h in zip(cells, widths, header)
        ).rstrip()

    if rows:
        out.write(line(header) + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        for row in rows:
            out.write(line(row) + "\n")
        out.write("\n")
    out.write(
        summary_text(
            analysis.summary,
            analysis.options.rank_criterion,
            analysis.options.loose_tol,
            aggregate=run_aggregate(analysis),
            wide=wide,
        )
    )


def summary_text(
    s: Summary,
    criterion: str,
    loose_tol: float,
    aggregate: Optional[Aggregate] = None,
    wide: bool = False,
) -> str:
    """The run's summary as a few lines of text; with ``aggregate``, a table per model (when
    the run has several models) or one line (one model) of the fraction of matrices with
    log10 nu_min under the threshold and the alpha quartiles (``wide``: and the spectral
    metrics), and the matrices with correlation traps when the run was randomized."""
    lines = []
    models = f"{len(s.models)} model{'s' if len(s.models) != 1 else ''}"
    skipped = sum(s.skipped.values())
    lines.append(
        f"Summary: {s.analyzed} matrices analyzed in {models}; "
        f"{skipped} parameters or parts skipped"
    )
    for reason, n in s.skipped.items():
        lines.append(f"  {n:6d}  skipped: {reason}")
    for status, n in s.status.items():
        if status != "ok":
            lines.append(f"  {n:6d}  {STATUS_TEXT[status]}")

    def count(c: str) -> str:
        notes = []
        if s.tolerance_ratio.get(c, 0.0) >= 0.01:  # for float32 weights it is ~1e-4
            notes.append(f"tolerance up to {100 * s.tolerance_ratio[c]:.0f}% of sv_max")
        if s.rank_undefined.get(c):
            notes.append(f"no rank for {s.rank_undefined[c]}: see rank_note")
        return f"{s.collapsed[c]}" + (f" ({'; '.join(notes)})" if notes else "")

    chosen = (
        f"{criterion}: loose for float32/float64, noise for narrower and quantized dtypes"
        if criterion == "auto"
        else criterion
    )
    lines.append(
        f"  rank collapse (rank < M): loose (sv <= {loose_tol:g}): {count('loose')}"
        f", numpy tolerance: {count('numpy')}"
        f", Numerical Recipes tolerance: {count('nr')}"
        f", noise floor: {count('noise')}"
        f"  [--rank-criterion {chosen}]"
    )
    for name in s.collapsed_names[criterion][:10]:
        lines.append(f"          collapsed: {name}")
    if len(s.collapsed_names[criterion]) > 10:
        lines.append(f"          ... and {len(s.collapsed_names[criterion]) - 10} more")
    if s.sv_min is not None:
        lines.append(f"  smallest sv_min: {_num(s.sv_min)} ({s.sv_min_name})")
    if s.fitted:
        lines.append(
            f"  alpha: mean {s.alpha_mean:.3f}, median {s.alpha_median:.3f} ({s.fitted} fitted)"
        )
    if aggregate is not None and aggregate.total.matrices:
        t = aggregate.total
        if len(aggregate.models) > 1:
            lines.extend(aggregate_text(aggregate, wide).rstrip("\n").split("\n"))
        else:
            quartiles = (
                ""
                if t.alpha_q1 is None
                else f"; alpha quartiles {t.alpha_q1:.3f} / {t.alpha_median:.3f} / {t.alpha_q3:.3f}"
            )
            lines.append(
                f"  log10 sv_min < {aggregate.log10_threshold:g}: {t.below_threshold} "
                f"of {t.with_spectrum} matrices{quartiles}"
            )
            if wide and t.num_spikes is not None:
                lines.append(
                    f"  MP bulk: {t.num_spikes} spikes in all; means: mp_softrank "
                    f"{_num(t.mp_softrank_mean, True)}, entropy "
                    f"{_num(t.entropy_mean, True)}, effective rank "
                    f"{_num(t.effective_rank_mean)}"
                )
        if t.with_traps is not None:
            lines.append(
                f"  correlation traps (--randomize): {t.with_traps} of {t.randomized} "
                f"randomized matrices, {t.num_traps} traps in all"
            )
    if s.base is not None:
        lines.extend(base_summary_lines(s.base))
    for note in s.notes:
        lines.append(f"  note: {note}")
    for err in s.errors:
        lines.append(f"  ERROR: {err}")
    if not s.complete:
        lines.append("  INCOMPLETE: some sources or matrices could not be analyzed (see above)")
    return "".join(escape(line) + "\n" for line in lines)


def base_summary_lines(b: BaseSummary, top: int = 10) -> List[str]:
    """The comparison with the base as summary lines: what paired, the ``top`` layers that
    moved most (relative change ||W - W_base||_F / ||W_base||_F), what did not pair."""
    lines = [
        f"  base {b.label}: {b.paired} matrices paired, {len(b.unmatched)} unmatched, "
        f"{len(b.unmatched_base)} of the base unmatched, {len(b.ambiguous)} ambiguous"
    ]
    for name, rel in b.moved[:top]:
        lines.append(f"          moved {rel:.3g}: {name}")
    if len(b.moved) > top:
        lines.append(f"          ... and {len(b.moved) - top} more")
    for what, names in (("unmatched", b.unmatched), ("unmatched in the base", b.unmatched_base)):
        for name in names[:top]:
            lines.append(f"          {what}: {name}")
        if len(names) > top:
            lines.append(f"          ... and {len(names) - top} more {what}")
    for name, candidates in list(b.ambiguous.items())[:top]:
        lines.append(f"          ambiguous: {name} (candidates {', '.join(candidates)})")
    return lines


#: Columns that ``--wide`` adds to the table (and with ``--randomize`` the second set).
WIDE_COLUMNS = ("spikes", "mp_softrank", "entropy", "eff. rank")
RAND_COLUMNS = ("rand sv_max", "traps", "rand dist")


def rank_cell(r: MatrixRecord) -> str:
    """``loose/numpy/nr/noise`` ranks, "-" for a rank that is null (or no spectrum)."""
    return (
        "-"
        if r.rank_loose is None
        else "/".join(_int(k) for k in (r.rank_loose, r.rank_numpy, r.rank_nr, r.rank_noise))
    )


def _table_row(r: MatrixRecord, wide: bool = False, rand: bool = False) -> List[str]:
    ranks = rank_cell(r)
    extra = (
        [
            _int(r.num_spikes),
            _num(r.mp_softrank, fixed=True),
            _num(r.entropy, fixed=True),
            _num(r.effective_rank),
        ]
        if wide
        else []
    )
    if wide and rand:
        extra += [_num(r.rand_sv_max), _int(r.num_traps), _num(r.rand_distance, fixed=True)]
    return [
        r.name,
        r.module_type or "-",
        f"{r.N} x {r.M}",
        f"{r.Q:.2f}",
        _num(r.sv_max),
        _num(r.sv_min),
        _num(r.log10_sv_min, fixed=True),
        ranks,
        _num(r.alpha, fixed=True),
        _num(r.D, fixed=True),
        _num(r.xmin),
        _int(r.num_tail),
        *extra,
        r.status,
    ]


#: Columns of a run with ``--base``: relative change, ||dW||_2, rank of dW above the operands'
#: noise, change of alpha.
BASE_COLUMNS = ("d rel", "|dW|_2", "d rank", "d alpha")


def _base_cells(r: MatrixRecord) -> List[str]:
    return [
        _num(r.delta_rel),
        _num(r.delta_sv_max),
        _int(r.delta_rank),
        _num(r.d_alpha, fixed=True),
    ]


def _int(v: Optional[int]) -> str:
    return "-" if v is None else str(v)


def _num(v: Optional[float], fixed: bool = False) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3f}" if fixed else f"{v:.4g}"
