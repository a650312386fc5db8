"""Figures of a run, and a static ``index.html`` to browse them (``--plot-dir DIR``).

The only module that imports matplotlib. It draws on ``matplotlib.figure.Figure`` with the Agg
canvas directly: no pyplot, no display, no global backend switch in the caller's process.

Written into DIR:

* ``sv_min_hist.png``: histogram of log10 nu_min over all analyzed matrices, stacked by model
  (one colour each), with the ``--log10-threshold`` (default -8) and log10 ``--loose-tol`` lines;
  exact zeros (log10 = -inf) are drawn in one bin left of everything else.
* ``alpha_hist.png``: histogram of the power-law exponents alpha, stacked by model.
* ``depth.png``: alpha and log10 nu_min against the matrix's index within its model (record
  order, which is the model's parameter order, i.e. roughly depth), one line per model.
* ``matrices/<name>.png`` per matrix (``--plot-max``, ``--plot-match`` bound how many): the
  empirical spectral density rho(lambda) of X = W^T W on linear and logarithmic axes with the
  Marchenko–Pastur density of a random matrix of the same shape and Frobenius norm overlaid
  (scaling in :mod:`allennlp_analyze.mp`: lambda = nu^2, support sigma^2 N (1 -/+ 1/sqrt(Q))^2,
  sigma^2 = ||W||_F^2 / (N M)) and the bulk edge lambda_plus of the record's MP bulk fit
  (:mod:`allennlp_analyze.spectral_metrics`) marked, the ESD of W with its elements permuted
  outlined on the same bins when the run was randomized (``--randomize``), and the tail on
  log-log axes with the fitted power law from xmin. ``<name>`` is the layer name (and slice)
  with every character outside ``[A-Za-z0-9._-]`` turned into ``_``, prefixed by the model
  label and ``--`` when the run has several models.
* ``index.html``: the summary, the run figures and the record table linking every matrix's
  figure.

Each drawing function returns the figure and the numbers it drew (histogram edges and counts),
so that callers and tests can check the picture against the records.
"""

import html
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

from .aggregate import aggregate
from .api import Analysis
from .errors import AnalyzeError
from .fits import ESTIMATORS
from .fits.truncated import log_normalizer
from .mp import estimate_sigma2, mp_density, mp_support
from .options import AnalysisOptions, compile_patterns
from .records import MatrixRecord
from .spectral_metrics import esd_bins

#: Default bound on per-matrix figures (about 0.15 s each).
DEFAULT_MAX_MATRIX_FIGURES = 100
DPI = 80
_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
#: The fitted lines, the first estimator's first (red, as the one line always was).
_FIT_COLORS = (
    _COLORS[3],
    _COLORS[1],
    _COLORS[2],
    _COLORS[4],
    _COLORS[5],
    _COLORS[6],
    "#7f7f7f",
    "#17becf",
)


@dataclass
class Drawn:
    """A figure and what it shows: ``edges`` of the histogram bins and ``counts`` per series
    (per model for the run histograms, by panel for a matrix's ESD)."""

    figure: Figure
    edges: Optional[np.ndarray] = None
    counts: Dict[str, np.ndarray] = field(default_factory=dict)
    extra: Dict[str, object] = field(default_factory=dict)


@dataclass
class WrittenFigures:
    """Paths (relative to the plot directory) of what :func:`write_figures` wrote: the run
    figures by kind, one entry per record (``None`` where no figure was drawn, with the reason
    in ``matrix_notes``), and the index page."""

    directory: str
    run: Dict[str, str]
    matrices: List[Optional[str]]
    matrix_notes: List[str]
    index: str


# ---------------------------------------------------------------------------------------------
# Names


def sanitize(text: str, max_len: int = 120) -> str:
    """A file-name-safe form of ``text``: runs of characters outside ``[A-Za-z0-9._-]`` become
    ``_``, no leading dot; long names keep their start and end around ``~``."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).rstrip("_").lstrip(".") or "matrix"
    if len(s) > max_len:
        s = s[: max_len // 2 - 1] + "~" + s[-(max_len // 2) :]
    return s


def figure_names(records: Sequence[MatrixRecord], several_models: bool) -> List[str]:
    """Stable, unique (also case-insensitively) file names, one per record, in record order."""
    seen, names = set(), []
    # per base, where the search for a free "-k" resumes (else quadratic in twins)
    next_k: Dict[str, int] = {}
    for r in records:
        base = sanitize(r.name)
        if several_models:
            base = sanitize(r.model, 60) + "--" + base
        name, k = base, next_k.get(base.lower(), 2)
        while name.lower() in seen:
            name, k = f"{base}-{k}", k + 1
        next_k[base.lower()] = k
        seen.add(name.lower())
        names.append(name + ".png")
    return names


def _tex_safe(text: str) -> str:
    return text.replace("$", r"\$")


def _record_title(r: MatrixRecord, several_models: bool) -> str:
    prefix = f"{r.model}: " if several_models else ""
    return _tex_safe(f"{prefix}{r.name}")


# ---------------------------------------------------------------------------------------------
# Per matrix


def esd_figure(
    record: MatrixRecord,
    sv: np.ndarray,
    title: Optional[str] = None,
    rand_sv: Optional[np.ndarray] = None,
) -> Drawn:
    """ESD of X = W^T W (eigenvalues lambda = nu^2 of ``sv``) with the MP density and the
    power-law fit of ``record``: panels "linear", "log" (log lambda axis, density per decade) and
    "tail" (log-log, the fitted power law from xmin). Histograms are normalized by M, the
    number of eigenvalues (zeros included), as the MP density is. The record's fitted bulk edge
    lambda_plus is marked; ``rand_sv`` (the singular values of W with its elements permuted)
    adds the randomized ESD as an outline on the same bins (counts "rand_linear", "rand_log")."""
    sv = np.asarray(sv, dtype=np.float64)
    lam = sv * sv
    M, N, Q = lam.size, record.N, record.Q
    if M == 0:
        raise ValueError(f"{record.name}: no singular values to plot")
    rand = (
        None
        if rand_sv is None or not np.size(rand_sv)
        else np.asarray(rand_sv, dtype=np.float64) ** 2
    )
    sigma2 = estimate_sigma2(sv, N, record.M)
    lo, hi = mp_support(Q, sigma2, scale=N)
    pos = lam[lam > 0]
    rand_pos = None if rand is None else rand[rand > 0]
    rand_label = (
        None if rand is None else f"W randomized (elements permuted): {record.num_traps} trap(s)"
    )
    n_zero = M - pos.size
    fig = Figure(figsize=(14, 4.4), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    drawn = Drawn(fig)
    mp_label = f"MP: σ²={sigma2:.3g}, Q={Q:.2f}, λ± = σ²N(1±1/√Q)² = {lo:.3g}, {hi:.3g}"

    # Linear axes.
    ax = axes[0]
    top = max(float(lam.max()), hi, 0.0 if rand is None else float(rand.max()))
    edges = np.linspace(0.0, top * 1.0001, esd_bins(M) + 1)
    counts, _ = np.histogram(lam, edges)
    ax.stairs(
        counts / (M * np.diff(edges)),
        edges,
        fill=True,
        alpha=0.55,
        color=_COLORS[0],
        label=f"ESD ({M} eigenvalues)",
    )
    if rand is not None:
        rcounts, _ = np.histogram(rand, edges)
        ax.stairs(
            rcounts / (rand.size * np.diff(edges)),
            edges,
            color=_COLORS[1],
            lw=1.5,
            label=rand_label,
        )
        drawn.counts["rand_linear"] = rcounts
    grid = np.linspace(max(lo, 0.0), hi, 400)
    ax.plot(grid, mp_density(grid, Q, sigma2, scale=N), color="k", lw=1.5, label=mp_label)
    if record.lambda_plus is not None:
        ax.axvline(
            record.lambda_plus,
            color=_COLORS[2],
            ls="--",
            lw=1,
            label=f"bulk edge λ+ = {record.lambda_plus:.3g} (MP fit of the bulk): "
            f"{record.num_spikes} spike(s)",
        )
    ax.set_xlabel("eigenvalue λ = ν² of X = WᵀW (linear)")
    ax.set_ylabel("density ρ(λ)")
    ax.set_title("ESD, linear axes", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    drawn.counts["linear"], drawn.edges = counts, edges

    # Log lambda axis, density per decade.
    ax = axes[1]
    if pos.size:
        span = pos if rand_pos is None or not rand_pos.size else np.r_[pos, rand_pos]
        l_lo = min(float(span.min()), lo if lo > 0 else float(span.min()))
        l_hi = max(float(span.max()), hi)
        ledges = np.logspace(math.log10(l_lo) - 0.01, math.log10(l_hi) + 0.01, esd_bins(M) + 1)
        lcounts, _ = np.histogram(pos, ledges)
        ax.stairs(
            lcounts / (M * np.diff(np.log10(ledges))),
            ledges,
            fill=True,
            alpha=0.55,
            color=_COLORS[0],
            label=f"ESD ({pos.size} positive λ"
            + (f"; {n_zero} zeros not shown)" if n_zero else ")"),
        )
        if rand is not None and rand_pos is not None:
            rcounts, _ = np.histogram(rand_pos, ledges)
            ax.stairs(
                rcounts / (rand.size * np.diff(np.log10(ledges))),
                ledges,
                color=_COLORS[1],
                lw=1.5,
                label="W randomized",
            )
            drawn.counts["rand_log"] = rcounts
        g_lo = lo if lo > 0 else hi * 1e-6
        lgrid = np.logspace(math.log10(g_lo), math.log10(hi), 400)
        ax.plot(
            lgrid,
            mp_density(lgrid, Q, sigma2, scale=N) * lgrid * math.log(10),
            color="k",
            lw=1.5,
            label="MP (same σ², Q)",
        )
        ax.set_xscale("log")
        drawn.counts["log"] = lcounts
        drawn.extra["log_edges"] = ledges
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("eigenvalue λ (log scale)")
    ax.set_ylabel("density per decade, ρ(log₁₀ λ)")
    ax.set_title("ESD, logarithmic λ axis", fontsize=10)

    # Log-log tail with the power-law fit: lambda from 1/100 of min(xmin, median) up, so that
    # collapsed eigenvalues (shown in the log panel) do not squeeze the tail.
    ax = axes[2]
    if pos.size:
        ref = (
            float(np.median(pos))
            if record.xmin is None
            else min(record.xmin, float(np.median(pos)))
        )
        floor = max(float(pos.min()), ref / 100)
        shown = pos[pos >= floor]
        tedges = np.logspace(
            math.log10(floor) - 0.01, math.log10(float(pos.max())) + 0.01, esd_bins(shown.size) + 1
        )
        tcounts, _ = np.histogram(shown, tedges)
        dens = tcounts / (M * np.diff(tedges))
        hidden = pos.size - shown.size
        ax.stairs(
            np.where(dens > 0, dens, np.nan),
            tedges,
            fill=True,
            alpha=0.55,
            color=_COLORS[0],
            label="ESD ρ(λ)" + (f" ({hidden} λ < {floor:.2g} not shown)" if hidden else ""),
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        drawn.counts["tail"] = tcounts
    if record.alpha is not None and record.xmin is not None and pos.size:
        a, xmin = record.alpha, record.xmin
        n_tail = int(np.count_nonzero(pos >= xmin))
        for k, (label, density, lo) in enumerate(_fitted_lines(record)):
            hi = max(float(pos.max()), lo * 1.0001)
            tgrid = np.logspace(math.log10(lo), math.log10(hi), 100)
            n_in = int(np.count_nonzero(pos >= lo))
            ax.plot(
                tgrid,
                density(tgrid) * n_in / M,
                color=_FIT_COLORS[k % len(_FIT_COLORS)],
                lw=2 if k == 0 else 1.2,
                ls="-" if k == 0 else "-.",
                label=label,
            )
        ax.axvline(
            xmin,
            color=_COLORS[3],
            ls="--",
            lw=1,
            label=f"xmin = {xmin:.3g} ({n_tail} of {M} λ in the tail)",
        )
        drawn.extra.update(alpha=a, xmin=xmin, n_tail=n_tail)
    else:
        ax.text(
            0.5,
            0.5,
            f"no power-law fit ({record.status})",
            transform=ax.transAxes,
            ha="center",
            va="center",
        )
    ax.set_xlabel("eigenvalue λ (log scale)")
    ax.set_ylabel("density ρ(λ) (log scale)")
    ax.set_title("tail, log-log, with the power-law fit", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")

    nu = "-" if record.log10_sv_min is None else f"{record.log10_sv_min:.2f}"
    fig.suptitle(
        f"{title or _tex_safe(record.name)}   ({record.N}×{record.M}, Q={Q:.2f}, "
        f"log₁₀ ν_min={nu}; MP: σ² = ‖W‖²_F/(NM))",
        fontsize=11,
    )
    for ax in axes[1:]:  # unlabelled minor ticks on log axes cost ~30% of the figure's time
        ax.xaxis.set_major_locator(LogLocator(numticks=7))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_minor_locator(NullLocator())
    # Fixed margins: tight_layout would cost more than the drawing itself.
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.85, wspace=0.25)
    return drawn


def _fitted_lines(record: MatrixRecord):
    """(legend label, density function of lambda, lower end) of each estimator the record
    holds, the one behind ``alpha`` first (docs/estimators.md): power laws
    (a - 1) / xmin (lambda / xmin)**-a (divided by 1 - (xmax / xmin)**(1 - a) when bounded), the
    truncated power law lambda**-a exp(-Lambda lambda) / Z; each scaled by its tail's share."""
    lines = []
    first = record.fit or "csn"
    for name in [first] + [n for n in ESTIMATORS if n != first]:
        if name == "tpl":
            a, lam, xmin = record.tpl_alpha, record.tpl_lambda, record.tpl_xmin
            if a is None or lam is None or xmin is None or (a <= 1.0 and lam == 0.0):
                continue
            log_z = log_normalizer(a, lam, xmin)
            lines.append(
                (
                    f"tpl: α = {a:.3f}, Λ = {lam:.3g}",
                    lambda x, a=a, lam=lam, z=log_z: np.exp(-a * np.log(x) - lam * x - z),
                    xmin,
                )
            )
            continue
        key = name.replace("-", "_")
        a, xmin = getattr(record, f"alpha_{key}"), getattr(record, f"xmin_{key}")
        if name == first and a is None:  # records written before the estimators' columns
            a, xmin = record.alpha, record.xmin
        if a is None or xmin is None or a <= 1.0:
            continue
        xmax = record.sv_max**2 if name == "csn-xmax" and record.sv_max else None
        norm = 1.0 - (xmax / xmin) ** (1 - a) if xmax is not None else 1.0
        D = getattr(record, f"D_{key}", None) if name != first or record.D is None else record.D
        lines.append(
            (
                f"{name}: ρ ∝ λ^(−α), α = {a:.3f}" + (f", D = {D:.3f}" if D is not None else ""),
                lambda x, a=a, xmin=xmin, norm=norm: (a - 1) / xmin * (x / xmin) ** (-a) / norm,
                xmin,
            )
        )
    return lines


# ---------------------------------------------------------------------------------------------
# Per run


def _by_model(records: Sequence[MatrixRecord], models: Sequence[str]) -> Dict[str, List[int]]:
    order = list(dict.fromkeys(list(models) + [r.model for r in records]))
    groups: Dict[str, List[int]] = {m: [] for m in order}
    for i, r in enumerate(records):
        groups[r.model].append(i)
    return groups


def _stacked(ax, values: Dict[str, np.ndarray], edges: np.ndarray) -> Dict[str, np.ndarray]:
    counts, base = {}, np.zeros(len(edges) - 1)
    for k, (model, v) in enumerate(values.items()):
        c, _ = np.histogram(v, edges)
        counts[model] = c
        ax.stairs(
            base + c,
            edges,
            baseline=base.copy(),
            fill=True,
            color=_COLORS[k % 10],
            alpha=0.8,
            label=f"{model} ({int(c.sum())})",
        )
        base = base + c
    return counts


def sv_min_histogram(
    records: Sequence[MatrixRecord],
    options: AnalysisOptions = AnalysisOptions(),
    models: Sequence[str] = (),
) -> Drawn:
    """Histogram of log10 nu_min over ``records`` (those with a spectrum), stacked by model,
    with the --log10-threshold and log10 --loose-tol lines."""
    groups = _by_model(records, models)
    thr = options.log10_threshold
    loose = math.log10(options.loose_tol) if options.loose_tol > 0 else None
    finite = [
        r.log10_sv_min
        for r in records
        if r.log10_sv_min is not None and math.isfinite(r.log10_sv_min)
    ]
    marks = [thr] + ([loose] if loose is not None else [])
    lo = math.floor(min(finite + marks)) - 0.5
    hi = math.ceil(max(finite + marks)) + 0.5
    width = max((hi - lo) / 40, 0.05)
    zero_at = lo - width  # exact zeros: one bin of their own, left of everything
    edges = np.arange(zero_at - width / 2, hi + width, width)
    values = {
        m: np.array(
            [
                zero_at if r.sv_min == 0 else r.log10_sv_min
                for r in (records[i] for i in idx)
                if r.log10_sv_min is not None
            ]
        )
        for m, idx in groups.items()
    }
    fig = Figure(figsize=(11, 5), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    counts = _stacked(ax, values, edges)
    n = sum(int(c.sum()) for c in counts.values())
    n_below = sum(int(np.count_nonzero(v < thr)) for v in values.values())
    ax.axvline(
        thr, color="k", ls="--", lw=1.5, label=f"--log10-threshold {thr:g}: {n_below} of {n} below"
    )
    if loose is not None:
        ax.axvline(loose, color="0.4", ls=":", lw=1.5, label=f"log₁₀ --loose-tol = {loose:.3g}")
    n_zero = sum(int(np.count_nonzero(v == zero_at)) for v in values.values())
    if n_zero:
        ax.annotate(
            f"ν_min = 0\n({n_zero})",
            (zero_at, n_zero),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
        ax.set_ylim(top=max(ax.get_ylim()[1], n_zero * 1.15))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("log₁₀ ν_min (smallest singular value of W, log base 10)")
    ax.set_ylabel("matrices (count)")
    ax.set_title(
        f"Smallest singular values: {n} matrices, {len(groups)} "
        f"model{'s' if len(groups) != 1 else ''}"
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return Drawn(fig, edges, counts, {"n_below": n_below, "zero_at": zero_at})


def alpha_histogram(records: Sequence[MatrixRecord], models: Sequence[str] = ()) -> Drawn:
    """Histogram of the fitted power-law exponents alpha, stacked by model."""
    groups = _by_model(records, models)
    values = {
        m: np.array([records[i].alpha for i in idx if records[i].alpha is not None])
        for m, idx in groups.items()
    }
    allv = np.concatenate([v for v in values.values()] + [np.zeros(0)])
    if allv.size:
        lo, hi = float(allv.min()), float(allv.max())
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, min(40, max(8, int(2 * math.sqrt(allv.size)))) + 1)
    else:
        edges = np.linspace(1, 8, 15)
    fig = Figure(figsize=(11, 5), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    counts = _stacked(ax, values, edges)
    if allv.size:
        ax.axvline(
            float(np.median(allv)),
            color="k",
            ls="--",
            lw=1.2,
            label=f"median α = {float(np.median(allv)):.3f}",
        )
    else:
        ax.text(0.5, 0.5, "no power-law fits", transform=ax.transAxes, ha="center")
    ax.set_xlabel("α (exponent of the power-law tail ρ(λ) ∝ λ^(−α), dimensionless)")
    ax.set_ylabel("matrices (count)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Power-law exponents: {int(allv.size)} fitted matrices")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return Drawn(fig, edges, counts)


def depth_figure(
    records: Sequence[MatrixRecord],
    options: AnalysisOptions = AnalysisOptions(),
    models: Sequence[str] = (),
) -> Drawn:
    """alpha and log10 nu_min against the index of the matrix within its model."""
    groups = _by_model(records, models)
    fig = Figure(figsize=(12, 6.5), dpi=DPI)
    FigureCanvasAgg(fig)
    ax_a, ax_s = fig.subplots(2, 1, sharex=True)
    lines = {}
    finite = [
        r.log10_sv_min
        for r in records
        if r.log10_sv_min is not None and math.isfinite(r.log10_sv_min)
    ]
    zero_at = math.floor(min(finite + [options.log10_threshold])) - 1  # where nu_min = 0 goes
    n_zero = 0
    for k, (m, idx) in enumerate(groups.items()):
        if not idx:
            continue
        x = np.arange(len(idx))
        a = np.array([np.nan if records[i].alpha is None else records[i].alpha for i in idx])
        s = np.array(
            [np.nan if records[i].log10_sv_min is None else records[i].log10_sv_min for i in idx]
        )
        zero = np.isneginf(s)
        s[zero] = zero_at
        style = dict(color=_COLORS[k % 10], marker="o", ms=3, lw=1)
        ax_a.plot(x, a, label=m, **style)
        ax_s.plot(x, s, label=m, **style)
        if zero.any():
            ax_s.plot(x[zero], s[zero], ls="none", marker="x", ms=8, mew=2, color=_COLORS[k % 10])
            n_zero += int(zero.sum())
        lines[m] = np.vstack([a, s])
    if n_zero:
        ax_s.plot(
            [],
            [],
            ls="none",
            marker="x",
            color="k",
            label=f"ν_min = 0 exactly ({n_zero}), drawn at {zero_at}",
        )
    ax_s.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_s.axhline(
        options.log10_threshold,
        color="k",
        ls="--",
        lw=1.2,
        label=f"--log10-threshold {options.log10_threshold:g}",
    )
    if options.loose_tol > 0:
        ax_s.axhline(
            math.log10(options.loose_tol),
            color="0.4",
            ls=":",
            lw=1.2,
            label=f"log₁₀ --loose-tol = {math.log10(options.loose_tol):.3g}",
        )
    ax_a.set_ylabel("α (dimensionless)")
    ax_a.set_title("Per layer, in model order (depth)")
    ax_s.set_ylabel("log₁₀ ν_min")
    ax_s.set_xlabel("matrix index within its model (parameter order ≈ depth)")
    for ax in (ax_a, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return Drawn(fig, counts=lines)


# ---------------------------------------------------------------------------------------------
# Writing


def prepare_plot_dir(plot_dir: str) -> None:
    """Create ``plot_dir`` and its ``matrices/`` folder (before a long analysis, so that an
    unusable folder is reported before any work)."""
    try:
        os.makedirs(os.path.join(plot_dir, "matrices"), exist_ok=True)
    except OSError as e:
        raise AnalyzeError(f"cannot create --plot-dir {plot_dir}: {e.strerror or e}") from None


def write_figures(
    result: Analysis,
    plot_dir: str,
    *,
    max_matrices: Optional[int] = DEFAULT_MAX_MATRIX_FIGURES,
    match: Sequence[str] = (),
) -> WrittenFigures:
    """Write the run figures, per-matrix figures and ``index.html`` into ``plot_dir``.

    Per-matrix figures are drawn for the records whose ``model:name`` matches any regex of
    ``match`` (all when empty), the first ``max_matrices`` of them (None or negative: all).
    ``result.spectra`` is needed for them (``analyze(..., keep_spectra=True)``)."""
    prepare_plot_dir(plot_dir)
    patterns = compile_patterns(match, "--plot-match")
    records, opts = result.records, result.options
    models = result.summary.models
    several = len(set(models) | {r.model for r in records}) > 1

    def save(drawn: Drawn, rel: str) -> str:
        path = os.path.join(plot_dir, rel)
        try:
            drawn.figure.savefig(path, dpi=DPI)
        except OSError as e:
            raise AnalyzeError(f"cannot write {path}: {e.strerror or e}") from None
        return rel

    run = {
        "sv_min_hist": save(sv_min_histogram(records, opts, models), "sv_min_hist.png"),
        "alpha_hist": save(alpha_histogram(records, models), "alpha_hist.png"),
        "depth": save(depth_figure(records, opts, models), "depth.png"),
    }
    names = figure_names(records, several)
    budget = math.inf if max_matrices is None or max_matrices < 0 else max_matrices
    spectra = result.spectra
    matrices: List[Optional[str]] = []
    notes: List[str] = []
    for i, r in enumerate(records):
        rel, note = None, ""
        if patterns and not any(p.search(f"{r.model}:{r.name}") for p in patterns):
            note = "not matched by --plot-match"
        elif budget <= 0:
            note = f"beyond --plot-max {max_matrices}"
        elif spectra is None:
            note = "no spectra kept"
        elif spectra[i].size == 0 or not np.any(spectra[i] > 0):
            note = f"nothing to plot ({r.status})"
        else:
            rand_sv = None if result.rand_spectra is None else result.rand_spectra[i]
            rel = save(
                esd_figure(r, spectra[i], _record_title(r, several), rand_sv),
                "matrices/" + names[i],
            )
            budget -= 1
        matrices.append(rel)
        notes.append(note)
    index = "index.html"
    _write_index(os.path.join(plot_dir, index), result, run, matrices, notes)
    return WrittenFigures(plot_dir, run, matrices, notes, index)


def _write_index(
    path: str,
    result: Analysis,
    run: Dict[str, str],
    matrices: List[Optional[str]],
    notes: List[str],
) -> None:
    from .report import rank_cell, summary_text

    s, o = result.summary, result.options
    agg = aggregate(result.records, s.models, o.log10_threshold)
    text = summary_text(s, o.rank_criterion, o.loose_tol, aggregate=agg, wide=True)
    e = html.escape
    several = len(s.models) > 1
    cols = (
        (["model"] if several else [])
        + [
            "name",
            "slice",
            "N × M",
            "Q",
            "log10 sv_min",
            "rank loose/numpy/nr/noise",
            "alpha",
            "D",
            "spikes",
            "mp_softrank",
            "entropy",
        ]
        + (["traps"] if o.randomize else [])
        + ["status", "figure"]
    )
    rows = []
    for r, fig, note in zip(result.records, matrices, notes):
        ranks = rank_cell(r)
        link = (
            f'<a href="{e(fig)}"><img src="{e(fig)}" loading="lazy" width="240" '
            f'alt="ESD of {e(r.name)}"></a>'
            if fig
            else e(note)
        )
        cells = (
            ([e(r.model)] if several else [])
            + [
                e(r.name),
                e(r.slice or ""),
                f"{r.N} × {r.M}",
                f"{r.Q:.2f}",
                _fmt(r.log10_sv_min),
                ranks,
                _fmt(r.alpha),
                _fmt(r.D),
                "-" if r.num_spikes is None else str(r.num_spikes),
                _fmt(r.mp_softrank),
                _fmt(r.entropy),
            ]
            + ([e(str(r.num_traps if r.num_traps is not None else "-"))] if o.randomize else [])
            + [e(r.status), link]
        )
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    figs = "\n".join(
        f'<figure><a href="{e(rel)}"><img src="{e(rel)}" alt="{e(kind)}"></a>'
        f"<figcaption>{e(rel)}</figcaption></figure>"
        for kind, rel in run.items()
    )
    n_fig = sum(f is not None for f in matrices)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>allennlp-analyze: {e(", ".join(s.models))}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; vertical-align: middle; }}
th {{ background: #eee; position: sticky; top: 0; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
figure img {{ max-width: 720px; }}
pre {{ background: #f6f6f6; padding: 0.8em; overflow-x: auto; }}
</style></head><body>
<h1>allennlp-analyze</h1>
<p>Models: {e(", ".join(s.models) or "(none)")}. {s.analyzed} matrices analyzed;
{n_fig} per-matrix figures (ESD of X = WᵀW with the Marchenko–Pastur density for the same
shape and σ² = ‖W‖²_F/(N·M), the bulk edge λ+ of the MP fit of the bulk, the randomized ESD
with --randomize, and the power-law tail fit).</p>
<h2>Summary</h2>
<pre>{e(text)}</pre>
<h2>Run figures</h2>
{figs}
<h2>Matrices</h2>
<table>
<thead><tr>{"".join(f"<th>{e(c)}</th>" for c in cols)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
</body></html>
"""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as err:
        raise AnalyzeError(f"cannot write {path}: {err.strerror or err}") from None


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return str(v) if not math.isfinite(v) else f"{v:.3f}"
