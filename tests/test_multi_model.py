"""Several models in one run: the per-model aggregate against direct counts, the three output
formats, and the command line with a glob, a list file and one unreadable entry."""
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from allennlp_analyze import analyze
from allennlp_analyze.aggregate import aggregate
from allennlp_analyze.records import RECORD_FIELDS
from allennlp_analyze.report import write
from allennlp_analyze.sources._common import TensorDictSource

REPO = Path(__file__).resolve().parents[1]


def planted(rng, N, M, smallest):
    """N x M float64 with singular values in [0.5, 2] except the smallest, ``smallest``."""
    s = np.sort(rng.uniform(0.5, 2.0, M))[::-1]
    s[-1] = smallest
    U, _ = np.linalg.qr(rng.standard_normal((N, M)))
    V, _ = np.linalg.qr(rng.standard_normal((M, M)))
    return (U * s) @ V.T


def model(seed, smallest):
    """One matrix per entry of ``smallest`` (its nu_min), named layer.i.weight."""
    rng = np.random.default_rng(seed)
    return {f"layer.{i}.weight": planted(rng, 90, 40 + i, s) for i, s in enumerate(smallest)}


MODELS = {
    "alpha": [1e-12, 0.3, 1e-9, 0.8, 1e-6],            # 2 under 1e-8, 3 under 1e-5
    "beta": [0.5, 0.6, 0.7],                            # none
    "gamma": [1e-10, 1e-10, 1e-10, 1e-7, 0.2, 0.9],     # 3 under 1e-8, 4 under 1e-5
}


@pytest.fixture(scope="module")
def run():
    sources = [TensorDictSource(name, model(i, s)) for i, (name, s) in enumerate(MODELS.items())]
    return analyze(*sources)


@pytest.mark.parametrize("threshold", [-8.0, -5.0, -0.5])
def test_fraction_equals_direct_count(run, threshold):
    agg = aggregate(run.records, run.summary.models, threshold)
    assert [a.model for a in agg.models] == list(MODELS)
    for a, (name, smallest) in zip(agg.models, MODELS.items()):
        recs = [r for r in run.records if r.model == name]
        direct = sum(np.log10(r.sv_min) < threshold for r in recs)
        assert a.matrices == len(recs) == len(smallest)
        assert a.below_threshold == direct == sum(np.log10(s) < threshold for s in smallest)
        assert a.fraction_below == pytest.approx(direct / len(recs))
        alphas = [r.alpha for r in recs if r.alpha is not None]
        assert a.fitted == len(alphas)
        q1, med, q3 = np.percentile(alphas, [25, 50, 75])
        assert (a.alpha_q1, a.alpha_median, a.alpha_q3) == pytest.approx((q1, med, q3))
        assert a.alpha_mean == pytest.approx(np.mean(alphas))
    assert agg.total.matrices == len(run.records) == 14
    assert agg.total.below_threshold == sum(a.below_threshold for a in agg.models)


def test_aggregate_edge_cases(run):
    recs = list(run.records)
    zero = recs[0].__class__(**{**recs[0].__dict__, "sv_min": 0.0,
                                "log10_sv_min": float("-inf"), "model": "z"})
    nonfinite = recs[0].__class__(model="z", name="nan", module_type=None, shape=(3, 2),
                                  dtype="float32", N=3, M=2, Q=1.5, status="nonfinite")
    agg = aggregate([zero, nonfinite], ["z", "empty"], -8)
    z, empty = agg.models
    assert (z.matrices, z.with_spectrum, z.below_threshold, z.fraction_below) == (2, 1, 1, 1.0)
    assert (empty.matrices, empty.fraction_below, empty.alpha_median) == (0, None, None)


def test_output_formats(run):
    out = io.StringIO()
    write(run, "json", out)
    doc = json.loads(out.getvalue())
    agg = doc["summary"]["aggregate"]
    assert agg["log10_threshold"] == -8.0
    assert [(m["model"], m["matrices"], m["below_threshold"]) for m in agg["models"]] == \
        [("alpha", 5, 2), ("beta", 3, 0), ("gamma", 6, 3)]
    assert agg["total"]["matrices"] == len(doc["records"]) == 14
    assert {r["model"] for r in doc["records"]} == set(MODELS)

    out = io.StringIO()
    write(run, "csv", out)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0] == list(RECORD_FIELDS) and len(rows) == 15  # one table, unchanged columns
    assert sum(r == rows[0] for r in rows) == 1

    out = io.StringIO()
    write(run, "table", out)
    text = out.getvalue()
    assert text.count("\n  ---") <= 1
    per_model = text[text.index("per model"):]
    for name, line in [("alpha", "2/5 (40.0%)"), ("beta", "0/3 (0.0%)"),
                       ("gamma", "3/6 (50.0%)"), ("all", "5/14 (35.7%)")]:
        row = next(ln for ln in per_model.splitlines() if ln.strip().startswith(name))
        assert line in row, row


def _save(path: Path, tensors):
    st = pytest.importorskip("safetensors.numpy")
    st.save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                 str(path))


def test_cli_several_models_one_unreadable(tmp_path):
    for i, (name, smallest) in enumerate(MODELS.items()):
        # float32 storage: planted nu_min 1e-12 reads back at round-off (~1e-7 nu_max)
        _save(tmp_path / f"{name}.safetensors", model(i, smallest))
    (tmp_path / "zz_broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# sources\n{tmp_path / 'gamma.safetensors'}\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "allennlp_analyze", str(tmp_path / "[ab]*.safetensors"),
           str(tmp_path / "zz_broken.safetensors"), "--sources-from", str(listing),
           "--format", "json", "--log10-threshold", "-5", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err_lines = proc.stderr.strip().splitlines()
    assert len(err_lines) == 1 and "zz_broken.safetensors" in err_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["summary"]["models"] == ["alpha.safetensors", "beta.safetensors",
                                        "gamma.safetensors"]
    assert doc["summary"]["complete"] is False and len(doc["summary"]["errors"]) == 1
    agg = doc["summary"]["aggregate"]
    direct = {m: sum(r["log10_sv_min"] < -5 for r in doc["records"] if r["model"] == m)
              for m in doc["summary"]["models"]}
    assert {m["model"]: m["below_threshold"] for m in agg["models"]} == direct
    assert direct == {"alpha.safetensors": 3, "beta.safetensors": 0, "gamma.safetensors": 4}

    # the table ends with the per-model aggregate, then the error
    proc = subprocess.run(cmd[:-5] + ["--no-progress"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    tail = proc.stdout[proc.stdout.index("per model"):]
    assert "gamma.safetensors" in tail and "ERROR" in tail and "zz_broken.safetensors" in tail
