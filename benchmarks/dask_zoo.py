"""A model zoo on Dask: throughput of a sweep on a LocalCluster of 2 single-threaded worker
processes against one of 1 worker, and against the local threaded run (not a timed test).

    python benchmarks/dask_zoo.py [--sources 24] [--rounds 3] [--keep DIR]

The zoo: ``--sources`` generated safetensors checkpoints (float16, 9.4 MB each; a 3072 x 768
matrix and four of 1536 x 384, BERT-base's and MiniLM's feed-forward shapes: Gaussian, columns
scaled by heavy-tailed factors; 2.7e9 of N * M**2 work: under the split threshold, so one task per
source), written into a temporary folder (or ``--keep DIR``, where they are reused). Both
clusters (127.0.0.1, worker processes with one thread each) are started before any timing and
warmed up by one sweep; then each round times the three runs back to back, in a rotating order,
so that all see the same machine load: ``analyze(*zoo)`` here (the default: one thread per
core), and ``analyze(*zoo, executor=client.get_executor())`` on each cluster. Printed: every
round, the best and the median of each, the ratios of the best (targets: 2 workers >= 1.8x the
throughput of 1; 2 workers within 10% of the local run), the least CPU time each used here
(the client and, in this process, the LocalCluster's scheduler) and in the worker processes,
that all three gave the same records (``==``), and Dask's overhead per task: the client's and
scheduler's CPU per task, a no-op task's round trip through the executor, one at a time and 200
at once, and the 2-worker sweep's time beyond the local run's, per task; and, from Dask's task stream,
the fraction of each 2-worker sweep that each worker spent computing. On a machine that other
jobs share, the CPU times and those fractions mean more than the wall times.
"""
import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import machine, say  # noqa: E402  (the shared machine description)

SHAPES = [(3072, 768)] + [(1536, 384)] * 4


def write_zoo(folder: Path, n: int) -> list:
    """``n`` checkpoints ``zoo/NN/model.safetensors`` (made once; reused when present)."""
    from safetensors.numpy import save_file

    paths = []
    for k in range(n):
        path = folder / f"{k:03d}" / "model.safetensors"
        if not path.is_file():
            rng = np.random.default_rng(k)
            tensors = {}
            for i, (N, M) in enumerate(SHAPES):  # Gaussian, columns scaled heavy-tailed
                scale = (rng.pareto(3.0, M) + 0.1) / np.sqrt(N)
                tensors[f"layers.{i}.weight"] = (rng.standard_normal((N, M)) * scale
                                                 ).astype(np.float16)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(path))
        paths.append(str(path))
    return paths


def noop() -> None:
    return None


def task_stream(client):
    """Dask's record of the tasks run (start, stop, worker) while active; nothing locally."""
    from distributed import get_task_stream

    return get_task_stream(client=client) if client is not None else contextlib.nullcontext()


def busy_fractions(stream, wall: float) -> list:
    """Per worker, the fraction of ``wall`` seconds it spent computing tasks."""
    busy = {}
    for task in stream.data:
        for step in task["startstops"]:
            if step["action"] == "compute":
                busy[task["worker"]] = busy.get(task["worker"], 0.0) + step["stop"] - step["start"]
    return sorted(b / wall for b in busy.values())


def workers_cpu(client) -> float:
    """CPU seconds used so far by the worker processes of ``client``'s cluster (0: none)."""
    return sum(client.run(time.process_time).values()) if client is not None else 0.0


def task_overhead(executor) -> tuple:
    """Seconds per no-op task through ``executor``: one at a time, and 200 submitted at once."""
    from concurrent.futures import wait

    executor.submit(noop).result()
    t0 = time.perf_counter()
    for _ in range(50):
        executor.submit(noop).result()
    one = (time.perf_counter() - t0) / 50
    t0 = time.perf_counter()
    wait([executor.submit(noop) for _ in range(200)])
    return one, (time.perf_counter() - t0) / 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", metavar="DIR", help="keep the zoo there (default: a temporary folder)")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from allennlp_analyze import analyze
    from allennlp_analyze.tasks import PART_COST

    machine()
    say(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        zoo = write_zoo(Path(args.keep or tmp), args.sources)
        work = sum(N * M * M for N, M in SHAPES)
        say(f"zoo: {len(zoo)} safetensors checkpoints, {len(SHAPES)} matrices and "
            f"{work:.2g} of N*M^2 work each (< 2 * PART_COST = {2 * PART_COST:.2g}: one task "
            "per source)")
        t0 = time.perf_counter()
        two = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=":0")
        one = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=":0")
        say(f"two LocalClusters started in {time.perf_counter() - t0:.1f} s")
        with two, one, Client(two, set_as_default=False) as c2, \
                Client(one, set_as_default=False) as c1:
            runs = {
                "local (threads)": (lambda: analyze(*zoo), None),
                "dask, 2 workers": (lambda: analyze(*zoo, executor=c2.get_executor()), c2),
                "dask, 1 worker": (lambda: analyze(*zoo, executor=c1.get_executor()), c1),
            }
            results = {name: fn() for name, (fn, _) in runs.items()}  # warm-up: imports, cache
            same = all(r.records == results["local (threads)"].records for r in results.values())
            times = {name: [] for name in runs}
            cpu = {name: [] for name in runs}  # (here, in the workers) CPU seconds per sweep
            busy = []  # per 2-worker sweep: the fraction of its wall time each worker computed
            names = list(runs)
            for k in range(args.rounds):
                order = names[k % 3:] + names[:k % 3]
                for name in order:
                    fn, client = runs[name]
                    before = workers_cpu(client)
                    with task_stream(client) as stream:
                        c0, t0 = time.process_time(), time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
                    cpu[name].append((time.process_time() - c0, workers_cpu(client) - before))
                    if client is c2:
                        busy.append(busy_fractions(stream, times[name][-1]))
                say(f"round {k + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names))
            o2, o1 = task_overhead(c2.get_executor()), task_overhead(c1.get_executor())
            c0, t0 = time.process_time(), time.perf_counter()
            time.sleep(min(times["dask, 2 workers"]))
            # CPU seconds per second that both clusters' event loops here use doing nothing
            idle = (time.process_time() - c0) / (time.perf_counter() - t0)
    best = {n: min(t) for n, t in times.items()}
    say(f"two idle clusters use {idle:.3f} CPU seconds per second here")
    for n in names:
        here, there = (min(c[i] for c in cpu[n]) for i in (0, 1))
        beyond = min(c[0] - idle * t for c, t in zip(cpu[n], times[n]))
        say(f"{n:16s} best {best[n]:.2f} s, median {statistics.median(times[n]):.2f} s "
            f"({len(zoo) / best[n]:.2f} sources/s); least CPU: {here:.2f} s here"
            + (f" (client + scheduler beyond idle: {1e3 * beyond / len(zoo):.1f} ms per task"
               f"{'; under 0: lost in the idle loops noise' if beyond < 0 else ''}), "
               f"{there:.2f} s in the workers" if there else ""))
    speedup = best["dask, 1 worker"] / best["dask, 2 workers"]
    versus = best["dask, 2 workers"] / best["local (threads)"]
    say(f"2 workers vs 1 worker: {speedup:.2f}x throughput (target >= 1.8x: "
        f"{'met' if speedup >= 1.8 else 'NOT met'})")
    say(f"2 workers vs the local threaded run: {versus:.3f}x its time (target within 10%: "
        f"{'met' if versus <= 1.10 else 'NOT met'})")
    say(f"records of all three runs identical (==): {'yes' if same else 'NO'}")
    say("2 workers computing, as fractions of each 2-worker sweep's wall time: "
        + "; ".join(" and ".join(f"{100 * f:.0f}%" for f in b) for b in busy))
    say(f"Dask overhead per no-op task: {1e3 * o2[0]:.1f} ms one at a time, {1e3 * o2[1]:.1f} ms "
        f"each of 200 at once (2 workers); {1e3 * o1[0]:.1f} / {1e3 * o1[1]:.1f} ms (1 worker)")
    say(f"2-worker sweep beyond the local run: {1e3 * (best['dask, 2 workers'] - best['local (threads)']) / len(zoo):.1f} "
        f"ms per task ({len(zoo)} tasks)")
    say(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
