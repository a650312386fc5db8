"""The near-square path ("gram+ritz") and the paths around it, against ``numpy.linalg.svd``:

* every singular value within ``ACCURACY_C (N + M) eps64 nu_max`` of numpy's SVD (and the
  measured error far inside it), every rank equal to ``numpy.linalg.matrix_rank``'s under every
  criterion: random square matrices stored in fp32 and bf16, engineered spectra down to
  1e-14 nu_max, exact low rank, clustered and repeated small values, generated ones;
* a matrix built to fail the bound takes the SVD and says so in ``method``;
* weights of 1e300, 1e160, 1e-300 and denormals: analyzed like any matrix (power-of-two scaling),
  in every path (whole, stacked, streamed, torch);
* streamed (row blocks read from a memory-mapped safetensors file, bf16 widened block by block)
  and in-memory matrices give the same records, bit for bit, with memory bounded by blocks;
* records identical for any worker count and processing order;
* without numpy's OpenBLAS (no LAPACK backend): the SVD fallback, same values as numpy's SVD.
"""
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allennlp_analyze import (AnalysisOptions, _lapack, analyze, analyze_matrix, matrix,
                              source_run, spectrum)
from allennlp_analyze.spectrum import ACCURACY_C, singular_values

from conftest import MAX_EXAMPLES, powerlaw_reference

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
EPSBF16 = 2.0 ** -7


def with_singular_values(rng, n, m, s):
    """n x m matrix U diag(s) V^T with random orthonormal U, V (k = len(s) columns)."""
    U, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    V, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    return (U * np.asarray(s)) @ V.T


def to_bf16(W):
    """W rounded to bfloat16 (by torch, round to nearest even), as float32."""
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.asarray(W, dtype=np.float32)).bfloat16().float().numpy()


def tolerances(S, N, M, eps, loose=1e-3):
    return {"loose": loose, "numpy": S[0] * max(N, M) * eps,
            "nr": S[0] / 2.0 * np.sqrt(N + M + 1.0) * eps}


def check_against_svd(W, eps, method="gram+ritz", measured=1.0):
    """Spectrum of W against numpy's SVD of the same (oriented, float64) matrix: ``method``,
    every value within the guarantee and within ``measured`` (N + M) eps64 nu_max, every rank
    equal to matrix_rank's. Returns the spectrum."""
    W64 = np.asarray(W, dtype=np.float64)
    W64 = W64 if W64.shape[0] >= W64.shape[1] else W64.T
    N, M = W64.shape
    S = np.linalg.svd(W64, compute_uv=False)
    spec = singular_values(W, eps)
    assert spec.method == method
    err = np.abs(spec.sv - S).max()
    assert err <= ACCURACY_C * (N + M) * EPS64 * S[0]
    assert err <= measured * (N + M) * EPS64 * S[0], err / ((N + M) * EPS64 * S[0])
    for crit, tol in tolerances(S, N, M, eps).items():
        assert spec.rank(getattr(spec.tolerances, crit)) == np.linalg.matrix_rank(W64, tol=tol), crit
    return spec


# ---------------------------------------------------------------------------------------------
# Accuracy and ranks


@pytest.mark.parametrize("n", [120, 768])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_random_square_matrices(n, dtype):
    rng = np.random.default_rng(n)
    W = rng.standard_normal((n, n)).astype(np.float32) * 0.02
    eps = EPS32
    if dtype == "bfloat16":
        W, eps = to_bf16(W), EPSBF16
    check_against_svd(W, eps, measured=0.1)


def test_near_square_rectangular_and_wide():
    rng = np.random.default_rng(7)
    # nu_min / nu_max ~ (1 - sqrt(M / N)) / 2 < 1 / 128 only for N < ~1.03 M
    check_against_svd(rng.standard_normal((305, 300)).astype(np.float32), EPS32, measured=0.1)
    check_against_svd(rng.standard_normal((298, 300)), EPS64, measured=0.1)  # wide, float64


@pytest.mark.parametrize("smallest", [1e-4, 1e-8, 1e-12, 1e-14])
def test_engineered_spectra_down_to_1e14(smallest):
    """A bulk and ten values from 3 down to 1 times ``smallest`` (relative): recomputed to the
    SVD's absolute accuracy, ranks under every criterion equal, also with float64's eps."""
    rng = np.random.default_rng(int(-np.log10(smallest)))
    s = np.r_[np.linspace(1.0, 0.1, 290), smallest * np.linspace(3.0, 1.0, 10)]
    W = with_singular_values(rng, 400, 300, s)
    # the noise criterion's floor, and with float64's eps numpy's tolerance too, is
    # 400 eps64 nu_max: within the error bound of the values at 1e-14, whose rank under it is
    # then left to the SVD
    method = "gram+ritz" if smallest > 1e-13 else "gram+ritz>svd"
    check_against_svd(W, EPS32, method=method)
    check_against_svd(W, EPS64, method=method)


def test_exact_low_rank():
    """Rank 330 of 400, stored in float32: the 70 zero values (fp32 round-off, ~1e-6 nu_max)
    form the cluster; numpy and NR ranks are 330."""
    rng = np.random.default_rng(330)
    W = (rng.standard_normal((400, 330)) @ rng.standard_normal((330, 400))).astype(np.float32)
    spec = check_against_svd(W, EPS32)
    assert spec.rank(spec.tolerances.numpy) == spec.rank(spec.tolerances.nr) == 330


@pytest.mark.parametrize("kind", ["repeated", "clustered"])
def test_clustered_and_repeated_small_values(kind):
    rng = np.random.default_rng(20)
    if kind == "repeated":  # twenty equal values
        tail = np.full(20, 1e-9)
    else:  # twenty values 1e-12 apart around 1e-6
        tail = 1e-6 + 1e-12 * np.arange(20)[::-1]
    W = with_singular_values(rng, 350, 300, np.r_[np.linspace(2.0, 0.2, 280), tail])
    check_against_svd(W, EPS32)


@st.composite
def near_square(draw):
    m = draw(st.integers(20, 90))
    n = m + draw(st.integers(0, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = np.sort(rng.uniform(0.05, 1.0, m))[::-1] * 10.0 ** draw(st.floats(-3, 3))
    planted = draw(st.lists(st.floats(-15, -3).map(lambda e: 10.0 ** e), max_size=m // 5))
    if planted:
        s[m - len(planted):] = s[0] * np.sort(planted)[::-1]
    W = with_singular_values(rng, n, m, s)
    return W if draw(st.booleans()) else W.T


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(W=near_square(), fp32=st.booleans())
def test_property_near_square_equals_numpy_svd(W, fp32):
    eps = EPS32 if fp32 else EPS64
    W64 = W if W.shape[0] >= W.shape[1] else W.T
    N, M = W64.shape
    S = np.linalg.svd(W64, compute_uv=False)
    spec = singular_values(W, eps)
    assert spec.method in ("gram", "gram+ritz", "gram>svd", "gram+ritz>svd")
    assert np.abs(spec.sv - S).max() <= ACCURACY_C * (N + M) * EPS64 * S[0]
    if spec.method.endswith("svd"):
        np.testing.assert_array_equal(spec.sv, S)  # the SVD path: numpy's SVD itself
    for crit, tol in tolerances(S, N, M, eps).items():
        assert spec.rank(getattr(spec.tolerances, crit)) == np.linalg.matrix_rank(W64, tol=tol)


def test_a_matrix_that_fails_the_bound_takes_the_svd():
    """Five values near zero under seventy packed within 0.1% of the Gram limit nu_max / 128:
    every cut k of the cluster falls inside the pack, where the gap lambda_{k+1} - lambda_k is
    ~4e-10 lambda_max, so the bound for the values near zero, h / sqrt(eta), exceeds ACCURACY_C
    (N + M) eps64 nu_max (although the Ritz values themselves are accurate); the SVD decides:
    method "gram+ritz>svd", values numpy's."""
    rng = np.random.default_rng(60)
    s = np.r_[np.linspace(1.0, 0.1, 325), np.linspace(1.001, 0.999, 70) / (2 * ACCURACY_C),
              np.full(5, 1e-10)]
    W = with_singular_values(rng, 400, 400, s)
    spec = singular_values(W, EPS32)
    assert spec.method == "gram+ritz>svd"
    np.testing.assert_array_equal(spec.sv, np.linalg.svd(W, compute_uv=False))
    assert analyze_matrix(W, AnalysisOptions()).method == "gram+ritz>svd"


def test_singular_vectors_only_of_the_ritz_block(monkeypatch):
    """The Ritz step computes vectors of the N x k block W V_k only (k <= M / 4), never of W;
    no eigenvectors of the whole Gram matrix (no eigh)."""
    calls = []
    real_svd = np.linalg.svd

    def svd(a, full_matrices=True, compute_uv=True, **kw):
        calls.append((a.shape, compute_uv))
        return real_svd(a, full_matrices=full_matrices, compute_uv=compute_uv, **kw)

    monkeypatch.setattr(np.linalg, "svd", svd)
    monkeypatch.setattr(np.linalg, "eigh", lambda *a, **k: pytest.fail("eigh called"))
    W = np.random.default_rng(3).standard_normal((300, 300))
    assert singular_values(W, EPS32).method == "gram+ritz"
    assert calls and all(not uv or shape[1] <= 300 // 4 for shape, uv in calls)


# ---------------------------------------------------------------------------------------------
# Extreme magnitudes: power-of-two scaling, every path


SCALES = [1e300, 1e160, 1e-300, 1e-310]


def scaled_reference(W):
    """numpy's SVD of W scaled into [0.5, 1) by a power of two, and that exponent."""
    e = int(np.frexp(np.abs(W).max())[1])
    return np.linalg.svd(np.ldexp(W, -e), compute_uv=False), e


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("shape", [(200, 60), (120, 120)])
def test_extreme_magnitudes_are_analyzed_like_any_matrix(scale, shape):
    rng = np.random.default_rng(int(abs(np.log10(scale))))
    W = rng.standard_normal(shape) * scale
    S, e = scaled_reference(W)
    N, M = max(shape), min(shape)
    for method in ("auto", "svd"):
        spec = singular_values(W, EPS64, method=method)
        assert spec.exponent == e
        limit = ACCURACY_C * (N + M) * EPS64 * S[0]
        assert np.abs(spec.unit_sv - S).max() <= limit
        np.testing.assert_allclose(spec.sv, np.ldexp(S, e), rtol=1e-9, atol=np.ldexp(limit, e))
    rec = analyze_matrix(W, AnalysisOptions(min_q=1.0))
    assert rec.status == "ok" and rec.alpha is not None
    # the storage rounding, accumulated from the unscaled blocks: sqrt(||E||_1 ||E||_inf) with
    # |e_ij| <= ulp(w_ij) / 2 (numpy's spacing: the float64 ulp, subnormal spacing included)
    half_ulp = np.spacing(np.abs(W)) / 2
    bound = np.sqrt(half_ulp.sum(axis=0).max()) * np.sqrt(half_ulp.sum(axis=1).max())
    assert rec.noise_bound == pytest.approx(bound, rel=1e-9)
    assert rec.log10_sv_min == pytest.approx(np.log10(S[-1]) + e * np.log10(2.0), abs=1e-9)
    assert rec.log_spectral_norm == pytest.approx(2 * (np.log10(S[0]) + e * np.log10(2.0)), abs=1e-12)
    assert rec.stable_rank == pytest.approx(np.sum(S ** 2) / S[0] ** 2, rel=1e-9)
    lam = S ** 2
    ref = powerlaw_reference(lam[np.ldexp(S, e) > np.ldexp(S[0], e) * N * EPS64])
    assert rec.alpha == pytest.approx(ref.alpha, rel=1e-8)
    with np.errstate(over="ignore", under="ignore"):
        xmin = np.ldexp(ref.xmin, 2 * e)
    if 0 < xmin < np.inf:
        assert rec.xmin == pytest.approx(xmin, rel=1e-8)
    else:  # lambda itself is outside float64's range
        assert rec.xmin is None


@pytest.mark.parametrize("scale", SCALES)
def test_extreme_magnitudes_in_the_stacked_streamed_and_torch_paths(scale, monkeypatch):
    rng = np.random.default_rng(1)
    Ws = [rng.standard_normal((90, 40)) * scale for _ in range(3)]
    refs = [scaled_reference(W) for W in Ws]
    monkeypatch.setattr(_lapack, "_CACHE", {"lapack": None})  # numpy's stacked calls
    for spec, (S, e) in zip(spectrum.singular_values_many(Ws, [EPS64] * 3), refs):
        assert spec.exponent == e
        assert np.abs(spec.unit_sv - S).max() <= ACCURACY_C * 130 * EPS64 * S[0]
    monkeypatch.undo()
    monkeypatch.setattr(spectrum, "BLOCK_ROWS", 32)  # three blocks: streamed Gram, blocked QR
    for method in ("auto", "svd"):
        spec = singular_values(Ws[0], EPS64, method=method)
        S, e = refs[0]
        assert spec.exponent == e and np.abs(spec.unit_sv - S).max() <= ACCURACY_C * 130 * EPS64 * S[0]
    pytest.importorskip("torch")
    spec = singular_values(Ws[1], EPS64, device="cpu")
    S, e = refs[1]
    assert spec.exponent == e and np.abs(spec.unit_sv - S).max() <= ACCURACY_C * 130 * EPS64 * S[0]


# ---------------------------------------------------------------------------------------------
# Streaming: the same records as in memory, bounded memory


def _checkpoint(tmp_path, rng):
    """A safetensors file (bf16 and fp32 tensors, via torch) and the same values in memory."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tensors = {
        "tall.weight": torch.from_numpy(rng.standard_normal((700, 90)).astype(np.float32)).bfloat16(),
        "wide.weight": torch.from_numpy(rng.standard_normal((80, 600)).astype(np.float32)),
        "square.weight": torch.from_numpy(rng.standard_normal((260, 256)).astype(np.float32)).bfloat16(),
        "ill.weight": torch.from_numpy(with_singular_values(
            rng, 500, 100, np.r_[np.linspace(1, 0.2, 95), 1e-7 * np.ones(5)]).astype(np.float32)),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    in_memory = {k: (v.float().numpy(), str(v.dtype).replace("torch.", ""))
                 for k, v in tensors.items()}
    return path, in_memory


def test_streamed_and_whole_matrices_give_the_same_records(tmp_path, monkeypatch):
    """Blocks of 64 rows: the safetensors file is read block by block from its memory map (bf16
    widened per block); the arrays in memory go through the same blocks. Records and spectra are
    equal bit for bit (the arithmetic depends on the shape only), and the values are numpy's SVD's
    to the stated accuracy."""
    monkeypatch.setattr(spectrum, "BLOCK_ROWS", 64)
    path, in_memory = _checkpoint(tmp_path, np.random.default_rng(11))
    for method in ("auto", "svd"):
        options = AnalysisOptions(min_q=1.0, method=method)
        streamed = analyze(str(path), options=options, keep_spectra=True)
        a = {r.name: (r.to_dict(), sv) for r, sv in zip(streamed.records, streamed.spectra)}
        assert a.keys() == set(in_memory)
        for name in a:
            W, dtype = in_memory[name]
            ((rec, sv, _),) = matrix.analyze_many(
                [(W, name, dtype, streamed.records[0].model, None, None)], options)
            rec.kind, rec.kind_from = streamed.records[0].kind, streamed.records[0].kind_from
            assert a[name][0] == rec.to_dict(), name
            np.testing.assert_array_equal(a[name][1], sv)
            W = W.astype(np.float64)
            W = W if W.shape[0] >= W.shape[1] else W.T
            S = np.linalg.svd(W, compute_uv=False)
            assert np.abs(a[name][1] - S).max() <= ACCURACY_C * sum(W.shape) * EPS64 * S[0]
    methods = {r.name: r.method for r in analyze(str(path), min_q=1.0).records}
    assert methods["ill.weight"] == "gram+ritz" and methods["square.weight"] == "gram+ritz"


def test_streamed_matrix_memory_is_bounded_by_blocks(tmp_path):
    """A 24576 x 192 float32 matrix (36 MiB in float64), memory-mapped: the analysis allocates
    its Gram matrix and one float64 block of BLOCK_ROWS rows at a time, not the matrix."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    path = tmp_path / "tall.safetensors"
    save_file({"lm_head.weight": rng.standard_normal((24576, 192)).astype(np.float32)}, str(path))
    full = 24576 * 192 * 8
    analyze(str(path), workers=1)  # imports, caches
    tracemalloc.start()
    try:
        rec = analyze(str(path), workers=1).records[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rec.method == "gram" and rec.status == "ok"
    block = spectrum.BLOCK_ROWS * 192 * 8
    assert peak < block + 192 * 192 * 8 + 2 * 2**20 < full / 4, peak


def test_nonfinite_weights_in_a_later_block(tmp_path, monkeypatch):
    monkeypatch.setattr(spectrum, "BLOCK_ROWS", 50)
    W = np.random.default_rng(2).standard_normal((300, 40))
    W[260, 7] = np.nan
    rec = analyze({"bad.weight": W, "good.weight": W[:250]}).records
    assert [r.status for r in rec] == ["nonfinite", "ok"]


# ---------------------------------------------------------------------------------------------
# Scheduling: identical results for any worker count and order


def test_records_identical_for_any_worker_count_and_order(monkeypatch):
    """Largest first, idle cores lent to the Gram panels of the last matrices: the records and
    spectra equal those of one worker in model order, bit for bit (1024 x 1024 has two panels)."""
    rng = np.random.default_rng(8)
    weights = {"big.weight": rng.standard_normal((1024, 1024)).astype(np.float32),
               "tall.weight": rng.standard_normal((1600, 520)).astype(np.float32),
               "mid.weight": rng.standard_normal((500, 480)).astype(np.float32)}
    weights.update({f"small.{i}.weight": rng.standard_normal((200, 64)) for i in range(4)})
    assert len(spectrum._panels(1024)) == 2

    def run(workers):
        result = analyze(weights, min_q=1.0, workers=workers, keep_spectra=True)
        return [r.to_dict() for r in result.records], result.spectra

    ref_records, ref_spectra = run(1)
    assert [r["name"] for r in ref_records] == list(weights)  # model order
    assert {r["method"] for r in ref_records} >= {"gram", "gram+ritz"}
    runs = [run(2), run(3)]
    real = source_run._largest_first
    monkeypatch.setattr(source_run, "_largest_first", lambda plans: real(plans)[::-1])
    runs += [run(1), run(2)]
    for records, spectra in runs:
        assert records == ref_records
        for a, b in zip(spectra, ref_spectra):
            np.testing.assert_array_equal(a, b)


def test_largest_first_keeps_parts_of_a_parameter_together():
    from allennlp_analyze.selection import MatrixPlan

    plans = [MatrixPlan("a[q]", "a", None, "float32", (10, 10), rows=(0, 10), part="q"),
             MatrixPlan("a[k]", "a", None, "float32", (10, 10), rows=(10, 20), part="k"),
             MatrixPlan("b", "b", None, "float32", (100, 50)),
             MatrixPlan("c", "c", None, "float32", (30, 30))]
    assert source_run._largest_first(plans) == [2, 3, 0, 1]


# ---------------------------------------------------------------------------------------------
# Without numpy's OpenBLAS


def test_without_the_lapack_backend_near_square_matrices_take_the_svd(monkeypatch):
    monkeypatch.setattr(_lapack, "_CACHE", {"lapack": None})
    W = np.random.default_rng(4).standard_normal((200, 200)).astype(np.float32)
    spec = singular_values(W, EPS32)
    assert spec.method == "gram>svd"
    np.testing.assert_array_equal(spec.sv, np.linalg.svd(W.astype(np.float64), compute_uv=False))
    monkeypatch.setattr(spectrum, "BLOCK_ROWS", 64)  # blocked Gram by matmul
    tall = np.random.default_rng(5).standard_normal((500, 60))
    spec = singular_values(tall, EPS32)
    S = np.linalg.svd(tall, compute_uv=False)
    assert spec.method == "gram" and np.abs(spec.sv / S - 1).max() <= spectrum.GRAM_RTOL


def test_backend_is_numpys_openblas_and_matches_eigvalsh():
    lapack = _lapack.backend()
    assert lapack is not None, "numpy's OpenBLAS not found (the wheels bundle it)"
    G = np.random.default_rng(0).standard_normal((300, 200))
    G = G.T @ G
    d, e, tau = lapack.sytrd(np.array(G))
    np.testing.assert_array_equal(lapack.sterf(d, e), np.linalg.eigvalsh(G))


# ---------------------------------------------------------------------------------------------
# The two-stage reduction of large tall Grams


def _count_two_stage(monkeypatch, lapack):
    calls = []
    real = lapack.eigenvalues_2stage
    monkeypatch.setattr(lapack, "eigenvalues_2stage", lambda G: calls.append(G.shape) or real(G))
    return calls


def test_two_stage_eigenvalues_against_eigvalsh():
    """dsytrd_2stage + dsterf: within the Gram path's error model of numpy's eigvalsh, in the
    size range where it is used and below it."""
    lapack = _lapack.backend()
    assert lapack.two_stage, "numpy's OpenBLAS has no dsytrd_2stage (LAPACK >= 3.7 has)"
    for n, m in ((900, 300), (2400, 1600)):
        W = np.random.default_rng(n).standard_normal((n, m))
        G = W.T @ W
        ref = np.linalg.eigvalsh(G)
        lam = lapack.eigenvalues_2stage(np.array(G))
        assert np.all(np.diff(lam) >= 0)
        assert np.abs(lam - ref).max() <= (n + m) * EPS64 * ref[-1], np.abs(lam - ref).max()


def test_tall_large_grams_take_the_two_stage_reduction(monkeypatch):
    """At the default sizes (M >= 1536, Q >= 1.5) a random tall matrix keeps its Gram values
    from the two-stage reduction, within the Gram path's guarantee of numpy's SVD."""
    lapack = _lapack.backend()
    calls = _count_two_stage(monkeypatch, lapack)
    W = np.random.default_rng(7).standard_normal((2400, 1536)).astype(np.float32)
    spec = singular_values(W, EPS32)
    S = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    assert calls == [(1536, 1536)] and spec.method == "gram"
    assert np.abs(spec.sv / S - 1).max() <= spectrum.GRAM_RTOL
    square = np.random.default_rng(8).standard_normal((1536, 1536)).astype(np.float32)
    assert singular_values(square, EPS32).method == "gram+ritz" and len(calls) == 1  # Q < 1.5


def test_two_stage_then_ritz_equals_the_one_stage_path(monkeypatch):
    """A tall matrix whose small values need the Ritz step is reduced again by dsytrd: the
    same values, bit for bit, as without the two-stage reduction, and as accurate as ever."""
    rng = np.random.default_rng(9)
    s = np.r_[np.linspace(1.0, 0.1, 190), 1e-8 * np.linspace(3.0, 1.0, 10)]
    W = with_singular_values(rng, 500, 200, s)
    monkeypatch.setattr(spectrum, "TWO_STAGE_MIN_M", 100)
    calls = _count_two_stage(monkeypatch, _lapack.backend())
    spec = check_against_svd(W, EPS32)
    assert calls == [(200, 200)]
    monkeypatch.setattr(spectrum, "TWO_STAGE_MIN_M", 10 ** 9)
    np.testing.assert_array_equal(singular_values(W, EPS32).sv, spec.sv)
    assert len(calls) == 1
    # and the records of a tall, healthy matrix: the same ranks and fit either way
    healthy = rng.standard_normal((450, 200)).astype(np.float32)
    one = analyze_matrix(healthy)
    monkeypatch.setattr(spectrum, "TWO_STAGE_MIN_M", 100)
    two = analyze_matrix(healthy)
    assert len(calls) == 2 and two.method == one.method == "gram"
    for field in ("rank_loose", "rank_numpy", "rank_nr", "rank_noise", "num_evals"):
        assert getattr(two, field) == getattr(one, field), field
    assert two.alpha == pytest.approx(one.alpha, rel=1e-9)
    assert two.sv_min == pytest.approx(one.sv_min, rel=1e-12)


def test_two_stage_then_ritz_on_a_streamed_matrix(monkeypatch):
    """The second Gram of the redo is formed from the row blocks read again: the same values as
    the one-stage path, bit for bit, and the noise floor accumulated once."""
    rng = np.random.default_rng(10)
    s = np.r_[np.linspace(1.0, 0.1, 190), 1e-8 * np.linspace(3.0, 1.0, 10)]
    W = to_bf16(with_singular_values(rng, 520, 200, s))
    monkeypatch.setattr(spectrum, "BLOCK_ROWS", 64)
    one = singular_values(W, EPSBF16, noise_dtype="bfloat16")
    monkeypatch.setattr(spectrum, "TWO_STAGE_MIN_M", 100)
    calls = _count_two_stage(monkeypatch, _lapack.backend())
    two = singular_values(W, EPSBF16, noise_dtype="bfloat16")
    assert calls == [(200, 200)] and two.method == one.method == "gram+ritz"
    np.testing.assert_array_equal(two.sv, one.sv)
    assert two.noise == one.noise and two.tolerances == one.tolerances
