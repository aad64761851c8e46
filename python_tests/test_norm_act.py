"""qlora_ext.norm_act: the fused RMSNorm and SwiGLU activation against their references (transformers'
expressions, qlora_ext.reference) and float64, every dtype pair, awkward shapes; gradients against
autograd, gradcheck and gradgradcheck in float64, opcheck, torch.compile, bad input; CUDA kernels
(vector and scalar paths) against the CPU ones."""
from __future__ import annotations

import pytest
import torch

from qlora_ext import reference as R
from qlora_ext.norm_act import rms_norm, silu_mul

from conftest import FLOAT_DTYPES

# a few units in the last place of each dtype (the op and the module can round the normalized row
# differently when their sums of squares differ in the last bit)
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
SHAPES = [(1, 1), (3, 7), (2, 5, 77), (4, 96), (2, 1000), (1, 3, 4099)]


def _ideal_rms_norm(x, w, eps):
    x64 = x.double()
    return w.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


def _close(a, b, tol):
    scale = b.abs().max().clamp(min=1.0).item()
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("xdt", FLOAT_DTYPES)
@pytest.mark.parametrize("wdt", FLOAT_DTYPES)
def test_rms_norm_matches_transformers_expression(shape, xdt, wdt):
    x = (torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10).to(xdt)
    w = (torch.rand(shape[-1]) + 0.5).to(wdt)
    y = rms_norm(x, w, 1e-6)
    ref = R.rms_norm(x, w, 1e-6)
    assert y.dtype == ref.dtype == torch.promote_types(xdt, wdt) and y.shape == x.shape
    # the same rounding as the module's, bar an ulp of the normalized row, and near the float64 value
    _close(y, ref, TOL[xdt] + TOL[y.dtype])
    _close(y, _ideal_rms_norm(x, w, 1e-6), 2 * (TOL[xdt] + TOL[y.dtype]))


@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 77), (2, 1000)])
@pytest.mark.parametrize("xdt,wdt", [(t, t) for t in FLOAT_DTYPES] + [(torch.bfloat16, torch.float32),
                                                                       (torch.float16, torch.bfloat16)])
def test_rms_norm_gradients_match_autograd(shape, xdt, wdt):
    x = torch.randn(shape).to(xdt).requires_grad_()
    w = (torch.rand(shape[-1]) + 0.5).to(wdt).requires_grad_()
    g = torch.randn(shape).to(torch.promote_types(xdt, wdt))
    gx, gw = torch.autograd.grad(rms_norm(x, w, 1e-5), (x, w), g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rx, rw = torch.autograd.grad(_ideal_rms_norm(x64, w64, 1e-5), (x64, w64), g.double())
    assert gx.dtype == xdt and gw.dtype == wdt
    _close(gx, rx, 4 * TOL[xdt])
    _close(gw, rw, 4 * (TOL[xdt] + TOL[wdt]))


def test_rms_norm_frozen_weight_forms_no_weight_gradient():
    x = torch.randn(4, 33, requires_grad=True)
    w = torch.rand(33) + 0.5
    y = rms_norm(x, w)
    assert y.grad_fn is not None
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert w.grad is None and gx.shape == x.shape
    gx2, gw2 = torch.ops.qlora.rms_norm_backward(torch.ones(4, 33), x.detach(), w, torch.ops.qlora.rms_norm(x.detach(), w, 1e-6)[1],
                                                 [True, False])
    assert gw2.numel() == 0
    torch.testing.assert_close(gx2, gx)


def test_rms_norm_gradcheck_and_gradgradcheck_float64():
    x = torch.randn(3, 2, 17, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    assert torch.autograd.gradgradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.qlora.rms_norm(a, b, 1e-5)[0], (x, w))


def test_rms_norm_any_layout_and_empty():
    x = torch.randn(40, 6).t()  # (6, 40), not contiguous
    w = torch.rand(40) + 0.5
    torch.testing.assert_close(rms_norm(x, w), R.rms_norm(x, w, 1e-6), rtol=2e-6, atol=2e-6)
    assert rms_norm(torch.randn(0, 8), torch.ones(8)).shape == (0, 8)
    assert torch.ops.qlora.rms_norm(torch.randn(2, 0, 8), torch.ones(8), 1e-6)[1].shape == (0,)


@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 77), (4099,)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_silu_mul_matches_reference(shape, dtype):
    gate = (torch.randn(shape) * 4).to(dtype)
    up = torch.randn(shape).to(dtype)
    out = silu_mul(gate, up)
    assert out.dtype == dtype
    _close(out, R.silu_mul(gate, up), 2 * TOL[dtype])  # the module rounds silu first: an ulp apart
    _close(out, torch.nn.functional.silu(gate.double()) * up.double(), TOL[dtype])


def test_silu_mul_extremes_stay_finite():
    gate = torch.tensor([-1e4, -100.0, -88.0, 0.0, 88.0, 100.0, 1e4], requires_grad=True)
    up = torch.full_like(gate, 2.0, requires_grad=True)
    out = silu_mul(gate, up)
    torch.testing.assert_close(out, R.silu_mul(gate.detach(), up.detach()))
    gg, gu = torch.autograd.grad(out.sum(), (gate, up))
    assert torch.isfinite(gg).all() and torch.isfinite(gu).all()
    g64 = gate.detach().double().requires_grad_()
    rg = torch.autograd.grad((torch.nn.functional.silu(g64) * 2).sum(), g64)[0]
    torch.testing.assert_close(gg.double(), rg, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_silu_mul_gradients_match_autograd(dtype):
    gate = (torch.randn(5, 301) * 3).to(dtype).requires_grad_()
    up = torch.randn(5, 301).to(dtype).requires_grad_()
    g = torch.randn(5, 301).to(dtype)
    gg, gu = torch.autograd.grad(silu_mul(gate, up), (gate, up), g)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    rg, ru = torch.autograd.grad(torch.nn.functional.silu(g64) * u64, (g64, u64), g.double())
    _close(gg, rg, 4 * TOL[dtype])
    _close(gu, ru, 4 * TOL[dtype])
    # one side only: the other is not formed
    (only_up,) = torch.autograd.grad(silu_mul(gate.detach(), up), up, g)
    torch.testing.assert_close(only_up, gu)


def test_silu_mul_gradcheck_and_gradgradcheck_float64():
    gate = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (gate, up))
    assert torch.autograd.gradgradcheck(silu_mul, (gate, up))
    assert torch.autograd.gradcheck(torch.ops.qlora.silu_mul, (gate, up))


def test_silu_mul_promotes_mixed_dtypes():
    gate, up = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 8)
    out = silu_mul(gate, up)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, R.silu_mul(gate.float(), up))


def test_opcheck():
    x, w = torch.randn(3, 5, 40), torch.rand(40) + 0.5
    torch.library.opcheck(torch.ops.qlora.rms_norm.default, (x.requires_grad_(), w.requires_grad_(), 1e-6))
    torch.library.opcheck(torch.ops.qlora.rms_norm.default, (torch.randn(6, 40, dtype=torch.bfloat16), w, 1e-5))
    _, rstd = torch.ops.qlora.rms_norm(x.detach(), w.detach(), 1e-6)
    torch.library.opcheck(torch.ops.qlora.rms_norm_backward.default,
                          (torch.randn(3, 5, 40), x.detach(), w.detach(), rstd, [True, True]))
    g, u = torch.randn(7, 33), torch.randn(7, 33)
    torch.library.opcheck(torch.ops.qlora.silu_mul.default, (g.requires_grad_(), u.requires_grad_()))
    torch.library.opcheck(torch.ops.qlora.silu_mul_backward.default,
                          (torch.randn(7, 33), g.detach(), u.detach(), [True, False]))


def test_torch_compile_matches_eager():
    def block(x, w, up):
        h = rms_norm(x, w, 1e-6)
        return silu_mul(h, up).sum()

    x = torch.randn(2, 6, 48, requires_grad=True)
    w = (torch.rand(48) + 0.5).requires_grad_()
    up = torch.randn(2, 6, 48, requires_grad=True)
    eager = block(x, w, up)
    ge = torch.autograd.grad(eager, (x, w, up))
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x, w, up)
    gc = torch.autograd.grad(compiled, (x, w, up))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_bad_input_is_refused_clearly():
    x, w = torch.randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match="weight must be 1-D with x's last dimension"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        rms_norm(x.long(), w)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        rms_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="x must be contiguous"):
        torch.ops.qlora.rms_norm(torch.randn(8, 4).t(), torch.ones(8), 1e-6)
    with pytest.raises(TypeError, match="weight may be float64 only with float64 x"):
        torch.ops.qlora.rms_norm(x, w.double(), 1e-6)
    _, rstd = torch.ops.qlora.rms_norm(x, w, 1e-6)
    with pytest.raises(ValueError, match="rstd must be a contiguous tensor of 4 rows"):
        torch.ops.qlora.rms_norm_backward(x, x, w, rstd[:3], [True, False])
    with pytest.raises(TypeError, match="grad must be Float \\(the output dtype of rms_norm\\), got Half"):
        torch.ops.qlora.rms_norm_backward(x.half(), x, w, rstd, [True, False])
    with pytest.raises(ValueError, match="gate and up must have the same shape"):
        silu_mul(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="up must have gate's shape"):
        torch.ops.qlora.silu_mul(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(TypeError, match="up must be Float \\(gate's dtype\\)"):
        torch.ops.qlora.silu_mul(torch.randn(3, 4), torch.randn(3, 4).half())


def test_backward_ops_are_not_differentiable():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.ones(8)
    _, rstd = torch.ops.qlora.rms_norm(x.detach(), w, 1e-6)
    gx, _ = torch.ops.qlora.rms_norm_backward(torch.ones(3, 8), x, w, rstd, [True, False])
    with pytest.raises(RuntimeError, match="rms_norm_backward"):
        gx.sum().backward()


# ---- CUDA -------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("cols", [8, 77, 4096, 8192, 4099])
@pytest.mark.parametrize("xdt", FLOAT_DTYPES)
@pytest.mark.parametrize("wdt", FLOAT_DTYPES)
def test_cuda_rms_norm_matches_cpu(cuda_device, cols, xdt, wdt):
    x = (torch.randn(37, cols) * 3).to(xdt)
    w = (torch.rand(cols) + 0.5).to(wdt)
    g = torch.randn(37, cols).to(torch.promote_types(xdt, wdt))
    y, rstd = torch.ops.qlora.rms_norm(x, w, 1e-6)
    yc, rstdc = torch.ops.qlora.rms_norm(x.to(cuda_device), w.to(cuda_device), 1e-6)
    _close(yc.cpu(), y, TOL[xdt] + TOL[y.dtype])
    torch.testing.assert_close(rstdc.cpu(), rstd, rtol=1e-5, atol=0)
    gx, gw = torch.ops.qlora.rms_norm_backward(g, x, w, rstd, [True, True])
    gxc, gwc = torch.ops.qlora.rms_norm_backward(g.to(cuda_device), x.to(cuda_device), w.to(cuda_device), rstdc,
                                                 [True, True])
    _close(gxc.cpu(), gx, 4 * TOL[xdt])
    _close(gwc.cpu(), gw, 4 * (TOL[xdt] + TOL[wdt]))


@pytest.mark.cuda
def test_cuda_rms_norm_misaligned_views_take_the_scalar_path(cuda_device):
    base = torch.randn(5 * 64 + 1, device=cuda_device, dtype=torch.bfloat16)
    x = base[1:].view(5, 64)  # 2-byte offset: not 16-byte aligned
    w = torch.rand(64, device=cuda_device, dtype=torch.bfloat16) + 0.5
    _close(rms_norm(x, w).cpu(), rms_norm(x.cpu(), w.cpu()), 2 * TOL[torch.bfloat16])
    g, u = base[1:].view(5, 64), torch.randn(5, 64, device=cuda_device, dtype=torch.bfloat16)
    _close(silu_mul(g, u).cpu(), silu_mul(g.cpu(), u.cpu()), TOL[torch.bfloat16])


@pytest.mark.cuda
@pytest.mark.parametrize("n", [8, 1001, 1 << 20])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_silu_mul_matches_cpu(cuda_device, n, dtype):
    gate, up, g = (torch.randn(n) * 3).to(dtype), torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    out = torch.ops.qlora.silu_mul(gate, up)
    outc = torch.ops.qlora.silu_mul(gate.to(cuda_device), up.to(cuda_device))
    _close(outc.cpu(), out, TOL[dtype])
    for mask in ([True, True], [True, False], [False, True]):
        ref = torch.ops.qlora.silu_mul_backward(g, gate, up, mask)
        got = torch.ops.qlora.silu_mul_backward(g.to(cuda_device), gate.to(cuda_device), up.to(cuda_device), mask)
        for a, b, m in zip(got, ref, mask):
            assert a.numel() == (n if m else 0)
            if m:
                _close(a.cpu(), b, 2 * TOL[dtype])


@pytest.mark.cuda
def test_cuda_torch_compile_matches_eager(cuda_device):
    x = torch.randn(4, 256, device=cuda_device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(256, device=cuda_device, dtype=torch.bfloat16) + 0.5
    f = lambda a: silu_mul(rms_norm(a, w), a).float().sum()  # noqa: E731
    eager, ge = f(x), None
    (ge,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(f, fullgraph=True)(x)
    (gc,) = torch.autograd.grad(compiled, x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(gc, ge)


# ---- both devices: shapes the CUDA launch depends on (rows, partial-sum grid), views, empty inputs,
# output_mask (the CUDA forms against the CPU op, the CPU ones against float64 autograd) -------------

@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Each test below runs on the CPU and (marked `cuda`, so skipped without a GPU) on the GPU."""
    return request.getfixturevalue("cuda_device") if request.param == "cuda" else torch.device("cpu")


def _rms_norm_both_grads(g, x, w, rstd):
    return torch.ops.qlora.rms_norm_backward(g, x, w, rstd, [True, True])


def _check_rms_norm_on(device, x, w, g, eps=1e-6):
    """rms_norm and its backward of the CPU tensors x, w, g on `device`: against the CPU op there, and on
    the CPU against float64 autograd of the ideal expression (the CPU test's tolerances)."""
    xdt, wdt = x.dtype, w.dtype
    y, rstd = torch.ops.qlora.rms_norm(x, w, eps)
    gx, gw = _rms_norm_both_grads(g, x, w, rstd)
    assert y.dtype == torch.promote_types(xdt, wdt) and gx.dtype == xdt and gw.dtype == wdt
    if device.type == "cpu":
        _close(y, _ideal_rms_norm(x, w, eps), 2 * (TOL[xdt] + TOL[y.dtype]))
        x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
        rx, rw = torch.autograd.grad(_ideal_rms_norm(x64, w64, eps), (x64, w64), g.double())
        _close(gx, rx, 4 * TOL[xdt])
        _close(gw, rw, 4 * (TOL[xdt] + TOL[wdt]))
        return
    xd, wd, gd = x.to(device), w.to(device), g.to(device)
    yd, rstdd = torch.ops.qlora.rms_norm(xd, wd, eps)
    _close(yd.cpu(), y, TOL[xdt] + TOL[y.dtype])
    torch.testing.assert_close(rstdd.cpu(), rstd, rtol=1e-5, atol=0)
    gxd, gwd = _rms_norm_both_grads(gd, xd, wd, rstdd)
    assert gxd.dtype == xdt and gwd.dtype == wdt and gxd.shape == x.shape and gwd.shape == w.shape
    _close(gxd.cpu(), gx, 4 * TOL[xdt])
    _close(gwd.cpu(), gw, 4 * (TOL[xdt] + TOL[wdt]))
    # the weight gradient alone (no grad_x kernel) is the same partial sums
    _, gw_only = torch.ops.qlora.rms_norm_backward(gd, xd, wd, rstdd, [False, True])
    torch.testing.assert_close(gw_only, gwd)


# rows: many (the weight gradient's partial-sum grid at its 128 cap, rows not a multiple of it), few (one
# partial row), and a q/k-norm shape (8192 rows of head_dim 128, 4-D)
ROWS_SHAPES = [(5000, 512), (5000, 4099), (3, 4096), (3, 77), (2, 1024, 4, 128)]


@pytest.mark.parametrize("shape", ROWS_SHAPES)
@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_rms_norm_many_and_few_rows(device, shape, xdt, wdt):
    x = (torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10).to(xdt)
    w = (torch.rand(shape[-1]) + 0.5).to(wdt)
    g = torch.randn(shape).to(torch.promote_types(xdt, wdt))
    _check_rms_norm_on(device, x, w, g)


def _offset_view(t, device):
    """t's values in a view starting one element into a fresh buffer on `device` (on the GPU: not on a
    16-byte boundary, so the scalar path), contiguous."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.storage_offset() == 1
    return view


@pytest.mark.parametrize("misaligned", [("weight",), ("grad",), ("x",), ("weight", "grad", "x")],
                         ids=["weight", "grad", "x", "all"])
@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.bfloat16, torch.float32)])
def test_rms_norm_backward_of_offset_views(device, misaligned, xdt, wdt):
    rows, cols = 37, 4096  # 4096: whole 16-byte vectors per row, so only the offset decides the path
    x = (torch.randn(rows, cols) * 3).to(xdt).to(device)
    w = (torch.rand(cols) + 0.5).to(wdt).to(device)
    g = torch.randn(rows, cols).to(torch.promote_types(xdt, wdt)).to(device)
    y, rstd = torch.ops.qlora.rms_norm(x, w, 1e-6)
    gx, gw = _rms_norm_both_grads(g, x, w, rstd)
    xv = _offset_view(x, device) if "x" in misaligned else x
    wv = _offset_view(w, device) if "weight" in misaligned else w
    gv = _offset_view(g, device) if "grad" in misaligned else g
    yv, rstdv = torch.ops.qlora.rms_norm(xv, wv, 1e-6)
    _close(yv, y, TOL[xdt] + TOL[y.dtype])  # vector and scalar paths sum a row in different orders
    torch.testing.assert_close(rstdv, rstd, rtol=1e-5, atol=0)
    gxv, gwv = _rms_norm_both_grads(gv, xv, wv, rstd)
    _close(gxv, gx, 4 * TOL[xdt])
    _close(gwv, gw, 4 * (TOL[xdt] + TOL[wdt]))
    # and against the CPU op / float64 on plain CPU copies
    _check_rms_norm_on(device, x.cpu(), w.cpu(), g.cpu())
    if device.type == "cuda":
        gx_cpu, gw_cpu = _rms_norm_both_grads(g.cpu(), x.cpu(), w.cpu(), rstd.cpu())
        _close(gxv.cpu(), gx_cpu, 4 * TOL[xdt])
        _close(gwv.cpu(), gw_cpu, 4 * (TOL[xdt] + TOL[wdt]))


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (0, 4099)])
@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float32)])
def test_rms_norm_zero_rows(device, shape, xdt, wdt):
    x = torch.randn(shape, device=device).to(xdt)
    w = (torch.rand(shape[-1], device=device) + 0.5).to(wdt)
    out = torch.promote_types(xdt, wdt)
    y, rstd = torch.ops.qlora.rms_norm(x, w, 1e-6)
    assert y.shape == shape and y.dtype == out and y.device == x.device
    assert rstd.shape == (0,) and rstd.dtype == torch.float32 and rstd.device == x.device
    g = torch.randn(shape, device=device).to(out)
    for mask in ([True, True], [True, False], [False, True], [False, False]):
        gx, gw = torch.ops.qlora.rms_norm_backward(g, x, w, rstd, mask)
        assert gx.shape == (shape if mask[0] else (0,)) and gx.dtype == xdt and gx.device == x.device
        assert gw.shape == ((shape[-1],) if mask[1] else (0,)) and gw.dtype == wdt and gw.device == x.device
        if mask[1]:
            assert torch.count_nonzero(gw).item() == 0  # an empty sum: zeros, not uninitialized memory
    # through autograd
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    yr = rms_norm(xr, wr)
    assert yr.shape == shape and yr.dtype == out
    ax, aw = torch.autograd.grad(yr, (xr, wr), torch.ones_like(yr))
    assert ax.shape == shape and ax.dtype == xdt
    assert aw.shape == (shape[-1],) and aw.dtype == wdt and torch.count_nonzero(aw).item() == 0


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4096)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_silu_mul_empty(device, shape, dtype):
    gate = torch.randn(shape, device=device).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    out = torch.ops.qlora.silu_mul(gate, up)
    assert out.shape == shape and out.dtype == dtype and out.device == gate.device
    g = torch.randn(shape, device=device).to(dtype)
    for mask in ([True, True], [True, False], [False, True], [False, False]):
        got = torch.ops.qlora.silu_mul_backward(g, gate, up, mask)
        for t, m in zip(got, mask):
            assert t.shape == (shape if m else (0,)) and t.dtype == dtype and t.device == gate.device
    gr, ur = gate.clone().requires_grad_(), up.clone().requires_grad_()
    res = silu_mul(gr, ur)
    assert res.shape == shape and res.dtype == dtype
    ag, au = torch.autograd.grad(res, (gr, ur), torch.ones_like(res))
    assert ag.shape == au.shape == shape and ag.dtype == au.dtype == dtype


@pytest.mark.parametrize("shape", [(3, 7), (37, 4096), (5000, 512)])
@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.bfloat16, torch.float32)])
def test_rms_norm_backward_output_mask(device, shape, xdt, wdt):
    """rms_norm_backward forms only what output_mask picks: the picked gradient as with [True, True],
    the other empty (shape (0,), its own dtype) -- the schema's contract (csrc/ops.cpp)."""
    x = (torch.randn(shape) * 3).to(xdt).to(device)
    w = (torch.rand(shape[-1]) + 0.5).to(wdt).to(device)
    g = torch.randn(shape).to(torch.promote_types(xdt, wdt)).to(device)
    _, rstd = torch.ops.qlora.rms_norm(x, w, 1e-6)
    gx, gw = _rms_norm_both_grads(g, x, w, rstd)
    gx_only, gw_none = torch.ops.qlora.rms_norm_backward(g, x, w, rstd, [True, False])
    gx_none, gw_only = torch.ops.qlora.rms_norm_backward(g, x, w, rstd, [False, True])
    none_x, none_w = torch.ops.qlora.rms_norm_backward(g, x, w, rstd, [False, False])
    for t, dt in ((gw_none, wdt), (gx_none, xdt), (none_x, xdt), (none_w, wdt)):
        assert t.shape == (0,) and t.dtype == dt and t.device == x.device
    assert gx_only.shape == x.shape and gx_only.dtype == xdt
    assert gw_only.shape == w.shape and gw_only.dtype == wdt
    torch.testing.assert_close(gx_only, gx)  # the same kernel each way
    torch.testing.assert_close(gw_only, gw)
    if device.type == "cuda":
        gx_cpu, gw_cpu = _rms_norm_both_grads(g.cpu(), x.cpu(), w.cpu(), rstd.cpu())
        _close(gx_only.cpu(), gx_cpu, 4 * TOL[xdt])
        _close(gw_only.cpu(), gw_cpu, 4 * (TOL[xdt] + TOL[wdt]))
