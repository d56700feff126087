"""The fused optimizer kernels' bodies (kernels/optim.py, the @triton.jit functions) against torch.optim on a dense
copy with gradient masking and re-masking, over several steps, with non-default hyper-parameters. Written after a
mutation campaign on the kernel bodies: each test failed under a mutant of the device code that the rest of the
suite let through. Small shapes (block 64: one full block and a tail block); without a GPU the kernels run through
Triton's interpreter (tests/conftest.py)."""
import pytest
import torch
from test_optim import random_mask

from sparse_lth.kernels import optim as K

SHAPE = (70,)  # a full block of 64 (the unmasked FULL path) and a partial tail block


def torch_step(ref, ref_opt, g, mask, dtype=torch.float32):
    """One torch.optim step on the dense fp32 copy: the gradient masked, the weight re-masked, and (for a
    half-precision parameter) the weight rounded to its dtype, as a parameter stored in that dtype is."""
    ref.grad = g * mask
    ref_opt.step()
    with torch.no_grad():
        ref.mul_(mask)
        ref.copy_(ref.to(dtype).float())


def assert_state_close(ours, theirs, mask, **kw):
    """Live state as torch.optim's, pruned state exactly zero."""
    ours = ours.cpu()
    torch.testing.assert_close(ours[mask], theirs[mask], **kw)
    assert (ours[~mask] == 0).all()


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_first_step_buffer_is_the_gradient_whatever_the_buffer_held(kernel_device, nesterov):
    """first_step: the momentum buffer becomes the (decayed, masked) gradient, as torch.optim.SGD's
    buf = clone(d_p), whatever finite values the buffer held (the launcher's contract asks only for finite ones);
    the old contents must not come in through the momentum, and Nesterov's look-ahead uses the momentum on that
    first step too. Then the usual momentum / dampening updates."""
    gen = torch.Generator().manual_seed(21)
    mask = random_mask(SHAPE, 0.6, gen)
    kw = dict(lr=0.05, momentum=0.8, dampening=0.0 if nesterov else 0.3, weight_decay=0.02, nesterov=nesterov)
    ref = torch.nn.Parameter(torch.randn(SHAPE, generator=gen) * mask)
    ref_opt = torch.optim.SGD([ref], **kw)
    p = ref.detach().clone().to(kernel_device)
    buf = (3.0 + torch.randn(SHAPE, generator=gen)).to(kernel_device)  # finite, non-zero: a reused buffer
    for step in range(3):
        g = torch.randn(SHAPE, generator=gen)
        K.fused_sgd_([p], [g.to(kernel_device)], [buf], [mask.to(kernel_device)], first_step=step == 0, block=64,
                     **kw)
        torch_step(ref, ref_opt, g, mask)
        torch.testing.assert_close(p.cpu(), ref.detach(), rtol=1e-5, atol=1e-6, msg=f"step {step}")
        assert_state_close(buf, ref_opt.state[ref]["momentum_buffer"], mask, rtol=1e-5, atol=1e-6)


def test_capturable_adam_gives_the_bits_of_the_host_computed_step(kernel_device):
    """capturable=True computes lr / (1 - beta1**t) and sqrt(1 - beta2**t) on the device in fp64 from the fp64 lr
    and log2(beta), rounding each to fp32 once, as the host does for the non-capturable step: the weights and the
    state come out with the same bits, at learning rates that fp32 does not hold exactly and betas near 1 (where
    1 - beta2**t computed in fp32 would be off by ~1e-4 relative)."""
    gen = torch.Generator().manual_seed(23)
    n = 4
    masks = [random_mask(SHAPE, 0.6, gen).to(kernel_device) for _ in range(n)]
    kw = dict(lr=[3e-3, 7e-4, 0.011, 0.2], beta1=[0.9, 0.99, 0.5, 0.95], beta2=[0.999, 0.9999, 0.99, 0.99999],
              eps=1e-8, weight_decay=[0.0, 0.01, 0.0, 0.1])
    ps = [torch.randn(SHAPE, generator=gen).to(kernel_device) * m for m in masks]
    ref_ps = [p.clone() for p in ps]
    st = [[torch.zeros(SHAPE, device=kernel_device) for _ in range(n)] for _ in range(2)]
    ref_st = [[s.clone() for s in col] for col in st]
    start = [0.0, 0.0, 3.0, 997.0]
    steps = [torch.tensor(v, device=kernel_device) for v in start]
    for it in range(1, 4):
        gs = [torch.randn(SHAPE, generator=gen).to(kernel_device) for _ in range(n)]
        for s in steps:
            s.add_(1)
        K.fused_adam_(ps, gs, st[0], st[1], None, masks, step=steps, capturable=True, block=64, **kw)
        K.fused_adam_(ref_ps, gs, ref_st[0], ref_st[1], None, masks, step=[v + it for v in start], block=64, **kw)
        for i in range(n):
            assert torch.equal(ps[i], ref_ps[i]), (it, i, (ps[i] - ref_ps[i]).abs().max())
            assert torch.equal(st[0][i], ref_st[0][i]) and torch.equal(st[1][i], ref_st[1][i]), (it, i)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_float16_params_are_rounded_once_to_float16(kernel_device, opt):
    """float16 parameters: fp32 arithmetic and fp32 state, the new weight rounded to nearest float16 once per step
    (the bf16 bit rounding is for bf16 only), so the trajectory is torch.optim's on an fp32 copy rounded to float16
    after every step, to one float16 ulp."""
    gen = torch.Generator().manual_seed(24)
    mask = random_mask(SHAPE, 0.6, gen)
    ref = torch.nn.Parameter((torch.randn(SHAPE, generator=gen) * mask).half().float())
    if opt == "sgd":
        kw = dict(lr=0.03, momentum=0.7, dampening=0.2, weight_decay=0.01)
        ref_opt = torch.optim.SGD([ref], **kw)
        st = [torch.zeros(SHAPE, device=kernel_device)]
        names = ["momentum_buffer"]
    else:
        kw = dict(lr=0.01, betas=(0.85, 0.98), eps=1e-6, weight_decay=0.03)
        ref_opt = torch.optim.Adam([ref], **kw)
        st = [torch.zeros(SHAPE, device=kernel_device) for _ in range(2)]
        names = ["exp_avg", "exp_avg_sq"]
    p = ref.detach().half().to(kernel_device)
    m = mask.to(kernel_device)
    for step in range(1, 5):
        g = torch.randn(SHAPE, generator=gen).half().float()
        gk = g.half().to(kernel_device)
        if opt == "sgd":
            K.fused_sgd_([p], [gk], st, [m], first_step=step == 1, block=64, **kw)
        else:
            K.fused_adam_([p], [gk], [st[0]], [st[1]], None, [m], lr=kw["lr"], beta1=kw["betas"][0],
                          beta2=kw["betas"][1], eps=kw["eps"], weight_decay=kw["weight_decay"], step=step, block=64)
        torch_step(ref, ref_opt, g, mask, dtype=torch.float16)
        assert p.dtype == torch.float16
        # one float16 ulp is at most 2**-10 of the value; a bf16 rounding (8 bits) is off by up to 2**-9
        torch.testing.assert_close(p.float().cpu(), ref.detach(), rtol=2 ** -10, atol=1e-7, msg=f"step {step}")
        for ours, key in zip(st, names):
            assert_state_close(ours, ref_opt.state[ref][key], mask, rtol=1e-4, atol=1e-6)
