#!/usr/bin/env python
"""Compile every Triton kernel of sparse-lth for a CUDA GPU (default sm_90, the H100/H200) on a machine without
one, through the real launchers, and report what the compiler says: registers, spills, shared memory, vector
loads.

The Triton interpreter (what the CPU tests run) executes the kernels' Python, but never compiles them: a kernel
that the interpreter runs can still fail to compile for a GPU (a non-constexpr block size, a shape or dtype rule
that only the compiler checks), and only the compiler shows register pressure and spills. This script runs each
public launcher of kernels/ on small CPU tensors with the launch replaced by Triton's own ``warmup`` path
(specialize, compile, no launch) against a stand-in driver that names the target GPU; Triton's bundled ``ptxas``
builds the cubin, and ``ptxas -v`` on the same PTX gives the resource usage. Nothing runs on a GPU, so nothing
here says anything about speed.

    python benchmarks/compile_kernels.py                    # the launchers' heuristic configurations, sm_90
    python benchmarks/compile_kernels.py --all-configs      # plus every autotuning configuration
    python benchmarks/compile_kernels.py --arch 80 --out /tmp/sm80.md

Writes a Markdown table (default ``benchmarks/results/compile_sm<arch>_triton-<version>.md``) and prints it.
Exit status 1 if any kernel failed to compile.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile, don't interpret: must happen before Triton is imported
os.environ["SPARSE_LTH_AUTOTUNE"] = "0"  # the heuristic configs; --all-configs passes each tuned config

import argparse  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------- the compile harness
class _TargetDriver:
    """Just enough of a Triton driver for ``JITFunction.run(..., warmup=True)``: it names the target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def _ptxas() -> str:
    import triton
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(p) if p.exists() else "ptxas"


def _triton_ptxas_flags() -> list[str]:
    """The register-allocation flag Triton itself passes to ptxas when it builds a cubin (triton 3.8:
    ``--regAllocOptLevel=2``; 3.6: none), so that ``ptxas -v`` here reports the binary that will run."""
    import inspect

    try:
        from triton.backends.nvidia.compiler import CUDABackend
        src = inspect.getsource(CUDABackend.make_cubin)
    except Exception:  # noqa: BLE001 - another Triton layout: plain ptxas
        return []
    return [f for f in ("--regAllocOptLevel=2",) if f in src]


def _resources(ptx: str, arch: str) -> dict:
    """Registers, spill bytes, shared memory per ``ptxas -v`` on the kernel's PTX, with Triton's own flags."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([_ptxas(), *_triton_ptxas_flags(), f"--gpu-name={arch}", "-v", str(src),
                            "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True, timeout=300)
    text = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip()[:400]}")

    def grab(pattern, default=0):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else default

    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "stack": grab(r"(\d+) bytes stack frame"),
            "smem_static": grab(r"(\d+) bytes smem")}


class Recorder:
    """Replaces JITFunction.run so that every launch compiles (warmup) for the target instead of running."""

    def __init__(self, arch: int):
        from triton.runtime.jit import JITFunction
        self.arch = arch
        self.kernels: dict[str, dict] = {}   # one row per distinct compiled binary
        self.case = ""
        self._jit = JITFunction
        self._orig = JITFunction.run

    def __enter__(self):
        from triton.runtime import driver
        from sparse_lth.kernels import _triton
        self._driver, self._prev_driver = driver, driver._active
        driver.set_active(_TargetDriver(self.arch))
        self._can_launch = _triton.can_launch
        _triton.can_launch = lambda device: True   # CPU tensors stand in for CUDA ones; nothing is launched
        rec, orig = self, self._orig

        def run(jit_self, *args, grid, warmup, **kwargs):
            kernel = orig(jit_self, *args, grid=grid, warmup=True, **kwargs)
            rec._record(jit_self, kernel, kwargs)
            return kernel

        self._jit.run = run
        return self

    def __exit__(self, *exc):
        from sparse_lth.kernels import _triton
        self._jit.run = self._orig
        _triton.can_launch = self._can_launch
        self._driver._active = self._prev_driver
        return False

    def _record(self, jit_fn, kernel, kwargs):
        ptx = kernel.asm["ptx"]
        key = kernel.hash if hasattr(kernel, "hash") else str(hash(ptx))
        if key in self.kernels:
            self.kernels[key]["cases"].add(self.case)
            return
        arch = f"sm_{self.arch}a" if self.arch >= 90 else f"sm_{self.arch}"
        consts = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages", "num_ctas")}
        md = kernel.metadata
        sig = getattr(kernel.src, "signature", {}) or {}
        attrs = getattr(kernel.src, "attrs", {}) or {}
        ptrs = sorted({v[1:] for v in sig.values() if isinstance(v, str) and v.startswith("*")})
        div16 = sum(1 for v in attrs.values() if any(a and a[0] == "tt.divisibility" for a in v))
        row = {"kernel": jit_fn.__name__, "constexprs": ", ".join(f"{k}={_short(v)}" for k, v in consts.items()),
               "args": f"{' '.join(ptrs)}; {div16}/{sum(1 for v in sig.values() if v != 'constexpr')} div16",
               "num_warps": md.num_warps, "num_stages": getattr(md, "num_stages", ""),
               "shared": getattr(md, "shared", 0), "ld_v4": len(re.findall(r"ld\.global(?:\.[a-z]+)*\.v4", ptx)),
               "ld_v2": len(re.findall(r"ld\.global(?:\.[a-z]+)*\.v2", ptx)),
               "st_v4": len(re.findall(r"st\.global(?:\.[a-z]+)*\.v4", ptx)),
               "mma": len(re.findall(r"\b(?:wgmma|mma)\.", ptx)), "cases": {self.case}}
        row.update(_resources(ptx, arch))
        self.kernels[key] = row


def _short(v) -> str:
    s = str(v)
    return s.replace("triton.language.", "tl.").replace("torch.", "")


# ------------------------------------------------------------------------------------------------------- the cases
def _fmt(rows, cols, density, seed=0):
    from sparse_lth.kernels.format import build_format
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    mask[0, 0] = True
    return build_format(mask)


def linear_cases(all_configs: bool):
    from sparse_lth.kernels import sparse_linear as L
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for batch in (1, 60, 256, 4096):
            def run(dtype=dtype, batch=batch, cfg=None, sddmm_cfg=None, variant="gather"):
                fmt = _fmt(33, 300, 0.3)  # 300 columns: several base panels for the slab kernels
                x = torch.randn(batch, 300).to(dtype)
                v = torch.randn(fmt.nnz).to(dtype)
                b = torch.randn(33).to(dtype)
                L.sparse_linear_forward(x, v, fmt, b, activation="relu", config=cfg, variant=variant)
                L.sparse_linear_forward(x, v, fmt, None, config=cfg, variant=variant)
                dy = torch.randn(batch, 33).to(dtype)
                L.sparse_linear_backward_input(dy, v, fmt, config=cfg, variant=variant)
                L.sparse_linear_backward_weight(dy, x, fmt, out_dtype=torch.float32, config=sddmm_cfg,
                                                variant=variant)
            cases.append((f"linear {str(dtype)[6:]} batch {batch}", run))
            if dtype != torch.float16 and batch in (1, 4096):  # the slab heuristic's narrow and wide batch blocks
                cases.append((f"linear slab {str(dtype)[6:]} batch {batch}", lambda run=run: run(variant="slab")))
    if all_configs:
        for r, k, b, w in L._SPMM_CONFIGS:
            cfg = {"BLOCK_R": r, "BLOCK_K": k, "BLOCK_B": b, "num_warps": w}
            cases.append((f"linear spmm config {cfg}", lambda cfg=cfg, run=cases[0][1]: run(cfg=cfg)))
        for k, b, w in L._SDDMM_CONFIGS:
            cfg = {"BLOCK_NNZ": k, "BLOCK_B": b, "num_warps": w}
            cases.append((f"linear sddmm config {cfg}", lambda cfg=cfg, run=cases[0][1]: run(sddmm_cfg=cfg)))
        for configs, key in ((L._SPMM_SLAB_CONFIGS, "cfg"), (L._SDDMM_SLAB_CONFIGS, "sddmm_cfg")):
            for p, r, k, b, w, occ in (c for by_size in configs.values() for c in by_size):
                cfg = {"PANEL_STEP": p, "BLOCK_R": r, "BLOCK_K": k, "BLOCK_B": b, "num_warps": w, "OCC": occ}
                cases.append((f"linear slab {key} {cfg}",
                              lambda cfg=cfg, key=key, run=cases[0][1]: run(variant="slab", **{key: cfg})))
    return cases


def conv_cases(all_configs: bool):
    from sparse_lth.kernels import sparse_conv as C
    cases = []
    geoms = [(3, 1, 1, 1), (1, 2, 0, 1), (3, 2, 1, 1), (5, 1, 2, 2)]  # kernel, stride, padding, dilation
    for dtype in (torch.float32, torch.bfloat16):
        for k, s, p, d in geoms:
            def run(dtype=dtype, k=k, s=s, p=p, d=d):
                c_in, c_out = 5, 6
                fmt = _fmt(c_out, c_in * k * k, 0.4)
                x = torch.randn(2, c_in, 9, 11).to(dtype)
                v = torch.randn(fmt.nnz).to(dtype)
                b = torch.randn(c_out).to(dtype)
                y = C.sparse_conv2d_forward(x, v, fmt, (k, k), b, (s, s), (p, p), (d, d))
                dy = torch.randn(y.shape).to(dtype)
                C.sparse_conv2d_backward_input(dy, v, fmt, tuple(x.shape), (k, k), (s, s), (p, p), (d, d))
                C.sparse_conv2d_backward_weight(dy, x, fmt, (k, k), (s, s), (p, p), (d, d))
            cases.append((f"conv {str(dtype)[6:]} k{k} s{s} p{p} d{d}", run))
    return cases


def optim_cases(all_configs: bool):
    from sparse_lth.kernels import optim as O
    cases = []
    for pdtype in (torch.float32, torch.bfloat16):
        for masked in (True, False):
            def run(pdtype=pdtype, masked=masked):
                shapes = [(64, 33), (130,)]
                ps = [torch.randn(s).to(pdtype) for s in shapes]
                gs = [torch.randn(s).to(pdtype) for s in shapes]
                ms = [torch.rand(s) < 0.5 for s in shapes] if masked else None
                st = lambda: [torch.zeros(s) for s in shapes]  # noqa: E731
                O.fused_sgd_(ps, gs, st(), ms, lr=0.1, momentum=0.9, weight_decay=5e-4)
                O.fused_sgd_(ps, gs, st(), ms, lr=0.1, momentum=0.9, nesterov=True)
                O.fused_sgd_(ps, gs, None, ms, lr=0.1)
                O.fused_adam_(ps, gs, st(), st(), None, ms, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=0.0, step=1)
                O.fused_adam_(ps, gs, st(), st(), st(), ms, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=0.01, step=3, decoupled_weight_decay=True)
                O.fused_adam_(ps, gs, st(), st(), None, ms, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=0.0, step=[torch.tensor(2.0) for _ in shapes], capturable=True)
            cases.append((f"optim {str(pdtype)[6:]} {'masked' if masked else 'compact'}", run))
    return cases


FAMILIES = {"linear": linear_cases, "conv": conv_cases, "optim": optim_cases}


# ----------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    ap.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    ap.add_argument("--all-configs", action="store_true", help="also every autotuning configuration")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import triton

    failures = []
    with Recorder(args.arch) as rec:
        for fam in args.families:
            for label, run in FAMILIES[fam](args.all_configs):
                rec.case = label
                try:
                    run()
                    print(f"ok    {label}", flush=True)
                except Exception as e:  # noqa: BLE001 - report every failure, keep compiling the rest
                    failures.append((label, e))
                    last = (str(e).strip().splitlines() or [""])[-1]  # (a blank message has no line)
                    print(f"FAIL  {label}: {type(e).__name__}: {last}", flush=True)
                    traceback.print_exc(limit=3)
    rows = sorted(rec.kernels.values(), key=lambda r: (r["kernel"], r["constexprs"], r["args"]))
    lines = [f"# Triton kernels compiled for sm_{args.arch} (no GPU needed)", "",
             f"`python benchmarks/compile_kernels.py{' --all-configs' if args.all_configs else ''}` with triton "
             f"{triton.__version__}, torch {torch.__version__}: every launcher of kernels/ run on small tensors, "
             "each launch compiled (not run) for the target; registers, spills and static shared memory from "
             f"`ptxas -v` with Triton's own flags ({' '.join(_triton_ptxas_flags()) or 'none'}); "
             "`shared` from Triton's metadata; vector-load counts from the PTX; `args`: the pointer element "
             "types and how many runtime arguments Triton specialized as 16-divisible. "
             f"{len(rows)} distinct binaries, {len(failures)} failed cases.", "",
             "| kernel | constexprs | warps | regs | spill st/ld B | stack B | shared B | ld.v4 | ld.v2 | st.v4 | args |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['constexprs']} | {r['num_warps']} | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['shared']} | {r['ld_v4']} | "
                     f"{r['ld_v2']} | {r['st_v4']} | {r['args']} |")
    if failures:
        lines += ["", "## Failed", ""] + [f"- {label}: {type(e).__name__}: {e}" for label, e in failures]
    text = "\n".join(lines) + "\n"
    out = args.out or RESULTS / f"compile_sm{args.arch}_triton-{triton.__version__}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
