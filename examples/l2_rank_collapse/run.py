#!/usr/bin/env python
"""Over-regularization causes rank collapse: train an L2 sweep with ``allennlp train``, collect
the ``weight_analysis`` callback's records into one CSV, and draw the figures.

    python examples/l2_rank_collapse/run.py --quick --out /tmp/l2q    # 3 strengths, 10 epochs
    python examples/l2_rank_collapse/run.py --out /tmp/l2full         # 10 strengths, 30 epochs

Every run uses ``config.jsonnet`` (a 64-384-192-10 MLP on scikit-learn's digits, SGD, fixed
seeds) with only the L2 strength on ``fc1.weight`` (and, in quick mode, the epoch count)
overridden; each is one ``<python> -m allennlp train`` process with this example and
``allennlp_analyze.plugin`` included. Output under ``--out``:

    runs/l2_<strength>/          each run's serialization directory (weights, metrics, JSONL)
    logs/l2_<strength>.log       each run's stdout/stderr
    l2_sweep.csv                 l2, epoch, layer, lambda_min, sv_min, sv_max, rank_loose,
                                 rank_numpy, alpha, frobenius_norm, accuracy
    figures/*.png                lambda_min vs L2 (+ accuracy, rank), lambda_min vs epoch, FC1 ESD
    summary.json                 the final epoch per strength, and the timings
"""
import argparse
import csv
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "config.jsonnet")

#: The sweeps. Same seeds, data order and initialisation in every run: only the penalty differs.
FULL_L2 = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
FULL_EPOCHS = 30
QUICK_L2 = (0.0, 1e-2, 1e-1)
QUICK_EPOCHS = 10

#: File the weight_analysis callback writes in each serialization directory.
JSONL_NAME = "weight_analysis.jsonl"
PLUGIN_PACKAGE = "allennlp_analyze.plugin"

CSV_COLUMNS = ("l2", "epoch", "layer", "lambda_min", "sv_min", "sv_max", "rank_loose",
               "rank_numpy", "alpha", "frobenius_norm", "accuracy")
LAYERS = ("fc1", "fc2", "fc3")


def run_name(l2: float) -> str:
    return f"l2_{l2:g}"


def allennlp_command() -> List[str]:
    """``allennlp`` of the running interpreter: ``<python> -m allennlp``."""
    return [sys.executable, "-m", "allennlp"]


def train_command(l2: float, epochs: int, serialization_dir: str, every: int) -> List[str]:
    overrides = {
        "model.regularizer.regexes.0.1.alpha": l2,
        "trainer.num_epochs": epochs,
        "trainer.callbacks.0.every": every,
    }
    return allennlp_command() + [
        "train", CONFIG, "-s", serialization_dir,
        "--include-package", "l2_rank_collapse", "--include-package", PLUGIN_PACKAGE,
        "-o", json.dumps(overrides),
    ]


def train_env() -> Dict[str, str]:
    env = dict(os.environ)
    examples = os.path.dirname(HERE)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (examples, env.get("PYTHONPATH")) if p)
    # One thread per run: the runs go in parallel (--jobs), and results do not depend on it.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    return env


def train_sweep(l2s: Sequence[float], epochs: int, out: str, jobs: int, every: int,
                quiet: bool = False) -> Dict[str, float]:
    """Train one run per strength (``jobs`` at a time); return each run's wall time (s).
    Existing run directories are replaced. Raises ``RuntimeError`` if a run fails."""
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    pending = list(l2s)
    running: Dict[float, tuple] = {}
    times: Dict[str, float] = {}
    failed: List[str] = []
    env = train_env()
    while pending or running:
        while pending and len(running) < jobs:
            l2 = pending.pop(0)
            sdir = os.path.join(out, "runs", run_name(l2))
            shutil.rmtree(sdir, ignore_errors=True)
            log_path = os.path.join(out, "logs", run_name(l2) + ".log")
            log = open(log_path, "w")
            proc = subprocess.Popen(train_command(l2, epochs, sdir, every), env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            running[l2] = (proc, log, log_path, time.time())
        time.sleep(0.2)
        for l2, (proc, log, log_path, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[l2]
            times[run_name(l2)] = round(time.time() - t0, 1)
            if proc.returncode != 0:
                failed.append(f"{run_name(l2)} (exit {proc.returncode}, see {log_path})")
            elif not quiet:
                print(f"  trained {run_name(l2):10s} in {times[run_name(l2)]:5.1f} s", flush=True)
    if failed:
        raise RuntimeError("allennlp train failed: " + "; ".join(failed))
    return times


def layer_of(name: str) -> Optional[str]:
    """``fc1`` for a parameter name like ``fc1.weight`` (None for anything else)."""
    m = re.search(r"(?:^|\.)(fc\d)\.weight$", name)
    return m.group(1) if m else None


def read_jsonl(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def collect_run(sdir: str, l2: float) -> List[dict]:
    """CSV rows of one run: the callback's records per epoch and layer, with that epoch's
    validation accuracy from ``metrics_epoch_N.json``. The callback's end-of-training record
    (``"final": true``, written when AllenNLP reloads the best epoch's weights at the end) is
    left out: its ``epoch`` is the last epoch but its weights are the best epoch's, whose own
    per-epoch record is already there."""
    path = os.path.join(sdir, JSONL_NAME)
    if not os.path.exists(path):
        raise RuntimeError(f"no {JSONL_NAME} in {sdir}: was the weight_analysis callback run?")
    accuracy: Dict[int, float] = {}
    for mpath in glob.glob(os.path.join(sdir, "metrics_epoch_*.json")):
        epoch = int(re.search(r"metrics_epoch_(\d+)\.json$", mpath).group(1))
        with open(mpath) as f:
            accuracy[epoch] = json.load(f)["validation_accuracy"]
    rows: Dict[tuple, dict] = {}
    for rec in read_jsonl(path):
        if rec.get("final"):
            continue
        layer = layer_of(rec["name"])
        epoch = rec.get("epoch")
        if layer is None or epoch is None or (epoch, layer) in rows or epoch not in accuracy:
            continue
        sv_min = rec["sv_min"]
        frob = None if rec.get("log_norm") is None else math.sqrt(10.0 ** rec["log_norm"])
        rows[(epoch, layer)] = {
            "l2": l2, "epoch": epoch, "layer": layer,
            "lambda_min": None if sv_min is None else sv_min ** 2,
            "sv_min": sv_min, "sv_max": rec["sv_max"],
            "rank_loose": rec["rank_loose"], "rank_numpy": rec["rank_numpy"],
            "alpha": rec.get("alpha"), "frobenius_norm": frob,
            "accuracy": accuracy[epoch],
        }
    return [rows[k] for k in sorted(rows)]


def collect(out: str, l2s: Sequence[float]) -> List[dict]:
    rows: List[dict] = []
    for l2 in sorted(l2s):
        rows.extend(collect_run(os.path.join(out, "runs", run_name(l2)), l2))
    return rows


def write_csv(rows: List[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in CSV_COLUMNS})


def read_csv(path: str) -> List[dict]:
    """The sweep CSV back as typed rows (empty cells as None)."""
    ints = {"epoch", "rank_loose", "rank_numpy"}
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (None if v == "" else v if k == "layer"
                             else int(v) if k in ints else float(v)) for k, v in r.items()})
    return rows


def final_weights_path(sdir: str) -> str:
    """The last epoch's model-state checkpoint (``model_state_e<N>_b0.th``, N = epochs)."""
    paths = glob.glob(os.path.join(sdir, "model_state_e*_b0.th"))
    if not paths:
        raise RuntimeError(f"no model_state checkpoint in {sdir}")
    return max(paths, key=lambda p: int(re.search(r"_e(\d+)_b0\.th$", p).group(1)))


def eigenvalues(weights_path: str, param: str) -> "numpy.ndarray":  # noqa: F821
    """Eigenvalues of X = W^T W (ascending): squared singular values, float64 SVD."""
    import numpy as np
    import torch
    W = torch.load(weights_path, map_location="cpu", weights_only=True)[param]
    return np.linalg.svd(W.double().numpy(), compute_uv=False)[::-1] ** 2


def final_rows(rows: List[dict]) -> List[dict]:
    last = {}
    for r in rows:
        last[r["l2"]] = max(last.get(r["l2"], -1), r["epoch"])
    return [r for r in rows if r["epoch"] == last[r["l2"]]]


# ----------------------------------------------------------------------------------- figures

def svd_floor(sv_max: float) -> float:
    """Eigenvalue below which a float64 SVD cannot tell a singular value from 0:
    ``(eps64 * sv_max)**2`` (its absolute error per singular value is about eps64 * sv_max).
    Smaller lambda_min values in the CSV are what LAPACK returned: zero to working precision."""
    return (2.220446049250313e-16 * sv_max) ** 2


def _l2_positions(l2s: Sequence[float]):
    """x positions on a log axis, with L2 = 0 put one decade left of the smallest strength."""
    nonzero = [v for v in l2s if v > 0]
    zero_at = min(nonzero) / 10 if nonzero else 1e-4
    return (lambda v: v if v > 0 else zero_at), zero_at


def _l2_axis(ax, l2s, zero_at):
    import matplotlib.ticker as mticker
    ax.set_xscale("log")
    ticks = sorted(set([zero_at] + [10.0 ** k for k in range(
        int(math.floor(math.log10(min(v for v in l2s if v > 0)))), 1)]))
    ax.xaxis.set_major_locator(mticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(mticker.FixedFormatter(
        ["0" if t == zero_at else f"$10^{{{int(round(math.log10(t)))}}}$" for t in ticks]))
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    ax.set_xlabel("L2 strength on FC1 (AllenNLP regularizer alpha)")


def plot_lambda_vs_l2(rows: List[dict], path: str) -> None:
    import matplotlib
    import matplotlib.pyplot as plt
    fin = final_rows(rows)
    l2s = sorted({r["l2"] for r in fin})
    pos, zero_at = _l2_positions(l2s)
    by = {(r["l2"], r["layer"]): r for r in fin}
    epoch = max(r["epoch"] for r in fin)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.4))
    styles = {"fc1": ("C3", "o", "FC1 384x64 (L2)"), "fc2": ("C0", "s", "FC2 192x384 (no L2)"),
              "fc3": ("C2", "^", "FC3 10x192 (no L2)")}
    for layer, (color, marker, label) in styles.items():
        pts = [(pos(v), by[(v, layer)]["lambda_min"]) for v in l2s if (v, layer) in by]
        if pts:
            ax.plot(*zip(*pts), marker=marker, color=color, label=label)
    floor = [(pos(v), svd_floor(by[(v, "fc1")]["sv_max"])) for v in l2s if (v, "fc1") in by]
    ax.fill_between([p for p, _ in floor], [1e-300] * len(floor), [f for _, f in floor],
                    color="gray", alpha=0.15, lw=0,
                    label=r"below float64 SVD resolution $(\epsilon\,\nu_{max})^2$ (FC1)")
    lams = [r["lambda_min"] for r in fin if r["lambda_min"]]
    ax.set_ylim(min(lams) / 1e3, max(lams) * 1e3)
    ax.axhline(1e-6, color="gray", ls=":", lw=1)
    ax.text(pos(l2s[0]), 1e-6, r" $\nu_{min}=10^{-3}$ (loose rank bound)", va="bottom",
            fontsize=8, color="gray")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(
        [10.0 ** k for k in range(-300, 301, 10)]))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_ylabel(r"$\lambda_{min}$ of $X=W^TW$")
    ax.set_title(f"Smallest eigenvalue after epoch {epoch + 1}")
    _l2_axis(ax, l2s, zero_at)
    ax.legend(fontsize=8)
    acc = [(pos(v), by[(v, "fc1")]["accuracy"]) for v in l2s if (v, "fc1") in by]
    rank = [(pos(v), by[(v, "fc1")]["rank_loose"]) for v in l2s if (v, "fc1") in by]
    ax2.plot(*zip(*acc), marker="o", color="k", label="validation accuracy")
    ax2.set_ylabel("validation accuracy")
    ax2.set_ylim(min(0.5, min(a for _, a in acc) - 0.02), 1.0)
    _l2_axis(ax2, l2s, zero_at)
    ax3 = ax2.twinx()
    ax3.plot(*zip(*rank), marker="o", color="C3", ls="--", label=r"FC1 rank ($\nu>10^{-3}$)")
    ax3.set_ylabel("FC1 loose rank (of 64)", color="C3")
    ax3.set_ylim(0, 66)
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2_ = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2_, fontsize=8, loc="lower left")
    ax2.set_title("Accuracy cost and FC1 rank")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_lambda_vs_epoch(rows: List[dict], path: str) -> None:
    import matplotlib.pyplot as plt
    l2s = sorted({r["l2"] for r in rows})
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=False)
    titles = ("FC1 (L2 penalty)", "FC2 (no penalty; note the narrow y range)")
    for ax, layer, title in zip(axes, ("fc1", "fc2"), titles):
        for i, v in enumerate(l2s):
            pts = sorted((r["epoch"] + 1, r["lambda_min"]) for r in rows
                         if r["l2"] == v and r["layer"] == layer)
            ax.plot(*zip(*pts), color=cmap(i / max(1, len(l2s) - 1)), label=f"L2 = {v:g}")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(title)
    axes[0].set_ylabel(r"$\lambda_{min}$ of $X=W^TW$")
    fc1_floor = svd_floor(max(r["sv_max"] for r in rows if r["layer"] == "fc1"))
    if min(r["lambda_min"] for r in rows if r["layer"] == "fc1") < fc1_floor:
        ylim = axes[0].get_ylim()
        axes[0].axhspan(1e-300, fc1_floor, color="gray", alpha=0.15, lw=0)
        axes[0].set_ylim(ylim)
        axes[0].text(1, fc1_floor, "below float64 SVD resolution", va="top", fontsize=7,
                     color="gray")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(l2s), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.05 * ((len(l2s) + 4) // 5) + 0.02, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


#: FC1's ESD is drawn for these strengths when the sweep has them: before the collapse, at its
#: onset, and collapsed.
ESD_L2 = (1e-3, 1e-2, 1e-1)


def pick_esd_strengths(l2s: Sequence[float]) -> List[float]:
    """A weak, a medium and a strong strength: ``ESD_L2`` if all are in the sweep, else the
    smallest non-zero, the middle non-zero and the largest strength."""
    if set(ESD_L2) <= set(l2s):
        return list(ESD_L2)
    nz = sorted(v for v in l2s if v > 0)
    if len(nz) < 3:
        return sorted(l2s)[-3:]
    return [nz[0], nz[len(nz) // 2], nz[-1]]


def plot_esd(out: str, l2s: Sequence[float], path: str) -> Dict[str, List[float]]:
    """FC1's ESD (histogram of log10 eigenvalues of X = W^T W) from the final weights of a
    weak, a medium and a strong strength. Returns the eigenvalues drawn."""
    import matplotlib.pyplot as plt
    import numpy as np
    chosen = pick_esd_strengths(l2s)
    evals = {v: eigenvalues(final_weights_path(os.path.join(out, "runs", run_name(v))),
                            "fc1.weight") for v in chosen}
    # Eigenvalues below the SVD's resolution are drawn together in one hatched bar at it.
    floors = {v: svd_floor(math.sqrt(e[-1])) for v, e in evals.items()}
    logs = {v: np.log10(np.maximum(e, floors[v])) for v, e in evals.items()}
    lo = math.floor(min(x.min() for x in logs.values())) - 1
    hi = math.ceil(max(x.max() for x in logs.values()))
    bins = np.linspace(lo, hi, 2 * (hi - lo) + 1)
    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 3.6), sharex=True)
    for ax, v, label in zip(np.atleast_1d(axes), chosen, ("weak", "medium", "strong")):
        below = evals[v] <= floors[v]
        ax.hist(logs[v][~below], bins=bins, color="C3", alpha=0.8)
        if below.any():
            ax.hist(logs[v][below], bins=bins, color="none", edgecolor="k", hatch="////",
                    label=f"{below.sum()} below SVD resolution\n" + r"($\lambda \leq$" +
                          f" {floors[v]:.0e}, drawn there)")
            ax.legend(fontsize=7, loc="upper center")
        ax.axvline(math.log10(1e-6), color="gray", ls=":", lw=1)
        label = "no penalty" if v == 0 else label
        lmin = (f"<= {floors[v]:.0e}" if below.any() else f"= {evals[v][0]:.1e}")
        ax.set_title(f"{label}: L2 = {v:g}\n" + r"$\lambda_{min}$ " + lmin + ", " +
                     r"$\lambda_{max}$" + f" = {evals[v][-1]:.2g}, loose rank "
                     f"{int((np.sqrt(evals[v]) > 1e-3).sum())}", fontsize=9)
        ax.set_xlabel(r"$\log_{10}\lambda$ (FC1, 64 eigenvalues); dotted: $\nu = 10^{-3}$",
                      fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return {run_name(v): [float(x) for x in e] for v, e in evals.items()}


def make_figures(rows: List[dict], out: str, fig_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    os.makedirs(fig_dir, exist_ok=True)
    l2s = sorted({r["l2"] for r in rows})
    paths = [os.path.join(fig_dir, n) for n in
             ("lambda_min_vs_l2.png", "lambda_min_vs_epoch.png", "fc1_esd.png")]
    plot_lambda_vs_l2(rows, paths[0])
    plot_lambda_vs_epoch(rows, paths[1])
    plot_esd(out, l2s, paths[2])
    return paths


# -------------------------------------------------------------------------------------- main

def summary_table(rows: List[dict]) -> str:
    by = {(r["l2"], r["layer"]): r for r in final_rows(rows)}
    lines = [f"{'L2':>8} {'FC1 lambda_min':>15} {'FC1 rank':>8} {'FC2 lambda_min':>15} "
             f"{'FC2 rank':>8} {'accuracy':>8}"]
    for v in sorted({k[0] for k in by}):
        a, b = by[(v, "fc1")], by[(v, "fc2")]
        lines.append(f"{v:8g} {a['lambda_min']:15.3e} {a['rank_loose']:8d} "
                     f"{b['lambda_min']:15.3e} {b['rank_loose']:8d} {a['accuracy']:8.3f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quick", action="store_true",
                   help=f"L2 in {QUICK_L2}, {QUICK_EPOCHS} epochs (about a minute on 2 cores); "
                        f"default: L2 in {FULL_L2}, {FULL_EPOCHS} epochs")
    p.add_argument("--l2", type=float, nargs="+", help="strengths to train (overrides the mode)")
    p.add_argument("--epochs", type=int, help="epochs per run (overrides the mode)")
    p.add_argument("--every", type=int, default=1, help="analyze every k epochs (default 1)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs trained in parallel (default %(default)s)")
    p.add_argument("--figures", help="figure directory (default OUT/figures)")
    p.add_argument("--no-train", action="store_true",
                   help="only collect and plot the runs already in OUT")
    args = p.parse_args(argv)
    l2s = tuple(args.l2) if args.l2 else (QUICK_L2 if args.quick else FULL_L2)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else FULL_EPOCHS)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    times = {}
    if not args.no_train:
        print(f"training {len(l2s)} runs x {epochs} epochs, {args.jobs} at a time -> {out}/runs",
              flush=True)
        times = train_sweep(l2s, epochs, out, args.jobs, args.every)
    t_train = time.time() - t0
    rows = collect(out, l2s)
    csv_path = os.path.join(out, "l2_sweep.csv")
    write_csv(rows, csv_path)
    figs = make_figures(rows, out, args.figures or os.path.join(out, "figures"))
    total = time.time() - t0
    seconds = {"train": round(t_train, 1), "total": round(total, 1), "per_run": times}
    summary_path = os.path.join(out, "summary.json")
    if args.no_train and os.path.exists(summary_path):  # keep the timings of the training run
        with open(summary_path) as f:
            seconds = json.load(f).get("seconds", seconds)
    summary = {"l2": list(l2s), "epochs": epochs, "jobs": args.jobs,
               "final": final_rows(rows), "seconds": seconds}
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    print(summary_table(rows))
    print(f"wrote {csv_path} ({len(rows)} rows) and {', '.join(figs)}")
    print(f"time: {t_train:.1f} s training, {total:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
