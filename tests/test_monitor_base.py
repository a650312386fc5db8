"""Training monitors with ``base="init"``: each record's change since training began, against
numpy on the weights the test kept itself."""
from types import SimpleNamespace

import numpy as np
import pytest

from allennlp_analyze.monitor import WeightMonitor

torch = pytest.importorskip("torch")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 30), torch.nn.ReLU(), torch.nn.Linear(30, 8),
                               torch.nn.Linear(8, 8, bias=False).to(torch.bfloat16))


def _train(model, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.dtype == torch.float32], lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=gen)
        loss = model[:3](x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # the bfloat16 layer moves by a rank-1 change
        model[3].weight += torch.outer(torch.arange(8.0), torch.ones(8)).to(torch.bfloat16) / 64


def _check(records, before, model):
    now = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    assert {r.name for r in records} == {"0.weight", "2.weight", "3.weight"}
    for r in records:
        D = now[r.name] - before[r.name]
        s = np.linalg.svd(D, compute_uv=False)
        assert r.base_name == r.name
        assert r.delta_rel == pytest.approx(np.linalg.norm(D) / np.linalg.norm(before[r.name]),
                                            rel=1e-12)
        assert r.delta_sv_max == pytest.approx(s[0], rel=1e-12)
    moved = {r.name: r for r in records}
    assert moved["3.weight"].delta_rank == 1


@pytest.mark.parametrize("background", [False, True])
def test_relative_change_since_training_began(background):
    model = _model()
    before = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    monitor = WeightMonitor(None, base="init", min_q=1.0, background=background)
    monitor.begin(model)
    # the initial copy: every monitored matrix once, in its storage dtype
    assert monitor.base_bytes == 30 * 12 * 4 + 8 * 30 * 4 + 8 * 8 * 2
    _train(model)
    reports = monitor.epoch_end(model, 0) + monitor.wait()
    monitor.close()
    assert len(reports) == 1
    _check(reports[0].records, before, model)
    assert reports[0].metrics["weight_analysis_delta_rel_max"] == max(
        r.delta_rel for r in reports[0].records)


def test_without_base_nothing_is_kept():
    model = _model()
    monitor = WeightMonitor(None, min_q=1.0)
    monitor.begin(model)
    _train(model)
    (report,) = monitor.epoch_end(model, 0)
    assert monitor.base_bytes == 0 and all(r.delta_rel is None for r in report.records)
    assert "weight_analysis_delta_rel_max" not in report.metrics
    with pytest.raises(ValueError):
        WeightMonitor(None, base="best")


def test_allennlp_callback_keeps_the_weights_at_start(tmp_path):
    pytest.importorskip("allennlp")
    from allennlp_analyze.plugin.callback import WeightAnalysisCallback

    model = _model()
    before = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    callback = WeightAnalysisCallback(str(tmp_path), base="init", min_q=1.0)
    callback.on_start(SimpleNamespace(model=model), is_primary=True)
    _train(model)
    (report,) = callback.monitor.epoch_end(model, 0)
    _check(report.records, before, model)


def test_hf_and_lightning_callbacks_keep_the_weights_at_start(tmp_path):
    model = _model()
    before = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    callbacks = []
    if pytest.importorskip("transformers"):
        from allennlp_analyze.integrations.hf_trainer import WeightAnalysisCallback as HF

        hf = HF(base="init", min_q=1.0)
        hf.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)),
                          SimpleNamespace(is_world_process_zero=True), None, model=model)
        callbacks.append(hf)
    try:
        from allennlp_analyze.integrations.lightning import WeightAnalysisCallback as PL
    except ImportError:
        PL = None
    if PL is not None:
        pl = PL(base="init", min_q=1.0)
        pl.on_train_start(SimpleNamespace(is_global_zero=True, log_dir=str(tmp_path),
                                          default_root_dir=str(tmp_path)), model)
        callbacks.append(pl)
    _train(model)
    for cb in callbacks:
        (report,) = cb.monitor.epoch_end(model, 0)
        _check(report.records, before, model)
