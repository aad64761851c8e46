"""qlora_linear / qlora::linear_4bit: forward and backward against a float64 reference over the same
(bitsandbytes-format) dequantized weight, so kernel error is measured apart from quantization error;
gradcheck in float64, opcheck, torch.compile, dropout, saved tensors, bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import random_weight

from qlora_ext import reference as ref
from qlora_ext.functional import dequantize_4bit, qlora_linear, quantize_4bit

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (rows shape, in, out, r): awkward sizes, leading batch dims, features not multiples of the block
CASES = [((257,), 123, 77, 5), ((2, 3), 64, 300, 16), ((1,), 1000, 33, 1), ((4, 1, 5), 200, 129, 8)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _operands(lead, in_f, out_f, r, dtype, device="cpu", bias=True, lora=True):
    w = random_weight((out_f, in_f), device=device)
    x = torch.randn(*lead, in_f, device=device, dtype=dtype)
    A = (torch.randn(r, in_f, device=device) / in_f**0.5).to(dtype) if lora else None
    B = (torch.randn(out_f, r, device=device) / r**0.5).to(dtype) if lora else None
    b = torch.randn(out_f, device=device, dtype=dtype) if bias else None
    return w, x, A, B, b


def _check_against_reference(dtype, lead, in_f, out_f, r, bias, lora, double_quant, quant_type, device="cpu"):
    w, x, A, B, b = _operands(lead, in_f, out_f, r, dtype, device, bias, lora)
    packed, state = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    w_deq = dequantize_4bit(packed, state, out_dtype=torch.float32)  # the exact weight the kernel uses
    leaves = [t.clone().requires_grad_() for t in (x, A, B, b) if t is not None]
    it = iter(leaves)
    xg, Ag, Bg, bg = next(it), next(it) if lora else None, next(it) if lora else None, next(it) if bias else None
    y = qlora_linear(xg, packed, state, Ag, Bg, 0.5, bg)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    xr, Ar, Br, br = next(it), next(it) if lora else None, next(it) if lora else None, next(it) if bias else None
    y64 = ref.qlora_linear(xr, w_deq.double(), Ar, Br, 0.5, br)
    y64.backward(g.double())

    # the same math in plain PyTorch at the kernel's dtype: the error budget (flash-attention's rule)
    plain = [t.detach().clone().requires_grad_() for t in leaves]
    it = iter(plain)
    xp, Ap, Bp, bp = next(it), next(it) if lora else None, next(it) if lora else None, next(it) if bias else None
    yp = torch.nn.functional.linear(xp, w_deq.to(dtype), bp)
    if lora:
        yp = yp + ((xp @ Ap.t()) * 0.5) @ Bp.t()
    yp.backward(g)

    # a floor where twice the plain path's error is itself noise: 1e-5 (fp32) or half an ulp (16-bit
    # types). (A rank-1 adapter's gradients hang on one 33-term dot product: when it cancels, both paths'
    # relative errors grow with the cancellation, and the plain path can be luckier: 3.2e-6 against 7.7e-7
    # was seen, so a 1e-6 floor made the test fail on some seeds.)
    floor = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 0.5 * torch.finfo(dtype).eps)
    for name, got, want, base in [("y", y, y64, yp)] + [
        (f"grad[{i}]", a.grad, c.grad, p.grad) for i, (a, c, p) in enumerate(zip(leaves, ref_leaves, plain))
    ]:
        err, budget = _rel(got, want), max(2 * _rel(base, want), floor)
        assert err <= budget, f"{name}: relative error {err:.3g} > budget {budget:.3g} ({dtype})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}r{c[3]}")
def test_forward_backward_match_reference(dtype, case):
    lead, in_f, out_f, r = case
    _check_against_reference(dtype, lead, in_f, out_f, r, bias=True, lora=True, double_quant=True, quant_type="nf4")


@pytest.mark.parametrize("bias,lora", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("double_quant,quant_type", [(False, "nf4"), (True, "fp4")])
def test_variants_match_reference(bias, lora, double_quant, quant_type):
    _check_against_reference(torch.float32, (33,), 130, 70, 4, bias, lora, double_quant, quant_type)


@pytest.mark.parametrize("rows", [1, 2])
def test_inputs_are_not_modified(rows):
    w, x, A, B, b = _operands((rows,), 64, 48, 4, torch.float32)
    packed, state = quantize_4bit(w)
    copies = [t.clone() for t in (x, A, B, b, packed)]
    qlora_linear(x, packed, state, A, B, 1.5, b)
    assert all(torch.equal(t, c) for t, c in zip((x, A, B, b, packed), copies))


def test_gradcheck_float64():
    w, x, A, B, b = _operands((5,), 40, 24, 3, torch.float64)
    packed, state = quantize_4bit(w, blocksize=32)
    leaves = [t.requires_grad_() for t in (x, A, B, b)]
    assert torch.autograd.gradcheck(lambda x, A, B, b: qlora_linear(x, packed, state, A, B, 1.7, b), leaves)


def test_opcheck():
    w, x, A, B, b = _operands((9,), 100, 70, 4, torch.float32)
    packed, s = quantize_4bit(w)
    quant = (packed.flatten(), s.absmax, 64, "nf4", 70, 100, s.nested_absmax, s.nested_code, s.offset.reshape(1), 256)
    xa = (x @ A.t()).requires_grad_()
    torch.library.opcheck(torch.ops.qlora.linear_4bit.default, (x.requires_grad_(), *quant, xa, B.requires_grad_(), b))
    torch.library.opcheck(torch.ops.qlora.linear_4bit.default, (x, *quant, None, None, None))
    torch.library.opcheck(torch.ops.qlora.linear_4bit_grad_input.default, (torch.randn(9, 70), *quant))
    lora = (torch.randn(9, 4).requires_grad_(), A.detach().clone().requires_grad_())
    torch.library.opcheck(torch.ops.qlora.linear_4bit_grad_input.default,
                          (torch.randn(9, 70).requires_grad_(), *quant, *lora))


def _check_grad_input_with_lora_term(dtype, device="cpu"):
    w, x, A, B, b = _operands((37,), 130, 70, 5, dtype, device)
    packed, state = quantize_4bit(w, blocksize=64)
    wd = dequantize_4bit(packed, state, out_dtype=torch.float32).double()
    g, lg = torch.randn(37, 70, dtype=dtype, device=device), torch.randn(37, 5, dtype=dtype, device=device)
    got = torch.ops.qlora.linear_4bit_grad_input(g, *_op_quant_args(packed, state), lg, A)
    want = g.double() @ wd + lg.double() @ A.double()
    assert got.dtype == dtype and _rel(got, want) < {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    return g, lg, A, packed, state


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_input_with_lora_term_matches_reference(dtype):
    """linear_4bit_grad_input(g, W, lora_grad, A) = g W + lora_grad A (the fused backward's input
    gradient in one op), against float64 over the same dequantized W; gradcheck through it in float64."""
    g, lg, A, packed, state = _check_grad_input_with_lora_term(dtype)
    if dtype == torch.float64:
        leaves = [t.clone().requires_grad_() for t in (g, lg, A)]
        f = lambda g, lg, A: torch.ops.qlora.linear_4bit_grad_input(g, *_op_quant_args(packed, state), lg, A)  # noqa: E731
        assert torch.autograd.gradcheck(f, leaves)
        assert torch.autograd.gradgradcheck(f, leaves)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_grad_input_with_lora_term_matches_reference(cuda_device, dtype):
    _check_grad_input_with_lora_term(dtype, cuda_device)


def _fused_op_args(dtype=torch.float32, rows=9, in_f=100, out_f=70, r=4, rank_scale=None):
    w, x, A, B, b = _operands((rows,), in_f, out_f, r, dtype)
    packed, s = quantize_4bit(w)
    quant = (packed.flatten(), s.absmax, 64, "nf4", out_f, in_f, s.nested_absmax, s.nested_code,
             s.offset.reshape(1), 256)
    return quant, x, A, B, b


@pytest.mark.parametrize("rank_scale", [None, "per-rank", "per-row"])
def test_opcheck_fused_halves(rank_scale):
    """qlora::lora_linear_4bit_fwd / _bwd (the fused Function's two halves): schema, fake kernels,
    AOT dispatch, both forms of the backward, a partial output mask and a dropout mask (the forward is
    checked without dropout: opcheck compares repeated calls, which a random mask would fail)."""
    quant, x, A, B, b = _fused_op_args()
    rs = {None: None, "per-rank": torch.rand(4) + 0.5, "per-row": torch.rand(3, 3, 4) + 0.5}[rank_scale]
    torch.library.opcheck(torch.ops.qlora.lora_linear_4bit_fwd.default, (x, *quant, A, B, b, rs, 0.5, 0.0))
    y, xa, xa_raw, _ = torch.ops.qlora.lora_linear_4bit_fwd(x, *quant, A, B, b, rs, 0.5, 0.0)
    _, _, _, mask = torch.ops.qlora.lora_linear_4bit_fwd(x, *quant, A, B, b, rs, 0.5, 0.25)
    assert mask.dtype == torch.bool and mask.shape == x.shape and 0 < mask.float().mean() < 1
    g = torch.randn_like(y)
    xa_raw = xa_raw if rs is not None else None
    fused_mask = [True, False, True, True, True, rs is not None]
    bwd = torch.ops.qlora.lora_linear_4bit_bwd.default
    torch.library.opcheck(bwd, (g, *quant, x, xa, xa_raw, A, B, rs, 0.5, None, 0.0, fused_mask))
    torch.library.opcheck(bwd, (g, *quant, x, xa, xa_raw, A, B, rs, 0.5, mask, 0.25, fused_mask))
    torch.library.opcheck(bwd, (g, *quant, x, xa, xa_raw, A, B, rs, 0.5, None, 0.0, [False, False, True] + [False] * 3))
    torch.library.opcheck(bwd, (g, *quant, None, xa, None, None, B, None, 0.5, None, 0.0,
                                [True, True, False, True, True, False]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["fused", "per-rank", "per-row", "expanded", "dropout", "dropout-per-row",
                                  "xa-outside"])
def test_backward_op_equals_differentiable_backward(dtype, form):
    """The C++ backward (qlora::lora_linear_4bit_bwd, a plain backward) and the Function's differentiable
    Python backward (taken under create_graph) compute the same steps: the same gradients to a few ulps
    (16-bit: the C++ op keeps its products in x's dtype, as the Python one does outside autocast). Both
    backwards read the one mask the forward drew."""
    _check_backward_op_equals_differentiable_backward(dtype, form)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", ["fused", "per-row", "dropout", "xa-outside"])
@pytest.mark.parametrize("lead", [(2, 5), (3, 70)], ids=["decode10", "train210"])
def test_cuda_backward_op_equals_differentiable_backward(cuda_device, dtype, form, lead):
    _check_backward_op_equals_differentiable_backward(dtype, form, cuda_device, lead)


def _check_backward_op_equals_differentiable_backward(dtype, form, device="cpu", lead=(2, 5)):
    in_f, out_f, r = 96, 40, 6
    w, x, A, B, b = _operands(lead, in_f, out_f, r, dtype, device)
    packed, state = quantize_4bit(w.float(), blocksize=32)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    rand = lambda *shape: torch.rand(*shape, dtype=sdt, device=device) + 0.5  # noqa: E731
    s = {"fused": None, "xa-outside": None, "dropout": None, "per-rank": rand(r), "per-row": rand(*lead, r),
         "dropout-per-row": rand(*lead, r), "expanded": rand(lead[0], 1, r).expand(*lead, r)}[form]
    leaves = [t.clone().requires_grad_(not (form == "xa-outside" and i == 1)) for i, t in enumerate((x, A, B, b))]
    leaves += [s.clone().requires_grad_()] if s is not None else []
    y = qlora_linear(leaves[0], packed, state, leaves[1], leaves[2], 0.7, leaves[3],
                     dropout_p=0.3 if form.startswith("dropout") else 0.0,
                     rank_scale=leaves[4] if s is not None else None)
    g = torch.randn_like(y)
    want = [t for t in leaves if t.requires_grad]
    by_op = torch.autograd.grad(y, want, g, retain_graph=True)
    differentiable = torch.autograd.grad(y, want, g, create_graph=True)
    tol = {torch.float64: 1e-13, torch.float32: 1e-6}.get(dtype, 1e-2)
    for a, c in zip(by_op, differentiable):
        assert a.dtype == c.dtype and a.shape == c.shape
        assert _rel(a, c) < tol


@pytest.mark.parametrize("form", ["fused", "rank-scale", "dropout", "xa-outside"])
def test_fused_backward_fake_matches_the_op_for_every_output_mask(form):
    """For each of the 64 output masks, the fake kernel of lora_linear_4bit_bwd gives the shapes and dtypes
    the C++ op returns (empty where it forms nothing), or both refuse."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    quant, x, A, B, b = _fused_op_args()
    rs = torch.rand(9, 4) + 0.5 if form == "rank-scale" else None
    p = 0.25 if form == "dropout" else 0.0
    y, xa, xa_raw, mask = torch.ops.qlora.lora_linear_4bit_fwd(x, *quant, A, B, b, rs, 0.5, p)
    fused = form != "xa-outside"
    args = (torch.randn_like(y), *quant, x if fused else None, xa, xa_raw if rs is not None else None,
            A if fused else None, B, rs, 0.5, mask if p else None, p)
    for bits in range(64):
        need = [bool(bits >> i & 1) for i in range(6)]
        try:
            real = [(t.shape, t.dtype) for t in torch.ops.qlora.lora_linear_4bit_bwd(*args, need)]
        except ValueError:
            real = None
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            try:
                fake = [(t.shape, t.dtype) for t in torch.ops.qlora.lora_linear_4bit_bwd(*fake_args, need)]
            except RuntimeError:  # torch._check's error
                fake = None
        assert fake == real, (need, fake, real)


def test_fused_halves_fail_clearly_under_autograd():
    """The two ops are the Function's halves, not differentiable themselves: a direct call on tensors
    that require grad records a not-implemented node, and backward names the op."""
    quant, x, A, B, b = _fused_op_args()
    y = torch.ops.qlora.lora_linear_4bit_fwd(x.requires_grad_(), *quant, A.requires_grad_(), B, b, None, 0.5, 0.0)[0]
    with pytest.raises(RuntimeError, match="derivative for qlora::lora_linear_4bit_fwd is not implemented"):
        y.sum().backward()


@pytest.mark.parametrize("frozen", ["x", "B-and-bias", "rank_scale", "A-only-trained"])
def test_backward_op_with_partial_requires_grad(frozen):
    """Some leaves frozen (the output mask partly off): the op's gradients equal the differentiable
    backward's and the float64 reference's, and the frozen leaves get none."""
    lead, in_f, out_f, r = (3, 4), 64, 24, 4
    w, x, A, B, b = _operands(lead, in_f, out_f, r, torch.float32)
    packed, state = quantize_4bit(w, blocksize=32)
    s = torch.rand(*lead, r) + 0.5
    trained = {"x": (False, True, True, True, True), "B-and-bias": (True, True, False, False, True),
               "rank_scale": (True, True, True, True, False), "A-only-trained": (False, True, False, False, False)}[frozen]
    leaves = [t.clone().requires_grad_(g) for t, g in zip((x, A, B, b, s), trained)]
    y = qlora_linear(leaves[0], packed, state, leaves[1], leaves[2], 0.7, leaves[3], rank_scale=leaves[4])
    g = torch.randn_like(y)
    want = [t for t in leaves if t.requires_grad]
    by_op = torch.autograd.grad(y, want, g, retain_graph=True)
    differentiable = torch.autograd.grad(y, want, g, create_graph=True)
    w64 = dequantize_4bit(packed, state, out_dtype=torch.float32).double()
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    y64 = ref.qlora_linear(ref_leaves[0], w64, ref_leaves[1], ref_leaves[2], 0.7, ref_leaves[3],
                           rank_scale=ref_leaves[4])
    ref_grads = torch.autograd.grad(y64, [t for t in ref_leaves if t.requires_grad], g.double())
    for a, c, d in zip(by_op, differentiable, ref_grads):
        assert _rel(a, c) < 1e-6 and _rel(a, d) < 1e-4


def test_fused_halves_check_their_arguments():
    quant, x, A, B, b = _fused_op_args()
    fwd = torch.ops.qlora.lora_linear_4bit_fwd
    with pytest.raises(ValueError, match=r"x must be 2-D \(rows, in_features = 100\)"):
        fwd(x[:, :99], *quant, A, B, b, None, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"lora_A must be \(r, in_features\) = \(r >= 1, 100\)"):
        fwd(x, *quant, A[:, :50], B, b, None, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"lora_B must be \(out_features, r\) = \(70, 4\)"):
        fwd(x, *quant, A, B[:, :3], b, None, 1.0, 0.0)
    with pytest.raises(TypeError, match="lora_B must be .*Float.*x's dtype"):
        fwd(x, *quant, A, B.double(), b, None, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"rank_scale must be \(r,\) = \(4,\) or \(\*lead, r\)"):
        fwd(x, *quant, A, B, b, torch.ones(5), 1.0, 0.0)
    with pytest.raises(TypeError, match="rank_scale must be a floating-point tensor"):
        fwd(x, *quant, A, B, b, torch.ones(4, dtype=torch.long), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1"):
        fwd(x, *quant, A, B, b, None, 1.0, 1.0)
    y, xa, xa_raw, _ = fwd(x, *quant, A, B, b, None, 1.0, 0.0)
    bwd = torch.ops.qlora.lora_linear_4bit_bwd
    only_x = [True] + [False] * 5
    with pytest.raises(ValueError, match=r"grad must be 2-D \(rows, out_features = 70\)"):
        bwd(y[:, :69], *quant, x, xa, None, A, B, None, 1.0, None, 0.0, only_x)
    with pytest.raises(ValueError, match="x must be given with lora_A"):
        bwd(y, *quant, None, xa, None, A, B, None, 1.0, None, 0.0, only_x)
    with pytest.raises(ValueError, match="x has 8 rows but grad 9"):
        bwd(y, *quant, x[:8], xa, None, A, B, None, 1.0, None, 0.0, only_x)
    with pytest.raises(ValueError, match="no xa input"):
        bwd(y, *quant, x, xa, None, A, B, None, 1.0, None, 0.0, [False, True] + [False] * 4)
    with pytest.raises(ValueError, match=r"dropout_mask needs lora_A .* dropout_p in \(0, 1\)"):
        bwd(y, *quant, x, xa, None, A, B, None, 1.0, torch.ones_like(x, dtype=torch.bool), 0.0, only_x)
    with pytest.raises(ValueError, match="dropout_mask must be bool of x's shape"):
        bwd(y, *quant, x, xa, None, A, B, None, 1.0, torch.ones(9, 99, dtype=torch.bool), 0.2, only_x)
    with pytest.raises(ValueError, match=r"xa_raw must be \(rows, r\) = \(9, 4\)"):  # (e.g. the empty one)
        bwd(y, *quant, x, xa, torch.empty(0), A, B, torch.ones(4), 1.0, None, 0.0, [False] * 5 + [True])


def test_dropout_uses_the_same_mask_as_the_reference():
    w, x, A, B, b = _operands((64,), 96, 48, 8, torch.float32)
    packed, state = quantize_4bit(w)
    torch.manual_seed(1234)
    y = qlora_linear(x, packed, state, A, B, 2.0, b, dropout_p=0.3)
    torch.manual_seed(1234)
    y_ref = ref.qlora_linear(x, dequantize_4bit(packed, state), A, B, 2.0, b, dropout_p=0.3)
    assert _rel(y, y_ref) < 1e-6
    no_dropout = qlora_linear(x, packed, state, A, B, 2.0, b)
    assert _rel(y, no_dropout) > 1e-4  # the mask did something


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_dropout_matches_reference(dtype):
    """Training with dropout through the fused op (A trained): the mask the C++ op draws is F.dropout's for
    the same seed, and output and gradients in x, A, B equal the float64 reference over that mask."""
    lead, in_f, out_f, r = (5, 13), 96, 40, 6
    w, x, A, B, b = _operands(lead, in_f, out_f, r, dtype)
    packed, state = quantize_4bit(w.float(), blocksize=32)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    torch.manual_seed(77)
    y = qlora_linear(leaves[0], packed, state, leaves[1], leaves[2], 0.6, b, dropout_p=0.4)
    g = torch.randn_like(y)
    y.backward(g)
    w64 = dequantize_4bit(packed, state, out_dtype=torch.float32).double()
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    torch.manual_seed(77)
    y64 = ref.qlora_linear(ref_leaves[0], w64, ref_leaves[1], ref_leaves[2], 0.6, b.double(), dropout_p=0.4)
    y64.backward(g.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    assert _rel(y, y64) < tol
    for got, want in zip(leaves, ref_leaves):
        assert _rel(got.grad, want.grad) < (tol if dtype != torch.float32 else 1e-4)
    # another seed, another mask: the LoRA term moves (over a zero base weight and no bias, so that the
    # base term, whose rows are scaled by up to e^6, cannot hide it: with them a 1e-3 bound failed on
    # some seeds)
    zp, zs = quantize_4bit(torch.zeros(out_f, in_f), blocksize=32)
    torch.manual_seed(77)
    y77 = qlora_linear(x, zp, zs, A, B, 0.6, None, dropout_p=0.4)
    torch.manual_seed(78)
    assert _rel(qlora_linear(x, zp, zs, A, B, 0.6, None, dropout_p=0.4), y77) > 0.1


def test_fused_dropout_compiles_like_eager():
    """torch.compile over the fused op with dropout: the op draws its mask at run time, so the compiled
    call gives eager's output and gradients for the same seed."""
    w, x, A, B, b = _operands((6,), 64, 40, 4, torch.float32)
    packed, state = quantize_4bit(w)
    f = lambda x, A, B: qlora_linear(x, packed, state, A, B, 2.0, b, dropout_p=0.3)  # noqa: E731
    torch._dynamo.reset()
    outs = []
    for fn in (torch.compile(f, fullgraph=True), f):
        leaves = [t.clone().requires_grad_() for t in (x, A, B)]
        torch.manual_seed(1)
        y = fn(*leaves)
        y.sum().backward()
        outs.append([y] + [t.grad for t in leaves])
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c)


def test_backward_saves_no_dense_weight_and_no_output_sized_tensor():
    out_f, in_f, rows, r = 96, 128, 40, 4
    w, x, A, B, b = _operands((rows,), in_f, out_f, r, torch.float32)
    packed, state = quantize_4bit(w)
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qlora_linear(x, packed, state, A, B, 1.0, b, dropout_p=0.1)
    y.sum().backward()
    float_saved = [t for t in saved if t.is_floating_point()]
    assert not any(t.numel() >= out_f * in_f for t in float_saved), [tuple(t.shape) for t in float_saved]
    assert not any(t.shape == (rows, out_f) for t in float_saved)
    assert any(t.shape == (rows, r) for t in float_saved)  # the r-wide x A^T


def test_torch_compile_matches_eager():
    w, x, A, B, b = _operands((17,), 80, 50, 4, torch.float32)
    packed, state = quantize_4bit(w)

    def f(x, A, B, b):
        return qlora_linear(x, packed, state, A, B, 2.0, b)

    leaves = [t.clone().requires_grad_() for t in (x, A, B, b)]
    y = torch.compile(f, fullgraph=True)(*leaves)
    y.sum().backward()
    eager = [t.clone().requires_grad_() for t in (x, A, B, b)]
    y_e = f(*eager)
    y_e.sum().backward()
    assert torch.allclose(y, y_e, rtol=1e-5, atol=1e-5)
    for a, c in zip(leaves, eager):
        assert torch.allclose(a.grad, c.grad, rtol=1e-5, atol=1e-5)


class TestBadInput:
    def setup_method(self):
        w, self.x, self.A, self.B, self.b = _operands((3,), 64, 32, 4, torch.float32)
        self.packed, self.state = quantize_4bit(w)

    def call(self, **kw):
        args = dict(x=self.x, packed=self.packed, state=self.state, lora_A=self.A, lora_B=self.B, scaling=1.0,
                    bias=self.b)
        args.update(kw)
        return qlora_linear(**args)

    def test_wrong_feature_size(self):
        with pytest.raises(ValueError, match="x must have in_features = 64"):
            self.call(x=torch.randn(3, 65))

    def test_adapter_dtype_mismatch(self):
        with pytest.raises(TypeError, match="lora_A is torch.bfloat16 but x is torch.float32"):
            self.call(lora_A=self.A.bfloat16())

    def test_adapter_device_mismatch(self):
        with pytest.raises(ValueError, match="lora_B is on meta but x is on cpu"):
            self.call(lora_B=self.B.to("meta"))

    def test_rank_must_be_positive(self):
        with pytest.raises(ValueError, match=r"lora_A must be \(r, in_features\)"):
            self.call(lora_A=torch.randn(0, 64), lora_B=torch.randn(32, 0))

    @pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
    def test_dropout_range(self, p):
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            self.call(dropout_p=p)

    def test_adapter_shapes(self):
        with pytest.raises(ValueError, match=r"lora_B must be \(out_features, r\) = \(32, 4\)"):
            self.call(lora_B=torch.randn(31, 4))
        with pytest.raises(ValueError, match="lora_A and lora_B must be given together"):
            self.call(lora_B=None)
        with pytest.raises(ValueError, match=r"bias must be \(out_features,\)"):
            self.call(bias=torch.randn(31))

    def test_op_level_checks(self):
        p, s = self.packed.flatten(), self.state
        quant = (p, s.absmax, 64, "nf4", 32, 64, s.nested_absmax, s.nested_code, s.offset.reshape(1), 256)
        with pytest.raises(ValueError, match="x must have in_features = 64 columns"):
            torch.ops.qlora.linear_4bit(torch.randn(3, 63), *quant)
        with pytest.raises(ValueError, match="lora_xa must be"):
            torch.ops.qlora.linear_4bit(self.x, *quant, torch.randn(4, 4), self.B, None)
        with pytest.raises(TypeError, match="x must be float32"):
            torch.ops.qlora.linear_4bit(self.x.int(), *quant)
        g = torch.randn(3, 32)
        with pytest.raises(ValueError, match="lora_grad and lora_A must be given together"):
            torch.ops.qlora.linear_4bit_grad_input(g, *quant, torch.randn(3, 4), None)
        with pytest.raises(ValueError, match=r"lora_grad must be \(rows, r\) with rows = 3"):
            torch.ops.qlora.linear_4bit_grad_input(g, *quant, torch.randn(2, 4), self.A)
        with pytest.raises(ValueError, match=r"lora_A must be \(r, in_features\) = \(4, 64\)"):
            torch.ops.qlora.linear_4bit_grad_input(g, *quant, torch.randn(3, 4), self.A[:, :60])
        with pytest.raises(TypeError, match="lora_A must be .*grad's dtype"):
            torch.ops.qlora.linear_4bit_grad_input(g, *quant, torch.randn(3, 4), self.A.double())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}r{c[3]}")
def test_cuda_forward_backward_match_reference(cuda_device, dtype, case):
    lead, in_f, out_f, r = case
    _check_against_reference(dtype, lead, in_f, out_f, r, True, True, True, "nf4", device=cuda_device)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 16, 17, 4096])
def test_cuda_equals_cpu(cuda_device, rows):
    w, x, A, B, b = _operands((rows,), 512, 384, 16, torch.float32)
    packed, state = quantize_4bit(w)
    y_cpu = qlora_linear(x, packed, state, A, B, 2.0, b)
    args = [t.to(cuda_device) for t in (x, packed)]
    y_gpu = qlora_linear(args[0], args[1], state.to(cuda_device), A.to(cuda_device), B.to(cuda_device), 2.0,
                         b.to(cuda_device))
    assert _rel(y_gpu.cpu(), y_cpu) < 1e-5  # TF32 is off by default for matmuls


def _decode_kernels(fn) -> set[str]:
    """Names of the decode kernels (CUDA-core "gemv_4bit_kernel", tensor-core "gemv_4bit_tc_kernel") fn ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {k for e in prof.events() for k in ("gemv_4bit_kernel", "gemv_4bit_tc_kernel") if k in e.name}


def _ran_decode_kernel(fn) -> bool:
    return bool(_decode_kernels(fn))


def _decode_case(monkeypatch, mode, kernel, dtype, rows, in_f, out_f, bs, dq, qt, device):
    """QLORA_EXT_GEMV=mode on a fresh random layer: checks that exactly ``kernel`` ran, and returns the
    operands, the dequantized weight, the output, its float64 reference and the plain-PyTorch output."""
    monkeypatch.setenv("QLORA_EXT_GEMV", mode)
    w, x, A, B, b = _operands((rows,), in_f, out_f, 8, dtype, device)
    packed, state = quantize_4bit(w, blocksize=bs, quant_type=qt, double_quant=dq)
    with torch.no_grad():
        assert _decode_kernels(lambda: qlora_linear(x, packed, state, A, B, 0.5, b)) == {kernel}
        y = qlora_linear(x, packed, state, A, B, 0.5, b)
        w_deq = dequantize_4bit(packed, state, out_dtype=torch.float32)
        y64 = ref.qlora_linear(x.double(), w_deq.double(), A.double(), B.double(), 0.5, b.double())
        yp = torch.nn.functional.linear(x, w_deq.to(dtype), b) + ((x @ A.t()) * 0.5) @ B.t()
    return x, packed, state, A, B, b, w_deq, y, y64, yp


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,in_f,out_f,bs,dq,qt", [
    (1, 4096, 130, 64, True, "nf4"), (2, 1056, 77, 32, False, "fp4"), (3, 96, 300, 4096, True, "fp4"),
    (4, 2080, 17, 128, False, "nf4"), (1, 64, 1, 64, True, "nf4")])
def test_cuda_decode_kernel_matches_reference(cuda_device, monkeypatch, dtype, rows, in_f, out_f, bs, dq, qt):
    """QLORA_EXT_GEMV=1: the CUDA-core decode kernel (<= 4 rows, in_features % 32 == 0) runs, and equals
    the float64 reference over the same dequantized weight within the plain-PyTorch error budget (K not a
    multiple of its 1024-element step, out_features not a multiple of its 16 rows, 3 of 4 rows, 1 output)."""
    x, packed, state, A, B, b, w_deq, y, y64, yp = _decode_case(monkeypatch, "1", "gemv_4bit_kernel", dtype, rows,
                                                                in_f, out_f, bs, dq, qt, cuda_device)
    with torch.no_grad():
        monkeypatch.setenv("QLORA_EXT_GEMV", "0")  # the dequantize + cuBLAS path, for comparison
        assert not _ran_decode_kernel(lambda: qlora_linear(x, packed, state, A, B, 0.5, b))
    floor = {torch.float32: 1e-6}.get(dtype, 0.5 * torch.finfo(dtype).eps)
    assert _rel(y, y64) <= max(2 * _rel(yp, y64), floor), (_rel(y, y64), _rel(yp, y64))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,in_f,out_f,bs,dq,qt", [
    (1, 4096, 130, 64, True, "nf4"), (3, 1088, 77, 64, False, "fp4"), (8, 192, 300, 4096, True, "fp4"),
    (9, 2048, 17, 128, False, "nf4"), (16, 64, 1, 64, True, "nf4"), (16, 8192, 1000, 256, True, "nf4"),
    (2, 64, 13000, 64, False, "nf4")])
def test_cuda_tensor_core_decode_kernel_matches_reference(cuda_device, monkeypatch, dtype, rows, in_f, out_f, bs,
                                                          dq, qt):
    """QLORA_EXT_GEMV=tc: the tensor-core decode kernel (fp16/bf16, <= 16 rows, in_features % 64 == 0,
    blocksize >= 64) runs and equals the float64 reference within the plain-PyTorch error budget: one
    and two mma N tiles (<= 8 and 9..16 rows), K split over the CTA's warps unevenly (K / 64 not a
    multiple of 4), a partial 16-feature tile, one output, and more tiles than resident CTAs (the
    persistent loop)."""
    x, packed, state, A, B, b, w_deq, y, y64, yp = _decode_case(monkeypatch, "tc", "gemv_4bit_tc_kernel", dtype,
                                                                rows, in_f, out_f, bs, dq, qt, cuda_device)
    with torch.no_grad():
        y_nolora = qlora_linear(x, packed, state, None, None, 0.5, None)
        y64_nolora = x.double() @ w_deq.double().t()
        yp_nolora = torch.nn.functional.linear(x, w_deq.to(dtype))
    eps = 0.5 * torch.finfo(dtype).eps
    assert _rel(y, y64) <= max(2 * _rel(yp, y64), eps), (_rel(y, y64), _rel(yp, y64))
    assert _rel(y_nolora, y64_nolora) <= max(2 * _rel(yp_nolora, y64_nolora), eps)


@pytest.mark.cuda
@pytest.mark.parametrize("setting", [None, "auto"])
def test_cuda_default_decode_choice(cuda_device, monkeypatch, setting):
    """QLORA_EXT_GEMV unset or auto: one row takes the CUDA-core kernel, 2-16 rows of fp16/bf16 the
    tensor-core kernel where its layout applies, float32 and in_features % 64 != 0 the CUDA-core kernel
    (up to 4 rows), and more rows dequantize + cuBLAS."""
    if setting is None:
        monkeypatch.delenv("QLORA_EXT_GEMV", raising=False)
    else:
        monkeypatch.setenv("QLORA_EXT_GEMV", setting)
    with torch.no_grad():
        for dtype, in_f, rows, expect in ((torch.bfloat16, 256, 1, {"gemv_4bit_kernel"}),
                                          (torch.float16, 256, 2, {"gemv_4bit_tc_kernel"}),
                                          (torch.bfloat16, 256, 16, {"gemv_4bit_tc_kernel"}),
                                          (torch.float32, 256, 4, {"gemv_4bit_kernel"}),
                                          (torch.bfloat16, 96, 4, {"gemv_4bit_kernel"}),
                                          (torch.float32, 256, 5, set()),
                                          (torch.bfloat16, 256, 17, set())):
            w, x, A, B, b = _operands((rows,), in_f, 40, 4, dtype, cuda_device)
            packed, state = quantize_4bit(w, blocksize=64)
            got = _decode_kernels(lambda: qlora_linear(x, packed, state, A, B, 0.5, b))
            assert got == expect, (dtype, in_f, rows, got)


@pytest.mark.cuda
def test_cuda_tensor_core_mode_leaves_other_calls_to_the_other_paths(cuda_device, monkeypatch):
    """QLORA_EXT_GEMV=tc serves only what the tensor-core kernel supports: float32 and blocksize 32 go to
    the CUDA-core kernel, 17 rows to dequantize + cuBLAS; a value other than auto, 0, 1 or tc is refused."""
    monkeypatch.setenv("QLORA_EXT_GEMV", "tc")
    with torch.no_grad():
        for dtype, bs, rows, expect in ((torch.float32, 64, 2, {"gemv_4bit_kernel"}),
                                        (torch.bfloat16, 32, 2, {"gemv_4bit_kernel"}),
                                        (torch.bfloat16, 64, 17, set())):
            w, x, A, B, b = _operands((rows,), 256, 40, 4, dtype, cuda_device)
            packed, state = quantize_4bit(w, blocksize=bs)
            assert _decode_kernels(lambda: qlora_linear(x, packed, state, A, B, 0.5, b)) == expect, (dtype, bs, rows)
        monkeypatch.setenv("QLORA_EXT_GEMV", "fast")
        with pytest.raises(ValueError, match="QLORA_EXT_GEMV must be auto, 0, 1 or tc"):
            qlora_linear(x, packed, state, A, B, 0.5, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,in_f,out_f,bs,avx2", [
    (1, 4096, 300, 64, True), (8, 123, 77, 64, True), (3, 1000, 33, 4096, True), (5, 123, 70, 32, False),
    (2, 64, 1, 64, False), (6, 256, 45, 64, True), (7, 136, 9, 64, True), (4, 1000, 31, 64, True),
    (2, 77, 13, 64, True)])
def test_cpu_decode_path_matches_reference(monkeypatch, dtype, rows, in_f, out_f, bs, avx2):
    """<= 8 rows of float32 x on the CPU take the decode path (W dequantized a cache-sized chunk at a
    time, AVX2 register tiles of dot products): equal to the float64 reference within the plain path's
    error budget, for in_features not a multiple of the block (chunks of whole blocks spanning rows), a
    block larger than a row, the scalar path (no AVX2), one output; QLORA_EXT_GEMV=0 gives the tile
    path instead, which 16-bit x takes where the CPU multiplies 16 bits natively (checked the same way)."""
    if not avx2:
        monkeypatch.setenv("QLORA_EXT_DISABLE_AVX2", "1")
    w, x, A, B, b = _operands((rows,), in_f, out_f, 4, dtype)
    packed, state = quantize_4bit(w, blocksize=bs, double_quant=True)
    y = qlora_linear(x, packed, state, A, B, 0.5, b)
    w_deq = dequantize_4bit(packed, state, out_dtype=torch.float32)
    y64 = ref.qlora_linear(x.double(), w_deq.double(), A.double(), B.double(), 0.5, b.double())
    yp = torch.nn.functional.linear(x.float(), w_deq.to(dtype).float(), b.float()).to(dtype) + (
        (x @ A.t()) * 0.5) @ B.t()
    # a 16-bit output is one rounding of a float32 sum taken in another order than the plain path's: with
    # few outputs (one here) a single ulp of difference must pass (QLORA_TEST_SEED=1372472841 gave 12.0625
    # against the plain path's 12.0, for 12.0132)
    floor = {torch.float32: 1e-6}.get(dtype, torch.finfo(dtype).eps)
    assert _rel(y, y64) <= max(2 * _rel(yp, y64), floor), (_rel(y, y64), _rel(yp, y64))
    monkeypatch.setenv("QLORA_EXT_GEMV", "0")
    y_tile = qlora_linear(x, packed, state, A, B, 0.5, b)
    assert _rel(y_tile, y64) <= max(2 * _rel(yp, y64), floor)
    if dtype == torch.float32:  # two float32 paths: close, not bitwise (summation order)
        assert _rel(y, y_tile) < 1e-5


def test_gemv_setting_is_checked_on_the_cpu(monkeypatch):
    """QLORA_EXT_GEMV takes auto, 0, 1 or tc on every device: another value is refused, naming the variable."""
    w, x, A, B, b = _operands((300,), 64, 8, 2, torch.float32)
    packed, state = quantize_4bit(w)
    monkeypatch.setenv("QLORA_EXT_GEMV", "tc")  # (accepted: the CUDA kernel's mode; the CPU paths as default)
    qlora_linear(x, packed, state, A, B, 1.0, b)
    monkeypatch.setenv("QLORA_EXT_GEMV", "fast")
    with pytest.raises(ValueError, match="QLORA_EXT_GEMV must be auto, 0, 1 or tc, got 'fast'"):
        qlora_linear(x, packed, state, A, B, 1.0, b)


@pytest.mark.parametrize("mode", ["native", "float32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}r{c[3]}")
def test_cpu_16bit_gemm_modes_match_reference(monkeypatch, mode, dtype, case):
    """16-bit x on the CPU multiplies in its own dtype ("native") or upcast to float32 ("float32", what
    the auto setting picks where the CPU's 16-bit GEMM is a slow scalar fallback): either way the forward
    and every gradient are within the plain 16-bit path's error budget against the float64 reference, on
    the tile path, the decode path (one row: float32 GEMMs take it) and with leading dims."""
    import qlora_ext

    monkeypatch.setenv("QLORA_EXT_CPU_GEMM16", mode)
    assert qlora_ext.cpu_gemm_dtype(dtype) == (dtype if mode == "native" else torch.float32)
    lead, in_f, out_f, r = case
    _check_against_reference(dtype, lead, in_f, out_f, r, bias=True, lora=True, double_quant=True, quant_type="nf4")


@pytest.mark.parametrize("mode", ["native", "float32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", ["fused", "per-row", "dropout", "xa-outside"])
def test_cpu_16bit_gemm_modes_backward_op(monkeypatch, mode, dtype, form):
    """The C++ backward with its r-wide GEMMs in either mode equals the differentiable Python backward
    (whose torch ops multiply in 16 bits) within the 16-bit tolerance."""
    monkeypatch.setenv("QLORA_EXT_CPU_GEMM16", mode)
    _check_backward_op_equals_differentiable_backward(dtype, form)


def test_cpu_gemm16_setting(monkeypatch):
    """QLORA_EXT_CPU_GEMM16: unset or auto, one stable choice per dtype (its own or float32); native and
    float32 force one; float32 / float64 are never changed; another value is refused, naming the
    variable, by the query and by the op on CPU tensors of any dtype; kernels_in_use reports the choice."""
    import qlora_ext

    half = (torch.float16, torch.bfloat16)
    monkeypatch.delenv("QLORA_EXT_CPU_GEMM16", raising=False)
    auto = {dt: qlora_ext.cpu_gemm_dtype(dt) for dt in half}
    assert all(auto[dt] in (dt, torch.float32) for dt in half)
    for mode, want in [("auto", auto), ("native", {dt: dt for dt in half}),
                       ("float32", {dt: torch.float32 for dt in half})]:
        monkeypatch.setenv("QLORA_EXT_CPU_GEMM16", mode)
        assert {dt: qlora_ext.cpu_gemm_dtype(dt) for dt in half} == want
        assert all(qlora_ext.cpu_gemm_dtype(dt) == dt for dt in (torch.float32, torch.float64))
    assert "16-bit GEMMs: bfloat16 in float32, float16 in float32" in qlora_ext.kernels_in_use("cpu")
    monkeypatch.setenv("QLORA_EXT_CPU_GEMM16", "fast")
    with pytest.raises(ValueError, match="QLORA_EXT_CPU_GEMM16 must be auto, native or float32, got 'fast'"):
        qlora_ext.cpu_gemm_dtype(torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        w, x, A, B, b = _operands((20,), 64, 8, 2, dtype)
        packed, state = quantize_4bit(w)
        with pytest.raises(ValueError, match="QLORA_EXT_CPU_GEMM16"):
            qlora_linear(x, packed, state, A, B, 1.0, b)


@pytest.mark.parametrize("out_f,in_f,bs", [(1000, 4200, 64), (4097, 1100, 64), (130, 33000, 4096)])
def test_several_cpu_tiles(out_f, in_f, bs):
    """Layers above the CPU kernel's 4M-element tile: tile boundaries, a partial last tile."""
    w = torch.randn(out_f, in_f)
    packed, state = quantize_4bit(w, blocksize=bs)
    x, g = torch.randn(3, in_f), torch.randn(3, out_f)
    wd = dequantize_4bit(packed, state, out_dtype=torch.float32).double()
    y = qlora_linear(x, packed, state)
    assert _rel(y, x.double() @ wd.t()) < 5e-5  # float32 dot products over thousands of terms; a tile bug is O(1)
    gx = torch.ops.qlora.linear_4bit_grad_input(g, *_op_quant_args(packed, state))
    assert _rel(gx, g.double() @ wd) < 5e-5


def _op_quant_args(packed, state):
    out_f, in_f = state.shape
    return (packed.flatten(), state.absmax, state.blocksize, state.quant_type, out_f, in_f, state.nested_absmax,
            state.nested_code, state.offset.reshape(1), state.nested_blocksize)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("frozen_A", [False, True], ids=["A-trained", "A-frozen"])
def test_backward_under_autocast(compiled, frozen_A):
    """fp32 x, bf16 autocast around forward and backward (a compiled backward is traced under the
    forward's autocast): gradients of x, A and B close to the float64 reference (bf16 matmuls)."""
    w, x, A, B, b = _operands((6,), 64, 40, 4, torch.float32)
    packed, state = quantize_4bit(w, blocksize=64)
    leaves = [x.requires_grad_(), A.requires_grad_(not frozen_A), B.requires_grad_()]
    f = lambda x, A, B: qlora_linear(x, packed, state, A, B, 0.7, b)  # noqa: E731
    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f, fullgraph=True, backend="aot_eager")
    g = torch.randn(6, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f(*leaves)
        y.backward(g)
    w64 = dequantize_4bit(packed, state, out_dtype=torch.float32).double()
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref.qlora_linear(ref_leaves[0], w64, ref_leaves[1], ref_leaves[2], 0.7, b.double()).backward(g.double())
    for t, r in zip(leaves, ref_leaves):
        if t.requires_grad:
            assert t.grad.dtype == torch.float32 and _rel(t.grad, r.grad) < 2e-2
        else:
            assert t.grad is None


def test_autocast_and_non_contiguous_operands():
    w, x, A, B, b = _operands((4,), 64, 48, 4, torch.float32)
    packed, state = quantize_4bit(w)
    y = qlora_linear(x, packed, state, A, B.t().contiguous().t(), 1.0, torch.stack([b, b], 1)[:, 0])
    assert _rel(y, qlora_linear(x, packed, state, A, B, 1.0, b)) < 1e-7
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = qlora_linear(x, packed, state, A, B, 1.0, b)
    assert ya.dtype == torch.float32 and _rel(ya, y) < 1e-2
    # the same through the fused op (A trained, and in inference): non-contiguous B and bias are made
    # contiguous in C++, the products run in x's dtype whatever autocast says
    leaves = [t.clone().requires_grad_() for t in (x, A)]
    yf = qlora_linear(leaves[0], packed, state, leaves[1], B.t().contiguous().t(), 1.0, torch.stack([b, b], 1)[:, 0])
    with torch.no_grad():
        yi = qlora_linear(x, packed, state, A, B.t().contiguous().t(), 1.0, torch.stack([b, b], 1)[:, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yfa = qlora_linear(leaves[0], packed, state, leaves[1], B, 1.0, b)
    assert _rel(yf, y) < 1e-7 and _rel(yi, y) < 1e-7 and yfa.dtype == torch.float32 and _rel(yfa, y) < 1e-7
    yf.sum().backward()
    assert leaves[1].grad is not None and leaves[0].grad.shape == x.shape


@pytest.mark.parametrize("dropout_p,frozen_A", [(0.0, False), (0.3, False), (0.3, True)],
                         ids=["fused", "fused-dropout", "xa-outside"])
def test_double_backward(dropout_p, frozen_A):
    """Second derivatives in x, A and B, through both forms of the autograd Function (with dropout, a
    fixed mask per call via the seed)."""
    w, x, A, B, b = _operands((3,), 32, 16, 2, torch.float64)
    packed, state = quantize_4bit(w, blocksize=32)
    leaves = [t.requires_grad_() for t in ((x, B) if frozen_A else (x, A, B))]

    def f(*leaves):
        torch.manual_seed(0)
        x_, A_, B_ = (leaves[0], A, leaves[1]) if frozen_A else leaves
        return qlora_linear(x_, packed, state, A_, B_, 1.3, b, dropout_p=dropout_p)
    assert torch.autograd.gradgradcheck(f, leaves)


# ---- rank_scale (AdaLoRA's singular values, MoE-LoRA's gates) -------------------------------------------

def _check_rank_scale(dtype, lead, per_row, device="cpu"):
    in_f, out_f, r = 96, 70, 6
    w, x, A, B, b = _operands(lead, in_f, out_f, r, dtype, device)
    packed, state = quantize_4bit(w, blocksize=32)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32  # gates stay fp32 under 16-bit x
    s = torch.rand(*(lead if per_row else ()), r, device=device, dtype=sdt) + 0.1
    leaves = [t.clone().requires_grad_() for t in (x, A, B, s)]
    y = qlora_linear(leaves[0], packed, state, leaves[1], leaves[2], 0.5, b, rank_scale=leaves[3])
    g = torch.randn_like(y)
    y.backward(g)
    w64 = dequantize_4bit(packed, state, out_dtype=torch.float32).double()
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, A, B, s)]
    y64 = ref.qlora_linear(ref_leaves[0], w64, ref_leaves[1], ref_leaves[2], 0.5, b.double(), rank_scale=ref_leaves[3])
    y64.backward(g.double())
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 2e-2)
    assert _rel(y, y64) < tol
    for got, want in zip(leaves, ref_leaves):
        assert _rel(got.grad, want.grad) < (tol if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["per-rank", "per-row"])
def test_rank_scale_matches_reference(dtype, per_row):
    _check_rank_scale(dtype, (3, 5), per_row)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead", [(1,), (2, 2), (3, 70)], ids=["decode1", "decode4", "train210"])
def test_cuda_rank_scale_matches_reference(cuda_device, dtype, lead):
    _check_rank_scale(dtype, lead, True, cuda_device)


def test_rank_scale_gradcheck_float64():
    w, x, A, B, b = _operands((4,), 40, 24, 3, torch.float64)
    packed, state = quantize_4bit(w.float())
    s = torch.rand(4, 3, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, A, B, s)]
    assert torch.autograd.gradcheck(
        lambda x, A, B, s: qlora_linear(x, packed, state, A, B, 1.3, b, rank_scale=s), leaves)


@pytest.mark.parametrize("train_A,dropout_p", [(True, 0.0), (False, 0.0), (True, 0.25)],
                         ids=["fused", "frozen-A", "dropout"])
def test_rank_scale_expanded_per_sample(train_A, dropout_p):
    """MoE-LoRA's gate: one (r,) scale per sample, expanded over the sequence (not materialized): output
    and gradients in x, A, B and the per-sample scales equal the float64 reference, through the fused
    form (A trained, no dropout) and the form that takes xa from outside (frozen A, dropout)."""
    batch, seq, in_f, out_f, r = 3, 7, 64, 40, 4
    w, x, A, B, b = _operands((batch, seq), in_f, out_f, r, torch.float32)
    packed, state = quantize_4bit(w, blocksize=32)
    s0 = torch.rand(batch, r) + 0.1
    leaves = [t.clone().requires_grad_(train_A or i != 1) for i, t in enumerate((x, A, B, s0))]
    torch.manual_seed(3)
    y = qlora_linear(leaves[0], packed, state, leaves[1], leaves[2], 0.5, b, dropout_p=dropout_p,
                     rank_scale=leaves[3][:, None, :].expand(batch, seq, r))
    g = torch.randn_like(y)
    y.backward(g)
    w64 = dequantize_4bit(packed, state, out_dtype=torch.float32).double()
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    torch.manual_seed(3)
    mask_x = torch.nn.functional.dropout(torch.ones(batch * seq, in_f), dropout_p).reshape(batch, seq, in_f)
    xd = ref_leaves[0] * mask_x.double()  # the same mask: dropout draws from the same seed and shape
    s = ref_leaves[3][:, None, :].expand(batch, seq, r)
    y64 = (ref_leaves[0] @ w64.t() + b.double()
           + 0.5 * ((xd @ ref_leaves[1].t()) * s) @ ref_leaves[2].t())
    y64.backward(g.double())
    assert _rel(y, y64) < 1e-5
    for got, want in zip(leaves, ref_leaves):
        if got.requires_grad:
            assert _rel(got.grad, want.grad) < 1e-4


def test_rank_scale_of_another_dtype_keeps_the_promoted_precision():
    """float64 x with a float32 rank_scale (and float32 x with a bfloat16 one): the fused backward computes
    in the promoted dtype, as autograd does through the product, not in the scale's."""
    for xdt, sdt in ((torch.float64, torch.float32), (torch.float32, torch.bfloat16)):
        w, x, A, B, b = _operands((4, 3), 48, 20, 4, xdt)
        packed, state = quantize_4bit(w.float(), blocksize=32)
        s = (torch.rand(4, 3, 4) + 0.5).to(sdt)
        leaves = [t.clone().requires_grad_() for t in (x, A, B)]
        qlora_linear(*leaves[:1], packed, state, leaves[1], leaves[2], 0.5, b, rank_scale=s).sum().backward()
        w64 = dequantize_4bit(packed, state, out_dtype=torch.float32).double()
        ref_leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
        y64 = ref.qlora_linear(ref_leaves[0], w64, ref_leaves[1], ref_leaves[2], 0.5, b.double(),
                               rank_scale=s.double())
        y64.sum().backward()
        tol = 1e-12 if xdt == torch.float64 else 1e-5
        for got, want in zip(leaves, ref_leaves):
            assert _rel(got.grad, want.grad) < tol, (xdt, sdt)


def test_rank_scale_double_backward():
    """Second derivatives in x, A, B and a per-row rank_scale through the fused form of the Function."""
    w, x, A, B, b = _operands((3,), 32, 16, 2, torch.float64)
    packed, state = quantize_4bit(w, blocksize=32)
    s = torch.rand(3, 2, dtype=torch.float64) + 0.1
    leaves = [t.requires_grad_() for t in (x, A, B, s)]
    assert torch.autograd.gradgradcheck(
        lambda x, A, B, s: qlora_linear(x, packed, state, A, B, 1.3, b, rank_scale=s), leaves)


def test_rank_scale_compiles():
    w, x, A, B, b = _operands((5,), 64, 32, 4, torch.float32)
    packed, state = quantize_4bit(w)
    s = torch.rand(4)
    f = lambda x, s: qlora_linear(x, packed, state, A, B, 2.0, b, rank_scale=s)  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, s), f(x, s))


@pytest.mark.parametrize("kind", ["per-rank", "per-row", "expanded"])
def test_rank_scale_compiled_backward_matches_eager(kind):
    """The fused form (x, A, B and the scale trained) under torch.compile: its traced graph holds the two
    C++ halves; output and every gradient equal eager's."""
    lead, in_f, out_f, r = (2, 3), 64, 32, 4
    w, x, A, B, b = _operands(lead, in_f, out_f, r, torch.float32)
    packed, state = quantize_4bit(w)
    s0 = {"per-rank": torch.rand(r), "per-row": torch.rand(*lead, r), "expanded": torch.rand(lead[0], 1, r)}[kind] + 0.5

    def f(x, A, B, s):
        s = s.expand(*lead, r) if kind == "expanded" else s
        return qlora_linear(x, packed, state, A, B, 2.0, b, rank_scale=s)
    torch._dynamo.reset()
    outs = []
    for fn in (torch.compile(f, fullgraph=True), f):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, s0)]
        y = fn(*leaves)
        y.backward(torch.ones_like(y))
        outs.append([y] + [t.grad for t in leaves])
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_rank_scale_errors():
    w, x, A, B, b = _operands((5,), 64, 32, 4, torch.float32)
    packed, state = quantize_4bit(w)
    with pytest.raises(ValueError, match=r"rank_scale must be \(r,\) = \(4,\) or x's leading dims"):
        qlora_linear(x, packed, state, A, B, 1.0, rank_scale=torch.ones(3))
    with pytest.raises(ValueError, match="rank_scale needs lora_A"):
        qlora_linear(x, packed, state, rank_scale=torch.ones(4))
    with pytest.raises(TypeError, match="floating-point"):
        qlora_linear(x, packed, state, A, B, 1.0, rank_scale=torch.ones(4, dtype=torch.long))
