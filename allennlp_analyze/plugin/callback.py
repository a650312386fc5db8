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

With ``"base": "init"`` each record also carries its change since training began (``delta_rel``,
``delta_sv_max``, ``delta_rank``, ``d_alpha``...; metric ``weight_analysis_delta_rel_max``): the
monitored matrices are copied once when training starts, in their storage dtype (the memory
this costs: :mod:`allennlp_analyze.monitor`).

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
from dataclasses import MISSING, fields
from typing import Any, Dict, List, Optional, Tuple

from allennlp.training.callbacks.callback import TrainerCallback

from ..monitor import MonitorReport, WeightMonitor, snapshot  # noqa: F401  (snapshot: API)
from ..options import AnalysisOptions
from ..records import MatrixRecord

logger = logging.getLogger(__name__)

METRIC_PREFIX = "weight_analysis_"


class RankCollapseError(RuntimeError):
    """Raised by the ``weight_analysis`` callback with ``fail_on_collapse: true``."""


class WeightAnalysisCallback(TrainerCallback):
    """See the module docstring. The constructor takes the callback's own arguments and, as
    keywords, the fields of :class:`~allennlp_analyze.options.AnalysisOptions`. The work is
    :class:`~allennlp_analyze.monitor.WeightMonitor`'s; this adapter feeds it AllenNLP's events
    and hands its figures to AllenNLP's metrics and log writers."""

    def __init__(
        self,
        serialization_dir: str,
        every: int = 1,
        fail_on_collapse: bool = False,
        file_name: str = "weight_analysis.jsonl",
        background: bool = False,
        base: Optional[str] = None,
        **options: Any,
    ) -> None:
        super().__init__(serialization_dir)
        path = os.path.join(serialization_dir, file_name) if serialization_dir else None
        self.monitor = WeightMonitor(
            path,
            every=every,
            stop_on_collapse=fail_on_collapse,
            background=background,
            logger=logger,
            base=base,
            **options,
        )
        self._metrics: Optional[Dict[str, Any]] = None

    every = property(lambda self: self.monitor.every)
    fail_on_collapse = property(lambda self: self.monitor.stop_on_collapse)
    background = property(lambda self: self.monitor.background)
    options = property(lambda self: self.monitor.options)
    path = property(lambda self: self.monitor.path)

    @property
    def history(self) -> List[Tuple[int, bool, List[MatrixRecord]]]:
        """(epoch, final, records) of every analysis so far, in order (for programs and tests)."""
        return [(r.epoch, r.final, r.records) for r in self.monitor.history]

    # -- trainer events ------------------------------------------------------------------------

    def on_start(self, trainer, is_primary: bool = True, **kwargs) -> None:
        super().on_start(trainer, is_primary=is_primary, **kwargs)
        if is_primary:
            self.monitor.begin(trainer.model)  # base="init": the weights before training

    def on_batch(
        self,
        trainer,
        batch_inputs,
        batch_outputs,
        batch_metrics,
        epoch: int,
        batch_number: int,
        is_training: bool,
        is_primary: bool = True,
        batch_grad_norm: Optional[float] = None,
        **kwargs,
    ) -> None:
        self._handle(self.monitor.poll())

    def on_epoch(
        self, trainer, metrics: Dict[str, Any], epoch: int, is_primary: bool = True, **kwargs
    ) -> None:
        if not is_primary:
            return
        self._metrics = metrics
        # the previous epoch's analysis, if still running (raising before the next one starts
        # where it asks to stop), then this epoch's when due
        self._handle(self.monitor.wait())
        self._handle(self.monitor.epoch_end(trainer.model, epoch))

    def on_end(
        self,
        trainer,
        metrics: Optional[Dict[str, Any]] = None,
        epoch: Optional[int] = None,
        is_primary: bool = True,
        **kwargs,
    ) -> None:
        if not is_primary:
            return
        try:
            if metrics is None or epoch is None:  # training failed or never ran an epoch
                return
            self._metrics = metrics
            self._handle(self.monitor.wait())
            self._handle(
                self.monitor.final(
                    trainer.model,
                    epoch,
                    weights_changed=_final_weights_changed(trainer),
                    weights_epoch=_final_weights_epoch(trainer, epoch),
                )
            )
        finally:
            self.monitor.close()

    # -- reporting -----------------------------------------------------------------------------

    def _handle(self, reports: List[MonitorReport]) -> None:
        """Hand each report's figures to the trainer's metrics (the epoch's metrics file and the
        log writers too, except for the final analysis); raise :class:`RankCollapseError` where
        one asks training to stop."""
        for report in reports:
            if self._metrics is not None:
                self._metrics.update(report.metrics)
            if not report.final:
                self._amend_epoch_metrics(report.epoch, report.metrics)
                self._log_scalars(report.metrics, report.epoch)
            if report.stop:
                raise RankCollapseError(report.stop + "; training stopped (fail_on_collapse)")

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

        scalars = {
            k[len(METRIC_PREFIX) :]: v
            for k, v in figures.items()
            if isinstance(v, (int, float)) and k != METRIC_PREFIX + "epoch"
        }
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
    own = [
        p
        for p in inspect.signature(WeightAnalysisCallback.__init__).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    as_list = {"match", "exclude", "include", "fit"}
    extra = []
    for f in fields(AnalysisOptions):
        if f.default is not MISSING:
            default = f.default
        elif callable(f.default_factory):
            default = f.default_factory()
        else:
            raise TypeError(f"AnalysisOptions.{f.name} has no default")
        annotation = List[str] if f.name in as_list else f.type
        if f.name in as_list:
            default = list(default)
        extra.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
            )
        )
    return inspect.Signature(own + extra)


WeightAnalysisCallback.__init__.__signature__ = (  # type: ignore[attr-defined]
    _constructor_signature()
)
TrainerCallback.register("weight_analysis")(WeightAnalysisCallback)
