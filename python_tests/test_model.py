"""qlora_ext.model: prepare_model (targets, trainable count = PEFT's, freezing, dtypes), adapters in
PEFT's format both ways with the same logits (a small Llama built from a config, and the real
all-MiniLM-L6-v2), merge_and_unload, and bad input."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qlora_ext import QLoRAConfig, load_adapter, merge_and_unload, prepare_model, save_adapter
from qlora_ext.nn import QuantLoRALinear
from qlora_ext.nn.lora import LoRALayer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _llama_config():
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


@pytest.fixture
def llama():
    """(make(): a fresh tiny Llama with fixed random weights, token ids)."""
    cfg = _llama_config()
    torch.manual_seed(1)
    state = transformers.LlamaForCausalLM(cfg).state_dict()

    def make():
        m = transformers.LlamaForCausalLM(cfg)
        m.load_state_dict(state)
        return m.eval()
    return make, torch.randint(0, 128, (2, 11))


def _randomize_adapters(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALayer):
                m.lora_B.weight.normal_(std=0.1)


def _dense_base_like(make, prepared):
    """A fresh dense model whose adapted layers carry exactly the base weights ours computes with (the
    dequantized 4-bit weights), so PEFT and ours must agree to float32 rounding."""
    base = make()
    with torch.no_grad():
        for name, m in prepared.named_modules():
            if isinstance(m, LoRALayer):
                base.get_submodule(name).weight.copy_(m.dense_weight(torch.float32))
    return base


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], r".*\.mlp\.(up|down)_proj"])
def test_trainable_count_equals_peft(llama, targets):
    make, _ = llama
    ours = prepare_model(make(), QLoRAConfig(r=8, target_modules=targets), verbose=False)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=8, target_modules=targets))
    assert ours.qlora_trainable == theirs.get_nb_trainable_parameters()
    n_layers = sum(isinstance(m, QuantLoRALinear) for m in ours.modules())
    assert n_layers == (14 if targets == "all-linear" else 4)  # 2 layers x (7 | 2 | 2)
    assert isinstance(ours.lm_head, nn.Linear) and not ours.lm_head.weight.requires_grad
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_prepare_upcasts_the_rest_and_checkpoints(llama):
    make, ids = llama
    model = make().to(torch.bfloat16)
    prepare_model(model, QLoRAConfig(r=4), verbose=False)
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = [m.lora_A.weight.grad for m in model.modules() if isinstance(m, QuantLoRALinear)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("quant_type", [None, "nf4"])
def test_saved_adapter_loads_in_peft_with_the_same_logits(llama, tmp_path, quant_type):
    make, ids = llama
    ours = prepare_model(make(), QLoRAConfig(r=8, lora_alpha=16, quant_type=quant_type, compute_dtype=torch.float32),
                         verbose=False).eval()
    _randomize_adapters(ours)
    save_adapter(ours, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                     "qlora_ext_config.json"}
    theirs = peft.PeftModel.from_pretrained(_dense_base_like(make, ours), tmp_path).eval()
    with torch.no_grad():
        assert _rel(ours(ids).logits, theirs(ids).logits) <= 1e-5


@pytest.mark.parametrize("quant_type", [None, "fp4"])
def test_peft_written_adapter_loads_here_with_the_same_logits(llama, tmp_path, quant_type):
    make, ids = llama
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"],
                                                         use_rslora=True))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(make(), tmp_path, quant_type=quant_type, compute_dtype=torch.float32).eval()
    assert sum(isinstance(m, LoRALayer) for m in ours.modules()) == 4
    peft_again = peft.PeftModel.from_pretrained(_dense_base_like(make, ours), tmp_path).eval()
    with torch.no_grad():
        assert _rel(ours(ids).logits, peft_again(ids).logits) <= 1e-5


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_loaded_into_a_prepared_model_saves_as_loaded(llama, tmp_path, use_rslora):
    """An adapter (alpha 8, rsLoRA or not) loaded into a model prepared with other settings (alpha 32, no
    rsLoRA) gives the adapter's outputs, and saving it again writes the adapter's alpha and rsLoRA, so
    the re-saved file loads to the same outputs."""
    make, ids = llama
    cfg = lambda alpha, rs: QLoRAConfig(r=4, lora_alpha=alpha, use_rslora=rs, quant_type=None,  # noqa: E731
                                        compute_dtype=torch.float32)
    src = prepare_model(make(), cfg(8, use_rslora), verbose=False).eval()
    _randomize_adapters(src)
    save_adapter(src, tmp_path / "a")
    dst = load_adapter(prepare_model(make(), cfg(32, False), verbose=False).eval(), tmp_path / "a")
    save_adapter(dst, tmp_path / "b")
    written = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert written["lora_alpha"] == 8 and written["use_rslora"] == use_rslora
    again = load_adapter(make(), tmp_path / "b", quant_type=None, compute_dtype=torch.float32).eval()
    with torch.no_grad():
        want = src(ids).logits
        assert _rel(dst(ids).logits, want) <= 1e-6 and _rel(again(ids).logits, want) <= 1e-6


def test_modules_kept_in_float32_get_a_dense_base():
    """T5 keeps ``wo`` in float32 (``_keep_in_fp32_modules``) and casts its input to wo's weight dtype:
    with a 4-bit base those layers get LoRA over their dense weight (as bitsandbytes + PEFT leave them),
    the rest 4-bit; the prepared model gives its merged model's loss and trains."""
    import copy

    from qlora_ext.nn import LoRALinear

    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                decoder_start_token_id=0)
    torch.manual_seed(0)
    model = prepare_model(transformers.T5ForConditionalGeneration(cfg),
                          QLoRAConfig(r=4, quant_type="nf4", compute_dtype=torch.float32), verbose=False).eval()
    _randomize_adapters(model)
    kinds = {n.rsplit(".", 1)[-1]: type(m) for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    assert kinds["wo"] is LoRALinear and kinds["wi"] is QuantLoRALinear and kinds["q"] is QuantLoRALinear
    ids, labels = torch.randint(0, 128, (2, 9)), torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
        merged = merge_and_unload(copy.deepcopy(model)).eval()
        assert _rel(loss, merged(input_ids=ids, labels=labels).loss) <= 1e-6
    model.train()
    model(input_ids=ids, labels=labels).loss.backward()
    assert all(m.lora_A.weight.grad is not None for m in model.modules() if isinstance(m, LoRALayer))


def test_modules_to_save_round_trip(llama, tmp_path):
    make, ids = llama
    ours = prepare_model(make(), QLoRAConfig(r=4, quant_type=None, target_modules=["q_proj"],
                                             modules_to_save=["lm_head"]), verbose=False).eval()
    assert ours.lm_head.weight.requires_grad
    with torch.no_grad():
        ours.lm_head.weight.add_(0.5)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    again = load_adapter(make(), tmp_path, quant_type=None).eval()
    with torch.no_grad():
        assert _rel(theirs(ids).logits, ours(ids).logits) <= 1e-5
        assert _rel(again(ids).logits, ours(ids).logits) <= 1e-5


def test_merge_and_unload_gives_a_dense_model(llama):
    make, ids = llama
    model = prepare_model(make(), QLoRAConfig(r=4, compute_dtype=torch.float32), verbose=False).eval()
    _randomize_adapters(model)
    with torch.no_grad():
        want = model(ids).logits
        merge_and_unload(model)
        got = model(ids).logits
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert _rel(got, want) <= 1e-5


def test_merge_and_unload_after_offload_decodes_with_the_kv_cache(llama):
    """Activation offload turns the KV cache off for training; the merged model has it back (as the
    model had it) and no offload flag, and generates the prepared model's tokens."""
    make, ids = llama
    model = prepare_model(make(), QLoRAConfig(r=4, compute_dtype=torch.float32, offload_activations=True),
                          verbose=False).eval()
    assert model.config.use_cache is False and model.qlora_offloads_activations
    _randomize_adapters(model)
    with torch.no_grad():
        want = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, use_cache=False)
        merge_and_unload(model)
        assert model.config.use_cache is True and not hasattr(model, "qlora_offloads_activations")
        assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False), want)


def test_minilm_adapter_round_trip_with_peft(tmp_path):
    from qlora_ext.quant_report import minilm_path
    try:
        folder = minilm_path().parent
    except FileNotFoundError as e:
        pytest.skip(str(e))
    make = lambda: transformers.AutoModel.from_pretrained(folder).eval()  # noqa: E731
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tok(["QLoRA on a real encoder", "a second, longer sentence for the padding"], padding=True,
                return_tensors="pt")
    ours = prepare_model(make(), QLoRAConfig(r=8, compute_dtype=torch.float32), verbose=False).eval()
    assert sum(isinstance(m, QuantLoRALinear) for m in ours.modules()) == 6 * 6 + 1  # + the pooler
    _randomize_adapters(ours)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_dense_base_like(make, ours), tmp_path).eval()
    with torch.no_grad():
        a, b = ours(**batch).last_hidden_state, theirs(**batch).last_hidden_state
    assert _rel(a, b) <= 1e-5


# ---- bad input ------------------------------------------------------------------------------------------

def test_unknown_or_unmatched_targets(llama):
    make, _ = llama
    with pytest.raises(ValueError, match=r"target_modules \['qq_proj'\] match no module.*q_proj"):
        prepare_model(make(), QLoRAConfig(target_modules=["q_proj", "qq_proj"]))
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        prepare_model(make(), QLoRAConfig(target_modules=r"nothing\.here"))
    with pytest.raises(ValueError, match="not nn.Linear"):
        prepare_model(make(), QLoRAConfig(target_modules=["self_attn"]))
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        prepare_model(nn.Sequential(nn.ReLU(), nn.Tanh()), QLoRAConfig())
    with pytest.raises(ValueError, match="quant_type"):
        QLoRAConfig(quant_type="int4")
    with pytest.raises(ValueError, match="modules_to_save"):
        prepare_model(make(), QLoRAConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"GPT-2-style Conv1D, which qlora_ext does not adapt yet"):
        prepare_model(gpt2, QLoRAConfig())
    with pytest.raises(ValueError, match=r"\(Conv1D: GPT-2-style, not adapted yet\)"):
        prepare_model(gpt2, QLoRAConfig(target_modules=["c_attn"]))


def test_nan_weights_refused(llama):
    make, _ = llama
    model = make()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.weight has NaN"):
        prepare_model(model, QLoRAConfig())


def test_adapter_mismatches_and_broken_files(llama, tmp_path):
    make, _ = llama
    ours = prepare_model(make(), QLoRAConfig(r=8, quant_type=None), verbose=False)
    save_adapter(ours, tmp_path)
    other_r = prepare_model(make(), QLoRAConfig(r=4, quant_type=None), verbose=False)
    with pytest.raises(ValueError, match=r"lora_A\.weight: the adapter has shape \(8, 64\), the model \(4, 64\)"):
        load_adapter(other_r, tmp_path)
    bigger = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128))
    with pytest.raises(ValueError, match="the adapter has shape"):
        load_adapter(bigger, tmp_path, quant_type=None)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(make(), tmp_path / "missing")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(make(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(make(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="only LoRA and AdaLoRA adapters are supported, got peft_type=.IA3."):
        load_adapter(make(), tmp_path)


def test_save_errors_leave_no_partial_files(llama, tmp_path, monkeypatch):
    make, _ = llama
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(make(), tmp_path)
    ours = prepare_model(make(), QLoRAConfig(r=4, quant_type=None), verbose=False)
    import qlora_ext.model.adapter as adapter

    def boom(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(adapter, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(ours, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bf16_options_keep_the_model_dtype(llama):
    make, ids = llama
    model = prepare_model(make().to(torch.bfloat16), QLoRAConfig(r=4, lora_dtype=torch.bfloat16,
                                                                 upcast_non_quantized=False), verbose=False)
    assert model.model.norm.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.bfloat16
    model.train()
    model(ids, labels=ids).loss.backward()
    assert layer.lora_A.weight.grad.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="lora_dtype"):
        QLoRAConfig(lora_dtype=torch.int8)


@pytest.mark.parametrize("field,value,message", [
    ("use_dora", True, "use_dora=True is not supported"), ("bias", "all", "bias='all' is not supported"),
    ("rank_pattern", {"q_proj": 2}, "per-layer rank_pattern"), ("lora_bias", True, "lora_bias=True is not supported"),
    ("exclude_modules", ["q_proj"], "exclude_modules is not supported"),
    ("trainable_token_indices", [1, 2], "trainable_token_indices is not supported"),
    ("init_lora_weights", "pissa", "init_lora_weights='pissa' adapters change the base weight"),
    ("init_lora_weights", "pissa_niter_4", "'pissa_niter_4' adapters change the base weight"),
    ("init_lora_weights", "olora", "'olora' adapters change the base weight"),
    ("init_lora_weights", "loftq", "'loftq' adapters change the base weight")])
def test_adapter_features_we_do_not_load(llama, tmp_path, field, value, message):
    make, _ = llama
    save_adapter(prepare_model(make(), QLoRAConfig(r=4, quant_type=None), verbose=False), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_adapter(make(), tmp_path)


def test_modules_to_save_round_trip_with_peft_by_full_name(llama, tmp_path):
    """modules_to_save=["model.norm"] is written under its full name (PEFT matches the names as plain
    suffixes: a bare "norm" made it wrap every *norm and fail to load); PEFT and ours load it to the
    same logits. A PEFT SEQ_CLS adapter lists both task heads (classifier, score): the one the model has
    is loaded."""
    make, ids = llama
    ours = prepare_model(make(), QLoRAConfig(r=4, quant_type=None, modules_to_save=["model.norm"]),
                         verbose=False).eval()
    _randomize_adapters(ours)
    with torch.no_grad():
        ours.model.norm.weight.mul_(1.5)
    save_adapter(ours, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["modules_to_save"] == ["model.norm"]
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "a").eval()
    back = load_adapter(make(), tmp_path / "a", quant_type=None).eval()
    with torch.no_grad():
        want = ours(ids).logits
        assert _rel(theirs(ids).logits, want) <= 1e-5 and _rel(back(ids).logits, want) <= 1e-6
    cfg = transformers.LlamaConfig(**{**_llama_config().to_dict(), "num_labels": 3, "pad_token_id": 0})
    torch.manual_seed(2)
    cls = transformers.LlamaForSequenceClassification(cfg).eval()
    state = cls.state_dict()
    seq = peft.get_peft_model(cls, peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    assert set(seq.peft_config["default"].modules_to_save) >= {"classifier", "score"}
    seq.save_pretrained(tmp_path / "s")

    def fresh():
        m = transformers.LlamaForSequenceClassification(cfg)
        m.load_state_dict(state)
        return m.eval()
    loaded = load_adapter(fresh(), tmp_path / "s", quant_type=None).eval()
    with torch.no_grad():
        assert _rel(loaded(ids).logits, peft.PeftModel.from_pretrained(fresh(), tmp_path / "s").eval()(ids).logits) <= 1e-5
