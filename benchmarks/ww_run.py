"""WeightWatcher's side of the benchmark; runs in its own environment (``.cache/bench-venv``, made
by ``benchmarks/setup_ww.sh``), started by ``benchmarks/run.py``:

    .cache/bench-venv/bin/python benchmarks/ww_run.py MODEL LAYERS.json THREADS OUT.json [REPEAT]
    .cache/bench-venv/bin/python benchmarks/ww_run.py --svd-costs SHAPES.json OUT.json
    .cache/bench-venv/bin/python benchmarks/ww_run.py --fit-times EVALS.npz OUT.json

Builds a torch module holding exactly the given 2-D weights as ``nn.Linear`` layers (the layers
``allennlp-analyze`` analyzes: WeightWatcher cannot open a single safetensors file; MODEL is a
``.safetensors`` file or a folder of shards with ``model.safetensors.index.json``), runs
``WeightWatcher(model).analyze()`` with its defaults and writes, as JSON: the seconds ``analyze()``
took (best of ``REPEAT``; and its best CPU seconds, all threads), the process's RSS before it
and its peak RSS after it, and the
per-layer details (alpha, sv_min, sv_max, matrix rank, ...).

``--svd-costs``: the one-thread seconds of what WeightWatcher runs per matrix,
``scipy.linalg.svd(W.astype(float), compute_uv=False)``, for each ``[N, M]`` in SHAPES.json
(random float64 matrices), and of ``numpy.linalg.qr(W, mode="r")`` (the first step of that SVD
for tall matrices) where a shape is ``[N, M, "qr"]``; for the benchmark's projection.

``--fit-times``: for each eigenvalue array of EVALS.npz, the one-thread seconds and results of
``WeightWatcher.fit_powerlaw(evals, fix_fingers=F, pl_package="powerlaw")`` for F = "xmin_peak"
and "clip_xmax" (the references of ``allennlp_analyze.fits``; ``benchmarks/fit_estimators.py``).
"""
import json
import logging
import os
import resource
import sys
import time


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_weights(path):
    """{name: tensor} of a safetensors file, or of the shards named by a folder's index."""
    from safetensors.torch import load_file

    if os.path.isdir(path):
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(load_file(os.path.join(path, shard)))
        return tensors
    return load_file(path)


def linear_model(path, names):
    """A torch module holding the 2-D tensors ``names`` of the safetensors file (or folder of
    shards) ``path`` as bias-free ``nn.Linear`` layers ``l000``, ``l001``, ... in that order."""
    import torch

    tensors = load_weights(path)
    model = torch.nn.Module()
    for i, name in enumerate(names):
        w = tensors[name].float()
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        model.add_module(f"l{i:03d}", lin)
    return model


def svd_costs(shapes_json, out):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import numpy as np
    import scipy.linalg

    with open(shapes_json) as f:
        shapes = json.load(f)
    rng = np.random.default_rng(0)
    rows = []
    for shape in shapes:
        W = rng.standard_normal(tuple(shape[:2]))
        t0 = time.perf_counter()
        if len(shape) > 2:
            np.linalg.qr(W, mode="r")
        else:
            scipy.linalg.svd(W, compute_uv=False)
        rows.append({"shape": shape, "seconds": time.perf_counter() - t0})
        del W
    with open(out, "w") as f:
        json.dump({"costs": rows, "scipy": scipy.__version__}, f)


def fit_times(npz, out):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    logging.disable(logging.WARNING)
    import numpy as np
    import weightwatcher as ww

    watcher = ww.WeightWatcher()
    rows = []
    with np.load(npz) as z:
        for key in z.files:
            evals = np.sort(z[key])
            for mode in ("xmin_peak", "clip_xmax"):
                t0 = time.perf_counter()
                r = watcher.fit_powerlaw(evals, plot=False, fix_fingers=mode,
                                         pl_package="powerlaw")
                rows.append({"key": key, "mode": mode, "seconds": time.perf_counter() - t0,
                             "alpha": float(r[0]), "num_fingers": int(r[7])})
    with open(out, "w") as f:
        json.dump({"fits": rows, "weightwatcher": ww.__version__}, f)


def main():
    if sys.argv[1] == "--svd-costs":
        return svd_costs(*sys.argv[2:4])
    if sys.argv[1] == "--fit-times":
        return fit_times(*sys.argv[2:4])
    path, layers_json, threads, out = sys.argv[1:5]
    repeat = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads
    import torch

    torch.set_num_threads(int(threads))
    logging.disable(logging.WARNING)
    import weightwatcher as ww

    with open(layers_json) as f:
        names = json.load(f)
    model = linear_model(path, names)
    base = rss_bytes()
    best, best_cpu, details = float("inf"), float("inf"), None
    for _ in range(repeat):
        watcher = ww.WeightWatcher(model=model)
        t0, c0 = time.perf_counter(), time.process_time()
        details = watcher.analyze()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = []
    for _, r in details.iterrows():
        idx = int(str(r["name"])[1:]) if str(r["name"]).startswith("l") else None
        rows.append({"name": names[idx] if idx is not None else str(r["name"]),
                     **{k: (None if v != v else float(v)) for k, v in r.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}})
    with open(out, "w") as f:
        json.dump({"seconds": best, "cpu_seconds": best_cpu, "rss_before": base, "peak_rss": peak,
                   "layers": rows, "weightwatcher": ww.__version__, "torch": torch.__version__,
                   "threads": int(threads)}, f)


if __name__ == "__main__":
    main()
