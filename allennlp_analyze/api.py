"""The Python API: :func:`analyze` runs one or more sources (here, one after another, or as
tasks on an executor) into an :class:`Analysis`; :func:`for_each_source` opens sources in turn.

    >>> from allennlp_analyze import analyze
    >>> result = analyze("model.tar.gz", min_q=1.1)
    >>> result.summary.collapsed["loose"], result.to_dicts()[0]["alpha"]
"""

import contextlib
import os
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from .errors import AnalyzeError, escape
from .journal import Journal
from .options import AnalysisOptions
from .records import MatrixRecord, SourceInfo, Summary, summarize
from .source_run import Outcomes, SourceResult, one_source, source_name
from .tensors import WeightSource


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


def analyze(
    *sources,
    options: Optional[AnalysisOptions] = None,
    progress: Optional[bool] = False,
    on_error: str = "raise",
    cache_dir: Optional[str] = None,
    keep_spectra: bool = False,
    opener: Optional[Callable[..., WeightSource]] = None,
    checkpoint_key: Optional[str] = None,
    executor: Optional[Executor] = None,
    scheduler: Optional[str] = None,
    journal: Optional[Union[str, os.PathLike]] = None,
    resume: bool = False,
    base=None,
    delta: bool = False,
    **option_kwargs,
) -> Analysis:
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
    also analyzes each pair's W - W_base as a matrix (records ``delta:<name>``). The base is
    analyzed here, once; on an executor the comparisons run in the sources' tasks, which open
    the base themselves, so it must be named by a path or URL there (the result is the local
    run's, bit for bit). With a journal the base must be named by a path or URL too, which the
    journal's header keeps, so that a run is resumed only against the same base.
    """
    open_fn = opener if opener is not None else _default_opener()
    options = options_from(options, option_kwargs)
    if on_error not in ("raise", "collect"):
        raise ValueError("on_error must be 'raise' or 'collect'")
    if executor is not None and scheduler is not None:
        raise ValueError("pass either executor= or scheduler=, not both")
    if resume and (journal is None or keep_spectra):
        raise ValueError("resume=True needs journal= and keeps no spectra (keep_spectra=False)")
    if delta and base is None:
        raise ValueError("delta=True needs base=")
    remote = executor is not None or scheduler is not None
    if base is not None and remote and source_name(base) is None:
        raise ValueError(
            "a run on an executor needs the base named by a path or URL, which each task "
            f"opens itself, not a {type(base).__name__}"
        )
    names = [source_name(spec) for spec in sources]
    if journal is not None and None in names:
        raise ValueError("a journal needs every source named by a path or URL")
    compared: Optional[Dict[str, object]] = None
    if base is not None and journal is not None:
        if source_name(base) is None:
            raise ValueError("a journal needs the base named by a path or URL")
        compared = {"base": source_name(base), "delta": delta}
    results: List[Optional[SourceResult]] = [None] * len(sources)
    errors: Dict[int, str] = {}
    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            from .integrations.dask import scheduler_executor

            executor = stack.enter_context(scheduler_executor(scheduler))
        log = (
            None
            if journal is None
            else stack.enter_context(Journal(journal, options, resume, checkpoint_key, compared))
        )
        todo = []
        for i, name in enumerate(names):
            done = None if log is None or name is None else log.take(name)
            if done is None:
                todo.append(i)
            else:
                empty = [np.zeros(0) for _ in done[1]]
                results[i] = SourceResult(done[0], done[1], empty, empty)
        base_run = None
        if base is not None:
            from .base_run import open_base

            base_run = open_base(
                open_one(
                    base,
                    open_fn,
                    cache_dir=cache_dir,
                    progress=progress,
                    checkpoint_key=checkpoint_key,
                ),
                options,
                delta,
                progress,
                source_name(base),
            )
        if executor is None:
            outcomes = _run_here(
                sources,
                todo,
                options,
                opener=open_fn,
                cache_dir=cache_dir,
                progress=progress,
                checkpoint_key=checkpoint_key,
                base=base_run,
            )
        else:
            from .tasks import run_tasks

            outcomes = run_tasks(
                executor,
                sources,
                todo,
                options,
                opener=open_fn,
                cache_dir=cache_dir,
                progress=progress,
                checkpoint_key=checkpoint_key,
                keep_spectra=keep_spectra,
                base=base_run,
            )
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


def _run_here(
    sources: tuple,
    todo: List[int],
    options: AnalysisOptions,
    *,
    opener: Callable[..., WeightSource],
    cache_dir: Optional[str],
    progress: Optional[bool],
    checkpoint_key: Optional[str],
    base=None,
) -> Outcomes:
    """The sources ``todo`` analyzed in this process, one after another (each compared with
    ``base``, a :class:`~allennlp_analyze.base_run.BaseRun`, while it is open)."""
    for i in todo:
        try:
            source = open_one(
                sources[i],
                opener,
                cache_dir=cache_dir,
                progress=progress,
                checkpoint_key=checkpoint_key,
            )
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


def _assemble(
    results: List[Optional[SourceResult]],
    errors: List[str],
    options: AnalysisOptions,
    keep_spectra: bool,
) -> Analysis:
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
    return Analysis(
        records=records,
        summary=summarize(records, skipped, labels, errors, notes),
        options=options,
        spectra=spectra if keep_spectra else None,
        rand_spectra=rand_spectra if keep_spectra and options.randomize else None,
        sources=infos,
    )


def options_from(
    options: Optional[AnalysisOptions], option_kwargs: Dict[str, Any]
) -> AnalysisOptions:
    """``options``, or the options named by keyword (not both)."""
    if options is None:
        return AnalysisOptions(**option_kwargs)
    if option_kwargs:
        raise TypeError("pass either options= or option keywords, not both")
    return options


def for_each_source(
    sources,
    fn: Callable[[WeightSource, str], None],
    *,
    opener: Optional[Callable[..., WeightSource]] = None,
    on_error: str = "raise",
    cache_dir: Optional[str] = None,
    progress: Optional[bool] = False,
    checkpoint_key: Optional[str] = None,
) -> Tuple[List[str], List[str], List[str]]:
    """``fn(source, label)`` for each source opened in turn (one in memory at a time), labels
    made unique; returns the labels of the sources done, the errors collected (with
    ``on_error="collect"``; ``"raise"`` raises the first :class:`AnalyzeError`) and the
    sources' notes (e.g. which part of a nested checkpoint was read)."""
    open_fn = opener if opener is not None else _default_opener()
    if on_error not in ("raise", "collect"):
        raise ValueError("on_error must be 'raise' or 'collect'")
    labels: List[str] = []
    errors: List[str] = []
    notes: List[str] = []
    for spec in sources:
        try:
            source = open_one(
                spec, open_fn, cache_dir=cache_dir, progress=progress, checkpoint_key=checkpoint_key
            )
            label = _unique(escape(source.label), labels)  # a display name: one line
            fn(source, label)
        except AnalyzeError as e:
            if on_error == "raise":
                raise
            errors.append(str(e))
            continue
        labels.append(label)
        note = getattr(source, "note", None)
        if note:
            notes.append(f"{label}: {note}")
        del source
    return labels, errors, notes


def _default_opener() -> Callable[..., WeightSource]:
    """:func:`allennlp_analyze.sources.open_source` (imported when first needed)."""
    from .sources import open_source

    return open_source


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
