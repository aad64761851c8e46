"""QuantLoRALinear and LoRALinear: drop-in for nn.Linear, init, scaling, merge/unmerge/to_linear,
state_dict round trips, device moves, gradient checkpointing, torch.compile, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_ext.functional import dequantize_4bit
from qlora_ext.nn import LoRALinear, QuantLoRALinear
from qlora_ext.nn.lora import LoRALayer


def _linear(in_f=96, out_f=64, bias=True):
    return nn.Linear(in_f, out_f, bias=bias)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _randomize_adapter(layer):
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.05)
    return layer


@pytest.mark.parametrize("cls", [QuantLoRALinear, LoRALinear])
def test_drop_in_for_linear(cls):
    lin = _linear()
    kw = {"compute_dtype": torch.float32} if cls is QuantLoRALinear else {}
    layer = cls.from_linear(lin, r=8, lora_alpha=16, **kw)
    assert isinstance(layer, LoRALayer)
    assert (layer.in_features, layer.out_features) == (96, 64) and layer.bias is not None
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}
    assert layer.lora_A.weight.shape == (8, 96) and layer.lora_B.weight.shape == (64, 8)
    x = torch.randn(2, 5, 96)
    y = layer(x)
    assert y.shape == (2, 5, 64) and y.dtype == x.dtype
    # B starts at zero: the layer starts as its base
    base = dequantize_4bit(layer.weight, layer.quant_state, torch.float32) if cls is QuantLoRALinear else lin.weight
    torch.testing.assert_close(y, nn.functional.linear(x, base, lin.bias), rtol=1e-5, atol=1e-5)
    assert cls(96, 64, bias=False, r=4).bias is None  # the nn.Linear constructor contract


def test_scaling_and_init():
    layer = QuantLoRALinear.from_linear(_linear(), r=16, lora_alpha=32)
    assert layer.scaling == 2.0 and torch.all(layer.lora_B.weight == 0)
    bound = 1 / math.sqrt(96)  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    rs = QuantLoRALinear.from_linear(_linear(), r=16, lora_alpha=32, use_rslora=True)
    assert rs.scaling == 32 / 4
    g = QuantLoRALinear.from_linear(_linear(2048, 8), r=64, init_lora_weights="gaussian")
    assert abs(g.lora_A.weight.std().item() - 1 / 64) < 2e-3


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_matches_to_linear(compute_dtype):
    layer = _randomize_adapter(QuantLoRALinear.from_linear(_linear(), r=8, compute_dtype=compute_dtype))
    dense = layer.to_linear(dtype=torch.float32)
    x = torch.randn(7, 96)
    tol = 1e-5 if compute_dtype == torch.float32 else 2e-2
    assert _rel(layer(x), dense(x)) < tol


def test_training_step_moves_only_the_adapter():
    layer = _randomize_adapter(QuantLoRALinear.from_linear(_linear(), r=4, lora_dropout=0.1,
                                                           compute_dtype=torch.float32))
    packed, bias = layer.weight.clone(), layer.bias.clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(32, 96), torch.randn(32, 64)
    losses = []
    for _ in range(5):
        loss = nn.functional.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.weight, packed) and torch.equal(layer.bias, bias)
    assert layer.lora_A.weight.grad is not None and layer.bias.grad is None


def test_merge_unmerge_lora_linear_exact():
    layer = _randomize_adapter(LoRALinear.from_linear(_linear(), r=8))
    x = torch.randn(4, 96)
    y = layer(x)
    layer.merge()
    assert layer.merged and _rel(layer(x), y) < 1e-6
    layer.unmerge()
    assert not layer.merged and _rel(layer(x), y) < 1e-6
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("cls", [QuantLoRALinear, LoRALinear])
def test_saving_a_merged_layer_warns(cls):
    """A merged layer's state dict holds the adapter twice for an unmerged loader (the format has no
    merged flag, as PEFT's): saving one warns, naming the way out; an unmerged one saves silently."""
    import warnings

    layer = _randomize_adapter(cls.from_linear(_linear(), r=4))
    layer.merge()
    with pytest.warns(UserWarning, match=r"saving a merged LoRA layer.*unmerge\(\) first"):
        layer.state_dict()
    layer.unmerge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.state_dict()


def test_merge_quantized_rounds_like_requantization():
    layer = _randomize_adapter(QuantLoRALinear.from_linear(_linear(256, 128), r=8, compute_dtype=torch.float32))
    x = torch.randn(16, 256)
    y = layer(x)
    layer.merge()
    assert layer.merged and _rel(layer(x), y) < 0.12  # one more NF4 rounding of W + BA
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(double_quant):
    layer = _randomize_adapter(QuantLoRALinear.from_linear(_linear(), r=8, double_quant=double_quant,
                                                           compute_dtype=torch.float32))
    sd = layer.state_dict()
    expected = {"weight", "bias", "lora_A.weight", "lora_B.weight", "weight.absmax", "weight.quant_map",
                "weight.quant_state.bitsandbytes__nf4"}
    if double_quant:
        expected |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(sd) == expected
    fresh = QuantLoRALinear(96, 64, r=8, double_quant=not double_quant, compute_dtype=torch.float32)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 96)
    assert torch.equal(fresh(x), layer(x)) and fresh.double_quant == double_quant
    bad = dict(sd)
    bad["weight.quant_map"] = bad["weight.quant_map"] * 2
    with pytest.raises(RuntimeError, match="quant_map is not the standard nf4 table"):
        fresh.load_state_dict(bad)


def test_training_output_can_be_modified_in_place():
    """The layer's output in training is an ordinary tensor: in-place ops on it (an activation's relu_,
    a residual +=) work and differentiate as the out-of-place forms do."""
    layer = _randomize_adapter(QuantLoRALinear.from_linear(_linear(), r=8, compute_dtype=torch.float32))
    grads = []
    for in_place in (True, False):
        x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(0)).requires_grad_()
        y = layer(x)
        y = y.relu_() if in_place else y.relu()
        y.sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_adapter_on_another_device_is_named():
    """The layer's per-call checks name an adapter that is not on x's device (here: moved to meta)."""
    layer = QuantLoRALinear.from_linear(_linear(), r=8, compute_dtype=torch.float32)
    layer.lora_A.weight = nn.Parameter(layer.lora_A.weight.detach().to("meta"))
    with pytest.raises(ValueError, match="lora_A is on meta but x is on cpu"):
        layer(torch.randn(2, 96))


def test_cached_weight_arguments_follow_the_weight():
    """The layer keeps the 4-bit op arguments between calls: a load_state_dict (also into a layer that
    already ran), a merge (re-quantization) and an in-place copy into the packed bytes all show up in
    the next forward."""
    a = _randomize_adapter(QuantLoRALinear.from_linear(_linear(), r=8, compute_dtype=torch.float32))
    b = _randomize_adapter(QuantLoRALinear.from_linear(_linear(), r=8, compute_dtype=torch.float32))
    x = torch.randn(5, 96)
    ya, yb = a(x), b(x)
    assert not torch.equal(ya, yb)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), yb)
    with torch.no_grad():
        merged_ref = a.to_linear()(x)
    a.merge()
    assert _rel(a(x), merged_ref) < 0.12
    a.unmerge()
    c = _randomize_adapter(QuantLoRALinear.from_linear(_linear(), r=8, compute_dtype=torch.float32))
    c.load_state_dict(b.state_dict())
    c(x)
    with torch.no_grad():
        c.weight.zero_()  # in place: the cached arguments view these very bytes
    assert not torch.equal(c(x), yb)


def test_half_cast_keeps_the_4bit_base():
    layer = QuantLoRALinear.from_linear(_linear(), r=4, compute_dtype=torch.float32)
    before = layer.weight.clone()
    layer.half()
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, before)
    assert layer.quant_state.absmax.dtype == torch.uint8 and layer.quant_state.nested_absmax.dtype == torch.float32
    assert layer(torch.randn(2, 96)).shape == (2, 64)


def test_gradient_checkpointing_gives_the_same_grads():
    layer = _randomize_adapter(QuantLoRALinear.from_linear(_linear(), r=4, compute_dtype=torch.float32))
    x = torch.randn(8, 96, requires_grad=True)
    layer(x).square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    for t in (x, layer.lora_A.weight, layer.lora_B.weight):
        t.grad = None
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    for g, t in zip(grads, (x, layer.lora_A.weight, layer.lora_B.weight)):
        torch.testing.assert_close(t.grad, g)


def test_torch_compile_module_matches_eager():
    layer = _randomize_adapter(QuantLoRALinear.from_linear(_linear(), r=4, compute_dtype=torch.float32))
    x = torch.randn(6, 96)
    torch.testing.assert_close(torch.compile(layer)(x), layer(x), rtol=1e-5, atol=1e-5)


def test_bad_construction():
    with pytest.raises(ValueError, match="r must be a positive int"):
        QuantLoRALinear.from_linear(_linear(), r=0)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        LoRALinear.from_linear(_linear(), lora_dropout=1.0)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        QuantLoRALinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="compute_dtype must be"):
        QuantLoRALinear(8, 8, compute_dtype=torch.float64)
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRALinear(8, 8, init_lora_weights="zeros")
    with pytest.raises(TypeError, match="from_linear takes the device and bias of `linear`"):
        LoRALinear.from_linear(_linear(), device="cpu")
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.uint8"):
        QuantLoRALinear.from_linear(_linear())(torch.ones(2, 96, dtype=torch.uint8))


@pytest.mark.cuda
def test_cuda_move_and_forward(cuda_device):
    layer = _randomize_adapter(QuantLoRALinear.from_linear(_linear(), r=4, compute_dtype=torch.float32))
    x = torch.randn(3, 96)
    y = layer(x)
    layer.to(cuda_device)
    assert layer.weight.is_cuda and layer.quant_state.absmax.is_cuda and layer.quant_state.offset.is_cuda
    assert _rel(layer(x.to(cuda_device)).cpu(), y) < 1e-5
    layer.cpu()
    assert not layer.quant_state.nested_absmax.is_cuda


def test_autocast():
    layer = _randomize_adapter(QuantLoRALinear.from_linear(_linear(), r=4, compute_dtype=torch.float32))
    x = torch.randn(3, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32 and _rel(y, layer(x)) < 1e-2


def test_load_packed_weight_stored_as_bf16_then_cast():
    from qlora_ext.functional import quantize_4bit

    lin = _linear(96, 65)  # 3120 bytes: a bf16 view of 1560 elements
    layer = QuantLoRALinear.from_linear(lin, r=4, compute_dtype=torch.float32)
    x = torch.randn(2, 96)
    y = layer(x)
    packed, state = quantize_4bit(lin.weight.detach(), quant_storage=torch.bfloat16)
    sd = {**layer.state_dict(), "weight": packed, **state.to_dict(prefix="weight.")}
    fresh = QuantLoRALinear(96, 65, r=4, compute_dtype=torch.float32)
    fresh.load_state_dict(sd)  # strict
    fresh.float()
    assert fresh.weight.dtype == torch.uint8 and torch.equal(fresh(x), y)


def test_failed_load_leaves_the_module_unchanged():
    layer = QuantLoRALinear.from_linear(_linear(96, 64), r=4, compute_dtype=torch.float32)
    other = QuantLoRALinear.from_linear(_linear(96, 65), r=4, compute_dtype=torch.float32)
    before = layer.weight.clone()
    with pytest.raises(RuntimeError, match="does not match"):
        layer.load_state_dict(other.state_dict())
    assert torch.equal(layer.weight, before) and tuple(layer.quant_state.shape) == (64, 96)


def test_meta_init_then_assign_load():
    src = _randomize_adapter(QuantLoRALinear.from_linear(_linear(), r=4, compute_dtype=torch.float32))
    with torch.device("meta"):
        layer = QuantLoRALinear(96, 64, r=4, compute_dtype=torch.float32)
    layer.load_state_dict(src.state_dict(), assign=True)
    x = torch.randn(2, 96)
    assert torch.equal(layer(x), src(x))


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_meta_init_then_to_empty_and_load(quant_type, double_quant):
    """Built on the meta device, materialized with to_empty (uninitialized storage, the format's code
    tables filled), then loaded: the source layer's outputs."""
    src = _randomize_adapter(QuantLoRALinear.from_linear(_linear(), r=4, quant_type=quant_type,
                                                         double_quant=double_quant, compute_dtype=torch.float32))
    layer = QuantLoRALinear.from_linear(nn.Linear(96, 64, device="meta"), r=4, quant_type=quant_type,
                                        double_quant=double_quant, compute_dtype=torch.float32)
    layer.to_empty(device="cpu")
    assert layer.weight.device.type == layer.quant_state.device.type == "cpu"
    assert torch.equal(layer.quant_state.code, src.quant_state.code)
    layer.load_state_dict(src.state_dict())
    x = torch.randn(2, 96)
    assert torch.equal(layer(x), src(x))


def test_load_state_dict_names_what_is_wrong():
    """Packed bytes without their quant state are refused (strict or not: nothing could decode them),
    naming the keys that carry it; a broken quant state names its missing key (and "weight" is missing
    once); the module keeps its weight in both cases. An unknown key under weight. is unexpected (as
    PyTorch does, strict loading reports it after loading the rest)."""
    src = QuantLoRALinear.from_linear(_linear(), r=4, quant_type="fp4", blocksize=128, double_quant=False,
                                      compute_dtype=torch.float32)
    layer = QuantLoRALinear.from_linear(_linear(), r=4, compute_dtype=torch.float32)
    before = layer.weight.clone()
    bytes_only = {k: v for k, v in src.state_dict().items() if not k.startswith("weight.")}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"weight: packed 4-bit bytes without their quant state "
                                               r"\(weight.absmax, weight.quant_map"):
            layer.load_state_dict(bytes_only, strict=strict)
    no_absmax = src.state_dict()
    no_absmax.pop("weight.absmax")
    with pytest.raises(RuntimeError, match="missing 'weight.absmax'") as e:
        layer.load_state_dict(no_absmax)
    assert str(e.value).count('"weight"') <= 1
    assert torch.equal(layer.weight, before) and layer.quant_type == "nf4"
    unknown = {**src.state_dict(), "weight.foo": torch.zeros(1)}
    with pytest.raises(RuntimeError, match='Unexpected key.*"weight.foo"'):
        layer.load_state_dict(unknown)
    assert layer.load_state_dict(unknown, strict=False).unexpected_keys == ["weight.foo"]
    x = torch.randn(3, 96)
    assert torch.equal(layer(x), src(x))
