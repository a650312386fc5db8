"""TorchScript archives (``torch.jit.save`` of ``torch.jit.script`` / ``torch.jit.trace`` of real
modules: an MLP with a buffer, an LSTM tagger, a small CNN, a transformers BERT encoder), read
without torch.jit.load: the tensors are the module's ``state_dict()`` (names, order, values),
module types and buffers as the live module says, and every record equals the one of the same
module's state dict saved with ``torch.save`` and numpy's SVD of the state dict's tensor."""
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from allennlp_analyze import analyze
from allennlp_analyze.errors import AnalyzeError
from allennlp_analyze.selection import plan
from allennlp_analyze.options import AnalysisOptions
from allennlp_analyze.sources import ModuleSource, open_source

OPTIONS = {"min_q": 1.0, "include": ("conv", "embeddings"), "conv_min_dim": 1,
           "split_fused": True}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 40)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(40, 6)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) * self.scale


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.lstm = nn.LSTM(12, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(32, 7, bias=False)

    def forward(self, ids):
        out, _ = self.lstm(self.embed(ids))
        return self.head(out)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 24, 5, bias=False))
        self.classifier = nn.Linear(24, 10)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def _bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                        torchscript=True)
    return BertModel(config).eval(), (torch.randint(0, 100, (1, 8)),)


def _models():
    torch.manual_seed(0)
    mlp, tagger, cnn = MLP().eval(), Tagger().eval(), CNN().eval()
    cnn.features[1].running_mean.uniform_(-1, 1)  # a buffer that is not its initial value
    return {
        "mlp": (mlp, (torch.randn(2, 24),)),
        "tagger": (tagger, (torch.randint(0, 50, (2, 5)),)),
        "cnn": (cnn, (torch.randn(1, 3, 12, 12),)),
        "bert": _bert(),
    }


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """``{(model, how): (archive path, state-dict path, module)}``."""
    root = tmp_path_factory.mktemp("torchscript")
    found = {}
    for name, (module, inputs) in _models().items():
        state = root / f"{name}_state.pt"
        torch.save(module.state_dict(), state)
        hows = ("trace",) if name == "bert" else ("script", "trace")
        for how in hows:
            with torch.no_grad():
                compiled = torch.jit.script(module) if how == "script" else \
                    torch.jit.trace(module, inputs, check_trace=False)
            path = root / f"{name}_{how}.pt"
            torch.jit.save(compiled, str(path))
            found[(name, how)] = (path, state, module)
    return found


def _cases():
    return [(n, h) for n in ("mlp", "tagger", "cnn", "bert") for h in ("script", "trace")
            if not (n == "bert" and h == "script")]


@pytest.mark.parametrize("case", _cases())
def test_tensors_are_the_state_dict(archives, case):
    path, _, module = archives[case]
    names = zipfile.ZipFile(path).namelist()
    assert any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names)
    source = open_source(path)
    infos = {t.name: t for t in source.tensors()}
    state = module.state_dict()
    # TorchScript keeps non-persistent buffers too (BERT's position_ids / token_type_ids)
    non_persistent = {n for n, _ in module.named_buffers()} - set(state)
    assert set(infos) == set(state) | non_persistent
    assert [n for n in infos if n in state] == list(state)
    live = {t.name: t for t in ModuleSource(module).tensors()}
    for name, tensor in state.items():
        info = infos[name]
        assert info.shape == tuple(tensor.shape) and info.dtype == str(tensor.dtype)[6:], name
        assert info.module_type == live[name].module_type, name
        assert info.buffer == live[name].buffer, name
        np.testing.assert_array_equal(source.load(name), tensor.numpy())
    assert "neither compiled nor run" in source.note


@pytest.mark.parametrize("case", _cases())
def test_records_equal_the_state_dicts(archives, case):
    path, state_path, module = archives[case]
    scripted = analyze(path, keep_spectra=True, **OPTIONS)
    saved = analyze(state_path, keep_spectra=True, **OPTIONS)
    live = analyze(module, **OPTIONS)
    assert [r.name for r in scripted.records] == [r.name for r in saved.records] == \
        [r.name for r in live.records]
    assert scripted.records, case
    state = {k: v.double().numpy() for k, v in module.state_dict().items()}
    for r, sv, r0, sv0, r1 in zip(scripted.records, scripted.spectra, saved.records,
                                  saved.spectra, live.records):
        # the kind as the live module gives it (module types), the values as the state dict's
        assert (r.kind, r.kind_from, r.module_type) == (r1.kind, r1.kind_from, r1.module_type)
        assert (r.kind, r.shape) == (r0.kind, r0.shape)
        np.testing.assert_array_equal(sv, sv0)
        W = state[r.name.split("[")[0]]
        if r.slice is not None and W.ndim > 2:  # a convolution slice
            W = W[(slice(None), slice(None)) + tuple(map(int, r.slice.split(",")))]
        elif r.slice is not None:  # an LSTM gate: a quarter of the rows, in torch's order
            rows = W.shape[0] // 4
            k = "ifgo".index(r.slice)
            W = W[k * rows:(k + 1) * rows]
        np.testing.assert_allclose(sv, np.linalg.svd(W, compute_uv=False), rtol=1e-10, atol=0)


def test_kinds_from_the_archives_module_types(archives):
    kinds = {}
    for case in (("cnn", "script"), ("tagger", "trace"), ("bert", "trace")):
        source = open_source(archives[case][0])
        kinds.update({d.info.name: (d.kind.kind, d.kind.kind_from, d.kind.module_type)
                      for d in plan(source.tensors(), AnalysisOptions()).decisions})
    assert kinds["features.0.weight"] == ("conv", "module", "Conv2d")
    assert kinds["features.3.weight"] == ("conv", "module", "Conv2d")
    assert kinds["features.1.running_mean"] == ("buffer", "module", "BatchNorm2d")
    assert kinds["classifier.weight"] == ("linear", "module", "Linear")
    assert kinds["lstm.weight_hh_l1_reverse"][:3] == ("recurrent", "module", "LSTM")
    assert kinds["embed.weight"] == ("embedding", "module", "Embedding")
    assert kinds["embeddings.word_embeddings.weight"] == ("embedding", "module", "Embedding")
    assert kinds["encoder.layer.1.attention.self.query.weight"] == ("linear", "module", "Linear")


def test_no_code_is_compiled_or_run(archives, monkeypatch):
    """Reading an archive never calls torch.jit.load or torch.load."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit was called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    path = archives[("mlp", "script")][0]
    assert [r.name for r in analyze(path).records] == ["fc1.weight", "fc2.weight"]


def test_checkpoint_key_picks_a_submodule(archives):
    path, _, module = archives[("cnn", "script")]
    source = open_source(path, checkpoint_key="features")
    assert [t.name for t in source.tensors()] == list(module.features.state_dict())
    with pytest.raises(AnalyzeError, match="no submodule 'nothing'"):
        open_source(path, checkpoint_key="nothing")


def test_a_class_without_its_code_gives_its_tensor_attributes(archives, tmp_path):
    """With code/ taken out of the archive, the tensors are still found (attributes that are
    tensors, not those in lists: the LSTM's _flat_weights repeat its parameters)."""
    path = archives[("tagger", "script")][0]
    stripped = tmp_path / "stripped.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(stripped, "w") as dst:
        for info in src.infolist():
            if "/code/" not in info.filename:
                dst.writestr(info, src.read(info))
    source = open_source(stripped)
    assert sorted(t.name for t in source.tensors()) == sorted(archives[("tagger", "script")][2]
                                                              .state_dict())
    assert all(t.buffer is None for t in source.tensors())
    assert "without declarations" in source.note


def test_a_frozen_module_is_named_as_such(tmp_path):
    """torch.jit.freeze turns the weights into unnamed constants of the code: refused in one
    line that says so (4 constant records: two weights, two biases)."""
    module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    path = tmp_path / "frozen.pt"
    torch.jit.save(torch.jit.freeze(torch.jit.script(module)), str(path))
    with pytest.raises(AnalyzeError, match=r"without parameters or buffers: its 4 constant "
                                           r"tensors \(torch.jit.freeze"):
        open_source(path)
