"""The standalone command ``allennlp-analyze`` (also ``python -m allennlp_analyze``).

Exit codes: 0 analyzed; 1 analyzed and found rank collapse, with ``--fail-on-collapse``;
2 a problem with the input or the options (one line on stderr, no traceback), including a model
of several that could not be read (the others are still analyzed and reported).
"""

import argparse
import functools
import glob
import importlib.util
import os
import signal
import sys
import threading
from typing import Callable, List, Optional, Sequence

from . import limits
from . import options as analysis_options
from .api import Analysis, analyze
from .describe import Description, describe, write_description
from .errors import AnalyzeError, escape
from .options import AnalysisOptions
from .report import FORMATS, write

DESCRIPTION = (
    "Rank collapse and heavy-tailed spectra of a trained model's weight matrices: "
    "ranks, smallest singular values and power-law fits of X = W^T W, per matrix."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sources, analysis options and output options: shared by this command and the AllenNLP
    ``analyze`` subcommand."""
    parser.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="model archive (.tar.gz), serialization directory, state-dict or "
        "checkpoint file (.th/.pt/.bin/.ckpt), numpy .npy/.npz, safetensors "
        "file or folder, Hugging Face folder, http(s) URL, Hugging Face hub "
        "id ORG/NAME[@REVISION], or a glob of these",
    )
    parser.add_argument(
        "--sources-from",
        metavar="FILE",
        help="read further sources from FILE, one per line (# comments)",
    )
    parser.add_argument(
        "--checkpoint-key",
        metavar="KEY",
        help="the part of a nested checkpoint to analyze, e.g. state_dict, ema "
        "or model.encoder (default: the state dict found under the usual "
        "keys, optimizer state left out; a note says which part was read)",
    )
    analysis_options.add_arguments(parser)
    analysis_options.add_base_arguments(parser)
    g = parser.add_argument_group("output")
    g.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="table (with summary), json, csv, or jsonl: JSON lines, one per record "
        "(default: jsonl for an --output-file named *.jsonl, else table)",
    )
    g.add_argument(
        "--wide",
        action="store_true",
        help="table: also the MP bulk fit (spikes, soft rank), the entropies and, "
        "with --randomize, the correlation traps (JSON and CSV always have them)",
    )
    g.add_argument(
        "--output-file",
        "-o",
        metavar="PATH",
        help="write there instead of stdout; a JSON-lines file gets each source's "
        "records as soon as the source is complete",
    )
    g.add_argument("--plot-dir", metavar="DIR", help="also write figures and an index.html there")
    g.add_argument(
        "--plot-max",
        type=int,
        default=100,
        metavar="K",
        help="per-matrix figures (about 0.15 s each) for at most the first K "
        "matrices; -1: all (default %(default)s)",
    )
    g.add_argument(
        "--plot-match",
        action="append",
        default=[],
        metavar="REGEX",
        help="per-matrix figures only for matrices whose MODEL:NAME matches (repeatable)",
    )
    g.add_argument(
        "--describe",
        action="store_true",
        help="instead of analyzing, list every tensor with its shape, dtype, kind "
        "(and the evidence for it) and what the analysis would do with it; "
        "reads no tensor data, computes nothing",
    )
    g.add_argument(
        "--fail-on-collapse",
        action="store_true",
        help="exit with status 1 when any matrix lost rank under --rank-criterion",
    )
    g.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where downloaded archives are kept (default ~/.cache/allennlp_analyze "
        "or $ALLENNLP_ANALYZE_CACHE)",
    )
    bar = g.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const=True,
        help="always show progress bars (stderr)",
    )
    bar.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const=False,
        help="never show progress bars (default: only on a terminal)",
    )
    g = parser.add_argument_group("sweeps")
    g.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on the Dask cluster of this scheduler (tcp://HOST:8786; needs "
        "allennlp-analyze[dask]); its workers open the sources themselves",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="skip the sources already complete in the JSON-lines --output-file and "
        "add the others (an interrupted sweep, rerun)",
    )


def expand_sources(args: argparse.Namespace) -> List[str]:
    """The sources named on the command line, globs expanded, plus those of --sources-from."""
    specs = list(args.sources)
    if args.sources_from:
        specs += read_sources_file(args.sources_from)
    expanded = []
    for spec in specs:
        is_pattern = "://" not in spec and any(c in spec for c in "*?[")
        matches = sorted(glob.glob(spec)) if is_pattern else [spec]
        if not matches:
            raise AnalyzeError(f"no file matches {spec}")
        expanded += matches
    if not expanded:
        raise AnalyzeError("no source given: name a model archive, weights file, folder or URL")
    return expanded


def read_sources_file(path: str) -> List[str]:
    """The sources listed in a ``--sources-from`` file: one per line, blank lines and ``#``
    comments left out. A text file (UTF-8, no control characters) of at most
    ``limits.MAX_TEXT_FILE`` bytes, regular (not a FIFO or device)."""
    what = f"--sources-from {path}"
    try:
        raw = limits.read_regular(path, limits.MAX_TEXT_FILE)
    except OSError as e:
        raise AnalyzeError(f"cannot read {what}: {e.strerror or e}") from None
    except AnalyzeError as e:
        raise AnalyzeError(f"cannot read {what}: {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AnalyzeError(f"{what} is not a text file (not UTF-8)") from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    for number, line in enumerate(lines, 1):
        if any(ord(c) < 32 or ord(c) == 127 for c in line):
            raise AnalyzeError(
                f"{what} is not a text file (control characters in source {number}: {line!r})"
            )
    return lines


def run(
    args: argparse.Namespace,
    analyze_fn: Callable[..., Analysis] = analyze,
    prog: str = "allennlp-analyze",
    describe_fn: Callable[..., Description] = describe,
) -> int:
    """Analyze (or with ``--describe`` describe), write the report (and figures), and return the
    exit code. ``analyze_fn`` / ``describe_fn`` let the AllenNLP subcommand substitute its own
    loader; ``prog`` names the command in error lines."""
    opts = check_arguments(args)
    sources = expand_sources(args)
    several = len(sources) > 1
    fmt = output_format(args)
    base = analysis_options.base_arguments(args)
    if getattr(args, "describe", False):
        described = describe_fn(
            *sources,
            options=opts,
            progress=args.progress,
            on_error="collect" if several else "raise",
            cache_dir=args.cache_dir,
            **{k: v for k, v in base.items() if k == "base"},
        )
        _write_report(described, args, fmt, write_description)
        for err in described.errors:
            print(f"{prog}: error: {escape(err)}", file=sys.stderr)
        return 2 if described.errors else 0
    journal = args.output_file if fmt == "jsonl" else None
    plots = _plots_module() if args.plot_dir else None
    if plots is not None:
        plots.prepare_plot_dir(args.plot_dir)
    result = analyze_fn(
        *sources,
        options=opts,
        progress=args.progress,
        on_error="collect" if several else "raise",
        cache_dir=args.cache_dir,
        keep_spectra=bool(args.plot_dir),
        checkpoint_key=args.checkpoint_key,
        scheduler=args.scheduler,
        journal=journal,
        resume=args.resume,
        **base,
    )
    if journal is None:
        _write_report(result, args, fmt, functools.partial(write, wide=args.wide))
    if plots is not None:
        plots.write_figures(
            result,
            args.plot_dir,
            max_matrices=getattr(args, "plot_max", 100),
            match=getattr(args, "plot_match", None) or (),
        )
    for note in result.summary.notes:
        print(f"{prog}: note: {escape(note)}", file=sys.stderr)
    for err in result.summary.errors:
        print(f"{prog}: error: {escape(err)}", file=sys.stderr)
    if result.summary.errors:
        return 2
    if args.fail_on_collapse and result.summary.collapsed[opts.rank_criterion]:
        return 1
    return 0


def check_arguments(args: argparse.Namespace) -> AnalysisOptions:
    """Every option checked before any source is opened (or ``--sources-from`` read): the
    analysis options, the output's options and their combinations, and that the output file's
    folder, ``--plot-dir`` and ``--cache-dir`` can be written. Returns the analysis options;
    a problem is one :class:`AnalyzeError` line. Creates nothing."""
    opts = analysis_options.from_namespace(args)
    analysis_options.base_arguments(args)  # --delta without --base
    fmt = output_format(args)
    plot_dir = getattr(args, "plot_dir", None)
    plot_match = getattr(args, "plot_match", None) or ()
    plot_max = getattr(args, "plot_max", 100)
    if plot_max < -1:
        raise AnalyzeError(f"--plot-max must be -1 (all) or >= 0 (got {plot_max})")
    analysis_options.compile_patterns(plot_match, "--plot-match")
    if plot_match and not plot_dir:
        raise AnalyzeError("--plot-match selects figures: it needs --plot-dir")
    if getattr(args, "describe", False):
        for given, option in (
            (plot_dir, "--plot-dir"),
            (args.resume, "--resume"),
            (args.scheduler, "--scheduler"),
            (args.fail_on_collapse, "--fail-on-collapse"),
        ):
            if given:
                raise AnalyzeError(
                    f"--describe computes no spectra: {option} has nothing to do (drop it)"
                )
        if fmt == "jsonl":
            raise AnalyzeError("--describe writes a table, json or csv, not jsonl")
    if args.resume and not (fmt == "jsonl" and args.output_file):
        raise AnalyzeError(
            "--resume needs a JSON-lines --output-file (FILE.jsonl, or --format "
            "jsonl -o FILE) to resume"
        )
    if args.resume and plot_dir:
        raise AnalyzeError(
            "--plot-dir cannot be combined with --resume (the sweep file keeps "
            "no spectra); plot the finished sweep in a run of its own"
        )
    if args.scheduler and importlib.util.find_spec("distributed") is None:
        raise AnalyzeError(
            "--scheduler needs Dask distributed, which is not installed: "
            "pip install 'allennlp-analyze[dask]'"
        )
    if args.output_file:
        _check_output_file(args.output_file)
    if plot_dir:
        _plots_module()
        _check_creatable_dir(plot_dir, "--plot-dir")
    if args.cache_dir:
        _check_creatable_dir(args.cache_dir, "--cache-dir")
    return opts


def _check_output_file(path: str) -> None:
    """``--output-file``: not a folder, in a folder that exists and can be written, and itself
    writable where it exists."""
    what = f"cannot write {path}"
    if os.path.isdir(path):
        raise AnalyzeError(f"{what}: it is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AnalyzeError(f"{what}: its folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (
        os.path.exists(path) and not os.access(path, os.W_OK)
    ):
        raise AnalyzeError(f"{what}: permission denied")


def _check_creatable_dir(path: str, option: str) -> None:
    """``path`` is a writable folder, or can be created: its nearest existing ancestor is a
    writable folder."""
    what = f"cannot create {option} {path}"
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise AnalyzeError(f"{what}: a file of that name exists")
        if not os.access(path, os.W_OK | os.X_OK):
            raise AnalyzeError(f"cannot write {option} {path}: permission denied")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise AnalyzeError(f"{what}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AnalyzeError(f"{what}: {parent} cannot be written (permission denied)")


def output_format(args: argparse.Namespace) -> str:
    """``--format``, else jsonl for an output file named ``*.jsonl``, else table."""
    if args.format:
        return args.format
    return "jsonl" if (args.output_file or "").lower().endswith(".jsonl") else "table"


def _write_report(result, args: argparse.Namespace, fmt: str, writer: Callable = write) -> None:
    if args.output_file:
        try:
            with open(args.output_file, "w", encoding="utf-8", newline="") as f:
                writer(result, fmt, f)
        except OSError as e:
            raise AnalyzeError(f"cannot write {args.output_file}: {e.strerror}") from None
        return
    try:
        writer(result, fmt, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:  # e.g. a full disk (ENOSPC)
        _silence_stdout()
        raise AnalyzeError(
            f"cannot write the report to standard output: {e.strerror or e}"
        ) from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the data still buffered in it cannot fail again (and
    print a second message) when the interpreter flushes it at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _plots_module():
    """:mod:`allennlp_analyze.plots`, or a clear error where matplotlib is missing."""
    try:
        from . import plots
    except ImportError as e:
        raise AnalyzeError(
            f"--plot-dir needs matplotlib ({e}); pip install 'allennlp-analyze[plots]'"
        ) from None
    return plots


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="allennlp-analyze", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``allennlp-analyze``; returns the exit code."""
    args = build_parser().parse_args(argv)
    return guarded(lambda: run(args), "allennlp-analyze")


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that temporary files are removed on the way out."""


def _terminate(signum, frame):
    raise Terminated()


def guarded(fn: Callable[[], int], prog: str) -> int:
    """Run ``fn``; an :class:`AnalyzeError` becomes one stderr line (escaped) and exit code 2,
    running out of memory too; Ctrl-C exit code 130 and SIGTERM 143 with one line (temporary
    files removed); a closed stdout pipe (``| head``) ends quietly."""
    previous = None
    if threading.current_thread() is threading.main_thread():  # signals go to the main thread
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return fn()
    except AnalyzeError as e:
        print(f"{prog}: error: {escape(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prog}: error: out of memory", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
