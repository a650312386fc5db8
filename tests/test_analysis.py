"""The analysis: a record's fit against powerlaw 1.5 on numpy's eigenvalues, the statuses of
matrices that cannot be fitted, whole models (MiniLM, the AllenNLP 0.9 archives) against an
independent read of their weights."""
import io
import tarfile

import numpy as np
import pytest

from allennlp_analyze import AnalysisOptions, analyze, analyze_matrix
from allennlp_analyze.records import RECORD_FIELDS

from conftest import NUM_ARCHIVES09, assert_same_fit, powerlaw_reference

EPS32 = float(np.finfo(np.float32).eps)
#: Record fields that only a computed spectrum fills.
SPECTRAL_FIELDS = ("sv_max", "sv_min", "log10_sv_min", "rank_loose", "rank_numpy", "rank_nr",
                   "rank_loss", "alpha", "xmin", "xmax", "D", "num_tail", "num_evals",
                   "stable_rank", "log_norm", "log_spectral_norm", "alpha_weighted", "method")
FIT_FIELDS = ("alpha", "xmin", "xmax", "D", "num_tail", "alpha_weighted")


# ---------------------------------------------------------------------------------------------
# The record's fit is powerlaw 1.5's on numpy's eigenvalues


@pytest.mark.parametrize("fit_xmax", ["none", "max"])
@pytest.mark.parametrize("shape", [(300, 100), (120, 400), (200, 200), (1000, 50)])
def test_record_fit_equals_powerlaw_on_numpy_eigenvalues(shape, fit_xmax):
    W = np.random.default_rng(shape[0] * shape[1]).standard_normal(shape)
    lam = np.linalg.svd(W, compute_uv=False) ** 2  # all far above round-off
    xmax = lam.max() if fit_xmax == "max" else None
    ref = powerlaw_reference(lam, xmax=xmax)
    for method in ("svd", "auto"):
        rec = analyze_matrix(W, AnalysisOptions(fit_xmax=fit_xmax, method=method))
        assert rec.status == "ok" and rec.num_evals == min(shape)
        if method == "svd" and shape[0] >= shape[1]:
            # the same LAPACK call on the same array: the same eigenvalues, bit for bit
            assert_same_fit(rec, ref)
        else:  # eigenvalues equal to round-off (Gram path or transposed SVD)
            assert rec.xmin == pytest.approx(ref.xmin, rel=1e-8)
            assert rec.alpha == pytest.approx(ref.alpha, rel=1e-8)
            assert rec.D == pytest.approx(ref.D, rel=1e-6)
            assert rec.num_tail == ref.n_tail
        assert rec.xmax == (None if xmax is None else pytest.approx(xmax, rel=1e-8))
        assert rec.alpha_weighted == pytest.approx(ref.alpha * np.log10(lam.max()), rel=1e-8)


def test_round_off_eigenvalues_are_left_out_of_the_fit():
    """A rank-30 float64 matrix: 50 - 30 singular values are round-off (below numpy's
    tolerance); the fit sees the 30 real eigenvalues only."""
    rng = np.random.default_rng(30)
    W = rng.standard_normal((200, 30)) @ rng.standard_normal((30, 50))
    S = np.linalg.svd(W, compute_uv=False)
    real = S[S > S.max() * 200 * np.finfo(np.float64).eps] ** 2
    assert real.size == 30
    rec = analyze_matrix(W)
    assert rec.num_evals == 30 and rec.rank_numpy == 30 and rec.rank_loss == 20
    assert_same_fit(rec, powerlaw_reference(real))


# ---------------------------------------------------------------------------------------------
# Statuses


def _assert_no_spectrum(rec):
    for f in SPECTRAL_FIELDS:
        assert getattr(rec, f) is None, f


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_are_reported_and_the_run_goes_on(bad):
    rng = np.random.default_rng(0)
    broken = rng.standard_normal((60, 20)).astype(np.float32)
    broken[7, 3] = bad
    healthy = rng.standard_normal((60, 20)).astype(np.float32)
    result = analyze({"a.weight": broken, "b.weight": healthy})
    a, b = result.records
    assert a.status == "nonfinite" and a.name == "a.weight"
    _assert_no_spectrum(a)
    assert (a.N, a.M, a.dtype) == (60, 20, "float32")
    assert b.status == "ok" and b.alpha is not None
    assert result.summary.status == {"nonfinite": 1, "ok": 1}
    assert not result.summary.complete
    assert result.to_dicts()[0]["sv_min"] is None


def test_all_zero_matrix():
    rec = analyze_matrix(np.zeros((50, 20), dtype=np.float32))
    assert rec.status == "all_zero"
    assert rec.rank_loose == rec.rank_numpy == rec.rank_nr == 0
    assert rec.rank_loss == 20 and rec.collapsed("loose")
    assert rec.sv_max == rec.sv_min == 0.0 and rec.log10_sv_min == -np.inf
    for f in FIT_FIELDS:
        assert getattr(rec, f) is None
    assert rec.to_dict()["log10_sv_min"] is None  # JSON-safe


@pytest.mark.parametrize("shape", [(1, 300), (40, 1), (1, 2)])
def test_single_row_or_column(shape):
    w = np.random.default_rng(1).standard_normal(shape)
    rec = analyze_matrix(w)
    assert rec.status == "single_row"
    norm = np.linalg.norm(w)
    assert rec.sv_max == pytest.approx(norm, rel=1e-12) and rec.sv_min == rec.sv_max
    assert (rec.N, rec.M, rec.Q) == (max(shape), 1, float(max(shape)))
    assert rec.rank_loose == rec.rank_numpy == rec.rank_nr == 1 and rec.rank_loss == 0
    assert rec.stable_rank == pytest.approx(1.0)
    for f in FIT_FIELDS:
        assert getattr(rec, f) is None
    assert analyze_matrix(np.zeros(shape)).status == "all_zero"


@pytest.mark.parametrize("W", [
    np.eye(30),                                           # one distinct eigenvalue (1.0)
    np.vstack([3.0 * np.eye(4), np.zeros((2, 4))]),
    np.outer(np.arange(1.0, 41.0), np.arange(1.0, 21.0)),  # rank 1: one eigenvalue above round-off
])
def test_too_few_distinct_eigenvalues(W):
    rec = analyze_matrix(W)
    S = np.linalg.svd(W, compute_uv=False)
    real = S[S > S.max() * max(W.shape) * np.finfo(np.float64).eps] ** 2
    assert np.unique(real).size < 2 and powerlaw_reference(real) is None
    assert rec.status == "too_few_eigenvalues"
    assert rec.sv_max == pytest.approx(S[0]) and rec.rank_numpy == np.linalg.matrix_rank(W)
    for f in FIT_FIELDS:
        assert getattr(rec, f) is None


def test_bad_matrices_are_refused():
    with pytest.raises(ValueError):
        analyze_matrix(np.zeros((3, 4, 5)))
    with pytest.raises(ValueError):
        analyze_matrix(np.zeros((3, 4), dtype=np.int64))


def test_summary():
    rng = np.random.default_rng(2)
    collapsed = (rng.standard_normal((80, 10)) @ rng.standard_normal((10, 40))).astype(np.float32)
    result = analyze({"low.weight": collapsed, "full.weight": rng.standard_normal((80, 40)),
                      "bias": np.zeros(40), "row.weight": rng.standard_normal((1, 30))})
    s = result.summary
    assert s.analyzed == 3 and s.skipped == {"not a matrix (0-D/1-D: biases, norms, scalars)": 1}
    # noise: the float32 matrix's rounding hides its 30 null directions; auto = loose (float32)
    assert s.collapsed == {"loose": 1, "numpy": 1, "nr": 1, "noise": 1, "auto": 1}
    assert s.collapsed_names["numpy"] == ["low.weight"]
    S = np.linalg.svd(collapsed.astype(np.float64), compute_uv=False)
    assert s.sv_min == pytest.approx(S[-1], rel=1e-8) and s.sv_min_name == "low.weight"
    assert s.fitted == 2 and s.status == {"ok": 2, "single_row": 1}
    assert s.complete
    assert set(result.to_dicts()[0]) == set(RECORD_FIELDS)


# ---------------------------------------------------------------------------------------------
# Whole models against an independent read of their weights


def test_minilm_records_against_numpy(minilm_path):
    from safetensors.numpy import load_file

    weights = load_file(str(minilm_path))
    result = analyze(minilm_path, fit_xmax="none")
    assert len(result.records) == 12
    for rec in result.records:
        W = weights[rec.name].astype(np.float64)
        assert rec.shape == weights[rec.name].shape and rec.dtype == "float32"
        S = np.linalg.svd(W, compute_uv=False)
        N, M = max(W.shape), min(W.shape)
        assert (N, M) == (1536, 384) and rec.Q == 4.0
        assert rec.sv_max == pytest.approx(S[0], rel=1e-8)
        assert rec.sv_min == pytest.approx(S[-1], rel=1e-8)
        assert rec.rank_numpy == np.linalg.matrix_rank(W, tol=S.max() * N * EPS32) == 384
        ref = powerlaw_reference(S ** 2)
        assert rec.xmin == pytest.approx(ref.xmin, rel=1e-8)
        assert rec.alpha == pytest.approx(ref.alpha, rel=1e-8)
        assert rec.D == pytest.approx(ref.D, rel=1e-6)
        assert rec.num_tail == ref.n_tail


def _archive_weights(path):
    """The state dict inside an AllenNLP archive, read with tarfile and torch directly."""
    import torch

    with tarfile.open(path, "r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.lstrip("./") == "weights.th")
        data = tar.extractfile(member).read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("index", range(NUM_ARCHIVES09))
def test_allennlp09_archives(allennlp09_archives, index):
    path = allennlp09_archives[index]
    result = analyze(path, min_q=1.0, include=("conv",), conv_min_dim=1)
    assert result.records and result.summary.complete
    assert set(result.summary.status) <= {"ok", "single_row"}
    weights = _archive_weights(path)
    for rec in result.records:
        tensor = weights[rec.name.split("[")[0]].double().numpy()
        W = tensor if rec.slice is None else tensor[(slice(None), slice(None)) +
                                                    tuple(map(int, rec.slice.split(",")))]
        assert rec.shape == W.shape
        S = np.linalg.svd(W, compute_uv=False)
        assert rec.sv_max == pytest.approx(S[0], rel=1e-8)
        assert rec.sv_min == pytest.approx(S[-1], rel=1e-8, abs=1e-6 * S[0] * EPS32)
        N = max(W.shape)
        assert rec.rank_numpy == np.linalg.matrix_rank(W, tol=S.max() * N * EPS32)


def test_models_sharing_a_label_are_told_apart():
    """Two sources with the same label (two in-memory state dicts) get distinct model labels,
    and each model's records keep their own values."""
    rng = np.random.default_rng(7)
    a = {"fc.weight": rng.standard_normal((40, 20)).astype(np.float32)}
    b = {"fc.weight": 3.0 * rng.standard_normal((40, 20)).astype(np.float32)}
    result = analyze(a, b, a)
    models = [r.model for r in result.records]
    assert len(set(models)) == 3 and result.summary.models == models
    assert models[1] == models[0] + " #2" and models[2] == models[0] + " #3"
    sv_a = np.linalg.svd(a["fc.weight"].astype(np.float64), compute_uv=False)
    sv_b = np.linalg.svd(b["fc.weight"].astype(np.float64), compute_uv=False)
    assert result.records[0].sv_max == pytest.approx(sv_a[0], rel=1e-10)
    assert result.records[1].sv_max == pytest.approx(sv_b[0], rel=1e-10)
    assert result.records[2].sv_max == pytest.approx(sv_a[0], rel=1e-10)


def test_batch_of_same_shape_nonfinite_matrices_is_reported_not_fatal():
    """Small matrices of one shape are analyzed in stacked batches; a batch in which every
    matrix has NaN/Inf yields 'nonfinite' records (it crashed with an IndexError before),
    and the finite matrix after it still equals numpy's SVD."""
    rng = np.random.default_rng(3)
    bad = np.full((100, 50), np.nan, dtype=np.float32)
    good = rng.standard_normal((120, 50)).astype(np.float32)  # another shape: its own batch
    result = analyze({"a.weight": bad, "b.weight": bad.copy(), "c.weight": good},
                     workers=1)
    assert [r.status for r in result.records] == ["nonfinite", "nonfinite", "ok"]
    sv = np.linalg.svd(good.astype(np.float64), compute_uv=False)
    assert result.records[2].sv_min == pytest.approx(sv[-1], rel=1e-8)
    assert not result.summary.complete
