"""benchmarks/summarize.py: tables and target checks computed from result rows (synthetic rows in the exact
formats the benchmark scripts write; nothing is timed here)."""
from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV = "NVIDIA Fake GPU"
SLUG = "nvidia-fake-gpu"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


summarize = _load("summarize")


def _write(path: Path, rows: list[dict]):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _lin(op, shape, batch, d, dtype, impl, ms):
    return dict(op=op, shape=shape, batch=batch, density=d, dtype=dtype, impl=impl, median_ms=ms, p20=ms, p80=ms,
                peak_mem_bytes=0, device=DEV, commit="abc", path="")


@pytest.fixture
def results(tmp_path):
    lin = [
        _lin("fwd+bwd", "4096x4096", 4096, 0.05, "fp32", "dense_mask", 30.0),
        _lin("fwd+bwd", "4096x4096", 4096, 0.05, "fp32", "sparse_triton", 10.0),        # 3.0x: met
        _lin("fwd+bwd", "4096x4096", 4096, 0.02, "fp32", "dense_mask", 30.0),
        _lin("fwd+bwd", "4096x4096", 4096, 0.02, "fp32", "sparse_triton", 6.0),         # 5.0x < 6: not met
        _lin("fwd+bwd", "4096x4096", 4096, 0.02, "fp32", "torch_sparse_csr", 15.0),
        _lin("fwd+bwd", "4096x4096", 4096, 0.01, "fp32", "sparse_triton", 2.0),  # cut short: no dense row
        _lin("fwd+bwd", "4096x4096", 4096, 0.01, "bf16", "dense_mask_autocast", 9.0),
        _lin("fwd+bwd", "4096x4096", 4096, 0.01, "bf16", "sparse_triton", 3.0),         # 3.0x >= 2.5: met
        dict(_lin("fwd+bwd", "4096x4096", 4096, 0.05, "fp32", "sparse_lth_layer", 12.0),
             path="sparse/weight_grad:dense"),                                             # 2.5x
        dict(_lin("fwd+bwd", "4096x4096", 4096, 0.02, "fp32", "sparse_lth_layer", 40.0), path="dense"),  # 0.75x
        _lin("fwd+bwd", "300x784", 60, 1.0, "fp32", "dense_mask", 0.1),
        _lin("fwd+bwd", "300x784", 60, 1.0, "fp32", "sparse_triton", 0.4),            # best path = dense: 1x
        _lin("fwd+bwd", "300x784", 60, 0.01, "fp32", "dense_mask", 0.1),
        _lin("fwd+bwd", "300x784", 60, 0.01, "fp32", "sparse_triton", 0.05),
        dict(_lin("fwd+bwd", "300x784", 60, 1.0, "fp32", "sparse_lth_layer", 0.11), path="dense"),    # 0.91x
        dict(_lin("fwd+bwd", "300x784", 60, 0.01, "fp32", "sparse_lth_layer", 0.05), path="sparse"),  # 2x
        _lin("build_format", "4096x4096", 4096, 0.01, "bool", "build_format", 0.2),
    ]
    _write(tmp_path / f"linear_{SLUG}.csv", lin)
    conv = []
    for layer, dense_tf32, dense_ieee, tri in (("vgg19/conv10-12", 2.5, 5.0, 1.0), ("vgg19/conv13-16", 1.0, 3.0, 1.0)):
        for impl, dtype, ms in (("dense_mask", "fp32-tf32", dense_tf32), ("dense_mask", "fp32-ieee", dense_ieee),
                                ("triton_sparse", "fp32", tri), ("unfold_csr", "fp32", 4.0)):
            conv.append(dict(layer=layer, shape="512x512x3x3", batch=128, density=0.02, dtype=dtype, impl=impl,
                             direction="both", median_ms=ms, p20_ms=ms, p80_ms=ms, peak_mem_bytes=0, device=DEV,
                             commit="abc", count=3, nnz=94372, path=""))
    conv += [dict(conv[0], impl="sparse_lth_layer", dtype="fp32-tf32", median_ms=1.25, path="sparse"),  # 2.5/1.25
             dict(conv[4], impl="sparse_lth_layer", dtype="fp32-tf32", median_ms=1.1,                   # 1.0/1.1
                  path="sparse/weight_grad:dense")]
    _write(tmp_path / f"conv_vgg19_{SLUG}.csv", conv)
    optim = [dict(op="sgd", model="vgg19", params=20_000_000, density=1.0, nnz=20_000_000, dtype="float32",
                  impl=impl, median_ms=ms, p20_ms=ms, p80_ms=ms, bytes=nbytes, GBps=1.0, device=DEV, commit="abc")
             for impl, ms, nbytes in (("torch.optim-fused+mask", 2.5, 10 ** 9), ("sparse_lth-triton-dense", 1.0, 10 ** 9),
                                      ("sparse_lth-triton-compact", 1.0, 10 ** 9))]
    optim += [dict(op="sgd", model="vgg19", params=20_000_000, density=0.01, nnz=200_000, dtype="float32",
                   impl=impl, median_ms=ms, p20_ms=ms, p80_ms=ms, bytes=nbytes, GBps=1.0, device=DEV,
                   commit="abc")
              for impl, ms, nbytes in (("torch.optim-fused+mask", 2.5, 10 ** 9), ("sparse_lth-triton-dense", 1.0, 10 ** 9),
                                       ("torch.optim-fused+boolmask", 1.8, 10 ** 9),  # the faster baseline is the bar
                                       ("sparse_lth-triton-compact", 0.05, 10 ** 7))]   # 0.05 ms / 2e5 vs 1 ms / 2e7: 5x per weight
    _write(tmp_path / f"optim_{SLUG}.csv", optim)
    _write(tmp_path / f"ceilings_{SLUG}.csv",
           [dict(kind="copy", dtype="float32", size="2048 MiB", median_ms=1, p20_ms=1, p80_ms=1, rate=2000.0,
                 unit="GB/s", device=DEV, commit="abc")])
    model = [dict(model="vgg19", batch=128, dtype="float32", device=DEV, commit="abc", torch="2.11", density=d,
                  impl=impl, paths="ddd", median_ms=ms, min_ms=ms, max_ms=ms, repeats=20,
                  speedup_vs_dense_masking=round(base / ms, 3))
             for d, base, rows in ((1.0, 10.0, (("dense_masking", 10.0), ("sparse_lth", 10.5))),
                                   (0.015, 10.0, (("dense_masking", 10.0), ("sparse_lth", 6.0))))
             for impl, ms in rows]
    _write(tmp_path / f"model_step_vgg19_{SLUG}.csv", model)
    lenet = [dict(model="lenet300_100", batch=60, dtype="float32", device=DEV, commit="abc", torch="2.11",
                  density=0.02, impl=impl, paths=paths, median_ms=ms, min_ms=ms, max_ms=ms, repeats=20,
                  speedup_vs_dense_masking=round(base / ms, 3), graph=graph, graph_check=check)
             for impl, paths, ms, base, graph, check in (
                 ("dense_masking", "-", 1.0, 1.0, "-", "-"), ("sparse_lth", "ssd", 2.0, 1.0, "-", "-"),
                 ("dense_masking_graph", "-", 0.2, 0.2, "cuda", "0"),
                 ("sparse_lth_graph", "ssd", 0.1, 0.2, "cuda", "1.2e-07"))]
    _write(tmp_path / f"model_step_lenet_graph_{SLUG}.csv", lenet)
    _write(tmp_path / f"train_loop_{SLUG}.csv",
           [dict(model="lenet300_100", batch=60, iterations=300, device=DEV, commit="abc", torch="2.11", density=0.02,
                 optimizer_impl="torch", paths="ssd", mode=mode, median_ms_per_step=ms, min_ms=ms, max_ms=ms, repeats=3,
                 speedup_vs_per_step_sync=round(0.9 / ms, 3)) for mode, ms in (("per_step_sync", 0.9), ("stretch", 0.5))])
    # a file of another device and a CPU layers file must not leak into this device's summary
    _write(tmp_path / "linear_other.csv", [dict(lin[0], device="Other GPU", median_ms=1e-9)])
    _write(tmp_path / "layers_cpu_x.csv", [dict(case="x", density=1.0, device="cpu")])
    return tmp_path


def _targets(md: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in md.split("## Targets")[1].split("\n## ")[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("#"):
            out[cells[1]] = (cells[3], cells[4])
    return out


def test_targets_are_computed_from_the_rows(results):
    out = summarize.summarize(SLUG, results, plots=False)
    md = out.read_text()
    t = _targets(md)
    assert t["4096x4096 b4096 fp32 fwd+bwd, 95% sparse"] == ("3.00x", "met")
    assert t["4096x4096 b4096 fp32 fwd+bwd, 98% sparse"] == ("5.00x", "NOT met")
    assert t["4096x4096 b4096 fp32 fwd+bwd, 99% sparse"] == ("-", "not measured")
    assert t["4096x4096 b4096 bf16 fwd+bwd, 99% sparse"] == ("3.00x", "met")
    # parity is SparseLinear after its automatic choice, not the kernel's own ratio (0.25x at 100 %)
    assert t["LeNet layer 300x784 b60 fp32, automatic choice (SparseLinear), worst density (parity: >= ~1)"] \
        == ("0.91x", "NOT met")
    assert t["LeNet layer 100x300 b60 fp32, automatic choice (SparseLinear), worst density (parity: >= ~1)"][1] \
        == "not measured"
    assert t["512->512 3x3 at 4x4 px, fwd+bwd, 98% sparse, fp32 vs cuDNN TF32 on"] == ("2.50x", "met")
    assert t["512->512 3x3 at 2x2 px, fwd+bwd, 98% sparse, fp32 vs cuDNN TF32 on"] == ("1.00x", "NOT met")
    assert t["512->512 3x3 at 2x2 px, fwd+bwd, 98% sparse, fp32 vs cuDNN IEEE fp32"] == ("3.00x", "met")
    assert t["conv layers fp32 fwd+bwd, automatic choice (SparseConv2d), worst layer and density (never slower: "
             ">= ~1)"] == ("0.91x", "NOT met")
    assert t["conv layers bf16 fwd+bwd, automatic choice (SparseConv2d), worst layer and density (never slower: "
             ">= ~1)"] == ("-", "not measured")
    assert "| vgg19/conv10-12 | 0.02 | 1 | 2.50x | 5.00x | 4.00x | - | - | 2.00x (sparse) | - (-) |" in md
    assert "2.00x (sparse) | - (-) |" in md and "0.91x (sparse/weight_grad:dense) | - (-) |" in md
    assert t["dense path vs torch.optim fused + masking (worst row)"] == ("1.80x", "NOT met")  # 1.8 / 1.0 at 1%
    # 1e9 bytes at 2000 GB/s = 0.5 ms; the dense path took 1 ms
    assert t["dense path time / bytes-at-measured-bandwidth floor (worst row)"] == ("2.00x", "NOT met")
    assert t["compact path sgd vgg19 float32: time per live weight, worst density / density 1 (proportional: ~1)"] \
        == ("5.00x", "NOT met")
    assert t["VGG-19 training step at 1.5% weights remaining"] == ("1.67x", "met")
    assert t["vgg19 step, automatic paths, worst density (never slower: >= ~1)"] == ("0.95x", "met")
    # graph rows: against dense masking's graph, and not in the eager "never slower" figure
    assert t["lenet300_100 step, automatic paths, worst density (never slower: >= ~1)"] == ("0.50x", "NOT met")
    assert t["lenet300_100 step as a CUDA graph against dense masking's graph, worst density (at least parity)"] \
        == ("2.00x", "met")
    assert "| lenet300_100 | 60 | 0.02 | sparse_lth_graph | ssd | 0.1 | 2.00x | 1.2e-07 |" in md
    assert "| 0.02 | torch | ssd | stretch | 0.5 | 1.80x |" in md  # the training loop's table
    assert "Other GPU" not in md and "1e-09" not in md
    assert t["4096x4096 b4096 fp32 fwd+bwd, automatic choice (SparseLinear), worst density (never slower: >= ~1)"] \
        == ("0.75x", "NOT met")
    assert t["4096x4096 b4096 bf16 fwd+bwd, automatic choice (SparseLinear), worst density (never slower: >= ~1)"] \
        == ("-", "not measured")
    # the tables carry the medians
    assert "| 4096x4096 | 4096 | fp32 | 0.02 | 30 | 6 | 5.00x | 5.00x | 0.75x | dense | 2.00x |" in md
    assert "| 4096x4096 | 4096 | fp32 | 0.05 | 30 | 10 | 3.00x | 3.00x | 2.50x | sparse/weight_grad:dense | - |" in md
    assert "| 4096x4096 | 4096 | bf16 | 0.01 | 9 | 3 | 3.00x | 3.00x | - | - | - |" in md
    # a run cut short by its time limit (a kernel row, no dense-masking row): "-", not a crash
    assert "| 4096x4096 | 4096 | fp32 | 0.01 | - | 2 | - | - | - | - | - |" in md


def test_ratios_are_never_taken_across_runs(tmp_path):
    """Two runs of one configuration (the suite's `linear` and `linear-targets` parts write two files; a run cut
    short by its time limit measured the baseline only): every ratio is of two medians of one file."""
    run_a = [_lin("fwd+bwd", "4096x4096", 4096, 0.02, "fp32", "dense_mask", 10.0),
             _lin("fwd+bwd", "4096x4096", 4096, 0.02, "fp32", "sparse_triton", 5.0),         # 2x
             _lin("fwd+bwd", "4096x4096", 4096, 0.02, "fp32", "torch_sparse_csr", 8.0),      # 1.25x
             _lin("fwd+bwd", "4096x4096", 4096, 0.01, "fp32", "dense_mask", 10.0)]           # cut short here
    run_b = [_lin("fwd+bwd", "4096x4096", 4096, 0.02, "fp32", "dense_mask", 20.0),           # another run: 5x,
             _lin("fwd+bwd", "4096x4096", 4096, 0.01, "fp32", "sparse_triton", 4.0),         # CSR not measured
             _lin("fwd+bwd", "4096x4096", 4096, 0.02, "fp32", "sparse_triton", 4.0)]
    _write(tmp_path / f"linear_{SLUG}.csv", run_a)
    _write(tmp_path / f"linear_targets_{SLUG}.csv", run_b)
    conv = [dict(layer="vgg19/conv10-12", shape="512x512x3x3", batch=128, density=0.02, dtype=dtype, impl=impl,
                 direction="both", median_ms=ms, p20_ms=ms, p80_ms=ms, peak_mem_bytes=0, device=DEV, commit="abc",
                 count=3, nnz=94372, path="")
            for impl, dtype, ms in (("dense_mask", "fp32-tf32", 3.0), ("triton_sparse", "fp32", 1.0))]   # 3x
    _write(tmp_path / f"conv_vgg19_{SLUG}.csv", conv)
    _write(tmp_path / f"conv_targets_{SLUG}.csv", [dict(conv[0], median_ms=9.0), dict(conv[1], median_ms=4.5)])  # 2x
    optim = [dict(op="sgd", model="vgg19", params=100, density=1.0, nnz=100, dtype="float32", impl=impl,
                  median_ms=ms, p20_ms=ms, p80_ms=ms, bytes=1000, GBps=1.0, device=DEV, commit="abc")
             for impl, ms in (("torch.optim-fused+mask", 3.0), ("sparse_lth-triton-dense", 1.0))]       # 3x
    _write(tmp_path / f"optim_{SLUG}.csv", optim)
    _write(tmp_path / f"optim_targets_{SLUG}.csv", [dict(optim[0], median_ms=100.0)])   # another run's baseline
    md = summarize.summarize(SLUG, tmp_path, plots=False).read_text()
    t = _targets(md)
    # the run that measured more of the configuration (kernel, baseline and CSR) gives the row, not a mix: 20 / 5
    assert t["4096x4096 b4096 fp32 fwd+bwd, 98% sparse"] == ("2.00x", "NOT met")
    # at 1 % run A measured only the baseline and run B only the kernel: no ratio (not 10 / 4)
    assert t["4096x4096 b4096 fp32 fwd+bwd, 99% sparse"] == ("-", "not measured")
    assert "| 4096x4096 | 4096 | fp32 | 0.02 | 10 | 5 | 2.00x | 2.00x | - | - | 1.25x |" in md
    assert f"4096x4096 4096 fp32 0.02 from linear_{SLUG}.csv" in md                      # the repeat is named
    # conv: each file measured as much (a tie): the file later in name order, conv_vgg19_ (3x), never 9 / 1 = 9x
    # or 3 / 4.5
    assert t["512->512 3x3 at 4x4 px, fwd+bwd, 98% sparse, fp32 vs cuDNN TF32 on"][0] == "3.00x"
    assert t["dense path vs torch.optim fused + masking (worst row)"] == ("3.00x", "met")   # not 100 / 1


def test_cpu_linear_ops_rows_are_not_gpu_results(tmp_path):
    """bench_linear_ops_cpu.py's `linear_ops_cpu_*.csv` starts like bench_linear_gpu.py's files; it has other
    columns and no GPU in it: no summary for it."""
    _write(tmp_path / "linear_ops_cpu_amd-epyc-2-threads.csv",
           [dict(op="forward", rows=300, cols=784, batch=60, density=0.1, impl="dense", median_ms=1.0,
                 device="cpu: AMD EPYC", commit="abc")])
    assert summarize.devices(tmp_path) == []
    assert summarize.kind_of(tmp_path / "linear_ops_cpu_x.csv") is None
    assert summarize.kind_of(tmp_path / f"linear_targets_{SLUG}.csv") == "linear"


def test_cli_writes_summary_and_plots(results, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("out") / "new"  # a folder that does not exist yet is made
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "summarize.py"), "--results", str(results),
                        "--out", str(out_dir)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (out_dir / f"summary_{SLUG}.md").exists()
    assert (out_dir / "summary_other-gpu.md").exists()   # every device gets its own summary
    for name in (f"summary_{SLUG}_linear.png", f"summary_{SLUG}_conv.png"):
        data = (out_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_unknown_device_is_refused(results):
    with pytest.raises(SystemExit, match="no result rows"):
        summarize.summarize("no-such-device", results, plots=False)


def test_synthetic_rows_use_the_scripts_columns(results):
    """The rows above must be what the scripts write, or these tests check a format nobody produces."""
    for script, prefix in (("bench_linear_gpu", "linear_"), ("bench_conv_gpu", "conv_"), ("bench_optim", "optim_"),
                           ("bench_ceilings", "ceilings_")):
        fields = _load(script).FIELDS
        path = next(p for p in results.glob(f"{prefix}*{SLUG}.csv"))
        with open(path, newline="") as f:
            assert next(csv.reader(f)) == list(fields), script


def test_the_vgg_target_reads_the_best_sparse_implementation():
    """Two sparse-lth implementations at 1.5 %: the target is the better one (one row in the tests: min passed)."""
    rows = [dict(model="vgg19", batch="64", density="0.015", impl=i, paths="p", median_ms="1",
                 speedup_vs_dense_masking=s) for i, s in (("dense_masking", "1.0"), ("sparse_lth", "1.2"),
                                                           ("sparse_lth_graph", "1.8"))]
    t = []
    summarize.model_section(rows, t)
    v = next(x for x in t if x.what.startswith("VGG-19 training step"))
    assert v.measured == pytest.approx(1.8)
