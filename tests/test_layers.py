"""SparseLinear / SparseConv2d on the torch backend against the dense masked reference, sparsify/densify,
state_dict compatibility, the pruned-weights-stay-zero invariant under torch optimizers, and bad input."""

import copy
import itertools
import time
import warnings
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from sparse_lth.backend import resolve_backend
from sparse_lth.layers import (CPU_CONV_SPARSE_MAX_DENSITY, CPU_LINEAR_SPARSE_MAX_DENSITY, LinearReLU, SparseConv2d,
                               SparseLinear, _ops_label, choose_paths, densify, sparse_layers, sparsify, strip_masks)



def random_mask(shape, density, gen):
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool)
    if density <= 0.0:
        return torch.zeros(shape, dtype=torch.bool)
    m = torch.rand(shape, generator=gen) < density
    m.view(-1)[torch.randint(m.numel(), (1,), generator=gen)] = True  # never all-zero at positive density
    return m


def grads_vs_reference(layer, x, fn_ref):
    """Forward and both gradients of ``layer`` against ``fn_ref(x, masked_dense_weight, bias)`` in float64."""
    x = x.detach().requires_grad_(True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    mask = layer.weight_mask
    w_ref = layer.dense_weight().detach().double().requires_grad_(True)
    b_ref = None if layer.bias is None else layer.bias.detach().double().requires_grad_(True)
    x_ref = x.detach().double().requires_grad_(True)
    y_ref = fn_ref(x_ref, w_ref * mask, b_ref)
    y_ref.backward(dy.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-5)
    gw = (w_ref.grad * mask)
    if layer.path == "sparse":
        got = layer.values.grad.double()
        torch.testing.assert_close(got, gw[mask], rtol=1e-5, atol=1e-5)
    else:
        got = layer.weight.grad.double()
        torch.testing.assert_close(got, gw, rtol=1e-5, atol=1e-5)
        assert torch.all(layer.weight.grad[~mask] == 0)
    if b_ref is not None:
        torch.testing.assert_close(layer.bias.grad.double(), b_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 1.0])
@pytest.mark.parametrize("shape,batch", [((13, 7), 5), ((300, 784), 1), ((1, 1), 3), ((129, 257), 4)])
def test_linear_matches_reference(path, density, shape, batch):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((path, density, shape)).encode()))  # (hash() of a str varies)
    out_f, in_f = shape
    layer = SparseLinear(in_f, out_f, bias=True, path=path)
    layer.set_mask(random_mask((out_f, in_f), density, gen))
    assert layer.path == path
    assert layer.nnz == int(layer.weight_mask.sum())
    grads_vs_reference(layer, torch.randn(batch, in_f), lambda x, w, b: F.linear(x, w, b))


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_linear_noncontiguous_and_3d_input(path):
    gen = torch.Generator().manual_seed(1)
    layer = SparseLinear(11, 6, bias=False, path=path)
    layer.set_mask(random_mask((6, 11), 0.3, gen))
    x = torch.randn(11, 4).t()  # non-contiguous (4, 11)
    assert not x.is_contiguous()
    grads_vs_reference(layer, x, lambda x, w, b: F.linear(x, w, b))
    layer.zero_grad()
    grads_vs_reference(layer, torch.randn(2, 3, 11), lambda x, w, b: F.linear(x, w, b))


def test_linear_fused_relu():
    gen = torch.Generator().manual_seed(2)
    for path in ("dense", "sparse"):
        layer = SparseLinear(20, 9, activation="relu", path=path)
        layer.set_mask(random_mask((9, 20), 0.4, gen))
        grads_vs_reference(layer, torch.randn(6, 20), lambda x, w, b: torch.relu(F.linear(x, w, b)))


CONV_CASES = [
    # (cin, cout, k, stride, padding, dilation, groups, hw)
    (3, 4, 3, 1, 1, 1, 1, (7, 9)),
    (1, 2, 5, 2, 2, 1, 1, (9, 8)),
    (3, 5, 1, 1, 0, 1, 1, (5, 5)),
    (4, 6, 3, 2, 0, 2, 1, (11, 10)),
    (4, 6, 3, 1, 1, 1, 2, (6, 7)),
]


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 1.0])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_reference(path, density, case):
    cin, cout, k, s, p, d, g, hw = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((path, density, case)).encode()))
    layer = SparseConv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, path=path)
    layer.set_mask(random_mask(layer.weight_shape, density, gen))
    assert layer.path == path
    x = torch.randn(2 if density < 1 else 1, cin, *hw)
    grads_vs_reference(layer, x, lambda x, w, b: F.conv2d(x, w, b, s, p, d, g))


def check_empty_batch(layer, shape):
    """An empty batch gives an empty output and zero parameter gradients, as nn.Linear / nn.Conv2d do (the torch
    conv path used to raise on it)."""
    x = torch.randn(shape, device=layer.weight_mask.device, requires_grad=True)
    y = layer(x)
    ref = layer.to_dense_module()(x)
    assert y.shape == ref.shape and y.numel() == 0
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.all(p.grad == 0), name


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_empty_batch(path):
    gen = torch.Generator().manual_seed(5)
    for layer, shape in ((SparseLinear(12, 7), (0, 12)), (SparseConv2d(16, 8, 3, padding=1), (0, 16, 7, 9)),
                         (SparseConv2d(3, 4, 3, stride=2), (0, 3, 9, 7))):
        layer.set_mask(random_mask(layer.weight_shape, 0.05, gen), path=path)
        assert layer.path == path
        check_empty_batch(layer, shape)


@pytest.mark.parametrize("path", ["auto", "dense", "sparse"])
@pytest.mark.parametrize("features", [(5, 0), (0, 5)])
def test_a_linear_layer_with_no_outputs_or_no_inputs_works_as_nn_linear(path, features):
    """nn.Linear(5, 0) and nn.Linear(0, 5) are valid; so are their sparse layers, on every path (a layer with no
    output failed to build its values: a reshape of 0 elements to (0, -1))."""
    layer = SparseLinear(*features, path=path)
    # inputs of rank 1 to 3 (a reshape(-1, 0) of no element is ambiguous: torch refused it on the sparse path)
    for lead in ((3,), (), (2, 3), (0,)):
        x = torch.randn(*lead, features[0], requires_grad=True)
        y = layer(x)
        assert y.shape == (*lead, features[1])
        (y.sum() + x.sum()).backward()
        assert x.grad.shape == x.shape
        # and with a graph of the backward (the double-differentiable backward)
        x = torch.randn(*lead, features[0], requires_grad=True)
        g, = torch.autograd.grad(layer(x).sum() + x.sum(), x, create_graph=True)
        assert g.shape == x.shape


def test_conv_padding_mode_and_unbatched():
    layer = SparseConv2d(2, 3, 3, padding=1, padding_mode="reflect", path="sparse")
    layer.set_mask(random_mask(layer.weight_shape, 0.5, torch.Generator().manual_seed(3)))
    ref = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    ref.load_state_dict(strip_masks(layer.state_dict()))
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(layer(x), ref(x))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 10), nn.ReLU(), nn.Linear(10, 4))

    def forward(self, x):
        return self.head(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2))


@pytest.mark.parametrize("path", ["auto", "dense", "sparse"])
def test_sparsify_densify_round_trip(path):
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(3, 3, 12, 12)
    ref = model(x)
    sparsify(model, path=path)
    names = [n for n, _ in sparse_layers(model)]
    assert names == ["conv", "head.1", "head.3"]
    torch.testing.assert_close(model(x), ref)
    gen = torch.Generator().manual_seed(0)
    for _, layer in sparse_layers(model):
        layer.set_mask(random_mask(layer.weight_shape, 0.3, gen))
    pruned = model(x)
    sd = model.state_dict()
    densify(model)
    assert not sparse_layers(model)
    assert isinstance(model.conv, nn.Conv2d) and type(model.head[1]) is nn.Linear
    torch.testing.assert_close(model(x), pruned)
    # the sparse model's state_dict loads into the plain model, strictly once the masks are stripped
    plain = Small().eval()
    plain.load_state_dict(strip_masks(sd))
    torch.testing.assert_close(plain(x), pruned)
    res = Small().load_state_dict(sd, strict=False)
    assert sorted(res.unexpected_keys) == ["conv.weight_mask", "head.1.weight_mask", "head.3.weight_mask"]
    assert not res.missing_keys


def test_densify_keeps_a_fused_relu_and_frozen_parameters():
    gen = torch.Generator().manual_seed(3)
    layer = SparseLinear(6, 5, activation="relu", mask=random_mask((5, 6), 0.5, gen))
    layer.bias.requires_grad_(False)
    x = torch.randn(4, 6, generator=gen)
    sd = strip_masks(layer.state_dict())
    plain = densify(layer)
    assert type(plain) is LinearReLU and isinstance(plain, nn.Linear)
    torch.testing.assert_close(plain(x), layer(x))
    assert plain.weight.requires_grad and not plain.bias.requires_grad
    plain.load_state_dict(sd)  # strictly: the same keys
    again = sparsify(plain)  # and back, fused
    assert type(again) is SparseLinear and again.activation == "relu"
    torch.testing.assert_close(again(x), layer(x))
    conv = SparseConv2d(2, 3, 3, mask=random_mask((3, 2, 3, 3), 0.5, gen))
    conv.weight.requires_grad_(False)
    assert not densify(conv).weight.requires_grad


@pytest.mark.parametrize("how", ["set_mask", "load_state_dict"])
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_an_optimizer_built_before_the_parameters_changed_is_refused(how, path):
    """A mask change gives a layer new trainable parameters: an optimizer built before would go on stepping the
    old tensors, the weights silently frozen while the biases train. Its step raises instead; one built
    afterwards trains."""
    gen = torch.Generator().manual_seed(4)
    model = sparsify(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), path=path)
    before = torch.optim.SGD(model.parameters(), lr=0.1)
    masks = {"0": random_mask((5, 6), 0.5, gen), "2": random_mask((3, 5), 0.5, gen)}
    if how == "set_mask":
        model[0].set_mask(masks["0"], path=path)
    else:  # a checkpoint with other masks into the model first built
        other = sparsify(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), masks, path=path)
        model.load_state_dict(other.state_dict())
    x = torch.randn(4, 6, generator=gen)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="Build the optimizer after setting or loading masks"):
        before.step()
    after = torch.optim.SGD(model.parameters(), lr=0.1)
    w0 = [p.detach().clone() for p in model.parameters()]
    after.step()
    assert all(not torch.equal(a, p) for a, p in zip(w0, model.parameters()))


def test_a_layer_tied_to_another_module_is_left_alone():
    """A Linear whose weight is an embedding's (a language model's output layer) would be untied by a sparse twin
    that copies the weight: sparsify leaves it plain and warns, once; a mask for it is refused. Tied to another
    Linear, both stay plain; an untied layer beside them is swapped."""
    emb = nn.Embedding(7, 4)
    head = nn.Linear(4, 7, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "head2": head, "other": nn.Linear(4, 4)})
    with pytest.warns(UserWarning, match=r"left head a plain Linear: its parameter head.weight is tied to emb.weight") \
            as caught:
        sparsify(model)
    assert sum("tied" in str(w.message) for w in caught) == 1
    assert model["head"] is head and model["head2"] is head and head.weight is emb.weight
    assert type(model["other"]) is SparseLinear
    with pytest.raises(ValueError, match="head cannot take a mask: its parameter head.weight is tied to emb.weight"):
        sparsify(nn.ModuleDict({"emb": emb, "head": head}), masks={"head": torch.ones(7, 4)})
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.bias = a.bias
    pair = nn.Sequential(a, b)
    with pytest.warns(UserWarning, match="tied"):
        sparsify(pair)
    assert type(pair[0]) is nn.Linear and type(pair[1]) is nn.Linear


def test_a_reparametrized_layer_is_left_alone():
    """weight_norm / spectral_norm (a hook computes the weight) and torch.nn.utils.parametrize: a sparse twin would
    copy the computed weight and silently drop the reparametrization; sparsify leaves such a layer plain and warns
    (a mask for it is refused), and swaps the plain layer beside it."""
    from torch.nn.utils import parametrizations, parametrize, spectral_norm, weight_norm

    class Twice(nn.Module):
        def forward(self, w):
            return 2 * w

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of the old weight_norm
        normed = weight_norm(nn.Linear(4, 4))
    spec = spectral_norm(nn.Conv2d(2, 3, 3))
    param = nn.Linear(4, 4)
    parametrize.register_parametrization(param, "weight", Twice())
    orth = parametrizations.orthogonal(nn.Linear(4, 4))
    model = nn.ModuleDict({"normed": normed, "spec": spec, "param": param, "orth": orth, "plain": nn.Linear(4, 4)})
    with pytest.warns(UserWarning) as caught:
        sparsify(model)
    messages = [str(w.message) for w in caught]
    assert any("left normed a plain Linear: its weight is computed by a hook" in m for m in messages), messages
    assert any("left spec a plain Conv2d: its weight is computed by a hook" in m for m in messages), messages
    assert sum("is parametrized" in m for m in messages) == 2, messages
    assert model["normed"] is normed and model["spec"] is spec and model["param"] is param and model["orth"] is orth
    assert "weight_g" in normed._parameters and type(model["plain"]) is SparseLinear
    with pytest.raises(ValueError, match="normed cannot take a mask: its weight is computed by a hook"):
        sparsify(nn.ModuleDict({"normed": normed}), masks={"normed": torch.ones(4, 4)})
    with pytest.warns(UserWarning, match="left the Linear plain: its weight is computed by a hook"):
        assert sparsify(normed) is normed


def test_a_parameter_shared_with_a_swapped_layer_still_trains():
    """sparsify swaps modules but retires none of their parameters: one used by another model (or an optimizer
    built afterwards over both) trains on."""
    emb = nn.Embedding(7, 4)
    head = nn.Linear(4, 7, bias=False)
    model = nn.ModuleDict({"emb": emb, "head": head})
    other = nn.Sequential(head)  # the same layer in a model left plain
    sparsify(model)
    assert type(model["head"]) is SparseLinear
    params = {id(p): p for p in list(model.parameters()) + list(other.parameters())}  # each once
    opt = torch.optim.SGD(list(params.values()), lr=0.1)
    loss = model["head"](model["emb"](torch.tensor([1, 2]))).sum() + other(torch.ones(1, 4)).sum()
    loss.backward()
    before = emb.weight.detach().clone(), head.weight.detach().clone()
    with pytest.warns(UserWarning, match="unless that layer is still used elsewhere on purpose"):
        opt.step()
    assert not torch.equal(before[0], emb.weight) and not torch.equal(before[1], head.weight)


def test_sparsify_gives_a_shared_layer_one_twin():
    """A layer used under two names (or in two blocks) stays one layer: one sparse twin, one mask, one set of
    parameters; a mask may be given under either name, and two different ones are refused."""
    gen = torch.Generator().manual_seed(8)
    lin = nn.Linear(4, 4)
    m = nn.Module()
    m.enc, m.dec = lin, lin
    blocks = nn.Sequential(nn.Sequential(lin), nn.Sequential(lin))
    mask = random_mask((4, 4), 0.5, gen)
    sparsify(m, masks={"dec": mask})
    assert type(m.enc) is SparseLinear and m.enc is m.dec and torch.equal(m.enc.weight_mask, mask)
    sparsify(blocks)
    assert blocks[0][0] is blocks[1][0] and sum(p.numel() for p in blocks.parameters()) == 4 * 4 + 4
    densify(blocks)  # and back: still one layer
    assert type(blocks[0][0]) is nn.Linear and blocks[0][0] is blocks[1][0]
    other = nn.Module()
    other.a, other.b = nn.Linear(4, 4), None
    other.b = other.a
    with pytest.raises(ValueError, match="b is the same layer as a, with another mask"):
        sparsify(other, masks={"a": mask, "b": ~mask})


def test_sparsify_leaves_subclasses_alone():
    """A subclass of nn.Linear / nn.Conv2d has its own forward or parameters: swapping it for a plain sparse
    layer would change the network, so it stays as it is."""
    class Scaled(nn.Linear):
        def __init__(self):
            super().__init__(4, 3)
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return self.scale * super().forward(x)

    model = nn.Sequential(Scaled(), nn.Linear(3, 2))
    x = torch.randn(2, 4)
    ref = model(x)
    sparsify(model)
    assert type(model[0]) is Scaled and type(model[1]) is SparseLinear
    torch.testing.assert_close(model(x), ref)


def test_sparsify_torchvision_resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    ref = model(x)
    sparsify(model)
    assert len(sparse_layers(model)) == 21  # 20 convs + fc
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    densify(model)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def in_place_after_layer_matches_out_of_place(layer, x):
    """An in-place activation on the layer's output (``nn.Hardswish(inplace=True)``, as torchvision's MobileNetV3
    puts after its Linear layers) gives the out-of-place forward and gradients."""
    results = []
    for inplace in (False, True):
        layer.zero_grad()
        xi = x.detach().clone().requires_grad_(True)
        z = F.hardswish(layer(xi), inplace=inplace)
        z.backward(torch.linspace(-1, 1, z.numel(), device=z.device).view(z.shape))
        p = layer.values if layer.path == "sparse" else layer.weight
        results.append((z.detach(), xi.grad, p.grad.clone(), layer.bias.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("ops", ["sparse", "dense"])
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_in_place_op_after_a_layer(path, ops):
    """Autograd refused any in-place op on a sparse-path layer's output (it was a view made inside the custom
    Function: a transposed product, a reshape), so sparsify(mobilenet_v3_small) could not train."""
    gen = torch.Generator().manual_seed(31)
    lin = SparseLinear(16, 9, path=path, backend="torch", ops=ops)
    lin.set_mask(random_mask((9, 16), 0.3, gen))
    for x in (torch.randn(4, 16, generator=gen), torch.randn(16, generator=gen), torch.randn(2, 3, 16, generator=gen)):
        in_place_after_layer_matches_out_of_place(lin, x)
    conv = SparseConv2d(3, 5, 3, padding=1, path=path, backend="torch", ops=ops)
    conv.set_mask(random_mask(conv.weight_shape, 0.3, gen))
    for x in (torch.randn(2, 3, 6, 5, generator=gen), torch.randn(3, 6, 5, generator=gen)):
        in_place_after_layer_matches_out_of_place(conv, x)


def test_in_place_op_on_a_saved_output_is_still_caught():
    """The fused ReLU saves its output for the backward: changing that output in place is refused, as autograd
    refuses it after torch.relu (the output is no longer a view, but it shares its version counter)."""
    gen = torch.Generator().manual_seed(32)
    layer = SparseLinear(16, 9, path="sparse", backend="torch", activation="relu")
    layer.set_mask(random_mask((9, 16), 0.3, gen))
    y = layer(torch.randn(4, 16, generator=gen))
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_sparsify_torchvision_mobilenet_v3_trains_on_the_sparse_path():
    """MobileNetV3 (in-place Hardswish after its Linear layers, depthwise convs): sparsified, its Linear layers on
    the sparse path, forward and backward give the dense masked network's outputs and gradients (in eval mode:
    batch statistics of 1x1 maps over a small batch would magnify rounding differences)."""
    torch.manual_seed(0)
    ref = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    model = copy.deepcopy(ref)
    sparsify(model)
    gen = torch.Generator().manual_seed(33)
    for name, layer in sparse_layers(model):
        mask = random_mask(layer.weight_shape, 0.1, gen)
        layer.set_mask(mask, path="sparse" if isinstance(layer, SparseLinear) else None)
        with torch.no_grad():
            ref.get_submodule(name).weight.mul_(mask)
    assert {layer.path for layer in model.classifier if isinstance(layer, SparseLinear)} == {"sparse"}
    x = torch.randn(2, 3, 32, 32, generator=gen)
    out, out_ref = model(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for name, layer in sparse_layers(model):
        g_ref = ref.get_submodule(name).weight.grad * layer.weight_mask
        got = layer.values.grad if layer.path == "sparse" else layer.weight.grad
        want = g_ref[layer.weight_mask] if layer.path == "sparse" else g_ref
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_state_dict_between_sparse_models_carries_masks():
    gen = torch.Generator().manual_seed(5)
    a = SparseLinear(30, 20, path="sparse")
    a.set_mask(random_mask((20, 30), 0.1, gen))
    b = SparseLinear(30, 20, path="dense")
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.weight_mask, a.weight_mask)
    assert torch.equal(b.dense_weight(), a.dense_weight())
    x = torch.randn(4, 30)
    torch.testing.assert_close(a(x), b(x))
    # a plain layer's state dict loads into a sparse one, which keeps its mask
    plain = nn.Linear(30, 20)
    b.load_state_dict(plain.state_dict())
    assert torch.equal(b.dense_weight(), plain.weight.detach() * b.weight_mask)


def test_set_mask_keeps_live_weights_and_switches_parameters():
    layer = SparseLinear(10, 8, path="dense")
    w0 = layer.dense_weight().detach().clone()
    m = random_mask((8, 10), 0.4, torch.Generator().manual_seed(6))
    layer.set_mask(m, path="sparse")
    assert [n for n, _ in layer.named_parameters()] == ["values", "bias"]
    assert layer.values.numel() == int(m.sum())
    assert torch.equal(layer.dense_weight().detach(), w0 * m)
    assert torch.equal(layer.weight.detach(), w0 * m)  # .weight reads the dense weight on the sparse path too
    layer.set_mask(m & (torch.rand(8, 10) < 0.5), path="dense")
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert layer.weight._sparse_lth_mask is layer.weight_mask


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_a_non_finite_weight_at_a_pruned_position_becomes_zero(path):
    """Pruned weights become zero, also an inf or NaN one (a product with the mask made it NaN on the dense
    path, and every output with it), through from_dense, set_mask, set_dense_weight and load_state_dict."""
    lin = nn.Linear(4, 3)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = False
    with torch.no_grad():
        lin.weight[0, 1], lin.weight[2, 3] = float("inf"), float("nan")
    x = torch.randn(5, 4)
    for make in ("from_dense", "set_mask", "set_dense_weight", "load_state_dict"):
        if make == "from_dense":
            layer = SparseLinear.from_dense(lin, mask, path=path)
        else:
            layer = SparseLinear(4, 3, path=path)
            if make == "set_mask":
                layer.set_dense_weight(lin.weight.nan_to_num(0.0, 0.0, 0.0))
                with torch.no_grad():
                    (layer.weight if path == "dense" else layer.values).fill_(1.0)
                    if path == "dense":
                        layer.weight[0, 1] = float("inf")
                layer.set_mask(mask, path=path)
            elif make == "set_dense_weight":
                layer.set_mask(mask, path=path)
                layer.set_dense_weight(lin.weight)
            else:
                layer.set_mask(mask, path=path)
                layer.load_state_dict(dict(lin.state_dict(), weight_mask=mask))
        w = layer.dense_weight().detach()
        assert w[0, 1].item() == 0 and w[2, 3].item() == 0, (make, w)
        assert torch.isfinite(layer(x)).all(), make


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_non_finite_gradient_or_substituted_weight_at_a_pruned_position_stays_out(kind, dtype):
    """The dense path: an input that only pruned weights read may overflow their gradient to inf, and the hook's
    product with the mask made it NaN (torch.optim then wrote NaN into the pruned weight and every output); a
    weight given through functional_call with inf or NaN at pruned positions made every output NaN. Both now
    stay out: the gradient is 0 there and the outputs are those of the masked weight. Also after a dtype move
    (the hook's bits follow the weight's width)."""
    from torch.func import functional_call
    if kind == "linear":
        layer = SparseLinear(4, 3, bias=False, path="dense")
        mask = torch.ones(3, 4, dtype=torch.bool)
        mask[:, 1] = False  # input 1 feeds only pruned weights
        x = torch.ones(2, 4, dtype=dtype)
        x[:, 1] = 3e38 if dtype != torch.float64 else 1e308
    else:
        layer = SparseConv2d(2, 3, 1, bias=False, path="dense")
        mask = torch.ones(3, 2, 1, 1, dtype=torch.bool)
        mask[:, 1] = False
        x = torch.ones(1, 2, 2, 2, dtype=dtype)
        x[:, 1] = 3e38 if dtype != torch.float64 else 1e308
    layer.set_mask(mask, path="dense")
    layer = layer.to(dtype)
    y = layer(x)
    assert torch.isfinite(y).all()
    (y * 10).sum().backward()  # 10 * 3e38 overflows at the pruned entries
    g = layer.weight.grad
    assert (g[~mask] == 0).all() and torch.isfinite(g).all() and (g[mask] != 0).all()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    assert (layer.weight[~mask] == 0).all() and torch.isfinite(layer(x)).all()
    w = layer.weight.detach().clone()
    w[~mask] = float("inf")
    w.view(-1)[(~mask).view(-1).nonzero()[0]] = float("nan")
    out = functional_call(layer, {"weight": w}, (torch.ones_like(x),))
    ref = functional_call(layer, {"weight": w.nan_to_num(0.0, 0.0, 0.0) * mask}, (torch.ones_like(x),))
    assert torch.isfinite(out).all() and torch.equal(out, ref)


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("opt", ["sgd", "sgd_nesterov", "adam", "adamw"])
def test_pruned_weights_stay_zero_under_optimizers(path, opt):
    torch.manual_seed(0)
    model = sparsify(Small(), path=path)
    gen = torch.Generator().manual_seed(7)
    for _, layer in sparse_layers(model):
        layer.set_mask(random_mask(layer.weight_shape, 0.2, gen))
    params = model.parameters()
    o = {
        "sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2),
        "sgd_nesterov": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3),
        "adam": lambda: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3),
        "adamw": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    }[opt]()
    before = {n: l.dense_weight().detach().clone() for n, l in sparse_layers(model)}
    for _ in range(15):
        o.zero_grad()
        loss = F.cross_entropy(model(torch.randn(4, 3, 12, 12)), torch.randint(0, 4, (4,)))
        loss.backward()
        o.step()
    for n, layer in sparse_layers(model):
        w = layer.dense_weight().detach()
        assert torch.all(w[~layer.weight_mask] == 0), n
        assert not torch.equal(w[layer.weight_mask], before[n][layer.weight_mask]), f"{n} did not train"


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "unfrozen", "frozen_timed"])
def test_dense_path_masks_gradients_of_copied_pickled_and_unfrozen_layers(how):
    """copy.deepcopy and unpickling rebuild a Parameter without its gradient hook or mask attribute, and a frozen
    weight cannot take the hook: each must still get its gradient masked once it trains, under torch.optim."""
    import copy
    import io
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(11)
    model = sparsify(Small(), path="dense")
    for _, layer in sparse_layers(model):
        layer.set_mask(random_mask(layer.weight_shape, 0.3, gen))
    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 4, (4,))
    if how == "deepcopy":
        model = copy.deepcopy(model)
    elif how == "pickle":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        model = torch.load(buf, weights_only=False)
    else:
        model = sparsify(Small(), path="dense")
        model.requires_grad_(False)
        for _, layer in sparse_layers(model):
            layer.set_mask(random_mask(layer.weight_shape, 0.3, gen))  # frozen: no hook can be registered yet
        if how == "frozen_timed":
            model(x)  # records each layer's input shape
            for _, layer in sparse_layers(model):
                assert layer.time_paths(layer._last_input_shape, reps=1).split("/")[0] in ("dense", "sparse")  # raised
                layer.restore_path("dense")
        model.requires_grad_(True)
    for _, layer in sparse_layers(model):
        assert layer.weight._sparse_lth_mask is layer.weight_mask
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, layer in sparse_layers(model):
            g = layer.weight.grad
            assert torch.all(g[~layer.weight_mask] == 0), n
            assert g[layer.weight_mask].abs().sum() > 0, n
        opt.step()
    for n, layer in sparse_layers(model):
        assert torch.all(layer.weight.detach()[~layer.weight_mask] == 0), n
        assert len(layer.weight._post_accumulate_grad_hooks) == 1, n  # one masking pass, not one per copy

def test_auto_path_on_cpu():
    gen = torch.Generator().manual_seed(8)
    lin = SparseLinear(64, 64)
    assert lin.path == "dense"  # fully dense
    lin.set_mask(random_mask((64, 64), 0.02, gen))
    assert lin.path == "sparse"
    lin.set_mask(random_mask((64, 64), 0.6, gen))
    assert lin.path == "dense"
    conv = SparseConv2d(16, 16, 3)
    n = conv.weight_mask.numel()
    at_limit = round(CPU_CONV_SPARSE_MAX_DENSITY * n)  # the most live weights the rule puts on the sparse path
    for live, path in ((at_limit, "sparse"), (at_limit + 1, "dense"), (n // 10, "dense"), (1, "sparse")):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=gen)[:live]] = True
        conv.set_mask(mask.view(conv.weight_shape))
        assert conv.path == path, (live, conv.density)
    # a grouped conv (its torch sparse path is a scatter and a dense conv), a first layer, a strided one: dense
    for other in (SparseConv2d(16, 16, 3, groups=2), SparseConv2d(3, 64, 3), SparseConv2d(16, 16, 3, stride=2)):
        other.set_mask(random_mask(other.weight_shape, 0.01, gen))
        assert other.path == "dense"
    model = sparsify(Small())
    for _, layer in sparse_layers(model):
        layer.set_mask(random_mask(layer.weight_shape, 0.05, gen))
    paths = choose_paths(model, torch.randn(2, 3, 12, 12))
    assert paths["conv"] == "dense"  # 3 input channels
    for name in ("head.1", "head.3"):
        layer = dict(sparse_layers(model))[name]
        assert paths[name] == ("sparse" if layer.density <= CPU_LINEAR_SPARSE_MAX_DENSITY else "dense")


def test_bad_input_is_refused_clearly():
    layer = SparseLinear(5, 3)
    with pytest.raises(ValueError, match="shape"):
        layer.set_mask(torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        layer.set_mask(torch.full((3, 5), float("nan")))
    with pytest.raises(ValueError, match="only 0 and 1"):
        layer.set_mask(torch.full((3, 5), 0.5))
    with pytest.raises(TypeError, match="bool or real"):
        layer.set_mask(torch.ones(3, 5, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer.set_mask([[1] * 5] * 3)
    with pytest.raises(ValueError, match="path"):
        layer.set_mask(torch.ones(3, 5), path="fast")
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="different|on meta"):
        layer(torch.randn(2, 5, device="meta"))
    layer.set_mask(torch.ones(3, 5), path="sparse")
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 5, dtype=torch.float64))
    conv = SparseConv2d(2, 4, 3, groups=2)
    with pytest.raises(ValueError, match="expected input"):
        conv(torch.randn(1, 3, 5, 5))
    with pytest.raises(RuntimeError, match="triton"):
        SparseLinear(4, 4, backend="triton")  # no CUDA tensors here
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("cpu", "cuda-magic")
    with pytest.raises(KeyError, match="not Linear/Conv2d"):
        sparsify(Small(), masks={"bn": torch.ones(8)})
    # the meta device (deferred initialization): refused with what to do, not "Tensor.item() on meta tensors"
    with torch.device("meta"):
        with pytest.raises(ValueError, match="cannot live on the meta device.*to_empty"):
            SparseLinear(4, 4)
        with pytest.raises(ValueError, match="cannot live on the meta device"):
            sparsify(nn.Sequential(nn.Conv2d(2, 4, 3)))
    with pytest.raises(ValueError, match="cannot live on the meta device"):
        layer.set_mask(torch.ones(3, 5, device="meta"))


def test_mask_accepts_zero_one_numbers_and_env_backend(monkeypatch):
    layer = SparseLinear(4, 3)
    layer.set_mask(torch.tensor([[1, 0, 1, 0]] * 3), path="sparse")
    assert layer.nnz == 6
    monkeypatch.setenv("SPARSE_LTH_BACKEND", "torch")
    assert layer.backend == "torch"
    monkeypatch.setenv("SPARSE_LTH_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"SPARSE_LTH_BACKEND"):
        _ = layer.backend


def test_timed_path_choice_runs_and_keeps_the_layer_intact():
    """The timing-based choice (used on CUDA) measures both paths on copies and leaves the layer untouched."""
    gen = torch.Generator().manual_seed(9)
    for layer in (SparseLinear(40, 30, path="sparse"), SparseConv2d(3, 4, 3, padding=1, path="sparse"),
                  SparseConv2d(4, 4, 3, padding=1, groups=2, path="sparse")):
        layer.set_mask(random_mask(layer.weight_shape, 0.1, gen))
        before = layer.dense_weight().detach().clone()
        shape = (4, 40) if isinstance(layer, SparseLinear) else (2, layer.in_channels, 6, 6)
        path, dense_ops = layer._time_paths(shape, reps=3)
        timings = layer.path_timings
        assert all(t > 0 for t in timings.values()) and set(layer.path_finalists) <= set(timings)
        # the fastest of the finalists: with a second batch, its two (head to head: a first-batch figure of
        # another configuration may be lower, and comparing it was flaky)
        best = min(layer.path_finalists, key=timings.get)
        assert path == ("dense" if best == "dense" else "sparse")
        assert (dense_ops is None) if path == "dense" else (_ops_label(dense_ops) == best)
        if getattr(layer, "groups", 1) == 1:  # all sparse, and each op flipped to dense alone (maybe combined)
            singles = {"dense", "sparse", "sparse/forward:dense", "sparse/input_grad:dense", "sparse/weight_grad:dense"}
            assert singles <= set(timings) and len(timings) <= len(singles) + 1
        else:  # a grouped conv's torch sparse path is a scatter and a dense conv: no per-op choice
            assert set(timings) == {"dense", "sparse"}
        assert layer.path == "sparse" and layer.values.grad is None
        assert torch.equal(layer.dense_weight().detach(), before)


# ---------------------------------------------------------------------- per-op choice on the sparse path
OP_COMBOS = [dict(zip(("forward", "input_grad", "weight_grad"), c))
             for c in itertools.product(("sparse", "dense"), repeat=3)]


@pytest.mark.parametrize("ops", OP_COMBOS, ids=lambda o: "-".join(v[0] for v in o.values()))
@pytest.mark.parametrize("activation", [None, "relu"])
def test_linear_every_op_combination_matches_reference(ops, activation):
    """Each op of the sparse path run dense on the scattered values (any mix) gives the same forward and
    gradients; the trainable parameter stays the compact values."""
    gen = torch.Generator().manual_seed(21)
    layer = SparseLinear(37, 19, path="sparse", backend="torch", activation=activation, ops=ops)
    layer.set_mask(random_mask((19, 37), 0.3, gen))
    assert layer.path == "sparse" and layer.ops == ops
    assert [n for n, _ in layer.named_parameters()] == ["values", "bias"]
    ref = (lambda x, w, b: torch.relu(F.linear(x, w, b))) if activation else (lambda x, w, b: F.linear(x, w, b))
    for x in (torch.randn(3, 5, 37, generator=gen), torch.randn(1, 37, generator=gen),  # 3-D input, batch 1,
              torch.randn(37, 6, generator=gen).t()):  # non-contiguous
        layer.zero_grad()
        grads_vs_reference(layer, x, ref)


@pytest.mark.parametrize("ops", OP_COMBOS, ids=lambda o: "-".join(v[0] for v in o.values()))
def test_conv_torch_sparse_path_every_op_combination(ops):
    """SparseConv2d's torch sparse path (shifted CSR products, kernels/torch_conv.py) with any mix of dense ops:
    the forward and both gradients of F.conv2d on the masked weight, batched and unbatched, strided."""
    gen = torch.Generator().manual_seed(23)
    for k, s, p, d in ((3, 1, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (5, 1, 2, 2)):
        layer = SparseConv2d(3, 5, k, stride=s, padding=p, dilation=d, path="sparse", backend="torch", ops=ops)
        layer.set_mask(random_mask(layer.weight_shape, 0.3, gen))
        assert layer.path == "sparse" and layer.ops == ops
        assert [n for n, _ in layer.named_parameters()] == ["values", "bias"]
        ref = lambda x, w, b: F.conv2d(x, w, b, s, p, d)  # noqa: E731
        for x in (torch.randn(2, 3, 9, 7, generator=gen), torch.randn(3, 8, 8, generator=gen),
                  torch.randn(2, 8, 8, 3, generator=gen).permute(0, 3, 1, 2)):
            layer.zero_grad()
            grads_vs_reference(layer, x, ref)


@pytest.mark.parametrize("ops", OP_COMBOS, ids=lambda o: "-".join(v[0] for v in o.values()))
def test_sparse_conv_keeps_no_copy_of_its_input_for_the_backward(ops):
    """What autograd keeps from a sparse-path conv's forward: its input, the live values and their index (and the
    scattered weight where an op runs dense, as F.conv2d keeps its weight), never a copy of the input (the torch
    backend's padded input grid, which the weight gradient builds again)."""
    gen = torch.Generator().manual_seed(25)
    layer = SparseConv2d(16, 16, 3, padding=1, path="sparse", backend="torch", ops=ops)
    layer.set_mask(random_mask(layer.weight_shape, 0.05, gen))
    x = torch.randn(8, 16, 12, 12, generator=gen, requires_grad=True)

    def saved_bytes(fn):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = fn()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
        return out, storages

    y, mine = saved_bytes(lambda: layer(x))
    _, dense = saved_bytes(lambda: F.conv2d(x, layer.weight.detach().requires_grad_(), layer.bias, 1, 1))
    x_bytes = mine.pop(x.untyped_storage().data_ptr())
    assert all(n < x_bytes / 4 for n in mine.values()), (x_bytes, mine)  # values, index, weight: all small here
    assert sum(mine.values()) <= sum(dense.values()) - x_bytes + 12 * layer.nnz, (mine, dense)
    y.sum().backward()  # and the gradients still come out right
    want = x.detach().requires_grad_()
    F.conv2d(want, layer.weight.detach(), layer.bias.detach(), 1, 1).sum().backward()
    torch.testing.assert_close(x.grad, want.grad)


def test_conv_torch_sparse_path_autocast_dtype_check_and_device_move():
    gen = torch.Generator().manual_seed(24)
    layer = SparseConv2d(3, 4, 3, padding=1, path="sparse", backend="torch")
    layer.set_mask(random_mask(layer.weight_shape, 0.2, gen))
    x = torch.randn(2, 3, 6, 6, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = F.conv2d(x.bfloat16().double(), layer.dense_weight().detach().bfloat16().double(),
                   layer.bias.detach().bfloat16().double(), 1, 1)
    torch.testing.assert_close(y.double(), ref, atol=5e-2, rtol=2e-2)
    y.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32 and layer.values.grad.shape == (layer.nnz,)
    with pytest.raises(TypeError, match="dtype"):
        layer(x.double())
    taps = layer._taps()
    assert layer._taps() is taps  # built once per mask
    layer.set_mask(random_mask(layer.weight_shape, 0.2, gen))
    assert layer._taps() is not taps and layer._taps().nnz == layer.nnz
    layer.zero_grad()
    layer.double()
    grads_vs_reference(layer, x.double(), lambda x, w, b: F.conv2d(x, w, b, 1, 1))


def test_a_float64_model_under_autocast_stays_float64_on_the_sparse_path():
    """Autocast leaves float64 alone (nn.Conv2d, nn.Linear and the dense path return float64 under it); the sparse
    path cast float64 to bf16, and a float64 layer after it failed on the dtype."""
    gen = torch.Generator().manual_seed(25)
    conv = SparseConv2d(3, 4, 3, padding=1, path="sparse", backend="torch").double()
    lin = SparseLinear(4 * 5 * 5, 6, path="sparse", backend="torch").double()
    for layer in (conv, lin):
        layer.set_mask(random_mask(layer.weight_shape, 0.3, gen))
    after = nn.Linear(6, 2).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        z = lin(y.flatten(1))
        out = after(z)
    assert y.dtype == z.dtype == out.dtype == torch.float64
    torch.testing.assert_close(y, F.conv2d(x, conv.dense_weight(), conv.bias, 1, 1))
    # a float64 layer fed float32 under autocast: the input goes to bf16, the float64 weight stays, and the
    # mismatch is refused as nn.Linear / nn.Conv2d refuse it (the sparse path cast the weight to bf16 silently)
    for layer, xi in ((lin, torch.randn(2, 4 * 5 * 5)), (conv, torch.randn(2, 3, 5, 5))):
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="differs from the weight"):
            layer(xi)


@pytest.mark.parametrize("ops", ["sparse", {"weight_grad": "dense", "forward": "dense"}], ids=["sparse", "dense"])
def test_linear_ops_under_autocast_and_without_grads(ops):
    """CPU autocast casts a float32 CSR product back to bfloat16, which the CPU sparse kernels do not take (the
    all-sparse path raised NotImplementedError): the torch backend's products run with autocast off."""
    gen = torch.Generator().manual_seed(22)
    mask = random_mask((16, 24), 0.2, gen)
    layer = SparseLinear(24, 16, path="sparse", backend="torch", ops=ops, activation="relu")
    layer.set_mask(mask)
    x = torch.randn(8, 24, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = torch.relu(F.linear(x, layer.dense_weight().detach(), layer.bias.detach()))
        assert y.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(y, ref, atol=3e-2, rtol=2e-2)
        y.float().sum().backward()  # a backward inside the autocast region runs under it too (CPU)
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32 and layer.values.grad.shape == (int(mask.sum()),)
    w = layer.dense_weight().detach().requires_grad_(True)
    torch.relu(F.linear(x, w, layer.bias)).sum().backward()
    torch.testing.assert_close(layer.values.grad, w.grad[mask], rtol=2e-2, atol=5e-2)
    layer.values.requires_grad_(False)  # no weight gradient wanted: only the input gradient runs
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_ops_request_is_checked_and_kept_across_masks():
    with pytest.raises(ValueError, match="unknown op"):
        SparseLinear(4, 3, ops={"backward": "dense"})
    with pytest.raises(ValueError, match=r"ops\['forward'\] must be one of"):
        SparseLinear(4, 3, ops={"forward": "cusparse"})
    with pytest.raises(ValueError, match="ops must be"):
        SparseLinear(4, 3, ops=("dense",))
    layer = SparseLinear(6, 5, path="sparse", backend="torch", ops={"input_grad": "dense"})
    gen = torch.Generator().manual_seed(23)
    layer.set_mask(random_mask((5, 6), 0.5, gen))
    assert layer.ops["input_grad"] == "dense" and layer.path_label == "sparse/input_grad:dense"
    assert "path=sparse/input_grad:dense" in repr(layer)
    assert repr(SparseLinear(4, 3, activation="relu")) == \
        "SparseLinear(in_features=4, out_features=3, bias=True, activation=relu, density=1.0000, path=dense)"
    conv = SparseConv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False, padding_mode="reflect",
                        ops={"forward": "dense"})
    conv.set_mask((torch.arange(conv.weight.numel()) % 2 == 0).view(conv.weight_shape), path="sparse")
    assert repr(conv) == ("SparseConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), padding=(2, 2), dilation=(2, 2), "
                          "groups=2, bias=False, padding_mode=reflect, density=0.5000, path=sparse/forward:dense)")
    layer.set_mask(random_mask((5, 6), 0.5, gen), ops="sparse")
    assert set(layer.ops.values()) == {"sparse"} and layer.path_label == "sparse"
    layer.set_mask(layer.weight_mask, path="dense")
    assert set(layer.ops.values()) == {"dense"} and layer.path_label == "dense"
    clone = SparseLinear.from_dense(torch.nn.Linear(6, 5), path="sparse", backend="torch", ops="dense")
    assert set(clone.ops.values()) == {"dense"} and clone.path == "sparse"


def _cost_model(costs):
    """A stand-in for _time_steps: each probe's configuration's cost from ``costs`` (label -> seconds). ``seen``
    gets one list of labels per timed batch."""
    seen = []

    def fake(probes, x, reps, optimizer=None):
        assert all(label == probe.path_label for label, probe in probes.items())
        seen.append(list(probes))
        return {label: costs[label] for label in probes}
    return fake, seen


def test_timed_choice_times_the_input_gradient_only_where_the_network_needs_it(monkeypatch):
    """A network's first layer gets an input that needs no gradient: its timing must not pay for one (the
    sparse and dense input gradients differ most there), while a layer after it must."""
    got = {}

    def fake(probes, x, reps, optimizer=None):
        got[next(iter(probes.values())).in_features] = x.requires_grad
        probe = next(iter(probes.values()))
        with torch.enable_grad():  # as _time_steps: a backward pass works without an input gradient
            probe(x).sum().backward()
        return {label: 1.0 for label in probes}

    monkeypatch.setattr(SparseLinear, "_time_steps", staticmethod(fake))
    gen = torch.Generator().manual_seed(27)
    model = sparsify(nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)),
                     masks={"0": random_mask((8, 12), 0.2, gen), "2": random_mask((4, 8), 0.2, gen)})
    choose_paths(model, torch.randn(5, 12, generator=gen), timed=True)
    assert got == {12: False, 8: True}
    layer = SparseLinear(6, 3, path="sparse")
    layer.set_mask(random_mask((3, 6), 0.5, gen))
    layer._time_paths((2, 6), reps=1)  # a shape the layer has not seen: with the input gradient
    assert got[6] is True
    with torch.no_grad():
        layer(torch.randn(2, 6))  # under no_grad the layer cannot tell: it assumes an input gradient
    layer._time_paths((2, 6), reps=1)
    assert got[6] is True
    layer(torch.randn(2, 6))
    layer._time_paths((2, 6), reps=1)
    assert got[6] is False


def test_timed_choice_combines_the_ops_that_were_faster_dense(monkeypatch):
    gen = torch.Generator().manual_seed(24)
    layer = SparseLinear(20, 10, path="auto", backend="torch")
    layer.set_mask(random_mask((10, 20), 0.2, gen), path="sparse", ops="auto")
    costs = {"dense": 10.0, "sparse": 8.0, "sparse/forward:dense": 9.0, "sparse/input_grad:dense": 7.0,
             "sparse/weight_grad:dense": 6.0, "sparse/input_grad:dense/weight_grad:dense": 5.0}
    fake, seen = _cost_model(costs)
    monkeypatch.setattr(SparseLinear, "_time_steps", staticmethod(fake))
    before = layer.dense_weight().detach().clone()
    assert layer._time_paths((4, 20), reps=1) == ("sparse", (False, True, True))
    # one interleaved batch of dense, all sparse and each single flip; then the combination of the faster flips
    # against the first batch's winner
    assert seen == [["dense", "sparse", "sparse/forward:dense", "sparse/input_grad:dense", "sparse/weight_grad:dense"],
                    ["sparse/input_grad:dense/weight_grad:dense", "sparse/weight_grad:dense"]]
    assert layer.path_timings == costs and layer.ops["forward"] == "sparse"  # the layer itself is untouched
    assert torch.equal(layer.dense_weight().detach(), before)
    # the choice is what an auto set_mask installs
    monkeypatch.setattr(SparseLinear, "_auto_path", lambda self, backend: self._time_paths((4, 20), reps=1))
    layer.set_mask(layer.weight_mask, path="auto")
    assert layer.path_label == "sparse/input_grad:dense/weight_grad:dense"
    grads_vs_reference(layer, torch.randn(4, 20, generator=gen), lambda x, w, b: F.linear(x, w, b))
    # a combination measured slower than its best single flip is not taken; dense wins when it is fastest
    costs["sparse/input_grad:dense/weight_grad:dense"] = 6.5
    layer.set_mask(layer.weight_mask, path="auto")
    assert layer.path_label == "sparse/weight_grad:dense"
    costs["dense"] = 1.0
    layer.set_mask(layer.weight_mask, path="auto")
    assert layer.path == "dense" and layer.path_timings["dense"] == 1.0


def test_timed_choice_decides_the_second_batch_head_to_head(monkeypatch):
    """Figures of two timing batches are not comparable (another moment of the clock): when a second batch runs,
    its two candidates decide. Here the machine got 5 % slower for the second batch: dense won the first batch and
    the second, but a flip's first-batch figure was below dense's second-batch one, and that flip was installed."""
    gen = torch.Generator().manual_seed(26)
    layer = SparseLinear(20, 10, path="auto", backend="torch")
    layer.set_mask(random_mask((10, 20), 0.2, gen), path="sparse", ops="auto")
    first = {"dense": 5.0, "sparse": 8.0, "sparse/forward:dense": 9.0, "sparse/input_grad:dense": 5.1,
             "sparse/weight_grad:dense": 5.2}
    second = {"sparse/input_grad:dense/weight_grad:dense": 5.4, "dense": 5.25}  # both 5 % slower than before
    batches = iter([first, second])
    monkeypatch.setattr(SparseLinear, "_time_steps",
                        staticmethod(lambda probes, x, reps, optimizer=None:
                                     {k: v for k, v in next(batches).items() if k in probes}))
    assert layer._time_paths((4, 20), reps=1) == ("dense", None)


def test_timing_leaves_the_global_rng_and_the_users_hooks_alone():
    """The timing input comes from the timing's own generator (a seeded loop of one's own draws the same numbers
    whether a layer timed its paths or not), and the timed copies run without the layer's hooks (which fired on
    random timing data)."""
    gen = torch.Generator().manual_seed(27)
    layer = SparseLinear(20, 10, path="auto", backend="torch")
    layer.set_mask(random_mask((10, 20), 0.2, gen))
    calls = []
    layer.register_forward_hook(lambda m, i, o: calls.append("forward"))
    layer.register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    layer.time_paths((4, 20), reps=1)
    assert torch.equal(torch.rand(3), expected)
    assert calls == []
    layer(torch.randn(4, 20, requires_grad=True)).sum().backward()
    assert calls == ["forward", "backward"]  # the layer's own hooks are still there


def test_choose_paths_keeps_each_modules_own_training_flag():
    """choose_paths runs the model once in eval mode and then restores each module's flag: a BatchNorm the user
    froze in eval mode inside a training model stays in eval (model.train(True) set it training again)."""
    model = nn.Sequential(SparseLinear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), SparseLinear(6, 3))
    model.train()
    model[1].eval()
    choose_paths(model, torch.randn(4, 8))
    assert model.training and model[0].training and not model[1].training and model[3].training


def test_timed_choice_with_forced_ops_or_no_per_op_choice(monkeypatch):
    gen = torch.Generator().manual_seed(25)
    costs = {"dense": 3.0, "sparse": 2.0, "sparse/forward:dense": 1.0}
    fake, seen = _cost_model(costs)
    monkeypatch.setattr(SparseLinear, "_time_steps", staticmethod(fake))
    monkeypatch.setattr(SparseConv2d, "_time_steps", staticmethod(fake))
    layer = SparseLinear(20, 10, path="sparse", backend="torch", ops={"forward": "dense"})
    layer.set_mask(random_mask((10, 20), 0.2, gen))
    assert layer._time_paths((4, 20), reps=1) == ("sparse", (True, False, False))
    assert seen == [["dense", "sparse/forward:dense"]]
    assert layer.ops["forward"] == "dense"
    seen.clear()
    # a grouped conv's torch sparse path is a scatter and a dense convolution: no per-op choice
    conv = SparseConv2d(4, 4, 3, groups=2, path="sparse", backend="torch")
    conv.set_mask(random_mask(conv.weight_shape, 0.2, gen))
    assert conv._time_paths((2, 4, 6, 6), reps=1) == ("sparse", (False, False, False))
    assert seen == [["dense", "sparse"]]
    costs["dense"] = 0.5
    seen.clear()
    assert conv._time_paths((2, 4, 6, 6), reps=1) == ("dense", None)


class _Logged(nn.Module):
    """A probe for _time_steps that logs each run and costs ``cost`` seconds of busy waiting."""

    def __init__(self, name, log, cost=0.0):
        super().__init__()
        self.name, self.log, self.cost, self.dys = name, log, cost, []

    def forward(self, x):
        self.log.append(self.name)
        end = time.perf_counter() + self.cost
        while time.perf_counter() < end:
            pass
        y = x * 2
        y.register_hook(lambda g: self.dys.append(g))  # the gradient the layer's backward gets
        return y


def test_time_steps_interleaves_the_candidates_and_ranks_them():
    """The real timer: two warm-up rounds and ``reps`` timed rounds, each running every candidate once in a
    changing order (no candidate is timed in one block, nor always after the same neighbour), with each median
    from the timed runs only."""
    log = []
    probes = {n: _Logged(n, log, cost) for n, cost in (("a", 0.004), ("b", 0.0), ("c", 0.002))}
    x = torch.randn(3, requires_grad=True)
    times = SparseLinear._time_steps(probes, x, reps=10)
    assert len(log) == 3 * 12
    rounds = [log[i:i + 3] for i in range(0, len(log), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 2  # the order changes between rounds
    predecessors = {name: {r[r.index(name) - 1] for r in rounds if r.index(name) > 0} for name in "abc"}
    assert all(len(p) == 2 for p in predecessors.values())  # each candidate ran after both others
    assert set(times) == {"a", "b", "c"} and times["a"] >= 0.004 and times["c"] >= 0.002
    assert min(times, key=times.get) == "b" and max(times, key=times.get) == "a"
    # every run did its backward, with one dense random gradient in the output's layout: not the stride-0 tensor
    # of ones ``.sum().backward()`` gives (each gather one address), and nothing accumulated between steps
    dys = [g for p in probes.values() for g in p.dys]
    assert len(dys) == 3 * 12
    assert all(torch.equal(g, dys[0]) for g in dys) and dys[0].stride() == (1,) and len(set(dys[0].tolist())) == 3
    assert torch.equal(x.grad, 2 * dys[0])


class _Stepper:
    """An optimizer stand-in for the timed choice's ``optimizer`` factory: logs its steps (the parameters it got and
    whether their gradients were there) and busy-waits ``cost`` seconds per step."""

    def __init__(self, params, log, cost=0.0):
        self.params, self.log, self.cost = params, log, cost

    def step(self):
        self.log.append([(tuple(p.shape), p.grad is not None) for p in self.params])
        end = time.perf_counter() + self.cost
        while time.perf_counter() < end:
            pass


class _LoggedWithWeight(_Logged):
    def __init__(self, name, log, shape):
        super().__init__(name, log)
        self.weight = nn.Parameter(torch.ones(shape))
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x):
        return super().forward(x) * self.weight.sum()


def test_time_steps_times_each_probes_optimizer_step_after_its_backward():
    """With an ``optimizer`` factory every timed step ends with the step of an optimizer built (once) over that
    probe's trainable parameters, after its backward, inside the timed region: a training step runs the optimizer
    over the live weights on the sparse path and over all of them on the dense path, which a forward+backward
    timing leaves out (and so undervalued a small layer's sparse path)."""
    log, steps, built = [], [], []

    def factory(params):
        built.append(params)
        return _Stepper(params, steps, cost=0.003 if params[0].numel() > 100 else 0.0)

    probes = {"big": _LoggedWithWeight("big", log, (20, 20)), "small": _LoggedWithWeight("small", log, (2, 2))}
    x = torch.randn(3, requires_grad=True)
    times = SparseLinear._time_steps(probes, x, reps=6, optimizer=factory)
    assert len(built) == 2 and sorted(len(ps) for ps in built) == [1, 1]  # one optimizer per probe, frozen left out
    assert {tuple(ps[0].shape) for ps in built} == {(20, 20), (2, 2)}
    assert len(steps) == 2 * 8 and all(s in ([((20, 20), True)], [((2, 2), True)]) for s in steps)
    assert times["big"] >= 0.003 > times["small"]  # the step is timed with its probe
    # without a factory nothing steps (a layer's forward+backward benchmark times just that)
    steps.clear()
    SparseLinear._time_steps(probes, x, reps=1)
    assert steps == []


def test_time_paths_steps_the_probes_own_parameters_and_leaves_the_layer_alone():
    """The optimizer built for each timed configuration holds that configuration's parameters (the compact live
    values on the sparse path, the whole weight on the dense path; the bias on both), never the layer's: the layer's
    weights are unchanged after timing with a real optimizer, and it can still be trained by one built afterwards."""
    gen = torch.Generator().manual_seed(31)
    layer = SparseLinear(20, 10, path="auto", backend="torch", ops="sparse")  # two configurations, one batch
    layer.set_mask(random_mask((10, 20), 0.2, gen))
    before = [t.detach().clone() for t in (layer.dense_weight(), layer.bias)]
    built = []

    def factory(params):
        built.append([tuple(p.shape) for p in params])
        return torch.optim.SGD(params, lr=1.0)

    layer.time_paths((4, 20), reps=1, optimizer=factory)
    assert sorted(built) == [[(10, 20), (10,)], [(layer.nnz,), (10,)]]  # one per configuration timed
    assert torch.equal(layer.dense_weight().detach(), before[0]) and torch.equal(layer.bias.detach(), before[1])
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(4, 20, generator=gen)).sum().backward()
    opt.step()
    assert not torch.equal(layer.bias.detach(), before[1])


def test_choose_paths_hands_the_optimizer_to_every_timed_layer(monkeypatch):
    """``choose_paths(optimizer=)`` reaches each timed layer's timing: with ``timed=True`` on any backend, and on the
    Triton backend (CUDA), where "auto" times by itself; there the choice used to go through ``set_mask``, which
    times without the optimizer."""
    got = []

    def fake(probes, x, reps, optimizer=None):
        got.append((next(iter(probes.values())).in_features, optimizer))
        return {label: (1.0 if label == "dense" else 2.0) for label in probes}

    monkeypatch.setattr(SparseLinear, "_time_steps", staticmethod(fake))

    def factory(params):
        return torch.optim.SGD(params, lr=0.1)

    gen = torch.Generator().manual_seed(32)

    def model():
        return sparsify(nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)),
                        masks={"0": random_mask((8, 12), 0.5, gen), "2": random_mask((4, 8), 0.5, gen)})

    x = torch.randn(5, 12, generator=gen)
    choose_paths(model(), x, timed=True, optimizer=factory)
    assert got == [(12, factory), (8, factory)]
    got.clear()
    m = model()  # a Triton-backend layer (made to look like one: the forward runs its dense path here)
    monkeypatch.setattr(SparseLinear, "backend", property(lambda self: "triton"))
    choose_paths(m, x, optimizer=factory)
    assert got == [(12, factory), (8, factory)]
    assert all(layer.path == "dense" for _, layer in sparse_layers(m))
    with pytest.raises(TypeError, match="factory"):
        choose_paths(m, x, timed=True, optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))


def test_an_optimizer_factory_that_builds_no_optimizer_is_refused():
    layer = SparseLinear(6, 3, path="auto", backend="torch")
    layer.set_mask(random_mask((3, 6), 0.5, torch.Generator().manual_seed(33)))
    with pytest.raises(TypeError, match="no step"):
        layer.time_paths((2, 6), reps=1, optimizer=lambda params: params)
    with pytest.raises(TypeError, match="factory"):
        layer.time_paths((2, 6), reps=1, optimizer="adam")


def test_choose_paths_timed_times_every_auto_layer_on_any_backend():
    gen = torch.Generator().manual_seed(26)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 4))
    sparsify(model, masks={"0": random_mask((16, 20), 0.1, gen), "2": random_mask((4, 16), 0.5, gen)},
             ops={"weight_grad": "dense"})
    model[2].path_request = "dense"  # a forced layer is left as it is
    before = [p.detach().clone() for p in (model[0].dense_weight(), model[2].dense_weight())]
    paths = choose_paths(model, torch.randn(8, 20, generator=gen), timed=True)
    assert set(model[0].path_timings) == {"dense", "sparse/weight_grad:dense"}  # the forced ops: one sparse config
    assert model[2].path_timings == {} and paths["2"] == model[2].path
    assert model[3].path_timings == {} and paths["3"] == "dense"  # every weight live: not timed, dense as auto
    assert paths["0"] == model[0].path and model[0].path_label in model[0].path_timings
    for p, b in zip((model[0].dense_weight(), model[2].dense_weight()), before):
        assert torch.equal(p.detach(), b)
    grads_vs_reference(model[0], torch.randn(3, 20, generator=gen), lambda x, w, b: F.linear(x, w, b))


# ---------------------------------------------------------------------- path labels (checkpoints, command line)
def test_path_labels_and_ops_text_parse_and_refuse_clearly():
    from sparse_lth.layers import parse_ops, parse_path_label
    assert parse_path_label("dense") == ("dense", None)
    assert parse_path_label("sparse") == ("sparse", (False, False, False))
    assert parse_path_label("sparse/input_grad:dense/weight_grad:dense") == ("sparse", (False, True, True))
    for dense_ops in itertools.product((False, True), repeat=3):  # the inverse of the labels the layers write
        assert parse_path_label(_ops_label(dense_ops)) == ("sparse", dense_ops)
    for bad in ("masked", "sparse/backward:dense", "sparse/forward:sparse", "sparse/forward:dense/forward:dense",
                "dense/forward:dense", ""):
        with pytest.raises(ValueError, match="not a path label"):
            parse_path_label(bad)
    assert parse_ops("auto") == "auto" and parse_ops(" dense ") == "dense"
    assert parse_ops("weight_grad=dense, forward=dense") == {"weight_grad": "dense", "forward": "dense"}
    assert parse_ops({"forward": "dense"}) == {"forward": "dense"}
    with pytest.raises(ValueError, match="op=impl pairs"):
        parse_ops("weight_grad:dense")
    with pytest.raises(ValueError, match="unknown op"):
        parse_ops("backward=dense")
    with pytest.raises(ValueError, match=r"ops\['forward'\] must be one of"):
        parse_ops("forward=cusparse")


def test_restore_path_installs_a_recorded_configuration_and_keeps_the_requests():
    gen = torch.Generator().manual_seed(27)
    mask = random_mask((10, 20), 0.3, gen)
    layer = SparseLinear(20, 10, path="auto", backend="torch")
    layer.set_mask(mask)
    before = layer.dense_weight().detach().clone()
    for label in ("sparse/weight_grad:dense", "sparse", "dense", "sparse/forward:dense/input_grad:dense"):
        layer.restore_path(label)
        assert layer.path_label == label and layer.path_request == "auto" and layer.ops_request == "auto"
        assert torch.equal(layer.dense_weight().detach(), before) and torch.equal(layer.weight_mask, mask)
        grads_vs_reference(layer, torch.randn(4, 20, generator=gen), lambda x, w, b: F.linear(x, w, b))
        layer.zero_grad()
    with pytest.raises(ValueError, match="not a path label"):
        layer.restore_path("sparse/everything:dense")


def test_force_paths_puts_a_resumed_model_back_on_the_recorded_ops():
    """A checkpoint records path labels; resuming restores the per-op configuration, not only the path."""
    from sparse_lth.train import force_paths, layer_paths
    gen = torch.Generator().manual_seed(28)
    masks = {"0": random_mask((16, 20), 0.1, gen), "2": random_mask((4, 16), 0.5, gen)}
    a = sparsify(nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4)), masks=masks, path="sparse")
    a[0].restore_path("sparse/weight_grad:dense")
    a[2].restore_path("dense")
    recorded = layer_paths(a)
    assert recorded == {"0": "sparse/weight_grad:dense", "2": "dense"}
    b = sparsify(nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4)), masks=masks, path="sparse")
    assert layer_paths(b) == {"0": "sparse", "2": "sparse"}
    force_paths(b, recorded)
    assert layer_paths(b) == recorded
    force_paths(b, {"0": "sparse", "2": "sparse"})  # the labels older checkpoints hold
    assert layer_paths(b) == {"0": "sparse", "2": "sparse"}


def test_torch_backend_operands_are_transposed_once_and_give_the_same_results():
    """The torch backend reads its dense operands batch-minor (prepare_operand): prepared or not, every op gives
    the same result; preparing is idempotent and leaves a batch-minor tensor (a sparse layer's output) alone."""
    from sparse_lth.kernels import torch_ops
    from sparse_lth.kernels.format import build_format
    gen = torch.Generator().manual_seed(29)
    mask = random_mask((13, 21), 0.3, gen)
    fmt = build_format(mask)
    values = torch.randn(fmt.nnz, generator=gen)
    x, dy = torch.randn(7, 21, generator=gen), torch.randn(7, 13, generator=gen)
    xp, dyp = torch_ops.prepare_operand(x), torch_ops.prepare_operand(dy)
    assert xp.stride() == (1, 7) and torch.equal(xp, x) and torch_ops.prepare_operand(xp) is xp
    one = torch.randn(1, 21, generator=gen)
    assert torch_ops.prepare_operand(one) is one
    y = torch_ops.linear_forward(x, values, fmt)
    assert y.stride(0) == 1 and torch_ops.prepare_operand(y) is y  # outputs come batch-minor
    torch.testing.assert_close(torch_ops.linear_forward(xp, values, fmt), y, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch_ops.linear_backward_input(dyp, values, fmt),
                               torch_ops.linear_backward_input(dy, values, fmt), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch_ops.linear_backward_weight(dyp, xp, fmt),
                               torch_ops.linear_backward_weight(dy, x, fmt), rtol=0, atol=1e-6)
    w = torch.zeros(13, 21)
    w[mask] = values
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_timed_choice_times_with_the_layout_of_the_real_input(monkeypatch):
    """A layer fed batch-minor inputs (a sparse layer's output) is timed on a batch-minor probe input, since its
    sparse path then needs no transpose; a row-major input is timed row-major."""
    strides = []

    def fake(probes, x, reps, optimizer=None):
        strides.append(x.stride())
        return {label: 1.0 for label in probes}
    monkeypatch.setattr(SparseLinear, "_time_steps", staticmethod(fake))
    gen = torch.Generator().manual_seed(30)
    layer = SparseLinear(20, 10, path="auto", backend="torch")
    layer.set_mask(random_mask((10, 20), 0.1, gen))
    layer(torch.randn(20, 6, generator=gen).t())
    layer.time_paths((6, 20))
    layer(torch.randn(6, 20, generator=gen))
    layer.time_paths((6, 20))
    assert strides == [(1, 6), (20, 1)]


def test_an_evaluation_does_not_change_the_input_the_path_timing_uses():
    """The timed choice times the last training input a layer saw: an evaluation after it (no grad, another
    batch size, a first layer's input that needs no gradient either way) leaves it; with nothing seen before,
    an evaluation's shape is used."""
    model = sparsify(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))
    model(torch.randn(8, 6))
    seen = [(m._last_input_shape, m._last_input_requires_grad) for _, m in sparse_layers(model)]
    assert seen == [((8, 6), False), ((8, 5), True)]
    with torch.no_grad():
        model(torch.randn(100, 6))
    assert [(m._last_input_shape, m._last_input_requires_grad) for _, m in sparse_layers(model)] == seen
    fresh = sparsify(nn.Linear(6, 5))
    with torch.no_grad():
        fresh(torch.randn(100, 6))
    assert fresh._last_input_shape == (100, 6)


class _Layout(nn.Module):
    """A probe whose output is row-major or column-major; it records the gradient its output gets."""

    def __init__(self, column_major):
        super().__init__()
        self.column_major, self.dys = column_major, []

    def forward(self, x):
        y = (x.t().contiguous().t() if self.column_major else x.contiguous()) * 2
        y.register_hook(lambda g: self.dys.append(g))
        return y


def test_time_steps_gives_each_probe_dy_in_its_own_output_layout():
    probes = {"rows": _Layout(False), "cols": _Layout(True)}
    x = torch.randn(5, 3, requires_grad=True)
    SparseLinear._time_steps(probes, x, reps=2)
    rows, cols = probes["rows"].dys, probes["cols"].dys
    assert rows[0].stride() == (3, 1) and cols[0].stride() == (1, 5)
    assert torch.equal(rows[0], cols[0])  # the same values


def test_load_state_dict_refuses_a_bias_of_another_shape():
    layer = SparseLinear(4, 3)
    for shape in ((1,), (5,)):
        sd = {"weight": torch.zeros(3, 4), "bias": torch.zeros(shape), "weight_mask": torch.ones(3, 4, dtype=bool)}
        with pytest.raises(RuntimeError, match=r"size mismatch for bias: copying a param with shape"):
            layer.load_state_dict(sd)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_weight_averaging_over_buffers_leaves_the_index_structures(path):
    """AveragedModel(use_buffers=True), torch's EMA for models with batch norm, averages every buffer: the sparse
    path's integer index structures are not buffers, so an EMA of an unchanged model is the model."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    gen = torch.Generator().manual_seed(9)
    layer = SparseLinear(16, 8, mask=random_mask((8, 16), 0.1, gen), path=path)
    ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(3):
        ema.update_parameters(layer)
    x = torch.randn(3, 16, generator=gen)
    torch.testing.assert_close(ema(x), layer(x))
    assert torch.equal(ema.module.dense_weight(), layer.dense_weight())
    assert {n for n, _ in layer.named_buffers()} == {"weight_mask"}  # (the gradient bits: not a buffer)


@pytest.mark.parametrize("swap", ["sparsify", "densify"])
def test_an_optimizer_built_before_sparsify_or_densify_is_warned(swap):
    """The layers sparsify / densify swap out might still be used elsewhere on purpose, so an optimizer holding
    their parameters is warned (once), not refused; a parameter the model still reaches (tied) is not warned."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    if swap == "densify":
        sparsify(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (sparsify if swap == "sparsify" else densify)(model)
    model(torch.randn(2, 4)).sum().backward()
    with pytest.warns(UserWarning, match="build the optimizer after sparsify/densify"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once per optimizer
        torch.optim.SGD(model.parameters(), lr=0.1).step()  # built afterwards: silent


def test_sparsify_takes_a_mask_under_the_second_name_of_a_shared_container():
    gen = torch.Generator().manual_seed(12)
    block = nn.Sequential(nn.Linear(4, 4))
    model = nn.Module()
    model.a, model.b = block, block
    mask = random_mask((4, 4), 0.5, gen)
    sparsify(model, masks={"b.0": mask})
    assert model.a[0] is model.b[0] and torch.equal(model.a[0].weight_mask, mask)
    other = nn.Module()
    other.a = other.b = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="b.0 is the same layer as a.0, with another mask"):
        sparsify(other, masks={"a.0": mask, "b.0": ~mask})


def test_sparsify_refuses_a_third_name_with_another_mask():
    gen = torch.Generator().manual_seed(10)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU(), lin)
    mask = random_mask((4, 4), 0.5, gen)
    with pytest.raises(ValueError, match="4 is the same layer as 0, with another mask"):
        sparsify(model, masks={"2": mask, "4": ~mask})


def test_the_format_is_built_once_per_mask_and_follows_every_replacement_of_the_index():
    """``layer.fmt`` is cached (every sparse forward reads it): the same object until the index structures are
    replaced (a new mask, a device or dtype move, a copy), then one built from the new ones."""
    gen = torch.Generator().manual_seed(41)
    layer = SparseLinear(30, 20, path="sparse", backend="torch")
    layer.set_mask(random_mask((20, 30), 0.3, gen))
    f = layer.fmt
    assert layer.fmt is f and f.row_ptr is layer._fmt_row_ptr and f.nnz == layer.nnz
    layer.set_mask(random_mask((20, 30), 0.1, gen))
    g = layer.fmt
    assert g is not f and g.nnz == layer.nnz and g.row_ptr is layer._fmt_row_ptr
    assert torch.equal(g.col_idx, layer._fmt_col_idx)
    twin = copy.deepcopy(layer)
    assert twin.fmt.row_ptr is twin._fmt_row_ptr and twin.fmt.row_ptr is not layer._fmt_row_ptr
    layer.double()
    assert layer.fmt is not g and layer.fmt.row_ptr is layer._fmt_row_ptr
    x = torch.randn(5, 30, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.set_mask(torch.ones(20, 30), path="dense")
    assert "_fmt_cache" not in layer.__dict__  # the dense path keeps no index, cached or not
    assert not hasattr(layer, "fmt")
    with pytest.raises(AttributeError, match="is on the dense path: it has no sparse format"):
        layer.fmt


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_module_type_casts_the_weights_not_the_index_structures(kind):
    """``Module.type(dtype)`` casts every tensor of a plain module, integer and bool ones too (``.to``, ``.half``,
    ``.double`` leave them alone): a sparse layer's index structures and masks keep their dtype under it, so the
    layer computes what ``.to(dtype)`` gives (an fp64 or fp16 column index would read other weights: above 2048
    fp16 rounds it)."""
    gen = torch.Generator().manual_seed(5)
    if kind == "linear":
        layer, shape, x = SparseLinear(2100, 8, path="sparse", backend="torch"), (8, 2100), torch.randn(3, 2100)
    else:
        layer, shape, x = SparseConv2d(4, 6, 3, padding=1, path="sparse", backend="torch"), (6, 4, 3, 3), \
            torch.randn(2, 4, 5, 5)
    layer.set_mask(random_mask(shape, 0.5, gen))
    ref = copy.deepcopy(layer).to(torch.float64)
    layer.type(torch.float64)
    index = {k: v for k, v in layer.__dict__.items() if k.startswith("_fmt_") and isinstance(v, torch.Tensor)}
    assert index and not any(v.is_floating_point() for v in index.values()), {k: v.dtype for k, v in index.items()}
    assert layer.weight_mask.dtype == torch.bool and layer.values.dtype == torch.float64
    torch.testing.assert_close(layer(x.double()), ref(x.double()), rtol=0, atol=0)
    layer.set_mask(random_mask(shape, 0.25, gen))  # the mask still takes a new mask
    assert layer.weight_mask.dtype == torch.bool


def test_a_module_pickled_with_index_buffers_loads_them_as_attributes():
    """Modules saved when the index structures were buffers: unpickled, they are plain attributes again (so an
    EMA over buffers leaves them alone), and the layer computes the same."""
    import pickle
    gen = torch.Generator().manual_seed(11)
    layer = SparseLinear(8, 4, mask=random_mask((4, 8), 0.3, gen), path="sparse")
    x = torch.randn(2, 8, generator=gen)
    old = copy.deepcopy(layer)
    for name in ("_fmt_row_ptr", "_flat_index"):  # as the older version held them
        old._buffers[name] = old.__dict__.pop(name)
    back = pickle.loads(pickle.dumps(old))
    assert "_flat_index" not in back._buffers and "_flat_index" in back.__dict__
    torch.testing.assert_close(back(x), layer(x))


def test_a_dense_path_layer_pickled_with_a_float_gradient_mask_masks_with_bits_after_loading():
    """Modules pickled before the gradient mask became bits hold a weight-dtype 0/1 copy: unpickled, the hook
    makes the bits again (an AND on a float mask's bits would not be a mask)."""
    import pickle
    layer = SparseLinear(6, 4, path="dense")
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    layer.set_mask(mask, path="dense")
    layer._buffers["_grad_mask"] = mask.float()  # as saved by an earlier version: a float buffer
    del layer.__dict__["_grad_mask"]
    again = pickle.loads(pickle.dumps(layer))
    assert "_grad_mask" not in again._buffers
    assert again._grad_mask.dtype == torch.int32 and torch.equal(again._grad_mask, -mask.int())
    again(torch.randn(3, 6)).square().sum().backward()
    g = again.weight.grad
    assert (g[~mask] == 0).all() and (g[mask] != 0).all()


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_assigning_weight_mask_is_refused_and_sparsify_names_layers_already_sparse(path):
    """`layer.weight_mask = m` (as torch.nn.utils.prune's masks are set) changed the buffer while the live count,
    the index structures, the gradient mask and the parameters kept the old mask: refused, naming set_mask.
    sparsify(model, masks) on a model already sparsified said the layers were "not Linear/Conv2d layers"."""
    gen = torch.Generator().manual_seed(0)
    layer = SparseLinear(10, 8, path=path)
    old = layer.weight_mask.clone()
    with pytest.raises(AttributeError, match=r"weight_mask is set by set_mask\(mask\)"):
        layer.weight_mask = torch.rand(8, 10, generator=gen) < 0.5
    assert torch.equal(layer.weight_mask, old)
    new = torch.rand(8, 10, generator=gen) < 0.5
    layer.set_mask(new, path=path)  # the way, which the refusal does not block
    assert torch.equal(layer.weight_mask, new) and layer.nnz == int(new.sum())
    model = sparsify(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2)), path=path)
    with pytest.raises(ValueError, match=r"\['0'\] are sparse layers already: set their masks with "
                                         r"layer.set_mask\(mask\), or sparse_lth.imp.apply_masks"):
        sparsify(model, {"0": new})
    with pytest.raises(KeyError, match=r"not Linear/Conv2d layers: \['1'\]"):
        sparsify(model, {"1": new})


def test_a_conv_with_numpy_integer_geometry_runs_on_the_sparse_path():
    """nn.Conv2d keeps numpy integers as given (a config read with numpy): its ops and the dense path take them,
    and the sparse path's geometry checks refused them at the first forward ("kernel_size must be an int or a
    pair of ints, got (np.int64(3), np.int64(3))"), also when the automatic choice picked it."""
    import numpy as np
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(np.int64(4), np.int64(3), np.int64(3), stride=np.int64(2), padding=np.int64(1),
                     dilation=(np.int32(1), np.int64(1)))
    mask = torch.rand(3, 4, 3, 3, generator=gen) < 0.3
    x = torch.randn(2, 4, 9, 8, generator=gen)
    want = F.conv2d(x, conv.weight * mask, conv.bias, 2, 1)
    for path in ("dense", "sparse"):
        layer = SparseConv2d.from_dense(conv, mask, path=path)
        assert type(layer.kernel_size[0]) is int and type(layer.in_channels) is int
        torch.testing.assert_close(layer(x), want)
    layer = SparseConv2d(np.int64(4), np.int64(3), np.int64(3), mask=mask, path="sparse")
    assert layer(x).shape == (2, 3, 7, 6)


def test_the_conv_sparse_path_keeps_a_channels_last_layout():
    """A channels_last model: nn.Conv2d and the dense path give channels_last outputs, and the CPU sparse path gave
    NCHW ones, so the layout flipped from layer to layer with each layer's path (a copy downstream)."""
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    mask = torch.rand(6, 4, 3, 3, generator=gen) < 0.3
    x = torch.randn(2, 4, 5, 7, generator=gen).to(memory_format=torch.channels_last)
    for path in ("dense", "sparse"):
        layer = SparseConv2d.from_dense(conv, mask, path=path)
        y = layer(x)
        assert y.is_contiguous(memory_format=torch.channels_last), path
        torch.testing.assert_close(y, F.conv2d(x, conv.weight * mask, conv.bias, 1, 1))


def test_torch_compile_runs_the_cpu_sparse_conv_eagerly_in_one_piece():
    """Traced by dynamo, the CPU sparse conv's loop over kernel taps made a graph per tap (38 frames captured, 14
    graphs for one 3x3 layer; more than 8 live taps hit dynamo's recompile limit) and ran slower than eager. It
    is kept out of the graph now: one graph, the same values and gradients."""
    from torch._dynamo.utils import counters
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    mask = torch.rand(16, 16, 3, 3, generator=gen) < 0.1
    layer = SparseConv2d.from_dense(conv, mask, path="sparse", backend="torch")
    x = torch.randn(2, 16, 6, 6, generator=gen, requires_grad=True)
    layer(x)  # (the index structures, built once per mask)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend="eager")
    for _ in range(3):
        y = compiled(x)
        y.square().sum().backward()
    assert counters["stats"]["unique_graphs"] == 1 and counters["stats"]["calls_captured"] == 1
    xr = x.detach().clone().requires_grad_()
    want = F.conv2d(xr, conv.weight * mask, conv.bias, 1, 1)
    torch.testing.assert_close(y, want)
    want.square().sum().backward()
    torch.testing.assert_close(x.grad / 3, xr.grad)
    torch._dynamo.reset()


def test_the_torch_backends_linear_ops_refuse_what_the_kernels_refuse():
    """kernels.torch_ops is public: an integer input came back as integers, a (1,) or (B, rows) bias broadcast, an
    integer out_dtype was taken, and a mask given as the format raised AttributeError."""
    from sparse_lth.kernels import torch_ops
    from sparse_lth.kernels.format import build_format
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(5, 7, generator=gen) < 0.5
    fmt = build_format(mask)
    v, x, dy = torch.randn(fmt.nnz, generator=gen), torch.randn(3, 7, generator=gen), torch.randn(3, 5, generator=gen)
    with pytest.raises(TypeError, match="x must be a floating tensor, got torch.int64"):
        torch_ops.linear_forward(x.long(), v, fmt)
    with pytest.raises(TypeError, match="dtypes must match: x torch.float64, values torch.float32"):
        torch_ops.linear_forward(x.double(), v, fmt)
    for b in (torch.zeros(1), torch.zeros(3, 5)):
        with pytest.raises(ValueError, match=r"bias must be \(5,\)"):
            torch_ops.linear_forward(x, v, fmt, b)
    with pytest.raises(TypeError, match="out_dtype must be a floating dtype"):
        torch_ops.linear_backward_weight(dy, x, fmt, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="dtypes must match: dy torch.float32, x torch.float64"):
        torch_ops.linear_backward_weight(dy, x.double(), fmt)
    with pytest.raises(TypeError, match="fmt must be a SparseFormat"):
        torch_ops.linear_forward(x, v, mask)
    w = torch.zeros(5, 7).index_put_((fmt.row_idx.long(), fmt.col_idx.long()), v)
    torch.testing.assert_close(torch_ops.linear_forward(x, v, fmt, torch.ones(5)), x @ w.t() + 1)


def _mask_of_count(shape, live, seed=0):
    n = 1
    for s in shape:
        n *= s
    m = torch.zeros(n, dtype=torch.bool)
    m[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:live]] = True
    return m.view(shape)


def test_the_cpu_linear_rule_takes_the_live_count_nearest_ten_percent():
    """the rule is "the live count nearest 10 %": 410 of 4096 (10.01 %) is in, 411 out; and 8 % is sparse
    (L3: the measured CPU linear crossover is 10 %, not 5 %)."""
    lin = SparseLinear(64, 64)
    lin.set_mask(_mask_of_count((64, 64), 410))
    assert lin.path == "sparse"
    lin.set_mask(_mask_of_count((64, 64), 411))
    assert lin.path == "dense"
    lin = SparseLinear(100, 100)
    lin.set_mask(_mask_of_count((100, 100), 800))
    assert lin.path == "sparse"


def test_restoring_the_path_a_layer_is_on_keeps_its_parameters():
    """restoring the configuration a layer is on already replaces nothing (an optimizer built before still
    steps the layer's parameters)."""
    gen = torch.Generator().manual_seed(3)
    layer = SparseLinear(20, 10, path="sparse")
    layer.set_mask(torch.rand(10, 20, generator=gen) < 0.3)
    params = list(layer.parameters())
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.restore_path(layer.path_label)
    assert [id(p) for p in layer.parameters()] == [id(p) for p in params]
    layer(torch.randn(3, 20)).sum().backward()
    opt.step()  # raised on the mutant: the parameters were retired


def test_timing_a_shape_not_seen_times_the_input_gradient(monkeypatch):
    """a layer that saw an input needing no gradient, timed for another shape, times the input gradient."""
    got = []

    def fake(probes, x, reps, optimizer=None):
        got.append(x.requires_grad)
        return {label: 1.0 for label in probes}

    monkeypatch.setattr(SparseLinear, "_time_steps", staticmethod(fake))
    layer = SparseLinear(6, 3, path="sparse")
    layer.set_mask(_mask_of_count((3, 6), 9))
    layer(torch.randn(2, 6))  # grad on, input needs none
    layer._time_paths((2, 6), reps=1)
    assert got[-1] is False
    layer._time_paths((5, 6), reps=1)  # not the shape seen: unknown, so with the input gradient
    assert got[-1] is True


def test_a_single_faster_op_flip_needs_no_second_timing_batch(monkeypatch):
    """with one flip faster than all-sparse there is nothing to combine: one batch decides."""
    costs = {"dense": 10.0, "sparse": 8.0, "sparse/forward:dense": 9.0, "sparse/input_grad:dense": 8.5,
             "sparse/weight_grad:dense": 6.0}
    calls = []

    def fake(probes, x, reps, optimizer=None):
        calls.append(list(probes))
        return {label: costs[label] for label in probes}

    monkeypatch.setattr(SparseLinear, "_time_steps", staticmethod(fake))
    layer = SparseLinear(20, 10, path="sparse")
    layer.set_mask(_mask_of_count((10, 20), 40))
    assert layer._time_paths((4, 20), reps=1) == ("sparse", (False, False, True))
    assert len(calls) == 1


def test_loading_a_state_dict_with_the_same_mask_keeps_the_parameters_and_the_path():
    """load_state_dict with the layer's own mask writes the weights in place: the parameters (and an
    optimizer over them) and the recorded per-op configuration stay."""
    gen = torch.Generator().manual_seed(5)
    layer = SparseLinear(20, 10, path="auto", backend="torch")
    layer.set_mask(torch.rand(10, 20, generator=gen) < 0.3)
    layer.restore_path("sparse/weight_grad:dense")
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    sd["weight"] = sd["weight"] * 2
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.load_state_dict(sd)
    assert layer.path_label == "sparse/weight_grad:dense"
    torch.testing.assert_close(layer.dense_weight().detach(), sd["weight"])
    layer(torch.randn(3, 20)).sum().backward()
    opt.step()


def test_a_bias_free_layer_strictly_refuses_a_bias():
    """strict loading reports a bias the layer does not have, as nn.Linear does."""
    sd = nn.Linear(5, 3).state_dict()
    for path in ("dense", "sparse"):
        layer = SparseLinear(5, 3, bias=False, path=path)
        with pytest.raises(RuntimeError, match="Unexpected key.*bias"):
            layer.load_state_dict(sd)
        layer.load_state_dict(sd, strict=False)  # (not strict: fine)


def test_a_strided_padded_conv_whose_last_rows_lie_beyond_the_grid():
    """the input rows that lie in the grid are counted from the padding: k3 s3 p1 on 3x3 reads rows 0-1."""
    torch.manual_seed(0)
    ref = nn.Conv2d(4, 5, 3, stride=3, padding=1).double()
    layer = SparseConv2d.from_dense(ref, torch.ones(5, 4, 3, 3, dtype=torch.bool), path="sparse", backend="torch")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, ref(x))
    gx = torch.autograd.grad(y.sum(), x)[0]
    x2 = x.detach().requires_grad_()
    torch.testing.assert_close(gx, torch.autograd.grad(ref(x2).sum(), x2)[0])


def test_an_input_contiguous_in_both_layouts_gets_nn_conv2ds_output_layout():
    """One channel or 1x1 pixels: is_contiguous() holds for both layouts, and nn.Conv2d goes by the strides
    (suggest_memory_format): an NCHW-strided input gives a contiguous output, a channels_last-strided one a
    channels_last output (the sparse path gave channels_last for the first, then NCHW for the second)."""
    torch.manual_seed(0)
    for c_in, hw, pad in ((1, 3, 0), (1, 4, 1), (3, 1, 1)):
        ref = nn.Conv2d(c_in, 4, 3 if pad else 1, padding=pad)
        mask = torch.ones(ref.weight.shape, dtype=torch.bool)
        layer = SparseConv2d.from_dense(ref, mask, path="sparse", backend="torch")
        x = torch.randn(2, c_in, hw, hw)
        for t in (x, x.to(memory_format=torch.channels_last)):
            assert t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
            y, want = layer(t), ref(t)
            assert y.stride() == want.stride(), (c_in, hw, t.stride())
            torch.testing.assert_close(y, want)


def test_a_dense_path_weight_whose_data_changed_dtype_still_masks_its_gradient():
    """the gradient mask follows the weight's width when the weight's data was swapped (``.data``), which
    _apply does not see."""
    gen = torch.Generator().manual_seed(1)
    layer = SparseLinear(6, 4, path="dense")
    mask = torch.rand(4, 6, generator=gen) < 0.5
    layer.set_mask(mask)
    layer.weight.data = layer.weight.data.double()
    layer.bias.data = layer.bias.data.double()
    layer(torch.randn(3, 6, dtype=torch.float64)).pow(2).sum().backward()
    g = layer.weight.grad
    assert g.dtype == torch.float64 and torch.all(g[~mask] == 0) and g[mask].abs().sum() > 0


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_nn_data_parallel_replicas_are_refused_clearly(path):
    """nn.DataParallel on several GPUs replicates a module by setting its parameters and buffers as attributes of
    a replica (``_replicate_for_data_parallel``, then setattr): the layers' paths read their own parameters, and
    the replica's forward failed with KeyError 'weight'. Replication now stops at once, naming DDP."""
    layer = SparseLinear(8, 4, path=path)
    layer.set_mask(torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) < 0.5, path=path)
    replica = layer._replicate_for_data_parallel()
    name = "weight" if path == "dense" else "values"
    with pytest.raises(RuntimeError, match="does not run under nn.DataParallel on several GPUs .* "
                                           "DistributedDataParallel"):
        setattr(replica, name, getattr(layer, name).detach().clone())
    wrapped = nn.DataParallel(layer)  # on the CPU (or one GPU) DataParallel calls the module itself: fine
    assert wrapped(torch.randn(3, 8)).shape == (3, 4)


@pytest.mark.parametrize("path,ops", [("dense", None), ("sparse", "dense"), ("sparse", None)])
def test_conv_1x1_strided_channels_last_weight_gradient(path, ops):
    """A 1x1 stride-2 layer on a channels_last input with 3 channels: oneDNN's AVX2 backward-weights kernel for it
    writes past its workspace (uxlfoundation/oneDNN#6035; torch 2.14.1 gave a wrong weight gradient in ~25 % of
    calls on an AVX2 host, and aborted the process at one thread). The layer hands it an NCHW copy of its input
    (the output stays channels_last, as nn.Conv2d's): the weight gradient matches F.conv2d's in float64 every time."""
    from sparse_lth.kernels.torch_conv import onednn_safe_input
    gen = torch.Generator().manual_seed(5)
    for _ in range(40):
        layer = SparseConv2d(3, 5, 1, stride=2, path=path, backend="torch", **({"ops": ops} if ops else {}))
        layer.set_mask(random_mask(layer.weight_shape, 0.7, gen))
        x = torch.randn(2, 8, 8, 3, generator=gen).permute(0, 3, 1, 2)
        y = layer(x.requires_grad_())
        assert y.is_contiguous(memory_format=torch.channels_last)
        layer.zero_grad()
        grads_vs_reference(layer, x, lambda x, w, b: F.conv2d(x, w, b, 2))
    x = torch.randn(2, 8, 8, 3).permute(0, 3, 1, 2)
    assert onednn_safe_input(x, (1, 1), (2, 2)).is_contiguous()
    for k, s in (((3, 3), (2, 2)), ((1, 1), (1, 1))):  # only the 1x1 strided case is copied
        assert onednn_safe_input(x, k, s) is x
    c = x.contiguous()
    assert onednn_safe_input(c, (1, 1), (2, 1)) is c
