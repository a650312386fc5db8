"""Figures: the Marchenko–Pastur density and its scaling, the numbers drawn against the records,
and the files written (valid, non-trivial PNGs, an index page that links them all)."""
import math
import re
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402
from matplotlib.patches import StepPatch  # noqa: E402

from allennlp_analyze import analyze  # noqa: E402
from allennlp_analyze.cli import main  # noqa: E402
from allennlp_analyze.mp import estimate_sigma2, mp_density, mp_support  # noqa: E402
from allennlp_analyze.plots import (alpha_histogram, esd_figure, figure_names,  # noqa: E402
                                    sanitize, sv_min_histogram, write_figures)
from allennlp_analyze.sources._common import TensorDictSource  # noqa: E402


def planted(rng, N, M, s):
    """An N x M float64 matrix with singular values ``s``."""
    U, _ = np.linalg.qr(rng.standard_normal((N, M)))
    V, _ = np.linalg.qr(rng.standard_normal((M, M)))
    return (U * np.asarray(s, dtype=np.float64)) @ V.T


def small_model(seed=0):
    """A few layers: heavy-tailed, random, one collapsed (nu_min 1e-10), one singular (a planted
    zero: nu_min at round-off), one all zero (nu_min exactly 0)."""
    rng = np.random.default_rng(seed)
    collapsed = np.sort(rng.uniform(0.5, 2, 60))[::-1]
    collapsed[-3:] = [1e-6, 1e-9, 1e-10]
    singular = np.sort(rng.pareto(2.5, 50) + 0.2)[::-1]
    singular[-1] = 0.0
    return {
        "encoder.layers.0.ff.weight": (rng.pareto(3.0, (200, 80)) *
                                       rng.choice([-1, 1], (200, 80))).astype(np.float32),
        "encoder.layers.0.ff.bias": np.zeros(200, np.float32),
        "encoder.layers.1/ff weight": rng.standard_normal((64, 150)).astype(np.float32) * 0.1,
        "encoder.layers.2.proj.weight": planted(rng, 180, 60, collapsed),
        "head[out].weight": planted(rng, 120, 50, singular),
        "dead.weight": np.zeros((60, 120), np.float32),
    }


def steps(ax):
    return [p for p in ax.patches if isinstance(p, StepPatch)]


def check_png(path, min_colors=8):
    path = Path(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = imread(str(path))
    h, w = img.shape[:2]
    assert h >= 200 and w >= 300, (path, img.shape)
    assert float(img.var()) > 0, path
    colors = np.unique((img[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) >= min_colors, (path, len(colors))
    # something is drawn beyond the white background: at least 2% of the pixels not white
    assert np.mean(img[..., :3].min(axis=-1) < 0.95) > 0.02, path


# --- Marchenko–Pastur ------------------------------------------------------------------------


@pytest.mark.parametrize("Q", [1.0, 1.1, 2.0, 4.0, 16.0])
@pytest.mark.parametrize("sigma2", [1.0, 0.0037])
def test_mp_integrates_to_one_and_edges(Q, sigma2):
    quad = pytest.importorskip("scipy.integrate").quad
    lo, hi = mp_support(Q, sigma2)
    assert lo == pytest.approx(sigma2 * (1 - 1 / math.sqrt(Q)) ** 2, rel=1e-12, abs=1e-300)
    assert hi == pytest.approx(sigma2 * (1 + 1 / math.sqrt(Q)) ** 2, rel=1e-12)
    f = lambda x: float(mp_density(x, Q, sigma2))  # noqa: E731
    total, err = quad(f, lo, hi, limit=200)
    assert total == pytest.approx(1.0, abs=1e-6), (total, err)
    # in lambda = nu^2 units (scale N) the same mass, edges scaled by N
    N = 768
    lo_n, hi_n = mp_support(Q, sigma2, scale=N)
    assert (lo_n, hi_n) == pytest.approx((N * lo, N * hi), rel=1e-12)
    total_n, _ = quad(lambda x: float(mp_density(x, Q, sigma2, scale=N)), lo_n, hi_n, limit=200)
    assert total_n == pytest.approx(1.0, abs=1e-6)
    # zero outside the support
    assert mp_density([lo * 0.5 if lo > 0 else -1.0, hi * 1.01, -1.0], Q, sigma2).max() == 0


def test_mp_scaling_matches_a_random_matrix():
    """The chosen scaling is the right one: eigenvalues of W^T W for a Gaussian W (N x M, entry
    variance sigma^2) fill [sigma^2 N (1 - 1/sqrt Q)^2, sigma^2 N (1 + 1/sqrt Q)^2] with the MP
    density, and sigma^2 estimated from W is ||W||_F^2 / (N M)."""
    rng = np.random.default_rng(1)
    N, M, sigma = 2000, 500, 0.3
    W = rng.standard_normal((N, M)) * sigma
    sv = np.linalg.svd(W, compute_uv=False)
    s2 = estimate_sigma2(sv, N, M)
    assert s2 == pytest.approx(np.sum(W * W) / (N * M), rel=1e-10)
    assert s2 == pytest.approx(sigma ** 2, rel=0.01)
    lam = sv ** 2
    lo, hi = mp_support(N / M, s2, scale=N)
    assert lam.min() > lo * 0.95 and lam.max() < hi * 1.05
    # empirical CDF against the integrated density at a few points
    grid = np.linspace(lo, hi, 4001)
    cdf = np.concatenate([[0], np.cumsum(np.diff(grid) * mp_density(grid[1:], N / M, s2, N))])
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        x = np.quantile(lam, q)
        assert np.interp(x, grid, cdf) == pytest.approx(q, abs=0.02)


# --- what is drawn ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run():
    sources = [TensorDictSource("model A", small_model(0)),
               TensorDictSource("model/B", small_model(1))]
    return analyze(*sources, min_q=1.0, keep_spectra=True)


def test_esd_figure_counts_equal_the_spectrum(small_run):
    for rec, sv in zip(small_run.records, small_run.spectra):
        if rec.status == "all_zero":
            continue
        drawn = esd_figure(rec, sv)
        lin, log, tail = drawn.figure.axes
        (lin_bars,) = steps(lin)
        M = rec.M
        # bar heights are densities normalized by M: height * width * M gives back the counts
        counts = lin_bars.get_data().values * np.diff(lin_bars.get_data().edges) * M
        assert np.allclose(counts, drawn.counts["linear"])
        assert round(counts.sum()) == M == sv.size
        pos = int(np.count_nonzero(sv > 0))
        assert drawn.counts["log"].sum() == pos
        if rec.alpha is not None:
            assert drawn.extra["alpha"] == rec.alpha and drawn.extra["xmin"] == rec.xmin
            assert drawn.extra["n_tail"] == rec.num_tail
            labels = [t.get_text() for t in tail.get_legend().get_texts()]
            assert any(f"{rec.alpha:.3f}" in t for t in labels)
            assert any(t.startswith("xmin") for t in labels)
        for ax in drawn.figure.axes:
            assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
            assert ax.get_legend() is not None
        assert "σ²" in drawn.figure._suptitle.get_text()


def test_run_histograms_count_the_records(small_run):
    recs, opts = small_run.records, small_run.options
    drawn = sv_min_histogram(recs, opts, small_run.summary.models)
    (ax,) = drawn.figure.axes
    layers = steps(ax)
    assert len(layers) == 2  # one colour per model, stacked
    for layer, model in zip(layers, ["model A", "model/B"]):
        data = layer.get_data()
        per_model = data.values - data.baseline
        assert per_model.sum() == sum(r.model == model and r.sv_min is not None for r in recs)
        assert layer.get_label().startswith(model)
    assert layers[-1].get_data().values.sum() == len(recs)
    # under the threshold: exactly the records with log10 nu_min < -8 (exact zeros included)
    direct = sum(r.log10_sv_min < opts.log10_threshold for r in recs)
    assert direct == 6  # per model: the 1e-10 planted, the singular and the all-zero matrix
    assert drawn.extra["n_below"] == direct
    edges = drawn.edges
    assert (np.cumsum(layers[-1].get_data().values)[edges[1:] <= opts.log10_threshold][-1]
            == direct)
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "-8" in legend
    assert any(t.get_text().startswith("ν_min = 0\n(2)") for t in ax.texts)

    drawn = alpha_histogram(recs, small_run.summary.models)
    layers = steps(drawn.figure.axes[0])
    assert layers[-1].get_data().values.sum() == sum(r.alpha is not None for r in recs)


def test_figure_names_are_sanitized_unique_and_stable(small_run):
    names = figure_names(small_run.records, several_models=True)
    assert len(set(n.lower() for n in names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+\.png", n) for n in names)
    assert names == figure_names(small_run.records, several_models=True)
    assert "model_A--head_out_.weight.png" in names
    assert "model_B--encoder.layers.1_ff_weight.png" in names
    assert sanitize("a[0,1]") == "a_0_1" and sanitize("..x") == "x" and sanitize("/") == "matrix"
    assert sanitize("_ff.w") == "_ff.w"
    single = figure_names([r for r in small_run.records if r.model == "model A"], False)
    assert "encoder.layers.0.ff.weight.png" in single


def test_write_figures_small_model(small_run, tmp_path):
    out = write_figures(small_run, str(tmp_path), max_matrices=None)
    assert set(out.run) == {"sv_min_hist", "alpha_hist", "depth"}
    for rel in out.run.values():
        check_png(tmp_path / rel)
    drawn = [m for m in out.matrices if m]
    assert len(out.matrices) == len(small_run.records)
    assert len(drawn) == len(small_run.records) - 2  # not the all-zero matrices
    assert out.matrix_notes[[r.name for r in small_run.records].index("dead.weight")] == \
        "nothing to plot (all_zero)"
    for rel in drawn:
        check_png(tmp_path / rel)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    linked = set(re.findall(r'src="([^"]+)"', page))
    assert linked == set(out.run.values()) | set(drawn)
    assert all((tmp_path / rel).is_file() for rel in linked)
    assert page.count("<tr><td>") == len(small_run.records)
    assert "log10 sv_min &lt; -8" in page  # the aggregate in the summary

    # the cap and the name filter
    capped = write_figures(small_run, str(tmp_path / "capped"), max_matrices=2)
    assert sum(m is not None for m in capped.matrices) == 2
    assert capped.matrix_notes[-1] == "beyond --plot-max 2"
    matched = write_figures(small_run, str(tmp_path / "m"), match=[r"^model A:.*proj"])
    assert [r.name for r, m in zip(small_run.records, matched.matrices) if m] == \
        ["encoder.layers.2.proj.weight"]


def test_cli_plot_dir(tmp_path, capsys):
    safetensors = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "m.safetensors"
    safetensors.save_file({k: np.ascontiguousarray(v, dtype=np.float32)
                           for k, v in small_model(2).items()}, str(path))
    rc = main([str(path), "--min-q", "1", "--plot-dir", str(tmp_path / "plots"),
               "--plot-max", "1", "--no-progress"])
    assert rc == 0
    assert "log10 sv_min < -8" in capsys.readouterr().out
    pngs = sorted(p.name for p in (tmp_path / "plots" / "matrices").iterdir())
    assert pngs == ["encoder.layers.0.ff.weight.png"]
    assert (tmp_path / "plots" / "index.html").is_file()


def test_minilm_figures(tmp_path, minilm_path):
    result = analyze(str(minilm_path), keep_spectra=True, match=[r"layer\.[05]\."])
    assert len(result.records) == 4 and all(r.alpha is not None for r in result.records)
    out = write_figures(result, str(tmp_path), max_matrices=2)
    for rel in list(out.run.values()) + [m for m in out.matrices if m]:
        check_png(tmp_path / rel, min_colors=20)
    assert out.matrices[:2] == ["matrices/encoder.layer.0.intermediate.dense.weight.png",
                                "matrices/encoder.layer.0.output.dense.weight.png"]
    assert out.matrices[2:] == [None, None]
    drawn = esd_figure(result.records[0], result.spectra[0])
    assert drawn.counts["linear"].sum() == 384
    assert drawn.extra["n_tail"] == result.records[0].num_tail


def test_unusable_plot_dir_fails_before_any_output(tmp_path, capsys):
    """An unusable --plot-dir is one error line and exit 2 before anything is analyzed or
    printed (no report followed by a failure)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    archive = Path(__file__).resolve().parents[1] / "fixtures" / "archives" / "tagger_lstm.tar.gz"
    code = main([str(archive), "--plot-dir", str(blocker / "figs")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.strip().startswith("allennlp-analyze: error: cannot create --plot-dir")
    assert len(err.strip().splitlines()) == 1


def test_minilm_figure_overlays_the_randomized_esd(tmp_path, minilm_path):
    result = analyze(str(minilm_path), keep_spectra=True, randomize=True,
                     match=[r"layer\.0\.output\."])
    (rec,), (sv,), (rand_sv,) = result.records, result.spectra, result.rand_spectra
    assert rand_sv.size == rec.M and rand_sv[0] == rec.rand_sv_max
    drawn = esd_figure(rec, sv, rand_sv=rand_sv)
    lin, log, _ = drawn.figure.axes
    rand_lam = rand_sv ** 2
    assert np.array_equal(drawn.counts["rand_linear"], np.histogram(rand_lam, drawn.edges)[0])
    assert drawn.counts["rand_linear"].sum() == rec.M          # the edges cover both ESDs
    assert drawn.counts["rand_log"].sum() == np.count_nonzero(rand_lam > 0)
    assert len(steps(lin)) == len(steps(log)) == 2
    assert any(np.allclose(line.get_xdata(), rec.lambda_plus) for line in lin.get_lines())
    labels = " ".join(t.get_text() for t in lin.get_legend().get_texts())
    assert f"{rec.num_spikes} spike(s)" in labels and f"{rec.num_traps} trap(s)" in labels
    out = write_figures(result, str(tmp_path))
    check_png(tmp_path / out.matrices[0], min_colors=20)
    page = (tmp_path / "index.html").read_text()
    assert "<th>traps</th>" in page and "correlation traps" in page
