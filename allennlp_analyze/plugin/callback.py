"""``weight_analysis``: a trainer callback that analyzes the model's weights as it trains.

    "trainer": {
      "callbacks": [{"type": "weight_analysis", "every": 1, "min_q": 1.1,
                     "fail_on_collapse": false}]
    }

Every ``every`` epochs (after epochs every-1, 2*every-1, ... counting from 0) and once more at
the end of training if the final weights differ from the last analyzed ones (best-epoch reload,
moving average, or an epoch the schedule skipped), it:

* writes one JSON line per analyzed matrix to ``<serialization_dir>/weight_analysis.jsonl``:
  the record (the same fields as ``allennlp-analyze --format json``) plus ``"epoch"`` (0-based,
  as in ``metrics_epoch_N.json``), ``"final"`` (true for the end-of-training analysis) and
  ``"weights_epoch"`` (the epoch whose weights were analyzed: the best epoch's where the trainer
  reloaded them at the end, null for a moving average);
* adds ``weight_analysis_sv_min`` (smallest nu_min), ``weight_analysis_collapsed`` (matrices
  with rank < M under ``rank_criterion``), ``weight_analysis_alpha_mean`` and
  ``weight_analysis_epoch`` to the epoch's metrics (``metrics_epoch_N.json``; ``metrics.json``
  at the end) and, when a TensorBoard / W&B callback is configured, logs them under
  ``weight_analysis/``;
* logs a warning naming each matrix that lost rank, and with ``fail_on_collapse`` stops
  training by raising :class:`RankCollapseError`.

The analysis options are :class:`~allennlp_analyze.options.AnalysisOptions`' fields, under the
same names (``min_q``, ``match``, ``exclude``, ``rank_criterion``, ``loose_tol``...).

Cost: only the selected matrices are read, each once: ``.detach()`` and one copy to host
memory in its own dtype (parameters already on the CPU are copied only for a background
analysis). The spectra (float64, as ``allennlp-analyze``) are then computed from those copies,
in the training thread between epochs, or with ``background: true`` in a worker thread while
the next epoch trains: training is then held only for the copies, and the results of epoch N are
written, logged and checked as soon as they are ready (at the latest at the end of the next
epoch, so ``fail_on_collapse`` may stop training one epoch later). An analysis that fails is
logged as an error and does not stop training. Only the primary process analyzes in
distributed training.
"""
import inspect
import json
import logging
import os
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import MISSING, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from allennlp.training.callbacks.callback import TrainerCallback

from ..analysis import analyze_source
from ..options import AnalysisOptions
from ..records import MatrixRecord, summarize
from ..selection import plan
from ..sources._common import torch_to_numpy
from ..sources.module import ModuleSource
from ..tensors import TensorInfo

logger = logging.getLogger(__name__)

METRIC_PREFIX = "weight_analysis_"


class RankCollapseError(RuntimeError):
    """Raised by the ``weight_analysis`` callback with ``fail_on_collapse: true``."""


class _Snapshot:
    """A copy of the selected weights of a model, as a weight source."""

    def __init__(self, label: str, infos: Sequence[TensorInfo], copies: Dict[str, torch.Tensor]):
        self.label = label
        self._infos = list(infos)
        self._copies = copies

    def tensors(self) -> Sequence[TensorInfo]:
        return list(self._infos)

    def load(self, name: str) -> np.ndarray:
        return torch_to_numpy(self._copies[name])


def snapshot(model: torch.nn.Module, options: AnalysisOptions, label: str = "",
             copy: bool = True) -> _Snapshot:
    """The matrices ``options`` select from ``model``, in host memory: one copy per parameter,
    in its own dtype (``copy=False``: parameters already on the CPU are only referenced, for an
    analysis that finishes before training goes on)."""
    source = ModuleSource(model, label=label or type(model).__name__)
    infos = source.tensors()
    wanted = {p.param for p in plan(infos, options).plans}
    state = model.state_dict(keep_vars=True)
    copies = {}
    with torch.no_grad():
        for name in wanted:
            t = state[name].detach()
            copies[name] = t.to("cpu", copy=True) if copy or t.device.type != "cpu" else t
    return _Snapshot(source.label, infos, copies)


class WeightAnalysisCallback(TrainerCallback):
    """See the module docstring. The constructor takes the callback's own arguments and, as
    keywords, the fields of :class:`~allennlp_analyze.options.AnalysisOptions`."""

    def __init__(self, serialization_dir: str, every: int = 1, fail_on_collapse: bool = False,
                 file_name: str = "weight_analysis.jsonl", background: bool = False,
                 **options: Any) -> None:
        super().__init__(serialization_dir)
        if every < 1:
            raise ValueError(f"weight_analysis: every must be >= 1 (got {every})")
        self.every = every
        self.fail_on_collapse = fail_on_collapse
        self.path = os.path.join(serialization_dir, file_name) if serialization_dir else None
        self.options = AnalysisOptions(**options)
        self.background = background
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: List[Tuple[Future, int, bool]] = []
        self._metrics: Optional[Dict[str, Any]] = None
        self._last_analyzed: Optional[int] = None
        #: (epoch, final, records) of every analysis so far, in order (for programs and tests).
        self.history: List[Tuple[int, bool, List[MatrixRecord]]] = []

    # -- trainer events ------------------------------------------------------------------------

    def on_batch(self, trainer, batch_inputs, batch_outputs, batch_metrics, epoch: int,
                 batch_number: int, is_training: bool, is_primary: bool = True,
                 **kwargs) -> None:
        if self._pending and self._pending[0][0].done():
            self._collect(wait=False)

    def on_epoch(self, trainer, metrics: Dict[str, Any], epoch: int, is_primary: bool = True,
                 **kwargs) -> None:
        if not is_primary:
            return
        self._metrics = metrics
        self._collect(wait=True)  # the previous epoch's analysis, if still running
        if (epoch + 1) % self.every == 0:
            self._start(trainer, epoch, final=False, weights_epoch=epoch)
            if not self.background:
                self._collect(wait=True)

    def on_end(self, trainer, metrics: Optional[Dict[str, Any]] = None,
               epoch: Optional[int] = None, is_primary: bool = True, **kwargs) -> None:
        if not is_primary:
            return
        try:
            if metrics is None or epoch is None:  # training failed or never ran an epoch
                return
            self._metrics = metrics
            self._collect(wait=True)
            if self._last_analyzed != epoch or _final_weights_changed(trainer):
                self._start(trainer, epoch, final=True, weights_epoch=_final_weights_epoch(
                    trainer, epoch))
                self._collect(wait=True)
        finally:
            for future, *_ in self._pending:
                future.cancel()
            self._pending.clear()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    # -- analysis ------------------------------------------------------------------------------

    def _start(self, trainer, epoch: int, final: bool, weights_epoch: Optional[int]) -> None:
        """Analyze the model's weights as of now; ``weights_epoch``: the epoch those weights
        come from (the best epoch's where the trainer reloaded it at the end; None for a
        moving average)."""
        in_background = self.background and not final
        snap = snapshot(trainer.model, self.options, copy=in_background)
        self._last_analyzed = epoch
        if in_background:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="weight_analysis")
            future = self._executor.submit(analyze_source, snap, self.options, False)
        else:
            future = Future()
            try:
                future.set_result(analyze_source(snap, self.options, False))
            except Exception as e:
                future.set_exception(e)
        self._pending.append((future, epoch, final, weights_epoch))

    def _collect(self, wait: bool) -> None:
        """Report finished analyses, oldest first (``wait``: all of them). An analysis that
        fails is logged as an error; it does not stop training."""
        while self._pending and (wait or self._pending[0][0].done()):
            future, epoch, final, weights_epoch = self._pending.pop(0)
            try:
                records, _, _ = future.result()
            except Exception as e:
                logger.error("weight_analysis: epoch %d: the analysis failed: %s: %s",
                             epoch, type(e).__name__, e)
                continue
            self._report(records, epoch, final, weights_epoch)

    def _report(self, records: List[MatrixRecord], epoch: int, final: bool,
                weights_epoch: Optional[int]) -> None:
        self.history.append((epoch, final, records))
        criterion = self.options.rank_criterion
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                for rec in records:
                    line = dict(rec.to_dict(), epoch=epoch, final=final,
                                weights_epoch=weights_epoch)
                    f.write(json.dumps(line, allow_nan=False) + "\n")
        summary = summarize(records, Counter(), [records[0].model] if records else [], [])
        figures = {
            METRIC_PREFIX + "sv_min": summary.sv_min,
            METRIC_PREFIX + "collapsed": summary.collapsed[criterion],
            METRIC_PREFIX + "alpha_mean": summary.alpha_mean,
            METRIC_PREFIX + "epoch": epoch,
        }
        if self._metrics is not None:
            self._metrics.update(figures)
        if not final:
            self._amend_epoch_metrics(epoch, figures)
            self._log_scalars(figures, epoch)
        collapsed = [r for r in records if r.collapsed(criterion)]
        for r in collapsed:
            logger.warning("weight_analysis: epoch %d: %s (%s, %d x %d) lost rank: %d of %d "
                           "singular values above the %s tolerance, nu_min %.3g",
                           epoch, r.name, r.module_type or "?", r.N, r.M, r.rank(criterion),
                           r.M, r.rank_criterion or criterion, r.sv_min)
        if collapsed and self.fail_on_collapse:
            names = ", ".join(r.name for r in collapsed[:5])
            more = f" and {len(collapsed) - 5} more" if len(collapsed) > 5 else ""
            raise RankCollapseError(
                f"weight_analysis: rank collapse at epoch {epoch} in {names}{more} (rank < M "
                f"under the {criterion} criterion; smallest nu_min {summary.sv_min:.3g}); "
                "training stopped (fail_on_collapse)")

    def _amend_epoch_metrics(self, epoch: int, figures: Dict[str, Any]) -> None:
        """Add ``figures`` to ``metrics_epoch_<epoch>.json``, which the trainer writes before
        calling the callbacks (and which a background analysis finishes after)."""
        if not self.serialization_dir:
            return
        path = os.path.join(self.serialization_dir, f"metrics_epoch_{epoch}.json")
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return
        saved.update(figures)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=2)

    def _log_scalars(self, figures: Dict[str, Any], epoch: int) -> None:
        """Hand the figures to the configured TensorBoard / W&B callbacks."""
        from allennlp.training.callbacks.log_writer import LogWriterCallback

        scalars = {k[len(METRIC_PREFIX):]: v for k, v in figures.items()
                   if isinstance(v, (int, float)) and k != METRIC_PREFIX + "epoch"}
        trainer = self.trainer
        for callback in getattr(trainer, "_callbacks", None) or []:
            if isinstance(callback, LogWriterCallback):
                callback.log_scalars(scalars, log_prefix="weight_analysis", epoch=epoch)


def _final_weights_changed(trainer) -> bool:
    """Whether the trainer changed the weights after the last epoch: a moving average assigned,
    or the best epoch's weights reloaded (GradientDescentTrainer._try_train's ending)."""
    if getattr(trainer, "_moving_average", None) is not None:
        return True
    if getattr(trainer, "_best_model_filename", None) is None:
        return False
    tracker = getattr(trainer, "_metric_tracker", None)
    return tracker is None or not tracker.is_best_so_far()


def _final_weights_epoch(trainer, epoch: int) -> Optional[int]:
    """The epoch whose weights the model holds after training: the best epoch where the trainer
    reloaded it, ``epoch`` where it kept the last weights, None for a moving average."""
    if getattr(trainer, "_moving_average", None) is not None:
        return None
    tracker = getattr(trainer, "_metric_tracker", None)
    if getattr(trainer, "_best_model_filename", None) is None or tracker is None:
        return epoch
    best = getattr(tracker, "best_epoch", None)
    return epoch if best is None else int(best)


def _constructor_signature() -> inspect.Signature:
    """``__init__``'s signature as AllenNLP's ``from_params`` sees it: the callback's own
    arguments, then AnalysisOptions' fields with their defaults (tuples as lists)."""
    own = [p for p in inspect.signature(WeightAnalysisCallback.__init__).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    as_list = {"match", "exclude", "include"}
    extra = []
    for f in fields(AnalysisOptions):
        default = f.default if f.default is not MISSING else f.default_factory()
        annotation = List[str] if f.name in as_list else f.type
        if f.name in as_list:
            default = list(default)
        extra.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                       default=default, annotation=annotation))
    return inspect.Signature(own + extra)


WeightAnalysisCallback.__init__.__signature__ = (  # type: ignore[attr-defined]
    _constructor_signature())
TrainerCallback.register("weight_analysis")(WeightAnalysisCallback)
