"""Over-regularization causes rank collapse: an AllenNLP experiment on scikit-learn's digits.

Importing this package registers the ``digits`` dataset reader and the ``digits_mlp`` model
(``allennlp train ... --include-package l2_rank_collapse`` with ``examples/`` on PYTHONPATH).
``run.py`` trains the L2 sweep and writes the CSV and figures; see ``docs/experiment.md``.
"""
from .digits_model import DigitsMLP
from .digits_reader import DigitsReader

__all__ = ["DigitsMLP", "DigitsReader"]
