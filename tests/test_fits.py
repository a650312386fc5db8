"""Every alpha estimator of :mod:`allennlp_analyze.fits` against its reference on the same
eigenvalues:

* ``tpl``: ``powerlaw`` 1.5's ``Fit(evals).truncated_power_law`` and ``distribution_compare``
  (spectra corpus, random heavy-tailed samples): the same xmin, alpha and Lambda to 1e-4
  relative, or else ours has the higher log-likelihood, evaluated by powerlaw itself;
* ``xmin-peak``, ``clip-xmax``, ``detx``: WeightWatcher 0.7.7, layer by layer, from the golden
  tables ``tests/data/ww_golden_*.json`` written by ``benchmarks/ww_golden.py`` (eigenvalues
  recomputed here: squared singular values of the float32 weights in float64, not normalized);
  ``xmin-peak`` also against ``powerlaw.Fit(data, xmin=(lo, hi))`` directly;
* ``hill-mid``, ``hill-peak``: the published ``PL_Alpha_Hill`` (AlphaPruning / TempBalance
  ``net_esd_estimator``), written out below, and hand-computed cases;
* bad spectra (empty, one value, all equal, ties, NaN, zeros): the documented status.
"""
import contextlib
import importlib.util
import io
import json
import math
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import WHEEL09

from allennlp_analyze.fits import (
    ESTIMATORS,
    ClippedEstimate,
    Estimate,
    clip_xmax,
    columns,
    csn,
    detx,
    estimate_all,
    hill_mid,
    hill_peak,
    parse_fits,
    run_warning,
    tpl,
    warning,
    xmin_peak,
)
from allennlp_analyze.fits.ww import peak_xmin_range

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    stack.enter_context(np.errstate(all="ignore"))
    warnings.simplefilter("ignore")
    return stack


@pytest.fixture(scope="module")
def powerlaw15():
    powerlaw = pytest.importorskip("powerlaw")
    if powerlaw.__version__ != "1.5":
        pytest.skip("the reference is powerlaw 1.5")
    return powerlaw


def _heavy_samples():
    """Random spectra: Gaussian matrices with Pareto-scaled columns, and plain Pareto samples."""
    rng = np.random.default_rng(2025)
    out = []
    for k, (rows, cols, shape) in enumerate([(300, 100, 1.5), (400, 160, 2.5), (200, 120, 4.0),
                                              (500, 80, 3.0)]):
        W = rng.standard_normal((rows, cols)) * (1.0 + rng.pareto(shape, cols))
        out.append((f"matrix{k}", np.linalg.svd(W, compute_uv=False) ** 2))
    for k, a in enumerate((1.8, 2.6)):
        out.append((f"pareto{k}", 0.01 * (1.0 + rng.pareto(a - 1.0, 150))))
    return out


def _corpus_samples():
    with np.load(DATA / "spectra_corpus.npz") as z:
        names = [str(n) for n in z["names"]]
        chosen = [n for n in names if n.startswith(("minilm/", "mp/n200", "mp/n384_q4"))][:8]
        return [(n, z["spectrum:" + n]) for n in chosen]


TPL_CASES = _corpus_samples() + _heavy_samples()


def _powerlaw_tpl(powerlaw, evals):
    """(xmin, alpha, Lambda, R, p, its log-likelihood, loglik(alpha, Lambda)) by powerlaw 1.5."""
    data = evals[evals > 0]
    with _quiet():
        fit = powerlaw.Fit(data, verbose=False)
        t = fit.truncated_power_law
        R, p = fit.distribution_compare("power_law", "truncated_power_law")
        ll = float(np.sum(t.loglikelihoods(fit.data)))

        def loglik(alpha, lam):
            # no data given: powerlaw would fit it instead of taking the parameters
            if lam == 0.0:  # the power law itself (powerlaw's TPL needs Lambda > 0)
                d = powerlaw.Power_Law(xmin=fit.xmin, parameters=[alpha])
            else:
                d = powerlaw.Truncated_Power_Law(xmin=fit.xmin, parameters=[alpha, lam])
            return float(np.sum(d.loglikelihoods(fit.data)))
    return fit.xmin, t.alpha, t.Lambda, R, p, ll, loglik


@pytest.mark.parametrize("name,evals", TPL_CASES, ids=[n for n, _ in TPL_CASES])
def test_tpl_equals_powerlaw(powerlaw15, name, evals):
    ours = tpl(evals)
    xmin, alpha, lam, R, p, ll, loglik = _powerlaw_tpl(powerlaw15, evals)
    assert ours.status == "ok" and ours.xmin == xmin
    assert ours.num_tail == int(np.sum(evals >= xmin))
    same = (ours.alpha == pytest.approx(alpha, rel=1e-4)
            and ours.Lambda == pytest.approx(lam, rel=1e-4))
    # our parameters in powerlaw's likelihood (which is tiny for alpha <= 1: at our boundary
    # maximum alpha = 1 it is taken just inside, by continuity)
    ll_ours = loglik(max(ours.alpha, 1.0 + 1e-12), ours.Lambda)
    assert ll_ours == pytest.approx(ours.loglik, rel=1e-9, abs=1e-9)
    if same:
        assert ours.R == pytest.approx(R, rel=1e-4, abs=1e-4)
        assert ours.p == pytest.approx(p, rel=1e-3, abs=1e-6)
    else:  # powerlaw's Nelder-Mead stopped short: ours is the better maximum
        assert ll_ours >= ll - 1e-9 * abs(ll), (ours, alpha, lam)
    # R = loglik(power law) - loglik(TPL): with the higher maximum, ours is <= powerlaw's
    assert ours.R <= R + 1e-9 * abs(ll)


def test_tpl_power_law_optimum_is_exact():
    """A sample whose mean is above the power law's: the maximum is at Lambda = 0 (KKT), the
    power law itself, so R = 0 and p = 1 exactly."""
    x = np.array([1.362, 1.59, 1.009, 1.001, 1.284, 2.098, 1.358, 1.41, 3.598, 15.698, 4.454,
                  1.001])
    fit = csn(x)
    y = x[x >= fit.xmin] / fit.xmin
    beta = 1 / np.mean(np.log(y))
    assert beta > 1 and np.mean(y) >= beta / (beta - 1)  # the sample is such a case
    est = tpl(x)
    assert est.Lambda == 0.0 and est.R == 0.0 and est.p == 1.0
    assert est.alpha == pytest.approx(fit.alpha, rel=1e-14) and est.xmin == fit.xmin


# ---------------------------------------------------------------- WeightWatcher golden tables

def _golden(source):
    path = DATA / f"ww_golden_{source}.json"
    return json.loads(path.read_text())


def _generator():
    spec = importlib.util.spec_from_file_location("ww_golden", REPO / "benchmarks" / "ww_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def golden_matrices(minilm_path):
    """{source: {name: float32 matrix}} of the layers in the golden tables, read with the
    formats' own libraries (safetensors, torch's weights-only loader) or regenerated."""
    from safetensors.numpy import load_file

    out = {"minilm": load_file(str(minilm_path)), "llama": _generator().llama_like_matrices()}
    if WHEEL09.is_file():
        torch = pytest.importorskip("torch")
        archives, names = {}, [layer["name"] for layer in _golden("allennlp09")["layers"]]
        with zipfile.ZipFile(WHEEL09) as z:
            for archive in {n.split(":")[0] for n in names}:
                data = z.read("allennlp/tests/fixtures/" + archive)
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
                    member = next(m for m in tar.getmembers()
                                  if m.name.lstrip("./") == "weights.th")
                    archives[archive] = torch.load(io.BytesIO(tar.extractfile(member).read()),
                                                   map_location="cpu", weights_only=True)
        out["allennlp09"] = {n: archives[n.split(":")[0]][n.split(":")[1]].float().numpy()
                             for n in names}
    return out


def _ww_cases():
    return [(source, i) for source in ("minilm", "allennlp09", "llama")
            for i in range(len(_golden(source)["layers"]))]


_EIGENVALUES = {}


def _eigenvalues(W):
    """WeightWatcher's: squared singular values of the float32 weights taken as float64
    (computed once per matrix in this module)."""
    key = id(W)
    if key not in _EIGENVALUES:
        _EIGENVALUES[key] = (W, np.sort(np.linalg.svd(np.asarray(W, dtype=np.float64),
                                                      compute_uv=False) ** 2))
    return _EIGENVALUES[key][1]


@pytest.mark.parametrize("source,index", _ww_cases())
def test_weightwatcher_golden(golden_matrices, source, index):
    if source not in golden_matrices:
        pytest.skip(f"{WHEEL09.name} not downloaded")
    layer = _golden(source)["layers"][index]
    W = golden_matrices[source][layer["name"]]
    assert list(W.shape) == layer["shape"]
    evals = _eigenvalues(W)
    ww = layer["xmin_peak"]
    ours = xmin_peak(evals)
    if ww["status"] != "success":
        assert ours.status != "ok"
    else:
        assert ours.xmin == pytest.approx(ww["xmin"], rel=1e-9)
        assert ours.alpha == pytest.approx(ww["alpha"], rel=1e-8)
        assert ours.D == pytest.approx(ww["D"], rel=1e-8, abs=1e-12)
        assert ours.num_tail == ww["num_pl_spikes"]
        assert warning(ours) == ww["warning"]
    ww = layer["clip_xmax"]
    ours = clip_xmax(evals)
    assert ww["status"] == "success"
    assert ours.num_fingers == ww["num_fingers"]
    assert ours.raw_alpha == pytest.approx(ww["raw_alpha"], rel=1e-8)
    assert ours.alpha == pytest.approx(ww["alpha"], rel=1e-8)
    assert ours.xmin == pytest.approx(ww["xmin"], rel=1e-9)
    assert ours.D == pytest.approx(ww["D"], rel=1e-8, abs=1e-12)
    # WeightWatcher labels alpha only; "fingers" is ours, where it removed eigenvalues
    assert warning(ours) == ",".join(filter(None, [ww["warning"],
                                                   "fingers" if ww["num_fingers"] else ""]))
    ww = layer["detx"]
    ours = detx(evals)
    assert ours.detx_num == ww["detX_num"]
    assert ours.detx_val == pytest.approx(ww["detX_val"], rel=1e-9)


def test_golden_tables_cover_the_cases():
    """The tables hold fingers, both warnings and unremarkable layers (else they test little)."""
    layers = [x for s in ("minilm", "allennlp09", "llama") for x in _golden(s)["layers"]]
    assert _golden("minilm")["meta"]["weightwatcher"] == "0.7.7"
    assert any(x["clip_xmax"]["num_fingers"] > 0 for x in layers)
    warns = {x["xmin_peak"].get("warning") for x in layers} | {x["clip_xmax"]["warning"]
                                                              for x in layers}
    assert {"over-trained", "under-trained", ""} <= warns


def test_xmin_peak_equals_powerlaw_range_fit(powerlaw15):
    """``xmin-peak`` is powerlaw's ``Fit(nz, xmin=(lo, hi))`` with WeightWatcher's range, here
    computed independently (histogram by hand), on spectra with ties too."""
    rng = np.random.default_rng(5)
    samples = [np.linalg.svd(rng.standard_normal((120, 60)) * (1 + rng.pareto(2.0, 60)),
                             compute_uv=False) ** 2,
               np.round(rng.lognormal(0.0, 1.5, 200), 1) + 0.1]  # many ties
    for evals in samples:
        nz = np.sort(evals[evals > 1e-5])
        logs = np.log10(nz)
        edges = np.linspace(logs.min(), logs.max(), 101)
        counts = np.bincount(np.minimum(np.searchsorted(edges, logs, side="right") - 1, 99),
                             minlength=100)
        x2 = 10 ** edges[int(np.argmax(counts))]
        assert peak_xmin_range(nz) == pytest.approx((math.log10(0.95 * x2), 1.5 * x2),
                                                    rel=1e-12)
        with _quiet():
            ref = powerlaw15.Fit(nz, xmin=(math.log10(0.95 * x2), 1.5 * x2), verbose=False)
        ours = xmin_peak(evals)
        assert ours.xmin == ref.xmin
        assert ours.alpha == pytest.approx(ref.alpha, rel=1e-9)
        assert ours.D == pytest.approx(ref.D, rel=1e-9)


# ---------------------------------------------------------------- Hill (PL_Alpha_Hill)

def _hill_at(eigs, i):
    """AlphaPruning's formula at tail start i (eigs ascending)."""
    n = len(eigs) - i
    alpha = 1 + n / (np.sum(np.log(eigs[i:])) - n * np.log(eigs[i]))
    D = np.max(np.abs(1 - (eigs[i:] / eigs[i]) ** (-alpha + 1) - np.arange(n) / n))
    return alpha, D


def _hill_peak_reference(eigs, bins=100):
    """AlphaPruning / TempBalance ``net_esd_estimator(fix_fingers='xmin_peak')``, in float64."""
    h = np.log10(eigs)
    edges = np.linspace(h.min(), h.max(), bins + 1)
    counts = np.zeros(bins)
    for v in h:
        counts[min(int((v - h.min()) / (h.max() - h.min()) * bins), bins - 1)] += 1
    x2 = 10 ** edges[int(np.argmax(counts))]
    lo, hi = np.log10(0.95 * x2), 1.5 * x2
    alphas, Ds = np.zeros(len(eigs) - 1), np.ones(len(eigs) - 1)
    for i, xmin in enumerate(eigs[:-1]):
        if xmin < lo:
            continue
        if xmin > hi:
            break
        alphas[i], D = _hill_at(eigs, i)
        if alphas[i] > 1:
            Ds[i] = D
    k = int(np.argmin(Ds))
    return alphas[k], Ds[k], eigs[k]


def test_hill_hand_computed():
    # N = 4, i = 2: tail [4, 8]; alpha = 1 + 2 / ln 2; 2**(1 - alpha) = e**-2
    est = hill_mid(np.array([8.0, 1.0, 4.0, 2.0]))
    assert est.alpha == pytest.approx(1 + 2 / math.log(2), rel=1e-15)
    assert est.D == pytest.approx(0.5 - math.exp(-2), rel=1e-14)
    assert est.xmin == 4.0 and est.num_tail == 2
    # N = 5, i = 2: tail [3, 3, 9] (the tie below is left out); alpha = 1 + 3 / ln 3,
    # D = max(0, 1/3, |1/3 - e**-3|) = 1/3
    est = hill_mid(np.array([1.0, 1.0, 3.0, 3.0, 9.0]))
    assert est.alpha == pytest.approx(1 + 3 / math.log(3), rel=1e-15)
    assert est.D == pytest.approx(1 / 3, rel=1e-14)


@pytest.mark.parametrize("seed", range(6))
def test_hill_equals_published_formula(seed):
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(30, 300), rng.integers(10, 200)
    W = rng.standard_normal((rows, cols)) * (1 + rng.pareto(1 + seed / 2, cols))
    eigs = np.sort(np.linalg.svd(W, compute_uv=False) ** 2)
    alpha, D = _hill_at(eigs, len(eigs) // 2)
    est = hill_mid(eigs[::-1])
    assert est.alpha == pytest.approx(alpha, rel=1e-12) and est.D == pytest.approx(D, rel=1e-12)
    alpha, D, xmin = _hill_peak_reference(eigs)
    est = hill_peak(eigs)
    assert est.xmin == xmin
    assert est.alpha == pytest.approx(alpha, rel=1e-12) and est.D == pytest.approx(D, rel=1e-12)


# ---------------------------------------------------------------- statuses, warnings, columns

BAD = {"empty": (np.array([]), "too_few"), "one": (np.array([3.0]), "too_few"),
       "zeros": (np.zeros(5), "too_few"), "equal": (np.full(6, 2.5), "all_equal"),
       "nan": (np.array([1.0, np.nan, 2.0, 3.0]), "nonfinite"),
       "inf": (np.array([1.0, np.inf, 2.0]), "nonfinite"),
       "negative": (np.array([-1e-9, 2.0, 3.0, 5.0]), "negative")}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_bad_spectra_give_a_status(name, case):
    evals, status = BAD[case]
    est = ESTIMATORS[name](evals)
    assert est.status == status
    assert est.alpha is None and est.xmin is None and est.D is None


def test_tpl_on_a_tail_narrower_than_it_resolves():
    assert tpl(np.array([1.0, 1.0 + 2e-16])).status == "all_equal"


def test_ties_and_small_spectra(powerlaw15):
    """Tied values: the CSN-based estimators equal powerlaw's (distinct-value CDF); two values:
    every estimator returns a number or a status, never raises."""
    x = np.array([1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 5.0, 5.0, 9.0, 20.0])
    with _quiet():
        ref = powerlaw15.Fit(x, verbose=False)
    assert csn(x).xmin == ref.xmin and csn(x).alpha == pytest.approx(ref.alpha, rel=1e-12)
    for evals in (x, np.array([1.0, 2.0]), np.array([0.0, 1e-7, 1.0, 2.0])):
        for est in estimate_all(evals, list(ESTIMATORS)).values():
            assert est.status in ("ok", "too_few", "all_equal", "no_candidate")
            assert (est.alpha is None) == (est.status != "ok") or est.status == "ok"


def test_detx_hand_computed():
    # [0.1, 0.2, 1, 5] rescaled by 4 / 6.3: products from the top 3.17, 2.02, 0.26 < 1 at i = 1
    est = detx(np.array([5.0, 0.2, 1.0, 0.1]))
    assert (est.detx_num, est.detx_val) == (3, pytest.approx(0.2, rel=1e-15))
    assert est.alpha == pytest.approx(1 + 3 / math.log(125), rel=1e-14) and est.xmin == 0.2
    # [0.5, 1, 2, 4] rescaled by 4 / 7.5: no product drops below 1 -> WeightWatcher reports N
    # and lambda[1]
    est = detx(np.array([0.5, 1.0, 2.0, 4.0]))
    assert (est.detx_num, est.detx_val) == (4, pytest.approx(1.0, rel=1e-15))


def test_warning_thresholds():
    """WeightWatcher 0.7.7: alpha < 2 over-trained, alpha > 6 under-trained (strict)."""
    assert [warning(Estimate("ok", alpha=a)) for a in (1.99, 2.0, 6.0, 6.01)] == \
        ["over-trained", "", "", "under-trained"]
    assert warning(ClippedEstimate("ok", alpha=3.0, num_fingers=2)) == "fingers"
    assert warning(ClippedEstimate("ok", alpha=7.0, num_fingers=1)) == "under-trained,fingers"
    assert warning(Estimate("too_few")) == ""


def test_parse_fits_and_columns():
    assert parse_fits("csn, xmax,tpl,csn") == ("csn", "csn-xmax", "tpl")
    with pytest.raises(ValueError, match="unknown estimator 'hill'"):
        parse_fits("csn,hill")
    est = estimate_all(np.arange(1.0, 40.0) ** 2, ["tpl", "hill-mid", "clip-xmax", "detx"])
    assert set(columns("tpl", est["tpl"])) == {"tpl_alpha", "tpl_lambda", "tpl_xmin", "tpl_R",
                                               "tpl_p"}
    assert columns("hill-mid", est["hill-mid"])["alpha_hill_mid"] == est["hill-mid"].alpha
    assert "clip_xmax_fingers" in columns("clip-xmax", est["clip-xmax"])
    assert {"detx_num", "detx_val", "alpha_detx"} <= set(columns("detx", est["detx"]))


def test_run_warning_and_inputs():
    """The record's warning: the first estimator's label, plus "fingers" from clip-xmax; the
    CSN-type estimators see only the fitted eigenvalues, the others all of them."""
    assert run_warning({"csn": Estimate("ok", alpha=7.0),
                        "clip-xmax": ClippedEstimate("ok", alpha=3.0, num_fingers=2)},
                       "csn") == "under-trained,fingers"
    assert run_warning({"clip-xmax": ClippedEstimate("ok", alpha=1.5, num_fingers=1)},
                       "clip-xmax") == "over-trained,fingers"
    assert run_warning({"tpl": Estimate("too_few")}, "tpl") == ""
    everything = np.r_[np.full(30, 1e-9), np.linspace(1.0, 50.0, 40) ** 2]
    fitted = everything[everything > 1e-6]
    est = estimate_all(everything, ["csn", "hill-mid"], fitted=fitted)
    assert est["csn"] == csn(fitted) and est["hill-mid"] == hill_mid(everything)


# ---------------------------------------------------------------- one run, every estimator

DONE_FITS = "csn,xmin-peak,tpl,hill-mid,detx"


@pytest.fixture(scope="module")
def minilm_run(minilm_path):
    from allennlp_analyze import analyze

    return analyze(str(minilm_path), min_q=1.0, include=("embeddings",), fit=DONE_FITS,
                   keep_spectra=True)


def test_minilm_one_run_every_estimator(minilm_run, minilm_path, golden_matrices):
    """``--fit csn,xmin-peak,tpl,hill-mid,detx`` on MiniLM: one run gives, for every matrix,
    WeightWatcher's xmin-peak alpha and detX, the Hill formula's alpha, and the first
    estimator's (csn) alpha in ``alpha`` with WeightWatcher's thresholds in ``warning``."""
    golden = {x["name"]: x for x in _golden("minilm")["layers"]}
    records = [r for r in minilm_run.records if r.name in golden]
    # WeightWatcher skips matrices with fewer than 8 eigenvalues (its min_evals)
    assert all(r.M < 8 for r in minilm_run.records if r.name not in golden)
    assert len(records) == len(golden)
    for rec in records:
        ww = golden[rec.name]
        evals = _eigenvalues(golden_matrices["minilm"][rec.name])
        assert rec.fit == "csn" and rec.alpha == rec.alpha_csn and rec.xmin == rec.xmin_csn
        assert rec.alpha_xmin_peak == pytest.approx(ww["xmin_peak"]["alpha"], rel=1e-8)
        assert rec.xmin_xmin_peak == pytest.approx(ww["xmin_peak"]["xmin"], rel=1e-9)
        assert rec.detx_num == ww["detx"]["detX_num"]
        assert rec.detx_val == pytest.approx(ww["detx"]["detX_val"], rel=1e-9)
        positive = evals[evals > 0]
        alpha, D = _hill_at(positive, positive.size // 2)
        assert rec.alpha_hill_mid == pytest.approx(alpha, rel=1e-9)
        assert rec.D_hill_mid == pytest.approx(D, rel=1e-9)
        expected = "over-trained" if rec.alpha < 2 else "under-trained" if rec.alpha > 6 else ""
        assert rec.warning == expected
        assert rec.tpl_alpha is not None and rec.tpl_R <= 1e-12 and 0 <= rec.tpl_p <= 1
        assert rec.alpha_clip_xmax is None and rec.alpha_hill_peak is None  # not requested


def test_minilm_one_run_tpl_and_csn_equal_powerlaw(minilm_run, powerlaw15, pl_reference):
    """The same run's csn and tpl columns against powerlaw 1.5 (on three matrices: its TPL fit
    is slow); the eigenvalues the fit sees are the record's (``num_evals`` above round-off)."""
    for rec in [r for r in minilm_run.records if "intermediate" in r.name][:3]:
        evals = np.sort(minilm_run.spectra[minilm_run.records.index(rec)] ** 2)[::-1]
        fitted = evals[:rec.num_evals]
        ref = pl_reference(fitted)
        assert rec.xmin_csn == ref.xmin and rec.alpha_csn == pytest.approx(ref.alpha, rel=1e-9)
        xmin, alpha, lam, R, p, ll, loglik = _powerlaw_tpl(powerlaw15, fitted)
        assert rec.tpl_xmin == xmin
        assert loglik(max(rec.tpl_alpha, 1 + 1e-12), rec.tpl_lambda) >= ll - 1e-9 * abs(ll)
        assert rec.tpl_R <= R + 1e-9 * abs(ll)


def test_fit_option_through_the_cli(tmp_path, minilm_path):
    """``--fit`` on the command line: the first estimator fills alpha, each its columns (CSV)."""
    import csv

    from allennlp_analyze.cli import main

    out = tmp_path / "out.csv"
    assert main([str(minilm_path), "--fit", "hill-mid,clip-xmax", "--match", "layer.0.output",
                 "--format", "csv", "--output-file", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert rows and all(r["fit"] == "hill-mid" and r["alpha"] == r["alpha_hill_mid"] != ""
                        and r["alpha_clip_xmax"] != "" and r["alpha_csn"] == "" for r in rows)
    assert main([str(minilm_path), "--fit", "hill"]) == 2


def test_esd_figure_draws_each_fitted_line(minilm_run):
    """The tail panel: one fitted line per estimator with a result, the first's first; the
    tpl line is a density (it integrates to its tail's share)."""
    from allennlp_analyze.plots import esd_figure

    i = next(k for k, r in enumerate(minilm_run.records) if "intermediate" in r.name)
    rec = minilm_run.records[i]
    drawn = esd_figure(rec, minilm_run.spectra[i])
    tail = drawn.figure.axes[2]
    labels = [line.get_label() for line in tail.get_lines() if not line.get_label().startswith(
        ("_", "xmin ="))]
    assert [label.split(":")[0] for label in labels] == ["csn", "xmin-peak", "tpl", "hill-mid",
                                                           "detx"]
    assert f"α = {rec.alpha:.3f}" in labels[0]
    line = next(x for x in tail.get_lines() if x.get_label().startswith("tpl"))
    x, y = line.get_data()
    n_in = np.count_nonzero(minilm_run.spectra[i] ** 2 >= rec.tpl_xmin)
    # trapezoid on the drawn grid (xmin to lambda_max): at most the tail's share, and close
    share = np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) * rec.M / n_in
    assert 0.9 < share <= 1.0 + 1e-6


def test_fit_xmax_is_the_csn_xmax_alias(pl_reference):
    """``--fit-xmax max`` = ``--fit csn-xmax``: the record's xmax is lambda_max and its fit
    powerlaw's bounded one; naming an estimator list without csn with it is an error."""
    from allennlp_analyze.errors import AnalyzeError
    from allennlp_analyze.matrix import analyze_matrix
    from allennlp_analyze.options import AnalysisOptions

    assert AnalysisOptions(fit_xmax="max").fit == ("csn-xmax",)
    assert AnalysisOptions(fit="tpl,csn", fit_xmax="max").fit == ("tpl", "csn-xmax")
    with pytest.raises(AnalyzeError, match="does not name csn"):
        AnalysisOptions(fit="hill-mid", fit_xmax="max")
    W = np.random.default_rng(3).standard_normal((90, 40))
    rec = analyze_matrix(W, AnalysisOptions(fit_xmax="max"))
    lam = np.linalg.svd(W, compute_uv=False) ** 2
    ref = pl_reference(lam, xmax=lam.max())
    assert rec.fit == "csn-xmax" and rec.xmax == pytest.approx(lam.max(), rel=1e-12)
    assert rec.xmin == pytest.approx(ref.xmin, rel=1e-12)
    assert rec.alpha == pytest.approx(ref.alpha, rel=1e-9) == rec.alpha_csn_xmax
    assert rec.alpha_csn is None


@pytest.mark.parametrize("name,evals", _heavy_samples()[:3])
def test_detx_alpha_equals_powerlaw_fixed_xmin(powerlaw15, name, evals):
    """``alpha_detx``, ``D_detx``: ``powerlaw.Fit(positive, xmin=detx cutoff)``."""
    est = detx(evals)
    with _quiet():
        ref = powerlaw15.Fit(evals[evals > 0], xmin=est.xmin, verbose=False)
    assert est.alpha == pytest.approx(ref.alpha, rel=1e-10)
    assert est.D == pytest.approx(ref.D, rel=1e-9)
    assert est.num_tail == int(ref.n_tail)
