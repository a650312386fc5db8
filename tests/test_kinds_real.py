"""Tensor kinds on real files and real shapes (issue 21): every real file the tests hold is
described without a ``default`` kind; an audio model's wide 1-D kernels and wav2vec2's positional
convolution are convolutions; a Llama checkpoint's ``lm_head`` is a linear layer whether its
shard is read alone or the whole folder is (a tensor's kind does not depend on the files read
with it)."""
import glob
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from allennlp_analyze import AnalysisOptions, analyze, describe
from allennlp_analyze.selection import MAX_CONV_POSITIONS, plan
from allennlp_analyze.sources import open_source

from conftest import NUM_ARCHIVES09, WHEEL09

REPO = Path(__file__).resolve().parents[1]
CONV = {"include": ("conv",), "conv_min_dim": 1, "min_q": 1.0}


def test_every_real_file_is_described_beyond_the_default(minilm_path, tmp_path):
    """MiniLM, the 26 AllenNLP 0.9 archives and the built fixture archives: no tensor is left to
    the ``default`` kind (``matrix`` / ``tensor``): each one's module type, config, structure or
    name says what it is."""
    with zipfile.ZipFile(WHEEL09) as z:
        names = sorted(n for n in z.namelist() if n.endswith("model.tar.gz"))
        assert len(names) == NUM_ARCHIVES09
        archives = []
        for k, name in enumerate(names):
            path = tmp_path / f"{k:02d}.tar.gz"
            path.write_bytes(z.read(name))
            archives.append(str(path))
    built = sorted(glob.glob(str(REPO / "fixtures" / "archives" / "*.tar.gz")))
    d = describe(str(minilm_path), *archives, *built)
    assert len(d.models) == 1 + NUM_ARCHIVES09 + len(built) and not d.errors
    left = [(t.model, t.name, t.kind) for t in d.tensors if t.kind_from == "default"]
    assert left == []
    by_name = {(t.model, t.name): t for t in d.tensors}
    # what the configs now say (AllenNLP 0.9 source: biaffine_dependency_parser.py builds a
    # BilinearMatrixAttention, language_model.py's sparse softmax is Embedding(num_words, 1))
    parser = archives[names.index(next(n for n in names if "biaffine" in n))]
    arc = by_name[(Path(parser).name, "arc_attention._weight_matrix")]
    assert (arc.kind, arc.kind_from, arc.module_type) == \
        ("matrix", "config", "BilinearMatrixAttention")
    lm = Path(archives[names.index(next(n for n in names if "fixtures/language_model/" in n))])
    assert by_name[(lm.name, "_softmax_loss.softmax_w.weight")].kind == "linear"
    assert by_name[(lm.name, "_softmax_loss.softmax_b.weight")].kind == "vector"


# ---------------------------------------------------------------------------------------------
# (a) an audio model's wide kernels


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """1-D convolutions stored as out x in x k x 1 (k = 512, k = 64), each with its bias, and a
    wav2vec2-base positional convolution (768 x 48 x 128, weight-normed as torch's
    parametrizations store it, bias beside)."""
    rng = np.random.default_rng(21)
    f32 = np.float32
    tensors = {
        "frontend.0.weight": rng.standard_normal((16, 8, 512, 1)).astype(f32),
        "frontend.0.bias": rng.standard_normal(16).astype(f32),
        "frontend.1.weight": rng.standard_normal((32, 16, 64, 1)).astype(f32),
        "frontend.1.bias": rng.standard_normal(32).astype(f32),
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0":
            rng.standard_normal((1, 1, 128)).astype(f32),
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1":
            rng.standard_normal((768, 48, 128)).astype(f32),
        "encoder.pos_conv_embed.conv.bias": rng.standard_normal(768).astype(f32),
    }
    path = tmp_path_factory.mktemp("audio") / "model.safetensors"
    save_file(tensors, str(path))
    return path


def test_wide_audio_kernels_are_convolutions(audio):
    source = open_source(audio)
    kinds = {d.info.name: (d.kind.kind, d.kind.kind_from, d.kind.module_type)
             for d in plan(source.tensors(), AnalysisOptions()).decisions}
    pos = "encoder.pos_conv_embed.conv.parametrizations.weight.original1"
    assert kinds["frontend.0.weight"] == kinds["frontend.1.weight"] == \
        ("conv", "structure", "Conv2d")
    assert kinds[pos] == ("conv", "structure", "Conv1d")
    assert kinds["encoder.pos_conv_embed.conv.parametrizations.weight.original0"][0] == "vector"
    default = analyze(source)
    assert default.records == [] and \
        default.summary.skipped["convolution kernel (add --include conv)"] == 3

    result = analyze(source, keep_spectra=True, **CONV)
    by_name = {r.name: (r, sv) for r, sv in zip(result.records, result.spectra)}
    assert len(result.records) == 512 + 64 + 128
    stored = load_file(str(audio))
    for name, position in (("frontend.0.weight", (511, 0)), ("frontend.1.weight", (7, 0)),
                           (pos, (127,))):
        record, sv = by_name[f"{name}[{','.join(map(str, position))}]"]
        W = stored[name][(slice(None), slice(None)) + position].astype(np.float64)
        assert record.kind == "conv" and record.shape == W.shape
        np.testing.assert_allclose(sv, np.linalg.svd(W, compute_uv=False), rtol=1e-10, atol=0)


def test_slicing_is_bounded_not_recognition():
    """A kernel with more positions than MAX_CONV_POSITIONS is a convolution all the same, left
    out whole with its reason instead of cut into thousands of records."""
    from allennlp_analyze.tensors import TensorInfo

    side = int(np.ceil(np.sqrt(MAX_CONV_POSITIONS + 1)))
    tensors = [TensorInfo("conv3d.weight", (8, 4, side, side, 1), "float32"),
               TensorInfo("conv3d.bias", (8,), "float32")]
    sel = plan(tensors, AnalysisOptions(**CONV))
    (decision, _) = sel.decisions
    assert decision.kind.kind == "conv" and not decision.plans
    assert sel.skipped == {f"convolution kernel of more than {MAX_CONV_POSITIONS} positions "
                           "(not sliced)": 1, "not a matrix (0-D/1-D: biases, norms, scalars)": 1}


def test_wav2vec2_positional_conv_by_module_and_by_file(tmp_path):
    """A transformers Wav2Vec2 (tiny widths, the real kernel of 128 and 16 groups): its
    positional convolution is the Conv1d its module says, and the same kernel read from the
    saved folder (no module types) is a convolution too."""
    torch = pytest.importorskip("torch")
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=37, conv_dim=(32, 32), conv_stride=(5, 2),
                            conv_kernel=(10, 3), num_conv_pos_embeddings=128,
                            num_conv_pos_embedding_groups=16)
    model = Wav2Vec2Model(config).eval()
    model.save_pretrained(tmp_path)
    built = {d.info.name: d.kind for d in plan(open_source(model).tensors(), AnalysisOptions(),
                                                None).decisions}
    folder = open_source(tmp_path)
    read = {d.info.name: d.kind for d in plan(folder.tensors(), AnalysisOptions(),
                                               folder.config).decisions}
    convs = [n for n, k in built.items() if k.kind == "conv"]
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original1" in convs or \
        "encoder.pos_conv_embed.conv.weight_v" in convs
    assert len(convs) == 3  # two feature-extractor convolutions and the positional one
    for name in convs:
        assert read[name].kind == "conv", name
    shape = dict((t.name, t.shape) for t in folder.tensors())
    assert any(s[-1] == 128 for n, s in shape.items() if n in convs)


# ---------------------------------------------------------------------------------------------
# (b) a Llama checkpoint in shards


@pytest.fixture(scope="module")
def llama_shards(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="300KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    last = sorted(set(index.values()))[-1]
    return folder, folder / last, index


def test_lm_head_is_linear_in_its_shard_alone_and_in_the_folder(llama_shards):
    folder, last, index = llama_shards
    in_last = sorted(n for n, s in index.items() if s == last.name)
    assert "lm_head.weight" in in_last and "model.embed_tokens.weight" not in in_last
    assert all(n == "lm_head.weight" or n.endswith("norm.weight") for n in in_last), in_last
    shard, whole = open_source(last), open_source(folder)
    assert shard.config["vocab_size"] == 1000  # the config beside the shard is read
    kinds = {}
    for label, source in (("shard", shard), ("folder", whole)):
        kinds[label] = {d.info.name: (d.kind.kind, d.kind.kind_from) for d in
                        plan(source.tensors(), AnalysisOptions(), source.config).decisions}
    assert kinds["shard"]["lm_head.weight"] == kinds["folder"]["lm_head.weight"] == \
        ("linear", "name")
    assert kinds["folder"]["model.embed_tokens.weight"] == ("embedding", "config")
    for name, kind in kinds["shard"].items():  # every tensor: the same kind either way
        assert kinds["folder"][name] == kind, name

    result = analyze(last, keep_spectra=True)
    ((record, sv),) = zip(result.records, result.spectra)
    assert (record.name, record.kind, record.shape) == ("lm_head.weight", "linear", (1000, 64))
    W = load_file(str(last))["lm_head.weight"].astype(np.float64)
    np.testing.assert_allclose(sv, np.linalg.svd(W, compute_uv=False), rtol=1e-10, atol=0)


def test_a_shard_alone_has_the_kinds_of_the_whole_checkpoint(tmp_path):
    """A weight in one shard, its bias in the next (a shard boundary between them): the shard
    read alone classifies with the whole checkpoint's headers (the index beside it), so the
    1-D audio kernel is a convolution and the bias-less-looking 2-D weight a Linear either way;
    without the index the shard has only its own evidence."""
    rng = np.random.default_rng(3)
    f32 = np.float32
    first = {"frontend.weight": rng.standard_normal((16, 8, 512, 1)).astype(f32),
             "mixer.weight": rng.standard_normal((30, 10)).astype(f32)}
    second = {"frontend.bias": rng.standard_normal(16).astype(f32),
              "mixer.bias": rng.standard_normal(30).astype(f32)}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file(first, str(tmp_path / names[0]))
    save_file(second, str(tmp_path / names[1]))
    index = {"metadata": {}, "weight_map": {**{n: names[0] for n in first},
                                            **{n: names[1] for n in second}}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    def kinds(path):
        s = open_source(path)
        return {d.info.name: (d.kind.kind, d.kind.kind_from) for d in plan(
            s.tensors(), AnalysisOptions(), s.config, getattr(s, "context", None)).decisions}

    alone, whole = kinds(tmp_path / names[0]), kinds(tmp_path)
    assert set(alone) == set(first)
    assert alone["frontend.weight"] == whole["frontend.weight"] == ("conv", "structure")
    assert alone["mixer.weight"] == whole["mixer.weight"] == ("linear", "structure")
    d = describe(str(tmp_path / names[0]))
    assert {t.name: t.kind for t in d.tensors} == {"frontend.weight": "conv",
                                                     "mixer.weight": "linear"}
    result = analyze(str(tmp_path / names[0]), include=("conv",), conv_min_dim=1)
    assert len(result.records) == 512 + 1  # the kernel's slices and the Linear
    (tmp_path / "model.safetensors.index.json").unlink()
    assert kinds(tmp_path / names[0]) == {"frontend.weight": ("tensor", "structure"),
                                          "mixer.weight": ("matrix", "default")}
