"""A Llama-shaped bfloat16 checkpoint for the benchmark: TinyLlama-1.1B's shapes (hidden 2048,
MLP 5632, 32 heads of which 4 key/value heads, vocabulary 32000, untied lm_head), 2 layers,
randomly initialized from ``transformers.LlamaConfig`` (nothing downloaded), saved the way LLMs
are published: safetensors in two shards with an index.

    python benchmarks/make_llama.py OUT_DIR [--layers 2]

With ``--min-q 1`` ``allennlp-analyze`` finds 7 matrices per layer (q, k, v, o, gate, up, down)
and the lm_head: 15 for 2 layers (the embedding table is left out by default).
"""
import argparse
from pathlib import Path

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                 tie_word_embeddings=False)


def make(out: Path, layers: int = 2, seed: int = 0) -> Path:
    """Write the checkpoint into ``out`` (if its index is not there yet); returns ``out``."""
    if (out / "model.safetensors.index.json").exists():
        return out
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=layers, **TINYLLAMA)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="300MB")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    print(make(args.out, args.layers))


if __name__ == "__main__":
    main()
