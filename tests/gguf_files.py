"""GGUF files written by the ``gguf`` package's own ``GGUFWriter`` (quantized by its own
``gguf.quants.quantize``) and read back by its ``GGUFReader`` and ``quants.dequantize``, and a
Hugging Face Llama state dict converted to GGUF tensors and metadata as llama.cpp's
``convert_hf_to_gguf.py`` does: shared by the tests and by ``fixtures/make_kquant_gguf.py``,
which feeds the result to llama.cpp's quantizer."""
from typing import Any, Dict, Mapping, Tuple

import gguf
import numpy as np

T = gguf.GGMLQuantizationType


def stored(W: np.ndarray, qtype: str) -> np.ndarray:
    """W as GGUF stores it in ``qtype`` (the package's own quantizer; floats as they are)."""
    t = T[qtype]
    if t == T.F32:
        return W.astype(np.float32)
    if t == T.F16:
        return W.astype(np.float16)
    return gguf.quants.quantize(W.astype(np.float32), t)


def write_gguf(path, tensors, arch="llama", meta=None):
    """A GGUF file of ``tensors`` (name -> (array, type name) or raw ``(bytes array,
    type name, True)``) written by ``gguf.GGUFWriter``; ``meta`` values: int (uint32), float
    (float32), str, or a list."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            (w.add_uint32 if isinstance(value, int) else w.add_string)(key, value)
    for name, spec in tensors.items():
        array, qtype = spec[0], spec[1]
        data = array if len(spec) > 2 else stored(array, qtype)
        if T[qtype] in (T.F32, T.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=T[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference(path):
    """Each tensor of a GGUF file as ``gguf.GGUFReader`` reads it, dequantized by
    ``gguf.quants.dequantize`` to float64, out x in."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        if t.tensor_type != T.Q8_1:  # no decoder in gguf
            raw = np.array(t.data).view(np.uint8)
            out[t.name] = gguf.quants.dequantize(raw, t.tensor_type).astype(np.float64)
    return out


def llama_permute(w, n_head, n_head_kv):
    """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama_gguf(state: Mapping[str, np.ndarray], cfg: Any, qtype: str
               ) -> Tuple[Dict[str, Tuple[np.ndarray, str]], Dict[str, Any]]:
    """A Llama state dict (``transformers.LlamaConfig`` ``cfg``) as GGUF tensors (names through
    ``gguf.TensorNameMap``, q/k rows permuted head by head, matrices in ``qtype``, vectors
    F32) and the metadata llama.cpp's loader requires of a llama file."""
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tensors = {}
    for key, W in state.items():
        if key.endswith("q_proj.weight"):
            W = llama_permute(W, n_head, n_head)
        elif key.endswith("k_proj.weight"):
            W = llama_permute(W, n_head, n_kv)
        tensors[names.get_name(key, try_suffixes=(".weight",))] = \
            (W, qtype if W.ndim == 2 else "F32")
    meta: Dict[str, Any] = {
        "llama.block_count": cfg.num_hidden_layers, "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_kv,
        "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": cfg.hidden_size,
        "llama.feed_forward_length": cfg.intermediate_size,
        "llama.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "tokenizer.ggml.tokens": [f"token{i}" for i in range(cfg.vocab_size)],
        "tokenizer.ggml.scores": [float(i) for i in range(cfg.vocab_size)]}
    return tensors, meta

