"""The fast power-law fit equals the reference, ``powerlaw==1.5``'s ``Fit``, on a fixed corpus of
spectra (real MiniLM ones, Marchenko–Pastur, heavy-tailed, tied, tiny), in both xmax modes, and on
generated tied / tiny samples. The corpus and its reference results were made by
``benchmarks/make_spectra_corpus.py`` with powerlaw 1.5; where powerlaw 1.5 is installed, some of
them are recomputed here too.

Equality: the same xmin (bit for bit), alpha and D to 1e-9 relative, the same tail size.
"""
import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest

from allennlp_analyze import _bounded_fit
from allennlp_analyze.powerlaw_fit import fit_power_law
from conftest import powerlaw_reference

CORPUS = Path(__file__).parent / "data" / "spectra_corpus.npz"
RTOL = 1e-9


def _load():
    with np.load(CORPUS) as z:
        names = [str(n) for n in z["names"]]
        return names, {n: z["spectrum:" + n] for n in names}, dict(zip(names, z["reference"]))


NAMES, SPECTRA, REFERENCE = _load()


def _powerlaw15():
    powerlaw = pytest.importorskip("powerlaw")
    if not str(getattr(powerlaw, "__version__", "")).startswith("1.5"):
        pytest.skip("the reference is powerlaw 1.5")
    return powerlaw


def _reference_fit(values, xmax):
    """powerlaw 1.5's ``[xmin, alpha, D, n_tail]`` as the corpus stores it (NaNs: no fit)."""
    _powerlaw15()
    ref = powerlaw_reference(values, xmax) if np.unique(values).size >= 2 else None
    return [np.nan] * 4 if ref is None else [ref.xmin, ref.alpha, ref.D, float(ref.n_tail)]


def _assert_same(values, xmax, ref, label):
    ours = fit_power_law(values, xmax=xmax)
    if np.isnan(ref[0]):
        assert ours is None, label
        return
    assert ours is not None, label
    xmin, alpha, D, n_tail = ref
    assert ours.xmin == xmin, f"{label}: xmin {ours.xmin!r} != {xmin!r}"
    assert abs(ours.alpha - alpha) <= RTOL * abs(alpha), f"{label}: alpha {ours.alpha} != {alpha}"
    assert abs(ours.D - D) <= RTOL * abs(D) + 1e-15, f"{label}: D {ours.D} != {D}"
    assert ours.num_tail == n_tail, label


def test_corpus_is_varied():
    kinds = {n.split("/")[0] for n in NAMES}
    assert {"mp", "heavy", "tied", "tiny"} <= kinds
    assert len(NAMES) >= 30
    assert any(SPECTRA[n].size <= 5 for n in NAMES)


@pytest.mark.parametrize("mode", ["none", "max"])
@pytest.mark.parametrize("name", NAMES)
def test_fit_equals_stored_reference(name, mode):
    values = SPECTRA[name]
    xmax = float(values.max()) if mode == "max" and values.size else None
    _assert_same(values, xmax, REFERENCE[name][0 if mode == "none" else 1], f"{name} xmax={mode}")


def test_input_order_and_dtype_do_not_matter():
    values = SPECTRA["heavy/t2.5_n300"]
    a = fit_power_law(values)
    b = fit_power_law(np.random.default_rng(0).permutation(values).tolist())
    assert a == b


def test_bounded_fit_reproduces_nelder_mead_where_it_leaves_the_closed_form(monkeypatch):
    """The seeded 8192 x 2048 spectrum: with xmax, powerlaw's Nelder–Mead moves top candidates
    through overflow; only a few candidates need the emulation, and without it the fit would
    pick another xmin than powerlaw does."""
    values = SPECTRA["mp/n2048_q4_overflow"]
    x = np.sort(values)
    cand_first = np.arange(x.size - 1)  # all distinct
    closed = np.array([1 + (x.size - i) / np.sum(np.log(x[i:] / x[i])) for i in cand_first])
    alphas, exact = _bounded_fit.bounded_alphas(x, x, cand_first, closed)
    assert 0 < len(exact) < 40
    assert any(alphas[k] != closed[k] for k in exact)
    ref_xmin = REFERENCE["mp/n2048_q4_overflow"][1][0]
    assert fit_power_law(values, xmax=x[-1]).xmin == ref_xmin
    monkeypatch.setattr("allennlp_analyze.powerlaw_fit.bounded_alphas",
                        lambda x, u, cand_first, alphas: (alphas, {}))
    assert fit_power_law(values, xmax=x[-1]).xmin != ref_xmin


def test_bounded_fit_per_candidate_equals_powerlaw():
    """Every candidate's alpha (not just the winner's) equals powerlaw 1.5's, bit for bit."""
    powerlaw = _powerlaw15()
    for name in ["mp/n384_q8.0_s1.0", "tied/pareto_rounded_n300", "minilm/pooler.dense.weight"]:
        if name not in SPECTRA:
            continue
        values = SPECTRA[name]
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            ref = powerlaw.Fit(values, xmax=float(values.max()), verbose=False)
        x = np.sort(values)
        first = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])
        cand_first = first[:-1]
        closed = np.array([1 + (x.size - i) / np.sum(np.log(x[i:] / x[i])) for i in cand_first])
        alphas, _ = _bounded_fit.bounded_alphas(x, x[first], cand_first, closed)
        np.testing.assert_array_equal(alphas, ref.alphas, err_msg=name)


@pytest.mark.parametrize("name", ["tiny/n5", "tied/pairs_n40", "heavy/pareto2.5_n100_x1e4",
                                  "close/ulps_apart"])
def test_stored_reference_is_powerlaw_15(name):
    """The stored results are powerlaw 1.5's (recomputed here for a few small spectra)."""
    values = SPECTRA[name]
    for mode, xmax in (("none", None), ("max", float(values.max()))):
        ref = _reference_fit(values, xmax)
        np.testing.assert_allclose(ref, REFERENCE[name][0 if mode == "none" else 1],
                                   rtol=1e-12, err_msg=f"{name} {mode}")


def test_generated_ties_and_tiny_samples_equal_powerlaw():
    """Samples of n <= 12 drawn from a few values (many ties), both modes, against powerlaw."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    _powerlaw15()
    pool = st.sampled_from([0.5, 1.0, 1.0 + 2 ** -52, 2.0, 3.0, 3.5, 10.0, 1e3, 1e6])

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(st.lists(pool, min_size=0, max_size=12), st.booleans())
    def check(values, bounded):
        values = np.asarray(values, dtype=np.float64)
        xmax = float(values.max()) if bounded and values.size else None
        _assert_same(values, xmax, _reference_fit(values, xmax), f"{values.tolist()} {bounded}")

    check()
