"""WeightWatcher's side of the benchmark; runs in its own environment (``.cache/bench-venv``, made
by ``benchmarks/setup_ww.sh``), started by ``benchmarks/run.py``:

    .cache/bench-venv/bin/python benchmarks/ww_run.py MODEL.safetensors LAYERS.json THREADS OUT.json

Builds a torch module holding exactly the given 2-D weights as ``nn.Linear`` layers (the layers
``allennlp-analyze`` analyzes: WeightWatcher cannot open a single safetensors file), runs
``WeightWatcher(model).analyze()`` with its defaults and writes, as JSON: the seconds ``analyze()``
took (best of ``--repeat``), the process's RSS before it and its peak RSS after it, and the
per-layer details (alpha, sv_min, sv_max, matrix rank, ...).
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


def linear_model(path, names):
    """A torch module holding the 2-D tensors ``names`` of the safetensors file ``path`` as
    bias-free ``nn.Linear`` layers ``l000``, ``l001``, ... in that order."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(path)
    model = torch.nn.Module()
    for i, name in enumerate(names):
        w = tensors[name].float()
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        model.add_module(f"l{i:03d}", lin)
    return model


def main():
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
    best, details = float("inf"), None
    for _ in range(repeat):
        watcher = ww.WeightWatcher(model=model)
        t0 = time.perf_counter()
        details = watcher.analyze()
        best = min(best, time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = []
    for _, r in details.iterrows():
        idx = int(str(r["name"])[1:]) if str(r["name"]).startswith("l") else None
        rows.append({"name": names[idx] if idx is not None else str(r["name"]),
                     **{k: (None if v != v else float(v)) for k, v in r.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}})
    with open(out, "w") as f:
        json.dump({"seconds": best, "rss_before": base, "peak_rss": peak, "layers": rows,
                   "weightwatcher": ww.__version__, "torch": torch.__version__,
                   "threads": int(threads)}, f)


if __name__ == "__main__":
    main()
