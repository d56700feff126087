"""Which implementation runs an op: ``triton`` (CUDA), ``interpret`` (the same Triton kernels on CPU through
Triton's interpreter, for tests) or ``torch`` (plain PyTorch: the reference and the CPU path).

Selection is automatic from the tensors' device and can be overridden by the ``backend=`` argument of the layers
and optimizers, or for the whole process by the environment variable ``SPARSE_LTH_BACKEND``. An explicitly
requested backend that cannot run raises a clear error; automatic selection falls back to ``torch``.
"""
from __future__ import annotations

import os

import torch

from .kernels._triton import HAS_TRITON, can_launch, interpreting

BACKENDS = ("triton", "interpret", "torch")
ENV_VAR = "SPARSE_LTH_BACKEND"


def resolve_backend(device: torch.device | str, requested: str | None = None) -> str:
    """The backend to use for tensors on ``device``.

    ``requested``: ``None``/``"auto"`` (then ``$SPARSE_LTH_BACKEND``, then automatic), or one of :data:`BACKENDS`.
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    source = "argument"
    if requested is None or requested == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        requested, source = (env, f"${ENV_VAR}") if env and env != "auto" else ("auto", "")
    if requested == "auto":
        return "triton" if device.type == "cuda" and can_launch(device) else "torch"
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r} (from {source}); choose one of {BACKENDS} or 'auto'")
    if requested == "torch":
        return "torch"
    if not HAS_TRITON:
        raise RuntimeError(f"backend {requested!r} (from {source}) needs Triton, which is not installed")
    if requested == "triton":
        if device.type != "cuda" or not can_launch(device):
            raise RuntimeError(f"backend 'triton' (from {source}) needs CUDA tensors and TRITON_INTERPRET unset; "
                               f"the tensors are on {device}")
        return "triton"
    # interpret
    if device.type != "cpu" or not interpreting():
        raise RuntimeError(f"backend 'interpret' (from {source}) runs Triton kernels on CPU tensors and needs "
                           f"TRITON_INTERPRET=1 set before Triton is imported (tensors on {device}, "
                           f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r})")
    return "interpret"
