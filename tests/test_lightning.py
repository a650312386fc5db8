"""The Lightning callback in real ``lightning.Trainer`` runs (CPU) of a tiny MLP: per-epoch
records against numpy and powerlaw 1.5 on the checkpoint ModelCheckpoint saved that epoch, the
figures through ``pl_module.log`` in the CSV logger's file, no warning on a plain run; the
collapse warning and ``trainer.should_stop`` on an over-regularised one; the background mode;
the refusal of a sharded model."""
import csv
import json
import logging
import warnings
from pathlib import Path

import pytest
from conftest import assert_record_matches_reference, logged_messages

L = pytest.importorskip("lightning.pytorch")
import torch  # noqa: E402

from allennlp_analyze.errors import AnalyzeError  # noqa: E402
from allennlp_analyze.integrations.lightning import WeightAnalysisCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STEPS_PER_EPOCH = 4  # 16 examples, batch 4


class MLP(L.LightningModule):
    """32 -> 64 -> 10, SGD at lr 0.1: with weight_decay 10 (lr * wd = 1) each step replaces a
    weight by -0.1 x its gradient, of rank <= 4 (the batch) < M = 32 and 10."""

    def __init__(self, weight_decay: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 10))
        self.weight_decay = weight_decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=self.weight_decay)


def data():
    g = torch.Generator().manual_seed(1)
    dataset = torch.utils.data.TensorDataset(torch.randn(16, 32, generator=g),
                                             torch.randint(0, 10, (16,), generator=g))
    return torch.utils.data.DataLoader(dataset, batch_size=4)


def fit(out: Path, callback: WeightAnalysisCallback, weight_decay: float = 0.0,
        epochs: int = 2):
    """A CPU fit with a CSV logger and every epoch's checkpoint kept."""
    checkpoints = L.callbacks.ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1,
                                              every_n_epochs=1)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1,
                        logger=L.loggers.CSVLogger(out, name="logs"),
                        callbacks=[callback, checkpoints], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out)
    model = MLP(weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers
        trainer.fit(model, data())
    return trainer, model


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def saved_weights(out: Path, epoch: int) -> dict:
    """The state dict ModelCheckpoint wrote at the end of 0-based ``epoch``."""
    path, = (out / "ckpt").glob(f"epoch={epoch}-step=*.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pl_plain")
    with logged_messages() as logs:
        trainer, _ = fit(out, WeightAnalysisCallback())
    return out, trainer, list(logs)


def test_records_of_each_epoch_equal_numpy_and_powerlaw_on_its_checkpoint(plain_run):
    out, trainer, logs = plain_run
    records = read_jsonl(Path(trainer.log_dir) / "weight_analysis.jsonl")
    assert [(r["epoch"], r["step"], r["final"], r["name"]) for r in records] == [
        (0, 4, False, "net.0.weight"), (0, 4, False, "net.2.weight"),
        (1, 8, False, "net.0.weight"), (1, 8, False, "net.2.weight")]
    for r in records:
        assert r["module_type"] == "Linear"
        assert_record_matches_reference(r, saved_weights(out, r["epoch"])[r["name"]].numpy())
    assert records[0]["sv_min"] != records[2]["sv_min"]
    assert not [m for m in logs if "lost rank" in m]


def test_figures_are_logged_through_the_module(plain_run):
    out, trainer, _ = plain_run
    records = read_jsonl(Path(trainer.log_dir) / "weight_analysis.jsonl")
    with open(Path(trainer.log_dir) / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("weight_analysis_epoch")]
    assert [(int(float(r["weight_analysis_epoch"])), int(r["step"])) for r in rows] == \
        [(0, 3), (1, 7)]  # Lightning's CSV step: the last batch's index
    for row in rows:
        mine = [r for r in records if r["epoch"] == int(float(row["weight_analysis_epoch"]))]
        # pl_module.log keeps float32 tensors
        assert float(row["weight_analysis_sv_min"]) == pytest.approx(
            min(r["sv_min"] for r in mine), rel=1e-6)
        assert float(row["weight_analysis_collapsed"]) == 0
        assert float(row["weight_analysis_alpha_mean"]) == pytest.approx(
            sum(r["alpha"] for r in mine) / len(mine), rel=1e-6)
    assert trainer.callback_metrics["weight_analysis_epoch"] == 1


def test_over_regularised_run_warns_and_stops(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="allennlp_analyze"):
        trainer, _ = fit(tmp_path, WeightAnalysisCallback(stop_on_collapse=True),
                         weight_decay=10.0, epochs=3)
    warned = [r.getMessage() for r in caplog.records if "lost rank" in r.getMessage()]
    assert len(warned) == 2
    assert warned[0].startswith("weight_analysis: epoch 0 (step 4): net.0.weight (Linear, "
                                "64 x 32) lost rank: ")
    assert trainer.global_step == STEPS_PER_EPOCH  # stopped after the first epoch
    records = read_jsonl(Path(trainer.log_dir) / "weight_analysis.jsonl")
    assert {r["epoch"] for r in records} == {0}
    state = saved_weights(tmp_path, 0)
    for r in records:
        assert_record_matches_reference(r, state[r["name"]].numpy())
        assert r["rank_loose"] < r["M"] and r["rank_numpy"] <= 4


def test_background_every_two_epochs_and_final(tmp_path):
    """every=2 over 3 epochs in a worker thread: epoch 1 (figures logged at epoch 2's end), then
    the final weights (epoch 2, off the schedule) at the end."""
    callback = WeightAnalysisCallback(every=2, background=True, min_q=1.0)
    trainer, _ = fit(tmp_path, callback, epochs=3)
    records = read_jsonl(Path(trainer.log_dir) / "weight_analysis.jsonl")
    assert sorted({(r["epoch"], r["step"], r["final"]) for r in records}) == [
        (1, 8, False), (2, 12, True)]
    for r in records:
        assert_record_matches_reference(r, saved_weights(tmp_path, r["epoch"])[r["name"]].numpy())
    assert trainer.callback_metrics["weight_analysis_epoch"] == 1


def test_sharded_model_refused_when_training_starts(tmp_path):
    model = MLP()
    for p in model.parameters():  # what DeepSpeed ZeRO-3 leaves between forward passes
        p.ds_shape, p.ds_numel = tuple(p.shape), p.numel()
        p.data = torch.empty(0)
    with pytest.raises(AnalyzeError, match=r"^weight_analysis: cannot analyze a sharded model: "
                                           r"parameter 'net\.0\.weight' is a DeepSpeed ZeRO-3"):
        WeightAnalysisCallback().on_train_start(None, model)
