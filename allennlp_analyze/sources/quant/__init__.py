"""Decoders of quantized weight formats (see :mod:`allennlp_analyze.quantized`): GGUF's block
types (:mod:`.gguf_blocks`), and packed quantized checkpoints (GPTQ, AWQ, compressed-tensors,
bitsandbytes): pure decoders of the stored arrays (:mod:`.gptq`, :mod:`.awq`, :mod:`.ctensors`,
:mod:`.bnb`, on the shared helpers of :mod:`.intgrid`), and the layer that finds them in a
safetensors folder (:mod:`.packed`)."""
