"""The host-side wiring of the benchmarks that no GPU run has checked yet: which ratio summarize.py takes and which
rows it reads, what the dense-masking baselines do on every call, what gpu_suite.sh passes to each benchmark, and
what the GPU scripts write into their rows given a timing. The CUDA-only calls (do_bench, the allocator's peak,
the device name) are stood in for by stubs, so the code that turns their figures into CSV rows and README numbers
runs here. Nothing is timed; every figure asserted is a stub's."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import OpLog
from test_benchmark_scripts import DRY, _load, conv, lin, optim
from test_benchmark_summary import DEV, SLUG, _lin, _targets, _write, summarize
from test_gpu_suite import FAKE_PY, install_fakes

ROOT = Path(__file__).resolve().parents[1]
baselines = _load("baselines")
memory = _load("bench_memory")


def _summary(tmp_path, **files) -> tuple[str, dict]:
    for name, rows in files.items():
        _write(tmp_path / f"{name}_{SLUG}.csv", rows)
    md = summarize.summarize(SLUG, tmp_path, plots=False).read_text()
    return md, _targets(md)


def _conv_row(layer, d, impl, dtype, ms, path=""):
    return dict(layer=layer, shape="s", batch=128, density=d, dtype=dtype, impl=impl, direction="both", median_ms=ms,
                p20_ms=ms, p80_ms=ms, peak_mem_bytes=0, device=DEV, commit="abc", count=1, nnz=1, path=path)


def _model_row(model, d, impl, sp, graph="-"):
    return dict(model=model, batch=60, dtype="float32", device=DEV, commit="abc", torch="2", density=d, impl=impl,
                paths="ss", median_ms=1.0, min_ms=1.0, max_ms=1.0, repeats=3, speedup_vs_dense_masking=sp,
                graph=graph, graph_check="0")


# ================================================================================================== summarize.py
def test_linear_table_lists_fwd_bwd_rows_only_with_four_significant_digits(tmp_path):
    """The linear table is forward + backward only (a `fwd` row of the same layer would repeat its key with other
    ratios), its medians keep 4 significant digits, and `best` is never below 1x (the dense path is a choice)."""
    md, _ = _summary(tmp_path, linear=[
        _lin("fwd+bwd", "4096x4096", 4096, 0.02, "fp32", "dense_mask", 12.345),
        _lin("fwd+bwd", "4096x4096", 4096, 0.02, "fp32", "sparse_triton", 2.4691),
        _lin("fwd", "4096x4096", 4096, 0.02, "fp32", "dense_mask", 5.0),
        _lin("fwd", "4096x4096", 4096, 0.02, "fp32", "sparse_triton", 0.5),
        _lin("fwd+bwd", "4096x4096", 4096, 1.0, "fp32", "dense_mask", 1.0),
        _lin("fwd+bwd", "4096x4096", 4096, 1.0, "fp32", "sparse_triton", 2.0)])
    rows = [ln for ln in md.splitlines() if ln.startswith("| 4096x4096 |")]
    # `best`: the faster of the two paths, so never below 1x
    assert rows == ["| 4096x4096 | 4096 | fp32 | 1 | 1 | 2 | 0.50x | 1.00x | - | - | - |",
                    "| 4096x4096 | 4096 | fp32 | 0.02 | 12.35 | 2.469 | 5.00x | 5.00x | - | - | - |"]


def test_lenet_parity_target_reads_the_fp32_layer_rows_only(tmp_path):
    """The LeNet parity target is '300x784 b60 fp32': a bf16 SparseLinear row (slower or faster) stays out of it."""
    _, t = _summary(tmp_path, linear=[
        _lin("fwd+bwd", "300x784", 60, 0.1, "fp32", "dense_mask", 1.0),
        _lin("fwd+bwd", "300x784", 60, 0.1, "fp32", "sparse_triton", 0.5),
        _lin("fwd+bwd", "300x784", 60, 0.1, "fp32", "sparse_lth_layer", 0.8),      # 1.25x
        _lin("fwd+bwd", "300x784", 60, 0.1, "bf16", "dense_mask_autocast", 1.0),
        _lin("fwd+bwd", "300x784", 60, 0.1, "bf16", "sparse_triton", 0.5),
        _lin("fwd+bwd", "300x784", 60, 0.1, "bf16", "sparse_lth_layer", 2.0)])     # 0.5x, bf16
    assert t["LeNet layer 300x784 b60 fp32, automatic choice (SparseLinear), worst density (parity: >= ~1)"] \
        == ("1.25x", "met")


def test_a_target_is_met_at_exactly_its_need():
    """`>=` / `<=` targets: a measurement equal to the need meets it; NaN is 'not measured'."""
    assert summarize.Target("#", "x", 2.0, 2.0).status == "met"
    assert summarize.Target("#", "x", 1.5, 1.5, at_most=True).status == "met"
    assert summarize.Target("#", "x", 2.0, 1.99).status == "NOT met"
    assert summarize.Target("#", "x", 1.5, 1.51, at_most=True).status == "NOT met"
    assert summarize.Target("#", "x", 1.5, math.nan).status == "not measured"


def test_conv_bf16_ratios_are_against_bf16_autocast_dense_masking(tmp_path):
    """bf16 kernel rows and the bf16 SparseConv2d rows are divided into dense masking under bf16 autocast (not the
    fp32 baselines), and each precision's `chosen` column is its own layer row's path."""
    L = "vgg19/conv10-12"
    md, t = _summary(tmp_path, conv=[
        _conv_row(L, 0.02, "dense_mask", "fp32-tf32", 4.0), _conv_row(L, 0.02, "dense_mask", "fp32-ieee", 8.0),
        _conv_row(L, 0.02, "triton_sparse", "fp32", 2.0),
        _conv_row(L, 0.02, "dense_mask_amp", "bf16-autocast", 3.0), _conv_row(L, 0.02, "triton_sparse", "bf16", 1.0),
        _conv_row(L, 0.02, "sparse_lth_layer", "fp32-tf32", 1.0, "sparse"),
        _conv_row(L, 0.02, "sparse_lth_layer", "bf16-autocast", 6.0, "dense")])
    assert f"| {L} | 0.02 | 2 | 2.00x | 4.00x | - | 1 | 3.00x | 4.00x (sparse) | 0.50x (dense) |" in md
    assert t["conv layers bf16 fwd+bwd, automatic choice (SparseConv2d), worst layer and density (never slower: "
             ">= ~1)"] == ("0.50x", "NOT met")


def test_optim_floor_target_is_the_worst_dense_row(tmp_path):
    """'dense path time / floor (worst row)' is the largest ratio over the rows, not the last one read, and the
    floor's bandwidth is the ceilings file's copy row (not its matmul rate)."""
    rows = [dict(op="sgd", model="vgg19", params=100, density=d, nnz=100, dtype="float32", impl=impl, median_ms=ms,
                 p20_ms=ms, p80_ms=ms, bytes=10 ** 9, GBps=1.0, device=DEV, commit="abc")
            for d, impl, ms in ((1.0, "torch.optim-fused+mask", 4.0), (1.0, "sparse_lth-triton-dense", 2.0),
                                (0.01, "torch.optim-fused+mask", 4.0), (0.01, "sparse_lth-triton-dense", 1.0))]
    ceil = [dict(kind=kind, dtype="float32", size="1", median_ms=1, p20_ms=1, p80_ms=1, rate=rate, unit="-",
                 device=DEV, commit="abc") for kind, rate in (("matmul", 50.0), ("copy", 2000.0))]
    _, t = _summary(tmp_path, optim=rows, ceilings=ceil)
    # floor 1e9 B / 2000 GB/s = 0.5 ms: 4x at density 1, 2x at 0.01
    assert t["dense path time / bytes-at-measured-bandwidth floor (worst row)"] == ("4.00x", "NOT met")
    assert t["dense path vs torch.optim fused + masking (worst row)"] == ("2.00x", "met")


def test_model_step_targets_leave_out_the_baseline_and_stand_in_graphs(tmp_path):
    """The 'never slower' figure is the worst sparse-lth row (dense masking's own 1.0 is not a candidate), a
    graph target needs real CUDA graphs (a CPU `stand-in` row is the eager step), and the VGG-19 1.5 % target is
    the best sparse-lth row, never dense masking's 1.0."""
    rows = [_model_row("lenet300_100", 0.1, "dense_masking", 1.0), _model_row("lenet300_100", 0.1, "sparse_lth", 1.4),
            _model_row("lenet300_100", 0.1, "dense_masking_graph", 1.0, "stand-in"),
            _model_row("lenet300_100", 0.1, "sparse_lth_graph", 0.7, "stand-in"),
            _model_row("vgg19", 0.015, "dense_masking", 1.0), _model_row("vgg19", 0.015, "sparse_lth", 0.8)]
    t = []
    summarize.model_section(rows, t)
    got = {x.what: x.measured for x in t}
    assert got["lenet300_100 step, automatic paths, worst density (never slower: >= ~1)"] == pytest.approx(1.4)
    assert not any("CUDA graph" in w for w in got)
    assert got["VGG-19 training step at 1.5% weights remaining"] == pytest.approx(0.8)


def test_a_ceilings_file_alone_names_no_device(tmp_path):
    """devices() lists the devices that have something to summarize: a ceilings file alone (bandwidth, no
    comparison) gives no summary."""
    _write(tmp_path / f"ceilings_{SLUG}.csv", [dict(kind="copy", rate=1.0, device=DEV, commit="abc")])
    assert summarize.devices(tmp_path) == []


@pytest.mark.parametrize("name", ["NVIDIA H100 80GB HBM3", "NVIDIA H200",
                                  "cpu: AMD EPYC 7763 64-Core Processor (64 cores, 2 threads) -- a very long label"])
def test_summarize_slug_is_the_benchmarks_slug(name):
    """summarize.py's torch-free _slug must equal baselines.slug, which names the result files: `--device SLUG`
    is copied from those names."""
    assert summarize._slug(name) == baselines.slug(name)
    assert baselines.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert len(baselines.slug("x" * 100)) == 60


def test_the_linear_plot_draws_the_kernel_speedup(tmp_path, monkeypatch):
    """The linear plot's curve is the sparse kernel's speedup over dense masking (dense / sparse medians)."""
    import matplotlib.axes
    drawn = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **k: drawn.append(a) or real(self, *a, **k))
    rows = [dict(_lin("fwd+bwd", "4096x4096", 4096, d, "fp32", impl, ms), _file="f.csv")
            for d, impl, ms in ((0.02, "dense_mask", 10.0), (0.02, "sparse_triton", 2.0),
                                (0.02, "sparse_lth_layer", 8.0))]
    summarize.plot(SLUG, rows, [], tmp_path)
    assert [(list(x), list(y)) for x, y, *_ in drawn] == [([2.0], [5.0])]


# ================================================================================================== gpu_suite.sh
@pytest.fixture
def suite_env(tmp_path):
    """gpu_suite.sh in a scratch tree with test_gpu_suite's stand-ins, which here also log the environment each
    python call sees and fail the script named in $FAKE_FAIL; an earlier call's CSV lies in results/."""
    tree = tmp_path / "tree"
    (tree / "benchmarks" / "results").mkdir(parents=True)
    (tree / "benchmarks" / "gpu_suite.sh").write_text((ROOT / "benchmarks" / "gpu_suite.sh").read_text())
    (tree / "benchmarks" / "results" / "linear_old-run.csv").write_text("device,median_ms\nold,1\n")
    fake = FAKE_PY.replace('echo "PY $*" >> "$FAKE_LOG"\n',
                           'echo "PY $*" >> "$FAKE_LOG"\n'
                           'echo "ENV ${TRITON_INTERPRET-unset} ${SPARSE_LTH_TUNE_MS-unset} '
                           '${SPARSE_LTH_AUTOTUNE-unset} ${PYTHONPATH%%:*}" >> "$FAKE_LOG"\n'
                           '[ -n "${FAKE_FAIL:-}" ] && [ "$(basename -- "${1:-x}")" = "$FAKE_FAIL" ] && exit 7\n', 1)
    assert fake != FAKE_PY
    bin_dir, out, log = install_fakes(tmp_path, fake)

    def run(*parts, fail=""):
        env = {k: v for k, v in os.environ.items() if k not in ("PART_LIMIT", "SUITE_BUDGET", "PYTHON",
                                                                 "SPARSE_LTH_TUNE_MS", "SPARSE_LTH_AUTOTUNE")}
        env.update(PATH=f"{bin_dir}:{env['PATH']}", OUT=str(out), FAKE_LOG=str(log), FAKE_FAIL=fail,
                   TRITON_INTERPRET="1", PYTHONPATH="/elsewhere")
        r = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_suite.sh"), *parts], env=env,
                           capture_output=True, text=True, timeout=120)
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith(("PY ", "ENV "))]
        # (the python call, the environment it saw), benchmark and pytest calls only
        calls = [(a[3:], b.split()[1:]) for a, b in zip(lines[::2], lines[1::2]) if " -c " not in f" {a} "]
        assert all(a.startswith("PY ") and b.startswith("ENV ") for a, b in zip(lines[::2], lines[1::2]))
        return r, calls, out, tree
    return run


def _opt(call: str, flag: str) -> list[str]:
    """The values after ``flag`` in a command line, up to the next option."""
    words = call.split()
    if flag not in words:
        return []
    vals = []
    for w in words[words.index(flag) + 1:]:
        if w.startswith("--") or w in ("2>&1", "|"):
            break
        vals.append(w)
    return vals


def test_plan15_measures_what_the_targets_divide(suite_env):
    """Every target summarize.py checks needs both sides of its ratio in the plan's files: the kernels, dense
    masking and the automatic layer at the targets' densities, fwd+bwd, in both precisions; the optimizer at
    density 1 too (the compact target divides by it)."""
    r, calls, _, _ = suite_env("plan15")
    assert r.returncode == 0, r.stdout + r.stderr
    cmd = {c.split()[0].split("/")[-1] if not c.startswith("-m") else "pytest": c for c, _ in calls}
    linear, conv_, optim_ = cmd["bench_linear_gpu.py"], cmd["bench_conv_gpu.py"], cmd["bench_optim.py"]
    assert {"sparse_triton", "dense_mask", "sparse_lth_layer"} <= set(_opt(linear, "--impls"))
    assert "fwd+bwd" in _opt(linear, "--ops") and {"fp32", "bf16"} <= set(_opt(linear, "--dtypes"))
    assert {"0.05", "0.02", "0.01"} <= set(_opt(linear, "--densities"))
    assert {"300x784x60", "100x300x60", "4096x4096x4096"} <= set(_opt(linear, "--shapes"))
    assert {"triton_sparse", "dense_mask", "sparse_lth_layer"} <= set(_opt(conv_, "--impls"))
    assert "0.02" in _opt(conv_, "--densities") and _opt(conv_, "--directions") == ["both"]
    assert {"1", "0.01"} <= set(_opt(optim_, "--densities"))


def test_the_suite_runs_compiled_kernels_from_the_checkout(suite_env):
    """On the device: TRITON_INTERPRET unset (the GPU scripts refuse to run under it), the checkout first on
    PYTHONPATH (nothing is installed there), heuristic kernel configs for the tests and shortened autotuning for
    the *-targets parts."""
    r, calls, _, tree = suite_env("tests-core", "linear-targets", "conv-targets", "model-vgg19-targets")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(calls) == 4
    for call, (interp, tune, autotune, path) in calls:
        assert interp == "unset" and Path(path) == tree, call
    (t_call, t_env), *targets = calls
    assert t_call.startswith("-m pytest") and t_env[2] == "0"
    assert [e[1] for _, e in targets] == ["5,20", "unset", "5,20"]   # conv-targets keeps the full autotuning


def test_only_this_calls_result_files_come_back_and_at_most_seven(suite_env):
    """$OUT brings back 8 files at most: the log and up to 7 CSVs, all written by this call (an earlier run's
    file in results/ stays behind)."""
    r, _, out, _ = suite_env("ceilings", "linear-targets", "optim-targets", "conv-targets", "model-vgg19-targets",
                             "model-lenet-graph", "host", "train-loop", "linear")
    assert r.returncode == 0, r.stdout + r.stderr
    back = sorted(p.name for p in out.iterdir())
    assert sum(n.endswith(".csv") for n in back) == 7 and len(back) == 8
    assert "linear_old-run.csv" not in back


def test_a_failing_part_fails_the_call_and_the_others_still_run(suite_env):
    """A benchmark that exits non-zero makes the call's status non-zero (the session must see it), and the parts
    after it still run."""
    r, calls, _, _ = suite_env("optim-targets", "ceilings", fail="bench_optim.py")
    assert r.returncode == 7
    assert [c.split()[0] for c, _ in calls] == ["benchmarks/bench_optim.py", "benchmarks/bench_ceilings.py"]
    assert "=== optim-targets: rc=7" in r.stdout


def test_full_sweeps_write_device_named_files_one_per_run(suite_env):
    """The full sweeps name their files after the device (summarize.py and the commit take files per device) and
    the bf16 optimizer run writes its own file rather than overwriting the fp32 one; memory runs on CUDA."""
    r, calls, out, _ = suite_env("linear", "optim", "memory")
    assert r.returncode == 0, r.stdout + r.stderr
    (lin_call, _), (opt32, _), (opt16, _), (mem_call, _) = calls
    assert _opt(lin_call, "--out") == ["benchmarks/results/linear_fake-h200.csv"]
    assert "--dtype" not in opt32.split() and _opt(opt16, "--dtype") == ["bfloat16"]
    assert _opt(opt16, "--out") == ["benchmarks/results/optim_bf16_fake-h200.csv"]
    assert {"optim_fake-h200.csv", "optim_bf16_fake-h200.csv"} <= {p.name for p in out.iterdir()}
    assert _opt(mem_call, "--device") == ["cuda"]


# ================================================================================================== baselines.py
def test_dense_masking_layers_multiply_by_the_mask_on_every_call():
    """MaskedLinear / MaskedConv2d: pruned weights zeroed when built, and the forward multiplies by the mask on
    every call (the cost DESIGN.md's baseline pays), so a weight written into a pruned slot never shows."""
    gen = torch.Generator().manual_seed(0)
    lin_ = nn.Linear(6, 4)
    cv = nn.Conv2d(3, 4, 3, padding=1)
    for dense, x in ((lin_, torch.randn(2, 6, generator=gen)), (cv, torch.randn(2, 3, 5, 5, generator=gen))):
        mask = baselines.exact_mask(dense.weight.shape, 0.5, gen)
        twin = (baselines.MaskedLinear if dense is lin_ else baselines.MaskedConv2d)(dense, mask)
        assert torch.equal(twin.weight.detach(), dense.weight.detach() * mask)
        with torch.no_grad():
            twin.weight.fill_(1.0)
        want = (F.linear(x, mask.float(), dense.bias) if dense is lin_
                else F.conv2d(x, mask.float(), dense.bias, padding=1))
        torch.testing.assert_close(twin(x), want)


def test_masked_baseline_swaps_top_level_and_nested_layers():
    """masked_baseline swaps every layer named in the masks, a top-level child as well as a nested one, and
    leaves the unnamed ones dense."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Conv2d(1, 1, 1), nn.Linear(4, 2)))
    gen = torch.Generator().manual_seed(0)
    masks = {n: baselines.exact_mask(model.get_submodule(n).weight.shape, 0.5, gen) for n in ("0", "1.0")}
    baselines.masked_baseline(model, masks)
    assert type(model[0]) is baselines.MaskedLinear and type(model[1][0]) is baselines.MaskedConv2d
    assert type(model[1][1]) is nn.Linear


def test_baseline_step_masks_gradients_before_and_weights_after_the_step():
    """baseline_step: the optimizer sees masked gradients, and pruned weights are zero after its step even when
    the step moves them (momentum, weight decay) and the forward does not mask."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    mask = baselines.exact_mask((3, 5), 0.4, gen)
    baselines.masked_baseline(model, {"0": mask})
    layer = model[0]
    layer.forward = lambda x: F.linear(x, layer.weight, layer.bias)  # a forward that leaves the gradient whole
    seen = []

    class Spy:
        def zero_grad(self, set_to_none=True):
            layer.weight.grad = None

        def step(self):
            seen.append(layer.weight.grad.clone())
            with torch.no_grad():
                layer.weight.add_(1.0)  # moves every weight, pruned ones too

    baselines.baseline_step(model, Spy(), torch.randn(4, 5, generator=gen), torch.tensor([0, 1, 2, 0]))
    assert seen and torch.all(seen[0][~mask] == 0) and torch.any(seen[0][mask] != 0)
    assert torch.all(layer.weight.detach()[~mask] == 0)


def test_make_optimizer_is_the_papers_setting():
    """SGD with momentum 0.9 (VGG/ResNet in the paper); Adam capturable only when asked (a CUDA graph needs it)."""
    p = [nn.Parameter(torch.zeros(3))]
    sgd = baselines.make_optimizer(torch.optim, p, "sgd", 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["lr"] == 0.1
    assert baselines.make_optimizer(torch.optim, p, "adam", 1e-3, capturable=True).defaults["capturable"] is True
    assert baselines.make_optimizer(torch.optim, p, "adam", 1e-3).defaults["capturable"] is False


@pytest.fixture
def tf32_flags():
    """The process's TF32 switches, restored after the test (monkeypatch cannot: they are module properties)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_model_step_device_turns_tf32_matmuls_off(tf32_flags):
    """The model-level benchmarks compare fp32 with TF32 matmuls off, whatever the process had."""
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = baselines.model_step_device(types.SimpleNamespace(threads=None, device="cpu"))
    assert dev == torch.device("cpu") and torch.backends.cuda.matmul.allow_tf32 is False


def test_device_name_on_cuda_is_the_gpus_name(monkeypatch):
    """A CUDA row's device column is torch.cuda.get_device_name (summarize.py groups results by it)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA Fake H200")
    assert baselines.device_name(torch.device("cuda")) == "NVIDIA Fake H200"
    assert optim.bench_device_name(torch.device("cuda")) == "NVIDIA Fake H200"
    assert baselines.device_name("cpu").startswith("cpu: ")


def test_quantiles_are_median_p20_p80():
    """quantiles_ms: the median (not the mean) and the 20 / 80 % quantiles, linearly interpolated."""
    med, p20, p80 = baselines.quantiles_ms([5.0, 1.0, 2.0, 3.0, 100.0])
    assert (med, p20, p80) == (3.0, pytest.approx(1.8), pytest.approx(24.0))


def test_time_ms_on_cuda_reads_do_bench_with_the_scripts_settings(monkeypatch):
    """On CUDA time_ms passes warmup / rep to do_bench and returns its quantiles as (median, p20, p80)."""
    import triton.testing
    got = {}

    def fake_do_bench(fn, warmup, rep, quantiles):
        got.update(warmup=warmup, rep=rep)
        return [{0.5: 2.0, 0.2: 1.0, 0.8: 3.0}[q] for q in quantiles]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert baselines.time_ms(lambda: None, torch.device("cuda"), warmup=7, rep=40) == (2.0, 1.0, 3.0)
    assert got == dict(warmup=7, rep=40)
    calls = []
    baselines.time_ms(lambda: calls.append(1), torch.device("cpu"), cpu_calls=4)
    assert len(calls) == 4


def test_peak_memory_resets_the_peak_before_the_call(monkeypatch):
    """peak_memory on CUDA: the allocator's peak is reset before the measured call and read after it."""
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: log.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: log.append("read") or 4096)
    assert baselines.peak_memory(lambda: log.append("call"), torch.device("cuda")) == 4096
    assert log.index("reset") < log.index("call") < log.index("read")
    assert baselines.peak_memory(lambda: log.append("cpu call"), torch.device("cpu")) is None
    assert "cpu call" not in log


# ============================================================================================ bench_linear_gpu.py
def _stub_timing(monkeypatch, mod, log):
    def fake_time_ms(fn, dev, warmup=25, rep=100, cpu_calls=3):
        log.append(("time", warmup, rep))
        fn()
        return 2.0, 1.0, 3.0
    monkeypatch.setattr(mod, "time_ms", fake_time_ms)


def test_linear_rows_carry_the_timers_median_and_the_timing_settings(monkeypatch, tmp_path, tf32_flags):
    """bench_linear_gpu.py writes the timer's median / p20 / p80 into their own columns, passes --warmup / --rep
    through, compiles every closure before timing it, and runs with TF32 matmuls off."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.backends.cuda.matmul.allow_tf32 = True
    log = []
    _stub_timing(monkeypatch, lin, log)
    real = lin.make_impl

    def spying_make_impl(*a, **k):
        fns = real(*a, **k)
        return {n: (lambda f=f, n=n: log.append(n) or f()) if callable(f) and n != "state" else f
                for n, f in fns.items()}

    monkeypatch.setattr(lin, "make_impl", spying_make_impl)
    out = tmp_path / "lin.csv"
    assert lin.main(["--dry-run", "--shapes", "7x13x5", "--densities", "0.5", "--impls", "dense_mask", "--dtypes",
                     "fp32", "--ops", "fwd", "--no-build-format", "--warmup", "7", "--rep", "40",
                     "--out", str(out)]) == 0
    (row,) = list(csv.DictReader(open(out, newline="")))
    assert (row["median_ms"], row["p20"], row["p80"], row["device"]) == ("2", "1", "3", DRY)
    assert ("time", 7, 40) in log and torch.backends.cuda.matmul.allow_tf32 is False
    first = log.index(("time", 7, 40))
    assert {"single_fwd", "single_bwd", "single_fwd+bwd"} <= set(log[:first])


def _dense_mask_fns(dt, w_full, mask, batch=4):
    from sparse_lth.kernels.format import build_format
    rows, cols = mask.shape
    gen = torch.Generator().manual_seed(1)
    return lin.make_impl("dense_mask", dt, torch, F, build_format(mask), mask, w_full, rows, cols, batch, 1, gen,
                         torch.device("cpu"), None, None, None)


def test_linear_dense_mask_baseline_masks_autocasts_and_masks_the_gradient():
    """bench_linear_gpu's dense_mask multiplies W by the mask in every forward (given an unmasked W, the output
    is the masked product), runs under bf16 autocast for the bf16 rows, and multiplies the weight gradient by the
    mask after every backward."""
    gen = torch.Generator().manual_seed(0)
    mask = baselines.exact_mask((5, 7), 0.4, gen)
    w = torch.randn(5, 7, generator=gen)
    fns = _dense_mask_fns(torch.float32, w, mask)
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fns["single_fwd"]().detach(), F.linear(x, w * mask))
    assert _dense_mask_fns(torch.bfloat16, w, mask)["single_fwd"]().dtype == torch.bfloat16

    for op in ("fwd+bwd", "bwd"):
        with OpLog() as mode:
            fns[op]()
        assert "mul_" in mode.names, (op, mode.names)


def test_linear_correctness_check_flags_a_wrong_kernel():
    """check() counts each op whose result is off the float64 reference by more than its tolerance."""
    x, v, dy = torch.randn(3, 4), torch.randn(5), torch.randn(3, 2)
    state = dict(x=x, values=v, bias=torch.zeros(2), dy=dy)
    ref_f = lambda x, v, fmt, b: torch.ones(3, 2, dtype=torch.float64)  # noqa: E731
    ref_i = lambda dy, v, fmt: torch.ones(3, 4, dtype=torch.float64)  # noqa: E731
    ref_w = lambda dy, x, fmt: torch.ones(5, dtype=torch.float64)  # noqa: E731
    off = 1e-2  # within bf16's 2e-2, far outside fp32's 1e-4
    fwd = lambda x, v, fmt, b: torch.full((3, 2), 1 + off)  # noqa: E731
    bwd_i = lambda dy, v, fmt: torch.ones(3, 4)  # noqa: E731
    bwd_w = lambda dy, x, fmt, out_dtype: torch.full((5,), 1 + off)  # noqa: E731
    assert lin.check(state, None, torch.float32, torch, ref_f, ref_i, ref_w, fwd, bwd_i, bwd_w, "t") == 2
    assert lin.check(state, None, torch.bfloat16, torch, ref_f, ref_i, ref_w, fwd, bwd_i, bwd_w, "t") == 0


def test_linear_table_speedup_is_dense_over_ours(capsys):
    """The printed table's speedups are dense masking's median over the row's (>1: faster than dense masking)."""
    lin.print_table([("fwd", "7x13", 5, 0.5, "fp32", "dense_mask", 4.0),
                     ("fwd", "7x13", 5, 0.5, "fp32", "sparse_triton", 1.0),
                     ("fwd", "7x13", 5, 0.5, "bf16", "dense_mask_autocast", 3.0),
                     ("fwd", "7x13", 5, 0.5, "bf16", "sparse_triton", 1.5)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[4].split()[-1] == "4.00x" and lines[6].split()[-2:] == ["2.67x", "2.00x"]


# ============================================================================================== bench_conv_gpu.py
def test_conv_rows_tf32_settings_and_precision_per_variant(monkeypatch, tmp_path, capsys, tf32_flags):
    """bench_conv_gpu.py: each variant is measured under its TF32 setting (dense masking fp32-tf32 and the fp32
    SparseConv2d with TF32 on, fp32-ieee off; the process's settings restored), the bf16 baseline under bf16
    autocast, the timer's median / p20 / p80 in their own columns; a failed correctness check is counted."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.backends.cudnn.allow_tf32 = False
    monkeypatch.setattr(conv, "check_triton", lambda *a: 0.5)  # the kernel is off by half the output's scale
    seen = []

    def fake_measure(fn, warmup, rep, dev):
        y = fn()
        y = y[0] if isinstance(y, tuple) else y
        seen.append((torch.backends.cudnn.allow_tf32, y.dtype))
        return 2.0, 1.0, 3.0, None

    monkeypatch.setattr(conv, "measure", fake_measure)
    real_layer = conv.make_dense_mask
    monkeypatch.setattr(conv, "make_layer", lambda layer, x, dy, w, m, b, autocast: dict(
        real_layer(layer, x, dy, w, m, b, torch.float32, autocast), path="dense"))
    out = tmp_path / "conv.csv"
    conv.main(["--dry-run", "--layers", "dry/conv", "--densities", "0.5", "--directions", "forward", "--impls",
               "dense_mask", "dense_mask_amp", "sparse_lth_layer", "--out", str(out)])
    rows = list(csv.DictReader(open(out, newline="")))
    got = {(r["impl"], r["dtype"]): s for r, s in zip(rows, seen)}
    assert got == {("dense_mask", "fp32-tf32"): (True, torch.float32),
                   ("dense_mask", "fp32-ieee"): (False, torch.float32),
                   ("dense_mask_amp", "bf16-autocast"): (False, torch.bfloat16),
                   ("sparse_lth_layer", "fp32-tf32"): (True, torch.float32),
                   ("sparse_lth_layer", "bf16-autocast"): (False, torch.bfloat16)}
    assert all((r["median_ms"], r["p20_ms"], r["p80_ms"]) == ("2.00000", "1.00000", "3.00000") for r in rows)
    assert torch.backends.cudnn.allow_tf32 is False
    assert "1 run, 1 mismatching" in capsys.readouterr().out


def test_conv_dense_mask_multiplies_by_the_mask_in_the_forward():
    """make_dense_mask's forward is F.conv2d(x, W * mask): the benchmark's weight is not pre-masked."""
    layer = conv.DRY_RUN_LAYERS[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(layer.batch, layer.c_in, layer.size, layer.size, generator=gen)
    w = torch.randn(layer.c_out, layer.c_in, layer.k, layer.k, generator=gen)
    mask = conv.random_mask(w.shape, 0.3, gen, "cpu")
    b = torch.randn(layer.c_out, generator=gen)
    dy = torch.randn(layer.batch, layer.c_out, layer.out_size, layer.out_size, generator=gen)
    fns = conv.make_dense_mask(layer, x, dy, w, mask, b, torch.float32, False)
    torch.testing.assert_close(fns["forward"](), F.conv2d(x, w * mask, b, layer.stride, layer.pad))


def test_conv_measure_warms_up_before_timing(monkeypatch):
    """measure() calls the function once (compiling and autotuning) before the timer sees it."""
    log = []
    monkeypatch.setattr(conv, "time_ms", lambda fn, dev, **k: log.append("time") or (1.0, 1.0, 1.0))
    conv.measure(lambda: log.append("call"), 10, 40, torch.device("cpu"))
    assert log[:2] == ["call", "time"]


def test_conv_table_speedup_is_dense_over_triton(capsys):
    """The printed conv table's `x tf32` is dense masking (TF32) over the Triton fp32 median."""
    rows = [dict(layer="l", density="0.5", direction="both", impl=i, dtype=d, median_ms=ms)
            for i, d, ms in (("triton_sparse", "fp32", 1.0), ("dense_mask", "fp32-tf32", 3.0))]
    conv.print_table(rows)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("l "))
    assert line.split()[-3] == "3.00x"


# ================================================================================================= bench_optim.py
def test_optim_baseline_masks_grads_and_weights_with_the_masks_dtype():
    """The torch.optim baselines mask the gradients before the step and the weights after it, with float masks
    for `+mask` and bool masks for `+boolmask`."""
    import inspect
    dense, compact = optim.make_set("tiny", 0.5, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
    impls = optim.build_impls("sgd", dense, compact, torch.device("cpu"), "torch")
    for name, dtype in (("torch.optim-foreach+mask", torch.float32), ("torch.optim-fused+boolmask", torch.bool)):
        step = impls[name][1]
        cells = inspect.getclosurevars(step).nonlocals
        assert {m.dtype for m in cells["mm"]} == {dtype}, name
        with torch.no_grad():
            for p, g in zip(cells["mp"], cells["mg"]):
                p.fill_(1.0)
                g.fill_(1.0)
        step()
        for p, g, m in zip(cells["mp"], cells["mg"], cells["mm"]):
            assert torch.all(g[~m.bool()] == 0) and torch.all(p.detach()[~m.bool()] == 0), name


def test_optim_time_impls_warms_up_and_passes_the_cuda_settings(monkeypatch):
    """time_impls: on CUDA each impl through time_ms with warmup 25 / rep 100; on CPU one untimed warm-up step
    per impl, then one timed step per round."""
    got = {}
    monkeypatch.setattr(optim, "time_ms", lambda fn, dev, warmup, rep: got.setdefault(fn, (warmup, rep)) and
                        (1.0, 1.0, 1.0))
    f, g = (lambda: None), (lambda: None)
    assert optim.time_impls({"a": ("dense", f), "b": ("dense", g)}, torch.device("cuda"), 3) == \
        {"a": (1.0, 1.0, 1.0), "b": (1.0, 1.0, 1.0)}
    assert got == {f: (25, 100), g: (25, 100)}
    calls = []
    optim.time_impls({"a": ("dense", lambda: calls.append(1))}, torch.device("cpu"), 3)
    assert len(calls) == 4


@pytest.mark.parametrize("dtype,per_elt", [("float32", {"sgd": 20, "adam": 28}), ("bfloat16", {"sgd": 14, "adam": 22})])
def test_optim_rows_bytes_bandwidth_and_median(monkeypatch, tmp_path, dtype, per_elt):
    """bench_optim rows: the timer's median in median_ms; bytes = per-element traffic (p, g, p in the
    parameters' dtype) x elements, plus 1 B per masked element on the dense impls; GBps = bytes / median; the
    default backend on CPU is torch."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(optim, "time_impls", lambda impls, dev, rep: {n: (2.0, 1.0, 3.0) for n in impls})
    out = tmp_path / "o.csv"
    optim.main(["--device", "cpu", "--models", "tiny", "--densities", "0.5", "--dtype", dtype, "--out", str(out)])
    rows = list(csv.DictReader(open(out, newline="")))
    assert {r["impl"] for r in rows} >= {"sparse_lth-torch-dense", "sparse_lth-torch-compact"}
    n_masked = sum(math.prod(s) for s, masked in optim.model_shapes("tiny") if masked)
    for r in rows:
        dense = not r["impl"].endswith("compact")
        n = int(r["params"]) if dense else int(r["nnz"])
        assert int(r["bytes"]) == per_elt[r["op"]] * n + (n_masked if dense else 0), r
        assert float(r["GBps"]) == round(int(r["bytes"]) / 2e-3 / 1e9, 2)
        assert (r["median_ms"], r["p20_ms"], r["p80_ms"]) == ("2.0", "1.0", "3.0")


# ================================================================================================ bench_memory.py
def test_memory_ratios_peak_column_and_device(monkeypatch, tmp_path):
    """bench_memory rows with a measured peak (a GPU run; the measurement stubbed): every `_x` is dense masking's
    bytes over the row's, the table shows the peak's own ratio, the device column names the device, and a ratio
    is never taken against a row that is not dense masking."""
    sizes = {"dense_masking": 1000, "sparse_lth": 250, "sparse_lth_sparse": 200}

    def fake_measure(impl, *a):
        n = sizes[impl]
        return dict({g: n for g in memory.GROUPS}, state=4 * n, total=5 * n, peak=8 * n, paths="d", nnz=1)

    monkeypatch.setattr(memory, "measure", fake_measure)
    out = tmp_path / "m.csv"
    assert memory.main(["--models", "lenet300_100", "--densities", "0.5", "--out", str(out)]) == 0
    rows = {r["impl"]: r for r in csv.DictReader(open(out, newline=""))}
    assert [rows["sparse_lth"][f"{k}_x"] for k in ("state", "total", "peak")] == ["4.0", "4.0", "4.0"]
    assert rows["sparse_lth"]["device"] == baselines.device_name("cpu")
    rows_md = [dict(model="m", batch=1, optimizer="sgd", density=0.5, impl="sparse_lth", paths="d",
                    **{f"{g}_bytes": 1 for g in memory.GROUPS + ("state", "total")}, peak_bytes=2 ** 20,
                    state_x=1.0, total_x=2.0, peak_x=3.0)]
    md = memory.markdown(rows_md, dict(device="d", commit="c", torch="t", argv=""))
    assert md.splitlines()[-1].endswith("| 2.00x | 1.00 | 3.00x |")
    out2 = tmp_path / "m2.csv"
    assert memory.main(["--models", "lenet300_100", "--densities", "0.5", "--impls", "sparse_lth", "dense_masking",
                        "--out", str(out2)]) == 0
    rows2 = {r["impl"]: r for r in csv.DictReader(open(out2, newline=""))}
    assert rows2["sparse_lth"]["state_x"] != "1.0"
