"""What a LoRA adapter and ``--base`` cost, side by side in one run (issue 24).

1. A Llama-2-7B-shaped PEFT adapter (hidden 4096, MLP 11008, 32 layers; r = 16 on q, k, v, o,
   gate, up, down: 224 modules; random float32 B and A, written as ``adapter_config.json`` +
   ``adapter_model.safetensors``) analyzed by the tool (the exact r singular values of each
   s·B·A from thin QR factors, :mod:`allennlp_analyze.sources.lora`), against numpy's dense
   SVD of B·A (``np.linalg.svd(compute_uv=False)``, float64): the dense SVD is timed on one
   4096 x 4096 and one 11008 x 4096 product (``--dense`` of each) and extrapolated to the 224
   modules (128 square, 96 rectangular), as stated in the output.
2. ``--base`` on the TinyLlama-shaped checkpoint (``benchmarks/make_llama.py``, 2 layers,
   bfloat16, ``--min-q 1``: 15 matrices) against a copy moved by a rank-4 change of every
   matrix, against analyzing that one model alone; and the floor of any exact comparison on
   these shapes: two analyses plus the kernels it cannot skip (:func:`kernel_floor`).

    python benchmarks/lora_cost.py WORK_DIR [--threads 1] [--dense 1]

``--threads``: the analysis's workers, each with one BLAS thread (threadpoolctl), and the BLAS
threads of the dense SVD. Times are wall-clock seconds of one run each (no repetition).
"""
import argparse
import json
import os
import time
from pathlib import Path

LLAMA2_7B = dict(hidden=4096, mlp=11008, layers=32)
MODULES = {"self_attn.q_proj": "hh", "self_attn.k_proj": "hh", "self_attn.v_proj": "hh",
           "self_attn.o_proj": "hh", "mlp.gate_proj": "mh", "mlp.up_proj": "mh",
           "mlp.down_proj": "hm"}


def make_adapter(folder: Path, r: int = 16, seed: int = 0) -> Path:
    """A Llama-2-7B-shaped LoRA adapter with random factors (about 160 MB of float32)."""
    import numpy as np
    from safetensors.numpy import save_file

    if (folder / "adapter_model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    size = {"h": LLAMA2_7B["hidden"], "m": LLAMA2_7B["mlp"]}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(LLAMA2_7B["layers"]):
        for module, (out, inp) in MODULES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((r, size[inp]),
                                                                 dtype=np.float32) * 0.01
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((size[out], r),
                                                                 dtype=np.float32) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
         "target_modules": [m.split(".")[1] for m in MODULES]}))
    return folder


def moved_copy(base: Path, out: Path, rank: int = 4) -> Path:
    """``base`` with every 2-D tensor moved by a small rank-``rank`` change (bfloat16 kept)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    state = {}
    for shard in sorted(base.glob("*.safetensors")):
        for k, v in load_file(str(shard)).items():
            if v.ndim == 2:
                u = torch.from_numpy(rng.standard_normal((v.shape[0], rank)) * 1e-2)
                w = torch.from_numpy(rng.standard_normal((rank, v.shape[1])) * 1e-2)
                v = (v.double() + u @ w).to(v.dtype)
            state[k] = v.contiguous()
    save_file(state, str(out / "model.safetensors"))
    return out


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense", type=int, default=1,
                    help="dense SVDs timed per shape (square, rectangular)")
    ap.add_argument("--parts", default="lora,base",
                    help="which halves to run (comma-separated: lora, base)")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    out = {"threads": args.threads}
    if "lora" in args.parts:
        lora_half(args, out)
    if "base" in args.parts:
        base_half(args, out)
    print(json.dumps(out, indent=1))


def lora_half(args, out: dict) -> None:
    import numpy as np
    from threadpoolctl import threadpool_limits

    from allennlp_analyze import analyze
    from allennlp_analyze.sources.lora import LoraAdapter

    adapter = make_adapter(args.work / "llama2_7b_lora_r16")
    t_lora, result = timed(lambda: analyze(str(adapter), workers=args.threads))
    modules = [r for r in result.records if r.lora_r is not None]
    out["lora_modules"] = len(modules)
    out["lora_seconds"] = round(t_lora, 3)
    src = LoraAdapter(adapter)
    by_shape = {}
    for m in src.modules:
        by_shape.setdefault(m.shape, []).append(m)
    dense = {}
    with threadpool_limits(args.threads):
        for shape, ms in sorted(by_shape.items()):
            times = []
            for m in ms[:args.dense]:
                B, A = src.factors(m)
                D = m.scale * (B @ A)
                t, _ = timed(lambda D=D: np.linalg.svd(D, compute_uv=False))
                times.append(t)
            dense[f"{shape[0]}x{shape[1]}"] = {"modules": len(ms), "timed": len(times),
                                               "seconds_each": round(float(np.mean(times)), 3)}
    out["dense_svd"] = dense
    out["dense_extrapolated_seconds"] = round(sum(d["modules"] * d["seconds_each"]
                                                  for d in dense.values()), 1)
    out["dense_over_lora"] = round(out["dense_extrapolated_seconds"] / t_lora, 1)
    print(json.dumps(out), flush=True)  # the adapter's half, in case the rest is cut short


def base_half(args, out: dict) -> None:
    from allennlp_analyze import analyze

    import make_llama

    base = make_llama.make(args.work / "tinyllama_2l")
    moved = moved_copy(base, args.work / "tinyllama_2l_moved")
    t_one, one = timed(lambda: analyze(str(moved), min_q=1.0, workers=args.threads))
    t_base, both = timed(lambda: analyze(str(moved), base=str(base), min_q=1.0,
                                         workers=args.threads))
    out["one_model_seconds"] = round(t_one, 2)
    out["with_base_seconds"] = round(t_base, 2)
    out["base_over_one"] = round(t_base / t_one, 2)
    out["paired"] = both.summary.base.paired
    out["matrices"] = len(one.records)
    floor = kernel_floor(base, moved, [r.name for r in one.records], args.threads)
    out.update(floor)
    out["floor_over_one"] = round((2 * t_one + floor["kernel_seconds"]) / t_one, 2)


def kernel_floor(base: Path, moved: Path, names, threads: int) -> dict:
    """What no exact ``--base`` can skip beyond the two models' own analyses, timed pair by
    pair on the same matrices (float64, read outside the timing): the spectrum of ΔW (the
    tool's Gram path: ``dsyrk`` and the two-stage reduction, ``method="gram"``, no fallback)
    and CKA's cross product W₁ᵀW₂ (``dgemm``). The floor's ratio is (2 x one model + these)
    / one model: the base's analysis is taken to cost what the model's did (same shapes)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from threadpoolctl import threadpool_limits

    from allennlp_analyze.spectrum import singular_values

    def tensors(folder: Path) -> dict:
        out = {}
        for shard in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(shard)))
        return out

    W1s, W2s = tensors(moved), tensors(base)
    t_spectrum = t_cross = 0.0
    with threadpool_limits(threads):
        for name in names:
            W1 = W1s[name].to(torch.float64).numpy()
            W2 = W2s[name].to(torch.float64).numpy()
            D = W1 - W2
            t, _ = timed(lambda: singular_values(D, float(np.finfo(np.float64).eps), 0.0, "gram"))
            t_spectrum += t
            A, B = (W1, W2) if W1.shape[0] >= W1.shape[1] else (W1.T, W2.T)
            t, _ = timed(lambda: np.linalg.norm(A.T @ B))
            t_cross += t
    return {"delta_spectrum_seconds": round(t_spectrum, 2),
            "cka_cross_seconds": round(t_cross, 2),
            "kernel_seconds": round(t_spectrum + t_cross, 2)}



if __name__ == "__main__":
    main()
