"""What every benchmark shares: DESIGN.md's dense-masking baseline and the machine/commit labels of a result row.

The dense-masking baseline is what users do today (open_lth / ``torch.nn.utils.prune`` style): an eager model whose
forward multiplies each weight by its mask, a standard ``torch.optim`` optimizer, gradients masked before and
weights re-masked after each step.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


class MaskedLinear(nn.Linear):
    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(linear.weight * mask)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        self.register_buffer("mask", mask.to(self.weight))

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class MaskedConv2d(nn.Conv2d):
    def __init__(self, conv: nn.Conv2d, mask: torch.Tensor):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(conv.weight * mask)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.register_buffer("mask", mask.to(self.weight))

    def forward(self, x):
        return self._conv_forward(x, self.weight * self.mask, self.bias)


def masked_baseline(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Swap (in place) every nn.Linear / nn.Conv2d named in ``masks`` for its dense-masking twin."""
    for name, module in list(model.named_modules()):
        for cname, child in list(module.named_children()):
            full = f"{name}.{cname}" if name else cname
            if full in masks and type(child) is nn.Linear:
                setattr(module, cname, MaskedLinear(child, masks[full]))
            elif full in masks and type(child) is nn.Conv2d:
                setattr(module, cname, MaskedConv2d(child, masks[full]))
    return model


def baseline_step(model, opt, x, y):
    """One dense-masking training step: forward, backward, mask gradients, step, re-mask weights."""
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    masked = [m for m in model.modules() if isinstance(m, (MaskedLinear, MaskedConv2d))]
    for m in masked:
        m.weight.grad.mul_(m.mask)
    opt.step()
    with torch.no_grad():
        for m in masked:
            m.weight.mul_(m.mask)


def plain_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def random_masks(model: nn.Module, density: float, gen: torch.Generator, skip=()) -> dict[str, torch.Tensor]:
    """A random mask at ``density`` for every nn.Linear / nn.Conv2d of ``model`` (on the weight's device)."""
    return {n: (torch.rand(m.weight.shape, generator=gen) < density).to(m.weight.device)
            for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and n not in skip}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()}"


def slug(s: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in s)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")[:60]


def git_commit() -> str:
    """The short commit hash, with "-dirty" when tracked files differ from it; ``$SPARSE_LTH_COMMIT`` when set (a
    copy of the tree without .git, e.g. on a lent GPU machine: see gpu_suite.sh)."""
    env = os.environ.get("SPARSE_LTH_COMMIT", "").strip()
    if env:
        return env
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"
