"""A randomly initialised Llama-shaped checkpoint in bfloat16, analyzed end to end.

    .venv/bin/python examples/low_precision/llama_bf16.py --out /tmp/tinyllama   # TinyLlama-1.1B's shapes
    .venv/bin/python examples/low_precision/llama_bf16.py --small --out /tmp/llama_small

Builds ``transformers.LlamaForCausalLM`` from a ``LlamaConfig`` (default: TinyLlama-1.1B's
shapes, hidden 2048, intermediate 5632, 32 heads, 4 key/value heads, vocabulary 32000, but 2
layers instead of 22; ``--small``: hidden 256), casts it to bfloat16, saves it as two
safetensors shards with ``save_pretrained``, then runs ``allennlp-analyze <folder> --min-q 1``
(in this process, through :func:`allennlp_analyze.cli.main`) and prints the report, followed
by one line per matrix: alpha, rank_noise against M, noise_floor against sv_min. About 1.8 GB
of memory and 1-2 minutes on 2 cores at the default size. Random init (std 0.02), so
rectangular matrices are full rank and square ones (q_proj, o_proj: Q = 1, whose smallest
singular values approach 0 as for any square random matrix) lose a few directions below the
bfloat16 noise floor.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from allennlp_analyze.cli import main as analyze_main

SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=256, intermediate_size=704, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096),
}


def build(folder: Path, shapes: dict, layers: int, seed: int) -> None:
    """Random-init Llama in bfloat16, saved as two safetensors shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, **shapes)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # shards are filled in parameter order (embeddings, layers, lm_head): 55% makes two
    model.save_pretrained(folder, max_shard_size=int(0.55 * total), safe_serialization=True)
    del model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the checkpoint")
    parser.add_argument("--small", action="store_true", help="hidden 256 instead of 2048")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = args.out / "checkpoint"
    if not (folder / "model.safetensors.index.json").is_file():
        t = time.perf_counter()
        build(folder, SHAPES["small" if args.small else "tinyllama"], args.layers, args.seed)
        print(f"built {folder} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    print(f"shards: {', '.join(shards)}")
    t = time.perf_counter()
    code = analyze_main([str(folder), "--min-q", "1", "--no-progress"])
    report = args.out / "report.json"
    analyze_main([str(folder), "--min-q", "1", "--no-progress", "--format", "json",
                  "-o", str(report)])
    print(f"analyzed twice (table, json) in {time.perf_counter() - t:.1f} s")
    doc = json.loads(report.read_text())
    print("\nname  N x M  alpha  rank_noise/M  noise_floor  sv_min")
    for r in doc["records"]:
        print(f"{r['name']}  {r['N']} x {r['M']}  {r['alpha']:.3f}  {r['rank_noise']}/{r['M']}"
              f"  {r['noise_floor']:.3g}  {r['sv_min']:.3g}")
    s = doc["summary"]
    print(f"\ncollapsed: {s['collapsed']}; no rank: {s['rank_undefined']}; "
          f"fitted {s['fitted']} of {s['analyzed']}")
    return code


if __name__ == "__main__":
    sys.exit(main())
