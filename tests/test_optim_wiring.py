"""The optimizers' host-side logic (sparse_lth/optim.py, the launchers of kernels/optim.py): per-group
hyperparameters, mixed groups, state copies on load, caches keyed by everything they depend on, the launchers'
checks. Written after a mutation campaign (session 34: 73 mutants, 23 real survivors): each test failed under a
mutant the rest of the suite let through. Small shapes: without a GPU the kernels run through Triton's
interpreter (tests/conftest.py)."""
import pytest
import torch
from test_kernels_edges import LaunchSpy

from sparse_lth.kernels import optim as K
from sparse_lth.optim import MASK_ATTR, SGD, Adam

DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
KERNEL = "triton" if DEV.type == "cuda" else "interpret"
# (backend, torch_impl, device): the torch backend's fused and foreach paths on CPU, the Triton kernels
RUNS = [("torch", "fused", torch.device("cpu")), ("torch", "foreach", torch.device("cpu")), (KERNEL, None, DEV)]
RUN_IDS = ["torch-fused", "torch-foreach", "kernel"]


def make(run, cls, params, **kw):
    backend, impl, _ = run
    opt = cls(params, backend=backend, **kw)
    if impl is not None:
        opt.torch_impl = impl
    return opt


def masked_param(shape, gen, device, density=0.5):
    mask = (torch.rand(shape, generator=gen) < density).to(device)
    p = torch.nn.Parameter((torch.randn(shape, generator=gen).to(device) * mask))
    setattr(p, MASK_ATTR, mask)
    return p, mask


def twin(p):
    """A torch.optim reference parameter: same values, no mask attached, on the CPU."""
    return torch.nn.Parameter(p.detach().cpu().clone())


def close(a, b, **kw):
    kw.setdefault("rtol", 1e-5)
    kw.setdefault("atol", 1e-6)
    torch.testing.assert_close(a.detach().float().cpu(), b.detach().float().cpu(), **kw)


def step_pairs(pairs, opt, ref_opt, gen, skip=()):
    """One step: the same random gradient for each (ours, ref, mask) pair, masked for the reference (the dense-masking
    recipe), the reference re-masked after its step. Pairs whose index is in ``skip`` get no gradient."""
    for i, (p, r, mask) in enumerate(pairs):
        if i in skip:
            p.grad = r.grad = None
            continue
        g = torch.randn(p.shape, generator=gen)
        p.grad = g.to(p.device, p.dtype)
        r.grad = g if mask is None else g * mask.cpu()
    opt.step()
    ref_opt.step()
    with torch.no_grad():
        for p, r, mask in pairs:
            if mask is not None:
                r.mul_(mask.cpu())


# ---------------------------------------------------------------------------------------------------- sparse_lth/optim
@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
def test_a_gradient_of_another_shape_is_refused(run):
    """S03: a stale gradient of another shape with the parameter's numel (the parameter's .data replaced by a
    transposed tensor after backward; torch checks shapes only when .grad is assigned) is refused before anything is
    written; the kernels would read it as raw memory in the parameter's layout and apply it silently."""
    p = torch.nn.Parameter(torch.randn(6, 4, device=run[2]))
    opt = make(run, SGD, [p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(6, 4, device=run[2])
    p.data = torch.randn(4, 6, device=run[2])
    before = p.detach().clone()
    with pytest.raises(ValueError, match="does not match its parameter"):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("cls,kw", [(SGD, dict(lr=0.1, momentum=0.9)), (Adam, dict(lr=1e-2))], ids=["sgd", "adam"])
@pytest.mark.parametrize("backend", ["torch", KERNEL])
def test_an_optimizer_loaded_from_another_does_not_share_its_state(cls, kw, backend):
    """S12, S13: b loaded from a's state dict (no deepcopy), then both trained on the same gradients, stay equal (and
    their step counts count each optimizer's own steps). A loaded step count or state tensor shared with the source
    would be advanced by both optimizers. (torch.optim shares them; sparse_lth's load copies, by design.)"""
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3, generator=gen).to(DEV if backend == KERNEL else "cpu"))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = cls([a], backend=backend, **kw), cls([b], backend=backend, **kw)
    a.grad = torch.randn(5, 3, generator=gen).to(a.device)
    opt_a.step()
    with torch.no_grad():
        b.copy_(a)
    opt_b.load_state_dict(opt_a.state_dict())
    for _ in range(3):
        g = torch.randn(5, 3, generator=gen).to(a.device)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key, v in opt_a.state[a].items():
        torch.testing.assert_close(v, opt_b.state[b][key], rtol=0, atol=0, msg=key)
    if cls is Adam:
        assert float(opt_a.state[a]["step"]) == float(opt_b.state[b]["step"]) == 4


def test_groups_with_different_backends_each_run_on_their_own(monkeypatch):
    """S15: the backend resolved per (device, requested backend): a group asking for the torch backend and one asking
    for the kernels on the same device each get theirs (the torch backend on CPU masks .grad in place, the kernels
    leave it alone; one kernel launch for the kernel group), and both follow torch.optim."""
    if DEV.type != "cpu":
        pytest.skip("needs both backends on one device: the interpreter on CPU")
    import sparse_lth.optim as so

    gen = torch.Generator().manual_seed(1)
    a, ma = masked_param((4, 5), gen, "cpu")
    b, mb = masked_param((4, 5), gen, "cpu")
    opt = SGD([{"params": [a], "backend": "torch"}, {"params": [b], "backend": "interpret"}], lr=0.1, momentum=0.9)
    launches = []
    real = so._k.launch_buckets
    monkeypatch.setattr(so._k, "launch_buckets",
                        lambda *args, **kw: launches.append(real(*args, **kw)) or launches[-1])
    ga, gb = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    a.grad, b.grad = ga.clone(), gb.clone()
    opt.step()
    assert launches == [1]
    assert torch.equal(a.grad, ga * ma)  # torch backend on CPU: masked in place
    assert torch.equal(b.grad, gb)       # kernels: untouched
    for p, g, m in ((a, ga, ma), (b, gb, mb)):
        assert (p[~m] == 0).all()


def test_a_mask_taken_off_for_a_kernel_step_then_put_back_for_a_torch_step_zeroes_the_state():
    """S18: a kernel step without the mask lets the momentum fill in at pruned positions; when the torch backend then
    runs with the same mask object put back, it must not trust its record that the state respects the mask."""
    if DEV.type != "cpu":
        pytest.skip("switches one parameter between the torch backend and the interpreter on CPU")
    gen = torch.Generator().manual_seed(2)
    mask = torch.tensor([True, False] * 3)
    p = torch.nn.Parameter(torch.randn(6, generator=gen) * mask)
    setattr(p, MASK_ATTR, mask)
    opt = SGD([p], lr=0.1, momentum=0.9, backend="torch")

    def step():
        p.grad = torch.randn(6, generator=gen)
        opt.step()

    step()  # torch backend, masked: it records the mask as seen
    delattr(p, MASK_ATTR)
    opt.param_groups[0]["backend"] = "interpret"
    step()  # kernels, unmasked: the momentum fills in at pruned positions
    assert (opt.state[p]["momentum_buffer"][~mask] != 0).all()
    setattr(p, MASK_ATTR, mask)
    with torch.no_grad():
        p.mul_(mask)
    opt.param_groups[0]["backend"] = "torch"
    step()
    assert (p[~mask] == 0).all() and (opt.state[p]["momentum_buffer"][~mask] == 0).all()


@pytest.mark.parametrize("cls,ref_cls,kw", [(SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                            (Adam, torch.optim.Adam, dict(lr=1e-2))], ids=["sgd", "adam"])
@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
def test_a_non_contiguous_mask_is_read_in_the_parameters_order(run, cls, ref_cls, kw):
    """S21: the attached mask is a transposed (non-contiguous) view: the kernels read raw memory, so it must be made
    contiguous first, else the wrong weights are pruned."""
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(5, 6, generator=gen) < 0.5).to(run[2]).t()
    assert not mask.is_contiguous()
    p = torch.nn.Parameter(torch.randn(6, 5, generator=gen).to(run[2]) * mask)
    setattr(p, MASK_ATTR, mask)
    r = twin(p)
    opt, ref_opt = make(run, cls, [p], **kw), ref_cls([r], **kw)
    for _ in range(3):
        step_pairs([(p, r, mask)], opt, ref_opt, gen)
    close(p, r)
    assert (p[~mask] == 0).all()


@pytest.mark.parametrize("cls,ref_cls,kw", [(SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                            (Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True))],
                         ids=["sgd", "adam"])
@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("fp32_first", [False, True])
def test_torch_backend_group_with_fp32_and_bf16_parameters(impl, cls, ref_cls, kw, fp32_first):
    """S28: the torch backend buckets a group's parameters by (device, dtype): one group holding a bf16 and an fp32
    parameter updates each as an optimizer holding it alone does."""
    gen = torch.Generator().manual_seed(4)
    a, ma = masked_param((4, 5), gen, "cpu")
    b = torch.nn.Parameter(torch.randn(7, generator=gen))
    a.data = a.data.to(torch.bfloat16)
    setattr(a, MASK_ATTR, ma)
    a2, b2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    setattr(a2, MASK_ATTR, ma)
    opt = cls([b, a] if fp32_first else [a, b], backend="torch", **kw)
    alone = [cls([a2], backend="torch", **kw), cls([b2], backend="torch", **kw)]
    for o in [opt] + alone:
        o.torch_impl = impl
    for _ in range(3):
        ga, gb = torch.randn(4, 5, generator=gen).to(torch.bfloat16), torch.randn(7, generator=gen)
        a.grad, b.grad, a2.grad, b2.grad = ga.clone(), gb.clone(), ga.clone(), gb.clone()
        opt.step()
        for o in alone:
            o.step()
    assert a.dtype == torch.bfloat16 and b.dtype == torch.float32
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    torch.testing.assert_close(b, b2, rtol=0, atol=0)
    assert (a[~ma] == 0).all()


def test_nesterov_with_dampening_is_refused():
    """S31: torch.optim.SGD refuses Nesterov momentum with a dampening (and so did this SGD)."""
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="Nesterov"):
        SGD([p], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Nesterov"):
        torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)


def _sgd_two_groups(run, second, steps=4, seed=5, **kw):
    gen = torch.Generator().manual_seed(seed)
    a, ma = masked_param((4, 5), gen, run[2])
    b, mb = masked_param((3, 7), gen, run[2])
    c = torch.nn.Parameter(torch.randn(9, generator=gen).to(run[2]))
    ra, rb, rc = twin(a), twin(b), twin(c)
    opt = make(run, SGD, [{"params": [a, c]}, {"params": [b], **second}], **kw)
    ref_opt = torch.optim.SGD([{"params": [ra, rc]}, {"params": [rb], **second}], **kw)
    pairs = [(a, ra, ma), (c, rc, None), (b, rb, mb)]
    for _ in range(steps):
        step_pairs(pairs, opt, ref_opt, gen)
    for p, r, m in pairs:
        close(p, r)
        if m is not None:
            assert (p[~m] == 0).all()
    return opt, ref_opt


@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
def test_sgd_dampening_of_each_group(run):
    """S35, S41: a group's own dampening (the other groups keep the default) is the one its update uses."""
    _sgd_two_groups(run, dict(dampening=0.5), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
@pytest.mark.parametrize("which", ["first", "second"])
def test_sgd_groups_with_and_without_nesterov(run, which):
    """S38: Nesterov is a group's setting: a Nesterov group and a plain-momentum group (either one first) each get
    their own update, in their own launch."""
    if which == "second":
        _sgd_two_groups(run, dict(nesterov=True), lr=0.05, momentum=0.9)
    else:
        _sgd_two_groups(run, dict(nesterov=False), lr=0.05, momentum=0.9, nesterov=True)


@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
def test_sgd_non_contiguous_parameter(run):
    """S39: SGD on a transposed (non-contiguous) masked parameter: the kernel updates its contiguous copy, which is
    written back (test_optim's non-contiguous test covers Adam only)."""
    gen = torch.Generator().manual_seed(6)
    mask = (torch.rand(5, 6, generator=gen) < 0.5).to(run[2])
    p = torch.nn.Parameter(torch.randn(6, 5, generator=gen).to(run[2]).t())
    with torch.no_grad():
        p.mul_(mask)
    setattr(p, MASK_ATTR, mask)
    assert not p.is_contiguous()
    r = twin(p)
    opt, ref_opt = make(run, SGD, [p], lr=0.1, momentum=0.9, weight_decay=1e-2), \
        torch.optim.SGD([r], lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        step_pairs([(p, r, mask)], opt, ref_opt, gen)
    close(p, r)
    assert (p[~mask] == 0).all()


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
def test_sgd_momentum_with_gradients_zeroed_in_place(run, nesterov):
    """S43: zero_grad(set_to_none=False) and backward() accumulating into the same .grad tensors (as a CUDA-graph
    training loop does): the momentum buffer made at the first step is a copy of the gradient, not the gradient
    itself, which zero_grad would clear and the next backward fill."""
    gen = torch.Generator().manual_seed(7)
    p, mask = masked_param((4, 6), gen, run[2])
    q = torch.nn.Parameter(torch.randn(6, generator=gen).to(run[2]))
    rp, rq = twin(p), twin(q)
    kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov)
    opt, ref_opt = make(run, SGD, [p, q], **kw), torch.optim.SGD([rp, rq], **kw)
    for _ in range(4):
        x = torch.randn(3, 4, generator=gen)
        opt.zero_grad(set_to_none=False)
        ref_opt.zero_grad(set_to_none=False)
        (x.to(run[2]) @ p + q).sin().sum().backward()
        (x @ rp + rq).sin().sum().backward()
        rp.grad.mul_(mask.cpu())
        opt.step()
        ref_opt.step()
        with torch.no_grad():
            rp.mul_(mask.cpu())
    close(p, rp)
    close(q, rq)


@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
def test_adam_parameters_of_one_group_at_different_step_counts(run):
    """S51: a parameter that got no gradient at the first step is one step behind the others of its group: its bias
    corrections are its own step count's, not the group's first parameter's."""
    gen = torch.Generator().manual_seed(8)
    a, ma = masked_param((4, 5), gen, run[2])
    b = torch.nn.Parameter(torch.randn(7, generator=gen).to(run[2]))
    ra, rb = twin(a), twin(b)
    opt, ref_opt = make(run, Adam, [a, b], lr=0.1), torch.optim.Adam([ra, rb], lr=0.1)
    pairs = [(a, ra, ma), (b, rb, None)]
    step_pairs(pairs, opt, ref_opt, gen, skip=(1,))
    for _ in range(2):
        step_pairs(pairs, opt, ref_opt, gen)
    assert float(opt.state[a]["step"]) == 3 and float(opt.state[b]["step"]) == 2
    close(a, ra)
    close(b, rb)


@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
def test_adam_eps_of_each_group(run):
    """S53, S57: a group's own eps (a large one, so that it shows) is the one its update uses."""
    gen = torch.Generator().manual_seed(9)
    a, ma = masked_param((4, 5), gen, run[2])
    b, mb = masked_param((6,), gen, run[2])
    ra, rb = twin(a), twin(b)
    groups = lambda x, y: [{"params": [x]}, {"params": [y], "eps": 0.5}]  # noqa: E731
    opt, ref_opt = make(run, Adam, groups(a, b), lr=0.1), torch.optim.Adam(groups(ra, rb), lr=0.1)
    for _ in range(3):
        step_pairs([(a, ra, ma), (b, rb, mb)], opt, ref_opt, gen)
    close(a, ra)
    close(b, rb)


@pytest.mark.parametrize("run", [r for r in RUNS if r[1] != "foreach"], ids=["torch-fused", "kernel"])
def test_capturable_adam_follows_an_lr_scheduler(run):
    """S55: capturable=True: a learning rate changed by a scheduler takes effect at the next (eager) step; the
    capturable hyperparameter rows are made from the group's current values, not kept from the first step."""
    gen = torch.Generator().manual_seed(10)
    a, ma = masked_param((4, 5), gen, run[2])
    b = torch.nn.Parameter(torch.randn(7, generator=gen).to(run[2]))
    ra, rb = twin(a), twin(b)
    opt, ref_opt = make(run, Adam, [a, b], lr=0.1, capturable=True), torch.optim.Adam([ra, rb], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 3], gamma=0.1)
    ref_sched = torch.optim.lr_scheduler.MultiStepLR(ref_opt, milestones=[2, 3], gamma=0.1)
    for _ in range(5):
        step_pairs([(a, ra, ma), (b, rb, None)], opt, ref_opt, gen)
        sched.step()
        ref_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    close(a, ra)
    close(b, rb)


# ------------------------------------------------------------------------------------------- kernels/optim launchers
def test_the_launchers_refuse_a_state_tensor_of_another_shape():
    """K03: a momentum buffer / exp_avg with fewer elements than its parameter would be read and written out of
    bounds by the kernel; the launcher refuses it."""
    p, g = torch.randn(4, 5, device=DEV), torch.randn(4, 5, device=DEV)
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] has shape"):
        K.fused_sgd_([p], [g], [torch.zeros(10, device=DEV)], None, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] has shape"):
        K.fused_adam_([p], [g], [torch.zeros(5, 4, device=DEV)], [torch.zeros(4, 5, device=DEV)], None, None,
                      lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)


def test_the_launchers_refuse_a_non_contiguous_state_tensor():
    """K04: the kernels walk a state tensor's raw memory in the parameter's order: a transposed buffer is refused."""
    p, g = torch.randn(4, 5, device=DEV), torch.randn(4, 5, device=DEV)
    buf = torch.zeros(5, 4, device=DEV).t()
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] is not contiguous"):
        K.fused_sgd_([p], [g], [buf], None, lr=0.1, momentum=0.9)


def test_capturable_adam_reads_a_step_tensor_replaced_at_the_same_other_addresses():
    """K10: the pointer table is cached by every address in it, the step count's too: a new step tensor (a loaded
    checkpoint, say) with the parameter, gradient and state tensors where they were must be the one read."""
    gen = torch.Generator().manual_seed(12)
    p, g = torch.randn(20, generator=gen).to(DEV), torch.randn(20, generator=gen).to(DEV)
    m1, m2 = torch.zeros(20, device=DEV), torch.zeros(20, device=DEV)
    ref_p, ref_m1, ref_m2 = p.clone(), m1.clone(), m2.clone()
    kw = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    old = torch.tensor(1.0, device=DEV)
    K.fused_adam_([p], [g], [m1], [m2], None, None, step=[old], capturable=True, **kw)
    K.adam_reference_([ref_p], [g], [ref_m1], [ref_m2], None, None, step=1.0, **kw)
    new = torch.tensor(3.0, device=DEV)  # `old` is kept alive: its address is not reused
    K.fused_adam_([p], [g], [m1], [m2], None, None, step=[new], capturable=True, **kw)
    K.adam_reference_([ref_p], [g], [ref_m1], [ref_m2], None, None, step=3.0, **kw)
    close(p, ref_p)
    assert float(old) == 1.0


def test_an_aligned_launch_holds_no_mask_at_an_unaligned_address(monkeypatch):
    """K12: the 1-byte mask's address counts for the alignment dispatch too: a mask one byte past an aligned address,
    with the parameter, gradient and buffer aligned, must not go into an ALIGNED launch."""
    seen = []
    monkeypatch.setattr(K, "_sgd_kernel", LaunchSpy(K._sgd_kernel, seen))
    gen = torch.Generator().manual_seed(13)
    p, g = torch.randn(64, generator=gen).to(DEV), torch.randn(64, generator=gen).to(DEV)
    base = torch.zeros(96, dtype=torch.bool, device=DEV)
    mask = base[1:65]
    mask.copy_(torch.rand(64, generator=gen) < 0.5)
    ref = p.clone()
    K.fused_sgd_([p], [g], None, [mask], lr=0.1, block=64)
    K.sgd_reference_([ref], [g], None, [mask], lr=0.1)
    close(p, ref)
    assert seen and all(not aligned for aligned, _ in seen), [a for a, _ in seen]
    for aligned, table in seen:
        if aligned:
            assert ((table[:, :6] % 16) == 0).all()


def test_fused_sgd_nesterov_needs_momentum_buffers():
    """K22: nesterov without momentum buffers is refused (the kernel would silently do plain SGD)."""
    p, g = torch.randn(8, device=DEV), torch.randn(8, device=DEV)
    with pytest.raises(ValueError, match="nesterov needs momentum buffers"):
        K.fused_sgd_([p], [g], None, None, lr=0.1, momentum=0.9, nesterov=True)


def test_fused_sgd_first_step_per_tensor():
    """K23: first_step is per tensor: a buffer's first step (buf = d_p) and a later one (buf = m buf + (1-d) d_p)
    share one launch, each with its own coefficients."""
    gen = torch.Generator().manual_seed(14)
    ps = [torch.randn(s, generator=gen).to(DEV) for s in ((10,), (3, 4))]
    gs = [torch.randn(p.shape, generator=gen).to(DEV) for p in ps]
    bufs = [torch.zeros(10, device=DEV), torch.randn(3, 4, generator=gen).to(DEV)]
    ref_p, ref_b = [p.clone() for p in ps], [b.clone() for b in bufs]
    kw = dict(lr=0.1, momentum=0.9, dampening=0.25, first_step=[True, False])
    assert K.fused_sgd_(ps, gs, bufs, None, **kw) == 1
    K.sgd_reference_(ref_p, gs, ref_b, None, **kw)
    for a, b in zip(ps + bufs, ref_p + ref_b):
        close(a, b)
