"""Peak memory of ``allennlp-analyze`` on a synthetic multi-GB sharded safetensors checkpoint.

    python benchmarks/memory.py [--gb 1.2] [--workers 0]

Writes a sharded checkpoint (float32, several tall matrices plus smaller ones, split over three
shards with an index) into a temporary folder, runs the command on it in a fresh process and
reports that process's peak RSS against the interpreter's baseline (a process importing the same
modules and doing nothing) and against the largest tensor's float64 size. Also used by
``benchmarks/run.py``.
"""
import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_shard(path: Path, tensors: dict) -> None:
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


def make_checkpoint(folder: Path, gb: float = 1.2, seed: int = 0) -> dict:
    """Tall float32 matrices (the largest 32768 x 1024), about ``gb`` GB in all, in 3 shards.
    Returns sizes: total bytes, largest tensor's float64 bytes, tensor count."""
    rng = np.random.default_rng(seed)
    big, small = (32768, 1024), (8192, 1024)
    n_big = max(1, int(gb * 0.65e9 // (big[0] * big[1] * 4)))
    n_small = max(1, int((gb * 1e9 - n_big * big[0] * big[1] * 4) // (small[0] * small[1] * 4)))
    names = [(f"layers.{i}.big.weight", big) for i in range(n_big)] + \
            [(f"layers.{i}.small.weight", small) for i in range(n_small)]
    weight_map, total = {}, 0
    shards = [names[k::3] for k in range(3)]
    for k, part in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-00003.safetensors"
        tensors = {}
        for name, shape in part:
            tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
            total += tensors[name].nbytes
        write_shard(folder / fname, tensors)
        weight_map.update({name: fname for name, _ in part})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"bytes": total, "largest_f64": big[0] * big[1] * 8, "tensors": len(names)}


#: Runs in the measured process: the interpreter's baseline is its RSS after the imports, the
#: peak its VmHWM at exit (the kernel's high-water mark of this process image, unlike
#: ru_maxrss, which keeps the parent's pre-exec peak).
_CHILD = """
import sys, time
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
import numpy, allennlp_analyze.cli
base = status("VmRSS")
t0 = time.perf_counter()
rc = allennlp_analyze.cli.main(sys.argv[1:])
print("MEM", base, status("VmHWM"), time.perf_counter() - t0, file=sys.stderr)
sys.exit(rc)
"""


def run_measured(python: str, args) -> dict:
    """Baseline RSS, peak RSS and seconds of ``allennlp-analyze ARGS`` in a fresh process."""
    proc = subprocess.run([python, "-c", _CHILD, *map(str, args)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise RuntimeError(f"allennlp-analyze {args} failed ({proc.returncode}): {proc.stderr}")
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("MEM ")][-1]
    base, peak, seconds = line.split()[1:]
    return {"baseline_rss": int(base), "peak_rss": int(peak), "seconds": float(seconds)}


def measure(gb: float = 1.2, workers: int = 0, python: str = sys.executable) -> dict:
    with tempfile.TemporaryDirectory(prefix="aa-mem-") as tmp:
        folder = Path(tmp)
        sizes = make_checkpoint(folder, gb)
        r = run_measured(python, [folder, "--format", "csv", "--no-progress",
                                  "--workers", workers])
    return {**sizes, **r, "ratio": (r["peak_rss"] - r["baseline_rss"]) / sizes["largest_f64"],
            "workers": workers}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.2)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    r = measure(args.gb, args.workers)
    mb = 1024 * 1024
    print(f"checkpoint {r['bytes'] / 1e9:.2f} GB in {r['tensors']} float32 tensors (3 shards); "
          f"largest tensor in float64 {r['largest_f64'] / mb:.0f} MiB")
    print(f"workers={r['workers']}: peak RSS {r['peak_rss'] / mb:.0f} MiB, interpreter baseline "
          f"{r['baseline_rss'] / mb:.0f} MiB, above baseline {(r['peak_rss'] - r['baseline_rss']) / mb:.0f} MiB "
          f"= {r['ratio']:.2f}x the largest tensor in float64; {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
