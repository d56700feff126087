"""The layers' sparse path on the Triton kernels (compiled on a GPU, interpreted on the CPU): the autograd
Functions against the dense reference, forward and both gradients, and a few optimizer steps."""
import pytest
import torch
import torch.nn.functional as F

from sparse_lth.layers import SparseConv2d, SparseLinear

from test_layers import check_empty_batch, grads_vs_reference, in_place_after_layer_matches_out_of_place, random_mask


@pytest.fixture
def backend(kernel_device):
    return "triton" if kernel_device.type == "cuda" else "interpret"


@pytest.mark.parametrize("density", [0.0, 0.1, 0.6])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_sparse_linear_on_triton(kernel_device, backend, density, activation):
    gen = torch.Generator().manual_seed(11)
    layer = SparseLinear(37, 19, path="sparse", backend=backend, device=kernel_device, activation=activation)
    layer.set_mask(random_mask((19, 37), density, gen))
    assert layer.backend == backend and layer.path == "sparse"
    x = torch.randn(3, 5, 37).to(kernel_device)  # 3-D input: flattened to (15, 37) inside
    ref = (lambda x, w, b: torch.relu(F.linear(x, w, b))) if activation else (lambda x, w, b: F.linear(x, w, b))
    grads_vs_reference(layer, x, ref)


@pytest.mark.parametrize("case", [(3, 5, 3, 1, 1, 1, 0.3), (2, 4, 3, 2, 0, 2, 0.6), (4, 3, 1, 1, 0, 1, 0.0)])
def test_sparse_conv_on_triton(kernel_device, backend, case):
    cin, cout, k, s, p, d, density = case
    gen = torch.Generator().manual_seed(12)
    layer = SparseConv2d(cin, cout, k, stride=s, padding=p, dilation=d, path="sparse", backend=backend,
                         device=kernel_device)
    layer = layer.to(kernel_device)
    layer.set_mask(random_mask(layer.weight_shape, density, gen))
    x = torch.randn(2, cin, 7, 9).to(kernel_device)
    grads_vs_reference(layer, x, lambda x, w, b: F.conv2d(x, w, b, s, p, d))


def test_in_place_op_after_a_layer_on_triton(kernel_device, backend):
    gen = torch.Generator().manual_seed(14)
    lin = SparseLinear(16, 9, path="sparse", backend=backend, device=kernel_device).to(kernel_device)
    lin.set_mask(random_mask((9, 16), 0.3, gen))
    conv = SparseConv2d(3, 5, 3, padding=1, path="sparse", backend=backend, device=kernel_device).to(kernel_device)
    conv.set_mask(random_mask(conv.weight_shape, 0.3, gen))
    for layer, x in ((lin, torch.randn(4, 16)), (lin, torch.randn(2, 3, 16)), (conv, torch.randn(2, 3, 6, 5))):
        assert layer.backend == backend and layer.path == "sparse"
        in_place_after_layer_matches_out_of_place(layer, x.to(kernel_device))


def test_empty_batch_on_triton(kernel_device, backend):
    gen = torch.Generator().manual_seed(13)
    for layer, shape in ((SparseLinear(12, 7, backend=backend, device=kernel_device), (0, 12)),
                         (SparseConv2d(4, 8, 3, padding=1, backend=backend, device=kernel_device), (0, 4, 7, 9))):
        layer = layer.to(kernel_device)
        layer.set_mask(random_mask(layer.weight_shape, 0.3, gen), path="sparse")
        assert layer.backend == backend
        check_empty_batch(layer, shape)


def test_triton_training_steps_match_torch_backend(kernel_device, backend):
    gen = torch.Generator().manual_seed(13)
    mask = random_mask((8, 12), 0.3, gen)
    a = SparseLinear(12, 8, path="sparse", backend=backend, device=kernel_device).to(kernel_device)
    b = SparseLinear(12, 8, path="sparse", backend="torch").to(kernel_device)
    b.load_state_dict(a.state_dict())
    for layer in (a, b):
        layer.set_mask(mask.to(kernel_device), path="sparse")
    b.load_state_dict(a.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (a, b)]
    for step in range(5):
        x = torch.randn(6, 12, generator=gen).to(kernel_device)
        for m, o in zip((a, b), opts):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
            o.step()
    torch.testing.assert_close(a.dense_weight(), b.dense_weight(), rtol=1e-5, atol=1e-6)
    assert torch.all(a.dense_weight()[~a.weight_mask] == 0)


class _Counter:
    """Counts calls of a module function while delegating to it."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _lenet_like(backend, device, density, gen):
    """LeNet-300-100 shaped (smaller hidden widths for the interpreter): 784 -> 60 -> 20 -> 10, sparse layers."""
    layers = [SparseLinear(784, 60, path="sparse", backend=backend, device=device, activation="relu"),
              SparseLinear(60, 20, path="sparse", backend=backend, device=device, activation="relu"),
              SparseLinear(20, 10, path="sparse", backend=backend, device=device)]
    for layer in layers:
        layer.set_mask(random_mask((layer.out_features, layer.in_features), density, gen))
    return torch.nn.Sequential(torch.nn.Flatten(), *layers).to(device)


@pytest.mark.parametrize("small", [True, False])
def test_sparse_linear_launches_and_layout_copies(kernel_device, backend, monkeypatch, small):
    """One kernel launch per layer in the forward pass, the first layer's row-major input included (read in place
    when small); when operands are too large for that, each row-major operand is copied once per step (the input in
    the forward, reused by the weight gradient; the loss gradient once for both gradients), never once per op."""
    from sparse_lth.kernels import sparse_linear as K

    if not small:  # every row-major operand must be copied batch-minor
        monkeypatch.setattr(K, "IN_PLACE_MAX_BYTES", 0)
    launches, copies = _Counter(K._launch_spmm), _Counter(K._batch_minor_copy)
    monkeypatch.setattr(K, "_launch_spmm", launches)
    monkeypatch.setattr(K, "_batch_minor_copy", copies)
    gen = torch.Generator().manual_seed(21)
    model = _lenet_like(backend, kernel_device, 0.05, gen)
    x = torch.randn(60, 1, 28, 28, generator=gen).to(kernel_device)     # row-major, as a data loader gives it
    target = torch.randint(0, 10, (60,), generator=gen).to(kernel_device)
    out = model(x)
    assert launches.calls == 3, "forward: one launch per layer"
    assert copies.calls == (0 if small else 1)
    torch.nn.functional.cross_entropy(out, target).backward()            # its gradient is row-major (60, 10)
    assert launches.calls == 3 + 2, "backward: input gradients of layers 3 and 2 (layer 1's input needs none)"
    assert copies.calls == (0 if small else 2), "backward: only the loss gradient is copied, once"
    # and the result is right either way
    ref = torch.nn.Sequential(torch.nn.Flatten(), *[torch.nn.Linear(m.in_features, m.out_features)
                                                    for m in model[1:]]).to(kernel_device)
    for r, m in zip(ref[1:], model[1:]):
        r.weight.data.copy_(m.dense_weight())
        r.bias.data.copy_(m.bias)
    h = x.flatten(1)
    for i, r in enumerate(ref[1:]):
        h = r(h)
        if i < 2:
            h = torch.relu(h)
    torch.testing.assert_close(out, h, rtol=1e-4, atol=1e-5)


PER_OP = [{"forward": "dense"}, {"input_grad": "dense"}, {"weight_grad": "dense"},
          {"input_grad": "dense", "weight_grad": "dense"}, "dense"]


@pytest.mark.parametrize("ops", PER_OP, ids=str)
def test_sparse_linear_on_triton_with_dense_ops(kernel_device, backend, ops):
    """Ops flipped to dense (cuBLAS on the scattered values) beside the Triton ops of the same layer."""
    gen = torch.Generator().manual_seed(14)
    layer = SparseLinear(37, 19, path="sparse", backend=backend, device=kernel_device, activation="relu", ops=ops)
    layer.set_mask(random_mask((19, 37), 0.2, gen))
    assert layer.path == "sparse" and "dense" in layer.ops.values()
    grads_vs_reference(layer, torch.randn(3, 5, 37).to(kernel_device), lambda x, w, b: torch.relu(F.linear(x, w, b)))


@pytest.mark.parametrize("ops", PER_OP, ids=str)
def test_sparse_conv_on_triton_with_dense_ops(kernel_device, backend, ops):
    gen = torch.Generator().manual_seed(15)
    layer = SparseConv2d(3, 5, 3, stride=2, padding=1, dilation=1, path="sparse", backend=backend,
                         device=kernel_device, ops=ops)
    layer = layer.to(kernel_device)
    layer.set_mask(random_mask(layer.weight_shape, 0.3, gen))
    assert layer.path == "sparse" and "dense" in layer.ops.values()
    grads_vs_reference(layer, torch.randn(2, 3, 7, 9).to(kernel_device), lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1))


def test_timed_choice_on_triton_times_each_op_both_ways(kernel_device, backend):
    """The real timing (as auto runs it on CUDA) on every configuration of a conv layer on the Triton path; the
    kept configuration is the fastest measured, and it computes the same gradients."""
    gen = torch.Generator().manual_seed(16)
    layer = SparseConv2d(3, 4, 3, padding=1, path="sparse", backend=backend, device=kernel_device).to(kernel_device)
    layer.set_mask(random_mask(layer.weight_shape, 0.2, gen))
    path, dense_ops = layer._time_paths((2, 3, 6, 6), reps=1)
    t = layer.path_timings
    assert {"dense", "sparse", "sparse/forward:dense", "sparse/input_grad:dense", "sparse/weight_grad:dense"} <= set(t)
    best = min(t, key=t.get)
    assert path == ("dense" if best == "dense" else "sparse")
    layer._install(layer.dense_weight().detach().clone(), path, dense_ops)
    assert layer.path_label == best
    grads_vs_reference(layer, torch.randn(2, 3, 6, 6).to(kernel_device), lambda x, w, b: F.conv2d(x, w, b, 1, 1))


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_padding_mode_conv_forced_sparse_then_moved_to_triton(kernel_device, backend, mode, monkeypatch):
    """A conv the Triton kernels cannot run (padding_mode other than zeros), forced onto the torch backend's sparse
    path, whose backend then becomes Triton (``.cuda()`` under ``backend=None``; on the CPU, $SPARSE_LTH_BACKEND):
    it keeps computing its padding mode (a dense conv of the scattered live weights); the kernels, which
    zero-pad, gave wrong outputs before."""
    gen = torch.Generator().manual_seed(13)
    layer = SparseConv2d(3, 4, 3, padding=1, padding_mode=mode, path="sparse")
    layer.set_mask(random_mask(layer.weight_shape, 0.5, gen))
    assert layer.backend == "torch" and layer.path == "sparse"
    if kernel_device.type == "cuda":
        layer = layer.to(kernel_device)
    else:
        monkeypatch.setenv("SPARSE_LTH_BACKEND", backend)
    assert layer.backend == backend
    x = torch.randn(2, 3, 6, 7).to(kernel_device)
    grads_vs_reference(layer, x, lambda x, w, b: F.conv2d(F.pad(x, (1, 1, 1, 1), mode=mode), w, b))


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("on_triton", [False, True])
def test_fused_relu_backward_is_relus_own(kernel_device, backend, on_triton, create_graph):
    """The sparse path's fused ReLU passes the gradient back as nn.ReLU does (``threshold_backward``): zero where
    the output is zero even when the incoming gradient there is inf or NaN (a multiply by the mask made those NaN),
    and the same values elsewhere, on the torch backend and on the Triton kernels, and in the differentiable
    backward that ``create_graph=True`` takes (whose own gradient is then nn.ReLU's too)."""
    gen = torch.Generator().manual_seed(21)
    be = backend if on_triton else "torch"
    dev = kernel_device if on_triton else torch.device("cpu")
    layer = SparseLinear(24, 16, path="sparse", backend=be, device=dev, activation="relu").to(dev)
    layer.set_mask(random_mask((16, 24), 0.3, gen))
    assert layer.path == "sparse" and layer.backend == be
    x = torch.randn(6, 24, generator=gen).to(dev).requires_grad_()
    y = layer(x)
    dead = y == 0
    assert dead.any() and (~dead).any()
    g = torch.randn(6, 16, generator=gen).to(dev)
    g[dead] = float("inf")
    g[dead.nonzero()[0, 0], dead.nonzero()[0, 1]] = float("nan")
    w = layer.dense_weight().detach().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    yr = torch.relu(F.linear(xr, w, layer.bias.detach()))
    if create_graph:
        (dx,) = torch.autograd.grad(y, [x], g, create_graph=True)
        (dxr,) = torch.autograd.grad(yr, [xr], g, create_graph=True)
        assert torch.isfinite(dx).all()
        torch.testing.assert_close(dx, dxr, rtol=1e-5, atol=1e-5)
        (dx ** 2).sum().backward()  # through the recorded backward: a gradient for the weights
        (dxr ** 2).sum().backward()
        assert torch.isfinite(layer.values.grad).all()
        torch.testing.assert_close(layer.values.grad, w.grad[layer.weight_mask], rtol=1e-4, atol=1e-4)
        return
    y.backward(g)
    yr.backward(g)
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(layer.values.grad).all() and torch.isfinite(layer.bias.grad).all()


def test_functional_sparse_linear_checks_its_arguments(kernel_device, backend):
    """The autograd Function runs the kernels without their argument checks (the layer makes its own); the public
    functional.sparse_linear checks first, so bad input still gets a clear error rather than a launch."""
    functional_sparse_linear_checks(kernel_device, backend)


def test_functional_sparse_linear_checks_its_arguments_on_the_torch_backend_too():
    """The same checks for the torch backend (a dtype mismatch was computed anyway, and a (B, rows) bias failed
    in autograd's backward), which also takes float64; an unknown backend name is refused, not sent to Triton."""
    from sparse_lth.functional import sparse_linear
    from sparse_lth.kernels.format import build_format

    functional_sparse_linear_checks("cpu", "torch")
    gen = torch.Generator().manual_seed(23)
    fmt = build_format(random_mask((6, 10), 0.4, gen))
    values, x = torch.randn(fmt.nnz, generator=gen, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    dense = torch.zeros(6, 10, dtype=torch.float64).index_put_((fmt.row_idx.long(), fmt.col_idx.long()), values)
    torch.testing.assert_close(sparse_linear(x, values, None, fmt, "torch"), F.linear(x, dense))
    with pytest.raises(ValueError, match=r"sparse_linear: bias has shape \(4, 6\)"):
        sparse_linear(x, values, torch.zeros(4, 6, dtype=torch.float64), fmt, "torch")
    for name in ("Torch", "auto"):
        with pytest.raises(ValueError, match=f"sparse_linear: unknown backend '{name}'"):
            sparse_linear(x, values, None, fmt, name)


@pytest.mark.parametrize("which", ["kernels", "torch"])
def test_the_autograd_functions_called_directly_refuse_what_does_not_fit(kernel_device, backend, which):
    """SparseLinearFunction / SparseConv2dFunction called directly (they are importable) with an input of another
    width read out of bounds (NaN, or 1.8e19 for a conv), an integer input came back as integers, and an unknown
    backend name ran the Triton path. Their own O(1) checks refuse these."""
    from sparse_lth.functional import SparseConv2dFunction, SparseLinearFunction
    from sparse_lth.kernels.format import build_format
    from sparse_lth.kernels.torch_conv import build_conv_taps
    device, be = (kernel_device, backend) if which == "kernels" else ("cpu", "torch")
    gen = torch.Generator().manual_seed(4)
    fmt = build_format(random_mask((5, 64), 0.3, gen).to(device))
    values = torch.randn(fmt.nnz, generator=gen).to(device)
    for x, msg in ((torch.randn(3, 2, device=device), r"an input of shape \(3, 2\) .* a \(5, 64\) sparse weight"),
                   (torch.ones(3, 64, dtype=torch.int64, device=device), "dtype torch.int64 does not fit")):
        with pytest.raises(ValueError, match=msg):
            SparseLinearFunction.apply(x, values, None, fmt, be, None)
    with pytest.raises(ValueError, match="SparseLinearFunction: unknown backend 'cuda'"):
        SparseLinearFunction.apply(torch.randn(3, 64, device=device), values, None, fmt, "cuda", None)
    cfmt = build_format(random_mask((4, 8, 3, 3), 0.3, gen).to(device))
    cvals = torch.randn(cfmt.nnz, generator=gen).to(device)
    taps = build_conv_taps(cfmt, (3, 3)) if be == "torch" else None
    geom = ((3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match=r"SparseConv2dFunction: an input of shape \(1, 2, 5, 5\)"):
        SparseConv2dFunction.apply(torch.randn(1, 2, 5, 5, device=device), cvals, None, cfmt, *geom,
                                   (False, False, False), None, be, taps)
    with pytest.raises(ValueError, match="SparseConv2dFunction: unknown backend 'gpu'"):
        SparseConv2dFunction.apply(torch.randn(1, 8, 5, 5, device=device), cvals, None, cfmt, *geom,
                                   (False, False, False), None, "gpu", taps)
    y = SparseConv2dFunction.apply(torch.randn(1, 8, 5, 5, device=device), cvals, None, cfmt, *geom,
                                   (False, False, False), None, be, taps)  # what fits runs
    assert y.shape == (1, 4, 5, 5) and torch.isfinite(y).all()


def functional_sparse_linear_checks(kernel_device, backend):
    from sparse_lth.functional import sparse_linear
    from sparse_lth.kernels.format import build_format

    gen = torch.Generator().manual_seed(21)
    fmt = build_format(random_mask((6, 10), 0.4, gen).to(kernel_device))
    values = torch.randn(fmt.nnz, generator=gen).to(kernel_device)
    bias = torch.randn(6, generator=gen).to(kernel_device)
    x = torch.randn(4, 10, generator=gen).to(kernel_device)
    y = sparse_linear(x, values, bias, fmt, backend)
    torch.testing.assert_close(y, F.linear(x, torch.zeros(6, 10, device=kernel_device).index_put_(
        (fmt.row_idx.long(), fmt.col_idx.long()), values), bias))
    with pytest.raises(ValueError, match=r"sparse_linear: x has shape \(4, 9\), expected \(\*, 10\)"):
        sparse_linear(x[:, :9], values, bias, fmt, backend)
    with pytest.raises(ValueError, match=r"sparse_linear: values has shape"):
        sparse_linear(x, values[1:], bias, fmt, backend)
    with pytest.raises(ValueError, match=r"sparse_linear: bias has shape"):
        sparse_linear(x, values, bias[1:], fmt, backend)
    with pytest.raises(TypeError, match="sparse_linear: dtypes must match"):
        sparse_linear(x.half(), values, bias, fmt, backend)
    with pytest.raises(ValueError, match="sparse_linear: activation"):
        sparse_linear(x, values, bias, fmt, backend, activation="gelu")
    with pytest.raises(TypeError, match="sparse_linear: x must be a tensor"):
        sparse_linear([1.0], values, bias, fmt, backend)


def test_layer_of_unsupported_dtype_is_refused_on_triton(kernel_device, backend):
    """float64 has no Triton kernel: the layer's launch says so (the kernels would have rounded it to fp32)."""
    gen = torch.Generator().manual_seed(22)
    layer = SparseLinear(10, 6, path="sparse", backend=backend, device=kernel_device).to(kernel_device)
    layer.set_mask(random_mask((6, 10), 0.4, gen))
    layer = layer.double()
    assert layer.values.dtype == torch.float64 and layer.path == "sparse" and layer.backend == backend
    with pytest.raises(TypeError, match="sparse_linear_forward: values has dtype torch.float64"):
        layer(torch.randn(3, 10, dtype=torch.float64, device=kernel_device))


def test_conv_layer_of_unsupported_dtype_or_an_input_on_another_device_is_refused(kernel_device, backend):
    """The conv layer's Triton ops run without the public launchers' checks (the layer made them), but a float64
    model still gets the clear dtype error, and on a GPU an input on the CPU the device error, not a bad launch."""
    gen = torch.Generator().manual_seed(24)
    layer = SparseConv2d(3, 4, 3, padding=1, path="sparse", backend=backend, device=kernel_device).to(kernel_device)
    layer.set_mask(random_mask((4, 3, 3, 3), 0.4, gen))
    if kernel_device.type == "cuda":
        with pytest.raises(ValueError, match="sparse_conv2d_forward: tensors are on different devices"):
            layer(torch.randn(2, 3, 5, 5))
    layer = layer.double()
    assert layer.values.dtype == torch.float64 and layer.path == "sparse" and layer.backend == backend
    with pytest.raises(TypeError, match="sparse_conv2d_forward: x must be float32, float16 or bfloat16, got "
                                        "torch.float64"):
        layer(torch.randn(2, 3, 5, 5, dtype=torch.float64, device=kernel_device))


def test_sparse_linear_output_is_not_a_view(kernel_device, backend):
    """The kernels' batch-minor output is allocated with its strides (no transposed view of another tensor), so
    the Function returns it as it is and an in-place op after the layer is allowed."""
    gen = torch.Generator().manual_seed(23)
    layer = SparseLinear(10, 6, path="sparse", backend=backend, device=kernel_device).to(kernel_device)
    layer.set_mask(random_mask((6, 10), 0.4, gen))
    y = layer(torch.randn(5, 10, device=kernel_device, requires_grad=True))
    assert y._base is None and y.stride() == (1, 5)
    y.relu_().sum().backward()
    assert layer.values.grad is not None


# Ops that make the host wait for the device on CUDA (a value read back, or an output size that depends on data):
# inside a CUDA graph capture each is an error, and in eager training each stalls the launch queue.
HOST_SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
                 "aten::masked_select", "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim",
                 "aten::unique_consecutive", "aten::repeat_interleave", "aten::bincount", "aten::histc",
                 "aten::masked_scatter", "aten::index_put", "aten::index_put_")


from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class RecordOps(TorchDispatchMode):
    """The names of the aten ops called inside the mode."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_sparse_path_step_makes_no_host_sync(kernel_device, backend):
    """Forward and backward of sparse layers, once warmed up, call no op that reads a value back from the device
    or sizes an output by data: what a CUDA graph capture of the step (torch.cuda.graph, make_graphed_callables)
    needs from the layers, and what keeps eager training's launch queue full. Recorded with a dispatch mode around
    a step of a conv layer and a fused-ReLU linear layer on the sparse path (Triton backend: interpreted on the
    CPU, compiled on a GPU) and a linear layer on the dense path (its gradient mask applied by a hook)."""
    gen = torch.Generator().manual_seed(24)
    conv = SparseConv2d(3, 4, 3, padding=1, path="sparse", backend=backend, device=kernel_device)
    fc1 = SparseLinear(4 * 5 * 5, 16, path="sparse", backend=backend, device=kernel_device, activation="relu")
    fc2 = SparseLinear(16, 10, path="dense", backend=backend, device=kernel_device)
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Flatten(), fc1, fc2).to(kernel_device)
    for layer, path in ((conv, "sparse"), (fc1, "sparse"), (fc2, "dense")):
        layer.set_mask(random_mask(layer.weight_shape, 0.3, gen))
        assert layer.path == path and layer.backend == backend
    x = torch.randn(6, 3, 5, 5, generator=gen).to(kernel_device)
    y = torch.randint(0, 10, (6,), generator=gen).to(kernel_device)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    step()  # warm-up: autotuning, variant timing and caches happen on first calls, outside a capture
    with RecordOps() as rec:
        step()
    assert rec.ops, "nothing recorded"
    assert "aten::threshold_backward" in rec.ops  # the fused ReLU's backward ran inside the recorded step
    assert not rec.ops & set(HOST_SYNC_OPS), sorted(rec.ops & set(HOST_SYNC_OPS))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert (fc2.weight.grad[~fc2.weight_mask] == 0).all()  # the dense path's hook ran inside the recorded step


def two_layer_step_case(device, backend, seed):
    """(model, x, y): a sparse-path linear layer with fused ReLU and a dense-path one, 30 % masks, a batch of 6."""
    gen = torch.Generator().manual_seed(seed)
    fc1 = SparseLinear(20, 16, path="sparse", backend=backend, device=device, activation="relu")
    fc2 = SparseLinear(16, 10, path="dense", backend=backend, device=device)
    model = torch.nn.Sequential(fc1, fc2).to(device)
    for layer in (fc1, fc2):
        layer.set_mask(random_mask(layer.weight_shape, 0.3, gen))
    x = torch.randn(6, 20, generator=gen).to(device)
    y = torch.randint(0, 10, (6,), generator=gen).to(device)
    return model, x, y


def test_capturable_optimizer_step_reads_nothing_back(kernel_device, backend):
    """A whole training step with sparse_lth.optim.Adam(capturable=True) on the Triton backend, once warmed up,
    neither reads a value back from the device nor makes a tensor from host data: its step counts stay on the
    device and its tables are cached, so the step can be captured in a CUDA graph. The non-capturable Adam makes a
    table from host data at every step (its bias corrections), which shows the recorder sees that."""
    from sparse_lth.optim import Adam

    model, x, y = two_layer_step_case(kernel_device, backend, seed=25)
    recorded = {}
    for capturable in (False, True):
        opt = Adam(model.parameters(), lr=1e-3, capturable=capturable, backend=backend)

        def step():
            opt.zero_grad(set_to_none=False)  # gradients stay where they are: the pointer table is cached
            F.cross_entropy(model(x), y).backward()
            opt.step()

        step()
        step()
        with RecordOps() as rec:
            step()
        recorded[capturable] = rec.ops
        assert "aten::threshold_backward" in rec.ops  # the fused ReLU's backward: the recorder sees the step
    if kernel_device.type == "cuda":  # the step counts, on the device (a CPU one is incremented through NumPy)
        assert "aten::_foreach_add_" in recorded[True]
    host_reads = {"aten::_local_scalar_dense", "aten::lift_fresh"}
    assert "aten::lift_fresh" in recorded[False]  # its bias corrections: a table from host data at every step
    bad = recorded[True] & (host_reads | set(HOST_SYNC_OPS))
    assert not bad, sorted(bad)
    for p in model.parameters():
        st = opt.state[p]["step"]
        assert st.device == p.device and float(st) == 3


@pytest.mark.parametrize("set_to_none", [False, True])
def test_capturable_adam_step_replayed_as_a_cuda_graph(kernel_device, backend, set_to_none):
    """On a GPU: a training step of sparse layers (sparse path with fused ReLU, dense path) with sparse-lth's
    capturable Adam, captured once as a CUDA graph after three warm-up steps, then replayed; a twin with the
    non-capturable Adam takes the same steps eagerly. Gradients zeroed in place keep their addresses, so every
    optimizer table is built before the capture. Set to None, the captured backward allocates them anew and the
    pointer table is built inside the capture: a host-to-device copy that torch >= 2.11 refuses there (then the
    capture must fail with sparse-lth's error saying what to do; older torch captures the copy). On the CPU the
    "graph" is the step itself, a stand-in: the capturable optimizer against the non-capturable one."""
    import copy

    from sparse_lth.optim import Adam

    model, x, y = two_layer_step_case(kernel_device, backend, seed=26)
    fc1, fc2 = model
    twin = copy.deepcopy(model)
    opt = Adam(model.parameters(), lr=1e-2, capturable=True, backend=backend)
    twin_opt = Adam(twin.parameters(), lr=1e-2, backend=backend)

    def step(m, o):
        o.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(m(x), y).backward()
        o.step()

    if kernel_device.type == "cuda":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step(model, opt)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # recorded, not run: the model stays at its three warm-up steps
                step(model, opt)
        except RuntimeError as e:
            if not set_to_none:
                raise
            assert "zero_grad(set_to_none=False)" in str(e), e  # the copy refused: sparse-lth says what to do
            return
        replay = graph.replay
    else:
        for _ in range(3):
            step(model, opt)
        replay = lambda: step(model, opt)  # noqa: E731
    for _ in range(3):
        step(twin, twin_opt)
    for _ in range(4):
        replay()
        step(twin, twin_opt)
    if kernel_device.type == "cuda":
        torch.cuda.synchronize()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert float(opt.state[fc1.values]["step"]) == 7 and float(twin_opt.state[twin[0].values]["step"]) == 7
    assert (fc2.weight[~fc2.weight_mask] == 0).all()
