"""The layers' less travelled paths: copies and frozen parameters across set_mask, strict loading, the dense
path's gradient hook (mask_gradients=False, retired weights, dtype moves that make or swap parameters), forced
paths a backend cannot run, densify/sparsify/strip_masks edge cases, and the autograd Functions' double backward
without a flat index or with dilation. Written after a mutation campaign on sparse_lth/layers.py and functional.py
(session 34: 126 mutants, 32 real survivors): each test failed under a mutant the rest of the suite let through,
and each compares with an independent reference (nn.Linear, F.linear or F.conv2d on the masked weight)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad

from sparse_lth.layers import SparseConv2d, SparseLinear


@pytest.fixture
def backend(kernel_device):
    return "triton" if kernel_device.type == "cuda" else "interpret"


def _mask(shape, seed=0, density=0.5):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < density
    m.view(-1)[0] = True
    m.view(-1)[-1] = False
    return m


def test_functional_call_weight_gradient_is_left_unmasked_with_mask_gradients_false():
    # mask_gradients=False: pruned gradients are left as they are, also for a weight substituted by functional_call
    torch.manual_seed(0)
    layer = SparseLinear(5, 4, path="dense", mask=_mask((4, 5)), mask_gradients=False)
    x = torch.randn(3, 5)
    w_sub = torch.randn(4, 5)

    def loss(w):
        return functional_call(layer, {"weight": w}, (x,)).square().sum()

    got = grad(loss)(w_sub)
    ref = grad(lambda w: F.linear(x, w, layer.bias.detach()).square().sum())(w_sub)
    torch.testing.assert_close(got, ref)
    assert got[~layer.weight_mask].abs().sum() > 0


def test_dense_weight_is_differentiable_and_state_dict_keep_vars_gives_the_parameter_on_the_dense_path():
    torch.manual_seed(0)
    mask = _mask((4, 5))
    layer = SparseLinear(5, 4, path="dense", mask=mask)
    ref = nn.Linear(5, 4)
    assert ref.state_dict(keep_vars=True)["weight"] is ref.weight  # what nn.Linear does
    assert layer.state_dict(keep_vars=True)["weight"] is layer.weight
    layer.dense_weight().sum().backward()
    assert layer.weight.grad is not None
    assert torch.equal(layer.weight.grad, mask.float())  # d(sum)/dw = 1 at live entries, masked at pruned ones


def test_set_dense_weight_refuses_a_broadcastable_wrong_shape():
    torch.manual_seed(0)
    for path in ("dense", "sparse"):
        layer = SparseLinear(5, 4, path=path, mask=_mask((4, 5)))
        before = layer.dense_weight().detach().clone()
        with pytest.raises(ValueError, match="shape"):
            layer.set_dense_weight(torch.ones(1, 5))  # broadcasts against a (4, 5) mask
        assert torch.equal(layer.dense_weight().detach(), before)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_set_mask_keeps_its_own_copy_of_the_mask(path):
    torch.manual_seed(0)
    layer = SparseLinear(5, 4, path=path)
    w0 = layer.dense_weight().detach().clone()
    mask = _mask((4, 5))
    keep = mask.clone()
    layer.set_mask(mask)
    mask.fill_(True)  # the caller reuses its tensor
    assert torch.equal(layer.weight_mask, keep)
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), F.linear(x, w0 * keep, layer.bias))


def test_set_mask_refuses_a_forced_sparse_path_the_backend_cannot_run(kernel_device, backend):
    # groups=2 has no Triton sparse conv: forcing the sparse path on the Triton kernels is an error, as the
    # constructor and restore_path say, not a silent dense conv
    layer = SparseConv2d(4, 4, 3, groups=2, backend=backend, path="dense", device=kernel_device)
    with pytest.raises(ValueError, match="groups"):
        layer.set_mask(layer.weight_mask, path="sparse")
    assert layer.path == "dense"


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_a_frozen_weight_stays_frozen_across_set_mask_and_path_switches(path):
    torch.manual_seed(0)
    ref = nn.Linear(5, 4)
    ref.weight.requires_grad_(False)
    layer = SparseLinear.from_dense(ref, path=path)
    assert [p.requires_grad for p in layer.parameters()] == [False, True]
    for new_path in (path, "dense", "sparse", path):
        layer.set_mask(_mask((4, 5), seed=len(new_path)), path=new_path)
        assert [p.requires_grad for p in layer.parameters()] == [False, True], new_path
    x = torch.randn(3, 5)
    layer(x).sum().backward()
    assert all(p.grad is None for n, p in layer.named_parameters() if n != "bias")


def test_unpruning_a_dense_path_layer_lets_every_gradient_through():
    # a dense-path layer pruned, then given a full mask again: no gradient may stay masked by the old mask
    torch.manual_seed(0)
    ref = nn.Linear(5, 4)
    layer = SparseLinear.from_dense(ref, mask=_mask((4, 5)), path="dense")
    layer.set_mask(torch.ones(4, 5, dtype=torch.bool))
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
    x = torch.randn(3, 5)
    layer(x).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)


def test_mask_gradients_false_leaves_the_dense_path_gradient_unmasked():
    torch.manual_seed(0)
    mask = _mask((4, 5))
    layer = SparseLinear(5, 4, path="dense", mask=mask, mask_gradients=False)
    w = layer.weight.detach().clone().requires_grad_(True)
    x = torch.randn(3, 5)
    layer(x).square().sum().backward()
    F.linear(x, w, layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad)
    assert layer.weight.grad[~mask].abs().sum() > 0


def test_time_paths_and_restore_path_refuse_a_sparse_path_the_backend_cannot_run(kernel_device, backend):
    layer = SparseConv2d(4, 4, 3, groups=2, backend=backend, path="dense", device=kernel_device,
                         mask=_mask((4, 2, 3, 3)))
    with pytest.raises(ValueError, match="groups"):
        layer.time_paths((2, 4, 6, 6), reps=1)
    with pytest.raises(ValueError, match="groups"):
        layer.restore_path("sparse")
    assert layer.path == "dense"


def test_a_retired_weight_keeps_plain_autograd_gradients():
    # a weight the layer replaced (set_mask) is no longer the layer's: its gradient is plain autograd's
    torch.manual_seed(0)
    layer = SparseLinear(5, 4, path="dense", mask=_mask((4, 5), seed=0))
    old = layer.weight
    layer.set_mask(_mask((4, 5), seed=1))
    x = torch.randn(3, 5)
    F.linear(x, old).square().sum().backward()
    w = old.detach().clone().requires_grad_(True)
    F.linear(x, w).square().sum().backward()
    torch.testing.assert_close(old.grad, w.grad)


@pytest.mark.parametrize("drop", ["weight", "bias"])
def test_strict_loading_reports_a_missing_weight_or_bias_as_nn_linear_does(drop):
    torch.manual_seed(0)
    sd = dict(nn.Linear(5, 4).state_dict())
    del sd[drop]
    with pytest.raises(RuntimeError, match="Missing key"):
        nn.Linear(5, 4).load_state_dict(sd)
    for path in ("dense", "sparse"):
        layer = SparseLinear(5, 4, path=path, mask=_mask((4, 5)))
        with pytest.raises(RuntimeError, match=f"Missing key.*{drop}"):
            layer.load_state_dict(sd)
        assert drop in SparseLinear(5, 4, path=path).load_state_dict(sd, strict=False).missing_keys


def test_every_gradient_landing_in_the_weight_is_masked_after_a_dtype_move_that_makes_new_parameters():
    torch.manual_seed(0)
    mask = _mask((4, 5))
    layer = SparseLinear(5, 4, path="dense", mask=mask)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        layer.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    x = torch.randn(3, 5, dtype=torch.float64)
    (layer(x).sum() + layer.weight.sum()).backward()  # a penalty on the weight itself, outside forward
    assert torch.all(layer.weight.grad[~mask] == 0)
    assert torch.all(layer.weight.grad[mask] != 0)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_loading_a_plain_linear_state_dict_keeps_the_layers_mask(path):
    torch.manual_seed(0)
    mask = _mask((4, 5))
    layer = SparseLinear(5, 4, path=path, mask=mask)
    ref = nn.Linear(5, 4)
    layer.load_state_dict(ref.state_dict())  # no weight_mask key
    assert torch.equal(layer.weight_mask, mask)
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), F.linear(x, ref.weight * mask, ref.bias))


def test_ops_forced_dense_run_no_sparse_linear_kernel(monkeypatch):
    import sparse_lth.functional as fn

    torch.manual_seed(0)
    mask = _mask((4, 5))
    layer = SparseLinear(5, 4, path="sparse", mask=mask, ops="dense", backend="torch")
    assert layer.ops == {"forward": "dense", "input_grad": "dense", "weight_grad": "dense"}
    prep = fn._linear_ops("torch")[0]

    def boom(*a, **k):
        raise AssertionError("a sparse kernel ran for an op forced dense")

    monkeypatch.setitem(fn._LINEAR_OPS, "torch", (prep, boom, boom, boom))
    x = torch.randn(3, 5, requires_grad=True)
    w = layer.dense_weight().detach().clone().requires_grad_(True)
    y = layer(x)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w * mask, layer.bias.detach())
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.values.grad, w.grad[mask])


def test_a_conv_first_seen_without_grad_times_the_input_gradient(monkeypatch):
    # an input first seen under no_grad: whether it needs a gradient is unknown, so timing assumes it does
    seen = []

    def fake_time_steps(probes, x, reps, optimizer=None):
        seen.append(x.requires_grad)
        return {label: 1.0 for label in probes}

    layer = SparseConv2d(4, 4, 3, padding=1, path="dense", backend="torch", mask=_mask((4, 4, 3, 3)))
    monkeypatch.setattr(SparseConv2d, "_time_steps", staticmethod(fake_time_steps))
    with torch.no_grad():
        layer(torch.randn(2, 4, 6, 6))
    layer.time_paths((2, 4, 6, 6), reps=1)
    assert seen and all(seen)


def test_densify_keeps_a_conv_padding_mode():
    torch.manual_seed(0)
    mask = _mask((3, 2, 3, 3))
    layer = SparseConv2d(2, 3, 3, padding=1, padding_mode="circular", mask=mask)
    dense = layer.to_dense_module()
    x = torch.randn(2, 2, 5, 5)
    w = layer.dense_weight().detach()
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), w, layer.bias.detach())
    torch.testing.assert_close(dense(x), ref)
    torch.testing.assert_close(layer(x), ref)


def test_sparsify_leaves_a_plain_linear_inside_multihead_attention_alone():
    mha = nn.MultiheadAttention(4, 2)
    mha.out_proj = nn.Linear(4, 4)  # a plain Linear: MultiheadAttention reads its weight directly
    model = nn.Sequential(mha)
    from sparse_lth.layers import sparsify

    sparsify(model)
    assert type(mha.out_proj) is nn.Linear


def test_sparsify_takes_a_mask_given_under_a_later_name_of_a_shared_layer():
    from sparse_lth.layers import sparsify

    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    model = nn.Module()
    model.a = nn.Sequential(lin)  # its first name: a.0
    model.b = lin  # reached first by sparsify's walk
    mask = _mask((4, 5))
    sparsify(model, {"a.0": mask})
    assert model.a[0] is model.b
    assert torch.equal(model.b.weight_mask, mask)
    x = torch.randn(3, 5)
    torch.testing.assert_close(model.b(x), F.linear(x, w * mask, b))


def test_a_swapped_layer_still_used_by_the_model_is_not_reported_as_swapped_out():
    from sparse_lth.layers import sparsify

    lin = nn.Linear(4, 4)
    mha = nn.MultiheadAttention(4, 2)
    mha.out_proj = lin  # left plain there ...
    model = nn.Module()
    model.mha, model.fc = mha, lin  # ... swapped here: its parameters still train inside mha
    sparsify(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 1, 4)
    (model.mha(x, x, x)[0].sum() + model.fc(x).sum()).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


def test_strip_masks_keeps_the_state_dicts_metadata():
    from sparse_lth.layers import sparsify, strip_masks

    model = sparsify(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    sd = model.state_dict()
    out = strip_masks(sd)
    assert "0.weight_mask" not in out and "0.weight" in out
    assert out._metadata == sd._metadata
    plain = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    plain.load_state_dict(out)  # strictly


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_from_dense_takes_the_modules_own_mask_buffer_and_frozen_bias(path):
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    mask = _mask((4, 5))
    lin.register_buffer("weight_mask", mask.float())  # as a plain layer pruned by apply_masks
    lin.bias.requires_grad_(False)
    layer = SparseLinear.from_dense(lin, path=path)
    assert torch.equal(layer.weight_mask, mask)
    assert layer.bias.requires_grad is False
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), F.linear(x, lin.weight * mask, lin.bias))


def test_strip_masks_keeps_other_buffers_whose_names_end_in_mask():
    from sparse_lth.layers import sparsify, strip_masks

    model = sparsify(nn.Sequential(nn.Linear(4, 4)))
    model.register_buffer("attn_mask", torch.ones(4, dtype=torch.bool))
    out = strip_masks(model.state_dict())
    assert sorted(out) == ["0.bias", "0.weight", "attn_mask"]


def test_loading_an_optimizers_state_does_not_spend_the_step_warning_about_swapped_out_layers():
    from sparse_lth.layers import sparsify
    from sparse_lth.optim import SGD

    model = nn.Sequential(nn.Linear(4, 4))
    opt = SGD(model.parameters(), lr=0.1)
    sd = opt.state_dict()
    sparsify(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(sd)  # not a step: nothing trains yet
    with pytest.warns(UserWarning, match="swapped"):
        opt.step()


def _fmt_of(mask):
    from sparse_lth.kernels.format import build_format

    return build_format(mask)


def test_sparse_linear_without_flat_index_double_backward_matches_dense_masking():
    from sparse_lth.functional import sparse_linear

    torch.manual_seed(0)
    mask = _mask((3, 5))  # not square: rows != cols
    w = torch.randn(3, 5, dtype=torch.float64) * mask
    fmt = _fmt_of(mask)
    values = w[mask].clone().requires_grad_(True)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    gx, = torch.autograd.grad(sparse_linear(x, values, None, fmt).square().sum(), x, create_graph=True)
    x_ref = x.detach().clone().requires_grad_(True)
    gx_ref, = torch.autograd.grad(F.linear(x_ref, w).square().sum(), x_ref, create_graph=True)
    torch.testing.assert_close(gx, gx_ref)
    gx.sum().backward()
    gx_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_sparse_linear_refuses_a_dense_op_without_flat_index_and_float64_on_the_triton_kernels(kernel_device,
                                                                                                backend):
    from sparse_lth.functional import sparse_linear

    mask = _mask((3, 5))
    fmt = _fmt_of(mask)
    values = torch.randn(int(mask.sum()))
    with pytest.raises(ValueError, match="flat_index"):
        sparse_linear(torch.randn(2, 5), values, None, fmt, dense=(True, False, False))
    with pytest.raises((TypeError, ValueError)):
        sparse_linear(torch.randn(2, 5, dtype=torch.float64, device=kernel_device),
                      values.double().to(kernel_device), None, _fmt_of(mask.to(kernel_device)), backend=backend)
    y = sparse_linear(torch.randn(2, 5, dtype=torch.float64), values.double(), None, fmt, backend="torch")
    assert y.dtype == torch.float64


def test_the_conv_function_on_the_torch_backend_refuses_missing_taps_clearly():
    from sparse_lth.functional import ALL_SPARSE, SparseConv2dFunction

    mask = _mask((3, 2 * 9))
    fmt = _fmt_of(mask)
    values = torch.randn(int(mask.sum()))
    flat = torch.nonzero(mask.reshape(-1)).reshape(-1)
    with pytest.raises(ValueError, match="taps"):
        SparseConv2dFunction.apply(torch.randn(1, 2, 5, 5), values, None, fmt, (3, 3), (1, 1), (1, 1), (1, 1),
                                   ALL_SPARSE, flat, "torch", None)


def test_a_dilated_sparse_conv_double_backward_matches_dense_masking():
    torch.manual_seed(0)
    mask = _mask((3, 2, 3, 3))
    layer = SparseConv2d(2, 3, 3, padding=2, dilation=2, path="sparse", backend="torch", mask=mask).double()
    w = layer.dense_weight().detach().clone()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    gx, = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.conv2d(x_ref, w, layer.bias.detach(), padding=2, dilation=2)
    gx_ref, = torch.autograd.grad(y_ref.square().sum(), x_ref, create_graph=True)
    torch.testing.assert_close(gx, gx_ref)
    gx.square().sum().backward()
    gx_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("move", ["double", "float", "to"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_gradient_mask_survives_a_move_that_swaps_the_weights_tensor(move, kind):
    """Under torch.__future__.set_swap_module_params_on_conversion(True) (and for tensor subclasses) a move swaps a
    new tensor in under the same Parameter object: the gradient hook lived on the old one. Pruned gradients must
    stay zero (SGD would revive the weights), with one mask hook and the user's own post-accumulate hook kept."""
    torch.manual_seed(0)
    if kind == "linear":
        mask = _mask((4, 5))
        layer, x = SparseLinear(5, 4, path="dense", mask=mask), torch.randn(3, 5)
    else:
        mask = _mask((3, 2, 3, 3))
        layer, x = SparseConv2d(2, 3, 3, padding=1, path="dense", mask=mask), torch.randn(2, 2, 5, 5)
    calls = []
    layer.weight.register_post_accumulate_grad_hook(lambda p: calls.append(1))
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        for _ in range(2):
            layer = getattr(layer, move)() if move != "to" else layer.to("cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    x = x.to(layer.weight.dtype)
    w0 = layer.weight.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    (layer(x).square().sum() + layer.weight.sum()).backward()  # a penalty on the weight too, outside forward
    assert torch.all(layer.weight.grad[~mask] == 0) and torch.all(layer.weight.grad[mask] != 0)
    opt.step()
    assert torch.all(layer.weight.detach()[~mask] == 0) and not torch.equal(layer.weight.detach(), w0)
    assert calls == [1]
    hooks = layer.weight._post_accumulate_grad_hooks.values()
    assert sum(h == layer._mask_accumulated_grad for h in hooks) == 1


def test_strict_loading_refuses_a_stray_dotted_key_as_nn_linear_does():
    """A key under the layer's prefix with a dot in it names no child (the sparse layers have none): unexpected, as
    nn.Linear says, in the layer alone and inside a model; strict=False reports it."""
    torch.manual_seed(0)
    sd = dict(nn.Linear(4, 3).state_dict(), **{"foo.bar": torch.zeros(1)})
    with pytest.raises(RuntimeError, match='Unexpected key.*"foo.bar"'):
        nn.Linear(4, 3).load_state_dict(sd)
    for path in ("dense", "sparse"):
        with pytest.raises(RuntimeError, match='Unexpected key.*"foo.bar"'):
            SparseLinear(4, 3, path=path).load_state_dict(sd)
        model = nn.Sequential(SparseLinear(4, 3, path=path))
        with pytest.raises(RuntimeError, match='Unexpected key.*"0.foo.bar"'):
            model.load_state_dict({"0." + k: v for k, v in sd.items()})
        assert model.load_state_dict({"0." + k: v for k, v in sd.items()}, strict=False).unexpected_keys == \
            ["0.foo.bar"]
