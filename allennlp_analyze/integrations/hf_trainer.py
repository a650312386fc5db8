"""``WeightAnalysisCallback``: per-epoch rank and alpha tracking in a Hugging Face
``transformers.Trainer`` (the only module that imports transformers)::

    from allennlp_analyze.integrations.hf_trainer import WeightAnalysisCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[WeightAnalysisCallback()])

An adapter on :class:`~allennlp_analyze.monitor.WeightMonitor`, in the main process only
(``state.is_world_process_zero``). After every ``every``-th epoch (``per="epoch"``,
``on_epoch_end``), optimizer step (``per="step"``) or checkpoint save (``per="save"``,
``on_save``: the weights just saved), it analyzes the model's weights and

* appends one JSON line per matrix to ``<output_dir>/weight_analysis.jsonl`` (``output_file``
  changes it): the record of ``allennlp-analyze --format json`` plus ``epoch`` (0-based),
  ``step`` (``state.global_step``), ``final`` and ``weights_epoch``;
* adds ``weight_analysis_sv_min``, ``weight_analysis_collapsed``, ``weight_analysis_alpha_mean``
  and ``weight_analysis_epoch`` to the next logging event (``on_log``; an epoch's end asks for
  one): they reach ``trainer.state.log_history`` and the callbacks after this one in
  ``trainer.callback_handler`` (the reporting integrations of ``report_to`` come before it;
  pass ``report_to="none"`` and e.g. ``callbacks=[WeightAnalysisCallback(),
  TensorBoardCallback()]`` to send the figures there too);
* logs a warning naming each matrix that lost rank, and with ``stop_on_collapse`` ends training
  (``control.should_training_stop``, agreed by every process of a distributed run).

At the end of training the final weights are analyzed when they are not those analyzed last
(an epoch off the schedule, or the best checkpoint reloaded by ``load_best_model_at_end``);
figures not logged by then go to ``state.log_history``. Sharded models (FSDP, DeepSpeed ZeRO-3)
are refused when training begins. Analysis options: :class:`AnalysisOptions`' fields as keywords
(``min_q=1.0``...) or ``options=``.
"""

import logging
import math
import os
from typing import Any, Dict, List, Optional, Tuple

from transformers import TrainerCallback

from ..monitor import MonitorReport, WeightMonitor, main_process_decision, refuse_sharded
from ..options import AnalysisOptions

logger = logging.getLogger(__name__)

PER = ("epoch", "step", "save")
FILE_NAME = "weight_analysis.jsonl"


def _epoch(value: Optional[float]) -> int:
    """The 0-based epoch in progress (or just finished) at ``state.epoch`` = ``value``."""
    return max(0, math.ceil(round(value or 0.0, 6)) - 1)


class WeightAnalysisCallback(TrainerCallback):
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
        if per not in PER:
            raise ValueError(f"weight_analysis: per must be one of {', '.join(PER)} (got {per!r})")
        self.per = per
        self.output_file = output_file
        self.monitor = WeightMonitor(
            None,
            every=every,
            per="step" if per == "step" else "epoch",
            stop_on_collapse=stop_on_collapse,
            background=background,
            options=options,
            logger=logger,
            base=base,
            **option_kwargs,
        )
        self._unlogged: Dict[str, Any] = {}
        self._saves = 0
        self._stopped = False

    @property
    def history(self) -> List[MonitorReport]:
        """Every report so far (main process), in order."""
        return self.monitor.history

    # -- trainer events ------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_sharded(model)
        if state.is_world_process_zero:
            self.monitor.path = self.output_file or os.path.join(args.output_dir, FILE_NAME)
            os.makedirs(os.path.dirname(os.path.abspath(self.monitor.path)), exist_ok=True)
            self.monitor.begin(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        due = self.per == "step" and state.global_step % self.monitor.every == 0
        if state.is_world_process_zero:
            self._take(self.monitor.step_end(model, state.global_step, _epoch(state.epoch)))
        self._decide(control, due)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = _epoch(state.epoch)
        due = self.per == "epoch" and (epoch + 1) % self.monitor.every == 0
        if state.is_world_process_zero:
            if self.per == "epoch":
                self._take(self.monitor.epoch_end(model, epoch, step=state.global_step))
            else:
                self._take(self.monitor.poll())
            if self._unlogged:
                control.should_log = True
        self._decide(control, due)

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.per != "save":
            return
        self._saves += 1
        due = self._saves % self.monitor.every == 0
        if state.is_world_process_zero and due:
            self._take(self.monitor.wait())
            self._take(self.monitor.analyze(model, _epoch(state.epoch), step=state.global_step))
        self._decide(control, due)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        self._take(self.monitor.poll())
        if self._unlogged and logs is not None:
            logs.update(self._unlogged)
            if state.log_history:
                state.log_history[-1].update(self._unlogged)
            self._unlogged = {}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        try:
            self._take(self.monitor.wait())
            reloaded, best_epoch = _reloaded_best(args, state)
            self._take(
                self.monitor.final(
                    model,
                    _epoch(state.epoch),
                    state.global_step,
                    weights_changed=reloaded,
                    weights_epoch=best_epoch if reloaded else _epoch(state.epoch),
                )
            )
            if self._unlogged:
                state.log_history.append(
                    {**self._unlogged, "epoch": state.epoch, "step": state.global_step}
                )
                self._unlogged = {}
        finally:
            self.monitor.close()

    # -- reporting -----------------------------------------------------------------------------

    def _take(self, reports: List[MonitorReport]) -> None:
        """Keep the reports' figures (numbers only) for the next logging event."""
        for report in reports:
            self._unlogged.update({k: v for k, v in report.metrics.items() if v is not None})

    def _decide(self, control, due: bool) -> None:
        """At a point of the schedule, with ``stop_on_collapse``: end training on every process
        when the main one asks to."""
        if not (due and self.monitor.stop_on_collapse) or self._stopped:
            return
        if main_process_decision(self.monitor.should_stop):
            self._stopped = True
            control.should_training_stop = True
            stop = next((r.stop for r in self.monitor.history if r.stop), None)
            if stop:
                logger.warning("%s; training stopped (stop_on_collapse)", stop)


def _reloaded_best(args, state) -> Tuple[bool, Optional[int]]:
    """Whether ``load_best_model_at_end`` reloaded a checkpoint other than the last step's, and
    that checkpoint's 0-based epoch (None where the log does not tell)."""
    best = state.best_model_checkpoint if args.load_best_model_at_end else None
    if not best:
        return False, None
    try:
        best_step = int(os.path.basename(os.path.normpath(best)).rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return True, None
    if best_step == state.global_step:
        return False, None
    epochs = [e["epoch"] for e in state.log_history if e.get("step") == best_step and "epoch" in e]
    return True, (_epoch(epochs[0]) if epochs else None)
