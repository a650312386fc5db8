"""PEFT LoRA adapters: the adapter's singular values against numpy's SVD of PEFT's own
``get_delta_weight()``, and the merge against PEFT's ``merge_and_unload()`` (real peft, tiny
models built from configs, offline)."""
import numpy as np
import pytest

from allennlp_analyze import analyze
from allennlp_analyze.sources import open_source
from allennlp_analyze.sources.lora import LoraAdapter, MergedSource, lora_singular_values

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
#: The adapters: (model, LoraConfig keywords, save_pretrained keywords).
ADAPTERS = {
    "qv_r4": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), {}),
    "all_r8_rslora": ("llama", dict(r=8, lora_alpha=16, target_modules="all-linear",
                                    use_rslora=True,
                                    rank_pattern={"layers.1.self_attn.q_proj": 2},
                                    alpha_pattern={"layers.0.mlp.down_proj": 3}), {}),
    "dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           use_dora=True, modules_to_save=["lm_head"]), {}),
    "gpt2_fan_in_fan_out": ("gpt2", dict(r=4, lora_alpha=4, target_modules=["c_attn"],
                                         fan_in_fan_out=True), {"safe_serialization": False}),
}
#: A module of "qv_r4" whose B loses a column: 3 of its 4 directions used.
DROPPED = "model.layers.0.self_attn.v_proj"


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per adapter: its folder, the base folder, PEFT's merged model saved, and PEFT's own
    ΔW per adapted weight (``get_delta_weight``, as the base stores the weight)."""
    d = tmp_path_factory.mktemp("lora")
    out = {}
    for kind in ("llama", "gpt2"):
        _model(kind).save_pretrained(d / f"base_{kind}")
    for name, (kind, config, save) in ADAPTERS.items():
        model = peft.get_peft_model(_model(kind), peft.LoraConfig(**config))
        gen = torch.Generator().manual_seed(len(name))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname or "lora_A" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen))
                if "lora_magnitude_vector" in pname:
                    p.mul_(1 + torch.rand(p.shape, generator=gen))
                if name == "qv_r4" and f"{DROPPED}.lora_B" in pname:
                    p[:, -1] = 0.0
        model.save_pretrained(d / name, **save)
        deltas, exact = {}, {}
        for mname, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                key = mname[len("base_model.model."):] + ".weight"
                deltas[key] = module.get_delta_weight("default").detach().double().numpy()
                B = module.lora_B["default"].weight.detach().double().numpy()
                A = module.lora_A["default"].weight.detach().double().numpy()
                product = module.scaling["default"] * B @ A  # PEFT's factors, in float64
                exact[key] = product.T if config.get("fan_in_fan_out") else product
        merged = model.merge_and_unload()
        merged.save_pretrained(d / f"{name}_merged")
        out[name] = dict(adapter=d / name, base=d / f"base_{kind}", merged=d / f"{name}_merged",
                         deltas=deltas, exact=exact)
    return out


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_singular_values_equal_numpy_on_peft_delta(built, name):
    b = built[name]
    recs = {r["name"]: r for r in analyze(str(b["adapter"])).to_dicts()
            if r["module_type"] == "LoRA"}
    assert set(recs) == {f"lora:{k}" for k in b["deltas"]}
    adapter = open_source(str(b["adapter"]))
    by_name = {m.name: m for m in adapter.modules}
    for key, D in b["deltas"].items():
        rec, m = recs[f"lora:{key}"], by_name[key]
        # PEFT's get_delta_weight() runs in float32 (its own rounding, ~r eps32 of sv_max);
        # the same factors multiplied in float64 agree to float64 round-off
        s = np.linalg.svd(D, compute_uv=False)
        s64 = np.linalg.svd(b["exact"][key], compute_uv=False)
        ours = lora_singular_values(*adapter.factors(m), m.scale)
        assert ours.size == rec["lora_r"] == m.r
        np.testing.assert_allclose(ours, s[:m.r], rtol=0, atol=2e-6 * s[0])
        np.testing.assert_allclose(ours, s64[:m.r], rtol=0, atol=1e-12 * s64[0])
        s = s64
        assert list(rec["shape"]) == list(D.shape)
        assert rec["sv_max"] == pytest.approx(s[0], rel=1e-12)
        assert rec["sv_min"] == pytest.approx(s[m.r - 1], abs=1e-12 * s[0])
        lam = s[:m.r] ** 2
        assert rec["stable_rank"] == pytest.approx(lam.sum() / lam[0], rel=1e-10)
        expected_used = m.r - 1 if name == "qv_r4" and key == f"{DROPPED}.weight" else m.r
        assert rec["lora_used_rank"] == expected_used
        tol = s[0] * max(D.shape) * np.finfo(np.float32).eps
        assert rec["lora_used_rank"] == int(np.sum(s > tol))


def test_patterns_and_rslora_follow_peft(built):
    adapter = LoraAdapter(built["all_r8_rslora"]["adapter"])
    by_name = {m.name: m for m in adapter.modules}
    assert len(by_name) == 14  # 7 linear layers x 2 (all-linear leaves lm_head out)
    q1 = by_name["model.layers.1.self_attn.q_proj.weight"]
    assert q1.r == 2 and q1.scale == pytest.approx(16 / np.sqrt(2))
    down0 = by_name["model.layers.0.mlp.down_proj.weight"]
    assert down0.r == 8 and down0.scale == pytest.approx(3 / np.sqrt(8))


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_merge_equals_peft_merge_and_unload(built, name):
    b = built[name]
    merged_here = MergedSource(open_source(str(b["base"])), LoraAdapter(b["adapter"]))
    peft_merged = open_source(str(b["merged"]))
    for key in list(b["deltas"]) + (["lm_head.weight"] if name == "dora" else []):
        theirs = peft_merged.load(key)  # merged by PEFT in float32: its rounding
        np.testing.assert_allclose(merged_here.load(key), theirs, rtol=0,
                                   atol=1e-6 * np.abs(theirs).max())
    # analyzed: the tool's merge against the base, PEFT's merge against the base
    ours = {r["name"]: r for r in analyze(str(b["adapter"]), base=str(b["base"]),
                                          min_q=1.0).to_dicts()}
    theirs = {r["name"]: r for r in analyze(str(b["merged"]), base=str(b["base"]),
                                            min_q=1.0).to_dicts()}
    for key in b["deltas"]:
        for field in ("sv_max", "delta_rel", "delta_sv_max", "distance_cka"):
            assert ours[key][field] == pytest.approx(theirs[key][field], rel=1e-5), (key, field)
        assert ours[key]["base_name"] == key
    if name != "dora":  # without DoRA the merged change is ΔW itself, of rank r
        for key, D in b["deltas"].items():
            s = np.linalg.svd(D, compute_uv=False)
            assert ours[key]["delta_sv_max"] == pytest.approx(s[0], rel=1e-6)
            assert ours[f"lora:{key}"]["lora_used_rank"] == ours[key]["delta_rank"]


def test_hub_fetches_an_adapter_config_and_its_weights():
    from allennlp_analyze.sources.hub import weight_files

    listing = ["README.md", "adapter_config.json", "adapter_model.bin",
               "adapter_model.safetensors", "training_args.bin"]
    assert weight_files(listing) == ["adapter_config.json", "adapter_model.safetensors"]
    assert weight_files(["config.json", "model.safetensors"]) == ["config.json",
                                                                 "model.safetensors"]


@pytest.mark.parametrize("name", ["qv_r4", "dora"])
def test_adapter_with_base_on_an_executor_equals_local(built, name):
    """A task merges the adapter into the base it opens itself, as the local run does: the
    same records (the adapter's own, the merged weights' with base fields, ΔW's) to the bit."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    b = built[name]
    args = dict(base=str(b["base"]), delta=True, min_q=1.0)
    local = analyze(str(b["adapter"]), **args)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        remote = analyze(str(b["adapter"]), executor=pool, **args)
    assert remote.records == local.records
    assert remote.summary == local.summary
    assert sum(r.lora_r is not None for r in remote.records) == len(b["deltas"])
    # merged in the task: the adapted weights moved against the base
    assert set(b["deltas"]) <= {r.name for r in remote.records if r.delta_sv_max}
