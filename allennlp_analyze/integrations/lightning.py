"""``WeightAnalysisCallback``: per-epoch rank and alpha tracking in a Lightning ``Trainer``
(the only module that imports Lightning)::

    from allennlp_analyze.integrations.lightning import WeightAnalysisCallback
    trainer = lightning.Trainer(max_epochs=10, callbacks=[WeightAnalysisCallback()])

An adapter on :class:`~allennlp_analyze.monitor.WeightMonitor`, analyzing in the global-zero
process only. After every ``every``-th training epoch (``per="epoch"``,
``on_train_epoch_end``) or optimizer step (``per="step"``, ``on_train_batch_end``) it analyzes
the LightningModule's weights and

* appends one JSON line per matrix to ``<trainer.log_dir>/weight_analysis.jsonl`` (else
  ``default_root_dir``; ``output_file`` changes it): the record of
  ``allennlp-analyze --format json`` plus ``epoch`` (0-based, ``trainer.current_epoch``),
  ``step`` (``trainer.global_step``), ``final`` and ``weights_epoch``;
* logs ``weight_analysis_sv_min``, ``weight_analysis_collapsed``, ``weight_analysis_alpha_mean``
  and ``weight_analysis_epoch`` through ``pl_module.log`` (``rank_zero_only``), so they reach
  the configured loggers and ``trainer.callback_metrics``;
* warns about each matrix that lost rank and, with ``stop_on_collapse``, sets
  ``trainer.should_stop`` (agreed by every process through the strategy, as ``EarlyStopping``
  does).

With ``background=True`` the spectra are computed in a worker thread while the next epoch
trains; their figures are logged at the next epoch's end. At the end of training the final
weights are analyzed when the last ones analyzed were not them. Sharded models (FSDP, DeepSpeed
ZeRO-3) are refused when training starts. Analysis options: :class:`AnalysisOptions`' fields
as keywords (``min_q=1.0``...) or ``options=``.
"""

import logging
import os
from typing import Any, List, Optional

from lightning.pytorch.callbacks import Callback

from ..monitor import MonitorReport, WeightMonitor, refuse_sharded
from ..options import AnalysisOptions

logger = logging.getLogger(__name__)

FILE_NAME = "weight_analysis.jsonl"


class WeightAnalysisCallback(Callback):
    """See the module docstring."""

    def __init__(
        self,
        every: int = 1,
        per: str = "epoch",
        stop_on_collapse: bool = False,
        background: bool = False,
        output_file: Optional[str] = None,
        options: Optional[AnalysisOptions] = None,
        base: Optional[str] = None,
        **option_kwargs: Any,
    ) -> None:
        self.output_file = output_file
        self.monitor = WeightMonitor(
            None,
            every=every,
            per=per,
            stop_on_collapse=stop_on_collapse,
            background=background,
            options=options,
            logger=logger,
            base=base,
            **option_kwargs,
        )
        self._finished: List[MonitorReport] = []
        self._stopped = False
        self._epoch = 0  # of the last training batch

    @property
    def history(self) -> List[MonitorReport]:
        """Every report so far (global-zero process), in order."""
        return self.monitor.history

    # -- trainer events ------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        refuse_sharded(pl_module)
        if trainer.is_global_zero:
            folder = trainer.log_dir or trainer.default_root_dir
            self.monitor.path = self.output_file or os.path.join(folder, FILE_NAME)
            os.makedirs(os.path.dirname(os.path.abspath(self.monitor.path)), exist_ok=True)
            self.monitor.begin(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._epoch = trainer.current_epoch
        if trainer.is_global_zero:
            self._finished += self.monitor.step_end(pl_module, trainer.global_step, self._epoch)
        if self.monitor.per == "step":
            self._publish(trainer, pl_module, due=trainer.global_step % self.monitor.every == 0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if trainer.is_global_zero:
            self._finished += self.monitor.epoch_end(pl_module, epoch, step=trainer.global_step)
        if self.monitor.per == "epoch":
            self._publish(trainer, pl_module, due=(epoch + 1) % self.monitor.every == 0)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        try:
            self.monitor.wait()
            self.monitor.final(pl_module, self._epoch, trainer.global_step)
        finally:
            self.monitor.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.monitor.close()

    # -- reporting -----------------------------------------------------------------------------

    def _publish(self, trainer, pl_module, due: bool) -> None:
        """Log the figures of the reports finished since the last call, and at a point of the
        schedule with ``stop_on_collapse``, stop on every process when the main one asks."""
        for report in self._finished:
            for key, value in report.metrics.items():
                if value is not None:
                    pl_module.log(key, float(value), rank_zero_only=True)
        self._finished = []
        if due and self.monitor.stop_on_collapse and not self._stopped:
            stop = trainer.strategy.reduce_boolean_decision(self.monitor.should_stop, all=False)
            if stop:
                self._stopped = True
                trainer.should_stop = True
                reason = next((r.stop for r in self.monitor.history if r.stop), None)
                if reason:
                    logger.warning("%s; training stopped (stop_on_collapse)", reason)
