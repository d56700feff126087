"""Second derivatives through the sparse layers: Hessian-vector products and a gradient penalty (backward with
``create_graph=True``) against the same network with dense masked weights, on every path, backend and per-op
configuration. The sparse kernels' results carry no graph, so the Functions switch to differentiable torch ops
when autograd records their backward; before that the cross terms between layers were silently missing."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_lth.layers import sparsify


def net(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 6), nn.ReLU(), nn.Linear(6, 5)).to(dtype)


def masks_for(model, density=0.5):
    g = torch.Generator().manual_seed(1)
    out = {n: torch.rand(m.weight.shape, generator=g) < density for n, m in model.named_modules()
           if isinstance(m, (nn.Linear, nn.Conv2d))}
    for mk in out.values():
        mk.view(-1)[0] = True  # never an empty layer
    return out


def second_order(model, x, y, vecs):
    """(Hessian-vector product w.r.t. the parameters, gradient of the penalty ||dL/dx||^2 w.r.t. them)."""
    params = [p for p in model.parameters()]
    x = x.clone().requires_grad_()
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params + [x], create_graph=True)
    hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads[:-1], vecs)), params, retain_graph=True)
    pen = torch.autograd.grad((grads[-1] ** 2).sum(), params)
    return hv, pen


@pytest.mark.parametrize("backend,ops", [("torch", "sparse"), ("torch", "dense"), ("torch", {"weight_grad": "dense"}),
                                         ("torch", {"forward": "dense"}), ("triton", "sparse")])
def test_hvp_and_gradient_penalty_match_dense_masking(backend, ops, kernel_device, monkeypatch):
    """``triton``: the Triton kernels, compiled on a GPU, through the interpreter on the CPU."""
    device = torch.device("cpu")
    if backend == "triton":
        device = kernel_device
        backend = "triton" if device.type == "cuda" else "interpret"
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the fp32 reference, exactly
    dtype = torch.float64 if backend == "torch" else torch.float32  # the Triton kernels take no float64
    tol = dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    x = torch.randn(3, 2, 7, 7, dtype=dtype).to(device)
    y = torch.tensor([0, 3, 4], device=device)
    ref = net(dtype).to(device)
    masks = {n: m.to(device) for n, m in masks_for(ref).items()}
    with torch.no_grad():
        for n, m in ref.named_modules():
            if n in masks:
                m.weight.mul_(masks[n])
    # a random direction on the live weights (and the biases)
    g = torch.Generator().manual_seed(2)
    dense_vecs = []
    for n, p in ref.named_parameters():
        v = torch.randn(p.shape, generator=g, dtype=p.dtype).to(device)
        layer = n.rsplit(".", 1)[0]
        if n.endswith("weight"):
            v = v * masks[layer]
        dense_vecs.append(v)
    want_hv, want_pen = second_order(ref, x, y, dense_vecs)
    # the dense-masking reference's derivatives, restricted to the live weights
    flat_ref = {n: (h, p) for n, h, p in zip([n for n, _ in ref.named_parameters()], want_hv, want_pen)}

    for path in ("sparse", "dense"):
        model = sparsify(net(dtype).to(device), masks, path=path, backend=backend,
                         ops=ops if path == "sparse" else "auto")
        vecs, names = [], []
        for n, p in model.named_parameters():
            layer, kind = n.rsplit(".", 1)
            d = dict(zip([m for m, _ in ref.named_parameters()], dense_vecs))
            if kind == "values":
                vecs.append(d[f"{layer}.weight"].reshape(-1)[model.get_submodule(layer)._flat_index])
            else:
                vecs.append(d[n])
            names.append(n)
        hv, pen = second_order(model, x, y, vecs)
        for n, h, q in zip(names, hv, pen):
            layer, kind = n.rsplit(".", 1)
            if kind == "values":
                idx = model.get_submodule(layer)._flat_index
                wh, wp = (t.reshape(-1)[idx] for t in flat_ref[f"{layer}.weight"])
            else:
                wh, wp = flat_ref[n]
                if kind == "weight":  # the dense path: compare on the live weights
                    wh, wp, h, q = wh * masks[layer], wp * masks[layer], h * masks[layer], q * masks[layer]
            torch.testing.assert_close(h, wh, msg=f"HVP {path} {n}", **tol)
            torch.testing.assert_close(q, wp, msg=f"penalty {path} {n}", **tol)


def test_first_order_training_does_not_take_the_dense_double_backward(monkeypatch):
    """Plain backward (no create_graph) still runs the sparse ops."""
    from sparse_lth import functional
    monkeypatch.setattr(functional, "_double_differentiable_linear_backward",
                        lambda *a, **k: pytest.fail("took the create_graph backward"))
    model = sparsify(nn.Sequential(nn.Linear(8, 4)), {"0": torch.rand(4, 8) < 0.5}, path="sparse", backend="torch")
    model(torch.randn(2, 8)).sum().backward()
    assert model[0].values.grad is not None


def test_double_backward_through_a_fused_relu_matches_linear_then_relu():
    """the create_graph backward of SparseLinear(activation="relu") zeroes dy where the output is 0."""
    from sparse_lth.layers import SparseLinear
    torch.manual_seed(0)
    ref = nn.Linear(8, 6).double()
    mask = torch.zeros(48, dtype=torch.bool)
    mask[torch.randperm(48, generator=torch.Generator().manual_seed(2))[:30]] = True
    mask = mask.view(6, 8)
    with torch.no_grad():
        ref.weight.mul_(mask)
    x = torch.randn(5, 8, dtype=torch.float64)
    c = torch.randn(5, 6, dtype=torch.float64)

    def derivs(fn, bias):
        xx = x.clone().requires_grad_()
        y = fn(xx)
        assert (y == 0).any()
        (gx,) = torch.autograd.grad((c * y).sum() + (y ** 2).sum(), xx, create_graph=True)
        (gb,) = torch.autograd.grad((gx ** 2).sum(), bias)
        return gx.detach(), gb

    want = derivs(lambda t: torch.relu(ref(t)), ref.bias)
    for path in ("sparse", "dense"):
        layer = SparseLinear.from_dense(ref, mask, path=path)
        layer.activation = "relu"
        got = derivs(layer, layer.bias)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
