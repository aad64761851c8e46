"""qlora_ext.optim: PagedAdamW tracks torch.optim.AdamW; the 8-bit variants reach the same loss;
state_dict resumes bit-identically (also across paged / non-paged); state bytes per parameter; bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_ext.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit

SHAPES = [(300, 7), (5000,), (1,), (64, 65)]


def _params(device="cpu", dtype=torch.float32):
    return [nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in SHAPES]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_paged_adamw_tracks_torch_adamw(weight_decay, device="cpu"):
    ours, ref = _params(device), None
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    o1, o2 = PagedAdamW(ours, **kw), torch.optim.AdamW(ref, **kw)
    for _ in range(100):
        for p, q in zip(ours, ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    # all tensors as one vector: a lone element that ends near zero has a relative error far above its
    # absolute one (the GPU contracts the update into FMAs, so it rounds differently from torch's kernel)
    flat = lambda ps: torch.cat([p.detach().reshape(-1) for p in ps])  # noqa: E731
    assert _rel(flat(ours), flat(ref)) <= 1e-6
    assert (flat(ours).double() - flat(ref).double()).abs().max().item() <= 1e-6


def _regression(opt_cls, steps=300, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(512, 64)
    w_true = torch.randn(64, 96)
    y = x @ w_true + 0.01 * torch.randn(512, 96)
    model = nn.Linear(64, 96)  # 6144 weights: over the 8-bit threshold
    opt = opt_cls(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return nn.functional.mse_loss(model(x), y).item()


@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit])
def test_8bit_reaches_the_same_loss_on_a_regression(cls):
    ref = _regression(lambda p, **kw: torch.optim.AdamW(p, **kw))
    ours = _regression(cls)
    assert abs(ours - ref) <= 0.01 * ref + 1e-4, (ours, ref)


def _tiny_lm(opt_cls, steps=150):
    """A small next-token model (embedding, MLP, head) on a synthetic token stream whose next token is
    (7 * previous + noise) mod 32 with noise uniform in 0..3, so the loss stays well above zero (the
    16-token context lets it memorise part of the 4096-token stream below ln 4) and final losses are
    comparable. Language-model shaped; not a real dataset."""
    torch.manual_seed(0)
    vocab, ctx = 32, 16
    noise = torch.randint(0, 4, (4096,), generator=torch.Generator().manual_seed(2))
    stream = torch.zeros(4096, dtype=torch.long)
    for i in range(1, 4096):
        stream[i] = (7 * stream[i - 1] + noise[i]) % vocab
    model = nn.Sequential(nn.Embedding(vocab, 64), nn.Flatten(), nn.Linear(64 * ctx, 128), nn.GELU(),
                          nn.Linear(128, vocab))
    opt = opt_cls(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 4096 - ctx - 1, (64,), generator=gen)
        xb = torch.stack([stream[i:i + ctx] for i in idx])
        yb = torch.stack([stream[i + ctx] for i in idx])
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xb = torch.stack([stream[i:i + ctx] for i in range(0, 2048, 7)])
    yb = torch.stack([stream[i + ctx] for i in range(0, 2048, 7)])
    return nn.functional.cross_entropy(model(xb), yb).item()


def test_8bit_reaches_the_same_loss_on_a_small_lm():
    ref = _tiny_lm(lambda p, **kw: torch.optim.AdamW(p, **kw))
    ours = _tiny_lm(AdamW8bit)
    assert 0.2 < ref < 2.5  # trained, yet far from zero
    assert abs(ours - ref) <= 0.01 * ref, (ours, ref)


@pytest.mark.parametrize("cls,cls2", [(PagedAdamW, PagedAdamW), (PagedAdamW8bit, AdamW8bit),
                                      (AdamW8bit, PagedAdamW8bit)])
def test_state_dict_resumes_bit_identically(cls, cls2):
    def run(opt, params, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()

    a = _params()
    opt_a = cls(a, lr=1e-2)
    run(opt_a, a, 5, 0)
    sd = opt_a.state_dict()
    b = [nn.Parameter(p.detach().clone()) for p in a]
    opt_b = cls2(b, lr=1e-2)
    opt_b.load_state_dict(sd)
    run(opt_a, a, 5, 1)
    run(opt_b, b, 5, 1)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert opt_b.state[b[1]]["exp_avg"].dtype == opt_a.state[a[1]]["exp_avg"].dtype
    assert opt_b.state[b[1]]["exp_avg"].data_ptr() != opt_a.state[a[1]]["exp_avg"].data_ptr()  # copied


def test_deepcopy_keeps_settings_and_state_kinds():
    import copy

    p = nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([p], min_8bit_size=1000)
    p.grad = torch.randn(5000)
    opt.step()
    clone = copy.deepcopy(opt)
    assert clone.min_8bit_size == 1000
    clone.load_state_dict(opt.state_dict())
    assert next(iter(clone.state.values()))["exp_avg"].dtype == torch.uint8


def test_failed_step_moves_no_step_count():
    good, bad = nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(4, dtype=torch.complex64))
    opt = PagedAdamW([good, bad])
    good.grad, bad.grad = torch.randn(10), torch.randn(4, dtype=torch.complex64)
    with pytest.raises(TypeError):
        opt.step()
    assert not opt.state  # nothing initialised, nothing counted
    bad.grad = None
    opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], "lr": -1.0})
    opt.param_groups[1]["params"][0].grad = torch.randn(3)
    with pytest.raises(ValueError, match="lr must be"):
        opt.step()
    assert not opt.state


def test_state_bytes_per_parameter(capsys):
    n = 1 << 16
    sizes = {}
    for cls in (PagedAdamW, AdamW8bit):
        p = nn.Parameter(torch.randn(n))
        opt = cls([p])
        p.grad = torch.randn(n)
        opt.step()
        sizes[cls.__name__] = opt.state_nbytes() / n
    with capsys.disabled():
        print(f"\n[optimizer state] bytes per parameter: {sizes}")
    assert sizes["PagedAdamW"] == 8.0 and sizes["AdamW8bit"] <= 2.02


def test_small_tensors_keep_32bit_states():
    small, big = nn.Parameter(torch.randn(100)), nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([small, big])
    small.grad, big.grad = torch.randn(100), torch.randn(5000)
    opt.step()
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and opt.state[big]["exp_avg"].dtype == torch.uint8


def test_page_out_and_back_on_cpu_is_harmless():
    a = _params()
    b = [nn.Parameter(p.detach().clone()) for p in a]
    o1, o2 = PagedAdamW(a), PagedAdamW(b)
    for i in range(4):
        for p, q in zip(a, b):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        if i == 2:
            o1.page_out()
        o1.step()
        o2.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_opcheck():
    ps = [torch.randn(300), torch.randn(5000)]
    grads = [torch.randn_like(p) for p in ps]
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.qlora.adamw_step_.default,
                          (ps, grads, [torch.zeros(p.numel()) for p in ps], [torch.zeros(p.numel()) for p in ps],
                           *hyper), test_utils=utils)
    from qlora_ext.codes import dynamic_map
    blocks = [-(-p.numel() // 256) for p in ps]
    torch.library.opcheck(torch.ops.qlora.adamw8bit_step_.default,
                          (ps, grads, [torch.zeros(p.numel(), dtype=torch.uint8) for p in ps],
                           [torch.zeros(p.numel(), dtype=torch.uint8) for p in ps],
                           [torch.zeros(b, dtype=torch.bfloat16) for b in blocks],
                           [torch.zeros(b, dtype=torch.bfloat16) for b in blocks], dynamic_map(),
                           dynamic_map(signed=False), *hyper), test_utils=utils)
    torch.library.opcheck(torch.ops.qlora.paged_zeros.default, (ps[0], 17, torch.float32))


class TestBadInput:
    def test_sparse_gradients(self):
        p = nn.Parameter(torch.randn(10, 3))
        opt = PagedAdamW([p])
        p.grad = torch.randn(10, 3).to_sparse()
        with pytest.raises(RuntimeError, match="does not support sparse gradients"):
            opt.step()

    def test_complex_parameters(self):
        p = nn.Parameter(torch.randn(4, dtype=torch.complex64))
        opt = AdamW8bit([p])
        p.grad = torch.randn(4, dtype=torch.complex64)
        with pytest.raises(TypeError, match="does not support complex parameters"):
            opt.step()

    @pytest.mark.parametrize("lr", [-1e-3, float("nan")])
    def test_negative_lr(self, lr):
        with pytest.raises(ValueError, match="lr must be a number >= 0"):
            PagedAdamW([nn.Parameter(torch.randn(3))], lr=lr)

    @pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, -0.1), (0.9, 1.5)])
    def test_betas_outside_range(self, betas):
        with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
            PagedAdamW8bit([nn.Parameter(torch.randn(3))], betas=betas)

    @pytest.mark.parametrize("name,value", [("eps", float("nan")), ("eps", float("inf")), ("eps", -1e-8),
                                            ("weight_decay", float("nan")), ("weight_decay", -0.1)])
    def test_eps_and_weight_decay_finite_nonnegative(self, name, value):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got {value!r}"):
            AdamW8bit([nn.Parameter(torch.randn(3))], **{name: value})
        opt = PagedAdamW([nn.Parameter(torch.randn(3))])  # a group edited after construction: the next step
        opt.param_groups[0][name] = value
        opt.param_groups[0]["params"][0].grad = torch.ones(3)
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
            opt.step()

    @pytest.mark.parametrize("size", [-1, 1.5, True])
    def test_min_8bit_size(self, size):
        with pytest.raises(ValueError, match=rf"min_8bit_size must be an int >= 0 .*got {size!r}"):
            PagedAdamW8bit([nn.Parameter(torch.randn(3))], min_8bit_size=size)
        AdamW8bit([nn.Parameter(torch.randn(3))], min_8bit_size=0)  # every tensor 8-bit: allowed

    def test_op_level(self):
        p = torch.randn(8)
        with pytest.raises(ValueError, match="beta2 must be in"):
            torch.ops.qlora.adamw_step_([p], [p], [torch.zeros(8)], [torch.zeros(8)], 1e-3, 0.9, 1.0, 1e-8, 0.0, 1)
        with pytest.raises(TypeError, match="exp_avgs"):
            torch.ops.qlora.adamw_step_([p], [p], [torch.zeros(8, dtype=torch.float64)], [torch.zeros(8)], 1e-3, 0.9,
                                        0.99, 1e-8, 0.0, 1)


@pytest.mark.parametrize("cls", [PagedAdamW, AdamW8bit])
def test_non_contiguous_gradients_step_like_torch(cls):
    """Any strided gradient in the parameter's dtype (where ``to()`` hands back the same non-contiguous
    tensor) steps: transposed, every other column, expanded; the parameter moves as under
    torch.optim.AdamW with the same gradient, which is read, not replaced."""
    torch.manual_seed(0)
    for g in [torch.randn(70, 80).t(), torch.randn(80, 140)[:, ::2], torch.randn(80, 1).expand(80, 70)]:
        assert not g.is_contiguous()
        p = nn.Parameter(torch.randn(80, 70))
        ref = nn.Parameter(p.detach().clone())
        opt, ref_opt = cls([p], lr=0.1, min_8bit_size=10**9), torch.optim.AdamW([ref], lr=0.1)
        for _ in range(3):
            p.grad, ref.grad = g, g
            opt.step()
            ref_opt.step()
        assert p.grad is g
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
def test_cuda_tracks_torch_adamw(cuda_device):
    test_paged_adamw_tracks_torch_adamw(0.01, device=cuda_device)


def _many_tensor_step_matches_cpu(device, dtype, eight: bool, steps: int = 3) -> None:
    torch.manual_seed(0)
    sizes = [1, 7, 255, 256, 257, 4095, 4096, 4097, 8193, 0, 20000, 12345] * 3 + [65536, 3, 5000, 4099, 100003]
    base = torch.randn(sum(sizes) + 1, dtype=dtype)
    moved = base.to(device)
    cpu, dev, off = [], [], 1  # odd storage offsets: the 8-bit kernel's unaligned (scalar) path
    for i, n in enumerate(sizes):
        if i % 2:
            cpu.append(nn.Parameter(base[off:off + n]))
            dev.append(nn.Parameter(moved[off:off + n]))
        else:
            cpu.append(nn.Parameter(torch.randn(n, dtype=dtype)))
            dev.append(nn.Parameter(cpu[-1].detach().clone().to(device)))
        off += n
    kind = AdamW8bit if eight else PagedAdamW
    o_cpu, o_dev = kind(cpu, lr=1e-2, min_8bit_size=1), kind(dev, lr=1e-2, min_8bit_size=1)
    for _ in range(steps):
        for p, q in zip(cpu, dev):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.to(device)
        o_cpu.step()
        o_dev.step()
    for p, q in zip(cpu, dev):
        if p.numel():
            assert _rel(q.detach().cpu(), p.detach()) < (1e-3 if eight else 1e-6), p.numel()
    if eight:
        codes = [(o_cpu.state[p][k], o_dev.state[q][k]) for p, q in zip(cpu, dev) if p.numel()
                 for k in ("exp_avg", "exp_avg_sq")]
        differ = sum((a != b.cpu()).sum().item() for a, b in codes)
        assert differ <= 1e-3 * sum(a.numel() for a, _ in codes)


def test_many_tensor_harness_on_cpu():
    """The harness of the CUDA test below, run CPU against CPU: its parameters (views at odd offsets,
    an empty tensor) are accepted by both optimizers."""
    _many_tensor_step_matches_cpu("cpu", torch.float32, eight=True, steps=1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("eight", [False, True], ids=["32bit", "8bit"])
def test_cuda_many_tensors_tails_and_unaligned_views(cuda_device, dtype, eight):
    """The CUDA kernels find each chunk's tensor by binary search over a per-tensor table: 41 tensors of
    assorted sizes (tails that are not whole 8-value groups, 256-value blocks or 4096-value chunks, an
    empty one, single elements), half of them views at odd storage offsets (the 8-bit kernel's scalar
    path), all match the CPU kernels over a few steps (8-bit: the GPU's approximate 1/absmax may move
    a code across a decision boundary, rarely)."""
    _many_tensor_step_matches_cpu(cuda_device, dtype, eight, steps=10)


@pytest.mark.cuda
def test_cuda_paged_states_live_in_managed_memory(cuda_device):
    p = nn.Parameter(torch.randn(1 << 20, device=cuda_device))
    p.grad = torch.randn_like(p)
    opt = PagedAdamW([p])
    before = torch.cuda.memory_allocated()
    opt.step()
    state = opt.state[p]
    assert all(torch.ops.qlora.is_paged(state[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert torch.cuda.memory_allocated() - before < 8 << 20  # the 8 MiB of states are not allocator memory
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(ValueError, match="refusing to allocate"):  # refused before any cudaMallocManaged
        torch.ops.qlora.paged_zeros(p, free // 2, torch.float32)  # twice the free memory


@pytest.mark.cuda
def test_cuda_page_out_makes_room_for_a_spike(cuda_device):
    """After page_out, an ordinary allocation larger than the free memory with the states resident
    succeeds (the driver takes back the paged-out pages on demand); the next step still matches a
    reference. On an H200 (driver 580) cudaMemGetInfo did not count the paged-out pages as free, so the
    spike is sized from the free memory with the states resident plus most of their bytes, never asking
    for more managed memory than is free."""
    free, _ = torch.cuda.mem_get_info()
    state_bytes = min(free // 4, 1 << 30)
    n = state_bytes // 8  # two float32 states per parameter
    p = nn.Parameter(torch.randn(n, device=cuda_device))
    q = nn.Parameter(p.detach().cpu().clone())
    opt, ref = PagedAdamW([p], page_out_below=0.0), torch.optim.AdamW([q])
    g = torch.randn(n)
    p.grad, q.grad = g.to(cuda_device), g.clone()
    opt.step()
    ref.step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    resident, _ = torch.cuda.mem_get_info()
    opt.page_out()
    torch.cuda.synchronize()
    size = resident + state_bytes * 3 // 4  # does not fit beside the resident states
    try:
        spike = torch.empty(size, dtype=torch.uint8, device=cuda_device)
        spike.fill_(1)
        fitted = True
        del spike
    except torch.cuda.OutOfMemoryError:
        fitted = False
    torch.cuda.empty_cache()
    assert fitted, f"a {size}-byte spike failed after page_out ({resident} bytes free with the states resident)"
    opt.step()
    ref.step()
    assert _rel(p.detach().cpu(), q.detach()) <= 1e-6


def _tiny_net(seed: int = 0, device="cpu") -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 300), nn.GELU(), nn.Linear(300, 70), nn.GELU(), nn.Linear(70, 5000)).to(device)


@pytest.mark.parametrize("kind", [PagedAdamW, AdamW8bit], ids=lambda k: k.__name__)
def test_step_in_backward_equals_step(kind, device="cpu"):
    """step_in_backward: the same parameters bit for bit as backward-then-step over 8 iterations (the
    second and third layers above 4096 elements take 8-bit states with AdamW8bit), with the gradients
    gone after each backward and never more than one alive during it; step() still runs (no-op)."""
    nets = [_tiny_net(device=device), _tiny_net(device=device)]
    opts = [kind(n.parameters(), lr=1e-2, weight_decay=0.1) for n in nets]
    opts[1].step_in_backward()
    alive = []
    for p in nets[1].parameters():  # runs after ours: counts the gradients still held
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in nets[1].parameters())))
    torch.manual_seed(1)
    for _ in range(8):
        x = torch.randn(16, 40, device=device)
        for net, opt in zip(nets, opts):
            net(x).square().mean().backward()
            if opt is opts[1]:
                assert all(p.grad is None for p in net.parameters())
            opt.step()
            opt.zero_grad()
    assert max(alive) == 0 and len(alive) == 8 * 6
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    assert [s["step"] for s in opts[1].state.values()] == [8] * 6


def test_step_in_backward_refuses_accumulation():
    """A second backward before step() (gradient accumulation, as the Trainer does with
    gradient_accumulation_steps > 1) would update twice per step: refused, before it updates anything;
    with step() between backwards the mode trains on."""
    net = _tiny_net()
    opt = PagedAdamW(net.parameters(), lr=1e-2)
    opt.step_in_backward()
    x = torch.randn(4, 40)
    net(x).square().mean().backward()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match="a parameter got a second gradient before step"):
        net(x).square().mean().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    opt.zero_grad()
    opt.step()
    net(x).square().mean().backward()  # after step(): the next update
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", [PagedAdamW, AdamW8bit], ids=lambda k: k.__name__)
def test_cuda_step_in_backward_equals_step(cuda_device, kind):
    """The same on the GPU: one fused launch per tensor inside the backward, states in managed memory."""
    test_step_in_backward_equals_step(kind, device=cuda_device)


def test_step_in_backward_can_be_turned_off():
    net = _tiny_net()
    opt = PagedAdamW(net.parameters())
    opt.step_in_backward()
    opt.step_in_backward(False)
    net(torch.randn(2, 40)).sum().backward()
    assert all(p.grad is not None for p in net.parameters()) and not opt.state


def test_step_in_backward_follows_load_state_dict_and_new_groups():
    """The hooks read the live parameter groups: after load_state_dict (which replaces the group dicts)
    an lr of 0 freezes the tensors, and a group added later steps in the backward too."""
    net = _tiny_net()
    opt = PagedAdamW(list(net[0].parameters()), lr=1e-2)
    opt.step_in_backward()
    net(torch.randn(3, 40)).sum().backward()
    opt.load_state_dict(opt.state_dict())
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in net[0].parameters()]
    opt.add_param_group({"params": list(net[2].parameters()), "lr": 1e-2})
    net(torch.randn(3, 40)).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, net[0].parameters()))
    assert all(p.grad is None for p in net[2].parameters()) and all(opt.state[p]["step"] == 1 for p in net[2].parameters())
    with pytest.raises(ValueError, match="contiguous"):
        PagedAdamW([nn.Parameter(torch.randn(4, 4).t())]).step_in_backward()
