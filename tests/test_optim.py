"""Mask-aware fused optimizers: the Triton kernels (interpreted on CPU, compiled on a GPU) against their plain-torch
references, and sparse_lth.optim.{SGD, Adam, AdamW} (Triton and torch backends) against torch.optim with gradient
masking and re-masking, over many steps."""
import copy

import pytest
import torch

from sparse_lth.kernels import optim as K
from sparse_lth.optim import MASK_ATTR, SGD, Adam, AdamW, param_mask

F32 = torch.float32


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
class Backend:
    """How the optimizer tests run: the torch backend on CPU (torch's fused kernels, or foreach ops), or the Triton
    kernels where they run (compiled on a GPU, else interpreted on CPU)."""

    def __init__(self, name, kernel_device):
        self.name = name
        if name == "kernel":
            self.backend = "triton" if kernel_device.type == "cuda" else "interpret"
            self.device = kernel_device
        else:
            self.backend, self.device = "torch", torch.device("cpu")

    def __call__(self, cls, params, **kw):
        opt = cls(params, backend=self.backend, **kw)
        if self.name.startswith("torch-"):
            opt.torch_impl = self.name.split("-")[1]
        return opt


@pytest.fixture(params=["torch-fused", "torch-foreach", "kernel"])
def backend_device(request, kernel_device):
    return Backend(request.param, kernel_device)


def guarded(shape, dtype, device, gen, offset=1, fill=None):
    """A tensor of `shape` living inside a larger buffer between sentinel guards (to catch out-of-bounds writes;
    offset=1 also makes its address unaligned). Returns (tensor, buffer, n_guard)."""
    n = 1
    for s in shape:
        n *= s
    g = 8
    buf = torch.full((n + offset + g,), 1234.5, dtype=dtype, device=device)
    t = buf[offset:offset + n].view(shape)
    if fill is None:
        t.copy_(torch.randn(shape, generator=gen).to(dtype))
    else:
        t.fill_(fill)
    return t, buf, offset


def guards_intact(buf, offset, n):
    return bool((buf[:offset] == 1234.5).all()) and bool((buf[offset + n:] == 1234.5).all())


def random_mask(shape, density, gen, device="cpu"):
    return (torch.rand(shape, generator=gen) < density).to(device)


def close(a, b, dtype=F32, **kw):
    if dtype == torch.bfloat16:
        kw.setdefault("rtol", 2 ** -7)
        kw.setdefault("atol", 1e-6)
    else:
        kw.setdefault("rtol", 1e-5)
        kw.setdefault("atol", 1e-6)
    torch.testing.assert_close(a.float(), b.float(), **kw)


# ----------------------------------------------------------------------------------------------------------------
# kernels vs references
# ----------------------------------------------------------------------------------------------------------------
# sizes: 1 element, odd sizes, more than one block (block=64 in these tests), an empty tensor
KSHAPES = [(1,), (5, 7), (130,), (3, 2, 3, 3), (0, 4)]


def make_kernel_case(dtype, device, n_states, masked, seed, aligned):
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for i, shape in enumerate(KSHAPES):
        off = 0 if aligned else 1 + i % 3
        p, pbuf, _ = guarded(shape, dtype, device, gen, offset=off)
        g, _, _ = guarded(shape, dtype, device, gen, offset=off)
        states = [guarded(shape, F32, device, gen, offset=off) for _ in range(n_states)]
        mask = None
        if masked is True or (masked == "mixed" and i % 2 == 0):
            mask = random_mask(shape, 0.5, gen, device)
            if i == 0:
                mask = torch.zeros(shape, dtype=torch.bool, device=device)  # a fully pruned tensor
            if shape == (130,):
                mask = mask.to(torch.uint8)
            # poison what the kernel must ignore or overwrite: NaN gradients at pruned positions (a NaN-unsafe
            # gradient mask, g * mask, would leak them), NaN state at pruned positions, garbage weights there
            g[~mask.bool()] = float("nan")
            for s, _, _ in states:
                s[~mask.bool()] = float("nan")
        cases.append(dict(p=p, pbuf=pbuf, g=g, mask=mask, states=states, off=off, shape=shape))
    return cases


def check_against_reference(cases, ref_p, ref_states, dtype):
    for c, rp, rs in zip(cases, ref_p, ref_states):
        n = c["p"].numel()
        assert guards_intact(c["pbuf"], c["off"], n), "kernel wrote outside the parameter"
        for (s, sbuf, off), r in zip(c["states"], rs):
            assert guards_intact(sbuf, off, n), "kernel wrote outside a state tensor"
        live = torch.ones(c["shape"], dtype=torch.bool, device=c["p"].device) if c["mask"] is None else c["mask"].bool()
        assert not torch.isnan(c["p"]).any()
        close(c["p"], rp, dtype)
        assert (c["p"][~live] == 0).all()
        for (s, _, _), r in zip(c["states"], rs):
            assert not torch.isnan(s).any()
            close(s, r)
            assert (s[~live] == 0).all()


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, False, "mixed"])
@pytest.mark.parametrize("variant", ["plain", "momentum", "nesterov", "first"])
def test_fused_sgd_matches_reference(kernel_device, dtype, masked, variant):
    aligned = variant != "momentum"
    n_states = 0 if variant == "plain" else 1
    cases = make_kernel_case(dtype, kernel_device, n_states, masked, seed=1, aligned=aligned)
    kw = dict(lr=[0.1, 0.05, 0.2, 0.1, 0.1], weight_decay=[0.0, 0.01, 0.1, 0.0, 0.3])
    if variant != "plain":
        kw.update(momentum=0.9, dampening=0.0 if variant == "nesterov" else 0.25, nesterov=variant == "nesterov",
                  first_step=variant == "first")
    if variant == "first":  # a first step reads the (zero) buffer: poison only pruned entries (NaN from the case)
        for c in cases:
            s = c["states"][0][0]
            live = torch.ones_like(s, dtype=torch.bool) if c["mask"] is None else c["mask"].bool()
            s[live] = 0.0
    ref_p = [c["p"].clone() for c in cases]
    ref_s = [[s.clone() for s, _, _ in c["states"]] for c in cases]
    bufs = [c["states"][0][0] for c in cases] if n_states else None
    ref_bufs = [r[0] for r in ref_s] if n_states else None
    launches = K.fused_sgd_([c["p"] for c in cases], [c["g"] for c in cases], bufs, [c["mask"] for c in cases],
                            block=64, **kw)
    K.sgd_reference_(ref_p, [c["g"] for c in cases], ref_bufs, [c["mask"] for c in cases], **kw)
    check_against_reference(cases, ref_p, ref_s, dtype)
    assert launches == (2 if masked == "mixed" else 1)


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, "mixed"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
def test_fused_adam_matches_reference(kernel_device, dtype, masked, amsgrad, decoupled):
    n_states = 3 if amsgrad else 2
    cases = make_kernel_case(dtype, kernel_device, n_states, masked, seed=2, aligned=not decoupled)
    for c in cases:  # exp_avg_sq, max_exp_avg_sq are >= 0
        for s, _, _ in c["states"][1:]:
            s.abs_()
    kw = dict(lr=[1e-2, 1e-3, 2e-2, 1e-2, 1e-2], beta1=0.9, beta2=[0.999, 0.99, 0.999, 0.9, 0.999], eps=1e-8,
              weight_decay=[0.0, 0.1, 0.01, 0.0, 0.5], step=[1, 7, 3, 100, 2], decoupled_weight_decay=decoupled)
    ref_p = [c["p"].clone() for c in cases]
    ref_s = [[s.clone() for s, _, _ in c["states"]] for c in cases]
    st = [[c["states"][j][0] for c in cases] for j in range(n_states)]
    rst = [[r[j] for r in ref_s] for j in range(n_states)]
    masks = [c["mask"] for c in cases]
    launches = K.fused_adam_([c["p"] for c in cases], [c["g"] for c in cases], st[0], st[1],
                             st[2] if amsgrad else None, masks, block=64, **kw)
    K.adam_reference_(ref_p, [c["g"] for c in cases], rst[0], rst[1], rst[2] if amsgrad else None, masks, **kw)
    check_against_reference(cases, ref_p, ref_s, dtype)
    assert launches == (2 if masked == "mixed" else 1)


def test_one_launch_for_many_tensors(kernel_device):
    gen = torch.Generator().manual_seed(3)
    shapes = [(64, 3, 3, 3), (64,), (10, 64), (10,), (200,), (1,)] * 4
    ps = [torch.randn(s, generator=gen).to(kernel_device) for s in shapes]
    gs = [torch.randn(s, generator=gen).to(kernel_device) for s in shapes]
    bufs = [torch.zeros(s, device=kernel_device) for s in shapes]
    masks = [random_mask(s, 0.3, gen, kernel_device) for s in shapes]
    ref = [p.clone() for p in ps]
    rbufs = [b.clone() for b in bufs]
    n = K.fused_sgd_(ps, gs, bufs, masks, lr=0.1, momentum=0.9, first_step=True)
    K.sgd_reference_(ref, gs, rbufs, masks, lr=0.1, momentum=0.9, first_step=True)
    assert n == 1
    for a, b in zip(ps + bufs, ref + rbufs):
        close(a, b)


def test_new_gradient_tensors_reuse_the_program_table(kernel_device):
    """Gradients allocated anew every step (zero_grad(set_to_none=True)) give new pointers: the pointer table is
    rebuilt, the program table (sizes only) and a constant hyperparameter table are reused, and every step is right."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(37,), (5, 11), (300,)]
    ps = [torch.randn(s, generator=gen).to(kernel_device) for s in shapes]
    ref = [p.clone() for p in ps]
    masks = [random_mask(s, 0.5, gen, kernel_device) for s in shapes]
    for cache in (K._TABLE_CACHE, K._PROG_CACHE, K._HYPER_CACHE):
        cache.clear()
    keep = []
    for step in range(3):
        gs = [torch.randn(s, generator=gen).to(kernel_device) for s in shapes]
        keep.append(gs)  # held, so that each step's gradients sit at new addresses
        K.fused_sgd_(ps, gs, None, masks, lr=0.1, weight_decay=0.01)
        K.sgd_reference_(ref, gs, None, masks, lr=0.1, weight_decay=0.01)
        for a, b in zip(ps, ref):
            close(a, b)
        assert len(K._TABLE_CACHE) == step + 1 and len(K._PROG_CACHE) == 1 and len(K._HYPER_CACHE) == 1


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize("amsgrad,decoupled", [(False, False), (True, True)])
def test_capturable_adam_reads_the_step_on_the_device(kernel_device, dtype, amsgrad, decoupled):
    """capturable=True: the step counts are device tensors that the kernel reads, and the bias corrections are
    computed there in fp64. Same bits as the host-computed step, over steps with beta1 = 0 (0**step) and a large
    step count, and from the second step on no table is built (what a CUDA graph replays must not change)."""
    cases = make_kernel_case(dtype, kernel_device, 3 if amsgrad else 2, "mixed", seed=12, aligned=True)
    for c in cases:
        for s, _, _ in c["states"][1:]:
            s.abs_()
    n_states = 3 if amsgrad else 2
    ps, gs, masks = [c["p"] for c in cases], [c["g"] for c in cases], [c["mask"] for c in cases]
    st = [[c["states"][j][0] for c in cases] for j in range(n_states)]
    ref_p, ref_st = [p.clone() for p in ps], [[s.clone() for s in col] for col in st]
    start = [1.0, 7.0, 0.0, 100000.0, 2.0]
    steps = [torch.tensor(v, device=kernel_device) for v in start]
    kw = dict(lr=[1e-2, 1e-3, 2e-2, 1e-2, 1e-2], beta1=[0.9, 0.0, 0.9, 0.8, 0.9], beta2=[0.999, 0.99, 0.999, 0.9, 0.0],
              eps=1e-8, weight_decay=[0.0, 0.1, 0.01, 0.0, 0.5], decoupled_weight_decay=decoupled)
    sizes = None
    for it in range(3):
        for s in steps:
            s.add_(1)
        K.fused_adam_(ps, gs, st[0], st[1], st[2] if amsgrad else None, masks, step=steps, capturable=True,
                      block=64, **kw)
        K.adam_reference_(ref_p, gs, ref_st[0], ref_st[1], ref_st[2] if amsgrad else None, masks,
                          step=[v + it + 1 for v in start], **kw)
        if it == 0:
            sizes = (len(K._TABLE_CACHE), len(K._PROG_CACHE), len(K._HYPER_CACHE))
        else:
            assert (len(K._TABLE_CACHE), len(K._PROG_CACHE), len(K._HYPER_CACHE)) == sizes
    check_against_reference(cases, ref_p, [[col[i] for col in ref_st] for i in range(len(cases))], dtype)
    assert [float(s) for s in steps] == [v + 3 for v in start]
    with pytest.raises(TypeError, match="one-element float32"):
        K.fused_adam_(ps, gs, st[0], st[1], None, masks, step=[s.double() for s in steps], capturable=True, **kw)
    with pytest.raises(TypeError, match="Tensor"):
        K.fused_adam_(ps, gs, st[0], st[1], None, masks, step=[3.0] * len(ps), capturable=True, **kw)


def test_tables_used_in_a_capture_are_kept_alive(kernel_device, monkeypatch):
    """Inside a CUDA graph capture every table a launch reads (and, on a GPU, the host tensors that the capture's
    copies read at replay) is kept for good: the caches may evict and free them, the graph may not lose them."""
    gen = torch.Generator().manual_seed(13)
    ps = [torch.randn(s, generator=gen).to(kernel_device) for s in [(9,), (4, 4)]]
    gs = [torch.randn_like(p) for p in ps]
    K._CAPTURE_KEEPALIVE.clear()
    K.fused_sgd_(ps, gs, None, None, lr=0.1)
    assert not K._CAPTURE_KEEPALIVE  # eager: nothing kept
    monkeypatch.setattr(K, "_capturing", lambda device: True)
    K.fused_sgd_(ps, gs, None, None, lr=0.1)
    kept = {id(t) for t in K._CAPTURE_KEEPALIVE.values()}
    for cache in (K._TABLE_CACHE, K._HYPER_CACHE):
        assert id(next(reversed(cache.values()))) in kept
    assert id(next(reversed(K._PROG_CACHE.values()))[0]) in kept
    K._CAPTURE_KEEPALIVE.clear()


def test_tables_first_built_in_a_capture_are_not_cached(kernel_device, monkeypatch):
    """A table built during a CUDA graph capture is filled only when the graph replays (its copy is a graph node):
    it is kept alive for the graph but not cached, so an eager launch after the capture (or after a capture that
    failed) builds and fills its own."""
    gen = torch.Generator().manual_seed(17)
    ps = [torch.randn(s, generator=gen).to(kernel_device) for s in [(9,), (4, 4)]]
    gs = [torch.randn_like(p) for p in ps]
    ref = [p.clone() for p in ps]
    for cache in (K._TABLE_CACHE, K._PROG_CACHE, K._HYPER_CACHE):
        cache.clear()
    K._CAPTURE_KEEPALIVE.clear()
    monkeypatch.setattr(K, "_capturing", lambda device: True)
    K.fused_sgd_(ps, gs, None, None, lr=0.1)
    assert not K._TABLE_CACHE and not K._PROG_CACHE and not K._HYPER_CACHE
    # the pointer, program and hyperparameter tables (and on a GPU the host tensors they were copied from)
    assert len(K._CAPTURE_KEEPALIVE) == (3 if kernel_device.type == "cpu" else 6)
    monkeypatch.setattr(K, "_capturing", lambda device: False)
    K.fused_sgd_(ps, gs, None, None, lr=0.1)
    assert len(K._TABLE_CACHE) == len(K._PROG_CACHE) == len(K._HYPER_CACHE) == 1
    # no real capture here: the first launch ran too, so two steps, as the reference's
    K.sgd_reference_(ref, gs, None, None, lr=0.1)
    K.sgd_reference_(ref, gs, None, None, lr=0.1)
    for a, b in zip(ps, ref):
        close(a, b)
    K._CAPTURE_KEEPALIVE.clear()


def test_amsgrad_running_max_keeps_nan_as_torch(kernel_device):
    """AMSGrad's max_exp_avg_sq = max(itself, exp_avg_sq) keeps a NaN, as torch.maximum (and torch.optim) do;
    Triton's default maximum returned the other operand, so a NaN gradient left the running max at its old value."""
    p = torch.ones(4, device=kernel_device)
    g = torch.tensor([1.0, float("nan"), 1.0, 1.0], device=kernel_device)
    st = [torch.zeros(4, device=kernel_device), torch.zeros(4, device=kernel_device),
          torch.full((4,), 5.0, device=kernel_device)]
    ref_p, ref_st = p.clone(), [t.clone() for t in st]
    kw = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    K.fused_adam_([p], [g], [st[0]], [st[1]], [st[2]], None, **kw)
    K.adam_reference_([ref_p], [g], [ref_st[0]], [ref_st[1]], [ref_st[2]], None, **kw)
    assert torch.isnan(ref_st[2][1]) and torch.equal(torch.isnan(st[2]), torch.isnan(ref_st[2]))
    torch.testing.assert_close(st[2], ref_st[2], equal_nan=True)


def test_a_table_copy_refused_inside_a_capture_says_what_to_do(monkeypatch):
    """torch >= 2.11 refuses a host-to-device copy from pageable memory inside a CUDA graph capture (pytorch#172156):
    a captured step that needs a new optimizer table (gradients set to None, allocated anew by the captured
    backward) gets sparse-lth's error, which says how to capture the step instead, with torch's below it."""
    class Refused:
        def to(self, device, non_blocking=False):
            raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture unless the CPU "
                               "tensor is pinned")

    monkeypatch.setattr(K, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match=r"zero_grad\(set_to_none=False\)") as info:
        K._to_device(Refused(), torch.device("cuda"))
    assert "Cannot copy between CPU and CUDA tensors" in str(info.value)
    K._CAPTURE_KEEPALIVE.clear()


def test_bf16_rounds_to_nearest_even(kernel_device):
    # p - lr * g with lr = 1 and g = 0: p is written back through the bf16 rounding. Feed fp32 values between two
    # bf16 numbers via weight decay: p_new = p * (1 - wd) with p = 1, wd chosen so p_new is a half-way or off value.
    vals = torch.tensor([1.0] * 6, dtype=torch.bfloat16, device=kernel_device)
    wd = torch.tensor([2 ** -9, 2 ** -9 + 2 ** -12, 3 * 2 ** -9, 2 ** -10, 2 ** -8, 0.3])
    grads = torch.zeros_like(vals)
    ps = [vals[i:i + 1].clone() for i in range(6)]
    gs = [grads[i:i + 1].clone() for i in range(6)]
    K.fused_sgd_(ps, gs, None, None, lr=1.0, weight_decay=wd.tolist())
    expect = (1.0 - wd).to(torch.bfloat16)  # torch's fp32 -> bf16 conversion rounds to nearest even
    got = torch.cat(ps).cpu()
    assert torch.equal(got, expect), (got, expect)


def test_kernel_bad_input(kernel_device):
    d = kernel_device
    p, g, m = torch.randn(4, 5, device=d), torch.randn(4, 5, device=d), torch.ones(4, 5, dtype=torch.bool, device=d)
    with pytest.raises(ValueError, match="shape"):
        K.fused_sgd_([p], [g], None, [torch.ones(5, 4, dtype=torch.bool, device=d)], lr=0.1)
    with pytest.raises(TypeError, match="bool"):
        K.fused_sgd_([p], [g], None, [torch.ones(4, 5, device=d)], lr=0.1)
    with pytest.raises(TypeError, match="dtype"):
        K.fused_sgd_([p], [g.double()], None, [m], lr=0.1)
    with pytest.raises(TypeError, match="supported"):
        K.fused_sgd_([p.double()], [g.double()], None, [m], lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        K.fused_sgd_([p], [g.reshape(5, 4)], None, [m], lr=0.1)
    with pytest.raises(TypeError, match="float32"):
        K.fused_sgd_([p], [g], [torch.zeros(4, 5, dtype=torch.bfloat16, device=d)], [m], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="contiguous"):
        K.fused_sgd_([p.t()], [g.t()], None, None, lr=0.1)
    with pytest.raises(ValueError, match="2 values"):
        K.fused_sgd_([p], [g], None, None, lr=[0.1, 0.2])
    with pytest.raises(ValueError, match="grads has"):
        K.fused_sgd_([p], [g, g], None, None, lr=0.1)
    with pytest.raises(ValueError, match="different devices"):
        K.fused_sgd_([p], [torch.randn(4, 5, device="meta")], None, None, lr=0.1)
    with pytest.raises(ValueError, match="step"):
        K.fused_adam_([p], [g], [torch.zeros_like(p)], [torch.zeros_like(p)], None, None, lr=1e-3, beta1=0.9,
                      beta2=0.999, eps=1e-8, weight_decay=0.0, step=0)


# ----------------------------------------------------------------------------------------------------------------
# optimizers vs torch.optim + gradient masking + re-masking
# ----------------------------------------------------------------------------------------------------------------
class Model:
    """A small parameter set: two dense-path (masked) weights, a compact sparse-path vector, one that gets no grad."""

    SHAPES = {"conv": (6, 3, 3, 3), "fc": (7, 12), "values": (37,), "unused": (5,)}
    MASKED = ("conv", "fc")

    def __init__(self, device, dtype=F32, seed=0, attach=True):
        gen = torch.Generator().manual_seed(seed)
        self.masks = {k: random_mask(self.SHAPES[k], 0.5, gen, device) for k in self.MASKED}
        self.params = {}
        for k, s in self.SHAPES.items():
            w = torch.randn(s, generator=gen).to(device)
            if k in self.masks:
                w = w * self.masks[k]
            p = torch.nn.Parameter(w.to(dtype))
            if attach and k in self.masks:
                setattr(p, MASK_ATTR, self.masks[k])
            self.params[k] = p

    def groups(self, **second):
        """Two parameter groups; the second with its own hyper-parameters."""
        p = self.params
        return [{"params": [p["conv"], p["values"], p["unused"]]}, {"params": [p["fc"]], **second}]

    def set_grads(self, gen, mask_them):
        for k, p in self.params.items():
            if k == "unused":
                continue
            g = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
            if mask_them and k in self.masks:
                g = g * self.masks[k]
            p.grad = g

    def remask(self):
        with torch.no_grad():
            for k, m in self.masks.items():
                self.params[k].mul_(m)

    def new_masks(self, gen, attach):
        """A new IMP round: prune further, new mask objects."""
        for k in self.MASKED:
            m = self.masks[k] & random_mask(self.masks[k].shape, 0.7, gen, self.masks[k].device)
            self.masks[k] = m
            if attach:
                setattr(self.params[k], MASK_ATTR, m)


CONFIGS = [
    (SGD, torch.optim.SGD, dict(lr=0.1), dict(lr=0.05)),
    (SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2), dict(weight_decay=0.0)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4), dict(lr=0.1)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.5), dict(momentum=0.0)),
    (Adam, torch.optim.Adam, dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99))),
    (Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True), dict(eps=1e-6)),
    (Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-1), dict(amsgrad=True, weight_decay=0.0)),
    (AdamW, torch.optim.AdamW, dict(lr=1e-2), dict(weight_decay=0.1)),
    (AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.0, amsgrad=True), dict(lr=2e-2)),
]
CONFIG_IDS = ["sgd", "sgd-mom-damp-wd", "sgd-nesterov-wd", "sgd-mixed-momentum", "adam", "adam-wd-amsgrad",
              "adam-wd-amsgrad-group", "adamw", "adamw-amsgrad-nowd"]
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def same_grads(ours, ref, gen):
    """The same random gradients on both models: ours unmasked (the optimizer must mask them), ref masked."""
    state = gen.get_state()
    ours.set_grads(gen, mask_them=False)
    gen.set_state(state)
    ref.set_grads(gen, mask_them=True)


def step_both(ours, ref, opt, ref_opt, gen):
    """One step of ours against the dense-masking reference (gradients masked, weights re-masked)."""
    same_grads(ours, ref, gen)
    opt.step()
    ref_opt.step()
    ref.remask()


def assert_matches(ours: Model, ref: Model, opt, ref_opt):
    for k, p in ours.params.items():
        r = ref.params[k]
        close(p, r)
        live = ours.masks.get(k)
        if live is not None:
            assert (p[~live] == 0).all(), f"{k}: a pruned weight is not exactly zero"
        st, rst = opt.state.get(p, {}), ref_opt.state.get(r, {})
        assert set(st) == set(rst), (k, set(st), set(rst))
        for key in STATE_KEYS:
            if st.get(key) is None:
                continue
            assert st[key].dtype == F32
            if live is None:
                close(st[key], rst[key])
            else:
                # torch.optim's state may be non-zero at newly pruned positions (it never saw the mask change)
                close(st[key][live], rst[key][live])
                assert (st[key][~live] == 0).all(), f"{k}: {key} is not exactly zero at pruned positions"
        if "step" in st:
            assert float(st["step"]) == float(rst["step"])


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_trajectory_matches_torch_optim(backend_device, cfg):
    make, device = backend_device, backend_device.device
    ours_cls, ref_cls, kw, second = cfg
    ours, ref = Model(device), Model(device, attach=False)
    opt = make(ours_cls, ours.groups(**second), **kw)
    ref_opt = ref_cls(ref.groups(**second), **kw)
    gen, gen_m = torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)
    for step in range(20):
        if step == 10:  # a new IMP round: new mask objects, the reference re-masks its weights
            ours.new_masks(gen_m, attach=True)
            ref.masks = dict(ours.masks)
            ref.remask()
        step_both(ours, ref, opt, ref_opt, gen)  # the optimizer must mask the gradient itself
        assert_matches(ours, ref, opt, ref_opt)
    assert ours.params["unused"].grad is None and len(opt.state.get(ours.params["unused"], {})) == 0
    torch.testing.assert_close(ours.params["unused"], ref.params["unused"], rtol=0, atol=0)


@pytest.mark.parametrize("cls,ref_cls,kw", [(Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
                                            (AdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True))],
                         ids=["adam", "adamw-amsgrad"])
def test_capturable_trajectory_matches_torch_optim(backend_device, cls, ref_cls, kw):
    """capturable=True (step counts on the parameters' device, bias corrections computed there) takes torch.optim's
    (non-capturable) trajectory with masking, through a new IMP round; torch's foreach ops cannot take it."""
    make, device = backend_device, backend_device.device
    ours, ref = Model(device), Model(device, attach=False)
    opt = make(cls, ours.groups(lr=2e-2), capturable=True, **kw)
    ref_opt = ref_cls(ref.groups(lr=2e-2), **kw)
    gen, gen_m = torch.Generator().manual_seed(14), torch.Generator().manual_seed(15)
    if backend_device.name == "torch-foreach":
        same_grads(ours, ref, gen)
        with pytest.raises(ValueError, match="capturable"):
            opt.step()
        return
    for step in range(12):
        if step == 6:
            ours.new_masks(gen_m, attach=True)
            ref.masks = dict(ours.masks)
            ref.remask()
        step_both(ours, ref, opt, ref_opt, gen)
        assert_matches(ours, ref, opt, ref_opt)
    for k in ("conv", "values", "fc"):
        step_t = opt.state[ours.params[k]]["step"]
        assert step_t.device == ours.params[k].device and step_t.dtype == F32


@pytest.mark.parametrize("cls,kw", [(SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
                                    (Adam, dict(lr=1e-2, amsgrad=True)), (AdamW, dict(lr=1e-2)),
                                    (Adam, dict(lr=1e-2, capturable=True))],
                         ids=["sgd", "adam-amsgrad", "adamw", "adam-capturable"])
def test_state_dict_round_trip_continues_trajectory(backend_device, cls, kw):
    make, device = backend_device, backend_device.device
    if kw.get("capturable") and backend_device.name == "torch-foreach":
        p = torch.nn.Parameter(torch.randn(3))
        p.grad = torch.randn(3)
        with pytest.raises(ValueError, match="capturable"):  # torch's foreach ops cannot read a device step
            make(cls, [p], **kw).step()
        return
    gen = torch.Generator().manual_seed(5)
    grads = [{k: torch.randn(s, generator=gen).to(device) for k, s in Model.SHAPES.items()} for _ in range(12)]

    def feed(model, i):
        for k, p in model.params.items():
            if k != "unused":
                p.grad = grads[i][k].clone()

    a = Model(device)
    opt_a = make(cls, a.groups(lr=kw["lr"] / 2), **kw)
    for i in range(6):
        feed(a, i)
        opt_a.step()
    saved = copy.deepcopy(opt_a.state_dict())
    saved_params = {k: p.detach().clone() for k, p in a.params.items()}
    for i in range(6, 12):
        feed(a, i)
        opt_a.step()

    b = Model(device)  # same masks (same seed), fresh optimizer, weights and state from the checkpoint
    with torch.no_grad():
        for k, p in b.params.items():
            p.copy_(saved_params[k])
    opt_b = make(cls, b.groups(lr=kw["lr"] / 2), **kw)
    opt_b.load_state_dict(saved)
    for i in range(6, 12):
        feed(b, i)
        opt_b.step()
    for k in Model.SHAPES:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=0, atol=0)
        for key, v in opt_a.state.get(a.params[k], {}).items():
            torch.testing.assert_close(v, opt_b.state[b.params[k]][key], rtol=0, atol=0)


def test_state_dict_keeps_fp32_state_for_bf16_params_and_loads_into_torch_optim():
    p = torch.nn.Parameter(torch.randn(9, 4).to(torch.bfloat16))
    opt = Adam([p], lr=1e-2, backend="torch")
    p.grad = torch.randn(9, 4).to(torch.bfloat16)
    opt.step()
    exact = opt.state[p]["exp_avg_sq"].clone()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt.state[p]["exp_avg_sq"].dtype == F32
    assert torch.equal(opt.state[p]["exp_avg_sq"], exact)  # not rounded through bf16
    # keys are torch.optim's: a state dict of ours loads into torch.optim.Adam and vice versa
    q = torch.nn.Parameter(torch.randn(3, 3))
    ours, theirs = Adam([q], lr=1e-3, backend="torch"), torch.optim.Adam([q], lr=1e-3)
    q.grad = torch.randn(3, 3)
    ours.step()
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())


def test_bf16_params_kernel_matches_torch_backend(kernel_device):
    """bf16 parameters, fp32 state: the kernels and both torch implementations agree (to bf16 rounding)."""
    runs = [Backend("kernel", kernel_device), Backend("torch-fused", kernel_device),
            Backend("torch-foreach", kernel_device)]
    gen = torch.Generator().manual_seed(7)
    for cls, kw in [(SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2)), (AdamW, dict(lr=1e-2, amsgrad=True))]:
        models = [Model(r.device, dtype=torch.bfloat16) for r in runs]
        opts = [r(cls, m.groups(), **kw) for r, m in zip(runs, models)]
        for _ in range(8):
            state = gen.get_state()
            for m in models:
                gen.set_state(state)
                m.set_grads(gen, mask_them=False)
            for o in opts:
                o.step()
        for other in (1, 2):
            for k in Model.SHAPES:
                a, b = models[0].params[k], models[other].params[k]
                assert a.dtype == b.dtype == torch.bfloat16
                close(a.cpu(), b, torch.bfloat16, rtol=2 ** -6, atol=1e-5)
                if k in Model.MASKED:
                    assert (a[~models[0].masks[k]] == 0).all()
                    assert (b[~models[other].masks[k]] == 0).all()
                for key, v in opts[0].state[a].items():
                    if key != "step":
                        assert v.dtype == opts[other].state[b][key].dtype == F32
                        close(v.cpu(), opts[other].state[b][key], rtol=2e-2, atol=1e-4)


def test_lr_scheduler(backend_device):
    make, device = backend_device, backend_device.device
    for ours_cls, ref_cls, kw in [(SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                  (Adam, torch.optim.Adam, dict(lr=1e-2))]:
        ours, ref = Model(device), Model(device, attach=False)
        opt, ref_opt = make(ours_cls, ours.groups(), **kw), ref_cls(ref.groups(), **kw)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 6], gamma=0.1)
        ref_sched = torch.optim.lr_scheduler.MultiStepLR(ref_opt, milestones=[3, 6], gamma=0.1)
        gen = torch.Generator().manual_seed(8)
        for _ in range(8):
            step_both(ours, ref, opt, ref_opt, gen)
            sched.step()
            ref_sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(kw["lr"] * 0.01)
        assert_matches(ours, ref, opt, ref_opt)


def test_mask_changed_in_place_and_uint8_mask(backend_device):
    make, device = backend_device, backend_device.device
    ours, ref = Model(device), Model(device, attach=False)
    opt = make(SGD, ours.groups(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.groups(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(9)
    for step in range(6):
        if step == 3:
            # prune further by editing the attached masks in place (same objects); conv's becomes uint8
            for k in Model.MASKED:
                ours.masks[k][: ours.masks[k].shape[0] // 2] = False
            u8 = ours.masks["conv"].to(torch.uint8)
            setattr(ours.params["conv"], MASK_ATTR, u8)
            ref.masks = {k: m.clone() for k, m in ours.masks.items()}
            ref.remask()
        step_both(ours, ref, opt, ref_opt, gen)
        assert_matches(ours, ref, opt, ref_opt)


def test_non_contiguous_param_and_closure(backend_device):
    make, device = backend_device, backend_device.device
    w = torch.randn(6, 5, device=device)
    p = torch.nn.Parameter(w.t())  # non-contiguous parameter
    mask = torch.rand(5, 6, device=device) > 0.5
    setattr(p, MASK_ATTR, mask)
    r = torch.nn.Parameter((w.t() * mask).contiguous())
    with torch.no_grad():
        p.mul_(mask)
    opt, ref_opt = make(Adam, [p], lr=1e-2), torch.optim.Adam([r], lr=1e-2)
    x = torch.randn(5, 6, device=device)
    for _ in range(4):
        def closure():
            opt.zero_grad()
            loss = (p * x).sin().sum()
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.ndim == 0
        ref_opt.zero_grad()
        (r * x).sin().sum().backward()
        r.grad.mul_(mask)
        ref_opt.step()
        with torch.no_grad():
            r.mul_(mask)
        assert not p.is_contiguous()
        close(p, r)
        assert (p[~mask] == 0).all()


def test_param_mask_and_bad_masks(backend_device):
    make, device = backend_device, backend_device.device
    p = torch.nn.Parameter(torch.randn(4, 6, device=device))
    assert param_mask(p) is None
    m = torch.ones(4, 6, dtype=torch.bool, device=device)
    setattr(p, MASK_ATTR, m)
    assert param_mask(p) is m
    opt = make(SGD, [p], lr=0.1)
    p.grad = torch.randn(4, 6, device=device)
    for bad, err, msg in [(torch.ones(6, 4, dtype=torch.bool, device=device), ValueError, "shape"),
                          (torch.ones(24, dtype=torch.bool, device=device), ValueError, "shape"),
                          (torch.ones(4, 6, device=device), TypeError, "bool"),
                          (torch.ones(4, 6, dtype=torch.bool, device="meta"), ValueError, "device"),
                          ([[True] * 6] * 4, TypeError, "not a Tensor")]:
        setattr(p, MASK_ATTR, bad)
        before = p.detach().clone()
        with pytest.raises(err, match=msg):
            opt.step()
        assert torch.equal(p.detach(), before)  # refused before anything was written


def test_bad_arguments():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="backend"):
        SGD([p], lr=0.1, backend="cuda-please")
    with pytest.raises(ValueError, match="Nesterov"):
        SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="learning rate"):
        Adam([p], lr=-1.0)
    # non-finite hyperparameters (torch.optim takes lr=inf and dampening=nan; a step then makes the weights
    # inf or NaN)
    for cls, kw, msg in [(SGD, dict(lr=float("inf")), "learning rate"),
                         (SGD, dict(lr=0.1, dampening=float("nan")), "dampening"),
                         (SGD, dict(lr=0.1, momentum=float("inf")), "momentum"),
                         (SGD, dict(lr=0.1, weight_decay=float("inf")), "weight_decay"),
                         (Adam, dict(eps=float("inf")), "epsilon"), (AdamW, dict(lr=float("nan")), "learning rate")]:
        with pytest.raises(ValueError, match=f"Invalid {msg}"):
            cls([p], **kw)
    assert SGD([p]).defaults["lr"] == torch.optim.SGD([p]).defaults["lr"] == 1e-3  # torch.optim's default
    with pytest.raises(ValueError, match="beta"):
        AdamW([p], betas=(0.9, 1.0))
    opt = SGD([p], lr=0.1, backend="triton")  # CUDA only: a clear error at step on CPU tensors
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="triton"):
        opt.step()
    q = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    q.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        SGD([q], lr=0.1, backend="torch").step()
    p.grad = torch.randn(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        SGD([p], lr=0.1, backend="torch").step()


def test_loaded_state_is_remasked(backend_device):
    """State loaded from torch.optim (non-zero at pruned positions: it never saw the mask) is zeroed there at the
    next step, also when the attached mask object is the one the optimizer saw before the load."""
    make, device = backend_device, backend_device.device
    ours, ref = Model(device), Model(device, attach=False)
    opt = make(Adam, ours.groups(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.groups(), lr=1e-2)
    gen = torch.Generator().manual_seed(12)
    for _ in range(2):
        ours.set_grads(gen, mask_them=False)
        opt.step()
        ref.set_grads(gen, mask_them=False)  # unmasked gradients: torch's state is non-zero at pruned positions
        ref_opt.step()
    loaded = ref_opt.state_dict()
    assert any((s["exp_avg"] != 0).logical_and(~m).any() for s, m in
               zip([loaded["state"][0], loaded["state"][3]], [ours.masks["conv"], ours.masks["fc"]]))
    opt.load_state_dict(loaded)
    ours.set_grads(gen, mask_them=False)
    opt.step()
    for k in Model.MASKED:
        st, live = opt.state[ours.params[k]], ours.masks[k]
        for key in ("exp_avg", "exp_avg_sq"):
            assert (st[key][~live] == 0).all()
        assert (ours.params[k][~live] == 0).all()


@pytest.mark.parametrize("cls,kw", [(SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                    (AdamW, dict(lr=1e-2, amsgrad=True))], ids=["sgd", "adamw-amsgrad"])
def test_non_finite_gradient_at_pruned_positions_is_ignored(backend_device, cls, kw):
    """NaN / inf gradients where the mask is False change nothing (a NaN-unsafe g * mask would spread them)."""
    make, device = backend_device, backend_device.device
    ours, ref = Model(device), Model(device, attach=False)
    opt, ref_opt = make(cls, ours.groups(), **kw), getattr(torch.optim, cls.__name__)(ref.groups(), **kw)
    gen = torch.Generator().manual_seed(13)
    for step in range(4):
        same_grads(ours, ref, gen)
        for k in Model.MASKED:
            g = ours.params[k].grad
            g[~ours.masks[k]] = float("nan") if step % 2 == 0 else float("inf")
        opt.step()
        ref_opt.step()
        ref.remask()
        assert_matches(ours, ref, opt, ref_opt)


def test_what_step_does_to_grad(backend_device):
    """On CPU the torch backend masks a masked parameter's .grad in place (the dense-masking recipe; no second
    gradient-sized buffer) and leaves other gradients alone; the Triton backends leave every .grad as it was."""
    make, device = backend_device, backend_device.device
    ours = Model(device)
    opt = make(SGD, ours.groups(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        ours.set_grads(gen, mask_them=False)
        before = {k: p.grad.clone() for k, p in ours.params.items() if p.grad is not None}
        opt.step()
        for k, g in before.items():
            got = ours.params[k].grad
            if k in Model.MASKED and backend_device.backend == "torch" and device.type == "cpu":
                assert torch.equal(got, g * ours.masks[k]) and (got[~ours.masks[k]] == 0).all()
                assert (g[~ours.masks[k]] != 0).any()  # there was something to mask
            else:
                assert torch.equal(got, g)


def test_few_launches_per_step(kernel_device, monkeypatch):
    """The kernel backend updates all parameters of all groups with one launch per (dtype, mask/no mask)."""
    import sparse_lth.optim as so

    launches = []
    real = so._k.launch_buckets
    monkeypatch.setattr(so._k, "launch_buckets", lambda *a, **k: launches.append(real(*a, **k)))
    backend = "triton" if kernel_device.type == "cuda" else "interpret"
    m = Model(kernel_device)
    opt = Adam(m.groups(lr=3e-3, weight_decay=0.1), lr=1e-2, backend=backend)  # two groups, different lr / wd
    m.set_grads(torch.Generator().manual_seed(14), mask_them=False)
    opt.step()
    assert launches == [2]  # masked weights (two groups) + the unmasked compact vector


@pytest.mark.parametrize("which", ["torch", "kernel"])
def test_adam_step_counts_follow_the_state_tensors(kernel_device, which):
    """The step counts on the CPU are incremented through a NumPy view kept per parameter: a step tensor replaced
    in the state (by hand, by load_state_dict), moved to other memory (.data), or the optimizer deep-copied, is
    still the one that counts, and the trajectory is torch.optim.Adam's under the same changes."""
    import copy

    device = kernel_device if which == "kernel" else torch.device("cpu")
    backend = "torch" if which == "torch" else ("triton" if device.type == "cuda" else "interpret")
    m, ref = Model(device), Model(device, attach=False)
    opt = Adam(m.groups(), lr=1e-2, backend=backend)
    ropt = torch.optim.Adam(ref.groups(), lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(16)
    p, rp = m.params["fc"], ref.params["fc"]

    def both_step():
        m.set_grads(gen, mask_them=False)
        for k, q in ref.params.items():
            q.grad = None if m.params[k].grad is None else m.params[k].grad.clone()
            if q.grad is not None and k in Model.MASKED:
                q.grad.mul_(ref.masks[k])
        opt.step()
        ropt.step()
        ref.remask()

    for _ in range(2):
        both_step()
    opt.state[p]["step"] = torch.tensor(10.0)
    ropt.state[rp]["step"] = torch.tensor(10.0)
    both_step()
    assert float(opt.state[p]["step"]) == 11.0
    opt.state[p]["step"].data = torch.tensor(20.0)
    ropt.state[rp]["step"].data = torch.tensor(20.0)
    both_step()
    assert float(opt.state[p]["step"]) == 21.0
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    both_step()
    twin = copy.deepcopy(opt)
    twin_p = twin.param_groups[1]["params"][0]
    assert twin_p is not p and float(twin.state[twin_p]["step"]) == 22.0
    both_step()
    assert float(opt.state[p]["step"]) == 23.0 and float(twin.state[twin_p]["step"]) == 22.0
    assert [float(opt.state[q]["step"]) for q in m.params.values() if q in opt.state] == \
        [float(ropt.state[q]["step"]) for q in ref.params.values() if q in ropt.state]
    for k in Model.MASKED + ("values",):
        close(m.params[k], ref.params[k])


@pytest.mark.parametrize("bad", ["shape", "dtype", "layout"])
def test_a_state_tensor_replaced_by_hand_is_checked_before_the_kernels_read_it(kernel_device, bad):
    """The kernels read each state tensor as raw float32 memory of its parameter's size: one swapped for a tensor of
    another shape or dtype (by hand, after the state was made) is refused at the step, before any launch, and a
    non-contiguous one is made contiguous (the step is then the reference's)."""
    backend = "triton" if kernel_device.type == "cuda" else "interpret"
    m, ref = Model(kernel_device), Model(kernel_device)
    opt = Adam(m.groups(), lr=1e-2, backend=backend)
    ropt = Adam(ref.groups(), lr=1e-2, backend="torch")
    gen, rgen = torch.Generator().manual_seed(15), torch.Generator().manual_seed(15)
    m.set_grads(gen, mask_them=False)
    ref.set_grads(rgen, mask_them=False)
    opt.step()
    ropt.step()
    p, rp = m.params["fc"], ref.params["fc"]
    if bad == "layout":  # the same values, through a transposed copy's view
        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].t().contiguous().t()
        assert not opt.state[p]["exp_avg"].is_contiguous()
    else:
        opt.state[p]["exp_avg"] = (torch.zeros(3, device=kernel_device) if bad == "shape" else
                                   opt.state[p]["exp_avg"].double())
    m.set_grads(gen, mask_them=False)
    ref.set_grads(rgen, mask_them=False)
    before = {k: q.detach().clone() for k, q in m.params.items()}
    if bad != "layout":
        with pytest.raises(ValueError, match="optimizer state 'exp_avg'.*does not fit its parameter"):
            opt.step()
        for k, q in m.params.items():  # refused before anything was written
            assert torch.equal(q, before[k]), k
        return
    opt.step()
    ropt.step()
    assert opt.state[p]["exp_avg"].is_contiguous()
    close(p, rp)
    close(opt.state[p]["exp_avg"], ropt.state[rp]["exp_avg"])


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_state_of_another_shape_is_refused_at_load(name):
    """The fused kernels read the state as raw memory: a state dict of another model (or of a layer saved on
    another path) would be read out of bounds. It is refused, with nothing loaded."""
    kw = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
    small, big = torch.nn.Linear(4, 2), torch.nn.Linear(40, 20)
    cls = {"SGD": SGD, "Adam": Adam}[name]
    opt_small = cls(small.parameters(), **kw)
    small(torch.randn(3, 4)).sum().backward()
    opt_small.step()
    opt_big = cls(big.parameters(), **kw)
    with pytest.raises(ValueError, match=r"of shape \(2, 4\) for a parameter of shape \(20, 40\)"):
        opt_big.load_state_dict(opt_small.state_dict())
    assert not opt_big.state  # nothing loaded


# ------------------------------------------------------------------- session 31's audit: each fails without its fix
def _masked(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor([True, False] * (n // 2))
    p = torch.nn.Parameter(torch.randn(n, generator=gen) * mask)
    setattr(p, MASK_ATTR, mask)
    return p, mask, gen


def _step(opt, p, gen):
    opt.zero_grad()
    p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_a_mask_taken_off_and_put_back_zeroes_the_state_again(backend):
    """A step without the mask lets the momentum fill in at pruned positions; the same mask put back must zero it
    again (the torch backend remembered the mask as seen, and momentum moved pruned weights off zero)."""
    p, mask, gen = _masked()
    opt = SGD([p], lr=0.1, momentum=0.9, backend=backend)
    _step(opt, p, gen)
    delattr(p, MASK_ATTR)
    _step(opt, p, gen)
    assert (opt.state[p]["momentum_buffer"][~mask] != 0).all()  # unmasked: it filled in
    setattr(p, MASK_ATTR, mask)
    with torch.no_grad():
        p.mul_(mask)
    _step(opt, p, gen)
    assert (p[~mask] == 0).all() and (opt.state[p]["momentum_buffer"][~mask] == 0).all()


def test_a_mask_replaced_through_data_is_seen():
    """``mask.data = other`` keeps the tensor and its version counter: the torch backend's cached mask (bits, and
    the record that the state respects it) is keyed by the mask's address too."""
    p, mask, gen = _masked()
    opt = Adam([p], lr=0.1, backend="torch")
    _step(opt, p, gen)
    newly = torch.tensor([True, False, False, False, True, False])
    mask.data = newly.clone()
    with torch.no_grad():
        p.mul_(newly)
    _step(opt, p, gen)
    assert (p[~newly] == 0).all() and (opt.state[p]["exp_avg"][~newly] == 0).all()


@pytest.mark.parametrize("how", ["add_param_group", "load_state_dict"])
def test_what_torch_optim_groups_carry_but_these_would_not_do_is_refused(how):
    """maximize=True (from add_param_group or a torch.optim state dict) was ignored: the optimizer minimized; a
    torch AdamW state dict loaded into Adam silently switched to L2 decay."""
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    if how == "add_param_group":
        opt = SGD([p], lr=0.1)
        with pytest.raises(ValueError, match="does not implement maximize=True"):
            opt.add_param_group(dict(params=[q], maximize=True))
        return
    with pytest.raises(ValueError, match="does not implement maximize=True"):
        SGD([p], lr=0.1).load_state_dict(torch.optim.SGD([q], lr=0.1, maximize=True).state_dict())
    torch_adamw = torch.optim.AdamW([q], lr=0.1).state_dict()
    assert torch_adamw["param_groups"][0]["decoupled_weight_decay"] is True  # (torch >= 2.6)
    with pytest.raises(ValueError, match="use AdamW"):
        Adam([p], lr=0.1).load_state_dict(torch_adamw)
    AdamW([p], lr=0.1).load_state_dict(torch_adamw)  # the same kind: fine


def test_deepcopy_keeps_the_masks_and_torch_impl():
    """copy.deepcopy copies a Parameter without its Python attributes: the copied optimizer trained its pruned
    weights, and torch_impl went back to "auto"."""
    import copy
    p, mask, gen = _masked()
    opt = SGD([p], lr=0.1, momentum=0.9, backend="torch")
    opt.torch_impl = "foreach"
    twin = copy.deepcopy(opt)
    (q,) = twin.param_groups[0]["params"]
    assert q is not p and twin.torch_impl == "foreach" and torch.equal(param_mask(q), mask)
    _step(twin, q, gen)
    assert (q[~mask] == 0).all()


def test_an_old_state_dict_with_plain_number_steps_loads():
    """torch.optim once saved Adam's step as a Python number; torch loads that, and so does this Adam now (its
    first step crashed: 'int' object has no attribute 'is_cpu')."""
    p, mask, gen = _masked()
    ref = torch.nn.Parameter(p.detach().clone())
    src = torch.optim.Adam([ref], lr=0.1)
    ref.grad = torch.randn(6, generator=gen) * mask
    src.step()
    sd = src.state_dict()
    sd["state"][0]["step"] = 1  # the old format
    opt = Adam([p], lr=0.1, backend="torch")
    opt.load_state_dict(sd)
    _step(opt, p, gen)
    assert float(opt.state[p]["step"]) == 2


def test_a_refused_adam_step_does_not_count():
    p, mask, gen = _masked()
    opt = Adam([p], lr=0.1, backend="torch")
    _step(opt, p, gen)
    opt.torch_impl = "bogus"
    with pytest.raises(ValueError, match="torch_impl must be"):
        _step(opt, p, gen)
    assert float(opt.state[p]["step"]) == 1  # (it became 2: later bias corrections off by a step)


def test_loading_a_state_dict_keeps_this_optimizers_backend():
    """The backend is where this optimizer runs, not part of what it learned: a checkpoint saved with
    backend="triton" loaded into an optimizer built with backend="torch" raised "backend 'triton' (from
    argument)"."""
    p, mask, gen = _masked()
    saved = SGD([p], lr=0.1, momentum=0.9, backend="torch").state_dict()
    saved["param_groups"][0]["backend"] = "triton"
    opt = SGD([p], lr=0.1, momentum=0.9, backend="torch")
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["backend"] == "torch"
    _step(opt, p, gen)


@pytest.mark.parametrize("cls,kw", [(SGD, dict(lr=0.1, momentum=0.9)), (SGD, dict(lr=0.1)), (Adam, dict(lr=0.1)),
                                    (Adam, dict(lr=0.1, amsgrad=True)), (AdamW, dict(lr=0.1, weight_decay=0.0))],
                         ids=["sgd-momentum", "sgd", "adam", "adam-amsgrad", "adamw"])
def test_a_non_finite_weight_without_weight_decay_keeps_the_state_finite(backend_device, cls, kw):
    """torch.optim adds weight_decay * p only where weight_decay != 0: an inf weight (an fp16 overflow, say) with no
    decay stays inf and its state finite. The kernels added 0 * inf = NaN to the gradient, the weight and the
    state (and the kernel's reference did the same, so the kernel tests agreed)."""
    make, device = backend_device, backend_device.device
    ours = torch.tensor([float("inf"), 1.0, -float("inf")], device=device, requires_grad=True)
    ref = ours.detach().cpu().clone().requires_grad_(True)
    opt, ref_opt = make(cls, [ours], **kw), getattr(torch.optim, cls.__name__)([ref], **kw)
    for g in (0.5, -0.25):
        ours.grad, ref.grad = torch.full_like(ours, g), torch.full_like(ref, g)
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach().cpu(), ref.detach(), equal_nan=True)
    for key, v in ref_opt.state[ref].items():
        if key != "step":
            assert torch.isfinite(v).all(), key
            torch.testing.assert_close(opt.state[ours][key].cpu(), v, msg=key)


def test_adam_first_moment_is_torch_lerp_at_every_beta1(backend_device):
    """exp_avg.lerp_(g, 1 - beta1) as torch computes it: for a weight 1 - beta1 >= 0.5 torch takes
    g - (g - m)(1 - w), exact at beta1 = 0 (the kernels' m + w (g - m) gave 0 for a gradient 1e-8 after 1.0, and
    the weight moved lr / 2 away) and NaN, not inf, for an inf gradient."""
    make, device = backend_device, backend_device.device
    for kw, grads in ((dict(lr=1.0, betas=(0.0, 0.0), eps=1e-8), (1.0, 1e-8)),
                      (dict(lr=0.1, betas=(0.3, 0.999)), (1.0, 1e-7, 3.0)),
                      (dict(lr=0.1, betas=(0.5, 0.999)), (float("inf"),))):
        ours = torch.tensor([-1.0, 2.0], device=device, requires_grad=True)
        ref = ours.detach().cpu().clone().requires_grad_(True)
        opt, ref_opt = make(Adam, [ours], **kw), torch.optim.Adam([ref], **kw)
        for g in grads:
            ours.grad, ref.grad = torch.full_like(ours, g), torch.full_like(ref, g)
            opt.step()
            ref_opt.step()
            exact = dict(rtol=0, atol=0) if kw["betas"][0] in (0.0, 0.5) else {}  # (else: FMA or not, rounding)
            torch.testing.assert_close(opt.state[ours]["exp_avg"].cpu(), ref_opt.state[ref]["exp_avg"],
                                       equal_nan=True, msg=str((kw, g)), **exact)
            torch.testing.assert_close(ours.detach().cpu(), ref.detach(), equal_nan=True, msg=str((kw, g)))


@pytest.mark.parametrize("cls", [SGD, Adam])
def test_loading_into_an_optimizer_built_before_the_model_checkpoint_names_the_cause(cls):
    """The usual resume order (model and optimizer built, the model's checkpoint loaded, then the optimizer's):
    the model's masks gave its layers new parameters, and the optimizer's load_state_dict blamed the state dict
    ("another model's, or the layer was on another path") instead of the optimizer built too early."""
    from torch import nn

    from sparse_lth.layers import sparsify
    gen = torch.Generator().manual_seed(0)
    masks = {"0": torch.rand(30, 20, generator=gen) < 0.05, "2": torch.rand(5, 30, generator=gen) < 0.5}
    trained = sparsify(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)), masks, path="sparse")
    kw = dict(lr=1e-2, momentum=0.9) if cls is SGD else dict(lr=1e-2)
    opt = cls(trained.parameters(), **kw)
    trained(torch.randn(4, 20, generator=gen)).square().mean().backward()
    opt.step()
    model = sparsify(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)), path="sparse")
    early = cls(model.parameters(), **kw)
    model.load_state_dict(trained.state_dict())
    with pytest.raises(RuntimeError, match=rf"{cls.__name__}.load_state_dict\(\): it holds a \(600,\) parameter "
                                           "that sparse-lth replaced .* Build the optimizer after setting or loading"):
        early.load_state_dict(opt.state_dict())
    late = cls(model.parameters(), **kw)  # built after: loads
    late.load_state_dict(opt.state_dict())
    assert torch.equal(late.state[model[0].values]["exp_avg" if cls is Adam else "momentum_buffer"],
                       opt.state[trained[0].values]["exp_avg" if cls is Adam else "momentum_buffer"])


@pytest.mark.parametrize("cls", [Adam, AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_with_eps_zero_keeps_pruned_weights_zero_and_live_ones_as_torch(backend_device, cls, amsgrad):
    """eps=0: the update at a pruned position is 0 / 0 (its moments are zero), which the torch backend's fused
    and foreach paths set back to 0 after torch's update (no test used eps=0: removing that left NaN in every
    pruned weight unnoticed). Live weights follow torch.optim with the gradient masked."""
    gen = torch.Generator().manual_seed(3)
    mask = torch.tensor([True, False, True, False, True, True, False, True])
    p = torch.nn.Parameter((torch.randn(8, generator=gen) * mask).to(backend_device.device))
    setattr(p, MASK_ATTR, mask.to(backend_device.device))
    ref = torch.nn.Parameter(p.detach().cpu().clone())
    opt = backend_device(cls, [p], lr=0.1, eps=0.0, amsgrad=amsgrad, weight_decay=0.01)
    ref_opt = getattr(torch.optim, cls.__name__)([ref], lr=0.1, eps=0.0, amsgrad=amsgrad, weight_decay=0.01)
    for _ in range(3):
        g = torch.randn(8, generator=gen)
        p.grad = g.to(backend_device.device)
        ref.grad = g * mask
        opt.step()
        ref_opt.step()
    got = p.detach().cpu()
    assert (got[~mask] == 0).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got[mask], ref.detach()[mask], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("how", ["launcher", "optimizer"])
def test_kernel_updates_are_seen_by_autograd(kernel_device, how):
    """The kernels write parameters behind autograd's back: a graph that had saved a parameter went on with the
    updated values in its backward, where torch.optim's in-place step makes that backward raise."""
    p = torch.nn.Parameter(torch.randn(4, 5, device=kernel_device))
    loss = (p * p).sum()  # saves p
    g = torch.ones(4, 5, device=kernel_device)
    if how == "launcher":
        with torch.no_grad():
            K.fused_sgd_([p], [g], None, None, lr=0.5)
    else:
        p.grad = g
        Adam([p], lr=0.5, backend="triton" if kernel_device.type == "cuda" else "interpret").step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_adam_launcher_refuses_a_step_count_or_beta_that_breaks_the_bias_corrections(kernel_device):
    """A NaN step count passed `step < 1` and made every weight NaN; beta1 = 1 divided by zero."""
    def call(**kw):
        p = torch.randn(4, device=kernel_device)
        args = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1.0)
        args.update(kw)
        K.fused_adam_([p], [torch.randn(4, device=kernel_device)], [torch.zeros(4, device=kernel_device)],
                      [torch.zeros(4, device=kernel_device)], None, None, **args)
        return p
    for kw, msg in ((dict(step=float("nan")), "step count must be >= 1"), (dict(step=float("inf")), "step count"),
                    (dict(beta1=1.0), "0 <= beta1 < 1"), (dict(beta2=-0.1), "0 <= beta2 < 1")):
        with pytest.raises(ValueError, match=msg):
            call(**kw)
    assert torch.isfinite(call()).all()


def test_the_launchers_refuse_a_block_or_warp_count_the_kernel_cannot_take():
    """block=1000 failed deep in the interpreter (not a power of two), block=0 divided by zero; num_warps was never
    looked at."""
    p, g = torch.randn(8), torch.randn(8)
    for kw, msg in ((dict(block=1000), "block must be a power of two"), (dict(block=0), "block must be"),
                    (dict(num_warps=3), "num_warps must be")):
        with pytest.raises(ValueError, match=msg):
            K.fused_sgd_([p], [g], None, None, lr=0.1, **kw)
    K.fused_sgd_([p], [g], None, None, lr=0.1, block=64, num_warps=2)
