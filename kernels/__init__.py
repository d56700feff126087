"""Low-level ops of sparse-lth: tensors in, tensors out.

Installed as ``sparse_lth.kernels``. Nothing here imports ``sparse_lth``; no autograd, no ``nn``.

- :mod:`.format`        mask -> index structures (CSR + transposed view) shared by every sparse op
- :mod:`.torch_ops`     plain-torch linear ops: the fast CPU path (``torch.sparse``)
- :mod:`.torch_conv`    plain-torch sparse conv2d and its two gradients: shifted CSR products, the CPU path
- :mod:`.sparse_linear` Triton kernels for Y = X W^T + b and its two gradients
- :mod:`.sparse_conv`   Triton kernels for direct sparse conv2d and its two gradients
- :mod:`.optim`         Triton mask-aware fused optimizer updates
"""
