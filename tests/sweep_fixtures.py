"""Sources for the sweep tests (``test_sweep.py``, ``test_dask.py``): the real fixture archives
and MiniLM, and generated safetensors checkpoints (single and sharded, float32 and float16,
with lost ranks, a NaN matrix, skipped parameters), one of them large enough to be split into
several tasks (:func:`allennlp_analyze.tasks.split`)."""
import json
from pathlib import Path
from typing import Dict, List

import numpy as np
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[1]
ARCHIVES = sorted((REPO / "fixtures" / "archives").glob("*.tar.gz"))


def planted(rng, N: int, M: int, rank: int, dtype=np.float32) -> np.ndarray:
    """An N x M matrix of rank ``rank``: Gaussian factors, scaled to singular values ~1."""
    A = rng.standard_normal((N, rank)) @ rng.standard_normal((rank, M))
    return (A / np.sqrt(N * rank)).astype(dtype)


def small_checkpoint(rng, k: int) -> Dict[str, np.ndarray]:
    """A few small layers: one with lost rank, one square (skipped at Q < 1.1), a bias."""
    return {
        f"layers.{k}.fc1.weight": planted(rng, 96, 48, 48 - k),
        f"layers.{k}.fc2.weight": planted(rng, 48, 120, 48, np.float16),
        f"layers.{k}.fc2.bias": rng.standard_normal(48).astype(np.float32),
        f"layers.{k}.square.weight": planted(rng, 40, 40, 40),
        f"layers.{k}.proj.weight": planted(rng, 200, 64, 64),
    }


def write_sharded(folder: Path, tensors: Dict[str, np.ndarray], shards: int) -> Path:
    """``model.safetensors.index.json`` and ``shards`` shard files holding ``tensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, str(folder / shard))
        weight_map.update({n: shard for n in part})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def big_checkpoint(rng, layers: int = 3) -> Dict[str, np.ndarray]:
    """Work of 3 * 2048 * 1024**2 = 6.4e9 (N * M**2) at the default: above 2 * PART_COST, so
    it is split, one 2048 x 1024 matrix (2.1e9 >= PART_COST) per part, a 0/1 mask in the
    first part, a NaN matrix and a constant one in the last.
    Full rank, so that the cheap Gram path serves them (lost ranks: the small ones)."""
    tensors = {f"blocks.{i}.mlp.weight":
               (rng.standard_normal((2048, 1024)) / 45.0).astype(np.float32) for i in range(layers)}
    bad = planted(rng, 64, 32, 32)
    bad[3, 5] = np.nan
    tensors["blocks.nan.weight"] = bad
    # planned as matrices, left out when read (a 0/1 mask, a constant): counted by parts 1, 4
    tensors["blocks.0.gate01.weight"] = (rng.random((64, 32)) < 0.5).astype(np.float32)
    tensors["blocks.zconst.weight"] = np.full((64, 32), 0.5, dtype=np.float32)
    return tensors


def write_zoo(root: Path, minilm: Path, small: int = 4, big: bool = True) -> List[str]:
    """Source paths (strings, absolute): the fixture archives, MiniLM, ``small`` generated
    single-file checkpoints and (with ``big``) one sharded checkpoint that is split."""
    rng = np.random.default_rng(13)
    root.mkdir(parents=True, exist_ok=True)
    sources = [str(p) for p in ARCHIVES] + [str(minilm)]
    for k in range(small):
        path = root / f"run{k}" / "model.safetensors"  # labels repeat: "model.safetensors"
        path.parent.mkdir()
        save_file(small_checkpoint(rng, k), str(path))
        sources.append(str(path))
    if big:
        sources.append(str(write_sharded(root / "big", big_checkpoint(rng), shards=2)))
    return sources
