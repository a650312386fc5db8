"""The spectral metrics (MP bulk fit, spikes, soft rank, entropies, correlation traps) against
computations made here from their formulas: the Tracy–Widom constant from its Fredholm
determinant, the bulk fit by a plain loop over the spike count, entropies with
``scipy.stats.entropy`` and ``numpy.linalg.matrix_rank``, the randomized matrix permuted here and
decomposed with ``numpy.linalg.svd``, the ESD distance with ``scipy.spatial.distance``; on
matrices with known Marchenko–Pastur parameters (Gaussian; Gaussian plus planted rank-one spikes;
a planted large entry) and on real MiniLM weights."""
import hashlib
import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as shannon

from allennlp_analyze import analyze
from allennlp_analyze.aggregate import aggregate
from allennlp_analyze.matrix import analyze_matrix
from allennlp_analyze.errors import AnalyzeError
from allennlp_analyze.options import AnalysisOptions
from allennlp_analyze.sources._common import TensorDictSource
from allennlp_analyze.spectral_metrics import TW1_Q999

EPS32 = float(np.finfo(np.float32).eps)
SIGMA = 0.03
RANDOMIZED = AnalysisOptions(randomize=True, seed=11)


# --- references, from the formulas ------------------------------------------------------------


def tw1_cdf(s: float) -> float:
    """GOE Tracy–Widom F1(s) = det(I - K), K(x, y) = Ai(x + y + s) on L^2(0, inf) (Ferrari &
    Spohn 2005), by 80-point Gauss–Legendre on (0, 16) (Bornemann 2010)."""
    from scipy.special import airy

    x, w = np.polynomial.legendre.leggauss(80)
    u, wu = (x + 1) * 8.0, w * 8.0
    K = airy(s + u[:, None] + u[None, :])[0]
    return float(np.linalg.det(np.eye(u.size) - np.sqrt(wu)[:, None] * K * np.sqrt(wu)[None, :]))


def bulk_reference(W: np.ndarray):
    """(sigma2, lambda_plus, num_spikes, threshold) of W: remove the k largest eigenvalues,
    sigma2 = mean of the others / N, count those above lambda_+ + 3.2722 s_TW, until the count
    is k."""
    N, M = max(W.shape), min(W.shape)
    lam = np.linalg.svd(np.asarray(W, dtype=np.float64), compute_uv=False) ** 2
    k = 0
    while True:
        sigma2 = lam[k:].sum() / (N * (M - k))
        edge = sigma2 * (math.sqrt(N) + math.sqrt(M)) ** 2
        s_tw = sigma2 * (math.sqrt(N) + math.sqrt(M)) * (N ** -0.5 + M ** -0.5) ** (1 / 3)
        threshold = edge + 3.2722 * s_tw
        above = int(np.sum(lam > threshold))
        if above == k:
            return sigma2, edge, k, threshold
        k = above


def permuted_here(W: np.ndarray, seed: int, name: str) -> np.ndarray:
    """The documented permutation: default_rng(SeedSequence([seed, *blake2b-128(name) as 4
    little-endian uint32])).permutation(W.ravel())."""
    words = [int.from_bytes(hashlib.blake2b(name.encode(), digest_size=16).digest()[i:i + 4],
                            "little") for i in range(0, 16, 4)]
    rng = np.random.default_rng(np.random.SeedSequence([seed] + words))
    return rng.permutation(W.ravel()).reshape(W.shape)


def distance_reference(W: np.ndarray, P: np.ndarray) -> float:
    """Jensen–Shannon distance (base 2) of the two ESDs: one bin for nu <= the numpy
    tolerance, int(min(100, max(10, 2 sqrt(M)))) log-spaced bins over the other lambdas of both."""
    N, M = max(W.shape), min(W.shape)
    svs = [np.linalg.svd(np.asarray(A, dtype=np.float64), compute_uv=False) for A in (W, P)]
    pos = [s[s > s[0] * N * EPS32] ** 2 for s in svs]
    allpos = np.concatenate(pos)
    edges = np.geomspace(allpos.min(), allpos.max(), int(min(100, max(10, 2 * M ** 0.5))) + 1)
    edges[0], edges[-1] = allpos.min(), allpos.max()
    hists = [np.r_[M - p.size, np.histogram(p, edges)[0]] / M for p in pos]
    return float(jensenshannon(hists[0], hists[1], base=2))


def gaussian(shape, seed, sigma=SIGMA):
    return np.random.default_rng(seed).standard_normal(shape) * sigma


def bbp(N: int, M: int, sigma: float = SIGMA) -> float:
    """The BBP threshold of a rank-one spike theta u v^T (|u| = |v| = 1): theta > sigma (NM)^(1/4)
    separates an eigenvalue from the bulk."""
    return sigma * (N * M) ** 0.25


def spiked(N, M, strengths, seed):
    """Gaussian N x M plus rank-one spikes of the given strengths in units of the BBP threshold."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((N, M)) * SIGMA
    for c in strengths:
        u, v = rng.standard_normal(N), rng.standard_normal(M)
        W += c * bbp(N, M) * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    return W


def assert_bulk(rec, W):
    sigma2, edge, k, _ = bulk_reference(W)
    lam_max = np.linalg.svd(W, compute_uv=False)[0] ** 2
    assert rec.num_spikes == k
    assert rec.mp_sigma2 == pytest.approx(sigma2, rel=1e-9)
    assert rec.lambda_plus == pytest.approx(edge, rel=1e-9)
    assert rec.mp_softrank == pytest.approx(edge / lam_max, rel=1e-9)


# --- the Tracy–Widom margin -------------------------------------------------------------------


def test_tracy_widom_quantile():
    from scipy.optimize import brentq

    quantile = {p: brentq(lambda s: tw1_cdf(s) - p, -4, 6, xtol=1e-10)
                for p in (0.90, 0.95, 0.99, 0.999)}
    # the quadrature reproduces Johnstone's (2001) Table 1 ...
    assert [round(quantile[p], 2) for p in (0.90, 0.95, 0.99)] == [0.45, 0.98, 2.02]
    # ... and gives the margin's constant
    assert TW1_Q999 == pytest.approx(quantile[0.999], abs=1e-4)


# --- the MP bulk fit on matrices with known parameters ----------------------------------------


@pytest.mark.parametrize("shape", [(1200, 300), (300, 1200), (600, 500), (400, 400)])
def test_gaussian_has_no_spike_and_soft_rank_near_1(shape):
    W = gaussian(shape, seed=shape[0] + shape[1])
    rec = analyze_matrix(W, name="g")
    assert_bulk(rec, W)
    N, M = max(shape), min(shape)
    assert rec.num_spikes == 0
    assert rec.mp_sigma2 == pytest.approx(SIGMA ** 2, rel=0.01)   # the known variance
    assert rec.lambda_plus == pytest.approx(SIGMA ** 2 * (N ** 0.5 + M ** 0.5) ** 2, rel=0.01)
    assert 0.95 < rec.mp_softrank < 1.05


@pytest.mark.parametrize("strengths", [[4.0], [3.0, 5.0, 8.0], [2.5, 4.0, 6.0, 8.0, 10.0]])
def test_planted_spikes_are_counted(strengths):
    N, M = 1200, 300
    W = spiked(N, M, strengths, seed=len(strengths))
    rec = analyze_matrix(W.astype(np.float32), name="s")
    assert_bulk(rec, W.astype(np.float32).astype(np.float64))
    assert rec.num_spikes == len(strengths)
    # the bulk's variance is the noise's, not the Frobenius norm's (which counts the spikes)
    assert rec.mp_sigma2 == pytest.approx(SIGMA ** 2, rel=0.02)
    frobenius = 10 ** rec.log_norm / (N * M)
    assert abs(rec.mp_sigma2 - SIGMA ** 2) < abs(frobenius - SIGMA ** 2)
    assert rec.mp_softrank < 0.5


def test_spike_below_the_bbp_threshold_is_not_counted():
    W = spiked(1200, 300, [0.5, 5.0], seed=3)
    rec = analyze_matrix(W, name="s")
    assert_bulk(rec, W)
    assert rec.num_spikes == 1


def test_planted_entry_is_a_trap_and_spread_spikes_are_not():
    N, M = 1200, 300
    entry = gaussian((N, M), seed=5)
    entry[17, 123] = 5 * bbp(N, M)
    spread = spiked(N, M, [3.0, 5.0, 8.0], seed=6)
    noise = gaussian((N, M), seed=7)
    traps = {}
    for name, W in (("entry", entry), ("spread", spread), ("noise", noise)):
        rec = analyze_matrix(W, RANDOMIZED, name=name)
        P = permuted_here(W, 11, name)
        rand_sv = np.linalg.svd(P, compute_uv=False)
        _, rand_edge, rand_k, _ = bulk_reference(P)
        assert rec.rand_sv_max == pytest.approx(rand_sv[0], rel=1e-9)
        assert rec.rand_lambda_plus == pytest.approx(rand_edge, rel=1e-9)
        assert rec.num_traps == rand_k
        assert rec.rand_distance == pytest.approx(distance_reference(W, P), abs=1e-12)
        traps[name] = (rec.num_spikes, rec.num_traps)
    # a large entry survives the permutation; rank-one spikes spread over all entries do not
    assert traps == {"entry": (1, 1), "spread": (3, 0), "noise": (0, 0)}


# --- entropies -------------------------------------------------------------------------------


def test_entropies_against_scipy():
    rng = np.random.default_rng(8)
    low = (rng.standard_normal((1200, 50)) @ rng.standard_normal((50, 300))).astype(np.float32)
    rank_one = np.outer(rng.standard_normal(400), rng.standard_normal(100))
    for W in (gaussian((1200, 300), seed=9).astype(np.float32), low, rank_one):
        rec = analyze_matrix(W, name="e")
        W64 = W.astype(np.float64)
        nu = np.linalg.svd(W64, compute_uv=False)
        eps = float(np.finfo(W.dtype).eps)
        rank = np.linalg.matrix_rank(W64, tol=nu[0] * max(W.shape) * eps)
        assert rec.rank_numpy == rank
        if rank >= 2:
            assert rec.entropy == pytest.approx(shannon(nu ** 2) / math.log(rank), rel=1e-9)
        else:
            assert rec.entropy is None
        assert rec.effective_rank == pytest.approx(math.exp(shannon(nu)), rel=1e-9)
        if rec.alpha is not None:
            assert rec.log_alpha_norm == pytest.approx(
                np.log10(np.sum(nu ** (2 * rec.alpha))), rel=1e-9)
    assert 1.0 <= rec.effective_rank < 1.0 + 1e-5   # rank one
    assert rank == 1


# --- reproducible randomization ---------------------------------------------------------------


RAND_FIELDS = ("rand_sv_max", "rand_lambda_plus", "num_traps", "rand_distance")


def _state():
    return {f"layer{i}.weight": gaussian(shape, seed=20 + i).astype(np.float32)
            for i, shape in enumerate([(300, 100), (100, 300), (300, 100), (250, 120)])}


def _rand(result):
    return {r.name: tuple(getattr(r, f) for f in RAND_FIELDS) for r in result.records}


def test_randomization_is_reproducible_and_independent_of_order_and_workers():
    state = _state()
    first = _rand(analyze(TensorDictSource("a", state), randomize=True, seed=3, workers=1))
    again = _rand(analyze(TensorDictSource("other label", dict(reversed(state.items()))),
                          randomize=True, seed=3, workers=2))
    assert first == again
    other = _rand(analyze(TensorDictSource("a", state), randomize=True, seed=4))
    assert all(first[n][0] != other[n][0] for n in first)
    # layer0 and layer2 hold equal-shape matrices: different names, different permutations
    assert first["layer0.weight"][0] != first["layer2.weight"][0]
    for name, W in state.items():
        assert first[name][0] == pytest.approx(
            np.linalg.svd(permuted_here(W, 3, name).astype(np.float64), compute_uv=False)[0],
            rel=1e-9)
    plain = analyze(TensorDictSource("a", state))
    assert all(getattr(r, f) is None for r in plain.records for f in RAND_FIELDS)


def test_seed_must_be_a_non_negative_integer():
    for bad in (-1, 1.5, "3"):
        with pytest.raises(AnalyzeError, match="--seed"):
            AnalysisOptions(seed=bad)


def test_degenerate_matrices_have_no_bulk_fit():
    zero = analyze_matrix(np.zeros((30, 10)), RANDOMIZED, name="z")
    row = analyze_matrix(np.arange(1.0, 11.0)[None, :], RANDOMIZED, name="r")
    assert zero.status == "all_zero" and row.status == "single_row"
    for rec in (zero, row):
        assert (rec.num_spikes, rec.mp_softrank, rec.entropy, rec.num_traps) == (None,) * 4
    assert zero.effective_rank is None
    assert row.effective_rank == 1.0


# --- aggregates ------------------------------------------------------------------------------


def test_per_model_aggregates_equal_direct_means():
    state = _state()
    state["trap.weight"] = gaussian((300, 100), seed=30).astype(np.float32)
    state["trap.weight"][4, 2] = 10 * bbp(300, 100)
    result = analyze(TensorDictSource("m", state), TensorDictSource("n", _state()),
                     randomize=True, min_q=1.0)
    agg = aggregate(result.records, result.summary.models)
    for a in agg.models + [agg.total]:
        recs = [r for r in result.records if a.model in ("all", r.model)]
        assert a.num_spikes == sum(r.num_spikes for r in recs)
        for field in ("mp_softrank", "entropy", "effective_rank", "log_alpha_norm",
                      "rand_distance"):
            assert getattr(a, f"{field}_mean") == pytest.approx(
                np.mean([getattr(r, field) for r in recs]), rel=1e-12)
        assert a.randomized == len(recs)
        assert a.with_traps == sum(r.num_traps > 0 for r in recs)
        assert a.num_traps == sum(r.num_traps for r in recs)
    assert agg.models[0].with_traps >= 1   # the planted entry
    plain = aggregate(analyze(TensorDictSource("m", state)).records)
    assert (plain.total.randomized, plain.total.with_traps, plain.total.num_traps) == (None,) * 3


# --- real weights ----------------------------------------------------------------------------


def test_minilm_against_numpy(minilm_path):
    from safetensors.numpy import load_file

    result = analyze(str(minilm_path), randomize=True, seed=0, match=[r"layer\.[05]\."])
    weights = load_file(str(minilm_path))
    assert len(result.records) == 4
    for rec in result.records:
        W = weights[rec.name].astype(np.float64)
        nu = np.linalg.svd(W, compute_uv=False)
        assert_bulk(rec, W)
        assert rec.num_spikes > 0     # trained: not a random matrix
        assert rec.entropy == pytest.approx(shannon(nu ** 2) / math.log(rec.M), rel=1e-9)
        assert rec.effective_rank == pytest.approx(math.exp(shannon(nu)), rel=1e-9)
        P = permuted_here(weights[rec.name], 0, rec.name).astype(np.float64)
        _, rand_edge, rand_k, _ = bulk_reference(P)
        assert rec.rand_sv_max == pytest.approx(np.linalg.svd(P, compute_uv=False)[0], rel=1e-9)
        assert rec.rand_lambda_plus == pytest.approx(rand_edge, rel=1e-9)
        assert rec.num_traps == rand_k
        assert rec.rand_distance == pytest.approx(distance_reference(W, P), abs=1e-9)
