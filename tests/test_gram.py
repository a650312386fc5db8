"""The Gram fast path against the float64 SVD: the error bound behind ``GRAM_RTOL``'s threshold
holds (with room) on engineered spectra whose smallest singular value goes from 1e-1 down to 1e-12
of the largest and on real weights; "auto" keeps the Gram values exactly where the derived
threshold says they are accurate to ``GRAM_RTOL`` (and to ``ACCURACY_C (N + M) eps64 nu_max``)
and recomputes the rest below it (Ritz step, else the SVD); ``--exact`` forces the SVD; singular
vectors of W are never computed; the torch path (``--device``) agrees with numpy, on the GPU when
there is one (skipped otherwise)."""

import numpy as np
import pytest

from allennlp_analyze.cli import build_parser
from allennlp_analyze.options import from_namespace
from allennlp_analyze.sources.safetensors_file import SafetensorsSource
from allennlp_analyze import _lapack
from allennlp_analyze.spectrum import ACCURACY_C, GRAM_RTOL, singular_values

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)


def engineered(rng, n, m, smallest):
    """n x m float64 matrix with singular values spread log-evenly from 1 down to ``smallest``."""
    k = min(n, m)
    U, _ = np.linalg.qr(rng.standard_normal((n, k)))
    V, _ = np.linalg.qr(rng.standard_normal((m, k)))
    s = np.logspace(0.0, np.log10(smallest), k)
    return (U * s) @ V.T


def threshold_ratio(N, M):
    """nu_min / nu_max above which the Gram path is kept (module docstring of spectrum)."""
    return max(np.sqrt((N + M) * EPS64 / (2.0 * GRAM_RTOL)), 1.0 / (2.0 * ACCURACY_C))


RATIOS = [1e-1, 1e-2, 5e-3, 2e-3, 1e-3, 1e-4, 1e-6, 1e-8, 1e-10, 1e-12]


@pytest.mark.parametrize("smallest", RATIOS)
def test_auto_keeps_gram_exactly_where_it_is_accurate(smallest):
    rng = np.random.default_rng(int(-np.log10(smallest) * 10))
    n, m = 480, 160
    W = engineered(rng, n, m, smallest)
    S = np.linalg.svd(W, compute_uv=False)
    lam_err = np.abs(np.linalg.eigvalsh(W.T @ W)[::-1] - S ** 2)
    # the bound behind the threshold: |lambda_gram - lambda| <= (N + M) eps lambda_max
    assert lam_err.max() <= (n + m) * EPS64 * S[0] ** 2
    auto = singular_values(W, EPS32)
    kept = auto.method == "gram"
    ratio = S[-1] / S[0]
    limit = threshold_ratio(n, m)
    if ratio > 1.01 * limit:
        assert kept
    if ratio < 0.99 * limit:
        assert not kept
    if kept:  # every value to GRAM_RTOL relative (the SVD is good to ~eps / ratio here)
        assert np.all(np.abs(auto.sv / S - 1.0) <= GRAM_RTOL)
    elif auto.method == "gram+ritz":  # the bottom recomputed to the SVD's absolute accuracy
        assert np.abs(auto.sv - S).max() <= ACCURACY_C * (n + m) * EPS64 * S[0]
        assert np.abs(auto.sv - S).max() <= (n + m) * EPS64 * S[0]  # measured: far inside
    else:  # too many values below the limit for the Ritz step (log-spread spectra)
        assert auto.method == "gram>svd"
        np.testing.assert_array_equal(auto.sv, S)
    exact = singular_values(W, EPS32, method="svd")
    np.testing.assert_array_equal(exact.sv, S)
    for t in ("loose", "numpy", "nr"):
        assert auto.rank(getattr(auto.tolerances, t)) == exact.rank(getattr(exact.tolerances, t))
    assert auto.sv[-1] == pytest.approx(exact.sv[-1], rel=GRAM_RTOL,
                                        abs=ACCURACY_C * (n + m) * EPS64 * S[0])


def test_threshold_is_conservative_on_random_and_real_weights(minilm_path):
    """The worst-case bound (N + M) eps lambda_max is far above what the Gram path really makes
    (measured: under 5% of it), so the fallback costs accuracy nothing and triggers only on
    genuinely ill-conditioned matrices."""
    rng = np.random.default_rng(4)
    mats = [rng.standard_normal((s, 96)) * 0.02 for s in (96, 200, 400)]
    mats.append(rng.standard_t(2.5, size=(300, 120)))
    src = SafetensorsSource(minilm_path)
    mats += [src.load(f"encoder.layer.{i}.{p}.dense.weight").astype(np.float64)
             for i in (0, 5) for p in ("intermediate", "output")]
    for W in mats:
        W = W if W.shape[0] >= W.shape[1] else W.T
        N, M = W.shape
        S = np.linalg.svd(W, compute_uv=False)
        err = np.abs(np.linalg.eigvalsh(W.T @ W)[::-1] - S ** 2).max()
        assert err <= 0.1 * (N + M) * EPS64 * S[0] ** 2


def test_exact_flag_forces_the_svd():
    args = build_parser().parse_args(["model.safetensors", "--exact"])
    assert from_namespace(args).method == "svd"
    W = np.random.default_rng(0).standard_normal((300, 100))
    assert singular_values(W, EPS32, method="svd").method == "svd"
    assert from_namespace(build_parser().parse_args(["m"])).method == "auto"


def test_no_singular_vectors_are_computed(monkeypatch):
    calls = []
    real_svd = np.linalg.svd

    def svd(a, full_matrices=True, compute_uv=True, **kw):
        calls.append(compute_uv)
        assert compute_uv is False, "singular vectors requested"
        return real_svd(a, full_matrices=full_matrices, compute_uv=compute_uv, **kw)

    monkeypatch.setattr(np.linalg, "svd", svd)
    monkeypatch.setattr(np.linalg, "eig", lambda *a, **k: pytest.fail("eig called"))
    monkeypatch.setattr(np.linalg, "eigh", lambda *a, **k: pytest.fail("eigh (vectors) called"))
    W = engineered(np.random.default_rng(1), 200, 80, 1e-9)
    for method in ("auto", "svd", "gram"):
        singular_values(W, EPS32, method=method)
    assert calls == [False, False]  # auto fell back once, svd once


def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("smallest", [1e-2, 1e-10])
def test_torch_path_matches_numpy_on_cpu(smallest):
    """The --device code path (torch, float64), run on torch's CPU device."""
    _torch()
    W = engineered(np.random.default_rng(2), 300, 90, smallest)
    for method in ("auto", "svd", "gram"):
        cpu = singular_values(W, EPS32, method=method)
        tor = singular_values(W, EPS32, method=method, device="cpu")
        assert tor.method == cpu.method
        assert tor.sv.dtype == np.float64
        if method == "gram":  # forced: both carry Gram round-off, compared in lambda
            np.testing.assert_allclose(tor.sv ** 2, cpu.sv ** 2, rtol=1e-9,
                                       atol=(300 + 90) * EPS64 * cpu.sv[0] ** 2)
        else:
            np.testing.assert_allclose(tor.sv, cpu.sv, rtol=1e-9, atol=64 * EPS64 * cpu.sv[0])


def test_cuda_path_matches_cpu():
    torch = _torch()
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(3)
    for smallest in (1e-2, 1e-10):
        W = engineered(rng, 1024, 256, smallest).astype(np.float32)
        for method in ("auto", "svd"):
            cpu = singular_values(W, EPS32, method=method)
            gpu = singular_values(W, EPS32, method=method, device="cuda")
            assert gpu.method == cpu.method
            np.testing.assert_allclose(gpu.sv, cpu.sv, rtol=1e-8, atol=64 * EPS64 * cpu.sv[0])
            for t in ("loose", "numpy", "nr"):
                assert gpu.rank(getattr(gpu.tolerances, t)) == cpu.rank(getattr(cpu.tolerances, t))


@pytest.mark.parametrize("backend", [True, False])
@pytest.mark.parametrize("method", ["auto", "svd", "gram"])
def test_stacked_calls_equal_single_calls(method, backend, monkeypatch):
    """singular_values_many (without the LAPACK backend: stacked numpy calls, so that numpy
    releases the GIL for small matrices) gives the single-call results bit for bit, fallbacks
    included."""
    from allennlp_analyze.spectrum import batch_size, singular_values_many

    if not backend:
        monkeypatch.setattr(_lapack, "_CACHE", {"lapack": None})
        assert batch_size(384) == 2 and batch_size(100) == 6 and batch_size(768) == 1
    else:
        assert _lapack.backend() is not None  # numpy's OpenBLAS here: no stacking needed
        assert batch_size(384) == batch_size(100) == 1
    assert batch_size(384, device="cuda") == 1
    rng = np.random.default_rng(5)
    Ws = [engineered(rng, 240, 96, s) for s in (1e-1, 1e-9, 3e-2)]
    Ws[1] = Ws[1].T.astype(np.float32)  # other orientation, other dtype
    eps = [EPS64, EPS32, EPS64]
    many = singular_values_many(Ws, eps, method=method)
    for W, e, spec in zip(Ws, eps, many):
        one = singular_values(W, e, method=method)
        assert (spec.method, spec.N, spec.M, spec.tolerances) == \
            (one.method, one.N, one.M, one.tolerances)
        np.testing.assert_array_equal(spec.sv, one.sv)
    if method == "auto":
        # log-spread down to 1e-9: too many values below the Gram limit for the Ritz step
        assert [s.method for s in many] == ["gram", "gram>svd", "gram"]


def test_workers_do_not_change_records(tmp_path):
    """Worker threads (with stacked small matrices) and a single thread give equal records."""
    from allennlp_analyze import analyze

    rng = np.random.default_rng(6)
    weights = {f"layer{i}.weight": (rng.standard_normal((300 + 100 * (i % 2), 120)) * 0.05)
               for i in range(5)}
    weights["odd.weight"] = rng.standard_normal((50, 700))
    one = analyze(weights, workers=1)
    two = analyze(weights, workers=2)
    assert [r.to_dict() for r in one.records] == [r.to_dict() for r in two.records]
