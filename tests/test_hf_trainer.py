"""The Hugging Face Trainer callback in real ``transformers.Trainer`` runs (CPU, offline) of a
tiny randomly initialised BERT classifier: per-epoch records against numpy and powerlaw 1.5 on
the checkpoint the Trainer saved that epoch, the figures in ``state.log_history`` and in the
logs of a callback after ours, no warning on a plain run; the collapse warning and the stop
on an over-regularised one; per-save analysis; the refusal of a sharded model."""
import json
import logging
from pathlib import Path

import pytest
from conftest import assert_record_matches_reference, logged_messages

pytest.importorskip("transformers")
import torch  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from transformers import (BertConfig, BertForSequenceClassification, Trainer,  # noqa: E402
                          TrainerCallback, TrainingArguments)

from allennlp_analyze.errors import AnalyzeError  # noqa: E402
from allennlp_analyze.integrations.hf_trainer import WeightAnalysisCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STEPS_PER_EPOCH = 8  # 16 examples, batch 2
FIGURES = ("weight_analysis_sv_min", "weight_analysis_collapsed", "weight_analysis_alpha_mean",
           "weight_analysis_epoch")


def tiny_bert() -> BertForSequenceClassification:
    """Hidden 32, intermediate 64, 2 layers: the matrices kept by default (Q >= 1.1) are each
    layer's intermediate (64 x 32) and output (32 x 64) dense weights and the 2 x 32 head."""
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=2))


def dataset():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (16, 8), generator=g)
    labels = torch.randint(0, 2, (16,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(16)]


class Seen(TrainerCallback):
    """Registered after ours: the logs it is handed."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def run(out: Path, callback: WeightAnalysisCallback, weight_decay: float = 0.0,
        epochs: int = 2, **args) -> tuple:
    """SGD at lr 0.1, batch 2 of 8 tokens: with weight_decay 10 (lr * wd = 1) every step
    replaces each weight by -0.1 x its gradient, of rank <= 16 (tokens) < M = 32."""
    seen = Seen()
    settings = dict(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=2,
                    learning_rate=0.1, optim="sgd", weight_decay=weight_decay,
                    lr_scheduler_type="constant", save_strategy="epoch",
                    logging_strategy="epoch", report_to=[], use_cpu=True, seed=0,
                    disable_tqdm=True, dataloader_num_workers=0)
    settings.update(args)
    trainer = Trainer(model=tiny_bert(), args=TrainingArguments(**settings),
                      train_dataset=dataset(), eval_dataset=dataset()[:4],
                      callbacks=[callback, seen])
    trainer.train()
    return trainer, seen


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def checkpoint(out: Path, step: int) -> dict:
    return load_file(str(out / f"checkpoint-{step}" / "model.safetensors"))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_plain")
    with logged_messages() as logs:
        trainer, seen = run(out, WeightAnalysisCallback())
    return out, trainer, seen, list(logs)


def test_records_of_each_epoch_equal_numpy_and_powerlaw_on_its_checkpoint(plain_run):
    out, trainer, _, warnings = plain_run
    records = read_jsonl(out / "weight_analysis.jsonl")
    names = ["bert.encoder.layer.0.intermediate.dense.weight",
             "bert.encoder.layer.0.output.dense.weight",
             "bert.encoder.layer.1.intermediate.dense.weight",
             "bert.encoder.layer.1.output.dense.weight", "classifier.weight"]
    assert [(r["epoch"], r["step"], r["final"], r["name"]) for r in records] == \
        [(0, 8, False, n) for n in names] + [(1, 16, False, n) for n in names]
    for r in records:
        assert_record_matches_reference(r, checkpoint(out, r["step"])[r["name"]])
    assert records[0]["sv_min"] != records[5]["sv_min"]  # the weights did move
    assert not [m for m in warnings if "lost rank" in m]
    assert trainer.state.global_step == 2 * STEPS_PER_EPOCH


def test_figures_reach_the_log_history_and_later_callbacks(plain_run):
    out, trainer, seen, _ = plain_run
    records = read_jsonl(out / "weight_analysis.jsonl")
    logged = [e for e in trainer.state.log_history if "weight_analysis_epoch" in e]
    assert [(e["weight_analysis_epoch"], e["step"]) for e in logged] == [(0, 8), (1, 16)]
    for entry in logged:
        mine = [r for r in records if r["epoch"] == entry["weight_analysis_epoch"]]
        assert entry["weight_analysis_sv_min"] == min(r["sv_min"] for r in mine)
        assert entry["weight_analysis_collapsed"] == 0
        assert entry["weight_analysis_alpha_mean"] == pytest.approx(
            sum(r["alpha"] for r in mine) / len(mine), rel=1e-12)
        assert "loss" in entry  # the Trainer's own figures of that logging event
    handed = [e for e in seen.logs if "weight_analysis_epoch" in e]
    assert [{k: e[k] for k in FIGURES} for e in handed] == \
        [{k: e[k] for k in FIGURES} for e in logged]


def test_over_regularised_run_warns_and_stops(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="allennlp_analyze"):
        trainer, _ = run(tmp_path, WeightAnalysisCallback(stop_on_collapse=True),
                         weight_decay=10.0, epochs=3)
    warned = [r.getMessage() for r in caplog.records if "lost rank" in r.getMessage()]
    records = read_jsonl(tmp_path / "weight_analysis.jsonl")
    collapsed = [r for r in records if r["rank_loose"] < r["M"]]
    assert len(collapsed) >= 4 and len(warned) == len(collapsed)
    assert warned[0].startswith("weight_analysis: epoch 0 (step 8): "
                                "bert.encoder.layer.0.intermediate.dense.weight (Linear, 64 x 32)"
                                " lost rank: ")
    assert trainer.state.global_step == STEPS_PER_EPOCH  # stopped after the first epoch
    assert {r["epoch"] for r in records} == {0}
    stopped = [r.getMessage() for r in caplog.records if "training stopped" in r.getMessage()]
    assert len(stopped) == 1 and "rank collapse at epoch 0 (step 8)" in stopped[0]
    state = checkpoint(tmp_path, STEPS_PER_EPOCH)
    for r in records:
        assert_record_matches_reference(r, state[r["name"]])
    for r in collapsed:
        if r["M"] == 32:  # the encoder's dense layers: rank <= 16 tokens of a batch
            assert r["rank_numpy"] <= 16


def test_per_save_with_a_final_analysis_off_the_schedule(tmp_path):
    """Every third checkpoint save: the Trainer saves at steps 5, 10, 15 and at the end (16),
    so step 15 is analyzed on schedule and the end's weights in a final analysis."""
    callback = WeightAnalysisCallback(per="save", every=3, min_q=3.0)
    run(tmp_path, callback, save_strategy="steps", save_steps=5, logging_strategy="steps",
        logging_steps=5)
    records = read_jsonl(tmp_path / "weight_analysis.jsonl")
    assert [(r["step"], r["epoch"], r["final"], r["name"]) for r in records] == [
        (15, 1, False, "classifier.weight"), (16, 1, True, "classifier.weight")]
    for r in records:
        assert_record_matches_reference(r, checkpoint(tmp_path, r["step"])[r["name"]])


def test_sharded_model_refused_when_training_begins(tmp_path):
    model = tiny_bert()
    for p in model.parameters():  # what DeepSpeed ZeRO-3 leaves between forward passes
        p.ds_shape, p.ds_numel = tuple(p.shape), p.numel()
        p.data = torch.empty(0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    from transformers import TrainerControl, TrainerState

    with pytest.raises(AnalyzeError, match=r"^weight_analysis: cannot analyze a sharded model: "
                                           r"parameter 'bert\.embeddings\.word_embeddings\."
                                           r"weight' is a DeepSpeed ZeRO-3 partition"):
        WeightAnalysisCallback().on_train_begin(args, TrainerState(), TrainerControl(),
                                                model=model)


def test_best_checkpoint_reloaded_at_the_end_gets_a_final_analysis(tmp_path):
    """``load_best_model_at_end`` with the highest evaluation loss as "best": the first epoch's
    checkpoint comes back at the end, and the final analysis is of its weights."""
    callback = WeightAnalysisCallback(min_q=3.0)
    trainer, _ = run(tmp_path, callback, eval_strategy="epoch", load_best_model_at_end=True,
                     metric_for_best_model="eval_loss", greater_is_better=True)
    assert Path(trainer.state.best_model_checkpoint).name == f"checkpoint-{STEPS_PER_EPOCH}"
    records = read_jsonl(tmp_path / "weight_analysis.jsonl")
    assert [(r["epoch"], r["step"], r["final"], r["weights_epoch"]) for r in records] == [
        (0, 8, False, 0), (1, 16, False, 1), (1, 16, True, 0)]
    best = checkpoint(tmp_path, STEPS_PER_EPOCH)["classifier.weight"]
    assert_record_matches_reference(records[2], best)
    assert records[2]["sv_min"] == records[0]["sv_min"]
