"""The `weight_analysis` trainer callback: a real `allennlp train` run (plugin found through the
repository's `.allennlp_plugins`), its per-epoch records against an independent numpy SVD of
that epoch's checkpoint, the metrics and TensorBoard figures, the collapse warning and
`fail_on_collapse` on an over-regularized run, and the background mode."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("allennlp")
import torch  # noqa: E402
from allennlp.common import Params  # noqa: E402
from allennlp.common.checks import ConfigurationError  # noqa: E402
from allennlp.common.util import prepare_environment  # noqa: E402
from allennlp.commands.train import TrainModel  # noqa: E402
from allennlp.training.callbacks.callback import TrainerCallback  # noqa: E402

from allennlp_analyze.options import AnalysisOptions  # noqa: E402
from allennlp_analyze.plugin import RankCollapseError, WeightAnalysisCallback  # noqa: E402
from allennlp_analyze.plugin.callback import snapshot  # noqa: E402
from allennlp_analyze.plugin.loading import build_model  # noqa: E402

from conftest import assert_record_matches_reference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARCHIVES = REPO / "fixtures" / "archives"
ALLENNLP = Path(sys.executable).parent / "allennlp"


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    lines = (REPO / "fixtures" / "data" / "tagging_train.txt").read_text().splitlines()
    path.write_text("\n".join(lines[:120]) + "\n")
    return path


def tiny_config(train_data: Path, callback: dict, epochs: int = 2, regularize: float = 0.0,
                **trainer) -> dict:
    """A tagger small enough to train in a second: embeddings 16 -> bi-LSTM 8 -> 9 tags."""
    config = {
        "random_seed": 1, "numpy_seed": 1, "pytorch_seed": 1,
        "dataset_reader": {"type": "sequence_tagging", "word_tag_delimiter": "###"},
        "train_data_path": str(train_data),
        "model": {
            "type": "simple_tagger",
            "text_field_embedder": {
                "token_embedders": {"tokens": {"type": "embedding", "embedding_dim": 16}}},
            "encoder": {"type": "lstm", "input_size": 16, "hidden_size": 8,
                        "bidirectional": True},
        },
        "data_loader": {"batch_size": 8, "shuffle": True},
        "trainer": {
            "num_epochs": epochs, "optimizer": {"type": "sgd", "lr": 0.1}, "cuda_device": -1,
            # every epoch's weights kept, to check the records against
            "checkpointer": {"keep_most_recent_by_count": None},
            "callbacks": [dict({"type": "weight_analysis"}, **callback)],
            **trainer,
        },
    }
    if regularize:
        # strong L2 on the tag projection: with SGD its unused directions decay geometrically
        config["model"]["regularizer"] = {
            "regexes": [["tag_projection_layer.*weight", {"type": "l2", "alpha": regularize}]]}
    return config


def train_loop(config: dict, serialization_dir: Path) -> TrainModel:
    params = Params(config)
    prepare_environment(params)
    return TrainModel.from_params(params=params, serialization_dir=str(serialization_dir),
                                  local_rank=0)


def train_in_process(config: dict, serialization_dir: Path) -> dict:
    loop = train_loop(config, serialization_dir)
    metrics = loop.run()
    loop.finish(metrics)
    return metrics


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def checkpoint(serialization_dir: Path, epoch: int) -> dict:
    """The weights after (0-based) ``epoch``: the checkpointer names them by epochs completed."""
    path = serialization_dir / f"model_state_e{epoch + 1}_b0.th"
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_matches_numpy(record: dict, W: torch.Tensor) -> None:
    """The record against numpy's float64 SVD of the saved float32 matrix and powerlaw 1.5's
    fit (conftest's shared check), plus the stable rank and sv_min to 1e-12 absolute."""
    assert record["dtype"] == "float32"
    assert_record_matches_reference(record, W.numpy())
    sv = np.linalg.svd(W.double().numpy(), compute_uv=False)
    assert record["sv_min"] == pytest.approx(sv[-1], rel=1e-7, abs=1e-12)
    assert record["stable_rank"] == pytest.approx((sv ** 2).sum() / sv[0] ** 2, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# `allennlp train`, for real


@pytest.fixture(scope="module")
def cli_run(train_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    config = tiny_config(train_data, {"min_q": 1.0}, epochs=2)
    config["trainer"]["callbacks"].append({"type": "tensorboard"})
    (tmp / "config.json").write_text(json.dumps(config))
    env = dict(os.environ, HOME=str(tmp), PYTHONWARNINGS="ignore")  # no global plugins file
    proc = subprocess.run([str(ALLENNLP), "train", str(tmp / "config.json"), "-s",
                           str(tmp / "out")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc, tmp / "out"


def test_train_writes_records_equal_to_numpy_on_each_checkpoint(cli_run):
    proc, out = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(out / "weight_analysis.jsonl")
    # 5 matrices (4 LSTM, 1 projection; min_q 1 keeps square ones too) x 2 epochs; the final
    # weights are those of the last epoch, so there is no separate final analysis.
    assert [(r["epoch"], r["final"]) for r in records] == [(0, False)] * 5 + [(1, False)] * 5
    assert {r["module_type"] for r in records} == {"LSTM", "Linear"}
    for epoch in (0, 1):
        state = checkpoint(out, epoch)
        for r in (r for r in records if r["epoch"] == epoch):
            assert_matches_numpy(r, state[r["name"]])
    assert records[0]["sv_min"] != records[5]["sv_min"]  # the weights did move


def test_train_adds_figures_to_metrics_and_tensorboard(cli_run):
    proc, out = cli_run
    records = read_jsonl(out / "weight_analysis.jsonl")
    for epoch in (0, 1):
        metrics = json.loads((out / f"metrics_epoch_{epoch}.json").read_text())
        mine = [r for r in records if r["epoch"] == epoch]
        assert metrics["weight_analysis_epoch"] == epoch
        assert metrics["weight_analysis_sv_min"] == min(r["sv_min"] for r in mine)
        assert metrics["weight_analysis_collapsed"] == 0
        assert metrics["weight_analysis_alpha_mean"] == pytest.approx(
            np.mean([r["alpha"] for r in mine if r["alpha"] is not None]))
        assert "training_loss" in metrics  # the trainer's own metrics are kept
    final = json.loads((out / "metrics.json").read_text())
    assert final["weight_analysis_epoch"] == 1
    events = b"".join(p.read_bytes() for p in (out / "log" / "train").glob("events.out.*"))
    for tag in (b"weight_analysis/sv_min", b"weight_analysis/collapsed",
                b"weight_analysis/alpha_mean"):
        assert tag in events
    # a plain run: no collapse warning
    assert "lost rank" not in proc.stdout + proc.stderr
    assert "lost rank" not in (out / "out.log").read_text()


# ---------------------------------------------------------------------------------------------
# In-process training runs


def test_over_regularized_run_warns_and_stops(train_data, tmp_path, caplog):
    config = tiny_config(train_data, {"min_q": 1.0, "fail_on_collapse": True}, epochs=3,
                         regularize=2.0)
    loop = train_loop(config, tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="allennlp_analyze"):
        with pytest.raises(RankCollapseError, match=r"rank collapse at epoch 0 in "
                                                    r"tag_projection_layer\._module\.weight"):
            loop.run()
    warnings = [r.getMessage() for r in caplog.records if "lost rank" in r.getMessage()]
    assert len(warnings) == 1
    assert "epoch 0: tag_projection_layer._module.weight (Linear, 16 x 9) lost rank" in warnings[0]
    records = read_jsonl(tmp_path / "out" / "weight_analysis.jsonl")
    assert {r["epoch"] for r in records} == {0}  # training stopped after the first epoch
    collapsed = [r for r in records if r["rank_loose"] < r["M"]]
    assert [r["name"] for r in collapsed] == ["tag_projection_layer._module.weight"]
    assert collapsed[0]["sv_min"] < 1e-3
    # stopped before the trainer checkpointed that epoch: the model holds its weights
    assert not (tmp_path / "out" / "model_state_e1_b0.th").exists()
    state = loop.model.state_dict()
    for r in records:
        assert_matches_numpy(r, state[r["name"]])
    metrics = json.loads((tmp_path / "out" / "metrics_epoch_0.json").read_text())
    assert metrics["weight_analysis_collapsed"] == 1


def test_background_every_and_final_analysis(train_data, tmp_path, caplog):
    """every=2 over 3 epochs: epoch 1 analyzed in a worker thread while epoch 2 trains (from a
    copy taken at the end of epoch 1), and the final weights (epoch 2, not on the schedule) at
    the end."""
    config = tiny_config(train_data, {"every": 2, "background": True, "min_q": 1.0}, epochs=3)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="allennlp_analyze"):
        metrics = train_in_process(config, out)
    assert not [r for r in caplog.records if "lost rank" in r.getMessage()]
    records = read_jsonl(out / "weight_analysis.jsonl")
    assert [(r["epoch"], r["final"]) for r in records] == [(1, False)] * 5 + [(2, True)] * 5
    for r in records:
        assert_matches_numpy(r, checkpoint(out, r["epoch"])[r["name"]])
    assert "weight_analysis_epoch" not in json.loads((out / "metrics_epoch_0.json").read_text())
    assert json.loads((out / "metrics_epoch_1.json").read_text())["weight_analysis_epoch"] == 1
    assert metrics["weight_analysis_epoch"] == 2
    assert metrics["weight_analysis_sv_min"] == min(r["sv_min"] for r in records[5:])


# ---------------------------------------------------------------------------------------------
# The fixture archives, construction and devices


def _fake_trainer(model):
    return SimpleNamespace(model=model, _callbacks=[])


@pytest.mark.parametrize("name, collapsed", [
    ("classifier_transformer", []),
    ("classifier_transformer_l2", ["_feedforward._linear_layers.0.weight",
                                   "_seq2seq_encoder._transformer.layers.0.linear1.weight",
                                   "_seq2seq_encoder._transformer.layers.0.linear2.weight"]),
])
def test_collapse_warning_on_fixture_models(name, collapsed, tmp_path, caplog):
    model = build_model(ARCHIVES / f"{name}.tar.gz")
    callback = WeightAnalysisCallback(str(tmp_path))
    trainer = _fake_trainer(model)
    callback.on_start(trainer)
    metrics: dict = {}
    with caplog.at_level(logging.WARNING, logger="allennlp_analyze"):
        callback.on_epoch(trainer, metrics=metrics, epoch=0)
    warned = sorted(m.split(": ")[2].split(" (")[0] for m in
                    (r.getMessage() for r in caplog.records) if "lost rank" in m)
    assert warned == collapsed
    assert metrics["weight_analysis_collapsed"] == len(collapsed)
    assert len(read_jsonl(tmp_path / "weight_analysis.jsonl")) == len(callback.history[0][2])


def test_constructed_from_params_with_the_analysis_options(tmp_path):
    callback = TrainerCallback.from_params(
        Params({"type": "weight_analysis", "every": 3, "min_q": 1, "match": ["encoder"],
                "rank_criterion": "numpy", "loose_tol": 1e-4, "include": ["embeddings"]}),
        serialization_dir=str(tmp_path))
    assert isinstance(callback, WeightAnalysisCallback) and callback.every == 3
    assert callback.options == AnalysisOptions(min_q=1.0, match=("encoder",),
                                               rank_criterion="numpy", loose_tol=1e-4,
                                               include=("embeddings",))
    with pytest.raises(ConfigurationError, match="nonsense"):
        TrainerCallback.from_params(Params({"type": "weight_analysis", "nonsense": 1}),
                                    serialization_dir=str(tmp_path))
    callback = TrainerCallback.from_params(  # --fit: a list in a config
        Params({"type": "weight_analysis", "fit": ["tpl", "hill-mid"]}),
        serialization_dir=str(tmp_path))
    assert callback.options == AnalysisOptions(fit=("tpl", "hill-mid"))
    import inspect

    accepted = set(inspect.signature(WeightAnalysisCallback.__init__).parameters)
    assert {f for f in AnalysisOptions.__dataclass_fields__} <= accepted


def test_snapshot_is_a_copy():
    layer = torch.nn.Linear(6, 4)
    snap = snapshot(layer, AnalysisOptions(min_q=1.0))
    before = snap.load("weight").copy()
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert np.array_equal(snap.load("weight"), before)
    assert [i.module_type for i in snap.tensors()] == ["Linear", "Linear"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_gives_the_same_records(tmp_path):
    model = build_model(ARCHIVES / "classifier_transformer_l2.tar.gz")
    results = []
    for device in ("cpu", "cuda"):
        callback = WeightAnalysisCallback(str(tmp_path / device))
        (tmp_path / device).mkdir()
        trainer = _fake_trainer(model.to(device))
        callback.on_start(trainer)
        callback.on_epoch(trainer, metrics={}, epoch=0)
        results.append([r.to_dict() for r in callback.history[0][2]])
    assert results[0] == results[1]
