"""AllenNLP front-ends, the only part of the package that imports AllenNLP.

Importing this module registers:

* the subcommand ``allennlp analyze`` (:mod:`.subcommand`);
* the trainer callback ``weight_analysis`` (:mod:`.callback`).

AllenNLP imports it as a plugin when it is listed in ``.allennlp_plugins`` (the working
directory) or in ``~/.allennlp/plugins`` (``python -m allennlp_analyze.plugin.register`` adds
it there), or with ``--include-package allennlp_analyze.plugin``.
"""

from .callback import RankCollapseError, WeightAnalysisCallback
from .subcommand import Analyze, analyze_archives

__all__ = ["Analyze", "RankCollapseError", "WeightAnalysisCallback", "analyze_archives"]
