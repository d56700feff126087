"""The host side of the CPU benchmark scripts whose figures README.md quotes: bench_optim, bench_memory,
bench_crossover_cpu, bench_layers_cpu, bench_host_overhead, bench_train_loop and bench_linear_ops_cpu. Which
implementation, optimizer and settings each row's name stands for, which statistic and ratio goes into each column
and table cell, the warm-ups, the thread settings and the default file names.

Written after a mutation campaign on these scripts' host side (session 36): each test kills mutants (small
plausible bugs that change a row or a figure a user reads) that the rest of the suite let through. The scripts
are loaded in-process, on tiny shapes; their timers are stubbed, so every time asserted is a stub's and nothing
is measured."""
from __future__ import annotations

import csv
import inspect
import math
import os
import sys
import tempfile
import types

import pytest
import torch
import torch.nn as nn

from conftest import OpLog
from test_benchmark_scripts import _load, optim

from sparse_lth import optim as sl_optim
from sparse_lth.layers import (CPU_CONV_SPARSE_MAX_DENSITY, CPU_LINEAR_SPARSE_MAX_DENSITY, SparseLinear,
                               sparse_layers, sparsify)
from sparse_lth.models import build_model, paper_hparams

baselines = _load("baselines")
memory = _load("bench_memory")
cross = _load("bench_crossover_cpu")
layers_cpu = _load("bench_layers_cpu")
train_loop = _load("bench_train_loop")
linear_ops = _load("bench_linear_ops_cpu")
CPU = torch.device("cpu")


@pytest.fixture
def tf32():
    """The TF32 matmul switch, restored after the test (the model-level scripts turn it off)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _stub_samples(monkeypatch, mod, samples, log):
    """``mod.interleaved_samples`` replaced: each function's samples are ``samples(name)`` (ms); the call's
    repeats / warmup are logged, and ``time_one`` is called once on every function (so the script's own timer
    wrapper runs, with ``mod.wall_ms`` logging its ``inner``)."""
    def fake(fns, repeats, time_one, warmup=3):
        log.append(dict(repeats=repeats, warmup=warmup, names=list(fns)))
        for f in fns.values():
            time_one(f)
        return {k: list(samples(k)) for k in fns}

    monkeypatch.setattr(mod, "interleaved_samples", fake)
    monkeypatch.setattr(mod, "wall_ms", lambda fn, inner=1: log.append(dict(inner=inner)) or 0.0)


def _md_line(md: str, start: str) -> str:
    (line,) = [ln for ln in md.splitlines() if ln.startswith(start)]
    return line


# ================================================================================================= bench_optim.py
def _opt_of(step):
    """The optimizer behind one bench_optim impl: a bound ``step`` or the baseline closure's ``opt``."""
    owner = getattr(step, "__self__", None)
    return owner if owner is not None else inspect.getclosurevars(step).nonlocals["opt"]


@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_optim_each_impl_steps_what_its_name_says(op):
    """Every impl's optimizer: torch.optim's fused or foreach flavour as named; sparse_lth.optim on the backend
    named, with the masks attached on the dense path and the compact vectors (nnz elements a weight, no mask) on
    the compact one; torch.optim's fused compact floor on the compact vectors; all with the op's hyperparameters
    (SGD lr 0.1, momentum 0.9, weight decay 5e-4, the LTH paper's VGG-19 setting; Adam lr 1e-3)."""
    dense, compact = optim.make_set("tiny", 0.5, CPU, torch.float32, torch.Generator().manual_seed(0))
    impls = optim.build_impls(op, dense, compact, CPU, "torch")
    assert set(impls) == {"torch.optim-foreach+mask", "torch.optim-fused+mask", "torch.optim-foreach+boolmask",
                          "torch.optim-fused+boolmask", "sparse_lth-torch-dense", "sparse_lth-torch-compact",
                          "torch.optim-fused-compact"}
    want_kw = {"sgd": dict(lr=0.1, momentum=0.9, weight_decay=5e-4), "adam": dict(lr=1e-3)}[op]
    masks = [m for _, _, m in dense]
    dense_sizes = [w.numel() for w, _, _ in dense]
    compact_sizes = [w.numel() if m is None else int(m.sum()) for w, _, m in dense]
    assert [w.numel() for w, _ in compact] == compact_sizes != dense_sizes
    for name, (kind, step) in impls.items():
        opt = _opt_of(step)
        params = [p for g in opt.param_groups for p in g["params"]]
        assert [p.numel() for p in params] == (dense_sizes if kind == "dense" else compact_sizes), name
        assert {k: opt.defaults[k] for k in want_kw} == want_kw, name
        if name.startswith("torch.optim"):
            assert type(opt).__module__.startswith("torch.optim."), name
            flavour, other = ("fused", "foreach") if "fused" in name else ("foreach", "fused")
            assert opt.defaults[flavour] is True and not opt.defaults[other], name
        else:
            assert isinstance(opt, sl_optim.SGD if op == "sgd" else sl_optim.Adam), name
            assert opt.defaults["backend"] == "torch", name
            for p, m in zip(params, masks if kind == "dense" else [None] * len(params)):
                got = getattr(p, sl_optim.MASK_ATTR, None)
                assert (got is None) if m is None else torch.equal(got, m), name


def test_optim_parameter_sets():
    """vgg19 is VGG-19 for CIFAR-10 (16 3x3 convs, then a 512->10 fc: 20,029,514 parameters), every weight masked
    and no bias; fc4096 one masked 4096x4096 weight."""
    vgg = optim.model_shapes("vgg19")
    assert sum(math.prod(s) for s, _ in vgg) == 20_029_514
    assert [s for s, masked in vgg if masked] == [s for s, _ in vgg if len(s) > 1]
    assert sum(len(s) == 4 for s, _ in vgg) == 16 and vgg[-2:] == [((10, 512), True), ((10,), False)]
    assert optim.model_shapes("fc4096") == [((4096, 4096), True)]


def test_optim_rows_median_bandwidth_device_and_file(monkeypatch, tmp_path, threads):
    """A CPU run's rows: median_ms the median of the samples (not the mean), GBps = bytes / median, nnz the live
    count, --threads applied and named in the device column (with the CPU's family and model) and in the default
    file's name (the CPU's name only)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(optim, "ROOT", tmp_path)
    monkeypatch.setattr(optim, "cpu_id", lambda: "Some CPU (family 25, model 17)")
    monkeypatch.setattr(optim, "cpu_name", lambda: "Some CPU")
    log = []
    _stub_samples(monkeypatch, optim, lambda name: [1e-4, 2e-4, 9e-4], log)
    torch.set_num_threads(1)
    optim.main(["--device", "cpu", "--models", "tiny", "--ops", "sgd", "--densities", "0.5", "--threads", "2"])
    rows = _rows(tmp_path / "benchmarks" / "results" / "optim_cpu-some-cpu-2-threads.csv")
    _, compact = optim.make_set("tiny", 0.5, CPU, torch.float32, torch.Generator().manual_seed(0))
    assert len(rows) == 7
    for r in rows:
        assert r["device"] == "cpu: Some CPU (family 25, model 17) (2 threads)"
        assert float(r["median_ms"]) == 0.0002
        assert float(r["GBps"]) == round(int(r["bytes"]) / 2e-7 / 1e9, 2) > 0
        assert int(r["nnz"]) == sum(w.numel() for w, _ in compact) < int(r["params"])


def test_optim_interpret_rows_are_not_results_and_default_densities(monkeypatch, tmp_path):
    """--backend interpret (a check of the Triton code path, not a measurement) writes to a fresh temporary folder,
    never benchmarks/results/; without --densities the densities are 100/20/5/1 %."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(optim, "ROOT", tmp_path / "root")
    _stub_samples(monkeypatch, optim, lambda name: [1.0], [])
    optim.main(["--device", "cpu", "--backend", "interpret", "--models", "tiny", "--ops", "sgd"])
    assert not (tmp_path / "root").exists()
    (out,) = (tmp_path / "tmp").glob("sparse_lth_dry_run_*/optim_interpret_*.csv")
    rows = _rows(out)
    assert sorted({float(r["density"]) for r in rows}) == [0.01, 0.05, 0.2, 1.0]
    assert {r["impl"] for r in rows} >= {"sparse_lth-interpret-dense", "sparse_lth-interpret-compact"}


# ================================================================================================ bench_memory.py
def test_memory_saved_leaves_out_the_input_batch():
    """`saved` counts what autograd keeps for the backward less the input batch (the model saves x here, 48 kB;
    what else it keeps is a few bytes)."""
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(()))
            self.b = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return (x * self.s).sum(1) + self.b  # the product saves x for the gradient of s

    model, ledger = Scale(), memory.Ledger()
    ledger.claim("params", list(model.parameters()))
    x, y = torch.randn(4, 1000, 3), torch.tensor([0, 1, 2, 0])
    memory.saved_for_backward(model, x, y, ledger)
    assert 0 < ledger.bytes["saved"] < x.nbytes // 10


def test_memory_builds_each_implementation_as_named(monkeypatch):
    """dense_masking: torch.optim's Adam over the masked baseline; sparse_lth: sparse-lth's Adam and the paths
    choose_paths gives (the CPU's density rule here, timing on CUDA) on the batch; sparse_lth_sparse: every pruned
    layer forced onto the sparse path whatever the rule says (at 50 %: the rule keeps them dense), the unpruned
    output layer left dense."""
    chosen = []
    real = memory.choose_paths
    monkeypatch.setattr(memory, "choose_paths", lambda m, x, *a, **k: chosen.append(x) or real(m, x, *a, **k))
    gen = torch.Generator().manual_seed(0)
    proto = build_model("lenet300_100", seed=0)
    masks = baselines.random_masks(proto, 0.5, gen, skip=(proto.output_layer,))
    x, y = torch.randn(4, 1, 28, 28, generator=gen), torch.tensor([0, 1, 2, 3])
    got = {impl: memory.build(impl, "lenet300_100", masks, (x, y), "adam", 1e-3, (1, 28, 28))
           for impl in memory.IMPLS}
    assert {impl: g[3] for impl, g in got.items()} == {"dense_masking": "-", "sparse_lth": "ddd",
                                                       "sparse_lth_sparse": "ssd"}
    assert len(chosen) == 1 and chosen[0] is x  # sparse_lth only
    assert type(got["dense_masking"][1]) is torch.optim.Adam
    assert type(got["sparse_lth"][1]) is type(got["sparse_lth_sparse"][1]) is sl_optim.Adam
    assert all(g[1].defaults["lr"] == 1e-3 for g in got.values())


def test_memory_main_uses_each_models_paper_setting_and_names_its_file(monkeypatch, tmp_path, tf32):
    """Each model at its paper batch size and optimizer (SGD for ResNet-20, Adam for LeNet), its paper lr, at the
    default densities 100/20/5/1.5 %; every row keeps its nnz and its measured peak (a GPU run's); the default
    file is memory_<device slug>.csv with the .md beside it."""
    calls = []

    def fake_measure(impl, model_name, masks, batch, kind, lr, input_shape):
        calls.append((impl, model_name, batch[0].shape[0], kind, lr))
        n = 100 if impl == "dense_masking" else 50
        return dict({g: n for g in memory.GROUPS}, state=4 * n, total=5 * n, peak=3 * n, paths="d", nnz=7)

    monkeypatch.setattr(memory, "measure", fake_measure)
    monkeypatch.setattr(memory, "RESULTS", tmp_path)
    assert memory.main(["--models", "resnet20", "lenet300_100", "--impls", "dense_masking", "sparse_lth",
                        "--device", "cpu"]) == 0
    out = tmp_path / f"memory_{baselines.slug(baselines.device_name('cpu'))}.csv"
    rows = _rows(out)
    assert out.with_suffix(".md").exists()
    for model, batch, kind in (("resnet20", 128, "sgd"), ("lenet300_100", 60, "adam")):
        sub = [r for r in rows if r["model"] == model]
        assert [float(r["density"]) for r in sub] == [d for d in (1.0, 0.2, 0.05, 0.015) for _ in range(2)]
        assert {(r["batch"], r["optimizer"], r["nnz"]) for r in sub} == {(str(batch), kind, "7")}
        assert {(r["impl"], r["peak_bytes"], r["peak_x"]) for r in sub} == {("dense_masking", "300", "1.0"),
                                                                            ("sparse_lth", "150", "2.0")}
        assert {c[2:] for c in calls if c[1] == model} == {(batch, kind, paper_hparams(model)["lr"])}


def test_memory_table_cells_are_their_columns():
    """Each cell of the markdown table is its own column's MiB or ratio, under its own header."""
    mib = 2 ** 20
    r = dict(model="m", batch=1, optimizer="sgd", density=0.5, impl="sparse_lth", paths="sd", params_bytes=mib,
             grads_bytes=2 * mib, optim_bytes=3 * mib, masks_index_bytes=4 * mib, state_bytes=10 * mib,
             saved_bytes=5 * mib, total_bytes=15 * mib, peak_bytes="", state_x=1.5, total_x=2.5, peak_x=math.nan)
    lines = memory.markdown([r], dict(device="d", commit="c", torch="t", argv="")).splitlines()
    assert "| density | impl | paths | params | grads | optim | masks + index | state | state x | saved | total | " \
           "total x |" in lines
    assert "| 0.5 | sparse_lth | sd | 1.00 | 2.00 | 3.00 | 4.00 | 10.00 | 1.50x | 5.00 | 15.00 | 2.50x |" in lines


# ========================================================================================= bench_crossover_cpu.py
def _grads(fn):
    layer = fn.__defaults__[0]
    x = inspect.getclosurevars(fn).nonlocals["x"]
    return [None if x.grad is None else x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.allclose(a, b, 1e-5, 1e-6))


def test_crossover_steps_take_fresh_gradients_with_an_input_gradient_as_in_training():
    """Each timed configuration is a forward + backward with fresh gradients (none accumulated from the last
    call): with the input gradient for a linear layer and a conv layer past the first, without it for a first conv
    layer; unfold_csr computes its forward and backward."""
    gen = torch.Generator().manual_seed(0)
    for fns, input_grad in ((cross.step_fns(6, 5, 3, 0.4, gen), True),
                            (cross.conv_step_fns(3, 4, 6, 1, 2, False, 0.5, gen), False),
                            (cross.conv_step_fns(4, 4, 6, 2, 2, True, 0.5, gen), True)):
        for config in cross.CONFIGS:
            fns[config]()
            first = _grads(fns[config])
            fns[config]()
            again = _grads(fns[config])
            assert (first[0] is not None) == input_grad, config
            assert all(_same(a, b) for a, b in zip(first, again)), config
        if "unfold_csr" in fns:
            y, (dx, dv, db) = fns["unfold_csr"]()
            assert y.dim() == 4 and dv.dim() == 1 and db.shape == (4,)


def test_crossover_a_tie_is_not_a_win():
    assert cross.crossover({0.05: 1.0, 0.1: 2.0}) is None
    assert cross.crossover({0.05: 2.0, 0.1: 1.0}) == 0.05


def _crossover_main(monkeypatch, tmp_path, args, samples):
    log, densities = [], []

    def fake_fns(*a):
        densities.append(a[-2])
        return {k: (lambda: None) for k in cross.CONV_CONFIGS if k != "unfold_csr" or len(a) > 5}

    monkeypatch.setattr(cross, "step_fns", fake_fns)
    monkeypatch.setattr(cross, "conv_step_fns", fake_fns)
    monkeypatch.setattr(cross, "RESULTS", tmp_path)
    monkeypatch.setattr(cross, "cpu_name", lambda: "Some CPU")
    _stub_samples(monkeypatch, cross, lambda k: samples(densities[-1], k), log)
    assert cross.main(args) == 0
    return log, densities


def test_crossover_linear_rows_table_and_crossover(monkeypatch, tmp_path, threads):
    """Linear run: the default 31 interleaved repeats after the default warm-up, each sample the mean of the
    shape's inner calls; CSV medians (not means) and speedups dense / config; the table's cells the same, its
    crossover from the all-sparse column, the linear rule; --threads applied and in the default file's name."""
    def samples(d, k):
        if k == "dense":
            return [4.0, 4.0, 10.0]  # median 4, mean 6
        if k == "sparse":
            return [8.0, 8.0, 8.0] if d == 0.3 else [1.0, 2.0, 9.0]  # median 2, mean 4
        return [2.0, 2.0, 2.0]

    torch.set_num_threads(1)
    log, _ = _crossover_main(monkeypatch, tmp_path, ["--shapes", "100x300x60", "--densities", "0.3", "0.05",
                                                     "--threads", "2"], samples)
    runs = [e for e in log if "repeats" in e]
    assert [(e["repeats"], e["warmup"]) for e in runs] == [(31, 3), (31, 3)]
    assert {e["inner"] for e in log if "inner" in e} == {20}  # SHAPES: 100x300 at batch 60, 20 calls a sample
    out = tmp_path / "crossover_cpu_some-cpu-2-threads.csv"
    rows = {(float(r["density"]), r["config"]): r for r in _rows(out)}
    assert float(rows[(0.05, "dense")]["median_ms"]) == 4.0 and float(rows[(0.05, "sparse")]["median_ms"]) == 2.0
    assert float(rows[(0.05, "sparse")]["speedup_vs_dense_path"]) == 2.0
    assert float(rows[(0.3, "sparse")]["speedup_vs_dense_path"]) == 0.5
    assert {r["repeats"] for r in rows.values()} == {"31"}
    md = out.with_suffix(".md").read_text()
    header = _md_line(md, "| shape |")
    assert header == "| shape | batch | density | dense path ms | " + " | ".join(cross.CONFIGS[1:]) + " |"
    assert _md_line(md, "|---").count("---") == header.count("|") - 1
    assert _md_line(md, "| 100x300 | 60 | 0.05 |") == "| 100x300 | 60 | 0.05 | 4.000 | 2.00x | 2.00x | 2.00x | 2.00x |"
    assert _md_line(md, "| 100x300 | 60 | 0.3 |") == "| 100x300 | 60 | 0.3 | 4.000 | 0.50x | 2.00x | 2.00x | 2.00x |"
    assert "- 100x300 at batch 60: the all-sparse path wins at and below 0.05" in md.splitlines()
    assert f"sparse at or below {CPU_LINEAR_SPARSE_MAX_DENSITY:g} density" in md and "2 threads)" in md


def test_crossover_conv_defaults_table_and_file(monkeypatch, tmp_path):
    """Conv run: 11 repeats and the conv densities by default, the unfold_csr column in the table, the conv rule,
    and its own default file name."""
    log, densities = _crossover_main(monkeypatch, tmp_path, ["--kind", "conv", "--shapes", "conv6.2"],
                                     lambda d, k: [2.0] if k == "dense" else [1.0])
    assert sorted(densities, reverse=True) == cross.CONV_DENSITIES
    assert {e["repeats"] for e in log if "repeats" in e} == {11}
    (out,) = tmp_path.glob("crossover_conv_cpu_some-cpu-*-threads.csv")
    md = out.with_suffix(".md").read_text()
    assert _md_line(md, "| shape |").endswith("| sparse/weight_grad:dense | unfold_csr |")
    assert f"sparse at or below {CPU_CONV_SPARSE_MAX_DENSITY:g} density" in md


# ============================================================================================ bench_layers_cpu.py
def _stub_layers_timing(monkeypatch, log):
    monkeypatch.setattr(layers_cpu, "interleaved_medians", lambda fns, repeats, inner, warmup=3: log.append(
        dict(fns=fns, inner=inner, warmup=warmup)) or {k: [1.0] for k in fns})


def test_layers_interleaved_medians_warms_up():
    calls = []
    samples = layers_cpu.interleaved_medians({"a": lambda: calls.append(1)}, 2, inner=1)
    assert len(calls) == 3 + 2 and len(samples["a"]) == 2


def test_layers_model_step_builds_what_each_row_names(monkeypatch):
    """The LeNet step: dense masking through baseline_step with torch's Adam at 1.2e-3; each sparse-lth row its own
    model (every layer at the density) and Adam at 1.2e-3; `timed` chosen by timing with the training's optimizer,
    `timed_fwd_bwd` by timing without it; the forced rows on the path they name."""
    log, chosen, stepped = [], [], []
    _stub_layers_timing(monkeypatch, log)
    monkeypatch.setattr(layers_cpu, "choose_paths", lambda m, x, timed=False, optimizer=None:
                        chosen.append((m, timed, optimizer)) or {})
    monkeypatch.setattr(layers_cpu, "baseline_step", lambda *a: stepped.append(a))
    r = layers_cpu.bench_lenet(0.05, 1)
    fns = log[0]["fns"]
    assert set(fns) == {"dense_masking", "sparse_lth_auto", "sparse_lth_timed", "sparse_lth_timed_fwd_bwd",
                        "sparse_lth_dense", "sparse_lth_sparse", "dense_masking_fused_adam",
                        "sparse_lth_auto_fused_adam", "sparse_lth_auto_mask_aware_adam"}
    b, bo = (inspect.getclosurevars(fns["dense_masking"]).nonlocals[k] for k in ("b", "bo"))
    assert type(bo) is torch.optim.Adam and bo.defaults["lr"] == 1.2e-3 and not bo.defaults["fused"]
    fns["dense_masking"]()
    assert len(stepped) == 1 and stepped[0][:2] == (b, bo)
    bf, bfo = (inspect.getclosurevars(fns["dense_masking_fused_adam"]).nonlocals[k] for k in ("bf", "bfo"))
    assert bf is not b and type(bfo) is torch.optim.Adam and bfo.defaults["fused"] and bfo.defaults["lr"] == 1.2e-3
    assert [p for g in bfo.param_groups for p in g["params"]] == list(bf.parameters())
    assert [m.mask.sum().item() for m in bf.modules() if hasattr(m, "mask")] == \
        [m.mask.sum().item() for m in b.modules() if hasattr(m, "mask")]
    fns["dense_masking_fused_adam"]()
    assert len(stepped) == 2 and stepped[1][:2] == (bf, bfo)
    assert r["baselines"] == {"sparse_lth_auto_fused_adam": "dense_masking_fused_adam",
                              "sparse_lth_auto_mask_aware_adam": "dense_masking_fused_adam"}
    assert r["optimizers"] == {**{k: "torch Adam" for k in fns}, "dense_masking_fused_adam": "torch Adam fused",
                               "sparse_lth_auto_fused_adam": "torch Adam fused",
                               "sparse_lth_auto_mask_aware_adam": "sparse_lth Adam"}
    models = {}
    for name in fns:
        if name.startswith("dense_masking"):
            continue
        m, o = fns[name].__defaults__
        models[name] = m
        kind = (sl_optim.Adam if name.endswith("mask_aware_adam") else torch.optim.Adam)
        assert type(o) is kind and o.defaults["lr"] == 1.2e-3, name
        assert bool(o.defaults.get("fused")) == name.endswith("_fused_adam"), name
        assert [p for g in o.param_groups for p in g["params"]] == list(m.parameters()), name
        assert [layer.nnz for _, layer in sparse_layers(m)] == [round(0.05 * n) for n in (784 * 300, 300 * 100,
                                                                                          100 * 10)], name
    assert [(m, t) for m, t, _ in chosen] == [(models["sparse_lth_timed"], True),
                                              (models["sparse_lth_timed_fwd_bwd"], True)]
    assert chosen[1][2] is None
    opt = chosen[0][2]([nn.Parameter(torch.zeros(2))])
    assert type(opt) is torch.optim.Adam and opt.defaults["lr"] == 1.2e-3
    assert r["paths"]["sparse_lth_dense"] == "d/d/d" and r["paths"]["sparse_lth_sparse"] == "s/s/s"
    assert r["paths"]["sparse_lth_auto_fused_adam"] == r["paths"]["sparse_lth_auto_mask_aware_adam"] == "s/s/s"
    assert not {m for m, _, _ in chosen} & {models["sparse_lth_auto_fused_adam"],
                                            models["sparse_lth_auto_mask_aware_adam"]}  # auto: not timed


def test_layers_conv6_step_uses_its_learning_rate(monkeypatch):
    log = []
    _stub_layers_timing(monkeypatch, log)
    monkeypatch.setattr(layers_cpu, "choose_paths", lambda *a, **k: {})
    r = layers_cpu.bench_conv6(0.02, 1)
    fns = log[0]["fns"]
    assert "dense_masking_fused_adam" not in fns and r["baselines"] == {}  # (the other optimizers: LeNet only)
    assert set(r["optimizers"].values()) == {"torch Adam"}
    assert inspect.getclosurevars(fns["dense_masking"]).nonlocals["bo"].defaults["lr"] == 3e-4
    assert all(f.__defaults__[1].defaults["lr"] == 3e-4 for k, f in fns.items() if k != "dense_masking")


def test_layers_linear_case_times_each_named_configuration(monkeypatch):
    """The 1024x1024 layer: `timed` is the layer's own timed choice at the case's input shape, the forced rows
    on their paths (at 20 %, where the CPU's density rule keeps it dense); dense masking multiplies the weight
    gradient by the mask after the backward (what the baseline pays) and takes fresh gradients every call."""
    log, timed = [], []
    _stub_layers_timing(monkeypatch, log)
    monkeypatch.setattr(SparseLinear, "time_paths", lambda self, shape, reps=10, optimizer=None:
                        timed.append((self, shape)) or self.path_label)
    r = layers_cpu.bench_linear(0.2, 1)
    fns = log[0]["fns"]
    assert timed == [(fns["sparse_lth_timed"].__defaults__[0], (256, 1024))]
    assert r["paths"] == {"sparse_lth_auto": "dense", "sparse_lth_timed": "dense", "sparse_lth_dense": "dense",
                          "sparse_lth_sparse": "sparse"}
    cells = inspect.getclosurevars(fns["dense_masking"]).nonlocals
    fns["dense_masking"]()
    first = cells["x"].grad.clone()
    with OpLog() as mode:
        fns["dense_masking"]()
    assert "mul_" in mode.names[mode.names.index("backward"):]  # the weight gradient masked after the backward
    b = cells["b"]
    torch.testing.assert_close(cells["x"].grad, first)
    assert torch.all(b.weight.grad[b.mask == 0] == 0) and torch.any(b.weight.grad != 0)


def _layers_case(d, repeats, timed_fwd_bwd=True, other_optimizers=False):
    samples = {"dense_masking": [1.0, 2.0, 8.0], "sparse_lth_auto": [1.0] * 3, "sparse_lth_timed": [0.5] * 3,
               "sparse_lth_timed_fwd_bwd": [4.0] * 3, "sparse_lth_dense": [2.0] * 3, "sparse_lth_sparse": [0.25] * 3}
    if not timed_fwd_bwd:
        del samples["sparse_lth_timed_fwd_bwd"]
    paths = {"sparse_lth_auto": "s/s/d", "sparse_lth_timed": "h/s/d", "sparse_lth_timed_fwd_bwd": "d/s/d",
             "sparse_lth_dense": "d/d/d", "sparse_lth_sparse": "s/s/s", "sparse_lth_auto_fused_adam": "s/d/d",
             "sparse_lth_auto_mask_aware_adam": "s/s/h"}
    out = {"optimizers": {k: "torch Adam" for k in samples}}
    if other_optimizers:
        samples.update(dense_masking_fused_adam=[0.8] * 3, sparse_lth_auto_fused_adam=[0.4] * 3,
                       sparse_lth_auto_mask_aware_adam=[0.1] * 3)
        out["baselines"] = {"sparse_lth_auto_fused_adam": "dense_masking_fused_adam",
                            "sparse_lth_auto_mask_aware_adam": "dense_masking_fused_adam"}
        out["optimizers"].update(dense_masking_fused_adam="torch Adam fused", sparse_lth_auto_fused_adam="torch "
                                 "Adam fused", sparse_lth_auto_mask_aware_adam="sparse_lth Adam")
    return {"samples": samples, "paths": {k: v for k, v in paths.items() if k in samples}, **out}


def test_layers_rows_table_threads_and_files(monkeypatch, tmp_path, threads):
    """The rows: median and p20 / p80 of the samples, the speedup dense masking's median / the row's median, each
    row's own path; the table's cells in their columns; the default densities 100/20/5/2/1 %; --threads applied
    and in each case set's own default file name."""
    seen = []
    monkeypatch.setattr(layers_cpu, "bench_lenet", lambda d, n: seen.append(("lenet", d)) or
                        _layers_case(d, n, other_optimizers=True))
    monkeypatch.setattr(layers_cpu, "bench_linear", lambda d, n: seen.append(("linear", d)) or
                        _layers_case(d, n, timed_fwd_bwd=False))
    monkeypatch.setattr(layers_cpu, "bench_conv6", lambda d, n: _layers_case(d, n))
    monkeypatch.setattr(layers_cpu, "RESULTS", tmp_path)
    monkeypatch.setattr(layers_cpu, "cpu_name", lambda: "Some CPU")
    torch.set_num_threads(1)
    assert layers_cpu.main(["--threads", "2", "--repeats", "3"]) == 0
    assert seen == [(c, d) for c in ("lenet", "linear") for d in (1.0, 0.2, 0.05, 0.02, 0.01)]
    out = tmp_path / "layers_cpu_some-cpu-2-threads.csv"
    rows = {(r["case"], float(r["density"]), r["impl"]): r for r in _rows(out)}
    base = rows[("lenet300_100_train_step_b60", 0.05, "dense_masking")]
    assert (base["median_ms"], base["p20_ms"], base["p80_ms"], base["repeats"]) == ("2.0", "1.4", "5.6", "3")
    assert "2 threads)" in base["device"]
    auto = rows[("lenet300_100_train_step_b60", 0.05, "sparse_lth_auto")]
    assert (auto["speedup_vs_dense_masking"], auto["path"]) == ("2.0", "s/s/d")
    assert rows[("linear1024_fwd_bwd_b256", 0.05, "sparse_lth_timed")]["path"] == "h/s/d"
    fused = rows[("lenet300_100_train_step_b60", 0.05, "sparse_lth_auto_fused_adam")]  # against the fused baseline
    assert (fused["speedup_vs_dense_masking"], fused["baseline"], fused["optimizer"]) == (
        "2.0", "dense_masking_fused_adam", "torch Adam fused")
    bf = rows[("lenet300_100_train_step_b60", 0.05, "dense_masking_fused_adam")]
    assert (bf["speedup_vs_dense_masking"], bf["baseline"]) == ("2.5", "dense_masking")
    assert (auto["baseline"], auto["optimizer"]) == ("dense_masking", "torch Adam")
    assert rows[("linear1024_fwd_bwd_b256", 0.05, "sparse_lth_auto")]["optimizer"] == "torch Adam"
    md = out.with_suffix(".md").read_text()
    assert _md_line(md, "| lenet300_100_train_step_b60 | 0.05 | 2.000 | 0.800 |") == (
        "| lenet300_100_train_step_b60 | 0.05 | 2.000 | 0.800 | 0.400 (s/d/d) | 2.00x | 0.100 | 8.00x |")
    assert "| linear1024_fwd_bwd_b256 | 0.05 | 2.000 | 0.800 |" not in md
    assert _md_line(md, "| lenet300_100_train_step_b60 | 0.05 | 2.000 | 1.000 ") == (
        "| lenet300_100_train_step_b60 | 0.05 | 2.000 | 1.000 (s/s/d) | 2.00x | 0.500 (h/s/d) | 4.00x | "
        "4.000 (d/s/d) | 0.50x | 0.250 | 8.00x |")
    assert _md_line(md, "| linear1024_fwd_bwd_b256 | 0.05 |") == (
        "| linear1024_fwd_bwd_b256 | 0.05 | 2.000 | 1.000 (s/s/d) | 2.00x | 0.500 (h/s/d) | 4.00x | - | - | "
        "0.250 | 8.00x |")
    assert layers_cpu.main(["--cases", "conv6", "--densities", "0.02", "--repeats", "3"]) == 0
    assert {p.name for p in tmp_path.glob("layers_conv6_cpu_*.csv")} == {"layers_conv6_cpu_some-cpu-2-threads.csv"}


# ========================================================================================= bench_host_overhead.py
@pytest.fixture(scope="module")
def host():
    """bench_host_overhead.py, loaded in-process: it refuses to be imported after Triton (it sets TRITON_INTERPRET
    before Triton's first import when run as a script), so Triton is hidden from it while it loads, and the
    environment it sets is put back."""
    env = os.environ.get("TRITON_INTERPRET")
    hidden = sys.modules.pop("triton", None)
    try:
        return _load("bench_host_overhead")
    finally:
        if hidden is not None:
            sys.modules["triton"] = hidden
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env


def test_host_floor_swaps_every_sparse_layer(host):
    """The torch floor of Conv-2: both convs and all three linears replaced by trivial Functions."""
    masks = baselines.random_masks(build_model("conv2", seed=0), 0.05, torch.Generator().manual_seed(0))
    floor = host.floor_model(sparsify(build_model("conv2", seed=0), masks=masks, path="sparse"))
    assert not list(sparse_layers(floor))
    kinds = [type(m).__name__ for m in floor.modules()]
    assert (kinds.count("_FloorConv"), kinds.count("_FloorLinear")) == (2, 3)


@pytest.mark.parametrize("model_name", ["lenet300_100", "conv2"])
def test_host_floor_backward_reaches_every_layer(host, model_name):
    """The floor's trivial Functions return a gradient for their input, so the backward runs through every layer
    before them as the sparse layers' does (each floor layer's values and bias get a gradient, and so does an
    input that needs one)."""
    masks = baselines.random_masks(build_model(model_name, seed=0), 0.05, torch.Generator().manual_seed(0))
    floor = host.floor_model(sparsify(build_model(model_name, seed=0), masks=masks, path="sparse"))
    x = torch.randn(2, *host.INPUT_SHAPES[host.default_dataset(model_name)], requires_grad=True)
    torch.nn.functional.cross_entropy(floor(x), torch.tensor([0, 1])).backward()
    grads = {n: p.grad is not None for n, p in floor.named_parameters() if n.endswith(("values", "bias"))}
    assert len(grads) >= 6 and all(grads.values()), grads
    assert x.grad is not None and x.grad.shape == x.shape  # (the first layer's input gradient, when asked for)


def test_host_sgd_step_times_the_optimizer_step_alone(host, monkeypatch):
    """opt_us is the optimizer's step() alone: the clock read right before and right after it."""
    clock = {"t": 0.0}
    monkeypatch.setattr(host, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))

    class Opt:
        def zero_grad(self, set_to_none=True):
            clock["t"] += 1.0

        def step(self):
            clock["t"] += 0.005

    model = nn.Linear(3, 2)
    real_forward = model.forward
    model.forward = lambda x: clock.update(t=clock["t"] + 1.0) or real_forward(x)
    opt_ms = []
    host.sgd_step(model, Opt(), torch.randn(2, 3), torch.tensor([0, 1]), opt_ms)
    assert opt_ms == [pytest.approx(5.0)]


def test_host_optimizers_are_the_named_ones(host):
    def p():
        return [nn.Parameter(torch.zeros(3))]

    o = host.make_opt("torch_sgd", p())
    assert type(o) is torch.optim.SGD and o.defaults["momentum"] == 0
    o = host.make_opt("torch_sgd_fused", p())
    assert type(o) is torch.optim.SGD and o.defaults["fused"] is True and o.defaults["momentum"] == 0.9
    o = host.make_opt("torch_adam_fused", p())
    assert type(o) is torch.optim.Adam and o.defaults["fused"] is True
    o = host.make_opt("sparse_lth_sgd", p())
    assert type(o) is sl_optim.SGD and o.defaults["backend"] == "interpret" and o.defaults["momentum"] == 0.9
    for kind, capturable in (("sparse_lth_adam", False), ("sparse_lth_adam_capturable", True)):
        o = host.make_opt(kind, p())
        assert type(o) is sl_optim.Adam and o.defaults["backend"] == "interpret"
        assert o.defaults["capturable"] is capturable


def test_host_measure_figures(host, monkeypatch):
    """measure(): step and floor microseconds are the medians of their own samples, opt_us the median optimizer
    time of the timed steps (the 3 warm-up steps left out), host us per launch (step - floor) / (forward +
    backward launches); the floor steps its own model with its own optimizer."""
    from sparse_lth.kernels import _triton
    if not _triton.interpreting():
        pytest.skip("the launch stub replaces the interpreter's launches: only where this process interprets")
    calls, state, log = [], {"timed": False}, []

    def fake_step(model, opt, x, y, opt_ms=None):
        calls.append((model, opt, opt_ms is not None))
        if opt_ms is not None:
            opt_ms.append(0.002 if state["timed"] else 100.0)

    def fake_wall_ms(fn, inner=1):
        state["timed"] = True
        fn()
        state["timed"] = False
        return 0.0

    def fake_interleaved(fns, repeats, time_one, warmup=3):
        log.append(warmup)
        for f in fns.values():
            for _ in range(warmup):
                f()
            for _ in range(repeats):
                time_one(f)
        return {"sparse_lth": [0.010, 0.011, 0.030], "torch_floor": [0.004, 0.005, 0.006]}

    monkeypatch.setattr(host, "sgd_step", fake_step)
    monkeypatch.setattr(host, "wall_ms", fake_wall_ms)
    monkeypatch.setattr(host, "interleaved_samples", fake_interleaved)
    r = host.measure("lenet300_100", 0.05, 2, 3, 1, "torch_sgd")
    assert log == [3]
    assert (r["step_us"], r["floor_us"], r["opt_us"]) == (11.0, 5.0, 2.0)
    assert (r["launches_fwd"], r["launches_bwd"], r["host_us_per_launch"]) == (3, 5, round(6.0 / 8, 1))
    sparse = {id(m) for m, _, timed in calls if timed}
    floor = {id(m) for m, _, timed in calls if not timed}
    assert len(sparse) == len(floor) == 1 and sparse != floor
    for m, o, timed in calls:
        assert [q for g in o.param_groups for q in g["params"]] == list(m.parameters())
        if timed:  # every layer at the row's density
            assert [layer.nnz for _, layer in sparse_layers(m)] == [round(0.05 * n) for n in (784 * 300, 300 * 100,
                                                                                              100 * 10)]
        assert bool(list(sparse_layers(m))) == timed  # the floor has no sparse layer left


def test_host_main_runs_on_one_thread_by_default(host, monkeypatch, threads):
    seen = []

    def fake_measure(*a):
        seen.append((a, torch.get_num_threads()))
        return dict(model=a[0], density=a[1], batch=a[2], optimizer=a[5], step_us=1.0, floor_us=1.0, opt_us=1.0,
                    launches_fwd=1, launches_bwd=1, host_us_per_launch=0.0, device="cpu", torch="t", commit="c")

    monkeypatch.setattr(host, "measure", fake_measure)
    torch.set_num_threads(2)
    assert host.main([]) == 0
    assert seen == [(("lenet300_100", 0.02, 60, 1001, 1, "torch_sgd"), 1)]
    assert host.main(["--threads", "2", "--densities", "0.5"]) == 0 and seen[-1][1] == 2


# ============================================================================================ bench_train_loop.py
def test_train_loop_modes_figures_and_settings(monkeypatch, tmp_path, threads, tf32):
    """per_step_sync is train() with a callback after every step (it waits for the device before it), stretch
    without; each figure is train()'s time_per_step in ms, the median of the timed calls (the warm-up call left
    out), min / max of the same, the speedup per_step_sync / mode; train() gets the paper's settings and the row's
    optimizer implementation; each model's paths chosen on a batch (by timing, on CUDA); the output layer is not
    pruned (its path stays dense); --threads applied; the default file train_loop_<device slug>.csv."""
    calls, count, chosen = [], {}, []
    real_choose = train_loop.choose_paths
    monkeypatch.setattr(train_loop, "choose_paths", lambda m, x, *a, **k: chosen.append(x.shape) or
                        real_choose(m, x, *a, **k))

    def fake_train(model, train_data, test_data, cfg, callback=None):
        calls.append((cfg, callback, torch.get_num_threads()))
        key = (cfg.optimizer_impl, callback is not None)
        i = count[key] = count.get(key, -1) + 1
        return {"time_per_step": ([1e-4, 0.004, 0.006] if callback else [1e-4, 0.002, 0.003])[i]}

    monkeypatch.setattr(train_loop, "train", fake_train)
    monkeypatch.setattr(train_loop, "RESULTS", tmp_path)
    torch.set_num_threads(1)
    assert train_loop.main(["--device", "cpu", "--densities", "0.05", "--iterations", "7", "--repeats", "2",
                            "--threads", "2"]) == 0
    rows = _rows(tmp_path / f"train_loop_{baselines.slug(baselines.device_name('cpu'))}.csv")
    assert [(r["optimizer_impl"], r["mode"]) for r in rows] == [
        (i, m) for i in ("torch", "sparse_lth") for m in ("per_step_sync", "stretch")]
    for r in rows:
        sync = r["mode"] == "per_step_sync"
        assert (r["median_ms_per_step"], r["min_ms"], r["max_ms"]) == (("5.0", "4.0", "6.0") if sync else
                                                                        ("2.5", "2.0", "3.0")), r
        assert r["speedup_vs_per_step_sync"] == ("1.0" if sync else "2.0") and r["paths"] == "ssd", r
    assert len(calls) == 12 and {t for _, _, t in calls} == {2}
    assert chosen == [(60, 1, 28, 28)] * 2  # each model's paths chosen on a batch (by timing on CUDA)
    assert [c.optimizer_impl for c, _, _ in calls] == ["torch"] * 6 + ["sparse_lth"] * 6
    for cfg, _, _ in calls:
        assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.iterations, cfg.eval_every, cfg.cuda_graph) == (
            "adam", 1.2e-3, 60, 7, 7, False)


def test_train_loop_graph_mode_on_cuda(monkeypatch, tmp_path, tf32):
    """On a GPU a third mode, graph: train() with cuda_graph=True and no callback (CUDA stood in for: the model
    and data stay on the CPU)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train_loop, "device_name", lambda dev: "Fake GPU")
    real_data, real_build = train_loop.synthetic_mnist, train_loop.build_model
    monkeypatch.setattr(train_loop, "synthetic_mnist", lambda n, dev, seed=0: real_data(n, CPU, seed))

    def build(*a, **k):
        m = real_build(*a, **k)
        m.to = lambda *a, **k: m
        return m

    monkeypatch.setattr(train_loop, "build_model", build)
    monkeypatch.setattr(train_loop, "train", lambda model, tr, te, cfg, callback=None: calls.append(
        (cfg.cuda_graph, callback is not None)) or {"time_per_step": 0.001})
    out = tmp_path / "t.csv"
    assert train_loop.main(["--device", "cuda", "--densities", "0.05", "--iterations", "2", "--repeats", "1",
                            "--optimizer-impl", "torch", "--out", str(out)]) == 0
    assert [r["mode"] for r in _rows(out)] == ["per_step_sync", "stretch", "graph"]
    assert sorted(set(calls)) == [(False, False), (False, True), (True, False)]


# ========================================================================================= bench_linear_ops_cpu.py
def test_linear_ops_each_op_computes_its_op_sparse_or_dense():
    """Each (op, impl) closure computes that op (the forward, the input gradient, the weight gradient at the live
    positions), the sparse ones through the torch backend's sparse products, the dense ones without them."""
    gen = torch.Generator().manual_seed(0)
    fns = linear_ops.ops_for(6, 5, 3, 0.4, gen)
    cells = {**inspect.getclosurevars(fns[("forward", "sparse")]).nonlocals,
             **inspect.getclosurevars(fns[("weight_grad", "sparse")]).nonlocals}
    x, dy, v, fmt = cells["x"], cells["dy"], cells["v"], cells["fmt"]
    rows, cols = fmt.row_idx.long(), fmt.col_idx.long()
    assert v.numel() == round(0.4 * 30)
    w = torch.zeros(6, 5)
    w[rows, cols] = v
    want = {"forward": x @ w.t(), "input_grad": dy @ w, "weight_grad": (dy.t() @ x)[rows, cols]}
    called = []
    real = linear_ops.torch_ops
    spy = types.SimpleNamespace(**{n: (lambda *a, n=n: called.append(n) or getattr(real, n)(*a))
                                   for n in ("linear_forward", "linear_backward_input", "linear_backward_weight")})
    try:
        linear_ops.torch_ops = spy
        for (op, impl), fn in fns.items():
            called.clear()
            torch.testing.assert_close(fn(), want[op], msg=f"{op} {impl}")
            assert called == ({"forward": ["linear_forward"], "input_grad": ["linear_backward_input"],
                               "weight_grad": ["linear_backward_weight"]}[op] if impl == "sparse" else []), (op, impl)
    finally:
        linear_ops.torch_ops = real


def test_linear_ops_rows_medians_threads_and_file(monkeypatch, tmp_path, threads):
    """The rows: each (op, impl) its own columns, the median of its samples, the repeats asked for, the default
    densities, the shape as rows x cols; --threads applied and in the default file's name."""
    log = []
    monkeypatch.setattr(linear_ops, "SHAPES", [(6, 5, 3)])
    monkeypatch.setattr(linear_ops, "RESULTS", tmp_path)
    monkeypatch.setattr(linear_ops, "cpu_name", lambda: "Some CPU")
    _stub_samples(monkeypatch, linear_ops, lambda k: [1.0, 2.0, 9.0] if k[1] == "sparse" else [3.0, 3.0, 3.0], log)
    torch.set_num_threads(1)
    assert linear_ops.main(["--threads", "2", "--repeats", "5"]) == 0
    assert {(e["repeats"], e["warmup"]) for e in log if "repeats" in e} == {(5, 3)}
    rows = _rows(tmp_path / "linear_ops_cpu_some-cpu-2-threads.csv")
    assert sorted({float(r["density"]) for r in rows}) == [0.02, 0.05, 0.1, 0.2, 0.5]
    assert {(r["op"], r["impl"], r["median_ms"]) for r in rows} == {
        (op, impl, "2.0" if impl == "sparse" else "3.0") for op in ("forward", "input_grad", "weight_grad")
        for impl in ("sparse", "dense")}
    assert {(r["shape"], r["batch"], r["repeats"]) for r in rows} == {("6x5", "3", "5")}
    assert all("2 threads)" in r["device"] for r in rows)


# ============================================================================================ bench_adam_zeros_cpu.py
adam_zeros = _load("bench_adam_zeros_cpu")


def test_adam_zeros_inputs_and_steps_are_what_the_rows_name():
    """The sqrt inputs: no zero, all zeros, ~80 % zeros. Each Adam row steps its own LeNet-300-100 on the dense
    path with the optimizer it names, after one training step: pruned weights' second moments are zero (what the
    benchmark is about), live ones are not, and a timed step leaves the pruned weights at zero."""
    x = adam_zeros.sqrt_inputs(10_000)
    assert bool((x["uniform"] > 0).all()) and not x["zeros"].any()
    assert 0.75 < float((x["zeros_80pct"] == 0).float().mean()) < 0.85
    steps = adam_zeros.adam_steps(0.2)
    assert list(steps) == ["torch_default", "torch_foreach", "torch_fused", "sparse_lth"]
    for name, step in steps.items():
        opt = step.__self__
        expected = sl_optim.Adam if name == "sparse_lth" else torch.optim.Adam
        assert type(opt) is expected, name
        if name != "sparse_lth":
            assert (opt.defaults["foreach"], opt.defaults["fused"]) == (
                {"torch_foreach": (True, None), "torch_fused": (None, True)}.get(name, (None, None))), name
        (fc1, *_), = [[p for p in g["params"]] for g in opt.param_groups]
        assert fc1.shape == (300, 784)
        live = fc1._sparse_lth_mask
        assert 0.19 < float(live.float().mean()) < 0.21, name
        v = opt.state[fc1]["exp_avg_sq"]
        assert not v[~live].any() and v[live].any(), name
        step()
        assert not fc1[~live].any(), name


def test_adam_zeros_rows_and_table(tmp_path, monkeypatch):
    """Rows: the sqrt part per input, the step part per density and optimizer (each its own median); the table's
    ratios divide those medians (sqrt against the uniform input, the default Adam against the fused one)."""
    times = {"uniform": 1.0, "zeros": 8.0, "zeros_80pct": 6.0, "torch_default": 4.0, "torch_foreach": 3.0,
             "torch_fused": 0.5, "sparse_lth": 1.0}
    monkeypatch.setattr(adam_zeros, "interleaved_samples", lambda fns, repeats, time_one: {
        k: [times[k], times[k] * 3, times[k]] for k in fns})
    monkeypatch.setattr(adam_zeros, "adam_steps", lambda d: {k: None for k in adam_zeros.OPTIMIZERS})
    out = tmp_path / "a.csv"
    assert adam_zeros.main(["--repeats", "3", "--densities", "0.2", "0.01", "--out", str(out)]) == 0
    rows = {(r["part"], r["case"], r["impl"]): r for r in _rows(out)}
    assert set(rows) == ({("sqrt", "235200", k) for k in ("uniform", "zeros", "zeros_80pct")}
                         | {("adam_step", f"lenet_d{d}", k) for d in ("0.2", "0.01") for k in adam_zeros.OPTIMIZERS})
    assert rows[("sqrt", "235200", "zeros")]["median_ms"] == "8.0"
    assert rows[("adam_step", "lenet_d0.01", "torch_fused")]["p80_ms"] == "1.1"  # 0.5, 0.5, 1.5: p80 1.1
    md = out.with_suffix(".md").read_text()
    assert "| zeros | 8.0000 | 8.00x |" in md and "| zeros_80pct | 6.0000 | 6.00x |" in md
    assert "| 0.01 | 4.0000 | 3.0000 | 0.5000 | 1.0000 | 8.00x |" in md
    with pytest.raises(SystemExit):
        adam_zeros.main(["--densities", "0", "--out", str(out)])
