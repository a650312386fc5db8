"""A training monitor that knows no training framework: every ``every`` epochs (or steps) it
analyzes a ``torch.nn.Module``'s current weights, appends one JSON line per matrix, computes the
epoch's figures, warns about matrices that lost rank and, when asked, signals training to
stop. The AllenNLP, Hugging Face ``Trainer`` and Lightning callbacks are thin adapters on it
(:mod:`allennlp_analyze.plugin.callback`, :mod:`allennlp_analyze.integrations.hf_trainer`,
:mod:`allennlp_analyze.integrations.lightning`); a hand-written loop can use it directly::

    monitor = WeightMonitor("run/weight_analysis.jsonl", every=1, stop_on_collapse=True)
    for epoch in range(epochs):
        train_one_epoch(model)
        for report in monitor.epoch_end(model, epoch):
            print(report.metrics)            # weight_analysis_sv_min, _collapsed, _alpha_mean
        if monitor.should_stop:
            break
    monitor.wait(); monitor.final(model, epoch); monitor.close()

Each analysis reads only the selected matrices, each once (``.detach()`` and one copy to host
memory in its own dtype; a CPU parameter is only referenced when the analysis finishes before
training goes on). With ``background=True`` the spectra are computed in one worker thread from
those copies while training continues; results are reported when they are ready (``poll``) or
waited for (``wait``, and before the next analysis starts). An analysis that fails is logged as
an error and reported as nothing; it never stops training.

With ``base="init"`` every record also carries its change since training began (the base
fields of :mod:`allennlp_analyze.compare`: ``delta_rel``, ``delta_sv_max``, ``delta_rank``,
``d_alpha``...; metric ``<name>_delta_rel_max``): :meth:`WeightMonitor.begin` (the adapters call
it when training starts; else the first analysis does, and "since" means since then) keeps one
copy of each monitored matrix, in its storage dtype, and analyzes it once. Memory: that copy,
the sum over the monitored parameters of numel x bytes per element (``base_bytes``; BERT-base's
24 feed-forward matrices at the default ``min_q`` in float32: 226 MB), plus M float64 singular
values per matrix; each comparison widens one pair at a time to float64 (three N x M arrays).

Sharded parameters (FSDP, DeepSpeed ZeRO-3, DTensors) are refused with an
:class:`~allennlp_analyze.errors.AnalyzeError`: a shard is not the matrix, and gathering it
takes every process, while only the main one analyzes. Analyze a consolidated checkpoint
instead.
"""

import json
import logging
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .base_run import compare_in_parallel, matrix_loader
from .compare import Side
from .errors import AnalyzeError
from .options import AnalysisOptions
from .records import MatrixRecord, summarize
from .selection import plan
from .source_run import analyze_source
from .sources import ModuleSource, torch_to_numpy
from .tensors import TensorInfo

PER = ("epoch", "step")
#: What ``base`` takes: nothing, or the weights as training began.
BASES = (None, "init")


@dataclass
class MonitorReport:
    """One analysis of the weights during training. ``epoch``: 0-based, the epoch at whose end
    (or during which, for ``step``) it ran; ``weights_epoch``: the epoch the weights come from
    (differs at the end where a trainer reloaded its best epoch; None for a moving average);
    ``metrics``: ``<name>_sv_min`` (smallest nu_min), ``<name>_collapsed`` (matrices with rank
    < M under the rank criterion), ``<name>_alpha_mean``, ``<name>_epoch``; ``stop``: the
    message asking training to stop (``stop_on_collapse`` and a collapsed matrix), else None."""

    epoch: int
    final: bool
    weights_epoch: Optional[int]
    records: List[MatrixRecord]
    metrics: Dict[str, Any]
    collapsed: List[MatrixRecord]
    step: Optional[int] = None
    stop: Optional[str] = None


class Snapshot:
    """A copy of the selected weights of a model, as a weight source."""

    def __init__(self, label: str, infos: Sequence[TensorInfo], copies: Dict[str, Any]):
        self.label = label
        self._infos = list(infos)
        self._copies = copies

    def tensors(self) -> Sequence[TensorInfo]:
        return list(self._infos)

    def load(self, name: str) -> np.ndarray:
        return torch_to_numpy(self._copies[name])

    @property
    def nbytes(self) -> int:
        """Bytes of the copies (storage dtype)."""
        return sum(t.numel() * t.element_size() for t in self._copies.values())


@dataclass
class _Initial:
    """The initial weights' records, their singular values and a loader of their matrices."""

    records: List[MatrixRecord]
    spectra: list
    load: Callable[[MatrixRecord], np.ndarray]


def sharded_reason(model) -> Optional[str]:
    """Why ``model``'s parameters are shards rather than whole matrices, or None: a module
    wrapped by FSDP (``FullyShardedDataParallel``, ``fully_shard``), a DeepSpeed ZeRO-3
    partitioned parameter (``ds_shape``), a ``DTensor`` or an FSDP ``FlatParameter``. Reads
    attributes and class names only (no distributed package is imported)."""
    for name, sub in model.named_modules():
        kinds = {c.__name__ for c in type(sub).__mro__}
        if kinds & {"FullyShardedDataParallel", "FSDPModule"}:
            which = f"module {name!r}" if name else "the model"
            return f"{which} is sharded by FSDP ({type(sub).__name__})"
    for name, t in model.named_parameters():  # not state_dict(): its hooks may gather
        if hasattr(t, "ds_shape") or hasattr(t, "ds_numel"):
            shape = tuple(getattr(t, "ds_shape", ()) or ())
            return (
                f"parameter {name!r} is a DeepSpeed ZeRO-3 partition (here {tuple(t.shape)}, "
                f"whole {shape})"
            )
        kinds = {c.__name__ for c in type(t).__mro__}
        if "DTensor" in kinds:
            return (
                f"parameter {name!r} is a DTensor (placements "
                f"{tuple(getattr(t, 'placements', ()))}), of which this process holds a part"
            )
        if "FlatParameter" in kinds or getattr(t, "_is_flat_param", False):
            return f"parameter {name!r} is an FSDP flat parameter (many matrices, sharded)"
    return None


def refuse_sharded(model, name: str = "weight_analysis") -> None:
    """Raise :class:`AnalyzeError` where ``model``'s parameters are shards
    (:func:`sharded_reason`)."""
    reason = sharded_reason(model)
    if reason:
        raise AnalyzeError(
            f"{name}: cannot analyze a sharded model: {reason}; analyze a "
            "consolidated checkpoint instead (e.g. allennlp-analyze on the "
            "saved model)"
        )


def snapshot(model, options: AnalysisOptions, label: str = "", copy: bool = True) -> Snapshot:
    """The matrices ``options`` select from ``model`` (a ``torch.nn.Module``), in host memory:
    one copy per parameter, in its own dtype (``copy=False``: parameters already on the CPU
    are only referenced, for an analysis that finishes before training goes on). Sharded
    parameters are refused (:func:`refuse_sharded`)."""
    import torch

    refuse_sharded(model)
    source = ModuleSource(model, label=label or type(model).__name__)
    infos = source.tensors()
    wanted = {p.param for p in plan(infos, options).plans}
    state = model.state_dict(keep_vars=True)
    copies = {}
    with torch.no_grad():
        for name in wanted:
            t = state[name].detach()
            copies[name] = t.to("cpu", copy=True) if copy or t.device.type != "cpu" else t
    return Snapshot(source.label, infos, copies)


@dataclass
class _Pending:
    future: Future
    epoch: int
    step: Optional[int]
    final: bool
    weights_epoch: Optional[int]


class WeightMonitor:
    """Analyzes a model's weights as it trains (see the module docstring).

    ``path``: the JSON-lines file to append to (None: none); ``every``: analyze after every
    ``every``-th epoch (``per="epoch"``, epochs counted from 0: after epochs every-1,
    2*every-1, ...) or step (``per="step"``, steps counted from 1); ``stop_on_collapse``: a
    collapsed matrix sets :attr:`should_stop` and the report's ``stop``; ``background``:
    compute the spectra in a worker thread; ``name``: prefix of the metrics, the messages and
    the thread; ``logger``: where warnings go (default this module's). The analysis options
    are an :class:`AnalysisOptions` or its fields as keywords."""

    def __init__(
        self,
        path: Optional[str] = None,
        *,
        every: int = 1,
        per: str = "epoch",
        stop_on_collapse: bool = False,
        background: bool = False,
        options: Optional[AnalysisOptions] = None,
        name: str = "weight_analysis",
        logger: Optional[logging.Logger] = None,
        base: Optional[str] = None,
        **option_kwargs: Any,
    ) -> None:
        if base not in BASES:
            raise ValueError(f"{name}: base must be None or 'init' (got {base!r})")
        if every < 1:
            raise ValueError(f"{name}: every must be >= 1 (got {every})")
        if per not in PER:
            raise ValueError(f"{name}: per must be one of {', '.join(PER)} (got {per!r})")
        if options is not None and option_kwargs:
            raise TypeError("pass either options= or option keywords, not both")
        self.path = path
        self.every = every
        self.per = per
        self.stop_on_collapse = stop_on_collapse
        self.background = background
        self.options = options if options is not None else AnalysisOptions(**option_kwargs)
        self.name = name
        self.logger = logger or logging.getLogger(__name__)
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: List[_Pending] = []
        #: (epoch, step) of the weights analyzed last, None before the first analysis.
        self.last_analyzed: Optional[Tuple[int, Optional[int]]] = None
        #: Every report so far, in order.
        self.history: List[MonitorReport] = []
        self.base = base
        self._init: Optional[_Initial] = None
        #: Bytes held by the initial weights (``base="init"``; 0 before :meth:`begin`).
        self.base_bytes = 0

    def begin(self, model) -> None:
        """When training begins: with ``base="init"``, keep the monitored matrices' initial
        values (once, in their storage dtype) and analyze them; otherwise nothing."""
        if self.base != "init" or self._init is not None:
            return
        snap = snapshot(model, self.options, copy=True)
        records, spectra, _ = analyze_source(snap, self.options, False)
        self._init = _Initial(records, spectra, matrix_loader(snap, self.options))
        self.base_bytes = snap.nbytes

    def _analyze(self, snap: "Snapshot") -> Tuple[List[MatrixRecord], list, Counter]:
        """:func:`analyze_source` of ``snap``, the records compared with the initial weights
        where kept."""
        records, spectra, skipped = analyze_source(snap, self.options, False)
        if self._init is not None:
            records = compare_in_parallel(
                Side(records, spectra, matrix_loader(snap, self.options)),
                Side(self._init.records, self._init.spectra, self._init.load),
                self.options,
            ).records
        return records, spectra, skipped

    @property
    def should_stop(self) -> bool:
        """Whether a report asked training to stop (``stop_on_collapse``)."""
        return any(r.stop for r in self.history)

    # -- the training loop's events -------------------------------------------------------------

    def epoch_end(self, model, epoch: int, step: Optional[int] = None) -> List[MonitorReport]:
        """After 0-based ``epoch``: finish the analysis still running, then analyze ``model``
        when the schedule says so (``per="epoch"``). The reports finished meanwhile."""
        reports = self.wait()
        if self.per == "epoch" and (epoch + 1) % self.every == 0:
            reports += self.analyze(model, epoch, step=step)
        return reports

    def step_end(self, model, step: int, epoch: int) -> List[MonitorReport]:
        """After optimizer step ``step`` (from 1) of 0-based ``epoch``: analyze ``model`` when
        the schedule says so (``per="step"``; once per step, however many batches it
        accumulated). The reports finished meanwhile."""
        reports = self.poll()
        done = self.last_analyzed is not None and self.last_analyzed[1] == step
        if self.per == "step" and step % self.every == 0 and not done:
            reports += self.wait()
            reports += self.analyze(model, epoch, step=step)
        return reports

    def final(
        self,
        model,
        epoch: int,
        step: Optional[int] = None,
        *,
        weights_changed: bool = False,
        weights_epoch: Optional[int] = -1,
    ) -> List[MonitorReport]:
        """At the end of training: analyze the final weights unless those of ``step`` (when
        given, else of ``epoch``) were the last analyzed and not changed since
        (``weights_changed``: a trainer reloaded its best epoch or assigned a moving average;
        ``weights_epoch``: the epoch the weights come from, default ``epoch``). Never in the
        background."""
        last = self.last_analyzed
        same = last is not None and (last[0] == epoch if step is None else last[1] == step)
        if same and not weights_changed:
            return []
        return self.analyze(
            model,
            epoch,
            step=step,
            final=True,
            weights_epoch=epoch if weights_epoch == -1 else weights_epoch,
        )

    def analyze(
        self,
        model,
        epoch: int,
        *,
        step: Optional[int] = None,
        final: bool = False,
        weights_epoch: Optional[int] = -1,
    ) -> List[MonitorReport]:
        """Analyze ``model``'s weights now (in the background where configured, except for a
        ``final`` analysis). The reports finished by the time it returns."""
        in_background = self.background and not final
        self.begin(model)
        snap = snapshot(model, self.options, copy=in_background)
        self.last_analyzed = (epoch, step)
        if in_background:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix=self.name)
            future = self._executor.submit(self._analyze, snap)
        else:
            future = Future()
            try:
                future.set_result(self._analyze(snap))
            except Exception as e:
                future.set_exception(e)
        self._pending.append(
            _Pending(future, epoch, step, final, epoch if weights_epoch == -1 else weights_epoch)
        )
        return [] if in_background else self.wait()

    def poll(self) -> List[MonitorReport]:
        """The analyses finished by now, oldest first, without waiting."""
        return self._collect(wait=False)

    def wait(self) -> List[MonitorReport]:
        """Wait for every analysis still running; their reports, oldest first."""
        return self._collect(wait=True)

    def close(self) -> None:
        """Drop analyses not yet finished and end the worker thread."""
        for pending in self._pending:
            pending.future.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- reporting ------------------------------------------------------------------------------

    def _collect(self, wait: bool) -> List[MonitorReport]:
        reports = []
        while self._pending and (wait or self._pending[0].future.done()):
            p = self._pending.pop(0)
            try:
                records, _, _ = p.future.result()
            except Exception as e:
                self.logger.error(
                    "%s: %s: the analysis failed: %s: %s",
                    self.name,
                    self._when(p.epoch, p.step),
                    type(e).__name__,
                    e,
                )
                continue
            reports.append(self._report(records, p))
        return reports

    def _when(self, epoch: int, step: Optional[int]) -> str:
        return f"epoch {epoch}" + ("" if step is None else f" (step {step})")

    def _report(self, records: List[MatrixRecord], p: _Pending) -> MonitorReport:
        criterion = self.options.rank_criterion
        if self.path:
            tags = dict(epoch=p.epoch, final=p.final, weights_epoch=p.weights_epoch)
            if p.step is not None:
                tags["step"] = p.step
            with open(self.path, "a", encoding="utf-8") as f:
                for rec in records:
                    f.write(json.dumps(dict(rec.to_dict(), **tags), allow_nan=False) + "\n")
        summary = summarize(records, Counter(), [records[0].model] if records else [], [])
        prefix = self.name + "_"
        metrics = {
            prefix + "sv_min": summary.sv_min,
            prefix + "collapsed": summary.collapsed[criterion],
            prefix + "alpha_mean": summary.alpha_mean,
            prefix + "epoch": p.epoch,
        }
        if self._init is not None:
            moved = [r.delta_rel for r in records if r.delta_rel is not None]
            metrics[prefix + "delta_rel_max"] = max(moved) if moved else None
        when = self._when(p.epoch, p.step)
        collapsed = [r for r in records if r.collapsed(criterion)]
        for r in collapsed:
            self.logger.warning(
                "%s: %s: %s (%s, %d x %d) lost rank: %d of %d singular values "
                "above the %s tolerance, nu_min %.3g",
                self.name,
                when,
                r.name,
                r.module_type or "?",
                r.N,
                r.M,
                r.rank(criterion),
                r.M,
                r.rank_criterion or criterion,
                r.sv_min,
            )
        stop = None
        if collapsed and self.stop_on_collapse:
            names = ", ".join(r.name for r in collapsed[:5])
            more = f" and {len(collapsed) - 5} more" if len(collapsed) > 5 else ""
            stop = (
                f"{self.name}: rank collapse at {when} in {names}{more} (rank < M under "
                f"the {criterion} criterion; smallest nu_min {summary.sv_min:.3g})"
            )
        report = MonitorReport(
            epoch=p.epoch,
            final=p.final,
            weights_epoch=p.weights_epoch,
            records=records,
            metrics=metrics,
            collapsed=collapsed,
            step=p.step,
            stop=stop,
        )
        self.history.append(report)
        return report


def main_process_decision(flag: bool) -> bool:
    """The main process's ``flag`` on every process of a ``torch.distributed`` run (as is,
    outside one). A collective: every process must call it at the same point of training."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    box = [bool(flag)]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])
