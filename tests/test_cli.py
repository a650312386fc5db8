"""``python -m allennlp_analyze`` end to end, in subprocesses: what it prints for MiniLM (table,
JSON, CSV, --output-file) against an independent numpy + powerlaw computation, its exit codes,
and one stderr line without a traceback for every bad input.

All command lines run once, a few at a time, in a module fixture; the tests read the results.
"""
import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pytest

from allennlp_analyze.records import RECORD_FIELDS

from conftest import powerlaw_reference

EPS32 = float(np.finfo(np.float32).eps)
MINILM_FF = "encoder.layer.0.intermediate.dense.weight"
#: Columns the CSV (and JSON records) must have, in this order.
DOCUMENTED_COLUMNS = ("name", "shape", "N", "M", "Q", "sv_max", "sv_min", "log10_sv_min",
                      "rank_loose", "rank_numpy", "rank_nr", "rank_loss", "alpha", "xmin",
                      "xmax", "D", "num_tail", "num_evals", "stable_rank", "log_norm",
                      "log_spectral_norm", "alpha_weighted", "log_alpha_norm", "mp_sigma2",
                      "lambda_plus", "num_spikes", "mp_softrank", "entropy", "effective_rank",
                      "rand_sv_max", "rand_lambda_plus", "num_traps", "rand_distance",
                      "status")


class Run(NamedTuple):
    rc: int
    out: str
    err: str


class Evil:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _archive_bytes(state):
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in (("config.json", b'{"model": {"type": "x"}}'),
                           ("weights.th", buf.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import pickle

    import torch
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("cli")
    g = torch.Generator().manual_seed(0)
    torch.save({"low.weight": torch.randn(200, 20, generator=g) @ torch.randn(20, 60, generator=g),
                "full.weight": torch.randn(200, 60, generator=g)}, d / "collapsed.th")
    torch.save({"full.weight": torch.randn(200, 60, generator=g)}, d / "healthy.th")
    archive = _archive_bytes({"fc.weight": torch.randn(300, 100, generator=g)})
    (d / "good.tar.gz").write_bytes(archive)
    (d / "truncated.tar.gz").write_bytes(archive[: len(archive) // 2])
    (d / "notgzip.tar.gz").write_text("this is not a gzip file\n")
    with open(d / "evil.th", "wb") as f:
        pickle.dump({"w": Evil(d / "PWNED")}, f)
    rng = np.random.default_rng(1)
    save_file({"head.weight": rng.standard_normal((1, 300)).astype(np.float32),
               "score.weight": rng.standard_normal((50, 1)).astype(np.float32)},
              str(d / "rows.safetensors"))
    broken = rng.standard_normal((120, 40)).astype(np.float32)
    broken[3, 5] = np.nan
    save_file({"broken.weight": broken,
               "fine.weight": rng.standard_normal((120, 40)).astype(np.float32)},
              str(d / "nan.safetensors"))
    return d


@pytest.fixture(scope="module")
def runs(files, minilm_path, allennlp09_archives):
    d, m = files, str(minilm_path)
    cases = {
        "table": [m],
        "wide": [m, "--wide", "--randomize", "--match", r"layer\.0\."],
        "json": [m, "--format", "json"],
        "json_q1": [m, "--min-q", "1", "--format", "json"],
        "csv": [m, "--format", "csv"],
        "output_file": [m, "--format", "json", "--output-file", str(d / "out.json")],
        "collapsed": [str(d / "collapsed.th"), "--fail-on-collapse"],
        "collapsed_no_flag": [str(d / "collapsed.th")],
        "healthy": [str(d / "healthy.th"), "--fail-on-collapse"],
        "archive": [str(d / "good.tar.gz"), "--format", "json"],
        "archive09": [str(allennlp09_archives[0])],
        "rows": [str(d / "rows.safetensors"), "--format", "json"],
        "nan_json": [str(d / "nan.safetensors"), "--format", "json"],
        "nan_table": [str(d / "nan.safetensors")],
        # bad inputs: exit 2, one line
        "missing": [str(d / "missing.tar.gz")],
        "truncated": [str(d / "truncated.tar.gz")],
        "notgzip": [str(d / "notgzip.tar.gz")],
        "evil": [str(d / "evil.th")],
        "unknown_option": [m, "--no-such-option"],
        "no_match": [m, "--match", "nosuchlayer"],
        "bad_seed": [m, "--randomize", "--seed", "-1"],
        "unwritable": [m, "--output-file", str(d / "no" / "such" / "dir" / "out.json")],
        "output_is_dir": [m, "--output-file", str(d)],
    }
    env = dict(os.environ, PYTHONWARNINGS="ignore")

    def run(args):
        p = subprocess.run([sys.executable, "-m", "allennlp_analyze", *args], cwd=d, env=env,
                           capture_output=True, text=True, timeout=300)
        return Run(p.returncode, p.stdout, p.stderr)

    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(cases, pool.map(run, cases.values())))
    return results


def _records(run):
    assert run.rc == 0, run.err
    return json.loads(run.out)["records"]


# ---------------------------------------------------------------------------------------------
# MiniLM


def test_minilm_feed_forward_matrices(runs):
    recs = _records(runs["json"])
    assert len(recs) == 12
    for r in recs:
        assert (r["N"], r["M"], r["Q"]) == (1536, 384, 4.0) and r["status"] == "ok"
        assert "intermediate" in r["name"] or "output.dense" in r["name"]
        assert r["rank_loose"] == r["rank_numpy"] == r["rank_nr"] == 384
    assert runs["json"].err == ""


def test_minilm_with_min_q_1_adds_the_square_attention_matrices(runs):
    recs = _records(runs["json_q1"])
    square = [r for r in recs if r["shape"] == [384, 384]]
    attention = [r for r in square if ".attention." in r["name"]]
    assert len(attention) == 24  # 6 layers x (query, key, value, output)
    assert len([r for r in recs if r["M"] == 384 and r["N"] == 1536]) == 12
    assert {r["name"] for r in square} - {r["name"] for r in attention} == {"pooler.dense.weight"}
    assert len(recs) == 12 + 24 + 1


def test_minilm_table(runs):
    run = runs["table"]
    assert run.rc == 0 and run.err == ""
    names = [r["name"] for r in _records(runs["json"])]
    lines = run.out.splitlines()
    for name in names:
        assert sum(line.startswith(name + " ") for line in lines) == 1
    assert "Summary: 12 matrices analyzed in 1 model" in run.out


def test_wide_table_adds_the_spectral_columns(runs):
    default, wide = runs["table"].out.splitlines()[0], runs["wide"].out.splitlines()[0]
    extra = ["spikes", "mp_softrank", "entropy", "eff. rank", "rand sv_max", "traps", "rand dist"]
    assert not any(c in default for c in extra) and all(c in wide for c in extra)
    assert wide.split()[-1] == default.split()[-1] == "status"
    assert runs["wide"].rc == 0 and "correlation traps (--randomize): " in runs["wide"].out
    assert "correlation traps" not in runs["table"].out and "MP bulk:" in runs["wide"].out
    recs = {r["name"]: r for r in _records(runs["json"])}
    rows = [ln.split() for ln in runs["wide"].out.splitlines()[2:4]]
    for row in rows:
        rec = recs[row[0]]
        assert row[-8] == str(rec["num_spikes"]) and row[-7] == f"{rec['mp_softrank']:.3f}"
        assert rec["rand_sv_max"] is None  # the JSON run was not randomized
        assert row[-3].isdigit()           # its traps


def test_minilm_csv(runs):
    run = runs["csv"]
    assert run.rc == 0
    reader = csv.DictReader(io.StringIO(run.out))
    assert tuple(reader.fieldnames) == RECORD_FIELDS
    positions = [RECORD_FIELDS.index(c) for c in DOCUMENTED_COLUMNS]
    assert positions == sorted(positions)  # all present, in the documented order
    rows = list(reader)
    assert len(rows) == 12
    by_name = {r["name"]: r for r in _records(runs["json"])}
    for row in rows:
        rec = by_name[row["name"]]
        assert row["shape"] in ("1536x384", "384x1536")
        assert float(row["alpha"]) == rec["alpha"] and float(row["sv_min"]) == rec["sv_min"]
        assert int(row["rank_numpy"]) == rec["rank_numpy"] and row["status"] == "ok"


def test_minilm_json_values_equal_numpy_and_powerlaw(runs, minilm_path):
    from safetensors.numpy import load_file

    rec = next(r for r in _records(runs["json"]) if r["name"] == MINILM_FF)
    W = load_file(str(minilm_path))[MINILM_FF].astype(np.float64)
    S = np.linalg.svd(W, compute_uv=False)
    lam = S ** 2
    N, M = max(W.shape), min(W.shape)
    assert rec["shape"] == list(W.shape) and rec["dtype"] == "float32"
    assert rec["sv_max"] == pytest.approx(S[0], rel=1e-8)
    assert rec["sv_min"] == pytest.approx(S[-1], rel=1e-8)
    assert rec["log10_sv_min"] == pytest.approx(np.log10(S[-1]), abs=1e-8)
    assert rec["rank_loose"] == np.linalg.matrix_rank(W, tol=1e-3)
    assert rec["rank_numpy"] == np.linalg.matrix_rank(W, tol=S[0] * N * EPS32)
    assert rec["rank_nr"] == np.linalg.matrix_rank(W, tol=S[0] / 2 * np.sqrt(N + M + 1) * EPS32)
    assert rec["rank_loss"] == M - rec["rank_loose"] == 0
    ref = powerlaw_reference(lam)
    assert rec["xmin"] == pytest.approx(ref.xmin, rel=1e-8)
    assert rec["alpha"] == pytest.approx(ref.alpha, rel=1e-8)
    assert rec["D"] == pytest.approx(ref.D, rel=1e-6)
    assert rec["num_tail"] == ref.n_tail and rec["xmax"] is None
    assert rec["num_evals"] == M
    assert rec["stable_rank"] == pytest.approx(lam.sum() / lam[0], rel=1e-8)
    assert rec["log_norm"] == pytest.approx(np.log10(lam.sum()), abs=1e-9)
    assert rec["log_spectral_norm"] == pytest.approx(np.log10(lam[0]), abs=1e-9)
    assert rec["alpha_weighted"] == pytest.approx(ref.alpha * np.log10(lam[0]), rel=1e-8)


def test_output_file(runs, files):
    run = runs["output_file"]
    assert run.rc == 0 and run.out == "" and run.err == ""
    with open(files / "out.json", encoding="utf-8") as f:
        doc = json.load(f)
    assert doc["records"] == json.loads(runs["json"].out)["records"]


# ---------------------------------------------------------------------------------------------
# Exit codes


def test_fail_on_collapse(runs):
    assert runs["collapsed"].rc == 1
    assert "collapsed: low.weight" in runs["collapsed"].out
    assert runs["collapsed_no_flag"].rc == 0
    assert runs["healthy"].rc == 0


def test_archives(runs):
    (rec,) = _records(runs["archive"])
    assert rec["name"] == "fc.weight" and rec["status"] == "ok"
    assert runs["archive09"].rc == 0 and "Summary:" in runs["archive09"].out


def test_single_row_model_is_not_an_error(runs):
    recs = _records(runs["rows"])
    assert [r["status"] for r in recs] == ["single_row", "single_row"]
    assert all(r["alpha"] is None and r["rank_loose"] == 1 for r in recs)


def test_nan_weights_are_reported_as_incomplete(runs):
    doc = json.loads(runs["nan_json"].out)
    assert runs["nan_json"].rc == 0
    status = {r["name"]: r["status"] for r in doc["records"]}
    assert status == {"broken.weight": "nonfinite", "fine.weight": "ok"}
    assert doc["summary"]["complete"] is False
    table = runs["nan_table"]
    assert table.rc == 0 and "INCOMPLETE" in table.out and "Traceback" not in table.err


@pytest.mark.parametrize("case, fragment", [
    ("missing", "missing.tar.gz"),
    ("truncated", "truncated.tar.gz"),
    ("notgzip", "notgzip.tar.gz"),
    ("evil", "evil.th"),
    ("unknown_option", "--no-such-option"),
    ("no_match", "nosuchlayer"),
    ("bad_seed", "--seed"),
    ("unwritable", "out.json"),
    ("output_is_dir", "cannot write"),
])
def test_bad_input_exit_2_one_line(runs, files, case, fragment):
    run = runs[case]
    assert run.rc == 2, run
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("allennlp-analyze: error: ") and fragment in lines[0]
    assert "Traceback" not in run.err + run.out
    if case == "evil":
        assert not (files / "PWNED").exists()
