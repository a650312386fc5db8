"""One source to its records: the plan of its tensors (:func:`plan_source`), each selected
matrix read once and analyzed, largest first, on the scheduler's workers
(:func:`analyze_source`), and a source's share of a run (:class:`SourceResult`,
:func:`one_source`).
"""

import os
from collections import Counter
from dataclasses import dataclass
from typing import Collection, Dict, Generator, Iterator, List, Optional, Tuple, Union

import numpy as np

from . import limits
from .errors import AnalyzeError
from .kinds import value_kind
from .matrix import analyze_many
from .options import AnalysisOptions
from .quantized import decoded_as_read, readable
from .records import MatrixRecord, SourceInfo
from .scheduler import (
    Cores,
    blas_threads,
    bounded_map,
    cpu_count,
    has_threadpoolctl,
    progress_bar,
    resolve_workers,
)
from .selection import NOT_WEIGHT_VALUES, MatrixPlan, Selection, extract, plan
from .sources.lora import adapter_of, adapter_records
from .spectrum import batch_size, release_scratch
from .tensors import WeightSource


def analyze_source(
    source: WeightSource,
    options: AnalysisOptions,
    progress: Optional[bool] = None,
    label: Optional[str] = None,
    rand_spectra: Optional[List[np.ndarray]] = None,
    names: Optional[Collection[str]] = None,
    parallel: bool = True,
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
    stored = {t.name: t.stored_name for t in source.tensors() if t.stored_name}
    plans = selection.plans if names is None else [p for p in selection.plans if p.name in names]
    largest = max(plans, key=lambda p: limits.analysis_memory(*p.shape), default=None)
    if largest is not None:  # before any weight is read, let alone widened to float64
        N, M = max(largest.shape), min(largest.shape)
        limits.check_memory(
            limits.analysis_memory(*largest.shape), f"{label}: {largest.name} ({N} x {M})"
        )

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
            if loaded is None or p.param != loaded_name:
                loaded_name, loaded = p.param, readable(load(p.param))
                not_weight = None if decoded_as_read(loaded) else value_kind(loaded)
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
    limited = options.device is None and has_threadpoolctl()
    cores = Cores(cpu_count() if limited and parallel else 1, workers)

    def one(batch: List[Item]) -> List[Tuple[int, Tuple[MatrixRecord, np.ndarray, np.ndarray]]]:
        results = analyze_many(
            [(W, p.name, p.dtype, label, p.module_type, p.part) for _, p, W in batch],
            options,
            cores.lend,
        )
        for (_, p, _), (rec, _, _) in zip(batch, results):
            rec.kind, rec.kind_from = p.kind, p.kind_from
            rec.stored_name = stored.get(p.param)
        return [(i, result) for (i, _, _), result in zip(batch, results)]

    done: List[Optional[Tuple[MatrixRecord, np.ndarray, np.ndarray]]] = [None] * len(plans)
    # BLAS at one thread throughout (idle cores join through cores.lend): LAPACK's
    # tridiagonalization rounds differently on more threads, and results must not depend on
    # the worker count or on timing
    with (
        progress_bar(len(plans), label, progress) as bar,
        blas_threads(1 if limited else None),
        cores,
    ):
        for results in bounded_map(one, batches(), workers, cores):
            for i, result in results:
                done[i] = result
                bar.update(1)
    if workers == 1:
        release_scratch()
    records, spectra = [], []
    for entry in done:
        if entry is None:  # left out by its values
            continue
        rec, sv, rand_sv = entry
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


def plan_source(
    source: WeightSource, options: AnalysisOptions, label: Optional[str] = None
) -> Selection:
    """The plan of one source, from its tensor list (and its config, where it has one); a
    ``--match`` that selects none of its parameters is an :class:`AnalyzeError`."""
    tensors = source.tensors()
    selection = plan(
        tensors, options, getattr(source, "config", None), getattr(source, "context", None)
    )
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
Outcomes = Generator[Tuple[int, Union[SourceResult, Exception]], None, None]


def one_source(
    source: WeightSource,
    options: AnalysisOptions,
    progress: Optional[bool] = False,
    names: Optional[Collection[str]] = None,
    parallel: bool = True,
) -> SourceResult:
    """:func:`analyze_source` of one opened source as its share of a run (records labelled
    with the source's own label)."""
    rand_spectra: List[np.ndarray] = []
    recs, svs, skips = analyze_source(
        source,
        options,
        progress=progress,
        rand_spectra=rand_spectra,
        names=names,
        parallel=parallel,
    )
    adapter = adapter_of(source)
    if adapter is not None and names is None:  # a LoRA adapter's modules, after its tensors
        lora_recs, lora_svs = adapter_records(adapter, options)
        recs, svs = recs + lora_recs, svs + lora_svs
        rand_spectra.extend(np.zeros(0) for _ in lora_recs)
    info = SourceInfo(
        None, source.label, source.label, len(recs), dict(skips), getattr(source, "note", None)
    )
    return SourceResult(info, recs, svs, rand_spectra)


def source_name(spec) -> Optional[str]:
    """How a source given as a path or URL is named (its key in a journal); None otherwise."""
    if isinstance(spec, (str, os.PathLike)):
        return os.fsdecode(os.fspath(spec))
    return None
