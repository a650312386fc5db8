"""What reading a GGUF costs next to the spectrum: dequantization plus the quantization noise,
and a whole TinyLlama-shaped model as GGUF against the same model in bf16 safetensors.

    .venv/bin/python benchmarks/gguf_cost.py [--rounds 3] [--no-model] [--cache .cache/bench]

One thread throughout (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS = 1 before numpy is imported;
the model runs with ``workers=1``), CPU seconds (``time.process_time``) so that other jobs on a
shared machine matter less, best of ``--rounds`` interleaved rounds, every ratio measured side
by side in one run.

1. Per matrix, Gaussian weights in Q8_0 (``gguf.quants.quantize``) and Q4_K (``tests/kquants.py``:
   the ``gguf`` package has no K-quantizer), 5632 x 2048 (tall: row blocks), 2048 x 5632
   (wide: column blocks) and 2048 x 2048: the time to decode every row block of the oriented
   matrix with its steps (and worst cases) and feed the noise accumulator, against
   :func:`~allennlp_analyze.spectrum.singular_values` of a float64 Gaussian matrix of the same
   shape (the Gram path, which trained weights take).
2. The model: TinyLlama-1.1B's shapes, 2 layers (``make_llama.py``, bf16 safetensors shards),
   and the same weights as a GGUF in a Q4_K_M-style mix (Q6_K for attn_v, ffn_down and output,
   Q4_K for the other matrices, F32 norms; quantized by ``tests/kquants.py``, the exact block
   layouts with range-based scales), ``analyze()`` of each with the default options.
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # kquants.py
import gguf  # noqa: E402

from allennlp_analyze import analyze  # noqa: E402
from allennlp_analyze.noise_floor import QuantizationNoiseAccumulator  # noqa: E402
from allennlp_analyze.quantized import QuantizedView  # noqa: E402
from allennlp_analyze.sources.gguf_file import GGUFMatrix  # noqa: E402
from allennlp_analyze.spectrum import BLOCK_ROWS, singular_values  # noqa: E402

T = gguf.GGMLQuantizationType
def stored(rng, qtype: str, rows: int, cols: int) -> np.ndarray:
    """Gaussian weights (std 0.02) quantized to ``qtype`` (rows x bytes)."""
    from kquants import quantize_q4_k

    W = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    if qtype == "Q8_0":
        return gguf.quants.quantize(W, T.Q8_0)
    return quantize_q4_k(W)[0]


def decode_and_noise(matrix: GGUFMatrix) -> float:
    """CPU seconds to decode every row block of the oriented matrix and accumulate its noise
    (what the analysis does on top of the spectrum)."""
    view = QuantizedView(matrix)
    if view.shape[0] < view.shape[1]:
        view = view.T
    start = time.process_time()
    acc = QuantizationNoiseAccumulator(view.shape[1], matrix.bound_reason)
    for a in range(0, view.shape[0], BLOCK_ROWS):
        part = view[a:a + BLOCK_ROWS].decode()
        np.ascontiguousarray(part.values)  # the spectrum's float64 copy of the block
        acc.update(part)
    acc.result()
    return time.process_time() - start


def spectral(W: np.ndarray) -> float:
    start = time.process_time()
    singular_values(W, 0.0)
    return time.process_time() - start


def per_matrix(rounds: int) -> None:
    rng = np.random.default_rng(0)
    shapes = ((5632, 2048), (2048, 5632), (2048, 2048))
    # the spectrum of a Gaussian matrix of each shape (the Gram path, as trained weights take)
    dense = {shape: rng.standard_normal(shape) * 0.02 for shape in shapes}
    cases = [(qtype, shape, GGUFMatrix(stored(rng, qtype, *shape), int(T[qtype]), shape[1],
                                       None, None))
             for qtype in ("Q4_K", "Q8_0") for shape in shapes]
    decoding = {(q, shape): np.inf for q, shape, _ in cases}
    spectra = {shape: np.inf for shape in shapes}
    for _ in range(rounds):
        for qtype, shape, m in cases:
            decoding[qtype, shape] = min(decoding[qtype, shape], decode_and_noise(m))
        for shape, W in dense.items():
            spectra[shape] = min(spectra[shape], spectral(W))
    print("per matrix, one thread, CPU s (best of %d): dequant+noise, spectrum of a Gaussian "
          "matrix of the shape, ratio" % rounds)
    for (qtype, shape), t in decoding.items():
        print(f"  {qtype} {shape[0]:5d} x {shape[1]:5d} {t:8.3f} {spectra[shape]:9.3f} "
              f"{t / spectra[shape]:7.3f}")


def gguf_model(path: Path, checkpoint: Path) -> Path:
    """The bf16 checkpoint's weights as a Q4_K_M-style GGUF (module docstring), once."""
    if path.exists():
        return path
    from kquants import quantize_q4_k, quantize_q6_k

    from allennlp_analyze.sources import open_source

    source = open_source(str(checkpoint / "model.safetensors.index.json"))
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, 2)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_head_count(32)
    w.add_head_count_kv(4)
    w.add_context_length(2048)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    for t in source.tensors():
        name = names.get_name(t.name, try_suffixes=(".weight",))
        W = np.asarray(source.load(t.name), dtype=np.float32)
        if W.ndim < 2:
            w.add_tensor(name, W)
            continue
        six = name.startswith("output") or "attn_v" in name or "ffn_down" in name
        raw, _ = (quantize_q6_k if six else quantize_q4_k)(W)
        w.add_tensor(name, raw, raw_dtype=T.Q6_K if six else T.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def model(cache: Path, rounds: int) -> None:
    from make_llama import make

    bf16 = make(cache / "tinyllama-2l")
    q4km = gguf_model(cache / "tinyllama-2l-q4_k_m.gguf", bf16)
    best = {"bf16 safetensors": np.inf, "GGUF Q4_K_M mix": np.inf}
    n = {}
    for _ in range(rounds):
        for label, src in (("bf16 safetensors", str(bf16)), ("GGUF Q4_K_M mix", str(q4km))):
            start = time.process_time()
            result = analyze(src, workers=1)
            best[label] = min(best[label], time.process_time() - start)
            n[label] = len(result.records)
    print("TinyLlama-shaped, 2 layers, default options, workers=1, CPU s (best of %d):" % rounds)
    for label, t in best.items():
        print(f"  {label:18s} {t:8.2f}  ({n[label]} matrices)")
    print(f"  ratio GGUF / bf16: {best['GGUF Q4_K_M mix'] / best['bf16 safetensors']:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--cache", type=Path,
                        default=Path(__file__).resolve().parents[1] / ".cache" / "bench")
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}")
    per_matrix(args.rounds)
    if not args.no_model:
        args.cache.mkdir(parents=True, exist_ok=True)
        model(args.cache, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
