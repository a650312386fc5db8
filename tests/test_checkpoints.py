"""Checkpoints as training scripts save them (issue 16), read without running code from them.

Every layout is written here by torch / Lightning / numpy; its records must equal those of the
inner state dict analyzed from memory (torch's own tensors, a different reader), and the values
read must equal torch's / numpy's bit for bit. Payload pickles that would create a file if they
ran prove that nothing runs. Hostile tensors (issue 12: a stride-0 view of a KB file, sparse
tensors, a 5-million-float pickle) end as one line, in bounded time, before anything is
allocated.
"""
import argparse
import builtins
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from allennlp_analyze import analyze
from allennlp_analyze.errors import AnalyzeError
from allennlp_analyze.sources import open_source
from allennlp_analyze.sources.torch_format import MAX_DENSE_ELEMENTS

REPO = Path(__file__).resolve().parents[1]


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def records(result, *drop):
    return [{k: v for k, v in r.items() if k not in ("model",) + drop} for r in result.to_dicts()]


def state_dict(seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(40, 120), nn.ReLU(), nn.Linear(120, 30))
    return net.state_dict()


def cli(*args, timeout=120):
    """``python -m allennlp_analyze ARGS`` in a subprocess: (exit code, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "allennlp_analyze", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr


# ---------------------------------------------------------------------------------------------
# Layouts


def _optimizer_state(sd):
    params = [nn.Parameter(t.clone()) for t in sd.values()]
    opt = torch.optim.Adam(params, lr=1e-3)
    sum((p ** 2).sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


def layouts(sd, ema):
    """(name, checkpoint, the part expected analyzed, the note's fragments)."""
    opt = _optimizer_state(sd)
    return [
        ("state_dict", {"state_dict": sd, "epoch": 3, "global_step": 120},
         "state_dict", ["analyzed 'state_dict' (4 tensors)"]),
        ("model_state_dict", {"epoch": 1, "model_state_dict": sd, "optimizer_state_dict": opt,
                              "loss": 0.25},
         "model_state_dict", ["analyzed 'model_state_dict'", "'optimizer_state_dict' (12 tensors)"]),
        ("speaker_encoder", {"step": 1000, "model_state": sd, "optimizer_state": opt},
         "model_state", ["analyzed 'model_state'", "left out 'optimizer_state'"]),
        ("fairseq_like", {"args": argparse.Namespace(lr=0.1, arch="mlp"), "model": sd,
                          "optimizer_history": [{"lr": [0.1]}], "extra_state": {"epoch": 2}},
         "model", ["analyzed 'model'", "argparse.Namespace"]),
        ("deepspeed_like", {"module": sd, "optimizer": opt, "lr_scheduler": {"last_epoch": 3},
                            "global_steps": 7},
         "module", ["analyzed 'module'", "'optimizer' (12 tensors)"]),
        ("wrapped_twice", {"model": {"module": sd}, "epoch": 2}, "model.module",
         ["analyzed 'model.module'"]),
        ("with_ema", {"state_dict": sd, "state_dict_ema": ema}, "state_dict",
         ["'state_dict_ema' (4 tensors)", "--checkpoint-key"]),
    ]


def _part(checkpoint, dotted):
    for key in dotted.split("."):
        checkpoint = checkpoint[key]
    return checkpoint


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_nested_checkpoints_give_the_inner_state_dict(tmp_path, legacy):
    sd, ema = state_dict(0), state_dict(1)
    for name, checkpoint, part, fragments in layouts(sd, ema):
        path = tmp_path / f"{name}.pt"
        torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
        if "Namespace" in str(fragments):  # what torch's own safe loader refuses
            with pytest.raises(pickle.UnpicklingError):
                torch.load(path, weights_only=True)
        inner = _part(checkpoint, part)
        source = open_source(path)
        assert [i.name for i in source.tensors()] == list(inner), name
        for info in source.tensors():
            assert same(source.load(info.name), inner[info.name].numpy()), (name, info.name)
        for fragment in fragments:
            assert fragment in source.note, (name, source.note)
        result = analyze(path, min_q=1.0)
        assert records(result) == records(analyze(dict(inner), min_q=1.0)), name
        assert result.summary.notes == [f"{path.name}: {source.note}"]


def test_records_match_numpy_svd(tmp_path):
    sd = state_dict(0)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd, "epoch": 1}, path)
    for rec in analyze(path).to_dicts():
        sv = np.linalg.svd(sd[rec["name"]].numpy().astype(np.float64), compute_uv=False)
        assert rec["sv_max"] == pytest.approx(sv[0], rel=1e-9)
        assert rec["sv_min"] == pytest.approx(sv[-1], rel=1e-8)
        assert rec["rank_numpy"] == np.linalg.matrix_rank(
            sd[rec["name"]].numpy().astype(np.float64),
            tol=sv[0] * max(sd[rec["name"]].shape) * np.finfo(np.float32).eps)


def test_checkpoint_key_chooses_the_part(tmp_path):
    sd, ema = state_dict(0), state_dict(1)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": sd, "state_dict_ema": ema, "nested": {"enc": dict(sd)}}, path)
    chosen = analyze(path, checkpoint_key="state_dict_ema")
    assert records(chosen) == records(analyze(dict(ema)))
    assert chosen.summary.notes == []
    dotted = open_source(path, checkpoint_key="nested.enc")
    assert [i.name for i in dotted.tensors()] == list(sd)
    with pytest.raises(AnalyzeError) as e:
        open_source(path, checkpoint_key="ema")
    message = str(e.value)
    assert "has no part 'ema'" in message and "'state_dict_ema'" in message and "\n" not in message
    # in memory too
    mapping = open_source({"model": dict(sd), "ema": dict(ema), "step": 3}, checkpoint_key="ema")
    assert [i.name for i in mapping.tensors()] == list(ema)
    assert same(mapping.load("0.weight"), ema["0.weight"].numpy())
    # and on the command line: the note on stderr, the part chosen with --checkpoint-key
    code, out, err = cli(path, "--format", "json")
    assert code == 0, err
    assert err.splitlines() == [f"allennlp-analyze: note: ckpt.pt: analyzed 'state_dict' "
                                "(4 tensors); left out 'state_dict_ema' (4 tensors), 'nested' "
                                "(4 tensors) (--checkpoint-key chooses the part)"]
    assert json.loads(out)["summary"]["notes"] == [err.split("note: ", 1)[1].strip()]
    code, out, err = cli(path, "--format", "json", "--checkpoint-key", "state_dict_ema")
    assert code == 0 and err == "", err
    assert [r["sv_min"] for r in json.loads(out)["records"]] == \
        [r.sv_min for r in analyze(dict(ema)).records]
    code, out, err = cli(path, "--checkpoint-key", "nope")
    assert code == 2 and len(err.splitlines()) == 1 and "has no part 'nope'" in err


def test_no_usual_key_takes_every_tensor_but_the_optimizer_state(tmp_path):
    enc, dec = state_dict(0), state_dict(1)
    checkpoint = {"encoder": enc, "decoder": dec, "optimizer": _optimizer_state(enc),
                  "history": [0.5, 0.25]}
    path = tmp_path / "gan.pt"
    torch.save(checkpoint, path)
    source = open_source(path)
    expected = {f"encoder.{k}": v for k, v in enc.items()} | {f"decoder.{k}": v for k, v in dec.items()}
    assert [i.name for i in source.tensors()] == list(expected)
    assert all(same(source.load(n), t.numpy()) for n, t in expected.items())
    assert source.note == ("analyzed all the tensors (8 tensors); left out 'optimizer' "
                           "(12 tensors) (--checkpoint-key chooses the part)")  # Adam: 3 per param
    torch.save({"optimizer": _optimizer_state(enc), "epoch": 3}, tmp_path / "optimizer.pt")
    with pytest.raises(AnalyzeError, match="holds tensors only under 'optimizer', optimizer or "
                                           "scheduler state, left out by default"):
        open_source(tmp_path / "optimizer.pt")
    assert len(open_source(tmp_path / "optimizer.pt", checkpoint_key="optimizer").tensors()) == 12
    # lists are walked too; a flat state dict beside plain values needs no note
    torch.save([enc, dec], tmp_path / "list.pt")
    assert [i.name for i in open_source(tmp_path / "list.pt").tensors()][:2] == ["0.0.weight", "0.0.bias"]
    torch.save({**enc, "step": 3, "name": "x"}, tmp_path / "flat.pt")
    flat = open_source(tmp_path / "flat.pt")
    assert [i.name for i in flat.tensors()] == list(enc) and flat.note is None


def test_whole_pickled_module_and_plain_pickle(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 120), nn.Tanh(), nn.LSTM(120, 30))
    torch.save(net, tmp_path / "model.pt")
    source = open_source(tmp_path / "model.pt")
    sd = net.state_dict()
    assert [i.name for i in source.tensors()] == list(sd)
    assert {i.name: i.module_type for i in source.tensors()}["2.weight_ih_l0"] == "LSTM"
    assert all(same(source.load(n), t.numpy()) for n, t in sd.items())
    assert "torch.nn.modules.linear.Linear" in source.note
    # pickle.dump of tensors: each storage is a small torch stream of its own
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"state_dict": sd}, f, protocol=4)
    plain = open_source(tmp_path / "plain.pkl")
    assert all(same(plain.load(n), t.numpy()) for n, t in sd.items())


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_numpy_arrays_inside_pickles(tmp_path, protocol):
    rng = np.random.default_rng(0)
    arrays = {"W": rng.standard_normal((30, 10)).astype(np.float32),
              "F": np.asfortranarray(rng.standard_normal((6, 4))),
              "big_endian": np.arange(5, dtype=">i8"), "h": rng.standard_normal((3, 3)).astype(np.float16)}
    path = tmp_path / "arrays.pkl"
    path.write_bytes(pickle.dumps({"model": arrays, "best": np.float64(0.5),
                                   "objects": np.array([Reduce(os.system, "true")], dtype=object)},
                                  protocol=protocol))
    source = open_source(path)
    assert [i.name for i in source.tensors()] == list(arrays)
    for name, array in arrays.items():
        loaded = source.load(name)
        assert np.array_equal(loaded, array) and loaded.dtype == array.dtype.newbyteorder("=")
    assert "posix.system" in source.note  # the object array's content stayed inert


def test_lightning_ckpt_from_a_real_trainer(tmp_path):
    L = pytest.importorskip("lightning")

    class Tiny(L.LightningModule):
        def __init__(self, args: argparse.Namespace, hidden: int = 48):
            super().__init__()
            self.save_hyperparameters()
            self.fc1, self.fc2 = nn.Linear(16, hidden), nn.Linear(hidden, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 16, generator=g),
                                          torch.randint(0, 3, (64,), generator=g))
    torch.manual_seed(0)
    model = Tiny(argparse.Namespace(lr=1e-2, name="tiny"))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):  # the Namespace in hyper_parameters
        torch.load(path, weights_only=True)
    inner = model.state_dict()
    result = analyze(path, min_q=1.0)
    assert records(result) == records(analyze(dict(inner), min_q=1.0))
    assert [r.name for r in result.records] == ["fc1.weight", "fc2.weight"]
    note = result.summary.notes[0]
    assert note.startswith("tiny.ckpt: analyzed 'state_dict' (4 tensors); left out ")
    assert "'optimizer_states' (12 tensors)" in note  # Adam: step, exp_avg, exp_avg_sq
    assert "argparse.Namespace" in note
    source = open_source(path)
    assert all(same(source.load(n), t.detach().numpy()) for n, t in inner.items())


# ---------------------------------------------------------------------------------------------
# Payloads: pickles that would create a file if anything in them ran


class Reduce:
    """Unpickling calls ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # lets pickle take it as a callable (never called here)
        raise AssertionError("called")


class SetState:
    """Unpickling (by plain pickle) imports this module and calls ``__setstate__``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __setstate__(self, state):
        open(state["marker"], "w").close()


def payloads(marker: Path):
    m = str(marker)
    return {
        "os.system": Reduce(os.system, f"touch {m}"),
        "eval": Reduce(eval, f"open({m!r}, 'w').close()"),
        "builtins.exec": Reduce(builtins.exec, f"open({m!r}, 'w').close()"),
        "subprocess.check_call": Reduce(subprocess.check_call, ["touch", m]),
        "getattr chain": Reduce(Reduce(getattr, Reduce(builtins.__import__, "builtins"), "exec"),
                                f"open({m!r}, 'w').close()"),
        "__setstate__": SetState(marker),
    }


def test_payloads_are_live(tmp_path):
    """Each payload does create its file under plain pickle (so the tests below mean it)."""
    for kind, payload in payloads(tmp_path / "live").items():
        pickle.loads(pickle.dumps(payload, protocol=2))
        assert (tmp_path / "live").exists(), kind
        (tmp_path / "live").unlink()


def test_payloads_never_run(tmp_path):
    marker = tmp_path / "pwned"
    sd = state_dict(0)
    for kind, payload in payloads(marker).items():
        for fmt in ("zip", "legacy", "pickle0", "pickle2", "pickle5"):
            alone = tmp_path / f"alone-{fmt}.pt"
            nested = tmp_path / f"nested-{fmt}.pt"
            for path, obj in ((alone, {"w": payload}),
                              (nested, {"state_dict": sd, "extra": {"hook": payload}})):
                if fmt in ("zip", "legacy"):
                    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
                elif path is alone:
                    path.write_bytes(pickle.dumps(obj, protocol=int(fmt[-1])))
                else:
                    continue  # torch tensors need torch.save
            with pytest.raises(AnalyzeError) as e:
                open_source(alone)
            message = str(e.value)
            assert "refused to unpickle arbitrary objects" in message and "\n" not in message
            if fmt in ("zip", "legacy"):
                source = open_source(nested)
                assert [i.name for i in source.tensors()] == list(sd)
                assert "never ran" in source.note
            assert not marker.exists(), (kind, fmt)


def test_payload_on_the_command_line(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.th"
    torch.save({"w": Reduce(os.system, f"touch {marker}")}, evil)
    code, out, err = cli(evil)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "refused to unpickle arbitrary objects: posix.system" in err
    assert not marker.exists()


def test_nothing_is_imported(tmp_path):
    """A global naming a module that is not imported yet (``this`` prints on import) stays a
    name: the module is never imported."""
    data = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01cthis\nrot13\nq\x02s."
    path = tmp_path / "imports.th"
    path.write_bytes(data)
    assert "this" not in sys.modules
    with pytest.raises(AnalyzeError, match="this.rot13"):
        open_source(path)
    assert "this" not in sys.modules


# ---------------------------------------------------------------------------------------------
# Hostile tensors (issue 12's cases owned here)


class _Storage:
    """Stands for a storage in a hand-made torch zip file (see :func:`torch_zip`)."""

    def __init__(self, key, numel, cls=torch.FloatStorage):
        self.key, self.numel, self.cls = key, numel, cls


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, torch.Size(size), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def torch_zip(path: Path, obj, storages: dict):
    """A torch zip file holding ``obj`` (with :class:`_Tensor` in it) and raw storage bytes,
    so that sizes and strides can lie."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                return ("storage", o.cls, o.key, "cpu", o.numel)
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


def test_expanded_views_are_checked_before_anything_is_allocated(tmp_path):
    row = torch.randn(6000)
    big = tmp_path / "expanded.pt"
    torch.save({"w": row.expand(30000, 6000)}, big)
    assert big.stat().st_size < 40_000
    with pytest.raises(AnalyzeError) as e:
        open_source(big)
    assert "holds no tensor that can be read ('w': an expanded view of 6000 stored values as " \
           "180000000 elements" in str(e.value)
    # beside readable tensors it is left out, with a note; a small expanded view is read
    mixed = tmp_path / "mixed.pt"
    small = torch.randn(50).expand(200, 50)
    torch.save({"w": row.expand(30000, 6000), "ok": torch.randn(90, 30), "small": small}, mixed)
    result = analyze(mixed)
    assert [r.name for r in result.records] == ["ok", "small"]
    assert "left out 1 tensor that are not read: 'w' (an expanded view" in result.summary.notes[0]
    assert same(open_source(mixed).load("small"), small.contiguous().numpy())
    # both command lines: one line, exit 2, in bounded time (subprocess timeouts)
    code, out, err = cli(big, timeout=60)
    assert code == 2 and len(err.splitlines()) == 1 and "expanded view" in err, err


def test_storage_and_tensor_sizes_are_validated(tmp_path):
    data = np.arange(12, dtype=np.float32).tobytes()
    cases = {
        # the pickle claims a storage of 10**12 elements, the file holds 12
        "huge_storage": ({"w": _Tensor(_Storage("0", 10**12), 0, (10**6, 10**6), (10**6, 1))},
                         "storage 0 holds 48 bytes, the pickle says 4000000000000"),
        "past_the_end": ({"w": _Tensor(_Storage("0", 12), 0, (4, 4), (4, 1))},
                         "reaches past the end of its storage (12 elements)"),
        "offset": ({"w": _Tensor(_Storage("0", 12), 10, (2, 2), (2, 1))}, "past the end"),
        "negative": ({"w": _Tensor(_Storage("0", 12), 0, (3, 4), (-4, 1))}, "bad stride"),
        "missing": ({"w": _Tensor(_Storage("1", 12), 0, (3, 4), (4, 1))},
                    "storage 1 is missing"),
    }
    for case, (obj, fragment) in cases.items():
        path = torch_zip(tmp_path / f"{case}.pt", obj, {"0": data})
        with pytest.raises(AnalyzeError) as e:
            open_source(path)
        assert fragment in str(e.value), (case, str(e.value))
    good = torch_zip(tmp_path / "good.pt", {"w": _Tensor(_Storage("0", 12), 0, (3, 4), (4, 1))},
                     {"0": data})
    assert same(open_source(good).load("w"), torch.load(good, weights_only=True)["w"].numpy())
    # a truncated legacy file: its storages end past the end of the file
    buf = io.BytesIO()
    torch.save({"w": torch.randn(100, 100)}, buf, _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(buf.getvalue()[:-100])
    with pytest.raises(AnalyzeError, match="past the end of the file"):
        open_source(cut)


def test_sparse_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randint(0, 120, (900,), generator=g),
                         torch.randint(0, 40, (900,), generator=g)])
    small = torch.sparse_coo_tensor(index, torch.randn(900, generator=g), (120, 40))  # duplicates
    big = torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.tensor([1.0]), (40000, 20000))
    path = tmp_path / "sparse.pt"
    torch.save({"small": small, "big": big, "dense": torch.randn(60, 30, generator=g)}, path)
    source = open_source(path)
    assert [i.name for i in source.tensors()] == ["small", "dense"]
    assert same(source.load("small"), small.to_dense().numpy())
    assert f"'big' (a sparse tensor of 800000000 elements in dense form, over " \
           f"{MAX_DENSE_ELEMENTS})" in source.note
    result = analyze(path)
    assert records(result)[0] == records(analyze({"small": small.to_dense()}))[0]
    only_big = tmp_path / "big.pt"
    torch.save({"big": big}, only_big)
    code, out, err = cli(only_big, timeout=60)
    assert code == 2 and len(err.splitlines()) == 1 and "sparse tensor" in err, err


def test_pickles_without_tensors_are_one_line(tmp_path):
    floats = tmp_path / "floats.pkl"
    floats.write_bytes(pickle.dumps([float(i) for i in range(5_000_000)], protocol=2))
    torch.save(5, tmp_path / "int.pt")
    torch.save("text", tmp_path / "str.pt")
    torch.save({"a": {1, 2}}, tmp_path / "set.pt")
    torch.save(None, tmp_path / "none.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02" + np.random.default_rng(0).bytes(200))
    (tmp_path / "huge_bytes.pt").write_bytes(b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"x")
    fragments = {"floats.pkl": "a list of 5000000 entries (float)", "int.pt": "holds no tensors (int)",
                 "str.pt": "(str)", "set.pt": "'a' (set)", "none.pt": "(NoneType)",
                 "empty.pt": "is empty", "garbage.pt": "", "huge_bytes.pt": "claims more memory"}
    code, out, err = cli(*(tmp_path / name for name in fragments), timeout=60)
    assert code == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == len(fragments), err
    for line, (name, fragment) in zip(lines, fragments.items()):
        assert line.startswith("allennlp-analyze: error: ") and name in line and fragment in line, line


# ---------------------------------------------------------------------------------------------
# numpy files


def test_npy_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"W_z": rng.standard_normal((90, 30)), "W_r": rng.standard_normal((90, 30)).astype(np.float32),
              "b": rng.standard_normal(30).astype(np.float16), "ids": np.arange(12).reshape(3, 4),
              "fortran": np.asfortranarray(rng.standard_normal((80, 20))),
              "big_endian": rng.standard_normal((70, 20)).astype(">f4")}
    np.savez(tmp_path / "gru.npz", **arrays)
    np.savez_compressed(tmp_path / "gru_small.npz", **arrays)
    np.save(tmp_path / "W_z.npy", arrays["W_z"])
    for name in ("gru.npz", "gru_small.npz"):
        source = open_source(tmp_path / name)
        assert [i.name for i in source.tensors()] == list(arrays)
        with np.load(tmp_path / name, allow_pickle=False) as ref:
            for key in arrays:
                assert np.array_equal(source.load(key), ref[key]) and \
                    source.load(key).dtype == ref[key].dtype.newbyteorder("="), key
        assert records(analyze(tmp_path / name)) == records(analyze(arrays))
    npy = open_source(tmp_path / "W_z.npy")
    assert [i.name for i in npy.tensors()] == ["W_z"] and same(npy.load("W_z"), arrays["W_z"])
    # recognised by content too
    (tmp_path / "blob").write_bytes((tmp_path / "gru.npz").read_bytes())
    (tmp_path / "blob2").write_bytes((tmp_path / "W_z.npy").read_bytes())
    assert type(open_source(tmp_path / "blob")).__name__ == "NpzSource"
    assert type(open_source(tmp_path / "blob2")).__name__ == "NpySource"


def test_numpy_object_arrays_and_truncation_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "objects.npy", np.array([Reduce(os.system, f"touch {marker}")],
                                               dtype=object), allow_pickle=True)
    np.savez(tmp_path / "objects.npz", w=np.array([1, "x"], dtype=object))
    np.save(tmp_path / "full.npy", np.zeros((100, 50)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:-8])
    for name, fragment in (("objects.npy", "holds Python objects"),
                           ("objects.npz", "holds Python objects"),
                           ("cut.npy", "is truncated")):
        with pytest.raises(AnalyzeError) as e:
            open_source(tmp_path / name)
        assert fragment in str(e.value) and name in str(e.value)
    assert not marker.exists()


def test_compressed_members_that_expand_too_much_are_refused(tmp_path):
    np.savez_compressed(tmp_path / "bomb.npz", w=np.zeros((2000, 2000)))  # 32 MB in ~30 KB
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000
    with pytest.raises(AnalyzeError, match="over 100x: refused"):
        open_source(tmp_path / "bomb.npz")


# ---------------------------------------------------------------------------------------------
# The AllenNLP front-end reads weights.th the same way


def test_allennlp_archive_with_a_nested_legacy_checkpoint(tmp_path):
    pytest.importorskip("allennlp")
    import tarfile

    from allennlp_analyze.plugin.subcommand import analyze_archives

    tagger = REPO / "fixtures" / "archives" / "tagger_lstm.tar.gz"
    with tarfile.open(tagger, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    sd = torch.load(io.BytesIO(members["weights.th"]), weights_only=True)
    buf = io.BytesIO()
    torch.save({"model": sd, "epoch": 4, "args": argparse.Namespace(lr=1)}, buf,
               _use_new_zipfile_serialization=False)
    members["weights.th"] = buf.getvalue()
    def tar(path: Path, members: dict) -> Path:
        with tarfile.open(path, "w:gz") as out:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
        return path

    archive = tar(tmp_path / "nested.tar.gz", members)
    nested = analyze_archives(str(archive))
    plain = analyze_archives(str(tagger))
    # a hostile weights.th (issue 12): the same one line from `allennlp analyze`, quickly
    buf = io.BytesIO()
    torch.save({"w": torch.randn(6000).expand(30000, 6000)}, buf)
    members["weights.th"] = buf.getvalue()
    with pytest.raises(AnalyzeError, match=r"\(member weights.th\) holds no tensor that can be "
                                           r"read \('w': an expanded view"):
        analyze_archives(str(tar(tmp_path / "expanded.tar.gz", members)))
    assert records(nested) == records(plain)  # the model was built: module types filled in
    assert all(r["module_type"] for r in records(nested))
    assert nested.summary.notes[0].startswith("nested.tar.gz: analyzed 'model'")
