"""The analysis options, defined once for the standalone CLI, the AllenNLP subcommand and the
training callback (which takes the same names as constructor arguments)."""

import argparse
import math
import numbers
import re
from dataclasses import dataclass, fields
from typing import Iterable, List, Optional, Pattern, Tuple

from .errors import AnalyzeError
from .fits import ESTIMATORS, parse_fits
from .records import CRITERION_CHOICES

KINDS = ("conv", "embeddings")
#: Most matrices analyzed at once (each is a thread).
MAX_WORKERS = 256


@dataclass(frozen=True)
class AnalysisOptions:
    """What to analyze and how.

    Selection: keep matrices with ``Q = N / M >= min_q`` and ``M >= min_dim``, names matching
    any ``match`` regex (all if empty) and no ``exclude`` regex; ``include`` adds kinds that are
    left out by default: "embeddings" (embedding tables) and "conv" (each spatial position of a
    convolution kernel as an out x in matrix, kept when its smaller side is >= ``conv_min_dim``).
    ``split_fused`` analyzes fused matrices by part (attention ``in_proj_weight`` as q, k, v;
    LSTM/GRU gate stacks by gate) instead of whole.

    Numerics: ``loose_tol`` is the absolute singular-value bound of the loose rank;
    ``rank_criterion`` picks the rank behind ``rank_loss`` and "collapsed": "loose", "numpy",
    "nr", "noise", or "auto" (the default: loose for float32 / float64 storage, noise for
    narrower dtypes; :func:`allennlp_analyze.records.criterion_for`); ``fit``: the alpha
    estimators (:mod:`allennlp_analyze.fits`; a tuple or a comma-separated string), the first
    fills ``alpha``, ``xmin``, ``D`` (default "csn", the unbounded power law of the original
    analysis); ``fit_xmax`` "max" is the older name of "csn-xmax" (the fit bounded at
    lambda_max): it turns "csn" into "csn-xmax";
    ``method`` "auto" | "svd" | "gram" (see :mod:`allennlp_analyze.spectrum`); ``device`` None
    (numpy, CPU) or a torch device; ``log10_threshold``: nu_min below 10**this counts as
    collapsed in multi-model aggregates (the study's "generous" -8). ``randomize`` also analyzes
    each matrix with its elements permuted (correlation traps; twice the spectral cost), the
    permutation seeded by ``seed`` and the matrix's name (reproducible; see
    :mod:`allennlp_analyze.spectral_metrics`).

    Speed: ``workers`` matrices are analyzed at once in threads (numpy releases the GIL),
    largest first, BLAS limited to one thread so the cores are not oversubscribed (cores without
    a matrix join the Gram matrices still being formed; results do not depend on either); 0 (the
    default) picks one worker per CPU core when ``threadpoolctl`` is installed (it sets the BLAS
    threads), else 1 with BLAS's own threads. Measured on 2 cores, 2 workers beat 1 worker with
    2-thread BLAS (see docs/performance.md).
    """

    min_q: float = 1.1
    min_dim: int = 1
    match: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    include: Tuple[str, ...] = ()
    conv_min_dim: int = 50
    split_fused: bool = False
    loose_tol: float = 1e-3
    rank_criterion: str = "auto"
    fit: Tuple[str, ...] = ("csn",)
    fit_xmax: str = "none"
    method: str = "auto"
    device: Optional[str] = None
    log10_threshold: float = -8.0
    workers: int = 0
    randomize: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("match", "exclude", "include"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        self._resolve_fit()
        if self.device in ("", "cpu"):
            object.__setattr__(self, "device", None)
        if self.device is not None:
            _check_device(self.device)
        compile_patterns(self.match + self.exclude, "name")
        checks = [
            (math.isfinite(self.min_q), f"--min-q must be a finite number (got {self.min_q})"),
            (
                math.isfinite(self.loose_tol),
                f"--loose-tol must be a finite number (got {self.loose_tol})",
            ),
            (
                math.isfinite(self.log10_threshold),
                f"--log10-threshold must be a finite number (got {self.log10_threshold})",
            ),
            (self.min_q >= 1.0, f"--min-q must be >= 1 (got {self.min_q})"),
            (self.min_dim >= 1, f"--min-dim must be >= 1 (got {self.min_dim})"),
            (self.conv_min_dim >= 1, f"--conv-min-dim must be >= 1 (got {self.conv_min_dim})"),
            (self.loose_tol >= 0.0, f"--loose-tol must be >= 0 (got {self.loose_tol})"),
            (
                self.rank_criterion in CRITERION_CHOICES,
                f"--rank-criterion must be one of {', '.join(CRITERION_CHOICES)}",
            ),
            (self.fit_xmax in ("none", "max"), "--fit-xmax must be 'none' or 'max'"),
            (self.method in ("auto", "svd", "gram"), "--method must be auto, svd or gram"),
            (set(self.include) <= set(KINDS), f"--include takes {' / '.join(KINDS)}"),
            (
                0 <= self.workers <= MAX_WORKERS,
                f"--workers must be between 0 (one per CPU core) and {MAX_WORKERS}",
            ),
            (
                isinstance(self.seed, numbers.Integral) and self.seed >= 0,
                f"--seed must be an integer >= 0 (got {self.seed!r})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise AnalyzeError(message)

    def _resolve_fit(self) -> None:
        """``fit`` as a tuple of estimator names, ``fit_xmax="max"`` applied to it."""
        text = self.fit if isinstance(self.fit, str) else ",".join(self.fit or ())
        try:
            names = parse_fits(text)
        except ValueError as e:
            raise AnalyzeError(str(e)) from None
        if self.fit_xmax == "max":
            if "csn" not in names and "csn-xmax" not in names:
                raise AnalyzeError(
                    "--fit-xmax max turns the csn estimator into csn-xmax, "
                    "but --fit does not name csn"
                )
            names = tuple(dict.fromkeys("csn-xmax" if n == "csn" else n for n in names))
        object.__setattr__(self, "fit", names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the analysis options (as ``--min-q`` etc.) to an argparse parser."""
    d = AnalysisOptions()
    g = parser.add_argument_group("selection")
    g.add_argument(
        "--min-q",
        type=float,
        default=d.min_q,
        help="keep matrices with aspect ratio Q = N/M >= this (default %(default)s; "
        "1 keeps square matrices)",
    )
    g.add_argument(
        "--min-dim",
        type=int,
        default=d.min_dim,
        help="keep matrices whose smaller side M >= this (default %(default)s)",
    )
    g.add_argument(
        "--match",
        action="append",
        default=[],
        metavar="REGEX",
        help="analyze only parameters whose name matches (repeatable)",
    )
    g.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="leave out parameters whose name matches (repeatable)",
    )
    g.add_argument(
        "--include",
        action="append",
        default=[],
        choices=KINDS,
        help="also analyze embedding tables / convolution slices (repeatable)",
    )
    g.add_argument(
        "--conv-min-dim",
        type=int,
        default=d.conv_min_dim,
        help="keep convolution slices whose smaller side >= this (default %(default)s)",
    )
    g.add_argument(
        "--split-fused",
        action="store_true",
        help="analyze fused matrices by part: attention in_proj as q/k/v, LSTM/GRU weights by gate",
    )
    g = parser.add_argument_group("numerics")
    g.add_argument(
        "--loose-tol",
        type=float,
        default=d.loose_tol,
        help="absolute singular-value bound of the loose rank (default %(default)s)",
    )
    g.add_argument(
        "--rank-criterion",
        choices=CRITERION_CHOICES,
        default=d.rank_criterion,
        help="rank behind rank_loss and 'collapsed': sv above the loose bound, "
        "numpy's or Numerical Recipes' tolerance, or the storage noise floor; "
        "auto: loose for float32/float64 weights, noise for float16, bfloat16 "
        "and float8 (default %(default)s)",
    )
    g.add_argument(
        "--fit",
        default=",".join(d.fit),
        metavar="ESTIMATORS",
        help="alpha estimators, comma-separated, the first fills alpha/xmin/D: "
        f"{', '.join(ESTIMATORS)} (default %(default)s; docs/estimators.md)",
    )
    g.add_argument(
        "--fit-xmax",
        choices=("none", "max"),
        default=d.fit_xmax,
        help="max: the csn fit bounded at lambda_max, i.e. --fit csn-xmax (default %(default)s)",
    )
    g.add_argument(
        "--method",
        choices=("auto", "svd", "gram"),
        default=d.method,
        help="singular values by Gram eigenvalues with SVD fallback (auto), "
        "SVD only, or Gram only (default %(default)s)",
    )
    g.add_argument(
        "--exact", dest="method", action="store_const", const="svd", help="same as --method svd"
    )
    g.add_argument(
        "--device",
        default=None,
        help="torch device for the spectra, e.g. cuda (default: numpy on the CPU)",
    )
    g.add_argument(
        "--log10-threshold",
        type=float,
        default=d.log10_threshold,
        help="nu_min < 10**this counts as collapsed in aggregates (default %(default)s)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="matrices analyzed in parallel, each with single-threaded BLAS "
        "(default 0: one per CPU core with threadpoolctl installed, else 1 "
        "with multi-threaded BLAS)",
    )
    g.add_argument(
        "--randomize",
        action="store_true",
        help="also analyze each matrix with its elements randomly permuted: "
        "correlation traps and the distance of the ESDs (twice the cost)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of --randomize's permutations, combined with each matrix's "
        "name (default %(default)s)",
    )


def compile_patterns(patterns: Iterable[str], what: str) -> List[Pattern[str]]:
    """The regexes ``patterns`` compiled; an invalid one is an :class:`AnalyzeError` naming it
    as a ``what`` pattern (``"name"``, ``"--plot-match"``)."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise AnalyzeError(f"invalid {what} pattern {pattern!r}: {e}") from None
    return compiled


def add_base_arguments(parser: argparse.ArgumentParser) -> None:
    """``--base`` and ``--delta``: compare each source with a base model
    (:mod:`allennlp_analyze.compare`)."""
    g = parser.add_argument_group("comparison with a base model")
    g.add_argument(
        "--base",
        metavar="SOURCE",
        help="compare each model with this base model (any source the tool reads; "
        "a PEFT LoRA adapter folder is merged into it): matrices paired by name "
        "(identical, else the longest common dotted suffix, equal or transposed "
        "shape), each record gets the change from its base (delta_rel, "
        "delta_sv_max, delta_rank, ...), the summary ranks layers by relative "
        "change and lists what did not pair",
    )
    g.add_argument(
        "--delta",
        action="store_true",
        help="with --base, also analyze each W - W_base as a matrix of its own "
        "(records named delta:NAME)",
    )


def base_arguments(args: argparse.Namespace) -> dict:
    """The keywords of ``analyze`` / ``describe`` that ``--base`` / ``--delta`` set (none
    without ``--base``; ``--delta`` alone is an error)."""
    base = getattr(args, "base", None)
    if base is None:
        if getattr(args, "delta", False):
            raise AnalyzeError("--delta needs --base SOURCE")
        return {}
    return {"base": base, "delta": bool(getattr(args, "delta", False))}


def from_namespace(args: argparse.Namespace) -> AnalysisOptions:
    """Options from parsed arguments (unknown attributes ignored)."""
    names = {f.name for f in fields(AnalysisOptions)}
    return AnalysisOptions(**{k: v for k, v in vars(args).items() if k in names})


def _check_device(device: str) -> None:
    """A torch device string that names an available device (imports torch, only then)."""
    try:
        import torch
    except ImportError:
        raise AnalyzeError(f"--device {device} needs PyTorch; install torch") from None
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AnalyzeError(
            f"--device {device!r} is not a torch device (e.g. cuda, cuda:1)"
        ) from None
    if dev.type not in ("cpu", "cuda"):  # meta holds no data; mps, xpu ... lack float64
        raise AnalyzeError(
            f"--device {device}: only cpu and cuda devices compute the "
            "float64 spectra (e.g. cuda, cuda:1)"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AnalyzeError(f"--device {device}: no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AnalyzeError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present"
        )
