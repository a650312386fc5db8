"""The L2 rank-collapse experiment (examples/l2_rank_collapse): its quick mode end to end through
``allennlp train`` and the ``weight_analysis`` callback (about a minute on 2 cores), and the
claims it exists for: an L2 penalty on FC1 collapses FC1's smallest eigenvalue, not FC2's."""
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

pytest.importorskip("allennlp")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
RUN = os.path.join(EXAMPLES, "l2_rank_collapse", "run.py")
sys.path.insert(0, EXAMPLES)

from l2_rank_collapse import run as experiment  # noqa: E402

LAYERS = ("fc1", "fc2", "fc3")
PARAMS = {layer: f"{layer}.weight" for layer in LAYERS}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick sweep, run once as a user runs it: one command, a fresh output directory."""
    out = str(tmp_path_factory.mktemp("l2_quick"))
    proc = subprocess.run([sys.executable, RUN, "--quick", "--out", out], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = experiment.read_csv(os.path.join(out, "l2_sweep.csv"))
    return out, rows, proc.stdout


def final(rows, layer):
    """{l2: row} at each run's last epoch for ``layer``."""
    return {r["l2"]: r for r in experiment.final_rows(rows) if r["layer"] == layer}


def test_outputs(quick):
    out, rows, stdout = quick
    with open(os.path.join(out, "l2_sweep.csv")) as f:
        assert f.readline().strip().split(",") == list(experiment.CSV_COLUMNS)
    l2s, epochs = experiment.QUICK_L2, experiment.QUICK_EPOCHS
    keys = {(r["l2"], r["epoch"], r["layer"]) for r in rows}
    assert keys == {(v, e, layer) for v in l2s for e in range(epochs) for layer in LAYERS}
    assert len(rows) == len(keys)
    for r in rows:
        assert r["lambda_min"] == pytest.approx(r["sv_min"] ** 2, rel=1e-12)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["frobenius_norm"] > 0
        assert 0 <= r["rank_loose"] <= r["rank_numpy"] <= {"fc1": 64, "fc2": 192, "fc3": 10}[
            r["layer"]]
    for name in ("lambda_min_vs_l2.png", "lambda_min_vs_epoch.png", "fc1_esd.png"):
        path = os.path.join(out, "figures", name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["epochs"] == epochs
    assert "FC1 lambda_min" in stdout


def test_accuracy_matches_allennlp_metrics(quick):
    out, rows, _ = quick
    for r in rows:
        path = os.path.join(out, "runs", experiment.run_name(r["l2"]),
                            f"metrics_epoch_{r['epoch']}.json")
        with open(path) as f:
            assert r["accuracy"] == json.load(f)["validation_accuracy"]


def test_fc1_collapses_under_its_penalty(quick):
    _, rows, _ = quick
    fc1 = final(rows, "fc1")
    none, strongest = fc1[0.0], fc1[max(fc1)]
    assert strongest["lambda_min"] <= none["lambda_min"] / 10
    assert strongest["rank_loose"] < none["rank_loose"] == 64
    # monotone in the strength
    lam = [fc1[v]["lambda_min"] for v in sorted(fc1)]
    assert lam == sorted(lam, reverse=True)


def test_fc2_without_penalty_hardly_moves(quick):
    _, rows, _ = quick
    fc1, fc2 = final(rows, "fc1"), final(rows, "fc2")
    strongest = max(fc1)
    fc1_decades = abs(math.log10(fc1[strongest]["lambda_min"] / fc1[0.0]["lambda_min"]))
    fc2_decades = abs(math.log10(fc2[strongest]["lambda_min"] / fc2[0.0]["lambda_min"]))
    assert fc2_decades < 0.3  # within a factor of 2
    assert fc2_decades < fc1_decades / 10
    assert fc2[strongest]["rank_loose"] == fc2[0.0]["rank_loose"]


def _svd_lambda_min(W):
    sv = np.linalg.svd(W.double().numpy(), compute_uv=False)
    return sv[-1] ** 2, sv[0]


def _check_against_weights(rows_by_layer, state, where):
    for layer, param in PARAMS.items():
        ref, sv_max = _svd_lambda_min(state[param])
        got = rows_by_layer[layer]["lambda_min"]
        # The SVD's own absolute accuracy (~eps * sv_max per singular value) as the floor.
        floor = (100 * np.finfo(np.float64).eps * sv_max) ** 2
        assert got == pytest.approx(ref, rel=1e-6, abs=floor), (where, layer, got, ref)


def test_csv_equals_independent_svd_of_saved_weights(quick):
    """lambda_min in the CSV = numpy SVD of the weights AllenNLP saved: ``best.th`` (and the
    archive's ``weights.th``) against the row of ``best_epoch``, and the last checkpoint against
    the last epoch's row."""
    out, rows, _ = quick
    for l2 in experiment.QUICK_L2:
        sdir = os.path.join(out, "runs", experiment.run_name(l2))
        mine = {(r["epoch"], r["layer"]): r for r in rows if r["l2"] == l2}
        with open(os.path.join(sdir, "metrics.json")) as f:
            best_epoch = json.load(f)["best_epoch"]
        best = torch.load(os.path.join(sdir, "best.th"), map_location="cpu", weights_only=True)
        _check_against_weights({k: mine[(best_epoch, k)] for k in LAYERS}, best,
                               f"{sdir}/best.th")
        with tarfile.open(os.path.join(sdir, "model.tar.gz")) as tar:
            tar.extract("weights.th", path=sdir, filter="data")
        archived = torch.load(os.path.join(sdir, "weights.th"), map_location="cpu",
                              weights_only=True)
        _check_against_weights({k: mine[(best_epoch, k)] for k in LAYERS}, archived,
                               f"{sdir}/model.tar.gz")
        last_path = experiment.final_weights_path(sdir)
        last = torch.load(last_path, map_location="cpu", weights_only=True)
        last_epoch = max(e for e, _ in mine)
        assert last_path.endswith(f"model_state_e{last_epoch + 1}_b0.th")
        _check_against_weights({k: mine[(last_epoch, k)] for k in LAYERS}, last, last_path)


def test_regularizer_selects_fc1_weight_only():
    """The config's regex puts alpha * ||W||^2 on fc1.weight and on nothing else."""
    from allennlp.common import Params
    from allennlp.data import Vocabulary
    from allennlp.models import Model

    import l2_rank_collapse  # noqa: F401  (registers the model)

    params = Params.from_file(experiment.CONFIG)
    alpha = params["model"]["regularizer"]["regexes"][0][1]["alpha"]
    model = Model.from_params(vocab=Vocabulary(), params=params.pop("model"))
    expected = alpha * float((model.fc1.weight.detach().double() ** 2).sum())
    assert float(model.get_regularization_penalty().detach()) == pytest.approx(expected, rel=1e-5)


def test_digits_split_is_fixed_and_stratified():
    from l2_rank_collapse.digits_reader import digits_split

    X_tr, y_tr = digits_split("train")
    X_va, y_va = digits_split("validation")
    assert X_tr.shape == (1347, 64) and X_va.shape == (450, 64)
    assert X_tr.dtype == np.float32 and 0.0 <= X_tr.min() and X_tr.max() <= 1.0
    assert np.array_equal(X_va, digits_split("validation")[0])  # the same split every time
    _, y_all = digits_split("all")
    assert np.abs(np.bincount(y_va) - 0.25 * np.bincount(y_all)).max() <= 1  # stratified
