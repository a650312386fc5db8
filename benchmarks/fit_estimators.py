"""Cost of the alpha estimators (``--fit``), one run, ratios side by side:

1. the whole model: ``analyze()`` of the random-init BERT-base (``transformers.BertConfig()``,
   its 73 Linear matrices with ``--min-q 1``) with the default ``--fit csn`` and with all eight
   estimators, one worker with single-threaded BLAS, interleaved (``--rounds``, best of each);
2. each estimator against the implementation it reproduces, on the same eigenvalues of
   ``--matrices`` of those matrices (one thread): ``xmin-peak`` and ``clip-xmax`` against
   WeightWatcher 0.7.7's ``fit_powerlaw`` (``pl_package='powerlaw'``, in its own venv,
   ``benchmarks/setup_ww.sh``), ``tpl`` against ``powerlaw`` 1.5's ``Fit(evals)`` +
   ``.truncated_power_law`` + ``distribution_compare`` (ours includes its CSN fit too).

    .venv/bin/python benchmarks/fit_estimators.py [--rounds 3] [--matrices 4] [--no-ww]

Nothing is asserted: the numbers are printed (docs/performance.md records a run).
"""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, WW_PYTHON, bert_base_path, best_of, say, ww_available  # noqa: E402

sys.path.insert(0, str(ROOT))
from allennlp_analyze import analyze  # noqa: E402
from allennlp_analyze.fits import ESTIMATORS, clip_xmax, tpl, xmin_peak  # noqa: E402
from allennlp_analyze.options import AnalysisOptions  # noqa: E402


def whole_model(path: Path, rounds: int) -> None:
    from threadpoolctl import threadpool_limits

    runs = {"--fit csn": AnalysisOptions(min_q=1.0, workers=1),
            "--fit (all 8)": AnalysisOptions(min_q=1.0, workers=1, fit=tuple(ESTIMATORS))}
    best = {k: float("inf") for k in runs}
    count = {}
    with threadpool_limits(1):
        for _ in range(rounds):
            for label, options in runs.items():
                t0 = time.perf_counter()
                result = analyze(str(path), options=options, progress=False)
                best[label] = min(best[label], time.perf_counter() - t0)
                count[label] = len(result.records)
    base = best["--fit csn"]
    say(f"== whole model: random BERT-base, {count['--fit csn']} matrices, 1 worker x 1 BLAS "
        f"thread, best of {rounds} interleaved rounds ==")
    for label, t in best.items():
        say(f"  {label:14s} {t:7.2f} s   {t / base:5.2f} x the default")


def spectra(path: Path, k: int):
    """{name: ascending eigenvalues} of the 73 Linear matrices and the ``k`` used for the
    references (alternating the three shapes)."""
    from safetensors.numpy import load_file

    mats = {n: t for n, t in load_file(str(path)).items()
            if t.ndim == 2 and "embeddings" not in n}
    evals = {n: np.sort(np.linalg.svd(t.astype(np.float64), compute_uv=False) ** 2)
             for n, t in mats.items()}
    by_shape = {}
    for n, t in mats.items():
        by_shape.setdefault(t.shape, []).append(n)
    chosen = []
    while len(chosen) < min(k, len(mats)):
        for names in by_shape.values():
            if len(chosen) < k and names:
                chosen.append(names.pop(0))
    return evals, chosen


def ours(fn, evals):
    return best_of(lambda: fn(evals), 3)


def powerlaw_tpl(evals):
    import powerlaw

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        fit = powerlaw.Fit(evals[evals > 0], verbose=False)
        alpha = fit.truncated_power_law.alpha
        fit.distribution_compare("power_law", "truncated_power_law")
        return time.perf_counter() - t0, alpha


def ww_fit_times(evals, names):
    with tempfile.TemporaryDirectory() as tmp:
        npz, out = Path(tmp) / "evals.npz", Path(tmp) / "out.json"
        np.savez(npz, **{f"m{i}": evals[n] for i, n in enumerate(names)})
        proc = subprocess.run([str(WW_PYTHON), str(ROOT / "benchmarks" / "ww_run.py"),
                               "--fit-times", str(npz), str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1:])
        rows = json.loads(out.read_text())["fits"]
    return {(names[int(r["key"][1:])], r["mode"]): r for r in rows}


def references(evals, names, with_ww: bool) -> None:
    from threadpoolctl import threadpool_limits

    say(f"== each estimator vs its reference, same eigenvalues, 1 thread, {len(names)} matrices "
        f"({', '.join(str(len(evals[n])) for n in names)} eigenvalues) ==")
    with threadpool_limits(1):
        mine = {e: [ours(fn, evals[n]) for n in names]
                for e, fn in (("xmin-peak", xmin_peak), ("clip-xmax", clip_xmax), ("tpl", tpl))}
        all_ours = {e: sum(ours(fn, evals[n]) for n in evals) for e, fn in ESTIMATORS.items()}
        ref_tpl = [powerlaw_tpl(evals[n]) for n in names]
    say("  ours, all 73 matrices: " + ", ".join(f"{e} {t * 1e3:.0f} ms"
                                               for e, t in all_ours.items()))
    rows = [("tpl", "powerlaw 1.5", [t for t, _ in ref_tpl], mine["tpl"],
             [abs(tpl(evals[n]).alpha - a) for n, (_, a) in zip(names, ref_tpl)])]
    if with_ww:
        ww = ww_fit_times(evals, names)
        for est, mode in (("xmin-peak", "xmin_peak"), ("clip-xmax", "clip_xmax")):
            fn = xmin_peak if est == "xmin-peak" else clip_xmax
            rows.append((est, "WeightWatcher 0.7.7", [ww[(n, mode)]["seconds"] for n in names],
                         mine[est], [abs(fn(evals[n]).alpha - ww[(n, mode)]["alpha"])
                                     for n in names]))
    for est, ref_name, ref, mine_t, diff in rows:
        say(f"  {est:10s} ours {sum(mine_t) * 1e3:8.1f} ms   {ref_name} {sum(ref) * 1e3:9.1f} ms"
            f"   {sum(ref) / sum(mine_t):7.1f}x faster (per matrix "
            f"{min(r / m for r, m in zip(ref, mine_t)):.0f}-"
            f"{max(r / m for r, m in zip(ref, mine_t)):.0f}x); max |alpha diff| {max(diff):.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--matrices", type=int, default=4)
    ap.add_argument("--no-ww", action="store_true")
    args = ap.parse_args()
    path = bert_base_path()
    whole_model(path, args.rounds)
    evals, names = spectra(path, args.matrices)
    references(evals, names, not args.no_ww and ww_available())


if __name__ == "__main__":
    main()
