"""What a run's numbers depend on besides its hyperparameters: the machine, the library versions and the code.

Training is bit-reproducible only on the same *numerics*: the same torch version, the same device, and on a CPU the
same instruction set PyTorch dispatches its own kernels to (``torch.backends.cpu.get_cpu_capability()``: its AVX2
and AVX-512 kernels round differently, so two hosts that both call themselves "AMD EPYC" can give different
accuracies from the first step on; MKL's and oneDNN's own instruction-set settings changed nothing for LeNet) and
the same thread count. Each IMP round records :func:`environment` in its ``metrics.json``; :func:`numerics_key` is
the part that must match for the same numbers, and :func:`describe_difference` says what differs. To reproduce a
CPU run made where PyTorch used AVX2 on a host that has AVX-512, set ``ATEN_CPU_CAPABILITY=avx2`` before Python
starts.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import warnings
from pathlib import Path

import torch

# the fields of environment() that decide the floating-point path; the others (commit, host names) do not
NUMERICS_FIELDS = ("torch", "device", "cpu_capability", "threads", "cuda", "cudnn", "tf32_matmul", "tf32_cudnn",
                   "triton")  # (triton: recorded for CUDA runs only, whose sparse layers run its kernels)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_id() -> str:
    """``cpu_name()`` with the CPU family and model numbers from /proc/cpuinfo ("AMD EPYC (family 25, model 17)"):
    hosts that report the same name can differ in speed and instruction set."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    if "cpu family" in fields and "model" in fields:
        return f"{cpu_name()} (family {fields['cpu family']}, model {fields['model']})"
    return cpu_name()


def git_commit() -> str:
    """The short commit of the checkout sparse-lth runs from, with "-dirty" when tracked files other than
    results (``results/``, ``benchmarks/results/``) differ from it; ``$SPARSE_LTH_COMMIT`` when set (a copy of the
    tree without .git, e.g. on a lent GPU machine); "unknown" for an installed copy that is no checkout. Asked
    once per process (the code that runs is the code imported then)."""
    env = os.environ.get("SPARSE_LTH_COMMIT", "").strip()
    return env or _checkout_commit()


@functools.lru_cache(maxsize=1)
def _checkout_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():  # an installed package: whatever git repository holds it is not its source
        return "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        # what the runs and benchmarks write does not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results", ":(exclude)results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment(device: torch.device | str = "cpu") -> dict:
    """The machine, versions and code a computation on ``device`` runs with (plain JSON values)."""
    device = torch.device(device)
    env = dict(torch=torch.__version__, python=platform.python_version(), commit=git_commit())
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        env.update(device=torch.cuda.get_device_name(index), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            pass
    elif device.type == "cpu":
        env.update(device=f"cpu: {cpu_id()}", cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   threads=torch.get_num_threads())
    else:
        env["device"] = device.type
    return env


def numerics_key(env: dict) -> dict:
    """The fields of ``env`` that must match for bit-identical numbers."""
    return {k: env.get(k) for k in NUMERICS_FIELDS if k in env}


def describe_difference(old: dict, new: dict) -> str:
    """``"cpu_capability AVX2 -> AVX512, threads 1 -> 2"``: the numerics fields that differ ("" when none), with
    the way to get AVX2 kernels back where that is the difference."""
    a, b = numerics_key(old), numerics_key(new)
    diffs = [f"{k} {a.get(k)} -> {b.get(k)}" for k in NUMERICS_FIELDS if (k in a or k in b) and a.get(k) != b.get(k)]
    text = ", ".join(diffs)
    cap_old = a.get("cpu_capability")
    if cap_old and cap_old != b.get("cpu_capability"):
        text += f" (set ATEN_CPU_CAPABILITY={cap_old.lower()} before starting Python to use {cap_old} kernels here)"
    return text


def describe(env: dict) -> str:
    """One line: ``cpu: AMD EPYC (family 25, model 17), AVX512, 1 thread, torch 2.14.1, commit cf80ff6ab12c``."""
    parts = [env.get("device", "?")]
    if env.get("cpu_capability"):
        parts.append(env["cpu_capability"])
    if "threads" in env:
        parts.append(f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}")
    if "tf32_matmul" in env:
        on_off = {True: "on", False: "off"}
        parts.append(f"TF32 matmul {on_off[env['tf32_matmul']]} / cuDNN {on_off[env['tf32_cudnn']]}")
    parts.append(f"torch {env.get('torch')}")
    if env.get("triton"):
        parts.append(f"triton {env['triton']}")
    parts.append(f"commit {env.get('commit', 'unknown')}")
    return ", ".join(parts)


def warn_if_changed(old: dict | None, new: dict, what: str) -> bool:
    """Warn (``RuntimeWarning``) when ``new``'s numerics differ from ``old``'s: ``what`` ("seed 0 round 3 resumes")
    will not give the numbers it would have given where it started. Returns whether it warned; no ``old`` (a run
    from before environments were recorded) is no difference."""
    if not old:
        return False
    diff = describe_difference(old, new)
    if not diff:
        return False
    warnings.warn(f"{what} under other numerics than before: {diff}; its numbers will not match an "
                  "uninterrupted run's bit for bit", RuntimeWarning, stacklevel=3)
    return True
