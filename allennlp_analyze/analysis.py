"""The analysis: one matrix to one record, one source to its records, and the Python API.

    >>> from allennlp_analyze import analyze
    >>> result = analyze("model.tar.gz", min_q=1.1)
    >>> result.summary.collapsed["loose"], result.to_dicts()[0]["alpha"]
"""
import contextlib
import os
import sys
import threading
from collections import Counter
from concurrent.futures import (FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor,
                                as_completed, wait)
from dataclasses import dataclass, field, replace
from typing import (Callable, Collection, Dict, Iterable, Iterator, List, Optional, Set, Tuple,
                    TypeVar, Union)

import numpy as np

from . import limits
from .errors import AnalyzeError, escape
from .kinds import value_kind
from .noise_floor import StorageNoise
from .journal import Journal
from .options import AnalysisOptions
from .powerlaw_fit import fit_power_law
from .records import (WIDE_DTYPES, MatrixRecord, SourceInfo, Summary, criterion_for,
                      roundoff_criterion, summarize)
from .selection import NOT_WEIGHT_VALUES, MatrixPlan, Selection, extract, plan
from .spectral_metrics import (effective_rank, esd_distance, log_alpha_norm, matrix_entropy,
                               mp_bulk_fit, permuted)
from .sources.lora import adapter_of, adapter_records
from .spectrum import (Parallel, Spectrum, batch_size, enable_scratch, release_scratch,
                       singular_values_many)
from .tensors import DTYPE_EPS, WeightSource

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Analysis:
    """Records of every analyzed matrix (all models, in order) and their summary."""

    records: List[MatrixRecord]
    summary: Summary
    options: AnalysisOptions
    #: Singular values (descending) per record, aligned with ``records``, when asked for.
    spectra: Optional[List[np.ndarray]] = None
    #: With ``randomize``: those of each record's permuted matrix (empty where none).
    rand_spectra: Optional[List[np.ndarray]] = None
    #: The sources analyzed, in order; their records follow one another in ``records``.
    sources: List[SourceInfo] = field(default_factory=list)

    def to_dicts(self) -> List[Dict[str, object]]:
        """The records as a list of dicts (``pandas.DataFrame(result.to_dicts())``)."""
        return [r.to_dict() for r in self.records]


def analyze_matrix(W: np.ndarray, options: AnalysisOptions = AnalysisOptions(), *,
                   name: str = "W", dtype: Optional[str] = None, model: str = "",
                   module_type: Optional[str] = None, part: Optional[str] = None
                   ) -> MatrixRecord:
    """Analyze one 2-D matrix ``W``. ``dtype`` is its storage dtype name (default: W's own),
    whose machine epsilon sets the numpy / Numerical-Recipes rank tolerances and whose ulp the
    noise floor (W's values are taken as stored in it)."""
    return _analyze(W, options, name, dtype, model, module_type, part)[0]


def _analyze(W: np.ndarray, options: AnalysisOptions, name: str, dtype: Optional[str],
             model: str, module_type: Optional[str], part: Optional[str]
             ) -> Tuple[MatrixRecord, np.ndarray, np.ndarray]:
    """The record of W, its singular values and those of its permuted self (empty where none
    were computed)."""
    return _analyze_many([(W, name, dtype, model, module_type, part)], options)[0]


def _analyze_many(items: List[Tuple[np.ndarray, str, Optional[str], str, Optional[str],
                                    Optional[str]]], options: AnalysisOptions,
                  parallel: Optional[Parallel] = None
                  ) -> List[Tuple[MatrixRecord, np.ndarray, np.ndarray]]:
    """:func:`_analyze` of matrices (``(W, name, dtype, model, module_type, part)``) of one
    oriented shape, their spectra computed by stacked calls (same results as one by one).
    The storage rounding is accumulated from the row blocks the spectrum reads (no pass of its
    own); ``parallel`` runs a matrix's independent Gram panels (``spectrum.Parallel``)."""
    prepared = [_prepare(W, options, *rest) for W, *rest in items]
    specs = singular_values_many([W for _, W in prepared],
                                 [DTYPE_EPS[rec.dtype] for rec, _ in prepared],
                                 loose_tol=options.loose_tol, method=options.method,
                                 device=options.device, parallel=parallel,
                                 noise_dtypes=[rec.dtype for rec, _ in prepared])
    results = []
    for (rec, _), spec in zip(prepared, specs):
        if spec is None:
            rec.status = "nonfinite"
            results.append((rec, np.zeros(0)))
        else:
            results.append(_finish(rec, spec, spec.noise, options))
    todo = [i for i, spec in enumerate(specs) if spec is not None]
    rand = [np.zeros(0)] * len(results)
    if options.randomize:
        for i, sv in zip(todo, _randomize([prepared[i] for i in todo],
                                          [specs[i] for i in todo], options)):
            rand[i] = sv
    return [(rec, sv, r) for (rec, sv), r in zip(results, rand)]


def _prepare(W: np.ndarray, options: AnalysisOptions, name: str, dtype: Optional[str],
             model: str, module_type: Optional[str], part: Optional[str]
             ) -> Tuple[MatrixRecord, np.ndarray]:
    """The record's identity fields, and W (any array-like that slices; it is read in
    blocks, and NaN/Inf is found there)."""
    if not hasattr(W, "shape"):
        W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {W.shape}")
    dtype = dtype or W.dtype.name
    if dtype not in DTYPE_EPS:
        raise ValueError(f"{name}: unsupported dtype {dtype}")
    N, M = max(W.shape), min(W.shape)
    rec = MatrixRecord(model=model, name=name, module_type=module_type, shape=tuple(W.shape),
                       dtype=dtype, N=N, M=M, Q=N / M if M else float("inf"), slice=part)
    return rec, W


def _eps_ranks(rec: MatrixRecord, spec: Spectrum, bound: float
               ) -> Tuple[Optional[int], Optional[int], Optional[str]]:
    """numpy's and Numerical Recipes' ranks, each None where it says nothing about W, and why.

    Their tolerances scale with nu_max: at or above it (max(N, M) * eps >= 1 for numpy,
    sqrt(N + M + 1) * eps / 2 >= 1 for NR) every value counts as noise. For float16, bfloat16
    and float8 storage (no SVD runs in that precision: eps stands in for the storage rounding)
    a rank is also None where it is below the number of singular values above ``bound``, the
    rigorous bound on the rounding error's spectral norm: by Weyl's inequality each of those is
    the image of a nonzero singular value of the unrounded matrix, so a tolerance that calls
    them noise contradicts the storage it models. float32 / float64 ranks are the formulas."""
    sv, tol = spec.sv, spec.tolerances
    certain = None if rec.dtype in WIDE_DTYPES else spec.rank(bound)
    ranks: Dict[str, Optional[int]] = {c: spec.rank(getattr(tol, c)) for c in ("numpy", "nr")}
    at_max = [c for c in ranks if sv[0] > 0.0 and getattr(tol, c) >= sv[0]]
    reasons = [f"{' and '.join(at_max)} tolerance >= sv_max for {rec.dtype} "
               f"(eps {DTYPE_EPS[rec.dtype]:.3g}) at {rec.N} x {rec.M}"] if at_max else []
    for c in ranks:
        if c in at_max:
            ranks[c] = None
        elif certain is not None and ranks[c] < certain:
            reasons.append(f"{c} tolerance ({getattr(tol, c) / sv[0]:.2g} of sv_max) calls "
                           f"{certain - ranks[c]} values above the {rec.dtype} rounding-error "
                           f"bound ({bound / sv[0]:.2g} of sv_max) noise")
            ranks[c] = None
    note = "; ".join(reasons) + ": no rank" if reasons else None
    return ranks["numpy"], ranks["nr"], note


def _finish(rec: MatrixRecord, spec: Spectrum, noise: StorageNoise, options: AnalysisOptions
            ) -> Tuple[MatrixRecord, np.ndarray]:
    """Fill the record from the spectrum and the noise floor: ranks, norms, the power-law fit."""
    N, M = rec.N, rec.M
    sv, tol = spec.sv, spec.tolerances
    rec.method = spec.method
    rec.sv_max, rec.sv_min = float(sv[0]), float(sv[-1])
    # logs and eigenvalues from the values as computed (W scaled by 2**-exponent): lambda
    # itself may lie outside float64's range (weights of 1e-300 or 1e160)
    unit, shift = spec.unit_sv, 2.0 * spec.exponent * float(np.log10(2.0))
    rec.log10_sv_min = float(np.log10(unit[-1])) + shift / 2 if unit[-1] > 0 else float("-inf")
    rec.rank_loose, rec.rank_noise = spec.rank(tol.loose), spec.rank(tol.noise)
    rec.noise_floor, rec.noise_bound = tol.noise, noise.bound
    rec.rank_numpy, rec.rank_nr, rec.rank_note = _eps_ranks(rec, spec, noise.bound)
    rec.rank_criterion = criterion_for(options.rank_criterion, rec.dtype)
    rank = rec.rank(rec.rank_criterion)
    rec.rank_loss = None if rank is None else M - rank
    if sv[0] == 0.0:
        rec.status = "all_zero"
        return rec, sv
    evals = unit ** 2
    lam_max, lam_sum = float(evals[0]), float(evals.sum())
    rec.stable_rank = lam_sum / lam_max
    rec.log_norm = float(np.log10(lam_sum)) + shift
    rec.log_spectral_norm = float(np.log10(lam_max)) + shift
    # the fit sees every eigenvalue above round-off for the storage dtype, whatever the rank
    # criterion: numpy's tolerance for float32 / float64 (as ever), else the noise floor
    roundoff = roundoff_criterion(rec.dtype)
    fitted = evals[(sv > getattr(tol, roundoff)) & (evals > 0)]
    rec.num_evals = int(fitted.size)
    rec.effective_rank = effective_rank(unit)
    if M == 1:
        rec.status = "single_row"
        return rec, sv
    bulk = mp_bulk_fit(unit, rec.N, M)
    rec.mp_sigma2, rec.lambda_plus = (_eigenvalue_units(x, spec.exponent)
                                      for x in (bulk.sigma2, bulk.lambda_plus))
    rec.num_spikes, rec.mp_softrank = bulk.num_spikes, bulk.softrank
    rec.entropy = matrix_entropy(unit, rec.rank(roundoff))
    fit = fit_power_law(fitted, xmax=lam_max if options.fit_xmax == "max" else None)
    if fit is None:
        rec.status = "too_few_eigenvalues"
        return rec, sv
    rec.alpha, rec.D = fit.alpha, fit.D
    rec.xmin, rec.xmax = (_eigenvalue_units(x, spec.exponent) for x in (fit.xmin, fit.xmax))
    rec.num_tail = fit.num_tail
    rec.alpha_weighted = fit.alpha * rec.log_spectral_norm
    rec.log_alpha_norm = log_alpha_norm(unit, fit.alpha) + fit.alpha * shift
    return rec, sv


def _eigenvalue_units(x: Optional[float], exponent: int) -> Optional[float]:
    """An eigenvalue of the scaled W back in the weights' units squared (x * 4**exponent);
    None where that is outside float64's range."""
    if x is None or not exponent:
        return x
    with np.errstate(over="ignore", under="ignore"):
        value = float(np.ldexp(x, 2 * exponent))
    return value if 0.0 < value < float("inf") else None


def _randomize(prepared: List[Tuple[MatrixRecord, np.ndarray]], specs: List[Spectrum],
               options: AnalysisOptions) -> List[np.ndarray]:
    """Fill the ``rand_*`` and ``num_traps`` fields of the records that have a bulk fit from
    their matrices with the elements permuted (of one oriented shape, with their spectra
    ``specs``); return the permuted matrices' singular values (empty where none)."""
    keep = [j for j, (rec, _) in enumerate(prepared) if rec.lambda_plus is not None]
    mats = [permuted(np.asarray(prepared[j][1]), options.seed, prepared[j][0].name)
            for j in keep]
    dtypes = [prepared[j][0].dtype for j in keep]
    rand_specs = singular_values_many(
        mats, [DTYPE_EPS[d] for d in dtypes], loose_tol=options.loose_tol,
        method=options.method, device=options.device, noise_dtypes=dtypes)
    out = [np.zeros(0)] * len(prepared)
    for j, rand in zip(keep, rand_specs):
        rec = prepared[j][0]
        fit = mp_bulk_fit(rand.unit_sv, rec.N, rec.M)
        rec.rand_sv_max = float(rand.sv[0])
        rec.rand_lambda_plus = _eigenvalue_units(fit.lambda_plus, rand.exponent)
        rec.num_traps = fit.num_spikes
        roundoff = roundoff_criterion(rec.dtype)
        rec.rand_distance = esd_distance(
            specs[j].unit_sv, _unit_value(getattr(specs[j].tolerances, roundoff), specs[j]),
            rand.unit_sv, _unit_value(getattr(rand.tolerances, roundoff), rand))
        out[j] = rand.sv
    return out


def _unit_value(t: float, spec: Spectrum) -> float:
    """A singular-value threshold in the units of ``spec.unit_sv``."""
    return float(np.ldexp(t, -spec.exponent)) if spec.exponent else t


def analyze_source(source: WeightSource, options: AnalysisOptions,
                   progress: Optional[bool] = None, label: Optional[str] = None,
                   rand_spectra: Optional[List[np.ndarray]] = None,
                   names: Optional[Collection[str]] = None, parallel: bool = True
                   ) -> Tuple[List[MatrixRecord], List[np.ndarray], Counter]:
    """Records of every selected matrix of one source, their singular values, and the skip
    counts.

    Each parameter is read once; ``progress`` True/False forces the progress bar (stderr) on or
    off, None shows it only when stderr is a terminal. ``label`` names the model in the records
    (default: the source's own label). A ``rand_spectra`` list receives, aligned with the
    records, the singular values of each permuted matrix (``options.randomize``; else empty).
    ``names`` restricts the analysis to the planned matrices of those names (a part of the
    source, see :mod:`allennlp_analyze.tasks`); the skip counts are then the plan's for the
    whole source and those found in the part's parameters' values. ``parallel`` False analyzes
    one matrix after another in this thread with no other core lent (a task on an executor,
    whose workers are the parallelism). Matrices are analyzed largest first, records returned
    in the model's order; BLAS runs at one thread (with threadpoolctl), so that records do not
    depend on the worker count or the order."""
    label = label or source.label
    selection = plan_source(source, options, label)
    plans = selection.plans if names is None else [p for p in selection.plans if p.name in names]
    largest = max(plans, key=lambda p: limits.analysis_memory(*p.shape), default=None)
    if largest is not None:  # before any weight is read, let alone widened to float64
        limits.check_memory(limits.analysis_memory(*largest.shape),
                            f"{label}: {largest.name} ({max(largest.shape)} x {min(largest.shape)})")

    # a source may offer a copy-free read-only view for transient use (safetensors: mapped)
    load = getattr(source, "load_mapped", source.load)
    Item = Tuple[int, MatrixPlan, np.ndarray]

    def by_param() -> Iterator[Item]:
        """Each planned matrix with its data and its index in ``plans``, largest first; a
        parameter whose values show it is no weight (a 0/1 mask, a constant) is left out here,
        counted with the skipped ones."""
        loaded_name, loaded, not_weight = None, None, None
        for i in _largest_first(plans):
            p = plans[i]
            if p.param != loaded_name:
                loaded_name, loaded = p.param, load(p.param)
                not_weight = value_kind(loaded)
            if not_weight:
                selection.skipped[NOT_WEIGHT_VALUES[not_weight]] += 1
                continue
            yield i, p, extract(p, loaded)

    def batches() -> Iterator[List[Item]]:
        """Consecutive matrices of one oriented shape, as many as numpy needs to release the
        GIL in their stacked LAPACK call (one each for M > 500, or with spectrum's backend)."""
        batch: List[Item] = []
        key = None
        for item in by_param():
            W = item[2]
            shape = (max(W.shape), min(W.shape)) if W.ndim == 2 else None
            if batch and shape != key:
                yield batch
                batch = []
            batch.append(item)
            key = shape
            if shape is None or len(batch) >= batch_size(shape[1], options.device):
                yield batch
                batch = []
        if batch:
            yield batch

    workers = min(resolve_workers(options), max(1, len(plans))) if parallel else 1
    limited = options.device is None and _has_threadpoolctl()
    cores = _Cores(_cpu_count() if limited and parallel else 1, workers)

    def one(batch: List[Item]) -> List[Tuple[int, Tuple[MatrixRecord, np.ndarray, np.ndarray]]]:
        results = _analyze_many([(W, p.name, p.dtype, label, p.module_type, p.part)
                                 for _, p, W in batch], options, cores.lend)
        for (_, p, _), (rec, _, _) in zip(batch, results):
            rec.kind, rec.kind_from = p.kind, p.kind_from
        return [(i, result) for (i, _, _), result in zip(batch, results)]

    done: List[Optional[Tuple[MatrixRecord, np.ndarray, np.ndarray]]] = [None] * len(plans)
    # BLAS at one thread throughout (idle cores join through cores.lend): LAPACK's
    # tridiagonalization rounds differently on more threads, and results must not depend on
    # the worker count or on timing
    with _progress_bar(len(plans), label, progress) as bar, \
            _blas_threads(1 if limited else None), cores:
        for results in _bounded_map(one, batches(), workers, cores):
            for i, result in results:
                done[i] = result
                bar.update(1)
    if workers == 1:
        release_scratch()
    records, spectra = [], []
    for result in done:
        if result is None:  # left out by its values
            continue
        rec, sv, rand_sv = result
        records.append(rec)
        spectra.append(sv)
        if rand_spectra is not None:
            rand_spectra.append(rand_sv)
    return records, spectra, selection.skipped


def _largest_first(plans: List[MatrixPlan]) -> List[int]:
    """Indices of ``plans``, the costliest parameter's matrices first (an N x M matrix costs
    about N M^2 + 4 M^3: its Gram matrix and tridiagonalization), each parameter's matrices
    together and in model order, ties in model order: with the largest started first, the
    workers finish together."""
    groups: Dict[str, List[int]] = {}
    for i, p in enumerate(plans):
        groups.setdefault(p.param, []).append(i)

    def cost(i: int) -> float:
        N, M = max(plans[i].shape), min(plans[i].shape)
        return float(N) * M * M + 4.0 * float(M) ** 3

    ordered = sorted(groups.values(), key=lambda g: -sum(cost(i) for i in g))
    return [i for g in ordered for i in g]


class _Cores:
    """CPU cores that no matrix occupies, lent to the Gram panels of the matrices running
    (a :data:`~allennlp_analyze.spectrum.Parallel`): the cores beyond the workers, and once
    every matrix has been handed out (``drained``), those of the workers that finished. Busy
    threads never exceed the cores; results never depend on it (the panels are fixed by the
    matrix's shape)."""

    def __init__(self, cores: int, workers: int):
        self.cores, self.workers = cores, workers
        self.running = self.lent = 0
        self.drained = False
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(cores - 1) if cores > 1 else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown()
        return False

    def update(self, running: int = 0, drained: bool = False) -> None:
        with self._lock:
            self.running += running
            self.drained = self.drained or drained

    def lend(self, tasks: List[Callable[[], None]]) -> None:
        """Run independent ``tasks``, on as many free cores as there are (this thread too)."""
        with self._lock:
            busy = self.running if self.drained else self.workers
            n = max(0, min(self.cores - busy - self.lent, len(tasks) - 1)) if self._pool else 0
            self.lent += n
        pending = iter(tasks)
        lock = threading.Lock()

        def drain() -> None:
            while True:
                with lock:
                    task = next(pending, None)
                if task is None:
                    return
                task()

        helpers = [self._pool.submit(drain) for _ in range(n)]
        try:
            drain()
        finally:
            for h in helpers:
                h.result()
            with self._lock:
                self.lent -= n


def plan_source(source: WeightSource, options: AnalysisOptions,
                label: Optional[str] = None) -> Selection:
    """The plan of one source, from its tensor list (and its config, where it has one); a
    ``--match`` that selects none of its parameters is an :class:`AnalyzeError`."""
    tensors = source.tensors()
    selection = plan(tensors, options, getattr(source, "config", None))
    if options.match and selection.skipped.get("not matched by --match") == len(tensors):
        patterns = " ".join(repr(p) for p in options.match)
        raise AnalyzeError(f"no parameter of {label or source.label} matches --match {patterns}")
    return selection


@dataclass
class SourceResult:
    """One source's share of a run: what it was (``info``), its records, their spectra and,
    with ``randomize``, their permuted matrices' spectra."""

    info: SourceInfo
    records: List[MatrixRecord]
    spectra: List[np.ndarray]
    rand_spectra: List[np.ndarray]


#: What running the sources gives, source by source: (index of the source, its result or why
#: it failed), in the order they finish.
Outcomes = Iterator[Tuple[int, Union[SourceResult, Exception]]]


def analyze(*sources, options: Optional[AnalysisOptions] = None, progress: Optional[bool] = False,
            on_error: str = "raise", cache_dir: Optional[str] = None,
            keep_spectra: bool = False, opener: Optional[Callable[..., WeightSource]] = None,
            checkpoint_key: Optional[str] = None, executor: Optional[Executor] = None,
            scheduler: Optional[str] = None, journal: Optional[Union[str, os.PathLike]] = None,
            resume: bool = False, base=None, delta: bool = False, **option_kwargs) -> Analysis:
    """Analyze one or more models. Each source is a path or URL (AllenNLP archive or
    serialization directory, state-dict file, safetensors file or folder, Hugging Face folder),
    a ``torch.nn.Module``, a state dict, or a :class:`~allennlp_analyze.tensors.WeightSource`.

    Options come as an :class:`AnalysisOptions` or as its field names (``min_q=1.0``).
    ``on_error="raise"`` raises the first source's :class:`AnalyzeError`; ``"collect"`` records
    it in ``summary.errors`` (the run is then incomplete) and goes on with the other sources.
    ``keep_spectra`` keeps every matrix's singular values in ``Analysis.spectra`` (for plots),
    and with ``randomize`` those of its permuted matrix in ``Analysis.rand_spectra``.
    Models are labelled by their sources' labels, made unique with a suffix " #2", " #3"...
    where two sources share one (two ``model.safetensors`` from different folders).
    ``checkpoint_key`` picks the part of nested checkpoints to analyze (default: the rule of
    :mod:`allennlp_analyze.sources.checkpoint`); which part was taken is in ``summary.notes``.
    ``opener(spec, cache_dir=, progress=, checkpoint_key=)`` turns a source into a
    WeightSource (default :func:`allennlp_analyze.sources.open_source`); one model is held in
    memory at a time.

    ``executor`` (any :class:`concurrent.futures.Executor`, e.g. a Dask client's
    ``get_executor()`` or a process pool) or ``scheduler`` (a Dask scheduler's address,
    ``"tcp://host:8786"``; needs ``allennlp-analyze[dask]``) runs the sources there as tasks
    that each open their source themselves (paths and URLs only; see
    :mod:`allennlp_analyze.tasks`); the result is the local run's, bit for bit.
    ``journal``: a JSON-lines sweep file (:mod:`allennlp_analyze.journal`) that gets each
    source's records as soon as the source is complete; with ``resume`` the sources already
    complete in it are taken from it instead of being analyzed again.
    ``base``: a base model (any source) that each source is compared with, matrix by matrix
    (:mod:`allennlp_analyze.compare`: the records' base fields, ``summary.base``); ``delta``
    also analyzes each pair's W - W_base as a matrix (records ``delta:<name>``). Locally only,
    without a journal.
    """
    if opener is None:
        from .sources import open_source as opener

    options = options_from(options, option_kwargs)
    if on_error not in ("raise", "collect"):
        raise ValueError("on_error must be 'raise' or 'collect'")
    if executor is not None and scheduler is not None:
        raise ValueError("pass either executor= or scheduler=, not both")
    if resume and (journal is None or keep_spectra):
        raise ValueError("resume=True needs journal= and keeps no spectra (keep_spectra=False)")
    if delta and base is None:
        raise ValueError("delta=True needs base=")
    if base is not None and (executor is not None or scheduler is not None or journal):
        raise AnalyzeError("--base runs locally and without a JSON-lines journal")
    names = [_source_name(spec) for spec in sources]
    if journal is not None and None in names:
        raise ValueError("a journal needs every source named by a path or URL")
    results: List[Optional[SourceResult]] = [None] * len(sources)
    errors: Dict[int, str] = {}
    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            from .integrations.dask import scheduler_executor

            executor = stack.enter_context(scheduler_executor(scheduler))
        log = None if journal is None else \
            stack.enter_context(Journal(journal, options, resume, checkpoint_key))
        todo = []
        for i, name in enumerate(names):
            done = None if log is None else log.take(name)
            if done is None:
                todo.append(i)
            else:
                empty = [np.zeros(0) for _ in done[1]]
                results[i] = SourceResult(done[0], done[1], empty, empty)
        base_run = None
        if base is not None:
            from .base_run import open_base

            base_run = open_base(base, options, opener, delta, cache_dir=cache_dir,
                                 progress=progress, checkpoint_key=checkpoint_key)
        if executor is None:
            outcomes = _run_here(sources, todo, options, opener=opener, cache_dir=cache_dir,
                                 progress=progress, checkpoint_key=checkpoint_key,
                                 base=base_run)
        else:
            from .tasks import run_tasks

            outcomes = run_tasks(executor, sources, todo, options, opener=opener,
                                 cache_dir=cache_dir, progress=progress,
                                 checkpoint_key=checkpoint_key, keep_spectra=keep_spectra)
        for i, outcome in stack.enter_context(contextlib.closing(outcomes)):
            if isinstance(outcome, SourceResult):
                outcome = replace(outcome, info=replace(outcome.info, source=names[i]))
                results[i] = outcome
                if log is not None:
                    log.append(outcome.info, outcome.records)
            elif on_error == "raise":
                raise outcome
            else:
                errors[i] = str(outcome)
        result = _assemble(results, [errors[i] for i in sorted(errors)], options, keep_spectra)
        if base_run is not None:
            result.summary.base = base_run.summary(result.records)
        if log is not None:
            log.finish(options, result.sources, result.records)
    return result


def one_source(source: WeightSource, options: AnalysisOptions, progress: Optional[bool] = False,
               names: Optional[Collection[str]] = None, parallel: bool = True) -> SourceResult:
    """:func:`analyze_source` of one opened source as its share of a run (records labelled
    with the source's own label)."""
    rand_spectra: List[np.ndarray] = []
    recs, svs, skips = analyze_source(source, options, progress=progress,
                                      rand_spectra=rand_spectra, names=names, parallel=parallel)
    adapter = adapter_of(source)
    if adapter is not None and names is None:  # a LoRA adapter's modules, after its tensors
        lora_recs, lora_svs = adapter_records(adapter, options)
        recs, svs = recs + lora_recs, svs + lora_svs
        rand_spectra.extend(np.zeros(0) for _ in lora_recs)
    info = SourceInfo(None, source.label, source.label, len(recs), dict(skips),
                      getattr(source, "note", None))
    return SourceResult(info, recs, svs, rand_spectra)


def _run_here(sources: tuple, todo: List[int], options: AnalysisOptions, *,
              opener: Callable[..., WeightSource], cache_dir: Optional[str],
              progress: Optional[bool], checkpoint_key: Optional[str], base=None) -> Outcomes:
    """The sources ``todo`` analyzed in this process, one after another (each compared with
    ``base``, a :class:`~allennlp_analyze.base_run.BaseRun`, while it is open)."""
    for i in todo:
        try:
            source = open_one(sources[i], opener, cache_dir=cache_dir, progress=progress,
                              checkpoint_key=checkpoint_key)
            if base is not None:
                source = base.prepare(source)
            result = one_source(source, options, progress)
            if base is not None:
                result = base.compare(result, source)
        except AnalyzeError as e:
            yield i, e
            continue
        del source
        yield i, result


def _assemble(results: List[Optional[SourceResult]], errors: List[str], options: AnalysisOptions,
              keep_spectra: bool) -> Analysis:
    """The run from its sources' results (None: failed) in order: models labelled uniquely."""
    records: List[MatrixRecord] = []
    spectra: List[np.ndarray] = []
    rand_spectra: List[np.ndarray] = []
    skipped: Counter = Counter()
    infos: List[SourceInfo] = []
    for res in results:
        if res is None:
            continue
        model = _unique(escape(res.info.label), [info.model for info in infos])  # one line
        infos.append(replace(res.info, model=model))
        records.extend(replace(rec, model=model) for rec in res.records)
        spectra.extend(res.spectra)
        rand_spectra.extend(res.rand_spectra)
        skipped.update(res.info.skipped)
    labels = [info.model for info in infos]
    notes = [f"{info.model}: {info.note}" for info in infos if info.note]
    return Analysis(records=records, summary=summarize(records, skipped, labels, errors, notes),
                    options=options, spectra=spectra if keep_spectra else None,
                    rand_spectra=rand_spectra if keep_spectra and options.randomize else None,
                    sources=infos)


def _source_name(spec) -> Optional[str]:
    """How a source given as a path or URL is named (its key in a journal); None otherwise."""
    if isinstance(spec, (str, os.PathLike)):
        return os.fsdecode(os.fspath(spec))
    return None


def options_from(options: Optional[AnalysisOptions], option_kwargs: Dict[str, object]
                 ) -> AnalysisOptions:
    """``options``, or the options named by keyword (not both)."""
    if options is None:
        return AnalysisOptions(**option_kwargs)
    if option_kwargs:
        raise TypeError("pass either options= or option keywords, not both")
    return options


def for_each_source(sources, fn: Callable[[WeightSource, str], None], *,
                    opener: Optional[Callable[..., WeightSource]] = None, on_error: str = "raise",
                    cache_dir: Optional[str] = None, progress: Optional[bool] = False,
                    checkpoint_key: Optional[str] = None
                    ) -> Tuple[List[str], List[str], List[str]]:
    """``fn(source, label)`` for each source opened in turn (one in memory at a time), labels
    made unique; returns the labels of the sources done, the errors collected (with
    ``on_error="collect"``; ``"raise"`` raises the first :class:`AnalyzeError`) and the
    sources' notes (e.g. which part of a nested checkpoint was read)."""
    if opener is None:
        from .sources import open_source as opener
    if on_error not in ("raise", "collect"):
        raise ValueError("on_error must be 'raise' or 'collect'")
    labels: List[str] = []
    errors: List[str] = []
    notes: List[str] = []
    for spec in sources:
        try:
            source = open_one(spec, opener, cache_dir=cache_dir, progress=progress,
                              checkpoint_key=checkpoint_key)
            label = _unique(escape(source.label), labels)  # a display name: one line
            fn(source, label)
        except AnalyzeError as e:
            if on_error == "raise":
                raise
            errors.append(str(e))
            continue
        labels.append(label)
        if getattr(source, "note", None):
            notes.append(f"{label}: {source.note}")
        del source
    return labels, errors, notes


def open_one(spec, opener: Callable[..., WeightSource], **kwargs) -> WeightSource:
    """``spec`` itself where it is a WeightSource already, else ``opener(spec, **kwargs)``."""
    if hasattr(spec, "load") and hasattr(spec, "tensors"):
        return spec
    return opener(spec, **kwargs)


def _unique(label: str, taken: List[str]) -> str:
    """``label``, or ``label #k`` with the smallest k >= 2 not in ``taken``."""
    k, unique = 1, label
    while unique in taken:
        k += 1
        unique = f"{label} #{k}"
    return unique


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _has_threadpoolctl() -> bool:
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_workers(options: AnalysisOptions) -> int:
    """Matrices analyzed at once: ``options.workers``, or for 0 one per CPU core (at most 8)
    when threadpoolctl can keep BLAS at one thread per worker, else 1 (BLAS's own threads).
    Torch devices get 1."""
    if options.workers:
        return options.workers
    if options.device is not None or not _has_threadpoolctl():
        return 1
    return max(1, min(_cpu_count(), 8))


def _blas_threads(limit: Optional[int]):
    """Limit BLAS/LAPACK to ``limit`` threads (each) while active, via threadpoolctl; no-op for
    None or without threadpoolctl (explicit ``workers`` > 1 then shares the cores with BLAS's own
    threads)."""
    if limit is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")


def _bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                 cores: Optional[_Cores] = None) -> Iterator[R]:
    """``fn`` of each of ``items``, yielded as they complete, ``workers`` at a time, holding at
    most ``workers`` items (the next is taken as soon as any finishes: a large matrix never
    holds a worker idle behind it); ``cores`` learns how many run and when the last one was
    handed out.
    Each thread reuses its spectral working buffers (``spectrum.enable_scratch``); worker
    threads drop theirs when they end, the caller's thread must ``release_scratch()``."""
    cores = cores or _Cores(1, workers)
    if workers == 1:
        enable_scratch()
        yield from map(fn, items)
        return

    def run(item: T) -> R:
        try:
            return fn(item)
        finally:
            cores.update(running=-1)

    with ThreadPoolExecutor(workers, initializer=enable_scratch) as pool:
        pending: Set[Future] = set()
        for item in items:
            cores.update(running=1)
            pending.add(pool.submit(run, item))
            if len(pending) >= workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        cores.update(drained=True)
        for future in as_completed(pending):
            yield future.result()


class _NoBar:
    total = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        pass

    def refresh(self) -> None:
        pass


def _progress_bar(total: int, label: str, progress: Optional[bool], unit: str = "matrix"):
    """A tqdm bar over matrices (or ``unit``) on stderr: shown when ``progress`` is True, or
    when it is None and stderr is a terminal; a no-op when tqdm is not installed."""
    show = sys.stderr.isatty() if progress is None else progress
    try:
        from tqdm import tqdm
    except ImportError:
        show = False
    if not show:
        return _NoBar()
    return tqdm(total=total, desc=escape(label), unit=unit, file=sys.stderr, leave=False)
