"""``--base``: a run's sources compared with one base model, matrix by matrix.

The base is opened and analyzed once (:func:`open_base`; kept open, so that its matrices can be
read again pair by pair); each source's records are then paired with the base's and given their
base fields (:func:`allennlp_analyze.compare.compare_records`) while that source is open
(:meth:`BaseRun.compare`). On an executor (:mod:`allennlp_analyze.tasks`) the base is shipped to
the tasks as its records and spectra and opened again there by its name. With ``delta`` each
pair's ΔW = W - W_base is also analyzed as a matrix of its own: a full record named
``delta:<name>`` (spectrum, ranks, fit) whose noise floor and bound are the two operands' added
(ΔW is exact in float64, its storage noise that of its operands), its noise rank and, for narrow
operands, its rank criterion ("noise") following from them. Its other fields are those of a
float64 matrix: numpy's and Numerical Recipes' ranks use float64's eps, and the power-law fit
takes the eigenvalues above float64's numpy tolerance, which can include values below the
operands' noise (``rank_noise`` counts those above it).
"""

from dataclasses import dataclass, replace
from functools import partial
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from .matrix import analyze_matrix
from .source_run import SourceResult, one_source, plan_source
from .compare import (
    Comparison,
    DeltaAnalysis,
    MatrixLoader,
    Pairing,
    Side,
    compare_records,
    pair_records,
    ranked_by_change,
)
from .options import AnalysisOptions
from .quantized import readable
from .scheduler import blas_threads, bounded_map, has_threadpoolctl, resolve_workers
from .spectrum import release_scratch
from .records import BaseSummary, MatrixRecord, criterion_for
from .selection import extract
from .sources.lora import LoraAdapter, MergedSource
from .tensors import WeightSource

#: Prefix of the names of ``--delta`` records.
DELTA_PREFIX = "delta:"


def matrix_loader(source: WeightSource, options: AnalysisOptions) -> MatrixLoader:
    """Record -> its matrix as stored, cut out of its parameter as the plan says (the last
    parameter read is kept, so the parts of a fused one are read once)."""
    plans = {p.name: p for p in plan_source(source, options).plans}
    last: Dict[str, np.ndarray] = {}
    # as the analysis: a copy-free read-only view where the source offers one (safetensors),
    # valid while the source is open and its file unchanged
    read = getattr(source, "load_mapped", source.load)

    def load(rec: MatrixRecord) -> np.ndarray:
        p = plans[rec.name]
        if p.param not in last:
            last.clear()
            last[p.param] = readable(read(p.param))  # quantized: decoded by rows
        return np.asarray(extract(p, last[p.param]))

    return load


def compare_in_parallel(
    model: Side,
    base: Side,
    options: AnalysisOptions,
    delta: Optional[DeltaAnalysis] = None,
    pairing: Optional[Pairing] = None,
    parallel: bool = True,
) -> Comparison:
    """:func:`~allennlp_analyze.compare.compare_records` with the pairs on the analysis's
    workers (one, in this thread, for ``parallel`` False: a task on an executor) and BLAS at
    one thread, as the analysis runs: the values do not depend on the worker count or the
    machine's cores."""
    workers = resolve_workers(options) if parallel else 1
    limited = options.device is None and has_threadpoolctl()
    try:
        with blas_threads(1 if limited else None):
            return compare_records(
                model,
                base,
                options.method,
                delta=delta,
                pair_map=lambda fn, items: bounded_map(fn, items, workers),
                pairing=pairing,
            )
    finally:
        if workers == 1:  # this thread's working buffers (worker threads drop their own)
            release_scratch()


@dataclass
class BaseRun:
    """The base model, analyzed: its label, records, their singular values, the options, and
    how it is read: its ``spec`` (path or URL, where it has one), the ``source`` kept open and a
    loader of its matrices. A run on an executor ships it to its tasks :meth:`shipped` (names,
    records and spectra: no weights), and each task opens the base again (:meth:`reopened`)."""

    label: str
    records: List[MatrixRecord]
    spectra: List[np.ndarray]
    options: AnalysisOptions
    delta: bool = False
    spec: Optional[str] = None
    source: Optional[WeightSource] = None
    load: Optional[MatrixLoader] = None

    def shipped(self, spec: str) -> "BaseRun":
        """This base as a task receives it: named ``spec``, neither open nor loadable."""
        return replace(self, spec=spec, source=None, load=None)

    def reopened(self, source: WeightSource) -> "BaseRun":
        """This base read from ``source`` (the base opened again, in a task)."""
        return replace(self, source=source, load=matrix_loader(source, self.options))

    def _opened(self) -> Tuple[WeightSource, MatrixLoader]:
        if self.source is None or self.load is None:
            raise ValueError("a shipped base is reopened before it is read")
        return self.source, self.load

    def prepare(self, source: WeightSource) -> WeightSource:
        """The source to analyze: a LoRA adapter merged into the base, any other as it is."""
        if isinstance(source, LoraAdapter):
            return MergedSource(self._opened()[0], source)
        return source

    def compare(
        self, result: SourceResult, source: WeightSource, parallel: bool = True
    ) -> SourceResult:
        """``result`` (of ``source``, still open) with its records' base fields filled, and
        with ``delta`` the ΔW records after them (:meth:`with_comparison`)."""
        # a LoRA adapter's own records (its r singular values) are no weights to pair
        own = [i for i, r in enumerate(result.records) if r.lora_r is None]
        cmp = self.compare_share(
            Side(
                [result.records[i] for i in own],
                [result.spectra[i] for i in own],
                matrix_loader(source, self.options),
            ),
            parallel=parallel,
        )
        return self.with_comparison(result, cmp, own)

    def compare_share(
        self, model: Side, pairing: Optional[Pairing] = None, parallel: bool = True
    ) -> Comparison:
        """The comparison of ``model``'s records with the base's (the pairs of ``pairing``
        where given: a part of a source, paired as a whole)."""
        return compare_in_parallel(
            model,
            Side(self.records, self.spectra, self._opened()[1]),
            self.options,
            delta=partial(delta_record, options=self.options) if self.delta else None,
            pairing=pairing,
            parallel=parallel,
        )

    def with_comparison(
        self, result: SourceResult, cmp: Comparison, own: Optional[List[int]] = None
    ) -> SourceResult:
        """``result`` with the records ``own`` (indexes; default all) replaced by ``cmp``'s,
        and its ΔW records after them, in the model's order."""
        own = list(range(len(result.records))) if own is None else own
        records, spectra = list(result.records), list(result.spectra)
        for k, i in enumerate(own):
            records[i] = cmp.records[k]
        rand = list(result.rand_spectra)
        for k in sorted(cmp.deltas):  # in the model's order, whatever order the pairs finished
            rec, sv = cmp.deltas[k]
            records.append(rec)
            spectra.append(sv)
            if rand:
                rand.append(np.zeros(0))
        info = replace(result.info, records=len(records))
        return SourceResult(info, records, spectra, rand)

    def summary(self, records: List[MatrixRecord]) -> BaseSummary:
        """The comparison's summary over the run's final ``records``, model by model, from
        the records alone (names, shapes, slices: the pairing is that of :meth:`compare`), so
        that sources taken from a journal count as those analyzed now."""
        own: Dict[str, List[MatrixRecord]] = {}
        for r in records:
            if not r.name.startswith(DELTA_PREFIX) and r.lora_r is None:
                own.setdefault(r.model, []).append(r)
        paired = 0
        unmatched: List[str] = []
        claimed: Set[int] = set()
        ambiguous: Dict[str, List[str]] = {}
        for model, recs in own.items():
            pairing = pair_records(recs, self.records)
            paired += len(pairing.pairs)
            unmatched += [f"{model}:{k}" for k in pairing.unmatched]
            claimed.update(j for _, j, _ in pairing.pairs)
            ambiguous.update({f"{model}:{k}": v for k, v in pairing.ambiguous.items()})
        return BaseSummary(
            label=self.label,
            paired=paired,
            unmatched=unmatched,
            unmatched_base=[b.name for j, b in enumerate(self.records) if j not in claimed],
            ambiguous=ambiguous,
            moved=ranked_by_change([r for r in records if not r.name.startswith(DELTA_PREFIX)]),
        )


def delta_record(
    D: np.ndarray, rec: MatrixRecord, base: MatrixRecord, options: AnalysisOptions
) -> MatrixRecord:
    """The full record of ΔW (float64) of the pair ``rec`` / ``base`` (module docstring)."""
    out = analyze_matrix(
        D,
        options,
        name=DELTA_PREFIX + rec.name,
        dtype="float64",
        model=rec.model,
        module_type=rec.module_type,
        part=rec.slice,
    )
    out.kind, out.kind_from, out.base_name = rec.kind, rec.kind_from, base.name
    if out.sv_max is None:
        return out
    out.noise_floor = rec.delta_noise_floor
    out.noise_bound = (rec.noise_bound or 0.0) + (base.noise_bound or 0.0)
    out.rank_noise = rec.delta_rank
    narrow = [d for d in (rec.dtype, base.dtype) if d not in ("float32", "float64")]
    if narrow:
        out.rank_criterion = criterion_for(options.rank_criterion, narrow[0])
        rank = getattr(out, f"rank_{out.rank_criterion}")
        out.rank_loss = None if rank is None else out.M - rank
    return out


def open_base(
    source: WeightSource,
    options: AnalysisOptions,
    delta: bool = False,
    progress: Optional[bool] = False,
    spec: Optional[str] = None,
) -> BaseRun:
    """Analyze the base model ``source`` (opened: any source the tool reads; named ``spec``
    where it is a path or URL), kept open."""
    res = one_source(source, options, progress=progress)
    return BaseRun(res.info.label, res.records, res.spectra, options, delta, spec).reopened(source)
