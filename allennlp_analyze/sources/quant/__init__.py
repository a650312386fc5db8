"""Decoders of quantized weight formats (see :mod:`allennlp_analyze.quantized`)."""
