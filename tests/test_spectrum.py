"""Singular values and numerical ranks against numpy: ``numpy.linalg.svd`` and
``numpy.linalg.matrix_rank`` (with its default tolerance, or with the Numerical Recipes and loose
ones passed explicitly), the Gram fast path against the SVD, and the record's derived
quantities against their definitions."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allennlp_analyze import AnalysisOptions, analyze_matrix
from allennlp_analyze.records import RANK_CRITERIA
from allennlp_analyze.spectrum import ACCURACY_C, GRAM_RTOL, singular_values

from conftest import MAX_EXAMPLES, powerlaw_reference

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)


def nr_tol(S, N, M, eps):
    return S.max() / 2.0 * np.sqrt(N + M + 1.0) * eps


def storage_noise_estimate(W):
    """sigma_row + sigma_col of independent errors of variance spacing(w)**2 / 12 (numpy's
    ``spacing``: the float64 ulp of each entry)."""
    s2 = np.spacing(np.abs(W)) ** 2 / 12.0
    return np.sqrt(s2.sum(axis=1).max()) + np.sqrt(s2.sum(axis=0).max())


def orthonormal(rng, n, m):
    q, _ = np.linalg.qr(rng.standard_normal((n, m)))
    return q


def with_singular_values(rng, n, m, s):
    """An n x m matrix U diag(s) V^T with random orthonormal U (n x k), V (m x k), k = len(s)."""
    k = len(s)
    return (orthonormal(rng, n, k) * np.asarray(s)) @ orthonormal(rng, m, k).T


def _matrices():
    rng = np.random.default_rng(2024)
    return {
        "gaussian_tall": rng.standard_normal((300, 120)),
        "gaussian_wide": rng.standard_normal((80, 250)) * 0.02,
        "gaussian_square": rng.standard_normal((150, 150)),
        # product of thin factors: rank 20 exactly, numerically 20
        "low_rank_tall": rng.standard_normal((300, 20)) @ rng.standard_normal((20, 150)),
        "low_rank_wide": rng.standard_normal((90, 7)) @ rng.standard_normal((7, 200)),
        # singular values from 1 down to 1e-18: the numpy / NR tolerances fall inside
        "ill_conditioned": with_singular_values(rng, 300, 120, np.logspace(0, -18, 120)),
        "ill_conditioned_scaled": 1e3 * with_singular_values(rng, 400, 100,
                                                             np.logspace(0, -17, 100)),
    }


MATRICES = _matrices()


# ---------------------------------------------------------------------------------------------
# Ranks (float64 storage, eps = 2**-52)


@pytest.mark.parametrize("method", ["auto", "svd"])
@pytest.mark.parametrize("name", sorted(MATRICES))
def test_ranks_equal_numpy(name, method):
    W = MATRICES[name]
    N, M = max(W.shape), min(W.shape)
    S = np.linalg.svd(W, compute_uv=False)
    rec = analyze_matrix(W, AnalysisOptions(method=method))
    assert rec.dtype == "float64"
    assert rec.rank_numpy == np.linalg.matrix_rank(W)
    assert rec.rank_nr == np.linalg.matrix_rank(W, tol=nr_tol(S, N, M, EPS64))
    assert rec.rank_loose == np.linalg.matrix_rank(W, tol=1e-3)
    if name.startswith("low_rank"):
        assert rec.rank_numpy == rec.rank_nr == np.linalg.matrix_rank(W) < M
    if name.startswith("ill"):
        assert rec.rank_nr > rec.rank_numpy  # the NR tolerance is the smaller one
        assert rec.rank_loose < rec.rank_numpy


@pytest.mark.parametrize("criterion", RANK_CRITERIA)
@pytest.mark.parametrize("name", ["low_rank_tall", "ill_conditioned", "gaussian_wide"])
def test_rank_loss_under_each_criterion(name, criterion):
    W = MATRICES[name]
    N, M = max(W.shape), min(W.shape)
    S = np.linalg.svd(W, compute_uv=False)
    tol = {"loose": 1e-3, "numpy": S.max() * N * EPS64, "nr": nr_tol(S, N, M, EPS64),
           # float64 storage: its rounding (ulp / sqrt(12) per entry, row + column norms) is
           # below the SVD's own round-off, numpy's float64 tolerance, which then sets the floor
           "noise": max(S.max() * N * EPS64, storage_noise_estimate(W))}[criterion]
    rec = analyze_matrix(W, AnalysisOptions(rank_criterion=criterion))
    assert rec.rank_loss == M - np.linalg.matrix_rank(W, tol=tol)
    assert rec.collapsed(criterion) == (rec.rank_loss > 0)


@pytest.mark.parametrize("loose_tol", [1e-5, 1e-3, 1e-2, 0.3])
def test_loose_rank_counts_singular_values_above_loose_tol(loose_tol):
    W = with_singular_values(np.random.default_rng(5), 200, 80, np.logspace(1, -7, 80))
    rec = analyze_matrix(W, AnalysisOptions(loose_tol=loose_tol))
    S = np.linalg.svd(W, compute_uv=False)
    assert rec.rank_loose == np.linalg.matrix_rank(W, tol=loose_tol) == np.sum(S > loose_tol)
    assert rec.rank_loss == 80 - rec.rank_loose  # default criterion "loose"


def test_float32_low_rank_matrix_reads_as_its_true_rank():
    """The headline case: a float32-stored 3072 x 768 matrix of true rank 700. Its zero singular
    values come out of fp32 round-off at ~1e-6 of the largest; judged with float64's eps (as
    ``matrix_rank`` on the widened array does) it looks full rank, with float32's eps it is 700."""
    rng = np.random.default_rng(700)
    W = (rng.standard_normal((3072, 700)) @ rng.standard_normal((700, 768))).astype(np.float32)
    rec = analyze_matrix(W)  # dtype: W's own, float32
    assert rec.dtype == "float32"
    assert rec.rank_numpy == rec.rank_nr == 700
    assert rec.rank_loss == 768 - rec.rank_loose
    W64 = W.astype(np.float64)  # exact; float64 LAPACK is 3x faster here than float32's
    assert np.linalg.matrix_rank(W64) == 768  # float64 eps: the failure mode we avoid
    sv_max = np.sqrt(np.linalg.eigvalsh(W64.T @ W64)[-1])  # S.max(), cheaply
    assert sv_max == pytest.approx(rec.sv_max, rel=1e-12)
    assert np.linalg.matrix_rank(W64, tol=sv_max * 3072 * EPS32) == 700


# ---------------------------------------------------------------------------------------------
# Gram path: same ranks as the SVD, kept only where it is accurate; the bottom cluster of an
# ill-conditioned matrix is recomputed by the Ritz step, to the SVD's absolute accuracy


@pytest.mark.parametrize("smallest", [1e-4, 1e-6, 1e-8, 1e-10, 1e-12])
@pytest.mark.parametrize("shape", [(400, 200), (150, 600)])
def test_gram_path_hands_ill_conditioned_values_to_the_ritz_step(shape, smallest):
    n, m = shape
    k = min(n, m)
    rng = np.random.default_rng(int(-np.log10(smallest)) + n)
    # a well-spread bulk, then a block of tiny values around `smallest` (relative)
    s = np.r_[np.linspace(1.0, 0.1, k - 10), smallest * np.linspace(3.0, 1.0, 10)]
    W = 2.5 * with_singular_values(rng, n, m, s)
    S = np.linalg.svd(W, compute_uv=False)
    N, M = max(n, m), min(n, m)
    for eps in (EPS64, EPS32):  # the tolerances scale with the storage eps
        auto = singular_values(W, eps, method="auto")
        svd = singular_values(W, eps, method="svd")
        assert auto.method == "gram+ritz" and svd.method == "svd"
        # the guarantee is ACCURACY_C (N + M) eps64 nu_max; measured: ~1/50 of (N + M) eps64 nu_max
        assert np.abs(auto.sv - S).max() <= (N + M) * EPS64 * S[0] <= \
            ACCURACY_C * (N + M) * EPS64 * S[0]
        tols = {"loose": 1e-3, "numpy": S[0] * N * eps, "nr": nr_tol(S, N, M, eps)}
        for crit, tol in tols.items():
            assert getattr(auto.tolerances, crit) == pytest.approx(tol, rel=1e-12)
            assert auto.rank(getattr(auto.tolerances, crit)) == \
                svd.rank(getattr(svd.tolerances, crit)) == np.linalg.matrix_rank(W, tol=tol)
    assert svd.sv == pytest.approx(S, rel=1e-8, abs=64 * EPS64 * S[0])
    if smallest >= 1e-6:  # above round-off: every value to 1e-8 relative
        assert svd.sv[-1] == pytest.approx(S[-1], rel=1e-8)


def test_gram_path_is_kept_on_a_well_conditioned_matrix():
    W = np.random.default_rng(1536).standard_normal((1536, 384)) * 0.05
    S = np.linalg.svd(W, compute_uv=False)
    for orientation in (W, W.T):
        spec = singular_values(orientation, EPS32, method="auto")
        assert spec.method == "gram"
        assert spec.sv == pytest.approx(S, rel=1e-8, abs=0)
        assert (spec.N, spec.M) == (1536, 384)
    rec = analyze_matrix(W)
    assert rec.method == "gram"
    assert rec.sv_min == pytest.approx(S[-1], rel=1e-8)
    assert rec.rank_numpy == np.linalg.matrix_rank(W)
    assert singular_values(W, EPS32, method="gram").method == "gram"


def test_gram_path_falls_back_near_a_rank_tolerance():
    """Well conditioned, but one singular value sits on the loose tolerance: Gram's 1e-8 error
    could move it across, so the SVD decides."""
    W = np.random.default_rng(9).standard_normal((600, 200))
    S = np.linalg.svd(W, compute_uv=False)
    assert singular_values(W, EPS64).method == "gram"
    spec = singular_values(W, EPS64, loose_tol=S[100], method="auto")
    assert spec.method == "gram>svd"
    assert spec.rank(spec.tolerances.loose) == np.linalg.matrix_rank(W, tol=S[100]) == 100
    near = singular_values(W, EPS64, loose_tol=S[100] * (1 + 0.5 * GRAM_RTOL), method="auto")
    assert near.method == "gram>svd"


def test_unknown_method_is_refused():
    with pytest.raises(ValueError):
        singular_values(np.eye(3), EPS64, method="qr")


# ---------------------------------------------------------------------------------------------
# Property: random matrices of any shape and scale, with planted tiny singular values


@st.composite
def matrices(draw):
    n, m = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = 10.0 ** draw(st.floats(-4, 3))
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, m))
    k = min(n, m)
    planted = draw(st.lists(st.one_of(st.just(0.0), st.floats(-16, -1).map(lambda e: 10.0 ** e)),
                            max_size=k - 1 if k > 1 else 0))
    if planted:
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        s[k - len(planted):] = s[0] * np.sort(planted)[::-1]
        W = (U * s) @ Vt
    return W * scale


def _away_from(S, tol, err):
    """No singular value within round-off ``err`` of the tolerance."""
    return not np.any(np.abs(S - tol) <= err)


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(W=matrices(), method=st.sampled_from(["auto", "svd"]))
def test_property_record_equals_numpy_svd(W, method):
    n, m = W.shape
    N, M = max(n, m), min(n, m)
    rec = analyze_matrix(W, AnalysisOptions(method=method))
    assert (rec.N, rec.M, rec.Q) == (N, M, N / M)
    # numpy's SVD of the same orientation (LAPACK's results for W and W^T differ by round-off,
    # ~eps * nu_max, which is everything for a planted value of 1e-15 * nu_max)
    S = np.linalg.svd(W if n >= m else W.T, compute_uv=False)
    S_other = np.linalg.svd(W, compute_uv=False)
    roundoff = 8 * N * EPS64 * S[0]
    assert rec.sv_max == pytest.approx(S[0], rel=1e-8)
    assert rec.sv_min == pytest.approx(S[-1], rel=1e-8)
    assert abs(rec.sv_min - S_other[-1]) <= 1e-8 * S_other[-1] + roundoff
    if S[-1] > 0:  # nu_min is known to roundoff (absolute): in log10, roundoff / (nu ln 10)
        assert rec.log10_sv_min == pytest.approx(
            np.log10(S[-1]), abs=1e-8 + roundoff / (S[-1] * np.log(10.0)))

    tols = {"numpy": S[0] * N * EPS64, "nr": nr_tol(S, N, M, EPS64), "loose": 1e-3}
    oriented = W if n >= m else W.T
    for crit, tol in tols.items():
        rank = rec.rank(crit)
        assert rank == np.linalg.matrix_rank(oriented, tol=tol)
        if _away_from(S_other, tol, roundoff):
            assert rank == np.linalg.matrix_rank(W, tol=tol)
    if _away_from(S_other, tols["numpy"], roundoff):
        assert rec.rank_numpy == np.linalg.matrix_rank(W)
    assert rec.rank_loss == M - rec.rank_loose

    lam = S ** 2
    assert rec.stable_rank == pytest.approx(lam.sum() / lam[0], rel=1e-8)
    assert rec.log_norm == pytest.approx(np.log10(lam.sum()), abs=1e-9)
    assert rec.log_spectral_norm == pytest.approx(np.log10(lam[0]), abs=1e-9)

    fitted = lam[S > tols["numpy"]]
    assert rec.num_evals == fitted.size
    if M == 1:
        assert rec.status == "single_row" and rec.alpha is None
        return
    ref = powerlaw_reference(fitted)
    if ref is None:
        assert rec.status == "too_few_eigenvalues" and rec.alpha is None
        return
    assert rec.status == "ok"
    assert rec.xmin == pytest.approx(ref.xmin, rel=1e-8)
    assert rec.alpha == pytest.approx(ref.alpha, rel=1e-8)
    assert rec.D == pytest.approx(ref.D, rel=1e-6, abs=1e-12)
    assert rec.num_tail == ref.n_tail
    assert rec.alpha_weighted == pytest.approx(ref.alpha * np.log10(lam[0]), rel=1e-8, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# The torch path (``device``): the same values as numpy's, on the CPU here and on CUDA if present


def _devices():
    torch = pytest.importorskip("torch")
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("method", ["auto", "svd", "gram"])
@pytest.mark.parametrize("name", ["gaussian_tall", "gaussian_wide", "ill_conditioned"])
def test_torch_device_path_equals_numpy(name, method):
    W = MATRICES[name]
    S = np.linalg.svd(W, compute_uv=False)
    ref = singular_values(W, EPS32, method=method)
    for device in _devices():
        spec = singular_values(W, EPS32, method=method, device=device)
        assert spec.method == ref.method
        if method == "gram":  # forced: only values well above lambda_max round-off are right
            big = S >= 1e-3 * S[0]
            assert spec.sv[big] == pytest.approx(S[big], rel=1e-6)
        elif spec.method == "gram":  # kept by "auto": all of them to 1e-8
            assert spec.sv == pytest.approx(S, rel=1e-8)
        else:
            assert spec.sv == pytest.approx(S, rel=1e-8, abs=64 * EPS64 * S[0])
        for crit in RANK_CRITERIA:  # (forced Gram ranks count round-off noise: not compared)
            tol = getattr(spec.tolerances, crit)
            if method != "gram" and not np.any(np.abs(S - tol) <= 1e-6 * tol):
                assert spec.rank(tol) == ref.rank(getattr(ref.tolerances, crit))
