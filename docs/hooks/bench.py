"""MkDocs hook: the performance page's tables, generated from the benchmark's own output
(``docs/bench-last-run.txt``, written by ``python benchmarks/run.py --save``) when the site is
built, so that they always show the last saved run and are never copied by hand.

A page asks for a table with ``<!-- bench: NAME -->`` (NAME one of :data:`TABLES`). A marker
whose part of the output is missing or unreadable is a warning, which fails ``mkdocs build
--strict``: a benchmark whose output format changed must change this parser too.
"""

import logging
import os
import re
import statistics
from typing import Callable, Dict, List

log = logging.getLogger("mkdocs.hooks.bench")
DOCS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FILE = os.path.join(DOCS, "bench-last-run.txt")
MARKER = re.compile(r"<!-- bench: ([a-z-]+) -->")
NUM = r"([\d.]+)"


class Unreadable(Exception):
    """The benchmark output lacks what a table needs."""


def sections(text: str) -> Dict[str, List[str]]:
    """The output's sections by the start of their ``== title ==`` line: lines, blank ones
    dropped."""
    out: Dict[str, List[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("== "):
            current = line.strip("= ").strip()
            out[current] = []
        elif current is not None and line.strip():
            out[current].append(line.rstrip())
    return out


def section(secs: Dict[str, List[str]], start: str) -> List[str]:
    for title, lines in secs.items():
        if title.startswith(start):
            return lines
    raise Unreadable(f"no section '== {start} ...'")


def match(pattern: str, line: str) -> re.Match:
    m = re.search(pattern, line)
    if m is None:
        raise Unreadable(f"unexpected line: {line.strip()[:100]}")
    return m


def table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def x(value: float) -> str:
    return f"{value:g}×"


def rounds(text: str) -> str:
    """A per-round list as printed (``5.1x, 7.0x``), with the multiplication sign."""
    return text.replace("x", "×")


def ms_range(values: List[float]) -> str:
    """``lo–hi ms``, or in seconds from 1000 ms."""
    lo, hi = min(values), max(values)
    if hi >= 1000:
        return f"{lo / 1000:.3g}–{hi / 1000:.3g} s"
    return f"{lo:.3g}–{hi:.3g} ms"


def median(values: List[int]) -> str:
    return f"{statistics.median(values):.0f}"


# ---------------------------------------------------------------------------------------------
# The parts of the output


def fit_rows(secs):
    """(n, spectrum, xmax, powerlaw ms, ours ms, ratio, same) of the power-law fit section."""
    rows = []
    for line in section(secs, "power-law fit"):
        m = re.match(
            r"^\s*(\d+) (.+?)\s+(none|max)\s+" + NUM + r"ms\s+" + NUM + r"ms\s+(\d+)x"
            r"\s+(yes|no)$",
            line,
        )
        if m:
            n, name, xmax, pl, ours, ratio, same = m.groups()
            rows.append((int(n), name, xmax, float(pl), float(ours), int(ratio), same == "yes"))
    if not rows:
        raise Unreadable("no rows in the power-law fit section")
    return rows


def near_square(secs):
    rows = []
    for line in section(secs, "near-square path"):
        m = match(
            r"^(\d+) x (\d+): method (\S+); CPU: floor "
            + NUM
            + r" ms, ours "
            + NUM
            + r" ms -> "
            + NUM
            + r"x \(per round ([^)]*)\); wall: "
            + NUM
            + " / "
            + NUM
            + r" ms -> "
            + NUM
            + r"x; max \|nu - svd\| = "
            + NUM
            + r" \(N \+ M\) eps64 nu_max \(guaranteed <= (\d+)\)",
            line,
        )
        rows.append(m.groups())
    return rows


def models(secs):
    """Per model of the whole-model section: its header and its indented lines by kind."""
    out = []
    for line in section(secs, "whole models"):
        if not line.startswith(" "):
            m = match(
                r"^(.+?): (\d+) matrices \(([^)]*)\); analyze " + NUM + r" s \[([^\]]*)\]", line
            )
            out.append(
                {
                    "name": m[1],
                    "count": m[2],
                    "methods": m[3],
                    "analyze": float(m[4]),
                    "rounds": m[5],
                }
            )
        elif out:
            key = line.split()[0].rstrip(":")
            if key == "per":
                key = "per layer" if line.strip().startswith("per layer") else "per matrix"
            elif key == "peak":
                key = "rss"
            out[-1][key] = line.strip()
    if not out:
        raise Unreadable("no model in the whole-model section")
    return out


def floor(model):
    m = match(
        r"ideal 2-thread " + NUM + r" s .*?-> analyze = " + NUM + r"x the floor "
        r"\(per round ([^;]*); target <= "
        + NUM
        + r"x\); in CPU seconds: ours "
        + NUM
        + r" s, floor "
        + NUM
        + r" s -> "
        + NUM
        + "x",
        model.get("floor", ""),
    )
    return dict(
        ideal=float(m[1]),
        ratio=float(m[2]),
        rounds=m[3],
        target=float(m[4]),
        cpu_ours=float(m[5]),
        cpu_floor=float(m[6]),
        cpu_ratio=float(m[7]),
    )


def weightwatcher(model):
    m = match(
        r"WeightWatcher (\S+) \((.*?)\) best " + NUM + r" s with (\d+) thread\(s\) "
        r"\[([^\]]*)\] -> ours " + NUM + r"x faster \(best vs best; per round ([^;]*); "
        r"target >= " + NUM + r"x\); the ceiling .*?= " + NUM + r"x; in CPU seconds: "
        r"WeightWatcher " + NUM + r" s / ours " + NUM + r" s = " + NUM + "x",
        model.get("WeightWatcher", ""),
    )
    return dict(
        version=m[1],
        env=m[2],
        best=float(m[3]),
        threads=m[4],
        runs=m[5],
        ratio=float(m[6]),
        rounds=m[7],
        target=float(m[8]),
        ceiling=float(m[9]),
        cpu_ww=float(m[10]),
        cpu_ours=float(m[11]),
        cpu_ratio=float(m[12]),
    )


def rss(model):
    m = match(
        r"peak RSS \(CLI, fresh process\): (\d+) MiB, (\d+) MiB above the interpreter "
        r"after imports = " + NUM + r"x M\^2 float64 of the largest M \((\d+): .*?; "
        r"WeightWatcher (\d+) MiB",
        model.get("rss", ""),
    )
    return dict(peak=int(m[1]), above=int(m[2]), times=float(m[3]), M=m[4], ww=int(m[5]))


def agreement(model):
    m = match(
        r"\((\d+) of (\d+) matched\): \|alpha diff\| max (\S+) .*?nu_min rel\. diff max "
        r"(\S+); WW matrix_rank == our rank_numpy in (\d+)/(\d+)",
        model.get("per layer", ""),
    )
    return m.groups()


def per_matrix(model):
    m = match(
        r"per (\d+ x \d+) matrix, 1 thread: Gram \(syrk\) "
        + NUM
        + r" ms, eigvalsh "
        + NUM
        + r" ms, SVD values "
        + NUM
        + r" ms, ours \((\S+)\) "
        + NUM
        + r" ms -> SVD / "
        r"\(Gram \+ eigvalsh\) = " + NUM + r", ours / \(Gram \+ eigvalsh\) = " + NUM,
        model.get("per matrix", ""),
    )
    return m.groups()


def projection_items(line: str):
    """``COUNT x SHAPE SECONDS s (NOTE)`` items of a projection line, and its total."""
    m = match(r"^[^:]+: (.*) -> " + NUM + " min$", line)
    items = []
    for part in m[1].split("; "):
        p = match(r"^(\d+) x (\S+) " + NUM + r" s(?: \((.*)\))?$", part)
        items.append((int(p[1]), p[2], float(p[3]), p[4] or ""))
    return items, float(m[2])


# ---------------------------------------------------------------------------------------------
# The tables


def fit_table(secs) -> str:
    rows = fit_rows(secs)
    out = []
    for n in sorted({r[0] for r in rows}):
        group = [r for r in rows if r[0] == n and r[2] == "none"]
        names = [r[1] for r in group if not r[1].startswith("MiniLM")]
        minilm = len(group) - len(names)
        spectra = ", ".join(names) + (f", {minilm} real MiniLM layers" if minilm else "")
        ratios = [r[5] for r in group]
        out.append(
            [
                str(n),
                spectra,
                ms_range([r[3] for r in group]),
                ms_range([r[4] for r in group]),
                f"{min(ratios)}× / {median(ratios)}×",
            ]
        )
    bounded = [r for r in rows if r[2] == "max"]
    if bounded:
        out.append(
            [
                f"{bounded[0][0]} … {bounded[-1][0]}, xmax=max",
                ", ".join(sorted({r[1] for r in bounded})),
                ms_range([r[3] for r in bounded]),
                ms_range([r[4] for r in bounded]),
                f"{min(r[5] for r in bounded)}× … {max(r[5] for r in bounded)}×",
            ]
        )
    return table(["n", "spectra", "powerlaw 1.5", "ours", "ratio min / median"], out)


def near_square_table(secs) -> str:
    rows = [
        [
            f"{g[0]} × {g[1]}",
            f"`{g[2]}`",
            f"{g[3]} ms",
            f"{g[4]} ms",
            f"{g[5]}× ({g[6]})",
            f"{g[9]}×",
            f"{g[10]} (limit {g[11]})",
        ]
        for g in near_square(secs)
    ]
    return table(
        [
            "n × n (float32)",
            "method",
            "floor: `eigvalsh(WᵀW)`, CPU",
            "ours, CPU",
            "ratio (per round)",
            "wall ratio",
            "max error, (N + M)·eps64·ν_max",
        ],
        rows,
    )


def models_table(secs) -> str:
    rows = []
    for m in models(secs):
        f = floor(m)
        rows.append(
            [
                m["name"],
                f"{m['count']} ({m['methods']})",
                f"{m['analyze']:g} s",
                f"{f['ideal']:g} s",
                f"{x(f['ratio'])} ({f['rounds']})",
                f"{f['cpu_ours']:g} / {f['cpu_floor']:g} s = {x(f['cpu_ratio'])}",
            ]
        )
    return table(
        [
            "model",
            "matrices",
            "analyze()",
            "floor, ideal 2-thread",
            "ratio (per round)",
            "CPU seconds: ours / floor",
        ],
        rows,
    )


def per_matrix_table(secs) -> str:
    rows = []
    for m in models(secs):
        g = per_matrix(m)
        rows.append(
            [
                m["name"],
                g[0],
                f"{g[1]} ms",
                f"{g[2]} ms",
                f"{g[3]} ms",
                f"{g[5]} ms (`{g[4]}`)",
                f"{g[6]}",
                f"{g[7]}",
            ]
        )
    return table(
        [
            "model",
            "matrix",
            "Gram (syrk)",
            "eigvalsh",
            "SVD values",
            "ours",
            "SVD / (Gram + eigvalsh)",
            "ours / (Gram + eigvalsh)",
        ],
        rows,
    )


def weightwatcher_table(secs) -> str:
    rows = []
    for m in models(secs):
        w, r, a = weightwatcher(m), rss(m), agreement(m)
        rows.append(
            [
                m["name"],
                f"{w['best']:g} s ({w['threads']} thr; {w['runs']})",
                f"{m['analyze']:g} s",
                f"{x(w['ratio'])} ({rounds(w['rounds'])})",
                x(w["ceiling"]),
                x(w["cpu_ratio"]),
                f"{r['ww']} / {r['peak']} MiB",
                f"{a[2]} / {a[3]}; ranks equal {a[4]}/{a[5]}",
            ]
        )
    version = weightwatcher(models(secs)[0])["version"]
    return table(
        [
            "model",
            f"WeightWatcher {version} best (runs)",
            "ours best",
            "best vs best (per round)",
            "ceiling",
            "CPU seconds WW / ours",
            "peak RSS WW / ours (CLI)",
            "per layer: max α diff / ν_min rel. diff",
        ],
        rows,
    )


def parallel_table(secs) -> str:
    rows, configs = [], []
    for line in section(secs, "parallel configurations"):
        name, rest = match(r"^(.+?): (\d.*)$", line).groups()
        timed = re.findall(r"(\d+ x \d+): " + NUM + " s", rest)
        configs = [c for c, _ in timed]
        rows.append([name] + [f"{t} s" for _, t in timed])
    return table(["model"] + [f"{c} (workers × BLAS threads)" for c in configs], rows)


def projection_table(secs) -> str:
    lines = section(secs, "projection for Llama-3-8B")
    ours_line = next(ln for ln in lines if ln.startswith("ours:"))
    ww_line = next(ln for ln in lines if ln.startswith("WeightWatcher"))
    ratio = match(r"-> " + NUM + "x$", next(ln for ln in lines if ln.startswith("projected")))
    ours, ours_total = projection_items(ours_line)
    ww, ww_total = projection_items(ww_line)
    rows = [
        [
            f"{o[1].replace('x', ' × ')} ({o[0]})",
            f"{o[2]:g} s" + (f" ({o[3]})" if o[3] else ""),
            f"{w[2]:g} s" + (f" ({w[3]})" if w[3] else ""),
        ]
        for o, w in zip(ours, ww)
    ]
    rows.append(
        ["**all, over 2 cores**", f"**{ours_total:g} min**", f"{ww_total:g} min: **{ratio[1]}×**"]
    )
    return table(["shape (count)", "ours, one thread", "WeightWatcher's SVD, one thread"], rows)


def startup_table(secs) -> str:
    rows = []
    for line in section(secs, "allennlp-analyze on"):
        m = match(
            r"^(.*?) --no-progress: " + NUM + r" s \(runs: ([^)]*)\); heavy modules "
            r"imported: \[(.*)\]",
            line,
        )
        rows.append(
            [
                f"`allennlp-analyze {os.path.basename(m[1].split()[-1])}`",
                f"{m[2]} s",
                m[3],
                m[4] or "none",
            ]
        )
    return table(
        ["command", "process start to exit (best)", "runs", "heavy modules imported"], rows
    )


def memory_table(secs) -> str:
    rows = []
    for line in section(secs, "peak memory"):
        if line.startswith("("):  # "(benchmark took N s)"
            continue
        m = match(
            r"^(.*?); --workers (\d+): peak RSS (\d+) MiB, (\d+) MiB above the interpreter "
            r"\((\d+) MiB\) = " + NUM + r"x the largest tensor in float64; " + NUM + " s",
            line,
        )
        rows.append([m[1], m[2], f"{m[3]} MiB", f"{m[4]} MiB", x(float(m[6])), f"{m[7]} s"])
    return table(
        [
            "checkpoint",
            "--workers",
            "peak RSS",
            "above the interpreter",
            "of the largest tensor in float64",
            "time",
        ],
        rows,
    )


def summary_table(secs) -> str:
    fits = fit_rows(secs)
    free = [r for r in fits if r[2] == "none"]

    def ratios(n):
        return [r[5] for r in free if r[0] == n]

    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    rows = [
        [
            "fit equals `powerlaw==1.5` (same xmin, α, D; both xmax modes)",
            f"equal on {sum(r[6] for r in fits)} of {len(fits)} benchmark spectra",
            met(all(r[6] for r in fits)),
        ]
    ]
    big = [n for n in (768, 4096) if ratios(n)]
    rows.append(
        [
            "fit ≥ 100× powerlaw 1.5 at n = 768 and 4096",
            "; ".join(f"min {min(ratios(n))}× / median {median(ratios(n))}× at {n}" for n in big),
            met(all(min(ratios(n)) >= 100 for n in big)),
        ]
    )
    rows.append(
        [
            "fit ≥ 50× at every n",
            f"min {min(r[5] for r in free)}×",
            met(min(r[5] for r in free) >= 50),
        ]
    )
    ns = near_square(secs)
    rows.append(
        [
            "near-square path ≤ 1.2× (syrk + eigvalsh), one thread",
            "; ".join(f"{g[0]}²: {g[5]}× ({g[6]})" for g in ns),
            met(all(float(g[5]) <= 1.2 for g in ns)),
        ]
    )
    rows.append(
        [
            "every ν within 64·(N + M)·eps64·ν_max of `numpy.linalg.svd`",
            "max " + " and ".join(f"{g[10]} at {g[0]}²" for g in ns) + " (N + M)·eps64·ν_max",
            met(all(float(g[10]) <= float(g[11]) for g in ns)),
        ]
    )
    for m in models(secs):
        f, w = floor(m), weightwatcher(m)
        rows.append(
            [
                f"{m['name']}: ≥ {w['target']:g}× WeightWatcher `analyze()`",
                f"{x(w['ratio'])} ({rounds(w['rounds'])}): {w['best']:g} s vs {m['analyze']:g} s; "
                f"ceiling {x(w['ceiling'])}",
                met(w["ratio"] >= w["target"]),
            ]
        )
        rows.append(
            [
                f"{m['name']}: ≤ {f['target']:g}× the floor (ideal 2-thread)",
                f"{x(f['ratio'])} ({f['rounds']}); in CPU seconds {x(f['cpu_ratio'])}",
                met(f["ratio"] <= f["target"]),
            ]
        )
    for line in section(secs, "allennlp-analyze on"):
        m = match(r"--no-progress: " + NUM + " s", line)
        rows.append(
            [
                "`allennlp-analyze` on MiniLM, process start to exit < 1 s",
                f"{m[1]} s",
                met(float(m[1]) < 1),
            ]
        )
    return table(["target", "measured (best vs best; per round in brackets)", ""], rows)


def full_output(secs) -> str:
    with open(RUN_FILE, encoding="utf-8") as f:
        return "```text\n" + f.read().rstrip() + "\n```"


TABLES: Dict[str, Callable[[Dict[str, List[str]]], str]] = {
    "summary": summary_table,
    "fit": fit_table,
    "near-square": near_square_table,
    "models": models_table,
    "per-matrix": per_matrix_table,
    "weightwatcher": weightwatcher_table,
    "parallel": parallel_table,
    "projection": projection_table,
    "startup": startup_table,
    "memory": memory_table,
    "full-output": full_output,
}


def on_page_markdown(markdown, page, config, files):
    if not MARKER.search(markdown):
        return markdown
    with open(RUN_FILE, encoding="utf-8") as f:
        secs = sections(f.read())

    def render(m: re.Match) -> str:
        name = m.group(1)
        if name not in TABLES:
            log.warning("%s: unknown benchmark table %r", page.file.src_uri, name)
            return m.group(0)
        try:
            return TABLES[name](secs)
        except (Unreadable, StopIteration, ValueError) as e:
            log.warning("%s: benchmark table %r: %s", page.file.src_uri, name, e)
            return m.group(0)

    return MARKER.sub(render, markdown)
