#!/usr/bin/env python
"""The two ceilings of a device, measured: memory bandwidth and dense matrix-product rate.

Every speed figure of the other benchmarks is read against these (the device METHOD: operations over the measured
rate and bytes over the measured bandwidth give the floor of a kernel's time):

* ``copy``: a device-to-device copy of a large float32 tensor, bytes counted as read + written;
* ``matmul``: an N x N x N product on random data, fp32 with TF32 off (PyTorch's default for matmul), fp32 with
  TF32 on, and bf16 (CUDA only for the last two), in TFLOP/s (2 N^3 operations).

CUDA: timed with ``triton.testing.do_bench`` (median, 20/80 % quantiles) after a warm-up. CPU: perf_counter, median
of ``--repeats`` calls, at smaller sizes. Rows go to ``benchmarks/results/ceilings_<device-slug>.csv``.

    python benchmarks/bench_ceilings.py                  # CUDA when present, else CPU
    python benchmarks/bench_ceilings.py --device cpu --threads 2
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

from baselines import RESULTS, device_name, git_commit, slug

FIELDS = ["kind", "dtype", "size", "median_ms", "p20_ms", "p80_ms", "rate", "unit", "device", "commit"]


def _time(fn, device: torch.device, repeats: int) -> tuple[float, float, float]:
    if device.type == "cuda":
        from triton.testing import do_bench
        return tuple(do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8]))
    fn()
    xs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t0) * 1e3)
    xs.sort()
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return statistics.median(xs), q(0.2), q(0.8)


def measure(device: torch.device, copy_mib: int, matmul_n: int, repeats: int) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    n = copy_mib * (1 << 20) // 4
    src = torch.randn(n, device=device, generator=gen)
    dst = torch.empty_like(src)
    med, p20, p80 = _time(lambda: dst.copy_(src), device, repeats)
    rows.append(dict(kind="copy", dtype="float32", size=f"{copy_mib} MiB", median_ms=med, p20_ms=p20, p80_ms=p80,
                     rate=2 * src.numel() * 4 / (med * 1e-3) / 1e9, unit="GB/s (read + write)"))
    del src, dst
    variants = [("float32", torch.float32, False)]
    if device.type == "cuda":
        variants += [("tf32", torch.float32, True), ("bfloat16", torch.bfloat16, False)]
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dt, tf32 in variants:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(matmul_n, matmul_n, device=device, generator=gen).to(dt)
            b = torch.randn(matmul_n, matmul_n, device=device, generator=gen).to(dt)
            med, p20, p80 = _time(lambda: a @ b, device, repeats)
            rows.append(dict(kind="matmul", dtype=name, size=f"{matmul_n}^3", median_ms=med, p20_ms=p20,
                             p80_ms=p80, rate=2 * matmul_n ** 3 / (med * 1e-3) / 1e12, unit="TFLOP/s"))
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--copy-mib", type=int, default=None, help="copy size (default: 2048 on CUDA, 256 on CPU)")
    ap.add_argument("--matmul-n", type=int, default=None, help="product size (default: 8192 on CUDA, 1024 on CPU)")
    ap.add_argument("--repeats", type=int, default=11, help="CPU: timed calls per row")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu, or on a GPU machine", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    copy_mib = args.copy_mib if args.copy_mib is not None else (2048 if cuda else 256)
    matmul_n = args.matmul_n if args.matmul_n is not None else (8192 if cuda else 1024)
    if copy_mib < 1 or matmul_n < 1:
        ap.error("--copy-mib and --matmul-n must be >= 1")
    name = device_name(device)
    commit = git_commit()
    rows = [{**r, "device": name, "commit": commit} for r in measure(device, copy_mib, matmul_n, args.repeats)]
    out = args.out or RESULTS / f"ceilings_{slug(name)}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"device: {name}  torch {torch.__version__}  commit {commit}")
    for r in rows:
        print(f"{r['kind']:7s} {r['dtype']:9s} {r['size']:>10s} {r['median_ms']:10.3f} ms  {r['rate']:10.4g} {r['unit']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
