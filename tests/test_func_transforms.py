"""``torch.func`` transforms through the sparse layers: ``grad`` over ``functional_call``, per-sample gradients
(``vmap`` of ``grad``), ``jacrev`` and ``hessian``. The sparse path's autograd Functions run kernels the transforms
cannot trace, and the dense path masks its gradient with a hook on the module's own Parameter, which
``functional_call`` replaces; so under a transform the layers compute the dense-masking product with plain torch
ops. Each result is checked against ordinary autograd through the layers (the sparse kernels, the gradient hook)
or against the same network with masked ``nn`` layers."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from sparse_lth.layers import sparsify
from test_double_backward import masks_for, net  # the same small conv + linear network


def setup(path, backend, kernel_device):
    device = torch.device("cpu")
    if backend == "triton":
        device = kernel_device
        backend = "triton" if device.type == "cuda" else "interpret"
    dtype = torch.float64 if backend == "torch" else torch.float32  # the Triton kernels take no float64
    masks = {n: m.to(device) for n, m in masks_for(net(dtype)).items()}
    model = sparsify(net(dtype).to(device), masks, path=path, backend=backend, ops="sparse" if path == "sparse"
                     else "auto")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 7, 7, generator=g, dtype=dtype).to(device)
    y = torch.tensor([0, 3, 4, 1], device=device)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-5)
    return model, masks, x, y, tol


def loss_of(model):
    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)), y)
    return loss


CASES = [("dense", "torch"), ("sparse", "torch"), ("sparse", "triton")]


@pytest.mark.parametrize("path,backend", CASES)
def test_func_grad_equals_autograd_through_the_layers(path, backend, kernel_device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model, masks, x, y, tol = setup(path, backend, kernel_device)
    assert all(m.path == path for m in model.modules() if hasattr(m, "weight_mask"))
    F.cross_entropy(model(x), y).backward()  # the sparse kernels / the dense path's gradient hook
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach() for n, p in model.named_parameters()}
    got = grad(loss_of(model))(params, x, y)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], **tol, msg=n)
        if path == "dense" and n.endswith("weight"):  # functional_call bypasses the hook: the product masks
            assert (got[n][~masks[n.rsplit(".", 1)[0]]] == 0).all(), n


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_per_sample_gradients_equal_one_backward_per_example(path, kernel_device):
    model, masks, x, y, tol = setup(path, "torch", kernel_device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = loss_of(model)
    per = vmap(grad(lambda p, xi, yi: loss(p, xi[None], yi[None])), in_dims=(None, 0, 0))(params, x, y)
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(per[n][i], p.grad, **tol, msg=f"{n}, example {i}")
    if path == "sparse":
        assert per["0.values"].shape == (x.shape[0], int(masks["0"].sum()))  # per-sample grads of live weights


@pytest.mark.parametrize("path,backend", CASES)
def test_jacrev_wrt_input_equals_autograd_jacobian(path, backend, kernel_device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model, _, x, _, tol = setup(path, backend, kernel_device)
    x1 = x[:1]
    want = torch.autograd.functional.jacobian(model, x1)  # runs the layers' own backward, one row at a time
    got = jacrev(model)(x1)
    torch.testing.assert_close(got, want, **tol)


def test_hessian_over_live_weights_equals_the_masked_networks():
    """``torch.func.hessian`` with respect to the sparse path's live values is the dense-masking network's Hessian
    restricted to the live positions."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    masks = masks_for(dense, 0.6)
    with torch.no_grad():
        for n, m in dense.named_modules():
            if n in masks:
                m.weight.mul_(masks[n])
    model = sparsify(copy.deepcopy(dense), masks, path="sparse", backend="torch")
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    vals = {n: p.detach() for n, p in model.named_parameters() if n.endswith("values")}
    rest = {n: p.detach() for n, p in model.named_parameters() if not n.endswith("values")}

    def loss_sparse(v):
        return F.cross_entropy(functional_call(model, {**v, **rest}, (x,)), y)
    h = hessian(loss_sparse)(vals)

    w = {n: p.detach() for n, p in dense.named_parameters() if n.endswith("weight")}
    others = {n: p.detach() for n, p in dense.named_parameters() if not n.endswith("weight")}
    h_ref = hessian(lambda ww: F.cross_entropy(functional_call(dense, {**ww, **others}, (x,)), y))(w)
    idx = {n.rsplit(".", 1)[0]: model.get_submodule(n.rsplit(".", 1)[0])._flat_index for n in vals}
    for a in vals:
        for b in vals:
            la, lb = a.rsplit(".", 1)[0], b.rsplit(".", 1)[0]
            ref = h_ref[f"{la}.weight"][f"{lb}.weight"].reshape(masks[la].numel(), masks[lb].numel())
            torch.testing.assert_close(h[a][b], ref[idx[la]][:, idx[lb]], rtol=1e-9, atol=1e-12, msg=f"{a}, {b}")
    assert h["0.values"]["2.values"].abs().sum() > 0  # the cross-layer block is there


def test_layers_run_their_own_ops_again_after_a_transform():
    model, masks, x, y, _ = setup("sparse", "torch", None)
    dense_model, _, _, _, _ = setup("dense", "torch", None)
    shapes = [m._last_input_shape for m in model.modules() if hasattr(m, "weight_mask")]
    params = {n: p.detach() for n, p in model.named_parameters()}
    vmap(grad(lambda p, xi, yi: loss_of(model)(p, xi[None], yi[None])), in_dims=(None, 0, 0))(params, x, y)
    dparams = {n: p.detach() for n, p in dense_model.named_parameters()}
    grad(loss_of(dense_model))(dparams, x, y)
    # a transform leaves no trace: the input shapes the path timing uses, and the autograd graph outside it
    assert [m._last_input_shape for m in model.modules() if hasattr(m, "weight_mask")] == shapes
    assert "SparseLinearFunction" in type(model[4](torch.zeros(2, 36, dtype=x.dtype)).grad_fn).__name__
    F.cross_entropy(dense_model(x), y).backward()
    for n, m in dense_model.named_modules():
        if n in masks:
            assert (m.weight.grad[~masks[n]] == 0).all(), n  # the gradient hook still masks


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_functional_call_with_an_inner_step_update(path):
    """A meta-learning inner step outside any transform: ``torch.autograd.grad`` (which no ``.grad`` hook sees)
    gives ``g``, and ``functional_call`` runs the layers on the non-leaf ``params - lr * g``. The layers compute
    the masked network of the updated weights (a revived pruned entry does not count), and the outer gradient is
    zero at pruned positions. Before, the dense path tried to hook the substituted non-leaf tensor and raised."""
    model, masks, x, y, tol = setup(path, "torch", None)
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    loss = loss_of(model)
    g = torch.autograd.grad(loss(params, x, y), list(params.values()), create_graph=True)
    fast = {n: p - 0.1 * gi for (n, p), gi in zip(params.items(), g)}
    outer = loss(fast, x[:2], y[:2])
    outer_g = dict(zip(params, torch.autograd.grad(outer, list(params.values()))))

    ref = net(x.dtype)  # the same inner step on plain layers with weight * mask in the forward
    ref_params = {n: p.detach().clone().requires_grad_() for n, p in ref.named_parameters()}
    with torch.no_grad():
        for n, p in ref_params.items():
            if n.endswith("weight"):
                p.mul_(masks[n.rsplit(".", 1)[0]])

    def ref_loss(ps, xx, yy):
        masked = {n: p * masks[n.rsplit(".", 1)[0]] if n.endswith("weight") else p for n, p in ps.items()}
        return F.cross_entropy(functional_call(ref, masked, (xx,)), yy)
    rg = torch.autograd.grad(ref_loss(ref_params, x, y), list(ref_params.values()), create_graph=True)
    ref_fast = {n: p - 0.1 * gi for (n, p), gi in zip(ref_params.items(), rg)}
    ref_outer = ref_loss(ref_fast, x[:2], y[:2])
    ref_g = dict(zip(ref_params, torch.autograd.grad(ref_outer, list(ref_params.values()))))
    torch.testing.assert_close(outer, ref_outer, **tol)
    for n in params:
        layer, kind = n.rsplit(".", 1)
        want = ref_g[f"{layer}.weight"].reshape(-1)[model.get_submodule(layer)._flat_index] if kind == "values" \
            else ref_g[n]
        torch.testing.assert_close(outer_g[n], want, **tol, msg=n)
        if kind == "weight":
            assert (outer_g[n][~masks[layer]] == 0).all(), n


def test_functional_call_with_a_weight_on_the_sparse_path_is_refused_and_leaves_the_layer_whole():
    """On the sparse path `weight` is computed from `values`: functional_call with a state_dict's "weight" was
    ignored by forward, and torch put the computed copy back as a plain attribute, which then hid the live weight
    and made a later move to the dense path fail half-way (no parameters left). It is refused, and nothing
    changes; `values` is what to substitute, and the dense path takes "weight"."""
    from sparse_lth.layers import SparseLinear

    torch.manual_seed(0)
    mask = torch.rand(3, 4) < 0.5
    x = torch.randn(2, 4)
    w2 = torch.full((3, 4), 7.0)
    layer = SparseLinear(4, 3, mask=mask, path="sparse")
    with pytest.raises(AttributeError, match="sparse path.*Substitute `values`"):
        functional_call(layer, {"weight": w2}, (x,))
    assert "weight" not in layer.__dict__ and [n for n, _ in layer.named_parameters()] == ["values", "bias"]
    with pytest.raises(AttributeError, match="cannot be set"):
        layer.weight = nn.Parameter(w2)
    y = functional_call(layer, {"values": w2[mask]}, (x,))
    torch.testing.assert_close(y, F.linear(x, w2 * mask, layer.bias))
    with torch.no_grad():
        layer.values.add_(1.0)
    assert torch.equal(layer.weight, layer.dense_weight())  # computed, not a stale snapshot
    layer.set_mask(mask, path="dense")
    torch.testing.assert_close(functional_call(layer, {"weight": w2}, (x,)), F.linear(x, w2 * mask, layer.bias))
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_forward_mode_ad_through_the_layers(path):
    """Forward-mode AD with dual tensors (torch.autograd.forward_ad): the sparse path's autograd Functions define no
    jvp and raised NotImplementedError; inside a dual_level the layers compute the dense-masking product. The
    tangent equals the one of the same network with masked nn layers, on input and parameter tangents."""
    import torch.autograd.forward_ad as fwad

    masks = masks_for(net())
    model = sparsify(net(), masks, path=path, backend="torch")
    ref = net()
    with torch.no_grad():
        for n, m in ref.named_modules():
            if n in masks:
                m.weight.mul_(masks[n])
    g = torch.Generator().manual_seed(5)
    x, tx = torch.randn(3, 2, 7, 7, dtype=torch.float64, generator=g), torch.randn(3, 2, 7, 7, dtype=torch.float64,
                                                                                   generator=g)
    with fwad.dual_level():
        got = fwad.unpack_dual(model(fwad.make_dual(x, tx)))
        want = fwad.unpack_dual(ref(fwad.make_dual(x, tx)))
    torch.testing.assert_close(got.primal, want.primal, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.tangent, want.tangent, rtol=1e-10, atol=1e-12)
    # a tangent on the parameters (torch.func.functional_call with dual tensors): the live weights' directions
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.randn(p.shape, dtype=p.dtype, generator=g) for n, p in params.items()}
    with fwad.dual_level():
        dual = {n: fwad.make_dual(p, tangents[n]) for n, p in params.items()}
        got = fwad.unpack_dual(functional_call(model, dual, (x,))).tangent
    # against the masked nn network with the same parameter tangents (the weight's tangent masked)
    ref_params = {n: p.detach() for n, p in ref.named_parameters()}
    ref_tangents = {}
    for n, m in model.named_modules():
        if n in masks:
            ref_tangents[f"{n}.weight"] = (m.dense_weight().new_zeros(m.weight_shape).masked_scatter(
                masks[n], tangents[f"{n}.values"]) if path == "sparse" else tangents[f"{n}.weight"] * masks[n])
            ref_tangents[f"{n}.bias"] = tangents[f"{n}.bias"]
    _, want = torch.func.jvp(lambda p: functional_call(ref, p, (x,)), (ref_params,), (ref_tangents,))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # inside a dual_level with no dual tensor reaching it, a sparse layer keeps its sparse kernels (the dense route
    # costs 20x at 1 %)
    if path == "sparse":
        with fwad.dual_level():
            y = model(x.clone().requires_grad_(True))
        assert "SparseLinearFunction" in type(y.grad_fn).__name__
