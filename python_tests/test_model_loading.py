"""qlora_ext.model.loading.load_quantized: a sharded local checkpoint read tensor by tensor into a
prepared model (the same model prepare_model makes from the dense one; peak bytes within one dense
layer of the result), a bitsandbytes 4-bit checkpoint loaded without re-quantization, a saved prepared
model's trained adapters kept, non-persistent buffers (Gemma's embed_scale) rebuilt, and bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_ext import QLoRAConfig, load_quantized, prepare_model
from qlora_ext.functional import QuantState, dequantize_4bit
from qlora_ext.model.loading import fix_meta_buffers
from qlora_ext.nn import QuantLoRALinear

transformers = pytest.importorskip("transformers")


def _config(**kw):
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, **kw)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config())
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3  # really sharded
    return tmp_path, torch.randint(0, 96, (2, 9))


@pytest.mark.parametrize("quant_type", ["nf4", None])
def test_same_model_as_prepare_model(saved, quant_type):
    folder, ids = saved
    cfg = QLoRAConfig(r=4, quant_type=quant_type, compute_dtype=torch.float32)
    want = prepare_model(transformers.LlamaForCausalLM.from_pretrained(folder), cfg, verbose=False).eval()
    got = load_quantized(folder, cfg, dtype=torch.float32, device="cpu", verbose=False).eval()
    a, b = want.state_dict(), got.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:  # everything but the randomly initialized lora_A
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert "lora_A" in k or torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(want(ids).logits, got(ids).logits)
    assert got.qlora_trainable == want.qlora_trainable


def test_peak_bytes_within_one_dense_layer(saved):
    folder, _ = saved
    model = load_quantized(folder, QLoRAConfig(r=4), dtype=torch.float32, device="cpu", verbose=False)
    s = model.qlora_load_stats
    dense = sum(v.numel() * v.element_size() for f in folder.glob("model-*.safetensors") for v in load_file(f).values())
    assert s["largest_dense_bytes"] == 192 * 64 * 4
    assert s["peak_bytes"] <= s["final_bytes"] + s["largest_dense_bytes"]
    assert s["final_bytes"] < 0.45 * dense  # the 4-bit model really is smaller than the checkpoint


def test_bitsandbytes_checkpoint_loads_without_requantization(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(_config())
    sd = {k: v.clone() for k, v in dense.state_dict().items()}
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.float32,
                                  compress_statistics=True, quant_type="fp4")
            q.weight = bnb.nn.Params4bit(mod.weight.data.clone(), requires_grad=False, quant_type="fp4",
                                         compress_statistics=True, blocksize=128)
            q = q.to("cpu")  # quantizes, as transformers does for load_in_4bit
            del sd[name + ".weight"]
            sd.update({f"{name}.{k}": v for k, v in q.state_dict().items()})
    dense.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))

    with pytest.raises(ValueError, match=r"mlp.down_proj is stored 4-bit \(bitsandbytes\) but is not among target_modules"):
        load_quantized(tmp_path, QLoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), device="cpu")
    model = load_quantized(tmp_path, QLoRAConfig(r=4, compute_dtype=torch.float32), dtype=torch.float32,
                           device="cpu", verbose=False)
    q_proj = model.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, QuantLoRALinear) and q_proj.quant_type == "fp4" and q_proj.blocksize == 128
    assert torch.equal(q_proj.weight.flatten(), sd["model.layers.1.self_attn.q_proj.weight"].flatten())
    want = dequantize_4bit(sd["model.layers.1.self_attn.q_proj.weight"],
                           QuantState.from_dict(sd, prefix="model.layers.1.self_attn.q_proj.weight."), torch.float32)
    assert torch.equal(q_proj.dense_weight(), want)


def test_bad_checkpoints(saved, tmp_path):
    folder, _ = saved
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_quantized(tmp_path / "nowhere")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    data = (folder / shard).read_bytes()
    (folder / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(folder, device="cpu")
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match="missing checkpoint shards"):
        load_quantized(folder, device="cpu")


def test_missing_unexpected_and_nan_tensors(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.config.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    save_file({k: v for k, v in sd.items() if k != "model.norm.weight"}, path)
    with pytest.raises(ValueError, match=r"lacks \['model.norm.weight'\]"):
        load_quantized(tmp_path, device="cpu")
    save_file({**sd, "model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="another architecture"):
        load_quantized(tmp_path, device="cpu")
    sd["model.layers.0.mlp.up_proj.weight"][3, 3] = float("inf")
    save_file(sd, path)
    with pytest.raises(ValueError, match=r"up_proj.weight has NaN or infinite"):
        load_quantized(tmp_path, device="cpu")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle"):
        load_quantized(tmp_path, device="cpu")


def test_bitsandbytes_parts_split_across_shards(tmp_path):
    """A layer's packed weight in one shard and its quantization entries in another still loads as stored."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(_config())
    sd = {k: v.clone() for k, v in dense.state_dict().items()}
    name = "model.layers.0.mlp.up_proj"
    q = bnb.nn.Linear4bit(64, 192, bias=False, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(sd[name + ".weight"].clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=64)
    qsd = q.to("cpu").state_dict()
    del sd[name + ".weight"]
    first = {k: v for k, v in sd.items() if not k.startswith("model.layers.1")}
    first[name + ".weight"] = qsd["weight"]
    second = {k: v for k, v in sd.items() if k.startswith("model.layers.1")}
    second.update({f"{name}.{k}": v for k, v in qsd.items() if k != "weight"})
    dense.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in first.items()}, str(tmp_path / "a.safetensors"))
    save_file({k: v.contiguous() for k, v in second.items()}, str(tmp_path / "b.safetensors"))
    weight_map = {**{k: "a.safetensors" for k in first}, **{k: "b.safetensors" for k in second}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = load_quantized(tmp_path, QLoRAConfig(r=4, compute_dtype=torch.float32), dtype=torch.float32,
                           device="cpu", verbose=False)
    assert torch.equal(model.get_submodule(name).weight.flatten(), qsd["weight"].flatten())


def test_config_and_weights_that_disagree(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config())
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vocab_size"] = 90
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"\.weight: the checkpoint has shape \(96, 64\), the model's config says \(90, 64\)"):
        load_quantized(tmp_path, device="cpu")


def _save_prepared(folder, quant_type="nf4"):
    """A prepared model with trained-looking adapters, saved as a Trainer saves it (save_pretrained)."""
    torch.manual_seed(0)
    model = prepare_model(transformers.LlamaForCausalLM(_config()),
                          QLoRAConfig(r=4, quant_type=quant_type, compute_dtype=torch.float32), verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("quant_type", ["nf4", None])
def test_saved_prepared_model_keeps_its_trained_adapters(tmp_path, quant_type):
    want = _save_prepared(tmp_path, quant_type)
    got = load_quantized(tmp_path, QLoRAConfig(r=4, quant_type=quant_type, compute_dtype=torch.float32),
                         dtype=torch.float32, device="cpu", verbose=False).eval()
    a, b = want.state_dict(), got.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:  # lora_A and lora_B included: nothing re-initialized
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert got.model.layers[0].self_attn.q_proj.lora_B.weight.abs().sum() > 0
    assert got.model.layers[0].self_attn.q_proj.lora_B.weight.requires_grad
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(want(ids).logits, got(ids).logits)


def test_saved_adapters_that_do_not_fit_the_config(tmp_path):
    _save_prepared(tmp_path, quant_type=None)
    with pytest.raises(ValueError, match=r"lora_[AB]\.weight: the checkpoint holds an adapter of rank 4 "
                                         r"\(shape \(\d+, \d+\)\); QLoRAConfig has r=8 .*load it with r=4"):
        load_quantized(tmp_path, QLoRAConfig(r=8, quant_type=None), device="cpu", verbose=False)
    with pytest.raises(ValueError, match=r"holds a LoRA adapter on model\.layers\.0\.mlp\.\w+_proj, which is not "
                                         r"among target_modules \['q_proj', 'v_proj'\]"):
        load_quantized(tmp_path, QLoRAConfig(r=4, quant_type=None, target_modules=["q_proj", "v_proj"]),
                       device="cpu", verbose=False)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"holds model\.layers\.1\.self_attn\.v_proj\.lora_A but not "
                                         r"model\.layers\.1\.self_attn\.v_proj\.lora_B"):
        load_quantized(tmp_path, QLoRAConfig(r=4, quant_type=None), device="cpu", verbose=False)


@pytest.mark.parametrize("config_name,model_name", [("GemmaConfig", "GemmaForCausalLM"),
                                                    ("Gemma2Config", "Gemma2ForCausalLM"),
                                                    ("Gemma3TextConfig", "Gemma3ForCausalLM")])
def test_non_persistent_buffers_of_any_module_are_rebuilt(tmp_path, config_name, model_name):
    """Gemma's embedding computes its embed_scale buffer from a constructor argument (not a config): it
    is in no checkpoint, yet load_quantized (and fix_meta_buffers) give it the model's own value."""
    if not hasattr(transformers, config_name) or not hasattr(transformers, model_name):
        pytest.skip(f"this transformers has no {model_name}")
    hf_config = getattr(transformers, config_name)(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=96, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    dense = getattr(transformers, model_name)(hf_config)
    dense.save_pretrained(tmp_path)
    buffers = dict(dense.named_buffers())
    cfg = QLoRAConfig(r=4, compute_dtype=torch.float32)
    want = prepare_model(getattr(transformers, model_name).from_pretrained(tmp_path), cfg, verbose=False).eval()
    got = load_quantized(tmp_path, cfg, dtype=torch.float32, device="cpu", verbose=False).eval()
    got_buffers = dict(got.named_buffers())
    for k, v in dict(want.named_buffers()).items():  # the non-persistent ones too (not in state_dict)
        assert torch.equal(v, got_buffers[k]), k
    if "embed_scale" in dict(dense.model.embed_tokens.named_buffers()):
        assert got.model.embed_tokens.embed_scale.item() == pytest.approx(64**0.5)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(want(ids).logits, got(ids).logits)
    with torch.device("meta"):  # a model built on meta (what bench/memory_65b.py does)
        shell = type(dense)(dense.config)
    fix_meta_buffers(shell, dense.config, "cpu")
    assert {k: v for k, v in shell.named_buffers()}.keys() == buffers.keys()
    for k, v in shell.named_buffers():
        assert torch.equal(v, buffers[k]), k


def test_modules_kept_in_float32_load_dense(tmp_path):
    """T5's wo (``_keep_in_fp32_modules``) loads as LoRA over its dense weight, kept float32 whatever
    ``dtype`` the rest loads in, as prepare_model makes it: the same loss."""
    import copy

    from qlora_ext.nn import LoRALinear

    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg)
    model.save_pretrained(tmp_path)
    qc = QLoRAConfig(r=4, quant_type="nf4", compute_dtype=torch.float32)
    want = prepare_model(copy.deepcopy(model), qc, verbose=False).eval()
    for dtype in (torch.bfloat16, torch.float32):
        got = load_quantized(tmp_path, qc, auto_class="AutoModelForSeq2SeqLM", dtype=dtype, verbose=False).eval()
        wo = got.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo")
        assert type(wo) is LoRALinear and wo.weight.dtype == torch.float32
        assert isinstance(got.get_submodule("encoder.block.0.layer.1.DenseReluDense.wi"), QuantLoRALinear)
    ids, labels = torch.randint(0, 128, (2, 9)), torch.randint(0, 128, (2, 5))
    with torch.no_grad():  # (the float32 load: the same weights as prepare_model's)
        a, b = want(input_ids=ids, labels=labels).loss, got(input_ids=ids, labels=labels).loss
    assert abs(a.item() - b.item()) <= 1e-6 * abs(a.item())
