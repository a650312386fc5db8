"""``allennlp analyze ARCHIVE [ARCHIVE ...]``: the standalone command's options and report, with
the models built by AllenNLP (module types per matrix) and AllenNLP's ``--weights-file``,
``--overrides``, ``--cuda-device`` and ``--include-package``."""

import argparse
import functools
import logging
import os
import sys
from typing import List, Optional

from allennlp.commands.subcommand import Subcommand

from .. import cli
from ..api import Analysis, analyze
from ..describe import Description, describe
from ..errors import AnalyzeError, one_line
from .loading import check_cuda_device, check_weights_file, open_model_source, overrides_dict

PROG = "allennlp analyze"


@Subcommand.register("analyze")
class Analyze(Subcommand):
    #: AllenNLP would import ``--include-package`` modules itself, before the command runs and
    #: outside its error handling (a missing module: a traceback); the command does it.
    requires_plugins = False

    def add_subparser(self, parser: argparse._SubParsersAction) -> argparse.ArgumentParser:
        description = (
            cli.DESCRIPTION + " ARCHIVE is a model archive, a serialization directory "
            "or an http(s) URL (downloaded once into AllenNLP's cache). The model is "
            "built where possible, so each matrix is reported with its module type; "
            "otherwise the raw weights are analyzed, with a note on stderr."
        )
        subparser = parser.add_parser(
            self.name,
            description=description,
            help="Rank collapse and power-law spectra of a model's weight matrices.",
        )
        cli.add_arguments(subparser)
        for action in subparser._actions:  # the shared options, told in this command's terms
            if action.dest == "sources":
                action.metavar = "ARCHIVE"
                action.help = (
                    "model archive (.tar.gz), serialization directory or http(s) URL; "
                    "also any other source allennlp-analyze reads (a Hugging Face "
                    "hub id ORG/NAME[@REVISION]...), or a glob"
                )
            elif action.dest == "cache_dir":
                action.help = (
                    "where downloaded archives are kept (default: AllenNLP's cache, "
                    "$ALLENNLP_CACHE_ROOT/cache, else ~/.allennlp/cache)"
                )
        g = subparser.add_argument_group("AllenNLP")
        g.add_argument(
            "--weights-file", type=str, help="a path that overrides which weights file to use"
        )
        g.add_argument(
            "--overrides",
            type=str,
            default="",
            help="a JSON structure used to override the model's configuration",
        )
        g.add_argument(
            "--cuda-device",
            type=int,
            default=-1,
            help="id of the GPU to build the model on (-1: CPU)",
        )
        g.add_argument(
            "--include-package",
            dest="packages",
            action="append",
            default=[],
            metavar="PACKAGE",
            help="additional packages to include (their models and modules)",
        )
        subparser.error = functools.partial(_usage_error, subparser)  # one line, like cli's
        subparser.set_defaults(func=_run)
        return subparser


def _usage_error(parser: argparse.ArgumentParser, message: str):
    parser.exit(2, f"{PROG}: error: {message}\n")


def _include_packages(packages: List[str]) -> None:
    """Import ``--include-package`` modules (and their submodules), as AllenNLP would."""
    from allennlp.common.util import import_module_and_submodules

    for name in packages:
        try:
            import_module_and_submodules(name)
        except Exception as e:  # ModuleNotFoundError, or the package's own error
            raise AnalyzeError(
                f"--include-package {name}: cannot import it ({type(e).__name__}: {one_line(e)})"
            ) from None


def check_arguments(args: argparse.Namespace) -> None:
    """The standalone command's checks (:func:`allennlp_analyze.cli.check_arguments`) and
    AllenNLP's options, before any package is imported or source opened."""
    cli.check_arguments(args)
    check_cuda_device(args.cuda_device)
    if args.overrides:
        overrides_dict(args.overrides)
    if args.weights_file:
        check_weights_file(args.weights_file)


def _run(args: argparse.Namespace) -> None:
    _quiet_logging()

    loading = dict(
        weights_file=args.weights_file, overrides=args.overrides, cuda_device=args.cuda_device
    )

    def analyze_fn(*specs, **kwargs) -> Analysis:
        return analyze_archives(*specs, **loading, **kwargs)

    def describe_fn(*specs, **kwargs) -> Description:
        return describe(*specs, opener=_opener(**loading), **kwargs)

    def run() -> int:
        check_arguments(args)
        _include_packages(args.packages)
        return cli.run(args, analyze_fn=analyze_fn, prog=PROG, describe_fn=describe_fn)

    sys.exit(cli.guarded(run, PROG))


def _opener(weights_file: Optional[str] = None, overrides: str = "", cuda_device: int = -1):
    """Opens each source with AllenNLP (:func:`~.loading.open_model_source`): models built where
    they can be, module types known. A partial of a module function, so that tasks on an
    executor (a process pool, a Dask cluster) can take it."""
    return functools.partial(
        open_model_source, weights_file=weights_file, overrides=overrides, cuda_device=cuda_device
    )


def analyze_archives(
    *specs: str,
    weights_file: Optional[str] = None,
    overrides: str = "",
    cuda_device: int = -1,
    **kwargs,
) -> Analysis:
    """:func:`allennlp_analyze.analyze` with each source opened by AllenNLP: models built where
    they can be, module types known."""
    return analyze(*specs, opener=_opener(weights_file, overrides, cuda_device), **kwargs)


def _quiet_logging() -> None:
    """AllenNLP logs at INFO by default; a report keeps stderr for notes, warnings and errors,
    unless ``ALLENNLP_LOG_LEVEL`` / ``ALLENNLP_DEBUG`` ask for more."""
    if not (os.environ.get("ALLENNLP_LOG_LEVEL") or os.environ.get("ALLENNLP_DEBUG")):
        logging.getLogger().setLevel(logging.WARNING)


__all__: List[str] = ["Analyze", "analyze_archives"]

# AllenNLP imports plugins (this module) before it runs a plugin's subcommand, and logs
# "Plugin ... available" at INFO right after: in an `allennlp analyze` process, quiet it too.
if sys.argv[1:2] == ["analyze"]:
    _quiet_logging()
