"""Low-level ops of sparse-lth: tensors in, tensors out.

Installed as ``sparse_lth.kernels``. Nothing here imports ``sparse_lth``; no autograd, no ``nn``.

- :mod:`.format`        mask -> index structures (CSR + transposed view) shared by every sparse op
- :mod:`.torch_ops`     plain-torch ops: the dense references and the fast CPU path (``torch.sparse``)
- :mod:`.sparse_linear` Triton kernels for Y = X W^T + b and its two gradients
- :mod:`.sparse_conv`   Triton kernels for direct sparse conv2d and its two gradients
- :mod:`.optim`         Triton mask-aware fused optimizer updates
"""
