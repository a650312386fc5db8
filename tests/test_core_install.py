"""`pip install .` alone (no torch, no AllenNLP, no safetensors) gives a working core and CLI."""
import json
import shutil
import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory):
    """A fresh virtual environment holding only this package and what setup.py requires."""
    root = tmp_path_factory.mktemp("bare-venv")
    venv.create(root / "env", with_pip=True)
    py = root / "env" / "bin" / "python"
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".cache", ".git", "*.egg-info", "__pycache__", "fixtures", "examples", "tests"))
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    str(src)], check=True, cwd=root)
    return py


def test_bare_install_has_no_heavy_dependencies(bare_venv):
    out = subprocess.run([str(bare_venv), "-m", "pip", "list", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    names = {p["name"].lower() for p in json.loads(out)}
    assert "numpy" in names and "allennlp-analyze" in names
    assert not names & {"torch", "allennlp", "safetensors", "matplotlib", "dask", "distributed"}


def test_bare_install_analyzes_safetensors(bare_venv, minilm_path):
    cli = bare_venv.parent / "allennlp-analyze"
    proc = subprocess.run([str(cli), str(minilm_path), "--format", "json"],
                          capture_output=True, text=True, cwd=bare_venv.parent)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)["records"]
    assert len(records) == 12
    assert {(r["N"], r["M"], r["Q"]) for r in records} == {(1536, 384, 4.0)}
    # Values equal an independent float64 SVD of the same tensor, read with numpy here.
    from safetensors.numpy import load_file

    name = "encoder.layer.0.intermediate.dense.weight"
    W = load_file(str(minilm_path))[name].astype(np.float64)
    sv = np.linalg.svd(W, compute_uv=False)
    rec = next(r for r in records if r["name"] == name)
    assert rec["sv_min"] == pytest.approx(sv[-1], rel=1e-8)
    assert rec["sv_max"] == pytest.approx(sv[0], rel=1e-8)


def test_bare_install_reads_torch_checkpoints(bare_venv, tmp_path):
    """A training checkpoint written by torch (in the test's environment) is read by the bare
    install, which has no torch: values equal numpy's SVD of the tensor."""
    import torch

    g = torch.Generator().manual_seed(0)
    W = torch.randn(120, 40, generator=g)
    torch.save({"state_dict": {"fc.weight": W}, "epoch": 2}, tmp_path / "ckpt.pt")
    cli = bare_venv.parent / "allennlp-analyze"
    proc = subprocess.run([str(cli), str(tmp_path / "ckpt.pt"), "--format", "json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("allennlp-analyze: note: ckpt.pt: analyzed 'state_dict'")
    (rec,) = json.loads(proc.stdout)["records"]
    sv = np.linalg.svd(W.numpy().astype(np.float64), compute_uv=False)
    assert rec["sv_min"] == pytest.approx(sv[-1], rel=1e-8)
    assert rec["sv_max"] == pytest.approx(sv[0], rel=1e-8)


def test_bare_install_refuses_pickles_clearly(bare_venv, tmp_path):
    """A pickle without tensors: one clear line, exit 2."""
    f = tmp_path / "weights.th"
    f.write_bytes(b"\x80\x02}q\x00.")  # an (empty) protocol-2 pickle
    cli = bare_venv.parent / "allennlp-analyze"
    proc = subprocess.run([str(cli), str(f)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bare_install_scheduler_needs_dask(bare_venv, minilm_path, tmp_path):
    """Without Dask a sweep still runs here (and resumes); ``--scheduler`` is one clear line."""
    cli = bare_venv.parent / "allennlp-analyze"
    sweep = tmp_path / "sweep.jsonl"
    proc = subprocess.run([str(cli), str(minilm_path), "-o", str(sweep)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert sweep.read_text().count("source_complete") == 1
    proc = subprocess.run([str(cli), str(minilm_path), "--scheduler", "tcp://127.0.0.1:8786"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("allennlp-analyze: error: --scheduler needs Dask distributed, which "
                           "is not installed: pip install 'allennlp-analyze[dask]'\n")
