"""The framework-free monitor in a hand-written torch training loop: per-epoch and per-step
records against numpy and powerlaw 1.5 on the weights saved at that point, the background
thread (analyzing copies while training goes on), the figures, the collapse warning and stop
signal, the final analysis; the refusal of sharded parameters (real FSDP and FSDP2 on a
one-process gloo group, a DeepSpeed ZeRO-3 stand-in); the main process's stop decision shared
by two real processes."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_record_matches_reference

torch = pytest.importorskip("torch")

from allennlp_analyze.errors import AnalyzeError  # noqa: E402
from allennlp_analyze.monitor import WeightMonitor, sharded_reason, snapshot  # noqa: E402
from allennlp_analyze.options import AnalysisOptions  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def train(model, monitor, epochs: int, out: Path, weight_decay: float = 0.0, steps: int = 4):
    """SGD on fixed random data, batch 4; the weights saved after every step as ``s<N>.pt``
    and after every epoch as ``e<K>.pt``; the monitor told of both."""
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(steps * 4, 32, generator=g), torch.randint(0, 10, (steps * 4,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=weight_decay)
    step = 0
    for epoch in range(epochs):
        for i in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[4 * i:4 * i + 4]), y[4 * i:4 * i + 4]).backward()
            opt.step()
            step += 1
            torch.save(model.state_dict(), out / f"s{step}.pt")
            monitor.step_end(model, step, epoch)
        torch.save(model.state_dict(), out / f"e{epoch}.pt")
        monitor.epoch_end(model, epoch, step=step)
        if monitor.should_stop:
            break
    monitor.wait()
    monitor.final(model, epoch, step)
    monitor.close()
    return epoch, step


def saved(out: Path, name: str) -> dict:
    return torch.load(out / name, map_location="cpu", weights_only=True)


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_epochs_records_metrics_and_no_warning_on_a_plain_run(tmp_path, caplog):
    path = tmp_path / "w.jsonl"
    monitor = WeightMonitor(str(path), every=1)
    with caplog.at_level(logging.WARNING, logger="allennlp_analyze"):
        train(mlp(), monitor, epochs=2, out=tmp_path)
    lines = read_jsonl(path)
    # default min_q 1.1: both Linear weights (64 x 32, 10 x 64), two epochs, nothing final
    assert [(r["epoch"], r["step"], r["final"], r["weights_epoch"], r["name"]) for r in lines] == [
        (0, 4, False, 0, "0.weight"), (0, 4, False, 0, "2.weight"),
        (1, 8, False, 1, "0.weight"), (1, 8, False, 1, "2.weight")]
    for r in lines:
        assert r["module_type"] == "Linear"
        assert_record_matches_reference(r, saved(tmp_path, f"e{r['epoch']}.pt")[r["name"]].numpy())
    for report in monitor.history:
        mine = [r for r in lines if r["epoch"] == report.epoch]
        alphas = [r["alpha"] for r in mine]
        assert report.metrics == {
            "weight_analysis_sv_min": min(r["sv_min"] for r in mine),
            "weight_analysis_collapsed": 0,
            "weight_analysis_alpha_mean": pytest.approx(sum(alphas) / len(alphas), rel=1e-12),
            "weight_analysis_epoch": report.epoch}
    assert not [r for r in caplog.records if "lost rank" in r.getMessage()]
    assert not monitor.should_stop


def test_background_steps_analyze_the_weights_of_their_step(tmp_path):
    """Every 3rd step in a worker thread while training goes on: each record is that of the
    weights saved at its step, not of later ones; the last step (8, off the schedule) gets a
    final analysis."""
    path = tmp_path / "w.jsonl"
    monitor = WeightMonitor(str(path), every=3, per="step", background=True, min_q=1.0)
    train(mlp(), monitor, epochs=2, out=tmp_path)
    lines = read_jsonl(path)
    assert sorted({(r["step"], r["epoch"], r["final"]) for r in lines}) == [
        (3, 0, False), (6, 1, False), (8, 1, True)]
    for r in lines:
        assert_record_matches_reference(r, saved(tmp_path, f"s{r['step']}.pt")[r["name"]].numpy())
    assert lines[0]["sv_min"] != lines[-1]["sv_min"]  # the weights did move


def test_over_regularized_run_warns_and_stops(tmp_path, caplog):
    """lr * weight_decay = 1: each step replaces a weight by -lr times its gradient, of rank <=
    4 (the batch) against M = 32 and 10 (and tiny): both layers lose rank at once."""
    path = tmp_path / "w.jsonl"
    monitor = WeightMonitor(str(path), stop_on_collapse=True)
    with caplog.at_level(logging.WARNING, logger="allennlp_analyze"):
        epoch, _ = train(mlp(), monitor, epochs=3, out=tmp_path, weight_decay=10.0)
    assert epoch == 0 and monitor.should_stop
    warned = [r.getMessage() for r in caplog.records if "lost rank" in r.getMessage()]
    assert len(warned) == 2
    W = saved(tmp_path, "e0.pt")["0.weight"].numpy()
    loose = int((np.linalg.svd(W.astype(np.float64), compute_uv=False) > 1e-3).sum())
    assert warned[0].startswith(f"weight_analysis: epoch 0 (step 4): 0.weight (Linear, 64 x 32) "
                                f"lost rank: {loose} of 32 singular values above the loose "
                                "tolerance, nu_min ")
    report = monitor.history[0]
    assert [r.name for r in report.collapsed] == ["0.weight", "2.weight"]
    assert report.metrics["weight_analysis_collapsed"] == 2
    assert report.stop.startswith("weight_analysis: rank collapse at epoch 0 (step 4) in "
                                  "0.weight, 2.weight")
    for r in read_jsonl(path):
        W = saved(tmp_path, "e0.pt")[r["name"]].numpy()
        assert_record_matches_reference(r, W)
        assert r["rank_numpy"] <= 4  # at most the batch size, as the hand argument says


def test_final_analysis_only_when_the_weights_changed(tmp_path):
    model = mlp()
    monitor = WeightMonitor(None, every=1)
    monitor.epoch_end(model, 0)
    assert monitor.final(model, 0) == []
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    report, = monitor.final(model, 0, weights_changed=True, weights_epoch=None)
    assert report.final and report.weights_epoch is None
    assert report.records[0].sv_max == pytest.approx(2 * monitor.history[0].records[0].sv_max,
                                                     rel=1e-12)


def test_a_failed_analysis_is_logged_and_training_goes_on(monkeypatch, caplog):
    import allennlp_analyze.monitor as monitor_module

    def broken(*args):
        raise RuntimeError("no memory")

    monkeypatch.setattr(monitor_module, "analyze_source", broken)
    monitor = WeightMonitor(None, background=True)
    with caplog.at_level(logging.ERROR, logger="allennlp_analyze"):
        monitor.epoch_end(mlp(), 0)
        assert monitor.wait() == []
    monitor.close()
    assert [r.getMessage() for r in caplog.records] == [
        "weight_analysis: epoch 0: the analysis failed: RuntimeError: no memory"]


def test_snapshot_copies_only_the_selected_weights():
    model = mlp()
    snap = snapshot(model, AnalysisOptions())
    assert sorted(snap._copies) == ["0.weight", "2.weight"]
    before = snap.load("0.weight").copy()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert np.array_equal(snap.load("0.weight"), before)


def test_bad_schedule():
    with pytest.raises(ValueError, match="every must be >= 1"):
        WeightMonitor(every=0)
    with pytest.raises(ValueError, match="per must be one of epoch, step"):
        WeightMonitor(per="batch")


# ---------------------------------------------------------------------------------------------
# Sharded parameters


@pytest.fixture
def one_process_group():
    """A real torch.distributed group of one process (gloo, in-memory store)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_fsdp_and_fsdp2_models_are_refused(one_process_group):
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP's note that one process means NO_SHARD
        wrapped = FullyShardedDataParallel(mlp(), device_id=torch.device("cpu"))
    assert sharded_reason(wrapped) == "the model is sharded by FSDP (FullyShardedDataParallel)"
    inner = torch.nn.Sequential(wrapped, torch.nn.Linear(10, 3))
    assert sharded_reason(inner) == "module '0' is sharded by FSDP (FullyShardedDataParallel)"
    model2 = mlp()
    fully_shard(model2)
    assert type(model2.state_dict()["0.weight"]).__name__ == "DTensor"
    assert sharded_reason(model2) == "the model is sharded by FSDP (FSDPSequential)"
    with pytest.raises(AnalyzeError, match=r"^weight_analysis: cannot analyze a sharded model: "
                                           r"the model is sharded by FSDP"):
        WeightMonitor().epoch_end(model2, 0)
    # a DTensor in an unwrapped module (tensor parallelism)
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    model3 = mlp()
    mesh = init_device_mesh("cpu", (1,))
    model3[0].weight = torch.nn.Parameter(distribute_tensor(model3[0].weight.detach(), mesh,
                                                            [Shard(0)]))
    assert sharded_reason(model3).startswith("parameter '0.weight' is a DTensor (placements "
                                             "(Shard(dim=0),))")


def zero3_stand_in() -> torch.nn.Module:
    """What DeepSpeed ZeRO-3 leaves in a module between forward passes: each parameter's data
    is an empty partition placeholder, the real shape in ``ds_shape``."""
    model = mlp()
    for p in model.parameters():
        p.ds_shape, p.ds_numel, p.ds_id = tuple(p.shape), p.numel(), id(p)
        p.data = torch.empty(0)
    return model


def test_deepspeed_zero3_partitions_are_refused():
    model = zero3_stand_in()
    assert sharded_reason(model) == ("parameter '0.weight' is a DeepSpeed ZeRO-3 partition "
                                     "(here (0,), whole (64, 32))")
    assert sharded_reason(mlp()) is None


def _decide_in(rank: int, store_path: str, results) -> None:
    """One process of a two-process gloo group: both decisions as it sees them."""
    import torch.distributed as dist

    from allennlp_analyze.monitor import main_process_decision

    dist.init_process_group("gloo", rank=rank, world_size=2,
                            store=dist.FileStore(store_path, 2))
    results.put((rank, main_process_decision(rank == 0), main_process_decision(rank == 1)))
    dist.destroy_process_group()


def test_main_process_decision_reaches_every_process(tmp_path):
    """Two real processes (forked, gloo): the main one's flag is what both see."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_decide_in, args=(rank, str(tmp_path / "store"), results))
             for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(results.get(timeout=10) for _ in procs) == [(0, True, False), (1, True, False)]
