"""Packed quantized checkpoints (GPTQ, AWQ, compressed-tensors, bitsandbytes): pure decoders of
the stored arrays into :class:`~allennlp_analyze.quantized.QuantizedMatrix` objects
(:mod:`.gptq`, :mod:`.awq`, :mod:`.ctensors`, :mod:`.bnb`, on the shared helpers of
:mod:`.intgrid`), and the layer that finds them in a safetensors folder (:mod:`.packed`)."""
