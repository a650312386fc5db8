"""Low-precision storage (bfloat16, float16, float8): the noise floor against the exact rounding
error W_stored - W_true (float64), ranks of matrices of known rank rounded to each dtype, the
numpy / Numerical-Recipes ranks where their tolerance is meaningless, the fit's input, MiniLM cast
to bf16 / fp16 against its float32 analysis, and a bf16 Llama-shaped checkpoint end to end.

Independent references: the spacing of each format read off the sorted list of all its
representable values (every bit pattern, decoded by torch), numpy's ``spacing`` for float32,
``numpy.linalg.norm(E, 2)`` / ``svd`` / ``matrix_rank``, the ``safetensors`` package's reader,
``powerlaw==1.5``."""
import json
import re
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from allennlp_analyze import AnalysisOptions, analyze, analyze_matrix  # noqa: E402
from allennlp_analyze.cli import main  # noqa: E402
from allennlp_analyze.noise_floor import (FORMATS, NoiseAccumulator, storage_noise,  # noqa: E402
                                          ulp)
from allennlp_analyze.spectrum import GRAM_RTOL, singular_values  # noqa: E402

from conftest import powerlaw_reference  # noqa: E402

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
NARROW = {"bfloat16": torch.bfloat16, "float16": torch.float16,
          "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
          "float8_e4m3fnuz": torch.float8_e4m3fnuz, "float8_e5m2fnuz": torch.float8_e5m2fnuz}
#: The storage dtypes of safetensors files (F8_E4M3, F8_E5M2) and of current checkpoints.
COMMON = ("bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")


def grid(dtype: str) -> np.ndarray:
    """Every finite non-negative value of a narrow format, sorted (float64), from all its bit
    patterns decoded by torch."""
    t = NARROW[dtype]
    bits = 8 if "float8" in dtype else 16
    codes = torch.arange(2 ** bits, dtype=torch.int32)
    codes = codes.to(torch.uint8) if bits == 8 else codes.to(torch.int16)
    values = codes.view(t).to(torch.float64).numpy()
    return np.unique(np.abs(values[np.isfinite(values)]))


def reference_ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """The format's spacing at |w|: the distance to the next representable value above (below
    for the largest), from :func:`grid`; numpy's ``spacing`` for float32 / float64."""
    a = np.abs(np.asarray(values, dtype=np.float64))
    if dtype in ("float32", "float64"):
        return np.spacing(a.astype(dtype)).astype(np.float64)
    g = grid(dtype)
    i = np.searchsorted(g, a, side="right")
    top = i >= g.size
    up = g[np.minimum(i, g.size - 1)] - a
    down = a - g[np.maximum(np.searchsorted(g, a, side="left") - 1, 0)]
    return np.where(top, down, up)


def reference_noise(W_stored: np.ndarray, dtype: str):
    """(independent estimate, bound) by the module's formulas, from :func:`reference_ulp`."""
    u = reference_ulp(W_stored, dtype)
    s2 = u ** 2 / 12.0
    estimate = np.sqrt(s2.sum(axis=1).max()) + np.sqrt(s2.sum(axis=0).max())
    bound = np.sqrt((u / 2).sum(axis=0).max() * (u / 2).sum(axis=1).max())
    return estimate, bound


def reference_floor(W_stored: np.ndarray, dtype: str, S: np.ndarray) -> float:
    """The noise floor from the module docstring's formula, with numpy's singular values S."""
    eps = FORMATS[dtype].eps
    gap = S[0] - (S[1] if S.size > 1 else 0.0)
    return max(reference_noise(W_stored, dtype)[0] + eps ** 2 * gap,
               S[0] * max(W_stored.shape) * EPS64)


def stored(W_true32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to ``dtype`` (one rounding, by torch), back in float64 exactly."""
    t = torch.from_numpy(np.ascontiguousarray(W_true32, dtype=np.float32))
    return t.to(NARROW[dtype]).to(torch.float64).numpy() if dtype in NARROW else \
        t.to(torch.float64).numpy()


def low_rank(rng, n, m, r):
    """An n x m matrix of rank r exactly (float64 product of Gaussian factors), entries ~1."""
    return (rng.standard_normal((n, r)) @ rng.standard_normal((r, m))) / np.sqrt(r)


# ---------------------------------------------------------------------------------------------
# ulp per format, and the noise floor against the exact rounding error


@pytest.mark.parametrize("dtype", sorted(NARROW))
def test_ulp_is_the_spacing_of_the_format_for_every_value(dtype):
    """Every representable value (both signs, zero, subnormals, the largest) of each narrow
    format, held as float32 as the sources hand it over."""
    g = grid(dtype)
    values = np.concatenate([g, -g]).astype(np.float32)
    np.testing.assert_array_equal(ulp(values, dtype), reference_ulp(values, dtype))
    fmt = FORMATS[dtype]
    assert fmt.eps == g[np.searchsorted(g, 1.0) + 1] - 1.0  # spacing just above 1
    assert ulp(np.zeros(1, np.float32), dtype)[0] == g[1]  # zero: the smallest subnormal


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ulp_of_wide_formats_is_numpys_spacing(dtype):
    rng = np.random.default_rng(1)
    fi = np.finfo(dtype)
    values = np.concatenate([rng.standard_normal(1000) * 10.0 ** rng.integers(-30, 30, 1000),
                             [0.0, fi.tiny, fi.tiny / 8, fi.smallest_subnormal, fi.max, 1.0, 2.0,
                              -4.0, 0.75]]).astype(dtype)
    a = np.abs(values)
    with np.errstate(over="ignore"):  # numpy's spacing at the largest value is inf: use below
        expected = np.where(a == fi.max, a - np.nextafter(a, 0), np.spacing(a))
    np.testing.assert_array_equal(ulp(values, dtype), expected)


CASES = [("gaussian", (600, 200)), ("gaussian", (200, 600)), ("gaussian", (300, 300)),
         ("student_t3", (500, 250)), ("low_rank_3", (400, 160))]
#: Stated range of (independent estimate) / ||E||_2: tight on i.i.d.-like entries, high (never
#: low) where a few rows / columns hold outsized entries (heavy tails, low-rank products).
ESTIMATE_RANGE = {"gaussian": (0.9, 1.3), "student_t3": (0.9, 3.5), "low_rank_3": (0.9, 2.0)}


def _true_matrix(kind, shape, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{kind}{shape}{dtype}".encode()))
    if kind == "gaussian":
        W = rng.standard_normal(shape)
    elif kind == "student_t3":
        W = rng.standard_t(3, size=shape)
    else:
        W = low_rank(rng, *shape, 3)
    if not dtype.startswith("float8"):
        W = 0.02 * W  # an initializer's scale; float8 checkpoints are scaled to their range
    return W.astype(np.float32)


@pytest.mark.parametrize("dtype", COMMON + ("float32",))
@pytest.mark.parametrize("kind,shape", CASES)
def test_noise_floor_against_the_exact_rounding_error(kind, shape, dtype):
    """E = W_stored - W_true, exact in float64: each |e_ij| <= ulp / 2, ||E||_2 <= bound, and
    the independent estimate within the stated factors of ||E||_2."""
    W32 = _true_matrix(kind, shape, dtype)
    if dtype == "float32":  # float64 values rounded once to float32
        W_true = W32.astype(np.float64) * (1.0 + 1e-3 * np.pi)
        W_stored = W_true.astype(np.float32).astype(np.float64)
        values = W_stored.astype(np.float32)
    else:
        W_true = W32.astype(np.float64)
        W_stored = stored(W32, dtype)
        values = W_stored.astype(np.float32)
    E = W_stored - W_true
    u = ulp(values, dtype)
    assert np.all(np.abs(E) <= u / 2)
    nf = storage_noise(values, dtype)
    ref_estimate, ref_bound = reference_noise(W_stored, dtype)
    assert nf.estimate == pytest.approx(ref_estimate, rel=1e-12)
    assert nf.bound == pytest.approx(ref_bound, rel=1e-12)
    norm_E = np.linalg.norm(E, 2)
    assert norm_E <= nf.bound
    low, high = ESTIMATE_RANGE[kind]
    assert low <= nf.estimate / norm_E <= high


def test_byte_order_does_not_matter():
    W = np.random.default_rng(13).standard_normal((50, 20))
    for dtype in ("float16", "float32", "float64"):
        native = W.astype(dtype)
        swapped = native.astype(native.dtype.newbyteorder("S"))
        assert storage_noise(swapped, dtype) == storage_noise(native, dtype)


def test_accumulator_over_row_blocks_equals_the_whole_matrix():
    rng = np.random.default_rng(5)
    W = stored(rng.standard_normal((1000, 96)).astype(np.float32) * 0.05, "bfloat16")
    W[700] *= 1024.0  # an outlier row (still bfloat16 values), in a later block than the first
    W[:, 3] = 0.0  # zeros
    values = W.astype(np.float32)
    whole = storage_noise(values, "bfloat16")
    acc = NoiseAccumulator("bfloat16", 96)
    cuts = np.sort(rng.choice(np.arange(1, 1000), size=30, replace=False))
    for block in np.split(values, cuts):
        acc.update(block)
    acc.update(values[:0])
    assert acc.rows == 1000
    streamed = acc.result()
    assert streamed.estimate == pytest.approx(whole.estimate, rel=1e-12)
    assert streamed.bound == pytest.approx(whole.bound, rel=1e-12)
    ref = reference_noise(W, "bfloat16")
    assert whole.estimate == pytest.approx(ref[0], rel=1e-12)
    assert whole.bound == pytest.approx(ref[1], rel=1e-12)
    transposed = storage_noise(np.ascontiguousarray(values.T), "bfloat16")  # symmetric
    assert transposed.estimate == pytest.approx(whole.estimate, rel=1e-12)
    assert transposed.bound == pytest.approx(whole.bound, rel=1e-12)


def test_float64_noise_floor_scales_exactly_with_the_weights():
    """float64 sums are kept in units of the largest binade: weights near 1e-300 or 1e+300
    neither underflow nor overflow (scaling W by 2**k scales both numbers by 2**k)."""
    W = np.random.default_rng(6).standard_normal((300, 120))
    base = storage_noise(W, "float64")
    ref = reference_noise(W, "float64")
    assert base.estimate == pytest.approx(ref[0], rel=1e-12)
    for k in (-990, -500, 500, 1000):
        scaled = storage_noise(np.ldexp(W, k), "float64")
        assert scaled.estimate == pytest.approx(np.ldexp(base.estimate, k), rel=1e-12)
        assert scaled.bound == pytest.approx(np.ldexp(base.bound, k), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Ranks of matrices of known rank, and of full-rank Gaussian ones, in each dtype


def _as_torch(W_true: np.ndarray, dtype: str):
    return torch.from_numpy(W_true.astype(np.float32)).to(NARROW.get(dtype, torch.float32))


@pytest.mark.parametrize("dtype", COMMON + ("float32",))
def test_known_rank_is_the_noise_rank(dtype):
    """Matrices of rank 1, 3 and 64 (512 x 256 and 256 x 640) rounded to the dtype: rank_noise
    = r; numpy's tolerance is at or above sv_max for the narrow dtypes (max(N, M) * eps >= 1):
    no rank, a note, and never counted as collapsed."""
    rng = np.random.default_rng(sum(map(ord, dtype)))
    state, ranks = {}, {}
    for r in (1, 3, 64):
        for shape in ((512, 256), (256, 640)):
            name = f"r{r}_{shape[0]}x{shape[1]}.weight"
            state[name], ranks[name] = _as_torch(low_rank(rng, *shape, r), dtype), r
    result = analyze(state)
    for rec in result.records:
        r = ranks[rec.name]
        W = state[rec.name].to(torch.float64).numpy()
        assert rec.dtype == dtype and rec.rank_noise == r, rec.name
        S = np.linalg.svd(W, compute_uv=False)
        assert rec.rank_noise == int((S > rec.noise_floor).sum())
        eps = FORMATS[dtype].eps
        certain = int((S > reference_noise(W, dtype)[1]).sum())  # rigorous: rank of W_true >=
        formula = np.linalg.matrix_rank(W, tol=S[0] * rec.N * eps)
        if rec.N * eps < 1 and (dtype == "float32" or formula >= certain):  # the formula
            assert rec.rank_numpy == formula
            assert rec.rank_note is None or "numpy" not in rec.rank_note
        else:
            assert rec.rank_numpy is None and "numpy" in rec.rank_note
        if dtype == "float32":
            assert rec.rank_numpy == r and rec.rank_criterion == "loose"
        else:
            assert rec.rank_criterion == "noise" and rec.rank_loss == rec.M - r
        assert rec.num_evals == r  # the fit sees the r real eigenvalues, not the rounding
    s = result.summary
    assert s.collapsed["noise"] == s.collapsed["auto"] == len(state)
    if dtype not in ("float32", "float16"):
        assert s.collapsed["numpy"] == 0 and s.rank_undefined["numpy"] == len(state)


@pytest.mark.parametrize("dtype", COMMON + ("float8_e4m3fnuz", "float8_e5m2fnuz", "float32"))
def test_gaussian_full_rank_in_each_dtype(dtype):
    """Full-rank Gaussian matrices stay full rank under the noise criterion and the default
    (auto) one, in any orientation; each gets a fit of all its eigenvalues."""
    rng = np.random.default_rng(len(dtype))
    scale = 1.0 if dtype.startswith("float8") else 0.02
    state = {f"g{i}.weight": _as_torch(scale * rng.standard_normal(shape), dtype)
             for i, shape in enumerate([(600, 200), (200, 600), (2048, 256)])}
    result = analyze(state)
    for rec in result.records:
        W = state[rec.name].to(torch.float64).numpy()
        S = np.linalg.svd(W, compute_uv=False)
        assert np.linalg.matrix_rank(W, tol=rec.noise_floor) == rec.M == rec.rank_noise
        assert rec.rank_loss == 0 and rec.alpha is not None and rec.num_evals == rec.M
        assert rec.sv_min == pytest.approx(S[-1], rel=1e-8)
        assert rec.noise_floor < S[-1] / 2
    assert result.summary.collapsed["auto"] == result.summary.collapsed["noise"] == 0


def test_spectral_metrics_of_a_bf16_matrix():
    """The entropy's rank and the ESD distance's round-off bin use the noise floor: defined
    for bfloat16, where numpy's criterion has no rank."""
    from scipy.stats import entropy as shannon

    W = _as_torch(0.02 * np.random.default_rng(12).standard_normal((600, 200)), "bfloat16")
    rec = analyze({"w": W}, randomize=True, seed=0).records[0]
    nu = np.linalg.svd(W.to(torch.float64).numpy(), compute_uv=False)
    assert rec.rank_numpy is None and rec.rank_noise == 200
    assert rec.entropy == pytest.approx(shannon(nu ** 2) / np.log(200), rel=1e-9)
    assert 0.0 < rec.rand_distance < 1.0


@pytest.mark.parametrize("dtype", COMMON + ("float32",))
def test_eps_ranks_never_call_provable_signal_noise(dtype):
    """numpy's and NR's ranks are their formulas (numpy.linalg.matrix_rank with their tol)
    unless the tolerance is >= sv_max or, for narrow storage, the rank is below the number of
    singular values above the rigorous rounding bound (reference: the module's formula from
    the format's own grid): then None, with the reason. float32 keeps the formulas always."""
    rng = np.random.default_rng(17 + len(dtype))
    eps = FORMATS[dtype].eps
    cases = [low_rank(rng, 300, 120, 3), low_rank(rng, 300, 120, 3) * np.logspace(0, -2, 120),
             rng.standard_normal((6, 4)), rng.standard_normal((400, 100)),
             rng.standard_normal((300, 120)) * np.logspace(0, -9, 120)]
    seen = set()
    for W_true in cases:
        W = stored(W_true.astype(np.float32), dtype)
        rec = analyze_matrix(W.astype(np.float32), dtype=dtype)
        S = np.linalg.svd(W, compute_uv=False)
        N, M = rec.N, rec.M
        certain = int((S > reference_noise(W, dtype)[1]).sum())
        for c, tol in (("numpy", S[0] * N * eps),
                       ("nr", S[0] * np.sqrt(N + M + 1.0) * eps / 2)):
            formula = np.linalg.matrix_rank(W, tol=tol)
            refuted = dtype != "float32" and formula < certain
            rank = getattr(rec, f"rank_{c}")
            if tol >= S[0] or refuted:
                assert rank is None and c in rec.rank_note and not rec.collapsed(c), (c, W.shape)
                seen.add("none")
            else:
                assert rank == formula, (c, W.shape)
                seen.add("formula")
    assert seen == {"formula"} if dtype == "float32" else "none" in seen
    assert "formula" in seen or dtype.startswith("float8")  # float8: tolerances of 0.5-75 sv_max


def test_nr_tolerance_at_or_above_sv_max_gives_no_rank():
    """float8_e4m3 (eps 1/8): Numerical Recipes' sqrt(N + M + 1) * eps / 2 >= 1 once
    N + M + 1 >= 256; numpy's max(N, M) * eps >= 1 from max(N, M) >= 8."""
    rng = np.random.default_rng(8)
    small = analyze_matrix(stored(rng.standard_normal((7, 4)).astype(np.float32), "float8_e4m3fn"
                                  ).astype(np.float32), dtype="float8_e4m3fn")
    assert small.rank_nr is not None  # 0.17 of sv_max, under the 7 x 4 matrix's values
    big = analyze_matrix(stored(rng.standard_normal((200, 60)).astype(np.float32), "float8_e4m3fn"
                                ).astype(np.float32), dtype="float8_e4m3fn")
    assert np.sqrt(200 + 60 + 1) * 0.125 / 2 >= 1 and 200 * 0.125 >= 1
    assert big.rank_numpy is None and big.rank_nr is None
    assert big.rank_note.startswith("numpy and nr tolerance >= sv_max for float8_e4m3fn")
    assert not big.collapsed("numpy") and not big.collapsed("nr")
    assert big.rank_noise == 60 and big.rank_loss == 0
    numpy_run = analyze({"w": torch.from_numpy(rng.standard_normal((200, 60)).astype(np.float32)
                                               ).to(torch.float8_e4m3fn)},
                        rank_criterion="numpy")
    rec = numpy_run.records[0]
    assert rec.rank_criterion == "numpy" and rec.rank_loss is None
    assert numpy_run.summary.collapsed["numpy"] == 0


def test_gram_path_falls_back_near_the_noise_floor():
    """The trust check covers every tolerance: a singular value on the noise floor sends the
    matrix to the SVD, as one on the loose bound does."""
    W = np.random.default_rng(9).standard_normal((600, 200))
    S = np.linalg.svd(W, compute_uv=False)
    assert singular_values(W, EPS32, noise_estimate=S[100] / 3).method == "gram"
    near = singular_values(W, EPS32, noise_estimate=S[100] * (1 + 0.5 * GRAM_RTOL))
    assert near.method == "gram>svd"
    assert near.rank(near.tolerances.noise) == np.linalg.matrix_rank(W, tol=near.tolerances.noise)


def test_float32_fit_input_is_unchanged_on_a_rank_deficient_matrix():
    """float32 storage: the fit still receives exactly the eigenvalues above numpy's float32
    tolerance (the 20 real ones of a rank-20 matrix), as before the noise floor existed."""
    rng = np.random.default_rng(20)
    W = low_rank(rng, 300, 150, 20).astype(np.float32)
    S = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    real = S[S > S[0] * 300 * EPS32] ** 2
    assert real.size == 20
    rec = analyze_matrix(W)
    assert rec.num_evals == 20 == rec.rank_numpy == rec.rank_noise
    ref = powerlaw_reference(real)
    assert rec.alpha == pytest.approx(ref.alpha, rel=1e-8) and rec.xmin == pytest.approx(ref.xmin)
    # float32 arithmetic remnants (here 1e-5 of the entries) above the storage rounding but
    # under numpy's tolerance: rank_noise counts them, the fit (numpy's level) does not
    W = (low_rank(rng, 300, 150, 20) + 1e-5 * rng.standard_normal((300, 150))).astype(np.float32)
    S = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    tol = S[0] * 300 * EPS32
    assert S[20] < tol and np.sum(S > tol) == 20
    rec = analyze_matrix(W)
    assert rec.rank_numpy == rec.num_evals == 20 and rec.rank_noise == 150
    ref = powerlaw_reference(S[S > tol] ** 2)
    assert rec.alpha == pytest.approx(ref.alpha, rel=1e-8) and rec.xmin == pytest.approx(ref.xmin)


# ---------------------------------------------------------------------------------------------
# Readers: float8 from safetensors and torch pickles


def test_float8_bit_patterns_are_read_as_torch_decodes_them(tmp_path):
    """All 256 codes of each torch float8 dtype, saved by torch and read without it (inert
    unpickler): the values torch's own ``.float()`` gives, NaN where it has NaN."""
    from allennlp_analyze.sources import open_source

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16)
    tensors = {d: codes.view(NARROW[d]) for d in NARROW if "float8" in d}
    torch.save(tensors, tmp_path / "codes.pt")
    source = open_source(tmp_path / "codes.pt")
    assert {t.name: t.dtype for t in source.tensors()} == {d: d for d in tensors}
    for d, t in tensors.items():
        np.testing.assert_array_equal(source.load(d), t.float().numpy())


def test_float8_checkpoints_are_analyzed(tmp_path):
    """F8_E4M3 / F8_E5M2 safetensors (written by the safetensors package) and a torch pickle
    with all four torch float8 dtypes: read, analyzed with their own eps and ulp."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(10)
    truth = {f"{d}.weight": low_rank(rng, 300, 120, 5) for d in NARROW if "float8" in d}
    tensors = {n: _as_torch(W, n.split(".")[0]) for n, W in truth.items()}
    save_file({n: t for n, t in tensors.items() if "fnuz" not in n},
              str(tmp_path / "f8.safetensors"))
    torch.save(tensors, tmp_path / "f8.pt")
    from_st = {r.name: r for r in analyze(tmp_path / "f8.safetensors").records}
    from_pt = {r.name: r for r in analyze(tmp_path / "f8.pt").records}
    assert set(from_st) == {"float8_e4m3fn.weight", "float8_e5m2.weight"}
    assert set(from_pt) == set(truth)
    for name, rec in from_pt.items():
        dtype = name.split(".")[0]
        W = tensors[name].to(torch.float64).numpy()
        assert rec.dtype == dtype and rec.rank_noise == 5
        S = np.linalg.svd(W, compute_uv=False)
        assert rec.noise_floor == pytest.approx(reference_floor(W, dtype, S), rel=1e-10)
        if name in from_st:
            assert from_st[name].to_dict() | {"model": ""} == rec.to_dict() | {"model": ""}


# ---------------------------------------------------------------------------------------------
# Real weights: MiniLM cast to bfloat16 and float16

#: |alpha - alpha_fp32| / alpha_fp32 allowed, by dtype (measured: 1.5e-2 and 3.1e-5; bfloat16's
#: worst is a layer whose xmin moved to the neighbouring eigenvalue).
ALPHA_RTOL = {"bfloat16": 0.02, "float16": 1e-3}


@pytest.mark.parametrize("dtype", sorted(ALPHA_RTOL))
def test_minilm_cast_to_low_precision(minilm_path, dtype):
    from safetensors.numpy import load_file

    weights = load_file(str(minilm_path))
    fp32 = {r.name: r for r in analyze(minilm_path).records}
    state = {n: torch.from_numpy(w).to(NARROW[dtype]) if w.dtype.kind == "f" else
             torch.from_numpy(w) for n, w in weights.items()}  # as model.to(dtype) casts
    result = analyze(state)
    assert len(result.records) == len(fp32) == 12
    for rec in result.records:
        ref = fp32[rec.name]
        assert rec.dtype == dtype and rec.status == "ok"
        assert rec.alpha == pytest.approx(ref.alpha, rel=ALPHA_RTOL[dtype])
        assert rec.rank_loose == ref.rank_loose == rec.rank_noise == rec.M == rec.num_evals
        # the noise floor against the exact rounding of these real weights: an estimate within
        # a factor 3 (it errs high on rows/columns with outliers), the bound always above
        E = state[rec.name].to(torch.float64).numpy() - weights[rec.name].astype(np.float64)
        norm_E = np.linalg.norm(E, 2)
        assert norm_E <= rec.noise_bound
        assert 0.9 * norm_E <= rec.noise_floor <= 3.0 * norm_E
    assert result.summary.collapsed["auto"] == 0


# ---------------------------------------------------------------------------------------------
# A bfloat16 Llama-shaped checkpoint (transformers' LlamaConfig, random init), two shards


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=704,
                                      num_attention_heads=8, num_key_value_heads=2,
                                      num_hidden_layers=2, vocab_size=4096)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("llama_bf16")
    model.save_pretrained(folder, max_shard_size="4MB", safe_serialization=True)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) == 2
    return folder


def test_bf16_llama_checkpoint_end_to_end(llama_bf16, tmp_path, capsys):
    """`allennlp-analyze <folder> --min-q 1`: every matrix has an alpha, rank_noise = M for
    every rectangular one, rank_noise of the square ones equals the count of singular values
    above the noise floor (recomputed here from the safetensors package's read), numpy's rank is
    absent (max(N, M) * eps >= 1) and never a collapse."""
    from safetensors import safe_open

    out = tmp_path / "report.json"
    assert main([str(llama_bf16), "--min-q", "1", "--format", "json", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    records, summary = doc["records"], doc["summary"]
    assert len(records) == 15  # 7 per layer + lm_head; the embedding table is left out
    weights = {}
    for shard in llama_bf16.glob("model-*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            weights.update({k: f.get_tensor(k) for k in f.keys()})
    square = nr_undefined = nr_rectangular = 0
    for rec in records:
        assert rec["dtype"] == "bfloat16" and rec["status"] == "ok" and rec["alpha"] is not None
        assert rec["rank_numpy"] is None and rec["rank_criterion"] == "noise"
        W = weights[rec["name"]].to(torch.float64).numpy()
        S = np.linalg.svd(W, compute_uv=False)
        floor = reference_floor(W, "bfloat16", S)
        assert rec["noise_floor"] == pytest.approx(floor, rel=1e-10)
        assert rec["rank_noise"] == int((S > floor).sum())
        assert rec["num_evals"] == rec["rank_noise"]
        nr = np.sqrt(rec["N"] + rec["M"] + 1) * 2.0 ** -7 / 2  # see below
        formula = int((S > nr * S[0]).sum())
        if formula < (S > reference_noise(W, "bfloat16")[1]).sum():
            assert rec["rank_nr"] is None and "nr tolerance (" in rec["rank_note"]
            nr_undefined += 1
            nr_rectangular += rec["Q"] > 1.1
        else:
            assert rec["rank_nr"] == formula == rec["M"]
        if rec["Q"] > 1:
            assert rec["rank_noise"] == rec["M"] and rec["rank_loss"] == 0
        else:
            square += 1
    assert square == 4
    collapsed = sum(r["rank_noise"] < r["M"] for r in records)
    assert summary["collapsed"]["auto"] == summary["collapsed"]["noise"] == collapsed
    assert summary["collapsed"]["numpy"] == 0 and summary["rank_undefined"]["numpy"] == 15
    assert summary["fitted"] == 15
    capsys.readouterr()
    assert main([str(llama_bf16), "--min-q", "1.1", "--fail-on-collapse"]) == 0
    text = capsys.readouterr().out
    assert "numpy tolerance: 0 (no rank for 11: see rank_note)" in text
    assert "noise floor: 0" in text and "11 fitted" in text
    # Numerical Recipes' tolerance, sqrt(N + M + 1) eps / 2 = 20-72% of sv_max, is below sv_max
    # but calls noise singular values above the rigorous bound of the rounding: no rank
    assert summary["collapsed"]["nr"] == 0 and summary["rank_undefined"]["nr"] == nr_undefined
    assert nr_undefined >= 4  # at least the square ones
    nr_text = re.search(r"Numerical Recipes tolerance: 0( \([^)]*\))?,", text).group(1) or ""
    assert (f"no rank for {nr_rectangular}: " in nr_text) == (nr_rectangular > 0)


def test_rank_criterion_option():
    from allennlp_analyze.cli import build_parser
    from allennlp_analyze.options import from_namespace

    assert AnalysisOptions().rank_criterion == "auto"
    for c in ("auto", "loose", "numpy", "nr", "noise"):
        assert from_namespace(build_parser().parse_args(["m", "--rank-criterion", c])
                              ).rank_criterion == c
    W = torch.from_numpy(np.random.default_rng(3).standard_normal((300, 100)).astype(np.float32))
    for dtype, expected in ((torch.float32, "loose"), (torch.bfloat16, "noise")):
        rec = analyze({"w": W.to(dtype)}).records[0]
        assert rec.rank_criterion == expected
        assert analyze({"w": W.to(dtype)}, rank_criterion="nr").records[0].rank_criterion == "nr"
