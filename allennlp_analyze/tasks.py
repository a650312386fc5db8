"""A run as tasks on a :class:`concurrent.futures.Executor`: a Dask cluster's
(``Client.get_executor()``, or ``--scheduler``), a process pool, any other.

Tasks carry names, never weights: a source's path or URL, the names of the matrices to analyze
and the options. Each task opens its source itself, so a worker must see the same paths as the
client (relative ones are made absolute against the client's working directory).

The split, decided from the metadata-first plan (:func:`allennlp_analyze.selection.plan` over
the source's tensor list, no weights read) by :func:`split`:

* every source first gets one task, which opens it and plans it; if the source is small or must
  be read whole anyway, that task analyzes it and returns its records (one task per source: a
  zoo of many small models);
* a source whose planned work (sum of N * M**2 over its matrices, the multiply-adds of their
  Gram matrices) is at least ``2 * PART_COST`` and that reads its tensors one by one
  (safetensors, single or sharded) is split instead into parts of consecutive parameters of at
  least ``PART_COST`` each (one matrix each for large ones), one task per part (one large
  checkpoint).

``PART_COST`` = 2e9 is about 0.2 s of one core (a 3072 x 768 matrix is 1.8e9), tens of times a
Dask task's overhead (milliseconds: ``benchmarks/dask_zoo.py`` prints it), so a source is split
only where its work pays for that. A part never splits a parameter (its matrices, e.g. q/k/v,
are read together).

Each task analyzes its matrices one at a time with BLAS on one thread; the engine's worker
threads are the parallelism, so give it one per core. Results are gathered in the local run's
order and are its results bit for bit on the same machine: the same plans and the same spectral
calls (a stacked batch of ``singular_values_many`` equals its matrices one by one) on BLAS with
one thread per matrix, as the local run has it when it analyzes several matrices at once on up
to 8 cores. BLAS's thread count changes values at round-off (measured: about 1e-14 relative on
MiniLM's 1536 x 384 matrices, 1 against 2 OpenBLAS threads), so a local run that gives a matrix
more threads (a source of one matrix, with BLAS's default threads; more than 8 cores) agrees
with a task to round-off only, unless ``OPENBLAS_NUM_THREADS=1``.
With a base (``--base``) the comparisons run in the tasks too (:func:`run_tasks`).
A thread pool as the executor shares one BLAS setting between its tasks: run it with one BLAS
thread set in the environment. A task that fails fails its source, reported as locally; the
other sources go on.
"""

import os
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from collections import Counter
from dataclasses import dataclass, replace
from itertools import groupby
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .base_run import BaseRun, matrix_loader
from .compare import Comparison, Pairing, Side, pair_records
from .errors import AnalyzeError, one_line
from .options import AnalysisOptions
from .records import MatrixRecord, SourceInfo
from .scheduler import blas_threads, progress_bar
from .selection import MatrixPlan
from .source_run import Outcomes, SourceResult, one_source, plan_source, source_name
from .tensors import WeightSource

#: Planned work (sum of N * M**2) of one part of a split source; see the module docstring.
PART_COST = 2e9


@dataclass
class _Parts:
    """A source task's answer for a source to split: the parts, and what the plan knows."""

    label: str
    parts: List[List[str]]
    skipped: Dict[str, int]
    note: Optional[str]


def cost(p: MatrixPlan) -> int:
    """The planned work of one matrix: N * M**2 (N >= M), the multiply-adds of its Gram."""
    N, M = max(p.shape), min(p.shape)
    return N * M * M


def split(plans: Sequence[MatrixPlan], reads_one_by_one: bool) -> List[List[str]]:
    """The parts of a source's plan as lists of matrix names, in plan order: the whole plan as
    one part, unless the source reads its tensors one by one and the plan's work is at least
    ``2 * PART_COST``; then consecutive parameters, a part closed as soon as it reaches
    ``PART_COST`` (the last one may be smaller)."""
    if not reads_one_by_one or sum(cost(p) for p in plans) < 2 * PART_COST:
        return [[p.name for p in plans]]
    parts: List[List[str]] = []
    current: List[str] = []
    work = 0
    for _, group in groupby(plans, key=lambda p: p.param):
        for p in group:
            current.append(p.name)
            work += cost(p)
        if work >= PART_COST:
            parts.append(current)
            current, work = [], 0
    if current:
        parts.append(current)
    return parts


def reads_one_by_one(source: WeightSource) -> bool:
    """Whether opening ``source`` reads no weights, so that a task can read just its own
    tensors: safetensors files and sharded checkpoints, which offer ``load_mapped``. Archives,
    pickles and built models are read whole when opened; they stay one task."""
    return hasattr(source, "load_mapped")


def source_task(
    spec: str,
    options: AnalysisOptions,
    open_kwargs: dict,
    opener: Callable[..., WeightSource],
    keep_spectra: bool,
    base: Optional[BaseRun] = None,
) -> Union[SourceResult, _Parts, AnalyzeError]:
    """On a worker: open and plan one source; analyze it whole (and compare it with ``base``,
    opened here), or say how to split it."""
    try:
        source = opener(spec, progress=False, **open_kwargs)
        if base is not None:
            base = _reopened(base, opener, open_kwargs)
            source = base.prepare(source)  # a LoRA adapter merged: read whole
        selection = plan_source(source, options)
        parts = split(selection.plans, reads_one_by_one(source))
        if len(parts) > 1:
            return _Parts(
                source.label, parts, dict(selection.skipped), getattr(source, "note", None)
            )
        with blas_threads(1):
            result = one_source(source, options, parallel=False)
            if base is not None:
                result = base.compare(result, source, parallel=False)
    except AnalyzeError as e:
        return e
    return _kept(result, keep_spectra)


def part_task(
    spec: str,
    names: List[str],
    options: AnalysisOptions,
    open_kwargs: dict,
    opener: Callable[..., WeightSource],
    keep_spectra: bool,
) -> Union[SourceResult, AnalyzeError]:
    """On a worker: the share of the matrices ``names`` of one source (its skip counts: the
    plan's and those found in these parameters' values)."""
    try:
        source = opener(spec, progress=False, **open_kwargs)
        with blas_threads(1):
            result = one_source(source, options, names=set(names), parallel=False)
    except AnalyzeError as e:
        return e
    return _kept(result, keep_spectra)


def compare_task(
    spec: str,
    model: SourceResult,
    pairing: Pairing,
    base: BaseRun,
    options: AnalysisOptions,
    open_kwargs: dict,
    opener: Callable[..., WeightSource],
) -> Union[Comparison, AnalyzeError]:
    """On a worker: a part's records (``model``, with their spectra) compared with ``base``
    (opened here), the pairs of ``pairing``: the whole source's pairing, restricted to them."""
    try:
        source = opener(spec, progress=False, **open_kwargs)
        side = Side(model.records, model.spectra, matrix_loader(source, options))
        with blas_threads(1):
            return _reopened(base, opener, open_kwargs).compare_share(side, pairing, False)
    except AnalyzeError as e:
        return e


def _reopened(base: BaseRun, opener: Callable[..., WeightSource], open_kwargs: dict) -> BaseRun:
    """A shipped base, opened on this worker."""
    return base.reopened(opener(base.spec, progress=False, **open_kwargs))


def _kept(result: SourceResult, keep_spectra: bool) -> SourceResult:
    """``result``, its spectra dropped unless kept."""
    return result if keep_spectra else replace(result, spectra=[], rand_spectra=[])


def run_tasks(
    executor: Executor,
    sources: Sequence,
    todo: List[int],
    options: AnalysisOptions,
    *,
    opener: Callable[..., WeightSource],
    cache_dir: Optional[str],
    progress: Optional[bool],
    checkpoint_key: Optional[str],
    keep_spectra: bool,
    base: Optional[BaseRun] = None,
) -> Outcomes:
    """The sources ``todo`` (indexes into ``sources``: paths or URLs) run on ``executor``;
    yields each source's result or error as soon as all its tasks are done. Tasks still
    pending when the caller stops are cancelled. With ``base`` (named by a path or URL) each
    source is compared with it in its tasks: a source analyzed whole in its source task; a
    split one, once its parts are analyzed (their spectra returned), paired as a whole here
    and compared part by part in one more task each."""
    specs = {i: _task_spec(sources[i]) for i in todo}
    open_kwargs = {"cache_dir": cache_dir, "checkpoint_key": checkpoint_key}
    shipped = None if base is None else base.shipped(_task_spec(base.spec))
    pending: Dict[Future, tuple] = {}
    parts: Dict[int, list] = {}
    split_as: Dict[int, _Parts] = {}
    compared: Dict[int, Tuple[BaseRun, SourceResult, Pairing, list]] = {}

    def submit(fn, *args, key) -> None:
        pending[executor.submit(fn, *args)] = key

    def compare_parts(
        i: int, whole: SourceResult, analyzed: List[SourceResult], base: BaseRun
    ) -> None:
        """A split source's parts compared with ``base``, one task each, paired as a whole
        (as locally: pairing sees all the source's records)."""
        pairing = pair_records(whole.records, base.records)
        compared[i] = base, whole, pairing, [None] * len(analyzed)
        start = 0
        for c, answer in enumerate(analyzed):
            stop = start + len(answer.records)
            part = pairing.part(start, stop)
            args = (answer, part, base, options, open_kwargs, opener)
            submit(compare_task, specs[i], *args, key=(i, None, c))
            start = stop

    for i in todo:
        submit(
            source_task,
            specs[i],
            options,
            open_kwargs,
            opener,
            keep_spectra,
            shipped,
            key=(i, None, None),
        )
    try:
        with progress_bar(len(todo), f"{len(todo)} sources", progress, unit="task") as bar:
            while pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in done:
                    i, k, c = pending.pop(future)
                    bar.update(1)
                    out = _result(future, sources[i])
                    if c is not None:
                        compared[i][3][c] = out
                        if all(p is not None for p in compared[i][3]):
                            yield i, _compared(*compared.pop(i), keep_spectra)
                    elif k is not None:
                        parts[i][k] = out
                        if all(p is not None for p in parts[i]):
                            joined, analyzed = _joined(split_as[i], parts.pop(i))
                            if shipped is None or isinstance(joined, AnalyzeError):
                                yield i, joined
                            else:
                                compare_parts(i, joined, analyzed, shipped)
                                bar.total += len(analyzed)
                                bar.refresh()
                    elif isinstance(out, _Parts):
                        split_as[i], parts[i] = out, [None] * len(out.parts)
                        for k, names in enumerate(out.parts):
                            submit(
                                part_task,
                                specs[i],
                                names,
                                options,
                                open_kwargs,
                                opener,
                                keep_spectra or shipped is not None,
                                key=(i, k, None),
                            )
                        bar.total += len(out.parts)
                        bar.refresh()
                    else:
                        yield i, out
    finally:
        for future in pending:
            future.cancel()


def _compared(
    base: BaseRun,
    whole: SourceResult,
    pairing: Pairing,
    answers: List[Union[Comparison, AnalyzeError]],
    keep_spectra: bool,
) -> Union[SourceResult, AnalyzeError]:
    """A split source's result (``whole``, its parts' analyses joined) with its parts'
    comparisons (in part order); the first failing part's error if any failed."""
    records: List[MatrixRecord] = []
    deltas: Dict[int, Tuple[MatrixRecord, np.ndarray]] = {}
    for answer in answers:
        if isinstance(answer, AnalyzeError):
            return answer
        deltas.update({len(records) + k: d for k, d in answer.deltas.items()})
        records += answer.records
    return _kept(base.with_comparison(whole, Comparison(records, pairing, deltas)), keep_spectra)


def _result(future: Future, spec) -> "Union[SourceResult, _Parts, AnalyzeError]":
    """A task's answer; a task that raised (a worker lost for good, a package missing on a
    worker) is its source's :class:`AnalyzeError`, its cause chained."""
    try:
        return future.result()
    except Exception as e:
        error = AnalyzeError(
            f"{spec}: a task failed on the executor ({type(e).__name__}: {one_line(e)})"
        )
        error.__cause__ = e
        return error


def _joined(
    how: _Parts, answers: List[Union[SourceResult, AnalyzeError]]
) -> Tuple[Union[SourceResult, AnalyzeError], List[SourceResult]]:
    """A split source's result from its parts' answers (in part order), and the parts'
    results; its first failing part's error (in plan order, as locally) if any failed. The
    skip counts are the plan's, then those that the parts found in their parameters' values,
    in part order (as locally, where they are counted while the parameters are read in plan
    order)."""
    done = [a for a in answers if isinstance(a, SourceResult)]
    for answer in answers:
        if isinstance(answer, AnalyzeError):
            return answer, done
    skipped = Counter(how.skipped)
    for answer in done:
        for reason, n in answer.info.skipped.items():
            if n > how.skipped.get(reason, 0):
                skipped[reason] += n - how.skipped.get(reason, 0)
    records = [r for a in done for r in a.records]
    info = SourceInfo(None, how.label, how.label, len(records), dict(skipped), how.note)
    whole = SourceResult(
        info,
        records,
        [sv for a in done for sv in a.spectra],
        [sv for a in done for sv in a.rand_spectra],
    )
    return whole, done


def _task_spec(spec) -> str:
    """A source as a task names it: a path or URL string, local relative paths made absolute."""
    text = source_name(spec)
    if text is None:
        raise TypeError(
            f"a run on an executor takes paths or URLs, which each worker opens "
            f"itself, not a {type(spec).__name__}"
        )
    return text if "://" in text or os.path.isabs(text) else os.path.abspath(text)
