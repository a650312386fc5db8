"""What the noise floor costs next to the spectrum it accompanies, per matrix, side by side.

    .venv/bin/python benchmarks/noise_floor_cost.py [--rounds 5]

For MiniLM's twelve 1536 x 384 float32 matrices (the real model) and four random 3072 x 768
ones (BERT-base's feed-forward shape), in one thread (OPENBLAS_NUM_THREADS=1 is set before numpy
is imported): the CPU time of :func:`allennlp_analyze.noise_floor.storage_noise` (ulp of every
entry, row and column sums) and of :func:`allennlp_analyze.spectrum.singular_values` (Gram path
or SVD, as the analysis runs it), interleaved in ``--rounds`` rounds, best of each; prints both
and their ratio. CPU time (``time.process_time``), not wall time, so that other jobs on the
machine matter less.
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from allennlp_analyze.noise_floor import storage_noise  # noqa: E402
from allennlp_analyze.sources.safetensors_file import SafetensorsSource  # noqa: E402
from allennlp_analyze.spectrum import singular_values  # noqa: E402
from run import minilm_path  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    sets = []
    path = minilm_path()
    if path is not None:
        src = SafetensorsSource(path)
        sets.append(("MiniLM 1536 x 384 (real)",
                     [src.load(f"encoder.layer.{i}.{p}.dense.weight")
                      for i in range(6) for p in ("intermediate", "output")]))
    rng = np.random.default_rng(0)
    sets.append(("random 3072 x 768",
                 [(rng.standard_normal((3072, 768)) * 0.02).astype(np.float32) for _ in range(4)]))
    eps = float(np.finfo(np.float32).eps)
    for label, mats in sets:
        noise, spectrum = [], []
        for _ in range(args.rounds):
            t = time.process_time()
            for W in mats:
                storage_noise(W, "float32")
            noise.append((time.process_time() - t) / len(mats))
            t = time.process_time()
            for W in mats:
                singular_values(W, eps)
            spectrum.append((time.process_time() - t) / len(mats))
        print(f"{label}: noise floor {1e3 * min(noise):.2f} ms/matrix, spectrum "
              f"{1e3 * min(spectrum):.1f} ms/matrix, ratio {min(noise) / min(spectrum):.3f} "
              f"(best of {args.rounds} interleaved rounds, CPU time, 1 thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
