"""The layers' sparse path on the Triton kernels (compiled on a GPU, interpreted on the CPU): the autograd
Functions against the dense reference, forward and both gradients, and a few optimizer steps."""
import pytest
import torch
import torch.nn.functional as F

from sparse_lth.layers import SparseConv2d, SparseLinear

from test_layers import grads_vs_reference, random_mask


@pytest.fixture
def backend(kernel_device):
    return "triton" if kernel_device.type == "cuda" else "interpret"


@pytest.mark.parametrize("density", [0.0, 0.1, 0.6])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_sparse_linear_on_triton(kernel_device, backend, density, activation):
    gen = torch.Generator().manual_seed(11)
    layer = SparseLinear(37, 19, path="sparse", backend=backend, activation=activation).to(kernel_device)
    layer.set_mask(random_mask((19, 37), density, gen))
    assert layer.backend == backend and layer.path == "sparse"
    x = torch.randn(3, 5, 37).to(kernel_device)  # 3-D input: flattened to (15, 37) inside
    ref = (lambda x, w, b: torch.relu(F.linear(x, w, b))) if activation else (lambda x, w, b: F.linear(x, w, b))
    grads_vs_reference(layer, x, ref)


@pytest.mark.parametrize("case", [(3, 5, 3, 1, 1, 1, 0.3), (2, 4, 3, 2, 0, 2, 0.6), (4, 3, 1, 1, 0, 1, 0.0)])
def test_sparse_conv_on_triton(kernel_device, backend, case):
    cin, cout, k, s, p, d, density = case
    gen = torch.Generator().manual_seed(12)
    layer = SparseConv2d(cin, cout, k, stride=s, padding=p, dilation=d, path="sparse", backend=backend)
    layer = layer.to(kernel_device)
    layer.set_mask(random_mask(layer.weight_shape, density, gen))
    x = torch.randn(2, cin, 7, 9).to(kernel_device)
    grads_vs_reference(layer, x, lambda x, w, b: F.conv2d(x, w, b, s, p, d))


def test_triton_training_steps_match_torch_backend(kernel_device, backend):
    gen = torch.Generator().manual_seed(13)
    mask = random_mask((8, 12), 0.3, gen)
    a = SparseLinear(12, 8, path="sparse", backend=backend).to(kernel_device)
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
